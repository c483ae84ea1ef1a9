//! The caller's side of HTTP/1.1: request heads and bodies in, responses out.
//!
//! A connection is split into a [`ReadSide`] (socket read half, buffer,
//! state of the body being read) and a [`WriteHalf`]. The proxy's connection
//! loop reads a head from the read side; if the request has a body, the read
//! side moves into the [`RequestBody`], which hands it back at the body's end
//! (or when dropped half-read), so the next request is read from the same
//! buffer. Nothing here spawns or wakes another task.

use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

pub use super::transport::{FillOnce, Io, ReadHalf, Rewind, Transport, Upgraded, WriteHalf};
use super::{
    find_head_end, header_map, read_into, Decoder, Encoder, Error, Framing, IdleTimer, OwnFields, Pending, RawFields,
    MAX_HEADERS,
};

/// A parsed request head.
pub struct RequestHead {
    /// Method, target as sent, version and every header field but those
    /// the proxy reads itself (set aside in [`ReadSide::take_own`]; values
    /// share the head's bytes).
    pub parts: http::request::Parts,
    pub framing: Framing,
    /// The caller allows another request on this connection afterwards.
    pub keep_alive: bool,
    /// `Expect: 100-continue` with a body.
    pub expect_continue: bool,
}

/// The read side of a caller's connection.
pub struct ReadSide {
    io: ReadHalf,
    buf: BytesMut,
    /// How far `buf` was scanned for the end of a head.
    scanned: usize,
    /// The body of the current request (done between requests).
    body: Decoder,
    /// Bounds the wait for the next bytes of a body (`proxy.body_idle_timeout_ms`).
    idle: IdleTimer,
    /// The fields of the last head read that the proxy reads itself, kept
    /// beside the head rather than in it: the head is moved a few times
    /// on its way to the pipeline, and every byte of it is copied each time.
    own: OwnFields,
    /// The scheme and authority of the last absolute-form target.
    origin: LastOrigin,
}

impl ReadSide {
    /// `body_idle`: longest wait for more of a request body.
    pub fn new(io: ReadHalf, body_idle: std::time::Duration) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(4096),
            scanned: 0,
            body: Decoder::done(),
            idle: IdleTimer::new(body_idle),
            own: OwnFields::default(),
            origin: LastOrigin::default(),
        }
    }

    /// `X-Connection-Id` and `Proxy-Authorization` of the head
    /// [`ReadSide::poll_head`] returned last, taken (they are not among its
    /// headers).
    pub fn take_own(&mut self) -> OwnFields {
        std::mem::take(&mut self.own)
    }

    /// Bytes of a next head have arrived (a caller mid-request, not idle).
    pub fn has_partial_head(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The current request's body has been read to its end.
    pub fn body_done(&self) -> bool {
        self.body.is_done()
    }

    /// Reads the next request head. `Ok(None)`: the caller closed the
    /// connection cleanly between requests.
    pub fn poll_head(&mut self, cx: &mut Context<'_>, max_bytes: usize) -> Poll<Result<Option<RequestHead>, Error>> {
        loop {
            if let Some(head) = take_head(&mut self.buf, &mut self.scanned, max_bytes, &mut self.own, &mut self.origin)
            {
                return Poll::Ready(head.map(Some));
            }
            let n = std::task::ready!(read_into(&mut self.io, cx, &mut self.buf, 4096))?;
            if n == 0 {
                return Poll::Ready(if self.buf.is_empty() { Ok(None) } else { Err(Error::Incomplete) });
            }
        }
    }

    /// Sets up reading `framing`'s body next.
    pub fn start_body(&mut self, framing: Framing) {
        self.body = Decoder::new(framing);
        self.idle.progress();
    }

    /// Reads and drops what is left of the current body, up to `limit`
    /// bytes; true if it ended within the limit.
    pub async fn discard_body(&mut self, limit: u64) -> Result<bool, Error> {
        let mut seen = 0u64;
        loop {
            let next = std::future::poll_fn(|cx| self.body.poll_next(&mut self.io, &mut self.buf, cx)).await;
            match next {
                None => return Ok(true),
                Some(Ok(b)) => {
                    seen += b.len() as u64;
                    if seen > limit {
                        return Ok(false);
                    }
                }
                Some(Err(e)) => return Err(e),
            }
        }
    }

    /// The socket half and what was read from it but not consumed.
    pub fn into_parts(self) -> (ReadHalf, Bytes) {
        (self.io, self.buf.freeze())
    }
}

