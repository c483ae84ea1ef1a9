//! OAuth2 connections against a real OAuth2 server: npm oidc-provider v9
//! (PKCE required, refresh-token rotation, revocation, 5 s access tokens),
//! one per test. Its `/resource` route is the protected upstream.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

async fn harness(oidc: &Oidc) -> Harness {
    Harness::start_with(Opts { integrations: vec![oidc.integration()], ..Default::default() }).await
}

/// Authorizes a connection through the full flow and returns its id.
async fn authorized(h: &Harness, method: &str) -> String {
    let (seen, final_url) = h.authorize(method, json!({})).await;
    assert_eq!(seen.status, 201, "callback at {final_url}: {}", seen.text());
    assert!(final_url.contains("/oauth2/callback?code="), "{final_url}");
    seen.json()["connection_id"].as_str().unwrap().to_owned()
}

async fn get_resource(h: &Harness, oidc: &Oidc, id: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    proxy_request(h.running.proxy_addr, "GET", &format!("{}/resource", oidc.url), Some(id), None).await
}

async fn connection_count(h: &Harness) -> usize {
    let v = h.admin.call(Method::GET, &format!("/v1/connections?org_id={ORG}"), None).await.unwrap();
    v["connections"].as_array().unwrap().len()
}

/// RFC 7662 introspection at the provider, as the client.
async fn introspect(oidc: &Oidc, token: &str) -> bool {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-u", &format!("cp-basic:{OIDC_BASIC_SECRET}"), "-d", &format!("token={token}")])
        .arg(format!("{}/token/introspection", oidc.url))
        .output()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["active"].as_bool().unwrap_or_else(|| panic!("introspection answered {v}"))
}

