//! Seeds known secret values, drives the whole proxy path and the admin API
//! at TRACE log level, and scans every log line, every error body and every
//! admin response for them.

mod support;

use http::Method;
use serde_json::json;
use support::*;

const SECRETS: &[&str] = &[
    "SEEDED-bearer-7f3a9c",
    "SEEDED-basic-user",
    "SEEDED-basic-pw-51d2",
    "SEEDED-hdr-key-88aa",
    "SEEDED-query-key-21bc",
    "SEEDED-cookie-key-0e4f",
    "SEEDED-client-id-c1",
    "SEEDED-client-secret-c2",
    "SEEDED-json-secret-j9",
    "SEEDED-form-secret-f7",
    "SEEDED-rejected-3e",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_error_bodies_or_admin_responses() {
    let capture = logs::trace_capture();

    let oidc = Oidc::start().await;
    let h = Harness::start_with(Opts { integrations: vec![oidc.integration()], ..Default::default() }).await;
    let mut seen_text: Vec<String> = Vec::new();
    let create = |method: &str, creds: Vec<(&str, &str)>| {
        let creds: serde_json::Map<String, serde_json::Value> =
            creds.into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect();
        json!({"integration": "httpbin", "auth_method": method, "org_id": ORG, "user_id": "u", "credentials": creds})
    };
    let bodies = vec![
        ("bearer", create("bearer", vec![("token", "SEEDED-bearer-7f3a9c")])),
        ("basic", create("basic", vec![("username", "SEEDED-basic-user"), ("password", "SEEDED-basic-pw-51d2")])),
        ("key_header", create("key_header", vec![("api_key", "SEEDED-hdr-key-88aa")])),
        ("key_query", create("key_query", vec![("api_key", "SEEDED-query-key-21bc")])),
        ("key_cookie", create("key_cookie", vec![("api_key", "SEEDED-cookie-key-0e4f")])),
        (
            "custom_headers",
            create(
                "custom_headers",
                vec![("client_id", "SEEDED-client-id-c1"), ("client_secret", "SEEDED-client-secret-c2")],
            ),
        ),
        ("custom_json", create("custom_json", vec![("account", "acct"), ("secret", "SEEDED-json-secret-j9")])),
        ("custom_form", create("custom_form", vec![("secret", "SEEDED-form-secret-f7")])),
    ];
    let mut ids = Vec::new();
    for (_, body) in &bodies {
        let (status, v) = h.admin.send(Method::POST, "/v1/connections", Some(body)).await.unwrap();
        assert_eq!(status, 201, "{v}");
        seen_text.push(v.to_string());
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // A rejected create whose value must not be echoed.
    let bad = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "user_id": "u",
        "credentials": {"token": "SEEDED-rejected-3e\r\n"}});
    let (status, v) = h.admin.send(Method::POST, "/v1/connections", Some(&bad)).await.unwrap();
    assert_eq!(status, 400);
    seen_text.push(v.to_string());

    let proxy = h.proxy_url();
    let evil = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let evil_url = format!("http://{}/x?y=1", evil.local_addr().unwrap());
    for id in &ids {
        let hdr = format!("X-Connection-Id: {id}");
        // Success through the full path (the JSON/form ones need bodies).
        let ok = curl(&["-x", &proxy, "-H", &hdr, "--data", "a=1", &format!("{}/status/200", httpbin())], &[]).await;
        seen_text.push(ok.text());
        // Upstream error statuses, proxy-made errors: wrong host, bad body.
        for args in [
            vec!["-x", &proxy, "-H", &hdr, &evil_url],
            vec![
                "-x",
                &proxy,
                "-H",
                &hdr,
                "-H",
                "Content-Type: text/plain",
                "--data",
                "zz",
                &format!("{}/status/500", httpbin()),
            ],
        ] {
            let seen = curl(&args, &[]).await;
            seen_text.push(seen.text());
            seen_text.push(format!("{:?}", seen.headers));
        }
    }
    // A run token in the proxy URL (Basic), used, and refused when cut short:
    // the token is a secret like a credential (its mint answer is the one
    // place it may appear).
    let minted = h.admin.call(Method::POST, "/v1/run-tokens", Some(&json!({"org_id": ORG}))).await.unwrap();
    let run_token = minted["token"].as_str().unwrap().to_owned();
    let run_proxy = |t: &str| format!("http://{}:{t}@{}", ids[0], h.running.proxy_addr);
    let used = curl(&["-x", &run_proxy(&run_token), &format!("{}/status/200", httpbin())], &[]).await;
    assert_eq!(used.status, 200, "{}", used.text());
    seen_text.push(used.text());
    let cut =
        curl(&["-x", &run_proxy(&run_token[..run_token.len() - 4]), &format!("{}/headers", httpbin())], &[]).await;
    assert_eq!(cut.status, 407, "{}", cut.text());
    seen_text.push(cut.text());
    seen_text.push(format!("{:?}", cut.headers));
    // OAuth2: an authorization-code connection (exchange, use, forced refresh
    // after a 401, test, delete with revocation) and a client-credentials one.
    let (seen, final_url) = h.authorize("code", json!({})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    seen_text.push(seen.text());
    let oauth_id = seen.json()["connection_id"].as_str().unwrap().to_owned();
    let resource = format!("{}/resource", oidc.url);
    let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&oauth_id), None).await;
    assert_eq!(status, 200);
    seen_text.push(String::from_utf8_lossy(&body).into_owned());
    oidc.post("/test/revoke-access").await;
    let (status, _, _) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&oauth_id), None).await;
    assert_eq!(status, 200, "refreshed and retried");
    seen_text
        .push(h.admin.call(Method::POST, &format!("/v1/connections/{oauth_id}/test"), None).await.unwrap().to_string());
    seen_text.push(h.admin.call(Method::GET, &format!("/v1/connections/{oauth_id}"), None).await.unwrap().to_string());
    let replay = curl(&[&final_url], &[]).await;
    seen_text.push(replay.text());
    let machine =
        json!({"integration": "oidc", "auth_method": "machine", "org_id": ORG, "user_id": "svc", "credentials": {}});
    let v = h.admin.call(Method::POST, "/v1/connections", Some(&machine)).await.unwrap();
    let machine_id = v["id"].as_str().unwrap().to_owned();
    let (status, _, _) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&machine_id), None).await;
    assert_eq!(status, 200);
    for id in [&oauth_id, &machine_id] {
        seen_text.push(h.admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap().to_string());
    }
    // An organization's own OAuth app: set (the secret sealed), shown,
    // listed, used for an authorization, a use and a forced refresh, the
    // connection deleted (revocation with it), the app removed.
    let app_path = format!("/v1/orgs/{ORG}/oauth-apps/oidc/code");
    let app = json!({"client_id": OIDC_ORG_APP_ID, "client_secret": OIDC_ORG_APP_SECRET});
    seen_text.push(h.admin.call(Method::PUT, &app_path, Some(&app)).await.unwrap().to_string());
    seen_text.push(h.admin.call(Method::GET, &app_path, None).await.unwrap().to_string());
    seen_text.push(h.admin.call(Method::GET, &format!("/v1/orgs/{ORG}/oauth-apps"), None).await.unwrap().to_string());
    let bad_app = json!({"client_id": OIDC_ORG_APP_ID, "client_secret": format!("{OIDC_ORG_APP_SECRET}\n")});
    let (status, v) = h.admin.send(Method::PUT, &app_path, Some(&bad_app)).await.unwrap();
    assert_eq!(status, 400, "{v}");
    seen_text.push(v.to_string());
    let (seen, _) = h.authorize("code", json!({})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    let app_conn = seen.json()["connection_id"].as_str().unwrap().to_owned();
    let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&app_conn), None).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["client_id"], OIDC_ORG_APP_ID);
    oidc.post("/test/revoke-access").await;
    let (status, _, _) = proxy_request(h.running.proxy_addr, "GET", &resource, Some(&app_conn), None).await;
    assert_eq!(status, 200, "refreshed with the organization's app");
    seen_text
        .push(h.admin.call(Method::DELETE, &format!("/v1/connections/{app_conn}"), None).await.unwrap().to_string());
    let (status, _) = h.admin.send(Method::DELETE, &app_path, None).await.unwrap();
    assert_eq!(status, 204);
    // An OpenAPI import (dry run) through the admin API, of a document with
    // an OAuth2 scheme: the file names environment variables, never a value.
    let doc = "openapi: 3.1.0\ninfo: {title: Scan, version: '1'}\nservers: [{url: 'https://api.scan.example'}]\n\
               components:\n  securitySchemes:\n    o: {type: oauth2, flows: {clientCredentials: {tokenUrl: 'https://api.scan.example/token', scopes: {}}}}\n";
    let imported = curl(
        &[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {ADMIN_TOKEN}"),
            "--data-binary",
            doc,
            &format!("{}/v1/integrations/import-openapi", h.admin_url()),
        ],
        &[],
    )
    .await;
    assert_eq!(imported.status, 200, "{}", imported.text());
    assert!(imported.text().contains("SCAN_O_CLIENT_SECRET"), "{}", imported.text());
    seen_text.push(imported.text());

    let oauth_secrets = oidc.get_json("/test/secrets").await;
    let mut dynamic: Vec<String> =
        vec![OIDC_BASIC_SECRET.to_owned(), OIDC_POST_SECRET.to_owned(), OIDC_ORG_APP_SECRET.to_owned()];
    dynamic.push(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{OIDC_ORG_APP_ID}:{OIDC_ORG_APP_SECRET}"),
    ));
    // The run token, its MAC, and the Basic field that carried it.
    dynamic.push(run_token.clone());
    dynamic.push(run_token.rsplit_once('.').unwrap().1.to_owned());
    dynamic.push(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{}:{run_token}", ids[0])));
    for kind in ["access", "refresh", "clientCredentials", "codes", "verifiers"] {
        let list = oauth_secrets[kind].as_array().unwrap_or_else(|| panic!("{kind}: {oauth_secrets}"));
        assert!(!list.is_empty(), "the OAuth2 flow must have produced {kind}");
        dynamic.extend(list.iter().map(|v| v.as_str().unwrap().to_owned()));
    }

    // Admin reads.
    seen_text
        .push(h.admin.call(Method::GET, &format!("/v1/connections?org_id={ORG}"), None).await.unwrap().to_string());
    for id in &ids {
        seen_text.push(h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap().to_string());
        seen_text.push(h.admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap().to_string());
    }
    // The outbox: every event written above, through the feed.
    let events = h.admin.call(Method::GET, "/v1/events?limit=1000", None).await.unwrap();
    assert!(events["events"].as_array().unwrap().len() >= 10, "the actions above made events: {events}");
    seen_text.push(events.to_string());
    // Debug of what the resolver holds.
    let logs = capture.text();
    assert!(
        logs.contains("connection created") && logs.contains("credproxy::access"),
        "capture is not working:\n{logs}"
    );
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "TRACE/DEBUG lines expected");
    // The audit trail: every use and admin action above, no secret in it
    // (nor an admin token).
    let audit = h.audit_text();
    for kind in [
        "\"credential_use\"",
        "\"connection.create\"",
        "\"run_token.mint\"",
        "\"connection.authorized\"",
        "\"oauth_app.put\"",
        "\"oauth_app.delete\"",
    ] {
        assert!(audit.contains(kind), "the audit trail lacks {kind}:\n{audit}");
    }
    for s in dynamic.iter().map(String::as_str).chain(SECRETS.iter().copied()).chain([ADMIN_TOKEN, ORG_TOKEN]) {
        assert!(!audit.contains(s), "secret {s} found in the audit trail");
    }
    for s in &dynamic {
        assert!(!logs.contains(s.as_str()), "OAuth2 secret found in logs");
        for (i, text) in seen_text.iter().enumerate() {
            assert!(!text.contains(s.as_str()), "OAuth2 secret found in response #{i}: {text}");
        }
    }
    for s in SECRETS {
        assert!(!logs.contains(s), "secret {s} found in logs");
        for (i, text) in seen_text.iter().enumerate() {
            assert!(!text.contains(s), "secret {s} found in response #{i}: {text}");
        }
    }
    // Base64 forms (Basic) are secrets too.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode("SEEDED-basic-user:SEEDED-basic-pw-51d2");
    assert!(!logs.contains(&b64));
}

