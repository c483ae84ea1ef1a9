//! Operations: `/metrics` counters after a known sequence of requests,
//! graceful shutdown of the real binary under SIGTERM, the slowloris cut-off,
//! many idle client connections, and `proxy.max_connections`.

mod support;

use std::collections::BTreeMap;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Scrapes `/metrics` (no token) into `series → value`.
async fn scrape(admin: &str) -> BTreeMap<String, f64> {
    let out = curl(&[&format!("{admin}/metrics")], &[]).await;
    assert_eq!(out.status, 200, "{}", out.text());
    assert!(out.header("content-type").is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    out.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    let get = |m: &BTreeMap<String, f64>| *m.get(series).unwrap_or_else(|| panic!("no series {series}"));
    get(after) - get(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counters_move_as_expected_and_carry_no_connection_ids() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "metrics-secret-token")]).await;
    let before = scrape(&h.admin_url()).await;

    let ok_url = format!("{}/status/200", httpbin());
    for _ in 0..3 {
        assert_eq!(proxy_request(h.running.proxy_addr, "GET", &ok_url, Some(&id), None).await.0, 200);
    }
    let teapot = format!("{}/status/503", httpbin());
    assert_eq!(proxy_request(h.running.proxy_addr, "GET", &teapot, Some(&id), None).await.0, 503);
    // Not one of the integration's hosts: refused by credproxy.
    let other = format!("http://127.0.0.2:{}/get", port_of(&httpbin_authority()));
    assert_eq!(proxy_request(h.running.proxy_addr, "GET", &other, Some(&id), None).await.0, 403);
    // Unknown connection: refused before any integration is known.
    let unknown = &credproxy::ids::new_connection_id();
    assert_eq!(proxy_request(h.running.proxy_addr, "GET", &ok_url, Some(unknown), None).await.0, 404);

    let after = scrape(&h.admin_url()).await;
    let d = |s: &str| delta(&before, &after, s);
    assert_eq!(d("credproxy_requests_total{integration=\"httpbin\",status=\"2xx\"}"), 3.0);
    assert_eq!(d("credproxy_requests_total{integration=\"httpbin\",status=\"5xx\"}"), 1.0);
    assert_eq!(d("credproxy_requests_total{integration=\"httpbin\",status=\"4xx\"}"), 1.0);
    assert_eq!(d("credproxy_requests_total{integration=\"none\",status=\"4xx\"}"), 1.0);
    assert_eq!(d("credproxy_proxy_errors_total{code=\"host_not_allowed\"}"), 1.0);
    assert_eq!(d("credproxy_proxy_errors_total{code=\"connection_not_found\"}"), 1.0);
    assert_eq!(d("credproxy_upstream_latency_seconds_count"), 4.0, "4 requests reached the upstream");
    assert_eq!(d("credproxy_upstream_latency_seconds_bucket{le=\"+Inf\"}"), 4.0);
    // Back to back to one keep-alive upstream (gunicorn gthread): one
    // connection, then three reuses of it from the pool.
    assert_eq!(d("credproxy_upstream_connections_opened_total"), 1.0);
    assert_eq!(d("credproxy_upstream_connections_reused_total"), 3.0);
    // First lookup of `id` and the unknown one miss; the other four hit.
    assert_eq!(d("credproxy_cache_misses_total"), 2.0);
    assert_eq!(d("credproxy_cache_hits_total"), 4.0);
    assert_eq!(after["credproxy_requests_in_flight"], 0.0);
    assert_eq!(after["credproxy_draining"], 0.0);

    let text = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
    assert!(!text.contains(&id) && !text.contains(unknown.as_str()) && !text.contains("metrics-secret-token"));
    assert!(!text.contains("127.0.0.2"), "no hosts as label values");
}