async fn wait_for_expiry() {
    // Access tokens live 5 s; the test integration refreshes 1 s before expiry.
    tokio::time::sleep(Duration::from_millis(5200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_flow_end_to_end() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    for method in ["code", "code_post"] {
        let id = authorized(&h, method).await;
        let (status, _, body) = get_resource(&h, &oidc, &id).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["account"], "test-user");
        let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
        assert_eq!((meta["state"].as_str(), meta["auth_method"].as_str()), (Some("active"), Some(method)));
    }
    assert_eq!(oidc.count("authorization_code").await, 2);

    // With return_to, the callback redirects there with the connection id
    // (httpbin's /anything stands in for the platform's page and echoes it).
    let (seen, final_url) = h.authorize("code", json!({"return_to": format!("{}/anything/done", httpbin())})).await;
    assert_eq!(seen.status, 200, "{final_url}: {}", seen.text());
    let cid = seen.json()["args"]["connection_id"].as_str().unwrap().to_owned();
    assert!(cid.starts_with("conn_"), "{cid}");
    assert_eq!(get_resource(&h, &oidc, &cid).await.0, 200);

    // The authorization URL carries PKCE S256 and a state; the verifier never leaves credproxy.
    let v = h
        .admin
        .call(
            Method::POST,
            "/v1/oauth2/authorize",
            Some(&json!({"integration": "oidc", "auth_method": "code", "org_id": ORG, "user_id": "u"})),
        )
        .await
        .unwrap();
    let url = v["authorization_url"].as_str().unwrap();
    assert!(
        url.contains("code_challenge_method=S256") && url.contains("code_challenge=") && url.contains("state="),
        "{url}"
    );
    assert!(!url.contains("code_verifier"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_state_and_provider_errors_create_nothing() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    assert_eq!(connection_count(&h).await, 1);
    let callback = format!("{}/oauth2/callback", h.public_url());

    // Replay the exact callback the browser used: the state is single-use.
    let (seen, final_url) = h.authorize("code", json!({})).await;
    assert_eq!(seen.status, 201);
    let replay = curl(&[&final_url], &[]).await;
    assert_eq!(replay.status, 400, "{}", replay.text());
    assert_eq!(replay.json()["code"], "invalid_state");
    assert_eq!(connection_count(&h).await, 2);

    // A state that was never issued.
    let seen = curl(&[&format!("{callback}?code=abc&state=never-issued")], &[]).await;
    assert_eq!((seen.status, seen.json()["code"].as_str()), (400, Some("invalid_state")));

    // The provider says the user refused: a clear 400, and the state is spent.
    let v = h
        .admin
        .call(
            Method::POST,
            "/v1/oauth2/authorize",
            Some(&json!({"integration": "oidc", "auth_method": "code", "org_id": ORG, "user_id": "u"})),
        )
        .await
        .unwrap();
    let url = v["authorization_url"].as_str().unwrap();
    let state = url.split("state=").nth(1).unwrap().split('&').next().unwrap();
    let denied = curl(&[&format!("{callback}?error=access_denied&state={state}")], &[]).await;
    assert_eq!(denied.status, 400, "{}", denied.text());
    assert_eq!(denied.json()["code"], "authorization_denied");
    assert!(denied.json()["detail"].as_str().unwrap().contains("access_denied"));
    let again = curl(&[&format!("{callback}?code=x&state={state}")], &[]).await;
    assert_eq!(again.json()["code"], "invalid_state");
    assert_eq!(connection_count(&h).await, 2, "nothing may be created");
    let _ = id;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_storm_makes_exactly_one_refresh() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    wait_for_expiry().await;
    let before = oidc.count("refresh_token").await;
    let proxy = h.running.proxy_addr;
    let url = format!("{}/resource", oidc.url);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (url, id) = (url.clone(), id.clone());
        tasks.push(tokio::spawn(async move { proxy_request(proxy, "GET", &url, Some(&id), None).await }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        ok += 1;
    }
    assert_eq!(ok, 200);
    // With rotation, a second refresh with the old token would revoke the grant.
    assert_eq!(oidc.count("refresh_token").await - before, 1, "exactly one refresh grant at the provider");
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200, "the rotated refresh token was kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_401_refreshes_once_and_retries_replayable_requests() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);

    // The provider forgets the access token while it is still within its lifetime.
    oidc.post("/test/revoke-access").await;
    let before = oidc.count("refresh_token").await;
    let (status, headers, _) = get_resource(&h, &oidc, &id).await;
    assert_eq!(status, 200, "a GET is replayable: refresh and retry");
    assert!(headers.iter().all(|(k, _)| k != "proxy-status"));
    assert_eq!(oidc.count("refresh_token").await - before, 1);

    // A small POST with a known length is replayed too.
    oidc.post("/test/revoke-access").await;
    let (status, _, _) =
        proxy_request(h.running.proxy_addr, "POST", &format!("{}/resource", oidc.url), Some(&id), Some(b"{\"a\":1}"))
            .await;
    assert_eq!(status, 200);

    // A streamed (chunked) body is not retried: the upstream's 401 comes back as is.
    oidc.post("/test/revoke-access").await;
    let file = h.dir.path().join("body.txt");
    std::fs::write(&file, "streamed body").unwrap();
    let hdr = format!("X-Connection-Id: {id}");
    let proxy = h.proxy_url();
    let seen = curl(
        &[
            "-x",
            &proxy,
            "-X",
            "POST",
            "-H",
            &hdr,
            "-H",
            "Transfer-Encoding: chunked",
            "-T",
            &file.display().to_string(),
            &format!("{}/resource", oidc.url),
        ],
        &[],
    )
    .await;
    assert_eq!(seen.status, 401, "{}", seen.text());
    assert_eq!(seen.header("proxy-status"), None, "relayed from upstream, not made by the proxy");
    assert_eq!(seen.json()["error"], "invalid_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_marks_the_connection_needs_reauth() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    let (r, _) = h.running.connections.resolve(ORG, &id).await.unwrap();
    let tokens = r.tokens.clone().unwrap();
    let secrets =
        [tokens.access_token.clone().unwrap(), tokens.refresh_token.clone().unwrap()].map(|s| s.expose().to_owned());
    oidc.post("/test/revoke-refresh").await;
    wait_for_expiry().await;
    for _ in 0..2 {
        let (status, headers, body) = get_resource(&h, &oidc, &id).await;
        assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "connection_needs_reauth");
        assert!(headers.iter().any(|(k, v)| k == "proxy-status" && v.contains("connection_needs_reauth")));
    }
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(meta["state"], "needs_reauth");
    let text = meta.to_string();
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "token value in the admin response: {text}");
    }
    assert_eq!(meta["credential_fields"], json!(["access_token"]));

    // A user re-authorizes the same connection: its tokens are replaced and it works again.
    let (seen, _) = h.authorize("code", json!({"connection_id": id})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    assert_eq!(seen.json()["connection_id"], id.as_str(), "the same connection, not a new one");
    let (status, _, body) = get_resource(&h, &oidc, &id).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(meta["state"], "active");
    assert_eq!(connection_count(&h).await, 1);
    // Re-authorizing with another method's connection is refused before any redirect.
    let body =
        json!({"integration": "oidc", "auth_method": "code_post", "org_id": ORG, "user_id": "u", "connection_id": id});
    let (s, v) = h.admin.send(Method::POST, "/v1/oauth2/authorize", Some(&body)).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("connection_mismatch")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_token_is_fetched_once_reused_then_refreshed_once() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let body =
        json!({"integration": "oidc", "auth_method": "machine", "org_id": ORG, "user_id": "svc", "credentials": {}});
    let (s, v) = h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(oidc.count("client_credentials").await, 0, "fetched on first use, not at creation");
    for _ in 0..5 {
        let (status, _, body) = get_resource(&h, &oidc, &id).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(oidc.count("client_credentials").await, 1);
    wait_for_expiry().await;
    for _ in 0..5 {
        assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    }
    assert_eq!(oidc.count("client_credentials").await, 2);

    // Authorization-code methods cannot be created with a plain POST.
    let body = json!({"integration": "oidc", "auth_method": "code", "org_id": ORG, "user_id": "u", "credentials": {}});
    let (s, v) = h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("use_oauth2_authorize")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_revokes_tokens_at_the_provider() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    let active = oidc.get_json("/test/active").await;
    assert_eq!((active["access"].as_u64(), active["refresh"].as_u64()), (Some(1), Some(1)), "{active}");
    let issued = oidc.get_json("/test/secrets").await;
    let tokens: Vec<String> = ["access", "refresh"]
        .iter()
        .flat_map(|k| issued[*k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(tokens.len(), 2);
    for t in &tokens {
        assert!(introspect(&oidc, t).await, "active before delete");
    }
    let del = h.admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(del["provider_revocation"], "revoked", "{del}");
    for t in &tokens {
        assert!(!introspect(&oidc, t).await, "introspection must report revoked tokens inactive");
    }
    let active = oidc.get_json("/test/active").await;
    assert_eq!((active["access"].as_u64(), active["refresh"].as_u64()), (Some(0), Some(0)), "{active}");
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_outage_is_a_502_and_changes_nothing() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    wait_for_expiry().await;
    oidc.post("/test/token-fail?status=503").await;
    let (status, headers, body) = get_resource(&h, &oidc, &id).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "token_endpoint_unavailable");
    assert!(headers.iter().any(|(k, _)| k == "proxy-status"));
    assert!(headers.iter().any(|(k, v)| k == "retry-after" && v == "5"), "the first 502 says when: {headers:?}");
    // No tight retry loop: within the cool-down the endpoint is not called again.
    let before = oidc.count("refresh_token").await;
    let (status, headers, _) = get_resource(&h, &oidc, &id).await;
    assert_eq!(status, 502);
    assert!(headers.iter().any(|(k, _)| k == "retry-after"));
    oidc.post("/test/token-fail?status=0").await;
    assert_eq!(oidc.count("refresh_token").await, before);
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(meta["state"], "active", "a transient failure leaves the state alone");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200, "recovers after the cool-down");

    // Client credentials: the first fetch is not a "refresh", and a 200
    // without an access token is a refusal, not an outage.
    let machine =
        json!({"integration": "oidc", "auth_method": "machine", "org_id": ORG, "user_id": "svc", "credentials": {}});
    let mid =
        h.admin.call(Method::POST, "/v1/connections", Some(&machine)).await.unwrap()["id"].as_str().unwrap().to_owned();
    oidc.post("/test/token-fail?status=503").await;
    let (status, headers, body) = get_resource(&h, &oidc, &mid).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, v["code"].as_str()), (502, Some("token_endpoint_unavailable")), "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("did not issue") && !detail.contains("refresh"), "{detail}");
    assert!(headers.iter().any(|(k, _)| k == "retry-after"), "{headers:?}");
    let mid2 =
        h.admin.call(Method::POST, "/v1/connections", Some(&machine)).await.unwrap()["id"].as_str().unwrap().to_owned();
    oidc.post("/test/token-fail?status=200").await;
    let (status, _, body) = get_resource(&h, &oidc, &mid2).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, v["code"].as_str()), (502, Some("token_endpoint_rejected")), "{v}");
    assert!(v["detail"].as_str().unwrap().contains("without an access token"), "{v}");
    oidc.post("/test/token-fail?status=0").await;
}

/// Fault injection at the token endpoint (issue 19): an HTML page or
/// truncated JSON with a 200, and an endpoint that never answers, are each
/// a bounded 502 `token_endpoint_unavailable` with `Retry-After` (the hang
/// cut at `oauth2.token_timeout_ms`), leave the connection active, and
/// recover without a restart once the endpoint behaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_hangs_or_answers_garbage_gives_bounded_502s_and_recovers() {
    let oidc = Oidc::start().await;
    let h = Harness::start_with(Opts {
        integrations: vec![oidc.integration()],
        sections: "[oauth2]\ntoken_timeout_ms = 1000\n".into(),
        ..Default::default()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(authorized(&h, "code").await);
    }
    wait_for_expiry().await;
    for (id, fault) in ids.iter().zip([
        "/test/token-fail?status=200&body=html",
        "/test/token-fail?status=200&body=garbage",
        "/test/token-delay?ms=20000",
    ]) {
        oidc.post(fault).await;
        let started = std::time::Instant::now();
        let (status, headers, body) = get_resource(&h, &oidc, id).await;
        let took = started.elapsed();
        oidc.post("/test/token-fail?status=0").await;
        oidc.post("/test/token-delay?ms=0").await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, v["code"].as_str()), (502, Some("token_endpoint_unavailable")), "{fault}: {v}");
        assert!(headers.iter().any(|(k, _)| k == "retry-after"), "{fault}: {headers:?}");
        assert!(took < Duration::from_secs(4), "{fault}: answered after {took:?}");
        let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
        assert_eq!(meta["state"], "active", "{fault}: a transient failure leaves the state alone");
    }
    // After the 5 s cool-down each refreshes and serves again.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    for id in &ids {
        let (status, _, body) = get_resource(&h, &oidc, id).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_test_endpoint_and_cli() {
    let oidc = Oidc::start().await;
    let hb = httpbin();
    let httpbin_tests = format!(
        r#"
id = "httpbin_checked"
name = "httpbin with a test request"
allowed_hosts = ["127.0.0.1"]
upstream_scheme = "http"
base_url = "{hb}"
[[auth_methods]]
id = "bearer"
type = "bearer"
[test]
path = "/bearer"
"#
    );
    let broken = format!(
        r#"
id = "httpbin_teapot"
name = "httpbin answering 418"
allowed_hosts = ["127.0.0.1"]
upstream_scheme = "http"
base_url = "{hb}"
[[auth_methods]]
id = "bearer"
type = "bearer"
[test]
path = "/status/418"
expect_status = 200
"#
    );
    let h = Harness::start_with(Opts {
        integrations: vec![oidc.integration(), ("checked.toml".into(), httpbin_tests), ("teapot.toml".into(), broken)],
        ..Default::default()
    })
    .await;

    // OAuth2: live connection.
    let id = authorized(&h, "code").await;
    let v = h.admin.call(Method::POST, &format!("/v1/connections/{id}/test"), None).await.unwrap();
    assert_eq!((v["ok"].as_bool(), v["status"].as_u64()), (Some(true), Some(200)), "{v}");
    assert!(v["latency_ms"].is_u64());

    // Static bearer, through the CLI.
    let create = |integration: &str| json!({"integration": integration, "auth_method": "bearer", "org_id": ORG, "user_id": "u", "credentials": {"token": "t-123"}});
    let ok_id = h.admin.call(Method::POST, "/v1/connections", Some(&create("httpbin_checked"))).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = admin_cli(&h, &["connections", "test", &ok_id]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(out.status.code(), Some(0));

    // Not ok, with the upstream's status.
    let bad_id = h.admin.call(Method::POST, "/v1/connections", Some(&create("httpbin_teapot"))).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = h.admin.call(Method::POST, &format!("/v1/connections/{bad_id}/test"), None).await.unwrap();
    assert_eq!((v["ok"].as_bool(), v["status"].as_u64()), (Some(false), Some(418)), "{v}");
    assert_eq!(v["error"]["code"], "unexpected_status");
    // The CLI says so in its exit code too.
    let out = admin_cli(&h, &["connections", "test", &bad_id]).await;
    assert_eq!(out.status.code(), Some(1), "a failed test exits 1");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected status 200, got 418"));

    // A dead grant: not ok, with the proxy's error code.
    oidc.post("/test/revoke-refresh").await;
    oidc.post("/test/revoke-access").await;
    let v = h.admin.call(Method::POST, &format!("/v1/connections/{id}/test"), None).await.unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["code"], "connection_needs_reauth", "{v}");

    // An OAuth2 test that fails (dead grant) exits 1 as well.
    let out = admin_cli(&h, &["connections", "test", &id]).await;
    assert_eq!(out.status.code(), Some(1));

    // The CLI prints the authorization URL, as JSON like its other answers.
    let out = admin_cli(
        &h,
        &["connections", "authorize", "--integration", "oidc", "--auth-method", "code", "--org", ORG, "--user", "u9"],
    )
    .await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = v["authorization_url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/auth?", oidc.url)) && url.contains("code_challenge="), "{url}");
    assert!(v["expires_at"].is_string(), "{v}");
}

