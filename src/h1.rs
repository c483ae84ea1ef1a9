//! HTTP/1.1 on the proxy's data plane, both sides of a proxied request:
//! [`server`] reads callers' request heads and bodies and writes responses
//! (the proxy listener and intercepted tunnels); [`client`] writes requests
//! to upstreams and reads their responses (for `upstream::pool`). Everything
//! runs on the task serving the request: no connection tasks, no channels
//! between a connection and its bodies.
//!
//! This module holds what both sides share: message framing (RFC 9112 §6),
//! the head tokenizer ([`head`]), the chunked coding, a head scanner that
//! stays linear however a head is split across reads, and a writer that
//! sends a head and body bytes in one vectored write. It is strict on purpose: a request whose framing could be
//! read two ways (`Content-Length` with `Transfer-Encoding`, differing
//! lengths, a coding other than `chunked`, a malformed chunk line) is
//! refused, not guessed at — a proxy that frames a body differently from its
//! upstream is a request-smuggling vector. Bodies are always re-framed on the
//! way out, never copied with their original framing.
//!
//! Why not hyper here: in the load bench, hyper's HTTP/1 server and client
//! dispatchers (and the channels between a connection and its bodies) were
//! about two thirds of credproxy's user-space CPU per request. hyper still
//! serves h2 (intercepted tunnels, upstreams that choose h2 by ALPN) and the
//! admin API.
//!
//! Leaf but for [`crate::scan`] (the tokenizer's eight-byte scans).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Uri};
use tokio::io::{AsyncRead, AsyncWrite};

pub mod client;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod head;
pub mod server;
pub mod transport;

/// Header fields parsed per head; more is an error (431 from callers).
pub const MAX_HEADERS: usize = 128;
/// Largest response head accepted from an upstream.
pub const MAX_RESPONSE_HEAD: usize = 256 * 1024;
/// Chunk extensions and trailers are read and dropped, up to this much per
/// body (trailer line ends included).
const MAX_CHUNK_OVERHEAD: usize = 8 * 1024;
/// Trailer fields per body.
const MAX_TRAILERS: u8 = 64;
/// Bytes read at a time while a body streams.
const BODY_READ: usize = 64 * 1024;
/// Data frames up to this size are copied next to their framing; larger ones
/// are written from where they are (vectored write).
const COPY_LIMIT: usize = 8 * 1024;

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("message head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("connection closed before the message was complete")]
    Incomplete,
    #[error("body does not match its declared length")]
    LengthMismatch,
    #[error("the body being sent failed: {0}")]
    Body(String),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("timed out")]
    Timeout,
    #[error("the request body stopped arriving")]
    BodyTimeout,
}

impl Error {
    /// A transport error (reset, broken pipe, TLS failure) rather than a
    /// protocol violation by the peer.
    pub fn is_io(&self) -> bool {
        matches!(self, Self::Io(_) | Self::Incomplete)
    }
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the peer closes the connection (responses only).
    Close,
}

/// What the framing-relevant header fields of a head say, read in the one
/// pass that builds its header map.
#[derive(Debug, Default)]
struct FieldSummary {
    content_length: Option<u64>,
    /// `Transfer-Encoding` was present.
    transfer_encoding: bool,
    /// Every `Transfer-Encoding` value together is exactly `chunked`.
    chunked_only: bool,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    /// A `Connection` field names other fields (hop-by-hop for this message).
    lists_names: bool,
}

/// A request field the proxy reads itself and never forwards: absent,
/// sent once, or sent more than once (ambiguous: refused by the proxy).
/// The codec sets it aside while it builds the header map, so nothing past
/// the codec can forward it, and a field inserted into the map (its name
/// hashed) only to be removed again — ~500 instructions a request for
/// `X-Connection-Id`, ~400 for a run token's `Proxy-Authorization` — is
/// never paid. A field `Connection` names is hop-by-hop for this message:
/// gone, like any other (absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OwnField {
    #[default]
    Absent,
    One(OwnValue),
    /// More than one field line.
    Repeated,
}

/// A set-aside field's value as the caller sent it: bytes the tokenizer
/// ([`head`]) let through as a field value (no control characters but tab), not checked
/// again as a `HeaderValue` (~3 instructions a byte: ~200 a request for a
/// run token) — the proxy reads it, and nothing forwards it. `Debug` shows
/// its length only: it may be a run token.
#[derive(Clone, PartialEq, Eq)]
pub struct OwnValue(Bytes);

impl OwnValue {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// A field of an h2 request's header map (copied).
    pub fn of_header(value: &HeaderValue) -> Self {
        Self(Bytes::copy_from_slice(value.as_bytes()))
    }

    pub fn from_static(value: &'static str) -> Self {
        Self(Bytes::from_static(value.as_bytes()))
    }
}

impl std::fmt::Debug for OwnValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnValue({} bytes)", self.0.len())
    }
}

impl OwnField {
    /// One more field line of this name.
    fn add(&mut self, value: OwnValue) {
        *self = match self {
            Self::Absent => Self::One(value),
            _ => Self::Repeated,
        };
    }
}

/// The fields of a request the codec set aside for the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnFields {
    /// `X-Connection-Id`: names the credential the proxy injects.
    pub connection_id: OwnField,
    /// `Proxy-Authorization`: the caller's run token (or a credential for
    /// the proxy, dropped); for the proxy only (RFC 9110 §11.7.2).
    pub proxy_authorization: OwnField,
}

/// What a header field name means to the codec, found from its bytes in
/// any case: framing and connection-management fields are the codec's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    Date,
    /// A request's `Host`: the upstream side writes the target's authority
    /// instead ([`host_of`]).
    Host,
    /// `X-Connection-Id` ([`OwnFields`]).
    ConnectionId,
    /// `Proxy-Authorization` ([`OwnFields`]).
    ProxyAuthorization,
    /// Another hop-by-hop field (RFC 9110 §7.6.1).
    HopByHop,
    /// A name that differs from one the proxy owns or strips only by `_`
    /// for `-` (`Content_Length`, `X_Connection_Id`): CGI-style upstreams
    /// read both as the same field, so it is never forwarded.
    Lookalike,
    /// A response field that names a URL (`Location`, `Content-Location`,
    /// `Link`, `Refresh`): where an upstream may echo an injected value.
    UrlRef,
    Other,
}

