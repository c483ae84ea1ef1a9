//! The credentialed request, shared by the proxy pipeline and the admin
//! API's connection test: fresh token → inject → forward through the pooled
//! upstream client → for OAuth2, refresh and retry once on a 401 when the
//! body can be replayed. Also the error type of a proxied request and its
//! one mapping to problem responses.
//!
//! Uses `creds`, `inject`, `upstream`; must not import `proxy` or `admin`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::uri::Scheme as UriScheme;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};

use crate::creds::{Connections, RefreshError, ResolveError, Resolved};
use crate::inject::{self, InjectError};
use crate::oauth2::TokenError;
use crate::problem::{Problem, ProxyErrorType};
use crate::store::ConnectionState;
use crate::upstream::pool::{Pool, PooledBody, UpstreamError};
use crate::upstream::{self, CallerBody, ConnectError, UpstreamBody};

/// The upstream side of a proxied request.
pub struct Outbound {
    pub connections: Arc<Connections>,
    pub pool: Arc<Pool>,
    pub response_header_timeout: Duration,
    /// Largest body buffered for body placements of the `custom` auth method.
    pub max_buffered_body: u64,
    /// Longest a buffered body may take to arrive in full.
    pub buffered_body_timeout: Duration,
    /// Bytes buffered by all requests together.
    pub buffer_budget: Arc<BufferBudget>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The process-wide budget of buffered request-body bytes
/// (`proxy.max_buffered_total`): without it, `max_connections` callers each
/// sending most of a `max_buffered_body` body hold gigabytes.
#[derive(Debug)]
pub struct BufferBudget {
    used: std::sync::atomic::AtomicU64,
    max: u64,
}

impl BufferBudget {
    pub fn new(max: u64) -> Self {
        Self { used: std::sync::atomic::AtomicU64::new(0), max }
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.used.fetch_update(Relaxed, Relaxed, |u| u.checked_add(n).filter(|t| *t <= self.max)).is_ok()
    }

    /// A hold on `n` bytes, or `None` when they do not fit.
    pub fn reserve(self: &Arc<Self>, n: u64) -> Option<Reservation> {
        self.take(n).then(|| Reservation { budget: self.clone(), held: n })
    }
}

/// Bytes held in a [`BufferBudget`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BufferBudget>,
    held: u64,
}

