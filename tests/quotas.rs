//! Provider quotas end to end: rate limits and in-flight caps declared in
//! integration files, counted at a real upstream (httpbin under gunicorn,
//! its access log), and cool-downs learnt from a real server's 429 with
//! `Retry-After` (nginx), on one instance and across three on PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};
use support::*;

/// An integration file for loopback upstreams with a bearer method.
fn integration(id: &str, quotas: &str) -> (String, String) {
    (
        format!("{id}.toml"),
        format!(
            "id = \"{id}\"\nname = \"{id}\"\nallowed_hosts = [\"127.0.0.1\"]\nupstream_scheme = \"http\"\n\
             [[auth_methods]]\nid = \"bearer\"\ntype = \"bearer\"\n{quotas}"
        ),
    )
}

async fn connection(admin: &credproxy::admin_client::AdminClient, integration: &str, user: &str) -> String {
    let body = json!({"integration": integration, "auth_method": "bearer", "org_id": ORG, "user_id": user,
        "credentials": {"token": format!("quota-test-token-{user}")}});
    let v = admin.call(Method::POST, "/v1/connections", Some(&body)).await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Sends `GET url` with `conn` until one is answered 200, for at most `within`.
async fn answered_within(proxy: std::net::SocketAddr, url: &str, conn: &str, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if proxy_request(proxy, "GET", url, Some(conn), None).await.0 == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// An access-log count once it has caught up with `want` (a server logs a
/// request just after answering it), or as it is after 2 s.
async fn settled(count: impl Fn() -> usize, want: usize) -> usize {
    for _ in 0..40 {
        let n = count();
        if n >= want {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    count()
}

/// One answer of a flood: status, headers, body, how long it took.
type Answer = (u16, Vec<(String, String)>, Vec<u8>, Duration);

/// `clients` concurrent clients, each sending `GET url` with `conn` for
/// `secs` seconds (pausing 50 ms after a refusal).
async fn flood(proxy: std::net::SocketAddr, url: &str, conn: &str, clients: usize, secs: u64) -> Vec<Answer> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, conn) = (url.to_owned(), conn.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while Instant::now() < until {
                let sent = Instant::now();
                let (status, headers, body) = proxy_request(proxy, "GET", &url, Some(&conn), None).await;
                got.push((status, headers, body, sent.elapsed()));
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// A refusal of credproxy's own, with its code: 429, `Retry-After`,
/// `Proxy-Status`, problem+json naming the limit.
fn assert_refused(a: &Answer, code: &str) -> Value {
    let (status, headers, body, _) = a;
    assert_eq!(*status, 429, "{}", String::from_utf8_lossy(body));
    assert!(header(headers, "retry-after").is_some(), "{headers:?}");
    assert_eq!(
        header(headers, "proxy-status"),
        Some(format!("credproxy; error=http_request_denied; details=\"{code}\"").as_str())
    );
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["code"], code, "{v}");
    v
}

/// 5 requests per second, bursts of 5, on one connection; a 3-second
/// flood from 20 clients: 20 ± 2 reach the upstream, the rest are refused
/// with a Retry-After that a client honouring it (Python requests with
/// urllib3's Retry) turns into a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_the_burst_plus_the_rate_and_retry_after_works() {
    let upstream = LoggedHttpbin::start().await;
    let limits = "[[rate_limits]]\nper = \"connection\"\nrequests = 5\nperiod = \"1s\"\nburst = 5\n";
    let h =
        Harness::start_with(Opts { integrations: vec![integration("limited", limits)], ..Default::default() }).await;
    let conn = connection(&h.admin, "limited", "flood").await;
    let url = format!("{}/anything/flood", upstream.url);
    let answers = flood(h.running.proxy_addr, &url, &conn, 20, 3).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    assert!((18..=22).contains(&ok), "{ok} successes of {}", answers.len());
    let seen = settled(|| upstream.count("/anything/flood"), ok).await;
    assert_eq!(seen, ok, "every success, and nothing else, reached the upstream");
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.0 != 200).collect();
    assert!(refused.len() > 20, "{} refused", refused.len());
    for a in &refused {
        let v = assert_refused(a, "rate_limited");
        assert_eq!(header(&a.1, "retry-after"), Some("1"));
        assert_eq!((v["limit"]["name"].as_str(), v["limit"]["per"].as_str()), (Some("connection"), Some("connection")));
        assert_eq!(v["limit"]["requests"], 5);
    }
    // The allowance is spent: a client that honours Retry-After gets in.
    let script = r#"
import json, os, requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry
s = requests.Session()
s.trust_env = False
retry = Retry(total=3, status_forcelist=[429], allowed_methods=["GET"], respect_retry_after_header=True, backoff_factor=0)
s.mount("http://", HTTPAdapter(max_retries=retry))
# Spend what came back since the flood, so the first answer is a refusal.
for _ in range(10):
    r = requests.get(os.environ["URL"], headers={"X-Connection-Id": os.environ["CONN"]},
                     proxies={"http": os.environ["PROXY"]})
    if r.status_code == 429:
        break
first = r.status_code
r = s.get(os.environ["URL"], headers={"X-Connection-Id": os.environ["CONN"]}, proxies={"http": os.environ["PROXY"]})
history = [h.status for h in r.raw.retries.history]
print(json.dumps({"status": r.status_code, "headers": {}, "body": json.dumps({"first": first, "history": history})}))
"#;
    let seen = python_client(script, &[("URL", &url), ("CONN", &conn), ("PROXY", &h.proxy_url())]).await;
    let v = seen.json();
    assert_eq!((seen.status, v["first"].as_u64()), (200, Some(429)), "{v}");
    assert!(v["history"].as_array().is_some_and(|h| h.contains(&json!(429))), "retried after a 429: {v}");
    // Audit lines carry the code; metrics count refusals by integration and limit.
    let audited = h.audit_lines().iter().filter(|l| l["code"] == "rate_limited").count();
    assert!(audited >= refused.len(), "{audited} audit lines with rate_limited");
    let metrics = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("credproxy_quota_limited_total{integration=\"limited\",limit=\"connection\",kind=\"rate\"}")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let n: usize = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n > refused.len(), "{line}");
    assert!(!metrics.contains(&conn), "no connection id in the metrics");
}

/// The same flood with `max_wait = "1s"`: requests wait for their turn
/// instead of being refused while the wait fits; the upstream sees the
/// same rate. A refusal comes only when the wait would exceed a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_wait_turns_refusals_into_delayed_successes() {
    let upstream = LoggedHttpbin::start().await;
    let limits = "[[rate_limits]]\nper = \"connection\"\nrequests = 5\nperiod = \"1s\"\nburst = 5\nmax_wait = \"1s\"\n";
    let h =
        Harness::start_with(Opts { integrations: vec![integration("waiting", limits)], ..Default::default() }).await;
    let conn = connection(&h.admin, "waiting", "wait").await;
    // Ten at once: five pass, five wait 200 ms … 1 s for their turns, none is refused.
    let url = format!("{}/anything/burst", upstream.url);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (url, conn, proxy) = (url.clone(), conn.clone(), h.running.proxy_addr);
        tasks.push(tokio::spawn(async move {
            let (status, ..) = proxy_request(proxy, "GET", &url, Some(&conn), None).await;
            (status, started.elapsed())
        }));
    }
    let mut took = Vec::new();
    for t in tasks {
        let (status, elapsed) = t.await.unwrap();
        assert_eq!(status, 200);
        took.push(elapsed);
    }
    took.sort();
    assert!(took[9] >= Duration::from_millis(950), "the last waited its turn: {took:?}");
    assert!(took[4] < Duration::from_millis(800), "the first five did not wait: {took:?}");
    // A flood: the upstream sees the rate, the waits were served, 429s only past a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let url = format!("{}/anything/flood", upstream.url);
    let started = Instant::now();
    let answers = flood(h.running.proxy_addr, &url, &conn, 20, 3).await;
    let span = started.elapsed().as_secs_f64();
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    assert_eq!(settled(|| upstream.count("/anything/flood"), ok).await, ok);
    let most = 5.0 + 5.0 * span + 2.0;
    assert!(ok >= 18 && (ok as f64) <= most, "{ok} successes in {span:.2} s (at most {most:.1})");
    let delayed = answers.iter().filter(|a| a.0 == 200 && a.3 >= Duration::from_millis(150)).count();
    assert!(delayed >= 10, "{delayed} successes waited for their turn");
    for a in answers.iter().filter(|a| a.0 != 200) {
        assert_refused(a, "rate_limited");
        let secs: u64 = header(&a.1, "retry-after").unwrap().parse().unwrap();
        assert!(secs >= 2, "refused although the wait fit in max_wait: Retry-After {secs}");
        assert!(
            a.3 < Duration::from_millis(900),
            "a refusal comes at once, not after waiting its max_wait of 1 s: {:?}",
            a.3
        );
    }
}

