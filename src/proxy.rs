//! The proxy listener and the request pipeline.
//!
//! [`forward`] holds the order of the steps, top to bottom, one line of *why*
//! each. Errors from every step become [`ProxyError`]s, and [`ProxyError::problem`]
//! is the one place they turn into responses. Only `server` imports this module.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::Full;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::audit::{Audit, CredentialUse, Parties, PartiesText};
use crate::config::ProxyMode;
use crate::creds::{Connections, ResolveError, ResolveMemo, Resolved};
use crate::h1;
use crate::h1::server::{FillOnce, OnUpgrade, Transport};
use crate::ids::ConnectionId;
use crate::integrations::{Integration, Scheme};
use crate::metrics::Metrics;
pub use crate::outbound::ProxyError;
use crate::outbound::{upstream_request, InjectMemo, Outbound, Renewal};
use crate::policy::hosts::HostPattern;
use crate::quota::{Quotas, Verdict};
use crate::runtoken::RunTokenKeys;
use crate::telemetry;
use crate::tls::Interceptor;
use crate::upstream::pool::PooledBody;
use crate::upstream::GuardedConnector;
use crate::upstream::{self, CallerBody, UpstreamBody};

mod caller;
mod drain;
mod identity;
mod tunnel;

use caller::serve_h1;
use drain::draining;
pub(crate) use drain::serve_until_drained;
pub use drain::Drain;
use identity::{identify, AuthMemo, Caller};

pub const X_CONNECTION_ID: HeaderName = HeaderName::from_static("x-connection-id");

crate::upstream::body_enum! {
    /// A response body.
    pub enum ProxyBody {
        /// The upstream's, streamed.
        Upstream(PooledBody),
        /// The upstream's, with injected values masked (`scrub_response_bodies`).
        /// Boxed: a response moves through every layer, and the others
        /// should not pay for this variant's size.
        Scrubbed(Box<crate::outbound::ScrubbedBody>),
        /// Made by credproxy: a problem, `CONNECT`'s 200.
        Made(Full<Bytes>),
    }
}

/// Everything the pipeline needs; built once by `server`.
pub struct ProxyState {
    /// Sidecar (one organization) or shared (run tokens name it).
    pub mode: ProxyMode,
    /// Sidecar mode: every caller belongs to this organization.
    pub org_id: String,
    /// Sidecar mode: a run token is required all the same.
    pub require_run_token: bool,
    /// Verify run tokens.
    pub run_tokens: Arc<RunTokenKeys>,
    pub connections: Arc<Connections>,
    pub outbound: Arc<Outbound>,
    /// Rate limits, in-flight caps and upstream cool-downs.
    pub quotas: Arc<Quotas>,
    pub allow_passthrough: bool,
    /// Resolves and checks `CONNECT` targets; connects blind tunnels.
    pub connector: GuardedConnector,
    /// Present when `tls_intercept.enabled`.
    pub interceptor: Option<Arc<Interceptor>>,
    /// Tunnelled blind even when interception is on.
    pub passthrough_hosts: Vec<HostPattern>,
    pub limits: ClientLimits,
    /// One line per request that names a connection.
    pub audit: Audit,
    /// Every client connection and tunnel task, so shutdown can wait for them.
    pub tracker: tokio_util::task::TaskTracker,
    /// Flips to true when shutdown starts (the listener, h2 connections, tunnels).
    pub shutdown: watch::Receiver<bool>,
    /// Tells idle HTTP/1.1 connections that shutdown started.
    pub drain: Drain,
}

impl ProxyState {
    /// This state with another outbound pipeline and its own drain signal:
    /// one per thread under `runtime.thread_per_core`. Connections, quotas,
    /// the audit trail, the connection tracker and shutdown stay shared.
    pub fn for_core(&self, outbound: Arc<Outbound>) -> Self {
        Self {
            mode: self.mode,
            org_id: self.org_id.clone(),
            require_run_token: self.require_run_token,
            run_tokens: self.run_tokens.clone(),
            connections: self.connections.clone(),
            outbound,
            quotas: self.quotas.clone(),
            allow_passthrough: self.allow_passthrough,
            connector: self.connector.clone(),
            interceptor: self.interceptor.clone(),
            passthrough_hosts: self.passthrough_hosts.clone(),
            limits: self.limits,
            audit: self.audit.clone(),
            tracker: self.tracker.clone(),
            shutdown: self.shutdown.clone(),
            drain: Drain::default(),
        }
    }
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
    shutdown: watch::Receiver<bool>,
) {
    accept(listener, &state, shutdown, |stream, peer| serve_connection(&state, &tls, stream, peer)).await;
    state.drain.start();
}

/// Accepts connections until `shutdown` flips to true, then drops the
/// listener (new connections are refused). Each accepted connection within
/// `proxy.max_connections` goes to `hand` (Nagle off), which must put it on
/// `state.tracker` (or keep a token of it).
pub async fn accept(
    listener: TcpListener,
    state: &ProxyState,
    mut shutdown: watch::Receiver<bool>,
    mut hand: impl FnMut(TcpStream, SocketAddr),
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
        hand(stream, peer);
    }
    info!("proxy listener closed; draining open connections");
}

