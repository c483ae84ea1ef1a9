//! Shared test support: starts credproxy in-process on 127.0.0.1:0 with a
//! fresh SQLite store and key, finds the real peers that `scripts/test`
//! started, and runs real clients (curl, Python requests/httpx).

#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(clippy::print_stderr, reason = "test diagnostics")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aws_sdk_kms::types::KeySpec;

use credproxy::admin_client::AdminClient;
use credproxy::config::Config;
use credproxy::integrations::Integrations;
use credproxy::secret::SecretValue;
use credproxy::server::{self, Listeners, Running};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const ORG_TOKEN: &str = "test-org-token-for-org-local-0123";
pub const ORG: &str = "org_local";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Base URL of the httpbin that `scripts/test` starts.
pub fn httpbin() -> String {
    std::env::var("CPTEST_HTTPBIN").unwrap_or_else(|_| {
        panic!(
            "CPTEST_HTTPBIN is not set: run the suite with `scripts/test`, or start httpbin yourself \
             (`gunicorn -b 127.0.0.1:0 -k gthread --threads 16 httpbin:app` from a venv with tests/peers/requirements.txt) \
             and export CPTEST_HTTPBIN=http://127.0.0.1:PORT"
        )
    })
}

/// Base URL of the TLS httpbin (certificate from certs/test/, signed by
/// certs/test/upstream-ca.pem).
pub fn httpbin_tls() -> String {
    std::env::var("CPTEST_HTTPBIN_TLS").unwrap_or_else(|_| {
        panic!(
            "CPTEST_HTTPBIN_TLS is not set: run the suite with `scripts/test`, or start httpbin with \
             `--certfile certs/test/httpbin.pem --keyfile certs/test/httpbin.key` and export its https:// URL"
        )
    })
}

/// Python with requests and httpx installed.
pub fn python() -> String {
    std::env::var("CPTEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CPTEST_PYTHON is not set: run the suite with `scripts/test`, or create a venv with \
             tests/peers/requirements.txt and export CPTEST_PYTHON=/path/to/venv/bin/python"
        )
    })
}

pub struct Harness {
    pub running: Running,
    pub admin: AdminClient,
    pub dir: tempfile::TempDir,
}

/// Options for [`Harness::start`].
pub struct Opts {
    pub allow_loopback: bool,
    pub extra_toml: String,
    /// Extra integration files `(file name, contents)`, next to the shipped ones.
    pub integrations: Vec<(String, String)>,
    /// Whole TOML sections appended to the configuration.
    pub sections: String,
    /// Extra keys of the `[egress]` section.
    pub egress: String,
    /// `store.url` instead of a SQLite file in the temp dir.
    pub store_url: Option<String>,
    /// A shared master key file instead of one in the temp dir.
    pub key_file: Option<PathBuf>,
    /// Extra keys of the `[crypto]` section.
    pub crypto: String,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            allow_loopback: true,
            extra_toml: String::new(),
            integrations: Vec::new(),
            sections: String::new(),
            egress: String::new(),
            store_url: None,
            key_file: None,
            crypto: String::new(),
        }
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(Opts::default()).await
    }

    pub async fn start_with(opts: Opts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ints_dir = if opts.integrations.is_empty() {
            repo().join("config/integrations")
        } else {
            let d = dir.path().join("integrations");
            std::fs::create_dir(&d).unwrap();
            for e in std::fs::read_dir(repo().join("config/integrations")).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
            }
            for (name, text) in &opts.integrations {
                std::fs::write(d.join(name), text).unwrap();
            }
            d
        };
        let allow = if opts.allow_loopback { "allow_cidrs = [\"127.0.0.0/8\"]" } else { "" };
        let text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
