//! Start-up and memory: start to ready on the embedded-default layout, and
//! resident memory per cached connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::report::Targets;
use crate::statistics::median;
use crate::systems::{credproxy_bin, spawn_credproxy};
use crate::{repo, ADMIN_TOKEN, ORG};

/// Prints both figures (`n` connections for the memory one).
pub async fn section(n: usize, targets: &mut Targets) {
    println!();
    let ready = start_to_ready().await;
    println!("start to ready (embedded default, fresh data dir, /readyz 200): {ready:.1} ms (target < 100 ms)");
    targets.add("start to ready", ready, "ms", 100.0);
    let per_conn = cache_memory(n).await;
    println!(
        "resident memory per cached connection ({n} resolved into the cache): {per_conn:.0} bytes (target ≤ 1024)"
    );
    targets.add("resident memory per cached connection", per_conn, "bytes", 1024.0);
}

/// Start to ready on the embedded-default layout (fresh data dir: SQLite
/// created, master key created), ms, median of 5.
async fn start_to_ready() -> f64 {
    let mut readies = Vec::new();
    for _ in 0..5 {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("config")).unwrap();
        let cfg = d.path().join("config/credproxy.toml");
        std::fs::write(
            &cfg,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[integrations]\ndir = \"{}\"\n",
                repo().join("config/integrations").display()
            ),
        )
        .unwrap();
        let (p, ready) = spawn_credproxy(&[], credproxy_bin(), &cfg, d.path(), "info", &[]).await;
        drop(p);
        readies.push(ready.as_secs_f64() * 1000.0);
    }
    median(readies)
}

/// Resident memory of this process, kB.
fn self_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// Seals `n` bearer connections straight into a SQLite store, then resolves
/// each once through a fresh `Connections` (cache miss → cached) and
/// returns the RSS growth per cached connection in bytes.
async fn cache_memory(n: usize) -> f64 {
    use credproxy::creds::Connections;
    use credproxy::crypto::{Context, Envelope, LocalKeyProvider};
    use credproxy::integrations::Integrations;
    use credproxy::oauth2::TokenClient;
    use credproxy::store::sqlite::SqliteStore;
    use credproxy::store::{ConnectionMeta, ConnectionRow, ConnectionState, SealedBytes, Store};

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
    let envelope = Envelope::new(Arc::new(LocalKeyProvider::open_or_create(&dir.path().join("master.key")).unwrap()));
    let ints_dir = repo().join("config/integrations");
    let ints = Arc::new(Integrations::load_dir(&ints_dir, &BTreeMap::new()).unwrap());
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("conn_{i:026}");
        let plain = serde_json::json!({"token": format!("token-{i:08}-abcdefghijklmnopqrstuvwxyz")}).to_string();
        let s = envelope.seal(Context { org_id: ORG, connection_id: &id }, plain.as_bytes()).await.unwrap();
        let meta = ConnectionMeta {
            id: id.clone(),
            org_id: ORG.into(),
            user_id: "user_1".into(),
            integration: "httpbin".into(),
            auth_method: "bearer".into(),
            state: ConnectionState::Active,
            created_at: 1,
            updated_at: 1,
            activity: Default::default(),
        };
        let sealed =
            SealedBytes { key_id: s.key_id, wrapped_key: s.wrapped_key, nonce: s.nonce, ciphertext: s.ciphertext };
        store.insert_connection(&ConnectionRow { meta, sealed }, None).await.unwrap();
        ids.push(id);
    }
    let conns = Connections::new(
        store,
        envelope,
        ints,
        n as u64 * 2,
        Duration::from_secs(3600),
        TokenClient::new(Default::default(), Duration::from_secs(1), Duration::from_secs(1), &[]),
    );
    // One resolve first so one-time allocations are not counted per entry.
    conns.resolve(ORG, &ids[0]).await.unwrap();
    let before = self_rss_kb();
    for id in &ids[1..] {
        let (_, hit) = conns.resolve(ORG, id).await.unwrap();
        assert!(!hit);
    }
    let after = self_rss_kb();
    // Every entry must still be there (nothing evicted).
    for id in ids.iter().step_by(97) {
        assert!(conns.resolve(ORG, id).await.unwrap().1, "cache kept {id}");
    }
    (after.saturating_sub(before) * 1024) as f64 / (n - 1) as f64
}
