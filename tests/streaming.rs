//! Bodies stream both ways: a 1 GiB upload and a 1 GiB download pass through
//! credproxy while this process (proxy included) stays under 100 MB resident.
//!
//! The upstream is a tiny hyper sink/source: httpbin buffers whole bodies and
//! caps generated ones at 100 KB, so it cannot serve a gigabyte.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use support::*;

const GIB: u64 = 1024 * 1024 * 1024;
const RSS_LIMIT_KB: u64 = 100 * 1024;

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

type Body = http_body_util::Either<http_body_util::Full<Bytes>, Chunks>;

/// Yields `remaining` zero bytes in 256 KiB frames.
struct Chunks {
    remaining: u64,
    chunk: Bytes,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

async fn upstream(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let authorized = req.headers().get("authorization").is_some_and(|v| v == "Bearer stream-token");
    if !authorized {
        let mut r = Response::new(Body::Left("missing credential".into()));
        *r.status_mut() = hyper::StatusCode::UNAUTHORIZED;
        return Ok(r);
    }
    if req.uri().path() == "/sink" {
        let mut body = req.into_body();
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                total += data.len() as u64;
            }
        }
        return Ok(Response::new(Body::Left(total.to_string().into())));
    }
    let n: u64 = req.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()).unwrap_or(0);
    let chunks = Chunks { remaining: n, chunk: Bytes::from(vec![0u8; 256 * 1024]) };
    let mut r = Response::new(Body::Right(chunks));
    r.headers_mut().insert("content-length", n.into());
    Ok(r)
}

async fn spawn_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), hyper::service::service_fn(upstream))
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_up_and_down_with_bounded_memory() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "stream-token")]).await;
    let up = spawn_upstream().await;
    let proxy = h.proxy_url();
    let hdr = format!("X-Connection-Id: {id}");

    // Upload: a sparse 1 GiB file, streamed by curl -T (PUT).
    let file = h.dir.path().join("upload.bin");
    std::fs::File::create(&file).unwrap().set_len(GIB).unwrap();
    let up_url = format!("http://{up}/sink");
    let file_s = file.display().to_string();
    let seen = curl(&["-x", &proxy, "-H", &hdr, "-T", &file_s, &up_url], &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.text(), GIB.to_string(), "upstream must receive every byte");

    // Download: 1 GiB generated upstream, discarded by curl.
    let down_url = format!("http://{up}/source?n={GIB}");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "-x", &proxy, "-H", &hdr, &down_url])
        .env_remove("http_proxy")
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("200 {GIB}"), "{}", String::from_utf8_lossy(&out.stderr));

    let peak = status_kb("VmHWM:");
    assert!(peak < RSS_LIMIT_KB, "peak RSS {peak} kB exceeds {RSS_LIMIT_KB} kB: a body was buffered");
}
