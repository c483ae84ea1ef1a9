//! Provider quotas on the request path (step 7 of the life of a request):
//! rate limits (GCRA) and in-flight caps per connection, organization or
//! integration, and cool-downs learnt from an upstream's `429`/`503` with
//! `Retry-After`, shared with the other instances through the store.
//!
//! [`Quotas::check`] is synchronous and cheap: an integration without
//! limits costs one hash lookup, and no cool-down anywhere costs one atomic
//! load. Only a request that has to wait gets a future of its own.
//!
//! Limits are kept by each instance; `limits.instances` divides a declared
//! quota among them. The rate limits that apply to a request are decided
//! together, all or none: a request refused by one spends no cell of the
//! others. A request refused by an in-flight cap has spent its rate cells
//! (caps are checked after the rates, and after any wait for them).
//!
//! Imports `config` (the limits as written), `integrations`, `store`
//! (publishing cool-downs), `metrics` and `telemetry`.

mod cooldown;
mod limiters;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

pub use crate::config::limits::{Backoff, CooldownScope, InFlightLimit, Per, RateLimit, MAX_LIMITS};
use crate::config::LimitsConfig;
use crate::integrations::Integrations;
use crate::store::Store;
use arc_swap::ArcSwap;
pub use cooldown::ActiveCooldown;
use cooldown::Cooldowns;
use limiters::{nanos_since, Gcra, Keyed};

const _: () = assert!(MAX_LIMITS <= 8, "IntegrationQuota::caps_for's mask is a u8");

/// Every integration's limiters and the cool-downs in force.
pub struct Quotas {
    /// Swapped whole by a reload; a limiter whose integration declares
    /// the same limits carries over (its state with it).
    table: ArcSwap<Table>,
    defaults: LimitsConfig,
    cooldowns: Cooldowns,
    epoch: Instant,
    /// Some integration has a rate limit or an in-flight cap.
    limited: std::sync::atomic::AtomicBool,
    /// Bumped after each reload's table is in place: a [`KeyMemo`]'s
    /// integration entry of an earlier generation is looked up again.
    generation: std::sync::atomic::AtomicU64,
}

/// The limiters and back-off policies of one set of integrations.
#[derive(Default)]
struct Table {
    /// Integrations with a rate limit or an in-flight cap.
    limited: HashMap<String, Arc<IntegrationQuota>, ahash::RandomState>,
    /// Each integration's back-off policy.
    backoff: HashMap<String, Backoff, ahash::RandomState>,
}

impl Table {
    /// `integrations`' limits (their own, else `defaults`'), reusing
    /// `before`'s limiter of an integration whose limits did not change.
    fn build(defaults: &LimitsConfig, integrations: &Integrations, before: Option<&Table>) -> Self {
        let mut t = Self::default();
        for i in integrations.iter() {
            let rates = i.quotas.rate_limits.as_ref().unwrap_or(&defaults.rate_limits);
            let caps = i.quotas.in_flight_limits.as_ref().unwrap_or(&defaults.in_flight_limits);
            t.backoff.insert(i.id.clone(), i.quotas.backoff.clone().unwrap_or_else(|| defaults.backoff.clone()));
            if rates.is_empty() && caps.is_empty() {
                continue;
            }
            let kept =
                before.and_then(|b| b.limited.get(&i.id)).filter(|q| q.declared(rates, caps, defaults.instances));
            let q = match kept {
                Some(q) => q.clone(),
                None => Arc::new(IntegrationQuota::new(&i.id, rates, caps, defaults.instances)),
            };
            t.limited.insert(i.id.clone(), q);
        }
        t
    }
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.load();
        f.debug_struct("Quotas").field("limited", &t.limited.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A rate limit (`rate_limited`).
    Rate,
    /// An in-flight cap (`in_flight_limit`).
    InFlight,
    /// A cool-down an upstream asked for (`upstream_cooling_down`).
    Cooldown,
}

/// A request refused, and when to try again.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: Refused,
    pub integration: String,
    /// Whole seconds, rounded up, at least 1.
    pub retry_after_secs: u64,
    /// What the caller reads about the limit (`name`, `per`, the numbers).
    pub limit: Value,
    /// One line for the caller: which limit, its numbers.
    pub description: String,
}

/// What [`Quotas::check`] decided.
pub enum Verdict {
    /// Go on; the permit (if any) holds in-flight places until dropped.
    Go(Option<Permit>),
    /// Go on once this resolves (a reserved rate cell, a free in-flight place).
    Wait(Pin<Box<dyn Future<Output = Result<Option<Permit>, Refusal>> + Send>>),
    No(Refusal),
}

