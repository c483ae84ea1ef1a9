//! Run-token verification. Oracles: no panic on any string; a token is
//! accepted only in the exact form credproxy mints (no second spelling of
//! a signed token: padding, trailing bits, case, separators); minted tokens
//! verify to their claims; one changed byte is refused.
#![no_main]

use credproxy::runtoken::{RunClaims, RunTokenKeys};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static RunTokenKeys {
    static K: std::sync::OnceLock<RunTokenKeys> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        RunTokenKeys::new(b"fuzz-signing-key-0123456789abcdef", &[b"fuzz-old-key-0123456789abcdef".to_vec()])
    })
}

fuzz_target!(|input: &[u8]| {
    let [mode, rest @ ..] = input else { return };
    let keys = keys();
    if mode & 1 == 0 {
        let Ok(token) = std::str::from_utf8(rest) else { return };
        if let Ok(claims) = keys.verify(token, 0) {
            let canonical = keys.mint(&claims).expect("a verified token mints again");
            assert_eq!(canonical.expose(), token, "a second spelling of a signed token was accepted");
        }
        return;
    }
    // Claims from the input; mint, verify, tamper.
    let text = String::from_utf8_lossy(rest);
    let mut f = text.split('\u{1}');
    let claims = RunClaims {
        jti: f.next().unwrap_or("").to_owned(),
        org: f.next().unwrap_or("").to_owned(),
        sub: f.next().map(str::to_owned),
        conns: f.next().map(|c| c.split(',').map(str::to_owned).collect()),
        ints: None,
        iat: 1,
        exp: i64::from(*mode) + 10,
    };
    let Some(token) = keys.mint(&claims) else {
        // Refused as too long: then it would not have verified.
        let json = serde_json::to_vec(&claims).unwrap();
        assert!(json.len() * 4 / 3 > credproxy::runtoken::MAX_TOKEN_LEN - 100, "a short token refused");
        return;
    };
    let back = keys.verify(token.expose(), 0).expect("a minted token verifies");
    assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&claims).unwrap());
    let mut bytes = token.expose().as_bytes().to_vec();
    let i = usize::from(*mode) * 7 % bytes.len();
    bytes[i] ^= 1 << (mode % 7);
    if let Ok(t) = std::str::from_utf8(&bytes) {
        assert!(keys.verify(t, 0).is_err(), "a token with a changed byte verified");
    }
});
