//! What a security review found with raw sockets against a recording
//! upstream, one test per finding (issue 12, items 1–9): a credentialed
//! TRACE, injected values echoed in response fields, secrets in
//! configuration errors (also in tests/secret_scan.rs), stalled bodies,
//! IPv4-translated IPv6 addresses, ambiguous identity fields, relabelled
//! response codings, a target without a path, and a refresh skew longer
//! than a token's life.
//!
//! Upstreams are real servers where one behaves as needed (Python's
//! `http.server` redirects a directory with its query, httpbin, oidc-provider)
//! and a recording raw socket where only a misbehaving or echoing peer shows
//! the finding.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A loopback listener that records every request head it receives and
/// answers each with `reply` (then closes).
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
}

impl Recorder {
    async fn start(reply: &'static [u8]) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (h, a) = (heads.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    h.lock().unwrap().push(String::from_utf8_lossy(&buf).into_owned());
                    let _ = s.write_all(reply).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { addr, heads, accepted }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Sends `raw` on a new connection to the proxy and reads until the proxy
/// closes or 10 s pass; returns the status and the whole answer.
async fn exchange(proxy: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    // One response (the proxy's own answers have a Content-Length).
    let (text, _) = read_response(&mut s, tokio::time::Instant::now() + Duration::from_secs(10)).await;
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

fn body_json(answer: &str) -> serde_json::Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// Item 1. An upstream that echoes TRACE (Apache with `TraceEnable On`)
/// would hand the injected credential back to the caller: a TRACE with a
/// connection is refused, and nothing at all reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentialed_trace_is_refused_and_nothing_reaches_the_upstream() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "trace-secret-token")]).await;
    let up = Recorder::start(b"HTTP/1.1 200 OK\r\ncontent-type: message/http\r\ncontent-length: 0\r\n\r\n").await;
    let req = format!("TRACE http://{a}/x HTTP/1.1\r\nHost: {a}\r\nX-Connection-Id: {id}\r\n\r\n", a = up.addr);
    let (status, answer) = exchange(h.running.proxy_addr, req.as_bytes()).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(body_json(&answer)["code"], "trace_not_allowed", "{answer}");
    assert!(answer.to_ascii_lowercase().contains("proxy-status: credproxy; error=http_request_denied"), "{answer}");
    assert!(!answer.contains("trace-secret-token"));
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0, "nothing is sent upstream");

    // Without a connection there is no credential to leak: TRACE passes.
    let req = format!("TRACE http://{a}/x HTTP/1.1\r\nHost: {a}\r\n\r\n", a = up.addr);
    let (status, answer) = exchange(h.running.proxy_addr, req.as_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    let heads = up.heads();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].starts_with("TRACE /x HTTP/1.1\r\n") && !heads[0].to_ascii_lowercase().contains("authorization"));
}