/// An in-flight cap of 2 with a slow upstream (httpbin's /drip streams its
/// body): the third concurrent request is refused; a place frees when a
/// streamed body ends, and when a client disconnects mid-body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_cap_frees_at_the_end_of_the_body_and_on_disconnect() {
    use http_body_util::BodyExt;
    let limits = "[[in_flight_limits]]\nper = \"connection\"\nmax_in_flight = 2\n";
    let h = Harness::start_with(Opts { integrations: vec![integration("capped", limits)], ..Default::default() }).await;
    let conn = connection(&h.admin, "capped", "cap").await;
    let proxy = h.running.proxy_addr;
    let base = httpbin();
    // A streamed response: its head at once, its body over `secs` seconds.
    let open = |secs: u32| {
        let (url, conn) = (format!("{base}/drip?duration={secs}&numbytes={}&delay=0", secs * 10), conn.clone());
        async move {
            let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
            let (mut tx, c) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
            let driver = tokio::spawn(c);
            let uri: http::Uri = url.parse().unwrap();
            let req = http::Request::builder()
                .uri(&uri)
                .header("host", uri.authority().unwrap().as_str())
                .header("x-connection-id", &conn)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            (resp, driver)
        }
    };
    let quick = format!("{base}/get");
    let (short, _d1) = open(1).await;
    let (_long, _d2) = open(8).await;
    let third = proxy_request(proxy, "GET", &quick, Some(&conn), None).await;
    let v = assert_refused(&(third.0, third.1, third.2, Duration::ZERO), "in_flight_limit");
    assert_eq!(v["limit"]["max_in_flight"], 2);
    // The short body ends: its place is free.
    let body = short.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 10);
    assert!(
        answered_within(proxy, &quick, &conn, Duration::from_secs(1)).await,
        "the place of a finished body came back"
    );
    // Two in flight again; then a client goes away mid-body.
    let (dropped, driver) = open(8).await;
    assert_eq!(proxy_request(proxy, "GET", &quick, Some(&conn), None).await.0, 429);
    drop(dropped);
    driver.abort();
    let freed = answered_within(proxy, &quick, &conn, Duration::from_secs(4)).await;
    assert!(freed, "the place of a disconnected client came back (its body had 6 s to go)");
}

