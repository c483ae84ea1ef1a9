//! HTTPS_PROXY: CONNECT with TLS interception, plain HTTP inside CONNECT,
//! and blind tunnels, driven by real clients (curl, Python requests and
//! httpx, Node undici) that trust credproxy's CA only through their standard
//! mechanism. The upstream is httpbin over TLS (certs/test/ fixtures).

mod support;

use serde_json::Value;
use support::*;

struct Tls {
    h: Harness,
    ca: String,
    _ca_dir: tempfile::TempDir,
}

/// A harness with interception on (CA made like `credproxy ca init` does).
async fn intercepting(trust_upstream: bool, extra: &str) -> Tls {
    let ca_dir = tempfile::tempdir().unwrap();
    let (cert, key) = credproxy::tls::init_ca(ca_dir.path(), 1).unwrap();
    let upstream_ca = repo().join("certs/test/upstream-ca.pem");
    let extra_cas =
        if trust_upstream { format!("extra_ca_certs = [\"{}\"]", upstream_ca.display()) } else { String::new() };
    let sections = format!(
        "[tls_intercept]\nenabled = true\nca_cert = \"{}\"\nca_key = \"{}\"\n{extra}\n[upstream]\n{extra_cas}\n",
        cert.display(),
        key.display()
    );
    let h = Harness::start_with(Opts { sections, ..Default::default() }).await;
    Tls { h, ca: cert.display().to_string(), _ca_dir: ca_dir }
}