impl Quotas {
    /// The limits of every integration (their own, else `defaults`'), for
    /// one of `defaults.instances` instances.
    pub fn new(defaults: &LimitsConfig, integrations: &Integrations, store: Option<Arc<dyn Store>>) -> Self {
        let table = Table::build(defaults, integrations, None);
        let limited = std::sync::atomic::AtomicBool::new(!table.limited.is_empty());
        let cooldowns = Cooldowns::new(integrations.iter().map(|i| i.id.clone()), store);
        Self {
            table: ArcSwap::from_pointee(table),
            defaults: defaults.clone(),
            cooldowns,
            epoch: Instant::now(),
            limited,
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// No limits and no back-off anywhere (tests, benches).
    pub fn none() -> Self {
        Self {
            table: ArcSwap::from_pointee(Table::default()),
            defaults: LimitsConfig::default(),
            cooldowns: Cooldowns::new(std::iter::empty(), None),
            epoch: Instant::now(),
            limited: std::sync::atomic::AtomicBool::new(false),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The limits of a reloaded set of integrations. Limiters of
    /// integrations whose limits are unchanged keep their state; cool-downs
    /// in force stay.
    pub fn reload(&self, integrations: &Integrations) {
        let before = self.table.load();
        self.install(Table::build(&self.defaults, integrations, Some(&before)));
        self.cooldowns.know(integrations.iter().map(|i| i.id.clone()));
    }

    /// Puts a new table in force: the memos of caller connections look
    /// their integrations up again.
    fn install(&self, table: Table) {
        self.limited.store(!table.limited.is_empty(), Relaxed);
        self.table.store(Arc::new(table));
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Admits a request of `connection` (of `org`) to `path` of
    /// `integration`, makes it wait for its turn, or refuses it.
    /// Whether [`Quotas::check`] can do anything but let a request go: a
    /// limit somewhere, or a cool-down in force (two atomic loads). A
    /// request that skips the check when this is false is let go as the
    /// check would let it go.
    pub fn may_apply(&self) -> bool {
        self.limited.load(Relaxed) || self.cooldowns.any()
    }

    pub fn check(&self, integration: &str, connection: &str, org: &str, path: &str) -> Verdict {
        self.check_with(integration, connection.as_bytes(), org, path, Instant::now(), &mut KeyMemo::default())
    }

    /// [`Quotas::check`] with the limiter keys of a caller connection's
    /// last request (`memo`): a keep-alive caller mostly repeats its
    /// connection, and hashing a key cost ~120 instructions a limit.
    /// `now`: when the request started, or later (the proxy's pipeline
    /// passes its start unless it waited since, for a credential): a wait
    /// counted from it is too long by the gap (microseconds), but ends at
    /// the same moment — GCRA's turns are times, not durations — and the
    /// request path reads no clock for it.
    pub fn check_with(
        &self,
        integration: &str,
        connection: &[u8],
        org: &str,
        path: &str,
        now: Instant,
        memo: &mut KeyMemo,
    ) -> Verdict {
        // The id as text only when a cool-down is in force somewhere.
        if self.cooldowns.any() {
            let text = std::str::from_utf8(connection).unwrap_or_default();
            if let Some(r) = self.cooldowns.refusal(integration, text) {
                return Verdict::No(r);
            }
        }
        // The integration's limiters as this caller connection last found
        // them, unless a reload came since.
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if !memo.found(generation, integration) {
            let q = self.table.load().limited.get(integration).cloned();
            memo.find(generation, integration, q);
        }
        match &memo.found {
            Some((_, _, Some(q))) => {
                let kept = memo.keys.of(q, connection, org, || nanos_since(self.epoch, now));
                q.check(self.epoch, now, kept, path)
            }
            _ => Verdict::Go(None),
        }
    }

    /// An upstream answered a request of `connection` with `status`: a 429
    /// or 503 asking to come back later (`field` reads the response's
    /// header fields) starts a cool-down, here and, through the store, on
    /// the other instances. Returns how long it lasts.
    pub fn learn(
        &self,
        integration: &str,
        connection: &str,
        status: u16,
        field: impl Fn(&str) -> Option<Bytes>,
    ) -> Option<Duration> {
        if !matches!(status, 429 | 503) {
            return None;
        }
        let table = self.table.load();
        let policy = table.backoff.get(integration)?;
        if !policy.respect_retry_after {
            return None;
        }
        let now = crate::telemetry::unix_now();
        let asked = field("retry-after")
            .and_then(|v| retry_after(&v, now))
            .or_else(|| policy.reset_headers.iter().find_map(|h| field(h).and_then(|v| reset_at(&v, now))))?;
        let lasts = asked.min(policy.max_cooldown);
        if lasts.is_zero() {
            return None;
        }
        let key = match policy.per {
            CooldownScope::Connection => connection,
            CooldownScope::Integration => integration,
        };
        self.cooldowns.start(policy.per, integration, key, lasts);
        Some(lasts)
    }

    /// Applies a cool-down another instance learnt (a store notification).
    pub fn learn_remote(&self, payload: &str) {
        self.cooldowns.apply_remote(payload);
    }

    /// The cool-down `connection` (of `integration`) is under, if any.
    pub fn cooldown_of(&self, integration: &str, connection: &str) -> Option<ActiveCooldown> {
        self.cooldowns.active(integration, connection)
    }

    /// The quotas in force for `integration`, as the admin API shows them:
    /// each limit's numbers (this instance's share) and the back-off policy.
    pub fn describe(&self, integration: &str) -> Value {
        let table = self.table.load();
        let (rates, caps): (Vec<Value>, Vec<Value>) = match table.limited.get(integration) {
            Some(q) => (
                q.rates.iter().map(|r| r.named.view.clone()).collect(),
                q.caps.iter().map(|c| c.named.view.clone()).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let backoff = table.backoff.get(integration).map(|b| {
            json!({"respect_retry_after": b.respect_retry_after, "per": b.per.as_str(),
                   "max_cooldown_secs": b.max_cooldown.as_secs_f64(), "reset_headers": b.reset_headers})
        });
        json!({"rate_limits": rates, "in_flight_limits": caps, "backoff": backoff})
    }

    /// Prometheus text: refusals and waits per integration and limit,
    /// cool-downs per integration. No connection ids.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let table = self.table.load();
        let mut ids: Vec<&String> = table.limited.keys().collect();
        ids.sort();
        let rows = |out: &mut String, name: &str, help: &str, pick: fn(&Stats) -> u64| {
            crate::metrics::header(out, name, "counter", help);
            for id in &ids {
                for l in table.limited[*id].limits() {
                    let v = pick(&l.stats);
                    let _ =
                        writeln!(out, "{name}{{integration=\"{id}\",limit=\"{}\",kind=\"{}\"}} {v}", l.name, l.kind);
                }
            }
        };
        rows(out, "credproxy_quota_limited_total", "Requests refused by a rate limit or in-flight cap.", |s| {
            s.refused.load(Relaxed)
        });
        rows(out, "credproxy_quota_waits_total", "Requests that waited for a rate limit or in-flight cap.", |s| {
            s.waited.load(Relaxed)
        });
        rows(out, "credproxy_quota_wait_seconds_total", "Time requests spent waiting, summed.", |s| {
            s.waited_micros.load(Relaxed) / 1_000_000
        });
        self.cooldowns.render_metrics(out);
    }
}

/// One limit's counters.
#[derive(Debug, Default)]
struct Stats {
    refused: AtomicU64,
    waited: AtomicU64,
    waited_micros: AtomicU64,
}

/// What a limit is called and what it says, for problems and metrics.
struct Named {
    name: String,
    kind: &'static str,
    per: Per,
    max_wait: Duration,
    paths: Paths,
    view: Value,
    description: String,
    stats: Stats,
}

impl Named {
    fn new(
        name: String,
        kind: &'static str,
        per: Per,
        max_wait: Duration,
        paths: &[String],
        view: Value,
        description: String,
    ) -> Self {
        Self { name, kind, per, max_wait, paths: Paths::new(paths), view, description, stats: Stats::default() }
    }

    fn key<'k>(&self, connection: &'k [u8], org: &'k str) -> &'k [u8] {
        match self.per {
            Per::Connection => connection,
            Per::Org => org.as_bytes(),
            Per::Integration => b"",
        }
    }

    fn refusal(&self, kind: Refused, integration: &str, wait: Duration) -> Refusal {
        self.stats.refused.fetch_add(1, Relaxed);
        Refusal {
            kind,
            integration: integration.to_owned(),
            retry_after_secs: whole_secs(wait),
            limit: self.view.clone(),
            description: self.description.clone(),
        }
    }

    fn waited(&self, d: Duration) {
        self.stats.waited.fetch_add(1, Relaxed);
        self.stats.waited_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

/// A rate limit's state for one key: its theoretical arrival time.
type RateCell = Arc<Mutex<u64>>;

struct Rate {
    named: Named,
    gcra: Gcra,
    /// Each key's theoretical arrival time (0: a fresh key).
    keys: Keyed<Mutex<u64>>,
    /// `named.max_wait` in nanoseconds (what the GCRA arithmetic counts in).
    max_wait_nanos: u64,
}

struct Cap {
    named: Named,
    max: u64,
    /// Each key's requests in flight.
    keys: Keyed<AtomicU64>,
    /// Places given back (any key's) while a request waited: a waiter
    /// that found this cap full tries again only once it has moved.
    given_back: AtomicU64,
}

/// One integration's limiters, narrowest first.
struct IntegrationQuota {
    id: String,
    /// What they were built from (a reload keeps them if it is unchanged).
    declared: (Vec<RateLimit>, Vec<InFlightLimit>, u32),
    rates: Vec<Rate>,
    caps: Vec<Cap>,
    /// Woken when an in-flight place frees (a permit's release, or a
    /// try's rollback) and someone waits for one.
    freed: tokio::sync::Notify,
    /// Requests in [`IntegrationQuota::hold_waiting`].
    waiting: AtomicUsize,
}

impl IntegrationQuota {
    fn new(id: &str, declared_rates: &[RateLimit], declared_caps: &[InFlightLimit], instances: u32) -> Self {
        let (rates, caps) = (declared_rates, declared_caps);
        let instances = instances.max(1);
        let mut rates: Vec<Rate> = rates
            .iter()
            .map(|r| {
                let burst = r.burst.unwrap_or(r.requests);
                let gcra = Gcra::new(r.requests, r.period, burst, instances);
                let period = humantime::format_duration(r.period);
                let name = r.name.clone().unwrap_or_else(|| r.per.as_str().to_owned());
                let description = format!(
                    "rate limit {name:?} of integration {id}: {} requests per {period} per {}, bursts of {burst}{}",
                    r.requests,
                    r.per.as_str(),
                    if instances > 1 { format!(", shared by {instances} instances") } else { String::new() },
                );
                let view = json!({
                    "name": name, "kind": "rate", "per": r.per.as_str(), "requests": r.requests,
                    "period_secs": r.period.as_secs_f64(), "burst": burst, "instances": instances,
                    "max_wait_secs": r.max_wait.as_secs_f64(),
                });
                let named = Named::new(name, "rate", r.per, r.max_wait, &r.paths, view, description);
                let max_wait_nanos = u64::try_from(r.max_wait.as_nanos()).unwrap_or(u64::MAX);
                Rate { named, gcra, keys: Keyed::new(), max_wait_nanos }
            })
            .collect();
        let mut caps: Vec<Cap> = caps
            .iter()
            .map(|c| {
                let max = u64::from((c.max_in_flight / instances).max(1));
                let name = c.name.clone().unwrap_or_else(|| c.per.as_str().to_owned());
                let description = format!(
                    "in-flight cap {name:?} of integration {id}: {max} requests at once per {}",
                    c.per.as_str()
                );
                let view = json!({
                    "name": name, "kind": "in_flight", "per": c.per.as_str(), "max_in_flight": max,
                    "max_wait_secs": c.max_wait.as_secs_f64(),
                });
                let named = Named::new(name, "in_flight", c.per, c.max_wait, &c.paths, view, description);
                Cap { named, max, keys: Keyed::new(), given_back: AtomicU64::new(0) }
            })
            .collect();
        // The lock order, and the narrowest-first order of the module doc.
        rates.sort_by_key(|r| r.named.per);
        caps.sort_by_key(|c| c.named.per);
        let declared = (declared_rates.to_vec(), declared_caps.to_vec(), instances);
        Self {
            id: id.to_owned(),
            declared,
            rates,
            caps,
            freed: tokio::sync::Notify::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Built from exactly these limits.
    fn declared(&self, rates: &[RateLimit], caps: &[InFlightLimit], instances: u32) -> bool {
        self.declared.0 == rates && self.declared.1 == caps && self.declared.2 == instances.max(1)
    }

    fn limits(&self) -> impl Iterator<Item = &Named> {
        self.rates.iter().map(|r| &r.named).chain(self.caps.iter().map(|c| &c.named))
    }

    /// Every limit's cell for `connection` of `org` (those whose `paths`
    /// leave a request out too): the rate limits' into `rates`, the caps'
    /// as the connection's [`Places`] (none without caps); `t`: now, in
    /// the limiters' nanoseconds (a full shard's sweep drops what is idle
    /// by then).
    fn cells(self: &Arc<Self>, connection: &[u8], org: &str, t: u64, rates: &mut Vec<RateCell>) -> Option<Arc<Places>> {
        rates.clear();
        rates.extend(self.rates.iter().map(|r| {
            let key = r.keys.key(r.named.key(connection, org));
            r.keys.cell(key, |c| Gcra::is_stale(*c.get_mut().unwrap_or_else(|p| p.into_inner()), t))
        }));
        if self.caps.is_empty() {
            return None;
        }
        let mut places = Places { quota: self.clone(), cells: Default::default() };
        for (c, slot) in self.caps.iter().zip(places.cells.iter_mut()) {
            let key = c.keys.key(c.named.key(connection, org));
            *slot = Some(c.keys.cell(key, |n| *n.get_mut() == 0));
        }
        Some(Arc::new(places))
    }

    /// Which caps apply to a request for `path` (bit `i`: cap `i`; a `u8`
    /// holds [`MAX_LIMITS`] of them).
    fn caps_for(&self, path: &str) -> u8 {
        self.caps.iter().enumerate().filter(|(_, c)| c.named.paths.matches(path)).fold(0, |m, (i, _)| m | 1 << i)
    }

    fn check(self: &Arc<Self>, epoch: Instant, now: Instant, kept: &KeptKeys, path: &str) -> Verdict {
        let (wait, now) = match self.reserve(epoch, now, &kept.rates, path) {
            Ok(w) => w,
            Err(r) => return Verdict::No(r),
        };
        // The caller connection's places, if a cap applies to this path
        // (none are kept when the integration has no caps).
        let caps = self.caps_for(path);
        let places = kept.places.as_ref().filter(|_| caps != 0);
        if wait.is_zero() {
            let Some(places) = places else { return Verdict::Go(None) };
            match self.try_hold(places, caps) {
                Ok(()) => return Verdict::Go(Some(Permit(Some((places.clone(), caps))))),
                Err(full) if self.caps[full].named.max_wait.is_zero() => {
                    return Verdict::No(self.caps[full].named.refusal(
                        Refused::InFlight,
                        &self.id,
                        Duration::from_secs(1),
                    ))
                }
                Err(_) => {}
            }
        }
        let (this, places) = (self.clone(), places.cloned());
        Verdict::Wait(Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep_until((now + wait).into()).await;
            }
            match places {
                Some(places) => this.hold_waiting(places, caps).await.map(Some),
                None => Ok(None),
            }
        }))
    }

    /// Reserves a cell of every rate limit that applies, all or none:
    /// how long until the reservation's time (and the time it counts
    /// from), or the refusal of a limit whose wait exceeds its `max_wait`.
    fn reserve(
        &self,
        epoch: Instant,
        now: Instant,
        cells: &[RateCell],
        path: &str,
    ) -> Result<(Duration, Instant), Refusal> {
        if self.rates.is_empty() {
            return Ok((Duration::ZERO, now));
        }
        // Most integrations have one or two rate limits: their locks are
        // then kept in an array of that size.
        match self.rates.len() {
            1 => self.reserve_in::<1>(epoch, now, cells, path),
            2 => self.reserve_in::<2>(epoch, now, cells, path),
            _ => self.reserve_in::<MAX_LIMITS>(epoch, now, cells, path),
        }
    }

    /// [`IntegrationQuota::reserve`] for at most `N` rate limits.
    fn reserve_in<const N: usize>(
        &self,
        epoch: Instant,
        now: Instant,
        cells: &[RateCell],
        path: &str,
    ) -> Result<(Duration, Instant), Refusal> {
        // Held together, locked in the limits' order: the decision covers
        // every limit at once.
        let mut locked: [Option<MutexGuard<'_, u64>>; N] = std::array::from_fn(|_| None);
        for ((r, cell), slot) in self.rates.iter().zip(cells).zip(locked.iter_mut()) {
            if r.named.paths.matches(path) {
                // A panic while a cell is held cannot leave it half-written
                // (one integer): a poisoned lock is used as it is.
                *slot = Some(cell.lock().unwrap_or_else(|p| p.into_inner()));
            }
        }
        // `now` may be a little behind a request that took its turn
        // first: its cell is later, so this wait comes out longer by the
        // gap and ends when that cell's time comes, as it should.
        let t = nanos_since(epoch, now);
        let mut wait = 0u64;
        let mut over: Option<(usize, u64)> = None;
        for (i, (r, tat)) in self.rates.iter().zip(locked.iter()).enumerate() {
            let Some(tat) = tat else { continue };
            let w = r.gcra.wait(**tat, t);
            if w > r.max_wait_nanos && over.is_none_or(|(_, o)| w > o) {
                over = Some((i, w));
            }
            wait = wait.max(w);
        }
        if let Some((i, w)) = over {
            // Nothing spent; the locks go before the refusal is written.
            locked.fill_with(|| None);
            return Err(self.rates[i].named.refusal(Refused::Rate, &self.id, Duration::from_nanos(w)));
        }
        let at = t + wait;
        for (r, tat) in self.rates.iter().zip(locked.iter_mut()) {
            if let Some(tat) = tat {
                **tat = r.gcra.admit(**tat, at);
                if wait > 0 {
                    r.named.waited(Duration::from_nanos(wait));
                }
            }
        }
        Ok((Duration::from_nanos(wait), now))
    }

    /// Takes a place under every cap that applies, or none: the index of
    /// a full one. The places a failed try took under the caps before the
    /// full one go back as a permit's do ([`IntegrationQuota::gave_back`]):
    /// a waiter whose own try found one of them full in the meantime
    /// tries again. (`SeqCst`, here, in [`Places::release`] and on
    /// `waiting` and `given_back`: a place given back while a request
    /// waits for one is either seen by its try or wakes it.)
    fn try_hold(&self, held: &Places, caps: u8) -> Result<(), usize> {
        for (n, (i, cell)) in held.cells(caps).enumerate() {
            let max = self.caps[i].max;
            if cell.fetch_update(SeqCst, SeqCst, |v| (v < max).then_some(v + 1)).is_err() {
                for (_, cell) in held.cells(caps).take(n) {
                    cell.fetch_sub(1, SeqCst);
                }
                if n > 0 {
                    self.gave_back(held.cells(caps).take(n).map(|(i, _)| i));
                }
                return Err(i);
            }
        }
        Ok(())
    }

    /// Places were just given back under `caps`: counted, and the
    /// waiters woken, if there are any.
    fn gave_back(&self, caps: impl Iterator<Item = usize>) {
        if self.waiting.load(SeqCst) == 0 {
            return;
        }
        for i in caps {
            self.caps[i].given_back.fetch_add(1, SeqCst);
        }
        self.freed.notify_waiters();
    }

    /// Waits for a place under every cap, up to the `max_wait` of the
    /// first one found full. It tries again when a place under the cap
    /// its last try found full was given back — not on every wake-up: a
    /// waiter's own failed try gives places back under the caps before
    /// the full one, and waking for those would have two waiters for one
    /// full cap wake each other in a loop.
    async fn hold_waiting(self: Arc<Self>, held: Arc<Places>, caps: u8) -> Result<Permit, Refusal> {
        let started = Instant::now();
        let mut deadline: Option<(usize, Instant)> = None;
        // Counted for the whole wait (between two tries too: a place given
        // back then must move `given_back`), and uncounted if the request
        // goes away while it waits.
        let _waiting = Waiting::enter(&self.waiting);
        // The cap the last try found full, and its `given_back` before it.
        let mut last: Option<(usize, u64)> = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let moved = last.is_none_or(|(i, seen)| self.caps[i].given_back.load(SeqCst) != seen);
            if moved {
                let mut seen = [0; MAX_LIMITS];
                for (i, _) in held.cells(caps) {
                    seen[i] = self.caps[i].given_back.load(SeqCst);
                }
                match self.try_hold(&held, caps) {
                    Ok(()) => {
                        if let Some((i, _)) = deadline {
                            self.caps[i].named.waited(started.elapsed());
                        }
                        return Ok(Permit(Some((held, caps))));
                    }
                    Err(full) => last = Some((full, seen[full])),
                }
            }
            let (i, until) = *deadline.get_or_insert_with(|| {
                let full = last.map_or(0, |(full, _)| full);
                (full, started + self.caps[full].named.max_wait)
            });
            if tokio::time::timeout_at(until.into(), freed).await.is_err() {
                return Err(self.caps[i].named.refusal(Refused::InFlight, &self.id, Duration::from_secs(1)));
            }
        }
    }
}

/// A request counted in [`IntegrationQuota::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, SeqCst);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// The limiter cells of a caller connection's last request, and what
/// they were made of: the integration's limiters (a weak handle, compared
/// by address: held, an address is not reused; a reload that changes the
/// limits makes new ones), the connection id and the organization (by
/// value; their buffers are reused). A keep-alive caller mostly repeats
/// its connection: its request then hashes no key and locks no shard.
#[derive(Default)]
pub struct KeyMemo {
    /// The last request's integration, its limiters (none: it has no
    /// limit), and the [`Quotas`] generation they were found in.
    found: Option<(u64, String, Option<Arc<IntegrationQuota>>)>,
    keys: KeptKeys,
}

/// The cells of [`KeyMemo`], and what they were made of.
#[derive(Default)]
struct KeptKeys {
    quota: std::sync::Weak<IntegrationQuota>,
    connection: Vec<u8>,
    org: String,
    /// The connection's cell of each rate limit, in the order of `rates`.
    rates: Vec<RateCell>,
    /// Its cell of each in-flight cap (the permits of its requests share
    /// them); none when the integration has no caps.
    places: Option<Arc<Places>>,
}

impl KeyMemo {
    /// `integration`'s limiters were found in `generation`.
    fn found(&self, generation: u64, integration: &str) -> bool {
        matches!(&self.found, Some((g, i, _)) if *g == generation && crate::scan::same(i.as_bytes(), integration.as_bytes()))
    }

    fn find(&mut self, generation: u64, integration: &str, q: Option<Arc<IntegrationQuota>>) {
        match &mut self.found {
            Some((g, i, kept)) => {
                *g = generation;
                integration.clone_into(i);
                *kept = q;
            }
            None => self.found = Some((generation, integration.to_owned(), q)),
        }
    }
}

impl KeptKeys {
    /// `q`'s cells for `connection` of `org`; `t`: now, in the limiters'
    /// nanoseconds (read only when the cells are found anew).
    fn of(&mut self, q: &Arc<IntegrationQuota>, connection: &[u8], org: &str, t: impl FnOnce() -> u64) -> &Self {
        let same = std::ptr::eq(self.quota.as_ptr(), Arc::as_ptr(q))
            && crate::scan::same(&self.connection, connection)
            && crate::scan::same(self.org.as_bytes(), org.as_bytes());
        if !same {
            self.places = q.cells(connection, org, t(), &mut self.rates);
            self.quota = Arc::downgrade(q);
            self.connection.clear();
            self.connection.extend_from_slice(connection);
            org.clone_into(&mut self.org);
        }
        self
    }
}

/// A connection's in-flight places: its cell of each of the integration's
/// caps (by cap index). Kept by the caller connection's [`KeyMemo`] and
/// shared by its requests' permits, each of which takes and gives back one
/// place in the cells of the caps that apply to it (a mask of
/// [`IntegrationQuota::caps_for`]): a request's permit allocates nothing.
struct Places {
    quota: Arc<IntegrationQuota>,
    /// Some for each of the integration's caps, none past them.
    cells: [Option<Arc<AtomicU64>>; MAX_LIMITS],
}

impl Places {
    /// (cap index, cell) of each cap in `caps`, in the caps' order.
    fn cells(&self, caps: u8) -> impl Iterator<Item = (usize, &AtomicU64)> {
        let mut left = caps;
        std::iter::from_fn(move || {
            let i = left.trailing_zeros() as usize;
            left &= left.wrapping_sub(1);
            Some((i, &**self.cells.get(i)?.as_ref()?))
        })
    }

    /// Gives one place back in each cell of `caps`. The cells stay in their
    /// shards (idle at 0, they are swept with the shard's other idle keys).
    fn release(&self, caps: u8) {
        for (_, cell) in self.cells(caps) {
            cell.fetch_sub(1, SeqCst);
        }
        self.quota.gave_back(self.cells(caps).map(|(i, _)| i));
    }
}

/// Places under in-flight caps (the connection's, and the mask of those
/// that apply), given back when dropped, or handed to the response body
/// ([`Permit::into_held`]) to give back when the body ends or is dropped.
pub struct Permit(Option<(Arc<Places>, u8)>);

impl Permit {
    /// What a response body keeps until it ends (the places given back then).
    pub fn into_held(mut self) -> Option<Held> {
        let (places, caps) = self.0.take()?;
        Some(Held(places, caps))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((places, caps)) = &self.0 {
            places.release(*caps);
        }
    }
}

/// A [`Permit`]'s places as the upstream pool keeps them with a response
/// body, given back when it is dropped (the body ended, failed or was
/// dropped): a handle on the places the caller connection's memo keeps,
/// so that holding them allocates nothing.
pub struct Held(Arc<Places>, u8);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let integration = self.0.as_ref().map(|(p, _)| p.quota.id.as_str());
        f.debug_struct("Permit").field("integration", &integration).finish_non_exhaustive()
    }
}

/// `paths` of a limit: `*` matches any run of characters.
struct Paths(Vec<Vec<String>>);

impl Paths {
    fn new(patterns: &[String]) -> Self {
        Self(patterns.iter().map(|p| p.split('*').map(str::to_owned).collect()).collect())
    }

    /// Inlined: most limits have no `paths` (they match every request).
    #[inline]
    fn matches(&self, path: &str) -> bool {
        self.0.is_empty() || self.any(path)
    }

    fn any(&self, path: &str) -> bool {
        self.0.iter().any(|parts| glob(parts, path))
    }
}

/// `parts` is a pattern split at its `*`s.
fn glob(parts: &[String], path: &str) -> bool {
    let [first, middle @ .., last] = parts else {
        return parts.first().is_some_and(|p| p == path);
    };
    let Some(mut rest) = path.strip_prefix(first.as_str()) else { return false };
    for m in middle {
        match rest.find(m.as_str()) {
            Some(at) => rest = &rest[at + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last.as_str())
}

fn whole_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000).max(1) as u64
}

/// `Retry-After`: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn retry_after(value: &[u8], now: i64) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(text).ok()?;
    let at = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64))
}

/// `X-RateLimit-Reset` / `RateLimit-Reset`: a Unix time (above 10^9) or
/// seconds from now.
fn reset_at(value: &[u8], now: i64) -> Option<Duration> {
    let n: i64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    let secs = if n > 1_000_000_000 { n.saturating_sub(now) } else { n };
    (secs >= 0).then(|| Duration::from_secs(secs as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(rates: Vec<RateLimit>, caps: Vec<InFlightLimit>) -> Quotas {
        let mut q = Quotas::none();
        q.cooldowns = Cooldowns::new(std::iter::once("gh".to_owned()), None);
        let mut t = Table::default();
        t.limited.insert("gh".into(), Arc::new(IntegrationQuota::new("gh", &rates, &caps, 1)));
        t.backoff.insert("gh".into(), Backoff::default());
        if rates.is_empty() && caps.is_empty() {
            t.limited.clear();
        }
        q.install(t);
        q
    }

    fn rate(per: Per, requests: u32, secs: u64, max_wait_ms: u64) -> RateLimit {
        RateLimit {
            name: None,
            per,
            requests,
            period: Duration::from_secs(secs),
            burst: None,
            max_wait: Duration::from_millis(max_wait_ms),
            paths: vec![],
        }
    }

    fn go(v: Verdict) -> Option<Permit> {
        match v {
            Verdict::Go(p) => p,
            Verdict::Wait(_) => panic!("waits"),
            Verdict::No(r) => panic!("refused: {}", r.description),
        }
    }

    fn refused(v: Verdict) -> Refusal {
        match v {
            Verdict::No(r) => r,
            _ => panic!("admitted"),
        }
    }

    #[test]
    fn a_connection_limit_is_per_connection_and_names_itself() {
        let q = quotas(vec![rate(Per::Connection, 2, 60, 0)], vec![]);
        for _ in 0..2 {
            go(q.check("gh", "conn_a", "org", "/"));
        }
        let r = refused(q.check("gh", "conn_a", "org", "/"));
        assert_eq!((r.kind, r.retry_after_secs), (Refused::Rate, 30));
        assert_eq!(r.limit["name"], "connection");
        assert!(r.description.contains("2 requests per 1m per connection"), "{}", r.description);
        go(q.check("gh", "conn_b", "org", "/"));
        // Other integrations are not limited.
        go(q.check("other", "conn_a", "org", "/"));
    }

    #[test]
    fn a_connections_kept_keys_are_its_own() {
        // One caller connection's memo across connection ids, organizations
        // and a reload that changes the limits: each check counts against
        // the limiters of what it names, never against the last one's.
        let rates = vec![rate(Per::Connection, 1, 60, 0), rate(Per::Org, 3, 60, 0)];
        let cap = InFlightLimit {
            name: None,
            per: Per::Connection,
            max_in_flight: 1,
            max_wait: Duration::ZERO,
            paths: vec![],
        };
        let q = quotas(rates.clone(), vec![cap]);
        let mut memo = KeyMemo::default();
        let a = go(q.check_with("gh", b"conn_a", "org1", "/", Instant::now(), &mut memo)).expect("a permit");
        assert_eq!(
            refused(q.check_with("gh", b"conn_a", "org1", "/", Instant::now(), &mut memo)).limit["per"],
            "connection"
        );
        let b = go(q.check_with("gh", b"conn_b", "org1", "/", Instant::now(), &mut memo)).expect("a permit");
        assert_eq!(
            refused(q.check_with("gh", b"conn_a", "org1", "/", Instant::now(), &mut memo)).limit["per"],
            "connection"
        );
        // conn_c in org1 takes org1's last cell; in org2 it starts afresh.
        go(q.check_with("gh", b"conn_c", "org1", "/", Instant::now(), &mut memo));
        assert_eq!(refused(q.check_with("gh", b"conn_d", "org1", "/", Instant::now(), &mut memo)).limit["per"], "org");
        go(q.check_with("gh", b"conn_d", "org2", "/", Instant::now(), &mut memo));
        // The permits release the keys they were taken under.
        drop((a, b));
        // New limits: new limiters, and the memo follows them.
        let mut t = Table::default();
        let caps = vec![InFlightLimit {
            name: None,
            per: Per::Connection,
            max_in_flight: 1,
            max_wait: Duration::ZERO,
            paths: vec![],
        }];
        t.limited.insert("gh".into(), Arc::new(IntegrationQuota::new("gh", &rates[..1], &caps, 1)));
        q.install(t);
        let held = go(q.check_with("gh", b"conn_a", "org1", "/", Instant::now(), &mut memo)).expect("a permit");
        assert_eq!(
            refused(q.check_with("gh", b"conn_a", "org1", "/", Instant::now(), &mut memo)).limit["per"],
            "connection"
        );
        drop(held);
        assert_eq!(refused(q.check("gh", "conn_a", "org1", "/")).limit["per"], "connection");
    }

    #[test]
    fn a_connections_kept_integration_follows_reloads() {
        // The memo keeps what it found for the last integration: none for
        // an integration without limits, until a reload gives it some.
        let q = quotas(vec![rate(Per::Connection, 1, 60, 0)], vec![]);
        let mut memo = KeyMemo::default();
        for _ in 0..3 {
            go(q.check_with("other", b"conn_a", "org", "/", Instant::now(), &mut memo));
        }
        go(q.check_with("gh", b"conn_a", "org", "/", Instant::now(), &mut memo));
        refused(q.check_with("gh", b"conn_a", "org", "/", Instant::now(), &mut memo));
        go(q.check_with("other", b"conn_a", "org", "/", Instant::now(), &mut memo));
        let mut t = Table::default();
        t.limited.insert(
            "other".into(),
            Arc::new(IntegrationQuota::new("other", &[rate(Per::Connection, 1, 60, 0)], &[], 1)),
        );
        q.install(t);
        go(q.check_with("other", b"conn_a", "org", "/", Instant::now(), &mut memo));
        assert_eq!(
            refused(q.check_with("other", b"conn_a", "org", "/", Instant::now(), &mut memo)).integration,
            "other"
        );
        go(q.check_with("gh", b"conn_a", "org", "/", Instant::now(), &mut memo));
        go(q.check_with("gh", b"conn_a", "org", "/", Instant::now(), &mut memo));
    }

    #[test]
    fn an_integration_limit_is_shared_and_a_refusal_spends_no_cell() {
        let q = quotas(vec![rate(Per::Integration, 3, 60, 0), rate(Per::Connection, 2, 60, 0)], vec![]);
        go(q.check("gh", "conn_a", "org", "/"));
        go(q.check("gh", "conn_a", "org", "/"));
        // Refused by the connection's limit: the integration's third cell is left.
        assert_eq!(refused(q.check("gh", "conn_a", "org", "/")).limit["per"], "connection");
        go(q.check("gh", "conn_b", "org", "/"));
        assert_eq!(refused(q.check("gh", "conn_b", "org", "/")).limit["per"], "integration");
    }

    #[tokio::test]
    async fn max_wait_reserves_a_turn() {
        // One cell every 20 ms, bursts of 5, waits of up to 100 ms.
        let mut r = rate(Per::Connection, 50, 1, 100);
        r.burst = Some(5);
        let q = quotas(vec![r], vec![]);
        let started = tokio::time::Instant::now();
        for _ in 0..5 {
            go(q.check("gh", "conn_a", "org", "/"));
        }
        let mut waits = Vec::new();
        for _ in 0..5 {
            match q.check("gh", "conn_a", "org", "/") {
                Verdict::Wait(w) => waits.push(w),
                _ => panic!("should wait"),
            }
        }
        // The eleventh would wait 120 ms: more than max_wait.
        let r = refused(q.check("gh", "conn_a", "org", "/"));
        assert_eq!((r.kind, r.retry_after_secs), (Refused::Rate, 1));
        for w in waits {
            assert!(w.await.is_ok());
        }
        assert!(started.elapsed() >= Duration::from_millis(99), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn in_flight_places_come_back_when_permits_drop() {
        let cap = InFlightLimit {
            name: None,
            per: Per::Connection,
            max_in_flight: 2,
            max_wait: Duration::ZERO,
            paths: vec![],
        };
        let q = quotas(vec![], vec![cap.clone()]);
        let a = go(q.check("gh", "conn_a", "org", "/"));
        let _b = go(q.check("gh", "conn_a", "org", "/"));
        assert_eq!(refused(q.check("gh", "conn_a", "org", "/")).kind, Refused::InFlight);
        go(q.check("gh", "conn_b", "org", "/"));
        drop(a);
        let _c = go(q.check("gh", "conn_a", "org", "/"));
        // With max_wait, a request waits for a place.
        let q = Arc::new(quotas(vec![], vec![InFlightLimit { max_wait: Duration::from_secs(5), ..cap }]));
        let a = go(q.check("gh", "conn_a", "org", "/"));
        let _b = go(q.check("gh", "conn_a", "org", "/"));
        let Verdict::Wait(w) = q.check("gh", "conn_a", "org", "/") else { panic!("should wait") };
        let waiter = tokio::spawn(w);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        drop(a);
        let held = tokio::time::timeout(Duration::from_secs(2), waiter).await.expect("woken").unwrap();
        assert!(held.is_ok());
    }

    /// Many callers of one connection on two threads, each with its own
    /// memo (so its own handles on the same cells), through a cap of 2
    /// that they wait for: never more than 2 in flight, and no waiter
    /// misses a place given back while it starts to wait (it would sit
    /// out its 10 s `max_wait` and be refused).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cap_holds_under_contention_and_every_waiter_is_woken() {
        let cap = InFlightLimit {
            name: None,
            per: Per::Connection,
            max_in_flight: 2,
            max_wait: Duration::from_secs(10),
            paths: vec![],
        };
        let q = Arc::new(quotas(vec![], vec![cap]));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let (q, in_flight) = (q.clone(), in_flight.clone());
                tokio::spawn(async move {
                    let mut memo = KeyMemo::default();
                    for _ in 0..300 {
                        let permit = match q.check_with("gh", b"conn_a", "org", "/", Instant::now(), &mut memo) {
                            Verdict::Go(p) => p,
                            Verdict::Wait(w) => w.await.expect("a place within max_wait"),
                            Verdict::No(r) => panic!("refused: {}", r.description),
                        };
                        assert!(in_flight.fetch_add(1, SeqCst) < 2, "more than the cap in flight");
                        tokio::task::yield_now().await;
                        in_flight.fetch_sub(1, SeqCst);
                        drop(permit);
                    }
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(20), t).await.expect("no waiter stuck").unwrap();
        }
    }

    /// One caller connection's memo through requests that fall under
    /// different caps (one cap has `paths`): each permit holds and gives
    /// back the places of its own request's caps, whatever the memo kept
    /// for the last one.
    #[test]
    fn a_kept_set_of_places_follows_each_requests_caps() {
        let cap = |name: &str, paths: Vec<String>| InFlightLimit {
            name: Some(name.into()),
            per: Per::Connection,
            max_in_flight: 1,
            max_wait: Duration::ZERO,
            paths,
        };
        let q = quotas(vec![], vec![cap("search", vec!["/search/*".into()]), cap("all", vec![])]);
        let mut memo = KeyMemo::default();
        let mut check = |path: &str| q.check_with("gh", b"conn_a", "org", path, Instant::now(), &mut memo);
        drop(go(check("/search/a")));
        let user = go(check("/user")).expect("a permit");
        assert_eq!(refused(check("/search/b")).limit["name"], "all");
        drop(user);
        let search = go(check("/search/b")).expect("a permit");
        assert_eq!(refused(check("/user")).limit["name"], "all");
        assert_eq!(refused(check("/search/c")).limit["name"], "search");
        // Handed to a body, the places go when the body's hold does.
        let held = search.into_held().expect("places to hold");
        assert_eq!(refused(check("/user")).limit["name"], "all");
        drop(held);
        drop(go(check("/search/d")));
        drop(go(check("/user")));
    }

    /// Two caps for the tests of waiting: each connection's one place,
    /// and one place in the whole integration for `/search/*`; and the
    /// integration's limiters, for what the tests look at inside.
    fn two_caps(conn_wait: Duration, search_wait: Duration) -> (Quotas, Arc<IntegrationQuota>) {
        let cap = |name: &str, per: Per, max_wait: Duration, paths: Vec<String>| InFlightLimit {
            name: Some(name.into()),
            per,
            max_in_flight: 1,
            max_wait,
            paths,
        };
        let caps = [
            cap("conn", Per::Connection, conn_wait, vec![]),
            cap("search", Per::Integration, search_wait, vec!["/search/*".into()]),
        ];
        let q = quotas(vec![], caps.to_vec());
        let limiters = q.table.load().limited["gh"].clone();
        (q, limiters)
    }

    async fn admitted(v: Verdict) -> Result<Option<Permit>, Refusal> {
        match v {
            Verdict::Go(p) => Ok(p),
            Verdict::Wait(w) => w.await,
            Verdict::No(r) => Err(r),
        }
    }

    /// A try that takes a connection's place and finds the next cap full
    /// gives the place back: a request of that connection that found it
    /// taken meanwhile, and waits, is woken for it — not left to wait for
    /// another permit's release or its `max_wait`. Another thread makes
    /// such tries without a pause; a waiter that missed them times out.
    #[tokio::test]
    async fn a_place_a_failed_try_gave_back_wakes_its_waiter() {
        let (q, limiters) = two_caps(Duration::from_millis(300), Duration::ZERO);
        // The search place is taken (by another connection) for the test.
        let search = go(q.check("gh", "conn_b", "org", "/search/x")).expect("a permit");
        let tries = limiters.cells(b"conn_a", "org", 0, &mut Vec::new()).expect("places");
        let caps = limiters.caps_for("/search/y");
        assert_eq!(caps, 0b11);
        let (stop, tried) = (Arc::new(std::sync::atomic::AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let trying = std::thread::spawn({
            let (limiters, stop, tried) = (limiters.clone(), stop.clone(), tried.clone());
            move || {
                while !stop.load(Relaxed) {
                    // Full at the connection's place while the waiter
                    // holds it, else at search's: never admitted.
                    assert!(limiters.try_hold(&tries, caps).is_err(), "the search place is taken");
                    tried.fetch_add(1, Relaxed);
                }
            }
        });
        let started = Instant::now();
        while tried.load(Relaxed) < 1000 {
            assert!(started.elapsed() < Duration::from_secs(10), "the other thread makes no tries");
            tokio::task::yield_now().await;
        }
        // Asked until both have done a good number: the test runs beside
        // others, and a thread may be off the CPU for a while.
        let (before, mut asked) = (tried.load(Relaxed), 0);
        let mut memo = KeyMemo::default();
        while asked < 3000 || tried.load(Relaxed) - before < 200_000 {
            assert!(started.elapsed() < Duration::from_secs(30), "the other thread makes too few tries");
            asked += 1;
            let v = q.check_with("gh", b"conn_a", "org", "/user", Instant::now(), &mut memo);
            let permit = admitted(v).await;
            if let Err(r) = permit {
                stop.store(true, Relaxed);
                panic!("a place given back by a failed try did not wake its waiter: {}", r.description);
            }
        }
        stop.store(true, Relaxed);
        trying.join().unwrap();
        drop(search);
    }

    /// Two requests waiting for the one search place each take their
    /// connection's place and give it back when they find search full:
    /// that wakes the other, which does not try again (the cap it found
    /// full has not moved) — no loop of tries while they wait. When the
    /// search place is given back, both get it in turn. (The waiters run
    /// on a runtime of their own: a loop of theirs is then counted, not
    /// a hang of this one.)
    #[tokio::test]
    async fn waiters_for_one_full_cap_do_not_wake_each_other_in_a_loop() {
        let (q, limiters) = two_caps(Duration::ZERO, Duration::from_secs(10));
        let q = Arc::new(q);
        let search = go(q.check("gh", "conn_z", "org", "/search/x")).expect("a permit");
        let theirs = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let waiters: Vec<_> = ["conn_a", "conn_b"]
            .into_iter()
            .map(|conn| {
                let q = q.clone();
                theirs.spawn(async move { admitted(q.check("gh", conn, "org", "/search/y")).await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(limiters.waiting.load(SeqCst), 2, "both wait (one that loops keeps the other from its runtime)");
        let tried = limiters.caps[0].given_back.load(SeqCst);
        assert!(tried <= 4, "the waiters tried {tried} times while the cap they wait for stayed full");
        assert_eq!(limiters.caps[1].given_back.load(SeqCst), 0);
        drop(search);
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w).await.expect("woken").unwrap().expect("admitted");
        }
        assert_eq!(limiters.waiting.load(SeqCst), 0);
        theirs.shutdown_background();
    }

    /// A request that goes away while it waits is no longer counted as
    /// waiting (every release would wake no one, at the cost of a lock).
    #[tokio::test]
    async fn a_waiter_that_goes_away_is_not_counted() {
        let (q, limiters) = two_caps(Duration::from_secs(10), Duration::ZERO);
        let first = go(q.check("gh", "conn_a", "org", "/user")).expect("a permit");
        let Verdict::Wait(second) = q.check("gh", "conn_a", "org", "/user") else { panic!("waits") };
        assert!(tokio::time::timeout(Duration::from_millis(50), second).await.is_err(), "still waiting");
        assert_eq!(limiters.waiting.load(SeqCst), 0);
        drop(first);
    }

    #[test]
    fn paths_select_requests() {
        let mut r = rate(Per::Connection, 1, 60, 0);
        r.paths = vec!["/search/*".into(), "/repos/*/issues".into()];
        let q = quotas(vec![r], vec![]);
        go(q.check("gh", "conn_a", "org", "/search/code"));
        refused(q.check("gh", "conn_a", "org", "/search/issues"));
        refused(q.check("gh", "conn_a", "org", "/repos/o/r/issues"));
        go(q.check("gh", "conn_a", "org", "/user"));
        go(q.check("gh", "conn_a", "org", "/repos/o/r/pulls"));
        assert!(glob(&["/a".into()], "/a") && !glob(&["/a".into()], "/ab"));
        assert!(glob(&["".into(), "".into()], "/anything"));
    }

    #[test]
    fn retry_after_in_seconds_or_a_date_and_reset_fields() {
        let now = 1_700_000_000;
        assert_eq!(retry_after(b"2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(b" 120 ", now), Some(Duration::from_secs(120)));
        let date = httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(now as u64 + 30));
        assert_eq!(retry_after(date.as_bytes(), now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(b"soon", now), None);
        assert_eq!(retry_after(b"-1", now), None);
        assert_eq!(reset_at(b"1700000042", now), Some(Duration::from_secs(42)));
        assert_eq!(reset_at(b"7", now), Some(Duration::from_secs(7)));
    }

    #[test]
    fn an_upstream_429_cools_the_connection_down() {
        let q = quotas(vec![], vec![]);
        let field =
            |v: &'static str| move |name: &str| (name == "retry-after").then(|| Bytes::from_static(v.as_bytes()));
        assert_eq!(q.learn("gh", "conn_a", 200, field("5")), None);
        assert_eq!(q.learn("gh", "conn_a", 429, field("soon")), None);
        assert_eq!(q.learn("gh", "conn_a", 429, field("5")), Some(Duration::from_secs(5)));
        let r = refused(q.check("gh", "conn_a", "org", "/"));
        assert_eq!((r.kind, r.retry_after_secs), (Refused::Cooldown, 5));
        go(q.check("gh", "conn_b", "org", "/"));
        assert_eq!(q.cooldown_of("gh", "conn_a").map(|c| c.scope), Some(CooldownScope::Connection));
        // At most max_cooldown.
        assert_eq!(q.learn("gh", "conn_b", 503, field("999999")), Some(Duration::from_secs(3600)));
    }

    /// The proxy skips the check (and the connection id's text) only when
    /// `may_apply` is false: with no limit anywhere and no cool-down.
    #[test]
    fn may_apply_is_false_only_when_no_check_could_refuse() {
        assert!(!Quotas::none().may_apply());
        assert!(quotas(vec![rate(Per::Connection, 1, 60, 0)], vec![]).may_apply());
        let q = quotas(vec![], vec![]);
        assert!(!q.may_apply());
        let field = |name: &str| (name == "retry-after").then(|| Bytes::from_static(b"30"));
        assert!(q.learn("gh", "conn_a", 429, field).is_some());
        assert!(q.may_apply(), "a cool-down in force");
        assert!(matches!(q.check("gh", "conn_a", "org", "/"), Verdict::No(_)));
    }
}
