//! `resolve_cache_hit`: resolving a connection that is already decrypted in
//! the cache — the per-request cost on the hot path. `resolve_rotating`:
//! the request path's look-up (`resolve_memo`) for a caller that changes
//! connection id every request (eight ids in turn, so its memo never
//! answers): what the thread resolved lately answers before the cache.
//! `resolve_cache_miss` adds the SQLite read and AES-GCM unwrap/open for
//! comparison.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use credproxy::creds::{Connections, NewConnection, ResolveMemo};
use credproxy::crypto::{Envelope, LocalKeyProvider};
use credproxy::ids::ConnectionId;
use credproxy::integrations::Integrations;
use credproxy::oauth2::TokenClient;
use credproxy::secret::SecretValue;
use credproxy::store::sqlite::SqliteStore;
use criterion::{criterion_group, criterion_main, Criterion};

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ints_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/integrations");
    let conns = Connections::new(
        Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap()),
        Envelope::new(Arc::new(LocalKeyProvider::open_or_create(&dir.path().join("master.key")).unwrap())),
        Arc::new(Integrations::load_dir(&ints_dir, &BTreeMap::new()).unwrap()),
        10_000,
        Duration::from_secs(3600),
        TokenClient::new(Default::default(), Duration::from_secs(1), Duration::from_secs(1), &[]),
    );
    let create = || async {
        let meta = conns
            .create(NewConnection {
                integration: "httpbin".into(),
                auth_method: "bearer".into(),
                org_id: "org_bench".into(),
                user_id: "u".into(),
                credentials: [("token".to_owned(), SecretValue::from("bench-token"))].into_iter().collect(),
            })
            .await
            .unwrap();
        conns.resolve("org_bench", &meta.id).await.unwrap();
        meta.id
    };
    let id = rt.block_on(create());
    let rotating: Vec<ConnectionId> =
        (0..8).map(|_| ConnectionId::parse(rt.block_on(create()).as_bytes()).unwrap()).collect();
    c.bench_function("resolve_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let (r, hit) = conns.resolve("org_bench", &id).await.unwrap();
            assert!(hit);
            r
        })
    });
    let mut turn = 0;
    c.bench_function("resolve_rotating", |b| {
        b.to_async(&rt).iter(|| {
            turn = (turn + 1) % rotating.len();
            let id = &rotating[turn];
            let conns = &conns;
            async move {
                let mut memo = ResolveMemo::default();
                let (r, hit) = conns.resolve_memo("org_bench", id, &mut memo, std::time::Instant::now()).await.unwrap();
                assert!(hit);
                r
            }
        })
    });
    // A zero-capacity cache never holds the entry: every call loads.
    let cold = Connections::new(
        conns.store().clone(),
        Envelope::new(Arc::new(LocalKeyProvider::open_or_create(&dir.path().join("master.key")).unwrap())),
        conns.integrations().clone(),
        0,
        Duration::from_secs(1),
        TokenClient::new(Default::default(), Duration::from_secs(1), Duration::from_secs(1), &[]),
    );
    c.bench_function("resolve_cache_miss", |b| {
        b.to_async(&rt).iter(|| async { cold.resolve("org_bench", &id).await.unwrap() })
    });
}

criterion_group!(resolve_benches, benches);
criterion_main!(resolve_benches);
