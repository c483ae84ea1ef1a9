//! An upstream's response, read by credproxy's client (`h1::client::Conn`)
//! and by hyper's (`hyper::client::conn::http1`) from the same bytes.
//! Oracles: whatever credproxy accepts, hyper accepts with the same status,
//! the same end-to-end fields and the same body (credproxy may refuse more:
//! it is stricter on purpose, never laxer); the head credproxy then writes
//! to its caller has CRLF-terminated lines only, no CR, LF or NUL inside a
//! line, no hop-by-hop field but its own framing, and parses back with the
//! same fields.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use credproxy::h1::client::Conn;
use credproxy::h1::fuzz::{never_forwarded, raw_fields, response_head};
use credproxy_fuzz::{runtime, split, Script};
use http_body_util::{BodyExt, Empty};
use libfuzzer_sys::fuzz_target;

struct Answer {
    status: u16,
    /// End-to-end fields, lowercase names, in order.
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    body: Result<Vec<u8>, String>,
}

fuzz_target!(|input: &[u8]| {
    let [flags, seed, data @ ..] = input else { return };
    let head_request = flags & 1 == 1;
    let http10_caller = flags & 2 == 2;
    let method = if head_request { http::Method::HEAD } else { http::Method::GET };
    let ours = runtime().block_on(credproxy_reads(&split(data, *seed), method.clone()));
    let Ok((ours, raw, stray)) = ours else { return };
    // Bytes after a complete response are the next message's, not this
    // one's: hyper reads the exchange without them (with them, its
    // connection errors, sometimes into a body it has already ended).
    let theirs = runtime().block_on(hyper_reads(&data[..data.len() - stray], method));
    let theirs = match theirs {
        Ok(t) => t,
        // A resource limit, not a reading: hyper takes at most 100 fields,
        // credproxy 256 (a head is at most 256 KiB either way).
        Err(e) if e.is_parse_too_large() => return,
        Err(e) => panic!("credproxy accepted a response head hyper refuses ({e}): {:?}", String::from_utf8_lossy(data)),
    };
    assert_eq!(ours.status, theirs.status);
    // hyper's map groups a name's values; the lines keep their order.
    let mut a = ours.fields.clone();
    let mut b = theirs.fields.clone();
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a, b, "end-to-end fields differ");
    if let Ok(body) = &ours.body {
        match &theirs.body {
            Ok(b) => assert_eq!(body, b, "bodies differ"),
            Err(e) => panic!("credproxy read a body hyper refuses ({e})"),
        }
    }

    // What goes to the caller.
    let length = ours.body.as_ref().ok().map(|b| b.len() as u64);
    let status = http::StatusCode::from_u16(ours.status).expect("status parsed once");
    let out = response_head(status, &raw, length, head_request, http10_caller);
    assert!(out.ends_with(b"\r\n\r\n"), "head not ended by a blank line");
    let lines: Vec<&[u8]> = out[..out.len() - 4].split(|b| *b == b'\n').collect();
    let mut own_framing = 0;
    for (i, line) in lines.iter().enumerate() {
        let line = if i + 1 < lines.len() { line.strip_suffix(b"\r").expect("CRLF-terminated line") } else { line };
        assert!(!line.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)), "CR, LF or NUL inside a line");
        if i == 0 {
            assert!(line.starts_with(b"HTTP/1.1 "));
            continue;
        }
        let (name, _) = line.split_at(line.iter().position(|b| *b == b':').expect("a field line"));
        if never_forwarded(name) {
            // Only the codec's own framing and connection management.
            let own = [&b"transfer-encoding: chunked"[..], b"connection: close", b"connection: keep-alive"];
            assert!(own.contains(&line), "a hop-by-hop field reached the caller: {:?}", String::from_utf8_lossy(line));
            own_framing += 1;
        }
    }
    assert!(own_framing <= 2);
    let mut fields = [httparse::EMPTY_HEADER; 300];
    let mut parsed = httparse::Response::new(&mut fields);
    assert!(
        matches!(parsed.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()),
        "written head does not parse"
    );
    let written: Vec<(Vec<u8>, Vec<u8>)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase().into_bytes(), h.value.to_vec()))
        .filter(|(n, _)| !matches!(&n[..], b"content-length" | b"transfer-encoding" | b"connection" | b"date"))
        .collect();
    let upstream: Vec<(Vec<u8>, Vec<u8>)> =
        ours.fields.into_iter().filter(|(n, _)| !matches!(&n[..], b"content-length" | b"date")).collect();
    assert_eq!(written, upstream, "the caller's head does not carry the upstream's fields");
});

async fn credproxy_reads(
    reads: &[&[u8]],
    method: http::Method,
) -> Result<(Answer, credproxy::h1::RawFields, usize), credproxy::h1::client::SendError> {
    let mut conn = Conn::new(Script::new(reads), Duration::from_secs(5));
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = http::Uri::from_static("http://upstream.test/");
    let resp = conn.send(&parts, None, &[], Empty::<Bytes>::new(), Instant::now() + Duration::from_secs(5)).await?;
    let raw = resp.body().clone();
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> =
        raw_fields(&raw).into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect();
    fields.retain(|(n, _)| n != b"content-length");
    let mut body = Vec::new();
    let body = loop {
        match std::future::poll_fn(|cx| conn.poll_body(cx)).await {
            Some(Ok(b)) => body.extend_from_slice(&b),
            Some(Err(e)) => break Err(e.to_string()),
            None => break Ok(body),
        }
    };
    let stray = if body.is_ok() { conn.buffered() + conn.get_ref().remaining() } else { 0 };
    Ok((Answer { status: resp.status().as_u16(), fields, body }, raw, stray))
}

async fn hyper_reads(data: &[u8], method: http::Method) -> Result<Answer, hyper::Error> {
    let io = hyper_util::rt::TokioIo::new(Script::new(&[data]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await?;
    let driver = tokio::spawn(conn);
    let req = http::Request::builder().method(method).uri("/").header("host", "upstream.test").body(Empty::new());
    let resp = sender.send_request(req.expect("request")).await;
    let resp = match resp {
        Ok(r) => r,
        // The connection's own error says why (the request's is "canceled").
        Err(e) => return Err(driver.await.ok().and_then(Result::err).unwrap_or(e)),
    };
    let status = resp.status().as_u16();
    // The fields an intermediary passes on (RFC 9110 §7.6.1): not the
    // framing or connection fields, nor those `Connection` names.
    let listed: Vec<String> = resp
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| {
            v.as_bytes().split(|b| *b == b',').map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        })
        .collect();
    let fields = resp
        .headers()
        .iter()
        .filter(|(n, _)| !never_forwarded(n.as_str().as_bytes()) && *n != http::header::CONTENT_LENGTH)
        .filter(|(n, _)| !listed.iter().any(|l| l == n.as_str()))
        .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes().to_vec()).map_err(|e| e.to_string());
    driver.abort();
    Ok(Answer { status, fields, body })
}
