//! The upstream connection pool of the proxy's hot path.
//!
//! HTTP/1.1 connections ([`crate::h1::client`]) are driven *inline*: the
//! task serving the caller's request writes the request and reads the
//! response head itself, and then reads the response body as the caller's
//! side asks for it ([`PooledBody`]). There is no connection task and no
//! hand-off between tasks per request (a pooled client with a task per
//! connection pays two cross-task wake-ups per request, often across
//! threads). When the response body has been read to its end the connection
//! goes back to the idle list; a response dropped half-read closes it.
//!
//! `https://` upstreams offer h2 and http/1.1 by ALPN. An h2 connection is
//! multiplexed, so it runs as its own task and its sender is shared.
//!
//! Idle connections are checked before reuse (one poll: a peer's close is
//! seen without a syscall), expire after `upstream.pool_idle_timeout_secs`
//! (a sweeper also closes expired ones), and at most
//! `upstream.pool_max_idle_per_host` are kept per scheme, host and port. A
//! bodiless request on a reused connection that got no byte of an answer
//! (the upstream closed the idle connection as the request went out) is sent
//! once more on a new connection if it never fully left or is idempotent.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either as IoEither;

use super::{place, ConnectError, GuardedConnector, UpstreamBody};
use crate::h1::transport::FillOnce;
use crate::h1::{self, RawFields};

type Io = IoEither<TcpStream, FillOnce<TlsStream<TcpStream>>>;
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
    #[error("HTTP/1.1 exchange failed")]
    H1(#[source] h1::Error),
    #[error("invalid upstream URI")]
    InvalidUri,
    #[error("no response head within upstream.response_header_timeout_ms")]
    Timeout,
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
    /// Longest wait for more of a response body.
    pub body_idle_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

/// Where a connection goes: scheme, host and port. Owned by the pool's
/// maps and connections; requests look up with a borrowed [`KeyRef`].
/// `hash`: the pool's hash of it, computed once when a request first
/// looked it up and carried by its connections, so a check-in hashes
/// nothing.
#[derive(Clone)]
struct Key {
    https: bool,
    host: Arc<str>,
    port: u16,
    hash: u64,
}

impl Key {
    fn is(&self, r: &KeyRef<'_>) -> bool {
        self.https == r.https && self.port == r.port && crate::scan::same(self.host.as_bytes(), r.host.as_bytes())
    }
}

/// A [`Key`] borrowed from a request's URI: no allocation per lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct KeyRef<'a> {
    https: bool,
    host: &'a str,
    port: u16,
}

impl<'a> KeyRef<'a> {
    /// The key of a request for `uri`, and its `Host` field from the same
    /// scan (the authority without its scheme's default port, as
    /// [`crate::h1::host_of`] writes it) when it has no userinfo.
    fn of(uri: &'a Uri) -> Result<(Self, Option<&'a str>), UpstreamError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(UpstreamError::InvalidUri),
        };
        // `let else`, not `ok_or`: an error made and dropped on every request.
        let Some(authority) = uri.authority().map(|a| a.as_str()) else { return Err(UpstreamError::InvalidUri) };
        let Some((host, port, userinfo)) = super::authority_parts(authority) else {
            return Err(UpstreamError::InvalidUri);
        };
        let (default, suffix) = if https { (443, ":443") } else { (80, ":80") };
        // Only a port that reads as the default can end in its suffix.
        let field = (!userinfo).then(|| match port {
            Some(p) if p == default => authority.strip_suffix(suffix).unwrap_or(authority),
            _ => authority,
        });
        Ok((Self { https, host, port: port.unwrap_or(default) }, field))
    }

    /// `hash`: the pool's hash of `self` ([`Pool::hash`]).
    fn to_owned(self, hash: u64) -> Key {
        Key { https: self.https, host: self.host.into(), port: self.port, hash }
    }
}

/// What one caller connection's requests carry to the pool, kept from
/// one request to the next: the connection's number for affinity
/// ([`Pool::send`]) and the key its last request's target read as. A
/// keep-alive caller mostly sends to the same authority again: its text
/// compared costs less than reading host and port out of it again and
/// hashing them (~190 instructions a request, callgrind).
#[derive(Default)]
pub struct Route {
    /// 0 until the first request through a pool gives it one.
    affinity: u64,
    last: Option<LastKey>,
}

