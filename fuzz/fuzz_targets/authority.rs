//! Request targets and `allowed_hosts`. Oracles: the host and port
//! credproxy reads from an authority are those `http::Uri` reads; the host
//! and port checked against `allowed_hosts` are those of the URI that goes
//! upstream (no userinfo, no second authority); a pattern matches exactly
//! what a label-by-label reference matcher says, and its written form
//! parses back to the same pattern.
#![no_main]

use credproxy::policy::hosts::HostPattern;
use credproxy_fuzz::reference_host_match;
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: credproxy_fuzz::self_test(),
    |input: &[u8]| {
    let [flags, plen, rest @ ..] = input else { return };
    let (pattern, target) = rest.split_at(usize::from(*plen).min(rest.len()));
    let Ok(uri) = http::Uri::try_from(target) else { return };

    // credproxy may refuse an authority `http` takes (`[::1]08:10`), never
    // read one differently.
    if let Some(ours) = credproxy::upstream::host_port(&uri) {
        assert_eq!(ours, (uri.host().unwrap_or(""), uri.port_u16()), "authority read differently");
    }
    // The same scan says whether there is userinfo (the proxy refuses it).
    if let Some((_, _, userinfo)) = uri.authority().and_then(|a| credproxy::upstream::authority_parts(a.as_str())) {
        assert_eq!(userinfo, uri.authority().is_some_and(|a| a.as_str().contains('@')), "userinfo missed");
    }

    let Ok(checked) = credproxy::proxy::fuzz::target(uri, flags & 1 == 1) else { return };
    let fwd = &checked.forwarded;
    let authority = fwd.authority().expect("a forwarded URI has an authority");
    assert!(!authority.as_str().contains('@'), "userinfo forwarded");
    assert_eq!(fwd.host(), Some(checked.host.as_str()), "checked one host, forwarding to another");
    let default = if checked.https { 443 } else { 80 };
    assert_eq!(fwd.port_u16().unwrap_or(default), checked.port, "checked one port, forwarding to another");
    assert_eq!(fwd.scheme_str(), Some(if checked.https { "https" } else { "http" }));

    let Ok(pattern) = std::str::from_utf8(pattern) else { return };
    let Ok(p) = HostPattern::parse(pattern) else { return };
    let written = p.to_string();
    assert_eq!(HostPattern::parse(&written).as_ref(), Ok(&p), "{written:?} does not parse back");
    assert_eq!(
        p.matches(&checked.host, checked.port),
        reference_host_match(&written, &checked.host, checked.port),
        "{written} vs {}:{}",
        checked.host,
        checked.port
    );
});
