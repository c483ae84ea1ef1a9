//! Shutdown draining: HTTP/1.1 connections learn that shutdown started
//! through [`Drain`] (one flag, one waker registration per connection);
//! hyper's h2 connections and tunnels through the `watch` channel
//! ([`draining`], [`serve_until_drained!`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::Waker;

use tokio::sync::watch;

/// Shutdown for HTTP/1.1 connections without a shared future polled on
/// every request (a `watch` future takes a process-wide lock each time it is
/// polled): a connection registers its task's waker once, checks one flag
/// while it waits for a head, and [`Drain::start`] flips the flag and wakes
/// every registered task.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    wakers: Mutex<(u64, HashMap<u64, Waker>)>,
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start(&self) {
        self.draining.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut self.wakers.lock().unwrap_or_else(PoisonError::into_inner).1);
        for (_, w) in wakers {
            w.wake();
        }
    }

    pub(super) fn register(&self, waker: &Waker) -> u64 {
        let mut g = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, waker.clone());
        id
    }

    fn deregister(&self, id: u64) {
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner).1.remove(&id);
    }
}

/// A registration in [`Drain`], removed when the connection ends.
pub(super) struct DrainGuard<'a> {
    pub(super) drain: &'a Drain,
    pub(super) id: Option<u64>,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.drain.deregister(id);
        }
    }
}

/// Resolves once shutdown has started.
pub(crate) async fn draining(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Runs a hyper server connection (h2 in intercepted tunnels) to its end;
/// once shutdown starts, asks it to finish the requests in flight and close.
macro_rules! serve_until_drained {
    ($conn:expr, $shutdown:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = $crate::proxy::drain::draining(&mut $shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}
pub(crate) use serve_until_drained;
