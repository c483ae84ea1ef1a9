//! The SSRF classifier against the IANA special-purpose registries (a table
//! in fuzz/src/lib.rs) and the standard library's predicates: refused
//! exactly when the table says so, and always when `std::net` calls the
//! address special.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use credproxy::policy::ssrf::classify;
use credproxy_fuzz::{reference_prohibited, std_special};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: credproxy_fuzz::self_test(),
    |input: &[u8]| {
    let ip = match input.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(input).unwrap())),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(input).unwrap())),
        _ => match std::str::from_utf8(input).ok().and_then(|s| s.parse().ok()) {
            Some(ip) => ip,
            None => return,
        },
    };
    let got = classify(ip);
    assert_eq!(got.is_some(), reference_prohibited(ip), "{ip}: classified {got:?}");
    if std_special(ip) {
        assert!(got.is_some(), "{ip}: std::net calls it special, credproxy would connect");
    }
});
