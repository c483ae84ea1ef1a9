//! Injection templates and placements: an integration file whose custom
//! auth method places a fuzzer-chosen template in a header, the query, a
//! cookie, a JSON or a form field, and fuzzer-chosen credential values.
//! Oracles: no panic; what is injected reads back (through the URI's query,
//! the Cookie header, the JSON or form body) as exactly the rendered
//! template; the caller's other query parameters survive byte for byte;
//! nothing is injected into a place it cannot be read back from unchanged.
#![no_main]

use std::collections::BTreeMap;

use credproxy::creds::Credential;
use credproxy::inject;
use credproxy::integrations::{toml_basic_string, Integration};
use credproxy::secret::SecretValue;
use libfuzzer_sys::fuzz_target;

const PLACES: [&str; 5] = ["header", "query", "cookie", "json", "form"];

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let mut parts = text.splitn(5, '\u{1}');
    let (Some(place), Some(name), Some(template), Some(a), Some(b)) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let place = PLACES[place.len() % PLACES.len()];
    // Written by hand, not by `toml`'s serializer: toml_write 0.1.2 counts
    // runs of quotes in a `u8` and overflows at 256 (a dependency's bug the
    // CI fuzz step hit; not this target's subject).
    let file = format!(
        "id = \"fuzz\"\nallowed_hosts = [\"api.fuzz.test\"]\n[[auth_methods]]\nid = \"custom\"\ntype = \"custom\"\n\
         fields = [\"a\", \"b\"]\n[[auth_methods.placements]]\nin = {}\nname = {}\ntemplate = {}\n",
        toml_basic_string(place),
        toml_basic_string(name),
        toml_basic_string(template),
    );
    let Ok(integration) = Integration::from_toml_str("fuzz.toml", &file, &BTreeMap::new()) else {
        return;
    };
    let method = integration.auth_method("custom").expect("the method just defined");
    let values = BTreeMap::from([
        ("a".to_owned(), SecretValue::new(a.to_owned())),
        ("b".to_owned(), SecretValue::new(b.to_owned())),
    ]);
    let Ok(cred) = Credential::from_fields(method, values) else { return };
    let rendered = template.replace("{a}", a).replace("{b}", b);
    // Literal braces are written doubled; a template without them renders simply.
    let simple = !template.replace("{a}", "").replace("{b}", "").contains(['{', '}']);

    let Ok(mut edits) = inject::edits(method, &cred) else { return };
    let mut uri: http::Uri = "http://api.fuzz.test/p?keep=1%2B&x".parse().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::COOKIE, http::HeaderValue::from_static("other=1"));
    let body_edits = edits.edits_body();
    if inject::apply_head(&mut uri, &mut headers, &mut edits).is_err() {
        return;
    }
    match place {
        "header" => {
            let v = headers.get(name).expect("injected header present");
            if simple {
                assert_eq!(v.as_bytes(), rendered.as_bytes());
            }
        }
        "query" => {
            let q = uri.query().expect("a query");
            assert!(q.starts_with("keep=1%2B&x&"), "the caller's parameters changed: {q}");
            let got: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
            let found = got.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect::<Vec<_>>();
            assert_eq!(found.len(), 1, "one parameter {name:?}");
            if simple {
                assert_eq!(found[0], rendered);
            }
        }
        "cookie" => {
            let c = headers.get(http::header::COOKIE).expect("cookie").to_str().expect("ASCII cookie");
            let pairs: Vec<&str> = c.split("; ").collect();
            assert!(pairs.contains(&"other=1") || name == "other");
            let found: Vec<&str> = pairs.iter().filter_map(|p| p.strip_prefix(&format!("{name}="))).collect();
            assert_eq!(found.len(), 1, "one cookie {name:?} in {c:?}");
            if simple {
                assert_eq!(found[0], rendered);
            }
        }
        "json" | "form" => {
            assert!(body_edits);
            let Ok((body, ctype)) = inject::apply_body(&headers, b"", &edits) else { return };
            if place == "json" {
                assert_eq!(ctype.as_ref().map(|v| v.as_bytes()), Some(&b"application/json"[..]));
                let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
                if simple {
                    assert_eq!(v[name].as_str(), Some(rendered.as_str()));
                }
            } else {
                let got: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
                assert_eq!(got.len(), 1);
                if simple {
                    assert_eq!(got[0], (name.to_owned(), rendered.clone()));
                }
            }
        }
        _ => unreachable!(),
    }
});
