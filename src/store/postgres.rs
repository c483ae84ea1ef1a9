//! PostgreSQL store for shared deployments: a bounded connection pool,
//! versioned migrations applied under an advisory lock (many instances may
//! start at once), the same behaviour as the SQLite store (one test suite
//! runs against both).

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{
    split_list, Activity, Change, ConnectSession, ConnectionMeta, ConnectionQuery, ConnectionRow, ConnectionState,
    Delivery, DeliveryOutcome, KeyUsage, LastTest, NewEvent, OAuthApp, OAuthAppRow, PendingAuthorization, RowLock,
    RowUpdate, SealedBytes, SealedRecord, SealedTable, Store, StoreError, StoredEvent, META_COLUMNS, META_LEN,
    SESSION_KEPT_SECS,
};

/// `NOTIFY` channel carrying the id of every changed connection.
pub const CHANGES_CHANNEL: &str = "credproxy_connections";
/// `NOTIFY` channel carrying cool-downs upstreams asked for (`quota`).
pub const COOLDOWNS_CHANNEL: &str = "credproxy_cooldowns";

/// Versioned migrations; index + 1 is the version. Never edit a shipped one.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE connections (
        id           TEXT PRIMARY KEY,
        org_id       TEXT NOT NULL,
        user_id      TEXT NOT NULL,
        integration  TEXT NOT NULL,
        auth_method  TEXT NOT NULL,
        state        TEXT NOT NULL,
        created_at   BIGINT NOT NULL,
        updated_at   BIGINT NOT NULL,
        key_id       TEXT NOT NULL,
        wrapped_key  BYTEA NOT NULL,
        nonce        BYTEA NOT NULL,
        ciphertext   BYTEA NOT NULL
    );
    CREATE INDEX connections_org ON connections (org_id, created_at);",
    "CREATE TABLE oauth2_pending (
        state_hash    TEXT PRIMARY KEY,
        org_id        TEXT NOT NULL,
        user_id       TEXT NOT NULL,
        integration   TEXT NOT NULL,
        auth_method   TEXT NOT NULL,
        redirect_uri  TEXT NOT NULL,
        return_to     TEXT,
        connection_id TEXT,
        key_id        TEXT NOT NULL,
        wrapped_key   BYTEA NOT NULL,
        nonce         BYTEA NOT NULL,
        ciphertext    BYTEA NOT NULL,
        created_at    BIGINT NOT NULL,
        expires_at    BIGINT NOT NULL
    );
    CREATE INDEX oauth2_pending_expiry ON oauth2_pending (expires_at);",
    "ALTER TABLE connections
        ADD COLUMN last_used_at   BIGINT,
        ADD COLUMN last_test_at   BIGINT,
        ADD COLUMN last_test_ok   BOOLEAN,
        ADD COLUMN last_test_code TEXT;",
    "CREATE TABLE connect_sessions (
        id              TEXT PRIMARY KEY,
        token_hash      TEXT NOT NULL UNIQUE,
        org_id          TEXT NOT NULL,
        user_id         TEXT NOT NULL,
        integrations    TEXT,
        connection_id   TEXT,
        return_to       TEXT,
        created_at      BIGINT NOT NULL,
        expires_at      BIGINT NOT NULL,
        claimed_at      BIGINT,
        connection_made TEXT
    );
    CREATE INDEX connect_sessions_expiry ON connect_sessions (expires_at);
    ALTER TABLE oauth2_pending ADD COLUMN connect_session TEXT;",
    "CREATE TABLE events (
        seq           BIGSERIAL PRIMARY KEY,
        id            TEXT NOT NULL UNIQUE,
        kind          TEXT NOT NULL,
        org_id        TEXT NOT NULL,
        connection_id TEXT NOT NULL,
        payload       TEXT NOT NULL,
        created_at    BIGINT NOT NULL
    );
    CREATE INDEX events_org ON events (org_id, seq);",
    "CREATE INDEX events_created ON events (created_at);
    CREATE TABLE deliveries (
        endpoint        TEXT NOT NULL,
        event_id        TEXT NOT NULL,
        seq             BIGINT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        locked_until    BIGINT,
        delivered_at    BIGINT,
        failed_at       BIGINT,
        last_error      TEXT,
        PRIMARY KEY (endpoint, event_id)
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at);
    CREATE INDEX deliveries_event ON deliveries (event_id);",
    "ALTER TABLE connections
        ADD COLUMN last_refreshed_at BIGINT,
        ADD COLUMN refresh_failed_at BIGINT;",
    "CREATE TABLE oauth_apps (
        id          TEXT PRIMARY KEY,
        org_id      TEXT NOT NULL,
        integration TEXT NOT NULL,
        auth_method TEXT NOT NULL,
        client_id   TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        updated_at  BIGINT NOT NULL,
        key_id      TEXT NOT NULL,
        wrapped_key BYTEA NOT NULL,
        nonce       BYTEA NOT NULL,
        ciphertext  BYTEA NOT NULL
    );
    CREATE INDEX oauth_apps_org ON oauth_apps (org_id);",
];

