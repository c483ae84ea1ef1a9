//! `credproxy.toml` and integration files from untrusted bytes. Oracles: no
//! panic; an error names a key and never holds the value of an environment
//! variable the file refers to (seeded secret values are searched for);
//! nor does the `Debug` form of a loaded `credproxy.toml`. A loaded
//! integration file's `Debug` may show one: `${VAR}` works in any string
//! (README "Configuration"), and a form field's label or description is
//! shown to users by design (found by a 4-minute run: `${DATABASE_URL}` in
//! a description); its credential-bearing values are `SecretValue`s, whose
//! redaction has its own unit test.
#![no_main]

use std::collections::BTreeMap;

use credproxy::config::Config;
use credproxy::integrations::Integration;
use libfuzzer_sys::fuzz_target;

const SECRETS: [&str; 2] = ["Zq9sEnvSecretValue01", "https://user:Zq9sUrlSecret02@db.test/x"];

fuzz_target!(|input: &[u8]| {
    let [which, rest @ ..] = input else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    if SECRETS.iter().any(|s| text.contains(s) || text.contains("Zq9s")) {
        return;
    }
    let env = BTreeMap::from([
        ("FUZZ_SECRET".to_owned(), SECRETS[0].to_owned()),
        ("DATABASE_URL".to_owned(), SECRETS[1].to_owned()),
    ]);
    let shown = if which & 1 == 0 {
        match Config::from_toml_str("fuzz.toml", text, &env) {
            Ok(c) => format!("{c:?}"),
            Err(e) => format!("{e} {e:?}"),
        }
    } else {
        match Integration::from_toml_str("fuzz.toml", text, &env) {
            Ok(i) => {
                let _ = format!("{i:?}");
                return;
            }
            Err(e) => format!("{e} {e:?}"),
        }
    };
    assert!(!shown.contains("Zq9s"), "an environment value shows: {shown}");
});