org_id = "{ORG}"
max_buffered_body = 65536
{extra_proxy}
[admin]
listen = "127.0.0.1:0"
[[admin.tokens]]
token = "{ADMIN_TOKEN}"
[[admin.tokens]]
token = "{ORG_TOKEN}"
org_id = "{ORG}"
[store]
url = "{db}"
[crypto]
key_file = "{key}"
{crypto}
[egress]
{allow}
{egress}
[integrations]
dir = "{ints}"
{sections}
"#,
            sections = opts.sections,
            crypto = opts.crypto,
            egress = opts.egress,
            extra_proxy = opts.extra_toml,
            db = opts
                .store_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("credproxy.db").display())),
            key = opts.key_file.clone().unwrap_or_else(|| dir.path().join("master.key")).display(),
            ints = ints_dir.display(),
        );
        let env = BTreeMap::new();
        let cfg = Config::from_toml_str("test.toml", &text, &env).expect("test config is valid");
        let ints = Integrations::load_dir(&cfg.integrations.dir, &env).expect("integrations load");
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let running = server::start(listeners, &cfg, ints).await.expect("server starts");
        let admin =
            AdminClient::new(&format!("http://{}", running.admin_addr), SecretValue::from(ADMIN_TOKEN)).unwrap();
        Self { running, admin, dir }
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.running.proxy_addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.running.admin_addr)
    }

    /// Creates an httpbin connection in `org` and returns its id.
    pub async fn create_in(&self, org: &str, method: &str, creds: &[(&str, &str)]) -> String {
        let credentials: serde_json::Map<String, Value> =
            creds.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
        let body = json!({"integration": "httpbin", "auth_method": method, "org_id": org, "user_id": "user_1", "credentials": credentials});
        let (status, v) = self.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    pub async fn create(&self, method: &str, creds: &[(&str, &str)]) -> String {
        self.create_in(ORG, method, creds).await
    }
}

/// A response seen by a real client.
#[derive(Debug)]
pub struct Seen {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
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
    Seen {
        status: v["status"].as_u64().unwrap() as u16,
        headers: v["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect(),
        body: v["body"].as_str().unwrap().as_bytes().to_vec(),
    }
}

/// Host and port of the httpbin URL.
pub fn httpbin_authority() -> String {
    httpbin().trim_start_matches("http://").to_owned()
}

pub fn port_of(authority: &str) -> u16 {
    authority.rsplit(':').next().unwrap().parse().unwrap()
}

pub fn credproxy_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_credproxy"))
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

/// An oidc-provider (npm, v9) process on a free loopback port: the OAuth2
/// server of the tests. One per test, so grant counts are the test's own.
pub struct Oidc {
    pub url: String,
    _child: tokio::process::Child,
}

pub const OIDC_BASIC_SECRET: &str = "cp-basic-client-secret-8f2e1c";
pub const OIDC_POST_SECRET: &str = "cp-post-client-secret-4b7d9a";

impl Oidc {
    pub async fn start() -> Self {
        Self::start_with_ttl(5).await
    }

