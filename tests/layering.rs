//! The module layering that `src/lib.rs` states (its `# Layout` list: a
//! module imports only modules below it) against what the sources import,
//! plus the rules the design names: nothing but `server` imports `proxy` or
//! `admin`; `store` and `crypto` never import each other; `h1` is a leaf
//! but for `scan` (pure functions, itself a leaf: the head tokenizer's
//! eight-byte scans), so the codec can be read and fuzzed on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `lib.rs`'s layout list: module → its line's position, top first.
fn layout() -> BTreeMap<String, usize> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut levels = BTreeMap::new();
    let mut level = 0;
    for line in lib.lines().skip_while(|l| !l.starts_with("//! # Layout")) {
        let Some(item) = line.strip_prefix("//! - ") else { continue };
        // The names before the first ':' are this line's modules.
        let head = item.split(':').next().unwrap();
        for name in head.split("[`").skip(1) {
            levels.insert(name.split('`').next().unwrap().to_owned(), level);
        }
        level += 1;
    }
    levels
}

/// Every source file of module `m`: `src/m.rs` and what is under `src/m/`.
fn files_of(m: &str) -> Vec<PathBuf> {
    let mut out = vec![src().join(format!("{m}.rs"))];
    let mut dirs = vec![src().join(m)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// The crate modules that module `m` refers to (`crate::x`), itself excluded.
fn imports_of(m: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in files_of(m) {
        let text = std::fs::read_to_string(&f).unwrap();
        for part in text.split("crate::").skip(1) {
            let name: String =
                part.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
            if !name.is_empty() && name != m {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn every_module_imports_only_modules_below_it_in_the_layout() {
    let levels = layout();
    // Every module of the crate is in the list.
    let declared: BTreeSet<String> = std::fs::read_to_string(src().join("lib.rs"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';').map(str::to_owned))
        .collect();
    let listed: BTreeSet<String> = levels.keys().cloned().collect();
    assert_eq!(declared, listed, "lib.rs's layout list and its `pub mod`s differ");

    let mut wrong = Vec::new();
    for (m, level) in &levels {
        for dep in imports_of(m) {
            match levels.get(&dep) {
                Some(l) if l > level => {}
                Some(_) => wrong.push(format!("{m} imports {dep}, which is not below it")),
                None => wrong.push(format!("{m} imports {dep}, which is not in the layout")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_named_rules_hold() {
    let levels = layout();
    for m in levels.keys() {
        let deps = imports_of(m);
        if m != "server" {
            assert!(!deps.contains("proxy") && !deps.contains("admin"), "{m} imports proxy or admin");
        }
    }
    assert!(!imports_of("store").contains("crypto"), "store imports crypto");
    assert!(!imports_of("crypto").contains("store"), "crypto imports store");
    let h1: BTreeSet<String> = imports_of("h1").into_iter().filter(|m| m != "scan").collect();
    assert!(h1.is_empty(), "h1 imports {h1:?}");
    assert!(imports_of("scan").is_empty(), "scan imports {:?}", imports_of("scan"));
    assert!(imports_of("policy").is_empty(), "policy imports {:?}", imports_of("policy"));
}
