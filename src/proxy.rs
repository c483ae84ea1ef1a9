//! The proxy listener and the request pipeline.
//!
//! [`forward`] holds the order of the steps, top to bottom, one line of *why*
//! each. Errors from every step become [`ProxyError`]s, and [`ProxyError::problem`]
//! is the one place they turn into responses. Only `server` imports this module.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{Either, Full};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::creds::{Connections, ResolveMemo};
use crate::h1::server::{
    Continue, OnUpgrade, ReadSide, RequestBody, RequestHead, ResponseMeta, Transport, Upgraded, WriteHalf,
};
use crate::h1::{self, Framing};
use crate::ids;
use crate::integrations::Scheme;
pub use crate::outbound::ProxyError;
use crate::outbound::{upstream_request, Outbound};
use crate::policy::hosts::HostPattern;
use crate::telemetry;
use crate::tls::Interceptor;
use crate::upstream::pool::PooledBody;
use crate::upstream::GuardedConnector;
use crate::upstream::{self, CallerBody, UpstreamBody};

mod tunnel;

pub const X_CONNECTION_ID: HeaderName = HeaderName::from_static("x-connection-id");

/// Response bodies: the upstream's stream, or one we made.
pub type ProxyBody = Either<PooledBody, Full<Bytes>>;

/// Everything the pipeline needs; built once by `server`.
pub struct ProxyState {
    /// Sidecar mode: every caller belongs to this organization.
    pub org_id: String,
    pub connections: Arc<Connections>,
    pub outbound: Arc<Outbound>,
    pub allow_passthrough: bool,
    /// Resolves and checks `CONNECT` targets; connects blind tunnels.
    pub connector: GuardedConnector,
    /// Present when `tls_intercept.enabled`.
    pub interceptor: Option<Arc<Interceptor>>,
    /// Tunnelled blind even when interception is on.
    pub passthrough_hosts: Vec<HostPattern>,
    pub limits: ClientLimits,
    /// Every client connection and tunnel task, so shutdown can wait for them.
    pub tracker: tokio_util::task::TaskTracker,
    /// Flips to true when shutdown starts (the listener, h2 connections, tunnels).
    pub shutdown: watch::Receiver<bool>,
    /// Tells idle HTTP/1.1 connections that shutdown started.
    pub drain: Drain,
}

/// Client-side limits of the proxy listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Time to send a complete request head (and, for TLS, the handshake).
    pub header_read_timeout: Duration,
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Most client connections (tunnels included) at once.
    pub max_connections: usize,
    /// Longest wait for more of a request body.
    pub body_idle_timeout: Duration,
    /// Longest wait for a caller to take more of a response.
    pub send_timeout: Duration,
    /// Longest a `CONNECT` tunnel (blind, or intercepted h2) may carry nothing.
    pub tunnel_idle_timeout: Duration,
}

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

    fn register(&self, waker: &Waker) -> u64 {
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
struct DrainGuard<'a> {
    drain: &'a Drain,
    id: Option<u64>,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.drain.deregister(id);
        }
    }
}

