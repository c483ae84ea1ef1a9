//! Persistent state behind the [`Store`] trait: connections (with their sealed
//! credentials as opaque bytes) and schema migrations.
//!
//! Implementations: [`sqlite::SqliteStore`] (embedded default). Must not
//! import `crypto`: the store only ever sees ciphertext.

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;

/// What another instance changed, as a shared store's change listener
/// reports it (`postgres::spawn_listener`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This connection changed (refresh, re-authorization, delete, update).
    Connection(String),
    /// The listener (re)connected and may have missed changes: drop everything cached.
    Resync,
    /// A cool-down another instance learnt from an upstream (`quota`).
    Cooldown(String),
}

/// Lifecycle state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Active,
    NeedsReauth,
    Revoked,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::NeedsReauth => "needs_reauth",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "needs_reauth" => Some(Self::NeedsReauth),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// Which connections a listing wants: every filter that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionQuery {
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    pub integration: Option<String>,
    pub state: Option<ConnectionState>,
    /// Only those after this `(created_at, id)`: the last one of the page before.
    pub after: Option<(i64, String)>,
    pub limit: u32,
}

/// A connection's metadata: everything but the credential. Safe to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionMeta {
    pub id: String,
    pub org_id: String,
    pub user_id: String,
    pub integration: String,
    pub auth_method: String,
    pub state: ConnectionState,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// When it was last used and tested (not a change of the connection).
    pub activity: Activity,
}

/// When a connection was last used by a proxied request (to the minute:
/// uses are written in batches) and how its last test went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// Unix seconds.
    pub last_used_at: Option<i64>,
    pub last_test: Option<LastTest>,
    /// The last successful OAuth2 refresh (unix seconds).
    pub last_refreshed_at: Option<i64>,
    /// Since when refreshes have been failing (transiently); cleared by
    /// the next success.
    pub refresh_failed_at: Option<i64>,
}

/// The last `POST /v1/connections/{id}/test`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastTest {
    /// Unix seconds.
    pub at: i64,
    pub ok: bool,
    /// The problem code of a failed test.
    pub code: Option<String>,
}

/// The columns `META_COLUMNS` of both stores read, in order.
pub(crate) const META_COLUMNS: &str = "id, org_id, user_id, integration, auth_method, state, created_at, updated_at, \
     last_used_at, last_test_at, last_test_ok, last_test_code, last_refreshed_at, refresh_failed_at";
/// How many they are: the sealed columns follow.
pub(crate) const META_LEN: usize = 14;

/// A sealed blob as stored: which key wrapped the data key, the wrapped data
/// key, and the AEAD nonce and ciphertext. Opaque to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBytes {
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// A stored row: metadata plus the sealed credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRow {
    pub meta: ConnectionMeta,
    pub sealed: SealedBytes,
}

/// An OAuth2 authorization in progress, keyed by a hash of its `state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAuthorization {
    /// SHA-256 (hex) of the `state` sent to the provider.
    pub state_hash: String,
    pub org_id: String,
    pub user_id: String,
    pub integration: String,
    pub auth_method: String,
    pub redirect_uri: String,
    pub return_to: Option<String>,
    /// Re-authorization: the existing connection whose tokens the result replaces.
    pub connection_id: Option<String>,
    /// The PKCE verifier, sealed.
    pub verifier: SealedBytes,
    pub created_at: i64,
    pub expires_at: i64,
    /// Started from a connect page: the id of its connect session.
    pub connect_session: Option<String>,
}

/// An event about a connection (`connection.created`, …), written in the
/// same transaction as the change that caused it: a change that rolls
/// back leaves no event, and a committed one always has its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// `evt_…`: stable across redeliveries.
    pub id: String,
    pub kind: String,
    pub org_id: String,
    pub connection_id: String,
    /// The JSON body (never a credential).
    pub payload: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// An event as stored: its place in the feed (`seq`, increasing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: i64,
    pub event: NewEvent,
}

/// One webhook delivery claimed for an attempt: the endpoint, the event
/// and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The endpoint's name (`webhooks[].name`).
    pub endpoint: String,
    pub event_id: String,
    /// Attempts made before this one.
    pub attempts: u32,
    pub payload: String,
    /// When the event happened (unix seconds).
    pub created_at: i64,
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// 2xx.
    Delivered,
    /// Not yet: try again at `next_attempt_at`.
    Retry { next_attempt_at: i64, error: String },
    /// Retried for long enough: given up.
    Failed { error: String },
}

/// How long an expired connect session is kept (its page can still say
/// "expired" rather than "unknown") before it is swept.
pub(crate) const SESSION_KEPT_SECS: i64 = 86_400;