/// A target's authority and the [`KeyRef`] read from it, as places in it.
struct LastKey {
    /// The pool whose hasher made `hash` (by address; pools live as long
    /// as the proxy).
    pool: usize,
    https: bool,
    authority: String,
    host: std::ops::Range<usize>,
    port: u16,
    /// The `Host` field [`KeyRef::of`] gave, if any.
    field: Option<std::ops::Range<usize>>,
    hash: u64,
}

impl Route {
    /// This caller connection's number (the first use gives it one).
    fn affinity(&mut self) -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        if self.affinity == 0 {
            self.affinity = NEXT.fetch_add(1, Relaxed);
        }
        self.affinity
    }
}

/// Lets maps keyed by [`Key`] be searched with a [`KeyRef`] (the `Borrow`
/// target must be one type both can turn into).
trait AsKeyRef {
    fn key_ref(&self) -> KeyRef<'_>;
}

impl AsKeyRef for Key {
    fn key_ref(&self) -> KeyRef<'_> {
        KeyRef { https: self.https, host: &self.host, port: self.port }
    }
}

impl AsKeyRef for KeyRef<'_> {
    fn key_ref(&self) -> KeyRef<'_> {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn AsKeyRef + 'a> for Key {
    fn borrow(&self) -> &(dyn AsKeyRef + 'a) {
        self
    }
}

impl std::hash::Hash for dyn AsKeyRef + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key_ref().hash(state);
    }
}

impl PartialEq for dyn AsKeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key_ref() == other.key_ref()
    }
}

impl Eq for dyn AsKeyRef + '_ {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key_ref().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.key_ref() == other.key_ref()
    }
}

impl Eq for Key {}

/// An HTTP/1.1 connection and where it goes back to.
struct H1 {
    key: Key,
    conn: h1::client::Conn<Io>,
    /// What the response being read holds until its body ends (an
    /// in-flight permit): kept here, not in [`PooledBody`], whose size
    /// every layer of the pipeline moves.
    held: Option<crate::quota::Held>,
    /// The caller connection that used it last ([`Pool::send`]'s `affinity`).
    affinity: u64,
}

struct Idle {
    h1: Box<H1>,
    /// When it stops being reused (none: `idle_timeout` is too long to
    /// add): a comparison at checkout, the addition done at checkin.
    expires: Option<Instant>,
    /// `h1.affinity`, here where a checkout scans it without following the box.
    affinity: u64,
}

/// Keyed with aHash, randomly seeded: a lookup on every request, with keys
/// callers can influence (hosts matched by an integration's wildcard), so
/// fast but not predictable (SipHash cost ~400 instructions a lookup).
/// Idle connections sit in a table of their keys' stored hashes: a
/// request hashes its target once for the checkout, and the check-in uses
/// the hash its connection carries (two `HashMap` lookups through
/// `dyn AsKeyRef` were ~330 instructions a request).
#[derive(Default)]
struct Slots {
    idle: hashbrown::HashTable<IdleList>,
    h2: HashMap<Key, H2Sender, ahash::RandomState>,
}

/// The idle connections to one key, most recently used last.
struct IdleList {
    key: Key,
    list: Vec<Idle>,
}

