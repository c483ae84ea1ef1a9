//! Secret values: zeroized on drop, `[redacted]` in `Debug` and `Display`.
//!
//! Leaf module: imports nothing from the crate.

use std::fmt;

use zeroize::Zeroizing;

/// A secret string (a token, key, password or custom credential field).
///
/// The only way to read it is [`SecretValue::expose`], so every place that
/// handles the plaintext is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The plaintext. Callers must not log, format or return it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<Zeroizing<String>> for SecretValue {
    fn from(value: Zeroizing<String>) -> Self {
        Self(value)
    }
}

impl From<&str> for SecretValue {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `#[serde(with = "crate::secret::serde_opt")]` for an `Option<SecretValue>`
/// field of a record that is sealed before it is stored (a token set). Not
/// for anything an API returns: serializing exposes the value.
pub mod serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::SecretValue;

    pub fn serialize<S: Serializer>(value: &Option<SecretValue>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_some(v.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretValue>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(SecretValue::new))
    }
}

/// SHA-256 of `s`, lowercase hex: how single-use secrets (OAuth2 `state`,
/// connect-session tokens) are stored and looked up.
pub fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal bytes, compared in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let s = SecretValue::from("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:#?}", Some(&s)), "Some(\n    [redacted],\n)");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }
}
