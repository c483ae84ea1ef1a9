//! The store failing under credproxy, with the real thing: PostgreSQL
//! crashed (immediate shutdown: every backend gone at once, crash recovery
//! on restart) while a transaction is open, and the SQLite store on a file
//! system that fills up. Each: a bounded, documented error (503
//! `store_unavailable`), nothing half-written (the change and its outbox
//! event together or neither), and recovery without a restart.
//!
//! (A store that never answers, PostgreSQL stopped and restarted between
//! transactions, `kill -9` of an instance holding the refresh lock and of
//! a key rotation part-way are in security_review.rs, shared.rs and
//! key_rotation.rs.)

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

/// The connection works through the proxy with `token`.
async fn works(h: &Harness, id: &str, token: &str) {
    let (status, _, body) =
        proxy_request(h.running.proxy_addr, "GET", &format!("{}/headers", httpbin()), Some(id), None).await;
    assert_eq!(status, 200, "{id}: {}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["headers"]["Authorization"], format!("Bearer {token}"), "{id}");
}

/// Polls `count_sql` (a `SELECT count(*)`) every 20 ms until it counts
/// something; fails with `what` after `within`.
async fn until_counted(client: &tokio_postgres::Client, count_sql: &str, within: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let n: i64 = client.query_one(count_sql, &[]).await.unwrap().get(0);
        if n > 0 {
            return;
        }
        assert!(started.elapsed() < within, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The events of one type for one connection, from the pull feed.
async fn events_of(h: &Harness, kind: &str, id: &str) -> usize {
    let (status, v) = h.admin.send(Method::GET, "/v1/events?limit=1000", None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    v["events"].as_array().unwrap().iter().filter(|e| e["type"] == kind && e["data"]["connection_id"] == id).count()
}

/// Every connection id the admin API lists, all pages.
async fn all_ids(admin: &credproxy::admin_client::AdminClient) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/connections?limit=1000&cursor={c}"),
            None => "/v1/connections?limit=1000".to_owned(),
        };
        let (status, v) = admin.send(Method::GET, &path, None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{v}");
        ids.extend(v["connections"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
}

async fn create(h: &Harness, token: &str) -> (StatusCode, Value) {
    let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "user_1",
        "credentials": {"token": token}});
    h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashing_mid_transaction_rolls_back_and_recovers_without_restart() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let h = Harness::start_with(Opts {
        store_url: Some(pg.url()),
        key_file: Some(keys.path().join("master.key")),
        ..Default::default()
    })
    .await;
    let kept = h.create("bearer", &[("token", "crash-kept")]).await;
    let doomed = h.create("bearer", &[("token", "crash-doomed")]).await;
    works(&h, &kept, "crash-kept").await;

    // Hold the row lock on `doomed` from another session, so credproxy's
    // delete (the row and its `connection.deleted` event, one transaction)
    // is open and waiting inside PostgreSQL when the server goes down.
    let (locker, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    let locker_task = tokio::spawn(conn);
    // The store listener's first connect empties the cache (it may have
    // missed changes); on a loaded machine it can come after the request
    // above. Wait for its LISTEN to have run (before the transaction
    // below), and a moment for the reply to reach it, before caching what
    // must be served through the outage.
    let listen = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND state = 'idle'";
    until_counted(&locker, listen, Duration::from_secs(20), "the store listener never subscribed").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    works(&h, &kept, "crash-kept").await;
    locker.batch_execute("BEGIN").await.unwrap();
    let locked = locker.execute("SELECT 1 FROM connections WHERE id = $1 FOR UPDATE", &[&doomed]).await.unwrap();
    assert_eq!(locked, 1);
    let admin = credproxy::admin_client::AdminClient::new(&h.admin_url(), ADMIN_TOKEN.into()).unwrap();
    let path = format!("/v1/connections/{doomed}");
    let delete = tokio::spawn(async move { admin.send(Method::DELETE, &path, None).await.unwrap() });
    // Wait until credproxy's delete is blocked on the lock.
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
    until_counted(&locker, waiting, Duration::from_secs(10), "the delete never reached the lock").await;

    // Cached (see above: after the listener's resync).
    works(&h, &kept, "crash-kept").await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.crash();
        pg
    })
    .await
    .unwrap();
    let took = Instant::now();
    let (status, v) = tokio::time::timeout(Duration::from_secs(20), delete).await.expect("answered").unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "store_unavailable", "{v}");
    assert!(took.elapsed() < Duration::from_secs(15), "answered after {:?}", took.elapsed());
    locker_task.abort();
    // The cached connection is served through the outage.
    works(&h, &kept, "crash-kept").await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.up();
        pg
    })
    .await
    .unwrap();
    // Recovery by itself: the admin API answers again.
    let started = Instant::now();
    loop {
        let (status, _) = h.admin.send(Method::GET, &format!("/v1/connections/{doomed}"), None).await.unwrap();
        if status == StatusCode::OK {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no recovery after the restart: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The delete was rolled back whole: the row is there and no event says otherwise.
    assert_eq!(events_of(&h, "connection.deleted", &doomed).await, 0, "an event without its change");
    works(&h, &doomed, "crash-doomed").await;
    // Done again, it takes effect once, with its event.
    let (status, v) = h.admin.send(Method::DELETE, &format!("/v1/connections/{doomed}"), None).await.unwrap();
    assert!(status.is_success(), "{status} {v}");
    assert_eq!(events_of(&h, "connection.deleted", &doomed).await, 1);
    let (status, _) = h.admin.send(Method::GET, &format!("/v1/connections/{doomed}"), None).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // New writes work, and the other connection lost nothing.
    let after = h.create("bearer", &[("token", "crash-after")]).await;
    works(&h, &after, "crash-after").await;
    works(&h, &kept, "crash-kept").await;
    drop(pg);
}

/// A small tmpfs for the SQLite store (root can mount one; where it cannot,
/// the test says so).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed ({}): the full-file-system test needs root with CAP_SYS_ADMIN",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_full_file_system_refuses_writes_cleanly_and_recovers() {
    let fs = Tmpfs::mount("4m");
    let db = fs.path().join("credproxy.db");
    let h =
        Harness::start_with(Opts { store_url: Some(format!("sqlite://{}", db.display())), ..Default::default() }).await;
    let mut created = Vec::new();
    for i in 0..3 {
        let token = format!("full-before-{i}");
        created.push((h.create("bearer", &[("token", &token)]).await, token));
    }

    // Fill the file system.
    let filler = fs.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 16 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }

    // Writes fail with a clear 503; whatever did succeed in between (free
    // pages inside the database) is whole.
    let mut refused = 0;
    for i in 0..200 {
        let token = format!("full-during-{i}");
        let (status, v) = create(&h, &token).await;
        if status == StatusCode::CREATED {
            created.push((v["id"].as_str().unwrap().to_owned(), token));
            continue;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["code"], "store_unavailable", "{v}");
        refused += 1;
        if refused == 5 {
            break;
        }
    }
    assert_eq!(refused, 5, "the full file system never refused a write");
    // Reads and the proxy keep working.
    for (id, token) in &created {
        works(&h, id, token).await;
    }

    // Space comes back: writes work again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (status, v) = create(&h, "full-after").await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    created.push((v["id"].as_str().unwrap().to_owned(), "full-after".to_owned()));

    // Nothing lost, nothing half-written: exactly the connections whose
    // create succeeded exist, each works with its own credential and has
    // its one `connection.created` event.
    let mut listed = all_ids(&h.admin).await;
    let mut expected: Vec<String> = created.iter().map(|(id, _)| id.clone()).collect();
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected);
    for (id, token) in &created {
        works(&h, id, token).await;
        assert_eq!(events_of(&h, "connection.created", id).await, 1, "{id}");
    }
    drop(h);
    assert_eq!(integrity(&db), "ok");
}

