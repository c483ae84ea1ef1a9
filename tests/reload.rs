//! Integrations reloaded without a restart: `POST /v1/integrations/reload`
//! and `SIGHUP`, under load, with an invalid set refused and a removed
//! auth method answered 409.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

/// An integration file for loopback upstreams with bearer methods `methods`.
fn file(id: &str, methods: &[&str]) -> String {
    let mut text =
        format!("id = \"{id}\"\nname = \"{id}\"\nallowed_hosts = [\"127.0.0.1\"]\nupstream_scheme = \"http\"\n");
    for m in methods {
        text.push_str(&format!("[[auth_methods]]\nid = \"{m}\"\ntype = \"bearer\"\n"));
    }
    text
}

async fn connection(admin: &credproxy::admin_client::AdminClient, integration: &str, method: &str) -> String {
    let body = json!({"integration": integration, "auth_method": method, "org_id": ORG, "user_id": "u",
        "credentials": {"token": format!("reload-token-{integration}-{method}")}});
    admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn reload(admin: &credproxy::admin_client::AdminClient) -> (StatusCode, Value) {
    admin.send(Method::POST, "/v1/integrations/reload", None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_change_and_refuse_invalid_sets_under_load() {
    let h = Harness::start_with(Opts {
        integrations: vec![("reloadable.toml".into(), file("reloadable", &["a", "b"]))],
        ..Default::default()
    })
    .await;
    let dir = h.dir.path().join("integrations");
    let proxy = h.running.proxy_addr;
    let url = format!("{}/bearer", httpbin());
    let a = connection(&h.admin, "reloadable", "a").await;
    assert_eq!(proxy_request(proxy, "GET", &url, Some(&a), None).await.0, 200);

    // A new file: in force after the reload, without a restart.
    std::fs::write(dir.join("added.toml"), file("added", &["k"])).unwrap();
    let body = json!({"integration": "added", "auth_method": "k", "org_id": ORG, "user_id": "u", "credentials": {"token": "t"}});
    let (s, _) = h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "not before the reload");
    let (s, v) = reload(&h.admin).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["integrations"].as_array().unwrap().contains(&json!("added")), "{v}");
    let added = connection(&h.admin, "added", "k").await;
    assert_eq!(proxy_request(proxy, "GET", &url, Some(&added), None).await.0, 200);

    // Only a global token may reload.
    let scoped = credproxy::admin_client::AdminClient::new(&h.admin_url(), ORG_TOKEN.into()).unwrap();
    let (s, v) = reload(&scoped).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden_org")), "{v}");

    // An invalid file: 422 naming file, key and reason; the set in force stays.
    std::fs::write(dir.join("broken.toml"), file("broken", &["x"]).replace("[\"127.0.0.1\"]", "[]")).unwrap();
    let (s, v) = reload(&h.admin).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_integrations")), "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("broken.toml") && detail.contains("allowed_hosts"), "{detail}");
    assert_eq!(proxy_request(proxy, "GET", &url, Some(&added), None).await.0, 200);
    let listed = h.admin.call(Method::GET, "/v1/integrations", None).await.unwrap().to_string();
    assert!(listed.contains("\"added\"") && !listed.contains("\"broken\""), "{listed}");
    std::fs::remove_file(dir.join("broken.toml")).unwrap();

    // Twenty reloads while four clients keep sending: nothing fails.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url, conn) = (stop.clone(), ok.clone(), failed.clone(), url.clone(), added.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                match proxy_request(proxy, "GET", &url, Some(&conn), None).await.0 {
                    200 => ok.fetch_add(1, Relaxed),
                    _ => failed.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    for n in 0..20 {
        // Each reload changes something (a rate limit that never bites).
        let quota = format!("[[rate_limits]]\nper = \"connection\"\nrequests = {}\nperiod = \"1s\"\n", 100_000 + n);
        std::fs::write(dir.join("added.toml"), format!("{}{quota}", file("added", &["k"]))).unwrap();
        let (s, v) = reload(&h.admin).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(failed.load(Relaxed), 0, "requests failed during reloads ({} succeeded)", ok.load(Relaxed));
    assert!(ok.load(Relaxed) > 20, "{} requests", ok.load(Relaxed));
    let shown = h.admin.call(Method::GET, "/v1/integrations/added", None).await.unwrap();
    assert_eq!(shown["quotas"]["rate_limits"][0]["requests"], 100_019, "{shown}");

    // A removed auth method: its connections get 409, at once.
    std::fs::write(dir.join("reloadable.toml"), file("reloadable", &["b"])).unwrap();
    assert_eq!(reload(&h.admin).await.0, StatusCode::OK);
    let (status, _, body) = proxy_request(proxy, "GET", &url, Some(&a), None).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, v["code"].as_str()), (409, Some("auth_method_removed")), "{v}");
}

