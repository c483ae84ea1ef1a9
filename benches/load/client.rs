//! The load generator: closed-loop HTTP/1.1 clients (hyper) against a
//! [`Target`], and what one run of them measured ([`Sample`]) — answers,
//! latencies, and the CPU the measured process tree spent (`/proc`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::statistics::percentile;

#[derive(Clone)]
pub enum Target {
    /// Origin-form requests straight to the upstream.
    Direct(SocketAddr),
    /// Absolute-form requests to a forward proxy.
    /// `auth`: a `Proxy-Authorization` value sent on every request (a run token).
    Proxy { proxy: SocketAddr, upstream: SocketAddr, conn_id: Option<String>, auth: Option<String> },
    /// CONNECT to the upstream's TLS port, TLS inside (trusting `ca`), then requests.
    Connect { proxy: SocketAddr, upstream: SocketAddr, conn_id: String, tls: tokio_rustls::TlsConnector },
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn open(target: &Target) -> Sender {
    match target {
        Target::Direct(addr) | Target::Proxy { proxy: addr, .. } => {
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
            tokio::spawn(conn);
            tx
        }
        Target::Connect { proxy, upstream, tls, .. } => {
            let mut s = TcpStream::connect(proxy).await.unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(format!("CONNECT {upstream} HTTP/1.1\r\nHost: {upstream}\r\n\r\n").as_bytes()).await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
            let name = rustls::pki_types::ServerName::from(upstream.ip());
            let s = tls.connect(name, s).await.unwrap();
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
            tokio::spawn(conn);
            tx
        }
    }
}

fn request(target: &Target) -> http::Request<Empty<Bytes>> {
    let b = http::Request::builder();
    let b = match target {
        Target::Direct(addr) => b.uri("/").header("host", addr.to_string()),
        Target::Proxy { upstream, conn_id, auth, .. } => {
            let mut b = b.uri(format!("http://{upstream}/")).header("host", upstream.to_string());
            if let Some(id) = conn_id {
                b = b.header("x-connection-id", id);
            }
            if let Some(auth) = auth {
                b = b.header("proxy-authorization", auth);
            }
            b
        }
        Target::Connect { upstream, conn_id, .. } => {
            b.uri("/").header("host", upstream.to_string()).header("x-connection-id", conn_id)
        }
    };
    b.body(Empty::new()).unwrap()
}

pub struct Sample {
    pub ok: u64,
    pub errors: u64,
    pub secs: f64,
    /// Latency percentiles of the answered requests, µs.
    pub p50_us: u32,
    pub p99_us: u32,
    /// Proxy CPU per answered request, µs (absent for `direct`).
    pub cpu_us: Option<f64>,
    /// The user-space part of `cpu_us` (the rest is the kernel's).
    pub user_us: Option<f64>,
    pub peak_rss_kb: Option<u64>,
}

/// The CPU a measured process tree spends over one run.
pub struct Meter {
    pid: Option<u32>,
    tck: u64,
    before: Option<((u64, u64), u64)>,
}

impl Meter {
    /// Starts counting for `pid` (and its children); `None` measures nothing.
    pub fn start(pid: Option<u32>, tck: u64) -> Self {
        Self { pid, tck, before: pid.map(tree_stat) }
    }

