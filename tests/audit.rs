//! The audit trail (issue 14): a known sequence of proxied calls and admin
//! actions writes exactly the expected lines — as many as expected, each
//! with exactly the expected fields — to the audit file, apart from the
//! access log. Requests that name no connection, and refused run tokens,
//! write none; a run token's id and subject are recorded, never the token.

mod support;

use std::time::{Duration, SystemTime};

use credproxy::admin_client::AdminClient;
use credproxy::secret::SecretValue;
use http::{Method, StatusCode};
use serde_json::{json, Map, Value};
use support::*;

const UNKNOWN: &str = "conn_aaaaaaaaaaaaaaaaaaaaaaaaaa";

/// `line` without its time and latency (checked here: a time within the
/// test, a number), for comparing the rest exactly.
fn stable(line: &Value, began: SystemTime) -> Value {
    let mut m: Map<String, Value> = line.as_object().cloned().unwrap_or_else(|| panic!("not an object: {line}"));
    let time = m.remove("time").and_then(|t| t.as_str().map(str::to_owned)).expect("a time");
    let at = humantime::parse_rfc3339(&time).unwrap_or_else(|e| panic!("time {time:?}: {e}"));
    assert!(at + Duration::from_secs(1) >= began && at <= SystemTime::now(), "time {time} is not within the test");
    if m["kind"] == "credential_use" {
        assert!(m.remove("latency_us").and_then(|l| l.as_u64()).is_some(), "latency_us: {line}");
    }
    Value::Object(m)
}

/// A credential use with the fields every one of these has.
fn used(fields: Value) -> Value {
    let mut v = json!({
        "kind": "credential_use", "org": ORG, "user": null, "run_token": null, "run_subject": null,
        "integration": null, "auth_method": null, "method": "GET", "host": "127.0.0.1",
        "refreshed": false, "retried": false, "code": null,
    });
    merge(&mut v, fields);
    v
}

fn admin(fields: Value) -> Value {
    let mut v = json!({
        "kind": "admin", "admin_token": ADMIN_TOKEN_NAME, "connect_session": null, "org": ORG, "user": null, "connection": null,
        "integration": null, "auth_method": null, "run_token": null, "run_subject": null, "code": null,
    });
    merge(&mut v, fields);
    v
}

fn merge(into: &mut Value, fields: Value) {
    for (k, v) in fields.as_object().unwrap() {
        into[k] = v.clone();
    }
}

