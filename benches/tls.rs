//! `leaf_cert_mint`: minting a leaf certificate (P-256 key, signed by the
//! interception CA) and building its rustls server configuration — the cost
//! of the first CONNECT to a new host. `leaf_cert_cache_hit`: every later one.

use std::time::Duration;

use credproxy::tls::{init_ca, Interceptor};
use criterion::{criterion_group, criterion_main, Criterion};

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = init_ca(dir.path(), 1).unwrap();
    let interceptor = Interceptor::load(&cert, &key, Duration::from_secs(86_400)).unwrap();
    let mut n = 0u64;
    c.bench_function("leaf_cert_mint", |b| {
        b.iter(|| {
            n += 1;
            interceptor.server_config(&format!("host-{n}.api.example.com")).unwrap()
        })
    });
    interceptor.server_config("api.github.com").unwrap();
    c.bench_function("leaf_cert_cache_hit", |b| b.iter(|| interceptor.server_config("api.github.com").unwrap()));
}

criterion_group!(tls_benches, benches);
criterion_main!(tls_benches);