/// Arbitrary, fixed: serializes migrations across instances.
const MIGRATION_LOCK: i64 = 0x6372_6564_7072_6f78; // "credprox"

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Bound of each wait on the database.
    timeout: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl PgStore {
    /// Connects (lazily, through the pool) and applies pending migrations.
    /// `timeout` bounds every wait on the database (`store.timeout_ms`):
    /// connecting, a pooled connection, each statement (a server that
    /// accepts and never answers is given up, not waited on forever).
    pub async fn open(url: &str, pool_size: usize, timeout: Duration) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| backend(format!("invalid store.url: {e}")))?;
        config.connect_timeout(timeout);
        let options =
            format!("{} -c statement_timeout={}", config.get_options().unwrap_or_default(), timeout.as_millis().max(1));
        config.options(options.trim_start());
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(backend)?;
        let store = Self { pool, timeout };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(backend)
    }

    /// Applies every migration not yet recorded, each in its own transaction.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let m = |e: tokio_postgres::Error| StoreError::Migration(e.to_string());
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(m)?;
        // Another instance may hold the migration lock for as long as its migrations take.
        tx.batch_execute("SET LOCAL statement_timeout = 0").await.map_err(m)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(m)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .map_err(m)?;
        let current: i64 =
            tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await.map_err(m)?.get(0);
        if current > MIGRATIONS.len() as i64 {
            return Err(StoreError::Migration(format!(
                "database schema version {current} is newer than this binary ({}); upgrade credproxy",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = i as i64 + 1;
            tx.batch_execute(sql).await.map_err(|e| StoreError::Migration(format!("version {version}: {e}")))?;
            tx.execute("INSERT INTO schema_migrations VALUES ($1, EXTRACT(EPOCH FROM now())::BIGINT)", &[&version])
                .await
                .map_err(m)?;
            tracing::info!(version, "applied store migration");
        }
        tx.commit().await.map_err(m)
    }
}

fn meta(r: &Row) -> Result<ConnectionMeta, StoreError> {
    let id: String = r.get(0);
    let state: String = r.get(5);
    let state = ConnectionState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt { id: id.clone(), reason: format!("unknown state {state:?}") })?;
    Ok(ConnectionMeta {
        id,
        org_id: r.get(1),
        user_id: r.get(2),
        integration: r.get(3),
        auth_method: r.get(4),
        state,
        created_at: r.get(6),
        updated_at: r.get(7),
        activity: Activity {
            last_used_at: r.get(8),
            last_test: match (r.get::<_, Option<i64>>(9), r.get::<_, Option<bool>>(10)) {
                (Some(at), Some(ok)) => Some(LastTest { at, ok, code: r.get(11) }),
                _ => None,
            },
            last_refreshed_at: r.get(12),
            refresh_failed_at: r.get(13),
        },
    })
}

/// The four sealed columns, `key_id, wrapped_key, nonce, ciphertext`, from `at`.
const OAUTH_APP_COLUMNS: &str =
    "org_id, integration, auth_method, client_id, created_at, updated_at, key_id, wrapped_key, nonce, ciphertext";

