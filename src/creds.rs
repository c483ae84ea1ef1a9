//! Connections and their credentials: validating new credentials, sealing and
//! storing them, and resolving `(org, connection id)` on the request path
//! through a bounded cache → store → decrypt.
//!
//! Uses `store`, `crypto`, `oauth2` and `integrations`; must not import
//! `proxy` or `admin`. OAuth2 refresh, authorization and revocation live in
//! [`oauth`].

mod apps;
mod oauth;
pub mod rotate;

pub use apps::{AppLookupError, OAuthAppError, APP_CACHE_TTL};
pub use oauth::{AuthorizeError, AuthorizeRequest, RefreshError, Revocation, REFRESH_COOLDOWN};

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError, Envelope, Sealed};
use crate::events::{self, Kind};
use crate::ids;
use crate::integrations::{AuthKind, AuthMethod, Grant, Integration, Integrations};
use crate::metrics::CredsStats;
use crate::oauth2::{TokenClient, TokenSet};
use crate::secret::SecretValue;
use crate::store::{ConnectionMeta, ConnectionRow, ConnectionState, SealedBytes, Store, StoreError};
pub use crate::telemetry::unix_now;

/// A decrypted credential: one value per field of its auth method, in the
/// method's field order (templates index into it).
#[derive(Clone, Debug)]
pub struct Credential {
    values: Vec<SecretValue>,
}

/// A field-level validation failure. Names the field, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("credentials.{field}: {reason}")]
pub struct CredentialError {
    pub field: String,
    pub reason: &'static str,
}

impl Credential {
    /// Validates supplied fields against the auth method: every field present
    /// (an optional one may be left out, or empty), no unknown field, no empty
    /// value, no control character (CR, LF, NUL, ...), the field's `pattern`
    /// matched. A left-out field is held as an empty value.
    pub fn from_fields(method: &AuthMethod, mut input: BTreeMap<String, SecretValue>) -> Result<Self, CredentialError> {
        if let Some(unknown) = input.keys().find(|k| !method.fields.contains(k)) {
            return Err(CredentialError { field: unknown.clone(), reason: "unknown field for this auth method" });
        }
        let mut values = Vec::with_capacity(method.fields.len());
        for (i, f) in method.fields.iter().enumerate() {
            let form = method.form.get(i);
            let optional = form.is_some_and(|m| m.optional);
            let v = match input.remove(f) {
                Some(v) if !(optional && v.expose().is_empty()) => v,
                _ if optional => {
                    values.push(SecretValue::new(String::new()));
                    continue;
                }
                _ => return Err(CredentialError { field: f.clone(), reason: "missing" }),
            };
            let s = v.expose();
            if s.is_empty() {
                return Err(CredentialError { field: f.clone(), reason: "must not be empty" });
            }
            if form.is_some_and(|m| !m.accepts(s)) {
                return Err(CredentialError {
                    field: f.clone(),
                    reason: "does not match the pattern of its form field",
                });
            }
            if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(CredentialError { field: f.clone(), reason: "must not contain CR, LF or NUL" });
            }
            if s.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(CredentialError { field: f.clone(), reason: "must not contain control characters" });
            }
            if matches!(method.kind, AuthKind::Basic) && f == "username" && s.contains(':') {
                return Err(CredentialError { field: f.clone(), reason: "must not contain ':' (HTTP Basic)" });
            }
            values.push(v);
        }
        Ok(Self { values })
    }

    /// The credential of an OAuth2 connection: its access token (if any).
    pub fn from_tokens(t: &TokenSet) -> Self {
        Self { values: t.access_token.iter().cloned().collect() }
    }

    pub fn value(&self, index: usize) -> &SecretValue {
        &self.values[index]
    }

    pub fn values(&self) -> &[SecretValue] {
        &self.values
    }

    fn to_plaintext(&self, method: &AuthMethod) -> Zeroizing<Vec<u8>> {
        // A left-out optional field is not stored.
        let map: BTreeMap<&str, &str> = method
            .fields
            .iter()
            .map(String::as_str)
            .zip(self.values.iter().map(SecretValue::expose))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Zeroizing::new(serde_json::to_vec(&map).expect("string maps serialize"))
    }

    fn from_plaintext(method: &AuthMethod, bytes: &[u8]) -> Result<Self, String> {
        let map: BTreeMap<String, String> = serde_json::from_slice(bytes)
            .map_err(|_| "stored credential is not a JSON object of strings".to_owned())?;
        let fields = map.into_iter().map(|(k, v)| (k, SecretValue::new(v))).collect();
        Self::from_fields(method, fields)
            .map_err(|e| format!("stored credential no longer fits auth method {:?}: {e}", method.id))
    }
}

/// A connection ready for the request path.
#[derive(Debug)]
pub struct Resolved {
    pub meta: ResolvedMeta,
    pub integration: Arc<Integration>,
    pub method: Arc<AuthMethod>,
    /// What templates inject (for OAuth2: the access token).
    pub credential: Credential,
    /// OAuth2 connections: the whole token set. Boxed: every cached
    /// connection would otherwise carry its ~130 bytes.
    pub tokens: Option<Box<TokenSet>>,
    /// When a use of it was last queued for the store (unix seconds).
    pub(crate) use_noted: AtomicI64,
}