/// Accepts connections until `shutdown` flips to true, then drops the
/// listener (new connections are refused) and tells every open connection
/// to finish its in-flight request and close. Connection and tunnel tasks
/// run on `state.tracker`, so the caller can wait for them to drain.
/// With `tls`, the listener itself speaks TLS (`proxy.tls_cert`): clients
/// use an `https://` proxy URL.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = state.limits;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = draining(&mut shutdown) => break,
        };
        if state.tracker.len() >= limits.max_connections {
            state.outbound.metrics.client_connection_refused();
            debug!(%peer, max = limits.max_connections, "proxy.max_connections reached; closing a new connection");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        let metrics = state.outbound.metrics.clone();
        state.tracker.clone().spawn(async move {
            let _open = metrics.client_connection();
            match tls {
                None => serve_h1(&state, Transport::Tcp(stream), peer, None).await,
                Some(acceptor) => {
                    // The handshake gets the same deadline as a request head.
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_h1(&state, Transport::Boxed(Box::new(s)), peer, None).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "proxy TLS handshake failed"),
                        Err(_) => debug!(%peer, "proxy TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    state.drain.start();
    info!("proxy listener closed; draining open connections");
}

/// Resolves once shutdown has started.
async fn draining(shutdown: &mut watch::Receiver<bool>) {
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
            _ = $crate::proxy::draining(&mut $shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}
pub(crate) use serve_until_drained;

/// Inside an intercepted tunnel every request goes to the tunnel's
/// authority, whatever its request line or `Host` says.
pub(crate) struct TunnelTarget {
    pub scheme: UriScheme,
    pub authority: Authority,
}

impl TunnelTarget {
    /// The absolute URI of an inner request's target. An absolute-form
    /// target keeps only its path: the tunnel decides where it goes.
    fn absolute(&self, uri: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query =
            Some(uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        // Origin-form without a path ("*") is answered 400 by the pipeline.
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
    }
}

/// Request bodies read and dropped (so the connection can carry the next
/// request) when a response did not need them; more closes the connection.
const DISCARD_LIMIT: u64 = 256 * 1024;

/// What ended the wait for a request head.
#[expect(clippy::large_enum_variant, reason = "returned once per request and matched at once; a box would allocate")]
enum HeadEvent {
    Head(Result<Option<RequestHead>, h1::Error>),
    Drained,
    TimedOut,
}

/// Serves one HTTP/1.1 connection (the proxy listener, or the inside of an
/// intercepted tunnel): read a head, run the pipeline, write the response,
/// and again while the caller keeps the connection alive.
async fn serve_h1(state: &Arc<ProxyState>, io: Transport, peer: SocketAddr, tunnel: Option<TunnelTarget>) {
    let limits = state.limits;
    let (rd, mut wr) = io.split();
    let mut side = Some(ReadSide::new(rd, limits.body_idle_timeout));
    let mut out = Vec::with_capacity(1024);
    // One timer per connection, re-armed lazily: it fires at most once per
    // `header_read_timeout`, and only then is checked against the deadline
    // of the head being read (which moves on with every request).
    let mut deadline = Instant::now() + limits.header_read_timeout;
    let mut timer = pin!(tokio::time::sleep_until(deadline.into()));
    let mut registered = DrainGuard { drain: &state.drain, id: None };
    let mut memo = ResolveMemo::default();
    loop {
        let Some(rs) = side.as_mut() else { return };

        // Read the next head; an idle connection closes when shutdown starts.
        let event = poll_fn(|cx| {
            if let Poll::Ready(r) = rs.poll_head(cx, limits.max_header_bytes) {
                return Poll::Ready(HeadEvent::Head(r));
            }
            if registered.id.is_none() {
                registered.id = Some(state.drain.register(cx.waker()));
            }
            if state.drain.is_draining() && !rs.has_partial_head() {
                return Poll::Ready(HeadEvent::Drained);
            }
            while timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    return Poll::Ready(HeadEvent::TimedOut);
                }
                timer.as_mut().reset(deadline.into());
            }
            Poll::Pending
        })
        .await;
        let head = match event {
            HeadEvent::Head(Ok(Some(head))) => head,
            HeadEvent::Head(Ok(None)) | HeadEvent::Drained => return,
            HeadEvent::TimedOut => {
                debug!(%peer, "request head not received within proxy.header_read_timeout_ms; closing");
                return;
            }
            HeadEvent::Head(Err(e)) => {
                if !e.is_io() {
                    refuse_head(state, &mut wr, &mut out, e).await;
                    linger(side.take(), wr).await;
                }
                return;
            }
        };
        let RequestHead { mut parts, framing, keep_alive, expect_continue } = head;
        if let Some(t) = &tunnel {
            parts.uri = t.absolute(&parts.uri);
        }
        let meta_head = parts.method == Method::HEAD;
        let meta_connect = parts.method == Method::CONNECT;
        let http10 = parts.version == http::Version::HTTP_10;

        // A body owns the read side while it is read and sends it back.
        let mut home = None;
        let mut cont = None;
        let body = match framing {
            Framing::Empty => RequestBody::empty(),
            _ => {
                let mut rs = side.take().expect("present above");
                rs.start_body(framing);
                let (tx, rx) = oneshot::channel();
                home = Some(rx);
                cont = expect_continue.then(|| Arc::new(Continue::default()));
                RequestBody::streaming(rs, tx, cont.clone())
            }
        };
        let mut req = Request::from_parts(parts, Either::Left(body));
        let upgrade = meta_connect.then(|| {
            let (tx, on_upgrade) = OnUpgrade::pair();
            req.extensions_mut().insert(on_upgrade);
            tx
        });

        // The pipeline; `100 Continue` goes out when it first reads the body.
        let resp = match &cont {
            None => handle(state, peer, req, Some(&mut memo)).await,
            Some(c) => match with_continue(handle(state, peer, req, Some(&mut memo)), c, &mut wr).await {
                Ok(resp) => resp,
                Err(_) => return,
            },
        };

        // Is the read side back, and can the connection go on afterwards?
        if let Some(mut rx) = home {
            side = rx.try_recv().ok();
        }
        let body_read = side.as_ref().is_some_and(ReadSide::body_done);
        let continue_unanswered = cont.as_ref().is_some_and(|c| !c.was_released());
        let mut close = !keep_alive || side.is_none() || state.drain.is_draining();
        // A caller still waiting for `100 Continue` may never send the body.
        close |= !body_read && continue_unanswered;
        let status = resp.status();
        let meta = ResponseMeta {
            head_request: meta_head,
            connect: meta_connect,
            http10,
            close,
            send_timeout: limits.send_timeout,
        };
        let mut resp = resp;
        // An HTTP/1.1 upstream's fields are copied to the caller as they came.
        let fields = take_fields(&mut resp);
        match h1::server::write_response(&mut wr, &mut out, resp, fields, meta).await {
            Ok(true) => {}
            Ok(false) => close = true,
            Err(e) => {
                debug!(%peer, error = %e, "writing the response failed; closing");
                return;
            }
        }
        if let (Some(tx), true) = (upgrade, status.is_success()) {
            if let Some(rs) = side.take() {
                let (rd, leftover) = rs.into_parts();
                if let Some(io) = Transport::join(rd, wr) {
                    let _ = tx.send(Upgraded::new(leftover, io));
                }
            }
            return;
        }
        if close {
            linger(side.take(), wr).await;
            return;
        }
        // A body the pipeline did not read: drop it, if it is small, to get
        // to the next request.
        if !body_read {
            let Some(rs) = side.as_mut() else { return };
            let discarded = tokio::time::timeout(limits.header_read_timeout, rs.discard_body(DISCARD_LIMIT)).await;
            if !matches!(discarded, Ok(Ok(true))) {
                linger(side.take(), wr).await;
                return;
            }
        }
        deadline = Instant::now() + limits.header_read_timeout;
    }
}

/// Runs the pipeline, answering `100 Continue` when it first reads the body.
async fn with_continue<F: Future<Output = Response<ProxyBody>>>(
    pipeline: F,
    cont: &Continue,
    wr: &mut WriteHalf,
) -> std::io::Result<Response<ProxyBody>> {
    let mut pipeline = pin!(pipeline);
    let mut wanted = false;
    let mut sent = 0;
    poll_fn(|cx| {
        if let Poll::Ready(resp) = pipeline.as_mut().poll(cx) {
            return Poll::Ready(Ok(resp));
        }
        if !wanted {
            wanted = cont.poll_wanted(cx).is_ready();
        }
        while wanted && sent < h1::server::CONTINUE.len() {
            match Pin::new(&mut *wr).poll_write(cx, &h1::server::CONTINUE[sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    sent += n;
                    if sent == h1::server::CONTINUE.len() {
                        cont.release();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await
}

/// Answers a head that could not be read (400, 431); the connection closes.
async fn refuse_head(state: &ProxyState, wr: &mut WriteHalf, out: &mut Vec<u8>, e: h1::Error) {
    let err = match e {
        h1::Error::HeadTooLarge(limit) => ProxyError::HeadTooLarge { limit },
        h1::Error::TooManyHeaders => ProxyError::TooManyHeaders,
        h1::Error::Malformed(why) => ProxyError::Malformed(why),
        _ => ProxyError::Malformed("invalid request"),
    };
    let problem = err.problem();
    debug!(error = %err, code = %problem.code, "request head refused");
    state.outbound.metrics.error(problem.code);
    state.outbound.metrics.request(None, problem.status().as_u16());
    let resp = problem.to_proxy_response().map(Full::new);
    let meta = ResponseMeta {
        head_request: false,
        connect: false,
        http10: false,
        close: true,
        send_timeout: state.limits.send_timeout,
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), h1::server::write_response(wr, out, resp, None, meta)).await;
}

/// Closes a connection without losing the response just written: stop
/// writing (FIN), then read and drop what the caller still sends for a
/// moment, so unread input does not make the kernel reset the connection.
async fn linger(side: Option<ReadSide>, mut wr: WriteHalf) {
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    let Some(side) = side else { return };
    let (mut rd, _) = side.into_parts();
    let drain = async {
        let mut sink = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        while total < 1024 * 1024 {
            match tokio::io::AsyncReadExt::read(&mut rd, &mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// What the access log records about one request. Never a secret: no header
/// values, no query string. Cheap to fill (shared handles, no copies): it
/// is filled whether or not the line is logged.
#[derive(Default)]
struct Access {
    connection: Option<http::HeaderValue>,
    integration: Option<Arc<crate::integrations::Integration>>,
    cache_hit: Option<bool>,
    host: Option<Authority>,
    code: Option<crate::problem::Code>,
    /// An OAuth2 request retried after a 401 and a refresh.
    retried: bool,
}

/// One request through the pipeline, with its metrics and access line.
/// `memo`: what this caller connection resolved last (none for h2 streams).
async fn handle(
    state: &Arc<ProxyState>,
    peer: SocketAddr,
    req: Request<CallerBody>,
    memo: Option<&mut ResolveMemo>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let metrics = &state.outbound.metrics;
    let in_flight = metrics.in_flight();
    // What the access line needs from the request, kept only if it is logged.
    let logged = tracing::enabled!(target: telemetry::ACCESS, tracing::Level::INFO)
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let mut access = Access::default();
    let resp = match forward(state, peer, req, &mut access, memo, started).await {
        Ok(resp) => resp,
        Err(err) => {
            let problem = err.problem();
            metrics.error(problem.code);
            access.code = Some(problem.code);
            if problem.status().is_server_error() {
                warn!(error = %err, code = %problem.code, "proxy error");
            } else {
                debug!(error = %err, code = %problem.code, "request refused");
            }
            problem.to_proxy_response().map(|b| Either::Right(Full::new(b)))
        }
    };
    drop(in_flight);
    metrics.request(access.integration.as_ref().map(|i| i.id.as_str()), resp.status().as_u16());
    // One message instead of a dozen structured fields: the formatter's
    // per-field work was most of the line's cost (load bench), and
    // `telemetry` writes access lines without re-escaping them.
    if let Some((method, path)) = logged {
        info!(
            target: telemetry::ACCESS,
            "peer={peer} org={} connection={} integration={} method={method} host={} path={path} status={} \
             latency_us={} cache_hit={} code={} retried={}",
            state.org_id,
            access.connection.as_ref().and_then(|c| c.to_str().ok()).unwrap_or("-"),
            access.integration.as_ref().map_or("-", |i| i.id.as_str()),
            access.host.as_ref().map_or("-", Authority::host),
            resp.status().as_u16(),
            started.elapsed().as_micros(),
            access.cache_hit.map_or("-", |h| if h { "true" } else { "false" }),
            access.code.map_or("-", crate::problem::Code::as_str),
            access.retried,
        );
    }
    resp
}

/// An HTTP/1.1 upstream's header fields, still unparsed (the response's
/// header map holds only what the proxy added).
fn take_fields(resp: &mut Response<ProxyBody>) -> Option<h1::RawFields> {
    match resp.body_mut() {
        Either::Left(pooled) => pooled.take_fields(),
        Either::Right(_) => None,
    }
}

/// A response for a caller that our HTTP/1.1 writer does not serve (h2
/// streams, written by hyper): an HTTP/1.1 upstream's unparsed fields go
/// into the header map.
fn fields_in_map(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(fields) = take_fields(&mut resp) else { return resp };
    match fields.append_to(resp.headers_mut()) {
        Ok(()) => resp,
        // Cannot happen for fields httparse accepted; refused all the same.
        Err(e) => {
            let err = ProxyError::Upstream(e.to_string());
            warn!(error = %err, "upstream response fields do not fit a header map");
            err.problem().to_proxy_response().map(|b| Either::Right(Full::new(b)))
        }
    }
}

/// The life of a proxied request.
async fn forward(
    state: &Arc<ProxyState>,
    peer: SocketAddr,
    req: Request<CallerBody>,
    access: &mut Access,
    memo: Option<&mut ResolveMemo>,
    started: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();

    // 1. Accept: only absolute-form http(s) requests are proxy requests.
    if parts.method == Method::CONNECT {
        // Boxed: rare, and its future would otherwise weigh on every request's.
        return Box::pin(connect(state, peer, parts, access)).await;
    }
    let mut uri = std::mem::take(&mut parts.uri);
    if uri.path_and_query().is_some_and(|pq| pq.as_str().starts_with('?')) {
        // `http://host?q`: the path is empty, and origin-form needs "/".
        uri = with_root_path(&uri)?;
    }
    let (scheme, host, port) = target_of(&uri)?;
    access.host = uri.authority().cloned();

    // 2. Identify the caller: sidecar mode pins one organization.
    let org = state.org_id.as_str();

    // 3. Which connection, if any. Taken out of the headers, shape checked;
    // more than one field is ambiguous (which one would an upstream see?).
    let conn_id = take_connection_id(&mut parts.headers)?;
    if conn_id.is_some() && parts.method == Method::TRACE {
        // An upstream that echoes TRACE would hand the credential back (RFC 9110 §9.3.8).
        return Err(ProxyError::TraceWithCredential);
    }

    // Hop-by-hop headers and our own control headers never go upstream.
    strip_request_headers(&mut parts.headers);

    let body: UpstreamBody = Either::Left(body);
    let resp = match conn_id {
        None => {
            // No credential involved: egress policy and the SSRF guard only.
            if !state.allow_passthrough {
                return Err(ProxyError::PassthroughDenied);
            }
            state.outbound.send(upstream_request(&parts.method, uri, parts.headers, None, body)?).await?
        }
        Some(id) => {
            access.connection = Some(id.clone());
            let id = id.to_str().unwrap_or_default();
            // 4. Resolve (org, id): cache → store → decrypt; other orgs see the same 404.
            // A keep-alive caller's last connection is remembered while the cache is unchanged.
            let (resolved, hit) = match memo {
                Some(memo) => state.connections.resolve_memo(org, id, memo, started).await?,
                None => state.connections.resolve(org, id).await?,
            };
            access.cache_hit = Some(hit);
            access.integration = Some(resolved.integration.clone());

            // An `http://` request to an https-only integration is forwarded over TLS.
            let up_scheme = match (scheme, resolved.integration.upstream_scheme) {
                (Scheme::Http, Scheme::Https) => Scheme::Https,
                (s, _) => s,
            };
            let up_port = match port {
                Some(p) if !(up_scheme != scheme && p == scheme.default_port()) => p,
                _ => up_scheme.default_port(),
            };

            // 5. Host check: the credential only ever goes to the integration's hosts.
            if !resolved.integration.host_allowed(host, up_port) {
                return Err(ProxyError::HostNotAllowed {
                    integration: resolved.integration.id.clone(),
                    host: host.to_owned(),
                    port: up_port,
                });
            }
            if up_scheme != scheme || port != Some(up_port) {
                uri = rebuild_uri(&uri, up_scheme, host, up_port)?;
            }

            // 6-8. Fresh token, inject, forward (and the OAuth2 401 retry).
            let (mut resp, retried) =
                state.outbound.with_connection(&resolved, &parts.method, uri, parts.headers, body).await?;
            access.retried = retried;
            // What was injected does not come back in a URL field.
            crate::outbound::scrub_echoes(&mut resp, &resolved);
            resp
        }
    };

    // 9. Respond: stream the body back, minus hop-by-hop headers.
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    Ok(Response::from_parts(rparts, Either::Left(rbody)))
}

/// `CONNECT host:port`: the destination must pass the SSRF guard before
/// anything else happens (no certificate is minted for a refused host).
/// With interception the tunnel's inner requests run through [`forward`];
/// otherwise (or for `tls_intercept.passthrough_hosts`) bytes are copied blind.
async fn connect(
    state: &Arc<ProxyState>,
    peer: SocketAddr,
    mut parts: http::request::Parts,
    access: &mut Access,
) -> Result<Response<ProxyBody>, ProxyError> {
    let authority = parts.uri.authority().cloned().ok_or(ProxyError::Malformed("CONNECT needs host:port"))?;
    let host = authority.host().to_owned();
    access.host = Some(authority.clone());
    let port = authority.port_u16().ok_or(ProxyError::Malformed("CONNECT needs an explicit port"))?;
    let on_upgrade =
        parts.extensions.remove::<OnUpgrade>().ok_or(ProxyError::Malformed("this connection cannot be upgraded"))?;
    let listed = state.passthrough_hosts.iter().any(|p| p.matches(&host, port));
    let interceptor = state.interceptor.clone().filter(|_| !listed);
    if interceptor.is_none() && !listed && !state.allow_passthrough {
        return Err(ProxyError::PassthroughDenied);
    }
    match interceptor {
        Some(interceptor) => {
            // Policy first: a prohibited destination never gets a certificate.
            state.connector.resolve_checked(&host, port).await.map_err(ProxyError::Connect)?;
            let tls = interceptor.server_config(&host).map_err(|e| ProxyError::Internal(e.to_string()))?;
            let state = state.clone();
            let metrics = state.outbound.metrics.clone();
            state.tracker.clone().spawn(async move {
                let _open = metrics.client_connection();
                match on_upgrade.wait().await {
                    Ok(up) => tunnel::serve_intercepted(state, peer, up, authority, tls).await,
                    Err(e) => debug!(%peer, error = %e, "CONNECT upgrade failed"),
                }
            });
        }
        None => {
            let upstream = state.connector.connect_checked(&host, port).await.map_err(ProxyError::Connect)?;
            let metrics = state.outbound.metrics.clone();
            let idle = state.limits.tunnel_idle_timeout;
            state.tracker.spawn(async move {
                let _open = metrics.client_connection();
                match on_upgrade.wait().await {
                    Ok(up) => tunnel::serve_blind(peer, up, upstream, idle).await,
                    Err(e) => debug!(%peer, error = %e, "CONNECT upgrade failed"),
                }
            });
        }
    }
    Ok(Response::new(Either::Right(Full::new(Bytes::new()))))
}

/// The `X-Connection-Id` field, removed from `headers`: at most one, of
/// the connection id's shape.
fn take_connection_id(headers: &mut HeaderMap) -> Result<Option<http::HeaderValue>, ProxyError> {
    // `len` counts values: `remove` takes every value of the name, returns the first.
    let values = headers.len();
    let Some(id) = headers.remove(&X_CONNECTION_ID) else { return Ok(None) };
    if headers.len() + 1 != values {
        return Err(ProxyError::DuplicateConnectionId);
    }
    if !id.to_str().is_ok_and(ids::is_connection_id) {
        return Err(ProxyError::BadConnectionId);
    }
    Ok(Some(id))
}

/// `uri` with "/" in front of its query (its path was empty).
fn with_root_path(uri: &Uri) -> Result<Uri, ProxyError> {
    let pq = uri.path_and_query().map_or("", |pq| pq.as_str());
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(format!("/{pq}").parse().map_err(|_| ProxyError::Malformed("invalid request target"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::Malformed("invalid request target"))
}

/// Scheme, host and explicit port of an absolute-form request target.
fn target_of(uri: &Uri) -> Result<(Scheme, &str, Option<u16>), ProxyError> {
    let scheme = match uri.scheme() {
        None => return Err(ProxyError::OriginForm),
        Some(s) if *s == UriScheme::HTTP => Scheme::Http,
        Some(s) if *s == UriScheme::HTTPS => Scheme::Https,
        Some(_) => return Err(ProxyError::UnsupportedScheme),
    };
    let (host, port) = upstream::host_port(uri).filter(|(h, _)| !h.is_empty()).ok_or(ProxyError::OriginForm)?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ProxyError::Malformed("user information in the request URI is not allowed"));
    }
    Ok((scheme, host, port))
}

fn rebuild_uri(uri: &Uri, scheme: Scheme, host: &str, port: u16) -> Result<Uri, ProxyError> {
    let authority = if port == scheme.default_port() { host.to_owned() } else { format!("{host}:{port}") };
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(if scheme == Scheme::Https { UriScheme::HTTPS } else { UriScheme::HTTP });
    parts.authority =
        Some(Authority::try_from(authority.as_str()).map_err(|_| ProxyError::Malformed("invalid authority"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::Malformed("invalid URI"))
}

/// Removes hop-by-hop headers and those named by `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip(h, |_| false);
}

/// What never goes upstream from a caller: hop-by-hop headers, our control
/// headers, and `Expect` (answered by credproxy). `Host` is replaced by
/// [`upstream_request`] with the target's authority. (The HTTP/1.1 codec
/// leaves hop-by-hop fields out already; h2 requests come through hyper.)
fn strip_request_headers(h: &mut HeaderMap) {
    strip(h, |name| matches!(name, "proxy-authorization" | "x-connection-id" | "expect"));
}

/// Removes the hop-by-hop headers, the names `Connection` lists, and those
/// `also` picks. Most messages carry none of them, or only `Connection:
/// keep-alive`: one pass over the names finds what is there, and only that
/// is looked up and removed.
fn strip(h: &mut HeaderMap, also: impl Fn(&str) -> bool) {
    // Each name at most once: fits without allocating.
    let mut present: [Option<HeaderName>; 12] = [const { None }; 12];
    let mut found = 0;
    let mut listed = Vec::new();
    for (name, value) in h.iter() {
        let n = name.as_str();
        if !(h1::is_hop_by_hop(n) || also(n)) || present[..found].iter().flatten().any(|p| p == name) {
            continue;
        }
        if found == present.len() {
            listed.push(name.clone());
            continue;
        }
        present[found] = Some(name.clone());
        found += 1;
        if name == header::CONNECTION {
            listed.extend(h1::connection_names(value.as_bytes()).filter_map(|t| HeaderName::from_bytes(t).ok()));
        }
    }
    for name in present.into_iter().flatten().chain(listed) {
        h.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::host_header;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Bearer run"),
            ("x-connection-id", "conn_x"),
            ("expect", "100-continue"),
            ("accept", "*/*"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_request_headers(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }

    #[test]
    fn targets() {
        assert!(matches!(target_of(&"/x".parse().unwrap()), Err(ProxyError::OriginForm)));
        assert!(matches!(target_of(&"ftp://a/".parse().unwrap()), Err(ProxyError::UnsupportedScheme)));
        let u: Uri = "http://a.test/x".parse().unwrap();
        assert_eq!(target_of(&u).unwrap(), (Scheme::Http, "a.test", None));
        let u: Uri = "https://a.test:8443/".parse().unwrap();
        assert_eq!(target_of(&u).unwrap(), (Scheme::Https, "a.test", Some(8443)));
        let u = rebuild_uri(&"http://a.test/p?q=1".parse().unwrap(), Scheme::Https, "a.test", 443).unwrap();
        assert_eq!(u.to_string(), "https://a.test/p?q=1");
        assert_eq!(host_header(&"http://a.test:80/".parse().unwrap()).unwrap(), "a.test");
        assert_eq!(host_header(&"http://127.0.0.1:8000/".parse().unwrap()).unwrap(), "127.0.0.1:8000");
    }

    #[test]
    fn every_problem_has_a_code_and_no_debug_leak() {
        let e = ProxyError::HostNotAllowed { integration: "gh".into(), host: "evil.test".into(), port: 443 };
        let p = e.problem();
        assert_eq!((p.status().as_u16(), p.code.as_str()), (403, "host_not_allowed"));
        let r = p.to_proxy_response();
        assert!(r.headers()["proxy-status"].to_str().unwrap().starts_with("credproxy; error=http_request_denied"));
    }
}