fn oauth_app(r: &Row) -> OAuthAppRow {
    OAuthAppRow {
        app: OAuthApp {
            org_id: r.get(0),
            integration: r.get(1),
            auth_method: r.get(2),
            client_id: r.get(3),
            created_at: r.get(4),
            updated_at: r.get(5),
        },
        sealed: sealed(r, 6),
    }
}

fn sealed(r: &Row, at: usize) -> SealedBytes {
    SealedBytes { key_id: r.get(at), wrapped_key: r.get(at + 1), nonce: r.get(at + 2), ciphertext: r.get(at + 3) }
}

#[async_trait]
impl Store for PgStore {
    async fn insert_connection(&self, row: &ConnectionRow, event: Option<&NewEvent>) -> Result<(), StoreError> {
        let m = &row.meta;
        let s = &row.sealed;
        let client = self.client().await?;
        let res = in_transaction(client, async |c| {
            c.execute(
                "INSERT INTO connections (id, org_id, user_id, integration, auth_method, state, created_at, updated_at, key_id, wrapped_key, nonce, ciphertext)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[&m.id, &m.org_id, &m.user_id, &m.integration, &m.auth_method, &m.state.as_str(), &m.created_at, &m.updated_at, &s.key_id, &s.wrapped_key, &s.nonce, &s.ciphertext],
            )
            .await?;
            insert_event(c, event).await
        })
        .await;
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(StoreError::Duplicate(m.id.clone())),
            Err(e) => Err(backend(e)),
        }
    }

    async fn get_connection(&self, id: &str) -> Result<Option<ConnectionRow>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {META_COLUMNS}, key_id, wrapped_key, nonce, ciphertext FROM connections WHERE id = $1"
                ),
                &[&id],
            )
            .await
            .map_err(backend)?;
        row.map(|r| Ok(ConnectionRow { meta: meta(&r)?, sealed: sealed(&r, META_LEN) })).transpose()
    }

    async fn list_connections(&self, q: &ConnectionQuery) -> Result<Vec<ConnectionMeta>, StoreError> {
        let state = q.state.map(ConnectionState::as_str);
        let (after_at, after_id) = match &q.after {
            Some((at, id)) => (Some(*at), Some(id.as_str())),
            None => (None, None),
        };
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {META_COLUMNS} FROM connections
                     WHERE ($1::text IS NULL OR org_id = $1) AND ($2::text IS NULL OR user_id = $2)
                       AND ($3::text IS NULL OR integration = $3) AND ($4::text IS NULL OR state = $4)
                       AND ($5::bigint IS NULL OR (created_at, id) > ($5, $6::text))
                     ORDER BY created_at, id LIMIT $7"
                ),
                &[&q.org_id, &q.user_id, &q.integration, &state, &after_at, &after_id, &i64::from(q.limit)],
            )
            .await
            .map_err(backend)?;
        rows.iter().map(meta).collect()
    }

    async fn delete_connection(&self, id: &str, event: Option<&NewEvent>) -> Result<bool, StoreError> {
        let client = self.client().await?;
        in_transaction(client, async |c| {
            // The notification is delivered at commit, to every instance's listener.
            let rows = c
                .query(
                    "WITH d AS (DELETE FROM connections WHERE id = $1 RETURNING id) SELECT pg_notify($2, id) FROM d",
                    &[&id, &CHANGES_CHANNEL],
                )
                .await?;
            let deleted = !rows.is_empty();
            if deleted {
                insert_event(c, event).await?;
            }
            Ok(deleted)
        })
        .await
        .map_err(backend)
    }

    async fn update_credential(
        &self,
        id: &str,
        sealed: &SealedBytes,
        state: ConnectionState,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        in_transaction(client, async |c| {
            let changed = write_credential(c, id, sealed, state, updated_at, false).await?;
            if changed {
                insert_event(c, event).await?;
            }
            Ok(changed)
        })
        .await
        .map_err(backend)
    }

    async fn set_state(
        &self,
        id: &str,
        state: ConnectionState,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        in_transaction(client, async |c| {
            let changed = write_state(c, id, state, updated_at).await?;
            if changed {
                insert_event(c, event).await?;
            }
            Ok(changed)
        })
        .await
        .map_err(backend)
    }

    async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.execute("DELETE FROM oauth2_pending WHERE expires_at < $1", &[&p.created_at]).await.map_err(backend)?;
        let v = &p.verifier;
        client
            .execute(
                "INSERT INTO oauth2_pending (state_hash, org_id, user_id, integration, auth_method, redirect_uri, return_to, connection_id, key_id, wrapped_key, nonce, ciphertext, created_at, expires_at, connect_session)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                &[&p.state_hash, &p.org_id, &p.user_id, &p.integration, &p.auth_method, &p.redirect_uri, &p.return_to, &p.connection_id, &v.key_id, &v.wrapped_key, &v.nonce, &v.ciphertext, &p.created_at, &p.expires_at, &p.connect_session],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn take_pending(&self, state_hash: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "DELETE FROM oauth2_pending WHERE state_hash = $1
                 RETURNING state_hash, org_id, user_id, integration, auth_method, redirect_uri, return_to, connection_id, key_id, wrapped_key, nonce, ciphertext, created_at, expires_at, connect_session",
                &[&state_hash],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| PendingAuthorization {
            state_hash: r.get(0),
            org_id: r.get(1),
            user_id: r.get(2),
            integration: r.get(3),
            auth_method: r.get(4),
            redirect_uri: r.get(5),
            return_to: r.get(6),
            connection_id: r.get(7),
            verifier: sealed(&r, 8),
            created_at: r.get(12),
            expires_at: r.get(13),
            connect_session: r.get(14),
        }))
    }

    async fn lock_connection(&self, id: &str, wait: Duration) -> Result<Option<Box<dyn RowLock>>, StoreError> {
        let client = self.client().await?;
        let locked = async {
            // The lock wait is `wait`; the statement gets that plus the usual bound.
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '{}ms'",
                    wait.as_millis().max(1),
                    (wait + self.timeout).as_millis()
                ))
                .await?;
            client
                .query_opt(
                    &format!("SELECT {META_COLUMNS}, key_id, wrapped_key, nonce, ciphertext FROM connections WHERE id = $1 FOR UPDATE"),
                    &[&id],
                )
                .await
        }
        .await;
        match locked {
            Ok(Some(r)) => {
                let row = ConnectionRow { meta: meta(&r)?, sealed: sealed(&r, META_LEN) };
                Ok(Some(Box::new(PgRowLock { client: Some(client), row })))
            }
            Ok(None) => {
                discard(client);
                Ok(None)
            }
            Err(e) => {
                discard(client);
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
                    Err(StoreError::LockTimeout(id.to_owned()))
                } else {
                    Err(backend(e))
                }
            }
        }
    }

    async fn sealed_not_under(
        &self,
        table: SealedTable,
        key_id: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        let (t, id) = (table.table(), table.id_column());
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {id}, org_id, key_id, wrapped_key, nonce, ciphertext FROM {t}
                     WHERE key_id <> $1 AND {id} > $2 ORDER BY {id} LIMIT $3"
                ),
                &[&key_id, &after, &i64::from(limit)],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| SealedRecord { id: r.get(0), org_id: r.get(1), sealed: sealed(r, 2) }).collect())
    }

    async fn rewrap(
        &self,
        table: SealedTable,
        id: &str,
        old: &SealedBytes,
        key_id: &str,
        wrapped_key: &[u8],
    ) -> Result<bool, StoreError> {
        // Under READ COMMITTED an UPDATE that waited for a refresh's row lock
        // re-checks its WHERE against the committed row: a rewritten
        // credential no longer matches and is left alone.
        let (t, idc) = (table.table(), table.id_column());
        let n = self
            .client()
            .await?
            .execute(
                &format!(
                    "UPDATE {t} SET key_id = $1, wrapped_key = $2
                     WHERE {idc} = $3 AND key_id = $4 AND wrapped_key = $5 AND nonce = $6"
                ),
                &[&key_id, &wrapped_key, &id, &old.key_id, &old.wrapped_key, &old.nonce],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    async fn key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        let client = self.client().await?;
        let mut out = Vec::new();
        for table in SealedTable::ALL {
            let sql = format!("SELECT key_id, COUNT(*) FROM {} GROUP BY key_id ORDER BY key_id", table.table());
            for r in client.query(&sql, &[]).await.map_err(backend)? {
                let n: i64 = r.get(1);
                out.push(KeyUsage { table, key_id: r.get(0), records: n as u64 });
            }
        }
        Ok(out)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.query_one("SELECT 1", &[]).await.map_err(backend).map(|_| ())
    }

    // Neither is a change of the connection: no NOTIFY, `updated_at` stays.
    async fn record_test(&self, id: &str, test: &LastTest, event: Option<&NewEvent>) -> Result<bool, StoreError> {
        let client = self.client().await?;
        in_transaction(client, async |c| {
            let n = c
                .execute(
                    "UPDATE connections SET last_test_at = $2, last_test_ok = $3, last_test_code = $4 WHERE id = $1",
                    &[&id, &test.at, &test.ok, &test.code],
                )
                .await?;
            if n > 0 {
                insert_event(c, event).await?;
            }
            Ok(n > 0)
        })
        .await
        .map_err(backend)
    }

    async fn enqueue_deliveries(
        &self,
        endpoint: &str,
        kinds: &[String],
        org_id: Option<&str>,
        since: i64,
    ) -> Result<u64, StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO deliveries (endpoint, event_id, seq, next_attempt_at)
                 SELECT $1, e.id, e.seq, e.created_at FROM events e
                 WHERE e.created_at >= $2 AND ($3::text IS NULL OR e.org_id = $3)
                   AND (cardinality($4::text[]) = 0 OR e.kind = ANY($4))
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = $1 AND d.event_id = e.id)
                 ON CONFLICT DO NOTHING",
                &[&endpoint, &since, &org_id, &kinds],
            )
            .await
            .map_err(backend)
    }

    async fn claim_deliveries(&self, now: i64, lease_until: i64, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        // SKIP LOCKED: instances claiming at the same moment take disjoint
        // rows; the lease keeps them from claiming each other's afterwards.
        let rows = self
            .client()
            .await?
            .query(
                "WITH c AS (
                   SELECT endpoint, event_id FROM deliveries
                   WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $1
                     AND (locked_until IS NULL OR locked_until <= $1)
                   ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)
                 UPDATE deliveries d SET locked_until = $2 FROM c, events e
                 WHERE d.endpoint = c.endpoint AND d.event_id = c.event_id AND e.id = d.event_id
                 RETURNING d.endpoint, d.event_id, d.attempts, e.payload, e.created_at",
                &[&now, &lease_until, &i64::from(limit)],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| Delivery {
                endpoint: r.get(0),
                event_id: r.get(1),
                attempts: r.get::<_, i32>(2).max(0) as u32,
                payload: r.get(3),
                created_at: r.get(4),
            })
            .collect())
    }

    async fn finish_delivery(
        &self,
        endpoint: &str,
        event_id: &str,
        now: i64,
        outcome: &DeliveryOutcome,
    ) -> Result<(), StoreError> {
        let (delivered, failed, next, error) = match outcome {
            DeliveryOutcome::Delivered => (Some(now), None, None, None),
            DeliveryOutcome::Retry { next_attempt_at, error } => (None, None, Some(*next_attempt_at), Some(error)),
            DeliveryOutcome::Failed { error } => (None, Some(now), None, Some(error)),
        };
        self.client()
            .await?
            .execute(
                "UPDATE deliveries SET attempts = attempts + 1, locked_until = NULL, delivered_at = $3,
                   failed_at = $4, next_attempt_at = COALESCE($5, next_attempt_at), last_error = $6
                 WHERE endpoint = $1 AND event_id = $2",
                &[&endpoint, &event_id, &delivered, &failed, &next, &error],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn redeliver(&self, event_id: &str, now: i64) -> Result<u64, StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE deliveries SET delivered_at = NULL, failed_at = NULL, locked_until = NULL,
                   attempts = 0, next_attempt_at = $2, last_error = NULL WHERE event_id = $1",
                &[&event_id, &now],
            )
            .await
            .map_err(backend)
    }

    async fn publish_cooldown(&self, payload: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("SELECT pg_notify($1, $2)", &[&COOLDOWNS_CHANNEL, &payload])
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn delivery_counts(&self) -> Result<(u64, u64), StoreError> {
        let r = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL),
                        count(*) FILTER (WHERE failed_at IS NOT NULL) FROM deliveries",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
    }

    async fn idle_connections(
        &self,
        integration: &str,
        auth_method: &str,
        cutoff: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id FROM connections
                 WHERE integration = $1 AND auth_method = $2 AND state = 'active'
                   AND GREATEST(created_at, COALESCE(last_used_at, 0), COALESCE(last_refreshed_at, 0)) < $3
                 ORDER BY GREATEST(created_at, COALESCE(last_used_at, 0), COALESCE(last_refreshed_at, 0)) LIMIT $4",
                &[&integration, &auth_method, &cutoff, &i64::from(limit)],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn list_events(&self, org_id: Option<&str>, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, id, kind, org_id, connection_id, payload, created_at FROM events
                 WHERE seq > $1 AND ($2::text IS NULL OR org_id = $2) ORDER BY seq LIMIT $3",
                &[&after, &org_id, &i64::from(limit)],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| StoredEvent {
                seq: r.get(0),
                event: NewEvent {
                    id: r.get(1),
                    kind: r.get(2),
                    org_id: r.get(3),
                    connection_id: r.get(4),
                    payload: r.get(5),
                    created_at: r.get(6),
                },
            })
            .collect())
    }

    async fn record_used(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        let (ids, ats): (Vec<&str>, Vec<i64>) = uses.iter().map(|(id, at)| (id.as_str(), *at)).unzip();
        self.client()
            .await?
            .execute(
                "UPDATE connections c SET last_used_at = u.at
                 FROM unnest($1::text[], $2::bigint[]) AS u(id, at)
                 WHERE c.id = u.id AND (c.last_used_at IS NULL OR c.last_used_at < u.at)",
                &[&ids, &ats],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn insert_connect_session(&self, s: &ConnectSession) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM connect_sessions WHERE expires_at < $1", &[&(s.created_at - SESSION_KEPT_SECS)])
            .await
            .map_err(backend)?;
        let integrations = s.integrations.as_ref().map(|i| i.join(","));
        client
            .execute(
                "INSERT INTO connect_sessions (id, token_hash, org_id, user_id, integrations, connection_id, return_to, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[&s.id, &s.token_hash, &s.org_id, &s.user_id, &integrations, &s.connection_id, &s.return_to, &s.created_at, &s.expires_at],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn connect_session(&self, token_hash: &str) -> Result<Option<ConnectSession>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, token_hash, org_id, user_id, integrations, connection_id, return_to, created_at, expires_at, claimed_at, connection_made
                 FROM connect_sessions WHERE token_hash = $1",
                &[&token_hash],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| ConnectSession {
            id: r.get(0),
            token_hash: r.get(1),
            org_id: r.get(2),
            user_id: r.get(3),
            integrations: r.get::<_, Option<String>>(4).map(|i| split_list(&i)),
            connection_id: r.get(5),
            return_to: r.get(6),
            created_at: r.get(7),
            expires_at: r.get(8),
            claimed_at: r.get(9),
            connection_made: r.get(10),
        }))
    }

    async fn claim_connect_session(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE connect_sessions SET claimed_at = $2 WHERE id = $1 AND claimed_at IS NULL AND expires_at > $2",
                &[&id, &now],
            )
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    async fn finish_connect_session(&self, id: &str, made: Option<&str>) -> Result<(), StoreError> {
        let client = self.client().await?;
        match made {
            Some(conn) => {
                client.execute("UPDATE connect_sessions SET connection_made = $2 WHERE id = $1", &[&id, &conn]).await
            }
            None => {
                client
                    .execute(
                        "UPDATE connect_sessions SET claimed_at = NULL WHERE id = $1 AND connection_made IS NULL",
                        &[&id],
                    )
                    .await
            }
        }
        .map_err(backend)?;
        Ok(())
    }

    async fn put_oauth_app(&self, app: &OAuthAppRow) -> Result<i64, StoreError> {
        let (a, s) = (&app.app, &app.sealed);
        let id = OAuthAppRow::id_of(&a.org_id, &a.integration, &a.auth_method);
        let row = self
            .client()
            .await?
            .query_one(
                "INSERT INTO oauth_apps (id, org_id, integration, auth_method, client_id, created_at, updated_at, key_id, wrapped_key, nonce, ciphertext)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (id) DO UPDATE SET client_id = excluded.client_id, updated_at = excluded.updated_at,
                   key_id = excluded.key_id, wrapped_key = excluded.wrapped_key, nonce = excluded.nonce, ciphertext = excluded.ciphertext
                 RETURNING created_at",
                &[&id, &a.org_id, &a.integration, &a.auth_method, &a.client_id, &a.created_at, &a.updated_at, &s.key_id, &s.wrapped_key, &s.nonce, &s.ciphertext],
            )
            .await
            .map_err(backend)?;
        Ok(row.get(0))
    }

    async fn get_oauth_app(
        &self,
        org_id: &str,
        integration: &str,
        auth_method: &str,
    ) -> Result<Option<OAuthAppRow>, StoreError> {
        let id = OAuthAppRow::id_of(org_id, integration, auth_method);
        let row = self
            .client()
            .await?
            .query_opt(&format!("SELECT {OAUTH_APP_COLUMNS} FROM oauth_apps WHERE id = $1"), &[&id])
            .await
            .map_err(backend)?;
        Ok(row.as_ref().map(oauth_app))
    }

    async fn delete_oauth_app(&self, org_id: &str, integration: &str, auth_method: &str) -> Result<bool, StoreError> {
        let id = OAuthAppRow::id_of(org_id, integration, auth_method);
        let n = self.client().await?.execute("DELETE FROM oauth_apps WHERE id = $1", &[&id]).await.map_err(backend)?;
        Ok(n == 1)
    }

    async fn list_oauth_apps(&self, org_id: &str) -> Result<Vec<OAuthAppRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {OAUTH_APP_COLUMNS} FROM oauth_apps WHERE org_id = $1 ORDER BY integration, auth_method"
                ),
                &[&org_id],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(oauth_app).collect())
    }
}