/// Serves one accepted connection as a task on `state.tracker`, on the
/// current runtime. With `tls`, the listener itself speaks TLS
/// (`proxy.tls_cert`): clients use an `https://` proxy URL.
pub fn serve_connection(
    state: &Arc<ProxyState>,
    tls: &Option<tokio_rustls::TlsAcceptor>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let (state, tls) = (state.clone(), tls.clone());
    let limits = state.limits;
    let metrics = state.outbound.metrics.clone();
    state.tracker.clone().spawn(async move {
        let _open = metrics.client_connection();
        match tls {
            None => serve_h1(&state, Transport::Tcp(stream), peer, None).await,
            Some(acceptor) => {
                // The handshake gets the same deadline as a request head.
                match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => serve_h1(&state, Transport::Boxed(Box::new(FillOnce(s))), peer, None).await,
                    Ok(Err(e)) => debug!(%peer, error = %e, "proxy TLS handshake failed"),
                    Err(_) => debug!(%peer, "proxy TLS handshake timed out"),
                }
            }
        }
    });
}

/// A connection accepted on one thread for another's runtime
/// (`runtime.thread_per_core`): the socket, its peer, and a token that
/// counts it as open on the tracker until the task serving it exists.
pub type Handed = (std::net::TcpStream, SocketAddr, tokio_util::task::task_tracker::TaskTrackerToken);

/// Serves the connections handed over on `handed` on this thread's
/// runtime until `shutdown` flips to true or the acceptor ends, then tells
/// its open connections to finish their in-flight request and close.
pub async fn serve_handed(
    mut handed: tokio::sync::mpsc::UnboundedReceiver<Handed>,
    state: Arc<ProxyState>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer, _counted) = tokio::select! {
            h = handed.recv() => match h {
                Some(h) => h,
                None => break,
            },
            _ = draining(&mut shutdown) => break,
        };
        match TcpStream::from_std(stream) {
            Ok(stream) => serve_connection(&state, &tls, stream, peer),
            Err(e) => warn!(%peer, error = %e, "a handed-over proxy connection cannot be registered"),
        }
    }
    state.drain.start();
}

/// Inside an intercepted tunnel every request goes to the tunnel's
/// authority, whatever its request line or `Host` says.
pub(crate) struct TunnelTarget {
    pub scheme: UriScheme,
    pub authority: Authority,
    /// What the `CONNECT` proved: it holds for every request inside.
    pub caller: Option<Arc<Caller>>,
}

/// What a caller connection remembers between its requests, and (inside
/// a tunnel) what its `CONNECT` proved.
#[derive(Default)]
pub(crate) struct ConnMemo {
    resolve: ResolveMemo,
    auth: AuthMemo,
    inject: InjectMemo,
    audit: AuditMemo,
    quota: crate::quota::KeyMemo,
    metrics: MetricsMemo,
    target: TargetMemo,
    tunnel: Option<Arc<Caller>>,
}

/// The request counters' row of the last request's integration (a weak
/// handle, compared by address: held, an address is not reused).
#[derive(Default)]
struct MetricsMemo(Option<(std::sync::Weak<Integration>, usize)>);

impl MetricsMemo {
    fn row(&mut self, metrics: &Metrics, integration: Option<&Arc<Integration>>) -> usize {
        let Some(i) = integration else { return metrics.row(None) };
        match &self.0 {
            Some((kept, row)) if std::ptr::eq(kept.as_ptr(), Arc::as_ptr(i)) => *row,
            _ => {
                let row = metrics.row(Some(&i.id));
                self.0 = Some((Arc::downgrade(i), row));
                row
            }
        }
    }
}

impl ConnMemo {
    /// For the requests inside a tunnel whose `CONNECT` proved `caller`.
    pub(crate) fn in_tunnel(caller: Option<Arc<Caller>>) -> Self {
        Self { tunnel: caller, ..Self::default() }
    }
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

/// What the access log and the audit trail record about one request.
/// Never a secret: no header values, no query string. Cheap to fill
/// (shared handles, no copies): it is filled whether or not a line is
/// written.
#[derive(Default)]
struct Access {
    /// The run token's claims, when one was presented.
    caller: Option<Arc<Caller>>,
    connection: Option<ConnectionId>,
    /// The connection, once found: its integration, auth method and owner.
    resolved: Option<Arc<Resolved>>,
    cache_hit: Option<bool>,
    host: Option<Authority>,
    /// Where the host is in `host`'s text, as the target was read (reading
    /// it again cost ~150 instructions a logged request).
    host_span: Option<(usize, usize)>,
    code: Option<crate::problem::Code>,
    /// An OAuth2 token refreshed, a request retried after a 401.
    renewal: Renewal,
}

impl Access {
    fn integration(&self) -> Option<&str> {
        self.resolved.as_ref().map(|r| r.integration.id.as_str())
    }

    /// The target's host, as step 1 read it.
    fn host(&self) -> Option<&str> {
        let (start, end) = self.host_span?;
        self.host.as_ref()?.as_str().get(start..end)
    }