    /// (CPU µs per request, of which user, peak RSS kB) over `ok` answers.
    pub fn finish(self, ok: u64) -> (Option<f64>, Option<f64>, Option<u64>) {
        let after = self.pid.map(tree_stat);
        let per_req = |ticks: u64| ticks as f64 * 1e6 / self.tck as f64 / ok.max(1) as f64;
        match (self.before, after) {
            (Some(((u0, s0), _)), Some(((u1, s1), rss))) => {
                (Some(per_req(u1 + s1 - u0 - s0)), Some(per_req(u1 - u0)), Some(rss))
            }
            _ => (None, None, None),
        }
    }
}

/// `conns` closed-loop clients for `dur`; measures the proxy process tree `pid`.
pub async fn run(target: &Target, conns: usize, dur: Duration, pid: Option<u32>, tck: u64) -> Sample {
    run_hooked(target, conns, dur, pid, tck, &|| {}, &|| {}).await
}

/// [`run`], calling `on_start` when the measured part starts (connections
/// open, warmed up) and `on_end` when its last request has been answered.
pub async fn run_hooked(
    target: &Target,
    conns: usize,
    dur: Duration,
    pid: Option<u32>,
    tck: u64,
    on_start: &dyn Fn(),
    on_end: &dyn Fn(),
) -> Sample {
    // Connections (and CONNECT tunnels) are opened before the clock starts.
    let mut opening = Vec::with_capacity(conns);
    for _ in 0..conns {
        opening.push(open(target).await);
    }
    // Warm-up: a few requests on every connection, the connections at
    // once, so that the proxy's upstream pool holds as many connections as
    // the load keeps busy before the clock starts (warmed one at a time it
    // held one, and the rest were opened in the count: for the TLS upstream
    // of `credproxy-connect`, handshakes ~1.8k instructions a request).
    let warming: Vec<_> = opening
        .into_iter()
        .map(|mut tx| {
            let target = target.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tx.ready().await.unwrap();
                    let resp = tx.send_request(request(&target)).await.unwrap();
                    resp.into_body().collect().await.unwrap();
                }
                tx
            })
        })
        .collect();
    let mut senders = Vec::with_capacity(conns);
    for w in warming {
        senders.push(w.await.unwrap());
    }
    on_start();
    let meter = Meter::start(pid, tck);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + dur;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut tx| {
            let target = target.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::with_capacity(65536));
                while tokio::time::Instant::now() < deadline {
                    let t = Instant::now();
                    let done = async {
                        tx.ready().await.ok()?;
                        let resp = tx.send_request(request(&target)).await.ok()?;
                        let status = resp.status();
                        resp.into_body().collect().await.ok()?;
                        status.is_success().then_some(())
                    };
                    match done.await {
                        Some(()) => {
                            ok += 1;
                            lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                        None => {
                            errors += 1;
                            break;
                        }
                    }
                }
                (ok, errors, lat)
            })
        })
        .collect();
    let (mut ok, mut errors, mut latencies_us) = (0, 0, Vec::new());
    for t in tasks {
        let (o, e, l) = t.await.unwrap();
        ok += o;
        errors += e;
        latencies_us.extend(l);
    }
    let secs = started.elapsed().as_secs_f64();
    on_end();
    let (cpu_us, user_us, peak_rss_kb) = meter.finish(ok);
    latencies_us.sort_unstable();
    let (p50_us, p99_us) = (percentile(&latencies_us, 0.50), percentile(&latencies_us, 0.99));
    Sample { ok, errors, secs, p50_us, p99_us, cpu_us, user_us, peak_rss_kb }
}

/// The status of `GET path` on `addr` (plain HTTP/1.1), if it answered.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new()).ok()?;
    Some(tx.send_request(req).await.ok()?.status().as_u16())
}

// ---------------------------------------------------------------- the measured process

/// CPU ticks (utime, stime) and peak RSS (kB) of a process.
fn proc_stat(pid: u32) -> Option<((u64, u64), u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks = (f.get(11)?.parse::<u64>().ok()?, f.get(12)?.parse::<u64>().ok()?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some((ticks, hwm))
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let ppid = stat[close + 2..].split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// CPU ticks (user, system) and summed peak RSS of a process and its
/// children (nginx workers).
fn tree_stat(pid: u32) -> ((u64, u64), u64) {
    let mut pids = vec![pid];
    pids.extend(children_of(pid));
    pids.iter()
        .filter_map(|p| proc_stat(*p))
        .fold(((0, 0), 0), |((u, s), r), ((u2, s2), r2)| ((u + u2, s + s2), r + r2))
}

pub fn clock_ticks_per_sec() -> u64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().expect("getconf");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK")
}
