//! The upstream side of HTTP/1.1: one request at a time on a connection the
//! caller's task drives itself — writing the request while watching for the
//! response head (an upstream may answer before the body is sent), then
//! reading the response body as the caller's side asks for it.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{header, Method, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    find_head_end, read_into, Decoder, Encoder, Error, Framing, IdleTimer, Pending, RawFields, MAX_RESPONSE_HEAD,
};

/// Response header fields accepted; more is a protocol error (502).
const MAX_RESPONSE_HEADERS: usize = 256;
/// Request bytes queued before they are written.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// How the body of a request goes out, from what the body says of itself.
pub fn framing_of<B: Body>(body: &B) -> Framing {
    if body.is_end_stream() {
        return Framing::Empty;
    }
    match body.size_hint().exact() {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    }
}

/// Why a request got no response head.
#[derive(Debug)]
pub struct SendError {
    pub error: Error,
    /// No byte of a response arrived: the upstream may have closed an idle
    /// connection just as the request went out.
    pub nothing_received: bool,
    /// Writing the request failed: the upstream did not get all of it.
    pub write_failed: bool,
}

impl SendError {
    /// The request may go again on a new connection: nothing came back and
    /// either it never fully left or repeating it is harmless (RFC 9110
    /// §9.2.2). Only bodiless requests are repeated.
    pub fn retryable(&self, method: &Method, framing: Framing) -> bool {
        let idempotent = matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        self.nothing_received && framing == Framing::Empty && (self.write_failed || idempotent) && self.error.is_io()
    }
}

/// An HTTP/1.1 connection to an upstream.
pub struct Conn<T> {
    io: T,
    /// Bounds the wait for response heads. One per connection, re-armed
    /// lazily: it fires at most once per timeout period, and is then
    /// checked against the deadline of the request in flight.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The waker the timer holds (it was polled with it and has not fired
    /// since): a task that polls the connection again with the same waker
    /// need not poll the timer (~120 instructions a request). A pooled
    /// connection moves between callers' tasks; another task polls it.
    timer_waker: Option<std::task::Waker>,
    rbuf: BytesMut,
    scanned: usize,
    wbuf: Vec<u8>,
    body: Decoder,
    /// Bounds the wait for more of a response body (its own timer: the
    /// head timer above is re-armed lazily and must not be moved later).
    body_idle: IdleTimer,
    /// Another request may follow once the current response's body is read.
    reusable: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    /// `body_idle`: longest wait for more of a response body.
    pub fn new(io: T, body_idle: std::time::Duration) -> Self {
        Self {
            io,
            timer: None,
            timer_waker: None,
            rbuf: BytesMut::with_capacity(8192),
            scanned: 0,
            wbuf: Vec::with_capacity(1024),
            body: Decoder::done(),
            body_idle: IdleTimer::new(body_idle),
            reusable: true,
        }
    }

