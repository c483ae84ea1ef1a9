//! credproxy under test: in process ([`Harness`], listeners on
//! `127.0.0.1:0`, a fresh SQLite store and key) or as the built binary
//! ([`Instance`], through [`super::process`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use credproxy::admin_client::AdminClient;
use credproxy::config::Config;
use credproxy::integrations::Integrations;
use credproxy::secret::SecretValue;
use credproxy::server::{self, Listeners, Running};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::*;

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
    /// `proxy.mode = "shared"` (and no `proxy.org_id`).
    pub shared: bool,
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
            shared: false,
        }
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(Opts::default()).await
    }

    pub async fn start_with(opts: Opts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A copy of the shipped files, always: a test that imports or
        // reloads writes there, never into the repository.
        let ints_dir = {
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
{mode}
max_buffered_body = 65536
{extra_proxy}
[admin]
listen = "127.0.0.1:0"
[[admin.tokens]]
token = "{ADMIN_TOKEN}"
name = "{ADMIN_TOKEN_NAME}"
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
{audit}
{sections}
"#,
            mode = if opts.shared { "mode = \"shared\"".to_owned() } else { format!("org_id = \"{ORG}\"") },
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
            // An audit file in the temp dir, unless the test configures its own.
            audit = if opts.sections.contains("[audit]") {
                String::new()
            } else {
                format!("[audit]\nsink = \"file\"\npath = \"{}\"", dir.path().join("audit.log").display())
            },
        );
        let env = BTreeMap::new();
        let cfg = Config::from_toml_str("test.toml", &text, &env).expect("test config is valid");
        let ints = Integrations::load_dir(&cfg.integrations.dir, &env).expect("integrations load");
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            public: TcpListener::bind("127.0.0.1:0").await.unwrap(),
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

    /// The public listener (connect pages, OAuth2 callback).
    pub fn public_url(&self) -> String {
        format!("http://{}", self.running.public_addr)
    }

    /// The audit file so far (every harness writes one in its temp dir).
    pub fn audit_text(&self) -> String {
        self.running.audit().flush();
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    /// The audit file's lines, each parsed.
    pub fn audit_lines(&self) -> Vec<Value> {
        self.audit_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect()
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

pub fn credproxy_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_credproxy"))
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

/// A configuration file for the real binary in `dir` (SQLite and key file
/// there, loopback allowed, the shipped integrations): `proxy_extra` goes
/// into `[proxy]`, `sections` after the rest.
pub fn write_config(dir: &Path, proxy_extra: &str, sections: &str) -> PathBuf {
    write_config_with(dir, &repo().join("config/integrations"), proxy_extra, sections)
}

/// [`write_config`] with the integrations read from `ints`.
pub fn write_config_with(dir: &Path, ints: &Path, proxy_extra: &str, sections: &str) -> PathBuf {
    let path = dir.join("credproxy.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n{proxy_extra}\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[store]\nurl = \"sqlite://{d}/db.sqlite\"\n\
             [crypto]\nkey_file = \"{d}/master.key\"\n[egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [integrations]\ndir = \"{ints}\"\n{sections}\n",
            d = dir.display(),
            ints = ints.display(),
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
    let served = process::serve(cmd, Duration::from_secs(15)).await;
    let admin_url = format!("http://{}", served.admin);
    Instance {
        proxy: served.proxy,
        admin: AdminClient::new(&admin_url, SecretValue::from(ADMIN_TOKEN)).unwrap(),
        admin_url,
        child: served.child,
    }
}

/// The authorization-code flow through one instance of an `oidc`
/// integration (`Oidc::integration`, method `code`), like a browser: curl
/// follows the provider's pages with a cookie jar in `jar_dir`.
pub async fn authorize_code(i: &Instance, jar_dir: &Path) -> String {
    let body = json!({"integration": "oidc", "auth_method": "code", "org_id": ORG, "user_id": "u"});
    let v = i.admin.call(Method::POST, "/v1/oauth2/authorize", Some(&body)).await.unwrap();
    let url = v["authorization_url"].as_str().unwrap();
    let jar = jar_dir.join(format!("jar-{}", i.pid()));
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "-L", "-c"])
        .arg(&jar)
        .arg("-b")
        .arg(&jar)
        .arg(url)
        .output()
        .await
        .unwrap();
    let raw = out.stdout;
    let last = raw.windows(5).rposition(|w| w == b"HTTP/").map(|i| &raw[i..]).unwrap();
    let seen = parse_http_dump(last);
    assert_eq!(seen.status, 201, "{}", seen.text());
    seen.json()["connection_id"].as_str().unwrap().to_owned()
}