/// `credproxy <args>` against the harness's admin API.
async fn admin_cli(h: &Harness, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(credproxy_bin())
        .args(args)
        .env("CREDPROXY_ADMIN_URL", h.admin_url())
        .env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_calls_obey_the_ssrf_guard() {
    let oidc = Oidc::start().await;
    // No loopback exception: the provider on 127.0.0.1 is off limits.
    let h = Harness::start_with(Opts {
        allow_loopback: false,
        integrations: vec![oidc.integration()],
        ..Default::default()
    })
    .await;
    let body =
        json!({"integration": "oidc", "auth_method": "machine", "org_id": ORG, "user_id": "svc", "credentials": {}});
    let v = h.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    let id = v["id"].as_str().unwrap();
    let (status, _, body) = get_resource(&h, &oidc, id).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "token_endpoint_unavailable");
    assert_eq!(oidc.count("client_credentials").await, 0, "no request may reach a prohibited token endpoint");
}

/// The events feed (`GET /v1/events`): a grant revoked at the provider
/// makes exactly one `connection.needs_reauth` however many requests fail;
/// re-authorizing makes `connection.reauthorized`; deleting makes
/// `connection.deleted` with the provider revocation's result. An
/// org-scoped token sees its organization's only, pages follow `next`, and
/// no event carries a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_are_in_the_feed() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    oidc.post("/test/revoke-refresh").await;
    oidc.post("/test/revoke-access").await;
    for _ in 0..3 {
        assert_eq!(get_resource(&h, &oidc, &id).await.0, 409);
    }
    // A connection test now fails: connection.test_failed with its code.
    let v = h.admin.call(Method::POST, &format!("/v1/connections/{id}/test"), None).await.unwrap();
    assert_eq!(v["ok"], false, "{v}");
    let (seen, _) = h.authorize("code", json!({"connection_id": id})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    let other = h.create_in("org_other", "bearer", &[("token", "events-bearer-0001")]).await;
    let v = h.admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(v["provider_revocation"], "revoked");

    let feed = h.admin.call(Method::GET, "/v1/events", None).await.unwrap();
    let events = feed["events"].as_array().unwrap();
    let mine: Vec<&Value> = events.iter().filter(|e| e["data"]["connection_id"] == id.as_str()).collect();
    let kinds: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "connection.created",
            "connection.needs_reauth",
            "connection.test_failed",
            "connection.reauthorized",
            "connection.deleted"
        ],
        "{feed}"
    );
    assert_eq!(mine[1]["data"]["state"], "needs_reauth");
    assert_eq!(mine[1]["data"]["code"], "connection_needs_reauth");
    assert_eq!(mine[2]["data"]["code"], "connection_needs_reauth", "the failed test's code");
    assert_eq!(mine[3]["data"]["state"], "active");
    assert_eq!(mine[4]["data"]["provider_revocation"], "revoked");
    for e in &mine {
        assert!(e["id"].as_str().unwrap().starts_with("evt_"), "{e}");
        assert_eq!((e["data"]["org_id"].as_str(), e["data"]["integration"].as_str()), (Some(ORG), Some("oidc")));
    }
    assert_eq!(feed["next"], events.last().unwrap()["seq"]);
    let empty = h.admin.call(Method::GET, &format!("/v1/events?after={}", feed["next"]), None).await.unwrap();
    assert_eq!((empty["events"].as_array().unwrap().len(), &empty["next"]), (0, &feed["next"]));
    let page = h.admin.call(Method::GET, "/v1/events?limit=1", None).await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["events"][0]["id"], events[0]["id"]);

    // An org-scoped token: its organization's events only.
    let scoped = credproxy::admin_client::AdminClient::new(&h.admin_url(), ORG_TOKEN.into()).unwrap();
    let (_, v) = scoped.send(Method::GET, "/v1/events", None).await.unwrap();
    let orgs: Vec<&str> =
        v["events"].as_array().unwrap().iter().map(|e| e["data"]["org_id"].as_str().unwrap()).collect();
    assert!(!orgs.is_empty() && orgs.iter().all(|o| *o == ORG), "{v}");
    let global = events.iter().any(|e| e["data"]["connection_id"] == other.as_str());
    assert!(global, "a global token sees every organization's");
    let (status, _) = scoped.send(Method::GET, "/v1/events?org_id=org_other", None).await.unwrap();
    assert_eq!(status.as_u16(), 403);

    // No token value in any event.
    let text = feed.to_string();
    let seen = oidc.get_json("/test/secrets").await;
    for k in ["access", "refresh", "codes", "verifiers"] {
        for s in seen[k].as_array().unwrap() {
            assert!(!text.contains(s.as_str().unwrap()), "a {k} value in the events feed");
        }
    }
    assert!(!text.contains("events-bearer-0001"));
}