    /// Sends `parts` and `body`, and reads the response head, giving up at
    /// `deadline` ([`Error::Timeout`]). The response's header fields come as
    /// its body, unparsed ([`RawFields`]); its body is then read with
    /// [`Conn::poll_body`].
    ///
    /// One poll loop, longer than most on purpose: writing the request and
    /// watching for an early answer happen in the same poll (an upstream
    /// may answer 413 before it has read the body), and each way out of it
    /// says whether the connection can be reused — split up, those
    /// decisions would sit far from the state they read.
    /// `host`: the `Host` field's value when the caller has it at hand
    /// (what [`super::host_of`] gives for `parts.uri`), else found here.
    pub async fn send<B>(
        &mut self,
        parts: &http::request::Parts,
        host: Option<&str>,
        extra: &[(HeaderName, HeaderValue)],
        body: B,
        deadline: Instant,
    ) -> Result<Response<RawFields>, SendError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let framing = framing_of(&body);
        encode_request_head(&mut self.wbuf, parts, host, extra, framing);
        let head_request = parts.method == Method::HEAD;
        let mut encoder = match framing {
            Framing::Empty | Framing::Length(0) => None,
            Framing::Length(n) => Some(Encoder::Length(n)),
            Framing::Chunked | Framing::Close => Some(Encoder::Chunked),
        };
        self.reusable = true;
        self.body = Decoder::done();
        let mut body = pin!(body);
        let mut pending = Pending::default();
        let mut sent = false;
        let mut received = false;
        let result = std::future::poll_fn(|cx| {
            let this = &mut *self;
            // Write side: queue what the body has ready, write what is queued.
            while !sent {
                // Set when the body has nothing ready: its waker is registered.
                let mut body_pending = false;
                while let Some(enc) = encoder.as_mut() {
                    if pending.has_data() || this.wbuf.len() >= WRITE_HIGH_WATER {
                        break;
                    }
                    match body.as_mut().poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            let Ok(data) = frame.into_data() else { continue };
                            if data.is_empty() {
                                continue;
                            }
                            match enc.frame(&mut this.wbuf, data) {
                                Ok((rest, crlf)) => {
                                    if rest.is_some() {
                                        pending.set(rest, crlf);
                                    }
                                }
                                Err(e) => return Poll::Ready(Err(send_error(e, received, true))),
                            }
                        }
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(Err(send_error(body_error(e.into()), received, true)));
                        }
                        Poll::Ready(None) => {
                            if let Err(e) = enc.finish(&mut this.wbuf) {
                                return Poll::Ready(Err(send_error(e, received, true)));
                            }
                            encoder = None;
                        }
                        Poll::Pending => {
                            body_pending = true;
                            break;
                        }
                    }
                }
                match pending.poll_flush(&mut this.io, &mut this.wbuf, cx) {
                    Poll::Ready(Ok(())) => {
                        if encoder.is_none() {
                            sent = true;
                        } else if body_pending {
                            break;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(send_error(Error::Io(e), received, true))),
                    Poll::Pending => break,
                }
            }
            // Read side: the head may come before the body has gone out.
            if let Poll::Ready(r) = this.poll_head(cx, head_request, &mut received) {
                return Poll::Ready(r);
            }
            let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
            let holds_ours = this.timer_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if holds_ours && !timer.is_elapsed() {
                // It wakes this task when it fires; checked then.
                return Poll::Pending;
            }
            while timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= deadline {
                    this.timer_waker = None;
                    return Poll::Ready(Err(send_error(Error::Timeout, received, !sent)));
                }
                timer.as_mut().reset(deadline.into());
            }
            if !holds_ours {
                this.timer_waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        if !sent {
            // An early answer: the rest of the request body is not sent, so
            // the connection cannot be reused.
            self.reusable = false;
        }
        result
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        received: &mut bool,
    ) -> Poll<Result<Response<RawFields>, SendError>> {
        // The first read into an empty buffer mostly brings the whole head
        // and a small body: parsed at once, without the scan for the head's
        // end (a `memchr` per line, ~200 instructions); the bytes after the
        // head go back into the buffer (a copy: hence only for small reads).
        let mut fresh = false;
        loop {
            let parsed = if fresh && self.rbuf.len() <= FRESH_PARSE_MAX {
                fresh = false;
                let whole = self.rbuf.split().freeze();
                match parse_response(whole, head_request, Some(&mut self.rbuf)) {
                    Ok(Some(parsed)) => Some(parsed),
                    Ok(None) => None,
                    Err(e) => return Poll::Ready(Err(send_error(e, true, false))),
                }
            } else {
                // (Nothing to scan before the first read: the usual case.)
                let found = if self.rbuf.is_empty() { None } else { find_head_end(&self.rbuf, &mut self.scanned) };
                match found {
                    Some(end) => {
                        self.scanned = 0;
                        let head = self.rbuf.split_to(end).freeze();
                        // Without `rest`, an incomplete head is an error, not `None`.
                        parse_response(head, head_request, None).map_err(|e| send_error(e, true, false))?
                    }
                    None => None,
                }
            };
            if let Some((resp, framing, keep_alive)) = parsed {
                let status = resp.status();
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Poll::Ready(Err(send_error(Error::Malformed("unexpected 101 response"), true, false)));
                }
                if status.is_informational() {
                    // 100 Continue, 103 Early Hints: the final response follows.
                    continue;
                }
                self.body = Decoder::new(framing);
                self.body_idle.progress();
                self.reusable &= keep_alive;
                return Poll::Ready(Ok(resp));
            }
            if self.rbuf.len() > MAX_RESPONSE_HEAD {
                return Poll::Ready(Err(send_error(Error::HeadTooLarge(MAX_RESPONSE_HEAD), true, false)));
            }
            fresh = self.rbuf.is_empty();
            match std::task::ready!(read_into(&mut self.io, cx, &mut self.rbuf, 8192)) {
                Ok(0) => return Poll::Ready(Err(send_error(Error::Incomplete, *received, false))),
                Ok(_) => *received = true,
                Err(e) => return Poll::Ready(Err(send_error(Error::Io(e), *received, false))),
            }
        }
    }

    /// The next piece of the response body; [`Error::Timeout`] when none
    /// arrived for the body idle timeout.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Error>>> {
        match self.body.poll_next(&mut self.io, &mut self.rbuf, cx) {
            Poll::Ready(Some(Err(e))) => {
                self.reusable = false;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(data))) => {
                self.body_idle.progress();
                Poll::Ready(Some(Ok(data)))
            }
            Poll::Pending => {
                if self.body_idle.poll_expired(cx).is_pending() {
                    return Poll::Pending;
                }
                self.reusable = false;
                Poll::Ready(Some(Err(Error::Timeout)))
            }
            other => other,
        }
    }

    pub fn body_done(&self) -> bool {
        self.body.is_done()
    }

    /// Bytes of the response body still expected, when its framing says.
    pub fn body_remaining(&self) -> Option<u64> {
        self.body.remaining()
    }

    /// Can carry another request now: the last response was read to its
    /// end, nothing extra arrived, and the upstream has not closed the
    /// connection (checked with one poll that needs no task to wake: a
    /// closed socket is readable).
    pub fn usable(&mut self) -> bool {
        if !self.reusable() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        matches!(Pin::new(&mut self.io).poll_read(&mut cx, &mut rb), Poll::Pending)
    }

    /// The last response was read to its end, nothing extra arrived, and
    /// neither side asked to close: the connection may go back to the pool.
    pub fn reusable(&self) -> bool {
        self.reusable && self.body.is_done() && self.rbuf.is_empty()
    }

    /// Bytes read from the upstream and not yet taken (the fuzz targets'
    /// view of what follows a response).
    #[cfg(feature = "fuzzing")]
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

