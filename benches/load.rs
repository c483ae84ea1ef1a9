//! `cargo bench --bench load`: one run comparing, against the same hyper
//! hello upstream on loopback,
//!
//! - `direct`: the load generator talks to the upstream itself;
//! - `credproxy`: absolute-form `http://` through credproxy, bearer connection
//!   (cache hit), the built release binary as its own process;
//! - `credproxy+accesslog`: the same with the default access log (one line
//!   per request to stderr), which the other rows and nginx have off;
//! - `credproxy-connect`: `CONNECT` + TLS interception, HTTP/1.1 inside, to the
//!   upstream's TLS port;
//! - `nginx`: nginx (Debian package) proxying with a static `Authorization`
//!   header and an upstream keep-alive pool; marked absent if not installed;
//! - `nginx+accesslog`: the same with nginx's default access log (combined
//!   format, to a file), to set beside `credproxy+accesslog`.
//!
//! Systems alternate (A B C D, A B C D, …) and each row is the median of the
//! rounds. A ratio between two systems is the median of the per-round
//! ratios: the two ran back to back, so a round that the machine's other
//! load slowed down slows both, and cancels out. CPU per request is the proxy process's utime+stime (all nginx
//! processes) from `/proc/<pid>/stat` over the run, divided by the requests
//! answered. The upstream counts requests carrying the injected header: a
//! credproxy request that arrived without it fails the run.
//!
//! Then, when valgrind is installed: user-space instructions per request of
//! credproxy and of nginx, one thread each, counted by callgrind (zeroed
//! after a warm-up, dumped after the last answer) — a deterministic number
//! where CPU time on a shared machine is not. Then: start-to-ready time of
//! the binary on the embedded-default layout, and resident memory per cached
//! connection (100k connections resolved into the cache in this process).
//!
//! Knobs (environment): LOAD_SECS (per measurement, default 3), LOAD_CONNS
//! (client connections, default 16), LOAD_ROUNDS (default 5),
//! LOAD_CACHE_CONNECTIONS (default 100000; 0 skips start-up and memory),
//! LOAD_WORKERS (credproxy runtime threads = nginx worker processes,
//! default 2), LOAD_SYSTEMS (comma-separated subset of the rows),
//! LOAD_BASELINE_BIN (another credproxy binary, e.g. the previous commit's,
//! measured as a `baseline` row beside `credproxy`, and under callgrind
//! too), LOAD_CALLGRIND=0 (skip the instruction counts), LOAD_CALLGRIND_DIR
//! (keep callgrind's dumps there, for `callgrind_annotate`), LOAD_ACCESS_LOG=1
//! (the `baseline` row and the callgrind runs with the access log on).

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a bench prints its results")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "bench-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
const ORG: &str = "org_bench";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The log filter of the `baseline` row and of both callgrind runs: access
/// log off, unless LOAD_ACCESS_LOG=1 (to compare two builds' log writers;
/// the `credproxy+accesslog` row is then the one to set beside `baseline`).
fn baseline_log() -> &'static str {
    if std::env::var("LOAD_ACCESS_LOG").as_deref() == Ok("1") {
        "info"
    } else {
        "info,credproxy::access=off"
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------- upstream

/// Requests seen by the hello upstream, and how many carried the injected header.
#[derive(Default)]
struct Seen {
    total: AtomicU64,
    with_token: AtomicU64,
}

async fn hello(seen: Arc<Seen>, req: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    seen.total.fetch_add(1, Ordering::Relaxed);
    let expected = const_format_bearer();
    if req.headers().get(http::header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == expected.as_bytes()) {
        seen.with_token.fetch_add(1, Ordering::Relaxed);
    }
    Ok(hyper::Response::new(Full::new(Bytes::from_static(b"hello, world\n"))))
}

fn const_format_bearer() -> &'static str {
    static BEARER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BEARER.get_or_init(|| format!("Bearer {TOKEN}"))
}