/// Item 2. Python's `http.server` redirects a directory without its
/// trailing slash to `/dir/?<the query>` — the query-placement key included
/// (Apache's mod_dir does the same). What credproxy injected is taken out of
/// `Location` (and `Content-Location`, `Link`, `Refresh`) on the way back; a
/// client that follows the redirect through credproxy gets it injected again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_values_are_scrubbed_from_location_and_link_fields() {
    let h = Harness::start().await;
    let key = "Echoed-Query-Key-3f9a";
    let id = h.create("key_query", &[("api_key", key)]).await;
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("dir")).unwrap();
    std::fs::write(root.path().join("dir/index.html"), "inside").unwrap();
    let (port, _server) = python_http_server(root.path()).await;

    let hdr = format!("X-Connection-Id: {id}");
    let seen = curl(&["-x", &h.proxy_url(), "-H", &hdr, &format!("http://127.0.0.1:{port}/dir?x=1")], &[]).await;
    assert_eq!(seen.status, 301, "{seen:?}");
    assert_eq!(seen.header("location"), Some("/dir/?x=1"), "{seen:?}");
    assert!(!format!("{:?}", seen.headers).contains(key), "{seen:?}");
    // Following the redirect through credproxy: injected again, served.
    let seen = curl(&["-x", &h.proxy_url(), "-H", &hdr, &format!("http://127.0.0.1:{port}/dir/?x=1")], &[]).await;
    assert_eq!((seen.status, seen.text().as_str()), (200, "inside"), "{seen:?}");

    // Every field that names a URL, from an upstream that echoes the
    // header credential too (raw, percent-encoded, and in a query).
    let hkey = "Header-Key-91c7";
    let hid = h.create("key_header", &[("api_key", hkey)]).await;
    let up = Recorder::start(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1/cb?token=Header-Key-91c7&keep=1\r\n\
          Content-Location: /Header-Key-91c7/doc\r\nLink: </next?k=Header%2DKey%2D91c7>; rel=\"next\", </other>; rel=\"prev\"\r\n\
          Refresh: 5; url=/r?u=Token%20Header-Key-91c7\r\nX-Other: Header-Key-91c7\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let seen =
        curl(&["-x", &h.proxy_url(), "-H", &format!("X-Connection-Id: {hid}"), &format!("http://{}/p", up.addr)], &[])
            .await;
    assert_eq!(seen.status, 302);
    assert_eq!(seen.header("location"), Some("http://127.0.0.1/cb?keep=1"));
    assert_eq!(seen.header("content-location"), Some("//doc"));
    assert_eq!(seen.header("link"), Some("</next>; rel=\"next\", </other>; rel=\"prev\""));
    assert_eq!(seen.header("refresh"), Some("5; url=/r"));
    // Fields that do not name a URL are not scrubbed (documented: nor bodies).
    assert_eq!(seen.header("x-other"), Some(hkey));
    assert!(up.heads()[0].to_ascii_lowercase().contains(&format!("x-api-key: token {}", hkey.to_ascii_lowercase())));
}

/// Item 4, request side. Body placements buffer the body; a caller that
/// sends most of its Content-Length and stalls is cut off at
/// `proxy.body_idle_timeout_ms`, and memory stays bounded. The real binary,
/// so its resident memory can be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_buffered_bodies_are_closed_at_the_body_timeout_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "body_idle_timeout_ms = 1500\nmax_buffered_body = 65536", "");
    let i = spawn_instance(&config).await;
    let body = serde_json::json!({"integration": "httpbin", "auth_method": "custom_json", "org_id": ORG,
        "user_id": "u", "credentials": {"account": "acct", "secret": "stall-secret"}});
    let id = i.admin.call(http::Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rss_before = rss_kib(i.pid());
    let url = format!("{}/anything", httpbin());
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(i.proxy).await.unwrap();
        let head = format!(
            "POST {url} HTTP/1.1\r\nX-Connection-Id: {id}\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{{\"a\": \""
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b'x'; 50_000]).await.unwrap();
        conns.push(s);
    }
    let sent = started.elapsed();
    // Every connection gets a 408 and is closed, at the timeout.
    let mut done = Vec::new();
    for mut s in conns {
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "still open after 10 s");
        done.push((started.elapsed(), String::from_utf8_lossy(&out).into_owned()));
    }
    for (at, answer) in &done {
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains("\"code\":\"request_body_timeout\""), "{answer}");
        assert!(*at >= Duration::from_millis(1400) && *at < sent + Duration::from_millis(4500), "closed after {at:?}");
    }
    let rss_after = rss_kib(i.pid());
    assert!(rss_after < rss_before + 24 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");
}

