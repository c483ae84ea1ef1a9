//! The real peers the tests talk to: the httpbin instances and Python venv
//! that `scripts/test` starts, oidc-provider (one per test), PostgreSQL (a
//! database, or a throwaway cluster), moto's KMS, httpbin over h2.

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_kms::types::KeySpec;
use serde_json::Value;

use super::*;

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

/// Host and port of the httpbin URL.
pub fn httpbin_authority() -> String {
    httpbin().trim_start_matches("http://").to_owned()
}

pub fn port_of(authority: &str) -> u16 {
    authority.rsplit(':').next().unwrap().parse().unwrap()
}

/// An oidc-provider (npm, v9) process on a free loopback port: the OAuth2
/// server of the tests. One per test, so grant counts are the test's own.
pub struct Oidc {
    pub url: String,
    _child: tokio::process::Child,
}

pub const OIDC_BASIC_SECRET: &str = "cp-basic-client-secret-8f2e1c";
pub const OIDC_POST_SECRET: &str = "cp-post-client-secret-4b7d9a";
/// A third client, registered as an organization's own OAuth app.
pub const OIDC_ORG_APP_ID: &str = "cp-org-a";
pub const OIDC_ORG_APP_SECRET: &str = "cp-org-a-client-secret-71d3e5";

impl Oidc {
    pub async fn start() -> Self {
        Self::start_with_ttl(5).await
    }

    /// An instance whose access tokens (authorization code and client
    /// credentials) live `ttl_secs`.
    pub async fn start_with_ttl(ttl_secs: u64) -> Self {
        Self::spawn(ttl_secs, false).await
    }

    /// An instance with oidc-provider's own login and consent pages (for a
    /// browser to fill in) instead of the automatic login.
    pub async fn start_interactive() -> Self {
        Self::spawn(5, true).await
    }

    async fn spawn(ttl_secs: u64, interactive: bool) -> Self {
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
            .env("OIDC_INTERACTIVE", if interactive { "1" } else { "0" })
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

    /// What `client_id` did at the provider: `authorize`, each grant_type, `revoked`.
    pub async fn by_client(&self, client_id: &str, what: &str) -> u64 {
        self.get_json("/test/clients").await[client_id][what].as_u64().unwrap_or(0)
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

pub fn rand_suffix() -> u64 {
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

    /// A crash: immediate shutdown (every backend quits at once, open
    /// transactions are cut, no checkpoint; the next start runs crash recovery).
    pub fn crash(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
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
    let certs = repo().join("certs/test");
    let (certfile, keyfile) = (certs.join("httpbin.pem"), certs.join("httpbin.key"));
    let tls = ["--certfile".as_ref(), certfile.as_os_str(), "--keyfile".as_ref(), keyfile.as_os_str()];
    let (port, log, dir, child) =
        httpbin_with_access_log(&bin, &tls, "protocol=%(H)s %(m)s %(U)s status=%(s)s peer=%(h)s").await;
    H2Httpbin { url: format!("https://127.0.0.1:{port}"), log, _dir: dir, _child: child }
}

/// httpbin served by `bin` (gunicorn or hypercorn, with `args`) on a free
/// loopback port, one line per request in its access log (`format`):
/// the port, the log, the directory it is in, the process.
async fn httpbin_with_access_log(
    bin: &std::path::Path,
    args: &[&std::ffi::OsStr],
    format: &str,
) -> (u16, PathBuf, tempfile::TempDir, tokio::process::Child) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = tokio::process::Command::new(bin)
        .args(args)
        .args(["-b", &format!("127.0.0.1:{port}"), "--access-logformat", format, "--access-logfile"])
        .arg(&log)
        .arg("httpbin:app")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{} starts: {e}", bin.display()));
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return (port, log, dir, child);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} did not listen on 127.0.0.1:{port} within 20 s", bin.display());
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

/// nginx (Debian package, installed by `scripts/test`) on a free loopback
/// port with `locations` as its server block's body: a real server that
/// answers what a rate-limiting provider answers (429 + `Retry-After`).
/// Its access log has one `METHOD URI STATUS` line per request.
pub struct Nginx {
    pub url: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    pub async fn start(locations: &str) -> Self {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .expect("nginx is missing: run the suite with `scripts/test` (it installs Debian's nginx), or apt-get install nginx");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  log_format counting '$request_method $uri $status';\n  access_log {p}/access.log counting;\n\
               client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n\
               uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n{locations}\n  }}\n}}\n",
            p = p.display(),
        );
        std::fs::write(p.join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new(&bin)
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts");
        let log = p.join("access.log");
        let nginx = Nginx { url: format!("http://127.0.0.1:{port}"), log, _dir: dir, child };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return nginx;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let errors = std::fs::read_to_string(nginx._dir.path().join("error.log")).unwrap_or_default();
        panic!("nginx did not listen on 127.0.0.1:{port} within 10 s: {errors}");
    }

    /// Requests for `uri` it has logged so far.
    pub fn count(&self, uri: &str) -> usize {
        count_requests(&self.log, uri)
    }
}

/// Lines of an access log (`METHOD URI STATUS`) whose URI is `uri`.
pub fn count_requests(log: &std::path::Path, uri: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| l.split(' ').nth(1) == Some(uri)).count()
}

/// A private httpbin under gunicorn whose access log (one `METHOD URI
/// STATUS` line per request) counts what reached the upstream.
pub struct LoggedHttpbin {
    pub url: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl LoggedHttpbin {
    pub async fn start() -> Self {
        let python = PathBuf::from(python());
        let bin = python.with_file_name("gunicorn");
        assert!(bin.exists(), "{} is missing: run the suite with `scripts/test`", bin.display());
        let workers = ["-w", "1", "-k", "gthread", "--threads", "32"].map(std::ffi::OsStr::new);
        let (port, log, dir, child) = httpbin_with_access_log(&bin, &workers, "%(m)s %(U)s %(s)s").await;
        LoggedHttpbin { url: format!("http://127.0.0.1:{port}"), log, _dir: dir, _child: child }
    }

    /// Requests for `uri` (path, no query) it has logged so far.
    pub fn count(&self, uri: &str) -> usize {
        count_requests(&self.log, uri)
    }
}
