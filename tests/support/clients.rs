//! Real clients through the proxy: curl, Python requests/httpx, and a
//! plain in-process request for high-concurrency tests.

use serde_json::Value;

use super::*;

/// A response seen by a real client.
#[derive(Debug)]
pub struct Seen {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    /// What a client script printed: `{"status": …, "headers": {…}, "body": "…"}`.
    pub fn from_json(v: &Value) -> Self {
        Self {
            status: v["status"].as_u64().expect("status") as u16,
            headers: v["headers"]
                .as_object()
                .expect("headers")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect(),
            body: v["body"].as_str().expect("body").as_bytes().to_vec(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as httpbin echoed it.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        let v = self.json();
        let h = v["headers"].as_object().expect("httpbin echo has headers");
        h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str().unwrap().to_owned())
    }
}

/// Runs curl with `args` and extra environment; parses `-i` output.
pub async fn curl(args: &[&str], env: &[(&str, &str)]) -> Seen {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "20"]).args(args);
    clean_proxy_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("curl is installed (scripts/test installs it)");
    assert!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    parse_http_dump(&out.stdout)
}

fn clean_proxy_env(cmd: &mut tokio::process::Command) {
    for k in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
    {
        cmd.env_remove(k);
    }
}

pub fn parse_http_dump(raw: &[u8]) -> Seen {
    let mut rest = raw;
    loop {
        let split = rest.windows(4).position(|w| w == b"\r\n\r\n").expect("curl -i output has a head");
        let head = String::from_utf8_lossy(&rest[..split]).into_owned();
        let body = &rest[split + 4..];
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
        // 1xx, and the proxy's answer to CONNECT, come before the real response.
        if (100..200).contains(&status) || (status == 200 && body.starts_with(b"HTTP/")) {
            rest = body;
            continue;
        }
        let headers =
            lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
        return Seen { status, headers, body: body.to_vec() };
    }
}

/// Runs a Python snippet with the peers venv. The snippet must print one JSON
/// object `{"status": ..., "headers": {...}, "body": "..."}`.
pub async fn python_client(script: &str, env: &[(&str, &str)]) -> Seen {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg("-c").arg(script);
    clean_proxy_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("python runs");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("python printed JSON");
    Seen::from_json(&v)
}

/// A GET (or other method) through the proxy on a fresh TCP connection, in
/// absolute form, from this process: for high-concurrency tests where
/// spawning a client process per request would dominate.
pub async fn proxy_request(
    proxy: std::net::SocketAddr,
    method: &str,
    url: &str,
    conn_id: Option<&str>,
    body: Option<&'static [u8]>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let uri: http::Uri = url.parse().unwrap();
    let mut req = http::Request::builder().method(method).uri(&uri).header("host", uri.authority().unwrap().as_str());
    if let Some(id) = conn_id {
        req = req.header("x-connection-id", id);
    }
    let req = req.body(Full::new(bytes::Bytes::from_static(body.unwrap_or(b"")))).unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

/// Reads one response off a raw connection: until its head and a
/// `Content-Length` body are in, the peer closes, or `deadline` passes.
/// Returns what arrived (lossy UTF-8) and whether it was a whole response.
pub async fn read_response(s: &mut tokio::net::TcpStream, deadline: tokio::time::Instant) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|n| out.len() >= end + 4 + n) {
                return (text, true);
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (text, false),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
}
