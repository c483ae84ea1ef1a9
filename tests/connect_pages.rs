//! The connect pages in a real browser: headless Chromium (Debian's
//! `chromium` + `chromium-driver`) driven by Selenium (tests/browser/driver.py,
//! installed by scripts/test). Each flow ends with a proxied request that
//! carries the new credential; every page the browser rendered, every URL
//! it requested, its console, credproxy's log (TRACE) and the audit file
//! are scanned for the seeded secrets.
//!
//! Browsers are heavy on two cores: the tests take turns (one lock).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The valid API key of the `keyed` integration: its `[test]` is httpbin's
/// `/basic-auth/keyuser/keypass-8c1e`, and the key is that user and password.
const API_KEY: &str = "a2V5dXNlcjprZXlwYXNzLThjMWU=";
const WRONG_KEY: &str = "SEEDED-wrong-key-77d1";
const BASIC_PW: &str = "SEEDED-basic-pw-b7e2";
const CUSTOM_SECRET: &str = "SEEDED-custom-secret-c3a9";
const PROVIDER_PW: &str = "SEEDED-provider-pw-5f0c";
const SEEDS: &[&str] = &[API_KEY, WRONG_KEY, BASIC_PW, CUSTOM_SECRET, PROVIDER_PW];

/// Takes turns: one browser at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn log_capture() -> &'static logs::Capture {
    logs::trace_capture()
}

/// A headless Chromium behind tests/browser/driver.py.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every page rendered at a checkpoint ([`Browser::page`]).
    pages: Vec<String>,
}

impl Browser {
    async fn start() -> Self {
        for (path, package) in [("/usr/bin/chromium", "chromium"), ("/usr/bin/chromedriver", "chromium-driver")] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: run the suite with scripts/test (it installs Debian's {package}), \
                 or apt-get install chromium chromium-driver"
            );
        }
        let mut child = tokio::process::Command::new(python())
            .arg(repo().join("tests/browser/driver.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the browser starts within 60 s")
            .unwrap()
            .expect("driver.py answers (is selenium installed? run scripts/test)");
        assert!(ready.contains("ready"), "{ready}");
        Self { child, stdin, lines, pages: Vec::new() }
    }

