//! What the fuzz targets share: how an input is cut into reads, the
//! independent references the oracles compare against, and an in-memory
//! connection. The references are written from the RFCs and registries,
//! not from credproxy's code: an oracle that repeats the code under test
//! can only agree with it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `data` cut into reads of 1 to 32 bytes, sizes drawn from `seed`.
pub fn split(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x100;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // xorshift32: cheap, deterministic, every size reachable.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 32 + 1) as usize;
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

/// `data` a byte at a time.
pub fn bytewise(data: &[u8]) -> Vec<&[u8]> {
    data.chunks(1).collect()
}

// ---- The chunked coding, from RFC 9112 §7.1 ------------------------------

/// What the reference decoder makes of a chunked body: the data and the
/// bytes the body took, or how many bytes were read when it was refused
/// (the offending byte included; the whole input when it ran out).
pub type ChunkedResult = Result<(Vec<u8>, u64), u64>;

/// Extension and trailer bytes (trailer line ends included) accepted per
/// body, and trailer fields: credproxy's documented limits.
pub const CHUNK_OVERHEAD: usize = 8 * 1024;
pub const TRAILER_FIELDS: usize = 64;

/// The grammar, with the corners credproxy decided (README "HTTP/1.1
/// codec"): a size is 1 to 16 hex digits; after it, optional SP/HTAB, then
/// either the line's end or `;` and an extension that runs to CR and may
/// hold any byte but LF (it is dropped, never forwarded); lines end in CRLF
/// only; trailer lines are
/// any bytes but CR and LF (dropped); extensions and trailers together are
/// at most [`CHUNK_OVERHEAD`] bytes.
pub fn reference_chunked(input: &[u8]) -> ChunkedResult {
    let mut r = Reader { input, pos: 0, overhead: 0 };
    let mut data = Vec::new();
    loop {
        let size = r.chunk_size()?;
        r.crlf()?;
        if size == 0 {
            break;
        }
        let n = usize::try_from(size).unwrap_or(usize::MAX);
        let end = r.pos.saturating_add(n);
        if end > input.len() {
            return Err(input.len() as u64);
        }
        data.extend_from_slice(&input[r.pos..end]);
        r.pos = end;
        r.crlf()?;
    }
    // trailer-section CRLF, where trailer-section = *( field-line CRLF ) and
    // field-line = field-name ":" field-value (RFC 9112 §5, §7.1.2).
    let mut fields = 0;
    loop {
        if r.peek() == Some(b'\r') {
            r.pos += 1;
            r.lf()?;
            return Ok((data, r.pos as u64));
        }
        // field-name = token (RFC 9110 §5.6.2)
        let start = r.pos;
        while r.peek().is_some_and(is_tchar) {
            r.pos += 1;
            r.spend()?;
        }
        if r.pos == start || r.peek() != Some(b':') {
            return Err(r.fail_here());
        }
        r.pos += 1;
        r.spend()?;
        // field-value: HTAB, SP, VCHAR, obs-text
        while r.peek().is_some_and(|b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80) {
            r.pos += 1;
            r.spend()?;
        }
        if r.peek() != Some(b'\r') {
            return Err(r.fail_here());
        }
        r.pos += 1;
        r.spend()?;
        if r.peek() != Some(b'\n') {
            return Err(r.fail_here());
        }
        r.pos += 1;
        fields += 1;
        if fields > TRAILER_FIELDS {
            return Err(r.pos as u64);
        }
        r.spend()?;
    }
}

fn is_tchar(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
        || matches!(
            b,
            b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
        )
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    overhead: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn fail_here(&self) -> u64 {
        if self.pos >= self.input.len() {
            self.input.len() as u64
        } else {
            self.pos as u64 + 1
        }
    }

    /// One more byte of extension or trailer.
    fn spend(&mut self) -> Result<(), u64> {
        self.overhead += 1;
        if self.overhead > CHUNK_OVERHEAD {
            return Err(self.pos as u64);
        }
        Ok(())
    }

    /// chunk-size [ chunk-ext ], up to (not including) the CR.
    fn chunk_size(&mut self) -> Result<u64, u64> {
        let mut size = 0u64;
        let mut digits = 0;
        while let Some(b) = self.peek() {
            let v = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => break,
            };
            if digits == 16 {
                return Err(self.pos as u64 + 1);
            }
            digits += 1;
            size = size * 16 + u64::from(v);
            self.pos += 1;
        }
        if digits == 0 {
            return Err(self.fail_here());
        }
        // BWS, then `;` and an extension, or the line's end.
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
            self.spend()?;
        }
        if self.peek() == Some(b';') {
            while let Some(b) = self.peek() {
                if b == b'\r' {
                    break;
                }
                if b == b'\n' {
                    return Err(self.pos as u64 + 1);
                }
                self.pos += 1;
                self.spend()?;
            }
        }
        Ok(size)
    }

    fn crlf(&mut self) -> Result<(), u64> {
        if self.peek() != Some(b'\r') {
            return Err(self.fail_here());
        }
        self.pos += 1;
        self.lf()
    }

    fn lf(&mut self) -> Result<(), u64> {
        if self.peek() != Some(b'\n') {
            return Err(self.fail_here());
        }
        self.pos += 1;
        Ok(())
    }
}