/// Takes the next request head out of `buf` once it is all there (`None`:
/// read more; `scanned` carries the scan across calls), its fields for the
/// proxy into `own`; `origin` is the connection's [`LastOrigin`].
/// Synchronous, so the fuzz targets drive exactly what the connection loop
/// runs.
#[inline]
pub(super) fn take_head(
    buf: &mut BytesMut,
    scanned: &mut usize,
    max_bytes: usize,
    own: &mut OwnFields,
    origin: &mut LastOrigin,
) -> Option<Result<RequestHead, Error>> {
    if buf.is_empty() {
        // Between requests, and each time a connection is polled before its next head arrives.
        return None;
    }
    // RFC 9112 §2.2: ignore empty lines before a request line.
    let blank = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    if blank > 0 {
        buf.advance(blank);
        *scanned = scanned.saturating_sub(blank);
    }
    // Most reads bring one whole head and nothing after it (a request
    // without a body, not pipelined): a buffer that ends with a blank line
    // holds a whole head, parsed at once without first scanning for its
    // end (~150 instructions a request). The tokenizer stops at the first blank
    // line, as the scan does; bytes after it go back into the buffer.
    // (One call of `parse_request` for both: inlined, its head is written
    // once, not moved out of a call.)
    let (head, rest) = if buf.len() <= max_bytes && buf.ends_with(b"\r\n\r\n") {
        (buf.split().freeze(), Some(buf))
    } else if let Some(end) = find_head_end(buf, scanned) {
        if end > max_bytes {
            *scanned = 0;
            return Some(Err(Error::HeadTooLarge(max_bytes)));
        }
        (buf.split_to(end).freeze(), None)
    } else {
        if buf.len() >= max_bytes {
            return Some(Err(Error::HeadTooLarge(max_bytes)));
        }
        return None;
    };
    *scanned = 0;
    Some(parse_request(head, own, origin, rest))
}

/// Parses one request head from the start of `head`; the fields the
/// proxy reads itself go into `own`. What follows the head's blank line
/// goes back into `rest` (empty: it was all taken); without `rest`,
/// `head` was cut at the blank line the scan found, and the tokenizer must
/// end there too (it does: both stop at the first blank line).
fn parse_request(
    head: Bytes,
    own: &mut OwnFields,
    origin: &mut LastOrigin,
    rest: Option<&mut BytesMut>,
) -> Result<RequestHead, Error> {
    let mut fields = super::head::Fields::new();
    let (end, line) = match super::head::request(&head, &mut fields, MAX_HEADERS) {
        Ok(httparse::Status::Complete(parsed)) => parsed,
        refused => {
            // What followed the head (up to its blank line, as the scan
            // finds it) stays in the buffer, as when the scan cut it: the
            // same bytes are consumed however the stream arrived.
            if let Some(buf) = rest {
                if let Some(end) = find_head_end(&head, &mut 0) {
                    buf.extend_from_slice(&head[end..]);
                }
            }
            return Err(match refused {
                Ok(_) => Error::Malformed("incomplete request head"),
                Err(httparse::Error::TooManyHeaders) => Error::TooManyHeaders,
                Err(_) => Error::Malformed("invalid request line or header field"),
            });
        }
    };
    if end < head.len() {
        match rest {
            Some(buf) => buf.extend_from_slice(&head[end..]),
            None => return Err(Error::Malformed("request head ends before its blank line")),
        }
    }
    let method = Method::from_bytes(line.method).map_err(|_| Error::Malformed("invalid method"))?;
    let uri = origin.target(head.slice_ref(line.target)).ok_or(Error::Malformed("invalid request target"))?;
    let minor = line.minor;
    let (mut parts, ()) = Request::new(()).into_parts();
    let s = header_map(&head, &fields, false, &mut parts.headers, own)?;
    let framing = super::request_framing(&method, minor, &s)?;
    parts.method = method;
    parts.uri = uri;
    parts.version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    Ok(RequestHead {
        parts,
        framing,
        keep_alive: s.keep_alive(minor),
        expect_continue: s.expect_continue && framing != Framing::Empty,
    })
}

/// The scheme and authority of a connection's last absolute-form request
/// target (`http://api.example:8443`), as the bytes they were read from
/// and as parsed. A keep-alive caller mostly sends the same ones again:
/// such a target has only its path and query parsed, not the whole of it
/// (`http::Uri`'s parse of an absolute target was ~530 instructions of
/// every request, callgrind; the path's alone ~90).
#[derive(Default)]
pub struct LastOrigin {
    text: Vec<u8>,
    parsed: Option<(Scheme, Authority)>,
}