/// What a connection ready for the request path keeps of its
/// [`ConnectionMeta`]: what the request path and a refresh read. Its
/// integration and auth method are [`Resolved::integration`]'s and
/// [`Resolved::method`]'s ids, and its activity stays in the store: a
/// cached connection carries no second copy of either (~250 bytes less per
/// cached connection than the whole `ConnectionMeta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMeta {
    /// The cache's key shares it.
    pub id: Arc<str>,
    pub org_id: Box<str>,
    pub user_id: Box<str>,
    pub state: ConnectionState,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
}

impl ResolvedMeta {
    /// `meta`'s, under the id `id` (the one its row was looked up by).
    fn new(id: Arc<str>, meta: ConnectionMeta) -> Self {
        debug_assert_eq!(*id, *meta.id);
        Self {
            id,
            org_id: meta.org_id.into(),
            user_id: meta.user_id.into(),
            state: meta.state,
            created_at: meta.created_at,
            updated_at: meta.updated_at,
        }
    }
}

impl Resolved {
    /// Its metadata as stored, without activity (what a connection that
    /// was not stored yet has).
    pub fn connection_meta(&self) -> ConnectionMeta {
        let m = &self.meta;
        ConnectionMeta {
            id: m.id.as_ref().to_owned(),
            org_id: m.org_id.as_ref().to_owned(),
            user_id: m.user_id.as_ref().to_owned(),
            integration: self.integration.id.clone(),
            auth_method: self.method.id.clone(),
            state: m.state,
            created_at: m.created_at,
            updated_at: m.updated_at,
            activity: Default::default(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// Unknown, or not visible to this organization: deliberately one case.
    #[error("connection not found")]
    NotFound,
    #[error("connection is {}", .0.as_str())]
    NotActive(ConnectionState),
    #[error("connection {id}: {reason}")]
    Misconfigured { id: String, reason: String },
    /// Its integration, or its auth method, is no longer configured (a
    /// file changed): unusable until restored or re-created, not an error
    /// of credproxy's.
    #[error("connection {id}: {what} is no longer configured")]
    Removed { id: String, what: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("connection {id}: {source}")]
    Crypto {
        id: String,
        #[source]
        source: CryptoError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("unknown integration {0:?}")]
    UnknownIntegration(String),
    #[error("integration {integration:?} has no auth method {method:?}")]
    UnknownAuthMethod { integration: String, method: String },
    #[error("{field}: must be 1-128 characters of [A-Za-z0-9_.:@-]")]
    InvalidId { field: &'static str },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(
        "auth method {0:?} uses the authorization code grant: create it with POST /v1/oauth2/authorize, or import \
         an existing grant with credentials {{access_token, refresh_token, expires_at or expires_in, scope}}"
    )]
    UseAuthorize(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

pub struct NewConnection {
    pub integration: String,
    pub auth_method: String,
    pub org_id: String,
    pub user_id: String,
    pub credentials: BTreeMap<String, SecretValue>,
}

/// How long a connection remembered by one caller connection
/// ([`ResolveMemo`]) is reused without asking the cache again. Any change
/// to any cached connection forgets it at once; this bounds only what the
/// cache's own expiry (`cache.ttl_secs`) could add.
const MEMO_FOR: Duration = Duration::from_secs(1);

/// The connection a caller's (keep-alive) connection resolved last. Callers
/// send the same `X-Connection-Id` request after request; while nothing in
/// the cache has changed since (a generation every change bumps), the same
/// answer is used again without a cache lookup.
#[derive(Default)]
pub struct ResolveMemo {
    /// Checked when it was kept (none until a connection is).
    id: Option<ids::ConnectionId>,
    resolved: Option<Arc<Resolved>>,
    generation: u64,
    until: Option<Instant>,
    /// A use of `resolved` was noted since it was kept.
    noted: bool,
}

impl ResolveMemo {
    fn get(&self, id: &ids::ConnectionId, generation: u64, now: Instant) -> Option<&Arc<Resolved>> {
        let fresh = self.generation == generation && self.until.is_some_and(|u| now < u);
        self.resolved.as_ref().filter(|_| fresh && self.id.as_ref() == Some(id))
    }

    /// `field`, when it is the id of the connection kept: its shape was
    /// checked then (a compare of 31 bytes costs less than the check).
    pub fn known_id(&self, field: &[u8]) -> Option<ids::ConnectionId> {
        self.id.filter(|id| crate::scan::same(id.as_bytes(), field))
    }
}

/// Numbers [`Connections`] instances for [`Recent`].
static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// How many connections each thread's [`Recent`] keeps.
const RECENT_SLOTS: usize = 128;

/// The connections this thread resolved lately, for callers that change
/// connection id from request to request (a [`ResolveMemo`] keeps one per
/// caller connection): direct-mapped by the id's last eight bytes (random
/// characters; an id made to collide only takes the cache's own path),
/// each entry good under the memo's rule — no change to the cache since
/// it was kept, and for at most [`MEMO_FOR`]. A hit costs a compare of the
/// id and two of numbers, where the cache's lookup hashes, reads a clock
/// and records the access for its eviction policy.
struct Recent {
    slots: Vec<Option<RecentEntry>>,
}

struct RecentEntry {
    instance: u64,
    id: ids::ConnectionId,
    resolved: Arc<Resolved>,
    generation: u64,
    until: Instant,
}

thread_local! {
    static RECENT: std::cell::RefCell<Recent> = const { std::cell::RefCell::new(Recent { slots: Vec::new() }) };
}

impl Recent {
    fn slot(id: &ids::ConnectionId) -> usize {
        let b = id.as_bytes();
        let tail: [u8; 8] = b[b.len() - 8..].try_into().unwrap_or_default();
        // Fibonacci hashing: the product's top bits.
        let h = u64::from_le_bytes(tail).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - RECENT_SLOTS.trailing_zeros())) as usize
    }

    fn get(instance: u64, id: &ids::ConnectionId, generation: u64, now: Instant) -> Option<Arc<Resolved>> {
        RECENT.with_borrow(|r| {
            let e = r.slots.get(Self::slot(id))?.as_ref()?;
            let fresh = e.instance == instance && e.generation == generation && now < e.until && e.id == *id;
            fresh.then(|| e.resolved.clone())
        })
    }

    /// Keeps `resolved` for `id` (`generation`: read before it was looked
    /// up, so a change during the look-up leaves the entry stale).
    fn put(instance: u64, id: &ids::ConnectionId, resolved: &Arc<Resolved>, generation: u64, now: Instant) {
        RECENT.with_borrow_mut(|r| {
            if r.slots.is_empty() {
                r.slots.resize_with(RECENT_SLOTS, || None);
            }
            r.slots[Self::slot(id)] =
                Some(RecentEntry { instance, id: *id, resolved: resolved.clone(), generation, until: now + MEMO_FOR });
        });
    }
}

/// Unknown and other-org ids are one `NotFound`; a connection that is not
/// active says which state it is in.
fn visible(r: &Resolved, org: &str) -> Result<(), ResolveError> {
    if *r.meta.org_id != *org {
        return Err(ResolveError::NotFound);
    }
    if r.meta.state != ConnectionState::Active {
        return Err(ResolveError::NotActive(r.meta.state));
    }
    Ok(())
}

/// Connection service shared by the proxy and the admin API.
pub struct Connections {
    store: Arc<dyn Store>,
    envelope: Envelope,
    /// Swapped whole by a reload ([`Connections::replace_integrations`]);
    /// read on cache misses and by the admin API, never on a cache hit.
    integrations: std::sync::RwLock<Arc<Integrations>>,
    /// Keyed by connection id: each key is its connection's `meta.id`.
    cache: Cache<Arc<str>, Arc<Resolved>>,
    /// Bumped by every change to the cache (insert, invalidation, eviction):
    /// what a [`ResolveMemo`] and the [`Recent`] entries check.
    generation: Arc<AtomicU64>,
    /// Tells this service's [`Recent`] entries from another's (tests and
    /// benches run several in one process; generations start alike).
    instance: u64,
    oauth: oauth::OAuthState,
    stats: Arc<CredsStats>,
    /// Uses not yet written: `(connection id, unix seconds)`.
    uses: std::sync::Mutex<Vec<(String, i64)>>,
}

/// A connection's `last_used_at` is written at most this often.
pub const USE_RESOLUTION_SECS: i64 = 60;

impl Connections {
    pub fn new(
        store: Arc<dyn Store>,
        envelope: Envelope,
        integrations: Arc<Integrations>,
        max_entries: u64,
        ttl: Duration,
        token_client: TokenClient,
    ) -> Self {
        let stats = Arc::new(CredsStats::default());
        let evictions = stats.clone();
        let generation = Arc::new(AtomicU64::new(1));
        let bump = generation.clone();
        let cache = Cache::builder()
            .max_capacity(max_entries)
            .time_to_live(ttl)
            .eviction_listener(move |_id, _entry, cause| {
                bump.fetch_add(1, Release);
                if cause.was_evicted() {
                    evictions.cache_evictions.fetch_add(1, Relaxed);
                }
            })
            .build();
        let oauth = oauth::OAuthState::new(token_client);
        let integrations = std::sync::RwLock::new(integrations);
        let instance = INSTANCES.fetch_add(1, Relaxed);
        Self { store, envelope, integrations, cache, generation, instance, oauth, stats, uses: Default::default() }
    }

    /// A proxied request is about to use `r`: queued for `last_used_at` if
    /// its last queued use is a minute old (an atomic load otherwise).
    pub fn note_use(&self, r: &Resolved) {
        let now = unix_now();
        let noted = r.use_noted.load(Relaxed);
        if now - noted < USE_RESOLUTION_SECS || r.use_noted.compare_exchange(noted, now, Relaxed, Relaxed).is_err() {
            return;
        }
        if let Ok(mut uses) = self.uses.lock() {
            uses.push((r.meta.id.as_ref().to_owned(), now));
        }
    }

    /// Writes the queued uses (every few seconds, and at shutdown).
    pub async fn flush_uses(&self) {
        let batch = self.uses.lock().map(|mut u| std::mem::take(&mut *u)).unwrap_or_default();
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.record_used(&batch).await {
            tracing::warn!(error = %e, connections = batch.len(), "recording last_used_at failed");
        }
    }

    /// Every change to the cache also goes through here (the eviction
    /// listener may run later than the change, e.g. for `invalidate_all`).
    fn changed(&self) {
        self.generation.fetch_add(1, Release);
    }

    /// Cache, refresh and row-lock counters (for `/metrics`).
    pub fn stats(&self) -> &CredsStats {
        &self.stats
    }

    /// The integrations in force (a reload swaps them).
    pub fn integrations(&self) -> Arc<Integrations> {
        self.integrations.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `new` in force: every cached connection is dropped (each holds
    /// its integration and auth method as they were), so the next request
    /// of each resolves against the new set. A resolve that was under way
    /// may still cache an entry of the old set: a second sweep a second
    /// later drops those.
    pub fn replace_integrations(self: &Arc<Self>, new: Arc<Integrations>) {
        *self.integrations.write().unwrap_or_else(|p| p.into_inner()) = new;
        self.cache.invalidate_all();
        self.changed();
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            this.cache.invalidate_all();
            this.changed();
        });
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Resolves a connection for `org`. Returns the connection and whether it
    /// came from the cache. Unknown and other-org ids are the same `NotFound`.
    pub async fn resolve(&self, org: &str, id: &str) -> Result<(Arc<Resolved>, bool), ResolveError> {
        let (resolved, hit) = match self.cache.get(id).await {
            Some(r) => {
                self.stats.cache_hits.fetch_add(1, Relaxed);
                (r, true)
            }
            None => {
                self.stats.cache_misses.fetch_add(1, Relaxed);
                // Boxed: the store and decrypt futures are large, and would
                // otherwise be part of every cache hit's future.
                (Box::pin(self.resolve_miss(id)).await?, false)
            }
        };
        visible(&resolved, org)?;
        Ok((resolved, hit))
    }

    /// [`Connections::resolve`], remembering the answer in `memo` for the
    /// caller connection's next request (`now`: when this request started).
    pub async fn resolve_memo(
        &self,
        org: &str,
        id: &ids::ConnectionId,
        memo: &mut ResolveMemo,
        now: Instant,
    ) -> Result<(Arc<Resolved>, bool), ResolveError> {
        // Read before the lookup: a change during it makes the memo stale.
        let generation = self.generation.load(Acquire);
        if let Some(r) = memo.get(id, generation, now) {
            self.stats.cache_hits.fetch_add(1, Relaxed);
            visible(r, org)?;
            return Ok((r.clone(), true));
        }
        // A caller that changes connection id request after request: what
        // this thread resolved lately, under the memo's rule, before the
        // cache's own (costlier) lookup.
        let (resolved, hit) = match Recent::get(self.instance, id, generation, now) {
            Some(r) => {
                self.stats.cache_hits.fetch_add(1, Relaxed);
                visible(&r, org)?;
                (r, true)
            }
            None => {
                let (r, hit) = self.resolve(org, id.as_str()).await?;
                Recent::put(self.instance, id, &r, generation, now);
                (r, hit)
            }
        };
        memo.id = Some(*id);
        memo.resolved = Some(resolved.clone());
        memo.generation = generation;
        memo.until = Some(now + MEMO_FOR);
        memo.noted = false;
        Ok((resolved, hit))
    }

    /// [`Connections::note_use`] for a connection `memo` keeps: once while
    /// it is kept (at most [`MEMO_FOR`]), far finer than the
    /// [`USE_RESOLUTION_SECS`] that `last_used_at` is written at.
    pub fn note_use_memo(&self, r: &Arc<Resolved>, memo: &mut ResolveMemo) {
        let kept = memo.resolved.as_ref().is_some_and(|k| Arc::ptr_eq(k, r));
        if !(kept && memo.noted) {
            self.note_use(r);
            memo.noted = kept;
        }
    }

    async fn resolve_miss(&self, id: &str) -> Result<Arc<Resolved>, ResolveError> {
        // try_get_with coalesces concurrent misses for one id into one
        // load; the connection it loads shares the key.
        let key: Arc<str> = id.into();
        self.cache
            .try_get_with(key.clone(), self.load_as(key))
            .await
            .map_err(|e| Arc::try_unwrap(e).unwrap_or_else(|shared| (*shared).clone()))
    }

    pub(crate) async fn load(&self, id: &str) -> Result<Arc<Resolved>, ResolveError> {
        self.load_as(id.into()).await
    }

    async fn load_as(&self, id: Arc<str>) -> Result<Arc<Resolved>, ResolveError> {
        let row = self.store.get_connection(&id).await?.ok_or(ResolveError::NotFound)?;
        self.decrypt_row_as(id, row).await
    }

    /// Decrypts a stored row into a connection ready for the request path.
    async fn decrypt_row(&self, row: ConnectionRow) -> Result<Arc<Resolved>, ResolveError> {
        let id = row.meta.id.as_str().into();
        self.decrypt_row_as(id, row).await
    }

    /// [`Connections::decrypt_row`], the connection holding `id` (its
    /// row's id) as its own.
    async fn decrypt_row_as(&self, key: Arc<str>, row: ConnectionRow) -> Result<Arc<Resolved>, ResolveError> {
        let id = &*key;
        let misconfigured = |reason: String| ResolveError::Misconfigured { id: id.to_owned(), reason };
        let removed = |what: String| ResolveError::Removed { id: id.to_owned(), what };
        let integration = self
            .integrations()
            .get(&row.meta.integration)
            .cloned()
            .ok_or_else(|| removed(format!("integration {:?}", row.meta.integration)))?;
        let method = integration.auth_method(&row.meta.auth_method).cloned().ok_or_else(|| {
            removed(format!("auth method {:?} of integration {:?}", row.meta.auth_method, row.meta.integration))
        })?;
        let ctx = crypto::Context { org_id: &row.meta.org_id, connection_id: &row.meta.id };
        let plaintext = self
            .envelope
            .open(ctx, &from_store(row.sealed))
            .await
            .map_err(|source| ResolveError::Crypto { id: id.to_owned(), source })?;
        let (credential, tokens) = if method.oauth2().is_some() {
            let t: TokenSet = serde_json::from_slice(&plaintext)
                .map_err(|_| misconfigured("stored OAuth2 token set is corrupt".into()))?;
            (Credential::from_tokens(&t), Some(Box::new(t)))
        } else {
            (Credential::from_plaintext(&method, &plaintext).map_err(misconfigured)?, None)
        };
        let use_noted = AtomicI64::new(row.meta.activity.last_used_at.unwrap_or(0));
        let meta = ResolvedMeta::new(key, row.meta);
        Ok(Arc::new(Resolved { meta, integration, method, credential, tokens, use_noted }))
    }

    pub async fn create(&self, new: NewConnection) -> Result<ConnectionMeta, CreateError> {
        check_ids(&new.org_id, &new.user_id)?;
        let (_, method) = self.method_of(&new.integration, &new.auth_method)?;
        let plaintext = match method.oauth2() {
            // An existing grant, migrated without a user visit.
            Some(o) if !new.credentials.is_empty() => {
                let tokens = imported_token_set(&new.credentials, o.default_expires_in_secs, unix_now())?;
                Zeroizing::new(serde_json::to_vec(&tokens).expect("token sets serialize"))
            }
            Some(o) if o.grant == Grant::AuthorizationCode => return Err(CreateError::UseAuthorize(method.id.clone())),
            Some(_) => {
                // Client credentials: no user secret; the first request fetches a token.
                if let Some(k) = new.credentials.keys().next() {
                    return Err(
                        CredentialError { field: k.clone(), reason: "unknown field for this auth method" }.into()
                    );
                }
                Zeroizing::new(serde_json::to_vec(&TokenSet::default()).expect("token sets serialize"))
            }
            None => Credential::from_fields(&method, new.credentials)?.to_plaintext(&method),
        };
        self.insert_new(new.org_id, new.user_id, new.integration, new.auth_method, &plaintext).await
    }

    /// An integration's auth method, or which of the two is unknown.
    fn method_of(&self, integration: &str, method: &str) -> Result<(Arc<Integration>, Arc<AuthMethod>), CreateError> {
        let i = self
            .integrations()
            .get(integration)
            .cloned()
            .ok_or_else(|| CreateError::UnknownIntegration(integration.into()))?;
        let m = i
            .auth_method(method)
            .cloned()
            .ok_or_else(|| CreateError::UnknownAuthMethod { integration: integration.into(), method: method.into() })?;
        Ok((i, m))
    }

    /// A connection that is not stored yet, from fields a user typed: what
    /// the connect pages test before they store it ([`Connections::store_candidate`]).
    /// Its id is the one it will be stored under (or `replaces`).
    pub fn candidate(&self, new: NewConnection, replaces: Option<&str>) -> Result<Arc<Resolved>, CreateError> {
        check_ids(&new.org_id, &new.user_id)?;
        let (integration, method) = self.method_of(&new.integration, &new.auth_method)?;
        if method.oauth2().is_some() {
            return Err(CreateError::UseAuthorize(method.id.clone()));
        }
        let credential = Credential::from_fields(&method, new.credentials)?;
        let now = unix_now();
        let meta = ResolvedMeta {
            id: replaces.map_or_else(ids::new_connection_id, str::to_owned).into(),
            org_id: new.org_id.into(),
            user_id: new.user_id.into(),
            state: ConnectionState::Active,
            created_at: now,
            updated_at: now,
        };
        Ok(Arc::new(Resolved { meta, integration, method, credential, tokens: None, use_noted: AtomicI64::new(0) }))
    }

    /// Stores a [`Connections::candidate`]: a new connection, or (`replace`)
    /// the credential of an existing one, whose state becomes `active`.
    pub async fn store_candidate(&self, c: &Resolved, replace: bool) -> Result<ConnectionMeta, CreateError> {
        let plaintext = c.credential.to_plaintext(&c.method);
        let meta = c.connection_meta();
        let sealed = self.seal(&meta.org_id, &meta.id, &plaintext).await?;
        if !replace {
            let event = events::connection_event(Kind::Created, &meta, meta.state, None, None);
            self.store.insert_connection(&ConnectionRow { meta: meta.clone(), sealed }, Some(&event)).await?;
            return Ok(meta);
        }
        let id = &meta.id;
        let event = events::connection_event(Kind::Reauthorized, &meta, ConnectionState::Active, None, None);
        if !self.store.update_credential(id, &sealed, ConnectionState::Active, unix_now(), Some(&event)).await? {
            return Err(StoreError::Corrupt {
                id: id.clone(),
                reason: "deleted while its credential was replaced".into(),
            }
            .into());
        }
        self.cache.invalidate(id.as_str()).await;
        self.changed();
        let row = self.store.get_connection(id).await?;
        Ok(row.map_or_else(|| meta.clone(), |r| r.meta))
    }

    /// Seals `plaintext` for a new connection id and stores the row.
    async fn insert_new(
        &self,
        org_id: String,
        user_id: String,
        integration: String,
        auth_method: String,
        plaintext: &[u8],
    ) -> Result<ConnectionMeta, CreateError> {
        let id = ids::new_connection_id();
        let now = unix_now();
        let meta = ConnectionMeta {
            id,
            org_id,
            user_id,
            integration,
            auth_method,
            state: ConnectionState::Active,
            created_at: now,
            updated_at: now,
            activity: Default::default(),
        };
        let sealed = self.seal(&meta.org_id, &meta.id, plaintext).await?;
        let row = ConnectionRow { meta: meta.clone(), sealed };
        let event = events::connection_event(Kind::Created, &row.meta, row.meta.state, None, None);
        self.store.insert_connection(&row, Some(&event)).await?;
        Ok(meta)
    }

    /// Metadata of a connection visible to `org` (`None` for both unknown
    /// and other-org). `org = None` is a global admin.
    pub async fn get_meta(&self, org: Option<&str>, id: &str) -> Result<Option<ConnectionMeta>, StoreError> {
        let row = self.store.get_connection(id).await?;
        Ok(row.map(|r| r.meta).filter(|m| org.is_none_or(|o| o == m.org_id)))
    }

    /// The connections `q` selects (a page of them).
    pub async fn list(&self, q: &crate::store::ConnectionQuery) -> Result<Vec<ConnectionMeta>, StoreError> {
        self.store.list_connections(q).await
    }

    /// Deletes the row (with its `connection.deleted` event, naming the
    /// provider revocation's result) and evicts the cached credential.
    pub async fn delete(&self, meta: &ConnectionMeta, provider_revocation: &str) -> Result<bool, StoreError> {
        let id = meta.id.as_str();
        let event = events::connection_event(Kind::Deleted, meta, meta.state, None, Some(provider_revocation));
        let deleted = self.store.delete_connection(id, Some(&event)).await?;
        self.cache.invalidate(id).await;
        self.changed();
        Ok(deleted)
    }

    /// Applies a change published by another instance (or by this one).
    pub async fn apply_change(&self, change: crate::store::Change) {
        use crate::store::Change;
        match change {
            Change::Connection(id) => self.cache.invalidate(id.as_str()).await,
            Change::Resync => self.cache.invalidate_all(),
            // Not the cache's: `server` hands these to `quota`.
            Change::Cooldown(_) => return,
        }
        self.changed();
    }

    pub fn cached_entries(&self) -> u64 {
        self.cache.entry_count()
    }

    async fn seal(&self, org_id: &str, connection_id: &str, plaintext: &[u8]) -> Result<SealedBytes, CryptoError> {
        let ctx = crypto::Context { org_id, connection_id };
        Ok(to_store(self.envelope.seal(ctx, plaintext).await?))
    }
}

fn to_store(s: Sealed) -> SealedBytes {
    SealedBytes { key_id: s.key_id, wrapped_key: s.wrapped_key, nonce: s.nonce, ciphertext: s.ciphertext }
}

fn from_store(s: SealedBytes) -> Sealed {
    Sealed { key_id: s.key_id, wrapped_key: s.wrapped_key, nonce: s.nonce, ciphertext: s.ciphertext }
}

fn check_ids(org_id: &str, user_id: &str) -> Result<(), CreateError> {
    if !ids::is_valid_external_id(org_id) {
        return Err(CreateError::InvalidId { field: "org_id" });
    }
    if !ids::is_valid_external_id(user_id) {
        return Err(CreateError::InvalidId { field: "user_id" });
    }
    Ok(())
}

/// An OAuth2 token set brought from elsewhere (`POST /v1/connections`
/// with `{access_token, refresh_token?, expires_at? | expires_in?, scope?,
/// token_type?}`): at least one of the tokens; without an expiry, the
/// method's `default_expires_in_secs`; a refresh token alone is refreshed
/// by the first request.
fn imported_token_set(
    fields: &BTreeMap<String, SecretValue>,
    default_expires_in: u64,
    now: i64,
) -> Result<TokenSet, CredentialError> {
    let bad = |field: &str, reason: &'static str| CredentialError { field: field.to_owned(), reason };
    const KNOWN: [&str; 6] = ["access_token", "refresh_token", "expires_at", "expires_in", "scope", "token_type"];
    if let Some(k) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(k, "unknown field for an OAuth2 token set"));
    }
    for (k, v) in fields {
        if v.expose().is_empty() {
            return Err(bad(k, "must not be empty"));
        }
        if v.expose().chars().any(char::is_control) {
            return Err(bad(k, "must not contain CR, LF, NUL or other control characters"));
        }
    }
    let secs = |field: &str| -> Result<Option<i64>, CredentialError> {
        match fields.get(field) {
            None => Ok(None),
            Some(v) => v
                .expose()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .map(Some)
                .ok_or_else(|| bad(field, "must be a whole number of seconds")),
        }
    };
    let (access_token, refresh_token) = (fields.get("access_token").cloned(), fields.get("refresh_token").cloned());
    if access_token.is_none() && refresh_token.is_none() {
        return Err(bad("access_token", "an imported token set needs access_token or refresh_token"));
    }
    let expires_at = match (secs("expires_at")?, secs("expires_in")?) {
        (Some(_), Some(_)) => return Err(bad("expires_in", "give expires_at or expires_in, not both")),
        (Some(at), None) => Some(at),
        (None, Some(n)) => Some(now.saturating_add(n)),
        (None, None) => access_token.as_ref().map(|_| now.saturating_add(default_expires_in as i64)),
    };
    let plain = |field: &str| fields.get(field).map(|v| v.expose().to_owned());
    Ok(TokenSet {
        access_token,
        refresh_token,
        expires_at,
        issued_at: Some(now),
        token_type: plain("token_type"),
        scope: plain("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::LocalKeyProvider;
    use crate::store::sqlite::SqliteStore;

    const GH: &str = "id = \"gh\"\nname = \"GH\"\nallowed_hosts = [\"api.github.com\"]\n[[auth_methods]]\nid = \"pat\"\ntype = \"bearer\"\n[[auth_methods]]\nid = \"basic\"\ntype = \"basic\"\n";

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, SecretValue> {
        pairs.iter().map(|(k, v)| (k.to_string(), SecretValue::from(*v))).collect()
    }

    async fn service(dir: &std::path::Path) -> (Connections, SqliteStore) {
        let store = SqliteStore::open(&dir.join("db.sqlite")).unwrap();
        let keys = LocalKeyProvider::open_or_create(&dir.join("master.key")).unwrap();
        let mut ints = Integrations::default();
        ints.add(Integration::from_toml_str("gh.toml", GH, &BTreeMap::new()).unwrap(), "gh.toml").unwrap();
        let c = Connections::new(
            Arc::new(store.clone()),
            Envelope::new(Arc::new(keys)),
            Arc::new(ints),
            100,
            Duration::from_secs(60),
            TokenClient::new(Default::default(), Duration::from_secs(1), Duration::from_secs(1), &[]),
        );
        (c, store)
    }

    fn new_conn(org: &str, creds: &[(&str, &str)]) -> NewConnection {
        NewConnection {
            integration: "gh".into(),
            auth_method: "pat".into(),
            org_id: org.into(),
            user_id: "u1".into(),
            credentials: fields(creds),
        }
    }

    #[tokio::test]
    async fn create_resolve_cache_and_org_scoping() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, _) = service(dir.path()).await;
        let meta = svc.create(new_conn("org_a", &[("token", "tok-123")])).await.unwrap();
        let (r, hit) = svc.resolve("org_a", &meta.id).await.unwrap();
        assert!(!hit);
        assert_eq!(r.credential.value(0).expose(), "tok-123");
        let (cached, hit) = svc.resolve("org_a", &meta.id).await.unwrap();
        assert!(hit);
        assert!(Arc::ptr_eq(&r, &cached));
        // What it keeps of its metadata is the stored row's (without activity).
        assert_eq!(r.connection_meta(), meta);
        // The cache's key is the connection's own id, not a second copy.
        let key = svc.cache.iter().map(|(k, _)| k).next().unwrap();
        assert!(Arc::ptr_eq(&*key, &r.meta.id), "{key} / {}", r.meta.id);
        assert!(matches!(svc.resolve("org_b", &meta.id).await, Err(ResolveError::NotFound)));
        assert!(matches!(svc.resolve("org_a", "conn_aaaaaaaaaaaaaaaaaaaaaaaaaa").await, Err(ResolveError::NotFound)));
        assert!(svc.delete(&meta, "not_applicable").await.unwrap());
        assert!(matches!(svc.resolve("org_a", &meta.id).await, Err(ResolveError::NotFound)));
    }

    /// A caller connection notes a use of the connection it keeps once
    /// while it keeps it, and again once it is looked up anew.
    #[tokio::test]
    async fn a_kept_connection_notes_its_use_once_while_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, _) = service(dir.path()).await;
        let meta = svc.create(new_conn("org_a", &[("token", "tok-123")])).await.unwrap();
        let id = ids::ConnectionId::parse(meta.id.as_bytes()).unwrap();
        let queued = || svc.uses.lock().unwrap().len();
        let mut memo = ResolveMemo::default();
        let t0 = Instant::now();
        async fn uses(svc: &Connections, id: &ids::ConnectionId, at: Instant, memo: &mut ResolveMemo) {
            let (r, _) = svc.resolve_memo("org_a", id, memo, at).await.unwrap();
            // As if the last note were long ago: only the memo holds it back.
            r.use_noted.store(0, Relaxed);
            svc.note_use_memo(&r, memo);
        }
        uses(&svc, &id, t0, &mut memo).await;
        assert_eq!(queued(), 1, "the first request notes a use");
        uses(&svc, &id, t0, &mut memo).await;
        uses(&svc, &id, t0 + Duration::from_millis(500), &mut memo).await;
        assert_eq!(queued(), 1, "not again while kept");
        uses(&svc, &id, t0 + MEMO_FOR * 2, &mut memo).await;
        assert_eq!(queued(), 2, "again once looked up anew");
        // A connection the memo does not keep is noted every time.
        let other = svc.load(&meta.id).await.unwrap();
        svc.note_use_memo(&other, &mut memo);
        assert_eq!(queued(), 3);
    }

