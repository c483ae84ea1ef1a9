//! What is measured: the hello upstream, credproxy (and a baseline build of
//! it) as real processes, nginx configured alike; each row a [`System`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use credproxy::admin_client::AdminClient;
use credproxy::secret::SecretValue;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::client::{http_get, Target};
use crate::knobs::Knobs;
use crate::process::{self, Served};
use crate::{repo, ADMIN_TOKEN, ORG, TOKEN};

/// One row of the table: a target, the load generator and its connections,
/// the process whose CPU is measured, and whether it injects the credential
/// (then every request it forwards must arrive with it).
pub struct System {
    pub name: String,
    pub target: Target,
    pub load: Load,
    pub pid: Option<u32>,
    pub injects: bool,
}

/// Which load generator drives a row, with how many keep-alive connections.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// This bench's own closed-loop hyper clients.
    Own(usize),
    /// `wrk -t2` (see `wrk.rs`).
    Wrk(usize),
}

impl Load {
    /// The generator's name in the report, and the connection count.
    pub fn generator(self) -> (&'static str, usize) {
        match self {
            Self::Own(c) => ("own client", c),
            Self::Wrk(c) => ("wrk", c),
        }
    }
}

// ---------------------------------------------------------------- upstream

/// Requests seen by the hello upstream, and how many carried the injected header.
#[derive(Default)]
pub struct Seen {
    total: AtomicU64,
    with_token: AtomicU64,
}

impl Seen {
    /// (all requests, those with the injected header) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.total.load(Ordering::Relaxed), self.with_token.load(Ordering::Relaxed))
    }
}

async fn hello(seen: Arc<Seen>, req: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    seen.total.fetch_add(1, Ordering::Relaxed);
    if req.headers().get(http::header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == bearer().as_bytes()) {
        seen.with_token.fetch_add(1, Ordering::Relaxed);
    }
    Ok(hyper::Response::new(Full::new(Bytes::from_static(b"hello, world\n"))))
}

fn bearer() -> &'static str {
    static BEARER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BEARER.get_or_init(|| format!("Bearer {TOKEN}"))
}

/// The hyper hello server on `127.0.0.1:0`, over TLS with `tls`.
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

// ---------------------------------------------------------------- credproxy

/// `credproxy serve` (`bin`, run by `wrapper` such as valgrind, if any)
/// until it answers `/readyz`; with the time that took.
pub async fn spawn_credproxy(
    wrapper: &[std::ffi::OsString],
    bin: &Path,
    config: &Path,
    cwd: &Path,
    log: &str,
    env: &[(&str, &str)],
) -> (Served, Duration) {
    let started = Instant::now();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    cmd.args(["serve", "--config"]).arg(config).current_dir(cwd).env("RUST_LOG", log).envs(env.iter().copied());
    // Under valgrind start-up takes seconds.
    let served = process::serve(cmd, Duration::from_secs(120)).await;
    while http_get(served.admin, "/readyz").await != Some(200) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (served, started.elapsed())
}

/// The environment that turns credproxy's audit trail off (rows without
/// an access log).
pub const AUDIT_OFF: &[(&str, &str)] = &[("CREDPROXY_AUDIT__SINK", "off")];

/// The baseline's environment: its audit trail off like the credproxy
/// row's, unless LOAD_ACCESS_LOG=1 (then on, like the log).
pub fn baseline_env(k: &Knobs) -> &'static [(&'static str, &'static str)] {
    if k.access_log {
        &[]
    } else {
        AUDIT_OFF
    }
}

pub fn credproxy_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_credproxy"))
}

/// A bearer connection for the bench integration, through the admin API.
async fn create_connection(admin: SocketAddr) -> String {
    create_connection_of(admin, "bench").await
}