/// gunicorn closes an idle keep-alive connection after 2 s: the pooled
/// connection it closed is noticed and replaced, and the caller never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced_not_failed() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "pool-secret-token")]).await;
    let url = format!("{}/get", httpbin());
    let before = scrape(&h.admin_url()).await;
    assert_eq!(proxy_request(h.running.proxy_addr, "GET", &url, Some(&id), None).await.0, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    for _ in 0..2 {
        assert_eq!(proxy_request(h.running.proxy_addr, "GET", &url, Some(&id), None).await.0, 200);
    }
    let after = scrape(&h.admin_url()).await;
    let d = |s: &str| delta(&before, &after, s);
    assert_eq!(d("credproxy_upstream_connections_opened_total"), 2.0, "the closed one was replaced once");
    assert_eq!(d("credproxy_upstream_connections_reused_total"), 1.0);
    assert_eq!(d("credproxy_proxy_errors_total{code=\"upstream_error\"}"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "[shutdown]\ngrace_secs = 10\n");
    let i = spawn_instance(&config).await;
    let id = drain_token_connection(&i).await;
    drains_under_sigterm(i, id).await;
}

/// `runtime.thread_per_core`: the proxy runs on its own threads (one
/// runtime and upstream pool each), concurrent callers on many connections
/// all get their credential, and SIGTERM drains as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_serves_every_connection_and_drains_under_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "",
        "[shutdown]\ngrace_secs = 10\n[runtime]\nworker_threads = 3\nthread_per_core = true\n",
    );
    let i = spawn_instance(&config).await;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", i.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect();
    for n in 0..3 {
        assert!(threads.contains(&format!("proxy-core-{n}")), "proxy thread {n} runs: {threads:?}");
    }
    let id = drain_token_connection(&i).await;
    // Twelve callers at once, each on its own connection: handed to the
    // threads in turn, four each, each thread through its own pool.
    let calls: Vec<_> = (0..12)
        .map(|n| {
            let (proxy, id) = (i.proxy, id.clone());
            tokio::spawn(async move {
                let url = format!("{}/anything/{n}", httpbin());
                let (status, _, body) = proxy_request(proxy, "GET", &url, Some(&id), None).await;
                (n, status, body)
            })
        })
        .collect();
    for call in calls {
        let (n, status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echoed["headers"]["Authorization"], "Bearer drain-token");
        assert!(echoed["url"].as_str().unwrap().ends_with(&format!("/anything/{n}")), "{echoed}");
    }
    drains_under_sigterm(i, id).await;
}

