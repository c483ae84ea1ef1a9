//! The credentialed request, shared by the proxy pipeline and the admin
//! API's connection test: fresh token → inject → forward through the pooled
//! upstream client → for OAuth2, refresh and retry once on a 401 when the
//! body can be replayed. Also the error type of a proxied request and its
//! one mapping to problem responses.
//!
//! Uses `creds`, `inject`, `upstream`; must not import `proxy` or `admin`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::request::Parts as RequestParts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};

use crate::creds::{Connections, RefreshError, ResolveError, Resolved};
use crate::inject::{self, InjectError};
use crate::oauth2::TokenError;
use crate::problem::{Code, Problem};
use crate::store::ConnectionState;
use crate::upstream::pool::{Pool, PooledBody, Route, UpstreamError};
use crate::upstream::{self, CallerBody, ConnectError, UpstreamBody};

/// The upstream side of a proxied request.
#[derive(Clone)]
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
    /// The same pipeline over another upstream pool (one per thread under
    /// `runtime.thread_per_core`); the buffer budget and metrics stay shared.
    pub fn with_pool(&self, pool: Arc<Pool>) -> Self {
        Self { pool, ..self.clone() }
    }

    /// Forwards through the pool; its connector applies the SSRF guard.
    /// `upstream.response_header_timeout_ms` bounds everything up to the
    /// response head, connecting included.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<PooledBody>, ProxyError> {
        self.send_with(req, &[], std::time::Instant::now(), &mut Route::default()).await
    }

    /// [`Outbound::send`] with `extra` set over the request's header fields
    /// (replacing any of the same name): a credential's header edits, kept
    /// per caller connection ([`InjectMemo`]) instead of inserted into each
    /// request's map. `sent`: now, or the time the pipeline read when it
    /// began if it has not waited since (one clock read less).
    /// `route`: the caller connection's ([`InjectMemo::fields_and_route`]).
    pub(crate) async fn send_with(
        &self,
        req: Request<UpstreamBody>,
        extra: &[(HeaderName, HeaderValue)],
        sent: std::time::Instant,
        route: &mut Route,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let deadline = sent + self.response_header_timeout;
        let resp = self.pool.send(req, extra, sent, deadline, route).await.map_err(ProxyError::from_upstream)?;
        self.metrics.upstream_latency(sent.elapsed());
        Ok(resp)
    }

    /// Sends a request with a resolved connection's credential. The host
    /// check has passed. `headers` are the caller's, already stripped of
    /// hop-by-hop and control headers. Returns the response and whether the
    /// token was refreshed, and the request retried after a refresh. Buffered and OAuth2 requests come back
    /// with what was injected scrubbed from the response's URL fields; the
    /// caller runs [`scrub_echoes`] with `resolved` for the rest (again,
    /// harmlessly, for those). `memo`: the caller connection's
    /// [`InjectMemo`] (a fresh one where there is no such connection).
    /// `now`: the time, as of a moment ago (the pipeline's start, when
    /// nothing it did since waited: what the upstream latency counts from).
    pub async fn with_connection(
        &self,
        resolved: &Arc<Resolved>,
        head: RequestParts,
        body: UpstreamBody,
        memo: &mut InjectMemo,
        now: std::time::Instant,
    ) -> Result<(Response<PooledBody>, Renewal), ProxyError> {
        if buffers(resolved) {
            // Boxed: buffering, refreshing and retrying make a large future
            // that static credentials in headers never need.
            let RequestParts { method, uri, headers, .. } = head;
            return Box::pin(self.with_connection_buffered(resolved, &method, uri, headers, body)).await;
        }
        // The caller scrubs echoes of the credential ([`scrub_echoes`]):
        // this future stays small enough to be inlined into the pipeline's.
        let req = memo.upstream_request(head, resolved, body)?;
        let (fields, route) = memo.fields_and_route();
        let resp = self.send_with(req, fields, now, route).await?;
        Ok((resp, Renewal::default()))
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
    ) -> Result<(Response<PooledBody>, Renewal), ProxyError> {
        // Fresh token: an OAuth2 access token about to expire is refreshed
        // once, however many requests are waiting for it.
        let fresh = self.connections.ensure_fresh(resolved.clone()).await?;
        let refreshed = !Arc::ptr_eq(&fresh, resolved);
        let resolved = fresh;

        // Body placements need the body in hand; OAuth2 requests keep a small
        // body so a 401 can be retried once after a refresh. Buffered bytes
        // count against the process budget until the request is done.
        let _held: Option<Reservation>;
        let (body, replay) = if resolved.method.edits_body() {
            let edits = inject::edits(&resolved.method, &resolved.credential)?;
            let UpstreamBody::Caller(incoming) = body else {
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
            (UpstreamBody::Buffered(Full::new(Bytes::from(new_body.to_vec()))), None)
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
                let retry = upstream_request(
                    method,
                    uri,
                    headers,
                    Some(&refreshed),
                    UpstreamBody::Buffered(Full::new(replay)),
                )?;
                let mut resp = self.send(retry).await?;
                scrub_echoes(&mut resp, &refreshed);
                Ok((resp, Renewal { refreshed: true, retried: true }))
            }
            _ => {
                // With the token actually used (`ensure_fresh` may have refreshed it).
                scrub_echoes(&mut resp, &resolved);
                Ok((resp, Renewal { refreshed, retried: false }))
            }
        }
    }
}