    /// Keeps `authority` and where `host` (a slice of its text) is in it.
    fn set_host(&mut self, authority: &Authority, host: &str) {
        self.host_span = upstream::place(authority.as_str(), host).map(|r| (r.start, r.end));
        self.host = Some(authority.clone());
    }
}

/// One request through the pipeline, with its metrics and access line.
/// `own`: the `X-Connection-Id` and `Proxy-Authorization` fields our
/// HTTP/1.1 codec set aside (`None` for h2 streams: they are still among
/// the headers). `memo`: what
/// this caller connection resolved and proved last, and what the
/// `CONNECT` of the tunnel it came through proved.
async fn handle(
    state: &Arc<ProxyState>,
    peer: SocketAddr,
    req: Request<CallerBody>,
    own: Option<h1::OwnFields>,
    memo: &mut ConnMemo,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let mut h = Handling::begin(state, &parts);
    let result = forward(state, peer, parts, body, own, &mut h.access, memo, h.started).await;
    h.finish(state, peer, result, memo)
}

/// A request's bookkeeping around the pipeline: [`Handling::begin`], then
/// [`forward`], then [`Handling::finish`] (metrics, the audit and access
/// lines, a refusal's problem response). Two plain calls rather than an
/// `async fn` around `forward`: the HTTP/1.1 caller loop awaits `forward`
/// itself — one async layer fewer, so one move fewer of the request and of
/// the pipeline's future per request; [`handle`] strings them together
/// for everything else.
struct Handling<'a> {
    started: Instant,
    in_flight: crate::metrics::InFlight<'a>,
    access_log: bool,
    /// What the access and audit lines need from the request, kept only
    /// if one is written (the path a shared handle on the request's bytes).
    logged: Option<(Method, Option<http::uri::PathAndQuery>)>,
    access: Access,
}

impl<'a> Handling<'a> {
    #[inline(always)]
    fn begin(state: &'a ProxyState, req: &http::request::Parts) -> Self {
        let started = Instant::now();
        let in_flight = state.outbound.metrics.in_flight();
        let access_log = tracing::enabled!(target: telemetry::ACCESS, tracing::Level::INFO);
        let logged =
            (access_log || state.audit.is_on()).then(|| (req.method.clone(), req.uri.path_and_query().cloned()));
        Self { started, in_flight, access_log, logged, access: Access::default() }
    }

    fn finish(
        self,
        state: &ProxyState,
        peer: SocketAddr,
        result: Result<Response<ProxyBody>, ProxyError>,
        memo: &mut ConnMemo,
    ) -> Response<ProxyBody> {
        let Self { started, in_flight, access_log, logged, mut access } = self;
        let metrics = &state.outbound.metrics;
        let resp = match result {
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
                problem.to_proxy_response().map(|b| ProxyBody::Made(Full::new(b)))
            }
        };
        drop(in_flight);
        let row = memo.metrics.row(metrics, access.resolved.as_ref().map(|r| &r.integration));
        metrics.request_in(row, resp.status().as_u16());
        let Some((method, path_and_query)) = logged else { return resp };
        // `Uri::path`: none for an authority-form (CONNECT) target.
        let path = path_and_query.as_ref().map_or("", http::uri::PathAndQuery::path);
        if let Some(connection) = access.connection.as_ref().filter(|_| state.audit.is_on()) {
            let parties = memo.audit.parties(&state.org_id, &access, connection);
            audit_use(state, &access, parties, &method, path, resp.status().as_u16(), started);
        }
        // One message instead of a dozen structured fields: the formatter's
        // per-field work was most of the line's cost (load bench), and
        // `telemetry` writes access lines without re-escaping them.
        if access_log {
            info!(
                target: telemetry::ACCESS,
                "peer={peer} org={} connection={} integration={} method={method} host={} path={path} status={} \
                 latency_us={} cache_hit={} code={} retried={}",
                state.org_id,
                access.connection.as_ref().map_or("-", ConnectionId::as_str),
                access.integration().unwrap_or("-"),
                access.host().unwrap_or("-"),
                resp.status().as_u16(),
                started.elapsed().as_micros(),
                access.cache_hit.map_or("-", |h| if h { "true" } else { "false" }),
                access.code.map_or("-", crate::problem::Code::as_str),
                access.renewal.retried,
            );
        }
        resp
    }
}

/// The audit line's [`Parties`] of the last audited request on a caller
/// connection, formatted, and what they were made of: its caller and
/// `Resolved` (weak handles, compared by address — held, an address is not
/// reused, and a credential is not kept alive by the memo) and the
/// connection id (by value).
#[derive(Default)]
struct AuditMemo {
    of: Option<PartiesOf>,
    text: PartiesText,
}

/// What an [`AuditMemo`]'s parties were made of.
type PartiesOf = (Option<std::sync::Weak<Caller>>, Option<std::sync::Weak<Resolved>>, ConnectionId);

impl AuditMemo {
    /// The parties of a request that named `connection` (`org`: the
    /// sidecar's, for a caller without a run token): the kept text when
    /// nothing they are made of changed, else formatted anew.
    fn parties(&mut self, org: &str, access: &Access, connection: &ConnectionId) -> &PartiesText {
        fn same<T>(kept: &Option<std::sync::Weak<T>>, now: &Option<Arc<T>>) -> bool {
            match (kept, now) {
                (None, None) => true,
                (Some(kept), Some(now)) => std::ptr::eq(kept.as_ptr(), Arc::as_ptr(now)),
                _ => false,
            }
        }
        let kept = self.of.as_ref().is_some_and(|(caller, resolved, named)| {
            same(caller, &access.caller) && same(resolved, &access.resolved) && named == connection
        });
        if !kept {
            let claims = access.caller.as_deref().and_then(|c| c.claims.as_ref());
            let resolved = access.resolved.as_deref();
            self.text = Parties {
                org: claims.map_or(org, |c| c.org.as_str()),
                user: resolved.map(|r| &*r.meta.user_id),
                run_token: claims.map(|c| c.jti.as_str()),
                run_subject: claims.and_then(|c| c.sub.as_deref()),
                connection: connection.as_str(),
                integration: access.integration(),
                auth_method: resolved.map(|r| r.method.id.as_str()),
            }
            .format();
            self.of = Some((
                access.caller.as_ref().map(Arc::downgrade),
                access.resolved.as_ref().map(Arc::downgrade),
                *connection,
            ));
        }
        &self.text
    }
}

