//! An upstream that fails the ways real ones do, through credproxy's own
//! codec: a TCP reset in the middle of the response body, a reset while
//! the request body is still arriving, a reset before any answer, and a
//! response trickled a byte at a time. Each gets a bounded answer with its
//! documented code (or a cut, never complete-looking, body), and the next
//! request through the same proxy works: no restart, nothing poisoned in
//! the upstream pool. (Accepting and never answering, and stalling
//! mid-body, are in tests/http1.rs and tests/security_review.rs.)

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads a request head off `s`; the bytes read past it are returned.
async fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            return Some((head, buf[end + 4..].to_vec()));
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A listener whose every connection runs `serve`.
async fn upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Closes `s` with a reset (RST) instead of a FIN.
fn reset(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

/// Sends `req` raw and reads until the proxy closes (or 10 s pass).
async fn exchange(proxy: SocketAddr, req: &[u8]) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&chunk[..n]),
            Ok(_) => break,
            Err(_) => panic!("no close within 10 s: {:?}", String::from_utf8_lossy(&out)),
        }
    }
    (out, started.elapsed())
}

fn get(up: SocketAddr, id: &str) -> Vec<u8> {
    format!("GET http://{up}/ HTTP/1.1\r\nHost: {up}\r\nX-Connection-Id: {id}\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// The proxy still serves: a request to httpbin through it gets 200 and the credential.
async fn still_serves(h: &Harness, id: &str, token: &str) {
    let (status, _, body) =
        proxy_request(h.running.proxy_addr, "GET", &format!("{}/headers", httpbin()), Some(id), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["headers"]["Authorization"], format!("Bearer {token}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_response_body_cuts_the_callers_response_and_the_next_request_works() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "reset-response-token")]).await;
    let up = upstream(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nthe first part").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            reset(s);
        }
    })
    .await;
    for _ in 0..3 {
        let (out, took) = exchange(h.running.proxy_addr, &get(up, &id)).await;
        let text = String::from_utf8_lossy(&out);
        // The head and what came went out; the reset closes the caller's
        // connection short of the 100,000 bytes promised, so the caller
        // sees a cut body, not a complete one.
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("content-length: 100000"), "{text}");
        assert!(text.ends_with("the first part"), "{text}");
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
    }
    still_serves(&h, &id, "reset-response-token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_while_the_request_body_streams_is_a_502_and_the_next_request_works() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "reset-request-token")]).await;
    let up = upstream(|mut s| async move {
        // Take the head and some of the body, then reset.
        if read_head(&mut s).await.is_some() {
            let mut some = [0u8; 1024];
            let _ = s.read(&mut some).await;
            reset(s);
        }
    })
    .await;
    for _ in 0..3 {
        let started = Instant::now();
        let mut s = TcpStream::connect(h.running.proxy_addr).await.unwrap();
        let head = format!(
            "POST http://{up}/ HTTP/1.1\r\nHost: {up}\r\nX-Connection-Id: {id}\r\nContent-Length: 4000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The body streams in slowly; the upstream resets partway.
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let block = vec![b'x'; 16 * 1024];
            for _ in 0..244 {
                if wr.write_all(&block).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await.expect("answered");
        writer.abort();
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
        assert!(text.contains("\"code\":\"upstream_error\""), "{text}");
        assert!(text.to_ascii_lowercase().contains("proxy-status: credproxy"), "{text}");
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
    }
    still_serves(&h, &id, "reset-request-token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_any_answer_is_a_502_and_the_next_request_works() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "reset-early-token")]).await;
    let up = upstream(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            reset(s);
        }
    })
    .await;
    for _ in 0..3 {
        let (out, took) = exchange(h.running.proxy_addr, &get(up, &id)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
        assert!(text.contains("\"code\":\"upstream_error\""), "{text}");
        assert!(took < Duration::from_secs(3), "answered after {took:?}");
    }
    still_serves(&h, &id, "reset-early-token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_response_arrives_whole_within_the_idle_timeout() {
    let h = Harness::start_with(Opts {
        sections: "[upstream]\nresponse_body_idle_timeout_ms = 1000\n".into(),
        ..Default::default()
    })
    .await;
    let id = h.create("bearer", &[("token", "trickle-token")]).await;
    let up = upstream(|mut s| async move {
        let Some((head, _)) = read_head(&mut s).await else { return };
        // The upstream checks the credential arrived.
        let body: &[u8] =
            if head.contains("authorization: Bearer trickle-token") { b"trickled body!" } else { b"no credential" };
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        // The head a byte every 5 ms, then the body a byte every 150 ms
        // (2 s in all, each gap well under the 1 s idle timeout).
        for (bytes, gap) in [(head.as_bytes(), 5), (body, 150)] {
            for b in bytes {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
        }
        let _ = s.flush().await;
    })
    .await;
    let (out, _) = exchange(h.running.proxy_addr, &get(up, &id)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.ends_with("\r\n\r\ntrickled body!"), "{text}");
    still_serves(&h, &id, "trickle-token").await;
}
