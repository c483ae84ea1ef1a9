//! credproxy's own HTTP/1.1 codec, from the caller's side and the
//! upstream's: pipelining, body framing both ways (chunked, length,
//! close-delimited, HEAD/204), HTTP/1.0 callers, `Expect: 100-continue`,
//! refusal of ambiguous framing (request smuggling) and oversized heads,
//! unread bodies, and upstream interim and malformed responses.
//!
//! Callers are curl and raw sockets (the cases no well-behaved client
//! produces). Upstreams are httpbin, and a raw socket where a real server
//! will not misbehave on demand.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One response read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads bytes into `buf` until `f` finds what it needs; panics on EOF or after 10 s.
async fn fill_until<T>(s: &mut TcpStream, buf: &mut Vec<u8>, mut f: impl FnMut(&[u8]) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(t) = f(buf) {
            return t;
        }
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("response within 10 s").unwrap();
        assert!(n > 0, "connection closed mid-response: {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the end of a request head; false if the peer went away first.
async fn read_request_head(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// Reads one response (`head_request`: no body follows); leftover bytes stay in `buf`.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> Raw {
    let end = fill_until(s, buf, |b| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)).await;
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    buf.drain(..end);
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let line_end = fill_until(s, buf, |b| b.windows(2).position(|w| w == b"\r\n")).await;
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap().trim(), 16).unwrap();
            buf.drain(..line_end + 2);
            fill_until(s, buf, |b| (b.len() >= size + 2).then_some(())).await;
            body.extend_from_slice(&buf[..size]);
            assert_eq!(&buf[size..size + 2], b"\r\n");
            buf.drain(..size + 2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = get("content-length") {
        let n: usize = n.parse().unwrap();
        fill_until(s, buf, |b| (b.len() >= n).then_some(())).await;
        body = buf.drain(..n).collect();
    } else {
        // Close-delimited.
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(buf)).await.expect("closed");
        body = std::mem::take(buf);
    }
    Raw { status, headers, body }
}

/// True if the peer closes the connection (EOF) within 5 s with nothing more to say.
async fn closes(s: &mut TcpStream, buf: &[u8]) -> bool {
    assert!(buf.is_empty(), "unexpected bytes: {:?}", String::from_utf8_lossy(buf));
    let mut b = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
}

fn get(url: &str, id: &str) -> String {
    let host = url.trim_start_matches("http://").split('/').next().unwrap().to_owned();
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nX-Connection-Id: {id}\r\n\r\n")
}

/// A hyper server that answers every request with its body, and says in
/// `x-seen-*` headers how it was framed and what credential it carried.
async fn echo_upstream() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let te = req.headers().get("transfer-encoding").cloned();
                    let auth = req.headers().get("authorization").cloned();
                    let body = req.into_body().collect().await?.to_bytes();
                    let mut resp = http::Response::new(Full::new(body));
                    if let Some(te) = te {
                        resp.headers_mut().insert("x-seen-transfer-encoding", te);
                    }
                    if let Some(a) = auth {
                        resp.headers_mut().insert("x-seen-authorization", a);
                    }
                    Ok::<_, hyper::Error>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A loopback listener that counts the connections it accepts and answers
