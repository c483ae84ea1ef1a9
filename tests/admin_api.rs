//! The admin API and the CLI that drives it, plus configuration errors of the
//! real binary.

mod support;

use credproxy::admin_client::AdminClient;
use credproxy::secret::SecretValue;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

fn create_body(org: &str, method: &str, creds: Value) -> Value {
    json!({"integration": "httpbin", "auth_method": method, "org_id": org, "user_id": "u1", "credentials": creds})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_health() {
    let h = Harness::start().await;
    let anon = AdminClient::new(&h.admin_url(), SecretValue::from("wrong-token-0123456789")).unwrap();
    let (s, v) = anon.send(Method::GET, "/v1/connections?org_id=org_local", None).await.unwrap();
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "unauthorized");
    // Health endpoints need no token.
    let (s, v) = anon.send(Method::GET, "/healthz", None).await.unwrap();
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, _) = anon.send(Method::GET, "/readyz", None).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let (s, v) = h.admin.send(Method::GET, "/v1/nope", None).await.unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let (s, v) = h.admin.send(Method::GET, "/v1/integrations", None).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = v["integrations"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"github") && ids.contains(&"httpbin"), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_credentials_are_rejected_naming_the_field_and_nothing_is_stored() {
    let h = Harness::start().await;
    let cases = [
        (create_body(ORG, "basic", json!({"username": "u"})), "invalid_credentials", "credentials.password: missing"),
        (
            create_body(ORG, "bearer", json!({"token": "t", "tokn": "x"})),
            "invalid_credentials",
            "credentials.tokn: unknown field",
        ),
        (
            create_body(ORG, "bearer", json!({"token": "abc\r\nX-Injected: 1"})),
            "invalid_credentials",
            "credentials.token: must not contain CR, LF or NUL",
        ),
        (
            create_body(ORG, "bearer", json!({"token": "abc\u{0}def"})),
            "invalid_credentials",
            "credentials.token: must not contain CR, LF or NUL",
        ),
        (
            create_body(ORG, "bearer", json!({"token": 12345})),
            "invalid_credentials",
            "credentials.token: must be a string",
        ),
        (create_body(ORG, "nope", json!({"token": "t"})), "unknown_auth_method", "no auth method"),
        (
            json!({"integration": "nope", "auth_method": "x", "org_id": ORG, "user_id": "u", "credentials": {}}),
            "unknown_integration",
            "unknown integration",
        ),
        (
            json!({"integration": "httpbin", "auth_method": "bearer", "org_id": ORG, "credentials": {}}),
            "invalid_request",
            "user_id",
        ),
        (
            json!({"integration": "httpbin", "auth_method": "bearer", "org_id": "bad org", "user_id": "u", "credentials": {"token": "t"}}),
            "invalid_request",
            "org_id",
        ),
    ];
    for (body, code, detail) in cases {
        let (s, v) = h.admin.send(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["code"], code, "{body}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(detail), "{body}: {v}");
        assert!(!v.to_string().contains("X-Injected") && !v.to_string().contains("12345"), "value echoed: {v}");
    }
    let (s, v) = h.admin.send(Method::GET, &format!("/v1/connections?org_id={ORG}"), None).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["connections"], json!([]), "nothing may be stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_and_org_scoped_tokens() {
    let h = Harness::start().await;
    let (s, created) = h
        .admin
        .send(
            Method::POST,
            "/v1/connections",
            Some(&create_body(ORG, "basic", json!({"username": "bob", "password": "crud-secret-pw"}))),
        )
        .await
        .unwrap();
    assert_eq!(s, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("conn_") && id.len() == 31, "{id}");
    assert_eq!(created["state"], "active");
    assert_eq!(created["credential_fields"], json!(["username", "password"]));
    assert!(!created.to_string().contains("crud-secret-pw"));

    let got = h.admin.call(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(got, created);
    let list = h.admin.call(Method::GET, &format!("/v1/connections?org_id={ORG}"), None).await.unwrap();
    assert_eq!(list["connections"], json!([created]));

    // An org-scoped token sees only its org.
    let other = h.create_in("org_other", "bearer", &[("token", "t-other")]).await;
    let scoped = AdminClient::new(&h.admin_url(), SecretValue::from(ORG_TOKEN)).unwrap();
    let (s, v) = scoped.send(Method::GET, "/v1/connections", None).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["connections"].as_array().unwrap().len(), 1);
    let (s, _) = scoped.send(Method::GET, "/v1/connections?org_id=org_other", None).await.unwrap();
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, a) = scoped.send(Method::GET, &format!("/v1/connections/{other}"), None).await.unwrap();
    let (s2, b) = scoped.send(Method::GET, "/v1/connections/conn_aaaaaaaaaaaaaaaaaaaaaaaaaa", None).await.unwrap();
    assert_eq!((s, s2), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    assert_eq!(a, b);
    let (s, _) = scoped.send(Method::DELETE, &format!("/v1/connections/{other}"), None).await.unwrap();
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = scoped
        .send(Method::POST, "/v1/connections", Some(&create_body("org_other", "bearer", json!({"token": "t"}))))
        .await
        .unwrap();
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden_org")));

    let del = scoped.call(Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(del["deleted"], true);
    let (s, _) = h.admin.send(Method::GET, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn cli(h: &Harness, args: &[&str]) -> (i32, Value, String) {
    let out = tokio::process::Command::new(credproxy_bin())
        .arg("connections")
        .args(args)
        .env("CREDPROXY_ADMIN_URL", h.admin_url())
        .env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_create_list_get_delete() {
    let h = Harness::start().await;
    let secret_file = h.dir.path().join("token.txt");
    std::fs::write(&secret_file, "cli-secret-from-file\n").unwrap();
    let cred = format!("token=@{}", secret_file.display());
    let (code, v, err) = cli(
        &h,
        &[
            "create",
            "--integration",
            "httpbin",
            "--auth-method",
            "bearer",
            "--org",
            ORG,
            "--user",
            "alice",
            "--credential",
            &cred,
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (r, _) = h.running.connections.resolve(ORG, &id).await.unwrap();
    assert_eq!(r.credential.value(0).expose(), "cli-secret-from-file");

    let (code, v, _) = cli(&h, &["list", "--org", ORG]).await;
    assert_eq!(code, 0);
    assert_eq!(v["connections"][0]["id"], id.as_str());
    let (code, v, _) = cli(&h, &["get", &id]).await;
    assert_eq!((code, v["user_id"].as_str()), (0, Some("alice")));
    let (code, v, _) = cli(&h, &["delete", &id]).await;
    assert_eq!((code, v["deleted"].as_bool()), (0, Some(true)));
    let (code, _, err) = cli(&h, &["get", &id]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("connection_not_found"), "{err}");
    let (code, _, err) = cli(
        &h,
        &[
            "create",
            "--integration",
            "httpbin",
            "--auth-method",
            "bearer",
            "--org",
            ORG,
            "--user",
            "a",
            "--credential",
            "token=a\rb",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("credentials.token"), "{err}");
}

#[tokio::test]
async fn bad_config_exits_64_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[proxy]\norg_id = \"o\"\nlisten = \"not-an-address\"\n").unwrap();
    let out = tokio::process::Command::new(credproxy_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("proxy.listen") && err.contains("invalid socket address"),
        "{err}"
    );

    // An integration file error names that file.
    let ints = dir.path().join("ints");
    std::fs::create_dir(&ints).unwrap();
    std::fs::write(
        ints.join("x.toml"),
        "id = \"x\"\nname = \"X\"\nallowed_hosts = []\n[[auth_methods]]\nid = \"b\"\ntype = \"bearer\"\n",
    )
    .unwrap();
    std::fs::write(&path, format!("[proxy]\norg_id = \"o\"\n[integrations]\ndir = \"{}\"\n", ints.display())).unwrap();
    let out = tokio::process::Command::new(credproxy_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x.toml") && err.contains("allowed_hosts"), "{err}");

    // The shipped configuration is valid.
    let out = tokio::process::Command::new(credproxy_bin())
        .args(["check-config", "--config", "config/credproxy.toml"])
        .current_dir(repo())
        .env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The real binary: `serve` on the shipped configuration (ports and data dir
/// overridden from the environment), a proxied request, then SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_the_shipped_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut instance = spawn_instance_with(&repo().join("config/credproxy.toml"), |cmd| {
        cmd.current_dir(repo())
            .env("CREDPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("CREDPROXY_PROXY__LISTEN", "127.0.0.1:0")
            .env("CREDPROXY_ADMIN__LISTEN", "127.0.0.1:0")
            .env("CREDPROXY_STORE__URL", format!("sqlite://{}/db.sqlite", dir.path().display()))
            .env("CREDPROXY_CRYPTO__KEY_FILE", dir.path().join("master.key"))
            .env("CREDPROXY_EGRESS__ALLOW_CIDRS", "[\"127.0.0.0/8\"]");
    })
    .await;
    let created = instance
        .admin
        .call(Method::POST, "/v1/connections", Some(&create_body("org_local", "bearer", json!({"token": "bin-token"}))))
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let hdr = format!("X-Connection-Id: {id}");
    let proxy = instance.proxy;
    let seen = curl(&["-x", &format!("http://{proxy}"), "-H", &hdr, &format!("{}/headers", httpbin())], &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer bin-token"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("master.key")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let pid = instance.pid().to_string();
    let st = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), instance.child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Integration files describe each credential field for a form (label,
/// secret, optional, pattern, …, with defaults by type); an optional field
/// may be left out (its placements are then left out too), and a value
/// must match its field's pattern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_describe_fields_optional_fields_may_be_left_out_and_patterns_hold() {
    let h = Harness::start().await;
    let v = h.admin.call(Method::GET, "/v1/integrations/httpbin", None).await.unwrap();
    let method = |id: &str| v["auth_methods"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!(
        method("custom_region")["form"],
        json!([
            {"name": "account", "label": "Account ID", "description": "The account the secret belongs to.",
             "secret": false, "optional": false, "pattern": "[a-z0-9-]{3,40}", "placeholder": "acme-prod"},
            {"name": "secret", "label": "Secret", "description": null, "secret": true, "optional": false,
             "pattern": null, "placeholder": null},
            {"name": "region", "label": "Region", "description": "Leave empty for the account's default region.",
             "secret": false, "optional": true, "pattern": null, "placeholder": null},
        ])
    );
    let labels = |id: &str| -> Vec<(String, bool)> {
        method(id)["form"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["label"].as_str().unwrap().to_owned(), f["secret"].as_bool().unwrap()))
            .collect()
    };
    assert_eq!(labels("basic"), [("Username".to_owned(), false), ("Password".to_owned(), true)]);
    assert_eq!(labels("bearer"), [("Token".to_owned(), true)]);
    assert_eq!(labels("key_header"), [("API key".to_owned(), true)]);

    let sent = |id: String| async move {
        let url = format!("{}/headers", httpbin());
        let (status, _, body) = proxy_request(h.running.proxy_addr, "GET", &url, Some(&id), None).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<Value>(&body).unwrap()["headers"].clone()
    };
    // Left out (or empty): no X-Region; given: sent.
    let without = h.create("custom_region", &[("account", "acme-prod"), ("secret", "form-secret-1")]).await;
    let headers = sent(without).await;
    assert_eq!(
        (headers["X-Account"].as_str(), headers["X-Secret"].as_str()),
        (Some("acme-prod"), Some("form-secret-1"))
    );
    assert!(headers.get("X-Region").is_none(), "{headers}");
    let empty =
        h.create("custom_region", &[("account", "acme-prod"), ("secret", "form-secret-1"), ("region", "")]).await;
    assert!(sent(empty).await.get("X-Region").is_none());
    let with = h.create("custom_region", &[("account", "acme-prod"), ("secret", "s"), ("region", "eu-west-1")]).await;
    assert_eq!(sent(with).await["X-Region"], "eu-west-1");
    // A required field is still required; a value off its pattern is refused, never echoed.
    for (creds, field, reason) in [
        (json!({"account": "acme-prod", "region": "eu"}), "secret", "missing"),
        (json!({"account": "Not An Account!", "secret": "s"}), "account", "does not match"),
    ] {
        let (s, v) = h
            .admin
            .send(Method::POST, "/v1/connections", Some(&create_body(ORG, "custom_region", creds)))
            .await
            .unwrap();
        assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_credentials")), "{v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.contains(&format!("credentials.{field}")) && detail.contains(reason), "{detail}");
        assert!(!v.to_string().contains("Not An Account"), "{v}");
    }
}

/// `GET /v1/connections/{id}` shows when a proxied request last used the
/// connection (to the minute; written in batches) and how its last test
/// went (`POST /v1/connections/{id}/test` records it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_shows_its_last_use_and_its_last_test() {
    let began = std::time::SystemTime::now();
    let tested = format!(
        "id = \"tested\"\nname = \"Tested\"\nallowed_hosts = [\"127.0.0.1\"]\nupstream_scheme = \"http\"\n\
         base_url = \"{}\"\n[[auth_methods]]\nid = \"bearer\"\ntype = \"bearer\"\n\
         [[auth_methods]]\nid = \"basic\"\ntype = \"basic\"\n[test]\npath = \"/bearer\"\n",
        httpbin()
    );
    let h =
        Harness::start_with(Opts { integrations: vec![("tested.toml".into(), tested)], ..Default::default() }).await;
    let create = |method: &'static str, creds: Value| {
        let body = json!({"integration": "tested", "auth_method": method, "org_id": ORG, "user_id": "u1", "credentials": creds});
        let admin = &h.admin;
        async move {
            admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    };
    let good = create("bearer", json!({"token": "activity-token"})).await;
    let bad = create("basic", json!({"username": "u", "password": "p"})).await;
    let get = |id: &str| {
        let (admin, path) = (&h.admin, format!("/v1/connections/{id}"));
        async move { admin.call(Method::GET, &path, None).await.unwrap() }
    };
    let v = get(&good).await;
    assert!(v["last_used_at"].is_null() && v["last_test"].is_null(), "{v}");

    for _ in 0..2 {
        let (status, _, _) =
            proxy_request(h.running.proxy_addr, "GET", &format!("{}/get", httpbin()), Some(&good), None).await;
        assert_eq!(status, 200);
    }
    h.running.connections.flush_uses().await;
    let within = |v: &Value| {
        let at = humantime::parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap();
        assert!(at + std::time::Duration::from_secs(1) >= began && at <= std::time::SystemTime::now(), "{v}");
    };
    within(&get(&good).await["last_used_at"]);
    assert!(get(&bad).await["last_used_at"].is_null());

    let test = |id: &str| {
        let (admin, path) = (&h.admin, format!("/v1/connections/{id}/test"));
        async move { admin.call(Method::POST, &path, None).await.unwrap() }
    };
    assert_eq!(test(&good).await["ok"], true);
    let last = get(&good).await["last_test"].clone();
    within(&last["at"]);
    assert_eq!((last["ok"].clone(), last["code"].clone()), (json!(true), Value::Null), "{last}");
    // httpbin's /bearer answers a Basic credential 401.
    assert_eq!(test(&bad).await["ok"], false);
    let last = get(&bad).await["last_test"].clone();
    assert_eq!((last["ok"].clone(), last["code"].clone()), (json!(false), json!("unexpected_status")), "{last}");
}

/// `GET /v1/connections` filters by user, integration and state, and pages
/// with a cursor: every connection once, in creation order; bad parameters
/// are 400s naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_and_pages_with_a_cursor() {
    let h = Harness::start().await;
    let mut made = Vec::new();
    for (i, user) in ["u1", "u2", "u1", "u3", "u1"].iter().enumerate() {
        let mut body = create_body(ORG, "bearer", json!({"token": format!("list-token-{i}")}));
        body["user_id"] = json!(user);
        made.push(
            h.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let body = json!({"integration": "github", "auth_method": "pat", "org_id": ORG, "user_id": "u2",
        "credentials": {"token": "list-token-gh"}});
    let gh =
        h.admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"].as_str().unwrap().to_owned();
    h.create_in("org_other", "bearer", &[("token", "list-token-other")]).await;
    let ids = |v: &Value| -> Vec<String> {
        v["connections"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()).collect()
    };
    let get = |q: String| {
        let admin = &h.admin;
        async move { admin.call(Method::GET, &format!("/v1/connections?org_id={ORG}&{q}"), None).await.unwrap() }
    };
    // Oldest first, then by id (these were made within a second or two).
    let full = ids(&get(String::new()).await);
    let mut all = made.clone();
    all.push(gh.clone());
    assert_eq!(full.len(), 6);
    assert!(all.iter().all(|id| full.contains(id)));
    let in_order = |want: &[&String]| -> Vec<String> { full.iter().filter(|id| want.contains(id)).cloned().collect() };
    assert_eq!(ids(&get("user_id=u1".into()).await), in_order(&[&made[0], &made[2], &made[4]]));
    assert_eq!(ids(&get("integration=github".into()).await), std::slice::from_ref(&gh));
    assert_eq!(ids(&get("user_id=u2&integration=httpbin".into()).await), [made[1].clone()]);
    assert_eq!(ids(&get("state=needs_reauth".into()).await), Vec::<String>::new());
    // Pages of two: 2 + 2 + 2, then no cursor.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let page = get(format!("limit=2{cursor}")).await;
        pages += 1;
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!((seen, pages), (full, 3));
    for (q, word) in
        [("state=asleep", "state"), ("limit=0", "limit"), ("limit=5000", "limit"), ("cursor=bm9wZQ", "cursor")]
    {
        let (s, v) = h.admin.send(Method::GET, &format!("/v1/connections?{q}"), None).await.unwrap();
        assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{q}: {v}");
        assert!(v["detail"].as_str().unwrap().starts_with(word), "{q}: {v}");
    }
}