/// Replaces a connection's credential and state; `refreshed`: it is an
/// OAuth2 refresh (the last refresh is now, a failure streak ends).
async fn write_credential(
    client: &tokio_postgres::Client,
    id: &str,
    sealed: &SealedBytes,
    state: ConnectionState,
    updated_at: i64,
    refreshed: bool,
) -> Result<bool, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH u AS (UPDATE connections SET key_id = $2, wrapped_key = $3, nonce = $4, ciphertext = $5, state = $6, updated_at = $7,
                          last_refreshed_at = CASE WHEN $9 THEN $7 ELSE last_refreshed_at END,
                          refresh_failed_at = CASE WHEN $9 THEN NULL ELSE refresh_failed_at END
                        WHERE id = $1 RETURNING id)
             SELECT pg_notify($8, id) FROM u",
            &[&id, &sealed.key_id, &sealed.wrapped_key, &sealed.nonce, &sealed.ciphertext, &state.as_str(), &updated_at, &CHANGES_CHANNEL, &refreshed],
        )
        .await?;
    Ok(!rows.is_empty())
}

async fn write_state(
    client: &tokio_postgres::Client,
    id: &str,
    state: ConnectionState,
    updated_at: i64,
) -> Result<bool, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH u AS (UPDATE connections SET state = $2, updated_at = $3 WHERE id = $1 RETURNING id)
             SELECT pg_notify($4, id) FROM u",
            &[&id, &state.as_str(), &updated_at, &CHANGES_CHANNEL],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// Runs `work` in a transaction on `client`: committed if it succeeds;
