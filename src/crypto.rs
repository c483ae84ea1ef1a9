//! Envelope encryption of credentials.
//!
//! Each credential is sealed with AES-256-GCM under its own random data key;
//! the data key is wrapped by a [`KeyProvider`]. The associated data binds the
//! ciphertext to its organization and connection id, so a sealed blob copied
//! onto another row fails to open.
//!
//! Must not import `store` (and `store` never imports this module).

#[cfg(feature = "kms")]
pub mod kms;
pub mod local;

use std::sync::Arc;

use async_trait::async_trait;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

pub use local::LocalKeyProvider;

const AAD_DOMAIN: &[u8] = b"credproxy.credential.v1";
pub const DATA_KEY_LEN: usize = 32;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("record was wrapped by key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("decryption failed: wrong key, or the record does not belong to this organization/connection")]
    Open,
    #[error("encryption failed")]
    Seal,
    #[error("random source failed")]
    Random,
    #[error("key service unavailable: {0}")]
    KeyService(String),
}

/// What a ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub org_id: &'a str,
    pub connection_id: &'a str,
}

impl Context<'_> {
    /// Length-prefixed so that no two contexts share an encoding.
    pub fn aad(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(AAD_DOMAIN.len() + 8 + self.org_id.len() + self.connection_id.len());
        v.extend_from_slice(AAD_DOMAIN);
        for part in [self.org_id, self.connection_id] {
            v.extend_from_slice(&(part.len() as u32).to_be_bytes());
            v.extend_from_slice(part.as_bytes());
        }
        v
    }
}

/// Wraps and unwraps data keys.
#[async_trait]
pub trait KeyProvider: Send + Sync + 'static {
    /// Id of the key new records are wrapped with (stored with each record).
    fn current_key_id(&self) -> &str;
    /// True if records whose `key_id` is this can be unwrapped here.
    fn owns(&self, key_id: &str) -> bool;
    async fn wrap(&self, data_key: &[u8], ctx: Context<'_>) -> Result<Vec<u8>, CryptoError>;
    /// A fresh data key and its wrapped form. Default: random, then [`wrap`](Self::wrap).
    async fn generate(&self, ctx: Context<'_>) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), CryptoError> {
        let mut data_key = Zeroizing::new(vec![0u8; DATA_KEY_LEN]);
        SystemRandom::new().fill(&mut data_key[..]).map_err(|_| CryptoError::Random)?;
        let wrapped = self.wrap(&data_key, ctx).await?;
        Ok((data_key, wrapped))
    }
    async fn unwrap(&self, key_id: &str, wrapped: &[u8], ctx: Context<'_>) -> Result<Zeroizing<Vec<u8>>, CryptoError>;
}

/// A sealed credential, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[derive(Clone)]
pub struct Envelope {
    provider: Arc<dyn KeyProvider>,
    rng: SystemRandom,
}

impl Envelope {
    pub fn new(provider: Arc<dyn KeyProvider>) -> Self {
        Self { provider, rng: SystemRandom::new() }
    }

    pub async fn seal(&self, ctx: Context<'_>, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let (data_key, wrapped_key) = self.provider.generate(ctx).await?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let ciphertext = aead_seal(&data_key[..], &nonce, &ctx.aad(), plaintext)?;
        Ok(Sealed { key_id: self.provider.current_key_id().to_owned(), wrapped_key, nonce: nonce.to_vec(), ciphertext })
    }

    pub async fn open(&self, ctx: Context<'_>, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let data_key = self.provider.unwrap(&sealed.key_id, &sealed.wrapped_key, ctx).await?;
        aead_open(&data_key, &sealed.nonce, &ctx.aad(), &sealed.ciphertext)
    }

    /// Id of the key new records are wrapped with.
    pub fn current_key_id(&self) -> &str {
        self.provider.current_key_id()
    }

    /// Re-wraps a record's data key under the current key: returns the new
    /// `(key_id, wrapped_key)`; nonce and ciphertext stay as they are. The
    /// ciphertext is opened first, so a record that would not decrypt is
    /// never rewritten.
    pub async fn rewrap(&self, ctx: Context<'_>, sealed: &Sealed) -> Result<(String, Vec<u8>), CryptoError> {
        let data_key = self.provider.unwrap(&sealed.key_id, &sealed.wrapped_key, ctx).await?;
        aead_open(&data_key, &sealed.nonce, &ctx.aad(), &sealed.ciphertext)?;
        let wrapped = self.provider.wrap(&data_key, ctx).await?;
        Ok((self.provider.current_key_id().to_owned(), wrapped))
    }
}

/// The current key provider plus decrypt-only ones (the keys a rotation
/// moves away from). Wraps with the current one only; unwraps with whichever
/// owns a record's `key_id`.
pub struct Keyring {
    current: Arc<dyn KeyProvider>,
    previous: Vec<Arc<dyn KeyProvider>>,
}

impl Keyring {
    pub fn new(current: Arc<dyn KeyProvider>, previous: Vec<Arc<dyn KeyProvider>>) -> Self {
        Self { current, previous }
    }
}

#[async_trait]
impl KeyProvider for Keyring {
    fn current_key_id(&self) -> &str {
        self.current.current_key_id()
    }

    fn owns(&self, key_id: &str) -> bool {
        self.current.owns(key_id) || self.previous.iter().any(|p| p.owns(key_id))
    }

    async fn wrap(&self, data_key: &[u8], ctx: Context<'_>) -> Result<Vec<u8>, CryptoError> {
        self.current.wrap(data_key, ctx).await
    }

    async fn generate(&self, ctx: Context<'_>) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), CryptoError> {
        self.current.generate(ctx).await
    }

    async fn unwrap(&self, key_id: &str, wrapped: &[u8], ctx: Context<'_>) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let provider = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|p| p.owns(key_id))
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        provider.unwrap(key_id, wrapped, ctx).await
    }
}

pub(crate) fn aead_seal(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| CryptoError::Seal)?);
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::Seal)?;
    Ok(buf)
}