impl Kind {
    fn of(name: &[u8]) -> Self {
        let is = |s: &str| token_is(name, s.as_bytes());
        let like = |s: &str| names_alike(name, s.as_bytes());
        // By length first: most names are compared with nothing at all.
        match name.len() {
            14 if is("content-length") => Self::ContentLength,
            17 if is("transfer-encoding") => Self::TransferEncoding,
            10 if is("connection") => Self::Connection,
            6 if is("expect") => Self::Expect,
            4 if is("date") => Self::Date,
            4 if is("host") => Self::Host,
            15 if is("x-connection-id") => Self::ConnectionId,
            19 if is("proxy-authorization") => Self::ProxyAuthorization,
            2 if is("te") => Self::HopByHop,
            7 if is("trailer") || is("upgrade") => Self::HopByHop,
            10 if is("keep-alive") => Self::HopByHop,
            16 if is("proxy-connection") => Self::HopByHop,
            18 if is("proxy-authenticate") => Self::HopByHop,
            8 if is("location") => Self::UrlRef,
            16 if is("content-location") => Self::UrlRef,
            4 if is("link") => Self::UrlRef,
            7 if is("refresh") => Self::UrlRef,
            14 if like("content-length") => Self::Lookalike,
            17 if like("transfer-encoding") => Self::Lookalike,
            10 if like("keep-alive") => Self::Lookalike,
            15 if like("x-connection-id") => Self::Lookalike,
            16 if like("proxy-connection") => Self::Lookalike,
            18 if like("proxy-authenticate") => Self::Lookalike,
            19 if like("proxy-authorization") => Self::Lookalike,
            _ => Self::Other,
        }
    }

    /// Never forwarded: hop-by-hop for this connection, or a lookalike of one.
    fn hop_by_hop(self) -> bool {
        matches!(self, Self::TransferEncoding | Self::Connection | Self::HopByHop | Self::Lookalike)
    }
}

/// `name` is `lit` in any case. `name` is a field name ([`head`] and
/// `HeaderName` let only tokens through), `lit` lowercase letters and `-`.
/// For a token byte, `b | 0x20` is the lowercase letter when `b` is a
/// letter, and `b` itself when it is `-`, a digit or one of ``!#$%&'*+.`|~``;
/// `^` and `_` become `~` and DEL, which no literal holds. So one OR and
/// one compare per eight bytes decide what `eq_ignore_ascii_case` decides
/// byte by byte (a test checks every token byte at every position).
#[inline(always)]
fn token_is(name: &[u8], lit: &[u8]) -> bool {
    const LOWER: u64 = 0x2020_2020_2020_2020;
    let n = lit.len();
    if name.len() != n {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lit).all(|(a, b)| a | 0x20 == *b);
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
    let mut at = 0;
    while at + 8 <= n {
        if word(name, at) | LOWER != word(lit, at) {
            return false;
        }
        at += 8;
    }
    // The last, partial word: the eight bytes that end the name.
    at == n || word(name, n - 8) | LOWER == word(lit, n - 8)
}

/// `name` is `of` with at least one `_` where `of` has `-` (any case):
/// a different field to us, the same one to a CGI-style server. Inlined
/// with a literal `of`, the first pass is a few byte compares at `of`'s
/// dashes, so a name without such an `_` (nearly all) costs little.
#[inline(always)]
pub fn names_alike(name: &[u8], of: &[u8]) -> bool {
    name.len() == of.len()
        && of.iter().zip(name).any(|(o, n)| *o == b'-' && *n == b'_')
        && name.iter().zip(of).all(|(a, b)| a.eq_ignore_ascii_case(b) || (*a == b'_' && *b == b'-'))
}

impl FieldSummary {
    fn observe(&mut self, kind: Kind, value: &[u8]) -> Result<(), Error> {
        match kind {
            Kind::ContentLength => {
                let n = parse_content_length(value)?;
                if self.content_length.is_some_and(|prev| prev != n) {
                    return Err(Error::Malformed("conflicting Content-Length values"));
                }
                self.content_length = Some(n);
            }
            Kind::TransferEncoding => {
                // Exactly one field line whose value is `chunked`: no list,
                // not even with an empty element (`,chunked` is chunked to
                // hyper and a 501 to nginx; `chunked,` is not chunked to
                // hyper: the `response` fuzz target found credproxy and
                // hyper framing it two ways).
                let first_header = !self.transfer_encoding;
                self.transfer_encoding = true;
                self.chunked_only = first_header && trim(value).eq_ignore_ascii_case(b"chunked");
            }
            Kind::Connection => {
                for token in list_items(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    } else {
                        self.lists_names = true;
                    }
                }
            }
            Kind::Expect if trim(value).eq_ignore_ascii_case(b"100-continue") => self.expect_continue = true,
            _ => {}
        }
        Ok(())
    }

    fn keep_alive(&self, minor: u8) -> bool {
        !self.close && (minor >= 1 || self.keep_alive)
    }
}

// ---- Message framing: RFC 9112 §6.3, step by step -----------------------
//
// Which body a message has is decided here and nowhere else; the caller's
// side (`server`) and the upstream's (`client`) ask these three functions.
// Strict on purpose: where the RFC lets a recipient guess or "treat the
// message as faulty", credproxy refuses it (a proxy that frames a body
// differently from its upstream is a request-smuggling vector).
//
//  1. A response to HEAD, any 1xx, 204 or 304 has no body, whatever its
//     fields say ([`response_can_have_body`]).
//  2. A 2xx response to CONNECT has no body: the tunnel follows (same).
//     A CONNECT request's head is followed by tunnel data, not a body
//     ([`request_framing`]).
//  3. `Transfer-Encoding`: only a lone `chunked` on HTTP/1.1 is accepted
//     (request: 400; response: 502, never relabelled for the caller);
//     another coding, `chunked` twice, or any `Transfer-Encoding` in an
//     HTTP/1.0 message is refused (RFC 9112 §6.1 calls the latter faulty).
//  4. `Transfer-Encoding` with `Content-Length`: the RFC lets the
//     transfer coding win; credproxy refuses both requests and responses.
//  5. An invalid `Content-Length` (not 1*DIGIT, or values that differ):
//     refused ([`FieldSummary::observe`]).
//  6. A valid `Content-Length`: exactly that many bytes.
//  7. A request with neither: no body.
//  8. A response with neither: the body runs until the connection closes
//     (which then cannot be reused).

