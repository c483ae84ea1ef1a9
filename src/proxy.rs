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
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::creds::{Connections, RefreshError, ResolveError, Resolved};
use crate::ids;
use crate::inject::{self, InjectError};
use crate::integrations::Scheme;
use crate::oauth2::TokenError;
use crate::problem::{Problem, ProxyErrorType};
use crate::store::ConnectionState;
use crate::upstream::{self, ConnectError, UpstreamBody, UpstreamClient};

pub const X_CONNECTION_ID: HeaderName = HeaderName::from_static("x-connection-id");

/// Response bodies: the upstream's stream, or one we made.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Everything the pipeline needs; built once by `server`.
pub struct ProxyState {
    /// Sidecar mode: every caller belongs to this organization.
    pub org_id: String,
    pub connections: Arc<Connections>,
    pub client: UpstreamClient,
    pub max_buffered_body: u64,
    pub response_header_timeout: Duration,
    pub allow_passthrough: bool,
}

/// Accepts connections until `shutdown` flips to true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
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
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), peer, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "proxy connection ended with an error");
            }
        });
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
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut access = Access::default();
    let resp = match forward(&state, req, &mut access).await {
        Ok(resp) => resp,
        Err(err) => {
            let problem = err.problem();
            access.code = Some(problem.code);
            if problem.status.is_server_error() && problem.status != StatusCode::NOT_IMPLEMENTED {
                warn!(error = %err, code = problem.code, "proxy error");
            } else {
                debug!(error = %err, code = problem.code, "request refused");
            }
            problem.to_proxy_response().map(|b| Either::Right(Full::new(b)))
        }
    };
    info!(
        target: "credproxy::access",
        %peer,
        org = %state.org_id,
        connection = access.connection.as_deref().unwrap_or("-"),
        integration = access.integration.as_deref().unwrap_or("-"),
        method = %method,
        host = %access.host,
        path = %path,
        status = resp.status().as_u16(),
        latency_us = started.elapsed().as_micros() as u64,
        cache_hit = access.cache_hit.map_or("-", |h| if h { "true" } else { "false" }),
        code = access.code.unwrap_or("-"),
        retried = access.retried,
    );
    Ok(resp)
}

/// The life of a proxied request.
async fn forward(
    state: &ProxyState,
    req: Request<Incoming>,
    access: &mut Access,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();

    // 1. Accept: only absolute-form http(s) requests are proxy requests.
    if parts.method == Method::CONNECT {
        return Err(ProxyError::ConnectUnsupported);
    }
    let (scheme, host, _port) = target_of(&parts.uri)?;
    access.host = host.clone();

    // 2. Identify the caller: sidecar mode pins one organization.
    let org = state.org_id.as_str();

    // 3. Which connection, if any. Read before stripping, validate its shape.
    let conn_id = match parts.headers.get(&X_CONNECTION_ID) {
        None => None,
        Some(v) => {
            let id = v
                .to_str()
                .ok()
                .filter(|s| ids::is_connection_id(s))
                .ok_or(ProxyError::BadConnectionId)?;
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
            send(state, upstream_request(&parts, &uri, &parts.headers, None, body)?).await?
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

            // 6. Fresh token: an OAuth2 access token about to expire is refreshed
            //    once, however many requests are waiting for it.
            let resolved = state.connections.ensure_fresh(resolved).await?;

            // Body placements need the body in hand; OAuth2 requests keep a small
            // body so a 401 can be retried once after a refresh.
            let mut headers = parts.headers.clone();
            let (body, replay) = if resolved.method.edits_body() {
                let edits = inject::edits(&resolved.method, &resolved.credential)?;
                let Either::Left(incoming) = body else {
                    unreachable!("body starts as the caller's stream")
                };
                let buffered = buffer_body(incoming, &headers, state.max_buffered_body).await?;
                let (new_body, ctype) = inject::apply_body(&headers, &buffered, &edits)?;
                if let Some(ct) = ctype {
                    headers.insert(header::CONTENT_TYPE, ct);
                }
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(new_body.len()));
                (Either::Right(Full::new(Bytes::from(new_body.to_vec()))), None)
            } else if resolved.method.oauth2().is_some() {
                replayable(body).await?
            } else {
                (body, None)
            };

            // 7-8. Inject (pure edits on a copy of the head) and forward.
            let resp = send(state, upstream_request(&parts, &uri, &headers, Some(&resolved), body)?).await?;

            // An OAuth2 401 with a replayable body: refresh only if the token that
            // failed is still current, then retry once.
            match replay {
                Some(replay) if resp.status() == StatusCode::UNAUTHORIZED => {
                    let failed = resolved
                        .credential
                        .values()
                        .first()
                        .map(|v| v.expose().to_owned())
                        .unwrap_or_default();
                    drop(resp);
                    let refreshed = state.connections.force_refresh(&resolved, &failed).await?;
                    access.retried = true;
                    let retry = upstream_request(
                        &parts,
                        &uri,
                        &headers,
                        Some(&refreshed),
                        Either::Right(Full::new(replay)),
                    )?;
                    send(state, retry).await?
                }
                _ => resp,
            }
        }
    };

    // 9. Respond: stream the body back, minus hop-by-hop headers.
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    Ok(Response::from_parts(rparts, Either::Left(rbody)))
}

