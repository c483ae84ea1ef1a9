//! OpenAPI import from untrusted bytes. Oracles: no panic; a document it
//! cannot read is an error that names a place; the report always
//! serializes; every file it writes is one credproxy loads (the importer
//! checks this itself, and saying so in its report is a bug here); nothing
//! it writes sends a credential to a loopback or private host.
#![no_main]

use credproxy::openapi::{import, ImportOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let opts = ImportOptions::default();
    let Ok(out) = import("fuzz.json", input, &opts) else { return };
    serde_json::to_string(&out.report).expect("the report serializes");
    if let Some(why) = &out.report.no_file_because {
        assert!(!why.starts_with("the integration file it would write is refused"), "{why}");
    }
    if let Some(file) = &out.file {
        let value: toml::Value = toml::from_str(file).expect("the file is TOML");
        for h in value["allowed_hosts"].as_array().expect("allowed_hosts") {
            let h = h.as_str().expect("a string");
            let host = h.trim_start_matches("*.").split(':').next().unwrap_or("");
            // A name like `*.10.example` is a name, not an address: only
            // an IP literal is judged by its address.
            let private_ip = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(a)) => a.is_loopback() || a.is_private() || a.is_link_local(),
                Ok(std::net::IpAddr::V6(a)) => a.is_loopback(),
                Err(_) => false,
            };
            assert!(!(host == "localhost" || host.ends_with(".local") || private_ip), "an imported file allows {h}");
        }
    }
});
