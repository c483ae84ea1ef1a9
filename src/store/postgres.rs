//! PostgreSQL store for shared deployments: a bounded connection pool,
//! versioned migrations applied under an advisory lock (many instances may
//! start at once), the same behaviour as the SQLite store (one test suite
//! runs against both).

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{ConnectionMeta, ConnectionRow, ConnectionState, PendingAuthorization, SealedBytes, Store, StoreError};

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
];

/// Arbitrary, fixed: serializes migrations across instances.
const MIGRATION_LOCK: i64 = 0x6372_6564_7072_6f78; // "credprox"

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
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
    pub async fn open(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| backend(format!("invalid store.url: {e}")))?;
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager).max_size(pool_size.max(1)).build().map_err(backend)?;
        let store = Self { pool };
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

const META_COLUMNS: &str = "id, org_id, user_id, integration, auth_method, state, created_at, updated_at";

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
    })
}

#[async_trait]
impl Store for PgStore {
    async fn insert_connection(&self, row: &ConnectionRow) -> Result<(), StoreError> {
        let m = &row.meta;
        let s = &row.sealed;
        let res = self
            .client()
            .await?
            .execute(
                "INSERT INTO connections (id, org_id, user_id, integration, auth_method, state, created_at, updated_at, key_id, wrapped_key, nonce, ciphertext)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[&m.id, &m.org_id, &m.user_id, &m.integration, &m.auth_method, &m.state.as_str(), &m.created_at, &m.updated_at, &s.key_id, &s.wrapped_key, &s.nonce, &s.ciphertext],
            )
            .await;
        match res {
            Ok(_) => Ok(()),
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
        row.map(|r| {
            Ok(ConnectionRow {
                meta: meta(&r)?,
                sealed: SealedBytes {
                    key_id: r.get(8),
                    wrapped_key: r.get(9),
                    nonce: r.get(10),
                    ciphertext: r.get(11),
                },
            })
        })
        .transpose()
    }

    async fn list_connections(&self, org_id: &str) -> Result<Vec<ConnectionMeta>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {META_COLUMNS} FROM connections WHERE org_id = $1 ORDER BY created_at, id"),
                &[&org_id],
            )
            .await
            .map_err(backend)?;
        rows.iter().map(meta).collect()
    }

    async fn delete_connection(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.client().await?.execute("DELETE FROM connections WHERE id = $1", &[&id]).await.map_err(backend)?;
        Ok(n > 0)
    }

    async fn update_credential(
        &self,
        id: &str,
        sealed: &SealedBytes,
        state: ConnectionState,
        updated_at: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE connections SET key_id = $2, wrapped_key = $3, nonce = $4, ciphertext = $5, state = $6, updated_at = $7 WHERE id = $1",
                &[&id, &sealed.key_id, &sealed.wrapped_key, &sealed.nonce, &sealed.ciphertext, &state.as_str(), &updated_at],
            )
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    async fn set_state(&self, id: &str, state: ConnectionState, updated_at: i64) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE connections SET state = $2, updated_at = $3 WHERE id = $1",
                &[&id, &state.as_str(), &updated_at],
            )
            .await
            .map_err(backend)?;
        Ok(n > 0)
    }

    async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.execute("DELETE FROM oauth2_pending WHERE expires_at < $1", &[&p.created_at]).await.map_err(backend)?;
        let v = &p.verifier;
        client
            .execute(
                "INSERT INTO oauth2_pending (state_hash, org_id, user_id, integration, auth_method, redirect_uri, return_to, connection_id, key_id, wrapped_key, nonce, ciphertext, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                &[&p.state_hash, &p.org_id, &p.user_id, &p.integration, &p.auth_method, &p.redirect_uri, &p.return_to, &p.connection_id, &v.key_id, &v.wrapped_key, &v.nonce, &v.ciphertext, &p.created_at, &p.expires_at],
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
                 RETURNING state_hash, org_id, user_id, integration, auth_method, redirect_uri, return_to, connection_id, key_id, wrapped_key, nonce, ciphertext, created_at, expires_at",
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
            verifier: SealedBytes { key_id: r.get(8), wrapped_key: r.get(9), nonce: r.get(10), ciphertext: r.get(11) },
            created_at: r.get(12),
            expires_at: r.get(13),
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.query_one("SELECT 1", &[]).await.map_err(backend).map(|_| ())
    }
}