/// A server block for nginx: 429s with `Retry-After` (and one with only
/// `RateLimit-Reset`), everything else 200.
const NGINX_LOCATIONS: &str = r#"
    location = /limited { add_header Retry-After 2 always; return 429 "slow down\n"; }
    location = /limited3 { add_header Retry-After 3 always; return 429 "slow down\n"; }
    location = /reset { add_header RateLimit-Reset 2 always; return 429 "slow down\n"; }
    location / { return 200 "ok\n"; }
"#;

/// An upstream 429 with `Retry-After: 2` reaches its caller untouched;
/// for the next 2 s credproxy answers that connection's requests itself
/// (counted at nginx: none arrive), then they flow again. Other
/// connections are not held back, unless the integration says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_cools_the_connection_down_for_its_retry_after() {
    let nginx = Nginx::start(NGINX_LOCATIONS).await;
    let h = Harness::start_with(Opts {
        integrations: vec![
            integration("cooling", ""),
            integration("cooling-all", "[backoff]\nper = \"integration\"\n"),
            integration("resetting", "[backoff]\nreset_headers = [\"ratelimit-reset\"]\n"),
            integration("ignoring", "[backoff]\nrespect_retry_after = false\n"),
        ],
        ..Default::default()
    })
    .await;
    let proxy = h.running.proxy_addr;
    let (a, b) = (connection(&h.admin, "cooling", "a").await, connection(&h.admin, "cooling", "b").await);
    let ok = format!("{}/ok", nginx.url);

    let (status, headers, body) = proxy_request(proxy, "GET", &format!("{}/limited", nginx.url), Some(&a), None).await;
    assert_eq!((status, body.as_slice()), (429, &b"slow down\n"[..]), "the upstream's own answer");
    assert_eq!(header(&headers, "retry-after"), Some("2"));
    assert_eq!(header(&headers, "proxy-status"), None, "not credproxy's");
    let learnt = Instant::now();
    let r = proxy_request(proxy, "GET", &ok, Some(&a), None).await;
    let v = assert_refused(&(r.0, r.1.clone(), r.2, Duration::ZERO), "upstream_cooling_down");
    let secs: u64 = header(&r.1, "retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs), "the remaining Retry-After: {secs}");
    assert_eq!(v["limit"]["per"], "connection");
    // The admin API shows it.
    let shown = h.admin.call(Method::GET, &format!("/v1/connections/{a}"), None).await.unwrap();
    assert_eq!(shown["cooldown"]["scope"], "connection", "{shown}");
    assert!(shown["cooldown"]["until"].is_string());
    let other = h.admin.call(Method::GET, &format!("/v1/connections/{b}"), None).await.unwrap();
    assert_eq!(other["cooldown"], Value::Null);
    // Another connection of the integration is not held back.
    assert_eq!(proxy_request(proxy, "GET", &ok, Some(&b), None).await.0, 200);
    let mut refused = 1;
    while learnt.elapsed() < Duration::from_millis(1800) {
        assert_eq!(proxy_request(proxy, "GET", &ok, Some(&a), None).await.0, 429);
        refused += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(nginx.count("/ok"), 1, "only b's request reached the upstream during a's cool-down");
    // Then it flows again.
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(learnt.elapsed())).await;
    assert!(answered_within(proxy, &ok, &a, Duration::from_secs(1)).await, "requests flow again after the cool-down");
    let metrics = curl(&[&format!("{}/metrics", h.admin_url())], &[]).await.text();
    let refusals = format!("credproxy_quota_cooldown_refusals_total{{integration=\"cooling\"}} {refused}\n");
    assert!(metrics.contains(&refusals), "{refusals} in {metrics}");
    assert!(metrics.contains("credproxy_quota_cooldowns_started_total{integration=\"cooling\"} 1\n"));

    // per = "integration": one connection's 429 holds back every connection.
    let (c, d) = (connection(&h.admin, "cooling-all", "c").await, connection(&h.admin, "cooling-all", "d").await);
    assert_eq!(proxy_request(proxy, "GET", &format!("{}/limited", nginx.url), Some(&c), None).await.0, 429);
    let r = proxy_request(proxy, "GET", &ok, Some(&d), None).await;
    assert_refused(&(r.0, r.1, r.2, Duration::ZERO), "upstream_cooling_down");
    // Opted-in reset fields count like Retry-After; opting out ignores both.
    let e = connection(&h.admin, "resetting", "e").await;
    assert_eq!(proxy_request(proxy, "GET", &format!("{}/reset", nginx.url), Some(&e), None).await.0, 429);
    assert_eq!(proxy_request(proxy, "GET", &ok, Some(&e), None).await.0, 429);
    let f = connection(&h.admin, "ignoring", "f").await;
    assert_eq!(proxy_request(proxy, "GET", &format!("{}/limited", nginx.url), Some(&f), None).await.0, 429);
    assert_eq!(proxy_request(proxy, "GET", &ok, Some(&f), None).await.0, 200);
}