/// A bearer connection for `integration`, through the admin API.
async fn create_connection_of(admin: SocketAddr, integration: &str) -> String {
    let client = AdminClient::new(&format!("http://{admin}"), SecretValue::from(ADMIN_TOKEN)).unwrap();
    let body = serde_json::json!({
        "integration": integration, "auth_method": "bearer", "org_id": ORG, "user_id": "u",
        "credentials": {"token": TOKEN},
    });
    let v = client.call(http::Method::POST, "/v1/connections", Some(&body)).await.expect("connection created");
    v["id"].as_str().unwrap().to_owned()
}

/// A run token for the bench organization (a day long: a run outlives the default).
async fn mint_run_token(admin: SocketAddr) -> String {
    let client = AdminClient::new(&format!("http://{admin}"), SecretValue::from(ADMIN_TOKEN)).unwrap();
    let body = serde_json::json!({"org_id": ORG, "ttl_secs": 86_400});
    let v = client.call(http::Method::POST, "/v1/run-tokens", Some(&body)).await.expect("run token minted");
    v["token"].as_str().unwrap().to_owned()
}

/// credproxy's files in `dir`: SQLite, local key, one bench integration,
/// interception on with a CA from `credproxy ca init`. Returns the config
/// file and the CA directory.
fn credproxy_files(dir: &Path, workers: usize) -> (PathBuf, PathBuf) {
    let ca = dir.join("ca");
    let out = std::process::Command::new(credproxy_bin()).args(["ca", "init", "--out"]).arg(&ca).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ints = dir.join("integrations");
    std::fs::create_dir(&ints).unwrap();
    let bench = "name = \"bench\"\nallowed_hosts = [\"127.0.0.1\"]\nupstream_scheme = \"http\"\n\
                 [[auth_methods]]\nid = \"bearer\"\ntype = \"bearer\"\n";
    std::fs::write(ints.join("bench.toml"), format!("id = \"bench\"\n{bench}")).unwrap();
    // The same with generous quotas that never bite: a rate limit per
    // connection and one per integration, an in-flight cap per connection
    // (the `credproxy+limits` row: what checking them costs).
    std::fs::write(
        ints.join("bench-limited.toml"),
        format!(
            "id = \"bench-limited\"\n{bench}\
             [[rate_limits]]\nper = \"connection\"\nrequests = 100000000\nperiod = \"1s\"\n\
             [[rate_limits]]\nper = \"integration\"\nrequests = 100000000\nperiod = \"1s\"\n\
             [[in_flight_limits]]\nper = \"connection\"\nmax_in_flight = 100000\n"
        ),
    )
    .unwrap();
    let config = dir.join("credproxy.toml");
    std::fs::write(&config, credproxy_config(dir, &ints, &ca, workers)).unwrap();
    (config, ca)
}

pub fn credproxy_config(dir: &Path, ints: &Path, ca: &Path, workers: usize) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[store]\nurl = \"sqlite://{d}/credproxy.db\"\n\
         [crypto]\nkey_file = \"{d}/master.key\"\n[egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
         [upstream]\nextra_ca_certs = [\"{ca_up}\"]\n[integrations]\ndir = \"{ints}\"\n\
         [tls_intercept]\nenabled = true\nca_cert = \"{ca}/credproxy-ca.pem\"\nca_key = \"{ca}/credproxy-ca.key\"\n\
         [runtime]\nworker_threads = {workers}\n",
        d = dir.display(),
        ca_up = repo().join("certs/test/upstream-ca.pem").display(),
        ints = ints.display(),
        ca = ca.display(),
    )
}

/// `config` with its own SQLite store, written beside it: the baseline's.
/// Its integrations are the same files (`bench-limited`'s quotas too), so
/// the two processes differ only by binary: with a limited integration
/// anywhere, every request pays the quota table's look-up, and a baseline
/// without one counted ~60-90 instructions fewer for the same build.
pub fn baseline_config(config: &Path) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let out = config.with_file_name(format!("{}-baseline.toml", config.file_stem().unwrap().to_string_lossy()));
    std::fs::write(&out, text.replace("/credproxy.db\"", "/baseline.db\"")).unwrap();
    out
}