/// A token endpoint that fails for a while: one `connection.refresh_failed`
/// for the whole streak (however many refreshes fail), then one
/// `connection.recovered` at the first success; `last_refreshed_at` moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_endpoint_makes_one_failure_event_and_one_recovery() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let id = authorized(&h, "code").await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(meta["last_refreshed_at"], Value::Null, "never refreshed yet");
    oidc.post("/test/token-fail?status=503").await;
    wait_for_expiry().await;
    for round in 0..2 {
        let (status, _, body) = get_resource(&h, &oidc, &id).await;
        assert_eq!(status, 502, "round {round}: {}", String::from_utf8_lossy(&body));
        // Past the cool-down: the next request tries the endpoint again.
        tokio::time::sleep(credproxy::creds::REFRESH_COOLDOWN + Duration::from_millis(200)).await;
    }
    oidc.post("/test/token-fail?status=0").await;
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200, "refreshed");
    let meta = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert!(meta["last_refreshed_at"].is_string(), "{meta}");
    assert_eq!(meta["state"], "active");

    let feed = h.admin.call(Method::GET, "/v1/events", None).await.unwrap();
    let kinds: Vec<&str> = feed["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["connection.created", "connection.refresh_failed", "connection.recovered"], "{feed}");
    assert_eq!(feed["events"][1]["data"]["code"], "token_endpoint_unavailable");
}

