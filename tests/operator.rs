//! What a new operator hits (issue 12, items 10–18), through the real
//! binary and CLI: `check-config` and `serve` agree and create nothing on a
//! bad configuration; environment overrides name themselves; file modes and
//! the git-ignored CA key; the CLI's exit codes, messages, `https://` admin
//! URLs and integration commands; the start-up line; no body made up for
//! GET.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use support::*;

/// Runs the binary with `args` in `cwd` and extra environment.
async fn run(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(credproxy_bin());
    cmd.args(args).current_dir(cwd).env_remove("CREDPROXY_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(20), cmd.output()).await.expect("the command ends").unwrap()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

/// A configuration in `dir` with relative data paths (so `serve` in `dir`
/// would create `data/` there).
fn config_in(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("credproxy.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[integrations]\ndir = \"{}\"\n{extra}\n",
            repo().join("config/integrations").display()
        ),
    )
    .unwrap();
    path
}

/// Item 10. `check-config` runs the checks `serve` runs (CA files with
/// interception on, readable `upstream.extra_ca_certs`, key files), and
/// `serve` runs them before it creates a database or a master key. The
/// error names the configuration file once, the key and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_and_serve_refuse_the_same_configurations_and_create_nothing() {
    for (extra, key, reason) in [
        (
            "[tls_intercept]\nenabled = true\nca_cert = \"nope/ca.pem\"\nca_key = \"nope/ca.key\"\n",
            "tls_intercept.ca_cert",
            "credproxy ca init",
        ),
        ("[upstream]\nextra_ca_certs = [\"missing-ca.pem\"]\n", "upstream.extra_ca_certs[0]", "cannot read"),
        ("[crypto]\nprevious_key_files = [\"old.key\"]\n", "crypto.previous_key_files[0]", "does not exist"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), extra);
        let shown = config.display().to_string();
        for command in ["check-config", "serve"] {
            let out = run(&[command, "--config", &shown], dir.path(), &[]).await;
            let (_, err) = text(&out);
            assert_eq!(out.status.code(), Some(64), "{command} {extra:?}: {err}");
            assert!(err.contains(key) && err.contains(reason), "{command} {extra:?}: {err}");
            assert_eq!(err.matches(&shown).count(), 1, "{command}: the file is named once: {err}");
            assert!(!err.contains("config:"), "{err}");
        }
        assert!(!dir.path().join("data").exists(), "{extra:?}: serve created data/ before refusing");
    }
    // A present CA key that the CA certificate lacks names that key.
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["ca", "init", "--out", "ca"], dir.path(), &[]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    std::fs::remove_file(dir.path().join("ca/credproxy-ca.key")).unwrap();
    let config = config_in(
        dir.path(),
        "[tls_intercept]\nenabled = true\nca_cert = \"ca/credproxy-ca.pem\"\nca_key = \"ca/credproxy-ca.key\"\n",
    );
    let out = run(&["check-config", "--config", &config.display().to_string()], dir.path(), &[]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("tls_intercept.ca_key"), "{}", text(&out).1);
}