/// Steps 1 and 2: whether a response to this request can have a body.
fn response_can_have_body(status: http::StatusCode, head_request: bool, connect: bool) -> bool {
    !(head_request
        || status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
        || (connect && status.is_success()))
}

/// Steps 2–7 for a request (HTTP/1.`minor`).
fn request_framing(method: &http::Method, minor: u8, s: &FieldSummary) -> Result<Framing, Error> {
    if method == http::Method::CONNECT {
        return Ok(Framing::Empty);
    }
    if s.transfer_encoding {
        if minor == 0 {
            return Err(Error::Malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if s.content_length.is_some() {
            return Err(Error::Malformed("both Content-Length and Transfer-Encoding"));
        }
        if !s.chunked_only {
            return Err(Error::Malformed("unsupported Transfer-Encoding (only chunked is accepted)"));
        }
        return Ok(Framing::Chunked);
    }
    Ok(match s.content_length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// Steps 3–8 for a response that can have a body (HTTP/1.`minor`).
fn response_framing(minor: u8, s: &FieldSummary) -> Result<Framing, Error> {
    if s.transfer_encoding {
        if minor == 0 {
            return Err(Error::Malformed("Transfer-Encoding in an HTTP/1.0 response"));
        }
        if s.content_length.is_some() {
            return Err(Error::Malformed("both Content-Length and Transfer-Encoding in a response"));
        }
        if !s.chunked_only {
            return Err(Error::Malformed("a response transfer coding other than chunked"));
        }
        return Ok(Framing::Chunked);
    }
    Ok(match s.content_length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// `Content-Length` is 1*DIGIT (up to 19 digits), nothing else: not a
/// list, not even of one repeated value. RFC 9110 §8.6 lets a recipient
/// accept `5, 5` as 5, but hyper's server and nginx refuse it, so a proxy
/// that accepted it would forward what both refuse (found by
/// tests/differential.rs). Repeated field lines with the same value are
/// still one length (`FieldSummary::observe`), as hyper reads them.
fn parse_content_length(value: &[u8]) -> Result<u64, Error> {
    let item = trim(value);
    if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
        return Err(Error::Malformed("invalid Content-Length"));
    }
    Ok(item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t')).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !matches!(c, b' ' | b'\t')).map_or(start, |e| e + 1);
    &b[start..end]
}

/// Non-empty items of a comma-separated field value.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(trim).filter(|i| !i.is_empty())
}

/// Hop-by-hop header fields (RFC 9110 §7.6.1), and names that differ from
/// one the proxy owns only by `_` for `-`, by name.
pub fn is_hop_by_hop(name: &str) -> bool {
    Kind::of(name.as_bytes()).hop_by_hop()
}

/// The `Host` a request for `uri` carries upstream: the target's authority
/// without user information (the proxy refuses targets with it; were one
/// to get here, it would not be sent) or its scheme's default port (`None`
/// for a target without an authority). Whatever `Host` a caller sent is not
/// forwarded: the authority is what the host check passed and where the
/// connection goes.
pub fn host_of(uri: &Uri) -> Option<&str> {
    let auth = uri.authority()?.as_str();
    // One '@' at most (RFC 3986 §3.2.1; `http` refuses more). A plain loop
    // over a short string: `rfind`'s searcher cost ~300 instructions, and
    // the codec imports nothing of the crate (tests/layering.rs).
    let at = auth.bytes().position(|b| b == b'@');
    let auth = at.map_or(auth, |at| &auth[at + 1..]);
    let default = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) { ":443" } else { ":80" };
    Some(auth.strip_suffix(default).unwrap_or(auth))
}

/// Appends one `name: value` field line.
fn put_field(out: &mut impl bytes::BufMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Builds a request's header map from parsed fields, sharing `head`'s
/// bytes for the values, and summarizes the framing fields on the way.
/// Hop-by-hop fields, and those `Connection` names, are read but left out
/// of the map: nothing past the codec may forward them. `Host` is left out
/// too: a proxy replaces it with the target's authority (RFC 9112 §3.2.2),
/// which the upstream side writes ([`host_of`]); the fields the proxy reads
/// itself are set aside ([`OwnFields`]). `Content-Length` is left out too
/// (bodies are re-framed on the way out) unless `keep_length`: a response
/// without a body (HEAD, 304), where it describes the representation.
/// The fields go into `map` (empty; the request's own, so no second map
/// is made and dropped) and `own` (reset here).
fn header_map(
    head: &Bytes,
    fields: &[head::Field<'_>],
    keep_length: bool,
    map: &mut HeaderMap,
    own: &mut OwnFields,
) -> Result<FieldSummary, Error> {
    // The map is allocated with the first field that goes in (often none
    // does: the credential is written from the caller connection's memo),
    // with room for the rest and one the proxy may add.
    let mut summary = FieldSummary::default();
    *own = OwnFields::default();
    for f in fields {
        // The tokenizer let only tokens through as names: `Kind::of` reads the
        // bytes as they are, and only a field that goes into the map needs
        // a `HeaderName` (hashed, perhaps allocated).
        let kind = Kind::of(f.name);
        summary.observe(kind, f.value)?;
        if kind.hop_by_hop() || kind == Kind::Host || (kind == Kind::ContentLength && !keep_length) {
            continue;
        }
        match kind {
            Kind::ConnectionId => own.connection_id.add(OwnValue(head.slice_ref(f.value))),
            Kind::ProxyAuthorization => own.proxy_authorization.add(OwnValue(head.slice_ref(f.value))),
            _ => {
                let value = HeaderValue::from_maybe_shared(head.slice_ref(f.value))
                    .map_err(|_| Error::Malformed("invalid header value"))?;
                let name = HeaderName::from_bytes(f.name).map_err(|_| Error::Malformed("invalid header field name"))?;
                if map.capacity() == 0 {
                    map.reserve(fields.len() + 1);
                }
                map.append(name, value);
            }
        }
    }
    if summary.lists_names {
        for token in connection_tokens(fields) {
            // Named by `Connection`: hop-by-hop, gone like any other.
            if token.eq_ignore_ascii_case(b"x-connection-id") {
                own.connection_id = OwnField::Absent;
            } else if token.eq_ignore_ascii_case(b"proxy-authorization") {
                own.proxy_authorization = OwnField::Absent;
            } else if let Ok(name) = HeaderName::from_bytes(token) {
                map.remove(name);
            }
        }
    }
    Ok(summary)
}

/// Response header fields as an upstream sent them, minus what the codec
/// owns (framing and hop-by-hop fields, the names `Connection` lists), one
/// `name: value` line each, CRLF-terminated. An HTTP/1.1 caller gets the
/// lines copied as they are; a header map for them cost ~10% of a proxied
/// request (names parsed, hashed, two allocations). An h2 caller, or
/// anything else that needs a map, gets one from [`RawFields::append_to`].
/// Every byte was checked by the tokenizer, [`head`] (names are tokens,
/// values hold no control characters), so the lines are safe to forward
/// verbatim.
#[derive(Clone, Default)]
pub struct RawFields {
    lines: Bytes,
    /// A `Date` field is among them.
    date: bool,
    /// A `Content-Length` field is among them (kept for bodiless responses).
    length: bool,
    /// A field that names a URL is among them ([`RawFields::rewrite_url_refs`]).
    url_refs: bool,
}

impl RawFields {
    /// Builds the lines from parsed fields and summarizes the framing
    /// fields on the way (the counterpart of [`header_map`]). `head`: the
    /// bytes `fields` were parsed from, when the lines may be a slice of
    /// them ([`RawFields::build`]).
    fn from_parsed(
        head: Option<&Bytes>,
        fields: &[head::Field<'_>],
        keep_length: bool,
    ) -> Result<(Self, FieldSummary), Error> {
        let mut summary = FieldSummary::default();
        let raw = Self::build(head, fields, keep_length, |_| false, |kind, value| summary.observe(kind, value))?;
        if !summary.lists_names {
            return Ok((raw, summary));
        }
        // Rare: `Connection` names fields; build again without them.
        let listed = |name: &[u8]| connection_tokens(fields).any(|t| t.eq_ignore_ascii_case(name));
        Ok((Self::build(head, fields, keep_length, listed, |_, _| Ok(()))?, summary))
    }

    /// The kept fields' lines. When they are one run of whole lines in
    /// `head`, each exactly `name: value` CRLF (as most upstreams write
    /// them, with the dropped fields first or last), the lines are that
    /// slice of the head: no copy, no allocation. Otherwise each kept line
    /// is written anew in that form.
    fn build(
        head: Option<&Bytes>,
        fields: &[head::Field<'_>],
        keep_length: bool,
        listed: impl Fn(&[u8]) -> bool,
        mut observe: impl FnMut(Kind, &[u8]) -> Result<(), Error>,
    ) -> Result<Self, Error> {
        let mut raw = Self::default();
        // The run of kept lines in `head` so far, while there is one.
        let mut run: Option<(usize, usize)> = head.map(|_| (0, 0));
        let mut kept = 0;
        for f in fields {
            let name = f.name;
            let kind = Kind::of(name);
            observe(kind, f.value)?;
            if kind.hop_by_hop() || (kind == Kind::ContentLength && !keep_length) || listed(name) {
                continue;
            }
            raw.date |= kind == Kind::Date;
            raw.length |= kind == Kind::ContentLength;
            raw.url_refs |= kind == Kind::UrlRef;
            run = run.zip(head).and_then(|(at, head)| extend_run(head, at, name, f.value, kept == 0));
            kept += 1;
        }
        if kept == 0 {
            return Ok(raw);
        }
        if let Some((start, end)) = run {
            raw.lines = head.map(|h| h.slice(start..end)).unwrap_or_default();
            return Ok(raw);
        }
        let size: usize = fields.iter().map(|f| f.name.len() + f.value.len() + 4).sum();
        let mut lines = BytesMut::with_capacity(size);
        for f in fields {
            let name = f.name;
            let kind = Kind::of(name);
            if kind.hop_by_hop() || (kind == Kind::ContentLength && !keep_length) || listed(name) {
                continue;
            }
            put_field(&mut lines, name, f.value);
        }
        raw.lines = lines.freeze();
        Ok(raw)
    }

    pub fn has_date(&self) -> bool {
        self.date
    }

    /// A field that names a URL (`Location`, `Content-Location`, `Link`,
    /// `Refresh`) is among them.
    pub fn has_url_refs(&self) -> bool {
        self.url_refs
    }

    /// Replaces the value of each field that names a URL with what
    /// `rewrite` returns for it (`None`: unchanged). An empty value drops
    /// the field, and so does one holding CR, LF or NUL.
    pub fn rewrite_url_refs(&mut self, mut rewrite: impl FnMut(&[u8]) -> Option<Vec<u8>>) {
        if !self.url_refs {
            return;
        }
        let mut lines = BytesMut::with_capacity(self.lines.len());
        let mut changed = false;
        for (name, value) in self.fields() {
            if Kind::of(name) != Kind::UrlRef {
                put_field(&mut lines, name, &value);
                continue;
            }
            match rewrite(&value) {
                None => put_field(&mut lines, name, &value),
                Some(new) => {
                    changed = true;
                    if !new.is_empty() && !new.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                        put_field(&mut lines, name, &new);
                    }
                }
            }
        }
        if changed {
            self.lines = lines.freeze();
        }
    }

    /// The value of the first field named `name` (ASCII case-insensitive).
    /// A scan of the lines: for the rare response that needs one (a 429's
    /// `Retry-After`), not for every one.
    pub fn get(&self, name: &str) -> Option<Bytes> {
        self.fields().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    /// `(name, value)` of each line.
    fn fields(&self) -> impl Iterator<Item = (&[u8], Bytes)> + '_ {
        let mut rest = &self.lines[..];
        std::iter::from_fn(move || {
            let colon = memchr::memchr(b':', rest)?;
            let end = memchr::memchr(b'\r', &rest[colon..])? + colon;
            let name = &rest[..colon];
            let value = self.lines.slice_ref(&rest[colon + 2..end]);
            rest = &rest[end + 2..];
            Some((name, value))
        })
    }

    /// Appends the lines to `out`; without `Content-Length` unless
    /// `keep_length` (the caller's side frames the body itself).
    pub fn write_to(&self, out: &mut Vec<u8>, keep_length: bool) {
        if !self.length || keep_length {
            out.extend_from_slice(&self.lines);
            return;
        }
        for (name, value) in self.fields() {
            if Kind::of(name) != Kind::ContentLength {
                put_field(out, name, &value);
            }
        }
    }

    /// Adds the fields to a header map, in order.
    pub fn append_to(&self, map: &mut HeaderMap) -> Result<(), Error> {
        for (name, value) in self.fields() {
            let name = HeaderName::from_bytes(name).map_err(|_| Error::Malformed("invalid header field name"))?;
            let value = HeaderValue::from_maybe_shared(value).map_err(|_| Error::Malformed("invalid header value"))?;
            map.append(name, value);
        }
        Ok(())
    }
}

/// The run `at` (start and end in `head`) with the line of `name` and
/// `value` after it, if that line is in `head` exactly as `name: value`
/// CRLF and starts where the run ends (`first`: the run starts with it).
/// `None`: the kept lines are not one such run.
fn extend_run(head: &[u8], at: (usize, usize), name: &[u8], value: &[u8], first: bool) -> Option<(usize, usize)> {
    let base = head.as_ptr() as usize;
    let start = (name.as_ptr() as usize).checked_sub(base)?;
    let value_at = (value.as_ptr() as usize).checked_sub(base)?;
    let colon = start + name.len();
    let end = value_at + value.len() + 2;
    let whole = value_at == colon + 2
        && head.get(colon..value_at)? == b": "
        && head.get(end - 2..end)? == b"\r\n"
        && head.get(start..colon)? == name;
    match whole && (first || start == at.1) {
        true if first => Some((start, end)),
        true => Some((at.0, end)),
        false => None,
    }
}

/// Names only, never values: response fields may carry cookies.
impl std::fmt::Debug for RawFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.fields().map(|(n, _)| String::from_utf8_lossy(n))).finish()
    }
}

/// The field names a message's `Connection` fields list (other than
/// `keep-alive` and `close`): hop-by-hop for that message only.
fn connection_tokens<'h, 'b>(fields: &'h [head::Field<'b>]) -> impl Iterator<Item = &'b [u8]> + 'h {
    fields.iter().filter(|f| f.name.eq_ignore_ascii_case(b"connection")).flat_map(|f| connection_names(f.value))
}

/// The field names one `Connection` value lists (other than `keep-alive`
/// and `close`).
pub fn connection_names(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    list_items(value).filter(|t| !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close"))
}

/// Finds the end of a message head in `buf`, resuming at `*scanned` (where
/// the previous call stopped), so a head that arrives a byte at a time is
/// still scanned once. Returns the head's length including the blank line.
fn find_head_end(buf: &[u8], scanned: &mut usize) -> Option<usize> {
    let mut i = *scanned;
    while let Some(off) = memchr::memchr(b'\n', &buf[i..]) {
        let nl = i + off;
        match &buf[nl + 1..] {
            [b'\n', ..] => return Some(nl + 2),
            [b'\r', b'\n', ..] => return Some(nl + 3),
            // The blank line may still be arriving: look here again next time.
            [] | [b'\r'] => {
                *scanned = nl;
                return None;
            }
            _ => i = nl + 1,
        }
    }
    *scanned = buf.len();
    None
}

/// Reads into `buf`'s spare capacity (at least `want` bytes of room),
/// returning how many bytes arrived (0 at end of stream).
fn read_into<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Incremental decoder of a message body from a connection's read buffer.
#[derive(Debug, Clone)]
pub struct Decoder {
    kind: DecoderKind,
}

#[derive(Debug, Clone)]
enum DecoderKind {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// One step of decoding.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer holds no more of the body: read more.
    NeedMore,
    End,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let kind = match framing {
            Framing::Empty | Framing::Length(0) => DecoderKind::Done,
            Framing::Length(n) => DecoderKind::Length(n),
            Framing::Chunked => DecoderKind::Chunked(Chunked::default()),
            Framing::Close => DecoderKind::Close,
        };
        Self { kind }
    }

    pub fn done() -> Self {
        Self { kind: DecoderKind::Done }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.kind, DecoderKind::Done)
    }

    /// Bytes still expected, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.kind {
            DecoderKind::Length(n) => Some(n),
            DecoderKind::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next piece of body out of `buf`.
    ///
    /// The decoder's whole state machine in one `match`, on purpose: each
    /// state's arm is short, and seen together they show that every byte is
    /// either consumed or refused (RFC 9112 §7.1).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        match &mut self.kind {
            DecoderKind::Done => Ok(Decoded::End),
            DecoderKind::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    self.kind = DecoderKind::Done;
                }
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            DecoderKind::Close => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                Ok(Decoded::Data(buf.split().freeze()))
            }
            DecoderKind::Chunked(c) => {
                let step = c.decode(buf)?;
                if c.state == ChunkState::Done {
                    self.kind = DecoderKind::Done;
                }
                Ok(step)
            }
        }
    }

    /// The peer closed the connection: the end of a close-delimited body,
    /// an error for any other unfinished one.
    pub fn eof(&mut self) -> Result<(), Error> {
        match self.kind {
            DecoderKind::Close | DecoderKind::Done => {
                self.kind = DecoderKind::Done;
                Ok(())
            }
            _ => Err(Error::Incomplete),
        }
    }

    /// Reads the next piece of body from `io` through `buf`.
    pub fn poll_next<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Error>>> {
        loop {
            match self.decode(buf) {
                Ok(Decoded::Data(b)) if b.is_empty() => continue,
                Ok(Decoded::Data(b)) => return Poll::Ready(Some(Ok(b))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            let want = match self.remaining() {
                Some(n) => (n as usize).clamp(1, BODY_READ),
                None => BODY_READ,
            };
            match ready!(read_into(io, cx, buf, want)) {
                Ok(0) => {
                    if let Err(e) = self.eof() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(Error::Io(e)))),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// Reading hex digits of a chunk size.
    #[default]
    Size,
    /// After the size: whitespace, before a `;` or CR.
    SizeLws,
    /// After `;`: an extension, up to CR (any bytes but LF; dropped).
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: a trailer field or the final CRLF.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// The chunked transfer coding (RFC 9112 §7.1), strictly: CRLF line ends,
/// hex sizes that fit in 64 bits, extensions and trailer fields skipped up
/// to a limit (stricter than hyper's client on each, so whatever credproxy
/// reads, hyper reads the same: the `response` fuzz target's oracle).
#[derive(Debug, Clone, Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    overhead: usize,
    trailers: u8,
}

impl Chunked {
    /// One byte of extension or trailer: `next` if within the limit.
    fn spend(&mut self, next: ChunkState) -> Result<ChunkState, Error> {
        self.overhead += 1;
        if self.overhead > MAX_CHUNK_OVERHEAD {
            return Err(Error::Malformed("chunk extensions and trailers too long"));
        }
        Ok(next)
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        use ChunkState as S;
        let bad = |what| Err(Error::Malformed(what));
        loop {
            if self.state == S::Done {
                return Ok(Decoded::End);
            }
            if self.state == S::Data {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = self.size.min(buf.len() as u64) as usize;
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = S::DataCr;
                }
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            let Some(&b) = buf.first() else { return Ok(Decoded::NeedMore) };
            buf.advance(1);
            self.state = match (self.state, b) {
                (S::Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 16 {
                        return bad("chunk size too large");
                    }
                    self.digits += 1;
                    self.size = self.size << 4 | u64::from(hex_value(b));
                    S::Size
                }
                (S::Size, _) if self.digits == 0 => return bad("invalid chunk size"),
                (S::Size | S::SizeLws | S::Ext, b'\r') => S::SizeLf,
                (S::Size | S::SizeLws | S::Ext, b'\n') => return bad("bare LF in chunk size line"),
                // chunk-ext = *( BWS ";" ... ): after whitespace, only `;` or the line's end.
                (S::Size | S::SizeLws, b' ' | b'\t') => self.spend(S::SizeLws)?,
                (S::Size | S::SizeLws, b';') | (S::Ext, _) => self.spend(S::Ext)?,
                (S::SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.size == 0 {
                        S::TrailerStart
                    } else {
                        S::Data
                    }
                }
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => S::Size,
                // trailer-section = *( field-line CRLF ): each line held to
                // a head's field syntax (as hyper's client does), then dropped.
                (S::TrailerStart, b'\r') => S::EndLf,
                (S::TrailerStart | S::TrailerName, b) if is_tchar(b) => self.spend(S::TrailerName)?,
                (S::TrailerName, b':') => self.spend(S::TrailerValue)?,
                (S::TrailerValue, b) if b == b'\t' || (b >= b' ' && b != 0x7f) => self.spend(S::TrailerValue)?,
                (S::TrailerValue, b'\r') => self.spend(S::TrailerLf)?,
                (S::TrailerLf, b'\n') => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return bad("too many trailer fields");
                    }
                    self.spend(S::TrailerStart)?
                }
                (S::EndLf, b'\n') => S::Done,
                _ => return bad("invalid chunked framing"),
            };
        }
    }
}

/// A token character (RFC 9110 §5.6.2): what a field name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// Frames outgoing body data: the bytes to write before and after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoder {
    /// Exactly this many bytes still to send.
    Length(u64),
    Chunked,
    /// Raw bytes, ended by closing the connection.
    Close,
}

