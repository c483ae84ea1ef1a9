//! Run tokens: short-lived, signed statements "this caller acts for
//! organization O (user U), and may use these connections / integrations",
//! minted by the admin API for one workflow run and checked by the proxy on
//! every request of the shared tier.
//!
//! Format: `cprt1.<kid>.<claims>.<mac>` — `claims` is base64url JSON,
//! `mac` base64url HMAC-SHA256 over `cprt1.<kid>.<claims>` under the key
//! whose id is `kid`. A symmetric MAC is enough: credproxy both mints and
//! checks, the platform only passes tokens on; and it is what the hot path
//! can afford (the README has the measurement against Ed25519). One key
//! signs; any number verify (rotation without downtime).
//!
//! Imports only `secret` (key material).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::secret::SecretValue;

/// The token's format and version.
const PREFIX: &str = "cprt1";
/// How every run token starts.
pub const RUN_TOKEN_PREFIX: &str = "cprt1.";
/// Longest token accepted (a token lists at most a few hundred ids).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Bytes of a signing key.
const KEY_LEN: usize = 32;

/// What a run token says. Never a secret itself, but the token that
/// carries it is one: log [`RunClaims::jti`], never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunClaims {
    /// The token's id (random): what the audit trail records.
    pub jti: String,
    /// The organization the caller acts for.
    pub org: String,
    /// The user the run acts for, when the platform says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Only these connections, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conns: Option<Vec<String>>,
    /// Only connections of these integrations, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ints: Option<Vec<String>>,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
}

impl RunClaims {
    /// May this token use `connection` (of `integration`, once known)? Its
    /// organization is checked by resolving under it.
    pub fn allows(&self, connection: &[u8], integration: Option<&str>) -> bool {
        self.conns.as_ref().is_none_or(|c| c.iter().any(|x| x.as_bytes() == connection))
            && integration.is_none_or(|int| self.ints.as_ref().is_none_or(|i| i.iter().any(|x| x == int)))
    }
}

/// Why a token was refused. Each maps to its own 407 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RunTokenError {
    /// Not of this format, truncated, a key id no key has, a signature that
    /// does not verify, claims that do not parse.
    #[error("the run token is not valid")]
    Invalid,
    #[error("the run token has expired")]
    Expired,
}

/// A signing key with its id.
struct Key {
    id: String,
    key: hmac::Key,
}

impl Key {
    fn new(bytes: &[u8]) -> Self {
        // The id names the key without revealing it: a hash prefix.
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = digest.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
        Self { id, key: hmac::Key::new(hmac::HMAC_SHA256, bytes) }
    }
}

/// The key that signs new tokens and the keys that verify them (the
/// signing key, and earlier ones kept during a rotation).
pub struct RunTokenKeys {
    signing: Key,
    verifying: HashMap<String, hmac::Key>,
}

impl fmt::Debug for RunTokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.verifying.keys().map(String::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("RunTokenKeys").field("signing", &self.signing.id).field("verifying", &ids).finish()
    }
}

/// A key's bytes: base64url (or standard base64) of at least 32 bytes.
pub fn decode_key(text: &SecretValue) -> Result<Vec<u8>, String> {
    let t = text.expose().trim();
    let bytes = B64
        .decode(t.trim_end_matches('='))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(t))
        .map_err(|_| "not base64".to_owned())?;
    if bytes.len() < KEY_LEN {
        return Err(format!("must be at least {KEY_LEN} bytes (base64 of `openssl rand 32`)"));
    }
    Ok(bytes)
}

/// Reads a key file (created, 0600, with a random key when `create` and it
/// does not exist; refused if group or others can read it).
pub fn key_file(path: &Path, create: bool) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if create && !path.exists() {
        let mut key = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut key).map_err(|_| "no randomness".to_owned())?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // Written whole to a private temporary file, then linked into place:
        // instances starting together never read a half-written key, and the
        // first link wins (the others read the winner's key).
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, B64.encode(key).as_bytes()))
            .and_then(|()| match std::fs::hard_link(&tmp, path) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                other => other,
            });
        let _ = std::fs::remove_file(&tmp);
        written.map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{}: group or others can read it (chmod 600)", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode_key(&SecretValue::new(text)).map_err(|e| format!("{}: {e}", path.display()))
}

impl RunTokenKeys {
    /// `signing` signs (and verifies); `verifying` only verify.
    pub fn new(signing: &[u8], verifying: &[Vec<u8>]) -> Self {
        let signing = Key::new(signing);
        let mut all = HashMap::new();
        for k in verifying.iter().map(|b| Key::new(b)) {
            all.insert(k.id, k.key);
        }
        all.insert(signing.id.clone(), signing.key.clone());
        Self { signing, verifying: all }
    }

    /// The signing key's id.
    pub fn signing_id(&self) -> &str {
        &self.signing.id
    }

    /// A token for `claims` (a fresh `jti` is the caller's job); `None`
    /// when it would be longer than [`MAX_TOKEN_LEN`], which [`verify`]
    /// refuses (too many connection ids, found by the `run_token` fuzz
    /// target: such a token was handed out and never worked).
    ///
    /// [`verify`]: RunTokenKeys::verify
    pub fn mint(&self, claims: &RunClaims) -> Option<SecretValue> {
        let body = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let signed = format!("{PREFIX}.{}.{body}", self.signing.id);
        let tag = hmac::sign(&self.signing.key, signed.as_bytes());
        let token = SecretValue::new(format!("{signed}.{}", B64.encode(tag.as_ref())));
        (token.expose().len() <= MAX_TOKEN_LEN).then_some(token)
    }

