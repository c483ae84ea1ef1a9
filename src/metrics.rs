//! Prometheus metrics, served as text on the admin port (`GET /metrics`).
//!
//! Everything on the request path is a relaxed atomic: no lock, no
//! allocation. Label values are bounded sets fixed at start (configured
//! integration ids, status classes, problem codes): never a connection id,
//! a host, or anything a caller controls.
//!
//! Imports only `problem` (the codes it counts by).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::problem::Code;

/// Upstream latency histogram bounds, seconds.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Label for requests without a (resolved) connection.
const NO_INTEGRATION: &str = "none";

/// Counters owned by the connection service (cache, refresh, row lock).
#[derive(Debug, Default)]
pub struct CredsStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Entries dropped for size or age (not explicit invalidations).
    pub cache_evictions: AtomicU64,
    pub refreshes: AtomicU64,
    pub refresh_failures: AtomicU64,
    /// Row-lock acquisitions for a refresh, and the time spent waiting.
    pub lock_waits: AtomicU64,
    pub lock_wait_micros: AtomicU64,
    pub lock_timeouts: AtomicU64,
}

struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self { buckets: Default::default(), count: AtomicU64::new(0), sum_micros: AtomicU64::new(0) }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Non-cumulative here; rendering accumulates.
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }
}

pub struct Metrics {
    /// Integration id → row in `requests`; the last row is `none`.
    integrations: HashMap<String, usize, ahash::RandomState>,
    names: Vec<String>,
    /// Per integration: 1xx..5xx.
    requests: Vec<[AtomicU64; 5]>,
    errors: Vec<AtomicU64>,
    upstream_latency: Histogram,
    in_flight: AtomicI64,
    client_connections: AtomicI64,
    client_connections_refused: AtomicU64,
    audit_lines: AtomicU64,
    audit_write_errors: AtomicU64,
    /// Webhook deliveries (the events outbox).
    pub webhooks: WebhookStats,
}