pub struct Pool {
    connector: GuardedConnector,
    tls: tokio_rustls::TlsConnector,
    settings: PoolSettings,
    slots: Mutex<Slots>,
    /// Hashes idle connections' keys (seeded at random per pool).
    hasher: ahash::RandomState,
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
        Self::start(connector, tokio_rustls::TlsConnector::from(Arc::new(tls)), settings)
    }

    /// An empty pool with this one's connector, TLS configuration (and
    /// session cache) and settings, its idle sweeper on the current
    /// runtime: `runtime.thread_per_core` gives each thread its own, so a
    /// pooled connection is only used on the runtime that registered it.
    pub fn sibling(&self) -> Arc<Self> {
        Self::start(self.connector.clone(), self.tls.clone(), self.settings.clone())
    }

    fn start(connector: GuardedConnector, tls: tokio_rustls::TlsConnector, settings: PoolSettings) -> Arc<Self> {
        let pool = Arc::new(Self {
            connector,
            tls,
            settings,
            slots: Mutex::new(Slots::default()),
            hasher: ahash::RandomState::new(),
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

    /// Sends `req` (absolute URI) with `extra` set over its header fields
    /// (a credential's header edits: [`h1::client::Conn::send`]) and
    /// returns the response head; the body streams as the caller reads it. `now` is when the caller
    /// started (it dates pool entries without another clock read); nothing
    /// waits past `deadline` for the response head, connecting included.
    /// `route`: the caller connection's ([`Route`]; a fresh one for a
    /// request of no caller connection). Its own connection of
    /// the last request, if idle, is handed out before the others: that
    /// connection's response timer already holds this task's waker
    /// (another's is re-armed: ~130 instructions a request, callgrind).
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
        extra: &[(HeaderName, HeaderValue)],
        now: Instant,
        deadline: Instant,
        route: &mut Route,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let (parts, mut body) = req.into_parts();
        let (key, host_field, hash) = self.key_of(&parts.uri, route)?;
        let affinity = route.affinity();
        if key.https {
            if let Some(h2) = self.h2_sender(&key) {
                self.stats.reused.fetch_add(1, Relaxed);
                return self.send_h2(h2, h2_request(parts, extra, body), deadline).await;
            }
        }
        let (mut h1, mut reused) = match self.checkout(&key, hash, now, affinity) {
            Some(h1) => (h1, true),
            None => match self.connect_by(key.to_owned(hash), deadline).await? {
                Fresh::H1(h1) => (h1, false),
                Fresh::H2(h2) => return self.send_h2(h2, h2_request(parts, extra, body), deadline).await,
            },
        };
        h1.affinity = affinity;
        loop {
            let framing = h1::client::framing_of(&body);
            match h1.conn.send(&parts, host_field, extra, body, deadline).await {
                Ok(resp) => {
                    let (parts, fields) = resp.into_parts();
                    let mut pooled =
                        PooledBody { inner: Inner::H1(Some((h1, self.clone(), now))), fields: Some(fields) };
                    if pooled.is_end_stream() {
                        pooled.release();
                    }
                    return Ok(Response::from_parts(parts, pooled));
                }
                Err(e) if matches!(e.error, h1::Error::Timeout) => return Err(UpstreamError::Timeout),
                // The upstream closed the idle connection as the request went out.
                Err(e) if reused && e.retryable(&parts.method, framing) => {
                    reused = false;
                    body = UpstreamBody::Buffered(Full::new(Bytes::new()));
                    h1 = match self.connect_by(h1.key.clone(), deadline).await? {
                        Fresh::H1(mut h1) => {
                            h1.affinity = affinity;
                            h1
                        }
                        Fresh::H2(h2) => return self.send_h2(h2, h2_request(parts, extra, body), deadline).await,
                    };
                }
                Err(e) => return Err(UpstreamError::H1(e.error)),
            }
        }
    }

    /// A new connection, within `deadline`. Boxed: the TLS and h2
    /// handshakes make this future far larger than the reuse path.
    async fn connect_by(&self, key: Key, deadline: Instant) -> Result<Fresh, UpstreamError> {
        tokio::time::timeout_at(deadline.into(), Box::pin(self.connect(key)))
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    fn h2_sender(&self, key: &KeyRef<'_>) -> Option<H2Sender> {
        let key = key as &dyn AsKeyRef;
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

    /// The pool's hash of `key`.
    fn hash(&self, key: &KeyRef<'_>) -> u64 {
        self.hasher.hash_one(key)
    }

    /// [`KeyRef::of`] `uri` and the key's hash, as `route`'s last request
    /// read them when its authority is the same text.
    fn key_of<'u>(
        self: &Arc<Self>,
        uri: &'u Uri,
        route: &mut Route,
    ) -> Result<(KeyRef<'u>, Option<&'u str>, u64), UpstreamError> {
        let pool = Arc::as_ptr(self) as usize;
        if let (Some(last), Some(scheme), Some(authority)) = (&route.last, uri.scheme_str(), uri.authority()) {
            let authority = authority.as_str();
            let https: &[u8] = if last.https { b"https" } else { b"http" };
            let same = crate::scan::same;
            if last.pool == pool
                && same(scheme.as_bytes(), https)
                && same(last.authority.as_bytes(), authority.as_bytes())
            {
                let key = KeyRef { https: last.https, host: &authority[last.host.clone()], port: last.port };
                return Ok((key, last.field.clone().map(|f| &authority[f]), last.hash));
            }
        }
        let (key, field) = KeyRef::of(uri)?;
        let hash = self.hash(&key);
        let authority = uri.authority().map_or("", |a| a.as_str());
        let field_at = field.map(|f| place(authority, f));
        route.last = match (place(authority, key.host), field_at) {
            (Some(host), None) => Some((host, None)),
            (Some(host), Some(Some(f))) => Some((host, Some(f))),
            _ => None,
        }
        .map(|(host, field)| LastKey {
            pool,
            https: key.https,
            // The last one's buffer, reused.
            authority: {
                let mut text = route.last.take().map(|l| l.authority).unwrap_or_default();
                text.clear();
                text.push_str(authority);
                text
            },
            host,
            port: key.port,
            field,
            hash,
        });
        Ok((key, field, hash))
    }

    /// The most recently used idle connection to `key` (whose hash is
    /// `hash`) that is still usable.
    /// An idle connection to `key`: the one `affinity` used last if it is
    /// there, else the most recently used.
    fn checkout(&self, key: &KeyRef<'_>, hash: u64, now: Instant, affinity: u64) -> Option<Box<H1>> {
        loop {
            let idle = {
                let mut slots = self.slots();
                let list = &mut slots.idle.find_mut(hash, |e| e.key.is(key))?.list;
                let at = list.iter().rposition(|i| i.affinity == affinity).or(list.len().checked_sub(1))?;
                list.remove(at)
            };
            let Idle { mut h1, expires, .. } = idle;
            // Dropped (closed) outside the lock if unusable.
            if expires.is_none_or(|e| now < e) && still_open(&mut h1) {
                self.stats.reused.fetch_add(1, Relaxed);
                return Some(h1);
            }
        }
    }

    /// `since`: when the request that used it started (idle a little
    /// longer than it really was, which only makes expiry conservative).
    fn checkin(&self, h1: Box<H1>, since: Instant) {
        // Only the flags: a close by the upstream is caught at checkout.
        if self.settings.max_idle_per_host == 0 || !h1.conn.reusable() {
            return;
        }
        let expires = since.checked_add(self.settings.idle_timeout);
        let mut slots = self.slots();
        let hash = h1.key.hash;
        match slots.idle.find_mut(hash, |e| e.key.is(&h1.key.key_ref())) {
            Some(e) if e.list.len() < self.settings.max_idle_per_host => {
                e.list.push(Idle { affinity: h1.affinity, h1, expires })
            }
            Some(_) => {}
            None => {
                let key = h1.key.clone();
                let idle = Idle { affinity: h1.affinity, h1, expires };
                slots.idle.insert_unique(hash, IdleList { key, list: vec![idle] }, |e| e.key.hash);
            }
        }
    }

    async fn connect(&self, key: Key) -> Result<Fresh, UpstreamError> {
        let tcp = self.connector.connect_checked(&key.host, key.port).await?;
        self.stats.opened.fetch_add(1, Relaxed);
        let idle = self.settings.body_idle_timeout;
        if !key.https {
            return Ok(fresh_h1(key, IoEither::Left(tcp), idle));
        }
        let bare = key.host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&key.host);
        let name = ServerName::try_from(bare.to_owned()).map_err(|_| UpstreamError::InvalidUri)?;
        let tls = tokio::time::timeout(self.settings.tls_handshake_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| UpstreamError::TlsTimeout { host: key.host.to_string() })?
            .map_err(|source| UpstreamError::Tls { host: key.host.to_string(), source })?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(fresh_h1(key, IoEither::Right(FillOnce(tls)), idle));
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<TokioIo<Io>, UpstreamBody>(TokioIo::new(IoEither::Right(FillOnce(tls))))
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
        let now = Instant::now();
        {
            let mut slots = self.slots();
            slots.idle.retain(|e| {
                let (keep, gone): (Vec<Idle>, Vec<Idle>) =
                    std::mem::take(&mut e.list).into_iter().partition(|i| i.expires.is_none_or(|e| now < e));
                e.list = keep;
                expired.extend(gone);
                !e.list.is_empty()
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

/// An idle connection can carry another request: the last response was
/// read to its end and nothing has arrived since (no byte, no close). A
/// plain connection asks tokio's readiness first: when nothing arrived
/// since the last read that would have blocked, no system call and no
/// waker (the general poll cost ~200 instructions per request, callgrind);
/// otherwise one read of one byte tells. A TLS connection the same: when
/// its socket has had nothing since and the session holds nothing it read,
/// it is open (the poll through TLS that tells otherwise cost ~420
/// instructions per request); else it is polled through TLS (a session
/// ticket that arrives later is no reason to close).
fn still_open(h1: &mut H1) -> bool {
    if !h1.conn.reusable() {
        return false;
    }
    match h1.conn.get_ref() {
        IoEither::Left(tcp) => {
            let mut probe = [0u8; 1];
            matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
        IoEither::Right(FillOnce(tls)) => {
            let (tcp, session) = tls.get_ref();
            // `try_io` calls its closure only when tokio holds the socket
            // readable, and then clears nothing: the poll below reads.
            let quiet = session.wants_read() && tcp.try_io(Interest::READABLE, || Ok(())).is_err();
            quiet || h1.conn.usable()
        }
    }
}

fn fresh_h1(key: Key, io: Io, body_idle: Duration) -> Fresh {
    Fresh::H1(Box::new(H1 { key, conn: h1::client::Conn::new(io, body_idle), held: None, affinity: 0 }))
}

impl Pool {
    async fn send_h2(
        &self,
        mut h2: H2Sender,
        mut req: Request<UpstreamBody>,
        deadline: Instant,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        // `Host` beside `:authority`, the same as our HTTP/1.1 side writes
        // (RFC 9113 §8.3.1 lets an intermediary keep it; any other `Host`
        // in the map is replaced).
        if let Some(host) = h1::host_of(req.uri()).and_then(|h| http::HeaderValue::from_str(h).ok()) {
            req.headers_mut().insert(http::header::HOST, host);
        }
        let resp = tokio::time::timeout_at(deadline.into(), h2.send_request(req))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(UpstreamError::Http)?;
        let idle = h1::IdleTimer::new(self.settings.body_idle_timeout);
        Ok(resp.map(|body| PooledBody { inner: Inner::H2(Box::new(H2Body { body, idle, held: None })), fields: None }))
    }
}

/// An h2 request carries `extra` (fields set over the map's) in its map.
fn h2_request(
    mut parts: http::request::Parts,
    extra: &[(HeaderName, HeaderValue)],
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    for (name, value) in extra {
        parts.headers.insert(name.clone(), value.clone());
    }
    Request::from_parts(parts, body)
}

/// A response body from the pool. For HTTP/1.1 it is read from the
/// connection it arrives on, which goes back to the pool at its end.
pub struct PooledBody {
    inner: Inner,
    /// An HTTP/1.1 response's header fields, unparsed: the response's
    /// header map is empty until they are taken ([`PooledBody::take_fields`]).
    fields: Option<RawFields>,
}

enum Inner {
    /// The connection, its pool, and when the request using it started.
    H1(Option<(Box<H1>, Arc<Pool>, Instant)>),
    /// Boxed: every response is moved through the pipeline's layers, and
    /// an HTTP/1.1 one should not pay for the h2 variant's size.
    H2(Box<H2Body>),
}

struct H2Body {
    body: Incoming,
    idle: h1::IdleTimer,
    /// As [`H1::held`].
    held: Option<crate::quota::Held>,
}

impl PooledBody {
    /// A body with nothing in it (what is left where one was taken out).
    pub fn empty() -> Self {
        Self { inner: Inner::H1(None), fields: None }
    }

    /// The upstream's header fields, if they have not been put in the
    /// response's header map: an HTTP/1.1 writer copies them as they are.
    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.fields.take()
    }

    /// The upstream's header fields while they are still unparsed.
    pub fn fields(&self) -> Option<&RawFields> {
        self.fields.as_ref()
    }

    /// The upstream's header fields while they are still unparsed.
    pub fn fields_mut(&mut self) -> Option<&mut RawFields> {
        self.fields.as_mut()
    }

    /// Unparsed fields are kept and one of them names a URL.
    pub fn has_url_refs(&self) -> bool {
        self.fields.as_ref().is_some_and(RawFields::has_url_refs)
    }

    /// Keeps `held` until the body ends, fails or is dropped, whichever
    /// comes first.
    pub fn hold_until_end(&mut self, held: crate::quota::Held) {
        match &mut self.inner {
            Inner::H1(Some((h1, ..))) => h1.held = Some(held),
            Inner::H2(h2) if !h2.body.is_end_stream() => h2.held = Some(held),
            // The body is over already: so is the hold.
            _ => drop(held),
        }
    }

    /// The body is complete: the connection goes back to the pool.
    fn release(&mut self) {
        if let Inner::H1(slot) = &mut self.inner {
            if let Some((mut h1, pool, since)) = slot.take() {
                h1.held = None;
                pool.checkin(h1, since);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::H1(slot) => {
                let Some((h1, ..)) = slot.as_mut() else { return Poll::Ready(None) };
                match h1.conn.poll_body(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        if h1.conn.body_done() {
                            this.release();
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(None) => {
                        this.release();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        *slot = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            Inner::H2(h2) => match Pin::new(&mut h2.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    h2.idle.progress();
                    if h2.body.is_end_stream() {
                        h2.held = None;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(other) => {
                    h2.held = None;
                    Poll::Ready(other.map(|r| r.map_err(Into::into)))
                }
                Poll::Pending => match h2.idle.poll_expired(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(h1::Error::Timeout.into()))),
                    Poll::Pending => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(slot) => slot.as_ref().is_none_or(|(h1, ..)| h1.conn.body_done()),
            Inner::H2(h2) => h2.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H1(None) => SizeHint::with_exact(0),
            Inner::H1(Some((h1, ..))) => match h1.conn.body_remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            Inner::H2(h2) => h2.body.size_hint(),
        }
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").field("h1", &matches!(self.inner, Inner::H1(_))).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The `Host` field the key's scan gives is the one the codec would
    /// write itself; with userinfo there is none (the codec finds it).
    #[test]
    fn the_keys_host_field_is_the_codecs() {
        for u in [
            "http://example.com/",
            "http://example.com:80/x",
            "http://example.com:8080/x",
            "https://example.com:443/",
            "https://example.com:80/",
            "https://127.0.0.1:8443/",
            "http://[::1]:80/",
            "http://[::1]:9000/",
            "http://example.com:/",
            "http://example.com:00080/",
        ] {
            let uri: Uri = u.parse().unwrap();
            let (_, field) = KeyRef::of(&uri).unwrap();
            assert_eq!(field, crate::h1::host_of(&uri), "{u}");
        }
        for u in ["http://user:pw@host.test:81/", "http://a@b@host.test:82/"] {
            let uri: Uri = u.parse().unwrap();
            assert_eq!(KeyRef::of(&uri).unwrap().1, None, "{u}");
        }
    }

    /// A pool to loopback: idle for up to 60 s, two idle per key.
    fn test_pool() -> Arc<Pool> {
        let policy = Arc::new(crate::policy::ssrf::EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]));
        let settings = PoolSettings {
            tls_handshake_timeout: Duration::from_secs(5),
            body_idle_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_host: 2,
        };
        Pool::new(GuardedConnector::new(policy, Duration::from_secs(5)), crate::upstream::tls_config(&[]), settings)
    }

    /// A route reads each target's key as [`KeyRef::of`] and the pool's
    /// hash do, from its last request's when the authority is the same
    /// text, anew when it is not (whatever came before).
    #[tokio::test]
    async fn a_route_keeps_the_last_targets_key() {
        let (pool, other) = (test_pool(), test_pool());
        let targets = [
            "http://example.com/",
            "http://example.com/x?y",
            "https://example.com/",
            "http://example.com:80/x",
            "http://example.com:80/y",
            "http://example.com:8080/x",
            "https://example.com:443/",
            "http://user:pw@example.com:81/",
            "http://user:pw@example.com:81/z",
            "http://[::1]:9000/",
            "http://[::1]:9000/q",
            "http://example.com:00080/",
            "https://127.0.0.1:8443/",
        ];
        let mut route = Route::default();
        for round in 0..2 {
            for (i, t) in targets.iter().enumerate() {
                let uri: Uri = t.parse().unwrap();
                // Every third through the other pool: its hasher is its own.
                let p = if i % 3 == 2 { &other } else { &pool };
                let (key, field, hash) = p.key_of(&uri, &mut route).unwrap();
                let (want, want_field) = KeyRef::of(&uri).unwrap();
                assert_eq!((key, field, hash), (want, want_field, p.hash(&want)), "{t} (round {round})");
            }
        }
        // Kept: the last authority's text (its request's key came from it).
        let uri: Uri = "http://example.com:8080/a".parse().unwrap();
        pool.key_of(&uri, &mut route).unwrap();
        assert_eq!(route.last.as_ref().map(|l| l.authority.as_str()), Some("example.com:8080"));
        let uri: Uri = "ftp://example.com/".parse().unwrap();
        assert!(pool.key_of(&uri, &mut route).is_err(), "only http and https");
    }

    /// Idle connections go back to their own key's list and come out of
    /// it most recently used first, up to `max_idle_per_host` — but a
    /// caller connection's own first; another scheme or port is another
    /// key; an expired one is not handed out.
    #[tokio::test]
    async fn idle_connections_are_kept_by_key() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = test_pool();
        let key = |port| KeyRef { https: false, host: "127.0.0.1", port };
        let mut peers = Vec::new();
        let mut fresh = Vec::new();
        for port in [1, 1, 1, 2] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            peers.push(listener.accept().await.unwrap().0);
            let k = key(port);
            match fresh_h1(k.to_owned(pool.hash(&k)), IoEither::Left(tcp), Duration::from_secs(5)) {
                Fresh::H1(h1) => fresh.push(h1),
                Fresh::H2(_) => unreachable!("a plain connection is HTTP/1.1"),
            }
        }
        // Each connection is told apart by its key's own `host` allocation.
        let ids: Vec<*const u8> = fresh.iter().map(|h| h.key.host.as_ptr()).collect();
        fresh[0].affinity = 7;
        let now = Instant::now();
        for h1 in fresh {
            pool.checkin(h1, now);
        }
        let by =
            |k: KeyRef<'_>, at, affinity| pool.checkout(&k, pool.hash(&k), at, affinity).map(|h| h.key.host.as_ptr());
        let out = |k: KeyRef<'_>, at| by(k, at, 0);
        let https = KeyRef { https: true, ..key(1) };
        assert_eq!(out(https, now), None, "https is another key");
        assert_eq!(out(key(3), now), None, "another port is another key");
        assert_eq!(by(key(1), now, 7), Some(ids[0]), "caller 7's own before the last kept");
        assert_eq!(by(key(1), now, 7), Some(ids[1]), "then the last kept; the third was over the limit");
        assert_eq!(out(key(1), now), None);
        assert_eq!(out(key(2), now + Duration::from_secs(61)), None, "expired");
        assert_eq!(out(key(2), now), None, "an expired connection is closed, not kept");
        drop(peers);
    }

    /// An idle plain connection is open until a byte or the upstream's
    /// close arrives; either is seen by the readiness-first probe.
    #[tokio::test]
    async fn still_open_sees_a_close_and_a_stray_byte() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idle = |tcp| {
            let key = Key { https: false, host: "127.0.0.1".into(), port: addr.port(), hash: 0 };
            match fresh_h1(key, IoEither::Left(tcp), Duration::from_secs(5)) {
                Fresh::H1(h1) => h1,
                Fresh::H2(_) => unreachable!("a plain connection is HTTP/1.1"),
            }
        };
        // Settled: what the kernel has delivered is in tokio's readiness.
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        for ending in ["none", "close", "byte"] {
            let mut h1 = idle(TcpStream::connect(addr).await.unwrap());
            let (mut upstream, _) = listener.accept().await.unwrap();
            settle().await;
            assert!(still_open(&mut h1), "{ending}: nothing arrived yet");
            assert!(still_open(&mut h1), "{ending}: asking again changes nothing");
            match ending {
                "close" => drop(upstream),
                "byte" => upstream.write_all(b"x").await.unwrap(),
                _ => {}
            }
            settle().await;
            assert_eq!(still_open(&mut h1), ending == "none", "{ending}");
        }
    }
}