/// Builds the upstream request from the caller's (stripped) head: injects
/// the credential into a copy, sets `Host` to the target authority, and picks
/// the version ourselves.
fn upstream_request(
    parts: &http::request::Parts,
    uri: &Uri,
    headers: &HeaderMap,
    resolved: Option<&Resolved>,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, ProxyError> {
    let mut uri = uri.clone();
    let mut headers = headers.clone();
    if let Some(r) = resolved {
        let edits = inject::edits(&r.method, &r.credential)?;
        inject::apply_head(&mut uri, &mut headers, &edits)?;
    }
    headers.insert(header::HOST, host_header(&uri)?);
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Forwards through the pooled client; its connector applies the SSRF guard.
async fn send(state: &ProxyState, req: Request<UpstreamBody>) -> Result<Response<Incoming>, ProxyError> {
    tokio::time::timeout(state.response_header_timeout, state.client.request(req))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
        .map_err(ProxyError::from_client)
}

/// Largest body kept for replaying an OAuth2 request after a 401.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A body of known length up to [`MAX_REPLAY_BODY`] is read so it can be
/// sent twice; anything else streams and is never retried.
async fn replayable(body: UpstreamBody) -> Result<(UpstreamBody, Option<Bytes>), ProxyError> {
    match body {
        Either::Left(incoming) => match http_body::Body::size_hint(&incoming).exact() {
            Some(n) if n <= MAX_REPLAY_BODY => {
                let bytes = match Limited::new(incoming, MAX_REPLAY_BODY as usize).collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(_) => return Err(ProxyError::BodyRead),
                };
                Ok((Either::Right(Full::new(bytes.clone())), Some(bytes)))
            }
            _ => Ok((Either::Left(incoming), None)),
        },
        full @ Either::Right(_) => Ok((full, None)),
    }
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
        return Err(ProxyError::Malformed(
            "user information in the request URI is not allowed",
        ));
    }
    let port = uri.port_u16().unwrap_or(scheme.default_port());
    Ok((scheme, host.to_owned(), port))
}

