//! The proxy listener and the request pipeline.
//!
//! [`forward`] holds the order of the steps, top to bottom, one line of *why*
//! each. Errors from every step become [`ProxyError`]s, and [`ProxyError::problem`]
//! is the one place they turn into responses. Nothing imports this module.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::creds::Connections;
use crate::ids;
use crate::integrations::Scheme;
pub use crate::outbound::ProxyError;
use crate::outbound::{upstream_request, Outbound};
use crate::policy::hosts::HostPattern;
use crate::tls::Interceptor;
use crate::upstream::pool::PooledBody;
use crate::upstream::GuardedConnector;
use crate::upstream::UpstreamBody;

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
    /// Flips to true when shutdown starts.
    pub shutdown: watch::Receiver<bool>,
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
        let shutdown = shutdown.clone();
        let metrics = state.outbound.metrics.clone();
        state.tracker.clone().spawn(async move {
            let _open = metrics.client_connection();
            match tls {
                None => serve_connection(TokioIo::new(stream), state, peer, shutdown).await,
                Some(acceptor) => {
                    // The handshake gets the same deadline as a request head.
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_connection(TokioIo::new(s), state, peer, shutdown).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "proxy TLS handshake failed"),
                        Err(_) => debug!(%peer, "proxy TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    info!("proxy listener closed; draining open connections");
}

/// Resolves once shutdown has started.
async fn draining(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Runs a hyper server connection to its end; once shutdown starts, asks it
/// to finish the request in flight and close (no more keep-alive). A macro:
/// the three connection types have `graceful_shutdown` but no common trait.
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

/// HTTP/1 server settings shared by the listener and intercepted tunnels.
fn http1_builder(limits: &ClientLimits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(limits.max_header_bytes);
    b
}

async fn serve_connection<I>(io: I, state: Arc<ProxyState>, peer: SocketAddr, mut shutdown: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = state.limits;
    let svc = service_fn(move |req| handle(state.clone(), peer, req));
    let result = serve_until_drained!(http1_builder(&limits).serve_connection(io, svc).with_upgrades(), shutdown);
    if let Err(e) = result {
        debug!(%peer, error = %e, "proxy connection ended with an error");
    }
}

/// What the access log records about one request. Never a secret: no header
/// values, no query string.
#[derive(Default)]
struct Access {
    connection: Option<String>,
    integration: Option<String>,
    cache_hit: Option<bool>,
    host: String,
    code: Option<&'static str>,
    /// An OAuth2 request retried after a 401 and a refresh.
    retried: bool,
}

async fn handle(
    state: Arc<ProxyState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let metrics = &state.outbound.metrics;
    let in_flight = metrics.in_flight();
    // What the access line needs from the request, kept only if it is logged.
    let logged = tracing::enabled!(target: "credproxy::access", tracing::Level::INFO)
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let mut access = Access::default();
    let resp = match forward(&state, peer, req, &mut access).await {
        Ok(resp) => resp,
        Err(err) => {
            let problem = err.problem();
            metrics.error(problem.code);
            access.code = Some(problem.code);
            if problem.status.is_server_error() {
                warn!(error = %err, code = problem.code, "proxy error");
            } else {
                debug!(error = %err, code = problem.code, "request refused");
            }
            problem.to_proxy_response().map(|b| Either::Right(Full::new(b)))
        }
    };
    drop(in_flight);
    metrics.request(access.integration.as_deref(), resp.status().as_u16());
    // One pre-formatted message instead of a dozen structured fields: the
    // formatter's per-field work was most of the line's cost (load bench).
    if let Some((method, path)) = logged {
        use std::fmt::Write as _;
        let mut line = String::with_capacity(256);
        let _ = write!(
            line,
            "peer={peer} org={} connection={} integration={} method={method} host={} path={path} status={} \
             latency_us={} cache_hit={} code={} retried={}",
            state.org_id,
            access.connection.as_deref().unwrap_or("-"),
            access.integration.as_deref().unwrap_or("-"),
            if access.host.is_empty() { "-" } else { &access.host },
            resp.status().as_u16(),
            started.elapsed().as_micros(),
            access.cache_hit.map_or("-", |h| if h { "true" } else { "false" }),
            access.code.unwrap_or("-"),
            access.retried,
        );
        info!(target: "credproxy::access", "{line}");
    }
    Ok(resp)
}

/// The life of a proxied request.
async fn forward(
    state: &Arc<ProxyState>,
    peer: SocketAddr,
    req: Request<Incoming>,
    access: &mut Access,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();

    // 1. Accept: only absolute-form http(s) requests are proxy requests.
    if parts.method == Method::CONNECT {
        return connect(state, peer, parts, access).await;
    }
    let (scheme, host, _port) = target_of(&parts.uri)?;
    access.host = host.clone();

    // 2. Identify the caller: sidecar mode pins one organization.
    let org = state.org_id.as_str();

    // 3. Which connection, if any. Read before stripping, validate its shape.
    let conn_id = match parts.headers.get(&X_CONNECTION_ID) {
        None => None,
        Some(v) => {
            let id = v.to_str().ok().filter(|s| ids::is_connection_id(s)).ok_or(ProxyError::BadConnectionId)?;
            Some(id.to_owned())
        }
    };

    // Hop-by-hop headers, our own control headers and the caller's Host never go upstream.
    strip_request_headers(&mut parts.headers);

    let mut uri = parts.uri.clone();
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
            // 4. Resolve (org, id): cache → store → decrypt; other orgs see the same 404.
            let (resolved, hit) = state.connections.resolve(org, &id).await?;
            access.cache_hit = Some(hit);
            access.integration = Some(resolved.integration.id.clone());

            // An `http://` request to an https-only integration is forwarded over TLS.
            let up_scheme = match (scheme, resolved.integration.upstream_scheme) {
                (Scheme::Http, Scheme::Https) => Scheme::Https,
                (s, _) => s,
            };
            let up_port = match uri.port_u16() {
                Some(p) if !(up_scheme != scheme && p == scheme.default_port()) => p,
                _ => up_scheme.default_port(),
            };

            // 5. Host check: the credential only ever goes to the integration's hosts.
            if !resolved.integration.host_allowed(&host, up_port) {
                return Err(ProxyError::HostNotAllowed {
                    integration: resolved.integration.id.clone(),
                    host,
                    port: up_port,
                });
            }
            if up_scheme != scheme || uri.port_u16() != Some(up_port) {
                uri = rebuild_uri(&uri, up_scheme, &host, up_port)?;
            }

            // 6-8. Fresh token, inject, forward (and the OAuth2 401 retry).
            let (resp, retried) =
                state.outbound.with_connection(&resolved, &parts.method, &uri, parts.headers, body).await?;
            access.retried = retried;
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
    access.host = host.clone();
    let port = authority.port_u16().ok_or(ProxyError::Malformed("CONNECT needs an explicit port"))?;
    let on_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(ProxyError::Malformed("this connection cannot be upgraded"))?;
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
                match on_upgrade.await {
                    Ok(up) => tunnel::serve_intercepted(state, peer, up, authority, tls).await,
                    Err(e) => debug!(%peer, error = %e, "CONNECT upgrade failed"),
                }
            });
        }
        None => {
            let upstream = state.connector.connect_checked(&host, port).await.map_err(ProxyError::Connect)?;
            let metrics = state.outbound.metrics.clone();
            state.tracker.spawn(async move {
                let _open = metrics.client_connection();
                match on_upgrade.await {
                    Ok(up) => tunnel::serve_blind(peer, up, upstream).await,
                    Err(e) => debug!(%peer, error = %e, "CONNECT upgrade failed"),
                }
            });
        }
    }
    Ok(Response::new(Either::Right(Full::new(Bytes::new()))))
}