// ---- Addresses a proxy must never connect to -----------------------------

/// IPv4 blocks of the IANA special-purpose registry (RFC 6890 and updates)
/// that credproxy refuses, plus multicast and the reserved 240/4 (which
/// holds the broadcast address). Written as the registry lists them.
const V4_BLOCKS: &[(&str, u8)] = &[
    ("0.0.0.0", 8),
    ("10.0.0.0", 8),
    ("100.64.0.0", 10),
    ("127.0.0.0", 8),
    ("169.254.0.0", 16),
    ("172.16.0.0", 12),
    ("192.0.0.0", 24),
    ("192.0.2.0", 24),
    ("192.88.99.0", 24),
    ("192.168.0.0", 16),
    ("198.18.0.0", 15),
    ("198.51.100.0", 24),
    ("203.0.113.0", 24),
    ("224.0.0.0", 4),
    ("240.0.0.0", 4),
];

/// Inside global unicast (2000::/3, the only IPv6 destinations), the blocks
/// credproxy refuses: 6to4, the IETF protocol assignments (Teredo, ORCHID,
/// benchmarking, ...), and documentation.
const V6_BLOCKS_IN_GLOBAL: &[(&str, u8)] = &[("2001::", 23), ("2001:db8::", 32), ("2002::", 16), ("3fff::", 20)];

fn in_v4(ip: std::net::Ipv4Addr, (net, len): (&str, u8)) -> bool {
    let net: std::net::Ipv4Addr = net.parse().expect("table");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6(ip: std::net::Ipv6Addr, (net, len): (&str, u8)) -> bool {
    let net: std::net::Ipv6Addr = net.parse().expect("table");
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    u128::from(ip) & mask == u128::from(net) & mask
}

/// Whether the registry table says `ip` is no destination for a proxy.
pub fn reference_prohibited(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => V4_BLOCKS.iter().any(|b| in_v4(v4, *b)),
        std::net::IpAddr::V6(v6) => !in_v6(v6, ("2000::", 3)) || V6_BLOCKS_IN_GLOBAL.iter().any(|b| in_v6(v6, *b)),
    }
}

/// What the standard library calls special: each of these must be refused.
pub fn std_special(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some()
        }
    }
}

// ---- allowed_hosts, by labels ---------------------------------------------