fn rebuild_uri(uri: &Uri, scheme: Scheme, host: &str, port: u16) -> Result<Uri, ProxyError> {
    let authority = if port == scheme.default_port() {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(if scheme == Scheme::Https {
        UriScheme::HTTPS
    } else {
        UriScheme::HTTP
    });
    parts.authority =
        Some(Authority::try_from(authority.as_str()).map_err(|_| ProxyError::Malformed("invalid authority"))?);
    Uri::from_parts(parts).map_err(|_| ProxyError::Malformed("invalid URI"))
}

fn host_header(uri: &Uri) -> Result<HeaderValue, ProxyError> {
    let auth = uri.authority().ok_or(ProxyError::OriginForm)?;
    let default = if uri.scheme() == Some(&UriScheme::HTTPS) {
        443
    } else {
        80
    };
    let value = match auth.port_u16() {
        Some(p) if p == default => auth.host().to_owned(),
        _ => auth.as_str().to_owned(),
    };
    HeaderValue::try_from(value).map_err(|_| ProxyError::Malformed("invalid host"))
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

async fn buffer_body(body: Incoming, headers: &HeaderMap, limit: u64) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(_) => Err(ProxyError::BodyRead),
    }
}

/// Everything that can stop a request, tagged by the side at fault through
/// the status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("origin-form request to the proxy port")]
    OriginForm,
    #[error("CONNECT is not supported yet")]
    ConnectUnsupported,
    #[error("unsupported URI scheme")]
    UnsupportedScheme,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("malformed X-Connection-Id")]
    BadConnectionId,
    #[error("pass-through is disabled")]
    PassthroughDenied,
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    #[error("integration {integration} does not allow host {host}:{port}")]
    HostNotAllowed {
        integration: String,
        host: String,
        port: u16,
    },
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("reading the request body failed")]
    BodyRead,
    #[error(transparent)]
    Connect(ConnectError),
    #[error("upstream TLS failed: {0}")]
    UpstreamTls(String),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("upstream request failed: {0}")]
    Upstream(String),
}

impl ProxyError {
    fn from_client(e: hyper_util::client::legacy::Error) -> Self {
        if let Some(c) = upstream::find_connect_error(&e) {
            // The source chain holds our own error by reference; rebuild an owned summary.
            return Self::Connect(match c {
                ConnectError::Prohibited { host, ip, why } => ConnectError::Prohibited {
                    host: host.clone(),
                    ip: *ip,
                    why: *why,
                },
                ConnectError::Dns { host, source } => ConnectError::Dns {
                    host: host.clone(),
                    source: std::io::Error::new(source.kind(), source.to_string()),
                },
                ConnectError::NoAddresses { host } => ConnectError::NoAddresses { host: host.clone() },
                ConnectError::Connect { host, addr, source } => ConnectError::Connect {
                    host: host.clone(),
                    addr: *addr,
                    source: std::io::Error::new(source.kind(), source.to_string()),
                },
                ConnectError::Timeout { host } => ConnectError::Timeout { host: host.clone() },
                ConnectError::InvalidUri => ConnectError::InvalidUri,
            });
        }
        if upstream::is_tls_error(&e) {
            return Self::UpstreamTls(error_chain(&e));
        }
        Self::Upstream(error_chain(&e))
    }