/// A grant obtained outside credproxy (the authorization-code flow with
/// PKCE, run by Python requests against oidc-provider as another platform
/// would have), imported with `POST /v1/connections`: its access token is
/// used as it is, then refreshed once when it is due. Nothing of it shows
/// in the admin API's answers or the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_token_set_is_used_then_refreshed_once() {
    let oidc = Oidc::start().await;
    let logs = support::logs::trace_capture();
    let h = harness(&oidc).await;
    let script = r#"
import base64, hashlib, json, os, secrets, urllib.parse, requests
issuer, redirect = os.environ["ISSUER"], "http://127.0.0.1/oauth2/callback"
verifier = secrets.token_urlsafe(48)
challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
s = requests.Session()
s.trust_env = False
url = issuer + "/auth?" + urllib.parse.urlencode({"client_id": "cp-basic", "response_type": "code",
    "redirect_uri": redirect, "scope": "openid offline_access api:read", "state": "s1", "prompt": "consent",
    "code_challenge": challenge, "code_challenge_method": "S256"})
for _ in range(10):
    r = s.get(url, allow_redirects=False)
    url = urllib.parse.urljoin(url, r.headers["location"])
    if url.startswith(redirect):
        break
code = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["code"][0]
t = s.post(issuer + "/token", auth=("cp-basic", os.environ["SECRET"]), data={"grant_type": "authorization_code",
    "code": code, "redirect_uri": redirect, "code_verifier": verifier}).json()