fn tls_port() -> u16 {
    port_of(httpbin_tls().trim_start_matches("https://"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_proxy_http1_and_http2_inside_the_tunnel() {
    let t = intercepting(true, "").await;
    let id = t.h.create("bearer", &[("token", "tls-token-1")]).await;
    let proxy = t.h.proxy_url();
    let url = format!("{}/anything/x?y=1", httpbin_tls());
    let hdr = format!("X-Connection-Id: {id}");
    for version in ["--http1.1", "--http2"] {
        let seen = curl(
            &[
                version,
                "--cacert",
                &t.ca,
                "-H",
                &hdr,
                "-H",
                "Authorization: Bearer caller",
                "-H",
                "Proxy-Authorization: Basic eDp5",
                &url,
            ],
            &[("HTTPS_PROXY", &proxy)],
        )
        .await;
        assert_eq!(seen.status, 200, "{version}: {}", seen.text());
        assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer tls-token-1"), "{version}");
        assert_eq!(seen.echoed_header("X-Connection-Id"), None);
        assert_eq!(seen.echoed_header("Proxy-Authorization"), None);
        assert_eq!(seen.echoed_header("Host").as_deref(), Some(format!("127.0.0.1:{}", tls_port()).as_str()));

        // The upstream's response fields reach the caller over either
        // protocol (HTTP/1.1 copies them as sent, h2 gets a header map).
        let url = format!("{}/response-headers?X-From-Upstream=v-{version}&Cache-Control=no-store", httpbin_tls());
        let seen = curl(&[version, "--cacert", &t.ca, "-H", &hdr, &url], &[("HTTPS_PROXY", &proxy)]).await;
        assert_eq!(seen.status, 200, "{version}: {}", seen.text());
        assert_eq!(seen.header("X-From-Upstream"), Some(format!("v-{version}").as_str()), "{version}");
        assert_eq!(seen.header("Cache-Control"), Some("no-store"), "{version}");
        assert_eq!(seen.header("Content-Type"), Some("application/json"), "{version}");
        assert!(seen.header("Date").is_some(), "{version}: one Date");
        let dates = seen.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("date")).count();
        assert_eq!(dates, 1, "{version}: exactly one Date field");
    }
    let i = t.h.running.interceptor.as_ref().unwrap();
    assert_eq!(i.minted(), 1, "one leaf for the host");
    assert!(i.cache_hits() >= 1, "the second tunnel reused the leaf");
}

/// Tunnels one after another share the pool's TLS connection to the
/// upstream; gunicorn closes it after 2 s idle, and the pool notices (its
/// socket turned readable: the poll through TLS reads the close) and opens
/// another — the caller never sees the closed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_tls_connection_is_reused_and_replaced_once_the_upstream_closed_it() {
    let t = intercepting(true, "").await;
    let id = t.h.create("bearer", &[("token", "tls-pool-token")]).await;
    let proxy = t.h.proxy_url();
    let hdr = format!("X-Connection-Id: {id}");
    let url = format!("{}/headers", httpbin_tls());
    let args = ["--http1.1", "--cacert", t.ca.as_str(), "-H", hdr.as_str(), url.as_str()];
    let env = [("HTTPS_PROXY", proxy.as_str())];
    let twice = || async {
        for _ in 0..2 {
            let seen = curl(&args, &env).await;
            assert_eq!(seen.status, 200, "{}", seen.text());
            assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer tls-pool-token"));
        }
    };
    twice().await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    twice().await;
    let metrics = curl(&[&format!("{}/metrics", t.h.admin_url())], &[]).await.text();
    assert!(metrics.contains("credproxy_upstream_connections_opened_total 2\n"), "{metrics}");
    assert!(metrics.contains("credproxy_upstream_connections_reused_total 2\n"), "{metrics}");
    let failed = metrics.lines().filter(|l| l.starts_with("credproxy_proxy_errors_total") && !l.ends_with(" 0"));
    assert_eq!(failed.collect::<Vec<_>>(), Vec::<&str>::new(), "no request failed");
}

/// An upstream that offers h2 (Hypercorn) gets h2 from credproxy, one
/// multiplexed connection for many tunnels and concurrent requests, with
/// the credential on every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_is_spoken_and_shared() {
    let up = start_h2_httpbin().await;
    let t = intercepting(true, "").await;
    let id = t.h.create("bearer", &[("token", "h2-token-1")]).await;
    let proxy = t.h.proxy_url();
    let url = format!("{}/headers", up.url);
    let hdr = format!("X-Connection-Id: {id}");
    let args = ["--cacert", t.ca.as_str(), "-H", hdr.as_str(), url.as_str()];
    let env = [("HTTPS_PROXY", proxy.as_str())];
    let one = || curl(&args, &env);
    let first = one().await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.echoed_header("Authorization").as_deref(), Some("Bearer h2-token-1"));
    // Four more tunnels at once: all served on the one h2 connection.
    let (a, b, c, d) = tokio::join!(one(), one(), one(), one());
    for seen in [&a, &b, &c, &d] {
        assert_eq!(seen.status, 200, "{}", seen.text());
        assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer h2-token-1"));
    }
    let metrics = curl(&[&format!("{}/metrics", t.h.admin_url())], &[]).await.text();
    assert!(metrics.contains("credproxy_upstream_connections_opened_total 1\n"), "{metrics}");
    assert!(metrics.contains("credproxy_upstream_connections_reused_total 4\n"), "{metrics}");
    let log = std::fs::read_to_string(&up.log).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("/headers")).collect();
    // Hypercorn logs a stream a second time (status `-`) when the client
    // resets it after the response; five answered requests is what counts.
    assert_eq!(lines.iter().filter(|l| l.contains("status=200")).count(), 5, "{log}");
    assert!(lines.iter().all(|l| l.contains("protocol=2 GET")), "upstream saw: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_and_httpx_with_their_ca_variables() {
    let t = intercepting(true, "").await;
    let a = t.h.create("bearer", &[("token", "req-token-a")]).await;
    let b = t.h.create("key_header", &[("api_key", "req-key-b")]).await;
    let proxy = t.h.proxy_url();
    let url = format!("{}/headers", httpbin_tls());
    // requests: CONNECT host:port HTTP/1.0 without Host; one Session keeps the
    // tunnel alive across requests with different connections.
    let script = r#"
import json, os, requests
s = requests.Session()
out = []
for conn in (os.environ["A"], os.environ["B"], os.environ["A"]):
    r = s.get(os.environ["TARGET"], headers={"X-Connection-Id": conn})
    out.append(r.json()["headers"])
print(json.dumps({"status": r.status_code, "headers": {}, "body": json.dumps(out)}))
"#;
    let env = [
        ("HTTPS_PROXY", proxy.as_str()),
        ("REQUESTS_CA_BUNDLE", t.ca.as_str()),
        ("TARGET", url.as_str()),
        ("A", a.as_str()),
        ("B", b.as_str()),
    ];
    let seen = python_client(script, &env).await;
    assert_eq!(seen.status, 200);
    let all: Vec<Value> = serde_json::from_str(&seen.text()).unwrap();
    assert_eq!(all[0]["Authorization"], "Bearer req-token-a");
    assert_eq!(all[1]["X-Api-Key"], "Token req-key-b");
    assert!(all[1].get("Authorization").is_none(), "{}", all[1]);
    assert_eq!(all[2]["Authorization"], "Bearer req-token-a");
    let i = t.h.running.interceptor.as_ref().unwrap();
    assert_eq!(i.minted(), 1);

    let script = r#"
import json, os, httpx
with httpx.Client() as c:
    r = c.get(os.environ["TARGET"], headers={"X-Connection-Id": os.environ["A"]})
print(json.dumps({"status": r.status_code, "headers": dict(r.headers), "body": r.text}))
"#;
    let env = [
        ("HTTPS_PROXY", proxy.as_str()),
        ("SSL_CERT_FILE", t.ca.as_str()),
        ("TARGET", url.as_str()),
        ("A", a.as_str()),
    ];
    let seen = python_client(script, &env).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer req-token-a"));
}