/// A response body with a connection's injected values masked
/// (`scrub_response_bodies`): [`inject::StreamScrubber`] over the
/// upstream's frames. Same length, so the framing holds.
pub struct ScrubbedBody {
    inner: PooledBody,
    scrubber: Box<inject::StreamScrubber>,
    /// Trailers that came while bytes were held back: they follow them.
    trailers: Option<HeaderMap>,
    /// The held-back tail was given out: the body is over.
    done: bool,
}

impl ScrubbedBody {
    /// `resp`'s body, scrubbed of what `resolved` injects; `Err` when the
    /// response is encoded (asked for `identity`, got something else).
    /// `Ok(None)`: nothing long enough to look for.
    pub fn wrap(resp: &mut Response<PooledBody>, resolved: &Resolved) -> Result<Option<Self>, ProxyError> {
        let coded = response_field(resp, "content-encoding");
        if coded.is_some_and(|c| !c.trim_ascii().eq_ignore_ascii_case(b"identity")) {
            return Err(ProxyError::NotScrubbable);
        }
        let secrets = inject::injected_values(&resolved.method, &resolved.credential);
        let Some(scrubber) = inject::StreamScrubber::new(&secrets) else { return Ok(None) };
        let inner = std::mem::replace(resp.body_mut(), PooledBody::empty());
        Ok(Some(Self { inner, scrubber: Box::new(scrubber), trailers: None, done: false }))
    }

    /// The upstream's unparsed header fields (HTTP/1.1), as [`PooledBody::take_fields`].
    pub fn take_fields(&mut self) -> Option<crate::h1::RawFields> {
        self.inner.take_fields()
    }
}

impl http_body::Body for ScrubbedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if let Some(t) = this.trailers.take() {
                this.done = true;
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.scrubber.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(http_body::Frame::data(out))));
                        }
                    }
                    // Trailers: what was held back goes first.
                    Err(frame) => {
                        let tail = this.scrubber.finish();
                        if tail.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        this.trailers = frame.into_trailers().ok();
                        return Poll::Ready(Some(Ok(http_body::Frame::data(tail))));
                    }
                },
                Poll::Ready(None) => {
                    this.done = true;
                    let tail = this.scrubber.finish();
                    return Poll::Ready(if tail.is_empty() { None } else { Some(Ok(http_body::Frame::data(tail))) });
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none() && (self.done || (self.inner.is_end_stream() && self.scrubber.held() == 0))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // Masks keep the length: what is to come is the inner body's rest
        // plus what is held back.
        let held = self.scrubber.held() as u64;
        let inner = self.inner.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

impl std::fmt::Debug for ScrubbedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrubbedBody").field("scrubber", &self.scrubber).finish_non_exhaustive()
    }
}