/// Item 4, the budget: buffered bytes of all requests together stay under
/// `proxy.max_buffered_total`; past it a request gets 503 with
/// `Retry-After`, and nothing of it is buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_over_the_process_budget_get_503_with_retry_after() {
    let h = Harness::start_with(Opts {
        extra_toml: "max_buffered_total = 100000\nbody_idle_timeout_ms = 3000".into(),
        ..Default::default()
    })
    .await;
    let id = h.create("custom_json", &[("account", "acct"), ("secret", "budget-secret")]).await;
    let url = format!("{}/anything", httpbin());
    let head = |len: usize| {
        format!("POST {url} HTTP/1.1\r\nX-Connection-Id: {id}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
    };
    // The first holds 60,000 bytes of the budget while it stalls.
    let mut first = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    first.write_all(head(60_000).as_bytes()).await.unwrap();
    first.write_all(b"{\"a\": \"").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = exchange(h.running.proxy_addr, head(60_000).as_bytes()).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(body_json(&answer)["code"], "buffer_budget_exhausted");
    assert!(answer.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"), "{answer}");
    // A small one still fits.
    let small = b"{\"n\": 1}";
    let (status, answer) =
        exchange(h.running.proxy_addr, [head(small.len()).as_bytes(), small].concat().as_slice()).await;
    assert_eq!(status, 200, "{answer}");
    drop(first);
}

/// Item 4, response side: an upstream that stops mid-body is cut at
/// `upstream.response_body_idle_timeout_ms`; the caller gets what there was
/// and a closed connection (a cut body must not look complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_body_is_cut_at_its_idle_timeout() {
    let h = Harness::start_with(Opts {
        sections: "[upstream]\nresponse_body_idle_timeout_ms = 1000\n".into(),
        ..Default::default()
    })
    .await;
    let id = h.create("bearer", &[("token", "stall-token")]).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst part").await.unwrap();
        // Stall with the connection open.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let started = Instant::now();
    s.write_all(format!("GET http://{up}/ HTTP/1.1\r\nHost: {up}\r\nX-Connection-Id: {id}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut out)).await.expect("closed").unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 OK") && text.ends_with("first part"), "{text}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(3500), "cut after {took:?}");
}

/// Item 5. `::ffff:0:0/96` (SIIT, RFC 6052/7915) maps IPv4 addresses into
/// IPv6 too: loopback and the metadata address through it are refused
/// before any connection is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_translated_ipv6_addresses_are_refused() {
    let h = Harness::start_with(Opts { allow_loopback: false, ..Default::default() }).await;
    let id = h.create("bearer", &[("token", "siit-token")]).await;
    let before = upstream_connections_opened(&h).await;
    for url in ["http://[::ffff:0:7f00:1]:8080/x", "http://[::ffff:0:a9fe:a9fe]/latest/meta-data/"] {
        let seen = curl(&["-x", &h.proxy_url(), url], &[]).await;
        assert_eq!(seen.status, 403, "{url}: {}", seen.text());
        assert_eq!(seen.json()["code"], "destination_ip_prohibited", "{url}");
        let seen = curl(&["-x", &h.proxy_url(), "-H", &format!("X-Connection-Id: {id}"), url], &[]).await;
        assert_eq!(seen.status, 403, "{url}: {}", seen.text());
    }
    assert_eq!(upstream_connections_opened(&h).await, before, "no upstream connection was opened");
}

