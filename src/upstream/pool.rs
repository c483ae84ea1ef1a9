//! The upstream connection pool of the proxy's hot path.
//!
//! HTTP/1.1 connections are driven *inline*: the task serving the caller's
//! request polls the upstream connection itself — while it waits for the
//! response head, and then from the response body it hands to the caller's
//! side ([`PooledBody`]). There is no connection task and no hand-off between
//! tasks per request (a pooled client with a task per connection pays two
//! cross-task wake-ups per request, often across threads). When the response
//! body has been read to its end the connection goes back to the idle list;
//! a response dropped half-read closes it.
//!
//! `https://` upstreams offer h2 and http/1.1 by ALPN. An h2 connection is
//! multiplexed, so it runs as its own task and its sender is shared.
//!
//! Idle connections are checked before reuse (one poll: a peer's close is
//! seen without a syscall), expire after `upstream.pool_idle_timeout_secs`
//! (a sweeper also closes expired ones), and at most
//! `upstream.pool_max_idle_per_host` are kept per scheme, host and port. A
//! request that an idle connection could not even start (the peer had closed
//! it) is retried once on a new connection.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either as IoEither;

use super::{ConnectError, GuardedConnector, UpstreamBody};

type Io = TokioIo<IoEither<TcpStream, TlsStream<TcpStream>>>;
type H1Conn = http1::Connection<Io, UpstreamBody>;
type H2Sender = http2::SendRequest<UpstreamBody>;

/// Why a request got no response head from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("TLS handshake with {host} failed")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {host} timed out")]
    TlsTimeout { host: String },
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    #[error("invalid upstream URI")]
    InvalidUri,
}

/// Upstream connections opened and reused, for `/metrics`.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub opened: AtomicU64,
    pub reused: AtomicU64,
}

/// Settings for [`Pool::new`].
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub tls_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    https: bool,
    host: Arc<str>,
    port: u16,
}

impl Key {
    fn of(uri: &Uri) -> Result<Self, UpstreamError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(UpstreamError::InvalidUri),
        };
        let host = uri.host().ok_or(UpstreamError::InvalidUri)?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self { https, host: host.into(), port })
    }
}

/// An HTTP/1.1 connection: the request sender and the connection state
/// machine that nobody polls but the request using it.
struct H1 {
    key: Key,
    sender: http1::SendRequest<UpstreamBody>,
    conn: H1Conn,
}

impl H1 {
    /// Polls the connection once without a task to wake: true if it can
    /// take a request (not closed by the peer, not mid-message).
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(Pin::new(&mut self.conn).poll(&mut cx), Poll::Pending) && self.sender.is_ready()
    }
}

struct Idle {
    h1: Box<H1>,
    since: Instant,
}

#[derive(Default)]
struct Slots {
    idle: HashMap<Key, Vec<Idle>>,
    h2: HashMap<Key, H2Sender>,
}

pub struct Pool {
    connector: GuardedConnector,
    tls: tokio_rustls::TlsConnector,
    settings: PoolSettings,
    slots: Mutex<Slots>,
    pub stats: PoolStats,
}

enum Fresh {
    H1(Box<H1>),
    H2(H2Sender),
}

