//! The `local` key provider: a 32-byte master key in a file that only the
//! owner may read. Data keys are wrapped with AES-256-GCM under it, with the
//! same associated data as the credential itself.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use async_trait::async_trait;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::{aead_open, aead_seal, Context, CryptoError, KeyProvider, DATA_KEY_LEN};
use ring::aead::NONCE_LEN;

pub struct LocalKeyProvider {
    key: Zeroizing<[u8; 32]>,
    key_id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyProvider").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl LocalKeyProvider {
    /// Reads the key file, or creates it (mode 0600, parent 0700) if absent.
    /// Refuses a file that group or others can access.
    pub fn open_or_create(path: &Path) -> Result<Self, CryptoError> {
        Self::load(path, true)
    }

    /// Reads an existing key file (a decrypt-only previous key): a missing
    /// file is an error, never a new key.
    pub fn open(path: &Path) -> Result<Self, CryptoError> {
        Self::load(path, false)
    }

    fn load(path: &Path, create: bool) -> Result<Self, CryptoError> {
        let err = |reason: String| CryptoError::KeyFile { path: path.display().to_string(), reason };
        let rng = SystemRandom::new();
        let mut key = Zeroizing::new([0u8; 32]);
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(err(format!(
                        "mode {mode:04o} lets others read the master key; run `chmod 600 {}`",
                        path.display()
                    )));
                }
                let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?);
                if bytes.len() != 32 {
                    return Err(err(format!("expected 32 bytes, found {}", bytes.len())));
                }
                key.copy_from_slice(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
                return Err(err("does not exist".into()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .map_err(|e| err(format!("cannot create directory: {e}")))?;
                }
                rng.fill(&mut key[..]).map_err(|_| CryptoError::Random)?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| err(format!("cannot create: {e}")))?;
                f.write_all(&key[..]).and_then(|_| f.sync_all()).map_err(|e| err(format!("cannot write: {e}")))?;
                tracing::info!(path = %path.display(), "created a new local master key");
            }
            Err(e) => return Err(err(format!("cannot stat: {e}"))),
        }
        let fp = digest::digest(&digest::SHA256, &key[..]);
        let key_id = format!("local:{}", hex(&fp.as_ref()[..8]));
        Ok(Self { key, key_id, rng })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    fn current_key_id(&self) -> &str {
        &self.key_id
    }

    fn owns(&self, key_id: &str) -> bool {
        key_id == self.key_id
    }

    async fn wrap(&self, data_key: &[u8], ctx: Context<'_>) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut out = nonce.to_vec();
        out.extend(aead_seal(&self.key[..], &nonce, &ctx.aad(), data_key)?);
        Ok(out)
    }

    async fn unwrap(&self, key_id: &str, wrapped: &[u8], ctx: Context<'_>) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if key_id != self.key_id {
            return Err(CryptoError::UnknownKey(key_id.to_owned()));
        }
        if wrapped.len() < NONCE_LEN {
            return Err(CryptoError::Open);
        }
        let (nonce, ct) = wrapped.split_at(NONCE_LEN);
        let key = aead_open(&self.key[..], nonce, &ctx.aad(), ct)?;
        if key.len() != DATA_KEY_LEN {
            return Err(CryptoError::Open);
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_0600_reuses_and_refuses_wide_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        let a = LocalKeyProvider::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = LocalKeyProvider::open_or_create(&path).unwrap();
        assert_eq!(a.current_key_id(), b.current_key_id());
        assert!(!format!("{a:?}").contains(&hex(&a.key[..])));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalKeyProvider::open_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
    }
}
