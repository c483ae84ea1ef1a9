//! `credproxy keys rotate` from `local` to `aws-kms` (moto's KMS API) on a
//! shared PostgreSQL, while two real instances serve a load loop: no request
//! fails, an interrupted run resumes, every record ends up wrapped by KMS,
//! and the old master key can then be deleted.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credproxy::store::postgres::PgStore;
use credproxy::store::{SealedTable, Store};
use http::Method;
use serde_json::{json, Value};
use support::*;

const CONNECTIONS: usize = 40;

fn write_config(dir: &Path, name: &str, db: &str, crypto: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[store]\nurl = \"{db}\"\npool_size = 4\n\
         [crypto]\n{crypto}\n[cache]\nttl_secs = 1\n[egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n\
         [integrations]\ndir = \"{}\"\n",
        repo().join("config/integrations").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn token(i: usize) -> String {
    format!("rotation-token-{i:02}")
}

/// Counts per key id in the connections table.
async fn usage(store: &PgStore) -> Vec<(String, u64)> {
    let all = store.key_usage().await.unwrap();
    all.into_iter().filter(|u| u.table == SealedTable::Connections).map(|u| (u.key_id, u.records)).collect()
}

async fn keys_cli(args: &[&str], config: &Path) -> std::process::Output {
    tokio::process::Command::new(credproxy_bin())
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .await
        .unwrap()
}

/// Requests through `proxies` round-robin over `ids` until `stop`; every
/// answer must be a 200 whose echoed Authorization is the connection's own.
fn load_loop(
    proxies: Vec<std::net::SocketAddr>,
    ids: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|worker| {
            let (proxies, ids, stop, ok, failures) =
                (proxies.clone(), ids.clone(), stop.clone(), ok.clone(), failures.clone());
            tokio::spawn(async move {
                let url = format!("{}/headers", httpbin());
                let mut n = worker;
                while !stop.load(Ordering::Relaxed) {
                    let i = n % ids.len();
                    let (status, _, body) =
                        proxy_request(proxies[n % proxies.len()], "GET", &url, Some(&ids[i]), None).await;
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if status == 200 && v["headers"]["Authorization"] == format!("Bearer {}", token(i)) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap().push(format!("{}: {status} {v}", ids[i]));
                    }
                    n += 4;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_local_to_kms_under_load_resumes_and_the_old_key_is_then_unneeded() {
    aws_env();
    let moto = start_moto().await;
    let kms_key = create_key(&moto.url).await;
    let db = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let old_key = dir.path().join("old.key");
    let kms = format!("provider = \"aws-kms\"\nkms_key_id = \"{kms_key}\"\nkms_endpoint = \"{}\"\n", moto.url);

    // Before: a local-key deployment with connections.
    let local_cfg = write_config(dir.path(), "local.toml", &db, &format!("key_file = \"{}\"", old_key.display()));
    let a = spawn_instance(&local_cfg).await;
    let mut ids = Vec::new();
    for i in 0..CONNECTIONS {
        let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "u",
                          "credentials": {"token": token(i)}});
        let v = a.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    drop(a);
    let store = PgStore::open(&db, 1, std::time::Duration::from_secs(5)).await.unwrap();
    let local_id = usage(&store).await[0].0.clone();
    assert!(local_id.starts_with("local:"), "{local_id}");
    assert_eq!(usage(&store).await, [(local_id.clone(), CONNECTIONS as u64)]);

    // Step 1 of a rotation: instances run with KMS as the current key and the
    // old key as decrypt-only. Short cache TTLs make them re-read rows (old
    // and rewrapped ones) from the store throughout the rotation.
    let during = format!("{kms}data_key_cache_ttl_secs = 1\nprevious_key_files = [\"{}\"]\n", old_key.display());
    let kms_cfg = write_config(dir.path(), "kms-rotating.toml", &db, &during);
    let (b, c) = tokio::join!(spawn_instance(&kms_cfg), spawn_instance(&kms_cfg));
    let ids = Arc::new(ids);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let load = load_loop(vec![b.proxy, c.proxy], ids.clone(), stop.clone(), ok.clone(), failures.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_rotation = ok.load(Ordering::Relaxed);
    assert!(before_rotation > 0, "load loop is running");

    // Step 2: rotate, slowly, and kill -9 the first run part-way.
    let mut first = tokio::process::Command::new(credproxy_bin())
        .args(["keys", "rotate", "--batch-size", "2", "--pause-ms", "150", "--config"])
        .arg(&kms_cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let kms_id = format!("aws-kms:{kms_key}");
    let started = Instant::now();
    loop {
        let done = usage(&store).await.iter().find(|(k, _)| *k == kms_id).map_or(0, |(_, n)| *n);
        if done >= 6 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the rotation made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let halfway = usage(&store).await;
    let left = halfway.iter().find(|(k, _)| *k == local_id).map_or(0, |(_, n)| *n);
    assert!(left > 0, "interrupted part-way: {halfway:?}");

    // `keys status` tells the operator where things stand.
    let out = keys_cli(&["status"], &kms_cfg).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("records under other keys: {left}")), "{text}");

    // The second run picks up where the first stopped.
    let out = keys_cli(&["rotate", "--batch-size", "5"], &kms_cfg).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("rewrapped {left} records")), "{stdout}");
    assert_eq!(usage(&store).await, [(kms_id.clone(), CONNECTIONS as u64)], "every record rewrapped");
    let out = keys_cli(&["status"], &kms_cfg).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Keep serving past the cache TTL so rewrapped rows are read back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} failed requests, first: {:?}", failures.len(), failures.first());
    let total = ok.load(Ordering::Relaxed);
    assert!(total > before_rotation + CONNECTIONS as u64, "traffic flowed during the rotation: {total}");

    // Step 3: the old key is no longer needed. Delete it; a configuration
    // that still names it is refused clearly; one without it serves everything.
    drop((b, c));
    std::fs::remove_file(&old_key).unwrap();
    let out = keys_cli(&["status"], &kms_cfg).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("crypto.previous_key_files[0]") && err.contains("does not exist"), "{err}");

    let after_cfg = write_config(dir.path(), "kms.toml", &db, &kms);
    let d = spawn_instance(&after_cfg).await;
    let url = format!("{}/headers", httpbin());
    for (i, id) in ids.iter().enumerate() {
        let (status, _, body) = proxy_request(d.proxy, "GET", &url, Some(id), None).await;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["headers"]["Authorization"], format!("Bearer {}", token(i)));
    }
}
