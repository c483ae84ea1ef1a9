//! Finding the first byte of a kind in a short string eight bytes at a
//! time (a word read as a `u64`, SWAR), for scans on every request: JSON
//! escaping in audit lines, the delimiters of a request target's
//! authority. Byte-by-byte loops cost several times as much there. And
//! comparing short strings ([`same`]) the same way, inline.
//!
//! A *marks* function turns a word into its marks: `0x80` in the place of
//! each byte of the kind. [`equal`] and [`below`] mark exactly up to and
//! including the first byte of the kind (a borrow only marks bytes after
//! it), so the lowest mark of any OR of them is exact, and so is a marks
//! function applied to a single byte (no byte below it to borrow from).
//!
//! Leaf: imports no other credproxy module.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = ONES * 0x80;

/// Marks the bytes of `w` equal to `b`.
#[inline(always)]
pub fn equal(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGH
}

/// Marks the bytes of `w` below `b` (`b` at most 0x80).
#[inline(always)]
pub fn below(w: u64, b: u8) -> u64 {
    w.wrapping_sub(ONES * u64::from(b)) & !w & HIGH
}

/// Where the first byte `marks` marks is. A tail shorter than a word is
/// read as the string's last eight bytes (those it shares with the word
/// before were found clean); a string shorter than a word byte by byte.
#[inline(always)]
pub fn first(s: &[u8], marks: impl Fn(u64) -> u64) -> Option<usize> {
    if s.len() < 8 {
        return s.iter().position(|&b| marks(u64::from(b)) & 0x80 != 0);
    }
    let in_word = |at: usize| {
        let m = marks(u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default()));
        (m != 0).then(|| at + (m.trailing_zeros() / 8) as usize)
    };
    let mut at = 0;
    while at + 8 <= s.len() {
        if let Some(i) = in_word(at) {
            return Some(i);
        }
        at += 8;
    }
    if at == s.len() {
        return None;
    }
    in_word(s.len() - 8)
}

/// Whether `a` and `b` are equal, compared inline as words: a request
/// compares a dozen short strings (hosts, authorities, ids) with the ones
/// its caller connection's memos kept, and `==` on slices is a call to
/// `memcmp` (~18 instructions each, its setup included). Up to 32 bytes
/// as two to four overlapping words (or halves, or bytes, below eight);
/// longer ones with `==`.
#[inline(always)]
pub fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap_or_default());
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        17..=32 => {
            (word(a, 0) ^ word(b, 0))
                | (word(a, 8) ^ word(b, 8))
                | (word(a, n - 16) ^ word(b, n - 16))
                | (word(a, n - 8) ^ word(b, n - 8))
                == 0
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length to 40, against `==`: equal strings, and one byte
    /// changed at each place (every place is covered by some word).
    #[test]
    fn same_is_slice_equality() {
        let text: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        let copy = text.clone();
        for n in 0..=40 {
            let a = &text[..n];
            assert!(same(a, &copy[..n]), "{n}");
            assert!(!same(a, &text[..n.saturating_sub(1)]) || n == 0, "{n}: lengths differ");
            for at in 0..n {
                let mut b = a.to_vec();
                b[at] ^= 0x20;
                assert!(!same(a, &b), "{n}: byte {at} differs");
            }
        }
    }
}