impl LastOrigin {
    /// `target` as `Uri::from_maybe_shared` reads it (`None` where it
    /// refuses it). A target that starts with the same bytes as the last
    /// one up to the end of its authority, and has a path after them, has
    /// the same scheme and authority — `http::Uri` ends an authority at the
    /// first `/`, `?` or `#`, and these bytes held none — so only its path
    /// and query are parsed. Only `http` and `https` are kept (another
    /// scheme's copy would allocate).
    pub fn target(&mut self, target: Bytes) -> Option<Uri> {
        let n = self.text.len();
        if let Some((scheme, authority)) = &self.parsed {
            // `Uri` refuses targets of 64 KiB and more whole, not by parts.
            if target.get(n) == Some(&b'/') && crate::scan::same(&target[..n], &self.text) && target.len() <= MAX_TARGET
            {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(scheme.clone());
                parts.authority = Some(authority.clone());
                let uri = PathAndQuery::from_maybe_shared(target.slice(n..)).ok().and_then(|pq| {
                    parts.path_and_query = Some(pq);
                    Uri::from_parts(parts).ok()
                });
                // The unit tests and the fuzz targets hold it to `Uri`'s own reading.
                #[cfg(any(test, feature = "fuzzing"))]
                {
                    let whole = Uri::from_maybe_shared(target).ok();
                    let text = |u: &Option<Uri>| u.as_ref().map(Uri::to_string);
                    assert_eq!((&uri, text(&uri)), (&whole, text(&whole)), "a target read with the kept origin");
                }
                return uri;
            }
        }
        let uri = Uri::from_maybe_shared(target.clone()).ok()?;
        self.remember(&target, &uri);
        Some(uri)
    }

    /// Keeps `uri`'s scheme and authority when they are an absolute
    /// target's of `http` or `https` followed by a path. The authority is
    /// copied out of the head's bytes (a handle on them would keep the
    /// connection's read buffer from being reused).
    fn remember(&mut self, target: &[u8], uri: &Uri) {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else { return };
        // "http://" or "https://" (either case: `Uri` reads both as the
        // standard scheme), then the authority as it was sent.
        let n = match scheme.as_str() {
            "http" => 7,
            "https" => 8,
            _ => return,
        } + authority.as_str().len();
        if target.get(n) != Some(&b'/') || self.text == target[..n] {
            return;
        }
        let Ok(kept) = Authority::from_maybe_shared(Bytes::copy_from_slice(authority.as_str().as_bytes())) else {
            return;
        };
        self.text.clear();
        self.text.extend_from_slice(&target[..n]);
        self.parsed = Some((scheme.clone(), kept));
    }
}

/// `http::Uri`'s limit on a request target's length (its `MAX_LEN`:
/// longer is refused).
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// `Expect: 100-continue`: the body asks for its bytes, the connection loop
/// answers `100 Continue` and releases it. The body may be read on another
/// task (an h2 upstream), so both sides keep a waker.
#[derive(Default)]
pub struct Continue {
    state: Mutex<ContinueState>,
}

#[derive(Default)]
struct ContinueState {
    wanted: bool,
    released: bool,
    body: Option<Waker>,
    conn: Option<Waker>,
}

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Continue {
    fn lock(&self) -> std::sync::MutexGuard<'_, ContinueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Body side: true once the caller has been told to send the body.
    fn poll_released(&self, cx: &mut Context<'_>) -> bool {
        let mut s = self.lock();
        if s.released {
            return true;
        }
        s.wanted = true;
        s.body = Some(cx.waker().clone());
        let conn = s.conn.take();
        drop(s);
        if let Some(w) = conn {
            w.wake();
        }
        false
    }

    /// Connection side: ready when the body wants its bytes.
    pub fn poll_wanted(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.wanted && !s.released {
            return Poll::Ready(());
        }
        s.conn = Some(cx.waker().clone());
        Poll::Pending
    }

    /// `100 Continue` has been written.
    pub fn release(&self) {
        let mut s = self.lock();
        s.released = true;
        let body = s.body.take();
        drop(s);
        if let Some(w) = body {
            w.wake();
        }
    }

    pub fn was_released(&self) -> bool {
        self.lock().released
    }
}

/// A caller's request body, read straight from the connection.
pub struct RequestBody {
    inner: Option<Box<Streaming>>,
}

struct Streaming {
    side: Option<ReadSide>,
    home: Option<oneshot::Sender<ReadSide>>,
    cont: Option<Arc<Continue>>,
}

impl Streaming {
    fn go_home(&mut self) {
        if let (Some(side), Some(home)) = (self.side.take(), self.home.take()) {
            let _ = home.send(side);
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // Dropped half-read: the loop decides whether to discard the rest.
        self.go_home();
    }
}

impl RequestBody {
    pub fn empty() -> Self {
        Self { inner: None }
    }