impl Reservation {
    /// Holds `n` bytes in all (no change if it already does); false if they do not fit.
    fn grow_to(&mut self, n: u64) -> bool {
        if n <= self.held {
            return true;
        }
        if !self.budget.take(n - self.held) {
            return false;
        }
        self.held = n;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Outbound {
    /// Forwards through the pool; its connector applies the SSRF guard.
    /// `upstream.response_header_timeout_ms` bounds everything up to the
    /// response head, connecting included.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<PooledBody>, ProxyError> {
        let sent = std::time::Instant::now();
        let deadline = sent + self.response_header_timeout;
        let resp = self.pool.send(req, sent, deadline).await.map_err(ProxyError::from_upstream)?;
        self.metrics.upstream_latency(sent.elapsed());
        Ok(resp)
    }

    /// Sends a request with a resolved connection's credential. The host
    /// check has passed. `headers` are the caller's, already stripped of
    /// hop-by-hop and control headers. Returns the response and whether it
    /// was retried after a refresh. Buffered and OAuth2 requests come back
    /// with what was injected scrubbed from the response's URL fields; the
    /// caller runs [`scrub_echoes`] with `resolved` for the rest (again,
    /// harmlessly, for those).
    pub async fn with_connection(
        &self,
        resolved: &Arc<Resolved>,
        method: &Method,
        uri: Uri,
        headers: HeaderMap,
        body: UpstreamBody,
    ) -> Result<(Response<PooledBody>, bool), ProxyError> {
        if resolved.method.edits_body() || resolved.method.oauth2().is_some() {
            // Boxed: buffering, refreshing and retrying make a large future
            // that static credentials in headers never need.
            return Box::pin(self.with_connection_buffered(resolved, method, uri, headers, body)).await;
        }
        // The caller scrubs echoes of the credential ([`scrub_echoes`]):
        // this future stays small enough to be inlined into the pipeline's.
        let resp = self.send(upstream_request(method, uri, headers, Some(resolved), body)?).await?;
        Ok((resp, false))
    }

    /// Body placements and OAuth2: the body is buffered (to rewrite it, or
    /// to replay it after a 401), the token refreshed when about to expire.
    async fn with_connection_buffered(
        &self,
        resolved: &Arc<Resolved>,
        method: &Method,
        uri: Uri,
        mut headers: HeaderMap,
        body: UpstreamBody,
    ) -> Result<(Response<PooledBody>, bool), ProxyError> {
        // Fresh token: an OAuth2 access token about to expire is refreshed
        // once, however many requests are waiting for it.
        let resolved = self.connections.ensure_fresh(resolved.clone()).await?;

        // Body placements need the body in hand; OAuth2 requests keep a small
        // body so a 401 can be retried once after a refresh. Buffered bytes
        // count against the process budget until the request is done.
        let _held: Option<Reservation>;
        let (body, replay) = if resolved.method.edits_body() {
            let edits = inject::edits(&resolved.method, &resolved.credential)?;
            let Either::Left(incoming) = body else {
                return Err(ProxyError::Malformed("a buffered body cannot be rewritten"));
            };
            // A body is made up for methods that carry one (an empty POST
            // gets `{}` with the field); never for GET, HEAD, DELETE, OPTIONS.
            if !method_takes_body(method) && http_body::Body::is_end_stream(&incoming) {
                return Err(ProxyError::NoBodyToInject { method: method.clone() });
            }
            let (buffered, held) = self.buffer(incoming, self.max_buffered_body).await?;
            _held = Some(held);
            let (new_body, ctype) = inject::apply_body(&headers, &buffered, &edits)?;
            if let Some(ct) = ctype {
                headers.insert(header::CONTENT_TYPE, ct);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(new_body.len()));
            (Either::Right(Full::new(Bytes::from(new_body.to_vec()))), None)
        } else {
            let (body, replay, held) = self.replayable(body).await?;
            _held = held;
            (body, replay)
        };

        // Inject and forward. The head is kept for a retry only when one is possible.
        let retry = replay.map(|body| (body, headers.clone()));
        let mut resp = self.send(upstream_request(method, uri.clone(), headers, Some(&resolved), body)?).await?;

        // An OAuth2 401 with a replayable body: refresh only if the token that
        // failed is still current, then retry once.
        match retry {
            Some((replay, headers)) if resp.status() == StatusCode::UNAUTHORIZED => {
                let failed = resolved.credential.values().first().map(|v| v.expose().to_owned()).unwrap_or_default();
                drop(resp);
                let refreshed = self.connections.force_refresh(&resolved, &failed).await?;
                let retry = upstream_request(method, uri, headers, Some(&refreshed), Either::Right(Full::new(replay)))?;
                let mut resp = self.send(retry).await?;
                scrub_echoes(&mut resp, &refreshed);
                Ok((resp, true))
            }
            _ => {
                // With the token actually used (`ensure_fresh` may have refreshed it).
                scrub_echoes(&mut resp, &resolved);
                Ok((resp, false))
            }
        }
    }
}

/// Response fields that name a URL: where an upstream may echo what was
/// injected (a redirect that keeps the request's query).
const URL_FIELDS: [header::HeaderName; 4] =
    [header::LOCATION, header::CONTENT_LOCATION, header::LINK, header::HeaderName::from_static("refresh")];

/// Takes what `resolved` injected back out of the response's URL fields;
/// a client that follows the URL through credproxy gets it injected again.
/// Bodies are not scrubbed. Costs two checks when no such field is present
/// (an HTTP/1.1 response's header map is empty: its fields are raw).
#[inline]
pub fn scrub_echoes(resp: &mut Response<PooledBody>, resolved: &Resolved) {
    if resp.body().has_url_refs() || !resp.headers().is_empty() {
        scrub_echoes_in(resp, resolved);
    }
}

#[cold]
#[inline(never)]
fn scrub_echoes_in(resp: &mut Response<PooledBody>, resolved: &Resolved) {
    let raw = resp.body().has_url_refs();
    let mapped = URL_FIELDS.iter().any(|n| resp.headers().contains_key(n));
    if !raw && !mapped {
        return;
    }
    let secrets = inject::injected_values(&resolved.method, &resolved.credential);
    if let Some(fields) = resp.body_mut().fields_mut() {
        fields.rewrite_url_refs(|v| inject::scrub_url_field(v, &secrets));
    }
    if mapped {
        let headers = resp.headers_mut();
        for name in URL_FIELDS {
            let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
            if !values.iter().any(|v| inject::scrub_url_field(v.as_bytes(), &secrets).is_some()) {
                continue;
            }
            headers.remove(&name);
            for v in values {
                match inject::scrub_url_field(v.as_bytes(), &secrets) {
                    None => {
                        headers.append(name.clone(), v);
                    }
                    Some(new) if new.is_empty() => {}
                    Some(new) => {
                        if let Ok(v) = HeaderValue::from_bytes(&new) {
                            headers.append(name.clone(), v);
                        }
                    }
                }
            }
        }
    }
}

/// Builds the upstream request from the caller's (stripped) head: injects
/// the credential, sets `Host` to the target authority, and picks the
/// version ourselves.
pub fn upstream_request(
    method: &Method,
    mut uri: Uri,
    mut headers: HeaderMap,
    resolved: Option<&Resolved>,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, ProxyError> {
    if let Some(r) = resolved {
        let mut edits = inject::edits(&r.method, &r.credential)?;
        inject::apply_head(&mut uri, &mut headers, &mut edits)?;
    }
    headers.insert(header::HOST, host_header(&uri)?);
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Methods whose requests normally carry a body (RFC 9110 §9.3): a body
/// placement may give an empty one its content. GET, HEAD, DELETE and
/// OPTIONS get none made up.
fn method_takes_body(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE)
}

/// Largest body kept for replaying an OAuth2 request after a 401.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

impl Outbound {
    /// A body of known length up to [`MAX_REPLAY_BODY`] is read so it can be
    /// sent twice; anything else streams and is never retried.
    async fn replayable(
        &self,
        body: UpstreamBody,
    ) -> Result<(UpstreamBody, Option<Bytes>, Option<Reservation>), ProxyError> {
        match body {
            Either::Left(incoming) => match http_body::Body::size_hint(&incoming).exact() {
                Some(n) if n <= MAX_REPLAY_BODY => {
                    let (bytes, held) = self.buffer(incoming, MAX_REPLAY_BODY).await?;
                    Ok((Either::Right(Full::new(bytes.clone())), Some(bytes), Some(held)))
                }
                _ => Ok((Either::Left(incoming), None, None)),
            },
            Either::Right(full) => {
                let bytes = full.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                Ok((Either::Right(Full::new(bytes.clone())), Some(bytes), None))
            }
        }
    }

    /// Reads a whole body of at most `limit` bytes, within
    /// `proxy.buffered_body_timeout_ms`, holding its bytes in the budget:
    /// a declared length up front (over the budget: refused unread), a
    /// chunked body as it arrives.
    async fn buffer(&self, body: CallerBody, limit: u64) -> Result<(Bytes, Reservation), ProxyError> {
        let declared = http_body::Body::size_hint(&body).lower();
        if declared > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let mut held = self.buffer_budget.reserve(declared).ok_or(ProxyError::BufferBudgetExhausted)?;
        let read = async {
            let mut body = std::pin::pin!(body);
            let mut buf = bytes::BytesMut::with_capacity(declared as usize);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(body_error)?;
                let Ok(data) = frame.into_data() else { continue };
                let len = (buf.len() + data.len()) as u64;
                if len > limit {
                    return Err(ProxyError::BodyTooLarge { limit });
                }
                if !held.grow_to(len) {
                    return Err(ProxyError::BufferBudgetExhausted);
                }
                buf.extend_from_slice(&data);
            }
            Ok(buf.freeze())
        };
        let bytes =
            tokio::time::timeout(self.buffered_body_timeout, read).await.map_err(|_| ProxyError::BodyTimeout)??;
        Ok((bytes, held))
    }
}

/// A caller's body failed: it stopped arriving (408), or it broke (400).
fn body_error(e: Box<dyn std::error::Error + Send + Sync>) -> ProxyError {
    match e.downcast_ref::<crate::h1::Error>() {
        Some(crate::h1::Error::BodyTimeout) => ProxyError::BodyTimeout,
        _ => ProxyError::BodyRead,
    }
}

pub fn host_header(uri: &Uri) -> Result<HeaderValue, ProxyError> {
    let auth = uri.authority().ok_or(ProxyError::OriginForm)?.as_str();
    // The target's authority, without the scheme's default port.
    let default = if uri.scheme() == Some(&UriScheme::HTTPS) { ":443" } else { ":80" };
    let value = auth.strip_suffix(default).unwrap_or(auth);
    HeaderValue::from_str(value).map_err(|_| ProxyError::Malformed("invalid host"))
}

/// Everything that can stop a request, tagged by the side at fault through
/// the status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("origin-form request to the proxy port")]
    OriginForm,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("unsupported URI scheme")]
    UnsupportedScheme,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("malformed X-Connection-Id")]
    BadConnectionId,
    #[error("more than one X-Connection-Id field")]
    DuplicateConnectionId,
    #[error("TRACE with a connection's credential")]
    TraceWithCredential,
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("more than {} request header fields", crate::h1::MAX_HEADERS)]
    TooManyHeaders,
    #[error("pass-through is disabled")]
    PassthroughDenied,
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    #[error("integration {integration} does not allow host {host}:{port}")]
    HostNotAllowed { integration: String, host: String, port: u16 },
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("reading the request body failed")]
    BodyRead,
    #[error("the request body stopped arriving (proxy.body_idle_timeout_ms / proxy.buffered_body_timeout_ms)")]
    BodyTimeout,
    #[error("buffered request bodies are at proxy.max_buffered_total")]
    BufferBudgetExhausted,
    #[error("a body placement, but the {method} request has no body")]
    NoBodyToInject { method: Method },
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
    fn from_upstream(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Connect(c) => Self::Connect(c),
            // The handshake is part of connecting: a stalled one is a connect timeout.
            UpstreamError::TlsTimeout { host } => Self::Connect(ConnectError::Timeout { host }),
            UpstreamError::Tls { .. } => Self::UpstreamTls(error_chain(&e)),
            UpstreamError::InvalidUri => Self::Malformed("invalid upstream URI"),
            UpstreamError::Timeout => Self::UpstreamTimeout,
            UpstreamError::Http(ref h) if upstream::is_tls_error(h) => Self::UpstreamTls(error_chain(&e)),
            // The caller's body failed while it was being sent (bad chunk framing, the caller went away).
            UpstreamError::H1(crate::h1::Error::Body(_)) => Self::BodyRead,
            UpstreamError::H1(crate::h1::Error::BodyTimeout) => Self::BodyTimeout,
            UpstreamError::H1(ref h) if upstream::is_tls_error(h) => Self::UpstreamTls(error_chain(&e)),
            UpstreamError::Http(_) | UpstreamError::H1(_) => Self::Upstream(error_chain(&e)),
        }
    }

    /// The caller-facing problem. Never includes a secret.
    pub fn problem(&self) -> Problem {
        use ProxyErrorType as T;
        use StatusCode as S;
        match self {
            Self::OriginForm => Problem::new(S::BAD_REQUEST, "not_a_proxy_request", "Not a proxy request",
                "credproxy is a forward proxy: send absolute-form requests, e.g. `curl -x http://127.0.0.1:8080 http://api.example.com/` or set http_proxy / HTTP_PROXY",
                T::HttpRequestError),
            Self::Internal(_) => Problem::new(
                S::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
                "credproxy failed to serve this request; see the proxy log",
                T::ProxyInternalError,
            ),
            Self::UnsupportedScheme => Problem::new(S::BAD_REQUEST, "unsupported_scheme", "Unsupported scheme",
                "only http:// and https:// targets can be proxied", T::HttpRequestError),
            Self::Malformed(what) => Problem::new(S::BAD_REQUEST, "malformed_request", "Malformed request", *what, T::HttpRequestError),
            Self::HeadTooLarge { limit } => Problem::new(S::REQUEST_HEADER_FIELDS_TOO_LARGE, "request_header_too_large",
                "Request header too large", format!("the request head exceeds proxy.max_header_bytes ({limit} bytes)"), T::HttpRequestError),
            Self::TooManyHeaders => Problem::new(S::REQUEST_HEADER_FIELDS_TOO_LARGE, "request_header_too_large",
                "Request header too large", format!("the request has more than {} header fields", crate::h1::MAX_HEADERS), T::HttpRequestError),
            Self::BadConnectionId => Problem::new(S::BAD_REQUEST, "invalid_connection_id", "Invalid X-Connection-Id",
                "X-Connection-Id must be a connection id: conn_ followed by 26 base32 characters", T::HttpRequestError),
            Self::DuplicateConnectionId => Problem::new(S::BAD_REQUEST, "invalid_connection_id", "Invalid X-Connection-Id",
                "X-Connection-Id appears more than once; send exactly one", T::HttpRequestError),
            Self::TraceWithCredential => Problem::new(S::FORBIDDEN, "trace_not_allowed", "TRACE with a credential",
                "TRACE echoes the request back, credential included (RFC 9110 §9.3.8): credproxy does not send it with a connection; send it without X-Connection-Id", T::HttpRequestDenied),
            Self::PassthroughDenied => Problem::new(S::FORBIDDEN, "passthrough_denied", "Pass-through denied",
                "requests without X-Connection-Id are not forwarded (egress.allow_passthrough = false)", T::HttpRequestDenied),
            Self::Resolve(ResolveError::NotFound) => Problem::new(S::NOT_FOUND, "connection_not_found", "Connection not found",
                "no connection with this id is visible to the caller", T::HttpRequestDenied),
            Self::Resolve(ResolveError::NotActive(ConnectionState::NeedsReauth)) => Problem::new(S::CONFLICT, "connection_needs_reauth",
                "Connection needs re-authorization", "the connection's authorization is no longer valid; a user must re-authorize it", T::HttpRequestDenied),
            Self::Resolve(ResolveError::NotActive(_)) => Problem::new(S::CONFLICT, "connection_revoked", "Connection revoked",
                "the connection has been revoked", T::HttpRequestDenied),
            Self::Resolve(ResolveError::Crypto { source: crate::crypto::CryptoError::KeyService(_), .. }) => Problem::new(
                S::SERVICE_UNAVAILABLE,
                "key_service_unavailable",
                "Key service unavailable",
                "the key service (KMS) that unwraps this connection's credential cannot be reached; retry later",
                T::ProxyInternalError,
            ),
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
            Self::Refresh(RefreshError::Token(TokenError::Unavailable(_))) => {
                // The cool-down starts with this failure: say when to come back, as later answers do.
                let mut p = Problem::new(S::BAD_GATEWAY, "token_endpoint_unavailable", "Token endpoint unavailable",
                    "the OAuth2 token endpoint could not refresh the access token; retry later", T::DestinationUnavailable);
                p.retry_after_secs = Some(crate::creds::REFRESH_COOLDOWN.as_secs());
                p
            }
            Self::Refresh(RefreshError::Fetch(TokenError::Unavailable(_))) => {
                let mut p = Problem::new(S::BAD_GATEWAY, "token_endpoint_unavailable", "Token endpoint unavailable",
                    "the OAuth2 token endpoint did not issue an access token (client credentials); retry later", T::DestinationUnavailable);
                p.retry_after_secs = Some(crate::creds::REFRESH_COOLDOWN.as_secs());
                p
            }
            Self::Refresh(RefreshError::Token(TokenError::Rejected(_))) => Problem::new(S::BAD_GATEWAY, "token_endpoint_rejected",
                "Token endpoint rejected the refresh", "the OAuth2 token endpoint refused the refresh or answered without an access token; check the integration's client settings", T::ProxyConfigurationError),
            Self::Refresh(RefreshError::Fetch(TokenError::Rejected(_) | TokenError::InvalidGrant)) => Problem::new(S::BAD_GATEWAY, "token_endpoint_rejected",
                "Token endpoint rejected the client credentials", "the OAuth2 token endpoint refused to issue a token for the integration's client credentials, or answered without an access token; check its client_id and client_secret", T::ProxyConfigurationError),
            Self::Refresh(RefreshError::Store(crate::store::StoreError::LockTimeout(_))) => Problem::new(
                S::SERVICE_UNAVAILABLE,
                "refresh_lock_timeout",
                "Refresh in progress elsewhere",
                "another credproxy instance is refreshing this connection's token and did not finish in time (oauth2.refresh_lock_wait_ms); retry",
                T::ProxyInternalError,
            ),
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
            Self::BodyTimeout => Problem::new(S::REQUEST_TIMEOUT, "request_body_timeout", "Request body timeout",
                "the request body stopped arriving (proxy.body_idle_timeout_ms) or took too long in all (proxy.buffered_body_timeout_ms)", T::HttpRequestError),
            Self::NoBodyToInject { method } => Problem::new(S::BAD_REQUEST, "request_body_required", "Request body required",
                format!("this connection's credential goes into the request body, and credproxy does not make up a body for {method}; send the body, or use a method that carries one"), T::HttpRequestError),
            Self::BufferBudgetExhausted => {
                let mut p = Problem::new(S::SERVICE_UNAVAILABLE, "buffer_budget_exhausted", "Too many buffered bodies",
                    "this connection's credential goes into the request body, which is buffered, and buffered bodies are at proxy.max_buffered_total; retry shortly", T::ProxyInternalError);
                p.retry_after_secs = Some(1);
                p
            }
            Self::Connect(ConnectError::Prohibited { host, why, .. }) => Problem::new(S::FORBIDDEN, "destination_ip_prohibited", "Destination prohibited",
                format!("{host} resolves to a {why} address; allow it with egress.allow_cidrs if intended"), T::DestinationIpProhibited),
            Self::Connect(ConnectError::Dns { host, .. } | ConnectError::NoAddresses { host }) => Problem::new(S::BAD_GATEWAY, "destination_not_found",
                "Destination not found", format!("cannot resolve {host}"), T::DestinationNotFound),
            Self::Connect(ConnectError::Timeout { host }) => Problem::new(S::GATEWAY_TIMEOUT, "upstream_connect_timeout", "Upstream connect timeout",
                format!("connecting to {host} timed out"), T::ConnectionTimeout),
            Self::Connect(e) => Problem::new(S::BAD_GATEWAY, "upstream_unreachable", "Upstream unreachable", e.to_string(), T::ConnectionRefused),
            Self::UpstreamTls(why) if why.contains("UnknownIssuer") => Problem::new(S::BAD_GATEWAY, "upstream_tls_error", "Upstream TLS error",
                "the upstream's certificate is signed by a CA credproxy does not trust; if it is yours (a private or test CA), add its PEM file to upstream.extra_ca_certs", T::TlsCertificateError),
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