/// An integration-level limit is shared by the integration's connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integration_limit_is_shared_by_its_connections() {
    let limits = "[[rate_limits]]\nname = \"app\"\nper = \"integration\"\nrequests = 4\nperiod = \"1m\"\n";
    let h =
        Harness::start_with(Opts { integrations: vec![integration("shared-app", limits)], ..Default::default() }).await;
    let (a, b) = (connection(&h.admin, "shared-app", "a").await, connection(&h.admin, "shared-app", "b").await);
    // The admin API shows the quotas in force.
    let shown = h.admin.call(Method::GET, "/v1/integrations/shared-app", None).await.unwrap();
    let limit = &shown["quotas"]["rate_limits"][0];
    assert_eq!(
        (limit["name"].as_str(), limit["per"].as_str(), limit["requests"].as_u64()),
        (Some("app"), Some("integration"), Some(4))
    );
    assert_eq!(shown["quotas"]["backoff"]["respect_retry_after"], true);
    let url = format!("{}/get", httpbin());
    let proxy = h.running.proxy_addr;
    for conn in [&a, &b, &a, &b] {
        assert_eq!(proxy_request(proxy, "GET", &url, Some(conn), None).await.0, 200);
    }
    for conn in [&a, &b] {
        let r = proxy_request(proxy, "GET", &url, Some(conn), None).await;
        let v = assert_refused(&(r.0, r.1.clone(), r.2, Duration::ZERO), "rate_limited");
        assert_eq!((v["limit"]["name"].as_str(), v["limit"]["per"].as_str()), (Some("app"), Some("integration")));
        assert_eq!(header(&r.1, "retry-after"), Some("15"), "one request's share of a minute");
    }
}