/// `SIGHUP` to the binary reloads; an invalid set leaves it serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary() {
    let (_dir, ints, config) = binary_setup();
    let instance = spawn_instance(&config).await;
    let admin = &instance.admin;
    let listed = || async move { admin.call(Method::GET, "/v1/integrations", None).await.unwrap().to_string() };
    assert!(!listed().await.contains("\"second\""));
    std::fs::write(ints.join("second.toml"), file("second", &["k"])).unwrap();
    hangup(instance.pid());
    within_5s("SIGHUP did not reload", || async { listed().await.contains("\"second\"") }).await;
    // Invalid: refused, still serving the set in force.
    std::fs::write(ints.join("third.toml"), "id = ").unwrap();
    hangup(instance.pid());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = listed().await;
    assert!(now.contains("\"second\"") && !now.contains("\"third\""), "{now}");
    let conn = connection(&instance.admin, "second", "k").await;
    assert_eq!(proxy_request(instance.proxy, "GET", &format!("{}/bearer", httpbin()), Some(&conn), None).await.0, 200);
}

/// A temp dir with an integrations directory holding `first.toml`, and a
/// configuration for the built binary that reads it.
fn binary_setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ints = dir.path().join("integrations");
    std::fs::create_dir(&ints).unwrap();
    std::fs::write(ints.join("first.toml"), file("first", &["k"])).unwrap();
    let config = write_config_with(dir.path(), &ints, "", "");
    (dir, ints, config)
}

/// Polls `done` every 50 ms; fails saying `what` if it is not true within 5 s.
async fn within_5s<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let until = Instant::now() + Duration::from_secs(5);
    while !done().await {
        assert!(Instant::now() < until, "{what} within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hangup(pid: u32) {
    let ok = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -HUP {pid}");
}

/// `integrations.watch`: a file added, changed or removed is in force
/// without a signal; an invalid one leaves the set in force serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_directory_reloads_itself() {
    let (_dir, ints, config) = binary_setup();
    let instance = spawn_instance_with(&config, |cmd| {
        cmd.env("CREDPROXY_INTEGRATIONS__WATCH", "true").env("CREDPROXY_INTEGRATIONS__WATCH_INTERVAL_MS", "200");
    })
    .await;
    let admin = &instance.admin;
    let shown = |id: &'static str| async move {
        admin.send(Method::GET, &format!("/v1/integrations/{id}"), None).await.unwrap()
    };
    std::fs::write(ints.join("second.toml"), file("second", &["k"])).unwrap();
    within_5s("an added file was not in force", || async { shown("second").await.0 == StatusCode::OK }).await;
    // Changed: a second method appears.
    std::fs::write(ints.join("second.toml"), file("second", &["k", "k2"])).unwrap();
    within_5s("a changed file was not in force", || async {
        shown("second").await.1["auth_methods"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    // Invalid: refused; the set in force serves on.
    std::fs::write(ints.join("third.toml"), "id = ").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(shown("third").await.0, StatusCode::NOT_FOUND);
    let conn = connection(&instance.admin, "second", "k2").await;
    assert_eq!(proxy_request(instance.proxy, "GET", &format!("{}/bearer", httpbin()), Some(&conn), None).await.0, 200);
    // Removed (and the invalid file with it): gone.
    std::fs::remove_file(ints.join("third.toml")).unwrap();
    std::fs::remove_file(ints.join("first.toml")).unwrap();
    within_5s("a removed file was still in force", || async { shown("first").await.0 == StatusCode::NOT_FOUND }).await;
}