/// thread_per_core on the PostgreSQL store: the proxy threads resolve
/// through the store's pool (a pooled connection's driver runs on the
/// runtime that opened it, perhaps a proxy thread's), and after SIGTERM
/// the shutdown's last write — the queued `last_used_at`, written every
/// 10 s otherwise, so here only at shutdown — still reaches PostgreSQL:
/// a second instance on the same database sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_runs_on_postgres_and_its_shutdown_writes_the_last_use() {
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "",
        "[shutdown]\ngrace_secs = 10\n[runtime]\nworker_threads = 2\nthread_per_core = true\n[cache]\nttl_secs = 1\n",
    );
    let sqlite = format!("sqlite://{}/db.sqlite", dir.path().display());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&sqlite), "{text}");
    std::fs::write(&config, text.replace(&sqlite, &url)).unwrap();

    let i = spawn_instance(&config).await;
    let id = drain_token_connection(&i).await;
    let last_used = |v: &serde_json::Value| v["last_used_at"].clone();
    let path = format!("/v1/connections/{id}");
    assert!(last_used(&i.admin.call(http::Method::GET, &path, None).await.unwrap()).is_null());
    // Callers on both threads, twice (the second time after the cache
    // entry expired: resolved through the store again).
    for round in 0..2 {
        let calls: Vec<_> = (0..6)
            .map(|n| {
                let (proxy, id) = (i.proxy, id.clone());
                tokio::spawn(async move {
                    let url = format!("{}/anything/{round}/{n}", httpbin());
                    proxy_request(proxy, "GET", &url, Some(&id), None).await
                })
            })
            .collect();
        for call in calls {
            let (status, _, body) = call.await.unwrap();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(echoed["headers"]["Authorization"], "Bearer drain-token");
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    drains_under_sigterm(i, id.clone()).await;

    let again = spawn_instance(&config).await;
    let seen = again.admin.call(http::Method::GET, &path, None).await.unwrap();
    assert!(last_used(&seen).is_string(), "last use written at shutdown: {seen}");
}

/// A bearer connection with the token `drain-token`.
async fn drain_token_connection(i: &Instance) -> String {
    let body = serde_json::json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG,
                                  "user_id": "u", "credentials": {"token": "drain-token"}});
    let created = i.admin.call(http::Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// SIGTERM while a slow request through connection `id` is in flight: not
/// ready, new proxy connections refused, the request completes with its
/// credential, the process exits 0 within `grace_secs = 10`.
async fn drains_under_sigterm(mut i: Instance, id: String) {
    // A slow request (httpbin answers after 3 s) is in flight when SIGTERM arrives.
    let (proxy, slow_url, slow_id) = (i.proxy, format!("{}/delay/3", httpbin()), id.clone());
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let (status, _, body) = proxy_request(proxy, "GET", &slow_url, Some(&slow_id), None).await;
        (status, body, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let term = Instant::now();
    let st = tokio::process::Command::new("kill").args(["-TERM", &i.pid().to_string()]).status().await.unwrap();
    assert!(st.success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Draining: not ready, and the proxy listener is closed.
    let ready = curl(&[&format!("{}/readyz", i.admin_url)], &[]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(ready.json()["code"], "shutting_down");
    assert!(TcpStream::connect(i.proxy).await.is_err(), "new proxy connections are refused while draining");

    // The in-flight request completes normally, with its credential.
    let (status, body, took) = slow.await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["headers"]["Authorization"], "Bearer drain-token");
    assert!(took >= Duration::from_secs(3));

    // Then the process exits 0, well within the grace period.
    let status =
        tokio::time::timeout(Duration::from_secs(10), i.child.wait()).await.expect("exits within grace").unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(term.elapsed() < Duration::from_secs(10), "{:?}", term.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_timeout_and_idle_connections_do_not_block_requests() {
    let h =
        Harness::start_with(Opts { extra_toml: "header_read_timeout_ms = 2000".into(), ..Default::default() }).await;
    let id = h.create("bearer", &[("token", "slowloris-token")]).await;

    // One header byte per second.
    let mut slow = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let head = format!("GET {}/get HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa\r\n\r\n", httpbin());
    let started = Instant::now();
    let mut cut_after = None;
    for b in head.bytes() {
        if slow.write_all(&[b]).await.is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        // Anything read back means the server gave up (408 or close).
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                cut_after = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(8), "still connected after 8 s");
    }
    let cut = cut_after.expect("the slow client was cut off");
    assert!(cut >= Duration::from_millis(1900) && cut < Duration::from_millis(4500), "cut after {cut:?}");

    // A keep-alive caller idle after its requests: the next head is due a
    // header timeout after the last response, however long the requests
    // before took (the timer is armed once and moved on, not per request).
    let mut kept = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let url = format!("{}/get", httpbin());
    let host = url.split('/').nth(2).unwrap().to_owned();
    for _ in 0..3 {
        let req = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nX-Connection-Id: {id}\r\n\r\n");
        kept.write_all(req.as_bytes()).await.unwrap();
        let (answer, whole) = read_response(&mut kept, tokio::time::Instant::now() + Duration::from_secs(5)).await;
        assert!(whole && answer.starts_with("HTTP/1.1 200 "), "{answer}");
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let idle_from = Instant::now();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(8), kept.read(&mut buf)).await.expect("closed within 8 s");
    let idle = idle_from.elapsed();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "closed without an answer: {:?}",
        n.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    // 800 ms of the timeout went by before `idle_from`.
    assert!(idle >= Duration::from_millis(1000) && idle < Duration::from_millis(3700), "closed after {idle:?} idle");

    // 2,000 idle client connections, then a normal request is still served.
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        idle.push(TcpStream::connect(h.running.proxy_addr).await.expect("idle connection accepted"));
    }
    let started = Instant::now();
    let (status, _, body) =
        proxy_request(h.running.proxy_addr, "GET", &format!("{}/headers", httpbin()), Some(&id), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    let open = h.running.open_connections();
    assert!(open >= 2000, "the idle connections are being served: {open}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_and_counted() {
    let h = Harness::start_with(Opts { extra_toml: "max_connections = 5".into(), ..Default::default() }).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(h.running.proxy_addr).await.unwrap());
    }
    let started = Instant::now();
    while h.running.open_connections() < 5 {
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The sixth is accepted by the kernel and closed at once by credproxy.
    let mut extra = TcpStream::connect(h.running.proxy_addr).await.unwrap();
    let _ = extra.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(n, Ok(0) | Err(_)), "closed without an answer");
    let m = scrape(&h.admin_url()).await;
    assert_eq!(m["credproxy_client_connections_refused_total"], 1.0);
    assert_eq!(m["credproxy_client_connections"], 5.0);
    drop(held);
}
