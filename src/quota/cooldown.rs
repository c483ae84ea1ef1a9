//! Cool-downs: an upstream said "come back later" for a connection (or a
//! whole integration), so until then credproxy answers for it. Learnt from
//! a response here, or from another instance through the store's
//! notification channel (`scope integration key until_ms`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::{whole_secs, CooldownScope, Refusal, Refused};
use crate::store::Store;

/// A cool-down in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCooldown {
    pub scope: CooldownScope,
    /// Unix time in milliseconds.
    pub until_ms: i64,
    pub retry_after_secs: u64,
}

struct Entry {
    integration: Arc<str>,
    until_ms: i64,
}

/// Per integration: cool-downs started and requests answered for them.
#[derive(Default)]
struct Counters {
    started: AtomicU64,
    refused: AtomicU64,
}

pub(super) struct Cooldowns {
    /// Entries in `map`: zero means no lock and no lookup on the request path.
    count: AtomicUsize,
    map: Mutex<HashMap<(CooldownScope, Box<str>), Entry>>,
    /// Per known integration (a reload adds; counters never go away).
    counters: std::sync::RwLock<HashMap<Arc<str>, Arc<Counters>>>,
    /// Where cool-downs are published to the other instances (PostgreSQL).
    store: Option<Arc<dyn Store>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Cooldowns {
    pub(super) fn new(integrations: impl Iterator<Item = String>, store: Option<Arc<dyn Store>>) -> Self {
        let this = Self {
            count: AtomicUsize::new(0),
            map: Mutex::new(HashMap::new()),
            counters: std::sync::RwLock::new(HashMap::new()),
            store,
        };
        this.know(integrations);
        this
    }

    /// Integrations cool-downs may be learnt for (a reload adds to them).
    pub(super) fn know(&self, integrations: impl Iterator<Item = String>) {
        let mut counters = self.counters.write().unwrap_or_else(|p| p.into_inner());
        for i in integrations {
            counters.entry(Arc::from(i)).or_default();
        }
    }

    /// A known integration's name (shared) and counters.
    fn counters_of(&self, integration: &str) -> Option<(Arc<str>, Arc<Counters>)> {
        let counters = self.counters.read().unwrap_or_else(|p| p.into_inner());
        counters.get_key_value(integration).map(|(k, v)| (k.clone(), v.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(CooldownScope, Box<str>), Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refusal for a request of `connection` while it or `integration`
    /// cools down.
    /// A cool-down is in force somewhere.
    pub(super) fn any(&self) -> bool {
        self.count.load(Relaxed) != 0
    }

    pub(super) fn refusal(&self, integration: &str, connection: &str) -> Option<Refusal> {
        if self.count.load(Relaxed) == 0 {
            return None;
        }
        let active = self.active(integration, connection)?;
        if let Some((_, c)) = self.counters_of(integration) {
            c.refused.fetch_add(1, Relaxed);
        }
        let whom = match active.scope {
            CooldownScope::Connection => "this connection",
            CooldownScope::Integration => "every connection of this integration",
        };
        Some(Refusal {
            kind: Refused::Cooldown,
            integration: integration.to_owned(),
            retry_after_secs: active.retry_after_secs,
            limit: json!({"kind": "cooldown", "per": active.scope.as_str(), "until_ms": active.until_ms}),
            description: format!(
                "the upstream of integration {integration} answered 429/503 with Retry-After: {whom} cools down \
                 until then"
            ),
        })
    }

    pub(super) fn active(&self, integration: &str, connection: &str) -> Option<ActiveCooldown> {
        if self.count.load(Relaxed) == 0 {
            return None;
        }
        let now = now_ms();
        let mut map = self.lock();
        let mut found: Option<ActiveCooldown> = None;
        for (scope, key) in [(CooldownScope::Connection, connection), (CooldownScope::Integration, integration)] {
            let k = (scope, Box::<str>::from(key));
            let Some(e) = map.get(&k) else { continue };
            if scope == CooldownScope::Connection && &*e.integration != integration {
                continue;
            }
            if e.until_ms <= now {
                map.remove(&k);
                self.count.fetch_sub(1, Relaxed);
                continue;
            }
            let c = ActiveCooldown {
                scope,
                until_ms: e.until_ms,
                retry_after_secs: whole_secs(Duration::from_millis((e.until_ms - now) as u64)),
            };
            if found.as_ref().is_none_or(|f| c.until_ms > f.until_ms) {
                found = Some(c);
            }
        }
        found
    }

    /// Starts (or lengthens) a cool-down learnt here, and tells the others.
    pub(super) fn start(&self, scope: CooldownScope, integration: &str, key: &str, lasts: Duration) {
        let until_ms = now_ms() + lasts.as_millis() as i64;
        if let Some((_, c)) = self.counters_of(integration) {
            c.started.fetch_add(1, Relaxed);
        }
        tracing::info!(
            integration,
            scope = scope.as_str(),
            key,
            secs = lasts.as_secs_f64(),
            "upstream asked to back off; cooling down"
        );
        self.insert(scope, integration, key, until_ms);
        if let Some(store) = self.store.clone() {
            let payload = format!("{} {integration} {key} {until_ms}", scope.as_str());
            tokio::spawn(async move {
                if let Err(e) = store.publish_cooldown(&payload).await {
                    tracing::warn!(error = %e, "publishing a cool-down to the other instances failed");
                }
            });
        }
    }

    fn insert(&self, scope: CooldownScope, integration: &str, key: &str, until_ms: i64) {
        let Some((integration, _)) = self.counters_of(integration) else { return };
        let mut map = self.lock();
        let e = map.entry((scope, key.into())).or_insert_with(|| {
            self.count.fetch_add(1, Relaxed);
            Entry { integration, until_ms }
        });
        e.until_ms = e.until_ms.max(until_ms);
    }

    /// A cool-down another instance learnt (`scope integration key
    /// until_ms`); anything else is ignored.
    pub(super) fn apply_remote(&self, payload: &str) {
        let mut parts = payload.split(' ');
        let (Some(scope), Some(integration), Some(key), Some(until), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let scope = match scope {
            "connection" => CooldownScope::Connection,
            "integration" => CooldownScope::Integration,
            _ => return,
        };
        let Ok(until_ms) = until.parse::<i64>() else { return };
        if until_ms > now_ms() {
            self.insert(scope, integration, key, until_ms);
        }
    }

    pub(super) fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let counters = self.counters.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut ids: Vec<&Arc<str>> = counters.keys().collect();
        ids.sort();
        let now = now_ms();
        let mut active: HashMap<Arc<str>, u64> = HashMap::new();
        if self.count.load(Relaxed) > 0 {
            for e in self.lock().values().filter(|e| e.until_ms > now) {
                *active.entry(e.integration.clone()).or_default() += 1;
            }
        }
        let mut rows = |name: &str, kind: &str, help: &str, value: &dyn Fn(&str) -> u64| {
            crate::metrics::header(out, name, kind, help);
            for id in &ids {
                let _ = writeln!(out, "{name}{{integration=\"{id}\"}} {}", value(id));
            }
        };
        rows(
            "credproxy_quota_cooldowns_started_total",
            "counter",
            "Cool-downs started by an upstream's 429/503 with Retry-After (learnt here).",
            &|id| counters[id].started.load(Relaxed),
        );
        rows(
            "credproxy_quota_cooldown_refusals_total",
            "counter",
            "Requests answered 429 during a cool-down, without calling the upstream.",
            &|id| counters[id].refused.load(Relaxed),
        );
        rows("credproxy_quota_cooldowns_active", "gauge", "Cool-downs in force.", &|id| {
            active.get(id).copied().unwrap_or(0)
        });
    }
}
