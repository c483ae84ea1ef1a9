//! Finding the first byte of a kind in a short string eight bytes at a
//! time (a word read as a `u64`, SWAR), for scans on every request: JSON
//! escaping in audit lines, the delimiters of a request target's
//! authority. Byte-by-byte loops cost several times as much there.
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