/// A response header field, from the header map or (an HTTP/1.1
/// upstream's) the unparsed fields.
pub fn response_field(resp: &Response<PooledBody>, name: &str) -> Option<Bytes> {
    match resp.headers().get(name) {
        Some(v) => Some(Bytes::copy_from_slice(v.as_bytes())),
        None => resp.body().fields().and_then(|f| f.get(name)),
    }
}

/// What keeping a request's OAuth2 token valid took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Renewal {
    /// The token was refreshed first (by this request, or by another it
    /// waited for).
    pub refreshed: bool,
    /// The request was retried once after an upstream 401 and a refresh.
    pub retried: bool,
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
/// the credential and picks the version ourselves (`Host` is the target's
/// authority, written by the upstream side: [`crate::h1::host_of`]).
pub fn upstream_request(
    method: &Method,
    uri: Uri,
    headers: HeaderMap,
    resolved: Option<&Resolved>,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, ProxyError> {
    let mut head = request_head(method.clone(), uri, headers);
    if let Some(r) = resolved {
        let mut edits = inject::edits(&r.method, &r.credential)?;
        inject::apply_head(&mut head.uri, &mut head.headers, &mut edits)?;
    }
    upstream_head(head, body)
}

/// A request head of these parts (the rest default).
fn request_head(method: Method, uri: Uri, headers: HeaderMap) -> RequestParts {
    let (mut head, ()) = Request::new(()).into_parts();
    (head.method, head.uri, head.headers) = (method, uri, headers);
    head
}

/// The upstream request, the version ours. Its target is absolute: `Host`
/// is its authority, which the upstream side writes (a caller's `Host`
/// never gets into the map: the codec leaves it out, an h2 request's is
/// taken out with the proxy's own fields). `head` is the caller's, reused
/// (a new one's default map and target would be made and dropped);
/// nothing of its extensions goes on.
fn upstream_head(mut head: RequestParts, body: UpstreamBody) -> Result<Request<UpstreamBody>, ProxyError> {
    if head.uri.authority().is_none() {
        return Err(ProxyError::OriginForm);
    }
    head.version = Version::HTTP_11;
    head.extensions.clear();
    Ok(Request::from_parts(head, body))
}

/// The credential's header edits for the connection a keep-alive caller
/// used last (the exact [`Resolved`] the cache gave, held, so a refreshed
/// token or a changed connection is a different one): built and checked
/// once, then cloned into each request. Building them per request (a
/// header value made from the secret and checked, a vector, then dropped)
/// was about 600 of a request's instructions (callgrind, load bench).
/// Query, cookie and body placements are built per request as before.
#[derive(Default)]
pub struct InjectMemo {
    of: Option<Arc<Resolved>>,
    edits: inject::HeaderEdits,
    /// This caller connection's way through the upstream pool.
    route: Route,
}

/// Whether [`Outbound::with_connection`] buffers the request body (a body
/// placement rewrites it; an OAuth2 request may be replayed after a 401).
/// Otherwise the request is [`InjectMemo::upstream_request`] sent with
/// [`InjectMemo::fields`] ([`Outbound::send_with`]).
pub fn buffers(resolved: &Resolved) -> bool {
    resolved.method.edits_body() || resolved.method.oauth2().is_some()
}

impl InjectMemo {
    /// The header fields set over the request's own (replacing any of the
    /// same name) by the last [`InjectMemo::upstream_request`], and this
    /// caller connection's [`Route`] through the upstream pool.
    pub(crate) fn fields_and_route(&mut self) -> (&[(HeaderName, HeaderValue)], &mut Route) {
        (self.edits.fields(), &mut self.route)
    }

    /// [`upstream_request`] with `resolved`'s credential, its header edits
    /// kept for the next request on the same connection.
    pub(crate) fn upstream_request(
        &mut self,
        mut head: RequestParts,
        resolved: &Arc<Resolved>,
        body: UpstreamBody,
    ) -> Result<Request<UpstreamBody>, ProxyError> {
        if !self.of.as_ref().is_some_and(|of| Arc::ptr_eq(of, resolved)) {
            self.of = None;
            let mut edits = inject::edits(&resolved.method, &resolved.credential)?;
            match edits.take_header_only() {
                Some(header_edits) => {
                    self.edits = header_edits;
                    self.of = Some(resolved.clone());
                }
                None => {
                    self.edits = inject::HeaderEdits::default();
                    inject::apply_head(&mut head.uri, &mut head.headers, &mut edits)?;
                    return upstream_head(head, body);
                }
            }
        }
        // The header edits themselves go with the request, not into its
        // map ([`Outbound::send_with`]): only lookalikes come out here.
        self.edits.clear_lookalikes(&mut head.headers);
        upstream_head(head, body)
    }
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
            UpstreamBody::Caller(incoming) => match http_body::Body::size_hint(&incoming).exact() {
                Some(n) if n <= MAX_REPLAY_BODY => {
                    let (bytes, held) = self.buffer(incoming, MAX_REPLAY_BODY).await?;
                    Ok((UpstreamBody::Buffered(Full::new(bytes.clone())), Some(bytes), Some(held)))
                }
                _ => Ok((UpstreamBody::Caller(incoming), None, None)),
            },
            UpstreamBody::Buffered(full) => {
                let bytes = full.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                Ok((UpstreamBody::Buffered(Full::new(bytes.clone())), Some(bytes), None))
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
    #[error("no run token")]
    RunTokenMissing,
    #[error("invalid run token")]
    RunTokenInvalid(&'static str),
    #[error("expired run token")]
    RunTokenExpired,
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    #[error("integration {integration} does not allow host {host}:{port}")]
    HostNotAllowed { integration: String, host: String, port: u16 },
    #[error("{}", .0.description)]
    Quota(Box<crate::quota::Refusal>),
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
    #[error("the upstream's response is encoded and cannot be scrubbed")]
    NotScrubbable,
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
        let mut p = Problem::new(self.code(), self.detail());
        p.retry_after_secs = self.retry_after_secs();
        if let Self::Quota(r) = self {
            p.limit = Some(r.limit.clone());
        }
        p
    }

    /// The stable code (status, title and Proxy-Status type come with it).
    pub fn code(&self) -> Code {
        use crate::crypto::CryptoError;
        use crate::store::StoreError;
        match self {
            Self::OriginForm => Code::NotAProxyRequest,
            Self::Internal(_) => Code::InternalError,
            Self::UnsupportedScheme => Code::UnsupportedScheme,
            Self::Malformed(_) => Code::MalformedRequest,
            Self::HeadTooLarge { .. } | Self::TooManyHeaders => Code::RequestHeaderTooLarge,
            Self::BadConnectionId | Self::DuplicateConnectionId => Code::InvalidConnectionId,
            Self::TraceWithCredential => Code::TraceNotAllowed,
            Self::PassthroughDenied => Code::PassthroughDenied,
            Self::RunTokenMissing => Code::RunTokenMissing,
            Self::RunTokenInvalid(_) => Code::RunTokenInvalid,
            Self::RunTokenExpired => Code::RunTokenExpired,
            Self::Resolve(e) | Self::Refresh(RefreshError::Resolve(e)) => match e {
                ResolveError::NotFound => Code::ConnectionNotFound,
                ResolveError::NotActive(ConnectionState::NeedsReauth) => Code::ConnectionNeedsReauth,
                ResolveError::NotActive(_) => Code::ConnectionRevoked,
                ResolveError::Crypto { source: CryptoError::KeyService(_), .. } => Code::KeyServiceUnavailable,
                ResolveError::Removed { .. } => Code::AuthMethodRemoved,
                ResolveError::Misconfigured { .. } | ResolveError::Crypto { .. } => Code::ConnectionUnusable,
                ResolveError::Store(_) => Code::StoreUnavailable,
            },
            Self::Refresh(RefreshError::NeedsReauth | RefreshError::Token(TokenError::InvalidGrant)) => {
                Code::ConnectionNeedsReauth
            }
            Self::Refresh(
                RefreshError::CoolingDown
                | RefreshError::Token(TokenError::Unavailable(_))
                | RefreshError::Fetch(TokenError::Unavailable(_)),
            ) => Code::TokenEndpointUnavailable,
            Self::Refresh(
                RefreshError::Token(TokenError::Rejected(_))
                | RefreshError::Fetch(TokenError::Rejected(_) | TokenError::InvalidGrant),
            ) => Code::TokenEndpointRejected,
            Self::Refresh(RefreshError::Store(StoreError::LockTimeout(_))) => Code::RefreshLockTimeout,
            Self::Refresh(RefreshError::Store(_)) => Code::StoreUnavailable,
            Self::Refresh(RefreshError::Crypto(_)) => Code::ConnectionUnusable,
            Self::HostNotAllowed { .. } => Code::HostNotAllowed,
            Self::Quota(r) => match r.kind {
                crate::quota::Refused::Rate => Code::RateLimited,
                crate::quota::Refused::InFlight => Code::InFlightLimit,
                crate::quota::Refused::Cooldown => Code::UpstreamCoolingDown,
            },
            Self::Inject(InjectError::InvalidValue(_) | InjectError::BadUri) => Code::CredentialNotInjectable,
            Self::Inject(_) => Code::RequestBodyNotInjectable,
            Self::NoBodyToInject { .. } => Code::RequestBodyRequired,
            Self::BodyTooLarge { .. } => Code::RequestBodyTooLarge,
            Self::BodyRead => Code::RequestBodyError,
            Self::BodyTimeout => Code::RequestBodyTimeout,
            Self::BufferBudgetExhausted => Code::BufferBudgetExhausted,
            Self::Connect(ConnectError::Prohibited { .. }) => Code::DestinationIpProhibited,
            Self::Connect(ConnectError::Dns { .. } | ConnectError::NoAddresses { .. }) => Code::DestinationNotFound,
            Self::Connect(ConnectError::Timeout { .. }) => Code::UpstreamConnectTimeout,
            Self::Connect(_) => Code::UpstreamUnreachable,
            Self::UpstreamTls(_) => Code::UpstreamTlsError,
            Self::UpstreamTimeout => Code::UpstreamTimeout,
            Self::Upstream(_) => Code::UpstreamError,
            Self::NotScrubbable => Code::ResponseNotScrubbable,
        }
    }

    /// What the caller reads: what went wrong and what to do. Never a secret
    /// (hosts, limits and configuration keys only).
    pub fn detail(&self) -> Cow<'static, str> {
        use crate::crypto::CryptoError;
        match self {
            Self::OriginForm => "credproxy is a forward proxy: send absolute-form requests, e.g. `curl -x http://127.0.0.1:8080 http://api.example.com/` or set http_proxy / HTTP_PROXY".into(),
            Self::Internal(_) => "credproxy failed to serve this request; see the proxy log".into(),
            Self::UnsupportedScheme => "only http:// and https:// targets can be proxied".into(),
            Self::Malformed(what) => Cow::Borrowed(what),
            Self::HeadTooLarge { limit } => format!("the request head exceeds proxy.max_header_bytes ({limit} bytes)").into(),
            Self::TooManyHeaders => format!("the request has more than {} header fields", crate::h1::MAX_HEADERS).into(),
            Self::BadConnectionId => "X-Connection-Id must be a connection id: conn_ followed by 26 base32 characters".into(),
            Self::DuplicateConnectionId => "X-Connection-Id appears more than once; send exactly one".into(),
            Self::TraceWithCredential => "TRACE echoes the request back, credential included (RFC 9110 §9.3.8): credproxy does not send it with a connection; send it without X-Connection-Id".into(),
            Self::PassthroughDenied => "requests without X-Connection-Id are not forwarded (egress.allow_passthrough = false)".into(),
            Self::RunTokenMissing => "this proxy needs a run token: put it in the proxy URL (http://CONNECTION_ID:TOKEN@host:port, or any user name) or send Proxy-Authorization: Bearer TOKEN".into(),
            Self::RunTokenInvalid(why) => format!("the run token is not valid ({why}); mint a new one with POST /v1/run-tokens").into(),
            Self::RunTokenExpired => "the run token has expired; mint a new one with POST /v1/run-tokens".into(),
            Self::Resolve(e) | Self::Refresh(RefreshError::Resolve(e)) => match e {
                ResolveError::NotFound => "no connection with this id is visible to the caller".into(),
                ResolveError::NotActive(ConnectionState::NeedsReauth) => NEEDS_REAUTH.into(),
                ResolveError::NotActive(_) => "the connection has been revoked".into(),
                ResolveError::Crypto { source: CryptoError::KeyService(_), .. } => "the key service (KMS) that unwraps this connection's credential cannot be reached; retry later".into(),
                ResolveError::Removed { what, .. } => format!("this connection's {what} is no longer configured: restore it in the integration files, or create the connection again with another auth method").into(),
                ResolveError::Misconfigured { .. } | ResolveError::Crypto { .. } => "the connection's stored credential cannot be used; see the proxy log".into(),
                ResolveError::Store(_) => STORE_DOWN.into(),
            },
            Self::Refresh(RefreshError::NeedsReauth | RefreshError::Token(TokenError::InvalidGrant)) => NEEDS_REAUTH.into(),
            Self::Refresh(RefreshError::CoolingDown) => "refreshing this connection's access token failed moments ago; retry shortly".into(),
            Self::Refresh(RefreshError::Token(TokenError::Unavailable(_))) => "the OAuth2 token endpoint could not refresh the access token; retry later".into(),
            Self::Refresh(RefreshError::Fetch(TokenError::Unavailable(_))) => "the OAuth2 token endpoint did not issue an access token (client credentials); retry later".into(),
            Self::Refresh(RefreshError::Token(TokenError::Rejected(_))) => "the OAuth2 token endpoint refused the refresh or answered without an access token; check the integration's client settings".into(),
            Self::Refresh(RefreshError::Fetch(_)) => "the OAuth2 token endpoint refused to issue a token for the integration's client credentials, or answered without an access token; check its client_id and client_secret".into(),
            Self::Refresh(RefreshError::Store(crate::store::StoreError::LockTimeout(_))) => "another credproxy instance is refreshing this connection's token and did not finish in time (oauth2.refresh_lock_wait_ms); retry".into(),
            Self::Refresh(RefreshError::Store(_)) => STORE_DOWN.into(),
            Self::Refresh(RefreshError::Crypto(_)) => "the connection's refreshed credential could not be sealed; see the proxy log".into(),
            Self::HostNotAllowed { integration, host, port } => format!("integration {integration:?} does not allow {host}:{port}; the credential was not sent").into(),
            Self::Quota(r) => format!("{}; retry after {} s", r.description, r.retry_after_secs).into(),
            Self::Inject(e) => e.to_string().into(),
            Self::NoBodyToInject { method } => format!("this connection's credential goes into the request body, and credproxy does not make up a body for {method}; send the body, or use a method that carries one").into(),
            Self::BodyTooLarge { limit } => format!("this connection injects into the request body, which is buffered up to {limit} bytes (proxy.max_buffered_body)").into(),
            Self::BodyRead => "reading the request body failed".into(),
            Self::BodyTimeout => "the request body stopped arriving (proxy.body_idle_timeout_ms) or took too long in all (proxy.buffered_body_timeout_ms)".into(),
            Self::BufferBudgetExhausted => "this connection's credential goes into the request body, which is buffered, and buffered bodies are at proxy.max_buffered_total; retry shortly".into(),
            Self::Connect(ConnectError::Prohibited { host, why, .. }) => format!("{host} resolves to a {why} address; allow it with egress.allow_cidrs if intended").into(),
            Self::Connect(ConnectError::Dns { host, .. } | ConnectError::NoAddresses { host }) => format!("cannot resolve {host}").into(),
            Self::Connect(ConnectError::Timeout { host }) => format!("connecting to {host} timed out").into(),
            Self::Connect(e) => e.to_string().into(),
            Self::UpstreamTls(why) if why.contains("UnknownIssuer") => "the upstream's certificate is signed by a CA credproxy does not trust; if it is yours (a private or test CA), add its PEM file to upstream.extra_ca_certs".into(),
            Self::UpstreamTls(_) => "the upstream's TLS handshake or certificate verification failed".into(),
            Self::UpstreamTimeout => "the upstream did not send a response head in time (upstream.response_header_timeout_ms)".into(),
            Self::Upstream(_) => "the upstream connection failed or sent an invalid response".into(),
            Self::NotScrubbable => "the integration scrubs response bodies and the upstream answered with a Content-Encoding although credproxy asked for identity; nothing of the body was sent".into(),
        }
    }

    /// `Retry-After` for refusals that end by themselves.
    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Refresh(
                RefreshError::CoolingDown
                | RefreshError::Token(TokenError::Unavailable(_))
                | RefreshError::Fetch(TokenError::Unavailable(_)),
            ) => Some(crate::creds::REFRESH_COOLDOWN.as_secs()),
            Self::BufferBudgetExhausted => Some(1),
            Self::Quota(r) => Some(r.retry_after_secs),
            _ => None,
        }
    }
}

