//! Black-box differential: one corpus of raw requests sent through
//! credproxy, through a forward proxy built on hyper's HTTP/1 server (the
//! data plane credproxy had before its own codec) and through nginx, each
//! in front of the same recording upstream. What each upstream received —
//! method, target, header multiset, body, one entry per request — is
//! compared case by case.
//!
//! The rule: every request credproxy forwards, hyper's proxy or nginx
//! forwarded too, with the same method, target and body (the same request
//! boundaries) and every header credproxy sent. credproxy may refuse what
//! the others forward (it is stricter on purpose); it may not forward what
//! both refuse, nor split a stream into requests neither of them saw.
//!
//! The corpus: the committed seeds of the `request_stream` fuzz target
//! (fuzz/seeds/request_stream: the framing cases of tests/http1.rs, the
//! header obfuscations request-smuggling scanners try, the HTTP Garden's
//! desync classes; see fuzz/seeds.py), each with its targets moved under a
//! per-case path so the upstream can tell the cases apart.
//!
//! `DIFFERENTIAL_VERBOSE=1` prints each case credproxy refused and one of
//! the others forwarded; `=all` prints every case's counts.

#![allow(clippy::print_stderr, reason = "the comparison's counts and, with DIFFERENTIAL_VERBOSE, each case")]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as an upstream received it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    method: String,
    target: String,
    /// Lowercased names, trimmed values; fields a proxy sets itself left out.
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// The `Authorization` it carried (not compared: each proxy sets its own).
    authorization: Option<Vec<u8>>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let headers: Vec<_> = self.headers.iter().map(|(k, v)| format!("{k}: {}", text(v))).collect();
        write!(f, "{} {} {headers:?} body {:?}", self.method, self.target, text(&self.body))
    }
}

/// Fields each proxy writes its own way (framing, hop-by-hop, the
/// credential, identity): not part of the comparison.
const OWN_FIELDS: &[&str] = &[
    "host",
    "authorization",
    "x-connection-id",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "expect",
    "trailer",
];

/// What the upstream received, by case (`None`: a request outside every case's path).
type Record = Arc<Mutex<BTreeMap<Option<usize>, Vec<Seen>>>>;

/// The case a target belongs to: `/c<N>/…`, `/c<N>?…` or `/c<N>`.
fn case_of(target: &str) -> Option<usize> {
    let rest = target.strip_prefix("/c")?;
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let tail = &rest[end..];
    if end == 0 || !(tail.is_empty() || tail.starts_with(['/', '?'])) {
        return None;
    }
    rest[..end].parse().ok()
}

/// A raw upstream: reads requests strictly (httparse head, then
/// `Content-Length` or chunked), records each, answers `200 ok`. A stream
/// it cannot read as HTTP/1.1 is recorded as such (a proxy wrote garbage)
/// and the connection closed.
async fn recording_upstream() -> (SocketAddr, Record) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record: Record = Arc::default();
    let r = record.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            tokio::spawn(serve_recording(s, r.clone()));
        }
    });
    (addr, record)
}

