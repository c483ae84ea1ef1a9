//! Shared test support: starts credproxy in-process on 127.0.0.1:0 with a
//! fresh SQLite store and key, finds the real peers that `scripts/test`
//! started, and runs real clients (curl, Python requests/httpx).

#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(clippy::print_stderr, reason = "test diagnostics")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use credproxy::admin_client::AdminClient;
use credproxy::config::Config;
use credproxy::integrations::Integrations;
use credproxy::secret::SecretValue;
use credproxy::server::{self, Listeners, Running};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const ORG_TOKEN: &str = "test-org-token-for-org-local-0123";
pub const ORG: &str = "org_local";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Base URL of the httpbin that `scripts/test` starts.
pub fn httpbin() -> String {
    std::env::var("CREDPROXY_TEST_HTTPBIN").unwrap_or_else(|_| {
        panic!(
            "CREDPROXY_TEST_HTTPBIN is not set: run the suite with `scripts/test`, or start httpbin yourself \
             (`gunicorn -b 127.0.0.1:0 -k gthread --threads 16 httpbin:app` from a venv with tests/peers/requirements.txt) \
             and export CREDPROXY_TEST_HTTPBIN=http://127.0.0.1:PORT"
        )
    })
}

/// Python with requests and httpx installed.
pub fn python() -> String {
    std::env::var("CREDPROXY_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CREDPROXY_TEST_PYTHON is not set: run the suite with `scripts/test`, or create a venv with \
             tests/peers/requirements.txt and export CREDPROXY_TEST_PYTHON=/path/to/venv/bin/python"
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
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            allow_loopback: true,
            extra_toml: String::new(),
        }
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(Opts::default()).await
    }

    pub async fn start_with(opts: Opts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let allow = if opts.allow_loopback {
            "allow_cidrs = [\"127.0.0.0/8\"]"
        } else {
            ""
        };
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
url = "sqlite://{db}"
[crypto]
key_file = "{key}"
[egress]
{allow}
[integrations]
dir = "{ints}"
"#,
            extra_proxy = opts.extra_toml,
            db = dir.path().join("credproxy.db").display(),
            key = dir.path().join("master.key").display(),
            ints = repo().join("config/integrations").display(),
        );
        let env = BTreeMap::new();
        let cfg = Config::from_toml_str("test.toml", &text, &env).expect("test config is valid");
        let ints = Integrations::load_dir(&cfg.integrations.dir, &env).expect("integrations load");
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let running = server::start(listeners, &cfg, ints)
            .await
            .expect("server starts");
        let admin = AdminClient::new(
            &format!("http://{}", running.admin_addr),
            SecretValue::from(ADMIN_TOKEN),
        )
        .unwrap();
        Self {
            running,
            admin,
            dir,
        }
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.running.proxy_addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.running.admin_addr)
    }

    /// Creates an httpbin connection in `org` and returns its id.
    pub async fn create_in(&self, org: &str, method: &str, creds: &[(&str, &str)]) -> String {
        let credentials: serde_json::Map<String, Value> = creds
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let body = json!({"integration": "httpbin", "auth_method": method, "org_id": org, "user_id": "user_1", "credentials": credentials});
        let (status, v) = self
            .admin
            .send(Method::POST, "/v1/connections", Some(&body))
            .await
            .unwrap();
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
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as httpbin echoed it.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        let v = self.json();
        let h = v["headers"].as_object().expect("httpbin echo has headers");
        h.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str().unwrap().to_owned())
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
    let out = cmd
        .output()
        .await
        .expect("curl is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_http_dump(&out.stdout)
}

fn clean_proxy_env(cmd: &mut tokio::process::Command) {
    for k in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(k);
    }
}

fn parse_http_dump(raw: &[u8]) -> Seen {
    let mut rest = raw;
    loop {
        let split = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("curl -i output has a head");
        let head = String::from_utf8_lossy(&rest[..split]).into_owned();
        let body = &rest[split + 4..];
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        if (100..200).contains(&status) {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        return Seen {
            status,
            headers,
            body: body.to_vec(),
        };
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
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