/// each with `reply` (then closes): an upstream that misbehaves on demand.
async fn raw_upstream(reply: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if !read_request_head(&mut s).await {
                    return;
                }
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_each_with_its_credential() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "pipeline-token")]).await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    // A request with a body in the middle: its body must end exactly where
    // the next request starts.
    let post = format!(
        "POST {}/anything?n=2 HTTP/1.1\r\nX-Connection-Id: {id}\r\nContent-Length: 11\r\n\r\nhello there",
        httpbin()
    );
    let all =
        [get(&format!("{}/anything?n=1", httpbin()), &id), post, get(&format!("{}/anything?n=3", httpbin()), &id)]
            .concat();
    s.write_all(all.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for n in 1..=3 {
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["args"]["n"], n.to_string());
        assert_eq!(v["data"], if n == 2 { "hello there" } else { "" });
        assert_eq!(v["headers"]["Authorization"], "Bearer pipeline-token");
        assert!(v["headers"].get("X-Connection-Id").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_reframed_both_ways() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "chunked-token")]).await;
    let proxy = h.proxy_url();
    let hdr = format!("X-Connection-Id: {id}");
    // Request body: curl sends it chunked, credproxy re-frames it, and the
    // upstream (hyper: httpbin's WSGI stack drops chunked request bodies)
    // decodes the same bytes.
    let up = echo_upstream().await;
    let file = h.dir.path().join("body.txt");
    let content: String = (0..300).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&file, &content).unwrap();
    let at_file = format!("@{}", file.display());
    let url = format!("http://{up}/echo");
    let out =
        curl(&["-x", &proxy, "-H", &hdr, "-H", "Transfer-Encoding: chunked", "--data-binary", &at_file, &url], &[])
            .await;
    assert_eq!(out.status, 200, "{}", out.text());
    assert!(out.text() == content, "the upstream got {} bytes, not the {} sent", out.body.len(), content.len());
    assert_eq!(out.header("x-seen-transfer-encoding"), Some("chunked"));
    assert_eq!(out.header("x-seen-authorization"), Some("Bearer chunked-token"));

    // Response body: httpbin streams /stream/N chunked; the caller gets N lines.
    let out = curl(&["-x", &proxy, "-H", &hdr, &format!("{}/stream/4", httpbin())], &[]).await;
    assert_eq!(out.status, 200);
    assert_eq!(out.header("transfer-encoding"), Some("chunked"));
    assert_eq!(out.text().lines().count(), 4, "{}", out.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_callers_get_no_chunked_coding_and_a_closed_connection() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "ten-token")]).await;
    for path in ["/get", "/stream/3"] {
        let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
        let url = format!("{}{path}", httpbin());
        let req = format!("GET {url} HTTP/1.0\r\nX-Connection-Id: {id}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("transfer-encoding").is_none(), "{path}: no chunked coding to an HTTP/1.0 caller");
        assert_eq!(r.header("connection"), Some("close"), "{path}");
        let lines = String::from_utf8_lossy(&r.body).lines().count();
        assert!(lines >= 3, "{path}: {}", String::from_utf8_lossy(&r.body));
        assert!(closes(&mut s, &buf).await, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_204_responses_have_no_body_and_keep_the_connection() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "head-token")]).await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let base = httpbin();
    let host = httpbin_authority();
    let reqs = format!(
        "HEAD {base}/get HTTP/1.1\r\nHost: {host}\r\nX-Connection-Id: {id}\r\n\r\n{}{}",
        get(&format!("{base}/status/204"), &id),
        get(&format!("{base}/get?after=1"), &id)
    );
    s.write_all(reqs.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head = read_response(&mut s, &mut buf, true).await;
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").is_some_and(|n| n != "0"), "HEAD keeps the length: {head:?}");
    let no_content = read_response(&mut s, &mut buf, false).await;
    assert_eq!(no_content.status, 204);
    assert!(no_content.header("content-length").is_none());
    let after = read_response(&mut s, &mut buf, false).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.json()["args"]["after"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_and_never_reaches_the_upstream() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "smuggle-token")]).await;
    let (up, accepted) = raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let target = format!("http://{up}/");
    let cases = [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        // A list, even of one repeated value: hyper's server and nginx
        // refuse it (tests/differential.rs found credproxy alone took it).
        "Content-Length: 5, 5\r\n",
        // An empty list element: hyper's server refuses `chunked,`, nginx both.
        "Transfer-Encoding: chunked,\r\n",
        "Transfer-Encoding: ,chunked\r\n",
        "Content-Length: +5\r\n",
        "Content-Length : 5\r\n",
        "X-Folded: a\r\n b\r\n",
    ];
    for extra in cases {
        let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
        let req = format!("POST {target} HTTP/1.1\r\nHost: {up}\r\nX-Connection-Id: {id}\r\n{extra}\r\nhello");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 400, "{extra:?}");
        assert_eq!(r.json()["code"], "malformed_request", "{extra:?}");
        assert!(r.header("proxy-status").is_some_and(|p| p.starts_with("credproxy; error=http_request_error")));
        assert_eq!(r.header("connection"), Some("close"));
        assert!(closes(&mut s, &buf).await, "{extra:?}: the connection closes after a framing error");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "no head with ambiguous framing was forwarded");

    // A chunk line broken inside the body: the caller's fault (400), and its
    // connection is not trusted to carry another request.
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let req = format!(
        "POST {target} HTTP/1.1\r\nHost: {up}\r\nX-Connection-Id: {id}\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("request_body_error")), "{r:?}");
    assert!(closes(&mut s, &buf).await);
    let before = accepted.load(Ordering::SeqCst);
    // Sanity: the same upstream is reachable with a well-framed request.
    let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &target, Some(&id), None).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "big-token")]).await;
    // A large head within proxy.max_header_bytes (64 KiB) is fine (fields
    // under gunicorn's own 8 KiB per-field limit).
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let fields: String = (0..4).map(|i| format!("X-Big-{i}: {}\r\n", "b".repeat(6000))).collect();
    let req = format!("GET {}/headers HTTP/1.1\r\nX-Connection-Id: {id}\r\n{fields}\r\n", httpbin());
    s.write_all(req.as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut Vec::new(), false).await;
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert_eq!(r.json()["headers"]["X-Big-3"].as_str().map(str::len), Some(6000));

    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let big = "a".repeat(70 * 1024);
    let req = format!("GET {}/get HTTP/1.1\r\nX-Connection-Id: {id}\r\nX-Big: {big}\r\n\r\n", httpbin());
    // The proxy may answer and close before it has read everything.
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 431);
    assert_eq!(r.json()["code"], "request_header_too_large");
    assert!(r.header("proxy-status").is_some());

    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET {}/get HTTP/1.1\r\nX-Connection-Id: {id}\r\n{many}\r\n", httpbin());
    s.write_all(req.as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut Vec::new(), false).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (431, Some("request_header_too_large")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_only_when_the_body_is_wanted() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "continue-token")]).await;
    // Refused before the body is wanted: no 100, the final answer, and close.
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let other = format!("http://127.0.0.2:{}/anything", port_of(&httpbin_authority()));
    let req =
        format!("POST {other} HTTP/1.1\r\nX-Connection-Id: {id}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 403, "no 100 Continue before a refusal");
    assert_eq!(r.json()["code"], "host_not_allowed");
    assert_eq!(r.header("connection"), Some("close"));

    // Accepted: 100 Continue, then the body, then the upstream's answer.
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let url = format!("{}/anything", httpbin());
    let req =
        format!("POST {url} HTTP/1.1\r\nX-Connection-Id: {id}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let interim = read_response(&mut s, &mut buf, false).await;
    assert_eq!(interim.status, 100);
    s.write_all(b"hello").await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"], "hello");
    assert!(r.json()["headers"].get("Expect").is_none(), "Expect is answered by credproxy, not forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_request_body_is_discarded_and_the_connection_goes_on() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "discard-token")]).await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let other = format!("http://127.0.0.2:{}/anything", port_of(&httpbin_authority()));
    let body = "x".repeat(10_000);
    let req = format!("POST {other} HTTP/1.1\r\nX-Connection-Id: {id}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(get(&format!("{}/get?next=1", httpbin()), &id).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let refused = read_response(&mut s, &mut buf, false).await;
    assert_eq!(refused.status, 403);
    assert!(refused.header("connection").is_none(), "kept alive: {refused:?}");
    let next = read_response(&mut s, &mut buf, false).await;
    assert_eq!(next.status, 200);
    assert_eq!(next.json()["args"]["next"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_interim_close_delimited_and_malformed_responses() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "upstream-token")]).await;

    // 103 Early Hints, then the response: the caller sees only the response.
    let (up, _) = raw_upstream(
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
    )
    .await;
    let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &format!("http://{up}/"), Some(&id), None).await;
    assert_eq!((status, body.as_slice()), (200, &b"final"[..]));

    // No length, no chunking: the body ends when the upstream closes; an
    // HTTP/1.1 caller gets it chunked on a connection that stays open.
    let (up, _) = raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end").await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    s.write_all(get(&format!("http://{up}/"), &id).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"until the end"[..]));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    s.write_all(get(&format!("{}/get", httpbin()), &id).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200, "the caller's connection goes on");

    // Conflicting lengths from the upstream: 502, never a guess.
    let (up, _) = raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!").await;
    let (status, headers, body) =
        proxy_request(h.running.proxy_addr, "GET", &format!("http://{up}/"), Some(&id), None).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "upstream_error");
    assert!(headers.iter().any(|(k, _)| k == "proxy-status"));

    // A body cut short: the caller's response is cut short too (the
    // connection closes instead of looking complete).
    let (up, _) = raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this").await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    s.write_all(get(&format!("http://{up}/"), &id).as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await.expect("closed");
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("content-length: 100\r\n"), "{text}");
    assert!(text.ends_with("only this"), "{text}");
}

