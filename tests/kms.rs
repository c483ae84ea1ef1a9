//! The `aws-kms` key provider against moto's KMS API server (PyPI
//! `moto[server]`), one server per test so a test can take it away.

mod support;

use std::time::Duration;

use aws_sdk_kms::types::KeySpec;
use serde_json::Value;
use support::*;

struct Moto {
    url: String,
    _child: tokio::process::Child,
}

async fn start_moto() -> Moto {
    let bin = std::env::var("CREDPROXY_TEST_MOTO_SERVER").unwrap_or_else(|_| {
        panic!("CREDPROXY_TEST_MOTO_SERVER is not set: run the suite with `scripts/test` (it installs moto[server] in the test venv)")
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = tokio::process::Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("moto_server starts");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Moto { url, _child: child };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto_server did not listen on {url} within 20 s");
}

fn aws_env() {
    // moto accepts any credentials; the SDK needs some to sign with.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::remove_var("AWS_PROFILE");
}

async fn create_key(endpoint: &str) -> String {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    let http =
        aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .http_client(http)
        .load()
        .await;
    let client = aws_sdk_kms::Client::new(&conf);
    let out = client.create_key().key_spec(KeySpec::SymmetricDefault).send().await.expect("CreateKey at moto");
    out.key_metadata.unwrap().key_id
}

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
    store.delete_connection(&b).await.unwrap();
    store.insert_connection(&row_b).await.unwrap();
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