pub(crate) fn aead_open(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| CryptoError::Open)?);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Open)?;
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let len = key.open_in_place(nonce, Aad::from(aad), &mut buf[..]).map_err(|_| CryptoError::Open)?.len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn envelope(dir: &std::path::Path) -> Envelope {
        let p = LocalKeyProvider::open_or_create(&dir.join("master.key")).unwrap();
        Envelope::new(Arc::new(p))
    }

    #[tokio::test]
    async fn round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let env = envelope(dir.path()).await;
        let a = Context { org_id: "org_a", connection_id: "conn_1" };
        let sealed = env.seal(a, b"{\"token\":\"s3cret\"}").await.unwrap();
        assert!(!sealed.ciphertext.windows(6).any(|w| w == b"s3cret"));
        assert_eq!(&env.open(a, &sealed).await.unwrap()[..], b"{\"token\":\"s3cret\"}");
        // Same blob, another row: must not open.
        for other in [
            Context { org_id: "org_b", connection_id: "conn_1" },
            Context { org_id: "org_a", connection_id: "conn_2" },
            Context { org_id: "org_aconn_", connection_id: "1" },
        ] {
            assert!(matches!(env.open(other, &sealed).await, Err(CryptoError::Open)), "{other:?}");
        }
        // Tampering is detected.
        let mut bad = sealed.clone();
        bad.ciphertext[0] ^= 1;
        assert!(env.open(a, &bad).await.is_err());
        // Two seals of one plaintext differ (fresh data key and nonce).
        let again = env.seal(a, b"{\"token\":\"s3cret\"}").await.unwrap();
        assert_ne!(again.ciphertext, sealed.ciphertext);
        assert_ne!(again.wrapped_key, sealed.wrapped_key);
    }

    #[tokio::test]
    async fn another_master_key_cannot_open() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let e1 = envelope(d1.path()).await;
        let e2 = envelope(d2.path()).await;
        let ctx = Context { org_id: "o", connection_id: "c" };
        let sealed = e1.seal(ctx, b"x").await.unwrap();
        assert!(matches!(e2.open(ctx, &sealed).await, Err(CryptoError::UnknownKey(_))));
    }

    #[tokio::test]
    async fn keyring_reads_old_records_and_rewraps_under_the_current_key() {
        let d = tempfile::tempdir().unwrap();
        let old: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::open_or_create(&d.path().join("old.key")).unwrap());
        let new: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::open_or_create(&d.path().join("new.key")).unwrap());
        let ctx = Context { org_id: "o", connection_id: "c" };
        let sealed = Envelope::new(old.clone()).seal(ctx, b"secret").await.unwrap();

        let ring = Envelope::new(Arc::new(Keyring::new(new.clone(), vec![old])));
        assert_eq!(&ring.open(ctx, &sealed).await.unwrap()[..], b"secret");
        // New records go under the current key.
        assert_eq!(ring.seal(ctx, b"x").await.unwrap().key_id, new.current_key_id());

        let (key_id, wrapped_key) = ring.rewrap(ctx, &sealed).await.unwrap();
        assert_eq!(key_id, new.current_key_id());
        let moved = Sealed { key_id, wrapped_key, ..sealed.clone() };
        // The new key alone opens the rewrapped record; same ciphertext.
        assert_eq!(&Envelope::new(new).open(ctx, &moved).await.unwrap()[..], b"secret");
        assert_eq!(moved.ciphertext, sealed.ciphertext);
        // Rewrap checks the binding: a record on the wrong row is refused.
        let other = Context { org_id: "o", connection_id: "d" };
        assert!(matches!(ring.rewrap(other, &sealed).await, Err(CryptoError::Open)));
    }
}