    /// The caller-facing problem. Never includes a secret.
    pub fn problem(&self) -> Problem {
        use ProxyErrorType as T;
        use StatusCode as S;
        match self {
            Self::OriginForm => Problem::new(S::BAD_REQUEST, "not_a_proxy_request", "Not a proxy request",
                "credproxy is a forward proxy: send absolute-form requests, e.g. `curl -x http://127.0.0.1:8080 http://api.example.com/` or set http_proxy / HTTP_PROXY",
                T::HttpRequestError),
            Self::ConnectUnsupported => Problem::new(S::NOT_IMPLEMENTED, "connect_not_supported", "CONNECT not supported",
                "HTTPS tunnelling (CONNECT) is not available yet: send http:// URLs through HTTP_PROXY; integrations with upstream_scheme = \"https\" are still forwarded over TLS",
                T::HttpRequestError),
            Self::UnsupportedScheme => Problem::new(S::BAD_REQUEST, "unsupported_scheme", "Unsupported scheme",
                "only http:// and https:// targets can be proxied", T::HttpRequestError),
            Self::Malformed(what) => Problem::new(S::BAD_REQUEST, "malformed_request", "Malformed request", *what, T::HttpRequestError),
            Self::BadConnectionId => Problem::new(S::BAD_REQUEST, "invalid_connection_id", "Invalid X-Connection-Id",
                "X-Connection-Id must be a connection id: conn_ followed by 26 base32 characters", T::HttpRequestError),
            Self::PassthroughDenied => Problem::new(S::FORBIDDEN, "passthrough_denied", "Pass-through denied",
                "requests without X-Connection-Id are not forwarded (egress.allow_passthrough = false)", T::HttpRequestDenied),
            Self::Resolve(ResolveError::NotFound) => Problem::new(S::NOT_FOUND, "connection_not_found", "Connection not found",
                "no connection with this id is visible to the caller", T::HttpRequestDenied),
            Self::Resolve(ResolveError::NotActive(ConnectionState::NeedsReauth)) => Problem::new(S::CONFLICT, "connection_needs_reauth",
                "Connection needs re-authorization", "the connection's authorization is no longer valid; a user must re-authorize it", T::HttpRequestDenied),
            Self::Resolve(ResolveError::NotActive(_)) => Problem::new(S::CONFLICT, "connection_revoked", "Connection revoked",
                "the connection has been revoked", T::HttpRequestDenied),
            Self::Resolve(ResolveError::Misconfigured { .. } | ResolveError::Crypto { .. }) => Problem::new(S::INTERNAL_SERVER_ERROR,
                "connection_unusable", "Connection unusable", "the connection's stored credential cannot be used; see the proxy log", T::ProxyConfigurationError),
            Self::Resolve(ResolveError::Store(_)) => Problem::new(S::SERVICE_UNAVAILABLE, "store_unavailable", "Store unavailable",
                "the credential store cannot be reached; retry later", T::ProxyInternalError),
            Self::Refresh(RefreshError::NeedsReauth | RefreshError::Token(TokenError::InvalidGrant)) => {
                Self::Resolve(ResolveError::NotActive(ConnectionState::NeedsReauth)).problem()
            }
            Self::Refresh(RefreshError::Resolve(e)) => Self::Resolve(e.clone()).problem(),
            Self::Refresh(RefreshError::CoolingDown) => {
                let mut p = Problem::new(S::BAD_GATEWAY, "token_endpoint_unavailable", "Token endpoint unavailable",
                    "refreshing this connection's access token failed moments ago; retry shortly", T::DestinationUnavailable);
                p.retry_after_secs = Some(crate::creds::REFRESH_COOLDOWN.as_secs());
                p
            }
            Self::Refresh(RefreshError::Token(TokenError::Unavailable(_))) => Problem::new(S::BAD_GATEWAY, "token_endpoint_unavailable",
                "Token endpoint unavailable", "the OAuth2 token endpoint could not refresh the access token; retry later", T::DestinationUnavailable),
            Self::Refresh(RefreshError::Token(TokenError::Rejected(_))) => Problem::new(S::BAD_GATEWAY, "token_endpoint_rejected",
                "Token endpoint rejected the refresh", "the OAuth2 token endpoint refused the refresh; check the integration's client settings", T::ProxyConfigurationError),
            Self::Refresh(RefreshError::Store(_)) => Self::Resolve(ResolveError::Store(crate::store::StoreError::Unavailable(String::new()))).problem(),
            Self::Refresh(RefreshError::Crypto(_)) => Problem::new(S::INTERNAL_SERVER_ERROR, "connection_unusable", "Connection unusable",
                "the connection's refreshed credential could not be sealed; see the proxy log", T::ProxyInternalError),
            Self::HostNotAllowed { integration, host, port } => Problem::new(S::FORBIDDEN, "host_not_allowed", "Host not allowed for this connection",
                format!("integration {integration:?} does not allow {host}:{port}; the credential was not sent"), T::HttpRequestDenied),
            Self::Inject(InjectError::InvalidValue(_)) | Self::Inject(InjectError::BadUri) => Problem::new(S::INTERNAL_SERVER_ERROR,
                "credential_not_injectable", "Credential cannot be injected", self.to_string(), T::ProxyConfigurationError),
            Self::Inject(e) => Problem::new(S::BAD_REQUEST, "request_body_not_injectable", "Request body cannot carry the credential", e.to_string(), T::HttpRequestError),
            Self::BodyTooLarge { limit } => Problem::new(S::PAYLOAD_TOO_LARGE, "request_body_too_large", "Request body too large",
                format!("this connection injects into the request body, which is buffered up to {limit} bytes (proxy.max_buffered_body)"), T::HttpRequestError),
            Self::BodyRead => Problem::new(S::BAD_REQUEST, "request_body_error", "Request body error", "reading the request body failed", T::HttpRequestError),
            Self::Connect(ConnectError::Prohibited { host, why, .. }) => Problem::new(S::FORBIDDEN, "destination_ip_prohibited", "Destination prohibited",
                format!("{host} resolves to a {why} address; allow it with egress.allow_cidrs if intended"), T::DestinationIpProhibited),
            Self::Connect(ConnectError::Dns { host, .. } | ConnectError::NoAddresses { host }) => Problem::new(S::BAD_GATEWAY, "destination_not_found",
                "Destination not found", format!("cannot resolve {host}"), T::DestinationNotFound),
            Self::Connect(ConnectError::Timeout { host }) => Problem::new(S::GATEWAY_TIMEOUT, "upstream_connect_timeout", "Upstream connect timeout",
                format!("connecting to {host} timed out"), T::ConnectionTimeout),
            Self::Connect(e) => Problem::new(S::BAD_GATEWAY, "upstream_unreachable", "Upstream unreachable", e.to_string(), T::ConnectionRefused),
            Self::UpstreamTls(_) => Problem::new(S::BAD_GATEWAY, "upstream_tls_error", "Upstream TLS error",
                "the upstream's TLS handshake or certificate verification failed", T::TlsCertificateError),
            Self::UpstreamTimeout => Problem::new(S::GATEWAY_TIMEOUT, "upstream_timeout", "Upstream timeout",
                "the upstream did not send a response head in time (upstream.response_header_timeout_ms)", T::HttpResponseTimeout),
            Self::Upstream(_) => Problem::new(S::BAD_GATEWAY, "upstream_error", "Upstream error",
                "the upstream connection failed or sent an invalid response", T::HttpProtocolError),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(
            target_of(&"ftp://a/".parse().unwrap()),
            Err(ProxyError::UnsupportedScheme)
        ));
        assert_eq!(
            target_of(&"http://a.test/x".parse().unwrap()).unwrap(),
            (Scheme::Http, "a.test".into(), 80)
        );
        assert_eq!(
            target_of(&"https://a.test:8443/".parse().unwrap()).unwrap(),
            (Scheme::Https, "a.test".into(), 8443)
        );
        let u = rebuild_uri(&"http://a.test/p?q=1".parse().unwrap(), Scheme::Https, "a.test", 443).unwrap();
        assert_eq!(u.to_string(), "https://a.test/p?q=1");
        assert_eq!(host_header(&"http://a.test:80/".parse().unwrap()).unwrap(), "a.test");
        assert_eq!(
            host_header(&"http://127.0.0.1:8000/".parse().unwrap()).unwrap(),
            "127.0.0.1:8000"
        );
    }

    #[test]
    fn every_problem_has_a_code_and_no_debug_leak() {
        let e = ProxyError::HostNotAllowed {
            integration: "gh".into(),
            host: "evil.test".into(),
            port: 443,
        };
        let p = e.problem();
        assert_eq!((p.status.as_u16(), p.code), (403, "host_not_allowed"));
        let r = p.to_proxy_response();
        assert!(r.headers()["proxy-status"]
            .to_str()
            .unwrap()
            .starts_with("credproxy; error=http_request_denied"));
    }
}