/// A stored list of ids (`a,b,c`; ids have no commas).
pub(crate) fn split_list(s: &str) -> Vec<String> {
    s.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

/// A connect session: what one end user may connect through the connect
/// pages, reached through a URL that carries a random token (stored here
/// only as its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSession {
    /// `cs_…`: names the session in logs and audit lines (not a secret).
    pub id: String,
    /// SHA-256 (hex) of the session token.
    pub token_hash: String,
    pub org_id: String,
    pub user_id: String,
    /// The integrations the user may pick from; `None`: every one.
    pub integrations: Option<Vec<String>>,
    /// Re-authorization / credential replacement of this connection.
    pub connection_id: Option<String>,
    /// Where the browser goes when done (an allowed origin).
    pub return_to: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: i64,
    /// When a connection was being made with it (claimed); a session is
    /// claimed at most once.
    pub claimed_at: Option<i64>,
    /// The connection it made.
    pub connection_made: Option<String>,
}

/// What a refresh writes back while it holds the row lock.
#[derive(Debug, Clone)]
pub enum RowUpdate {
    /// A refreshed credential: the state becomes `active`,
    /// `last_refreshed_at` the update's time, and a failure streak ends.
    Credential(SealedBytes),
    /// A refresh failed (transiently): the failure streak starts, unless
    /// one is on (then nothing changes and no event is written).
    RefreshFailed,
    /// State only (e.g. `needs_reauth` after `invalid_grant`).
    State(ConnectionState),
}

/// A connection row locked for a refresh: across instances on PostgreSQL
/// (`SELECT … FOR UPDATE` in an open transaction). Dropping it without
/// [`RowLock::commit`] rolls back and releases the lock.
#[async_trait]
pub trait RowLock: Send {
    /// The row as read under the lock.
    fn row(&self) -> &ConnectionRow;
    /// Writes `update` (if any) and `event`, publishes the change, commits, releases.
    async fn commit(
        self: Box<Self>,
        update: Option<RowUpdate>,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<(), StoreError>;
}

/// The tables that hold sealed blobs (what `credproxy keys rotate` walks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SealedTable {
    /// `connections`: each connection's credential.
    Connections,
    /// `oauth2_pending`: PKCE verifiers of authorizations in progress.
    PendingAuthorizations,
    /// `oauth_apps`: organizations' own OAuth client secrets.
    OAuthApps,
}

impl SealedTable {
    pub const ALL: [Self; 3] = [Self::Connections, Self::PendingAuthorizations, Self::OAuthApps];

    /// The SQL table name (the same in every store).
    pub fn table(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::PendingAuthorizations => "oauth2_pending",
            Self::OAuthApps => "oauth_apps",
        }
    }

    /// The table's primary key column.
    pub(crate) fn id_column(self) -> &'static str {
        match self {
            Self::Connections | Self::OAuthApps => "id",
            Self::PendingAuthorizations => "state_hash",
        }
    }
}

/// An organization's own OAuth client for one integration's auth method
/// (`PUT /v1/orgs/{org}/oauth-apps/{integration}/{auth_method}`), as the
/// admin API shows it: the client id, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OAuthApp {
    pub org_id: String,
    pub integration: String,
    pub auth_method: String,
    pub client_id: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A stored app: what is shown, plus the secret sealed like a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthAppRow {
    pub app: OAuthApp,
    pub sealed: SealedBytes,
}

impl OAuthAppRow {
    /// The row's key, `integration/auth_method/org` (also what its secret's
    /// encryption context is bound to).
    pub fn id_of(org_id: &str, integration: &str, auth_method: &str) -> String {
        format!("{integration}/{auth_method}/{org_id}")
    }
}

/// One sealed blob and what its encryption context is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// Connection id, or state hash of a pending authorization.
    pub id: String,
    pub org_id: String,
    pub sealed: SealedBytes,
}

