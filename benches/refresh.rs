//! `refresh_single_flight`: 1,000 concurrent requests find the same OAuth2
//! connection without a token and wait on one token-endpoint call. Measures
//! the whole storm (one refresh, persisted, then 999 waiters released).
//!
//! The token endpoint is a tiny in-process hyper server (a stand-in: the
//! real provider is exercised by tests/oauth2.rs); it counts calls so the
//! bench fails if single flight breaks.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use credproxy::creds::{Connections, NewConnection};
use credproxy::crypto::{Envelope, LocalKeyProvider};
use credproxy::integrations::{Integration, Integrations};
use credproxy::oauth2::TokenClient;
use credproxy::policy::ssrf::EgressPolicy;
use credproxy::store::sqlite::SqliteStore;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const WAITERS: usize = 1000;

async fn token_endpoint(calls: Arc<AtomicU64>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let calls = calls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let body =
                            format!(r#"{{"access_token":"bench-access-{n}","token_type":"Bearer","expires_in":3600}}"#);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let addr = rt.block_on(token_endpoint(calls.clone()));
    let text = format!(
        "id = \"bench\"\nname = \"bench\"\nallowed_hosts = [\"127.0.0.1\"]\n[[auth_methods]]\nid = \"machine\"\ntype = \"oauth2\"\n\
         [auth_methods.oauth2]\ngrant = \"client_credentials\"\ntoken_url = \"http://{addr}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n"
    );
    let mut ints = Integrations::default();
    ints.add(Integration::from_toml_str("bench.toml", &text, &BTreeMap::new()).unwrap(), "bench.toml").unwrap();
    let policy = Arc::new(EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]));
    let conns = Arc::new(Connections::new(
        Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap()),
        Envelope::new(Arc::new(LocalKeyProvider::open_or_create(&dir.path().join("master.key")).unwrap())),
        Arc::new(ints),
        100_000,
        Duration::from_secs(3600),
        TokenClient::new(policy, Duration::from_secs(1), Duration::from_secs(5), &[]),
    ));

    c.bench_function("refresh_single_flight", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let conns = conns.clone();
            let calls = calls.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A fresh connection has no token: every waiter needs one.
                    let meta = conns
                        .create(NewConnection {
                            integration: "bench".into(),
                            auth_method: "machine".into(),
                            org_id: "org_bench".into(),
                            user_id: "u".into(),
                            credentials: BTreeMap::new(),
                        })
                        .await
                        .unwrap();
                    let (resolved, _) = conns.resolve("org_bench", &meta.id).await.unwrap();
                    let before = calls.load(Ordering::SeqCst);
                    let start = Instant::now();
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..WAITERS {
                        let (conns, r) = (conns.clone(), resolved.clone());
                        set.spawn(async move { conns.ensure_fresh(r).await.map(|r| r.credential.values().len()) });
                    }
                    while let Some(r) = set.join_next().await {
                        assert_eq!(r.unwrap().unwrap(), 1, "every waiter gets a token");
                    }
                    total += start.elapsed();
                    assert_eq!(calls.load(Ordering::SeqCst) - before, 1, "exactly one token request per storm");
                }
                total
            }
        })
    });
}

criterion_group! {
    name = refresh_benches;
    config = Criterion::default().sample_size(20);
    targets = benches
}
criterion_main!(refresh_benches);