async fn serve_recording(mut s: TcpStream, record: Record) {
    let mut buf = Vec::new();
    loop {
        let seen = match read_one(&mut s, &mut buf).await {
            Ok(Some(seen)) => seen,
            Ok(None) => return,
            Err(raw) => {
                let garbage = Seen {
                    method: "<unreadable>".into(),
                    target: raw,
                    headers: vec![],
                    body: vec![],
                    authorization: None,
                };
                record.lock().unwrap().entry(None).or_default().push(garbage);
                return;
            }
        };
        let head = seen.method == "HEAD";
        record.lock().unwrap().entry(case_of(&seen.target)).or_default().push(seen);
        let answer: &[u8] = if head {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        if s.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Reads into `buf` until `f` says how much it needs is there.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, need: impl Fn(&[u8]) -> Option<usize>) -> Option<usize> {
    loop {
        if let Some(n) = need(buf) {
            return Some(n);
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// One request off the stream (`Ok(None)`: the peer closed between
/// requests; `Err`: what could not be read, lossily).
async fn read_one(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Seen>, String> {
    let unreadable = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned();
    let Some(end) = fill(s, buf, |b| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)).await else {
        return if buf.is_empty() { Ok(None) } else { Err(unreadable(buf)) };
    };
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    if !matches!(req.parse(&buf[..end]), Ok(httparse::Status::Complete(n)) if n == end) {
        return Err(unreadable(buf));
    }
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default().to_owned();
    let mut length = None;
    let mut chunked = false;
    let mut headers = Vec::new();
    let mut authorization = None;
    for f in req.headers.iter() {
        let name = f.name.to_ascii_lowercase();
        let value = f.value.trim_ascii().to_vec();
        match name.as_str() {
            "content-length" => {
                // RFC 9110 §8.6: a list of one repeated value is that value
                // (hyper forwards `5, 5` as it came).
                let n = std::str::from_utf8(&value).ok().and_then(|v| {
                    let mut values = v.split(',').map(|n| n.trim().parse::<usize>().ok());
                    let first = values.next()??;
                    values.all(|n| n == Some(first)).then_some(first)
                });
                if length.is_some() || n.is_none() {
                    return Err(unreadable(buf));
                }
                length = n;
            }
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case(b"chunked"),
            "authorization" => authorization = Some(value.clone()),
            _ => {}
        }
        if !OWN_FIELDS.contains(&name.as_str()) {
            headers.push((name, value));
        }
    }
    headers.sort();
    if chunked && length.is_some() {
        return Err(unreadable(buf));
    }
    buf.drain(..end);
    let mut body = Vec::new();
    if chunked {
        loop {
            let Some(line) = fill(s, buf, |b| b.windows(2).position(|w| w == b"\r\n")).await else {
                return Err(unreadable(buf));
            };
            let size_text = std::str::from_utf8(&buf[..line]).map_err(|_| unreadable(buf))?;
            let size_text = size_text.split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| unreadable(buf))?;
            buf.drain(..line + 2);
            if size == 0 {
                // No trailers from a proxy: the final CRLF.
                fill(s, buf, |b| (b.len() >= 2).then_some(2)).await.ok_or_else(|| unreadable(buf))?;
                if &buf[..2] != b"\r\n" {
                    return Err(unreadable(buf));
                }
                buf.drain(..2);
                break;
            }
            fill(s, buf, |b| (b.len() >= size + 2).then_some(size + 2)).await.ok_or_else(|| unreadable(buf))?;
            if &buf[size..size + 2] != b"\r\n" {
                return Err(unreadable(buf));
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    } else if let Some(n) = length {
        fill(s, buf, |b| (b.len() >= n).then_some(n)).await.ok_or_else(|| unreadable(buf))?;
        body.extend(buf.drain(..n));
    }
    Ok(Some(Seen { method, target, headers, body, authorization }))
}

/// A forward proxy on hyper's HTTP/1 server and client: absolute-form in,
/// origin-form out to `upstream` over one upstream connection per caller
/// connection, hop-by-hop fields dropped, a static `Authorization` added.
async fn hyper_proxy(upstream: SocketAddr) -> SocketAddr {
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((caller, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(upstream).await else { return };
                let Ok((sender, conn)) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up)).await
                else {
                    return;
                };
                tokio::spawn(conn);
                let sender = Arc::new(tokio::sync::Mutex::new(sender));
                let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                    let sender = sender.clone();
                    async move {
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
                        *req.uri_mut() = path.parse().unwrap();
                        let h = req.headers_mut();
                        for name in
                            ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"]
                        {
                            h.remove(name);
                        }
                        h.insert("authorization", "Bearer differential".parse().unwrap());
                        let answer = sender.lock().await.send_request(req).await;
                        match answer {
                            Ok(resp) => Ok::<_, hyper::Error>(resp.map(|b| b.boxed())),
                            Err(_) => Ok(hyper::Response::builder()
                                .status(502)
                                .body(http_body_util::Empty::new().map_err(|n| match n {}).boxed())
                                .unwrap()),
                        }
                    }
                });
                // credproxy's field limit (hyper's default is 100): the
                // comparison is of readings, not of resource limits.
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_headers(credproxy::h1::MAX_HEADERS)
                    .serve_connection(TokioIo::new(caller), service)
                    .await;
            });
        }
    });
    addr
}