/// Item 6. Two `X-Connection-Id` fields that disagree are ambiguous: refused.
/// Fields named like one credproxy owns or strips but with `_` for `-`
/// (CGI servers read `X_Connection_Id` as `X-Connection-Id`) are never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_identity_and_underscore_lookalike_fields() {
    let h = Harness::start().await;
    let a = h.create("bearer", &[("token", "token-of-a")]).await;
    let b = h.create("bearer", &[("token", "token-of-b")]).await;
    let up = Recorder::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    for (first, second) in [
        (format!("X-Connection-Id: {a}"), format!("X-Connection-Id: {b}")),
        (format!("X-Connection-Id: {b}"), format!("x-connection-id: {a}")),
        (format!("x-CONNECTION-id: {a}"), format!("X-Connection-Id: {a}")),
    ] {
        let req = format!("GET http://{u}/ HTTP/1.1\r\nHost: {u}\r\n{first}\r\n{second}\r\n\r\n", u = up.addr);
        let (status, answer) = exchange(h.running.proxy_addr, req.as_bytes()).await;
        assert_eq!(status, 400, "{first} / {second}: {answer}");
        assert_eq!(body_json(&answer)["code"], "invalid_connection_id");
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);

    let k = h.create("key_header", &[("api_key", "header-key-6d")]).await;
    let req = format!(
        "GET http://{u}/ HTTP/1.1\r\nHost: {u}\r\nX-Connection-Id: {k}\r\nX_Connection_Id: {b}\r\n\
         Proxy_Authorization: Basic eDp5\r\nContent_Length: 5\r\nTransfer_Encoding: chunked\r\nX_Api_Key: mine\r\n\
         Keep_Alive: 1\r\nX-API-KEY: mine-too\r\nX-Kept_Field: 1\r\n\r\n",
        u = up.addr
    );
    let (status, answer) = exchange(h.running.proxy_addr, req.as_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    let head = up.heads().pop().unwrap();
    let lower = head.to_ascii_lowercase();
    for gone in
        ["x_connection_id", "proxy_authorization", "content_length", "transfer_encoding", "x_api_key", "keep_alive"]
    {
        assert!(!lower.contains(gone), "{gone} was forwarded:\n{head}");
    }
    assert!(lower.contains("x-kept_field: 1"), "other fields with underscores pass:\n{head}");
    assert_eq!(lower.matches("x-api-key: token header-key-6d").count(), 1, "{head}");
    // The caller's own field of the injected name is replaced, not kept beside it.
    assert_eq!(lower.matches("x-api-key:").count(), 1, "{head}");
    assert!(!lower.contains("mine-too"), "{head}");

    // `X-Connection-Id` named by `Connection` is hop-by-hop: it names no
    // connection, and the request goes on as a pass-through (allowed by
    // default) without the credential.
    let req = format!(
        "GET http://{u}/ HTTP/1.1\r\nHost: {u}\r\nConnection: X-Connection-Id\r\nX-Connection-Id: {k}\r\n\r\n",
        u = up.addr
    );
    let (status, answer) = exchange(h.running.proxy_addr, req.as_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    let head = up.heads().pop().unwrap().to_ascii_lowercase();
    assert!(!head.contains("header-key-6d") && !head.contains("x-connection-id"), "{head}");
}

/// Item 7. A response coding other than chunked (`gzip, chunked`) is not
/// relabelled as plain chunked: like nginx, the response is refused (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_codings_other_than_chunked_are_refused_not_relabelled() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "coding-token")]).await;
    for reply in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let up = Recorder::start(reply).await;
        let req = format!("GET http://{u}/ HTTP/1.1\r\nHost: {u}\r\nX-Connection-Id: {id}\r\n\r\n", u = up.addr);
        let (status, answer) = exchange(h.running.proxy_addr, req.as_bytes()).await;
        assert_eq!(status, 502, "{}: {answer}", String::from_utf8_lossy(reply));
        assert_eq!(body_json(&answer)["code"], "upstream_error");
    }
}

/// Item 8. `GET http://host:port?a=1` has an empty path: the upstream gets
/// `/?a=1`, never `?a=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_a_path_goes_upstream_as_slash() {
    let h = Harness::start().await;
    let id = h.create("key_query", &[("api_key", "path-key")]).await;
    let up = Recorder::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let req = format!("GET http://{u}?a=1 HTTP/1.1\r\nHost: {u}\r\n\r\n", u = up.addr);
    let (status, _) = exchange(h.running.proxy_addr, req.as_bytes()).await;
    assert_eq!(status, 200);
    let req = format!("GET http://{u}?a=1 HTTP/1.1\r\nHost: {u}\r\nX-Connection-Id: {id}\r\n\r\n", u = up.addr);
    let (status, _) = exchange(h.running.proxy_addr, req.as_bytes()).await;
    assert_eq!(status, 200);
    let heads = up.heads();
    assert!(heads[0].starts_with("GET /?a=1 HTTP/1.1\r\n"), "{}", heads[0]);
    assert!(heads[1].starts_with("GET /?a=1&api_key=path-key HTTP/1.1\r\n"), "{}", heads[1]);
}