/// Item 13. The data directory is created 0700, the database and SQLite's
/// `-wal`/`-shm` files 0600 (like the master key); the interception CA
/// key from `ca init` is ignored by git.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_files_are_private_and_the_ca_key_is_git_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path(), "");
    let i = spawn_instance_with(&config, |cmd| {
        cmd.current_dir(dir.path());
    })
    .await;
    // A write, so SQLite has its WAL files open.
    let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "u",
        "credentials": {"token": "mode-token"}});
    i.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    let data = dir.path().join("data");
    assert_eq!(mode(&data), 0o700);
    for f in ["credproxy.db", "credproxy.db-wal", "credproxy.db-shm", "master.key"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    drop(i);

    for made in ["certs/credproxy-ca.key", "certs/credproxy-ca.pem"] {
        let out =
            std::process::Command::new("git").args(["check-ignore", "-q", made]).current_dir(repo()).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{made} is not ignored by git");
    }
    let out = std::process::Command::new("git")
        .args(["check-ignore", "-q", "certs/test/httpbin.key"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the committed test fixtures stay tracked");
}

/// Item 14. An override for a section or key that does not exist, a
/// `CREDPROXY_*` variable with one underscore, and a list given without
/// TOML quoting are errors naming the variable, not the file. Variables a
/// `${VAR}` uses are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path(), "");
    let shown = config.display().to_string();
    for (var, value, expect) in [
        ("CREDPROXY_EGRES__ALLOW_CIDRS", "[\"10.0.0.0/8\"]", "unknown field"),
        ("CREDPROXY_PROXY__LISTN", "127.0.0.1:1", "unknown field"),
        ("CREDPROXY_PROXY_LISTEN", "127.0.0.1:1", "did you mean CREDPROXY_PROXY__LISTEN"),
        ("CREDPROXY_EGRESS__ALLOW_CIDRS", "10.0.0.0/8", "write lists and tables as TOML"),
    ] {
        let out = run(&["check-config", "--config", &shown], dir.path(), &[(var, value)]).await;
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(64), "{var}: {err}");
        assert!(err.contains(&format!("environment {var}")) && err.contains(expect), "{var}: {err}");
        assert!(!err.contains(&shown), "{var}: the file is not to blame: {err}");
    }
    // A CREDPROXY_ variable that the configuration substitutes is not an override.
    let config = config_in(dir.path(), "[log]\nlevel = \"${CREDPROXY_LOG_LEVEL}\"\n");
    let out = run(
        &["check-config", "--config", &config.display().to_string()],
        dir.path(),
        &[("CREDPROXY_LOG_LEVEL", "info"), ("CREDPROXY_EGRESS__ALLOW_PASSTHROUGH", "false")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

async fn cli(args: &[&str], admin_url: &str, token: Option<&str>) -> (i32, Value, String) {
    let mut env = vec![("CREDPROXY_ADMIN_URL", admin_url)];
    if let Some(t) = token {
        env.push(("CREDPROXY_ADMIN_TOKEN", t));
    }
    let out = run(args, &repo(), &env).await;
    let (stdout, stderr) = text(&out);
    (out.status.code().unwrap_or(-1), serde_json::from_str(&stdout).unwrap_or(Value::Null), stderr)
}

/// Items 12 and 16. The CLI: listing without `--org`, a server that is not
/// there, a rejected token, `https://` admin URLs, integrations, help text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_reports_and_explains() {
    let h = Harness::start().await;
    let url = h.admin_url();
    let mine = h.create("bearer", &[("token", "t-mine")]).await;
    let theirs = h.create_in("org_other", "bearer", &[("token", "t-theirs")]).await;

    // Without --org: a global token sees every organization, a scoped one its own.
    let (code, v, err) = cli(&["connections", "list"], &url, Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 0, "{err}");
    let mut ids: Vec<&str> = v["connections"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut want = [mine.as_str(), theirs.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let (code, v, err) = cli(&["connections", "list"], &url, Some(ORG_TOKEN)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["connections"].as_array().unwrap().len(), 1);
    let (code, v, _) = cli(&["connections", "list", "--org", "org_other"], &url, Some(ADMIN_TOKEN)).await;
    assert_eq!((code, v["connections"][0]["id"].as_str()), (0, Some(theirs.as_str())));

    // A rejected token is called that, not "missing".
    let (code, _, err) = cli(&["connections", "list"], &url, Some("not-the-admin-token-0000")).await;
    assert_eq!(code, 1);
    assert!(err.contains("rejected the admin token") && err.contains("CREDPROXY_ADMIN_TOKEN"), "{err}");
    let (code, _, err) = cli(&["connections", "list"], &url, None).await;
    assert_eq!(code, 64);
    assert!(err.contains("set CREDPROXY_ADMIN_TOKEN"), "{err}");

    // Nobody listening: the URL, and what to check.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = format!("http://{closed}");
    let (code, _, err) = cli(&["connections", "list"], &down, Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 1);
    assert!(err.contains(&down) && err.contains("credproxy serve") && err.contains("refused"), "{err}");

    // Integrations.
    let (code, v, err) = cli(&["integrations", "list"], &url, Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 0, "{err}");
    assert!(v["integrations"].as_array().unwrap().iter().any(|i| i["id"] == "github"), "{v}");
    let (code, v, _) = cli(&["integrations", "show", "httpbin"], &url, Some(ADMIN_TOKEN)).await;
    assert_eq!((code, v["id"].as_str()), (0, Some("httpbin")));
    assert!(v["auth_methods"].as_array().unwrap().iter().any(|m| m["type"] == "custom"), "{v}");
    let (code, _, err) = cli(&["integrations", "show", "nope"], &url, Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 1);
    assert!(err.contains("integration_not_found"), "{err}");

    // https:// admin URLs (an admin API behind a TLS-terminating front; here
    // the TLS httpbin, whose /anything echoes the call) with a private CA.
    let tls = format!("{}/anything", httpbin_tls());
    let ca = repo().join("certs/test/upstream-ca.pem");
    let (code, v, err) =
        cli(&["integrations", "show", "github", "--admin-ca-cert", &ca.display().to_string()], &tls, Some(ADMIN_TOKEN))
            .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["method"], "GET");
    assert!(v["url"].as_str().unwrap().ends_with("/anything/v1/integrations/github"), "{v}");
    let (code, _, err) = cli(&["integrations", "list"], &tls, Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 1, "an unknown CA is refused");
    assert!(err.contains("cannot reach the admin API") && err.contains("certificate"), "{err}");

    // Every flag says what it is for.
    let out = run(&["connections", "create", "--help"], &repo(), &[]).await;
    let (help, _) = text(&out);
    for flag in ["--integration", "--auth-method", "--org", "--user", "--credential", "--admin-url", "--admin-ca-cert"]
    {
        let line = help.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_else(|| panic!("{flag}:\n{help}"));
        let described = line.split_once(flag).unwrap().1.split_whitespace().count() > 1
            || help
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(flag))
                .nth(1)
                .is_some_and(|l| l.starts_with("          ") && !l.trim().is_empty());
        assert!(described, "{flag} has no help text:\n{help}");
    }
}

/// Item 18. The start-up line says the organization, the listeners,
/// whether interception is on and which integrations loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_line_says_what_is_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path(), "");
    let mut cmd = tokio::process::Command::new(credproxy_bin());
    cmd.args(["serve", "--config"]).arg(&config).current_dir(dir.path()).env("RUST_LOG", "info");
    let line = support::process::serve(cmd, Duration::from_secs(15)).await.line;
    assert!(line.contains(&format!("org={ORG} ")), "{line}");
    assert!(!line.contains("Some("), "{line}");
    assert!(line.contains("proxy=127.0.0.1:") && line.contains("admin=127.0.0.1:"), "{line}");
    assert!(line.contains("interception=off"), "{line}");
    assert!(line.contains("integrations=") && line.contains("github") && line.contains("httpbin"), "{line}");
}

/// Item 15. A body placement never makes up a body for GET, HEAD, DELETE or
/// OPTIONS: 400 `request_body_required`. A POST without a body gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_body_is_made_up_for_get() {
    let h = Harness::start().await;
    let id = h.create("custom_json", &[("account", "acct"), ("secret", "get-secret")]).await;
    let hdr = format!("X-Connection-Id: {id}");
    for method in ["GET", "DELETE", "OPTIONS"] {
        let seen =
            curl(&["-x", &h.proxy_url(), "-X", method, "-H", &hdr, &format!("{}/anything", httpbin())], &[]).await;
        assert_eq!(seen.status, 400, "{method}: {}", seen.text());
        assert_eq!(seen.json()["code"], "request_body_required", "{method}");
        assert!(seen.header("proxy-status").is_some());
    }
    let seen = curl(&["-x", &h.proxy_url(), "-I", "-H", &hdr, &format!("{}/anything", httpbin())], &[]).await;
    assert_eq!(seen.status, 400, "HEAD");
    // A DELETE that has a body gets the field in it.
    let seen = curl(
        &[
            "-x",
            &h.proxy_url(),
            "-X",
            "DELETE",
            "-H",
            &hdr,
            "-H",
            "Content-Type: application/json",
            "--data",
            "{\"a\":1}",
            &format!("{}/anything", httpbin()),
        ],
        &[],
    )
    .await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.json()["json"], json!({"a": 1, "api_secret": "get-secret"}));
    // An empty POST gets a JSON body with the field.
    let seen = curl(&["-x", &h.proxy_url(), "-X", "POST", "-H", &hdr, &format!("{}/anything", httpbin())], &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.json()["json"], json!({"api_secret": "get-secret"}));
}