impl Pool {
    /// Must be called inside a Tokio runtime: it starts the idle sweeper,
    /// which ends when the pool is dropped.
    pub fn new(connector: GuardedConnector, mut tls: rustls::ClientConfig, settings: PoolSettings) -> Arc<Self> {
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let pool = Arc::new(Self {
            connector,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            settings,
            slots: Mutex::new(Slots::default()),
            stats: PoolStats::default(),
        });
        let every = (pool.settings.idle_timeout / 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
        tokio::spawn(sweep(Arc::downgrade(&pool), every));
        pool
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Nothing panics while holding the lock; a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req` (absolute URI, `Host` set) and returns the response head;
    /// the body streams as the caller reads it.
    pub async fn send(self: &Arc<Self>, mut req: Request<UpstreamBody>) -> Result<Response<PooledBody>, UpstreamError> {
        let key = Key::of(req.uri())?;
        if key.https {
            if let Some(h2) = self.h2_sender(&key) {
                self.stats.reused.fetch_add(1, Relaxed);
                return send_h2(h2, req).await;
            }
        }
        let (mut h1, mut reused) = match self.checkout(&key) {
            Some(h1) => (h1, true),
            None => match Box::pin(self.connect(key)).await? {
                Fresh::H1(h1) => (h1, false),
                Fresh::H2(h2) => return send_h2(h2, req).await,
            },
        };
        origin_form(req.uri_mut());
        loop {
            let sent = h1.sender.try_send_request(req);
            match drive(&mut h1.conn, sent).await {
                (Ok(resp), alive) => {
                    let pool = alive.then(|| self.clone());
                    let (parts, inner) = resp.into_parts();
                    let mut body = PooledBody { inner, h1: pool.map(|p| (h1, p)) };
                    if body.inner.is_end_stream() {
                        body.release();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                // The idle connection was closed before the request went out:
                // nothing reached the upstream, so one retry on a new one is safe.
                (Err(mut e), _) => match e.take_message() {
                    Some(again) if reused => {
                        req = again;
                        reused = false;
                        h1 = match Box::pin(self.connect(h1.key.clone())).await? {
                            Fresh::H1(h1) => h1,
                            Fresh::H2(h2) => {
                                let mut req = req;
                                absolute_form(req.uri_mut(), &h1.key);
                                return send_h2(h2, req).await;
                            }
                        };
                    }
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }

    fn h2_sender(&self, key: &Key) -> Option<H2Sender> {
        let mut slots = self.slots();
        match slots.h2.get(key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                slots.h2.remove(key);
                None
            }
            None => None,
        }
    }

    /// The most recently used idle connection that is still usable.
    fn checkout(&self, key: &Key) -> Option<Box<H1>> {
        loop {
            let idle = self.slots().idle.get_mut(key)?.pop()?;
            let Idle { mut h1, since } = idle;
            // Dropped (closed) outside the lock if unusable.
            if since.elapsed() < self.settings.idle_timeout && h1.usable() {
                self.stats.reused.fetch_add(1, Relaxed);
                return Some(h1);
            }
        }
    }

    fn checkin(&self, mut h1: Box<H1>) {
        if self.settings.max_idle_per_host == 0 || !h1.usable() {
            return;
        }
        let since = Instant::now();
        let mut slots = self.slots();
        let list = slots.idle.entry(h1.key.clone()).or_default();
        if list.len() < self.settings.max_idle_per_host {
            list.push(Idle { h1, since });
        }
    }

    /// Boxed by its callers: the TLS and h2 handshakes make this future far
    /// larger than the reuse path, which would otherwise copy it around.
    async fn connect(&self, key: Key) -> Result<Fresh, UpstreamError> {
        let tcp = self.connector.connect_checked(&key.host, key.port).await?;
        self.stats.opened.fetch_add(1, Relaxed);
        if !key.https {
            return h1_handshake(key, IoEither::Left(tcp)).await;
        }
        let bare = key.host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&key.host);
        let name = ServerName::try_from(bare.to_owned()).map_err(|_| UpstreamError::InvalidUri)?;
        let tls = tokio::time::timeout(self.settings.tls_handshake_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| UpstreamError::TlsTimeout { host: key.host.to_string() })?
            .map_err(|source| UpstreamError::Tls { host: key.host.to_string(), source })?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return h1_handshake(key, IoEither::Right(tls)).await;
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<Io, UpstreamBody>(TokioIo::new(IoEither::Right(tls)))
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.slots().h2.insert(key, sender.clone());
        Ok(Fresh::H2(sender))
    }

    fn sweep(&self) {
        let mut expired = Vec::new();
        {
            let mut slots = self.slots();
            slots.idle.retain(|_, list| {
                let (keep, gone): (Vec<Idle>, Vec<Idle>) =
                    std::mem::take(list).into_iter().partition(|i| i.since.elapsed() < self.settings.idle_timeout);
                *list = keep;
                expired.extend(gone);
                !list.is_empty()
            });
            slots.h2.retain(|_, s| !s.is_closed());
        }
        drop(expired);
    }
}

async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.sweep(),
            None => return,
        }
    }
}

async fn h1_handshake(key: Key, io: IoEither<TcpStream, TlsStream<TcpStream>>) -> Result<Fresh, UpstreamError> {
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await.map_err(UpstreamError::Http)?;
    Ok(Fresh::H1(Box::new(H1 { key, sender, conn })))
}

async fn send_h2(mut h2: H2Sender, req: Request<UpstreamBody>) -> Result<Response<PooledBody>, UpstreamError> {
    let resp = h2.send_request(req).await.map_err(UpstreamError::Http)?;
    Ok(resp.map(|inner| PooledBody { inner, h1: None }))
}

/// Polls the HTTP/1 connection and the request's response future together
/// until the response head is in. Also says whether the connection is still
/// open (a closed one must not be polled again).
async fn drive<F, T>(conn: &mut H1Conn, response: F) -> (T, bool)
where
    F: Future<Output = T>,
{
    let mut response = pin!(response);
    let mut alive = true;
    let out = poll_fn(|cx| {
        if alive && Pin::new(&mut *conn).poll(cx).is_ready() {
            alive = false;
        }
        // A connection that ended has failed or answered every request it
        // took, so the response future is ready whenever `alive` is false.
        response.as_mut().poll(cx)
    })
    .await;
    (out, alive)
}

fn origin_form(uri: &mut Uri) {
    let path = match uri.path_and_query() {
        Some(p) if p.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(p.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    };
    *uri = path;
}

fn absolute_form(uri: &mut Uri, key: &Key) {
    let (scheme, default) = if key.https { ("https", 443) } else { ("http", 80) };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let u = if key.port == default {
        format!("{scheme}://{}{path}", key.host)
    } else {
        format!("{scheme}://{}:{}{path}", key.host, key.port)
    };
    if let Ok(u) = u.parse() {
        *uri = u;
    }
}

/// A response body from the pool. For HTTP/1 it also drives the connection
/// it arrives on, and returns that connection to the pool at its end.
pub struct PooledBody {
    inner: Incoming,
    h1: Option<(Box<H1>, Arc<Pool>)>,
}

impl PooledBody {
    /// The body is complete: the connection goes back to the pool (whose
    /// check-in gives it the turn it needs to finish the message and go idle).
    fn release(&mut self) {
        if let Some((h1, pool)) = self.h1.take() {
            pool.checkin(h1);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((h1, _)) = &mut this.h1 {
            if Pin::new(&mut h1.conn).poll(cx).is_ready() {
                // Closed (or failed): whatever it delivered is in `inner`.
                this.h1 = None;
            }
        }
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            this.release();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").field("pooled", &self.h1.is_some()).finish_non_exhaustive()
    }
}
