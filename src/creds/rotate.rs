//! Key rotation (`credproxy keys rotate`): re-wraps the data key of every
//! sealed record under the currently configured key, while instances keep
//! serving.
//!
//! Only the wrapped data key changes; nonce and ciphertext stay, so a reader
//! holding either version of a row decrypts the same plaintext and no cache
//! needs evicting. Each row is written with a compare-and-set on its old
//! wrapped key: a row that a refresh rewrote meanwhile is left alone and
//! looked at again in the next pass. The walk selects rows whose `key_id` is
//! not the current one, so an interrupted run resumes where it stopped.

use std::time::Duration;

use super::{from_store, oauth::pending_context};
use crate::crypto::{Context, CryptoError, Envelope};
use crate::store::{KeyUsage, SealedTable, Store, StoreError};

/// Passes over a table before giving up on rows that keep changing.
const MAX_PASSES: u32 = 3;

#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// Records read and rewrapped per batch.
    pub batch_size: u32,
    /// Pause between batches, to spread the load on the store and KMS.
    pub pause: Duration,
}

impl Default for RotateOptions {
    fn default() -> Self {
        Self { batch_size: 100, pause: Duration::ZERO }
    }
}

/// A record that could not be rewrapped (and was left untouched).
#[derive(Debug, Clone)]
pub struct RotateFailure {
    pub table: SealedTable,
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct RotateReport {
    /// Records rewrapped by this run.
    pub rewrapped: u64,
    /// Records rewritten by someone else between read and write (refresh,
    /// delete); revisited in the next pass.
    pub raced: u64,
    pub failed: Vec<RotateFailure>,
    /// Records not under the current key when the run ended.
    pub remaining: Vec<KeyUsage>,
}

impl RotateReport {
    /// True when every record is under the current key.
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.remaining.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The store failed; rerun to resume.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key service failed; rerun to resume.
    #[error("{0}; nothing was lost, rerun to resume")]
    KeyService(CryptoError),
}

/// Rewraps every record not under `envelope`'s current key. `progress` is
/// called after each batch with the table and the running totals.
pub async fn rotate_keys(
    store: &dyn Store,
    envelope: &Envelope,
    opts: &RotateOptions,
    progress: &mut (dyn FnMut(SealedTable, &RotateReport) + Send),
) -> Result<RotateReport, RotateError> {
    let current = envelope.current_key_id().to_owned();
    let mut report = RotateReport::default();
    for table in SealedTable::ALL {
        for _pass in 0..MAX_PASSES {
            let raced_before = report.raced;
            let mut after = String::new();
            loop {
                let batch = store.sealed_not_under(table, &current, &after, opts.batch_size.max(1)).await?;
                let Some(last) = batch.last() else { break };
                after.clone_from(&last.id);
                for rec in batch {
                    // A failure already reported in an earlier pass stays reported once.
                    if report.failed.iter().any(|f| f.table == table && f.id == rec.id) {
                        continue;
                    }
                    let pending;
                    let ctx = match table {
                        SealedTable::Connections => Context { org_id: &rec.org_id, connection_id: &rec.id },
                        SealedTable::PendingAuthorizations => {
                            pending = pending_context(&rec.id);
                            Context { org_id: &rec.org_id, connection_id: &pending }
                        }
                        SealedTable::OAuthApps => {
                            pending = super::apps::app_context(&rec.id);
                            Context { org_id: &rec.org_id, connection_id: &pending }
                        }
                    };
                    match envelope.rewrap(ctx, &from_store(rec.sealed.clone())).await {
                        Ok((key_id, wrapped)) => {
                            if store.rewrap(table, &rec.id, &rec.sealed, &key_id, &wrapped).await? {
                                report.rewrapped += 1;
                            } else {
                                report.raced += 1;
                            }
                        }
                        Err(e @ CryptoError::KeyService(_)) => return Err(RotateError::KeyService(e)),
                        Err(e) => report.failed.push(RotateFailure { table, id: rec.id, reason: e.to_string() }),
                    }
                }
                progress(table, &report);
                if !opts.pause.is_zero() {
                    tokio::time::sleep(opts.pause).await;
                }
            }
            if report.raced == raced_before {
                break;
            }
        }
    }
    report.remaining = store.key_usage().await?.into_iter().filter(|u| u.key_id != current).collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::{KeyProvider, Keyring, LocalKeyProvider, Sealed};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{ConnectionMeta, ConnectionRow, ConnectionState, PendingAuthorization, SealedBytes};

    fn local(path: &std::path::Path) -> Arc<dyn KeyProvider> {
        Arc::new(LocalKeyProvider::open_or_create(path).unwrap())
    }

    fn to_store(s: Sealed) -> SealedBytes {
        super::super::to_store(s)
    }

    async fn seed(store: &SqliteStore, env: &Envelope, n: usize) {
        for i in 0..n {
            let id = format!("conn_{i:03}");
            let sealed = env.seal(Context { org_id: "org", connection_id: &id }, id.as_bytes()).await.unwrap();
            let meta = ConnectionMeta {
                id: id.clone(),
                org_id: "org".into(),
                user_id: "u".into(),
                integration: "i".into(),
                auth_method: "m".into(),
                state: ConnectionState::Active,
                created_at: 1,
                updated_at: 1,
                activity: Default::default(),
            };
            store.insert_connection(&ConnectionRow { meta, sealed: to_store(sealed) }, None).await.unwrap();
        }
        let state_hash = "ab".repeat(32);
        let verifier = env.seal(Context { org_id: "org", connection_id: &pending_context(&state_hash) }, b"v").await;
        let p = PendingAuthorization {
            state_hash,
            org_id: "org".into(),
            user_id: "u".into(),
            integration: "i".into(),
            auth_method: "m".into(),
            redirect_uri: "http://x/cb".into(),
            return_to: None,
            connection_id: None,
            connect_session: None,
            verifier: to_store(verifier.unwrap()),
            created_at: super::super::unix_now(),
            expires_at: super::super::unix_now() + 600,
        };
        store.insert_pending(&p).await.unwrap();
    }

    #[tokio::test]
    async fn rewraps_every_record_in_batches_and_the_old_key_is_then_unneeded() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let old = local(&dir.path().join("old.key"));
        let new = local(&dir.path().join("new.key"));
        seed(&store, &Envelope::new(old.clone()), 7).await;

        let ring = Envelope::new(Arc::new(Keyring::new(new.clone(), vec![old.clone()])));
        let mut batches = 0;
        let opts = RotateOptions { batch_size: 3, pause: Duration::ZERO };
        let report = rotate_keys(&store, &ring, &opts, &mut |_, _| batches += 1).await.unwrap();
        assert_eq!(report.rewrapped, 8, "{report:?}");
        assert!(report.complete(), "{report:?}");
        assert_eq!(batches, 3 + 1, "7 connections in batches of 3, then 1 pending authorization");
        let usage = store.key_usage().await.unwrap();
        assert!(usage.iter().all(|u| u.key_id == new.current_key_id()), "{usage:?}");

        // The new key alone opens everything.
        let only_new = Envelope::new(new);
        for i in 0..7 {
            let id = format!("conn_{i:03}");
            let row = store.get_connection(&id).await.unwrap().unwrap();
            let ctx = Context { org_id: "org", connection_id: &id };
            assert_eq!(&only_new.open(ctx, &from_store(row.sealed)).await.unwrap()[..], id.as_bytes());
        }
        let p = store.take_pending(&"ab".repeat(32)).await.unwrap().unwrap();
        let ctx_id = pending_context(&p.state_hash);
        let ctx = Context { org_id: "org", connection_id: &ctx_id };
        assert_eq!(&only_new.open(ctx, &from_store(p.verifier)).await.unwrap()[..], b"v");

        // A second run finds nothing to do.
        let again = rotate_keys(&store, &ring, &opts, &mut |_, _| {}).await.unwrap();
        assert_eq!((again.rewrapped, again.complete()), (0, true));
    }