impl Encoder {
    /// Appends `data`'s framing prefix to `out` (and `data` itself if small);
    /// returns the data still to be written from where it is, if any, and
    /// whether `"\r\n"` follows it.
    fn frame(&mut self, out: &mut Vec<u8>, data: Bytes) -> Result<(Option<Bytes>, bool), Error> {
        if let Self::Length(left) = self {
            *left = left.checked_sub(data.len() as u64).ok_or(Error::LengthMismatch)?;
        }
        let chunked = *self == Self::Chunked;
        if chunked {
            write_hex(out, data.len());
            out.extend_from_slice(b"\r\n");
        }
        if data.len() <= COPY_LIMIT {
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            return Ok((None, false));
        }
        Ok((Some(data), chunked))
    }

    /// Appends what ends the body; an error if fewer bytes were sent than declared.
    fn finish(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            Self::Length(0) | Self::Close => Ok(()),
            Self::Length(_) => Err(Error::LengthMismatch),
            Self::Chunked => {
                out.extend_from_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }
}

fn write_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub(crate) fn write_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes `header` bytes then `data` (then `"\r\n"` if `crlf`) with as few
/// vectored writes as the socket allows, tracking progress across polls.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pos: usize,
    data: Option<Bytes>,
    crlf: bool,
    crlf_pos: usize,
    /// Some bytes were written since [`Pending::take_progress`] last looked.
    progressed: bool,
}