/// The audit line of a request that named `connection`.
fn audit_use(
    state: &ProxyState,
    access: &Access,
    parties: &PartiesText,
    method: &Method,
    path: &str,
    status: u16,
    started: Instant,
) {
    let latency = started.elapsed();
    state.audit.credential_use(&CredentialUse {
        time: std::time::SystemTime::now() - latency,
        parties,
        method,
        host: access.host(),
        path,
        status,
        latency,
        refreshed: access.renewal.refreshed,
        retried: access.renewal.retried,
        code: access.code.map(crate::problem::Code::as_str),
    });
}

/// An HTTP/1.1 upstream's header fields, still unparsed (the response's
/// header map holds only what the proxy added).
fn take_fields(resp: &mut Response<ProxyBody>) -> Option<h1::RawFields> {
    match resp.body_mut() {
        ProxyBody::Upstream(pooled) => pooled.take_fields(),
        ProxyBody::Scrubbed(scrubbed) => scrubbed.take_fields(),
        ProxyBody::Made(_) => None,
    }
}

/// A response for a caller that our HTTP/1.1 writer does not serve (h2
/// streams, written by hyper): an HTTP/1.1 upstream's unparsed fields go
/// into the header map.
fn fields_in_map(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(fields) = take_fields(&mut resp) else { return resp };
    match fields.append_to(resp.headers_mut()) {
        Ok(()) => resp,
        // Cannot happen for fields the tokenizer accepted; refused all the same.
        Err(e) => {
            let err = ProxyError::Upstream(e.to_string());
            warn!(error = %err, "upstream response fields do not fit a header map");
            err.problem().to_proxy_response().map(|b| ProxyBody::Made(Full::new(b)))
        }
    }
}