/// How many records of a table one key wraps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub table: SealedTable,
    pub key_id: String,
    pub records: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("a connection with id {0} already exists")]
    Duplicate(String),
    #[error("stored row {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("store migration failed: {0}")]
    Migration(String),
    #[error("timed out waiting for the lock on connection {0}")]
    LockTimeout(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a connection, and `event` with it (one transaction).
    async fn insert_connection(&self, row: &ConnectionRow, event: Option<&NewEvent>) -> Result<(), StoreError>;
    async fn get_connection(&self, id: &str) -> Result<Option<ConnectionRow>, StoreError>;
    /// Connections that `q` selects, oldest first (then by id), at most
    /// `q.limit` of them, after `q.after`.
    async fn list_connections(&self, q: &ConnectionQuery) -> Result<Vec<ConnectionMeta>, StoreError>;
    /// True if a row was deleted; `event` is written only then (one
    /// transaction), as for every change below.
    async fn delete_connection(&self, id: &str, event: Option<&NewEvent>) -> Result<bool, StoreError>;
    /// Replaces a connection's sealed credential and state. True if the row exists.
    async fn update_credential(
        &self,
        id: &str,
        sealed: &SealedBytes,
        state: ConnectionState,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError>;
    /// Sets a connection's state. True if the row exists.
    async fn set_state(
        &self,
        id: &str,
        state: ConnectionState,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError>;
    async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError>;
    /// Removes and returns a pending authorization: each `state` is usable once.
    async fn take_pending(&self, state_hash: &str) -> Result<Option<PendingAuthorization>, StoreError>;
    /// Locks a connection's row for a refresh, waiting at most `wait`.
    /// `Ok(None)` if the row does not exist.
    async fn lock_connection(
        &self,
        id: &str,
        wait: std::time::Duration,
    ) -> Result<Option<Box<dyn RowLock>>, StoreError>;
    /// Up to `limit` records of `table` whose key id is not `key_id`, with id
    /// greater than `after`, in id order (a resumable walk).
    async fn sealed_not_under(
        &self,
        table: SealedTable,
        key_id: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRecord>, StoreError>;
    /// Compare-and-set: replaces a record's key id and wrapped key if its key
    /// id, wrapped key and nonce are still those of `old`. False if the row
    /// changed (a refresh rewrote it) or is gone. Nonce and ciphertext stay.
    async fn rewrap(
        &self,
        table: SealedTable,
        id: &str,
        old: &SealedBytes,
        key_id: &str,
        wrapped_key: &[u8],
    ) -> Result<bool, StoreError>;
    /// Record counts per table and key id.
    async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError>;
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Tells the other instances of a cool-down an upstream asked for
    /// (`quota`; PostgreSQL notifies them). A lone SQLite instance has
    /// nobody to tell.
    async fn publish_cooldown(&self, _payload: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Records a connection test's outcome (not a change: no notification,
    /// `updated_at` stays), with `event` (a failed test). False if the row is gone.
    async fn record_test(&self, id: &str, test: &LastTest, event: Option<&NewEvent>) -> Result<bool, StoreError>;
    /// Queues every event since `since` (unix seconds) that `endpoint` has
    /// not got yet, of the `kinds` (empty: all) and organization it takes.
    /// Returns how many were queued. Safe to run on many instances at once.
    async fn enqueue_deliveries(
        &self,
        endpoint: &str,
        kinds: &[String],
        org_id: Option<&str>,
        since: i64,
    ) -> Result<u64, StoreError>;
    /// Claims up to `limit` due deliveries (oldest events first) until
    /// `lease_until`: no other instance claims them before then (PostgreSQL:
    /// `FOR UPDATE SKIP LOCKED`).
    async fn claim_deliveries(&self, now: i64, lease_until: i64, limit: u32) -> Result<Vec<Delivery>, StoreError>;
    /// Records how an attempt ended (and releases the claim).
    async fn finish_delivery(
        &self,
        endpoint: &str,
        event_id: &str,
        now: i64,
        outcome: &DeliveryOutcome,
    ) -> Result<(), StoreError>;
    /// Delivers an event again to every endpoint that had it: how many.
    async fn redeliver(&self, event_id: &str, now: i64) -> Result<u64, StoreError>;
    /// Deliveries waiting (due or not) and given up.
    async fn delivery_counts(&self) -> Result<(u64, u64), StoreError>;
    /// Active connections of `integration`/`auth_method` idle since before
    /// `cutoff` (unix seconds): not used, refreshed or created after it.
    /// At most `limit`, least recently active first.
    async fn idle_connections(
        &self,
        integration: &str,
        auth_method: &str,
        cutoff: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError>;
    /// Events after `after` (a `seq`; 0 for the first), oldest first, at
    /// most `limit`; one organization's or every one's (`None`).
    async fn list_events(&self, org_id: Option<&str>, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError>;
    /// Records when connections were last used, `(id, unix seconds)`; a
    /// time earlier than the stored one is ignored.
    async fn record_used(&self, uses: &[(String, i64)]) -> Result<(), StoreError>;
    /// Stores a new connect session (and sweeps sessions expired a day ago).
    async fn insert_connect_session(&self, s: &ConnectSession) -> Result<(), StoreError>;
    /// The session whose token hashes to `token_hash`.
    async fn connect_session(&self, token_hash: &str) -> Result<Option<ConnectSession>, StoreError>;
    /// Claims a session for making its one connection: true if it was
    /// unclaimed and not expired at `now` (one caller wins).
    async fn claim_connect_session(&self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// Ends a claim: `Some(connection)` records what it made; `None`
    /// releases it (nothing was stored; the user may try again).
    async fn finish_connect_session(&self, id: &str, made: Option<&str>) -> Result<(), StoreError>;
    /// Creates or replaces an organization's OAuth app (a replacement keeps
    /// `created_at`); returns the stored `created_at`.
    async fn put_oauth_app(&self, app: &OAuthAppRow) -> Result<i64, StoreError>;
    async fn get_oauth_app(
        &self,
        org_id: &str,
        integration: &str,
        auth_method: &str,
    ) -> Result<Option<OAuthAppRow>, StoreError>;
    /// True if there was one.
    async fn delete_oauth_app(&self, org_id: &str, integration: &str, auth_method: &str) -> Result<bool, StoreError>;
    /// An organization's apps, by integration and auth method.
    async fn list_oauth_apps(&self, org_id: &str) -> Result<Vec<OAuthAppRow>, StoreError>;
}