impl Pending {
    fn has_data(&self) -> bool {
        self.data.is_some()
    }

    fn set(&mut self, data: Option<Bytes>, crlf: bool) {
        self.pos = 0;
        self.data = data;
        self.crlf = crlf;
        self.crlf_pos = 0;
    }

    /// Whether bytes were written since the last call.
    fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progressed)
    }

    /// Flushes `head` (bytes not written yet are `head[self.pos..]`) and the
    /// pending data. On `Ready(Ok)`, everything is written and `head` cleared.
    fn poll_flush<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        io: &mut W,
        head: &mut Vec<u8>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        const CRLF: &[u8] = b"\r\n";
        loop {
            let data = self.data.as_deref().unwrap_or_default();
            let crlf = if self.crlf { &CRLF[self.crlf_pos..] } else { &[] };
            let h = &head[self.pos.min(head.len())..];
            let (hl, dl) = (h.len(), data.len());
            if hl + dl + crlf.len() == 0 {
                head.clear();
                self.set(None, false);
                return Poll::Ready(Ok(()));
            }
            let slices = [io::IoSlice::new(h), io::IoSlice::new(data), io::IoSlice::new(crlf)];
            let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.progressed = true;
            // Advance over what was written: head, then data, then CRLF.
            let mut n = n;
            let from_head = n.min(hl);
            self.pos += from_head;
            n -= from_head;
            if n > 0 {
                let from_data = n.min(dl);
                if let Some(d) = &mut self.data {
                    d.advance(from_data);
                }
                n -= from_data;
            }
            self.crlf_pos += n;
        }
    }
}