    /// A body read from `side` (set up with [`ReadSide::start_body`]), which
    /// goes back through `home` when the body ends or is dropped.
    pub fn streaming(side: ReadSide, home: oneshot::Sender<ReadSide>, cont: Option<Arc<Continue>>) -> Self {
        Self { inner: Some(Box::new(Streaming { side: Some(side), home: Some(home), cont })) }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(s) = self.inner.as_deref_mut() else { return Poll::Ready(None) };
        if let Some(c) = &s.cont {
            if !c.poll_released(cx) {
                return Poll::Pending;
            }
        }
        let Some(side) = s.side.as_mut() else { return Poll::Ready(None) };
        match side.body.poll_next(&mut side.io, &mut side.buf, cx) {
            Poll::Ready(Some(Ok(data))) => {
                side.idle.progress();
                if side.body.is_done() {
                    s.go_home();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(None) => {
                s.go_home();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // The connection cannot be trusted to continue: it stays gone.
                s.side = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                if side.idle.poll_expired(cx).is_pending() {
                    return Poll::Pending;
                }
                // A caller that stopped sending its body: the connection goes.
                s.side = None;
                Poll::Ready(Some(Err(Error::BodyTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.inner.as_deref() {
            None => true,
            Some(s) => s.side.as_ref().is_none_or(|side| side.body.is_done()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.inner.as_deref().and_then(|s| s.side.as_ref()).map(|side| side.body.remaining()) {
            None => SizeHint::with_exact(0),
            Some(Some(n)) => SizeHint::with_exact(n),
            Some(None) => SizeHint::default(),
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").field("streaming", &self.inner.is_some()).finish()
    }
}

/// What the response writer needs to know about the request it answers.
#[derive(Debug, Clone, Copy)]
pub struct ResponseMeta {
    pub head_request: bool,
    pub connect: bool,
    /// The caller spoke HTTP/1.0: no chunked coding.
    pub http10: bool,
    /// The connection closes after this response.
    pub close: bool,
    /// Longest wait for the caller to take more of the response.
    pub send_timeout: std::time::Duration,
}

/// Writes `resp` (head, then its body as it streams), with an upstream's
/// unparsed `fields` after those in its header map. Returns whether the
/// connection can carry another request (false when the body had to be
/// delimited by closing). An error leaves the connection unusable: a body
/// cut short cannot be told apart from a complete one any other way.
pub async fn write_response<B>(
    wr: &mut WriteHalf,
    out: &mut Vec<u8>,
    resp: Response<B>,
    fields: Option<RawFields>,
    meta: ResponseMeta,
) -> Result<bool, Error>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = resp.into_parts();
    let (encoder, close) = encode_response_head(out, &parts, fields.as_ref(), body.size_hint().exact(), meta);

    let mut pending = Pending::default();
    let idle = meta.send_timeout;
    let Some(mut encoder) = encoder else {
        flush(&mut pending, wr, out, idle).await?;
        return Ok(!close);
    };
    let mut body = pin!(body);
    loop {
        // Take what the body has ready; when it has nothing, write what is queued.
        let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending if out.is_empty() => Poll::Pending,
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        match next {
            None => flush(&mut pending, wr, out, idle).await?,
            Some(None) => {
                encoder.finish(out)?;
                flush(&mut pending, wr, out, idle).await?;
                return Ok(!close);
            }
            Some(Some(Err(e))) => {
                // The upstream failed mid-body: the caller gets what there
                // is, then the connection closes (a cut-short body must not
                // look complete).
                let _ = flush(&mut pending, wr, out, idle).await;
                return Err(Error::Body(e.to_string()));
            }
            Some(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                let (rest, crlf) = encoder.frame(out, data)?;
                let end = body.is_end_stream();
                if rest.is_some() || out.len() >= 32 * 1024 {
                    pending.set(rest, crlf);
                    flush(&mut pending, wr, out, idle).await?;
                }
                if end {
                    encoder.finish(out)?;
                    flush(&mut pending, wr, out, idle).await?;
                    return Ok(!close);
                }
            }
        }
    }
}

/// Encodes a response head into `out` (cleared first): status line, the
/// response's fields and an upstream's unparsed ones, then the framing
/// fields, which are always credproxy's own (`length`: the body's exact
/// size, if known), a `Date` if nobody sent one, and `Connection` as
/// needed. Returns how the body is to be framed (`None`: it has none) and
/// whether the connection closes after it. Pure: no I/O.
pub(super) fn encode_response_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    fields: Option<&RawFields>,
    length: Option<u64>,
    meta: ResponseMeta,
) -> (Option<Encoder>, bool) {
    let status = parts.status;
    let headers = &parts.headers;
    let mut close = meta.close;
    let has_body = super::response_can_have_body(status, meta.head_request, meta.connect);
    // Framing fields are always ours; a body-less response keeps the
    // upstream's Content-Length (HEAD, 304) unless it must not have one.
    let keep_length = !has_body && status != StatusCode::NO_CONTENT && !(meta.connect && status.is_success());
    let skip: &[http::HeaderName] =
        if keep_length { &[header::TRANSFER_ENCODING] } else { &[header::TRANSFER_ENCODING, header::CONTENT_LENGTH] };
    let encoder = has_body.then(|| match length {
        Some(n) => Encoder::Length(n),
        None if meta.http10 => {
            close = true;
            Encoder::Close
        }
        None => Encoder::Chunked,
    });

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_fields(out, headers, skip);
    if let Some(f) = fields {
        f.write_to(out, keep_length);
    }
    match encoder {
        Some(Encoder::Length(n)) => {
            out.extend_from_slice(b"content-length: ");
            super::write_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Some(Encoder::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !headers.contains_key(header::DATE) && !fields.is_some_and(RawFields::has_date) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(super::date_value().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if meta.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (encoder, close)
}

/// Writes what is queued. A caller that takes none of it for `timeout`
/// (it stopped reading) fails the write with [`Error::Timeout`].
async fn flush(
    pending: &mut Pending,
    wr: &mut WriteHalf,
    out: &mut Vec<u8>,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    let mut idle = IdleTimer::new(timeout);
    std::future::poll_fn(|cx| match pending.poll_flush(wr, out, cx) {
        Poll::Ready(r) => Poll::Ready(r.map_err(Error::Io)),
        Poll::Pending => {
            if pending.take_progress() {
                idle.progress();
            }
            idle.poll_expired(cx).map(|()| Err(Error::Timeout))
        }
    })
    .await
}

/// `name: value` lines of `headers`, except the `skip` names.
fn write_fields(out: &mut Vec<u8>, headers: &HeaderMap, skip: &[http::HeaderName]) {
    for (name, value) in headers {
        if !skip.contains(name) {
            super::put_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// In a `CONNECT` request's extensions: gives the connection once the `2xx`
/// answer has been written. (Clone only because request extensions must be.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    pub fn pair() -> (oneshot::Sender<Upgraded>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(Arc::new(Mutex::new(Some(rx)))))
    }

    /// The connection, or an error if the answer was not a `2xx` or the
    /// caller went away (or another clone took it).
    pub async fn wait(self) -> Result<Upgraded, io::Error> {
        let rx = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        match rx {
            Some(rx) => rx.await.map_err(|_| io::Error::other("the connection was not upgraded")),
            None => Err(io::Error::other("the upgrade was already taken")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::OwnField;
    use super::*;

    fn head(s: &str) -> Result<RequestHead, Error> {
        with_own(s).map(|(h, _)| h)
    }

    /// A head and the fields set aside beside it.
    fn with_own(s: &str) -> Result<(RequestHead, OwnFields), Error> {
        let mut own = OwnFields::default();
        parse_request(Bytes::copy_from_slice(s.as_bytes()), &mut own, &mut LastOrigin::default(), None)
            .map(|h| (h, own))
    }

    #[test]
    fn request_heads_parse_into_parts_and_framing() {
        let (h, own) =
            with_own("GET http://a.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\nX-Connection-Id: conn_x\r\n\r\n").unwrap();
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "http://a.test/x?y=1");
        assert_eq!(own.connection_id, OwnField::One(super::super::OwnValue::from_static("conn_x")));
        assert!(h.parts.headers.get("x-connection-id").is_none(), "set aside, not in the map");
        assert_eq!((h.framing, h.keep_alive, h.expect_continue), (Framing::Empty, true, false));
        let h = head("POST http://a.test/ HTTP/1.1\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nTE: trailers\r\nContent-Length: 3\r\nX-Keep: 2\r\n\r\n").unwrap();
        let names: Vec<_> = h.parts.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"], "hop-by-hop and framing fields stay in the codec");
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(3), false));

        let h = head("POST http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert_eq!((h.framing, h.expect_continue), (Framing::Length(5), true));
        let h =
            head("POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        let h = head("GET http://a.test/ HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((h.parts.version, h.keep_alive), (Version::HTTP_10, false));
        let h = head("GET http://a.test/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(h.keep_alive);
        let h = head("CONNECT a.test:443 HTTP/1.1\r\nContent-Length: 10\r\n\r\n").unwrap();
        assert_eq!((h.parts.uri.authority().unwrap().as_str(), h.framing), ("a.test:443", Framing::Empty));
    }

    #[test]
    fn the_proxys_own_fields_are_set_aside_once_or_marked_repeated() {
        type Pick = fn(OwnFields) -> OwnField;
        let cases: [(&str, Pick); 2] =
            [("X-Connection-Id", |o| o.connection_id), ("Proxy-Authorization", |o| o.proxy_authorization)];
        for (name, pick) in cases {
            let parsed = |fields: &str| with_own(&format!("GET http://a.test/ HTTP/1.1\r\n{fields}\r\n")).unwrap();
            let field = |fields: &str| pick(parsed(fields).1);
            let one = OwnField::One(super::super::OwnValue::from_static("conn_a"));
            let upper = name.to_ascii_uppercase();
            let lower = name.to_ascii_lowercase();
            assert_eq!(field(&format!("{upper}: conn_a\r\n")), one, "names are case-insensitive");
            assert_eq!(field("Host: a.test\r\n"), OwnField::Absent);
            // Set aside, not in the map: nothing past the codec can forward it.
            let (h, _) = parsed(&format!("{name}: conn_a\r\nX-Other: 1\r\n"));
            let names: Vec<_> = h.parts.headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-other"], "{name}");
            // Two field lines, in any case or with the same value: ambiguous.
            for two in [
                format!("{name}: conn_a\r\n{lower}: conn_b\r\n"),
                format!("{name}: conn_a\r\n{name}: conn_a\r\n"),
                format!("{lower}: conn_a\r\nX-Other: 1\r\n{upper}: conn_a\r\n"),
            ] {
                assert_eq!(field(&two), OwnField::Repeated, "{two:?}");
            }
            // Named by `Connection`: hop-by-hop, so gone (even when repeated).
            assert_eq!(field(&format!("Connection: {name}\r\n{name}: conn_a\r\n")), OwnField::Absent);
            assert_eq!(field(&format!("{name}: a\r\nConnection: {lower}\r\n{name}: b\r\n")), OwnField::Absent);
            // A lookalike is dropped, and is not the field either.
            let (h, own) = parsed(&format!("{}: conn_a\r\n", name.replace('-', "_")));
            assert_eq!((pick(own), h.parts.headers.len()), (OwnField::Absent, 0), "{name}");
            // Not the proxy's in a response: passed on like any other.
            let raw = super::super::RawFields::from_parsed(
                None,
                &[crate::h1::head::Field { name: name.as_bytes(), value: b"conn_a" }],
                false,
            )
            .unwrap()
            .0;
            assert_eq!(&raw.lines[..], format!("{name}: conn_a\r\n").as_bytes());
        }
        // Each is its own: one of each is no repetition.
        let (_, own) =
            with_own("GET http://a.test/ HTTP/1.1\r\nX-Connection-Id: conn_a\r\nProxy-Authorization: Bearer t\r\n\r\n")
                .unwrap();
        assert_eq!(own.connection_id, OwnField::One(super::super::OwnValue::from_static("conn_a")));
        assert_eq!(own.proxy_authorization, OwnField::One(super::super::OwnValue::from_static("Bearer t")));
        assert!(!format!("{own:?}").contains("Bearer t"), "a run token in Debug: {own:?}");
    }

    /// A head as `take_all` reports it: target and framing, or the error.
    type Taken = Result<(String, Framing), String>;

    /// Every head `take_head` finds in `input`, and what is left in the
    /// buffer after the last.
    fn take_all(input: &[u8], max: usize) -> (Vec<Taken>, Vec<u8>) {
        let mut buf = BytesMut::from(input);
        let (mut scanned, mut own, mut heads) = (0, OwnFields::default(), vec![]);
        let mut origin = LastOrigin::default();
        while let Some(h) = take_head(&mut buf, &mut scanned, max, &mut own, &mut origin) {
            let failed = h.is_err();
            heads.push(h.map(|h| (h.parts.uri.to_string(), h.framing)).map_err(|e| e.to_string()));
            if failed || h_has_body(heads.last()) {
                break;
            }
        }
        (heads, buf.to_vec())
    }

    fn h_has_body(h: Option<&Taken>) -> bool {
        matches!(h, Some(Ok((_, f))) if *f != Framing::Empty)
    }

    fn ok(target: &str, framing: Framing) -> Taken {
        Ok((target.to_owned(), framing))
    }

    /// Targets read one after another on one connection come out as
    /// `Uri` reads each alone (the kept origin's path asserts it too):
    /// same origin or not, with a path or without, valid or not.
    #[test]
    fn the_kept_origin_reads_targets_as_uri_does() {
        let targets = [
            "http://a.test/x",
            "http://a.test/y?q=1",
            "http://a.test?q",
            "http://a.test",
            "http://a.test/",
            "HTTP://a.test/z",
            "http://a.test/z",
            "http://a.test:80/p",
            "http://a.test/p#frag",
            "http://a.test/\x7f",
            "http://a.test/p q",
            "http://a.test/%zz\"",
            "https://a.test/p",
            "http://a.test:443/p",
            "http://user@a.test/p",
            "http://a.test./p",
            "http://a.test//",
            "http://a.test:8x/",
            "ftp://a.test/p",
            "ftp://a.test/q",
            "/origin-form",
            "a.test:443",
            "*",
            "http://[::1]:8080/p",
            "http://[::1]:8080/q",
            "http://a.test/ok",
        ];
        let mut origin = LastOrigin::default();
        for round in 0..2 {
            for t in targets {
                let kept = origin.target(Bytes::from_static(t.as_bytes()));
                let alone = Uri::from_maybe_shared(Bytes::from_static(t.as_bytes())).ok();
                assert_eq!(
                    kept.as_ref().map(Uri::to_string),
                    alone.as_ref().map(Uri::to_string),
                    "{t} (round {round})"
                );
            }
        }
        // The memo is in use: two paths on one origin keep its text.
        let mut origin = LastOrigin::default();
        origin.target(Bytes::from_static(b"http://a.test:8080/1")).unwrap();
        let uri = origin.target(Bytes::from_static(b"http://a.test:8080/2?x")).unwrap();
        assert_eq!(
            (origin.text.as_slice(), uri.to_string().as_str()),
            (&b"http://a.test:8080"[..], "http://a.test:8080/2?x")
        );
    }

    #[test]
    fn a_read_ending_in_a_blank_line_gives_each_head_and_keeps_what_follows() {
        // One head: parsed at once, nothing left.
        let (heads, left) = take_all(b"GET http://a.test/1 HTTP/1.1\r\n\r\n", 1024);
        assert_eq!((heads, left), (vec![ok("http://a.test/1", Framing::Empty)], vec![]));
        // Pipelined heads: each in turn, in order.
        let two = b"GET http://a.test/1 HTTP/1.1\r\n\r\nGET http://a.test/2 HTTP/1.1\r\nA: b\r\n\r\n";
        let (heads, left) = take_all(two, 1024);
        let both = vec![ok("http://a.test/1", Framing::Empty), ok("http://a.test/2", Framing::Empty)];
        assert_eq!((heads, left), (both.clone(), vec![]));
        // A body that itself ends in a blank line stays in the buffer, whole.
        let post = b"POST http://a.test/1 HTTP/1.1\r\nContent-Length: 4\r\n\r\n\r\n\r\n";
        let (heads, left) = take_all(post, 1024);
        assert_eq!((heads, left), (vec![ok("http://a.test/1", Framing::Length(4))], b"\r\n\r\n".to_vec()));
        // A head ending in bare line feeds ends at its own blank line.
        let bare = b"GET http://a.test/1 HTTP/1.1\nA: b\n\nGET http://a.test/2 HTTP/1.1\r\n\r\n";
        let (heads, left) = take_all(bare, 1024);
        assert_eq!((heads, left), (both, vec![]));
        // A refused head consumes itself only, however the bytes arrive.
        let bad = b"GET http://a.test/1 HTTP/1.1\r\nBad Field\r\n\r\nGET http://a.test/2 HTTP/1.1\r\n\r\n";
        let (heads, left) = take_all(bad, 1024);
        assert!(matches!(heads[..], [Err(_)]), "{heads:?}");
        assert_eq!(left, b"GET http://a.test/2 HTTP/1.1\r\n\r\n");
        let mut buf = BytesMut::new();
        let (mut scanned, mut own, mut origin) = (0, OwnFields::default(), LastOrigin::default());
        for b in bad {
            buf.extend_from_slice(&[*b]);
            if let Some(h) = take_head(&mut buf, &mut scanned, 1024, &mut own, &mut origin) {
                assert!(h.is_err());
                break;
            }
        }
        assert_eq!(&buf[..], b"", "a byte at a time, nothing after the head has arrived yet");
        // Over the limit: refused, whatever the buffer ends with.
        let long = format!("GET http://a.test/{} HTTP/1.1\r\n\r\n", "x".repeat(100));
        let (heads, _) = take_all(long.as_bytes(), 64);
        assert_eq!(heads, vec![Err(Error::HeadTooLarge(64).to_string())]);
    }

    #[test]
    fn ambiguous_or_unsupported_framing_is_refused() {
        for bad in [
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nBad Name: a\r\n\r\n",
            "GET http://a/ HTTP/2.0\r\n\r\n",
            "G@T http://a/ HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(Error::Malformed(_))), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(matches!(head(&format!("GET http://a/ HTTP/1.1\r\n{many}\r\n")), Err(Error::TooManyHeaders)));
        // The same length twice is one length.
        let h = head("POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::Length(5));
    }

    // ---- at the I/O boundary: a duplex pipe stands in for the caller ----

    use http_body_util::{BodyExt, Full};
    use std::collections::VecDeque;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn connection(buffer: usize) -> (ReadSide, WriteHalf, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(buffer);
        let (rd, wr) = Transport::Boxed(Box::new(ours)).split();
        (ReadSide::new(rd, Duration::from_secs(5)), wr, theirs)
    }

    /// A body of unknown length (no size hint), sent in pieces.
    struct Pieces(VecDeque<Bytes>);

    impl Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    /// Two pipelined requests, the first with a body, arriving split at
    /// every byte: the same heads, the same body, and the read side comes
    /// back from the body with the second request's bytes.
    #[tokio::test]
    async fn heads_and_bodies_split_at_every_byte_read_the_same() {
        let raw: &[u8] = b"POST http://a.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\nX-Connection-Id: conn_x\r\n\
            Content-Length: 5\r\n\r\nhelloGET http://a.test/next HTTP/1.1\r\nConnection: close\r\n\r\n";
        for split in 1..raw.len() {
            let (mut side, _wr, mut peer) = connection(64 * 1024);
            let (first, rest) = raw.split_at(split);
            peer.write_all(first).await.unwrap();
            let later = rest.to_vec();
            let writer = tokio::spawn(async move {
                tokio::task::yield_now().await;
                peer.write_all(&later).await.unwrap();
                peer
            });
            let head = std::future::poll_fn(|cx| side.poll_head(cx, 65_536)).await.unwrap().unwrap();
            assert_eq!(head.parts.method, Method::POST, "split at {split}");
            assert_eq!(head.parts.uri, "http://a.test/x?y=1");
            assert_eq!(side.take_own().connection_id, OwnField::One(super::super::OwnValue::from_static("conn_x")));
            assert_eq!(side.take_own(), OwnFields::default(), "taken once");
            assert_eq!((head.framing, head.keep_alive), (Framing::Length(5), true));
            side.start_body(head.framing);
            let (tx, rx) = oneshot::channel();
            let body = RequestBody::streaming(side, tx, None);
            assert_eq!(body.collect().await.unwrap().to_bytes(), &b"hello"[..], "split at {split}");
            let mut side = rx.await.expect("the body hands the read side back");
            assert!(side.body_done());
            let next = std::future::poll_fn(|cx| side.poll_head(cx, 65_536)).await.unwrap().unwrap();
            assert_eq!((next.parts.uri.path(), next.keep_alive), ("/next", false), "split at {split}");
            drop(writer.await.unwrap());
            assert!(std::future::poll_fn(|cx| side.poll_head(cx, 65_536)).await.unwrap().is_none(), "clean close");
        }
    }

    /// What `write_response` puts on the wire, and whether the connection
    /// may carry another request.
    async fn written<B>(resp: Response<B>, meta: ResponseMeta) -> (String, bool)
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let (_side, mut wr, mut peer) = connection(64 * 1024);
        let mut out = Vec::new();
        let reusable = write_response(&mut wr, &mut out, resp, None, meta).await.unwrap();
        drop(wr);
        drop(_side);
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.unwrap();
        (String::from_utf8(all).unwrap(), reusable)
    }

    fn meta(head_request: bool, connect: bool, http10: bool) -> ResponseMeta {
        ResponseMeta { head_request, connect, http10, close: false, send_timeout: Duration::from_secs(5) }
    }

    fn response(status: u16, fields: &[(&str, &str)], body: &'static str) -> Response<Full<Bytes>> {
        let mut r = Response::builder().status(status);
        for (k, v) in fields {
            r = r.header(*k, *v);
        }
        r.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
    }

    const DATE: (&str, &str) = ("date", "Wed, 02 Dec 2026 08:00:00 GMT");

    #[tokio::test]
    async fn response_heads_are_byte_exact() {
        // A body of known length: its own Content-Length, never the map's.
        let (w, keep) =
            written(response(200, &[DATE, ("content-length", "99")], "hello"), meta(false, false, false)).await;
        assert_eq!(w, "HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\ncontent-length: 5\r\n\r\nhello");
        assert!(keep);
        // HEAD: the representation's length stays, no body follows.
        let (w, _) = written(response(200, &[("content-length", "5"), DATE], ""), meta(true, false, false)).await;
        assert_eq!(w, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\n\r\n");
        // 204 must not carry a length; 304 keeps the representation's.
        let (w, _) = written(response(204, &[("content-length", "7"), DATE], ""), meta(false, false, false)).await;
        assert_eq!(w, "HTTP/1.1 204 No Content\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\n\r\n");
        let (w, _) = written(response(304, &[("content-length", "10"), DATE], ""), meta(false, false, false)).await;
        assert_eq!(w, "HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\n\r\n");
        // CONNECT 200: no length, no body; the tunnel follows.
        let (w, keep) = written(response(200, &[DATE], ""), meta(false, true, false)).await;
        assert_eq!(w, "HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\n\r\n");
        assert!(keep);
        // Unknown length: chunked for HTTP/1.1 ...
        let pieces = || Pieces(VecDeque::from([Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]));
        let resp = |b| {
            let mut r = Response::new(b);
            r.headers_mut().insert("date", http::HeaderValue::from_static(DATE.1));
            r
        };
        let (w, keep) = written(resp(pieces()), meta(false, false, false)).await;
        assert_eq!(
            w,
            "HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
        );
        assert!(keep);
        // ... and delimited by closing for HTTP/1.0, which says so.
        let (w, keep) = written(resp(pieces()), meta(false, false, true)).await;
        assert_eq!(w, "HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\nconnection: close\r\n\r\nabcde");
        assert!(!keep, "a close-delimited body ends the connection");
        // No Date from anyone: credproxy adds one.
        let (w, _) = written(response(200, &[], "x"), meta(false, false, false)).await;
        let date = w.lines().find_map(|l| l.strip_prefix("date: ")).expect("a Date line");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
        assert!(w.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ndate: ") && w.ends_with("GMT\r\n\r\nx"), "{w}");
    }
}