/// The upstream's `Host` is the target's authority, exactly once, whatever
/// `Host` fields the caller sent (none, another host, two, a lookalike
/// case): the host check passed the target, so the target is what the
/// upstream is told (RFC 9112 §3.2.2), with or without a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_host_is_the_target_authority_once() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "host-token-1")]).await;
    let up = Recorder::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let u = up.addr;
    let sent = [
        String::new(),
        "Host: evil.test\r\n".to_owned(),
        format!("Host: {u}\r\nHost: evil.test\r\n"),
        format!("Host: evil.test\r\nhost: {u}\r\n"),
        format!("HOST: {u}\r\n"),
        "Host:\r\n".to_owned(),
    ];
    let mut expected = 0;
    for fields in &sent {
        for named in [String::new(), format!("X-Connection-Id: {id}\r\n")] {
            let req = format!("GET http://{u}/p HTTP/1.1\r\n{fields}{named}\r\n");
            let (status, answer) = exchange(h.running.proxy_addr, req.as_bytes()).await;
            assert_eq!(status, 200, "{fields:?} {named:?}: {answer}");
            expected += 1;
            let heads = up.heads();
            assert_eq!(heads.len(), expected);
            let head = heads.last().unwrap().to_ascii_lowercase();
            let hosts: Vec<&str> = head.lines().filter(|l| l.starts_with("host:")).collect();
            assert_eq!(hosts, [format!("host: {u}")], "{fields:?} {named:?}:\n{head}");
            assert!(!head.contains("evil.test"), "{head}");
            assert_eq!(head.contains("authorization: bearer host-token-1"), !named.is_empty(), "{head}");
        }
    }
}

/// Item 9. With the default 60 s skew, a provider issuing 10-second tokens
/// got a token call on every request. The skew is bounded by half the
/// token's lifetime: under steady traffic a token is fetched once per
/// half-life, not per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_fetched_once_per_lifetime_under_steady_traffic() {
    let oidc = Oidc::start_with_ttl(10).await;
    let (name, text) = oidc.integration();
    // The default skew (60 s), longer than the tokens live.
    let text = text.replace("refresh_skew_secs = 1\n", "");
    assert!(!text.contains("refresh_skew_secs"));
    let h = Harness::start_with(Opts { integrations: vec![(name, text)], ..Default::default() }).await;
    let machine = serde_json::json!({"integration": "oidc", "auth_method": "machine", "org_id": ORG, "user_id": "svc", "credentials": {}});
    let v = h.admin.call(http::Method::POST, "/v1/connections", Some(&machine)).await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let resource = format!("{}/resource", oidc.url);
    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(16) {
        let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&id), None).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        requests += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grants = oidc.count("client_credentials").await;
    // 16 s of traffic, a new token every 5 s (half of 10 s): 4, give or take one.
    assert!(requests > 100, "{requests}");
    assert!((3..=5).contains(&grants), "{grants} token calls for {requests} requests");
}