/// The life of a proxied request.
///
/// Longer than most on purpose: its numbered steps are the README's "Life of
/// a request", read top to bottom, each a call or a few lines; and one
/// `async fn` is one future (a nested one per step costs moves of the
/// request on every request).
#[expect(
    clippy::too_many_arguments,
    reason = "the request's head and body apart: no `Request` built to be taken apart again"
)]
async fn forward(
    state: &Arc<ProxyState>,
    peer: SocketAddr,
    mut parts: http::request::Parts,
    body: CallerBody,
    own: Option<h1::OwnFields>,
    access: &mut Access,
    memo: &mut ConnMemo,
    started: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let ConnMemo {
        resolve: memo,
        auth: auth_memo,
        inject: inject_memo,
        quota: quota_memo,
        target: target_memo,
        tunnel,
        ..
    } = memo;
    let tunnel = tunnel.as_ref();
    // The fields the proxy reads itself never go upstream: set aside by
    // the codec (HTTP/1.1), or taken out of an h2 request's headers here.
    let h1::OwnFields { connection_id: named, proxy_authorization: presented } =
        own.unwrap_or_else(|| take_own_fields(&mut parts.headers));

    // 1. Accept: only absolute-form http(s) requests are proxy requests.
    if parts.method == Method::CONNECT {
        // The caller is identified (step 2) for the whole tunnel.
        let caller = identify(state, presented, tunnel, auth_memo, started)?;
        // Boxed: rare, and its future would otherwise weigh on every request's.
        return Box::pin(connect(state, peer, parts, access, caller)).await;
    }
    let mut uri = std::mem::take(&mut parts.uri);
    root(&mut uri)?;
    let (scheme, host, port) = target_of(&uri, target_memo)?;
    if let Some(a) = uri.authority() {
        access.set_host(a, host);
    }

    // 2. Identify the caller: a run token in Proxy-Authorization names the
    // organization (shared mode), else the sidecar's is the one.
    let caller = identify(state, presented, tunnel, auth_memo, started)?;
    access.caller.clone_from(&caller);
    let org = caller.as_deref().map_or(state.org_id.as_str(), |c| c.org(state));
    let claims = caller.as_deref().and_then(|c| c.claims.as_ref());

    // 3. Which connection, if any. Taken out of the headers (above), shape
    // checked; more than one field is ambiguous (which one would an
    // upstream see?). Without the field, the proxy URL's user name may
    // name it.
    let conn_id = match checked_connection_id(named, memo)? {
        None => caller.as_deref().and_then(|c| c.connection),
        named => named,
    };
    if conn_id.is_some() && parts.method == Method::TRACE {
        // An upstream that echoes TRACE would hand the credential back (RFC 9110 §9.3.8).
        return Err(ProxyError::TraceWithCredential);
    }

    // Hop-by-hop headers and our own control headers never go upstream.
    strip_request_headers(&mut parts.headers);

    let body = UpstreamBody::Caller(body);
    let resp = match conn_id {
        None => {
            // No credential involved: egress policy and the SSRF guard only.
            if !state.allow_passthrough {
                return Err(ProxyError::PassthroughDenied);
            }
            state.outbound.send(upstream_request(&parts.method, uri, parts.headers, None, body)?).await?
        }
        Some(id) => {
            access.connection = Some(id);
            // A connection the run token does not list is an unknown one.
            if claims.is_some_and(|c| !c.allows(id.as_bytes(), None)) {
                return Err(ProxyError::Resolve(ResolveError::NotFound));
            }
            // 4. Resolve (org, id): cache → store → decrypt; other orgs see the same 404.
            // A keep-alive caller's last connection is remembered while the cache is unchanged.
            let (resolved, hit) = state.connections.resolve_memo(org, &id, memo, started).await?;
            access.cache_hit = Some(hit);
            access.resolved = Some(resolved.clone());
            if claims.is_some_and(|c| !c.allows(id.as_bytes(), Some(&resolved.integration.id))) {
                return Err(ProxyError::Resolve(ResolveError::NotFound));
            }

            let (up_scheme, up_port) = upstream_scheme_port(scheme, port, resolved.integration.upstream_scheme);

            // 5. Host check: the credential only ever goes to the integration's hosts.
            if !resolved.integration.host_allowed(host, up_port) {
                return Err(ProxyError::HostNotAllowed {
                    integration: resolved.integration.id.clone(),
                    host: host.to_owned(),
                    port: up_port,
                });
            }
            if let Some(rebuilt) = retargeted(&uri, (scheme, host, port), (up_scheme, up_port))? {
                uri = rebuilt;
            }
            // 6. Quotas: a cool-down the upstream asked for, rate limits
            // (perhaps waiting for a reserved turn), in-flight caps.
            let integration = resolved.integration.id.as_str();
            // The pipeline's start stands for now until something waited
            // (a credential fetched, a turn under a rate limit).
            let mut now = (!hit).then(Instant::now).unwrap_or(started);
            // Without limits or cool-downs anywhere, no check.
            let verdict = match state.quotas.may_apply() {
                true => state.quotas.check_with(integration, id.as_bytes(), org, uri.path(), now, quota_memo),
                false => Verdict::Go(None),
            };
            let permit = match verdict {
                Verdict::Go(p) => p,
                Verdict::Wait(turn) => {
                    let permit = turn.await.map_err(|r| ProxyError::Quota(Box::new(r)))?;
                    now = Instant::now();
                    permit
                }
                Verdict::No(r) => return Err(ProxyError::Quota(Box::new(r))),
            };
            // For `last_used_at` (a clock read and an atomic load, once a
            // second per caller connection; written once a minute).
            state.connections.note_use_memo(&resolved, memo);

            // A body to scrub must come unencoded.
            if resolved.integration.scrub_response_bodies {
                parts.headers.insert(http::header::ACCEPT_ENCODING, http::HeaderValue::from_static("identity"));
            }
            // 7-10. Fresh token, inject, forward (and the OAuth2 401 retry).
            // The caller's head goes on as the upstream request's.
            parts.uri = uri;
            let (mut resp, renewal) = if crate::outbound::buffers(&resolved) {
                state.outbound.with_connection(&resolved, parts, body, inject_memo, now).await?
            } else {
                // What `with_connection` does for a credential in the head,
                // one async layer (a move of the request) fewer.
                let req = inject_memo.upstream_request(parts, &resolved, body)?;
                let (fields, route) = inject_memo.fields_and_route();
                (state.outbound.send_with(req, fields, now, route).await?, Renewal::default())
            };
            access.renewal = renewal;
            if let Some(held) = permit.and_then(crate::quota::Permit::into_held) {
                // In flight until the caller has the whole body (or is gone).
                resp.body_mut().hold_until_end(held);
            }
            if matches!(resp.status().as_u16(), 429 | 503) {
                // The upstream's answer goes back untouched; what it asked
                // for holds the next requests back.
                let status = resp.status().as_u16();
                state
                    .quotas
                    .learn(integration, id.as_str(), status, |name| crate::outbound::response_field(&resp, name));
            }
            // What was injected does not come back in a URL field (nor,
            // when the integration asks, in the body).
            crate::outbound::scrub_echoes(&mut resp, &resolved);
            if resolved.integration.scrub_response_bodies {
                if let Some(scrubbed) = crate::outbound::ScrubbedBody::wrap(&mut resp, &resolved)? {
                    let (mut rparts, _) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    return Ok(Response::from_parts(rparts, ProxyBody::Scrubbed(Box::new(scrubbed))));
                }
            }
            resp
        }
    };

    // 11. Respond: stream the body back, minus hop-by-hop headers.
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    Ok(Response::from_parts(rparts, ProxyBody::Upstream(rbody)))
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
    caller: Option<Arc<Caller>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let authority = parts.uri.authority().cloned().ok_or(ProxyError::Malformed("CONNECT needs host:port"))?;
    access.set_host(&authority, authority.host());
    let host = authority.host().to_owned();
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
                    Ok(up) => tunnel::serve_intercepted(state, peer, up, authority, tls, caller).await,
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
    Ok(Response::new(ProxyBody::Made(Full::new(Bytes::new()))))
}

/// The fields the proxy reads itself, removed from `headers` (an h2
/// request's; our HTTP/1.1 codec never puts them there), and `Host` (the
/// upstream side writes the target's authority).
fn take_own_fields(headers: &mut HeaderMap) -> h1::OwnFields {
    headers.remove(header::HOST);
    h1::OwnFields {
        connection_id: take_own_field(headers, &X_CONNECTION_ID),
        proxy_authorization: take_own_field(headers, &http::header::PROXY_AUTHORIZATION),
    }
}

/// Every field named `name`, removed from `headers`: none, one, or more.
fn take_own_field(headers: &mut HeaderMap, name: &HeaderName) -> h1::OwnField {
    // `len` counts values: `remove` takes every value of the name, returns the first.
    let values = headers.len();
    match headers.remove(name) {
        None => h1::OwnField::Absent,
        Some(value) if headers.len() + 1 == values => h1::OwnField::One(h1::OwnValue::of_header(&value)),
        Some(_) => h1::OwnField::Repeated,
    }
}

