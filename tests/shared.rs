//! Shared deployment: three real credproxy processes (the built binary) on
//! one PostgreSQL database. A refresh storm spread over all three makes
//! exactly one refresh at the provider; a delete through one instance stops
//! the connection on the others within a second (LISTEN/NOTIFY).

mod support;

use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;
use support::*;

fn write_config(dir: &tempfile::TempDir, oidc: &Oidc, db: &str) -> std::path::PathBuf {
    write_config_with(dir, oidc, db, |t| t, "")
}

/// [`write_config`], with the integration file edited and sections added.
fn write_config_with(
    dir: &tempfile::TempDir,
    oidc: &Oidc,
    db: &str,
    edit: impl FnOnce(String) -> String,
    sections: &str,
) -> std::path::PathBuf {
    let ints = dir.path().join("integrations");
    std::fs::create_dir(&ints).unwrap();
    let (name, text) = oidc.integration();
    std::fs::write(ints.join(name), edit(text)).unwrap();
    let config = dir.path().join("credproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n\
             [store]\nurl = \"{db}\"\npool_size = 8\n[crypto]\nkey_file = \"{}\"\n[egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
             [integrations]\ndir = \"{}\"\n{sections}",
            dir.path().join("master.key").display(),
            ints.display()
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_one_refresh_and_fast_invalidation() {
    let oidc = Oidc::start().await;
    let db = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &oidc, &db);
    // The first instance creates the shared master key; then the others start.
    let a = spawn_instance(&config).await;
    let (b, c) = tokio::join!(spawn_instance(&config), spawn_instance(&config));
    let all = [&a, &b, &c];
    let id = authorize_code(&a, dir.path()).await;
    assert!(a.admin_url.starts_with("http://127.0.0.1:"));
    let resource = format!("{}/resource", oidc.url);
    for i in all {
        assert_eq!(proxy_request(i.proxy, "GET", &resource, Some(&id), None).await.0, 200);
    }

    // Storm: 300 concurrent requests over three instances right after expiry.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    let before = oidc.count("refresh_token").await;
    let mut tasks = Vec::new();
    for n in 0..300 {
        let (proxy, resource, id) = (all[n % 3].proxy, resource.clone(), id.clone());
        tasks.push(tokio::spawn(async move { proxy_request(proxy, "GET", &resource, Some(&id), None).await }));
    }
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(oidc.count("refresh_token").await - before, 1, "exactly one refresh across three instances");
    for i in all {
        assert_eq!(
            proxy_request(i.proxy, "GET", &resource, Some(&id), None).await.0,
            200,
            "every instance has the new token"
        );
    }

    // Delete through A: B and C stop within a second.
    let started = Instant::now();
    let del: Value = a.admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(del["deleted"], true);
    for i in [&b, &c] {
        loop {
            let (status, _, _) = proxy_request(i.proxy, "GET", &resource, Some(&id), None).await;
            if status == 404 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(1), "instance still served a deleted connection after 1 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_instance_that_holds_the_refresh_lock_loses_nothing() {
    let oidc = Oidc::start().await;
    let db = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &oidc, &db);
    let a = spawn_instance(&config).await;
    let b = spawn_instance(&config).await;
    let id = authorize_code(&a, dir.path()).await;
    let resource = format!("{}/resource", oidc.url);
    assert_eq!(proxy_request(b.proxy, "GET", &resource, Some(&id), None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(5200)).await;

    // A starts the refresh and hangs on a slow token endpoint, holding the lock.
    oidc.post("/test/token-delay?ms=4000").await;
    let before = oidc.count("refresh_token").await;
    let a_proxy = a.proxy;
    let resource_a = resource.clone();
    let id_a = id.clone();
    let stuck = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(a_proxy).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(&resource_a)
            .header("x-connection-id", &id_a)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        tx.send_request(req).await.map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    // kill -9: no cleanup runs; PostgreSQL sees the connection close and rolls back.
    let pid = a.pid().to_string();
    let st = tokio::process::Command::new("kill").args(["-KILL", &pid]).status().await.unwrap();
    assert!(st.success());
    assert!(stuck.await.unwrap().is_err(), "the killed instance answered nothing");
    oidc.post("/test/token-delay?ms=0").await;

    // B takes over: one refresh, the connection keeps working, no invalid_grant.
    let (status, _, body) = proxy_request(b.proxy, "GET", &resource, Some(&id), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(oidc.count("refresh_token").await - before, 1, "only B's refresh reached the provider");
    let meta = b.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(meta["state"], "active");
    tokio::time::sleep(Duration::from_millis(5200)).await;
    assert_eq!(
        proxy_request(b.proxy, "GET", &resource, Some(&id), None).await.0,
        200,
        "the rotated token works for the next refresh too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_cached_traffic_continues_cold_lookups_503_then_recover() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("master.key");
    let opts = || Opts { store_url: Some(pg.url()), key_file: Some(key_file.clone()), ..Default::default() };
    let h1 = Harness::start_with(opts()).await;
    let h2 = Harness::start_with(opts()).await;
    let warm = h1.create("bearer", &[("token", "warm")]).await;
    let cold = h1.create("bearer", &[("token", "cold")]).await;
    let get = |h: &Harness, id: &str| {
        let (proxy, url, id) = (h.running.proxy_addr, format!("{}/headers", httpbin()), id.to_owned());
        async move { proxy_request(proxy, "GET", &url, Some(&id), None).await }
    };
    assert_eq!(get(&h1, &warm).await.0, 200);
    assert_eq!(get(&h2, &warm).await.0, 200);

    let pg = tokio::task::spawn_blocking(move || {
        pg.down();
        pg
    })
    .await
    .unwrap();
    // Served from cache without the database.
    assert_eq!(get(&h1, &warm).await.0, 200, "cached connections keep working during the outage");
    // A lookup that needs the database: a clear 503.
    let (status, headers, body) = get(&h1, &cold).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "store_unavailable");
    assert!(headers.iter().any(|(k, _)| k == "proxy-status"));

    let pg = tokio::task::spawn_blocking(move || {
        pg.up();
        pg
    })
    .await
    .unwrap();
    // Recovers by itself.
    let started = Instant::now();
    while get(&h1, &cold).await.0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(15), "no recovery after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Both listeners re-subscribed: a delete through h1 reaches h2's cache.
    tokio::time::sleep(Duration::from_secs(6)).await; // longest listener backoff
    assert_eq!(get(&h2, &warm).await.0, 200);
    h1.admin.call(Method::DELETE, &format!("/v1/connections/{warm}"), None).await.unwrap();
    let started = Instant::now();
    while get(&h2, &warm).await.0 != 404 {
        assert!(started.elapsed() < Duration::from_secs(2), "h2 did not hear about the delete after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(pg);
}

/// The idle sweeper with short lifetimes: a connection nobody used for its
/// method's `idle_refresh_after_days` (here 15 s) is refreshed by exactly one
/// of three instances sweeping every second; one used (and so refreshed on
/// the request path) meanwhile is not refreshed by the sweeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_refreshed_once_by_one_of_three_instances() {
    let oidc = Oidc::start().await;
    let db = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    // 15 s, in days; on the `code` method (the first with this skew).
    let idle = |t: String| {
        t.replacen("refresh_skew_secs = 1\n", "refresh_skew_secs = 1\nidle_refresh_after_days = 0.000173611\n", 1)
    };
    let config = write_config_with(&dir, &oidc, &db, idle, "[oauth2]\nidle_sweep_interval_secs = 1\n");
    let a = spawn_instance(&config).await;
    let (b, c) = tokio::join!(spawn_instance(&config), spawn_instance(&config));
    let started = Instant::now();
    let idle_id = authorize_code(&a, dir.path()).await;
    let used_id = authorize_code(&b, dir.path()).await;
    let resource = format!("{}/resource", oidc.url);
    // The used one: its token expires (5 s) and a request refreshes it.
    tokio::time::sleep(Duration::from_millis(7000)).await;
    assert_eq!(proxy_request(c.proxy, "GET", &resource, Some(&used_id), None).await.0, 200);
    let used_meta = a.admin.call(Method::GET, &format!("/v1/connections/{used_id}"), None).await.unwrap();
    let used_refreshed = used_meta["last_refreshed_at"].clone();
    assert!(used_refreshed.is_string(), "refreshed on the request path: {used_meta}");
    assert_eq!(oidc.count("refresh_token").await, 1);
    // Past 15 s idle (plus a sweep), before the used one is idle for 15 s.
    let until = started + Duration::from_secs(19);
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    assert_eq!(oidc.count("refresh_token").await, 2, "one sweeper refresh, not three");
    let idle_meta = a.admin.call(Method::GET, &format!("/v1/connections/{idle_id}"), None).await.unwrap();
    assert!(idle_meta["last_refreshed_at"].is_string(), "{idle_meta}");
    let used_meta = a.admin.call(Method::GET, &format!("/v1/connections/{used_id}"), None).await.unwrap();
    assert_eq!(used_meta["last_refreshed_at"], used_refreshed, "the used one was left alone");
    // The refreshed token works (the rotated refresh token was kept).
    assert_eq!(proxy_request(b.proxy, "GET", &resource, Some(&idle_id), None).await.0, 200);
}