print(json.dumps({"status": 200, "headers": {}, "body": json.dumps(t)}))
"#;
    let tokens = python_client(script, &[("ISSUER", &oidc.url), ("SECRET", OIDC_BASIC_SECRET)]).await.json();
    let (access, refresh) = (tokens["access_token"].as_str().unwrap(), tokens["refresh_token"].as_str().unwrap());
    assert_eq!(oidc.count("authorization_code").await, 1);

    // Bad imports are refused naming the field, and nothing is stored.
    for (creds, field) in [
        (json!({"scope": "api:read"}), "credentials.access_token"),
        (json!({"access_token": access, "expires_in": 5, "expires_at": 1}), "credentials.expires_in"),
        (json!({"access_token": access, "expires_in": "soon"}), "credentials.expires_in"),
        (json!({"access_token": access, "id_token": "x"}), "credentials.id_token"),
    ] {
        let body = json!({"integration": "oidc", "auth_method": "code", "org_id": ORG, "user_id": "migrated", "credentials": creds});
        let (s, v) = h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
        assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_credentials")), "{v}");
        assert!(v["detail"].as_str().unwrap().starts_with(field), "{v}");
        assert!(!v.to_string().contains(access), "the token came back: {v}");
    }
    // Without any token it is still the authorization flow's.
    let body =
        json!({"integration": "oidc", "auth_method": "code", "org_id": ORG, "user_id": "migrated", "credentials": {}});
    let (s, v) = h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("use_oauth2_authorize")), "{v}");
    assert_eq!(connection_count(&h).await, 0);

    let body = json!({"integration": "oidc", "auth_method": "code", "org_id": ORG, "user_id": "migrated",
        "credentials": {"access_token": access, "refresh_token": refresh, "expires_in": tokens["expires_in"], "scope": tokens["scope"]}});
    let (s, created) = h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert!(!created.to_string().contains(access) && !created.to_string().contains(refresh));
    let id = created["id"].as_str().unwrap().to_owned();

    // Used as imported: no token call.
    assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    assert_eq!(oidc.count("refresh_token").await, 0);
    // Due: refreshed once, however many requests come.
    wait_for_expiry().await;
    for _ in 0..5 {
        assert_eq!(get_resource(&h, &oidc, &id).await.0, 200);
    }
    assert_eq!(oidc.count("refresh_token").await, 1);
    assert!(!introspect(&oidc, refresh).await, "the imported refresh token was rotated");
    let text = logs.text();
    assert!(!text.contains(access) && !text.contains(refresh), "an imported token in the log");
}

