//! The soak run: mixed load through one real credproxy process for
//! SOAK_SECS (default 600), its resident memory sampled every 10 s. Not in
//! CI (it takes ten minutes and both cores); run it with
//!
//! ```sh
//! scripts/test --test soak -- --ignored --nocapture
//! ```
//!
//! The load, all at once: plain requests to httpbin on keep-alive
//! connections (four callers); `CONNECT` with TLS interception to httpbin's
//! TLS port, twenty requests per tunnel (curl); an OAuth2 connection whose
//! 5-second tokens are refreshed on the request path (oidc-provider); admin
//! changes (create a connection, use it, delete it). Every answer must be
//! the expected one, and memory must be flat after the warm-up: the last
//! sample at most 20% + 4 MiB above the sample at the end of the first
//! fifth of the run.

#![allow(clippy::print_stderr, reason = "the soak run's samples are its output")]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

#[derive(Default)]
struct Counts {
    plain: AtomicU64,
    connect: AtomicU64,
    oauth: AtomicU64,
    admin: AtomicU64,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One keep-alive caller: GETs through the proxy until `stop`.
async fn plain_caller(proxy: std::net::SocketAddr, id: String, stop: Arc<AtomicBool>, n: Arc<Counts>, errors: Errors) {
    use http_body_util::{BodyExt, Empty};
    let url: http::Uri = format!("{}/get", httpbin()).parse().unwrap();
    while !stop.load(Ordering::Relaxed) {
        let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        // A few hundred requests per connection, then a new one.
        for _ in 0..500 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let req = http::Request::get(&url)
                .header("host", url.authority().unwrap().as_str())
                .header("x-connection-id", &id)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            match tx.send_request(req).await {
                Ok(resp) if resp.status() == 200 => {
                    let _ = resp.into_body().collect().await;
                    n.plain.fetch_add(1, Ordering::Relaxed);
                }
                Ok(resp) => {
                    errors.lock().unwrap().push(format!("plain: {}", resp.status()));
                    break;
                }
                Err(e) => {
                    errors.lock().unwrap().push(format!("plain: {e}"));
                    break;
                }
            }
        }
    }
}

