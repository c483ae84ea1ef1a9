//! One store suite, run against both implementations: SQLite (a file in a
//! temp dir) and PostgreSQL (a fresh database in the cluster at
//! DATABASE_URL, which `scripts/test` starts).

mod support;

use std::sync::Arc;

use credproxy::store::postgres::PgStore;
use credproxy::store::sqlite::SqliteStore;
use credproxy::store::{
    ConnectionMeta, ConnectionRow, ConnectionState, PendingAuthorization, SealedBytes, Store, StoreError,
};

fn row(id: &str, org: &str, t: i64) -> ConnectionRow {
    ConnectionRow {
        meta: ConnectionMeta {
            id: id.into(),
            org_id: org.into(),
            user_id: "u".into(),
            integration: "i".into(),
            auth_method: "m".into(),
            state: ConnectionState::Active,
            created_at: t,
            updated_at: t,
        },
        sealed: SealedBytes {
            key_id: "k".into(),
            wrapped_key: vec![1, 2],
            nonce: vec![3],
            ciphertext: vec![0, 255, 4],
        },
    }
}

async fn suite(s: Arc<dyn Store>) {
    s.ping().await.unwrap();
    s.insert_connection(&row("c1", "o1", 1)).await.unwrap();
    s.insert_connection(&row("c2", "o1", 2)).await.unwrap();
    s.insert_connection(&row("c3", "o2", 3)).await.unwrap();
    assert!(matches!(s.insert_connection(&row("c1", "o1", 1)).await, Err(StoreError::Duplicate(_))));
    assert_eq!(s.get_connection("c1").await.unwrap(), Some(row("c1", "o1", 1)));
    assert_eq!(s.get_connection("nope").await.unwrap(), None);
    let ids: Vec<_> = s.list_connections("o1").await.unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["c1", "c2"]);
    assert!(s.list_connections("o9").await.unwrap().is_empty());

    let sealed = SealedBytes { key_id: "k2".into(), wrapped_key: vec![9], nonce: vec![8], ciphertext: vec![7] };
    assert!(s.update_credential("c2", &sealed, ConnectionState::NeedsReauth, 10).await.unwrap());
    let r = s.get_connection("c2").await.unwrap().unwrap();
    assert_eq!((r.sealed, r.meta.state, r.meta.updated_at), (sealed.clone(), ConnectionState::NeedsReauth, 10));
    assert!(!s.update_credential("nope", &sealed, ConnectionState::Active, 10).await.unwrap());
    assert!(s.set_state("c2", ConnectionState::Revoked, 11).await.unwrap());
    assert_eq!(s.get_connection("c2").await.unwrap().unwrap().meta.state, ConnectionState::Revoked);
    assert!(!s.set_state("nope", ConnectionState::Active, 11).await.unwrap());

    assert!(s.delete_connection("c1").await.unwrap());
    assert!(!s.delete_connection("c1").await.unwrap());
    assert_eq!(s.get_connection("c1").await.unwrap(), None);

    let p = PendingAuthorization {
        state_hash: "h1".into(),
        org_id: "o".into(),
        user_id: "u".into(),
        integration: "i".into(),
        auth_method: "m".into(),
        redirect_uri: "http://127.0.0.1/cb".into(),
        return_to: Some("https://app.example/done".into()),
        connection_id: None,
        verifier: SealedBytes { key_id: "k".into(), wrapped_key: vec![1], nonce: vec![2], ciphertext: vec![3] },
        created_at: 100,
        expires_at: 700,
    };
    s.insert_pending(&p).await.unwrap();
    assert_eq!(s.take_pending("h1").await.unwrap(), Some(p.clone()), "round trip");
    assert_eq!(s.take_pending("h1").await.unwrap(), None, "single use");
    s.insert_pending(&p).await.unwrap();
    let later = PendingAuthorization {
        state_hash: "h2".into(),
        created_at: 800,
        expires_at: 1400,
        connection_id: Some("c3".into()),
        ..p
    };
    s.insert_pending(&later).await.unwrap();
    assert_eq!(s.take_pending("h1").await.unwrap(), None, "expired ones are swept");
    assert_eq!(s.take_pending("h2").await.unwrap().unwrap().connection_id.as_deref(), Some("c3"));
}

#[tokio::test]
async fn sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap())).await;
}

#[tokio::test]
async fn postgres_store_passes_the_suite_and_migrations_are_idempotent() {
    let url = support::fresh_postgres_database().await;
    suite(Arc::new(PgStore::open(&url, 4).await.unwrap())).await;
    // Several instances starting at once: migrations serialize and apply once.
    let (a, b) = tokio::join!(PgStore::open(&url, 2), PgStore::open(&url, 2));
    a.unwrap();
    let b = b.unwrap();
    assert!(b.get_connection("c3").await.unwrap().is_some(), "data survives re-opening");
}
