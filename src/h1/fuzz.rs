//! What the fuzz targets (`fuzz/`) drive, built only with the `fuzzing`
//! feature: the codec's synchronous core, fed from memory. Nothing here is
//! a second implementation: each function runs the code the connection
//! loops run ([`server::take_head`], [`Decoder::decode`], the head
//! encoders), with the I/O replaced by a list of chunks.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::server::{self, RequestHead, ResponseMeta};
use super::{Decoded, Decoder, Encoder, Error, Framing, RawFields};

/// One thing the caller's side saw in a request stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Head(Head),
    /// The whole body of the request before it.
    Body(Vec<u8>),
    /// The stream failed `at` this many bytes into it.
    Error {
        at: u64,
        error: String,
    },
    /// The stream ended cleanly between requests.
    Eof,
    /// The proxy reads no further: a CONNECT (tunnel data follows) or a
    /// request after which the connection closes.
    Stop,
}

/// A parsed request head, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub http10: bool,
    pub fields: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// `X-Connection-Id` and `Proxy-Authorization`, set aside by the
    /// codec (not among `fields`).
    pub own: super::OwnFields,
}

impl Head {
    fn of(h: &RequestHead, own: super::OwnFields) -> Self {
        Self {
            method: h.parts.method.to_string(),
            target: h.parts.uri.to_string(),
            http10: h.parts.version == http::Version::HTTP_10,
            fields: fields_of(&h.parts.headers),
            framing: h.framing,
            keep_alive: h.keep_alive,
            expect_continue: h.expect_continue,
            own,
        }
    }
}

fn fields_of(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect()
}

/// Reads requests from `chunks` (the bytes as they arrive, in order) the
/// way the proxy's connection loop does: a head, its body, the next head.
/// `max_head` is `proxy.max_header_bytes`. Each complete request is also
/// returned as the proxy would write it upstream.
pub fn read_requests(chunks: &[&[u8]], max_head: usize) -> (Vec<Step>, Vec<Vec<u8>>) {
    let mut steps = Vec::new();
    let mut forwarded = Vec::new();
    let mut chunks = chunks.iter();
    let mut buf = BytesMut::new();
    let mut scanned = 0;
    let mut own = super::OwnFields::default();
    let mut origin = server::LastOrigin::default();
    let mut fed = 0u64;
    let mut feed = |buf: &mut BytesMut| match chunks.next() {
        Some(c) => {
            buf.extend_from_slice(c);
            fed += c.len() as u64;
            Some(fed)
        }
        None => None,
    };
    let mut total = 0u64;
    let at = |total: u64, buf: &BytesMut| total - buf.len() as u64;
    loop {
        let head = loop {
            match server::take_head(&mut buf, &mut scanned, max_head, &mut own, &mut origin) {
                Some(Ok(h)) => break h,
                Some(Err(e)) => {
                    steps.push(Step::Error { at: at(total, &buf), error: e.to_string() });
                    return (steps, forwarded);
                }
                None => match feed(&mut buf) {
                    Some(f) => total = f,
                    None => {
                        steps.push(if buf.is_empty() {
                            Step::Eof
                        } else {
                            Step::Error { at: total, error: Error::Incomplete.to_string() }
                        });
                        return (steps, forwarded);
                    }
                },
            }
        };
        steps.push(Step::Head(Head::of(&head, std::mem::take(&mut own))));
        if head.parts.method == http::Method::CONNECT {
            steps.push(Step::Stop);
            return (steps, forwarded);
        }
        let mut decoder = Decoder::new(head.framing);
        let mut body = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(b)) => body.extend_from_slice(&b),
                Ok(Decoded::End) => break,
                Ok(Decoded::NeedMore) => match feed(&mut buf) {
                    Some(f) => total = f,
                    None => {
                        let e = decoder.eof().err().unwrap_or(Error::Incomplete);
                        steps.push(Step::Error { at: total, error: e.to_string() });
                        return (steps, forwarded);
                    }
                },
                Err(e) => {
                    steps.push(Step::Error { at: at(total, &buf), error: e.to_string() });
                    return (steps, forwarded);
                }
            }
        }
        forwarded.push(encode_request(&head, &body));
        steps.push(Step::Body(body));
        if !head.keep_alive {
            steps.push(Step::Stop);
            return (steps, forwarded);
        }
    }
}

/// `head` and `body` as the upstream side writes them: the codec's request
/// head (origin-form target, its own framing fields) and the body re-framed.
pub fn encode_request(head: &RequestHead, body: &[u8]) -> Vec<u8> {
    // The proxy forwards a body of known length with that length and
    // re-chunks one that came chunked (`client::framing_of`).
    let framing = match head.framing {
        Framing::Chunked => Framing::Chunked,
        _ if body.is_empty() => Framing::Empty,
        _ => Framing::Length(body.len() as u64),
    };
    let mut out = Vec::new();
    super::client::encode_request_head(&mut out, &head.parts, None, &[], framing);
    let mut enc = match framing {
        Framing::Length(n) => Encoder::Length(n),
        Framing::Chunked => Encoder::Chunked,
        _ => return out,
    };
    let mut rest = Vec::new();
    if !body.is_empty() {
        let (large, crlf) = enc.frame(&mut rest, Bytes::copy_from_slice(body)).expect("length matches");
        if let Some(d) = large {
            rest.extend_from_slice(&d);
        }
        if crlf {
            rest.extend_from_slice(b"\r\n");
        }
    }
    enc.finish(&mut rest).expect("whole body framed");
    out.extend_from_slice(&rest);
    out
}

/// Decodes a chunked body from `chunks`: the decoded bytes and how many
/// input bytes the body took, or the error and where it was found.
pub fn decode_chunked(chunks: &[&[u8]]) -> Result<(Vec<u8>, u64), (String, u64)> {
    let mut decoder = Decoder::new(Framing::Chunked);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut chunks = chunks.iter();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(b)) => out.extend_from_slice(&b),
            Ok(Decoded::End) => return Ok((out, total - buf.len() as u64)),
            Ok(Decoded::NeedMore) => match chunks.next() {
                Some(c) => {
                    buf.extend_from_slice(c);
                    total += c.len() as u64;
                }
                None => return Err((Error::Incomplete.to_string(), total)),
            },
            Err(e) => return Err((e.to_string(), total - buf.len() as u64)),
        }
    }
}

/// The response head the caller's side writes for an upstream's answer:
/// `fields` as parsed from the upstream, a body of `length` bytes if known
/// (else chunked, or close-delimited to an HTTP/1.0 caller).
pub fn response_head(
    status: StatusCode,
    fields: &RawFields,
    length: Option<u64>,
    head_request: bool,
    http10: bool,
) -> Vec<u8> {
    let (parts, ()) = http::Response::new(()).into_parts();
    let mut parts = parts;
    parts.status = status;
    let meta = ResponseMeta {
        head_request,
        connect: false,
        http10,
        close: false,
        send_timeout: std::time::Duration::from_secs(1),
    };
    let mut out = Vec::new();
    server::encode_response_head(&mut out, &parts, Some(fields), length, meta);
    out
}

/// Field names the codec never forwards (hop-by-hop, and their `_` lookalikes).
pub fn never_forwarded(name: &[u8]) -> bool {
    super::Kind::of(name).hop_by_hop()
}

/// `(name, value)` of each of `fields`' lines.
pub fn raw_fields(fields: &RawFields) -> Vec<(Vec<u8>, Vec<u8>)> {
    fields.fields().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
}
