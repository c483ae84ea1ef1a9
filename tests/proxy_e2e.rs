//! End-to-end: credproxy in-process, httpbin under gunicorn as the upstream,
//! real clients (curl, Python requests and httpx). Every assertion is made on
//! what httpbin saw.

mod support;

use base64::Engine as _;
use support::*;

const ID_HDR: &str = "X-Connection-Id";

async fn via_curl(h: &Harness, id: &str, path: &str, extra: &[&str]) -> Seen {
    let url = format!("{}{}", httpbin(), path);
    let hdr = format!("{ID_HDR}: {id}");
    let proxy = h.proxy_url();
    let mut args = vec!["-x", proxy.as_str(), "-H", hdr.as_str()];
    args.extend_from_slice(extra);
    args.push(url.as_str());
    curl(&args, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_via_curl_replaces_authorization_and_strips_control_headers() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "bearer-token-abc")]).await;
    let seen = via_curl(
        &h,
        &id,
        "/anything/x?a=1",
        &[
            "-H",
            "Authorization: Bearer caller-supplied",
            "-H",
            "Proxy-Authorization: Bearer run-token",
            "-H",
            "Connection: keep-alive, X-Hop",
            "-H",
            "X-Hop: 1",
        ],
    )
    .await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer bearer-token-abc"));
    assert_eq!(seen.echoed_header("X-Connection-Id"), None);
    assert_eq!(seen.echoed_header("Proxy-Authorization"), None);
    assert_eq!(seen.echoed_header("X-Hop"), None);
    assert_eq!(seen.echoed_header("Host").as_deref(), Some(httpbin_authority().as_str()));
    assert_eq!(seen.json()["args"]["a"], "1");
    // A response relayed from upstream carries no Proxy-Status.
    assert_eq!(seen.header("proxy-status"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_lowercase_http_proxy_env() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "env-proxy-token")]).await;
    let url = format!("{}/headers", httpbin());
    let hdr = format!("{ID_HDR}: {id}");
    let proxy = h.proxy_url();
    let seen = curl(&["-H", &hdr, &url], &[("http_proxy", &proxy)]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer env-proxy-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_passes_httpbin_basic_auth_check() {
    let h = Harness::start().await;
    let id = h.create("basic", &[("username", "alice"), ("password", "p@ss word")]).await;
    let seen = via_curl(&h, &id, "/basic-auth/alice/p@ss%20word", &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.json()["authenticated"], true);
    let seen = via_curl(&h, &id, "/headers", &[]).await;
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:p@ss word"));
    assert_eq!(seen.echoed_header("Authorization"), Some(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_in_header_query_and_cookie() {
    let h = Harness::start().await;
    let id = h.create("key_header", &[("api_key", "hk-1")]).await;
    let seen = via_curl(&h, &id, "/headers", &["-H", "X-Api-Key: caller"]).await;
    assert_eq!(seen.echoed_header("X-Api-Key").as_deref(), Some("Token hk-1"));

    let id = h.create("key_query", &[("api_key", "qk 2&x=y")]).await;
    let seen = via_curl(&h, &id, "/get?keep=me&api_key=caller", &[]).await;
    let args = &seen.json()["args"];
    assert_eq!(args["api_key"], "qk 2&x=y", "{args}");
    assert_eq!(args["keep"], "me");
    assert!(args.get("x").is_none(), "{args}");

    let id = h.create("key_cookie", &[("api_key", "ck-3")]).await;
    let seen = via_curl(&h, &id, "/headers", &["-H", "Cookie: theme=dark; session=caller"]).await;
    assert_eq!(seen.echoed_header("Cookie").as_deref(), Some("theme=dark; session=ck-3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_headers_json_body_and_form_body() {
    let h = Harness::start().await;
    let id = h.create("custom_headers", &[("client_id", "cid-9"), ("client_secret", "cs-9")]).await;
    let seen = via_curl(&h, &id, "/headers", &[]).await;
    assert_eq!(seen.echoed_header("X-Client-Id").as_deref(), Some("cid-9"));
    assert_eq!(seen.echoed_header("X-Client-Signature").as_deref(), Some("v1:cid-9:cs-9"));

    let id = h.create("custom_json", &[("account", "acct-1"), ("secret", "json-secret-1")]).await;
    let seen = via_curl(
        &h,
        &id,
        "/anything",
        &["-H", "Content-Type: application/json", "--data", r#"{"q":"x","api_secret":"caller"}"#],
    )
    .await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    let v = seen.json();
    assert_eq!(v["json"], serde_json::json!({"q": "x", "api_secret": "json-secret-1"}));
    assert_eq!(seen.echoed_header("X-Account").as_deref(), Some("acct-1"));
    // A body that cannot carry the field is refused, not forwarded without it.
    let seen = via_curl(&h, &id, "/anything", &["-H", "Content-Type: text/plain", "--data", "plain"]).await;
    assert_eq!(seen.status, 400);
    assert_eq!(seen.json()["code"], "request_body_not_injectable");
    assert!(seen.header("proxy-status").is_some());

    let id = h.create("custom_form", &[("secret", "form-secret-1")]).await;
    let seen = via_curl(&h, &id, "/post", &["--data", "a=1&client_secret=caller"]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.json()["form"], serde_json::json!({"a": "1", "client_secret": "form-secret-1"}));

    // Past proxy.max_buffered_body (64 KiB in tests): 413, nothing forwarded.
    let big = format!("a={}", "x".repeat(70_000));
    let seen = via_curl(&h, &id, "/post", &["--data", &big]).await;
    assert_eq!(seen.status, 413);
    assert_eq!(seen.json()["code"], "request_body_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_and_httpx_via_http_proxy_env() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "py-token-1")]).await;
    let url = format!("{}/anything/py", httpbin());
    let proxy = h.proxy_url();
    let env = [("HTTP_PROXY", proxy.as_str()), ("TARGET", url.as_str()), ("CONN", id.as_str())];
    let requests_script = r#"
import json, os, requests
r = requests.get(os.environ["TARGET"], headers={"X-Connection-Id": os.environ["CONN"], "Authorization": "Bearer caller"})
print(json.dumps({"status": r.status_code, "headers": dict(r.headers), "body": r.text}))
"#;
    let seen = python_client(requests_script, &env).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer py-token-1"));
    assert_eq!(seen.echoed_header("X-Connection-Id"), None);
    assert_eq!(seen.echoed_header("Host").as_deref(), Some(httpbin_authority().as_str()));

    let httpx_script = r#"
import json, os, httpx
with httpx.Client() as c:
    r = c.post(os.environ["TARGET"], headers={"X-Connection-Id": os.environ["CONN"]}, json={"k": "v"})
print(json.dumps({"status": r.status_code, "headers": dict(r.headers), "body": r.text}))
"#;
    let seen = python_client(httpx_script, &env).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer py-token-1"));
    assert_eq!(seen.json()["json"]["k"], "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_is_refused_and_the_wrong_host_sees_no_connection() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "never-to-evil")]).await;
    // 127.0.0.2 stands in for an attacker's host: not in allowed_hosts.
    let evil = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let evil_addr = evil.local_addr().unwrap();
    let url = format!("http://{evil_addr}/steal");
    let hdr = format!("{ID_HDR}: {id}");
    let proxy = h.proxy_url();
    let seen = curl(&["-x", &proxy, "-H", &hdr, &url], &[]).await;
    assert_eq!(seen.status, 403, "{}", seen.text());
    assert_eq!(seen.json()["code"], "host_not_allowed");
    let ps = seen.header("proxy-status").expect("Proxy-Status on proxy-made responses");
    assert!(ps.starts_with("credproxy; error=http_request_denied"), "{ps}");
    assert_eq!(seen.header("content-type"), Some("application/problem+json"));
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(500), evil.accept()).await;
    assert!(accepted.is_err(), "the wrong host received a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_other_org_ids_get_identical_404s() {
    let h = Harness::start().await;
    let other = h.create_in("org_other", "bearer", &[("token", "other-org-token")]).await;
    let unknown = "conn_aaaaaaaaaaaaaaaaaaaaaaaaaa";
    let a = via_curl(&h, unknown, "/headers", &[]).await;
    let b = via_curl(&h, &other, "/headers", &[]).await;
    assert_eq!(a.status, 404);
    assert_eq!(b.status, 404);
    assert_eq!(a.body, b.body, "bodies must not reveal that the other-org id exists");
    assert_eq!(a.header("proxy-status"), b.header("proxy-status"));
    assert_eq!(a.json()["code"], "connection_not_found");
    assert!(!b.text().contains("other-org-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_with_guidance() {
    let h = Harness::start().await;
    // Origin-form: someone browsing to the proxy port.
    let seen = curl(&[&format!("{}/some/path", h.proxy_url())], &[]).await;
    assert_eq!(seen.status, 400);
    assert_eq!(seen.json()["code"], "not_a_proxy_request");
    assert!(seen.json()["detail"].as_str().unwrap().contains("HTTP_PROXY"));
    assert!(seen.header("proxy-status").unwrap().contains("http_request_error"));
    // A malformed connection id.
    let seen = via_curl(&h, "conn_nope", "/get", &[]).await;
    assert_eq!(seen.status, 400);
    assert_eq!(seen.json()["code"], "invalid_connection_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_forwards_without_credentials() {
    let h = Harness::start().await;
    let url = format!("{}/headers", httpbin());
    let proxy = h.proxy_url();
    let seen = curl(&["-x", &proxy, "-H", "Proxy-Authorization: Basic eDp5", &url], &[]).await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.echoed_header("Authorization"), None);
    assert_eq!(seen.echoed_header("Proxy-Authorization"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_connection_stops_working_at_once() {
    let h = Harness::start().await;
    let id = h.create("bearer", &[("token", "short-lived")]).await;
    assert_eq!(via_curl(&h, &id, "/headers", &[]).await.status, 200);
    h.admin.call(http::Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    let seen = via_curl(&h, &id, "/headers", &[]).await;
    assert_eq!(seen.status, 404, "cached credential must be evicted on delete");
}

/// The SSRF guard without the tests' loopback exception.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_guard_refuses_internal_destinations() {
    let h = Harness::start_with(Opts { allow_loopback: false, ..Default::default() }).await;
    let proxy = h.proxy_url();
    let port = port_of(&httpbin_authority());
    // Pass-through requests to internal addresses, by literal and by name.
    for url in [
        format!("http://127.0.0.1:{port}/get"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://[::1]:{port}/get"),
        format!("http://localhost:{port}/get"),
        "http://10.0.0.1/".to_owned(),
        "http://[::ffff:127.0.0.1]/".to_owned(),
    ] {
        let seen = curl(&["-x", &proxy, &url], &[]).await;
        assert_eq!(seen.status, 403, "{url}: {}", seen.text());
        assert_eq!(seen.json()["code"], "destination_ip_prohibited", "{url}");
        assert!(seen.header("proxy-status").unwrap().contains("error=destination_ip_prohibited"), "{url}");
    }
    // With a connection whose allowed_hosts include localhost: still refused.
    let id = h.create("bearer", &[("token", "ssrf-token")]).await;
    let hdr = format!("{ID_HDR}: {id}");
    let seen = curl(&["-x", &proxy, "-H", &hdr, &format!("http://localhost:{port}/headers")], &[]).await;
    assert_eq!(seen.status, 403, "{}", seen.text());
    assert_eq!(seen.json()["code"], "destination_ip_prohibited");
}

/// The whole path on the shared-deployment store: PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_postgres() {
    let url = fresh_postgres_database().await;
    let h = Harness::start_with(Opts { store_url: Some(url), ..Default::default() }).await;
    let id = h.create("basic", &[("username", "pg-user"), ("password", "pg-pass")]).await;
    let seen = via_curl(&h, &id, "/basic-auth/pg-user/pg-pass", &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    let list = h.admin.call(http::Method::GET, &format!("/v1/connections?org_id={ORG}"), None).await.unwrap();
    assert_eq!(list["connections"][0]["id"], id.as_str());
    h.admin.call(http::Method::DELETE, &format!("/v1/connections/{id}"), None).await.unwrap();
    assert_eq!(via_curl(&h, &id, "/headers", &[]).await.status, 404);
}

/// A connection whose auth method (or whole integration) was removed from
/// the integration files since it was made is a 409 naming what is gone,
/// not a 500: instances on the same store, started with the files changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_auth_method_was_removed_is_a_409() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("shared.db").display());
    let key = dir.path().join("master.key");
    let file = |methods: &str| {
        let head =
            "id = \"changing\"\nname = \"changing\"\nallowed_hosts = [\"127.0.0.1\"]\nupstream_scheme = \"http\"\n";
        ("changing.toml".to_owned(), format!("{head}{methods}"))
    };
    let method = |id: &str| format!("[[auth_methods]]\nid = \"{id}\"\ntype = \"bearer\"\n");
    let with = |integrations: Vec<(String, String)>| Opts {
        store_url: Some(store.clone()),
        key_file: Some(key.clone()),
        integrations,
        ..Default::default()
    };
    let before = Harness::start_with(with(vec![file(&format!("{}{}", method("old"), method("new")))])).await;
    let body = serde_json::json!({"integration": "changing", "auth_method": "old", "org_id": ORG, "user_id": "u",
        "credentials": {"token": "removed-method-token"}});
    let id = before.admin.call(http::Method::POST, "/v1/connections", Some(&body)).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("{}/bearer", httpbin());
    assert_eq!(proxy_request(before.running.proxy_addr, "GET", &url, Some(&id), None).await.0, 200);
    // The method is gone; then the whole integration ("other" keeps the
    // harness from falling back to the shipped directory alone).
    for (files, gone) in [
        (vec![file(&method("new"))], "auth method \"old\" of integration \"changing\""),
        (
            vec![("other.toml".to_owned(), file(&method("x")).1.replace("changing", "other"))],
            "integration \"changing\"",
        ),
    ] {
        let after = Harness::start_with(with(files)).await;
        let (status, headers, body) = proxy_request(after.running.proxy_addr, "GET", &url, Some(&id), None).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, v["code"].as_str()), (409, Some("auth_method_removed")), "{v}");
        assert!(headers.iter().any(|(k, v)| k == "proxy-status" && v.contains("auth_method_removed")));
        assert!(v["detail"].as_str().unwrap().contains(gone), "{v}");
    }
}
