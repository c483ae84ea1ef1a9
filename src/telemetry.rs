//! Logging set-up. Log lines use structured fields and never carry a header
//! value, a query string or a credential.
//!
//! Lines are formatted on the thread that logs, then appended to a shared
//! buffer that a background thread writes to stderr every few milliseconds:
//! with one access-log line per request, a `write(2)` per line (and the wake
//! of whatever reads the pipe) cost more than the rest of the line. A full
//! buffer is written by the logging thread itself, so nothing is dropped.
//! The background thread sleeps until a batch starts, so an idle instance
//! (a sidecar between workflow runs) does not wake up 50 times a second.
//!
//! Leaf module.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How long a line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Above this, the logging thread writes the buffer out itself.
const MAX_BUFFERED: usize = 256 * 1024;

#[derive(Default)]
struct Shared {
    buf: Mutex<Vec<u8>>,
    /// Signalled when a line lands in an empty buffer.
    started: Condvar,
}

impl Shared {
    /// Takes the buffer and writes it outside the buffer lock; stderr's lock
    /// is taken first, so chunks reach stderr in order.
    fn write_out(&self, mut guard: std::sync::MutexGuard<'_, Vec<u8>>) {
        if guard.is_empty() {
            return;
        }
        let data = std::mem::take(&mut *guard);
        let mut stderr = std::io::stderr().lock();
        drop(guard);
        let _ = stderr.write_all(&data);
    }
}

static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

/// The writer the subscriber gets per event: collects one line, appends it
/// to the shared buffer on drop.
pub struct LineWriter {
    shared: Arc<Shared>,
    line: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let Ok(mut buf) = self.shared.buf.lock() else { return };
        let first = buf.is_empty();
        buf.extend_from_slice(&self.line);
        if buf.len() >= MAX_BUFFERED {
            self.shared.write_out(buf);
        } else if first {
            drop(buf);
            self.shared.started.notify_one();
        }
    }
}

struct Buffered(Arc<Shared>);

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { shared: self.0.clone(), line: Vec::with_capacity(256) }
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else `level`.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let shared = SHARED.get_or_init(|| {
        let shared = Arc::new(Shared::default());
        let bg = shared.clone();
        let _ = std::thread::Builder::new().name("credproxy-log".into()).spawn(move || loop {
            // Wait for a batch to start, let it collect lines, write it.
            let Ok(guard) = bg.buf.lock() else { return };
            let Ok(guard) = bg.started.wait_while(guard, |b| b.is_empty()) else { return };
            drop(guard);
            #[allow(clippy::disallowed_methods, reason = "a dedicated OS thread, not a runtime worker")]
            std::thread::sleep(FLUSH_EVERY);
            let Ok(guard) = bg.buf.lock() else { return };
            bg.write_out(guard);
        });
        shared
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Buffered(shared.clone()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .try_init();
}

/// Writes out buffered log lines now (before exit).
pub fn flush() {
    if let Some(shared) = SHARED.get() {
        if let Ok(guard) = shared.buf.lock() {
            shared.write_out(guard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_appended_whole_and_flushed() {
        let shared = Arc::new(Shared::default());
        let make = Buffered(shared.clone());
        {
            let mut w = make.make_writer();
            w.write_all(b"first ").unwrap();
            w.write_all(b"line\n").unwrap();
            assert!(shared.buf.lock().unwrap().is_empty(), "nothing until the line is complete");
        }
        make.make_writer().write_all(b"second line\n").unwrap();
        assert_eq!(&shared.buf.lock().unwrap()[..], b"first line\nsecond line\n");
    }
}