    /// An instance whose access tokens (authorization code and client
    /// credentials) live `ttl_secs`.
    pub async fn start_with_ttl(ttl_secs: u64) -> Self {
        use tokio::io::AsyncBufReadExt;
        let dir = repo().join("tests/peers/node");
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed: run the suite with `scripts/test` (it runs `npm ci` in tests/peers/node)"
        );
        let mut child = tokio::process::Command::new("node")
            .arg("server.js")
            .current_dir(&dir)
            .env("OIDC_ACCESS_TTL", ttl_secs.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("oidc-provider starts within 20 s")
            .unwrap()
            .expect("oidc-provider prints its address");
        let url = line.strip_prefix("LISTENING ").expect("LISTENING line").to_owned();
        // Keep draining stdout: oidc-provider logs notices there, and a closed
        // pipe would kill it with EPIPE.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { url, _child: child }
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let out =
            tokio::process::Command::new("curl").args(["-sS", &format!("{}{path}", self.url)]).output().await.unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub async fn post(&self, path: &str) {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-f", "-X", "POST", &format!("{}{path}", self.url)])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "POST {path} failed");
    }

    /// Grants issued so far, for one grant_type.
    pub async fn count(&self, grant_type: &str) -> u64 {
        self.get_json("/test/counts").await[grant_type].as_u64().unwrap_or(0)
    }

    /// The integration file for this provider: an authorization-code method
    /// per client-authentication style and a client-credentials method.
    pub fn integration(&self) -> (String, String) {
        let u = &self.url;
        let text = format!(
            r#"
id = "oidc"
name = "oidc-provider (test)"
allowed_hosts = ["127.0.0.1"]
upstream_scheme = "http"
base_url = "{u}"

[[auth_methods]]
id = "code"
type = "oauth2"
[auth_methods.oauth2]
grant = "authorization_code"
authorize_url = "{u}/auth"
token_url = "{u}/token"
revocation_url = "{u}/token/revocation"
scopes = ["openid", "offline_access", "api:read"]
client_id = "cp-basic"
client_secret = "{OIDC_BASIC_SECRET}"
authorize_params = {{ prompt = "consent" }}
refresh_skew_secs = 1

[[auth_methods]]
id = "code_post"
type = "oauth2"
[auth_methods.oauth2]
grant = "authorization_code"
authorize_url = "{u}/auth"
token_url = "{u}/token"
revocation_url = "{u}/token/revocation"
scopes = ["openid", "offline_access", "api:read"]
client_id = "cp-post"
client_secret = "{OIDC_POST_SECRET}"
client_auth = "client_secret_post"
authorize_params = {{ prompt = "consent" }}
refresh_skew_secs = 1

[[auth_methods]]
id = "machine"
type = "oauth2"
[auth_methods.oauth2]
grant = "client_credentials"
token_url = "{u}/token"
scopes = ["api:read"]
client_id = "cp-basic"
client_secret = "{OIDC_BASIC_SECRET}"
refresh_skew_secs = 1

[test]
method = "GET"
path = "/resource"
expect_status = 200
"#
        );
        ("oidc.toml".to_owned(), text)
    }
}

impl Harness {
    /// Runs the authorization-code flow like a browser would (curl following
    /// redirects with a cookie jar) and returns the final response and URL.
    pub async fn authorize(&self, method: &str, extra: Value) -> (Seen, String) {
        let mut body = json!({"integration": "oidc", "auth_method": method, "org_id": ORG, "user_id": "user_1"});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            body[k] = v;
        }
        let v = self.admin.call(Method::POST, "/v1/oauth2/authorize", Some(&body)).await.unwrap();
        let url = v["authorization_url"].as_str().unwrap().to_owned();
        let jar = self.dir.path().join(format!("jar-{}", rand_suffix()));
        let out_file = self.dir.path().join(format!("out-{}", rand_suffix()));
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-i", "-L", "--max-redirs", "10", "-c"])
            .arg(&jar)
            .arg("-b")
            .arg(&jar)
            .arg("-o")
            .arg(&out_file)
            .args(["-w", "%{url_effective}", &url])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
        let raw = std::fs::read(&out_file).unwrap();
        // -i with -L writes every hop's head; keep the last response.
        let last = raw.windows(5).rposition(|w| w == b"HTTP/").map(|i| &raw[i..]).unwrap_or(&raw[..]);
        (parse_http_dump(last), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A fresh, empty database in the PostgreSQL cluster at DATABASE_URL.
pub async fn fresh_postgres_database() -> String {
    let base = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set: run the suite with `scripts/test` (it starts a throwaway PostgreSQL cluster), \
             or export DATABASE_URL=postgres://user@127.0.0.1:PORT/postgres"
        )
    });
    let (client, conn) =
        tokio_postgres::connect(&base, tokio_postgres::NoTls).await.expect("PostgreSQL at DATABASE_URL is reachable");
    tokio::spawn(conn);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let name = format!("credproxy_test_{}_{nanos}", std::process::id());
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// A throwaway PostgreSQL cluster of the test's own (Debian's binaries, run
/// as the `postgres` user), for tests that stop and restart the server.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PgCluster {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).max()
            })
            .expect("PostgreSQL binaries not found under /usr/lib/postgresql: run `scripts/test` (it installs them)");
        let dir = tempfile::Builder::new().prefix("credproxy-pgtest").tempdir().unwrap();
        let st = std::process::Command::new("chown").arg("postgres").arg(dir.path()).status().unwrap();
        assert!(st.success(), "chown postgres failed (the tests run PostgreSQL as the postgres user, as root)");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let c = Self { dir, bin, port };
        c.run("initdb", &["-D", &c.data(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        c.up();
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn up(&self) {
        let opts =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-o", &opts, "start"]);
    }

    pub fn down(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

/// A configuration file for the real binary in `dir` (SQLite and key file
/// there, loopback allowed, the shipped integrations): `proxy_extra` goes
/// into `[proxy]`, `sections` after the rest.
pub fn write_config(dir: &Path, proxy_extra: &str, sections: &str) -> PathBuf {
    let path = dir.join("credproxy.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n{proxy_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[store]\nurl = \"sqlite://{d}/db.sqlite\"\n\
             [crypto]\nkey_file = \"{d}/master.key\"\n[egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [integrations]\ndir = \"{ints}\"\n{sections}\n",
            d = dir.display(),
            ints = repo().join("config/integrations").display(),
        ),
    )
    .unwrap();
    path
}

/// A real credproxy process (the built binary).
pub struct Instance {
    pub proxy: std::net::SocketAddr,
    pub admin: AdminClient,
    pub admin_url: String,
    pub child: tokio::process::Child,
}

impl Instance {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

/// Starts `credproxy serve --config` and waits for its listening line.
pub async fn spawn_instance(config: &std::path::Path) -> Instance {
    spawn_instance_with(config, |_| {}).await
}

/// [`spawn_instance`], with `setup` adding to the command (working
/// directory, environment overrides).
pub async fn spawn_instance_with(
    config: &std::path::Path,
    setup: impl FnOnce(&mut tokio::process::Command),
) -> Instance {
    let mut cmd = tokio::process::Command::new(credproxy_bin());
    cmd.args(["serve", "--config"]).arg(config).env("RUST_LOG", "info");
    setup(&mut cmd);
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).kill_on_drop(true).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut proxy, mut admin) = (String::new(), String::new());
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(15), lines.next_line()).await {
        if line.contains("credproxy listening") {
            let field = |name: &str| {
                line.split(&format!("{name}=")).nth(1).unwrap().split_whitespace().next().unwrap().to_owned()
            };
            proxy = field("proxy");
            admin = field("admin");
            break;
        }
    }
    assert!(!proxy.is_empty(), "instance did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let admin_url = format!("http://{admin}");
    Instance {
        proxy: proxy.parse().unwrap(),
        admin: AdminClient::new(&admin_url, SecretValue::from(ADMIN_TOKEN)).unwrap(),
        admin_url,
        child,
    }
}

/// moto's KMS API server (PyPI `moto[server]`), killed on drop.
pub struct Moto {
    pub url: String,
    _child: tokio::process::Child,
}

pub async fn start_moto() -> Moto {
    let bin = std::env::var("CPTEST_MOTO_SERVER").unwrap_or_else(|_| {
        panic!("CPTEST_MOTO_SERVER is not set: run the suite with `scripts/test` (it installs moto[server] in the test venv)")
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = tokio::process::Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("moto_server starts");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Moto { url, _child: child };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto_server did not listen on {url} within 20 s");
}

/// httpbin under Hypercorn (PyPI, in the test venv) over TLS with the
/// certs/test/ upstream certificate: an upstream that speaks h2 by ALPN.
/// Its access log (one `protocol=VERSION METHOD PATH status=S peer=ADDR` line
/// per request) is `log`.
pub struct H2Httpbin {
    pub url: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

pub async fn start_h2_httpbin() -> H2Httpbin {
    let python = PathBuf::from(python());
    let bin = python.with_file_name("hypercorn");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `scripts/test` (it installs tests/peers/requirements.txt, hypercorn included)",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let certs = repo().join("certs/test");
    let child = tokio::process::Command::new(&bin)
        .arg("--certfile")
        .arg(certs.join("httpbin.pem"))
        .arg("--keyfile")
        .arg(certs.join("httpbin.key"))
        .args([
            "-b",
            &format!("127.0.0.1:{port}"),
            "--access-logformat",
            "protocol=%(H)s %(m)s %(U)s status=%(s)s peer=%(h)s",
            "--access-logfile",
        ])
        .arg(&log)
        .arg("httpbin:app")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("hypercorn starts");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return H2Httpbin { url: format!("https://127.0.0.1:{port}"), log, _dir: dir, _child: child };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("hypercorn did not listen on 127.0.0.1:{port} within 20 s");
}

pub fn aws_env() {
    // moto accepts any credentials; the SDK needs some to sign with.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::remove_var("AWS_PROFILE");
}

/// Creates a symmetric key at moto and returns its id.
pub async fn create_key(endpoint: &str) -> String {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let http =
        aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .http_client(http)
        .load()
        .await;
    let client = aws_sdk_kms::Client::new(&conf);
    let out = client.create_key().key_spec(KeySpec::SymmetricDefault).send().await.expect("CreateKey at moto");
    out.key_metadata.unwrap().key_id
}
