//! The `aws-kms` key provider against moto's KMS API server (PyPI
//! `moto[server]`), one server per test so a test can take it away.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

async fn kms_harness(endpoint: &str, key: &str) -> Harness {
    let crypto = format!("provider = \"aws-kms\"\nkms_key_id = \"{key}\"\nkms_endpoint = \"{endpoint}\"\n");
    Harness::start_with(Opts { crypto, ..Default::default() }).await
}

async fn get(h: &Harness, id: &str) -> (u16, Value) {
    let (status, _, body) =
        proxy_request(h.running.proxy_addr, "GET", &format!("{}/headers", httpbin()), Some(id), None).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_records_decrypt_and_a_moved_record_fails_cleanly() {
    aws_env();
    let moto = start_moto().await;
    let key = create_key(&moto.url).await;
    let h = kms_harness(&moto.url, &key).await;
    let a = h.create("bearer", &[("token", "kms-token-a")]).await;
    let b = h.create("bearer", &[("token", "kms-token-b")]).await;
    let (status, v) = get(&h, &a).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["headers"]["Authorization"], "Bearer kms-token-a");
    let store = h.running.connections.store().clone();
    let row_a = store.get_connection(&a).await.unwrap().unwrap();
    assert_eq!(row_a.sealed.key_id, format!("aws-kms:{key}"), "each record says which key wrapped it");

    // Put a's sealed credential (and data key) on b's row: the encryption
    // context {org_id, connection_id} no longer matches, so KMS refuses.
    let mut row_b = store.get_connection(&b).await.unwrap().unwrap();
    row_b.sealed = row_a.sealed.clone();
    store.delete_connection(&b, None).await.unwrap();
    store.insert_connection(&row_b, None).await.unwrap();
    let (status, v) = get(&h, &b).await;
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["code"], "connection_unusable");
    assert!(!v.to_string().contains("kms-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_outage_cached_connections_work_cold_ones_get_503() {
    aws_env();
    let moto = start_moto().await;
    let key = create_key(&moto.url).await;
    let h = kms_harness(&moto.url, &key).await;
    let warm = h.create("bearer", &[("token", "warm-token")]).await;
    let cold = h.create("bearer", &[("token", "cold-token")]).await;
    assert_eq!(get(&h, &warm).await.0, 200);
    drop(moto); // kill_on_drop: KMS is gone
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, v) = get(&h, &warm).await;
    assert_eq!(status, 200, "cached connection keeps working: {v}");
    let (status, v) = get(&h, &cold).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "key_service_unavailable");
}

/// A TCP relay in front of moto that can be switched off: while off it
/// takes each connection and closes it at once, as a KMS endpoint that is
/// down (or unreachable behind a dead load balancer) looks to a client.
struct Gate {
    url: String,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    async fn start(to: &str) -> Self {
        use std::sync::atomic::Ordering;
        let to: std::net::SocketAddr = to.trim_start_matches("http://").parse().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = open.clone();
        tokio::spawn(async move {
            while let Ok((mut caller, _)) = l.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(caller);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut caller, &mut up).await;
                    }
                });
            }
        });
        Self { url, open }
    }

    fn set(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_down_at_start_and_mid_run_gives_503s_and_recovers_without_restart() {
    aws_env();
    let moto = start_moto().await;
    let key = create_key(&moto.url).await;
    let gate = Gate::start(&moto.url).await;
    gate.set(false);
    // credproxy starts while KMS is down (it calls KMS only for records).
    let h = kms_harness(&gate.url, &key).await;
    let create = |token: &'static str| {
        let body = serde_json::json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG,
            "user_id": "user_1", "credentials": {"token": token}});
        let admin = credproxy::admin_client::AdminClient::new(&h.admin_url(), ADMIN_TOKEN.into()).unwrap();
        async move { admin.send(http::Method::POST, "/v1/connections", Some(&body)).await.unwrap() }
    };
    let started = std::time::Instant::now();
    let (status, v) = create("kms-down-token").await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "key_service_unavailable", "{v}");
    assert!(started.elapsed() < Duration::from_secs(10), "answered after {:?}", started.elapsed());
    let (_, list) = h.admin.send(http::Method::GET, "/v1/connections", None).await.unwrap();
    assert_eq!(list["connections"].as_array().map(Vec::len), Some(0), "nothing stored: {list}");

    // KMS comes up: no restart needed.
    gate.set(true);
    let (status, v) = create("kms-warm-token").await;
    assert_eq!(status, http::StatusCode::CREATED, "{v}");
    let warm = v["id"].as_str().unwrap().to_owned();
    let (status, v) = create("kms-cold-token").await;
    assert_eq!(status, http::StatusCode::CREATED, "{v}");
    let cold = v["id"].as_str().unwrap().to_owned();
    let (status, v) = get(&h, &warm).await;
    assert_eq!((status, &v["headers"]["Authorization"]), (200, &Value::from("Bearer kms-warm-token")), "{v}");

    // Down mid-run: the cached connection keeps working, a cold one is a 503.
    gate.set(false);
    assert_eq!(get(&h, &warm).await.0, 200);
    let (status, v) = get(&h, &cold).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], "key_service_unavailable");

    // Up again: the cold one works, without a restart.
    gate.set(true);
    let started = std::time::Instant::now();
    loop {
        let (status, v) = get(&h, &cold).await;
        if status == 200 {
            assert_eq!(v["headers"]["Authorization"], "Bearer kms-cold-token");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no recovery: {status} {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