    #[tokio::test]
    async fn a_record_no_key_opens_is_reported_and_left_untouched_while_the_rest_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let old = local(&dir.path().join("old.key"));
        let lost = local(&dir.path().join("lost.key"));
        let new = local(&dir.path().join("new.key"));
        seed(&store, &Envelope::new(old.clone()), 3).await;
        // One record under a key the rotation was not given.
        let lost_env = Envelope::new(lost.clone());
        let orphan = to_store(lost_env.seal(Context { org_id: "org", connection_id: "conn_001" }, b"x").await.unwrap());
        store.update_credential("conn_001", &orphan, ConnectionState::Active, 2, None).await.unwrap();

        let ring = Envelope::new(Arc::new(Keyring::new(new.clone(), vec![old])));
        let report = rotate_keys(&store, &ring, &RotateOptions::default(), &mut |_, _| {}).await.unwrap();
        assert_eq!(report.rewrapped, 3, "{report:?}");
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert_eq!(report.failed[0].id, "conn_001");
        assert!(report.failed[0].reason.contains(lost.current_key_id()), "{report:?}");
        assert_eq!(report.remaining.len(), 1);
        assert_eq!((report.remaining[0].key_id.as_str(), report.remaining[0].records), (lost.current_key_id(), 1));
        assert!(!report.complete());
        assert_eq!(store.get_connection("conn_001").await.unwrap().unwrap().sealed, orphan);
    }
}