/// Why the request body being sent failed; a caller that stopped sending
/// it stays recognisable (408, not 400).
fn body_error(e: Box<dyn std::error::Error + Send + Sync>) -> Error {
    match e.downcast_ref::<Error>() {
        Some(Error::BodyTimeout) => Error::BodyTimeout,
        _ => Error::Body(e.to_string()),
    }
}

fn send_error(error: Error, received: bool, write_failed: bool) -> SendError {
    SendError { error, nothing_received: !received, write_failed }
}

/// The request line and header fields; the framing fields and `Host` are
/// ours: `Host` is the target's authority ([`super::host_of`]), whatever a
/// field in the map says (none should: the caller's never gets there).
/// `extra`: fields set on top of the map's (a credential's header edits,
/// kept per caller connection rather than inserted into each request's
/// map): a map field of the same name is not written, so each is written
/// once, as given.
pub(crate) fn encode_request_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    host: Option<&str>,
    extra: &[(HeaderName, HeaderValue)],
    framing: Framing,
) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.uri.path_and_query().map(|pq| pq.as_str()) {
        // `http://host?q` has an empty path: origin-form needs its "/".
        Some(t) if t.starts_with('/') => out.extend_from_slice(t.as_bytes()),
        Some(t) if t.starts_with('?') => {
            out.push(b'/');
            out.extend_from_slice(t.as_bytes());
        }
        Some("*") => out.push(b'*'),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host.or_else(|| super::host_of(&parts.uri)) {
        super::put_field(out, b"host", host.as_bytes());
    }
    let ours =
        |name: &HeaderName| name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::HOST;
    for (name, value) in &parts.headers {
        if ours(name) || extra.iter().any(|(set, _)| set == name) {
            continue;
        }
        super::put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // Never one of ours (integrations cannot inject them; checked again).
    for (name, value) in extra.iter().filter(|(name, _)| !ours(name)) {
        super::put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Empty | Framing::Length(0) => {
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            super::write_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked | Framing::Close => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head: the response (its fields unparsed, in the body
/// slot), its body framing (RFC 9112 §6.3) and whether the upstream keeps
/// the connection open.
/// A read into an empty buffer at most this large is parsed at once
/// ([`Conn::poll_head`]); larger ones are scanned for the head's end first,
/// so that a large body is not copied back.
const FRESH_PARSE_MAX: usize = 2048;

/// A parsed response head: the response (its fields as raw lines), its
/// body's framing, whether the connection can be reused after it.
type Parsed = (Response<RawFields>, Framing, bool);

/// Parses the response head at the start of `head`. With `rest` (`head`
/// is all that was read; the buffer is empty): what follows the head goes
/// back into `rest`, and an incomplete head is `None`, all of `head` back
/// in `rest`. Without, `head` was cut at the blank line the scan found.
fn parse_response(head: Bytes, head_request: bool, rest: Option<&mut BytesMut>) -> Result<Option<Parsed>, Error> {
    let mut fields = super::head::Fields::new();
    let parsed = super::head::response(&head, &mut fields, MAX_RESPONSE_HEADERS);
    let line = match (parsed, rest) {
        (Ok(httparse::Status::Complete((end, line))), Some(rest)) => {
            rest.extend_from_slice(&head[end..]);
            line
        }
        (Ok(httparse::Status::Complete((end, _))), None) if end < head.len() => {
            return Err(Error::Malformed("response head ends before its blank line"))
        }
        (Ok(httparse::Status::Complete((_, line))), None) => line,
        (Ok(httparse::Status::Partial), Some(rest)) => {
            // Read on; the scan takes over.
            rest.extend_from_slice(&head);
            return Ok(None);
        }
        (Ok(httparse::Status::Partial), None) => return Err(Error::Malformed("incomplete response head")),
        (Err(httparse::Error::TooManyHeaders), _) => return Err(Error::TooManyHeaders),
        (Err(_), _) => return Err(Error::Malformed("invalid status line or header field")),
    };
    let status = StatusCode::from_u16(line.code).map_err(|_| Error::Malformed("invalid status code"))?;
    let minor = line.minor;
    // This client never sends CONNECT: only HEAD and the status decide.
    let bodiless = !super::response_can_have_body(status, head_request, false);
    let (fields, s) = RawFields::from_parsed(Some(&head), &fields, bodiless)?;
    let framing = if bodiless { Framing::Empty } else { super::response_framing(minor, &s)? };
    let keep_alive = s.keep_alive(minor) && framing != Framing::Close;
    let mut out = Response::new(fields);
    *out.status_mut() = status;
    *out.version_mut() = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    Ok(Some((out, framing, keep_alive)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(s: &str, head_request: bool) -> Result<Parsed, Error> {
        parse_response(Bytes::copy_from_slice(s.as_bytes()), head_request, None).map(|p| p.expect("a whole head"))
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |s: &str| resp(s, false).map(|(_, f, k)| (f, k)).unwrap();
        assert_eq!(f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), (Framing::Length(5), true));
        assert_eq!(f("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), (Framing::Chunked, true));
        // Codings other than chunked, TE with a length, TE on HTTP/1.0: refused, never relabelled.
        for bad in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(resp(bad, false), Err(Error::Malformed(_))), "{bad:?}");
        }
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n"), (Framing::Close, false));
        assert_eq!(f("HTTP/1.1 204 No Content\r\n\r\n"), (Framing::Empty, true));
        assert_eq!(f("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"), (Framing::Empty, true));
        assert_eq!(f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"), (Framing::Length(5), false));
        assert_eq!(f("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"), (Framing::Length(5), false));
        assert_eq!(
            f("HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"),
            (Framing::Length(5), true)
        );
        let (_, framing, _) = resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap();
        assert_eq!(framing, Framing::Empty, "a response to HEAD has no body");
        assert!(resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", false).is_err());
        assert!(resp("HTTP/1.1 999999 OK\r\n\r\n", false).is_err());
        let many: String = (0..60).map(|i| format!("X-{i}: v\r\n")).collect();
        let (r, _, _) = resp(&format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 0\r\n\r\n"), false).unwrap();
        let mut map = http::HeaderMap::new();
        r.body().append_to(&mut map).unwrap();
        assert_eq!(map.len(), 60, "framing fields are the codec's, not among the fields");
        assert_eq!(map["x-59"], "v");
        // Hop-by-hop fields (and what Connection lists) never reach the map;
        // a bodiless response keeps its Content-Length.
        let (r, _, keep) = resp(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-End: 2\r\nContent-Length: 7\r\n\r\n",
            true,
        )
        .unwrap();
        assert!(keep);
        assert_eq!(format!("{:?}", r.body()), r#"["X-End", "Content-Length"]"#);
        let mut out = Vec::new();
        r.body().write_to(&mut out, true);
        assert_eq!(out, b"X-End: 2\r\nContent-Length: 7\r\n");
        out.clear();
        r.body().write_to(&mut out, false);
        assert_eq!(out, b"X-End: 2\r\n", "the caller's side frames the body: no Content-Length");
    }

    #[test]
    fn request_heads_carry_our_framing_only() {
        let mut req = http::Request::post("http://up.test:8080/p?q=1").body(()).unwrap();
        req.headers_mut().insert("host", "up.test:8080".parse().unwrap());
        req.headers_mut().insert("content-length", "99".parse().unwrap());
        req.headers_mut().insert("transfer-encoding", "gzip".parse().unwrap());
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_request_head(&mut out, &parts, None, &[], Framing::Length(3));
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: up.test:8080\r\ncontent-length: 3\r\n\r\n"
        );
        encode_request_head(&mut out, &parts, None, &[], Framing::Chunked);
        assert!(String::from_utf8_lossy(&out).ends_with("transfer-encoding: chunked\r\n\r\n"));
        encode_request_head(&mut out, &parts, None, &[], Framing::Empty);
        assert!(String::from_utf8_lossy(&out).ends_with("content-length: 0\r\n\r\n"), "POST without body says so");
        // A target with a query but no path gets its "/".
        for (uri, line) in [("http://up.test?a=1", "GET /?a=1 HTTP/1.1\r\n"), ("http://up.test", "GET / HTTP/1.1\r\n")]
        {
            let (parts, ()) = http::Request::get(uri).body(()).unwrap().into_parts();
            encode_request_head(&mut out, &parts, None, &[], Framing::Empty);
            assert!(String::from_utf8_lossy(&out).starts_with(line), "{uri}: {:?}", String::from_utf8_lossy(&out));
            // No `Host` field: the target's authority is the one.
            assert_eq!(String::from_utf8_lossy(&out).matches("host: ").count(), 1, "{uri}");
            assert!(String::from_utf8_lossy(&out).contains("\r\nhost: up.test\r\n"), "{uri}");
        }
        // `Host` fields in the map (whatever their case or number) are not
        // written: the target's authority is, once, without the default port.
        for (uri, host) in [
            ("http://up.test/", "up.test"),
            ("http://up.test:80/", "up.test"),
            ("https://up.test:443/", "up.test"),
            ("http://up.test:443/", "up.test:443"),
            ("https://up.test:8443/", "up.test:8443"),
            ("http://[::1]:8080/", "[::1]:8080"),
            ("http://user:pw@up.test:8080/", "up.test:8080"),
        ] {
            let mut req = http::Request::get(uri).body(()).unwrap();
            req.headers_mut().insert("HOST", "other.test".parse().unwrap());
            req.headers_mut().append("host", "up.test".parse().unwrap());
            req.headers_mut().append("content-length", "1".parse().unwrap());
            req.headers_mut().append("content-length", "2".parse().unwrap());
            req.headers_mut().append("x-after", "3".parse().unwrap());
            let (parts, ()) = req.into_parts();
            encode_request_head(&mut out, &parts, None, &[], Framing::Empty);
            let want = format!("GET / HTTP/1.1\r\nhost: {host}\r\nx-after: 3\r\n\r\n");
            assert_eq!(String::from_utf8_lossy(&out), want, "{uri}");
        }
    }

    /// Fields set over the map's (a credential's header edits) are written
    /// once each, after the map's, and a map field of the same name (any
    /// case, any count) is not written; none of them can be a field the
    /// encoder owns.
    #[test]
    fn extra_fields_replace_the_maps_of_their_name() {
        let mut req = http::Request::get("http://up.test/").body(()).unwrap();
        for (k, v) in [("authorization", "Bearer mine"), ("x-a", "1"), ("Authorization", "Basic b"), ("x-b", "2")] {
            req.headers_mut().append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let (parts, ()) = req.into_parts();
        let extra = [
            (header::AUTHORIZATION, HeaderValue::from_static("Bearer injected")),
            (HeaderName::from_static("x-key"), HeaderValue::from_static("k")),
            (header::CONTENT_LENGTH, HeaderValue::from_static("99")),
            (header::HOST, HeaderValue::from_static("evil.test")),
        ];
        let mut out = Vec::new();
        encode_request_head(&mut out, &parts, None, &extra, Framing::Empty);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: up.test\r\nx-a: 1\r\nx-b: 2\r\nauthorization: Bearer injected\r\nx-key: k\r\n\r\n"
        );
    }

    // ---- at the I/O boundary: a duplex pipe stands in for the upstream ----

    use http_body_util::Full;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn upstream(buffer: usize) -> (Conn<DuplexStream>, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(buffer);
        (Conn::new(ours, Duration::from_secs(5)), theirs)
    }

    fn post(body: Vec<u8>) -> (http::request::Parts, Full<Bytes>) {
        let (parts, ()) = http::Request::post("http://up.test/p").body(()).unwrap().into_parts();
        (parts, Full::new(Bytes::from(body)))
    }

    /// Reads a request head off the pipe.
    async fn read_head(peer: &mut DuplexStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(peer.read(&mut b).await.unwrap(), 1, "closed mid-head");
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    async fn body_of(conn: &mut Conn<DuplexStream>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(piece) = std::future::poll_fn(|cx| conn.poll_body(cx)).await {
            out.extend_from_slice(&piece.unwrap());
        }
        out
    }

    /// An upstream that answers 413 after the head, without reading the
    /// 1 MiB body (the pipe holds 4 KiB): the answer comes back, and the
    /// connection is not reused (the rest of the body was never sent).
    #[tokio::test]
    async fn an_early_answer_ends_the_exchange_and_the_connection() {
        let (mut conn, mut peer) = upstream(4096);
        let server = tokio::spawn(async move {
            let head = read_head(&mut peer).await;
            peer.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            (head, peer)
        });
        let (parts, body) = post(vec![b'x'; 1 << 20]);
        let resp = conn.send(&parts, None, &[], body, Instant::now() + Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.status(), 413);
        let (head, _peer) = server.await.unwrap();
        assert!(head.starts_with("POST /p HTTP/1.1\r\n") && head.contains("content-length: 1048576\r\n"), "{head}");
        assert!(conn.body_done());
        assert!(!conn.reusable(), "the body was cut short: the connection cannot carry another request");
    }

    /// A response read in one piece, in pieces, or larger than a read
    /// parsed at once: the same head and body each time, and the
    /// connection reusable for the next.
    #[tokio::test]
    async fn a_response_reads_the_same_however_it_arrives() {
        let big = "x".repeat(3000);
        let small = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello".to_owned();
        let large = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-a: 1\r\n\r\n{big}", big.len());
        let cases: [(&str, Vec<usize>, &[u8]); 4] = [
            (small.as_str(), vec![small.len()], b"hello"),
            (small.as_str(), vec![20, small.len() - 20], b"hello"),
            (small.as_str(), vec![small.len() - 6, 6], b"hello"),
            (large.as_str(), vec![large.len()], big.as_bytes()),
        ];
        for (answer, pieces, want) in cases {
            let (mut conn, mut peer) = upstream(64 * 1024);
            let (bytes, pieces_) = (answer.as_bytes().to_vec(), pieces.clone());
            let server = tokio::spawn(async move {
                for _ in 0..2 {
                    read_head(&mut peer).await;
                    let mut at = 0;
                    for n in &pieces_ {
                        peer.write_all(&bytes[at..at + n]).await.unwrap();
                        peer.flush().await.unwrap();
                        at += n;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                peer
            });
            for round in 0..2 {
                let (parts, body) = post(b"hi".to_vec());
                let resp = conn.send(&parts, None, &[], body, Instant::now() + Duration::from_secs(5)).await.unwrap();
                assert_eq!(resp.status(), 200, "{pieces:?}");
                assert_eq!(format!("{:?}", resp.body()), r#"["x-a"]"#, "{pieces:?}");
                assert_eq!(body_of(&mut conn).await, want, "{pieces:?}, request {round}");
                assert!(conn.reusable(), "{pieces:?}");
            }
            let _peer = server.await.unwrap();
        }
    }

    /// 103 Early Hints, then the response: only the final one is returned.
    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (mut conn, mut peer) = upstream(64 * 1024);
        let server = tokio::spawn(async move {
            read_head(&mut peer).await;
            let answer = "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
                          HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-final: 1\r\n\r\nok";
            peer.write_all(answer.as_bytes()).await.unwrap();
            peer
        });
        let (parts, body) = post(b"hi".to_vec());
        let resp = conn.send(&parts, None, &[], body, Instant::now() + Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(format!("{:?}", resp.body()), r#"["x-final"]"#, "the 103's fields are not the response's");
        assert_eq!(body_of(&mut conn).await, b"ok");
        let _peer = server.await.unwrap();
        assert!(conn.reusable());
    }

    /// No length, no chunking: the body ends when the upstream closes, and
    /// the connection is done.
    #[tokio::test]
    async fn a_close_delimited_body_ends_at_the_close() {
        let (mut conn, mut peer) = upstream(64 * 1024);
        tokio::spawn(async move {
            read_head(&mut peer).await;
            peer.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ").await.unwrap();
            peer.write_all(b"the end").await.unwrap();
        });
        let (parts, body) = post(Vec::new());
        let resp = conn.send(&parts, None, &[], body, Instant::now() + Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(conn.body_remaining(), None);
        assert_eq!(body_of(&mut conn).await, b"until the end");
        assert!(!conn.reusable(), "a close-delimited body uses up the connection");
    }
}
