//! Connection ids: `conn_` followed by 26 random base32 characters (130 bits).
//!
//! Leaf module.

use ring::rand::{SecureRandom, SystemRandom};

pub const CONNECTION_ID_PREFIX: &str = "conn_";
const ID_CHARS: usize = 26;
/// Bytes in a connection id.
pub const CONNECTION_ID_LEN: usize = CONNECTION_ID_PREFIX.len() + ID_CHARS;
/// RFC 4648 base32 alphabet, lowercase (ids appear in URLs and headers).
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Mints a new connection id from the system CSPRNG.
pub fn new_connection_id() -> String {
    let mut bytes = [0u8; 17]; // 136 bits, of which 130 are used
    SystemRandom::new().fill(&mut bytes).expect("the system random source failed");
    let mut out = String::with_capacity(CONNECTION_ID_PREFIX.len() + ID_CHARS);
    out.push_str(CONNECTION_ID_PREFIX);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < CONNECTION_ID_PREFIX.len() + ID_CHARS {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

/// True if `s` has the shape of a connection id. Callers still look it up.
pub fn is_connection_id(s: &str) -> bool {
    match s.strip_prefix(CONNECTION_ID_PREFIX) {
        Some(rest) => rest.len() == ID_CHARS && rest.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7')),
        None => false,
    }
}

/// Organization and user ids are chosen by the platform; we only bound their
/// shape so they are safe in logs, URLs and SQL parameters.
pub fn is_valid_external_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_have_the_documented_shape_and_differ() {
        let a = new_connection_id();
        let b = new_connection_id();
        assert_eq!(a.len(), 31);
        assert!(is_connection_id(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "conn_",
            "conn_abc",
            "CONN_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "conn_aaaaaaaaaaaaaaaaaaaaaaaaa1",
            "conn_aaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(!is_connection_id(bad), "{bad:?} accepted");
        }
        assert!(is_connection_id("conn_aaaaaaaaaaaaaaaaaaaaaaaaa2"));
    }

    #[test]
    fn external_ids() {
        assert!(is_valid_external_id("org_123"));
        assert!(is_valid_external_id("user@example.com"));
        assert!(!is_valid_external_id(""));
        assert!(!is_valid_external_id("a b"));
        assert!(!is_valid_external_id("a\r\nb"));
        assert!(!is_valid_external_id(&"x".repeat(129)));
    }
}