    /// The claims of a token signed by one of the keys and not expired at `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<RunClaims, RunTokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(RunTokenError::Invalid);
        }
        let (signed, mac) = token.rsplit_once('.').ok_or(RunTokenError::Invalid)?;
        let mut parts = signed.split('.');
        let (Some(PREFIX), Some(kid), Some(body), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RunTokenError::Invalid);
        };
        let key = self.verifying.get(kid).ok_or(RunTokenError::Invalid)?;
        let mac = B64.decode(mac).map_err(|_| RunTokenError::Invalid)?;
        hmac::verify(key, signed.as_bytes(), &mac).map_err(|_| RunTokenError::Invalid)?;
        let json = B64.decode(body).map_err(|_| RunTokenError::Invalid)?;
        let claims: RunClaims = serde_json::from_slice(&json).map_err(|_| RunTokenError::Invalid)?;
        if claims.exp <= now {
            return Err(RunTokenError::Expired);
        }
        Ok(claims)
    }
}

/// A random token id.
pub fn new_jti() -> String {
    let mut b = [0u8; 12];
    SystemRandom::new().fill(&mut b).expect("randomness");
    format!("rt_{}", B64.encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> RunClaims {
        RunClaims {
            jti: "rt_1".into(),
            org: "org_a".into(),
            sub: Some("user_1".into()),
            conns: Some(vec!["conn_a".into()]),
            ints: None,
            iat: 100,
            exp,
        }
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let keys = RunTokenKeys::new(&[7u8; 32], &[]);
        let t = keys.mint(&claims(200)).unwrap();
        assert!(t.expose().starts_with(&format!("cprt1.{}.", keys.signing_id())));
        assert_eq!(keys.verify(t.expose(), 199), Ok(claims(200)));
        assert_eq!(keys.verify(t.expose(), 200), Err(RunTokenError::Expired));
        assert!(claims(200).allows(b"conn_a", Some("github")) && !claims(200).allows(b"conn_b", None));
        let only_github = RunClaims { ints: Some(vec!["github".into()]), ..claims(200) };
        assert!(only_github.allows(b"conn_a", None) && !only_github.allows(b"conn_a", Some("slack")));
    }

    #[test]
    fn tampering_truncation_and_unknown_keys_are_invalid() {
        let keys = RunTokenKeys::new(&[7u8; 32], &[]);
        let t = keys.mint(&claims(200)).unwrap().expose().to_owned();
        for bad in [
            &t[..t.len() - 1],
            &t[..t.len() / 2],
            "",
            "cprt1",
            "cprt1.x.y.z",
            &t.replacen("cprt1", "cprt2", 1),
            &format!("{t}.extra"),
        ] {
            assert_eq!(keys.verify(bad, 0), Err(RunTokenError::Invalid), "{bad}");
        }
        // Other claims under the same signature.
        let (signed, mac) = t.rsplit_once('.').unwrap();
        let mut forged = claims(9_999);
        forged.org = "org_b".into();
        let body = B64.encode(serde_json::to_vec(&forged).unwrap());
        let head = signed.rsplit_once('.').unwrap().0;
        assert_eq!(keys.verify(&format!("{head}.{body}.{mac}"), 0), Err(RunTokenError::Invalid));
        // Another key (unknown id), and a known id with another key's MAC.
        let other = RunTokenKeys::new(&[8u8; 32], &[]);
        assert_eq!(keys.verify(other.mint(&claims(200)).unwrap().expose(), 0), Err(RunTokenError::Invalid));
        let theirs = other.mint(&claims(200)).unwrap().expose().replacen(other.signing_id(), keys.signing_id(), 1);
        assert_eq!(keys.verify(&theirs, 0), Err(RunTokenError::Invalid));
    }

    #[test]
    fn rotation_keeps_old_tokens_while_their_key_verifies() {
        let old = RunTokenKeys::new(&[1u8; 32], &[]);
        let t = old.mint(&claims(200)).unwrap();
        let rotated = RunTokenKeys::new(&[2u8; 32], &[vec![1u8; 32]]);
        assert_eq!(rotated.verify(t.expose(), 0), Ok(claims(200)));
        assert!(rotated.mint(&claims(200)).unwrap().expose().contains(rotated.signing_id()));
        let retired = RunTokenKeys::new(&[2u8; 32], &[]);
        assert_eq!(retired.verify(t.expose(), 0), Err(RunTokenError::Invalid));
        assert!(!format!("{rotated:?}").contains("AQEB"), "{rotated:?}");
    }

    #[test]
    fn keys_decode_from_base64_of_at_least_32_bytes() {
        assert_eq!(decode_key(&SecretValue::new(B64.encode([3u8; 32]))).unwrap(), vec![3u8; 32]);
        let std = base64::engine::general_purpose::STANDARD.encode([250u8; 40]);
        assert_eq!(decode_key(&SecretValue::new(std)).unwrap().len(), 40);
        assert!(decode_key(&SecretValue::new(B64.encode([3u8; 16]))).unwrap_err().contains("32 bytes"));
        assert!(decode_key(&SecretValue::from("not base64!")).is_err());
    }
}
