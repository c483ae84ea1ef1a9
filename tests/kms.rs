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
