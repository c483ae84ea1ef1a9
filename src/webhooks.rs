//! Webhook delivery of connection events, from the store's outbox, per the
//! Standard Webhooks specification: `webhook-id` (the event id, the same on
//! every attempt), `webhook-timestamp`, `webhook-signature: v1,<base64
//! HMAC-SHA256 of id.timestamp.body>` with the endpoint's `whsec_` secret.
//!
//! A worker on every instance queues new events per endpoint, claims due
//! deliveries under a lease (on PostgreSQL one instance at a time per
//! delivery: `FOR UPDATE SKIP LOCKED`), POSTs them through the same SSRF
//! guard as proxied traffic, and records the outcome: 2xx is delivered;
//! anything else is retried with exponential backoff and jitter until
//! `events.retry_for_secs` after the event, then marked failed. At least
//! once: a receiver de-duplicates by `webhook-id`.
//!
//! Uses `store`, `upstream`, `policy`, `config`, `metrics`; `server` starts it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use ring::hmac;
use zeroize::Zeroizing;

use crate::config::{EventsConfig, WebhookConfig};
use crate::metrics::Metrics;
use crate::policy::ssrf::EgressPolicy;
use crate::store::{Delivery, DeliveryOutcome, Store};
use crate::telemetry::unix_now;
use crate::upstream::{self, ClientSettings, GuardedConnector};

/// Deliveries claimed per round.
const BATCH: u32 = 32;
/// The first retry waits this long; each next one twice as long (with
/// jitter), up to [`MAX_BACKOFF_SECS`].
const FIRST_BACKOFF_SECS: f64 = 1.0;
const MAX_BACKOFF_SECS: f64 = 3600.0;

/// One configured endpoint.
pub struct Endpoint {
    pub name: String,
    url: Uri,
    key: hmac::Key,
    kinds: Vec<String>,
    org_id: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Endpoint").field("name", &self.name).field("url", &self.url).finish_non_exhaustive()
    }
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(key: &hmac::Key, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref()))
}

/// The HMAC key of a `whsec_…` secret (checked by the configuration).
pub fn key_of(secret: &str) -> Option<hmac::Key> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    let raw = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(b64).ok()?);
    Some(hmac::Key::new(hmac::HMAC_SHA256, &raw))
}