const NEEDS_REAUTH: &str = "the connection's authorization is no longer valid; a user must re-authorize it";
const STORE_DOWN: &str = "the credential store cannot be reached; retry later";

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

impl Outbound {
    /// Sends the integration's `[test]` request with `resolved`'s
    /// credential (stored or not yet: the connect pages test first) through
    /// the refresh/inject/forward path: `(status, expected status)`.
    pub async fn test_connection(&self, resolved: &Arc<Resolved>) -> Result<(u16, u16), Problem> {
        let test_problem = |detail: String| Problem::new(Code::NoTestRequest, detail);
        let integration = &resolved.integration;
        let test = integration
            .test
            .as_ref()
            .ok_or_else(|| test_problem(format!("integration {:?} defines no [test] request", integration.id)))?;
        let base = integration.base_url.as_deref().ok_or_else(|| {
            test_problem(format!("integration {:?} has no base_url for its test request", integration.id))
        })?;
        let uri: Uri = format!("{}{}", base.trim_end_matches('/'), test.path)
            .parse()
            .map_err(|_| test_problem("base_url + test.path is not a valid URL".into()))?;
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        if !integration.host_allowed(&host, port) {
            return Err(ProxyError::HostNotAllowed { integration: integration.id.clone(), host, port }.problem());
        }
        let method: Method = test.method.parse().map_err(|_| test_problem("test.method is invalid".into()))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::USER_AGENT, HeaderValue::from_static("credproxy-connection-test"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let body = UpstreamBody::Buffered(Full::new(Bytes::new()));
        let head = request_head(method, uri, headers);
        let (resp, _) = self
            .with_connection(resolved, head, body, &mut InjectMemo::default(), std::time::Instant::now())
            .await
            .map_err(|e| e.problem())?;
        // Only the status is read: nothing to scrub.
        Ok((resp.status().as_u16(), test.expect_status))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicI64;

    use super::*;
    use crate::creds::{Credential, ResolvedMeta};
    use crate::integrations::Integration;
    use crate::secret::SecretValue;
    use crate::store::ConnectionState;

    /// A `Resolved` of integration `t` (hosts `x.test`) with one auth
    /// method and its credential fields.
    pub(crate) fn resolved(method_toml: &str, fields: &[(&str, &str)]) -> Arc<Resolved> {
        let text = format!("id = \"t\"\nname = \"T\"\nallowed_hosts = [\"x.test\"]\n{method_toml}");
        let integration = Arc::new(Integration::from_toml_str("t.toml", &text, &BTreeMap::new()).unwrap());
        let method = integration.auth_methods[0].clone();
        let input = fields.iter().map(|(k, v)| (k.to_string(), SecretValue::from(*v))).collect();
        let credential = Credential::from_fields(&method, input).unwrap();
        let meta = ResolvedMeta {
            id: "conn_1".into(),
            org_id: "org_1".into(),
            user_id: "user_1".into(),
            state: ConnectionState::Active,
            created_at: 1,
            updated_at: 1,
        };
        Arc::new(Resolved { meta, integration, method, credential, tokens: None, use_noted: AtomicI64::new(0) })
    }

    /// The request's URI and its fields (name, value), sorted.
    fn sent(
        memo: Option<&mut InjectMemo>,
        r: &Arc<Resolved>,
        uri: &str,
        caller: &[(&str, &str)],
    ) -> (String, Vec<String>) {
        let mut h = HeaderMap::new();
        for (k, v) in caller {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        let body = UpstreamBody::Buffered(Full::new(Bytes::new()));
        let uri: Uri = uri.parse().unwrap();
        // What goes upstream: the head as the HTTP/1.1 side writes it, with
        // the memo's header edits set over the map's fields.
        let (req, extra) = match memo {
            Some(m) => {
                let head = request_head(Method::GET, uri, h);
                (m.upstream_request(head, r, body).unwrap(), m.edits.fields().to_vec())
            }
            None => (upstream_request(&Method::GET, uri, h, Some(r), body).unwrap(), Vec::new()),
        };
        let (parts, _) = req.into_parts();
        let mut head = Vec::new();
        crate::h1::client::encode_request_head(&mut head, &parts, None, &extra, crate::h1::Framing::Empty);
        let head = String::from_utf8(head).unwrap();
        let mut fields: Vec<String> = head.split("\r\n").skip(1).filter(|l| !l.is_empty()).map(str::to_owned).collect();
        fields.sort();
        (parts.uri.to_string(), fields)
    }

    /// Kept header edits give what building them per request gives, follow
    /// the exact `Resolved` (a refreshed or changed connection is another
    /// one), and query placements are never kept.
    #[test]
    fn inject_memo_sends_what_building_per_request_sends() {
        let bearer = "[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n";
        let a = resolved(bearer, &[("token", "tkn-a")]);
        let b = resolved(bearer, &[("token", "tkn-b")]);
        let keyed = resolved(
            "[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"header\"\nname = \"X-Api-Key\"\n",
            &[("api_key", "k1")],
        );
        let query = resolved(
            "[[auth_methods]]\nid = \"q\"\ntype = \"api_key\"\nin = \"query\"\nname = \"key\"\n",
            &[("api_key", "q1")],
        );
        let caller: &[(&str, &str)] = &[
            ("authorization", "Bearer caller"),
            ("x_api_key", "lookalike"),
            ("x-api-key", "caller"),
            ("accept", "*/*"),
        ];
        let mut memo = InjectMemo::default();
        for r in [&a, &a, &b, &a, &keyed, &keyed, &query, &query, &a] {
            let per_request = sent(None, r, "http://x.test/p?x=1", caller);
            assert_eq!(sent(Some(&mut memo), r, "http://x.test/p?x=1", caller), per_request);
            match r.method.id.as_str() {
                "q" => assert!(memo.of.is_none(), "query placements are built per request"),
                _ => assert!(memo.of.as_ref().is_some_and(|of| Arc::ptr_eq(of, r)), "kept for this Resolved"),
            }
        }
        let (_, fields) = sent(Some(&mut memo), &b, "http://x.test/", caller);
        assert!(fields.contains(&"authorization: Bearer tkn-b".to_owned()), "{fields:?}");
        assert_eq!(fields.iter().filter(|f| f.starts_with("authorization:")).count(), 1);
        let (_, fields) = sent(Some(&mut memo), &keyed, "http://x.test/", caller);
        assert!(fields.contains(&"x-api-key: k1".to_owned()) && !fields.iter().any(|f| f.starts_with("x_api_key")));
        let (uri, _) = sent(Some(&mut memo), &query, "http://x.test/p?x=1", caller);
        assert_eq!(uri, "http://x.test/p?x=1&key=q1");
    }
}