/// Sends a case's bytes on a fresh connection and reads whatever comes
/// back until the proxy closes or has said nothing for 300 ms.
async fn send_case(proxy: SocketAddr, bytes: Vec<u8>) {
    let Ok(mut s) = TcpStream::connect(proxy).await else { return };
    if s.write_all(&bytes).await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 8192];
    while let Ok(Ok(Ok(n))) =
        tokio::time::timeout_at(deadline, tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk))).await
    {
        if n == 0 {
            break;
        }
    }
}

/// The corpus: each seed of the `request_stream` fuzz target once (the
/// fuzz target's two leading control bytes dropped), with its authority and
/// connection id filled in and its targets under `/c<N>`.
fn corpus(authority: &str, id: &str) -> Vec<Vec<u8>> {
    let dir = repo().join("fuzz/seeds/request_stream");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the committed seeds of the request_stream fuzz target)", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let mut seeds: Vec<Vec<u8>> =
        names.iter().filter_map(|p| std::fs::read(p).ok()).filter(|b| b.len() > 2).map(|b| b[2..].to_vec()).collect();
    seeds.sort();
    seeds.dedup();
    seeds
        .into_iter()
        .enumerate()
        .map(|(n, seed)| {
            let text = replace(&seed, b"http://api.test", format!("http://{authority}/c{n}").as_bytes());
            let text = replace(&text, b"http://user@api.test", format!("http://user@{authority}/c{n}").as_bytes());
            let text = replace(&text, b"GET /origin ", format!("GET /c{n}/origin ").as_bytes());
            let text = replace(&text, b"api.test", authority.as_bytes());
            replace(&text, b"conn_a", id.as_bytes())
        })
        .collect()
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// Runs every case through `proxy` (16 at a time), then takes what the
/// upstream recorded once it has been quiet for a second.
async fn run_all(proxy: SocketAddr, cases: &[Vec<u8>], record: &Record) -> BTreeMap<Option<usize>, Vec<Seen>> {
    let queue = Arc::new(Mutex::new(cases.iter().cloned().collect::<std::collections::VecDeque<_>>()));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move {
                loop {
                    let Some(case) = queue.lock().unwrap().pop_front() else { return };
                    send_case(proxy, case).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now: usize = record.lock().unwrap().values().map(Vec::len).sum();
        if now == last {
            break;
        }
        last = now;
    }
    std::mem::take(&mut *record.lock().unwrap())
}

/// `theirs` has a request with `ours`'s method, target and body and every
/// header of `ours` (taken, so each of theirs matches once).
fn take_match(ours: &Seen, theirs: &mut Vec<Seen>) -> bool {
    let covers = |t: &Seen| {
        let mut rest = t.headers.clone();
        t.method == ours.method
            && t.target == ours.target
            && t.body == ours.body
            && ours.headers.iter().all(|h| rest.iter().position(|x| x == h).map(|i| rest.remove(i)).is_some())
    };
    match theirs.iter().position(covers) {
        Some(i) => {
            theirs.remove(i);
            true
        }
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credproxy_forwards_nothing_hyper_and_nginx_both_refuse() {
    let (upstream, record) = recording_upstream().await;
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "differential-token")]).await;
    let hyper = hyper_proxy(upstream).await;
    let nginx = Nginx::start(&format!(
        "    location / {{\n      proxy_pass http://{upstream};\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n      proxy_set_header Authorization \"Bearer differential\";\n    }}"
    ))
    .await;
    let nginx_addr: SocketAddr = nginx.url.trim_start_matches("http://").parse().unwrap();

    let cases = corpus(&upstream.to_string(), &id);
    assert!(cases.len() > 500, "{} cases: the request_stream seeds are missing", cases.len());

    let ours = run_all(h.running.proxy_addr, &cases, &record).await;
    let hyper_seen = run_all(hyper, &cases, &record).await;
    let nginx_seen = run_all(nginx_addr, &cases, &record).await;

    // Sanity: each system forwarded the plainly valid cases, and credproxy
    // injected its credential (counted here: the upstream saw its token).
    let forwarded = |m: &BTreeMap<Option<usize>, Vec<Seen>>| m.iter().filter(|(k, _)| k.is_some()).count();
    let (c, hy, ng) = (forwarded(&ours), forwarded(&hyper_seen), forwarded(&nginx_seen));
    eprintln!("cases {}: forwarded by credproxy {c}, hyper {hy}, nginx {ng}", cases.len());

    // credproxy injected its credential (requests with no X-Connection-Id,
    // like a second request in a stream, go out as they came: none).
    let credentialed = ours.values().flatten().filter(|r| r.authorization.is_some()).count();
    for r in ours.values().flatten() {
        assert!(r.authorization.as_deref().is_none_or(|a| a == b"Bearer differential-token"), "{r:?}");
    }
    assert!(credentialed >= 10, "{credentialed} requests carried the connection's credential");

    let mut failures = Vec::new();
    let mut stricter = 0;
    let keys: std::collections::BTreeSet<_> =
        ours.keys().chain(hyper_seen.keys()).chain(nginx_seen.keys()).copied().collect();
    for key in keys {
        let mine = ours.get(&key).cloned().unwrap_or_default();
        let mut by_hyper = hyper_seen.get(&key).cloned().unwrap_or_default();
        let mut by_nginx = nginx_seen.get(&key).cloned().unwrap_or_default();
        let verbose = std::env::var("DIFFERENTIAL_VERBOSE").ok();
        if verbose.as_deref() == Some("all") {
            let case = key.map(|k| String::from_utf8_lossy(&cases[k]).into_owned());
            eprintln!(
                "case {key:?} credproxy {} hyper {} nginx {}: {case:?}",
                mine.len(),
                by_hyper.len(),
                by_nginx.len()
            );
        }
        if mine.len() < by_hyper.len().max(by_nginx.len()) {
            stricter += 1;
            if verbose.is_some() {
                let case = key.map(|k| String::from_utf8_lossy(&cases[k]).into_owned());
                eprintln!(
                    "stricter: {key:?} credproxy {} hyper {} nginx {}: {case:?}",
                    mine.len(),
                    by_hyper.len(),
                    by_nginx.len()
                );
            }
        }
        for r in &mine {
            if !(take_match(r, &mut by_hyper) || take_match(r, &mut by_nginx)) {
                let case = key.map(|k| String::from_utf8_lossy(&cases[k]).into_owned());
                failures.push(format!(
                    "case {key:?}: credproxy forwarded {r:?}\n  and neither hyper's proxy nor nginx did (left unmatched: \
                     hyper {by_hyper:?}, nginx {by_nginx:?})\n  case bytes: {case:?}"
                ));
            }
        }
    }
    eprintln!("credproxy forwarded fewer requests than hyper or nginx in {stricter} cases (refused what one accepts)");
    assert!(c >= 10 && hy >= 10 && ng >= 10, "too few cases forwarded (credproxy {c}, hyper {hy}, nginx {ng})");
    assert!(failures.is_empty(), "{} disagreements:\n{}", failures.len(), failures.join("\n"));
}