/// Bounds the time between two pieces of progress on a stream (bytes read
/// or written). Armed lazily, at the first wait after progress: a stream
/// that never has to wait reads no clock and registers no timer.
pub struct IdleTimer {
    timeout: std::time::Duration,
    deadline: Option<std::time::Instant>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimer {
    pub fn new(timeout: std::time::Duration) -> Self {
        Self { timeout, deadline: None, sleep: None }
    }

    /// Progress was made: the next wait starts a new period.
    pub fn progress(&mut self) {
        self.deadline = None;
    }

    /// The stream is about to wait: `Ready` once it has waited `timeout`
    /// since the last progress; otherwise the task wakes when it has.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use std::future::Future;
        let now = std::time::Instant::now();
        let deadline = *self.deadline.get_or_insert(now + self.timeout);
        if now >= deadline {
            return Poll::Ready(());
        }
        let at = tokio::time::Instant::from_std(deadline);
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        // Ready only at the deadline; a timer that fires early is re-armed.
        while sleep.as_mut().poll(cx).is_ready() {
            if std::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(at);
        }
        Poll::Pending
    }
}

impl std::fmt::Debug for IdleTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleTimer").field("timeout", &self.timeout).field("armed", &self.deadline.is_some()).finish()
    }
}

/// `Date` for responses that carry none, formatted once a second.
pub(crate) fn date_value() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_none() {
            let v = HeaderValue::try_from(httpdate::fmt_http_date(now)).unwrap_or(HeaderValue::from_static(""));
            *c = (secs, Some(v));
        }
        c.1.clone().unwrap_or(HeaderValue::from_static(""))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `token_is` decides what `eq_ignore_ascii_case` decides, for every
    /// name `Kind::of` compares with, every token byte at every position
    /// (in both cases around it), and names one byte longer or shorter.
    #[test]
    fn token_is_agrees_with_eq_ignore_ascii_case() {
        let tokens: Vec<u8> =
            (0u8..=255).filter(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b)).collect();
        let lits = [
            "content-length",
            "transfer-encoding",
            "connection",
            "expect",
            "date",
            "host",
            "x-connection-id",
            "proxy-authorization",
            "te",
            "trailer",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "location",
            "content-location",
            "link",
            "refresh",
        ];
        for lit in lits {
            let lit = lit.as_bytes();
            for base in [lit.to_vec(), lit.to_ascii_uppercase()] {
                for at in 0..base.len() {
                    for &b in &tokens {
                        let mut name = base.clone();
                        name[at] = b;
                        assert_eq!(
                            token_is(&name, lit),
                            name.eq_ignore_ascii_case(lit),
                            "{:?}",
                            String::from_utf8_lossy(&name)
                        );
                    }
                }
                let mut longer = base.clone();
                longer.push(b'a');
                assert!(!token_is(&longer, lit) && !token_is(&base[1..], lit));
            }
        }
    }

    fn decode_all(framing: Framing, input: &[u8]) -> Result<(Vec<u8>, bool, usize), Error> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::NeedMore => return Ok((out, false, buf.len())),
                Decoded::End => return Ok((out, true, buf.len())),
            }
        }
    }

    /// A response's kept field lines are a slice of its head when they are
    /// one run of `name: value` CRLF lines there, and otherwise written
    /// anew; either way they are what writing them anew gives.
    #[test]
    fn response_lines_are_a_slice_of_the_head_only_when_they_read_the_same() {
        let parse = |head: &Bytes, from_head: bool| {
            let mut fields = head::Fields::new();
            assert!(head::response(head, &mut fields, 16).unwrap().is_complete());
            RawFields::from_parsed(from_head.then_some(head), &fields, false).unwrap().0
        };
        // (fields, whether the lines are a slice of the head; `None`: either).
        let cases: [(&str, Option<bool>); 13] = [
            ("A: 1\r\nB: 2\r\n", Some(true)),
            ("Content-Length: 5\r\nDate: x\r\nServer: s\r\n", Some(true)),
            ("Server: s\r\nDate: x\r\nContent-Length: 5\r\nConnection: keep-alive\r\n", Some(true)),
            ("A: 1\r\nContent-Length: 5\r\nB: 2\r\n", Some(false)),
            ("A:1\r\nB: 2\r\n", Some(false)),
            ("A:  1\r\n", Some(false)),
            ("A: 1 \r\n", Some(false)),
            ("A: 1\nB: 2\n", Some(false)),
            ("A: 1\r\nB: 2\nC: 3\r\n", Some(false)),
            ("A: \r\nB: 2\r\n", None),
            ("Connection: x-a\r\nX-A: 1\r\nB: 2\r\n", Some(true)),
            ("X-A: 1\r\nB: 2\r\nConnection: x-a\r\nC: 3\r\n", Some(false)),
            ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", Some(false)),
        ];
        for (fields, sliced) in cases {
            let head = Bytes::from(format!("HTTP/1.1 200 OK\r\n{fields}\r\n"));
            let (raw, anew) = (parse(&head, true), parse(&head, false));
            assert_eq!(raw.lines, anew.lines, "{fields:?}");
            let within = head.as_ptr_range().contains(&raw.lines.as_ptr()) && !raw.lines.is_empty();
            assert!(sliced.is_none_or(|s| s == within), "{fields:?}: {:?}", raw.lines);
            let mut out = Vec::new();
            raw.write_to(&mut out, false);
            assert!(out.ends_with(b"\r\n") || out.is_empty(), "{fields:?}");
            assert!(!out.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "a bare LF in {out:?}");
        }
    }

    #[test]
    fn chunked_bodies_decode_and_stop_at_their_end() {
        let (body, done, left) =
            decode_all(Framing::Chunked, b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-T: 1\r\n\r\nGET").unwrap();
        assert_eq!((body.as_slice(), done, left), (&b"hello, world"[..], true, 3));
        // Byte by byte gives the same.
        let input = b"3\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n";
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in input {
            buf.extend_from_slice(&[*b]);
            while let Decoded::Data(x) = d.decode(&mut buf).unwrap() {
                out.extend_from_slice(&x);
            }
        }
        assert!(d.is_done());
        assert_eq!(out, b"abc0123456789");
    }

    #[test]
    fn malformed_chunked_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..], // bare LF after the size
            b"5\r\nhelloXX0\r\n\r\n",      // no CRLF after data
            b"\r\n",                       // no size
            b"-5\r\nhello\r\n",            // not hex
            b"10000000000000000\r\n",      // 17 hex digits: overflow
            b"5\r\nhello\r\n0\r\n\n",      // bare LF ends the trailers
            b"0x5\r\nhello\r\n",           // prefix
            b"5 x\r\nhello\r\n0\r\n\r\n",  // after whitespace, only `;` or CRLF
            b"5 \n\r\nhello\r\n",          // bare LF after whitespace
            b"5;a\nb\r\nhello\r\n",        // bare LF in an extension
            b"5;a\rb\r\nhello\r\n",        // bare CR in an extension
            b"0\r\nhello\r\n0\r\n\r\n",    // a trailer line that is no field
            b"0\r\nA : b\r\n\r\n",         // space before a trailer's colon
            b"0\r\nA: b\x01\r\n\r\n",      // control byte in a trailer value
        ] {
            assert!(decode_all(Framing::Chunked, bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        for good in [&b"5 \t ;a=\"b c\"\r\nhello\r\n0\r\n\r\n"[..], b"5 \r\nhello\r\n0 ;x\r\n\r\n"] {
            assert_eq!(decode_all(Framing::Chunked, good).unwrap().0, b"hello", "{:?}", String::from_utf8_lossy(good));
        }
        let many = [b"0\r\n".as_slice(), &b"A: b\r\n".repeat(usize::from(MAX_TRAILERS) + 1), b"\r\n"].concat();
        assert!(decode_all(Framing::Chunked, &many).is_err());
        let ok = [b"0\r\n".as_slice(), &b"A: b\r\n".repeat(usize::from(MAX_TRAILERS)), b"\r\n"].concat();
        assert!(decode_all(Framing::Chunked, &ok).is_ok());
        let long_ext = [b"1;".as_slice(), &vec![b'a'; MAX_CHUNK_OVERHEAD + 1], b"\r\n"].concat();
        assert!(decode_all(Framing::Chunked, &long_ext).is_err());
    }

    #[test]
    fn length_and_close_bodies() {
        assert_eq!(decode_all(Framing::Length(5), b"helloGET").unwrap(), (b"hello".to_vec(), true, 3));
        assert_eq!(decode_all(Framing::Length(9), b"hello").unwrap(), (b"hello".to_vec(), false, 0));
        let mut d = Decoder::new(Framing::Length(9));
        assert!(d.eof().is_err(), "a short Content-Length body is an error");
        let mut d = Decoder::new(Framing::Close);
        assert!(d.eof().is_ok() && d.is_done());
        assert!(Decoder::new(Framing::Empty).is_done());
    }

    #[test]
    fn content_length_values() {
        assert_eq!(parse_content_length(b"42").unwrap(), 42);
        assert_eq!(parse_content_length(b" 42 ").unwrap(), 42);
        for bad in
            [&b""[..], b"4 2", b"+4", b"-1", b"0x10", b"42, 43", b"42, 42", b"42,", b",42", b"99999999999999999999"]
        {
            assert!(parse_content_length(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn transfer_encoding_summary() {
        let te = |values: &[&str]| {
            let mut s = FieldSummary::default();
            for v in values {
                s.observe(Kind::TransferEncoding, v.as_bytes()).unwrap();
            }
            s.chunked_only
        };
        assert!(te(&["chunked"]));
        assert!(te(&["Chunked "]));
        assert!(!te(&["gzip, chunked"]));
        assert!(!te(&["chunked", "chunked"]));
        assert!(!te(&["chunked, gzip"]));
        assert!(!te(&["identity"]));
        assert!(!te(&[",chunked"]));
        assert!(!te(&["chunked,"]));
        assert!(!te(&["chunked, "]));
        assert!(!te(&[""]));
    }

    #[test]
    fn head_end_is_found_once_however_the_bytes_arrive() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest";
        let mut scanned = 0;
        for end in 1..head.len() {
            let found = find_head_end(&head[..end], &mut scanned);
            assert_eq!(found.is_some(), end >= 27, "at {end}");
            if let Some(n) = found {
                assert_eq!(n, 27);
                break;
            }
        }
        let mut s = 0;
        assert_eq!(find_head_end(b"GET / HTTP/1.1\nHost: a\n\n", &mut s), Some(24));
    }

    #[test]
    fn encoders_frame_and_check_lengths() {
        let mut out = Vec::new();
        let mut e = Encoder::Chunked;
        assert_eq!(e.frame(&mut out, Bytes::from_static(b"hello")).unwrap(), (None, false));
        e.finish(&mut out).unwrap();
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
        let mut e = Encoder::Length(3);
        assert!(e.frame(&mut Vec::new(), Bytes::from_static(b"hello")).is_err());
        let mut e = Encoder::Length(5);
        e.frame(&mut Vec::new(), Bytes::from_static(b"hel")).unwrap();
        assert!(e.finish(&mut Vec::new()).is_err(), "two bytes short");
        let mut big = Vec::new();
        let (rest, crlf) = Encoder::Chunked.frame(&mut big, Bytes::from(vec![0u8; COPY_LIMIT + 1])).unwrap();
        assert_eq!((big, rest.map(|b| b.len()), crlf), (b"2001\r\n".to_vec(), Some(COPY_LIMIT + 1), true));
    }
}