/// otherwise the connection is closed (the server rolls back).
async fn in_transaction<T>(
    client: Object,
    work: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
) -> Result<T, tokio_postgres::Error> {
    let done = async {
        client.batch_execute("BEGIN").await?;
        let out = work(&client).await?;
        client.batch_execute("COMMIT").await?;
        Ok(out)
    }
    .await;
    if done.is_err() {
        discard(client);
    }
    done
}

async fn insert_event(client: &tokio_postgres::Client, event: Option<&NewEvent>) -> Result<(), tokio_postgres::Error> {
    let Some(e) = event else { return Ok(()) };
    client
        .execute(
            "INSERT INTO events (id, kind, org_id, connection_id, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&e.id, &e.kind, &e.org_id, &e.connection_id, &e.payload, &e.created_at],
        )
        .await?;
    Ok(())
}

/// Closes a pooled connection instead of returning it: an open or failed
/// transaction must never be reused. Closing makes the server roll back and
/// release any row lock — also what happens when the process dies.
fn discard(client: Object) {
    drop(Object::take(client));
}

struct PgRowLock {
    client: Option<Object>,
    row: ConnectionRow,
}

#[async_trait]
impl RowLock for PgRowLock {
    fn row(&self) -> &ConnectionRow {
        &self.row
    }