type Errors = Arc<Mutex<Vec<String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 10-minute soak run, not for CI: scripts/test --test soak -- --ignored --nocapture"]
async fn ten_minutes_of_mixed_load_with_flat_memory() {
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let oidc = Oidc::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ints = dir.path().join("integrations");
    std::fs::create_dir(&ints).unwrap();
    for e in std::fs::read_dir(repo().join("config/integrations")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ints.join(e.file_name())).unwrap();
    }
    let (name, text) = oidc.integration();
    std::fs::write(ints.join(name), text).unwrap();
    let (ca_cert, ca_key) = credproxy::tls::init_ca(dir.path(), 1).unwrap();
    let sections = format!(
        "[tls_intercept]\nenabled = true\nca_cert = \"{}\"\nca_key = \"{}\"\n[upstream]\nextra_ca_certs = [\"{}\"]\n",
        ca_cert.display(),
        ca_key.display(),
        repo().join("certs/test/upstream-ca.pem").display()
    );
    let config = write_config_with(dir.path(), &ints, "", &sections);
    let i = spawn_instance(&config).await;
    let pid = i.pid();
    let create = |token: String| {
        let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "soak",
            "credentials": {"token": token}});
        let admin = credproxy::admin_client::AdminClient::new(&i.admin_url, ADMIN_TOKEN.into()).unwrap();
        async move { admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap() }
    };
    let (status, v) = create("soak-plain".into()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let plain_id = v["id"].as_str().unwrap().to_owned();
    let oauth_id = authorize_code(&i, dir.path()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let n = Arc::new(Counts::default());
    let errors: Errors = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(plain_caller(i.proxy, plain_id.clone(), stop.clone(), n.clone(), errors.clone())));
    }
    // CONNECT + interception: curl, twenty requests in one tunnel.
    {
        let (stop, n, errors) = (stop.clone(), n.clone(), errors.clone());
        let proxy = format!("http://{}", i.proxy);
        let ca = ca_cert.display().to_string();
        let hdr = format!("X-Connection-Id: {plain_id}");
        let url = format!("{}/get", httpbin_tls());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut cmd = tokio::process::Command::new("curl");
                cmd.args(["-sS", "--cacert", &ca, "-H", &hdr, "-o", "/dev/null", "-w", "%{http_code}\\n"]);
                for _ in 0..20 {
                    cmd.arg(&url);
                }
                let out = cmd.env("HTTPS_PROXY", &proxy).output().await.unwrap();
                let codes = String::from_utf8_lossy(&out.stdout);
                let ok = codes.lines().filter(|c| *c == "200").count() as u64;
                n.connect.fetch_add(ok, Ordering::Relaxed);
                if ok != 20 {
                    errors.lock().unwrap().push(format!("connect: {codes:?} {}", String::from_utf8_lossy(&out.stderr)));
                }
            }
        }));
    }
    // OAuth2: the provider's resource twice a second; tokens live 5 s.
    {
        let (stop, n, errors) = (stop.clone(), n.clone(), errors.clone());
        let (proxy, url, id) = (i.proxy, format!("{}/resource", oidc.url), oauth_id.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, _, body) = proxy_request(proxy, "GET", &url, Some(&id), None).await;
                if status == 200 {
                    n.oauth.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.lock().unwrap().push(format!("oauth: {status} {}", String::from_utf8_lossy(&body)));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    // Admin changes: create, use, delete.
    {
        let (stop, n, errors) = (stop.clone(), n.clone(), errors.clone());
        let admin = credproxy::admin_client::AdminClient::new(&i.admin_url, ADMIN_TOKEN.into()).unwrap();
        let proxy = i.proxy;
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "soak",
                    "credentials": {"token": format!("soak-admin-{k}")}});
                let (status, v) = admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
                let Some(id) = v["id"].as_str().filter(|_| status == StatusCode::CREATED) else {
                    errors.lock().unwrap().push(format!("admin create: {status} {v}"));
                    continue;
                };
                let (status, _, body) =
                    proxy_request(proxy, "GET", &format!("{}/headers", httpbin()), Some(id), None).await;
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if status != 200 || v["headers"]["Authorization"] != format!("Bearer soak-admin-{k}") {
                    errors.lock().unwrap().push(format!("admin use: {status} {v}"));
                }
                let (status, v) = admin.send(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
                if !status.is_success() {
                    errors.lock().unwrap().push(format!("admin delete: {status} {v}"));
                }
                n.admin.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    // Sample every 10 s.
    let started = Instant::now();
    let mut samples = Vec::new();
    eprintln!("{:>5} {:>10} {:>9} {:>8} {:>6} {:>6}", "s", "rss KiB", "plain", "connect", "oauth", "admin");
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss = rss_kib(pid);
        let t = started.elapsed().as_secs();
        eprintln!(
            "{t:>5} {rss:>10} {:>9} {:>8} {:>6} {:>6}",
            n.plain.load(Ordering::Relaxed),
            n.connect.load(Ordering::Relaxed),
            n.oauth.load(Ordering::Relaxed),
            n.admin.load(Ordering::Relaxed)
        );
        samples.push((t, rss));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let refreshes = oidc.count("refresh_token").await;
    eprintln!("refresh grants at the provider: {refreshes}");

    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{} failed answers, first: {:?}", errors.len(), errors.first());
    assert!(n.plain.load(Ordering::Relaxed) > 0 && n.connect.load(Ordering::Relaxed) > 0);
    assert!(n.admin.load(Ordering::Relaxed) > 0 && n.oauth.load(Ordering::Relaxed) > 0);
    assert!(refreshes >= secs / 10, "{refreshes} refreshes in {secs} s of 5-second tokens");
    let warm = samples[samples.len() / 5].1;
    let last = samples.last().unwrap().1;
    assert!(last <= warm + warm / 5 + 4096, "RSS grew after warm-up: {warm} KiB → {last} KiB ({samples:?})");
}
