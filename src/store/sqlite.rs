//! SQLite store: one file in the data directory, WAL mode, versioned
//! migrations. rusqlite is synchronous, so every call runs on the blocking
//! pool; one connection behind a mutex is plenty for the admin write rate,
//! and reads on the proxy path are served from the credential cache.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    split_list, Activity, ConnectSession, ConnectionMeta, ConnectionQuery, ConnectionRow, ConnectionState, Delivery,
    DeliveryOutcome, KeyUsage, LastTest, NewEvent, OAuthApp, OAuthAppRow, PendingAuthorization, RowLock, RowUpdate,
    SealedBytes, SealedRecord, SealedTable, Store, StoreError, StoredEvent, META_COLUMNS, META_LEN, SESSION_KEPT_SECS,
};

/// Versioned migrations; index + 1 is the version. Never edit a shipped one.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE connections (
    id           TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    integration  TEXT NOT NULL,
    auth_method  TEXT NOT NULL,
    state        TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    key_id       TEXT NOT NULL,
    wrapped_key  BLOB NOT NULL,
    nonce        BLOB NOT NULL,
    ciphertext   BLOB NOT NULL
);
CREATE INDEX connections_org ON connections (org_id, created_at);
",
    "
CREATE TABLE oauth2_pending (
    state_hash   TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    integration  TEXT NOT NULL,
    auth_method  TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    return_to    TEXT,
    connection_id TEXT,
    key_id       TEXT NOT NULL,
    wrapped_key  BLOB NOT NULL,
    nonce        BLOB NOT NULL,
    ciphertext   BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX oauth2_pending_expiry ON oauth2_pending (expires_at);
",
    "
ALTER TABLE connections ADD COLUMN last_used_at INTEGER;
ALTER TABLE connections ADD COLUMN last_test_at INTEGER;
ALTER TABLE connections ADD COLUMN last_test_ok INTEGER;
ALTER TABLE connections ADD COLUMN last_test_code TEXT;
",
    "
CREATE TABLE connect_sessions (
    id            TEXT PRIMARY KEY,
    token_hash    TEXT NOT NULL UNIQUE,
    org_id        TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    integrations  TEXT,
    connection_id TEXT,
    return_to     TEXT,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    claimed_at    INTEGER,
    connection_made TEXT
);
CREATE INDEX connect_sessions_expiry ON connect_sessions (expires_at);
ALTER TABLE oauth2_pending ADD COLUMN connect_session TEXT;
",
    "
CREATE TABLE events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    org_id        TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    payload       TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX events_org ON events (org_id, seq);
",
    "
CREATE INDEX events_created ON events (created_at);
CREATE TABLE deliveries (
    endpoint        TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    delivered_at    INTEGER,
    failed_at       INTEGER,
    last_error      TEXT,
    PRIMARY KEY (endpoint, event_id)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at);
CREATE INDEX deliveries_event ON deliveries (event_id);
",
    "
ALTER TABLE connections ADD COLUMN last_refreshed_at INTEGER;
ALTER TABLE connections ADD COLUMN refresh_failed_at INTEGER;
",
    "
CREATE TABLE oauth_apps (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL,
    integration TEXT NOT NULL,
    auth_method TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    key_id      TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL
);
CREATE INDEX oauth_apps_org ON oauth_apps (org_id);
",
];

const OAUTH_APP_COLUMNS: &str =
    "org_id, integration, auth_method, client_id, created_at, updated_at, key_id, wrapped_key, nonce, ciphertext";

