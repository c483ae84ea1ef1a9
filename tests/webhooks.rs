//! Connection events delivered as webhooks to a real receiver that verifies
//! every delivery with the Standard Webhooks reference library (PyPI
//! `standardwebhooks`, tests/peers/webhooks/receiver.py): the lifecycle of
//! an OAuth2 connection against oidc-provider, and a receiver that is down
//! for a while.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};
use support::*;
use tokio::io::AsyncBufReadExt;

/// 32 bytes, base64.
const SECRET: &str = "whsec_c2VlZGVkLXdlYmhvb2stc2VjcmV0LTAxMjM0NTY3ODk=";

struct Receiver {
    port: u16,
    log: PathBuf,
    child: tokio::process::Child,
}

impl Receiver {
    /// On `port` (0: any), answering valid deliveries with `status`.
    async fn start(log: PathBuf, port: u16, status: u16) -> Self {
        let script = repo().join("tests/peers/webhooks/receiver.py");
        let mut child = tokio::process::Command::new(python())
            .arg(&script)
            .args([SECRET, log.to_str().unwrap(), &port.to_string(), &status.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the receiver starts")
            .unwrap()
            .expect("the receiver prints its port (is standardwebhooks installed? run scripts/test)");
        let port = line.strip_prefix("LISTENING ").unwrap().parse().unwrap();
        Self { port, log, child }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    async fn stop(mut self) -> (u16, PathBuf) {
        let _ = self.child.kill().await;
        (self.port, self.log)
    }
}

/// Every delivery the receiver logged; none may have failed verification.
fn received(log: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for d in &all {
        assert_eq!(d["verified"], true, "a delivery failed Standard Webhooks verification: {d}");
        assert_eq!(d["webhook_id"], d["id"], "webhook-id is the event id: {d}");
    }
    all
}

/// Waits until `enough` says the receiver has what it needs.
async fn wait_for(log: &std::path::Path, within: Duration, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let until = Instant::now() + within;
    loop {
        let got = received(log);
        if enough(&got) {
            return got;
        }
        assert!(Instant::now() < until, "the receiver did not get what was expected within {within:?}: {got:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sections(url: &str) -> String {
    format!(
        "[events]\npoll_interval_ms = 100\n[[webhooks]]\nname = \"platform\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n"
    )
}

/// 200 deliveries by the event's id (only 2xx counts as delivered).
fn delivered(got: &[Value]) -> BTreeMap<String, Vec<&Value>> {
    let mut by_id: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for d in got.iter().filter(|d| d["status"] == 200) {
        by_id.entry(d["id"].as_str().unwrap().to_owned()).or_default().push(d);
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth2_connections_lifecycle_arrives_signed_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path().join("received.jsonl"), 0, 200).await;
    let oidc = Oidc::start().await;
    let h = Harness::start_with(Opts {
        integrations: vec![oidc.integration()],
        sections: sections(&receiver.url()),
        ..Default::default()
    })
    .await;
    let (seen, _) = h.authorize("code", json!({})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    let id = seen.json()["connection_id"].as_str().unwrap().to_owned();
    let resource = format!("{}/resource", oidc.url);
    let get = || async { proxy_request(h.running.proxy_addr, "GET", &resource, Some(&id), None).await.0 };
    assert_eq!(get().await, 200);
    oidc.post("/test/revoke-refresh").await;
    oidc.post("/test/revoke-access").await;
    for _ in 0..3 {
        assert_eq!(get().await, 409);
    }
    let (seen, _) = h.authorize("code", json!({"connection_id": id})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    let v = h.admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(v["provider_revocation"], "revoked");

    let want = ["connection.created", "connection.needs_reauth", "connection.reauthorized", "connection.deleted"];
    let got = wait_for(&receiver.log, Duration::from_secs(20), |g| delivered(g).len() >= want.len()).await;
    // A little longer: nothing more may come (no duplicate, no second needs_reauth).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = if received(&receiver.log).len() > got.len() { received(&receiver.log) } else { got };
    let by_id = delivered(&got);
    assert!(by_id.values().all(|d| d.len() == 1), "each event once: {by_id:#?}");
    let mut kinds: Vec<&str> = by_id.values().map(|d| d[0]["type"].as_str().unwrap()).collect();
    kinds.sort();
    let mut expect = want.to_vec();
    expect.sort();
    assert_eq!(kinds, expect, "{got:#?}");
    let of = |kind: &str| by_id.values().find(|d| d[0]["type"] == kind).unwrap()[0];
    assert_eq!(of("connection.needs_reauth")["data"]["code"], "connection_needs_reauth");
    assert_eq!(of("connection.deleted")["data"]["provider_revocation"], "revoked");
    assert_eq!(of("connection.created")["data"]["connection_id"], id.as_str());

    // The feed has the same events under the same ids.
    let feed = h.admin.call(Method::GET, "/v1/events", None).await.unwrap();
    let feed_ids: Vec<&str> = feed["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(by_id.keys().all(|k| feed_ids.contains(&k.as_str())), "{feed}");

    // Redelivery: the same event (same id) once more.
    let created = of("connection.created")["id"].as_str().unwrap().to_owned();
    let v = h.admin.call(Method::POST, &format!("/v1/events/{created}/redeliver"), None).await.unwrap();
    assert_eq!(v["redelivered"], 1);
    wait_for(&receiver.log, Duration::from_secs(10), |g| delivered(g)[&created].len() == 2).await;
    let metrics = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
    assert!(metrics.contains("credproxy_webhook_deliveries_total 5\n"), "{metrics}");
    assert!(metrics.contains("credproxy_webhook_deliveries_pending 0\n"), "{metrics}");

    // No token or secret in what the receiver got.
    let text = std::fs::read_to_string(&receiver.log).unwrap();
    let secrets = oidc.get_json("/test/secrets").await;
    for k in ["access", "refresh", "codes", "verifiers"] {
        for s in secrets[k].as_array().unwrap() {
            assert!(!text.contains(s.as_str().unwrap()), "a {k} value in a webhook payload");
        }
    }
    assert!(!text.contains(OIDC_BASIC_SECRET) && !text.contains(SECRET));

    // The receiver's check is real: a forged delivery fails it.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string();
    let forged = curl(
        &[
            "-X",
            "POST",
            "-H",
            "webhook-id: evt_forged",
            "-H",
            &format!("webhook-timestamp: {now}"),
            "-H",
            "webhook-signature: v1,bm90IGEgc2lnbmF0dXJl",
            "-d",
            "{}",
            &receiver.url(),
        ],
        &[],
    )
    .await;
    assert_eq!(forged.status, 400);
    assert!(std::panic::catch_unwind(|| received(&receiver.log)).is_err(), "a forged delivery must fail the scan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_was_down_gets_the_event_once_with_its_id() {
    let dir = tempfile::tempdir().unwrap();
    // First it answers 503.
    let receiver = Receiver::start(dir.path().join("received.jsonl"), 0, 503).await;
    let h = Harness::start_with(Opts { sections: sections(&receiver.url()), ..Default::default() }).await;
    let id = h.create("bearer", &[("token", "webhook-down-0001")]).await;
    let feed = h.admin.call(Method::GET, "/v1/events", None).await.unwrap();
    let event = feed["events"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(feed["events"][0]["data"]["connection_id"], id.as_str());
    // It was tried and refused (503), then retried (backoff 1 s, then 2 s…).
    wait_for(&receiver.log, Duration::from_secs(15), |g| g.iter().filter(|d| d["status"] == 503).count() >= 2).await;
    // Then it refuses connections for a while.
    let (port, log) = receiver.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
    assert!(metrics.contains("credproxy_webhook_deliveries_pending 1\n"), "{metrics}");
    assert!(!metrics.contains("credproxy_webhook_retries_total 0\n"), "{metrics}");
    // Back, answering 200 on the same port: the event arrives, once, same id.
    let receiver = Receiver::start(log, port, 200).await;
    let got = wait_for(&receiver.log, Duration::from_secs(40), |g| g.iter().any(|d| d["status"] == 200)).await;
    let ok: Vec<&Value> = got.iter().filter(|d| d["status"] == 200).collect();
    assert_eq!(ok.len(), 1, "{got:#?}");
    assert_eq!(ok[0]["id"], event.as_str());
    assert!(got.iter().all(|d| d["id"] == event.as_str()), "every attempt carried the same id");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(delivered(&received(&receiver.log))[&event].len(), 1, "not delivered again");
}

/// `kill -9` of credproxy after a change committed and before its event
/// was delivered: the restarted instance delivers it (the outbox is in the
/// store, not in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_survives_kill_9_before_its_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("received.jsonl");
    // Nothing listens yet on the receiver's port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/hooks");
    // A long poll interval: after the first round at start, the next is a minute away.
    let sections = format!(
        "[events]\npoll_interval_ms = 60000\n[[webhooks]]\nname = \"platform\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n"
    );
    let config = write_config(dir.path(), "", &sections);
    let mut first = spawn_instance(&config).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "u",
        "credentials": {"token": "kill-nine-0001"}});
    let v = first.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let feed = first.admin.call(Method::GET, "/v1/events", None).await.unwrap();
    let event = feed["events"][0]["id"].as_str().unwrap().to_owned();
    first.child.kill().await.unwrap(); // SIGKILL
    let receiver = Receiver::start(log, port, 200).await;
    assert!(received(&receiver.log).is_empty(), "nothing was delivered before the kill");
    let _second = spawn_instance(&config).await;
    let got = wait_for(&receiver.log, Duration::from_secs(20), |g| !g.is_empty()).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        (got[0]["id"].as_str(), got[0]["data"]["connection_id"].as_str()),
        (Some(event.as_str()), Some(id.as_str()))
    );
}

/// Three instances on one PostgreSQL database, 100 events: each delivered
/// exactly once (the receiver counts ids), none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_deliver_each_of_100_events_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path().join("received.jsonl"), 0, 200).await;
    let db = fresh_postgres_database().await;
    let sections = format!(
        "[store]\nurl = \"{db}\"\npool_size = 4\n[events]\npoll_interval_ms = 50\n[[webhooks]]\nname = \"platform\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        receiver.url()
    );
    let config = write_pg_config(dir.path(), &sections);
    let a = spawn_instance(&config).await;
    let (b, c) = tokio::join!(spawn_instance(&config), spawn_instance(&config));
    let all = [&a, &b, &c];
    let mut tasks = Vec::new();
    for n in 0..100 {
        let admin = credproxy::admin_client::AdminClient::new(&all[n % 3].admin_url, ADMIN_TOKEN.into()).unwrap();
        tasks.push(tokio::spawn(async move {
            let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": format!("u{n}"),
                "credentials": {"token": format!("pg-events-{n:04}")}});
            admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_for(&receiver.log, Duration::from_secs(60), |g| delivered(g).len() >= 100).await;
    // Let any duplicate show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = received(&receiver.log);
    let by_id = delivered(&got);
    assert_eq!(by_id.len(), 100, "every event");
    let twice: Vec<&String> = by_id.iter().filter(|(_, d)| d.len() > 1).map(|(k, _)| k).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(got.len(), 100, "no attempt beyond one per event");
    let feed = a.admin.call(Method::GET, "/v1/events?limit=1000", None).await.unwrap();
    assert_eq!(feed["events"].as_array().unwrap().len(), 100);
}

/// A configuration for the built binary on PostgreSQL (`sections` names the
/// store) with the shipped integrations and a shared master key.
fn write_pg_config(dir: &std::path::Path, sections: &str) -> PathBuf {
    let path = dir.join("credproxy.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[crypto]\nkey_file = \"{}\"\n[egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [integrations]\ndir = \"{}\"\n{sections}",
            dir.join("master.key").display(),
            repo().join("config/integrations").display(),
        ),
    )
    .unwrap();
    path
}

/// Deliveries go through the same SSRF guard as proxied traffic: without
/// `egress.allow_cidrs` allowing loopback, a loopback endpoint gets nothing
/// (the attempts fail and are retried, never sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_obey_the_ssrf_guard() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path().join("received.jsonl"), 0, 200).await;
    let h =
        Harness::start_with(Opts { allow_loopback: false, sections: sections(&receiver.url()), ..Default::default() })
            .await;
    let body = json!({"integration": "github", "auth_method": "pat", "org_id": ORG, "user_id": "u",
        "credentials": {"token": "ssrf-guard-0001"}});
    h.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
        if !m.contains("credproxy_webhook_retries_total 0\n") {
            break;
        }
        assert!(Instant::now() < until, "no delivery attempt was made: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(received(&receiver.log).is_empty(), "a loopback endpoint was reached without egress.allow_cidrs");
}
