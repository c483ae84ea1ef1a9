//! Criterion benches for injection, one per auth method: the pure edits plus
//! applying them to a realistic request head (and body, for body placements).

use std::collections::BTreeMap;
use std::sync::Arc;

use credproxy::creds::Credential;
use credproxy::inject;
use credproxy::integrations::{AuthMethod, Integrations};
use credproxy::secret::SecretValue;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Uri};

fn method(ints: &Integrations, id: &str) -> Arc<AuthMethod> {
    ints.get("httpbin").unwrap().auth_method(id).unwrap().clone()
}

fn cred(m: &AuthMethod) -> Credential {
    let fields: BTreeMap<String, SecretValue> =
        m.fields.iter().map(|f| (f.clone(), SecretValue::new(format!("{f}-value-0123456789abcdef")))).collect();
    Credential::from_fields(m, fields).unwrap()
}

fn head() -> (Uri, HeaderMap) {
    let uri: Uri = "http://api.example.com/v1/items?page=2&per_page=50".parse().unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("accept", "application/json"),
        ("user-agent", "workflow-runner/1.0"),
        ("authorization", "Bearer caller"),
        ("cookie", "theme=dark; lang=en"),
        ("content-type", "application/json"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    (uri, h)
}

fn benches(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/integrations");
    let ints = Integrations::load_dir(&dir, &BTreeMap::new()).unwrap();
    for (name, id) in [
        ("inject_bearer", "bearer"),
        ("inject_basic", "basic"),
        ("inject_api_key_header", "key_header"),
        ("inject_api_key_query", "key_query"),
        ("inject_api_key_cookie", "key_cookie"),
        ("inject_custom_headers", "custom_headers"),
    ] {
        let m = method(&ints, id);
        let c_ = cred(&m);
        let (uri0, h0) = head();
        c.bench_function(name, |b| {
            b.iter_batched_ref(
                || (uri0.clone(), h0.clone()),
                |(uri, h)| {
                    let mut e = inject::edits(&m, &c_).unwrap();
                    inject::apply_head(uri, h, &mut e).unwrap();
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    let m = method(&ints, "custom_json");
    let c_ = cred(&m);
    let (_, h0) = head();
    let body = br#"{"query":"open issues","limit":50,"filters":{"state":"open"}}"#;
    c.bench_function("inject_custom_json_body", |b| {
        b.iter(|| {
            let e = inject::edits(&m, &c_).unwrap();
            black_box(inject::apply_body(&h0, body, &e).unwrap());
        })
    });
    let m = method(&ints, "custom_form");
    let c_ = cred(&m);
    let mut hf = HeaderMap::new();
    hf.insert("content-type", "application/x-www-form-urlencoded".parse().unwrap());
    c.bench_function("inject_custom_form_body", |b| {
        b.iter(|| {
            let e = inject::edits(&m, &c_).unwrap();
            black_box(inject::apply_body(&hf, b"grant=x&scope=read+write", &e).unwrap());
        })
    });
}

/// Response body scrubbing (`scrub_response_bodies`): one MiB of JSON-ish
/// text in 16 KiB chunks through the stream scrubber of a basic method
/// (its two values and the rendered `Basic …`, each in seven forms), with
/// and without the values in it. Throughput is the cost per MiB.
fn scrub(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/integrations");
    let ints = Integrations::load_dir(&dir, &BTreeMap::new()).unwrap();
    let m = method(&ints, "basic");
    let c_ = cred(&m);
    let secrets = inject::injected_values(&m, &c_);
    let clean: Vec<u8> = br#"{"id":12345,"name":"item","tags":["a","b"],"note":"lorem ipsum dolor sit amet"},"#
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    let mut echoing = clean.clone();
    let value = c_.value(1).expose().as_bytes().to_vec();
    for at in (0..echoing.len() - value.len()).step_by(4093) {
        echoing[at..at + value.len()].copy_from_slice(&value);
    }
    let mut g = c.benchmark_group("scrub_response_body");
    g.throughput(criterion::Throughput::Bytes(1 << 20));
    for (name, body) in [("1MiB_clean", &clean), ("1MiB_256_echoes", &echoing)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut s = inject::StreamScrubber::new(&secrets).unwrap();
                let mut n = 0;
                for chunk in body.chunks(16 << 10) {
                    n += s.push(chunk).len();
                }
                n += s.finish().len();
                black_box(n)
            })
        });
    }
    g.finish();
}

criterion_group!(inject_benches, benches, scrub);
criterion_main!(inject_benches);