/// The connection id a request names: at most one field, of the
/// connection id's shape (`memo`: the caller connection's last, already
/// checked).
fn checked_connection_id(field: h1::OwnField, memo: &ResolveMemo) -> Result<Option<ConnectionId>, ProxyError> {
    match field {
        h1::OwnField::Absent => Ok(None),
        h1::OwnField::Repeated => Err(ProxyError::DuplicateConnectionId),
        // Matched, not `ok_or`: an error made and dropped on every request.
        h1::OwnField::One(id) => match memo.known_id(id.as_bytes()).or_else(|| ConnectionId::parse(id.as_bytes())) {
            Some(id) => Ok(Some(id)),
            None => Err(ProxyError::BadConnectionId),
        },
    }
}

/// `uri` with "/" in front of its query (its path was empty).
fn with_root_path(uri: &Uri) -> Result<Uri, ProxyError> {
    let pq = uri.path_and_query().map_or("", |pq| pq.as_str());
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(format!("/{pq}").parse().map_err(|_| ProxyError::Malformed("invalid request target"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::Malformed("invalid request target"))
}

/// Scheme, host and explicit port of an absolute-form request target.
/// `memo`: the last target authority this caller connection had read, and
/// what it read (a keep-alive caller mostly repeats it; comparing the text
/// costs less than reading it again, ~150 instructions).
fn target_of<'u>(uri: &'u Uri, memo: &mut TargetMemo) -> Result<(Scheme, &'u str, Option<u16>), ProxyError> {
    let scheme = match uri.scheme() {
        None => return Err(ProxyError::OriginForm),
        Some(s) if *s == UriScheme::HTTP => Scheme::Http,
        Some(s) if *s == UriScheme::HTTPS => Scheme::Https,
        Some(_) => return Err(ProxyError::UnsupportedScheme),
    };
    // `let else`, not `ok_or`: an error made and dropped on every request.
    let Some(authority) = uri.authority() else { return Err(ProxyError::OriginForm) };
    let text = authority.as_str();
    if crate::scan::same(memo.authority.as_bytes(), text.as_bytes()) {
        if let Some(host) = text.get(memo.host.0..memo.host.1) {
            return Ok((scheme, host, memo.port));
        }
    }
    let Some((host, port, userinfo)) = upstream::authority_parts(text).filter(|(h, ..)| !h.is_empty()) else {
        return Err(ProxyError::OriginForm);
    };
    if userinfo {
        return Err(ProxyError::Malformed("user information in the request URI is not allowed"));
    }
    // The host is a slice of the text: kept as its place in it.
    if let Some(at) = upstream::place(text, host) {
        text.clone_into(&mut memo.authority);
        (memo.host, memo.port) = ((at.start, at.end), port);
    }
    Ok((scheme, host, port))
}

/// [`target_of`]'s memo: an authority's text (copied: a handle would keep
/// the whole read buffer it is a slice of from being reused), where its
/// host is in it, its port. Only authorities read without an error.
#[derive(Default)]
struct TargetMemo {
    authority: String,
    host: (usize, usize),
    port: Option<u16>,
}

/// Where a request for `scheme` and `port` goes for an integration whose
/// upstreams speak `integration`: an `http://` request to an https-only
/// integration is forwarded over TLS (to 443 if it named port 80 or none).
fn upstream_scheme_port(scheme: Scheme, port: Option<u16>, integration: Scheme) -> (Scheme, u16) {
    let up_scheme = match (scheme, integration) {
        (Scheme::Http, Scheme::Https) => Scheme::Https,
        (s, _) => s,
    };
    let up_port = match port {
        Some(p) if !(up_scheme != scheme && p == scheme.default_port()) => p,
        _ => up_scheme.default_port(),
    };
    (up_scheme, up_port)
}

/// The request-target steps of the pipeline (1 and 5) for the fuzz targets
/// under `fuzz/`, built only with the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
pub mod fuzz {
    use super::*;

    /// A checked request target: the host and port `allowed_hosts` is asked
    /// about, and the URI that goes upstream.
    #[derive(Debug)]
    pub struct Checked {
        pub host: String,
        pub port: u16,
        pub https: bool,
        pub forwarded: Uri,
    }

    /// What the pipeline makes of a request target for an integration
    /// (`https_only`: its `upstream_scheme` is https), or why it refuses it.
    pub fn target(uri: Uri, https_only: bool) -> Result<Checked, String> {
        let mut uri = uri;
        root(&mut uri).map_err(|e| e.to_string())?;
        let (scheme, host, port) = target_of(&uri, &mut TargetMemo::default()).map_err(|e| e.to_string())?;
        let integration = if https_only { Scheme::Https } else { Scheme::Http };
        let (up_scheme, up_port) = upstream_scheme_port(scheme, port, integration);
        let forwarded = retargeted(&uri, (scheme, host, port), (up_scheme, up_port)).map_err(|e| e.to_string())?;
        let forwarded = forwarded.unwrap_or_else(|| uri.clone());
        Ok(Checked { host: host.to_owned(), port: up_port, https: up_scheme == Scheme::Https, forwarded })
    }
}

/// Step 1's target: `http://host?q` has an empty path, and origin-form
/// needs "/".
#[inline(always)]
fn root(uri: &mut Uri) -> Result<(), ProxyError> {
    if uri.path_and_query().is_some_and(|pq| pq.as_str().starts_with('?')) {
        *uri = with_root_path(uri)?;
    }
    Ok(())
}

/// Step 5's target: the URI rebuilt for the upstream's scheme and port
/// when they differ from the caller's target (`target`: [`target_of`]'s
/// answer), `None` when it goes as it came.
#[inline(always)]
fn retargeted(
    uri: &Uri,
    (scheme, host, port): (Scheme, &str, Option<u16>),
    (up_scheme, up_port): (Scheme, u16),
) -> Result<Option<Uri>, ProxyError> {
    if up_scheme == scheme && port == Some(up_port) {
        return Ok(None);
    }
    rebuild_uri(uri, up_scheme, host, up_port).map(Some)
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
/// leaves hop-by-hop fields and `X-Connection-Id` out already, and step 3
/// took an h2 request's out; naming it here again keeps it from ever going
/// upstream should another path reach this.)
fn strip_request_headers(h: &mut HeaderMap) {
    strip(h, |name| matches!(name, "proxy-authorization" | "x-connection-id" | "expect"));
}

/// Removes the hop-by-hop headers, the names `Connection` lists, and those
/// `also` picks. Most messages carry none of them, or only `Connection:
/// keep-alive`: one pass over the names finds what is there, and only that
/// is looked up and removed.
fn strip(h: &mut HeaderMap, also: impl Fn(&str) -> bool) {
    let strips = |n: &str| h1::is_hop_by_hop(n) || also(n);
    // Nearly always nothing to remove (an HTTP/1.1 upstream's response map
    // is empty, our codec keeps hop-by-hop fields out of a request's): one
    // look at the names, without setting up the removal below.
    if !h.keys().any(|n| strips(n.as_str())) {
        return;
    }
    // Each name at most once: fits without allocating.
    let mut present: [Option<HeaderName>; 12] = [const { None }; 12];
    let mut found = 0;
    let mut listed = Vec::new();
    for (name, value) in h.iter() {
        let n = name.as_str();
        if !strips(n) || present[..found].iter().flatten().any(|p| p == name) {
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
    use crate::runtoken::RunClaims;
    use http::HeaderValue;

    /// The kept row is the row of the integration asked about: another
    /// integration (one the counters do not know: `other`) is looked up.
    #[test]
    fn metrics_memo_keeps_the_row_of_the_last_integration() {
        let bearer = "[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n";
        let t = crate::outbound::tests::resolved(bearer, &[("token", "tkn-a")]).integration.clone();
        let text = format!("id = \"u\"\nname = \"U\"\nallowed_hosts = [\"x.test\"]\n{bearer}");
        let u = Arc::new(Integration::from_toml_str("u.toml", &text, &Default::default()).unwrap());
        let metrics = Metrics::new(["a", "t", "z"]);
        let (row_t, other) = (metrics.row(Some("t")), metrics.row(None));
        assert_ne!(row_t, other);
        assert_eq!(metrics.row(Some("u")), other, "not known at start");
        let mut memo = MetricsMemo::default();
        for (i, row) in [(Some(&t), row_t), (Some(&t), row_t), (None, other), (Some(&u), other), (Some(&t), row_t)] {
            assert_eq!(memo.row(&metrics, i), row);
        }
        // A row out of range counts nowhere rather than panicking.
        metrics.request_in(usize::MAX, 200);
    }

    /// The kept parties are what formatting them anew gives; they are
    /// formatted anew when the caller, the `Resolved` or the connection id
    /// changes, and the memo does not keep a `Resolved` alive.
    #[test]
    fn audit_memo_keeps_parties_while_what_they_are_made_of_stays() {
        let bearer = "[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n";
        let a = crate::outbound::tests::resolved(bearer, &[("token", "tkn-a")]);
        let b = crate::outbound::tests::resolved(bearer, &[("token", "tkn-b")]);
        let claims = |jti: &str, org: &str| RunClaims {
            jti: jti.into(),
            org: org.into(),
            sub: Some("user_9".into()),
            conns: None,
            ints: None,
            iat: 0,
            exp: 0,
        };
        let run = Arc::new(Caller { claims: Some(claims("rt_1", "org_r")), connection: None });
        let other_run = Arc::new(Caller { claims: Some(claims("rt_2", "org_s")), connection: None });
        let fresh = |caller: &Option<Arc<Caller>>, resolved: &Option<Arc<Resolved>>, conn: &ConnectionId| {
            let access = Access { caller: caller.clone(), resolved: resolved.clone(), ..Access::default() };
            AuditMemo::default().parties("org_side", &access, conn).clone()
        };
        let id = |c: &str| ConnectionId::parse(format!("conn_{}", c.repeat(26)).as_bytes()).unwrap();
        let (c1, c2) = (id("b"), id("c"));
        let mut memo = AuditMemo::default();
        let mut seen = Vec::new();
        for (caller, resolved, conn) in [
            (None, Some(a.clone()), &c1),
            (None, Some(a.clone()), &c1),
            (None, Some(b.clone()), &c1),
            (None, Some(b.clone()), &c2),
            (None, None, &c2),
            (Some(run.clone()), None, &c2),
            (Some(run.clone()), Some(a.clone()), &c2),
            (Some(run.clone()), Some(a.clone()), &c2),
            (Some(other_run.clone()), Some(a.clone()), &c2),
            (None, Some(a.clone()), &c1),
        ] {
            let access = Access { caller: caller.clone(), resolved: resolved.clone(), ..Access::default() };
            let kept = memo.parties("org_side", &access, conn).clone();
            assert_eq!(kept, fresh(&caller, &resolved, conn));
            let of = memo.of.as_ref().unwrap();
            assert_eq!(
                of.1.as_ref().map(std::sync::Weak::as_ptr),
                resolved.as_ref().map(Arc::as_ptr),
                "kept for this Resolved"
            );
            seen.push(format!("{kept:?}"));
        }
        // `a` and `b` share owner and method: six different texts.
        assert_eq!(seen.iter().collect::<std::collections::BTreeSet<_>>().len(), 6, "{seen:#?}");
        let text = |p: &PartiesText| format!("{p:?}");
        let with_run = fresh(&Some(run.clone()), &Some(a.clone()), &c2);
        assert!(
            text(&with_run).contains("org_r") && text(&with_run).contains("rt_1") && text(&with_run).contains("user_9")
        );
        assert!(text(&fresh(&None, &Some(a.clone()), &c1)).contains("org_side"));
        // A Resolved the cache dropped is not kept alive by the memo.
        let weak = Arc::downgrade(&b);
        let access = Access { resolved: Some(b), ..Access::default() };
        memo.parties("org_side", &access, &c1);
        drop(access);
        assert!(weak.upgrade().is_none(), "the memo held the Resolved");
    }

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

    /// An h2 request's own fields come out of its headers as the codec
    /// sets an HTTP/1.1 request's aside: none, one, or more than one.
    #[test]
    fn own_fields_are_taken_out_of_an_h2_requests_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-connection-id", "conn_a"),
            ("proxy-authorization", "Bearer a"),
            ("accept", "*/*"),
            ("host", "evil.test"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h.append(http::header::PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        let own = take_own_fields(&mut h);
        assert_eq!(own.connection_id, h1::OwnField::One(h1::OwnValue::from_static("conn_a")));
        assert_eq!(own.proxy_authorization, h1::OwnField::Repeated);
        // `Host` too: the upstream side writes the target's authority.
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"], "every value is out");
        assert_eq!(take_own_fields(&mut h), h1::OwnFields::default());
    }

    /// The logged host is the one step 1 read, kept as a place in the
    /// authority's text (no second reading).
    #[test]
    fn the_logged_host_is_the_target_host() {
        for (uri, host) in [
            ("http://a.test:8080/x", "a.test"),
            ("https://a.test/", "a.test"),
            ("http://127.0.0.1:9/", "127.0.0.1"),
            ("http://[::1]:8080/", "[::1]"),
        ] {
            let uri: Uri = uri.parse().unwrap();
            let (_, read, _) = target_of(&uri, &mut TargetMemo::default()).unwrap();
            let mut access = Access::default();
            access.set_host(uri.authority().unwrap(), read);
            assert_eq!(access.host(), Some(host), "{uri}");
        }
        let authority: Authority = "b.test:443".parse().unwrap();
        let mut access = Access::default();
        access.set_host(&authority, authority.host());
        assert_eq!(access.host(), Some("b.test"));
        // Not a slice of the authority's text: no host rather than a wrong one.
        access.set_host(&authority, "elsewhere");
        assert_eq!(access.host(), None);
    }

    #[test]
    fn targets() {
        let target_of = |uri: &Uri| target_of(uri, &mut TargetMemo::default()).map(|(s, h, p)| (s, h.to_owned(), p));
        assert!(matches!(target_of(&"/x".parse().unwrap()), Err(ProxyError::OriginForm)));
        assert!(matches!(target_of(&"ftp://a/".parse().unwrap()), Err(ProxyError::UnsupportedScheme)));
        let u: Uri = "http://a.test/x".parse().unwrap();
        assert_eq!(target_of(&u).unwrap(), (Scheme::Http, "a.test".into(), None));
        let u: Uri = "https://a.test:8443/".parse().unwrap();
        assert_eq!(target_of(&u).unwrap(), (Scheme::Https, "a.test".into(), Some(8443)));
        let u = rebuild_uri(&"http://a.test/p?q=1".parse().unwrap(), Scheme::Https, "a.test", 443).unwrap();
        assert_eq!(u.to_string(), "https://a.test/p?q=1");
        assert_eq!(h1::host_of(&"http://a.test:80/".parse().unwrap()), Some("a.test"));
        assert_eq!(h1::host_of(&"http://127.0.0.1:8000/".parse().unwrap()), Some("127.0.0.1:8000"));
        assert_eq!(h1::host_of(&"/x".parse().unwrap()), None);
    }

    /// One caller connection's targets read through its memo: each
    /// what a fresh reading gives, whatever came before it (the same
    /// authority, another, an error, the other scheme).
    #[test]
    fn a_remembered_target_reads_as_a_fresh_one() {
        let targets = [
            "http://a.test:8080/x",
            "http://a.test:8080/y",
            "https://a.test:8080/",
            "http://a.test:8081/",
            "http://u@a.test:8080/",
            "http://a.test:8080/z",
            "http://[::1]:9/",
            "http://[::1]:9/",
            "http://b.test/",
            "http://a.test/",
            "/origin",
            "http://a.test:8080/",
        ];
        let fresh = |uri: &Uri| match target_of(uri, &mut TargetMemo::default()) {
            Ok((s, h, p)) => Ok((s, h.to_owned(), p)),
            Err(e) => Err(e.to_string()),
        };
        let mut memo = TargetMemo::default();
        for t in targets.iter().chain(targets.iter().rev()) {
            let uri: Uri = t.parse().unwrap();
            let kept = target_of(&uri, &mut memo).map(|(s, h, p)| (s, h.to_owned(), p)).map_err(|e| e.to_string());
            assert_eq!(kept, fresh(&uri), "{t}");
        }
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
