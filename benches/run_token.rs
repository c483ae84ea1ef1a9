//! Criterion benches for run tokens, to choose the format by measurement:
//! verifying our HMAC-SHA256 token (what the proxy does once per caller
//! connection; a keep-alive connection then reuses the check) against
//! verifying an Ed25519 signature over the same claims (what a JWT with
//! EdDSA would cost), and minting.

use credproxy::runtoken::{RunClaims, RunTokenKeys};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

fn claims() -> RunClaims {
    RunClaims {
        jti: "rt_0123456789abcdefghij".into(),
        org: "org_acme".into(),
        sub: Some("user_42".into()),
        conns: Some(vec!["conn_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(), "conn_bbbbbbbbbbbbbbbbbbbbbbbbbb".into()]),
        ints: None,
        iat: 1_800_000_000,
        exp: 1_800_000_900,
    }
}

fn benches(c: &mut Criterion) {
    let keys = RunTokenKeys::new(&[7u8; 32], &[]);
    let token = keys.mint(&claims()).unwrap();
    let now = 1_800_000_000;
    assert!(keys.verify(token.expose(), now).is_ok());
    c.bench_function("run_token_verify_hmac", |b| b.iter(|| keys.verify(black_box(token.expose()), now).unwrap()));
    c.bench_function("run_token_mint_hmac", |b| b.iter(|| keys.mint(black_box(&claims())).unwrap()));

    // The alternative: an Ed25519 signature over the same bytes.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let (signed, _) = token.expose().rsplit_once('.').unwrap();
    let sig = pair.sign(signed.as_bytes());
    let public = UnparsedPublicKey::new(&ED25519, pair.public_key().as_ref().to_vec());
    c.bench_function("run_token_verify_ed25519_signature_only", |b| {
        b.iter(|| public.verify(black_box(signed.as_bytes()), sig.as_ref()).unwrap())
    });
}

criterion_group!(run_token, benches);
criterion_main!(run_token);