async fn node_fetch(t: &Tls, target: &str, conn: &str) -> Seen {
    let dir = repo().join("tests/peers/node");
    assert!(dir.join("node_modules/undici").is_dir(), "undici is not installed: run the suite with `scripts/test`");
    let proxy = t.h.proxy_url();
    let out = tokio::process::Command::new("node")
        .arg("proxy_client.mjs")
        .current_dir(&dir)
        .env("HTTP_PROXY", &proxy)
        .env("HTTPS_PROXY", &proxy)
        .env("NODE_EXTRA_CA_CERTS", &t.ca)
        .env("TARGET", target)
        .env("CONN", conn)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "node: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    Seen::from_json(&v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_undici_env_proxy_agent_https_and_tunnelled_http() {
    let t = intercepting(true, "").await;
    let id = t.h.create("bearer", &[("token", "node-token-1")]).await;
    let seen = node_fetch(&t, &format!("{}/headers", httpbin_tls()), &id).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer node-token-1"));
    // undici tunnels http:// targets too: plain HTTP inside CONNECT.
    let seen = node_fetch(&t, &format!("{}/headers", httpbin()), &id).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer node-token-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_inside_connect_with_curl_proxytunnel() {
    let t = intercepting(true, "").await;
    let id = t.h.create("bearer", &[("token", "tunnel-plain")]).await;
    let hdr = format!("X-Connection-Id: {id}");
    let seen = curl(&["-p", "-x", &t.h.proxy_url(), "-H", &hdr, &format!("{}/headers", httpbin())], &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer tunnel-plain"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prohibited_destination_is_refused_before_any_certificate_is_minted() {
    let t = intercepting(true, "").await;
    let (status, headers, body) =
        proxy_request(t.h.running.proxy_addr, "CONNECT", "169.254.169.254:443", None, None).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "destination_ip_prohibited");
    assert!(headers.iter().any(|(k, v)| k == "proxy-status" && v.contains("destination_ip_prohibited")));
    assert_eq!(t.h.running.interceptor.as_ref().unwrap().minted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstream_certificate_is_a_502_never_a_downgrade() {
    let t = intercepting(false, "").await;
    let id = t.h.create("bearer", &[("token", "never-sent")]).await;
    let hdr = format!("X-Connection-Id: {id}");
    let seen = curl(
        &["--cacert", &t.ca, "-H", &hdr, &format!("{}/headers", httpbin_tls())],
        &[("HTTPS_PROXY", &t.h.proxy_url())],
    )
    .await;
    assert_eq!(seen.status, 502, "{}", seen.text());
    assert_eq!(seen.json()["code"], "upstream_tls_error", "{}", seen.text());
    assert!(seen.header("proxy-status").unwrap().contains("tls_certificate_error"));
    // An unknown issuer says where a private CA goes.
    assert!(seen.json()["detail"].as_str().unwrap().contains("upstream.extra_ca_certs"), "{}", seen.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_tunnels_follow_egress_policy() {
    // Interception off: bytes pass untouched (the client trusts the upstream directly).
    let h = Harness::start().await;
    let upstream_ca = repo().join("certs/test/upstream-ca.pem").display().to_string();
    let seen = curl(
        &["--cacert", &upstream_ca, "-H", "X-Connection-Id: conn_untouched", &format!("{}/headers", httpbin_tls())],
        &[("HTTPS_PROXY", &h.proxy_url())],
    )
    .await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(
        seen.echoed_header("X-Connection-Id").as_deref(),
        Some("conn_untouched"),
        "a blind tunnel does not touch bytes"
    );
    // A private address is refused.
    let (status, _, body) = proxy_request(h.running.proxy_addr, "CONNECT", "10.0.0.1:443", None, None).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));

    // With pass-through disabled, only tls_intercept.passthrough_hosts tunnel blind.
    let t = intercepting(true, "passthrough_hosts = [\"localhost\"]").await;
    let (status, _, _) =
        proxy_request(t.h.running.proxy_addr, "CONNECT", &format!("localhost:{}", tls_port()), None, None).await;
    assert_eq!(status, 200, "a listed passthrough host tunnels blind");
    assert_eq!(t.h.running.interceptor.as_ref().unwrap().minted(), 0, "no leaf for a passthrough host");
    let strict = Harness::start_with(Opts { egress: "allow_passthrough = false".into(), ..Default::default() }).await;
    let (status, _, body) =
        proxy_request(strict.running.proxy_addr, "CONNECT", &format!("127.0.0.1:{}", tls_port()), None, None).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "passthrough_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_listener_over_tls() {
    let cert = repo().join("certs/test/httpbin.pem");
    let key = repo().join("certs/test/httpbin.key");
    let extra_toml = format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display());
    let h = Harness::start_with(Opts { extra_toml, ..Default::default() }).await;
    let id = h.create("bearer", &[("token", "via-tls-proxy")]).await;
    let proxy = format!("https://{}", h.running.proxy_addr);
    let ca = repo().join("certs/test/upstream-ca.pem").display().to_string();
    let hdr = format!("X-Connection-Id: {id}");
    let seen =
        curl(&["--proxy", &proxy, "--proxy-cacert", &ca, "-H", &hdr, &format!("{}/headers", httpbin())], &[]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(seen.echoed_header("Authorization").as_deref(), Some("Bearer via-tls-proxy"));
    // A plain-HTTP client on the TLS port gets nowhere.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-x",
            &format!("http://{}", h.running.proxy_addr),
            &format!("{}/headers", httpbin()),
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "plain HTTP must not be served on the TLS listener");
}