/// Whether `host` (as a URI authority gives it) is one `pattern` allows, by
/// labels: `*.example.com` allows one or more labels before `example.com`,
/// anything else the same name; any case, one trailing dot ignored, IPv6
/// brackets ignored; a pattern's port must equal `port`. `pattern` is in
/// the canonical form `HostPattern`'s `Display` writes.
pub fn reference_host_match(pattern: &str, host: &str, port: u16) -> bool {
    let (name, want_port) = split_pattern(pattern);
    if want_port.is_some_and(|p| p != port) {
        return false;
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    let host_labels: Vec<&str> = host.split('.').collect();
    match name.strip_prefix("*.") {
        Some(suffix) => {
            let want: Vec<&str> = suffix.split('.').collect();
            let extra = host_labels.len().saturating_sub(want.len());
            // At least one label before the suffix, and not a lone empty one (`.example.com`).
            extra > 0 && host_labels[extra..] == want[..] && !(extra == 1 && host_labels[0].is_empty())
        }
        None => host == name,
    }
}

fn split_pattern(p: &str) -> (&str, Option<u16>) {
    if let Some(rest) = p.strip_prefix('[').or_else(|| p.strip_prefix("*[")) {
        let end = rest.find(']').expect("canonical pattern");
        let port = rest[end + 1..].strip_prefix(':').map(|p| p.parse().expect("canonical port"));
        return (&rest[..end], port);
    }
    match p.rsplit_once(':') {
        Some((h, port)) => (h, Some(port.parse().expect("canonical port"))),
        None => (p, None),
    }
}

// ---- An in-memory connection ----------------------------------------------

/// A connection whose peer answers: nothing can be read until something
/// was written, then the given reads arrive, then the stream ends. What is
/// written is kept.
pub struct Script {
    reads: std::collections::VecDeque<Vec<u8>>,
    pub written: Vec<u8>,
    reader: Option<std::task::Waker>,
}

impl Script {
    pub fn new(reads: &[&[u8]]) -> Self {
        Self { reads: reads.iter().map(|r| r.to_vec()).collect(), written: Vec::new(), reader: None }
    }
}

impl Script {
    /// Bytes of the peer's not read yet.
    pub fn remaining(&self) -> usize {
        self.reads.iter().map(Vec::len).sum()
    }
}

impl AsyncRead for Script {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.written.is_empty() {
            self.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if let Some(mut next) = self.reads.pop_front() {
            let n = next.len().min(buf.remaining());
            buf.put_slice(&next[..n]);
            if n < next.len() {
                next.drain(..n);
                self.reads.push_front(next);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One current-thread runtime per fuzzing process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"))
}

/// The references checked against hand-worked cases: run at each fuzz
/// target's start (`init`), so a wrong reference stops the run before it
/// can bless wrong code. (A `#[test]` would need a second build of the
/// whole dependency tree in CI.)
pub fn self_test() {
    assert_eq!(reference_chunked(b"5\r\nhello\r\n0\r\n\r\n"), Ok((b"hello".to_vec(), 15)));
    assert_eq!(reference_chunked(b"5;a=b\r\nhello\r\n0\r\nX: y\r\n\r\nrest"), Ok((b"hello".to_vec(), 25)));
    assert_eq!(reference_chunked(b"5\nhello"), Err(2));
    assert_eq!(reference_chunked(b"0\r\n"), Err(3));
    assert_eq!(reference_chunked(b"x"), Err(1));
    assert_eq!(reference_chunked(b"0\r\nhello\r\n\r\n"), Err(9));
    assert_eq!(reference_chunked(b"0\r\nA : b\r\n\r\n"), Err(5));
    assert_eq!(reference_chunked(b"10000000000000000\r\n"), Err(17));
    assert_eq!(reference_chunked(b"5 x\r\n"), Err(3));
    assert_eq!(reference_chunked(b"5 \t;x y\r\nhello\r\n0\r\n\r\n"), Ok((b"hello".to_vec(), 21)));
    for (ip, refused) in [
        ("127.0.0.1", true),
        ("::ffff:8.8.8.8", true),
        ("169.254.169.254", true),
        ("2001:db8::1", true),
        ("8.8.8.8", false),
        ("2606:4700::1", false),
    ] {
        assert_eq!(reference_prohibited(ip.parse().unwrap()), refused, "{ip}");
    }
    assert!(reference_host_match("*.example.com", "A.b.Example.com.", 1));
    assert!(!reference_host_match("*.example.com", "example.com", 1));
    assert!(!reference_host_match("*.example.com", ".example.com", 1));
    assert!(reference_host_match("[::1]:8080", "[::1]", 8080));
    assert!(!reference_host_match("api.test:80", "api.test", 443));
    let cut = split(b"0123456789abcdefghijklmnopqrstuvwxyz0123456789", 7);
    assert!(cut.len() > 1 && cut.concat() == b"0123456789abcdefghijklmnopqrstuvwxyz0123456789");
}