fn oauth_app(r: &rusqlite::Row<'_>) -> rusqlite::Result<OAuthAppRow> {
    Ok(OAuthAppRow {
        app: OAuthApp {
            org_id: r.get(0)?,
            integration: r.get(1)?,
            auth_method: r.get(2)?,
            client_id: r.get(3)?,
            created_at: r.get(4)?,
            updated_at: r.get(5)?,
        },
        sealed: sealed(r, 6)?,
    })
}

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating the file and its directory if needed) and migrates.
    /// Opens (or creates) the database file. A new directory is created
    /// 0700 and a new file 0600, like the master key; SQLite gives its
    /// `-wal` and `-shm` files the database file's mode.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| backend(format!("cannot create {}: {e}", parent.display())))?;
        }
        if !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| backend(format!("cannot create {}: {e}", path.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(backend)?;
        migrate(&conn)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| backend("store mutex poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let m = |e: rusqlite::Error| StoreError::Migration(e.to_string());
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .map_err(m)?;
    let current: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0)).map_err(m)?;
    if current > MIGRATIONS.len() as i64 {
        return Err(StoreError::Migration(format!(
            "database schema version {current} is newer than this binary ({}); upgrade credproxy",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN; {sql}; INSERT INTO schema_migrations VALUES ({version}, strftime('%s','now')); COMMIT;"
        ))
        .map_err(|e| StoreError::Migration(format!("version {version}: {e}")))?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}

fn meta_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ConnectionMeta, String)> {
    let state: String = r.get(5)?;
    Ok((
        ConnectionMeta {
            id: r.get(0)?,
            org_id: r.get(1)?,
            user_id: r.get(2)?,
            integration: r.get(3)?,
            auth_method: r.get(4)?,
            state: ConnectionState::Active,
            created_at: r.get(6)?,
            updated_at: r.get(7)?,
            activity: Activity {
                last_used_at: r.get(8)?,
                last_test: match (r.get::<_, Option<i64>>(9)?, r.get::<_, Option<bool>>(10)?) {
                    (Some(at), Some(ok)) => Some(LastTest { at, ok, code: r.get(11)? }),
                    _ => None,
                },
                last_refreshed_at: r.get(12)?,
                refresh_failed_at: r.get(13)?,
            },
        },
        state,
    ))
}

fn check_state((mut meta, state): (ConnectionMeta, String)) -> Result<ConnectionMeta, StoreError> {
    meta.state = ConnectionState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt { id: meta.id.clone(), reason: format!("unknown state {state:?}") })?;
    Ok(meta)
}