    async fn commit(
        mut self: Box<Self>,
        update: Option<RowUpdate>,
        updated_at: i64,
        event: Option<&NewEvent>,
    ) -> Result<(), StoreError> {
        let client = self.client.take().expect("a lock commits once");
        let id = self.row.meta.id.as_str();
        let written = async {
            let changed = match &update {
                None => false,
                Some(RowUpdate::Credential(sealed)) => {
                    write_credential(&client, id, sealed, ConnectionState::Active, updated_at, true).await?
                }
                Some(RowUpdate::RefreshFailed) => {
                    let n = client
                        .execute(
                            "UPDATE connections SET refresh_failed_at = $2 WHERE id = $1 AND refresh_failed_at IS NULL",
                            &[&id, &updated_at],
                        )
                        .await?;
                    n > 0
                }
                Some(RowUpdate::State(state)) => write_state(&client, id, *state, updated_at).await?,
            };
            if changed {
                insert_event(&client, event).await?;
            }
            client.batch_execute("COMMIT").await
        }
        .await;
        match written {
            Ok(()) => Ok(()),
            Err(e) => {
                discard(client);
                Err(backend(e))
            }
        }
    }
}

impl Drop for PgRowLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            discard(client);
        }
    }
}

/// Listens for connection changes on [`CHANGES_CHANNEL`] (and cool-downs on
/// [`COOLDOWNS_CHANNEL`]) for as long as the
/// task runs, reconnecting (and reporting [`Change::Resync`]) after any failure.
pub fn spawn_listener(
    url: String,
    on_change: std::sync::Arc<dyn Fn(Change) + Send + Sync>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen_once(&url, &*on_change).await {
                Ok(()) => tracing::warn!("store change listener closed; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "store change listener failed; reconnecting"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

async fn listen_once(url: &str, on_change: &(dyn Fn(Change) + Send + Sync)) -> Result<(), tokio_postgres::Error> {
    use tokio_postgres::AsyncMessage;
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
    let sql = format!("LISTEN {CHANGES_CHANNEL}; LISTEN {COOLDOWNS_CHANNEL}");
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    // The LISTEN needs the connection driven while it runs.
    loop {
        tokio::select! {
            r = &mut listen => { r?; break; }
            m = std::future::poll_fn(|cx| conn.poll_message(cx)) => match m {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
    // Anything may have changed while we were not listening.
    on_change(Change::Resync);
    tracing::info!("store change listener subscribed");
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) if n.channel() == COOLDOWNS_CHANNEL => {
                on_change(Change::Cooldown(n.payload().to_owned()))
            }
            Some(Ok(AsyncMessage::Notification(n))) => on_change(Change::Connection(n.payload().to_owned())),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}