/// A TLS client trusting the interception CA in `ca`.
fn client_tls(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in credproxy::upstream::load_pem_certs(&ca.join("credproxy-ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

// ---------------------------------------------------------------- nginx

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// An nginx master process. Stopped with SIGTERM, which it passes on to its
/// workers: a SIGKILL (`kill_on_drop`) would leave the workers running.
pub struct Nginx(std::process::Child);

impl Nginx {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// nginx proxying to `upstream` with a static `Authorization` header and an
/// upstream keep-alive pool. `workers: None`: no master, the one worker is
/// the process itself (to run it under `wrapper`, e.g. valgrind).
/// `access_log`: nginx's default (combined format, a write per request)
/// instead of `access_log off`.
pub async fn spawn_nginx(
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

// ---------------------------------------------------------------- setup

/// Everything the rows run against, started once: the upstreams, credproxy
/// without and with its access log, the baseline build, nginx without and
/// with its access log. Dropping it stops the processes.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub seen: Arc<Seen>,
    pub upstream: SocketAddr,
    upstream_tls: SocketAddr,
    pub config: PathBuf,
    pub conn_id: String,
    /// A connection of `bench-limited` (generous quotas).
    limited_conn: String,
    tls: tokio_rustls::TlsConnector,
    credproxy: Served,
    credproxy_log: Served,
    /// Shared mode on the same store and keys, and a run token for it.
    shared: Served,
    run_token: String,
    /// A shared tier as production runs it: run tokens, the audit trail on
    /// (to stdout), and the `bench-limited` connection's quotas checked.
    prod: Served,
    /// `runtime.thread_per_core` (its own runtime, socket and upstream
    /// pool per thread), otherwise like `credproxy`.
    tpc: Served,
    /// wrk, or why its rows are absent.
    pub wrk: Result<PathBuf, String>,
    baseline: Option<Served>,
    /// The connection in the baseline's own store (kept after the stop:
    /// the callgrind run starts the baseline again).
    baseline_conn: Option<String>,
    nginx: Option<((Nginx, SocketAddr), (Nginx, SocketAddr))>,
}

impl Setup {
    pub async fn start(k: &Knobs) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        let upstream = start_upstream(seen.clone(), None).await;
        let upstream_tls = start_upstream(seen.clone(), Some(upstream_tls())).await;
        let (config, ca) = credproxy_files(dir.path(), k.workers);
        // Like the nginx row (access_log off): no access log, no audit
        // trail. A second instance on the same store keeps the defaults
        // (access log, audit lines to stdout), to show their cost.
        let off = "info,credproxy::access=off";
        let (credproxy, _) = spawn_credproxy(&[], credproxy_bin(), &config, dir.path(), off, AUDIT_OFF).await;
        let (credproxy_log, _) = spawn_credproxy(&[], credproxy_bin(), &config, dir.path(), "info", &[]).await;
        let conn_id = create_connection(credproxy.admin).await;
        let limited_conn = create_connection_of(credproxy.admin, "bench-limited").await;
        // The same store and signing key in shared mode: every request
        // carries a run token (minted by the sidecar instance, same key).
        // On the sidecar's runtime (work stealing): the row says what
        // shared mode costs, not what the runtime saves.
        let prod_config = dir.path().join("credproxy-prod.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let shared_text = text.replace(&format!("org_id = \"{ORG}\""), "mode = \"shared\"");
        std::fs::write(&prod_config, &shared_text).unwrap();
        let shared_config = dir.path().join("credproxy-shared.toml");
        std::fs::write(&shared_config, format!("{shared_text}thread_per_core = false\n")).unwrap();
        let (shared, _) = spawn_credproxy(&[], credproxy_bin(), &shared_config, dir.path(), off, AUDIT_OFF).await;
        let run_token = mint_run_token(credproxy.admin).await;
        // The shared tier's defaults: thread-per-core (shared mode's
        // default), audit lines on (the environment leaves the sink alone).
        let (prod, _) = spawn_credproxy(&[], credproxy_bin(), &prod_config, dir.path(), off, &[]).await;
        let tpc_config = dir.path().join("credproxy-tpc.toml");
        std::fs::write(&tpc_config, format!("{text}thread_per_core = true\n")).unwrap();
        let (tpc, _) = spawn_credproxy(&[], credproxy_bin(), &tpc_config, dir.path(), off, AUDIT_OFF).await;
        let wrk = crate::wrk::find_or_install(k.smoke);
        // LOAD_BASELINE_BIN adds a `baseline` row with the same config and
        // key, so one run says what a change bought. Its own store, with its
        // own copy of the connection: a build from before a store migration
        // refuses a store migrated by this one. The audit trail as the
        // credproxy row has it (a baseline from before the audit trail
        // needs LOAD_ACCESS_LOG=1).
        let (baseline, baseline_conn) = match &k.baseline_bin {
            Some(bin) => {
                let config = baseline_config(&config);
                let served = spawn_credproxy(&[], bin, &config, dir.path(), k.baseline_log(), baseline_env(k)).await.0;
                let conn = create_connection(served.admin).await;
                (Some(served), Some(conn))
            }
            None => (None, None),
        };
        let nginx = match find_tool("nginx") {
            Some(bin) => Some((
                spawn_nginx(&[], &bin, &dir.path().join("nginx"), upstream, Some(k.workers), false).await,
                spawn_nginx(&[], &bin, &dir.path().join("nginx-log"), upstream, Some(k.workers), true).await,
            )),
            None => None,
        };
        let tls = client_tls(&ca);
        Self {
            dir,
            seen,
            upstream,
            upstream_tls,
            config,
            conn_id,
            limited_conn,
            tls,
            credproxy,
            credproxy_log,
            shared,
            run_token,
            prod,
            tpc,
            wrk,
            baseline,
            baseline_conn,
            nginx,
        }
    }

    pub fn has_nginx(&self) -> bool {
        self.nginx.is_some()
    }

    /// A forward-proxy target on `proxy` with the bench connection.
    pub fn via(&self, proxy: SocketAddr) -> Target {
        self.via_conn(proxy, &self.conn_id)
    }

    /// A forward-proxy target on `proxy` with connection `conn`.
    pub fn via_conn(&self, proxy: SocketAddr, conn: &str) -> Target {
        Target::Proxy { proxy, upstream: self.upstream, conn_id: Some(conn.to_owned()), auth: None }
    }

    /// A forward-proxy target on `proxy` with the `bench-limited` connection.
    pub fn via_limited(&self, proxy: SocketAddr) -> Target {
        self.via_conn(proxy, &self.limited_conn)
    }

    /// The baseline's connection (in its own store), when there is a baseline.
    pub fn baseline_conn(&self) -> Option<&str> {
        self.baseline_conn.as_deref()
    }

    /// A shared-mode target on `proxy`: the bench connection, and the run
    /// token in `Proxy-Authorization` on every request.
    /// `CONNECT` through `proxy` to the upstream's TLS port, TLS inside
    /// (intercepted), the bench connection on every inner request.
    pub fn via_connect(&self, proxy: SocketAddr) -> Target {
        Target::Connect { proxy, upstream: self.upstream_tls, conn_id: self.conn_id.clone(), tls: self.tls.clone() }
    }

    pub fn via_shared(&self, proxy: SocketAddr) -> Target {
        self.with_run_token(proxy, &self.conn_id)
    }

    /// A shared tier's production target on `proxy`: a run token on every
    /// request, through the `bench-limited` connection (quotas checked).
    pub fn via_prod(&self, proxy: SocketAddr) -> Target {
        self.with_run_token(proxy, &self.limited_conn)
    }

    fn with_run_token(&self, proxy: SocketAddr, conn: &str) -> Target {
        Target::Proxy {
            proxy,
            upstream: self.upstream,
            conn_id: Some(conn.to_owned()),
            auth: Some(format!("Bearer {}", self.run_token)),
        }
    }

    /// The rows, in the order each round runs them (LOAD_SYSTEMS narrows
    /// them): every configuration at the first connection count with the
    /// own client; credproxy and nginx at the other counts; both through
    /// wrk at every count.
    pub fn systems(&self, k: &Knobs) -> Vec<System> {
        let first = k.conns[0];
        let row = |name: &str, target, pid, injects| System {
            name: name.to_owned(),
            target,
            load: Load::Own(first),
            pid,
            injects,
        };
        let mut systems = vec![
            row("direct", Target::Direct(self.upstream), None, false),
            row("credproxy", self.via(self.credproxy.proxy), self.credproxy.child.id(), true),
            row("credproxy-tpc", self.via(self.tpc.proxy), self.tpc.child.id(), true),
            row("credproxy+limits", self.via_limited(self.credproxy.proxy), self.credproxy.child.id(), true),
            row("credproxy+accesslog", self.via(self.credproxy_log.proxy), self.credproxy_log.child.id(), true),
            row("credproxy-shared", self.via_shared(self.shared.proxy), self.shared.child.id(), true),
            row("credproxy-prod", self.via_prod(self.prod.proxy), self.prod.child.id(), true),
            row("credproxy-connect", self.via_connect(self.credproxy.proxy), self.credproxy.child.id(), true),
        ];
        if let (Some(b), Some(conn)) = (&self.baseline, &self.baseline_conn) {
            systems.insert(2, row("baseline", self.via_conn(b.proxy, conn), b.child.id(), true));
        }
        let nginx_target = |proxy| Target::Proxy { proxy, upstream: self.upstream, conn_id: None, auth: None };
        if let Some(((plain, addr), (logged, addr_log))) = &self.nginx {
            systems.push(row("nginx", nginx_target(*addr), Some(plain.id()), false));
            systems.push(row("nginx+accesslog", nginx_target(*addr_log), Some(logged.id()), false));
        }
        // credproxy and nginx at every other connection count, then through
        // wrk at every count.
        let pair = |load: Load, suffix: String| {
            let mut v = vec![
                System {
                    name: format!("credproxy{suffix}"),
                    target: self.via(self.credproxy.proxy),
                    load,
                    pid: self.credproxy.child.id(),
                    injects: true,
                },
                System {
                    name: format!("credproxy-tpc{suffix}"),
                    target: self.via(self.tpc.proxy),
                    load,
                    pid: self.tpc.child.id(),
                    injects: true,
                },
            ];
            if let (Some(b), Some(conn)) = (&self.baseline, &self.baseline_conn) {
                v.push(System {
                    name: format!("baseline{suffix}"),
                    target: self.via_conn(b.proxy, conn),
                    load,
                    pid: b.child.id(),
                    injects: true,
                });
            }
            if let Some(((plain, addr), _)) = &self.nginx {
                v.push(System {
                    name: format!("nginx{suffix}"),
                    target: nginx_target(*addr),
                    load,
                    pid: Some(plain.id()),
                    injects: false,
                });
            }
            v
        };
        for &c in &k.conns[1..] {
            systems.extend(pair(Load::Own(c), format!("@{c}")));
        }
        if self.wrk.is_ok() {
            for &c in &k.conns {
                systems.extend(pair(Load::Wrk(c), format!("-wrk@{c}")));
            }
        }
        if let Some(keep) = &k.systems {
            systems.retain(|s| keep.contains(&s.name));
        }
        systems
    }

    /// Stops the proxies (the upstream and the files stay, for what follows).
    pub fn stop_proxies(&mut self) {
        self.nginx = None;
        self.baseline = None;
        let _ = self.credproxy.child.start_kill();
        let _ = self.credproxy_log.child.start_kill();
        let _ = self.shared.child.start_kill();
        let _ = self.prod.child.start_kill();
        let _ = self.tpc.child.start_kill();
    }
}
