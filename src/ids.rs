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
    new_id(CONNECTION_ID_PREFIX)
}

/// `prefix` and 26 random base32 characters (130 bits).
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 17]; // 136 bits, of which 130 are used
    SystemRandom::new().fill(&mut bytes).expect("the system random source failed");
    let mut out = String::with_capacity(prefix.len() + ID_CHARS);
    out.push_str(prefix);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < prefix.len() + ID_CHARS {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

/// A connection id whose shape was checked ([`is_connection_id_bytes`]),
/// kept by value: a request's id costs no allocation and no field-value
/// check, and compares as 31 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId([u8; CONNECTION_ID_LEN]);

impl ConnectionId {
    /// `b`, if it has the shape of a connection id.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if !is_connection_id_bytes(b) {
            return None;
        }
        b.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The id as text: a UTF-8 check (~130 instructions for 31 bytes), so
    /// the request path compares bytes and makes text only where it must.
    pub fn as_str(&self) -> &str {
        // ASCII by construction: this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True if `s` has the shape of a connection id. Callers still look it up.
pub fn is_connection_id(s: &str) -> bool {
    is_connection_id_bytes(s.as_bytes())
}

/// [`is_connection_id`] on raw bytes (a field value: no UTF-8 check
/// first, the alphabet is ASCII): the prefix, then the 26 characters eight
/// at a time (words at 0, 8, 16 and 18, the last overlapping).
pub fn is_connection_id_bytes(b: &[u8]) -> bool {
    let Some(rest) = b.strip_prefix(CONNECTION_ID_PREFIX.as_bytes()) else { return false };
    let word = |i: usize| rest.get(i..i + 8).and_then(|w| w.try_into().ok()).map_or(0, u64::from_le_bytes);
    rest.len() == ID_CHARS && [0, 8, 16, ID_CHARS - 8].into_iter().all(|i| base32_word(word(i)))
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = ONES * 0x80;

/// Every byte of `w` is in `a-z` or `2-7`. For a byte below 0x80, adding
/// `0x80 - lo` sets its high bit iff it is >= lo, adding `0x7f - hi` iff it
/// is > hi, and neither carries into the next byte.
fn base32_word(w: u64) -> bool {
    let within =
        |lo: u8, hi: u8| w.wrapping_add(ONES * u64::from(0x80 - lo)) & !w.wrapping_add(ONES * u64::from(0x7f - hi));
    w & HIGH == 0 && (within(b'a', b'z') | within(b'2', b'7')) & HIGH == HIGH
}

/// Organization and user ids are chosen by the platform; we only bound their
/// shape so they are safe in logs, URLs and SQL parameters.
pub fn is_valid_external_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

/// The origin (`scheme://host[:port]`, lowercase, default port left out)
/// of an absolute http(s) URL without user info; `None` for anything else.
pub fn origin_of(url: &str) -> Option<String> {
    let u: http::Uri = url.parse().ok()?;
    let scheme = u.scheme_str()?.to_ascii_lowercase();
    let auth = u.authority()?;
    if auth.as_str().contains('@') || !matches!(scheme.as_str(), "http" | "https") || auth.host().is_empty() {
        return None;
    }
    let host = auth.host().to_ascii_lowercase();
    let default = if scheme == "https" { 443 } else { 80 };
    Some(match auth.port_u16() {
        Some(p) if p != default => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_id_value_is_exactly_a_checked_id() {
        let minted = new_connection_id();
        let id = ConnectionId::parse(minted.as_bytes()).expect("a minted id");
        assert_eq!((id.as_str(), format!("{id:?}")), (minted.as_str(), minted.clone()));
        let mut other = minted.clone().into_bytes();
        other[CONNECTION_ID_LEN - 1] = if other[CONNECTION_ID_LEN - 1] == b'a' { b'b' } else { b'a' };
        assert_ne!(ConnectionId::parse(&other), Some(id));
        for bad in [&minted.as_bytes()[1..], &minted.as_bytes()[..30], b"conn_AAAAAAAAAAAAAAAAAAAAAAAAAA", b"conn_1"] {
            assert_eq!(ConnectionId::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let mut longer = minted.into_bytes();
        longer.push(b'a');
        assert_eq!(ConnectionId::parse(&longer), None);
    }

    /// The word-at-a-time check against the byte one, for every byte value
    /// at every position of an id, and for every length around 26.
    #[test]
    fn connection_id_shape_matches_the_byte_check_everywhere() {
        let reference = |b: &[u8]| {
            b.strip_prefix(b"conn_")
                .is_some_and(|r| r.len() == ID_CHARS && r.iter().all(|c| matches!(c, b'a'..=b'z' | b'2'..=b'7')))
        };
        let id = new_connection_id().into_bytes();
        assert!(is_connection_id_bytes(&id) && reference(&id));
        for pos in 0..id.len() {
            for byte in 0..=255u8 {
                let mut v = id.clone();
                v[pos] = byte;
                assert_eq!(is_connection_id_bytes(&v), reference(&v), "byte {byte:#04x} at {pos}");
            }
        }
        for len in 0..40 {
            let v: Vec<u8> = b"conn_".iter().copied().chain(std::iter::repeat(b'a')).take(len).collect();
            assert_eq!(is_connection_id_bytes(&v), reference(&v), "length {len}");
        }
        for ok in [
            &b"conn_aaaaaaaaaaaaaaaaaaaaaaaaaa"[..],
            b"conn_zzzzzzzzzzzzzzzzzzzzzz2345",
            b"conn_77777777777777777777777777",
        ] {
            assert!(is_connection_id_bytes(ok));
        }
        for bad in [
            &b"conn_aaaaaaaaaaaaaaaaaaaaaaaaa1"[..],
            b"conn_aaaaaaaaaaaaaaaaaaaaaaaaa8",
            b"Conn_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(!is_connection_id_bytes(bad));
        }
    }

    #[test]
    fn origins_are_normalized_and_only_http() {
        assert_eq!(origin_of("https://App.Example.com/done?x=1").as_deref(), Some("https://app.example.com"));
        assert_eq!(origin_of("http://127.0.0.1:8080/a").as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(origin_of("https://a.example:443/").as_deref(), Some("https://a.example"));
        assert_eq!(origin_of("https://user@a.example/"), None, "user info can disguise the host");
        assert_eq!(origin_of("javascript:alert(1)"), None);
        assert_eq!(origin_of("/relative"), None);
        assert!(new_id("cs_").starts_with("cs_") && new_id("cs_").len() == 29);
    }

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