fn target_of(uri: &Uri) -> Result<(Scheme, String, u16), ProxyError> {
    let scheme = match uri.scheme() {
        None => return Err(ProxyError::OriginForm),
        Some(s) if *s == UriScheme::HTTP => Scheme::Http,
        Some(s) if *s == UriScheme::HTTPS => Scheme::Https,
        Some(_) => return Err(ProxyError::UnsupportedScheme),
    };
    let host = uri.host().filter(|h| !h.is_empty()).ok_or(ProxyError::OriginForm)?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ProxyError::Malformed("user information in the request URI is not allowed"));
    }
    let port = uri.port_u16().unwrap_or(scheme.default_port());
    Ok((scheme, host.to_owned(), port))
}

fn rebuild_uri(uri: &Uri, scheme: Scheme, host: &str, port: u16) -> Result<Uri, ProxyError> {
    let authority = if port == scheme.default_port() { host.to_owned() } else { format!("{host}:{port}") };
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(if scheme == Scheme::Https { UriScheme::HTTPS } else { UriScheme::HTTP });
    parts.authority =
        Some(Authority::try_from(authority.as_str()).map_err(|_| ProxyError::Malformed("invalid authority"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::Malformed("invalid URI"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those named by `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        h.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(name);
    }
}

fn strip_request_headers(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    h.remove(header::PROXY_AUTHORIZATION);
    h.remove(X_CONNECTION_ID);
    h.remove(header::HOST);
    // We answered `Expect: 100-continue` ourselves by reading the body.
    h.remove(header::EXPECT);
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
            ("host", "evil.test"),
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
        assert_eq!(target_of(&"http://a.test/x".parse().unwrap()).unwrap(), (Scheme::Http, "a.test".into(), 80));
        assert_eq!(
            target_of(&"https://a.test:8443/".parse().unwrap()).unwrap(),
            (Scheme::Https, "a.test".into(), 8443)
        );
        let u = rebuild_uri(&"http://a.test/p?q=1".parse().unwrap(), Scheme::Https, "a.test", 443).unwrap();
        assert_eq!(u.to_string(), "https://a.test/p?q=1");
        assert_eq!(host_header(&"http://a.test:80/".parse().unwrap()).unwrap(), "a.test");
        assert_eq!(host_header(&"http://127.0.0.1:8000/".parse().unwrap()).unwrap(), "127.0.0.1:8000");
    }

    #[test]
    fn every_problem_has_a_code_and_no_debug_leak() {
        let e = ProxyError::HostNotAllowed { integration: "gh".into(), host: "evil.test".into(), port: 443 };
        let p = e.problem();
        assert_eq!((p.status.as_u16(), p.code), (403, "host_not_allowed"));
        let r = p.to_proxy_response();
        assert!(r.headers()["proxy-status"].to_str().unwrap().starts_with("credproxy; error=http_request_denied"));
    }
}