/// `credproxy_upstream_connections_opened_total` from `/metrics`.
async fn upstream_connections_opened(h: &Harness) -> String {
    let text = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
    text.lines().find(|l| l.starts_with("credproxy_upstream_connections_opened_total ")).unwrap().to_owned()
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Item 4, the other waits: a caller that stops reading its response is
/// cut off at `proxy.send_timeout_ms` (the upstream here is Python's
/// `http.server` with a 200 MB file, far more than socket buffers hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_reading_is_cut_off_at_the_send_timeout() {
    let h = Harness::start_with(Opts { extra_toml: "send_timeout_ms = 1000".into(), ..Default::default() }).await;
    let root = tempfile::tempdir().unwrap();
    std::fs::File::create(root.path().join("big")).unwrap().set_len(200 * 1024 * 1024).unwrap();
    let (port, _server) = python_http_server(root.path()).await;
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    s.write_all(format!("GET http://127.0.0.1:{port}/big HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&head[..n]));
    // Stop reading for longer than the send timeout, then take what is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = n;
    let mut chunk = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection was not closed");
    assert!(total < 64 * 1024 * 1024, "{total} bytes: the response kept streaming to a caller that did not read");
}

/// Item 4: a blind `CONNECT` tunnel that carries nothing for
/// `proxy.tunnel_idle_timeout_secs` is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_blind_tunnel_is_closed_at_the_tunnel_idle_timeout() {
    let h = Harness::start_with(Opts { extra_toml: "tunnel_idle_timeout_secs = 1".into(), ..Default::default() }).await;
    let authority = httpbin_authority();
    let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    // Traffic keeps it open...
    for _ in 0..3 {
        s.write_all(format!("GET /get HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"}\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed while in use");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // ...silence closes it.
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle tunnel is still open");
    let after = idle_from.elapsed();
    assert!(after < Duration::from_millis(2500), "closed after {after:?}");
}

/// Python's `http.server` serving `root` on a free loopback port.
async fn python_http_server(root: &std::path::Path) -> (u16, tokio::process::Child) {
    let mut child = tokio::process::Command::new(python())
        .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory"])
        .arg(root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("http.server starts within 10 s")
        .unwrap()
        .expect("http.server prints its port");
    let port = line.split(" port ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (port, child)
}

/// Item 4: a PostgreSQL or a KMS endpoint that accepts connections and
/// never answers is given up at `store.timeout_ms` / `crypto.kms_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_or_kms_that_never_answers_is_given_up_at_its_timeout() {
    // Accepts and holds every connection, says nothing.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("url = \"sqlite://{}/db.sqlite\"", dir.path().display()),
        &format!("url = \"postgres://credproxy@127.0.0.1:{port}/credproxy\"\ntimeout_ms = 1000"),
    );
    std::fs::write(&config, text).unwrap();
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::process::Command::new(credproxy_bin()).arg("migrate").arg("--config").arg(&config).output(),
    )
    .await
    .expect("migrate gave up")
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    aws_env();
    let h = Harness::start_with(Opts {
        crypto: format!(
            "provider = \"aws-kms\"\nkms_key_id = \"k\"\nkms_endpoint = \"http://127.0.0.1:{port}\"\nkms_timeout_ms = 1000\n"
        ),
        ..Default::default()
    })
    .await;
    let body = serde_json::json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "u",
        "credentials": {"token": "kms-token"}});
    let started = Instant::now();
    let (status, v) = h.admin.send(http::Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    assert_eq!((status.as_u16(), v["code"].as_str()), (503, Some("key_service_unavailable")), "{v}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// `scrub_response_bodies`: an echoing upstream (httpbin) shows the
/// caller no injected value, raw, base64 or URL-encoded, in plain,
/// large and chunked bodies, with the framing intact; an encoded body is
/// refused (502 `response_not_scrubbable`). The same request to an
/// integration without it shows the value: the check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_scrubbed_when_the_integration_asks() {
    let scrubbed =
        "id = \"scrubbed\"\nname = \"scrubbed echo\"\nallowed_hosts = [\"127.0.0.1\"]\nupstream_scheme = \"http\"\n\
                    scrub_response_bodies = true\n\
                    [[auth_methods]]\nid = \"key\"\ntype = \"api_key\"\nin = \"header\"\nname = \"X-Api-Key\"\n\
                    [[auth_methods]]\nid = \"basic\"\ntype = \"basic\"\n";
    let h = Harness::start_with(Opts {
        integrations: vec![("scrubbed.toml".into(), scrubbed.into())],
        ..Default::default()
    })
    .await;
    let key = "Scrub/Me+Key-0b7e";
    let create = |integration: &'static str, method: &'static str, creds: serde_json::Value| {
        let admin = &h.admin;
        async move {
            let body = serde_json::json!({"integration": integration, "auth_method": method, "org_id": ORG,
                "user_id": "u", "credentials": creds});
            admin.call(http::Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let plain = create("httpbin", "key_header", serde_json::json!({"api_key": key})).await;
    let masked = create("scrubbed", "key", serde_json::json!({"api_key": key})).await;
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
    let enc: String = form_urlencoded::byte_serialize(key.as_bytes()).collect();
    let forms = [key.to_owned(), b64.clone(), enc.clone()];
    let url = format!("{}/anything?b64={}&enc={}", httpbin(), urlencode(&b64), urlencode(&enc));
    let get = |id: &str, url: &str| {
        let (proxy, hdr, url) = (h.proxy_url(), format!("X-Connection-Id: {id}"), url.to_owned());
        async move { curl(&["-x", &proxy, "-H", &hdr, &url], &[]).await }
    };

    // Without scrubbing, httpbin echoes the key: this is what is masked.
    let seen = get(&plain, &url).await;
    assert_eq!(seen.status, 200);
    assert!(seen.text().contains(key), "{}", seen.text());
    // With it: no form of the key, masks of the same length instead.
    let seen = get(&masked, &url).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    for f in &forms {
        assert!(!seen.text().contains(f.as_str()), "{f} in {}", seen.text());
    }
    assert!(seen.text().contains(&"*".repeat(key.len())), "{}", seen.text());
    assert_eq!(seen.header("content-length").map(|l| l.parse::<usize>().unwrap()), Some(seen.body.len()));
    let echoed: serde_json::Value = seen.json();
    assert_eq!(echoed["headers"]["Accept-Encoding"], "identity", "asked for an unencoded body");

    // A large body (many reads, the key at every offset modulo 7) and a
    // chunked one (httpbin's /stream: 30 JSON lines, each echoing the key).
    let mut big = String::new();
    for i in 0..3000 {
        big.push_str(&"x".repeat(i % 7));
        big.push_str(key);
    }
    let data_file = h.dir.path().join("big.txt");
    std::fs::write(&data_file, &big).unwrap();
    let hdr = format!("X-Connection-Id: {masked}");
    let at = format!("@{}", data_file.display());
    let seen = curl(
        &[
            "-x",
            &h.proxy_url(),
            "-H",
            &hdr,
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            &at,
            &format!("{}/anything", httpbin()),
        ],
        &[],
    )
    .await;
    assert_eq!(seen.status, 200);
    assert!(seen.body.len() > big.len(), "{}", seen.body.len());
    assert!(!seen.text().contains(key), "the key came back in a large body");
    assert_eq!(seen.text().matches(&"*".repeat(key.len())).count(), 3001, "each of 3000 copies and the header");
    let seen = get(&masked, &format!("{}/stream/30", httpbin())).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.text().lines().count(), 30);
    assert!(!seen.text().contains(key));

    // Basic: the rendered `Basic <base64>` field httpbin echoes is masked too.
    let basic =
        create("scrubbed", "basic", serde_json::json!({"username": "scrub-user", "password": "scrub-pass-77"})).await;
    let seen = get(&basic, &format!("{}/headers", httpbin())).await;
    let pair = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "scrub-user:scrub-pass-77");
    assert_eq!(seen.status, 200);
    assert!(!seen.text().contains(&pair) && seen.text().contains("\"Authorization\""), "{}", seen.text());

    // An encoded body cannot be scrubbed: refused, nothing of it sent.
    let seen = get(&masked, &format!("{}/gzip", httpbin())).await;
    assert_eq!(seen.status, 502, "{}", seen.text());
    assert_eq!(seen.json()["code"], "response_not_scrubbable");
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