fn assert_lines(h: &Harness, began: SystemTime, expected: &[Value]) {
    let lines = h.audit_lines();
    let got: Vec<Value> = lines.iter().map(|l| stable(l, began)).collect();
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g, e, "audit line {i} differs:\n got {g}\nwant {e}");
    }
    assert_eq!(got.len(), expected.len(), "audit lines:\n{}", h.audit_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_calls_and_admin_actions_write_exactly_their_lines() {
    let began = SystemTime::now();
    let h = Harness::start_with(Opts { shared: true, ..Default::default() }).await;
    let org_admin = AdminClient::new(&h.admin_url(), SecretValue::from(ORG_TOKEN)).unwrap();

    // Admin: a create, a create refused (another org's), a run token.
    let id = h.create("bearer", &[("token", "audit-bearer-value")]).await;
    let other = json!({"integration": "httpbin", "auth_method": "bearer", "org_id": "org_other", "user_id": "u",
        "credentials": {"token": "x"}});
    let (status, _) = org_admin.send(Method::POST, "/v1/connections", Some(&other)).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let minted = h
        .admin
        .call(
            Method::POST,
            "/v1/run-tokens",
            Some(&json!({"org_id": ORG, "user_id": "user_7", "connection_ids": [id]})),
        )
        .await
        .unwrap();
    let (token, jti) = (minted["token"].as_str().unwrap(), minted["id"].as_str().unwrap());

    // Proxied: a use through the proxy URL's user name (the query is not
    // recorded), a connection outside the token (404).
    let addr = h.running.proxy_addr;
    let proxy = format!("http://{id}:{token}@{addr}");
    let seen = curl(&["-x", &proxy, &format!("{}/anything/audited?api_key=not-recorded", httpbin())], &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    let hdr = format!("X-Connection-Id: {UNKNOWN}");
    let seen = curl(&["-x", &proxy, "-H", &hdr, &format!("{}/get", httpbin())], &[]).await;
    assert_eq!(seen.status, 404, "{}", seen.text());
    // No line: no connection named (pass-through), no run token (407), a read.
    let seen = curl(&["-x", &format!("http://run:{token}@{addr}"), &format!("{}/get", httpbin())], &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    let seen = curl(&["-x", &h.proxy_url(), "-H", &format!("X-Connection-Id: {id}"), &httpbin()], &[]).await;
    assert_eq!(seen.status, 407, "{}", seen.text());
    org_admin.call(Method::GET, "/v1/connections", None).await.unwrap();

    // Admin: a delete by the org's (unnamed) token, a delete of what is gone.
    org_admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    let (status, _) = h.admin.send(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let conn = json!({"connection": id, "user": "user_1", "integration": "httpbin", "auth_method": "bearer"});
    let mut created = admin(json!({"action": "connection.create", "status": 201}));
    merge(&mut created, conn.clone());
    let mut deleted = admin(json!({"action": "connection.delete", "status": 200, "admin_token": "admin.tokens[1]"}));
    merge(&mut deleted, conn.clone());
    let run = json!({"run_token": jti, "run_subject": "user_7"});
    let mut first_use = used(json!({"connection": id, "path": "/anything/audited", "status": 200}));
    merge(&mut first_use, conn.clone());
    merge(&mut first_use, run.clone());
    let mut refused_use =
        used(json!({"connection": UNKNOWN, "path": "/get", "status": 404, "code": "connection_not_found"}));
    merge(&mut refused_use, run.clone());
    let mut mint = admin(json!({"action": "run_token.mint", "status": 201}));
    merge(&mut mint, run);
    assert_lines(
        &h,
        began,
        &[
            created,
            admin(json!({"action": "connection.create", "status": 403, "code": "forbidden_org",
                "admin_token": "admin.tokens[1]"})),
            mint,
            first_use,
            refused_use,
            deleted,
            admin(json!({"action": "connection.delete", "status": 404, "code": "connection_not_found",
                "connection": id, "org": null})),
        ],
    );
    let text = h.audit_text();
    for secret in [token, "audit-bearer-value", "not-recorded", ADMIN_TOKEN, ORG_TOKEN] {
        assert!(!text.contains(secret), "{secret} in the audit trail");
    }
    let m = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
    assert!(m.contains("credproxy_audit_lines_total 7\n"), "{m}");
}

/// OAuth2: the authorization and its callback, a plain use, a use retried
/// after a 401 (refreshed, retried), a use whose token was about to expire
/// (refreshed), a connection test, a re-authorization, a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_refreshes_retries_and_reauthorization_are_recorded() {
    let began = SystemTime::now();
    let oidc = Oidc::start().await;
    let h = Harness::start_with(Opts { integrations: vec![oidc.integration()], ..Default::default() }).await;
    let (seen, _) = h.authorize("code", json!({})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    let id = seen.json()["connection_id"].as_str().unwrap().to_owned();
    let resource = format!("{}/resource", oidc.url);
    let get = || async { proxy_request(h.running.proxy_addr, "GET", &resource, Some(&id), None).await.0 };
    assert_eq!(get().await, 200);
    oidc.post("/test/revoke-access").await;
    assert_eq!(get().await, 200, "refreshed and retried");
    // Tokens live 5 s and are refreshed 1 s before they expire.
    tokio::time::sleep(Duration::from_millis(4300)).await;
    assert_eq!(get().await, 200, "refreshed first");
    let v = h.admin.call(Method::POST, &format!("/v1/connections/{id}/test"), None).await.unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let (seen, _) = h.authorize("code", json!({"connection_id": id})).await;
    assert_eq!(seen.status, 201, "{}", seen.text());
    h.admin.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();

    let conn = json!({"connection": id, "user": "user_1", "integration": "oidc", "auth_method": "code"});
    let with = |mut v: Value, extra: Value| {
        merge(&mut v, conn.clone());
        merge(&mut v, extra);
        v
    };
    let use_of = |extra: Value| with(used(json!({"path": "/resource", "status": 200})), extra);
    let authorized =
        with(admin(json!({"action": "connection.authorized", "status": 201, "admin_token": null})), json!({}));
    assert_lines(
        &h,
        began,
        &[
            with(admin(json!({"action": "connection.authorize", "status": 200})), json!({"connection": null})),
            authorized.clone(),
            use_of(json!({})),
            use_of(json!({"refreshed": true, "retried": true})),
            use_of(json!({"refreshed": true})),
            with(admin(json!({"action": "connection.test", "status": 200})), json!({})),
            with(admin(json!({"action": "connection.reauthorize", "status": 200})), json!({})),
            with(admin(json!({"action": "connection.reauthorized", "status": 201, "admin_token": null})), json!({})),
            with(admin(json!({"action": "connection.delete", "status": 200})), json!({})),
        ],
    );
}

/// `audit.sink = "off"` writes nothing; a file sink whose directory is
/// missing is a configuration error naming `audit.path`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_can_be_off_and_a_bad_path_is_named() {
    let h = Harness::start_with(Opts { sections: "[audit]\nsink = \"off\"\n".into(), ..Default::default() }).await;
    h.create("bearer", &[("token", "t")]).await;
    assert_eq!(h.audit_text(), "", "audit.sink = \"off\" wrote lines");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("credproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\norg_id = \"{ORG}\"\n[audit]\nsink = \"file\"\npath = \"{}\"\n",
            dir.path().join("missing/audit.log").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(credproxy_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .current_dir(repo())
        .env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check-config accepted a missing audit directory: {err}");
    assert!(err.contains("audit.path") && err.contains("does not exist"), "{err}");
}