/// An upstream's response fields reach the caller as they were sent (order,
/// repeats, case), minus what is hop-by-hop — including what `Connection`
/// names — and the upstream's framing, which the codec replaces with its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_fields_pass_through_minus_hop_by_hop_and_framing() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "fields-token")]).await;
    let (up, _) = raw_upstream(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: hop-value\r\n\
          Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nSet-Cookie: b=2\r\nX-Mixed-Case: Value\r\n\
          Date: Tue, 01 Dec 2026 00:00:00 GMT\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    s.write_all(get(&format!("http://{up}/"), &id).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]), "{r:?}");
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    for gone in ["x-hop", "keep-alive", "upgrade", "proxy-authenticate"] {
        assert!(!names.contains(&gone), "{gone} is hop-by-hop: {names:?}");
    }
    let cookies: Vec<&str> = r.headers.iter().filter(|(k, _)| k == "set-cookie").map(|(_, v)| v.as_str()).collect();
    assert_eq!(cookies, ["a=1", "b=2"], "repeated fields keep their order");
    assert_eq!(r.header("x-mixed-case"), Some("Value"));
    let count = |n: &str| names.iter().filter(|k| **k == n).count();
    assert_eq!(count("date"), 1, "the upstream's Date, not a second one: {names:?}");
    assert_eq!(r.header("date"), Some("Tue, 01 Dec 2026 00:00:00 GMT"));
    assert_eq!(count("transfer-encoding"), 1, "{names:?}");
    assert_eq!(r.header("connection"), None, "the caller's connection stays open: {names:?}");

    // A 204 with a Content-Length (which it must not have): the caller gets neither body nor length.
    let (up, _) = raw_upstream(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nContent-Length: 7\r\nX-B: 2\r\n\r\n").await;
    s.write_all(get(&format!("http://{up}/"), &id).as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 204);
    assert_eq!((r.header("x-a"), r.header("x-b"), r.header("content-length")), (Some("1"), Some("2"), None), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_answering_is_a_504_at_the_response_header_timeout() {
    let h = Harness::start_with(Opts {
        sections: "[upstream]\nresponse_header_timeout_ms = 1000\n".into(),
        ..Default::default()
    })
    .await;
    let id = h.create("bearer", &[("token", "timeout-token")]).await;
    // Answers the first request on a connection, then goes silent on it.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                if !read_request_head(&mut s).await {
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(s);
            });
        }
    });
    let url = format!("http://{up}/");
    let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &url, Some(&id), None).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    // The pooled connection's timer, armed by the first request, fires while idle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    for (what, url) in [("a reused connection", &url), ("a new connection", &silent_url)] {
        let started = std::time::Instant::now();
        let (status, headers, body) = proxy_request(h.running.proxy_addr, "GET", url, Some(&id), None).await;
        let took = started.elapsed();
        assert_eq!(status, 504, "{what}: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "upstream_timeout", "{what}");
        assert!(headers.iter().any(|(k, _)| k == "proxy-status"));
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{what}: after {took:?}");
    }
    // One keep-alive caller: its second request goes out on the upstream
    // connection its first used (the timer holds this caller's task by
    // then, and is not polled again until it fires).
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(get(&url, &id).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf, false).await.status, 200);
    let started = std::time::Instant::now();
    s.write_all(get(&url, &id).as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    let took = started.elapsed();
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (504, Some("upstream_timeout")),
        "same caller, reused connection"
    );
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "same caller: after {took:?}");
}

/// One keep-alive caller connection remembers the connection it resolved
/// last; a change (here a delete) must still apply to its very next request,
/// and a different id on the same connection must get its own credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_caller_sees_each_ids_credential_and_a_delete_at_once() {
    let h = Harness::start().await;
    let a = h.create("bearer", &[("token", "memo-token-a")]).await;
    let b = h.create("bearer", &[("token", "memo-token-b")]).await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let mut buf = Vec::new();
    let url = format!("{}/headers", httpbin());
    for (id, token) in [(&a, "memo-token-a"), (&a, "memo-token-a"), (&b, "memo-token-b"), (&a, "memo-token-a")] {
        s.write_all(get(&url, id).as_bytes()).await.unwrap();
        let r = read_response(&mut s, &mut buf, false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["headers"]["Authorization"], format!("Bearer {token}"));
    }
    let (status, v) = h.admin.send(http::Method::DELETE, &format!("/v1/connections/{a}"), None).await.unwrap();
    assert_eq!(status, 200, "{v}");
    s.write_all(get(&url, &a).as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (404, Some("connection_not_found")), "deleted: refused at once");
    s.write_all(get(&url, &b).as_bytes()).await.unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.json()["headers"]["Authorization"], "Bearer memo-token-b");
}