/// The four sealed columns, `key_id, wrapped_key, nonce, ciphertext`, from `at`.
fn sealed(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<SealedBytes> {
    Ok(SealedBytes {
        key_id: r.get(at)?,
        wrapped_key: r.get(at + 1)?,
        nonce: r.get(at + 2)?,
        ciphertext: r.get(at + 3)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_connection(&self, row: &ConnectionRow, event: Option<&NewEvent>) -> Result<(), StoreError> {
        let (row, event) = (row.clone(), event.cloned());
        self.with(move |c| {
            let m = &row.meta;
            let tx = c.transaction().map_err(backend)?;
            let res = tx.execute(
                "INSERT INTO connections (id, org_id, user_id, integration, auth_method, state, created_at, updated_at, key_id, wrapped_key, nonce, ciphertext)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![m.id, m.org_id, m.user_id, m.integration, m.auth_method, m.state.as_str(), m.created_at, m.updated_at, row.sealed.key_id, row.sealed.wrapped_key, row.sealed.nonce, row.sealed.ciphertext],
            );
            match res {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                    return Err(StoreError::Duplicate(m.id.clone()));
                }
                Err(e) => return Err(backend(e)),
            }
            insert_event(&tx, event.as_ref())?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn get_connection(&self, id: &str) -> Result<Option<ConnectionRow>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            let row = c
                .query_row(
                    &format!(
                        "SELECT {META_COLUMNS}, key_id, wrapped_key, nonce, ciphertext FROM connections WHERE id = ?1"
                    ),
                    [&id],
                    |r| Ok((meta_from_row(r)?, sealed(r, META_LEN)?)),
                )
                .optional()
                .map_err(backend)?;
            row.map(|(meta, sealed)| Ok(ConnectionRow { meta: check_state(meta)?, sealed })).transpose()
        })
        .await
    }

    async fn list_connections(&self, q: &ConnectionQuery) -> Result<Vec<ConnectionMeta>, StoreError> {
        let q = q.clone();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {META_COLUMNS} FROM connections
                     WHERE (?1 IS NULL OR org_id = ?1) AND (?2 IS NULL OR user_id = ?2)
                       AND (?3 IS NULL OR integration = ?3) AND (?4 IS NULL OR state = ?4)
                       AND (?5 IS NULL OR (created_at, id) > (?5, ?6))
                     ORDER BY created_at, id LIMIT ?7"
                ))
                .map_err(backend)?;
            let (after_at, after_id) = match &q.after {
                Some((at, id)) => (Some(*at), Some(id.clone())),
                None => (None, None),
            };
            let params = params![
                q.org_id,
                q.user_id,
                q.integration,
                q.state.map(ConnectionState::as_str),
                after_at,
                after_id,
                i64::from(q.limit)
            ];
            let rows = stmt.query_map(params, meta_from_row).map_err(backend)?;
            rows.map(|r| check_state(r.map_err(backend)?)).collect()
        })
        .await
    }

    async fn delete_connection(&self, id: &str, event: Option<&NewEvent>) -> Result<bool, StoreError> {
        let (id, event) = (id.to_owned(), event.cloned());
        self.with(move |c| {
            changed_with_event(c, event.as_ref(), |tx| tx.execute("DELETE FROM connections WHERE id = ?1", [&id]))
        })
        .await
    }

    async fn update_credential(
        &self,
        id: &str,
        sealed: &SealedBytes,
        state: ConnectionState,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        let (id, sealed, event) = (id.to_owned(), sealed.clone(), event.cloned());
        self.with(move |c| {
            changed_with_event(c, event.as_ref(), |tx| write_credential(tx, &id, &sealed, state, updated_at, false))
        })
        .await
    }

    async fn set_state(
        &self,
        id: &str,
        state: ConnectionState,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        let (id, event) = (id.to_owned(), event.cloned());
        self.with(move |c| {
            changed_with_event(c, event.as_ref(), |tx| {
                tx.execute(
                    "UPDATE connections SET state = ?2, updated_at = ?3 WHERE id = ?1",
                    params![id, state.as_str(), updated_at],
                )
            })
        })
        .await
    }

    async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
        let p = p.clone();
        self.with(move |c| {
            // Expired authorizations are dead weight: sweep them on the way in.
            c.execute("DELETE FROM oauth2_pending WHERE expires_at < ?1", [p.created_at]).map_err(backend)?;
            c.execute(
                "INSERT INTO oauth2_pending (state_hash, org_id, user_id, integration, auth_method, redirect_uri, return_to, key_id, wrapped_key, nonce, ciphertext, created_at, expires_at, connection_id, connect_session)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![p.state_hash, p.org_id, p.user_id, p.integration, p.auth_method, p.redirect_uri, p.return_to, p.verifier.key_id, p.verifier.wrapped_key, p.verifier.nonce, p.verifier.ciphertext, p.created_at, p.expires_at, p.connection_id, p.connect_session],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn take_pending(&self, state_hash: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        let state_hash = state_hash.to_owned();
        self.with(move |c| {
            c.query_row(
                "DELETE FROM oauth2_pending WHERE state_hash = ?1
                 RETURNING state_hash, org_id, user_id, integration, auth_method, redirect_uri, return_to, key_id, wrapped_key, nonce, ciphertext, created_at, expires_at, connection_id, connect_session",
                [&state_hash],
                |r| {
                    Ok(PendingAuthorization {
                        state_hash: r.get(0)?,
                        org_id: r.get(1)?,
                        user_id: r.get(2)?,
                        integration: r.get(3)?,
                        auth_method: r.get(4)?,
                        redirect_uri: r.get(5)?,
                        return_to: r.get(6)?,
                        verifier: sealed(r, 7)?,
                        created_at: r.get(11)?,
                        expires_at: r.get(12)?,
                        connection_id: r.get(13)?,
                        connect_session: r.get(14)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn lock_connection(
        &self,
        id: &str,
        _wait: std::time::Duration,
    ) -> Result<Option<Box<dyn RowLock>>, StoreError> {
        // One instance per SQLite file: the in-process single flight in front
        // of this call is the lock.
        Ok(self
            .get_connection(id)
            .await?
            .map(|row| Box::new(SqliteRowLock { store: self.clone(), row }) as Box<dyn RowLock>))
    }

    async fn sealed_not_under(
        &self,
        table: SealedTable,
        key_id: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        let (key_id, after) = (key_id.to_owned(), after.to_owned());
        self.with(move |c| {
            let (t, id) = (table.table(), table.id_column());
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {id}, org_id, key_id, wrapped_key, nonce, ciphertext FROM {t}
                     WHERE key_id <> ?1 AND {id} > ?2 ORDER BY {id} LIMIT ?3"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![key_id, after, limit], |r| {
                    Ok(SealedRecord { id: r.get(0)?, org_id: r.get(1)?, sealed: sealed(r, 2)? })
                })
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }

    async fn rewrap(
        &self,
        table: SealedTable,
        id: &str,
        old: &SealedBytes,
        key_id: &str,
        wrapped_key: &[u8],
    ) -> Result<bool, StoreError> {
        let (id, old, key_id, wrapped_key) = (id.to_owned(), old.clone(), key_id.to_owned(), wrapped_key.to_vec());
        self.with(move |c| {
            let (t, idc) = (table.table(), table.id_column());
            let n = c
                .execute(
                    &format!(
                        "UPDATE {t} SET key_id = ?1, wrapped_key = ?2
                         WHERE {idc} = ?3 AND key_id = ?4 AND wrapped_key = ?5 AND nonce = ?6"
                    ),
                    params![key_id, wrapped_key, id, old.key_id, old.wrapped_key, old.nonce],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        self.with(|c| {
            let mut out = Vec::new();
            for table in SealedTable::ALL {
                let sql = format!("SELECT key_id, COUNT(*) FROM {} GROUP BY key_id ORDER BY key_id", table.table());
                let mut stmt = c.prepare(&sql).map_err(backend)?;
                let rows = stmt
                    .query_map([], |r| Ok(KeyUsage { table, key_id: r.get(0)?, records: r.get::<_, i64>(1)? as u64 }))
                    .map_err(backend)?;
                for r in rows {
                    out.push(r.map_err(backend)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(backend)).await
    }

    async fn record_test(&self, id: &str, test: &LastTest, event: Option<&NewEvent>) -> Result<bool, StoreError> {
        let (id, test, event) = (id.to_owned(), test.clone(), event.cloned());
        self.with(move |c| {
            changed_with_event(c, event.as_ref(), |tx| {
                tx.execute(
                    "UPDATE connections SET last_test_at = ?2, last_test_ok = ?3, last_test_code = ?4 WHERE id = ?1",
                    params![id, test.at, test.ok, test.code],
                )
            })
        })
        .await
    }

    async fn enqueue_deliveries(
        &self,
        endpoint: &str,
        kinds: &[String],
        org_id: Option<&str>,
        since: i64,
    ) -> Result<u64, StoreError> {
        let endpoint = endpoint.to_owned();
        let kinds = if kinds.is_empty() { String::new() } else { format!(",{},", kinds.join(",")) };
        let org = org_id.map(str::to_owned);
        self.with(move |c| {
            let n = c
                .execute(
                    "INSERT OR IGNORE INTO deliveries (endpoint, event_id, seq, next_attempt_at)
                     SELECT ?1, e.id, e.seq, e.created_at FROM events e
                     WHERE e.created_at >= ?2 AND (?3 IS NULL OR e.org_id = ?3)
                       AND (?4 = '' OR instr(?4, ',' || e.kind || ',') > 0)
                       AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = ?1 AND d.event_id = e.id)",
                    params![endpoint, since, org, kinds],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn claim_deliveries(&self, now: i64, lease_until: i64, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(backend)?;
            let claimed = {
                let mut st = tx
                    .prepare(
                        "UPDATE deliveries SET locked_until = ?2 WHERE rowid IN (
                           SELECT rowid FROM deliveries
                           WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= ?1
                             AND (locked_until IS NULL OR locked_until <= ?1)
                           ORDER BY seq LIMIT ?3)
                         RETURNING endpoint, event_id, attempts",
                    )
                    .map_err(backend)?;
                let rows = st
                    .query_map(params![now, lease_until, limit], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, u32>(2)?))
                    })
                    .map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            let mut out = Vec::with_capacity(claimed.len());
            for (endpoint, event_id, attempts) in claimed {
                let (payload, created_at) = tx
                    .query_row("SELECT payload, created_at FROM events WHERE id = ?1", [&event_id], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(backend)?;
                out.push(Delivery { endpoint, event_id, attempts, payload, created_at });
            }
            tx.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }

    async fn finish_delivery(
        &self,
        endpoint: &str,
        event_id: &str,
        now: i64,
        outcome: &DeliveryOutcome,
    ) -> Result<(), StoreError> {
        let (endpoint, event_id, outcome) = (endpoint.to_owned(), event_id.to_owned(), outcome.clone());
        self.with(move |c| {
            let (delivered, failed, next, error) = match outcome {
                DeliveryOutcome::Delivered => (Some(now), None, None, None),
                DeliveryOutcome::Retry { next_attempt_at, error } => (None, None, Some(next_attempt_at), Some(error)),
                DeliveryOutcome::Failed { error } => (None, Some(now), None, Some(error)),
            };
            c.execute(
                "UPDATE deliveries SET attempts = attempts + 1, locked_until = NULL, delivered_at = ?3,
                   failed_at = ?4, next_attempt_at = COALESCE(?5, next_attempt_at), last_error = ?6
                 WHERE endpoint = ?1 AND event_id = ?2",
                params![endpoint, event_id, delivered, failed, next, error],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn redeliver(&self, event_id: &str, now: i64) -> Result<u64, StoreError> {
        let event_id = event_id.to_owned();
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE deliveries SET delivered_at = NULL, failed_at = NULL, locked_until = NULL,
                       attempts = 0, next_attempt_at = ?2, last_error = NULL WHERE event_id = ?1",
                    params![event_id, now],
                )
                .map_err(backend)?;
            Ok(n as u64)
        })
        .await
    }

    async fn delivery_counts(&self) -> Result<(u64, u64), StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(delivered_at IS NULL AND failed_at IS NULL), 0), COALESCE(SUM(failed_at IS NOT NULL), 0)
                 FROM deliveries",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(backend)
        })
        .await
    }

    async fn idle_connections(
        &self,
        integration: &str,
        auth_method: &str,
        cutoff: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let (integration, auth_method) = (integration.to_owned(), auth_method.to_owned());
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT id FROM connections
                     WHERE integration = ?1 AND auth_method = ?2 AND state = 'active'
                       AND max(created_at, COALESCE(last_used_at, 0), COALESCE(last_refreshed_at, 0)) < ?3
                     ORDER BY max(created_at, COALESCE(last_used_at, 0), COALESCE(last_refreshed_at, 0)) LIMIT ?4",
                )
                .map_err(backend)?;
            let rows = st.query_map(params![integration, auth_method, cutoff, limit], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<Vec<String>, _>>().map_err(backend)
        })
        .await
    }

    async fn list_events(&self, org_id: Option<&str>, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let org = org_id.map(str::to_owned);
        self.with(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT seq, id, kind, org_id, connection_id, payload, created_at FROM events
                     WHERE seq > ?1 AND (?2 IS NULL OR org_id = ?2) ORDER BY seq LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = st
                .query_map(params![after, org, limit], |r| {
                    Ok(StoredEvent {
                        seq: r.get(0)?,
                        event: NewEvent {
                            id: r.get(1)?,
                            kind: r.get(2)?,
                            org_id: r.get(3)?,
                            connection_id: r.get(4)?,
                            payload: r.get(5)?,
                            created_at: r.get(6)?,
                        },
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn record_used(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        let uses = uses.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(backend)?;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE connections SET last_used_at = ?2 WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
                    )
                    .map_err(backend)?;
                for (id, at) in &uses {
                    st.execute(params![id, at]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn insert_connect_session(&self, s: &ConnectSession) -> Result<(), StoreError> {
        let s = s.clone();
        self.with(move |c| {
            c.execute("DELETE FROM connect_sessions WHERE expires_at < ?1", [s.created_at - SESSION_KEPT_SECS])
                .map_err(backend)?;
            c.execute(
                "INSERT INTO connect_sessions (id, token_hash, org_id, user_id, integrations, connection_id, return_to, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![s.id, s.token_hash, s.org_id, s.user_id, s.integrations.as_ref().map(|i| i.join(",")), s.connection_id, s.return_to, s.created_at, s.expires_at],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn connect_session(&self, token_hash: &str) -> Result<Option<ConnectSession>, StoreError> {
        let token_hash = token_hash.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT id, token_hash, org_id, user_id, integrations, connection_id, return_to, created_at, expires_at, claimed_at, connection_made
                 FROM connect_sessions WHERE token_hash = ?1",
                [&token_hash],
                |r| {
                    let integrations: Option<String> = r.get(4)?;
                    Ok(ConnectSession {
                        id: r.get(0)?,
                        token_hash: r.get(1)?,
                        org_id: r.get(2)?,
                        user_id: r.get(3)?,
                        integrations: integrations.map(|i| split_list(&i)),
                        connection_id: r.get(5)?,
                        return_to: r.get(6)?,
                        created_at: r.get(7)?,
                        expires_at: r.get(8)?,
                        claimed_at: r.get(9)?,
                        connection_made: r.get(10)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn claim_connect_session(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE connect_sessions SET claimed_at = ?2 WHERE id = ?1 AND claimed_at IS NULL AND expires_at > ?2",
                    params![id, now],
                )
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn finish_connect_session(&self, id: &str, made: Option<&str>) -> Result<(), StoreError> {
        let (id, made) = (id.to_owned(), made.map(str::to_owned));
        self.with(move |c| {
            match made {
                Some(conn) => {
                    c.execute("UPDATE connect_sessions SET connection_made = ?2 WHERE id = ?1", params![id, conn])
                }
                None => c.execute(
                    "UPDATE connect_sessions SET claimed_at = NULL WHERE id = ?1 AND connection_made IS NULL",
                    [&id],
                ),
            }
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn put_oauth_app(&self, app: &OAuthAppRow) -> Result<i64, StoreError> {
        let row = app.clone();
        self.with(move |c| {
            let (a, s) = (&row.app, &row.sealed);
            let id = OAuthAppRow::id_of(&a.org_id, &a.integration, &a.auth_method);
            c.query_row(
                "INSERT INTO oauth_apps (id, org_id, integration, auth_method, client_id, created_at, updated_at, key_id, wrapped_key, nonce, ciphertext)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (id) DO UPDATE SET client_id = excluded.client_id, updated_at = excluded.updated_at,
                   key_id = excluded.key_id, wrapped_key = excluded.wrapped_key, nonce = excluded.nonce, ciphertext = excluded.ciphertext
                 RETURNING created_at",
                params![id, a.org_id, a.integration, a.auth_method, a.client_id, a.created_at, a.updated_at, s.key_id, s.wrapped_key, s.nonce, s.ciphertext],
                |r| r.get(0),
            )
            .map_err(backend)
        })
        .await
    }

    async fn get_oauth_app(
        &self,
        org_id: &str,
        integration: &str,
        auth_method: &str,
    ) -> Result<Option<OAuthAppRow>, StoreError> {
        let id = OAuthAppRow::id_of(org_id, integration, auth_method);
        self.with(move |c| {
            c.query_row(&format!("SELECT {OAUTH_APP_COLUMNS} FROM oauth_apps WHERE id = ?1"), [&id], oauth_app)
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn delete_oauth_app(&self, org_id: &str, integration: &str, auth_method: &str) -> Result<bool, StoreError> {
        let id = OAuthAppRow::id_of(org_id, integration, auth_method);
        self.with(move |c| Ok(c.execute("DELETE FROM oauth_apps WHERE id = ?1", [&id]).map_err(backend)? == 1)).await
    }

    async fn list_oauth_apps(&self, org_id: &str) -> Result<Vec<OAuthAppRow>, StoreError> {
        let org_id = org_id.to_owned();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {OAUTH_APP_COLUMNS} FROM oauth_apps WHERE org_id = ?1 ORDER BY integration, auth_method"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([&org_id], oauth_app).map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }
}

/// Replaces a connection's credential and state; `refreshed`: it is an
/// OAuth2 refresh (the last refresh is now, a failure streak ends).
fn write_credential(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    sealed: &SealedBytes,
    state: ConnectionState,
    updated_at: i64,
    refreshed: bool,
) -> rusqlite::Result<usize> {
    tx.execute(
        "UPDATE connections SET key_id = ?2, wrapped_key = ?3, nonce = ?4, ciphertext = ?5, state = ?6, updated_at = ?7,
           last_refreshed_at = CASE WHEN ?8 THEN ?7 ELSE last_refreshed_at END,
           refresh_failed_at = CASE WHEN ?8 THEN NULL ELSE refresh_failed_at END
         WHERE id = ?1",
        params![id, sealed.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext, state.as_str(), updated_at, refreshed],
    )
}

/// Runs `change` and, if it changed a row, writes `event`: one transaction.
fn changed_with_event(
    c: &mut Connection,
    event: Option<&NewEvent>,
    change: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<usize>,
) -> Result<bool, StoreError> {
    let tx = c.transaction().map_err(backend)?;
    let changed = change(&tx).map_err(backend)? > 0;
    if changed {
        insert_event(&tx, event)?;
    }
    tx.commit().map_err(backend)?;
    Ok(changed)
}

fn insert_event(tx: &rusqlite::Transaction<'_>, event: Option<&NewEvent>) -> Result<(), StoreError> {
    let Some(e) = event else { return Ok(()) };
    tx.execute(
        "INSERT INTO events (id, kind, org_id, connection_id, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![e.id, e.kind, e.org_id, e.connection_id, e.payload, e.created_at],
    )
    .map_err(backend)?;
    Ok(())
}

struct SqliteRowLock {
    store: SqliteStore,
    row: ConnectionRow,
}

#[async_trait]
impl RowLock for SqliteRowLock {
    fn row(&self) -> &ConnectionRow {
        &self.row
    }

    async fn commit(
        self: Box<Self>,
        update: Option<RowUpdate>,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<(), StoreError> {
        let id = self.row.meta.id.clone();
        let event = event.cloned();
        match update {
            None => Ok(()),
            Some(RowUpdate::Credential(sealed)) => self
                .store
                .with(move |c| {
                    changed_with_event(c, event.as_ref(), |tx| {
                        write_credential(tx, &id, &sealed, ConnectionState::Active, updated_at, true)
                    })
                })
                .await
                .map(drop),
            Some(RowUpdate::RefreshFailed) => self
                .store
                .with(move |c| {
                    changed_with_event(c, event.as_ref(), |tx| {
                        tx.execute(
                            "UPDATE connections SET refresh_failed_at = ?2 WHERE id = ?1 AND refresh_failed_at IS NULL",
                            params![id, updated_at],
                        )
                    })
                })
                .await
                .map(drop),
            Some(RowUpdate::State(state)) => {
                self.store.set_state(&id, state, updated_at, event.as_ref()).await.map(drop)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The behaviour every store shares is in tests/store_suite.rs (run on
    //! SQLite and PostgreSQL); this covers what is SQLite's own.
    use super::*;

    #[tokio::test]
    async fn creates_its_directory_and_reopens_with_data_and_migrations_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/x.db");
        let s = SqliteStore::open(&path).unwrap();
        let row = ConnectionRow {
            meta: ConnectionMeta {
                id: "c1".into(),
                org_id: "o".into(),
                user_id: "u".into(),
                integration: "i".into(),
                auth_method: "m".into(),
                state: ConnectionState::Active,
                created_at: 1,
                updated_at: 1,
                activity: Default::default(),
            },
            sealed: SealedBytes { key_id: "k".into(), wrapped_key: vec![1], nonce: vec![2], ciphertext: vec![3] },
        };
        s.insert_connection(&row, None).await.unwrap();
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.get_connection("c1").await.unwrap(), Some(row));
        let versions: i64 = s
            .with(|c| c.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0)).map_err(backend))
            .await
            .unwrap();
        assert_eq!(versions, MIGRATIONS.len() as i64, "each migration applied exactly once");
    }
}