/// Three instances on one PostgreSQL database: a cool-down learnt by one
/// is honoured by the other two within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cool_down_reaches_the_other_instances_within_a_second() {
    let nginx = Nginx::start(NGINX_LOCATIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let ints = dir.path().join("integrations");
    std::fs::create_dir(&ints).unwrap();
    let (name, text) = integration("cooling", "");
    std::fs::write(ints.join(name), text).unwrap();
    let db = fresh_postgres_database().await;
    let config = dir.path().join("credproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\norg_id = \"{ORG}\"\n[public]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[admin.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\n[store]\nurl = \"{db}\"\n[crypto]\nkey_file = \"{}\"\n\
             [egress]\nallow_cidrs = [\"127.0.0.0/8\"]\n[integrations]\ndir = \"{}\"\n",
            dir.path().join("master.key").display(),
            ints.display(),
        ),
    )
    .unwrap();
    let a = spawn_instance(&config).await;
    let (b, c) = tokio::join!(spawn_instance(&config), spawn_instance(&config));
    let conn = connection(&a.admin, "cooling", "pg").await;
    let ok = format!("{}/ok", nginx.url);
    // Each instance has the connection cached and reaches the upstream.
    for i in [&a, &b, &c] {
        assert_eq!(proxy_request(i.proxy, "GET", &ok, Some(&conn), None).await.0, 200);
    }
    assert_eq!(proxy_request(a.proxy, "GET", &format!("{}/limited3", nginx.url), Some(&conn), None).await.0, 429);
    let learnt = Instant::now();
    for i in [&b, &c] {
        loop {
            let r = proxy_request(i.proxy, "GET", &ok, Some(&conn), None).await;
            if r.0 == 429 {
                assert_refused(&(r.0, r.1, r.2, Duration::ZERO), "upstream_cooling_down");
                break;
            }
            assert!(learnt.elapsed() < Duration::from_secs(1), "another instance still calls the upstream after 1 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(learnt.elapsed() < Duration::from_secs(1), "{:?}", learnt.elapsed());
    let shown = b.admin.call(Method::GET, &format!("/v1/connections/{conn}"), None).await.unwrap();
    assert_eq!(shown["cooldown"]["scope"], "connection", "{shown}");
    // Requests that raced the notification may have reached nginx; none after.
    let before = nginx.count("/ok");
    for i in [&a, &b, &c] {
        assert_eq!(proxy_request(i.proxy, "GET", &ok, Some(&conn), None).await.0, 429);
    }
    assert_eq!(nginx.count("/ok"), before);
}