/// Per-organization OAuth apps: org A registers its own client; its
/// authorization, code exchange, refresh and revocation go to that client
/// (the provider's records say who asked), org B's to the integration's.
/// The secret is never shown; an org token manages its own org only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organizations_own_oauth_app_serves_its_connections_only() {
    let oidc = Oidc::start().await;
    let h = harness(&oidc).await;
    let path = format!("/v1/orgs/{ORG}/oauth-apps/oidc/code");
    let body = json!({"client_id": OIDC_ORG_APP_ID, "client_secret": OIDC_ORG_APP_SECRET});
    let (s, v) = h.admin.send(Method::PUT, &path, Some(&body)).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["client_id"].as_str(), v["org_id"].as_str()), (Some(OIDC_ORG_APP_ID), Some(ORG)));
    let shown = h.admin.call(Method::GET, &path, None).await.unwrap().to_string();
    let listed = h.admin.call(Method::GET, &format!("/v1/orgs/{ORG}/oauth-apps"), None).await.unwrap().to_string();
    for text in [&v.to_string(), &shown, &listed] {
        assert!(text.contains(OIDC_ORG_APP_ID) && !text.contains(OIDC_ORG_APP_SECRET), "{text}");
    }
    // Refused: another org's token, a method that is not oauth2, an unknown one, no secret.
    let scoped = credproxy::admin_client::AdminClient::new(&h.admin_url(), ORG_TOKEN.into()).unwrap();
    let (s, v) = scoped.send(Method::PUT, "/v1/orgs/org_b/oauth-apps/oidc/code", Some(&body)).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden_org")), "{v}");
    let (s, v) =
        h.admin.send(Method::PUT, &format!("/v1/orgs/{ORG}/oauth-apps/httpbin/bearer"), Some(&body)).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{v}");
    let (s, v) = h.admin.send(Method::PUT, &format!("/v1/orgs/{ORG}/oauth-apps/oidc/nope"), Some(&body)).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("unknown_auth_method")), "{v}");
    let (s, v) = h.admin.send(Method::PUT, &path, Some(&json!({"client_id": "x"}))).await.unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = h.admin.send(Method::GET, "/v1/orgs/org_b/oauth-apps/oidc/code", None).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("oauth_app_not_found")), "{v}");

    // Org A (this proxy's org) authorizes through its own app; org B through the default.
    let a = authorized(&h, "code").await;
    let (seen, final_url) = h.authorize("code", json!({"org_id": "org_b"})).await;
    assert_eq!(seen.status, 201, "{final_url}: {}", seen.text());
    let b = seen.json()["connection_id"].as_str().unwrap().to_owned();
    for (client, n) in [(OIDC_ORG_APP_ID, 1), ("cp-basic", 1)] {
        assert_eq!(oidc.by_client(client, "authorize").await, n, "{client} authorizations");
        assert_eq!(oidc.by_client(client, "authorization_code").await, n, "{client} code exchanges");
    }
    // The provider issued A's token to A's client.
    let (status, _, body) = get_resource(&h, &oidc, &a).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["client_id"], OIDC_ORG_APP_ID);

    // Refresh when due: A's with its client, B's (through the connection test) with the default.
    wait_for_expiry().await;
    let (status, _, body) = get_resource(&h, &oidc, &a).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["client_id"], OIDC_ORG_APP_ID);
    let tested = h.admin.call(Method::POST, &format!("/v1/connections/{b}/test"), None).await.unwrap();
    assert_eq!(tested["ok"], true, "{tested}");
    assert_eq!(oidc.by_client(OIDC_ORG_APP_ID, "refresh_token").await, 1);
    assert_eq!(oidc.by_client("cp-basic", "refresh_token").await, 1);

    // Revocation at delete: A's grant revoked by A's client (the provider
    // ignores a revocation from another client).
    let (s, v) = h.admin.send(Method::DELETE, &format!("/v1/connections/{a}"), None).await.unwrap();
    assert_eq!((s, v["provider_revocation"].as_str()), (StatusCode::OK, Some("revoked")), "{v}");
    assert!(oidc.by_client(OIDC_ORG_APP_ID, "revoked").await >= 1);
    assert_eq!(oidc.by_client("cp-basic", "revoked").await, 0);

    // Removed: org A's new authorizations use the integration's client again.
    let (s, _) = h.admin.send(Method::DELETE, &path, None).await.unwrap();
    assert_eq!(s, StatusCode::NO_CONTENT);
    authorized(&h, "code").await;
    assert_eq!(oidc.by_client("cp-basic", "authorize").await, 2);
    assert_eq!(oidc.by_client(OIDC_ORG_APP_ID, "authorize").await, 1);
}