pub struct Webhooks {
    store: Arc<dyn Store>,
    endpoints: Vec<Endpoint>,
    client: Client<HttpsConnector<GuardedConnector>, Full<Bytes>>,
    timeout: Duration,
    retry_for: Duration,
    poll: Duration,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// The worker for `config`'s endpoints; `None` without any.
    pub fn new(
        config: &EventsConfig,
        webhooks: &[WebhookConfig],
        store: Arc<dyn Store>,
        policy: Arc<EgressPolicy>,
        connect_timeout: Duration,
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
        metrics: Arc<Metrics>,
    ) -> Option<Self> {
        if webhooks.is_empty() {
            return None;
        }
        let endpoints = webhooks
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                Some(Endpoint {
                    name: w.name(i),
                    url: w.url.parse().ok()?,
                    key: key_of(w.secret.expose())?,
                    kinds: w.events.clone(),
                    org_id: w.org_id.clone(),
                })
            })
            .collect();
        let settings = ClientSettings {
            connect_timeout,
            extra_roots: extra_roots.to_vec(),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 4,
        };
        Some(Self {
            store,
            endpoints,
            client: upstream::build_client(policy, &settings),
            timeout: config.delivery_timeout,
            retry_for: config.retry_for,
            poll: config.poll_interval,
            metrics,
        })
    }

    /// Delivers until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            // A full batch: there may be more right away.
            while self.round().await == BATCH as usize {
                if *stop.borrow() {
                    return;
                }
            }
        }
    }

    /// Queues new events, claims due deliveries and sends them (at once).
    /// Returns how many were claimed.
    pub async fn round(self: &Arc<Self>) -> usize {
        let now = unix_now();
        let since = now - self.retry_for.as_secs() as i64;
        for e in &self.endpoints {
            if let Err(err) = self.store.enqueue_deliveries(&e.name, &e.kinds, e.org_id.as_deref(), since).await {
                tracing::warn!(endpoint = %e.name, error = %err, "webhooks: queueing events failed");
                return 0;
            }
        }
        // The lease outlasts an attempt: nobody else takes it meanwhile.
        let lease_until = now + self.timeout.as_secs() as i64 + 30;
        let claimed = match self.store.claim_deliveries(now, lease_until, BATCH).await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(error = %err, "webhooks: claiming deliveries failed");
                return 0;
            }
        };
        let n = claimed.len();
        let mut sends = tokio::task::JoinSet::new();
        for d in claimed {
            let this = self.clone();
            sends.spawn(async move { this.deliver(d).await });
        }
        while sends.join_next().await.is_some() {}
        n
    }

    async fn deliver(&self, d: Delivery) {
        let outcome = match self.endpoints.iter().find(|e| e.name == d.endpoint) {
            Some(e) => match self.attempt(&e.url, &e.key, &d).await {
                Ok(()) => DeliveryOutcome::Delivered,
                Err(error) => self.retry_or_fail(&d, error),
            },
            // Removed from the configuration since it was queued.
            None => DeliveryOutcome::Failed { error: "the endpoint is no longer configured".into() },
        };
        let now = unix_now();
        match &outcome {
            DeliveryOutcome::Delivered => {
                let w = &self.metrics.webhooks;
                w.delivered.fetch_add(1, Relaxed);
                w.latency_micros.fetch_add(((now - d.created_at).max(0) as u64) * 1_000_000, Relaxed);
                tracing::debug!(endpoint = %d.endpoint, event = %d.event_id, "webhook delivered");
            }
            DeliveryOutcome::Retry { error, .. } => {
                self.metrics.webhooks.retried.fetch_add(1, Relaxed);
                tracing::info!(endpoint = %d.endpoint, event = %d.event_id, attempt = d.attempts + 1, error = %error, "webhook delivery failed; will retry");
            }
            DeliveryOutcome::Failed { error } => {
                self.metrics.webhooks.failed.fetch_add(1, Relaxed);
                tracing::warn!(endpoint = %d.endpoint, event = %d.event_id, error = %error, "webhook delivery given up");
            }
        }
        if let Err(e) = self.store.finish_delivery(&d.endpoint, &d.event_id, now, &outcome).await {
            // The lease runs out and the delivery is tried again: at least once.
            tracing::warn!(endpoint = %d.endpoint, event = %d.event_id, error = %e, "recording a webhook delivery failed");
        }
    }

    fn retry_or_fail(&self, d: &Delivery, error: String) -> DeliveryOutcome {
        let now = unix_now();
        if now - d.created_at >= self.retry_for.as_secs() as i64 {
            return DeliveryOutcome::Failed { error };
        }
        let backoff = (FIRST_BACKOFF_SECS * 2f64.powi(d.attempts.min(20) as i32)).min(MAX_BACKOFF_SECS);
        // Jitter: 50-150 % of the backoff, so retries of many events spread out.
        let mut b = [0u8; 1];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        let factor = 0.5 + f64::from(b[0]) / 255.0;
        DeliveryOutcome::Retry { next_attempt_at: now + (backoff * factor).ceil() as i64, error }
    }

    async fn attempt(&self, url: &Uri, key: &hmac::Key, d: &Delivery) -> Result<(), String> {
        let timestamp = unix_now();
        let body = Bytes::from(d.payload.clone().into_bytes());
        let signature = sign(key, &d.event_id, timestamp, &body);
        let req = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "credproxy-webhooks")
            .header("webhook-id", &d.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(body))
            .map_err(|e| format!("building the request: {e}"))?;
        let sent = tokio::time::timeout(self.timeout, async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            // Read (and drop) the body so the connection can be reused.
            let _ = resp.into_body().collect().await;
            Ok::<_, hyper_util::client::legacy::Error>(status)
        })
        .await;
        match sent {
            Err(_) => Err(format!("no answer within {} s", self.timeout.as_secs())),
            Ok(Err(e)) => Err(match upstream::find_connect_error(&e) {
                Some(c) => format!("connect: {c}"),
                None => format!("request failed: {e}"),
            }),
            Ok(Ok(s)) if s.is_success() => Ok(()),
            Ok(Ok(s)) => Err(format!("status {}", s.as_u16())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's own example.
    #[test]
    fn signs_like_the_specification() {
        let key = key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