    async fn cmd(&mut self, cmd: Value) -> Value {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser did not answer {cmd} within 60 s"))
            .unwrap()
            .expect("driver.py is running");
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["ok"], true, "browser command {cmd} failed: {}", v["error"]);
        v["value"].clone()
    }

    async fn goto(&mut self, url: &str) {
        self.cmd(json!({"op": "goto", "url": url})).await;
    }

    async fn fill(&mut self, css: &str, value: &str) {
        self.cmd(json!({"op": "fill", "css": css, "value": value})).await;
    }

    async fn click(&mut self, css: &str) {
        self.cmd(json!({"op": "click", "css": css})).await;
    }

    async fn wait_for(&mut self, css: &str) {
        self.cmd(json!({"op": "wait", "css": css})).await;
    }

    async fn wait_url(&mut self, part: &str) {
        self.cmd(json!({"op": "wait", "url_contains": part})).await;
    }

    async fn url(&mut self) -> String {
        self.cmd(json!({"op": "url"})).await.as_str().unwrap().to_owned()
    }

    async fn exists(&mut self, css: &str) -> bool {
        self.cmd(json!({"op": "exists", "css": css})).await.as_bool().unwrap()
    }

    async fn text(&mut self, css: &str) -> String {
        self.cmd(json!({"op": "text", "css": css})).await.as_str().unwrap().to_owned()
    }

    /// The rendered DOM now; kept for the secret scan.
    async fn page(&mut self) -> String {
        let html = self.cmd(json!({"op": "source"})).await.as_str().unwrap().to_owned();
        self.pages.push(html.clone());
        html
    }

    async fn screenshot(&mut self, name: &str) {
        let dir = screenshot_dir();
        for (suffix, width, height) in [("", 1024, 760), ("-phone", 390, 760)] {
            let path = dir.join(format!("{name}{suffix}.png"));
            self.cmd(json!({"op": "screenshot", "path": path, "width": width, "height": height})).await;
        }
        self.cmd(json!({"op": "resize", "width": 1024, "height": 900})).await;
    }

    /// Scans every kept page, every requested URL and the console for the
    /// seeded secrets (and `extra`), then closes the browser.
    async fn scan_and_quit(mut self, extra: &[String]) {
        let visited = self.cmd(json!({"op": "visited"})).await;
        let console = self.cmd(json!({"op": "logs"})).await;
        let visited: Vec<String> = visited.as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect();
        assert!(!visited.is_empty(), "the browser's request log is empty: nothing to scan");
        let mut places: Vec<(String, String)> = Vec::new();
        places.extend(self.pages.iter().map(|p| ("a rendered page".to_owned(), p.clone())));
        places.extend(visited.iter().map(|u| ("a visited URL".to_owned(), u.clone())));
        places.push(("the browser console".to_owned(), console.to_string()));
        assert!(!self.pages.is_empty());
        for (what, text) in &places {
            for s in SEEDS.iter().map(|s| s.to_string()).chain(extra.iter().cloned()) {
                assert!(!text.contains(&s), "a seeded secret is in {what}: {text}");
            }
        }
        let _ = self.cmd(json!({"op": "quit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Where screenshots go: `CONNECT_SCREENSHOTS_DIR` (the README's come from
/// `CONNECT_SCREENSHOTS_DIR=docs/connect`), else target/connect-screenshots.
fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("CONNECT_SCREENSHOTS_DIR")
        .map(|d| repo().join(d))
        .unwrap_or_else(|| repo().join("target/connect-screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn httpbin_origin() -> String {
    httpbin().trim_end_matches('/').to_owned()
}

/// `keyed`: an API key in `Authorization: Basic {api_key}`, tested against
/// httpbin's basic-auth check. `echo`: Basic and a custom method of three
/// fields (one optional), tested with httpbin's `/anything`.
fn integrations() -> Vec<(String, String)> {
    let h = httpbin_origin();
    let keyed = format!(
        r#"
id = "keyed"
name = "Keyed API"
allowed_hosts = ["127.0.0.1"]
upstream_scheme = "http"
base_url = "{h}"

[[auth_methods]]
id = "api_key"
type = "api_key"
in = "header"
name = "Authorization"
template = "Basic {{api_key}}"

[auth_methods.form.api_key]
description = "Find it under Settings, API keys."
placeholder = "paste the key"

[test]
path = "/basic-auth/keyuser/keypass-8c1e"
expect_status = 200
"#
    );
    let echo = format!(
        r#"
id = "echo"
name = "Echo"
allowed_hosts = ["127.0.0.1"]
upstream_scheme = "http"
base_url = "{h}"

[[auth_methods]]
id = "basic"
type = "basic"

[[auth_methods]]
id = "regional"
type = "custom"
fields = ["account", "secret", "region"]

[auth_methods.form.account]
label = "Account ID"
secret = false
pattern = "[a-z0-9-]{{3,40}}"
placeholder = "acme-prod"

[auth_methods.form.region]
optional = true
secret = false
description = "Leave empty for the account's default region."

[[auth_methods.placements]]
in = "header"
name = "X-Account"
template = "{{account}}"

[[auth_methods.placements]]
in = "header"
name = "X-Secret"
template = "{{secret}}"

[[auth_methods.placements]]
in = "header"
name = "X-Region"
template = "{{region}}"

[test]
path = "/anything"
expect_status = 200
"#
    );
    vec![("keyed.toml".into(), keyed), ("echo.toml".into(), echo)]
}

async fn harness(extra: Vec<(String, String)>) -> Harness {
    log_capture();
    let mut ints = integrations();
    ints.extend(extra);
    let sections = format!("[public]\nallowed_return_origins = [\"{}\"]\n", httpbin_origin());
    Harness::start_with(Opts { integrations: ints, sections, ..Default::default() }).await
}

/// A connect session through the admin API: its URL.
async fn session(h: &Harness, body: Value) -> String {
    let mut b = json!({"org_id": ORG, "user_id": "end_user_1"});
    for (k, v) in body.as_object().unwrap() {
        b[k] = v.clone();
    }
    let v = h.admin.call(Method::POST, "/v1/connect-sessions", Some(&b)).await.unwrap();
    let url = v["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("{}/connect/session/cps_", h.public_url())), "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cs_"), "{v}");
    url
}

fn return_to() -> String {
    format!("{}/anything/connected?from=connect", httpbin_origin())
}

/// The connection id httpbin's echo of `return_to` shows.
async fn returned_connection(b: &mut Browser) -> String {
    b.wait_url("/anything/connected").await;
    let url = b.url().await;
    let id = url.split("connection_id=").nth(1).unwrap_or_else(|| panic!("no connection_id in {url}"));
    let id = id.split('&').next().unwrap().to_owned();
    assert!(id.starts_with("conn_"), "{url}");
    assert!(url.contains("from=connect"), "return_to's own query is kept: {url}");
    id
}

async fn connections(h: &Harness) -> Vec<Value> {
    let v = h.admin.call(Method::GET, &format!("/v1/connections?org_id={ORG}"), None).await.unwrap();
    v["connections"].as_array().unwrap().clone()
}

/// httpbin's echo of a proxied `/headers` request with connection `id`.
async fn echoed_headers(h: &Harness, id: &str) -> Value {
    let (status, _, body) =
        proxy_request(h.running.proxy_addr, "GET", &format!("{}/headers", httpbin_origin()), Some(id), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<Value>(&body).unwrap()["headers"].clone()
}

/// credproxy's log and audit file hold none of the seeded secrets.
fn scan_logs(h: &Harness, extra: &[String]) {
    let log = log_capture().text();
    assert!(log.contains("connect:"), "the log capture saw the connect pages (is TRACE capture on?)");
    let audit = h.audit_text();
    for s in SEEDS.iter().map(|s| s.to_string()).chain(extra.iter().cloned()) {
        assert!(!log.contains(&s), "a seeded secret is in credproxy's log");
        assert!(!audit.contains(&s), "a seeded secret is in the audit file");
    }
}

/// API key, Basic, and a custom method with an optional field: each typed
/// into its form, tested, stored, returned to `return_to`, and used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_create_connections_that_work() {
    let _turn = TURN.lock().await;
    let h = harness(vec![]).await;
    let mut b = Browser::start().await;

    // API key: one integration, one method: straight to its form.
    let link = session(&h, json!({"integrations": ["keyed"], "return_to": return_to()})).await;
    b.goto(&link).await;
    b.wait_for("form input[name=f_api_key]").await;
    assert!(b.url().await.ends_with("/connect/keyed/api_key"), "the token left the address bar");
    let html = b.page().await;
    assert!(html.contains("Find it under Settings, API keys."), "the field's description is shown");
    assert!(html.contains("type=\"password\""), "an API key is typed into a password input");
    b.screenshot("api-key-form").await;
    assert_accessible(&mut b).await;
    b.fill("#f_api_key", API_KEY).await;
    b.click("#submit").await;
    let id = returned_connection(&mut b).await;
    b.page().await;
    assert_eq!(echoed_headers(&h, &id).await["Authorization"], format!("Basic {API_KEY}"));
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!((meta["user_id"].as_str(), meta["state"].as_str()), (Some("end_user_1"), Some("active")));
    assert_eq!(meta["last_test"]["ok"], true, "tested before it was stored: {meta}");

    // Basic and custom: a session offering `echo`'s methods shows a chooser.
    let link = session(&h, json!({"integrations": ["echo"], "return_to": return_to()})).await;
    b.goto(&link).await;
    b.wait_for("a[href='/connect/echo/basic']").await;
    b.page().await;
    b.screenshot("choose").await;
    b.click("a[href='/connect/echo/basic']").await;
    b.wait_for("#f_username").await;
    b.fill("#f_username", "browser-user").await;
    b.fill("#f_password", BASIC_PW).await;
    b.click("#submit").await;
    let basic = returned_connection(&mut b).await;
    let expect = format!("Basic {}", base64_of(&format!("browser-user:{BASIC_PW}")));
    assert_eq!(echoed_headers(&h, &basic).await["Authorization"], expect);

    let link = session(&h, json!({"integrations": ["echo"]})).await;
    b.goto(&link).await;
    b.wait_for("a[href='/connect/echo/regional']").await;
    b.click("a[href='/connect/echo/regional']").await;
    b.wait_for("#f_account").await;
    let html = b.page().await;
    assert!(html.contains("Account ID") && html.contains("(optional)"), "labels and the optional field");
    assert_accessible(&mut b).await;
    b.fill("#f_account", "acme-prod").await;
    b.fill("#f_secret", CUSTOM_SECRET).await;
    b.click("#submit").await;
    // No return_to: a page of its own.
    b.wait_for("#connection-id").await;
    let custom = b.text("#connection-id").await;
    b.page().await;
    b.screenshot("done").await;
    let headers = echoed_headers(&h, &custom).await;
    assert_eq!((headers["X-Account"].as_str(), headers["X-Secret"].as_str()), (Some("acme-prod"), Some(CUSTOM_SECRET)));
    assert!(headers.get("X-Region").is_none(), "the optional field was left out: {headers}");

    b.scan_and_quit(&[]).await;
    scan_logs(&h, &[]);
    let audit = h.audit_text();
    assert_eq!(audit.matches("\"action\":\"connection.create\"").count(), 3, "{audit}");
    assert!(audit.contains("\"connect_session\":\"cs_"), "{audit}");
}

/// A wrong key fails the integration's test: the form says so (without
/// echoing the key) and nothing is stored; the right key then works.
/// The same session link cannot be used twice; refused sessions and forms
/// get clear pages and store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_and_refused_sessions_store_nothing() {
    let _turn = TURN.lock().await;
    let h = harness(vec![]).await;
    let mut b = Browser::start().await;

    let link = session(&h, json!({"integrations": ["keyed"], "return_to": return_to()})).await;
    b.goto(&link).await;
    b.wait_for("#f_api_key").await;
    b.fill("#f_api_key", WRONG_KEY).await;
    b.click("#submit").await;
    b.wait_for("#error").await;
    let html = b.page().await;
    assert!(html.contains("connection_test_failed") && html.contains("401"), "the test's error is shown: {html}");
    assert!(!html.contains(WRONG_KEY), "the typed key is not echoed back");
    b.screenshot("test-failed").await;
    assert!(connections(&h).await.is_empty(), "nothing stored");
    let audit = h.audit_text();
    assert!(audit.contains("\"action\":\"connection.test\"") && audit.contains("connection_test_failed"), "{audit}");

    // The right key on the same form: stored.
    b.fill("#f_api_key", API_KEY).await;
    b.click("#submit").await;
    let id = returned_connection(&mut b).await;
    assert_eq!(connections(&h).await.len(), 1);

    // Reused link: the session made its connection.
    b.goto(&link).await;
    b.wait_for("#error-code").await;
    assert_eq!(b.text("#error-code").await, "session_used");
    b.page().await;

    // Expired link.
    let short = session(&h, json!({"integrations": ["keyed"], "expires_in_secs": 1})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    b.goto(&short).await;
    b.wait_for("#error-code").await;
    assert_eq!(b.text("#error-code").await, "session_expired");
    b.page().await;
    b.screenshot("expired").await;

    // An unknown link.
    b.goto(&format!("{}/connect/session/cps_{}", h.public_url(), "A".repeat(43))).await;
    b.wait_for("#error-code").await;
    assert_eq!(b.text("#error-code").await, "session_not_found");

    // A form without its CSRF token (a forged post): 403, nothing stored.
    let link = session(&h, json!({"integrations": ["keyed"]})).await;
    b.goto(&link).await;
    b.wait_for("#f_api_key").await;
    b.cmd(json!({"op": "script", "js": "document.querySelector('input[name=csrf]').remove()"})).await;
    b.fill("#f_api_key", API_KEY).await;
    b.click("#submit").await;
    b.wait_for("#error-code").await;
    assert_eq!(b.text("#error-code").await, "csrf_failed");
    b.page().await;
    assert_eq!(connections(&h).await.len(), 1, "nothing stored by the forged post");
    let audit = h.audit_text();
    assert!(audit.contains("\"status\":403,\"code\":\"csrf_failed\""), "the refused post is audited: {audit}");

    // return_to outside the allowed origins: the session is refused.
    let (status, v) = h
        .admin
        .send(
            Method::POST,
            "/v1/connect-sessions",
            Some(&json!({"org_id": ORG, "user_id": "u", "return_to": "https://evil.example/steal"})),
        )
        .await
        .unwrap();
    assert_eq!((status.as_u16(), v["code"].as_str()), (400, Some("return_to_not_allowed")), "{v}");

    // The pages' headers: CSP without unsafe-inline, no framing, no referrer.
    let seen = curl(&[&format!("{}/connect", h.public_url())], &[]).await;
    let header = |name: &str| {
        seen.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    assert_eq!(seen.status, 404, "no cookie: no session");
    let csp = header("content-security-policy");
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(header("referrer-policy"), "no-referrer");
    let _ = id;
    b.scan_and_quit(&[]).await;
    scan_logs(&h, &[]);
}

/// What screen readers and keyboards need of a form: every visible input
/// has a label, a described one points at its description, the page has a
/// language and one heading the main landmark names, and nothing takes
/// focus order into its own hands.
async fn assert_accessible(b: &mut Browser) {
    let js = "const bad = []; \
        for (const i of document.querySelectorAll('input:not([type=hidden])')) { \
          if (!i.labels || i.labels.length === 0) bad.push('no label: ' + i.name); \
          const d = i.getAttribute('aria-describedby'); \
          if (d && !document.getElementById(d)) bad.push('dangling description: ' + i.name); } \
        if (!document.documentElement.lang) bad.push('no lang'); \
        const main = document.querySelector('main'); \
        if (!main || !document.getElementById(main.getAttribute('aria-labelledby'))) bad.push('main is not named'); \
        if (document.querySelectorAll('[tabindex]').length) bad.push('tabindex used'); \
        if (!document.querySelector('button[type=submit]')) bad.push('no submit button'); \
        return bad;";
    let bad = b.cmd(json!({"op": "script", "js": js})).await;
    assert_eq!(bad, json!([]), "accessibility");
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// OAuth2: Connect → the provider's own login and consent pages, filled in
/// the browser → callback → the connection works. Then the provider
/// revokes the grant (`needs_reauth`), and a re-authorization session for
/// that connection makes it `active` again under the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_connect_and_reauthorize_through_the_provider_pages() {
    let _turn = TURN.lock().await;
    let oidc = Oidc::start_interactive().await;
    let h = harness(vec![oidc.integration()]).await;
    let mut b = Browser::start().await;

    let link = session(&h, json!({"integrations": ["oidc"], "return_to": return_to()})).await;
    b.goto(&link).await;
    b.wait_for("a[href='/connect/oidc/code']").await;
    b.click("a[href='/connect/oidc/code']").await;
    b.wait_for("#submit").await;
    let html = b.page().await;
    assert!(html.contains("127.0.0.1"), "the page names the provider it goes to");
    b.screenshot("oauth2-connect").await;
    b.click("#submit").await;
    let filled = sign_in_at_provider(&mut b, "browser-user").await;
    assert_eq!(filled, (true, true), "the provider's login and consent pages were filled in");
    let id = returned_connection(&mut b).await;
    let resource = format!("{}/resource", oidc.url);
    let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&id), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["account"], "browser-user");

    // The grant dies at the provider: the next use marks the connection.
    oidc.post("/test/revoke-refresh").await;
    oidc.post("/test/revoke-access").await;
    let (status, _, _) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&id), None).await;
    assert_eq!(status, 409);
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(meta["state"], "needs_reauth");

    let link = session(&h, json!({"connection_id": id, "return_to": return_to()})).await;
    b.goto(&link).await;
    b.wait_for("#submit").await;
    assert!(b.page().await.contains("Reconnect"), "a re-authorization says so");
    b.click("#submit").await;
    let (_, consented) = sign_in_at_provider(&mut b, "browser-user").await;
    assert!(consented, "prompt=consent: the provider asked again");
    let again = returned_connection(&mut b).await;
    assert_eq!(again, id, "the same connection");
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(meta["state"], "active");
    let (status, _, _) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&id), None).await;
    assert_eq!(status, 200);
    assert_eq!(connections(&h).await.len(), 1);

    // Every token and verifier that crossed the provider.
    let seen = oidc.get_json("/test/secrets").await;
    let mut extra: Vec<String> = Vec::new();
    for k in ["access", "refresh", "verifiers"] {
        extra.extend(seen[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()));
    }
    assert!(extra.len() >= 4, "{seen}");
    b.scan_and_quit(&extra).await;
    scan_logs(&h, &extra);
    let audit = h.audit_text();
    assert!(
        audit.contains("\"action\":\"connection.authorized\"")
            && audit.contains("\"action\":\"connection.reauthorized\""),
        "{audit}"
    );
}

/// The provider's pages (oidc-provider's devInteractions): a login form
/// when not signed in, a consent page; then back to us. Returns which of
/// the two it filled in.
async fn sign_in_at_provider(b: &mut Browser, login: &str) -> (bool, bool) {
    let (mut logged_in, mut consented) = (false, false);
    for _ in 0..40 {
        let url = b.url().await;
        if url.contains("/anything/connected") {
            return (logged_in, consented);
        }
        if b.exists("input[name=login]").await {
            b.fill("input[name=login]", login).await;
            b.fill("input[name=password]", PROVIDER_PW).await;
            b.click("button[type=submit]").await;
            logged_in = true;
        } else if b.exists("input[name=prompt][value=consent]").await {
            b.click("button[type=submit]").await;
            consented = true;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let url = b.url().await;
    panic!("the provider's pages did not lead back: at {url}");
}

/// Without a browser: what the session API refuses, the rate limit on
/// unknown links, and which listener serves what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_checked_guessing_is_limited_and_listeners_stay_apart() {
    log_capture();
    let sections =
        format!("[public]\nallowed_return_origins = [\"{}\"]\nfailed_lookups_per_minute = 3\n", httpbin_origin());
    let h = Harness::start_with(Opts { integrations: integrations(), sections, ..Default::default() }).await;
    let refused = |body: Value| {
        let admin = &h.admin;
        async move {
            let (status, v) = admin.send(Method::POST, "/v1/connect-sessions", Some(&body)).await.unwrap();
            (status.as_u16(), v["code"].as_str().unwrap_or_default().to_owned())
        }
    };
    let other_user = h.create("bearer", &[("token", "not-a-seed-0001")]).await;
    for (body, want) in [
        (json!({"org_id": ORG, "user_id": "u", "integrations": ["nope"]}), (400, "unknown_integration")),
        (json!({"org_id": ORG, "user_id": "u", "integrations": []}), (400, "invalid_request")),
        (json!({"org_id": ORG, "user_id": "u", "expires_in_secs": 86_401}), (400, "invalid_request")),
        (json!({"org_id": ORG, "user_id": "u", "return_to": "javascript:alert(1)"}), (400, "return_to_not_allowed")),
        (
            json!({"org_id": ORG, "user_id": "u", "return_to": "https://user@evil.example/"}),
            (400, "return_to_not_allowed"),
        ),
        // Another user's connection is not this user's to re-authorize.
        (json!({"org_id": ORG, "user_id": "someone_else", "connection_id": other_user}), (404, "connection_not_found")),
        (json!({"org_id": ORG, "user_id": "u", "surprise": 1}), (400, "invalid_request")),
    ] {
        assert_eq!(refused(body.clone()).await, (want.0, want.1.to_owned()), "{body}");
    }
    let scoped = credproxy::admin_client::AdminClient::new(&h.admin_url(), ORG_TOKEN.into()).unwrap();
    let (status, v) = scoped
        .send(Method::POST, "/v1/connect-sessions", Some(&json!({"org_id": "org_other", "user_id": "u"})))
        .await
        .unwrap();
    assert_eq!((status.as_u16(), v["code"].as_str()), (403, Some("forbidden_org")));

    // Opening a link: the token moves into an HttpOnly, SameSite=Lax cookie
    // for the pages (not Secure: this base URL is http) and out of the URL.
    let opened = curl(&[&session(&h, json!({"integrations": ["keyed"]})).await], &[]).await;
    assert_eq!(opened.status, 303, "{}", opened.text());
    let header = |name: &str| {
        opened.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    assert_eq!(header("location"), "/connect");
    let cookie = header("set-cookie");
    assert!(cookie.starts_with("credproxy_connect=cps_"), "{cookie}");
    for attr in ["; HttpOnly", "; SameSite=Lax", "; Path=/connect", "; Max-Age="] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "{cookie}");

    // Three unknown links from one address, then 429 — for a good link too.
    let good = session(&h, json!({"integrations": ["keyed"]})).await;
    for i in 0..3 {
        let seen = curl(&[&format!("{}/connect/session/cps_{}{i}", h.public_url(), "B".repeat(42))], &[]).await;
        assert_eq!(seen.status, 404, "{}", seen.text());
    }
    let seen = curl(&[&good], &[]).await;
    assert_eq!(seen.status, 429, "{}", seen.text());
    assert!(seen.text().contains("too_many_attempts"));

    // The public listener serves the pages and the callback only; the admin
    // API and /metrics stay on the admin listener, which serves no page.
    for path in ["/v1/connections", "/metrics", "/healthz", "/v1/connect-sessions"] {
        let seen =
            curl(&["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}"), &format!("{}{path}", h.public_url())], &[])
                .await;
        assert_eq!(seen.status, 404, "{path} on the public listener");
    }
    for path in ["/oauth2/callback?state=x&code=y", "/connect", "/v1/oauth2/callback?state=x&code=y"] {
        let seen = curl(&[&format!("{}{path}", h.admin_url())], &[]).await;
        assert_eq!(seen.status, 404, "{path} on the admin listener");
    }
    let css = curl(&[&format!("{}/connect/static/connect.css", h.public_url())], &[]).await;
    assert_eq!(css.status, 200);
    assert!(css.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/css")));
}