/// Webhook delivery counters.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    /// Attempts that failed and were scheduled again.
    pub retried: AtomicU64,
    /// Deliveries given up (`events.retry_for_secs` passed).
    pub failed: AtomicU64,
    /// From each delivered event's creation to its delivery, summed.
    pub latency_micros: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("integrations", &self.names).finish_non_exhaustive()
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub fn new<'a>(integration_ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names: Vec<String> = integration_ids.into_iter().map(str::to_owned).collect();
        names.sort();
        names.dedup();
        names.push(NO_INTEGRATION.to_owned());
        let integrations = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        Self {
            integrations,
            requests: names.iter().map(|_| Default::default()).collect(),
            names,
            errors: Code::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            upstream_latency: Histogram::new(),
            in_flight: AtomicI64::new(0),
            client_connections: AtomicI64::new(0),
            client_connections_refused: AtomicU64::new(0),
            audit_lines: AtomicU64::new(0),
            audit_write_errors: AtomicU64::new(0),
            webhooks: WebhookStats::default(),
        }
    }

    /// A proxied request finished with `status` (its response head was sent).
    pub fn request(&self, integration: Option<&str>, status: u16) {
        self.request_in(self.row(integration), status);
    }

    /// The row of `integration`'s request counters (integrations loaded
    /// after start, and requests of none, count under `other`). The rows
    /// are fixed at start: a caller connection may keep one.
    pub fn row(&self, integration: Option<&str>) -> usize {
        integration.and_then(|i| self.integrations.get(i)).copied().unwrap_or(self.names.len() - 1)
    }

    /// [`Metrics::request`] with its row found.
    pub fn request_in(&self, row: usize, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        if let Some(row) = self.requests.get(row) {
            row[class].fetch_add(1, Relaxed);
        }
    }

    /// credproxy answered with a problem of this code.
    pub fn error(&self, code: Code) {
        self.errors[code.index()].fetch_add(1, Relaxed);
    }

    /// Time from sending a request upstream to its response head.
    pub fn upstream_latency(&self, d: Duration) {
        self.upstream_latency.observe(d);
    }

    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(&self.in_flight)
    }

    /// An accepted client connection; the guard marks its end.
    pub fn client_connection(&self) -> InFlight<'_> {
        self.client_connections.fetch_add(1, Relaxed);
        InFlight(&self.client_connections)
    }

    /// A client connection closed at once because `proxy.max_connections` was reached.
    pub fn client_connection_refused(&self) {
        self.client_connections_refused.fetch_add(1, Relaxed);
    }

    /// An audit line was handed to the audit sink.
    pub fn audit_line(&self) {
        self.audit_lines.fetch_add(1, Relaxed);
    }

    /// Writing a batch of audit lines failed (the batch is lost).
    pub fn audit_write_error(&self) {
        self.audit_write_errors.fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    /// `upstream`: connections the upstream pool opened and reused;
    /// `tls`: leaf certificates minted and served from the cache.
    pub fn render(&self, creds: &CredsStats, upstream: (u64, u64), tls: Option<(u64, u64)>, draining: bool) -> String {
        let mut out = String::with_capacity(8192);
        let w = &mut out;
        header(w, "credproxy_requests_total", "counter", "Proxied requests by integration and status class.");
        for (name, row) in self.names.iter().zip(&self.requests) {
            for (i, c) in row.iter().enumerate() {
                let v = c.load(Relaxed);
                let _ = writeln!(w, "credproxy_requests_total{{integration=\"{name}\",status=\"{}xx\"}} {v}", i + 1);
            }
        }
        header(w, "credproxy_proxy_errors_total", "counter", "Responses made by credproxy, by problem code.");
        for (code, c) in Code::ALL.iter().zip(&self.errors) {
            let _ = writeln!(w, "credproxy_proxy_errors_total{{code=\"{code}\"}} {}", c.load(Relaxed));
        }
        let h = &self.upstream_latency;
        header(w, "credproxy_upstream_latency_seconds", "histogram", "Upstream time to response head.");
        let mut cumulative = 0;
        for (bound, c) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(w, "credproxy_upstream_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = h.count.load(Relaxed);
        let _ = writeln!(w, "credproxy_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(w, "credproxy_upstream_latency_seconds_sum {}", h.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(w, "credproxy_upstream_latency_seconds_count {count}");

        let counters: [(&str, &str, u64); 17] = [
            ("credproxy_upstream_connections_opened_total", "Upstream connections opened.", upstream.0),
            (
                "credproxy_upstream_connections_reused_total",
                "Upstream requests sent on a pooled connection.",
                upstream.1,
            ),
            ("credproxy_cache_hits_total", "Connection lookups served from the cache.", creds.cache_hits.load(Relaxed)),
            (
                "credproxy_cache_misses_total",
                "Connection lookups that went to the store.",
                creds.cache_misses.load(Relaxed),
            ),
            (
                "credproxy_cache_evictions_total",
                "Cached connections dropped for size or age.",
                creds.cache_evictions.load(Relaxed),
            ),
            ("credproxy_refreshes_total", "OAuth2 tokens obtained by a refresh.", creds.refreshes.load(Relaxed)),
            (
                "credproxy_refresh_failures_total",
                "OAuth2 refreshes that failed (provider error, invalid_grant).",
                creds.refresh_failures.load(Relaxed),
            ),
            ("credproxy_refresh_lock_waits_total", "Row locks taken for a refresh.", creds.lock_waits.load(Relaxed)),
            (
                "credproxy_refresh_lock_timeouts_total",
                "Refreshes abandoned because the row lock was not granted in time.",
                creds.lock_timeouts.load(Relaxed),
            ),
            (
                "credproxy_client_connections_refused_total",
                "Client connections closed at once because proxy.max_connections was reached.",
                self.client_connections_refused.load(Relaxed),
            ),
            (
                "credproxy_audit_lines_total",
                "Audit lines written (credential uses, admin actions).",
                self.audit_lines.load(Relaxed),
            ),
            (
                "credproxy_audit_write_errors_total",
                "Batches of audit lines the audit sink failed to write.",
                self.audit_write_errors.load(Relaxed),
            ),
            (
                "credproxy_webhook_deliveries_total",
                "Events delivered to webhook endpoints (2xx).",
                self.webhooks.delivered.load(Relaxed),
            ),
            (
                "credproxy_webhook_retries_total",
                "Webhook delivery attempts that failed and were scheduled again.",
                self.webhooks.retried.load(Relaxed),
            ),
            (
                "credproxy_webhook_failures_total",
                "Webhook deliveries given up after events.retry_for_secs.",
                self.webhooks.failed.load(Relaxed),
            ),
            ("credproxy_leaf_certs_minted_total", "Interception leaf certificates minted.", tls.map_or(0, |t| t.0)),
            (
                "credproxy_leaf_cert_cache_hits_total",
                "Intercepted tunnels served with a cached leaf.",
                tls.map_or(0, |t| t.1),
            ),
        ];
        for (name, help, v) in counters {
            header(w, name, "counter", help);
            let _ = writeln!(w, "{name} {v}");
        }
        header(
            w,
            "credproxy_webhook_delivery_latency_seconds_total",
            "counter",
            "From each delivered event's creation to its delivery, summed (divide by the deliveries).",
        );
        let _ = writeln!(
            w,
            "credproxy_webhook_delivery_latency_seconds_total {}",
            self.webhooks.latency_micros.load(Relaxed) as f64 / 1e6
        );
        header(w, "credproxy_refresh_lock_wait_seconds_total", "counter", "Time spent waiting for refresh row locks.");
        let _ = writeln!(
            w,
            "credproxy_refresh_lock_wait_seconds_total {}",
            creds.lock_wait_micros.load(Relaxed) as f64 / 1e6
        );
        let gauges: [(&str, &str, i64); 3] = [
            (
                "credproxy_requests_in_flight",
                "Proxied requests waiting for their response head.",
                self.in_flight.load(Relaxed),
            ),
            (
                "credproxy_client_connections",
                "Open client connections (including CONNECT tunnels).",
                self.client_connections.load(Relaxed),
            ),
            ("credproxy_draining", "1 while shutting down (readyz answers 503).", i64::from(draining)),
        ];
        for (name, help, v) in gauges {
            header(w, name, "gauge", help);
            let _ = writeln!(w, "{name} {v}");
        }
        out
    }

    /// The outbox's queue, read from the store at scrape time: deliveries
    /// waiting and given up (`None`: the store did not answer).
    pub fn render_outbox(out: &mut String, counts: Option<(u64, u64)>) {
        let Some((pending, failed)) = counts else { return };
        header(
            out,
            "credproxy_webhook_deliveries_pending",
            "gauge",
            "Webhook deliveries waiting (due or backing off).",
        );
        let _ = writeln!(out, "credproxy_webhook_deliveries_pending {pending}");
        header(
            out,
            "credproxy_webhook_deliveries_failed",
            "gauge",
            "Webhook deliveries given up (redeliver to retry).",
        );
        let _ = writeln!(out, "credproxy_webhook_deliveries_failed {failed}");
    }
}

/// `# HELP` and `# TYPE` lines of one metric.
pub fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_and_labels_stay_bounded() {
        let m = Metrics::new(["github", "httpbin"]);
        m.request(Some("httpbin"), 200);
        m.request(Some("httpbin"), 204);
        m.request(Some("httpbin"), 503);
        m.request(Some("conn_or_anything_else"), 404);
        m.request(None, 403);
        m.error(Code::HostNotAllowed);
        m.error(Code::TraceNotAllowed);
        m.upstream_latency(Duration::from_micros(700));
        m.upstream_latency(Duration::from_millis(30));
        let guard = m.in_flight();
        let text = m.render(&CredsStats::default(), (5, 6), Some((3, 4)), false);
        for line in [
            "credproxy_requests_total{integration=\"httpbin\",status=\"2xx\"} 2",
            "credproxy_requests_total{integration=\"httpbin\",status=\"5xx\"} 1",
            "credproxy_requests_total{integration=\"none\",status=\"4xx\"} 2",
            "credproxy_requests_total{integration=\"github\",status=\"2xx\"} 0",
            "credproxy_proxy_errors_total{code=\"host_not_allowed\"} 1",
            "credproxy_proxy_errors_total{code=\"trace_not_allowed\"} 1",
            "credproxy_proxy_errors_total{code=\"request_body_timeout\"} 0",
            "credproxy_upstream_connections_opened_total 5",
            "credproxy_upstream_connections_reused_total 6",
            "credproxy_upstream_latency_seconds_bucket{le=\"0.0005\"} 0",
            "credproxy_upstream_latency_seconds_bucket{le=\"0.001\"} 1",
            "credproxy_upstream_latency_seconds_bucket{le=\"0.05\"} 2",
            "credproxy_upstream_latency_seconds_bucket{le=\"+Inf\"} 2",
            "credproxy_upstream_latency_seconds_count 2",
            "credproxy_requests_in_flight 1",
            "credproxy_leaf_certs_minted_total 3",
            "credproxy_draining 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("conn_or_anything_else"));
        drop(guard);
        assert!(m.render(&CredsStats::default(), (0, 0), None, true).contains("credproxy_requests_in_flight 0\n"));
    }
}