/// Configuration and integration-file errors name the file, the key, the
/// expected type and the reason — never a value, which after `${VAR}`
/// substitution may be a secret. Each case runs the real binary (`serve`
/// and `check-config`) and scans what it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_never_print_a_value() {
    const SEED: &str = "SEEDED-config-secret-5e1d";
    let dir = tempfile::tempdir().unwrap();
    let ints = dir.path().join("ints");
    std::fs::create_dir(&ints).unwrap();
    let base = format!("[proxy]\norg_id = \"org_a\"\n[integrations]\ndir = \"{}\"\n", ints.display());
    let good_int =
        "id = \"x\"\nname = \"X\"\nallowed_hosts = [\"x.test\"]\n[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n";
    let oauth = |field: &str| {
        format!(
            "id = \"o\"\nname = \"O\"\nallowed_hosts = [\"o.test\"]\n[[auth_methods]]\nid = \"c\"\ntype = \"oauth2\"\n\
             [auth_methods.oauth2]\ngrant = \"client_credentials\"\ntoken_url = \"https://o.test/token\"\nclient_id = \"id\"\n{field}\n"
        )
    };
    // (config text, integration file, extra environment): each is an error.
    type Case<'a> = (String, String, Vec<(&'a str, String)>);
    let cases: Vec<Case> = vec![
        // The example: a token where a table is expected, from ${VAR}.
        (format!("{base}[admin]\ntokens = [\"${{SEED_VAR}}\"]\n"), good_int.into(), vec![("SEED_VAR", SEED.into())]),
        (format!("{base}[admin]\ntokens = [\"{SEED}\"]\n"), good_int.into(), vec![]),
        (format!("{base}[[admin.tokens]]\ntoken = [\"{SEED}\"]\n"), good_int.into(), vec![]),
        (format!("{base}[[admin.tokens]]\ntoken = {{ v = \"{SEED}\" }}\n"), good_int.into(), vec![]),
        (format!("{base}[crypto]\nprovider = \"{SEED}\"\n"), good_int.into(), vec![]),
        (format!("{base}[proxy2]\nx = \"{SEED}\"\n"), good_int.into(), vec![]),
        (format!("{base}[store]\npool_size = \"{SEED}\"\n"), good_int.into(), vec![]),
        (format!("{base}[egress]\nallow_cidrs = [\"{SEED}\"]\n"), good_int.into(), vec![]),
        (format!("{base}[proxy.listen]\nx = \"{SEED}\"\n"), good_int.into(), vec![]),
        (base.clone(), good_int.into(), vec![("CREDPROXY_ADMIN__TOKENS", SEED.into())]),
        (base.clone(), good_int.into(), vec![("CREDPROXY_PROXY__MAX_CONNECTIONS", SEED.into())]),
        (base.clone(), oauth(&format!("client_secret = [\"{SEED}\"]")), vec![]),
        (base.clone(), oauth(&format!("client_secret = \"s\"\nclient_auth = \"{SEED}\"")), vec![]),
        (base.clone(), oauth(&format!("client_secret = \"s\"\nrevocation_url = \"{SEED} not a url\"")), vec![]),
        (
            base.clone(),
            format!("id = \"x\"\nname = \"X\"\nallowed_hosts = \"{SEED}\"\n[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n"),
            vec![],
        ),
        (
            base.clone(),
            format!("id = \"x\"\nname = \"X\"\nallowed_hosts = [\"x.test\"]\n[[auth_methods]]\nid = \"k\"\ntype = \"api_key\"\nin = \"header\"\nname = \"Bad Name {SEED}\"\n"),
            vec![],
        ),
        (
            base.clone(),
            format!("id = \"x\"\nname = \"X\"\nallowed_hosts = [\"x.test\"]\n[[auth_methods]]\nid = \"k\"\ntype = \"custom\"\nfields = [\"a\"]\n[[auth_methods.placements]]\nin = \"header\"\nname = \"X-A\"\ntemplate = \"{SEED} {{b}}\"\n"),
            vec![],
        ),
        (
            base.clone(),
            format!("id = \"x\"\nname = \"X\"\nallowed_hosts = [\"{SEED}/path\"]\n[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n"),
            vec![],
        ),
    ];
    let path = dir.path().join("credproxy.toml");
    for (i, (config, integration, env)) in cases.iter().enumerate() {
        std::fs::write(&path, config).unwrap();
        std::fs::write(ints.join("i.toml"), integration).unwrap();
        for command in ["check-config", "serve"] {
            let mut cmd = tokio::process::Command::new(credproxy_bin());
            cmd.args([command, "--config"]).arg(&path).current_dir(dir.path());
            cmd.env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = tokio::time::timeout(std::time::Duration::from_secs(10), cmd.output())
                .await
                .expect("a configuration error ends the process")
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(64), "case {i} ({command}): {stderr}");
            assert!(stderr.contains("configuration error"), "case {i} ({command}): {stderr}");
            assert!(
                !stderr.contains("SEEDED") && !stdout.contains("SEEDED"),
                "case {i} ({command}) printed a value: {stderr}"
            );
        }
    }
}