async fn start_upstream(seen: Arc<Seen>, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let (seen, tls) = (seen.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| hello(seen.clone(), req));
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn upstream_tls() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<_> = CertificateDer::pem_file_iter(repo().join("certs/test/httpbin.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(repo().join("certs/test/httpbin.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

// ---------------------------------------------------------------- processes

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

fn clock_ticks_per_sec() -> u64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().expect("getconf");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK")
}

struct Credproxy {
    child: tokio::process::Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

/// Starts `credproxy serve` and waits for its listening line.
/// `log`: the `RUST_LOG` filter (the listening line is logged at info).
async fn spawn_credproxy(config: &Path, cwd: &Path, log: &str) -> (Credproxy, Duration) {
    spawn_binary(Path::new(env!("CARGO_BIN_EXE_credproxy")), config, cwd, log).await
}

async fn spawn_binary(bin: &Path, config: &Path, cwd: &Path, log: &str) -> (Credproxy, Duration) {
    spawn_wrapped(&[], bin, config, cwd, log).await
}

/// `credproxy serve` run by `wrapper` (e.g. valgrind and its options), if any.
async fn spawn_wrapped(
    wrapper: &[std::ffi::OsString],
    bin: &Path,
    config: &Path,
    cwd: &Path,
    log: &str,
) -> (Credproxy, Duration) {
    let started = Instant::now();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    let mut child = cmd
        .args(["serve", "--config"])
        .arg(config)
        .current_dir(cwd)
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the credproxy binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addrs = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("credproxy listening") {
            let field = |name: &str| -> SocketAddr {
                line.split(&format!("{name}=")).nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
            };
            addrs = Some((field("proxy"), field("admin")));
            break;
        }
    }
    let (proxy, admin) = addrs.expect("credproxy printed its listening line");
    // Wait until it answers /readyz: that is "ready".
    loop {
        if http_get(admin, "/readyz").await == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ready = started.elapsed();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (Credproxy { child, proxy, admin }, ready)
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new()).ok()?;
    Some(tx.send_request(req).await.ok()?.status().as_u16())
}

async fn create_connection(admin: SocketAddr) -> String {
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let body = serde_json::json!({
        "integration": "bench", "auth_method": "bearer", "org_id": ORG, "user_id": "u",
        "credentials": {"token": TOKEN},
    });
    let req = http::Request::post("/v1/connections")
        .header("host", admin.to_string())
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 201);
    let v: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn find_nginx() -> Option<PathBuf> {
    find_tool("nginx")
}

/// An nginx master process. Stopped with SIGTERM, which it passes on to its
/// workers: a SIGKILL (`kill_on_drop`) would leave the workers running.
struct Nginx(std::process::Child);

impl Nginx {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// nginx with `workers` worker processes (as many as credproxy's runtime
/// threads), a static `Authorization` header and an upstream keep-alive pool.
async fn spawn_nginx(
    bin: &Path,
    prefix: &Path,
    upstream: SocketAddr,
    workers: usize,
    access_log: bool,
) -> (Nginx, SocketAddr) {
    spawn_nginx_with(&[], bin, prefix, upstream, Some(workers), access_log).await
}

/// `workers: None`: no master, the one worker is the process itself (to
/// run it under `wrapper`, e.g. valgrind). `access_log`: nginx's default
/// (combined format, a write per request) instead of `access_log off`.
async fn spawn_nginx_with(
    wrapper: &[std::ffi::OsString],
    bin: &Path,
    prefix: &Path,
    upstream: SocketAddr,
    workers: Option<usize>,
    access_log: bool,
) -> (Nginx, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let (master, workers) = match workers {
        Some(n) => ("on", n),
        None => ("off", 1),
    };
    let conf = format!(
        "daemon off;\nmaster_process {master};\nworker_processes {workers};\npid {p}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {log};\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
           upstream hello {{ server {upstream}; keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://hello;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
               proxy_set_header Authorization \"Bearer {TOKEN}\";\n    }}\n  }}\n}}\n",
        p = prefix.display(),
        log = if access_log { format!("{}/access.log", prefix.display()) } else { "off".into() },
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = std::process::Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => std::process::Command::new(bin),
    };
    let child = Nginx(
        cmd.arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts"),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..3000 {
        if TcpStream::connect(addr).await.is_ok() {
            return (child, addr);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nginx did not listen on {addr}");
}

// ---------------------------------------------------------------- load generator

#[derive(Clone)]
enum Target {
    /// Origin-form requests straight to the upstream.
    Direct(SocketAddr),
    /// Absolute-form requests to a forward proxy.
    Proxy { proxy: SocketAddr, upstream: SocketAddr, conn_id: Option<String> },
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
        Target::Proxy { upstream, conn_id, .. } => {
            let b = b.uri(format!("http://{upstream}/")).header("host", upstream.to_string());
            match conn_id {
                Some(id) => b.header("x-connection-id", id),
                None => b,
            }
        }
        Target::Connect { upstream, conn_id, .. } => {
            b.uri("/").header("host", upstream.to_string()).header("x-connection-id", conn_id)
        }
    };
    b.body(Empty::new()).unwrap()
}

struct Sample {
    ok: u64,
    errors: u64,
    secs: f64,
    latencies_us: Vec<u32>,
    /// Proxy CPU per answered request, µs (absent for `direct`).
    cpu_us: Option<f64>,
    /// The user-space part of `cpu_us` (the rest is the kernel's).
    user_us: Option<f64>,
    peak_rss_kb: Option<u64>,
}

/// `conns` closed-loop clients for `dur`; measures the proxy process tree `pid`.
async fn run(target: &Target, conns: usize, dur: Duration, pid: Option<u32>, tck: u64) -> Sample {
    run_hooked(target, conns, dur, pid, tck, &|| {}, &|| {}).await
}

/// [`run`], calling `on_start` when the measured part starts (connections
/// open, warmed up) and `on_end` when its last request has been answered.
async fn run_hooked(
    target: &Target,
    conns: usize,
    dur: Duration,
    pid: Option<u32>,
    tck: u64,
    on_start: &dyn Fn(),
    on_end: &dyn Fn(),
) -> Sample {
    // Connections (and CONNECT tunnels) are opened before the clock starts.
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(open(target).await);
    }
    // Warm-up: a few requests on every connection.
    for tx in &mut senders {
        for _ in 0..5 {
            tx.ready().await.unwrap();
            let resp = tx.send_request(request(target)).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }
    }
    on_start();
    let before = pid.map(tree_stat);
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
    let after = pid.map(tree_stat);
    let per_req = |ticks: u64| ticks as f64 * 1e6 / tck as f64 / ok.max(1) as f64;
    let (cpu_us, user_us, peak_rss_kb) = match (before, after) {
        (Some(((u0, s0), _)), Some(((u1, s1), rss))) => {
            (Some(per_req(u1 + s1 - u0 - s0)), Some(per_req(u1 - u0)), Some(rss))
        }
        _ => (None, None, None),
    };
    latencies_us.sort_unstable();
    Sample { ok, errors, secs, latencies_us, cpu_us, user_us, peak_rss_kb }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median over rounds of `f(a) / f(b)` for the rounds' paired samples.
fn paired(a: &[Sample], b: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x).zip(f(y)).map_or(f64::NAN, |(x, y)| x / y)).collect();
    if ratios.is_empty() {
        f64::NAN
    } else {
        median(ratios)
    }
}

/// CPU per request, p99 and throughput of `a` against `b`, paired by round.
fn ratios(a: &[Sample], b: &[Sample]) -> (f64, f64, f64) {
    (
        paired(a, b, |s| s.cpu_us),
        paired(a, b, |s| Some(f64::from(percentile(&s.latencies_us, 0.99)))),
        paired(a, b, |s| Some(s.ok as f64 / s.secs)),
    )
}

struct Row {
    rps: f64,
    p50: f64,
    p99: f64,
    cpu: Option<f64>,
    user: Option<f64>,
    rss_kb: Option<u64>,
}

fn summarize(samples: &[Sample]) -> Row {
    Row {
        rps: median(samples.iter().map(|s| s.ok as f64 / s.secs).collect()),
        p50: median(samples.iter().map(|s| f64::from(percentile(&s.latencies_us, 0.50))).collect()),
        p99: median(samples.iter().map(|s| f64::from(percentile(&s.latencies_us, 0.99))).collect()),
        cpu: samples.iter().map(|s| s.cpu_us).collect::<Option<Vec<_>>>().map(median),
        user: samples.iter().map(|s| s.user_us).collect::<Option<Vec<_>>>().map(median),
        rss_kb: samples.iter().filter_map(|s| s.peak_rss_kb).max(),
    }
}

// ---------------------------------------------------------------- instructions per request

/// `valgrind --tool=callgrind`, writing its dumps into `dir`.
fn callgrind_wrapper(valgrind: &Path, dir: &Path) -> Vec<std::ffi::OsString> {
    vec![
        valgrind.into(),
        "--tool=callgrind".into(),
        "--compress-strings=no".into(),
        format!("--callgrind-out-file={}/cg.%p", dir.display()).into(),
    ]
}

fn callgrind_control(control: &Path, flag: &str, pid: u32) {
    let out =
        std::process::Command::new(control).args([flag, &pid.to_string()]).output().expect("callgrind_control runs");
    assert!(out.status.success(), "callgrind_control {flag} {pid}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The instruction count of the newest dump of `pid` in `dir`.
fn dumped_instructions(dir: &Path, pid: u32) -> u64 {
    let prefix = format!("cg.{pid}.");
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .max()
        .expect("callgrind wrote a dump")
        .1;
    let text = std::fs::read_to_string(&newest).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")));
    line.and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("callgrind dump has a summary")
}

/// User-space instructions per request of the process `pid` (running under
/// callgrind): counters zeroed once connections are open and warm, dumped
/// after the last answer, divided by the requests answered.
async fn instructions_per_request(
    control: &Path,
    dir: &Path,
    pid: u32,
    target: &Target,
    conns: usize,
    dur: Duration,
    tck: u64,
) -> f64 {
    let s = run_hooked(target, conns, dur, None, tck, &|| callgrind_control(control, "-z", pid), &|| {
        callgrind_control(control, "-d", pid)
    })
    .await;
    assert_eq!(s.errors, 0, "requests failed under callgrind");
    dumped_instructions(dir, pid) as f64 / s.ok.max(1) as f64
}

// ---------------------------------------------------------------- cache memory

/// Resident memory of this process, kB.
fn self_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// Seals `n` bearer connections straight into a SQLite store, then resolves
/// each once through a fresh `Connections` (cache miss → cached) and
/// returns the RSS growth per cached connection in bytes.
async fn cache_memory(n: usize) -> f64 {
    use credproxy::creds::Connections;
    use credproxy::crypto::{Context, Envelope, LocalKeyProvider};
    use credproxy::integrations::Integrations;
    use credproxy::oauth2::TokenClient;
    use credproxy::store::sqlite::SqliteStore;
    use credproxy::store::{ConnectionMeta, ConnectionRow, ConnectionState, SealedBytes, Store};

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
    let envelope = Envelope::new(Arc::new(LocalKeyProvider::open_or_create(&dir.path().join("master.key")).unwrap()));
    let ints_dir = repo().join("config/integrations");
    let ints = Arc::new(Integrations::load_dir(&ints_dir, &BTreeMap::new()).unwrap());
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("conn_{i:026}");
        let plain = serde_json::json!({"token": format!("token-{i:08}-abcdefghijklmnopqrstuvwxyz")}).to_string();
        let s = envelope.seal(Context { org_id: ORG, connection_id: &id }, plain.as_bytes()).await.unwrap();
        let meta = ConnectionMeta {
            id: id.clone(),
            org_id: ORG.into(),
            user_id: "user_1".into(),
            integration: "httpbin".into(),
            auth_method: "bearer".into(),
            state: ConnectionState::Active,
            created_at: 1,
            updated_at: 1,
        };
        let sealed =
            SealedBytes { key_id: s.key_id, wrapped_key: s.wrapped_key, nonce: s.nonce, ciphertext: s.ciphertext };
        store.insert_connection(&ConnectionRow { meta, sealed }).await.unwrap();
        ids.push(id);
    }
    let conns = Connections::new(
        store,
        envelope,
        ints,
        n as u64 * 2,
        Duration::from_secs(3600),
        TokenClient::new(Default::default(), Duration::from_secs(1), Duration::from_secs(1), &[]),
    );
    // One resolve first so one-time allocations are not counted per entry.
    conns.resolve(ORG, &ids[0]).await.unwrap();
    let before = self_rss_kb();
    for id in &ids[1..] {
        let (_, hit) = conns.resolve(ORG, id).await.unwrap();
        assert!(!hit);
    }
    let after = self_rss_kb();
    // Every entry must still be there (nothing evicted).
    for id in ids.iter().step_by(97) {
        assert!(conns.resolve(ORG, id).await.unwrap().1, "cache kept {id}");
    }
    (after.saturating_sub(before) * 1024) as f64 / (n - 1) as f64
}

// ---------------------------------------------------------------- main

fn main() {
    // `cargo bench` passes `--bench`. Without it (`cargo test --all-targets`)
    // this is a smoke run: every row briefly, with the same sanity checks
    // (every credproxy request carried the injected header), no timing claims.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let ms: u64 = if smoke { 300 } else { env_or::<u64>("LOAD_SECS", 3) * 1000 };
    let conns: usize = env_or("LOAD_CONNS", if smoke { 4 } else { 16 });
    let rounds: usize = if smoke { 1 } else { env_or("LOAD_ROUNDS", 5) };
    // 0 skips the start-up and cache-memory sections.
    let cache_n: usize = if smoke { 500 } else { env_or("LOAD_CACHE_CONNECTIONS", 100_000) };
    // credproxy runtime threads and nginx worker processes (the same number).
    let workers: usize = env_or("LOAD_WORKERS", 2);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if smoke {
        println!("load bench smoke run (cargo bench --bench load measures)");
    }
    rt.block_on(bench(Duration::from_millis(ms), conns, rounds.max(1), cache_n, workers.max(1)));
}

async fn bench(dur: Duration, conns: usize, rounds: usize, cache_n: usize, workers: usize) {
    let tck = clock_ticks_per_sec();
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let up = start_upstream(seen.clone(), None).await;
    let up_tls = start_upstream(seen.clone(), Some(upstream_tls())).await;

    // credproxy: SQLite, local key, one bench integration, interception on.
    let ca = dir.path().join("ca");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .args(["ca", "init", "--out"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ints = dir.path().join("integrations");
    std::fs::create_dir(&ints).unwrap();
    std::fs::write(
        ints.join("bench.toml"),
        "id = \"bench\"\nname = \"bench\"\nallowed_hosts = [\"127.0.0.1\"]\nupstream_scheme = \"http\"\n\
         [[auth_methods]]\nid = \"bearer\"\ntype = \"bearer\"\n",
    )
    .unwrap();
    let config = dir.path().join("credproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[store]\nurl = \"sqlite://{d}/credproxy.db\"\n\
             [crypto]\nkey_file = \"{d}/master.key\"\n[egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [upstream]\nextra_ca_certs = [\"{ca_up}\"]\n[integrations]\ndir = \"{ints}\"\n\
             [tls_intercept]\nenabled = true\nca_cert = \"{ca}/credproxy-ca.pem\"\nca_key = \"{ca}/credproxy-ca.key\"\n\
             [runtime]\nworker_threads = {workers}\n",
            d = dir.path().display(),
            ca_up = repo().join("certs/test/upstream-ca.pem").display(),
            ints = ints.display(),
            ca = ca.display(),
        ),
    )
    .unwrap();
    // Like the nginx row (access_log off): no access log. A second instance
    // on the same store keeps the default access log, to show its cost.
    let (cp, _) = spawn_credproxy(&config, dir.path(), "info,credproxy::access=off").await;
    let cp_pid = cp.child.id().unwrap();
    let (cp_log, _) = spawn_credproxy(&config, dir.path(), "info").await;
    let conn_id = create_connection(cp.admin).await;
    // LOAD_BASELINE_BIN=/path/to/an/older/credproxy adds a `baseline` row on
    // the same store and config, so one run says what a change bought.
    let baseline = match std::env::var_os("LOAD_BASELINE_BIN") {
        Some(bin) => Some(spawn_binary(Path::new(&bin), &config, dir.path(), baseline_log()).await.0),
        None => None,
    };

    let mut roots = rustls::RootCertStore::empty();
    for c in credproxy::upstream::load_pem_certs(&ca.join("credproxy-ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let client_tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls));

    let nginx = match find_nginx() {
        Some(bin) => Some((
            spawn_nginx(&bin, &dir.path().join("nginx"), up, workers, false).await,
            spawn_nginx(&bin, &dir.path().join("nginx-log"), up, workers, true).await,
        )),
        None => None,
    };

    let mut systems: Vec<(&str, Target, Option<u32>, bool)> = vec![
        ("direct", Target::Direct(up), None, false),
        (
            "credproxy",
            Target::Proxy { proxy: cp.proxy, upstream: up, conn_id: Some(conn_id.clone()) },
            Some(cp_pid),
            true,
        ),
        (
            "credproxy+accesslog",
            Target::Proxy { proxy: cp_log.proxy, upstream: up, conn_id: Some(conn_id.clone()) },
            cp_log.child.id(),
            true,
        ),
        (
            "credproxy-connect",
            Target::Connect { proxy: cp.proxy, upstream: up_tls, conn_id: conn_id.clone(), tls },
            Some(cp_pid),
            true,
        ),
    ];
    if let Some(b) = &baseline {
        let target = Target::Proxy { proxy: b.proxy, upstream: up, conn_id: Some(conn_id.clone()) };
        systems.insert(2, ("baseline", target, b.child.id(), true));
    }
    if let Some(((child, addr), (child_log, addr_log))) = &nginx {
        systems.push(("nginx", Target::Proxy { proxy: *addr, upstream: up, conn_id: None }, Some(child.id()), false));
        let target = Target::Proxy { proxy: *addr_log, upstream: up, conn_id: None };
        systems.push(("nginx+accesslog", target, Some(child_log.id()), false));
    }
    // LOAD_SYSTEMS=credproxy,nginx narrows a run (for A/B work on one change).
    if let Ok(only) = std::env::var("LOAD_SYSTEMS") {
        let keep: Vec<&str> = only.split(',').collect();
        systems.retain(|s| keep.contains(&s.0));
    }
    println!(
        "load: {conns} connections, {:.1} s per measurement, {rounds} rounds, {workers} credproxy threads / nginx workers, alternating {}",
        dur.as_secs_f64(),
        systems.iter().map(|s| s.0).collect::<Vec<_>>().join(" → ")
    );

    let mut samples: Vec<Vec<Sample>> = systems.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (name, target, pid, injects)) in systems.iter().enumerate() {
            let (t0, w0) = (seen.total.load(Ordering::Relaxed), seen.with_token.load(Ordering::Relaxed));
            let s = run(target, conns, dur, *pid, tck).await;
            let (t1, w1) = (seen.total.load(Ordering::Relaxed), seen.with_token.load(Ordering::Relaxed));
            // Sanity: every request credproxy forwarded carried the injected header.
            assert_eq!(s.errors, 0, "{name}: {} failed requests in round {round}", s.errors);
            if *injects {
                assert_eq!(
                    w1 - w0,
                    t1 - t0,
                    "{name}: {} requests reached the upstream without the token",
                    (t1 - t0) - (w1 - w0)
                );
                assert!(w1 - w0 >= s.ok, "{name}: {} answered, only {} carried the token", s.ok, w1 - w0);
            }
            if name.starts_with("nginx") {
                assert_eq!(w1 - w0, t1 - t0, "{name}: requests without the static header");
            }
            eprintln!(
                "  round {} {name:<18} {:>8.0} req/s  cpu {:>8}  (user {:>8})  p99 {:>6} µs",
                round + 1,
                s.ok as f64 / s.secs,
                s.cpu_us.map_or("-".into(), |c| format!("{c:.1} µs")),
                s.user_us.map_or("-".into(), |c| format!("{c:.1} µs")),
                percentile(&s.latencies_us, 0.99)
            );
            samples[i].push(s);
        }
    }
    if nginx.is_none() {
        println!("nginx: absent (install Debian's `nginx` to compare)");
    }

    let rows: Vec<(&str, Row)> = systems.iter().zip(&samples).map(|(s, v)| (s.0, summarize(v))).collect();
    println!();
    println!("| system | req/s | p50 µs | p99 µs | proxy CPU µs/req | of which user | proxy peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            r.rps,
            r.p50,
            r.p99,
            r.cpu.map_or("-".into(), |c| format!("{c:.1}")),
            r.user.map_or("-".into(), |c| format!("{c:.1}")),
            r.rss_kb.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
    }
    let get = |n: &str| systems.iter().position(|s| s.0 == n).map(|i| samples[i].as_slice());
    println!();
    println!("ratios: median of the per-round ratios (each round runs the systems back to back)");
    if let (Some(cpx), Some(direct)) = (get("credproxy"), get("direct")) {
        let (_, p99, rps) = ratios(cpx, direct);
        println!("credproxy/direct: throughput {rps:.2}, p99 {p99:.2}");
    }
    if let (Some(cpx), Some(b)) = (get("credproxy"), get("baseline")) {
        let (cpu, p99, rps) = ratios(cpx, b);
        println!("credproxy/baseline: CPU per request {cpu:.2}, p99 {p99:.2}, throughput {rps:.2}");
    }
    if let Some(n) = get("nginx") {
        // A LOAD_SYSTEMS subset prints only the ratios it has rows for.
        for (name, target) in [("credproxy", true), ("credproxy+accesslog", false), ("credproxy-connect", false)] {
            let Some(r) = get(name) else { continue };
            // Each configuration against nginx configured alike.
            let n = if name == "credproxy+accesslog" { get("nginx+accesslog").unwrap_or(n) } else { n };
            let name = if name == "credproxy+accesslog" && get("nginx+accesslog").is_some() {
                "credproxy+accesslog/nginx+accesslog".to_owned()
            } else {
                format!("{name}/nginx")
            };
            let (cpu, p99, rps) = ratios(r, n);
            let (t_cpu, t_p99) = if target { (" (target ≤ 0.80)", " (target ≤ 1.00)") } else { ("", "") };
            println!("{name}: CPU per request {cpu:.2}{t_cpu}, p99 {p99:.2}{t_p99}, throughput {rps:.2}");
        }
    }
    drop(nginx);
    drop(cp);
    drop(cp_log);
    drop(baseline);

    // Instructions per request: deterministic, where CPU time is noisy. One
    // thread each (credproxy runtime.worker_threads = 1, one nginx process).
    let valgrind = find_tool("valgrind").zip(find_tool("callgrind_control"));
    match (valgrind, std::env::var("LOAD_CALLGRIND").as_deref()) {
        (_, Ok("0")) => {}
        (None, _) => println!("\ninstructions per request: absent (install Debian's `valgrind` to count them)"),
        (Some((valgrind, control)), _) => {
            // LOAD_CALLGRIND_DIR keeps the dumps (for callgrind_annotate).
            let cg = std::env::var_os("LOAD_CALLGRIND_DIR").map_or_else(|| dir.path().join("callgrind"), PathBuf::from);
            std::fs::create_dir_all(&cg).unwrap();
            let wrapper = callgrind_wrapper(&valgrind, &cg);
            let one_thread = dir.path().join("credproxy-1.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&one_thread, text.replace(&format!("worker_threads = {workers}"), "worker_threads = 1"))
                .unwrap();
            let bin = Path::new(env!("CARGO_BIN_EXE_credproxy"));
            let (cpv, _) = spawn_wrapped(&wrapper, bin, &one_thread, dir.path(), baseline_log()).await;
            let target = Target::Proxy { proxy: cpv.proxy, upstream: up, conn_id: Some(conn_id.clone()) };
            let (t0, w0) = (seen.total.load(Ordering::Relaxed), seen.with_token.load(Ordering::Relaxed));
            let pid = cpv.child.id().unwrap();
            let cp_ir = instructions_per_request(&control, &cg, pid, &target, 4, dur / 2, tck).await;
            let (t1, w1) = (seen.total.load(Ordering::Relaxed), seen.with_token.load(Ordering::Relaxed));
            assert_eq!(w1 - w0, t1 - t0, "credproxy under callgrind: requests without the token");
            drop(cpv);
            // The baseline binary too, so a change's instruction count is
            // read before and after in one run.
            let base_ir = match std::env::var_os("LOAD_BASELINE_BIN") {
                Some(base) => {
                    let log = baseline_log();
                    let (bv, _) = spawn_wrapped(&wrapper, Path::new(&base), &one_thread, dir.path(), log).await;
                    let target = Target::Proxy { proxy: bv.proxy, upstream: up, conn_id: Some(conn_id.clone()) };
                    let pid = bv.child.id().unwrap();
                    Some(instructions_per_request(&control, &cg, pid, &target, 4, dur / 2, tck).await)
                }
                None => None,
            };
            let ng_ir = match find_nginx() {
                Some(bin) => {
                    let (ngv, addr) =
                        spawn_nginx_with(&wrapper, &bin, &dir.path().join("nginx-cg"), up, None, false).await;
                    let target = Target::Proxy { proxy: addr, upstream: up, conn_id: None };
                    Some(instructions_per_request(&control, &cg, ngv.id(), &target, 4, dur / 2, tck).await)
                }
                None => None,
            };
            println!();
            match ng_ir {
                Some(n) => println!(
                    "user-space instructions per request (callgrind, one thread each): credproxy {cp_ir:.0}, nginx {n:.0}, credproxy/nginx {:.2}",
                    cp_ir / n
                ),
                None => println!("user-space instructions per request (callgrind, one thread): credproxy {cp_ir:.0}; nginx absent"),
            }
            if let Some(b) = base_ir {
                println!("baseline {b:.0} instructions per request, credproxy/baseline {:.3}", cp_ir / b);
            }
        }
    }
    if cache_n < 2 {
        return;
    }

    // Start to ready on the embedded-default layout (fresh data dir: SQLite
    // created, master key created), median of 5.
    let mut readies = Vec::new();
    for _ in 0..5 {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("config")).unwrap();
        let cfg = d.path().join("config/credproxy.toml");
        std::fs::write(
            &cfg,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[integrations]\ndir = \"{}\"\n",
                repo().join("config/integrations").display()
            ),
        )
        .unwrap();
        let (p, ready) = spawn_credproxy(&cfg, d.path(), "info").await;
        drop(p);
        readies.push(ready.as_secs_f64() * 1000.0);
    }
    println!();
    println!(
        "start to ready (embedded default, fresh data dir, /readyz 200): {:.1} ms (target < 100 ms)",
        median(readies)
    );

    let per_conn = cache_memory(cache_n).await;
    println!(
        "resident memory per cached connection ({cache_n} resolved into the cache): {per_conn:.0} bytes (target ≤ 1024)"
    );
}