    /// A caller that changes connection id every request (a new memo each
    /// time): the thread's `Recent` answers, under the memo's rule, and
    /// never across organizations, services or a change to the cache.
    #[tokio::test]
    async fn a_thread_keeps_what_it_resolved_lately_under_the_memos_rule() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, _) = service(dir.path()).await;
        let meta = svc.create(new_conn("org_a", &[("token", "tok-123")])).await.unwrap();
        let id = ids::ConnectionId::parse(meta.id.as_bytes()).unwrap();
        let generation = || svc.generation.load(Acquire);
        let t0 = Instant::now();
        let (r, hit) = svc.resolve_memo("org_a", &id, &mut ResolveMemo::default(), t0).await.unwrap();
        assert!(!hit);
        let kept = Recent::get(svc.instance, &id, generation(), t0).expect("kept after the look-up");
        assert!(Arc::ptr_eq(&kept, &r));
        let (again, hit) = svc.resolve_memo("org_a", &id, &mut ResolveMemo::default(), t0).await.unwrap();
        assert!(hit && Arc::ptr_eq(&again, &r));
        // Another organization asking for it gets what an unknown id gets.
        let other = svc.resolve_memo("org_b", &id, &mut ResolveMemo::default(), t0).await;
        assert!(matches!(other, Err(ResolveError::NotFound)), "{other:?}");
        // Not past MEMO_FOR, not for another service (its generations start alike).
        assert!(Recent::get(svc.instance, &id, generation(), t0 + MEMO_FOR).is_none());
        let dir2 = tempfile::tempdir().unwrap();
        let (svc2, _) = service(dir2.path()).await;
        assert!(Recent::get(svc2.instance, &id, generation(), t0).is_none());
        // A change to the cache (here the connection's deletion) leaves it stale.
        assert!(svc.delete(&meta, "not_applicable").await.unwrap());
        assert!(Recent::get(svc.instance, &id, generation(), t0).is_none());
        let gone = svc.resolve_memo("org_a", &id, &mut ResolveMemo::default(), t0).await;
        assert!(matches!(gone, Err(ResolveError::NotFound)), "{gone:?}");
    }

    #[tokio::test]
    async fn validation_names_field_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, store) = service(dir.path()).await;
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[], "token", "missing"),
            (&[("token", "a"), ("extra", "b")], "extra", "unknown field for this auth method"),
            (&[("token", "a\r\nX-Evil: 1")], "token", "must not contain CR, LF or NUL"),
            (&[("token", "a\0b")], "token", "must not contain CR, LF or NUL"),
            (&[("token", "")], "token", "must not be empty"),
        ];
        for (creds, field, reason) in cases {
            match svc.create(new_conn("org_a", creds)).await {
                Err(CreateError::Credential(e)) => {
                    assert_eq!((e.field.as_str(), e.reason), (*field, *reason));
                }
                other => panic!("{creds:?}: {other:?}"),
            }
        }
        let q = crate::store::ConnectionQuery { org_id: Some("org_a".into()), limit: 10, ..Default::default() };
        assert!(store.list_connections(&q).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn copied_ciphertext_does_not_open_on_another_row() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, store) = service(dir.path()).await;
        let a = svc.create(new_conn("org_a", &[("token", "token-of-a")])).await.unwrap();
        let b = svc.create(new_conn("org_a", &[("token", "token-of-b")])).await.unwrap();
        // Move a's sealed credential onto b's row (same org, other id).
        let row_a = store.get_connection(&a.id).await.unwrap().unwrap();
        let mut row_b = store.get_connection(&b.id).await.unwrap().unwrap();
        row_b.sealed = row_a.sealed;
        store.delete_connection(&b.id, None).await.unwrap();
        store.insert_connection(&row_b, None).await.unwrap();
        let err = svc.resolve("org_a", &b.id).await.unwrap_err();
        assert!(matches!(err, ResolveError::Crypto { source: CryptoError::Open, .. }), "{err:?}");
        assert!(!format!("{err} {err:?}").contains("token-of"));
    }
}