/// `PRAGMA integrity_check` of a SQLite file: "ok" or what is wrong.
fn integrity(db: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_credentials_are_written_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "");
    let mut a = spawn_instance(&config).await;
    let admin_url = a.admin_url.clone();

    // Four writers create and delete connections as fast as they can;
    // each remembers what was acknowledged.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let admin = credproxy::admin_client::AdminClient::new(&admin_url, ADMIN_TOKEN.into()).unwrap();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for n in 0.. {
                    let token = format!("kill9-{w}-{n}");
                    let body = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG,
                        "user_id": "user_1", "credentials": {"token": token}});
                    let Ok((status, v)) = admin.send(Method::POST, "/v1/connections", Some(&body)).await else {
                        break;
                    };
                    assert_eq!(status, StatusCode::CREATED, "{v}");
                    let id = v["id"].as_str().unwrap().to_owned();
                    // Every third one is deleted again (a write of another kind).
                    if n % 3 == 2 {
                        match admin.send(Method::DELETE, &format!("/v1/connections/{id}"), None).await {
                            Ok((s, _)) if s.is_success() => continue,
                            Ok((s, v)) => panic!("{s} {v}"),
                            Err(_) => {
                                // Killed with the delete in flight: either outcome is right.
                                acknowledged.push((id, token, true));
                                break;
                            }
                        }
                    }
                    acknowledged.push((id, token, false));
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = a.pid().to_string();
    let st = tokio::process::Command::new("kill").args(["-KILL", &pid]).status().await.unwrap();
    assert!(st.success());
    a.child.wait().await.unwrap();
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.unwrap());
    }
    assert!(acknowledged.len() >= 20, "only {} writes before the kill", acknowledged.len());

    // The file is whole, and a restart serves every acknowledged connection
    // with its own credential; nothing else exists but what a writer sent.
    assert_eq!(integrity(&dir.path().join("db.sqlite")), "ok");
    let b = spawn_instance(&config).await;
    let listed: std::collections::BTreeSet<String> = all_ids(&b.admin).await.into_iter().collect();
    let url = format!("{}/headers", httpbin());
    for (id, token, maybe_deleted) in &acknowledged {
        if *maybe_deleted && !listed.contains(id) {
            continue;
        }
        assert!(listed.contains(id), "{id} was acknowledged and is gone");
        let (status, _, body) = proxy_request(b.proxy, "GET", &url, Some(id), None).await;
        assert_eq!(status, 200, "{id}: {}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["headers"]["Authorization"], format!("Bearer {token}"));
    }
    // A connection committed as the process died (its answer lost) still
    // opens, with a credential one of the writers sent.
    for id in &listed {
        let (status, _, body) = proxy_request(b.proxy, "GET", &url, Some(id), None).await;
        assert_eq!(status, 200, "{id}: {}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        let auth = v["headers"]["Authorization"].as_str().unwrap_or_default();
        assert!(auth.starts_with("Bearer kill9-"), "{id}: {auth}");
    }
}
