//! Response body scrubbing (opt-in per integration,
//! `scrub_response_bodies`): every injected value, and its base64 and
//! URL-encoded forms, masked in a streamed body — also where a value is
//! split across two chunks. Masks keep the length (`*` for each byte), so
//! the body's framing (`Content-Length`) stays true and nothing is
//! buffered but the last few bytes of each chunk.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use zeroize::Zeroizing;

/// The byte a scrubbed value's bytes become.
pub const MASK: u8 = b'*';

/// Finds and masks a connection's injected values in a body given in
/// chunks. Holds back the last `longest - 1` bytes of what it has seen (a
/// value may start there and end in the next chunk) until more comes or
/// [`StreamScrubber::finish`].
pub struct StreamScrubber {
    matcher: AhoCorasick,
    /// The longest pattern's length.
    longest: usize,
    /// Seen, not yet given out (shorter than twice `longest`).
    tail: BytesMut,
    /// Bytes masked so far.
    masked: u64,
}

impl std::fmt::Debug for StreamScrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamScrubber").field("held", &self.tail.len()).field("masked", &self.masked).finish()
    }
}

impl StreamScrubber {
    /// A scrubber for `values` (as [`super::injected_values`] gives them:
    /// at least 4 bytes each): each raw, base64 (standard and URL-safe,
    /// with and without padding), form- and percent-encoded. `None` when
    /// there is nothing to look for.
    pub fn new(values: &[Zeroizing<String>]) -> Option<Self> {
        let mut patterns: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut add = |p: Zeroizing<Vec<u8>>| {
            if p.len() >= super::MIN_SCRUBBED && !patterns.iter().any(|q| q[..] == p[..]) {
                patterns.push(p);
            }
        };
        for v in values {
            for form in super::encodings(v) {
                add(Zeroizing::new(form.as_bytes().to_vec()));
            }
            use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                add(Zeroizing::new(engine.encode(v.as_bytes()).into_bytes()));
            }
        }
        if patterns.is_empty() {
            return None;
        }
        let longest = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        // Leftmost-longest: `Token key` is masked whole, not just `key`.
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns.iter().map(|p| &p[..]))
            .ok()?;
        Some(Self { matcher, longest, tail: BytesMut::new(), masked: 0 })
    }

    /// Takes the next chunk; returns what may be given out now (perhaps
    /// empty: the chunk may be all tail).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(chunk);
        // A value may begin in the last `longest - 1` bytes and end in the
        // next chunk: those are kept. So is a match that ends among them:
        // more bytes may make it a longer one (`…K3g` then `=`).
        let mut emit = buf.len() - (self.longest - 1).min(buf.len());
        let found: Vec<(usize, usize)> = self.matcher.find_iter(&buf[..]).map(|m| (m.start(), m.end())).collect();
        for (start, end) in found {
            if end > emit {
                emit = emit.min(start);
                break;
            }
            buf[start..end].fill(MASK);
            self.masked += (end - start) as u64;
        }
        self.tail = buf.split_off(emit);
        buf.freeze()
    }

    /// The body ended: what was held back, its matches masked.
    pub fn finish(&mut self) -> Bytes {
        let mut tail = std::mem::take(&mut self.tail);
        self.mask(&mut tail);
        tail.freeze()
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.tail.len()
    }

    /// Bytes masked so far.
    pub fn masked(&self) -> u64 {
        self.masked
    }

    fn mask(&mut self, buf: &mut [u8]) {
        let found: Vec<(usize, usize)> = self.matcher.find_iter(&*buf).map(|m| (m.start(), m.end())).collect();
        for (start, end) in found {
            buf[start..end].fill(MASK);
            self.masked += (end - start) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(v: &[&str]) -> Vec<Zeroizing<String>> {
        v.iter().map(|s| Zeroizing::new((*s).to_owned())).collect()
    }

    fn run(s: &mut StreamScrubber, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&s.push(c));
        }
        out.extend_from_slice(&s.finish());
        out
    }

    #[test]
    fn every_form_is_masked_at_every_split_and_the_length_kept() {
        let secret = "s3cr3t/v4lue+x";
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let body = format!(
            "{{\"a\":\"{secret}\",\"b\":\"{b64}\",\"c\":\"{b64url}\",\"d\":\"{form}\",\"e\":\"s3cr3t\",\"f\":\"x{secret}{secret}\"}}"
        );
        let want: Vec<u8> = {
            let mut w = body.clone().into_bytes();
            for p in [secret, b64.as_str(), b64url.as_str(), form.as_str()] {
                while let Some(i) = memchr::memmem::find(&w, p.as_bytes()) {
                    w[i..i + p.len()].fill(MASK);
                }
            }
            w
        };
        assert_ne!(want, body.as_bytes());
        let b = body.as_bytes();
        // Every single split point, and every pair of split points.
        for i in 0..=b.len() {
            let mut s = StreamScrubber::new(&values(&[secret])).unwrap();
            assert_eq!(run(&mut s, &[&b[..i], &b[i..]]), want, "split at {i}");
            for j in i..=b.len() {
                let mut s = StreamScrubber::new(&values(&[secret])).unwrap();
                assert_eq!(run(&mut s, &[&b[..i], &b[i..j], &b[j..]]), want, "split at {i} and {j}");
            }
        }
        // One byte at a time.
        let mut s = StreamScrubber::new(&values(&[secret])).unwrap();
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(run(&mut s, &bytes), want);
        assert!(s.masked() > 0);
    }

    /// Random bodies made of the values' forms, their prefixes and noise,
    /// cut at random points: the stream gives what one pass over the
    /// whole body gives.
    #[test]
    fn streaming_equals_one_pass_on_random_bodies_and_splits() {
        let vals = values(&["Token abc/d+1", "abc/d+1", "u5er:pa55"]);
        let reference = StreamScrubber::new(&vals).unwrap();
        let mut pieces: Vec<Vec<u8>> = vec![b"x".to_vec(), b"=".to_vec(), b"\"".to_vec(), b"abc".to_vec()];
        for v in &vals {
            for form in super::super::encodings(v) {
                pieces.push(form.as_bytes().to_vec());
                pieces.push(form.as_bytes()[..form.len() / 2].to_vec());
            }
            use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
            pieces.push(STANDARD.encode(v.as_bytes()).into_bytes());
            pieces.push(URL_SAFE_NO_PAD.encode(v.as_bytes()).into_bytes());
        }
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for _ in 0..500 {
            let mut body = Vec::new();
            for _ in 0..next(30) {
                body.extend_from_slice(&pieces[next(pieces.len())]);
            }
            let mut want = body.clone();
            let mut one = StreamScrubber::new(&vals).unwrap();
            one.matcher = reference.matcher.clone();
            one.mask(&mut want);
            let mut cuts: Vec<usize> = (0..next(6)).map(|_| next(body.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&body[at..c]);
                at = c;
            }
            chunks.push(&body[at..]);
            let mut s = StreamScrubber::new(&vals).unwrap();
            assert_eq!(run(&mut s, &chunks), want, "{:?} cut {chunks:?}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn the_longest_value_goes_whole_and_short_values_are_left() {
        let mut s = StreamScrubber::new(&values(&["Token abcd", "abcd"])).unwrap();
        assert_eq!(run(&mut s, &[b"x Token abcd y abcd"]), b"x ********** y ****");
        assert!(StreamScrubber::new(&values(&[])).is_none());
        // Held back: never more than the longest pattern minus one.
        let mut s = StreamScrubber::new(&values(&["abcd"])).unwrap();
        let out = s.push(b"hello ab");
        assert!(s.held() < 2 * s.longest, "{}", s.held());
        assert_eq!([&out[..], &s.push(b"cd!"), &s.finish()].concat(), b"hello ****!");
    }
}
