//! The audit trail: one JSON line per credential use (a proxied request
//! that names a connection) and per admin action on a credential, apart
//! from the access log. A line holds ids, names, a method, a host and a
//! path without its query — never a credential, a run token or an admin
//! token.
//!
//! Lines are formatted by the thread that records them and written by a
//! background thread in batches ([`LineBatcher`], as the log is), to
//! standard output or to a file rotated by size. Nothing is dropped: a
//! full buffer is written by the thread that fills it. A batch the sink
//! cannot write is counted (`credproxy_audit_write_errors_total`) and
//! logged.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{AuditConfig, AuditSink};
use crate::metrics::Metrics;
use crate::telemetry::{self, LineBatcher};

/// `,"name":"`, a field's prefix with the opening quote of a string
/// value, made at compile time ([`Line`] drops the quote for other values).
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":\"")
    };
}

/// What a line is about.
pub const KIND_USE: &str = "credential_use";
pub const KIND_ADMIN: &str = "admin";

/// Who a credential use was by, and through what: the fields of a use line
/// that stay the same while a caller connection keeps its caller and its
/// connection. Formatted once into [`PartiesText`], which the proxy keeps
/// per caller connection: seven escaped fields were ~900 instructions of
/// every audited request (callgrind, load bench).
#[derive(Debug, Clone, Copy)]
pub struct Parties<'a> {
    /// The organization the caller acts for (its run token's, or the sidecar's).
    pub org: &'a str,
    /// The connection's owner, once the connection was found.
    pub user: Option<&'a str>,
    /// The run token's id and subject (its `user_id`), when one was presented.
    pub run_token: Option<&'a str>,
    pub run_subject: Option<&'a str>,
    pub connection: &'a str,
    pub integration: Option<&'a str>,
    pub auth_method: Option<&'a str>,
}

impl Parties<'_> {
    /// The line's bytes from `,"org":` to the auth method's value.
    pub fn format(&self) -> PartiesText {
        let mut text = Vec::with_capacity(160);
        let l = &mut Line(&mut text);
        l.str(key!("org"), Some(self.org));
        l.str(key!("user"), self.user);
        l.str(key!("run_token"), self.run_token);
        l.str(key!("run_subject"), self.run_subject);
        l.str(key!("connection"), Some(self.connection));
        l.str(key!("integration"), self.integration);
        l.str(key!("auth_method"), self.auth_method);
        PartiesText(text)
    }
}

/// [`Parties`] as they appear in a line (ids and names, never a secret).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PartiesText(Vec<u8>);

impl std::fmt::Debug for PartiesText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PartiesText").field(&String::from_utf8_lossy(&self.0)).finish()
    }
}

/// One proxied request that named a connection.
#[derive(Debug, Clone, Copy)]
pub struct CredentialUse<'a> {
    /// When the request arrived.
    pub time: SystemTime,
    pub parties: &'a PartiesText,
    /// A token (RFC 9110 §9.1; `http::Method` admits nothing else): written
    /// as it is, no escaping to look for.
    pub method: &'a http::Method,
    pub host: Option<&'a str>,
    /// Without the query.
    pub path: &'a str,
    /// The status the caller got.
    pub status: u16,
    pub latency: Duration,
    /// The OAuth2 token was refreshed for this request (by it, or by
    /// another it waited for).
    pub refreshed: bool,
    /// Retried once after an upstream 401 and a refresh.
    pub retried: bool,
    /// The problem code of a response credproxy made.
    pub code: Option<&'a str>,
}

/// One admin API action that touches a credential.
#[derive(Debug, Clone, Copy)]
pub struct AdminAction<'a> {
    pub time: SystemTime,
    /// `connection.create`, `connection.delete`, `connection.authorize`
    /// (start), `connection.authorized` / `connection.reauthorized` (the
    /// provider's callback), `connection.test`, `run_token.mint`,
    /// `connect_session.create`; from the connect pages (no admin token, a
    /// `connect_session`): `connection.create`, `connection.replace` (also
    /// refused posts, with their code), `connection.authorize` /
    /// `connection.reauthorize`, and `connection.test` for a credential that
    /// failed its test (not stored).
    pub action: &'a str,
    /// The admin token's name; none for the OAuth2 callback and the connect
    /// pages (a browser).
    pub admin_token: Option<&'a str>,
    /// The connect session (`cs_…`) a browser acted through.
    pub connect_session: Option<&'a str>,
    pub org: Option<&'a str>,
    pub user: Option<&'a str>,
    pub connection: Option<&'a str>,
    pub integration: Option<&'a str>,
    pub auth_method: Option<&'a str>,
    /// The minted run token's id and subject.
    pub run_token: Option<&'a str>,
    pub run_subject: Option<&'a str>,
    /// The admin API's answer.
    pub status: u16,
    /// The problem code of a refused action, or of a failed connection test.
    pub code: Option<&'a str>,
}

/// The audit sink, or nothing (`audit.sink = "off"`). Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    lines: Option<Arc<LineBatcher>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("on", &self.is_on()).finish()
    }
}

impl Audit {
    /// Opens the configured sink (a file is created or appended to).
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match config.sink {
            AuditSink::Off => return Ok(Self::off(metrics)),
            AuditSink::Stdout => Box::new(Counted { out: io::stdout(), metrics: metrics.clone() }),
            AuditSink::File => Box::new(Counted {
                out: RotatingFile::open(&config.path, config.max_file_bytes, config.keep_files)?,
                metrics: metrics.clone(),
            }),
        };
        Ok(Self { lines: Some(LineBatcher::start("credproxy-audit", out)?), metrics })
    }

    /// No audit trail.
    pub fn off(metrics: Arc<Metrics>) -> Self {
        Self { lines: None, metrics }
    }

    pub fn is_on(&self) -> bool {
        self.lines.is_some()
    }

    pub fn credential_use(&self, u: &CredentialUse<'_>) {
        let Some(lines) = &self.lines else { return };
        lines.append_with(|buf| {
            let l = &mut Line::begin(buf, u.time, KIND_USE);
            l.0.extend_from_slice(&u.parties.0);
            l.token(key!("method"), u.method);
            l.plain(key!("host"), u.host);
            l.str(key!("path"), Some(u.path));
            l.status(key!("status"), u.status);
            l.num(key!("latency_us"), u.latency.as_micros().min(u128::from(u64::MAX)) as u64);
            l.bool(key!("refreshed"), u.refreshed);
            l.bool(key!("retried"), u.retried);
            l.str(key!("code"), u.code);
            l.end();
        });
        self.metrics.audit_line();
    }

    pub fn admin_action(&self, a: &AdminAction<'_>) {
        let Some(lines) = &self.lines else { return };
        lines.append_with(|buf| {
            let l = &mut Line::begin(buf, a.time, KIND_ADMIN);
            l.str(key!("action"), Some(a.action));
            l.str(key!("admin_token"), a.admin_token);
            l.str(key!("connect_session"), a.connect_session);
            l.str(key!("org"), a.org);
            l.str(key!("user"), a.user);
            l.str(key!("connection"), a.connection);
            l.str(key!("integration"), a.integration);
            l.str(key!("auth_method"), a.auth_method);
            l.str(key!("run_token"), a.run_token);
            l.str(key!("run_subject"), a.run_subject);
            l.num(key!("status"), a.status.into());
            l.str(key!("code"), a.code);
            l.end();
        });
        self.metrics.audit_line();
    }

    /// Writes out what is buffered (before exit).
    pub fn flush(&self) {
        if let Some(lines) = &self.lines {
            lines.flush();
        }
    }

    /// Writes out what is buffered and stops the background thread.
    pub fn close(&self) {
        if let Some(lines) = &self.lines {
            lines.close();
        }
    }
}

/// A JSON object on one line, fields in a fixed order. Written without
/// `fmt`, as bytes (copied from `&str`s and ASCII, so UTF-8), straight
/// into the batch being collected ([`LineBatcher::append_with`]: no
/// buffer of its own to copy from): one line is written for every request
/// that names a connection. Nothing here panics, so a line is whole.
struct Line<'a>(&'a mut Vec<u8>);

impl<'a> Line<'a> {
    /// A line started with its time and kind at the end of `buf`.
    fn begin(buf: &'a mut Vec<u8>, time: SystemTime, kind: &str) -> Self {
        let mut text = [0u8; telemetry::TIME_LEN];
        buf.extend_from_slice(b"{\"time\":\"");
        telemetry::format_time_bytes(time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default(), &mut text);
        buf.extend_from_slice(&text);
        buf.extend_from_slice(b"\",\"kind\":\"");
        buf.extend_from_slice(kind.as_bytes());
        buf.push(b'"');
        Line(buf)
    }

    /// `key` is a field's prefix, [`key!`]: the value is written after its
    /// opening quote. This and the other writers are inlined: a key is
    /// then a constant of known length, copied without a call.
    #[inline(always)]
    fn str(&mut self, key: &str, value: Option<&str>) {
        match value {
            None => self.bare(key, b"null"),
            Some(v) => {
                self.0.extend_from_slice(key.as_bytes());
                escape_into(v, self.0);
                self.0.push(b'"');
            }
        }
    }

    /// A value with no byte JSON escapes (`"`, `\\`, control characters),
    /// as a string: an `http::uri::Authority`'s host (its parse refuses
    /// them all, and bytes above 0x7F; a test holds it to that).
    #[inline(always)]
    fn plain(&mut self, key: &str, value: Option<&str>) {
        match value {
            None => self.bare(key, b"null"),
            Some(v) => {
                debug_assert!(first_special(v.as_bytes()).is_none(), "an escapable byte in {v:?}");
                self.0.extend_from_slice(key.as_bytes());
                self.0.extend_from_slice(v.as_bytes());
                self.0.push(b'"');
            }
        }
    }

    /// A status code: three digits (any other number as [`Line::num`] writes it).
    #[inline(always)]
    fn status(&mut self, key: &str, code: u16) {
        match code {
            100..=999 => {
                let digits = [b'0' + (code / 100) as u8, b'0' + (code / 10 % 10) as u8, b'0' + (code % 10) as u8];
                self.bare(key, &digits);
            }
            _ => self.num(key, code.into()),
        }
    }

    /// A method: a token (letters, digits and ``!#$%&'*+-.^_`|~``), which
    /// JSON needs no escape for.
    #[inline(always)]
    fn token(&mut self, key: &str, method: &http::Method) {
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(method.as_str().as_bytes());
        self.0.push(b'"');
    }

    /// `key` without its quote, then `value` as it is.
    #[inline(always)]
    fn bare(&mut self, key: &str, value: &[u8]) {
        let key = key.as_bytes();
        self.0.extend_from_slice(&key[..key.len() - 1]);
        self.0.extend_from_slice(value);
    }

    #[inline(always)]
    fn num(&mut self, key: &str, value: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut v = value;
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bare(key, &digits[at..]);
    }

    #[inline(always)]
    fn bool(&mut self, key: &str, value: bool) {
        self.bare(key, if value { b"true" } else { b"false" });
    }

    /// Ends the line, newline included.
    fn end(&mut self) {
        self.0.extend_from_slice(b"}\n");
    }
}

/// `value` inside a JSON string, quotes not included (RFC 8259 §7). Ids
/// and paths rarely need escaping: the common case is one scan, eight bytes
/// at a time, and one copy.
fn escape_into(value: &str, out: &mut Vec<u8>) {
    let mut rest = value.as_bytes();
    while let Some(i) = first_special(rest) {
        out.extend_from_slice(&rest[..i]);
        match rest[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            c => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
            }
        }
        // A special byte is ASCII: `rest` still splits at a character.
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Where the first byte JSON escapes in a string is: `"`, `\\` or a
/// control character; eight bytes at a time.
fn first_special(s: &[u8]) -> Option<usize> {
    use crate::scan::{below, equal, first};
    first(s, |w| below(w, 0x20) | equal(w, b'"') | equal(w, b'\\'))
}

/// Counts the batches `out` fails to write, and logs the first of a run
/// of failures (the log is on stderr, a separate sink).
struct Counted<W> {
    out: W,
    metrics: Arc<Metrics>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.write_all(b).map(|()| b.len())
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b).and_then(|()| self.out.flush()).inspect_err(|e| {
            self.metrics.audit_write_error();
            tracing::error!(error = %e, lines = b.iter().filter(|c| **c == b'\n').count(), "audit lines lost: the audit sink failed");
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An append-only file that is renamed to `PATH.1` (and `PATH.1` to
/// `PATH.2`, up to `PATH.keep`) before a write would take it past `max`.
/// Rotation happens between batches, so every line is whole in one file.
struct RotatingFile {
    path: PathBuf,
    max: u64,
    keep: u32,
    /// Closed after a failed write; reopened by the next.
    file: Option<File>,
    size: u64,
}

impl RotatingFile {
    fn open(path: &Path, max: u64, keep: u32) -> io::Result<Self> {
        let mut f = Self { path: path.to_owned(), max, keep, file: None, size: 0 };
        f.reopen()?;
        Ok(f)
    }

    fn reopen(&mut self) -> io::Result<&mut File> {
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
        let file = options.open(&self.path)?;
        self.size = file.metadata()?.len();
        Ok(self.file.insert(file))
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    /// `PATH.keep-1` → `PATH.keep` (replacing the oldest), …, `PATH` → `PATH.1`.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        for n in (1..self.keep).rev() {
            match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.reopen().map(drop)
    }
}

impl Write for RotatingFile {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.write_all(b).map(|()| b.len())
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            self.reopen()?;
        }
        if self.size > 0 && self.size + b.len() as u64 > self.max {
            self.rotate()?;
        }
        let file = self.file.as_mut().expect("opened above");
        match file.write_all(b) {
            Ok(()) => {
                self.size += b.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit line writes a method unescaped: every byte `http` lets
    /// into a method, at any place, is one JSON takes as it is.
    #[test]
    fn methods_need_no_json_escape() {
        let mut admitted = 0;
        for b in 0..=255u8 {
            for m in [vec![b], vec![b'X', b], vec![b, b'X']] {
                if let Ok(method) = http::Method::from_bytes(&m) {
                    admitted += 1;
                    let mut line = Vec::new();
                    Line(&mut line).token(key!("method"), &method);
                    // The key starts with the comma after a previous field.
                    let text = format!("{{{}}}", &String::from_utf8(line).unwrap()[1..]);
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{m:?}: {e}"));
                    assert_eq!(v["method"], method.as_str(), "{m:?}");
                    assert!(first_special(method.as_str().as_bytes()).is_none(), "{m:?}");
                }
            }
        }
        // The letters, digits and the other token characters: some of each.
        assert!(admitted > 3 * 60, "{admitted}");
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(["httpbin"]))
    }

    /// A use line carries the parties formatted beforehand, in their place
    /// among the per-request fields, every key once and in order.
    #[test]
    fn a_use_line_carries_its_formatted_parties() {
        let out = crate::telemetry::tests::Shared::default();
        let audit =
            Audit { lines: Some(LineBatcher::start("audit-test", Box::new(out.clone())).unwrap()), metrics: metrics() };
        let parties = Parties {
            org: "org_a",
            user: Some("u\"1"),
            run_token: Some("rt_1"),
            run_subject: None,
            connection: "conn_abc",
            integration: Some("github"),
            auth_method: None,
        }
        .format();
        let time = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_700_000_123_456);
        for status in [200, 502] {
            audit.credential_use(&CredentialUse {
                time,
                parties: &parties,
                method: &http::Method::GET,
                host: Some("api.test"),
                path: "/x",
                status,
                latency: Duration::from_micros(1234),
                refreshed: false,
                retried: status == 502,
                code: (status == 502).then_some("upstream_unreachable"),
            });
        }
        audit.close();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let keys = [
            "time",
            "kind",
            "org",
            "user",
            "run_token",
            "run_subject",
            "connection",
            "integration",
            "auth_method",
            "method",
            "host",
            "path",
            "status",
            "latency_us",
            "refreshed",
            "retried",
            "code",
        ];
        let at: Vec<_> = keys.iter().map(|k| lines[1].find(&format!("\"{k}\":")).unwrap_or(usize::MAX)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "keys in order: {}", lines[1]);
        for (line, status) in lines.iter().zip([200, 502]) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v.as_object().unwrap().len(), keys.len(), "{line}");
            assert_eq!(
                (v["org"].as_str(), v["user"].as_str(), v["run_token"].as_str()),
                (Some("org_a"), Some("u\"1"), Some("rt_1"))
            );
            assert!(v["run_subject"].is_null() && v["auth_method"].is_null(), "{line}");
            assert_eq!((v["connection"].as_str(), v["integration"].as_str()), (Some("conn_abc"), Some("github")));
            assert_eq!(
                (v["method"].as_str(), v["host"].as_str(), v["path"].as_str()),
                (Some("GET"), Some("api.test"), Some("/x"))
            );
            assert_eq!((v["status"].as_u64(), v["latency_us"].as_u64()), (Some(status), Some(1234)));
            assert_eq!(v["retried"], status == 502);
            assert_eq!(v["code"].as_str(), (status == 502).then_some("upstream_unreachable"));
        }
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = Vec::new();
        s.push(b'"');
        escape_into("plain/path", &mut s);
        s.extend_from_slice(b"\",\"");
        escape_into("a\"b\\c\nd\u{1}é", &mut s);
        s.push(b'"');
        let s = String::from_utf8(s).unwrap();
        assert_eq!(s, r#""plain/path","a\"b\\c\u000ad\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&format!("[{s}]")).unwrap();
        assert_eq!(v[1], "a\"b\\c\nd\u{1}é");
    }

    /// What [`Line::plain`] relies on for a request's host: an
    /// `http::uri::Authority` (as a target's or a CONNECT's authority is
    /// parsed) holds no byte that JSON escapes, nor any above 0x7F.
    #[test]
    fn an_authority_holds_no_byte_json_escapes() {
        for b in (0u8..0x20).chain([b'"', b'\\', 0x7f]).chain(0x80..=0xff) {
            for at in [0, 3, 7] {
                let mut text = b"api.example:8443".to_vec();
                text.insert(at, b);
                let parsed = http::uri::Authority::try_from(text.as_slice());
                assert!(parsed.is_err(), "byte {b:#04x} at {at} was taken: {parsed:?}");
                let target = [b"http://".as_slice(), &text, b"/p"].concat();
                assert!(http::Uri::try_from(target.as_slice()).is_err(), "byte {b:#04x} at {at} in a target");
            }
        }
        // What hosts do hold: taken, and nothing to escape.
        for text in ["Api-1.example_x~y:8443", "user:pw@host.test:81", "[::1]:8080"] {
            let host = http::uri::Authority::try_from(text).map(|a| a.host().to_owned());
            assert!(host.as_deref().is_ok_and(|h| first_special(h.as_bytes()).is_none()), "{text}: {host:?}");
        }
    }

    #[test]
    fn the_word_scan_finds_what_the_byte_scan_finds() {
        let special = |b: u8| b == b'"' || b == b'\\' || b < b' ';
        // Every byte value at every position of a 0–20 byte string of safe
        // bytes (so each 8-byte word, and the tail after them, is tried).
        for len in 0..=20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    let want = s.iter().position(|&c| special(c));
                    assert_eq!(first_special(&s), want, "byte {b:#04x} at {at} of {len}");
                }
            }
            assert_eq!(first_special(&[0xffu8; 20][..len]), None);
        }
    }

    #[test]
    fn a_use_is_one_json_line_with_every_field() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_700_000_123_456);
        let line = |user, status| {
            let mut buf = Vec::new();
            let l = &mut Line::begin(&mut buf, time, KIND_USE);
            l.str(key!("org"), Some("org_a"));
            l.str(key!("user"), user);
            l.plain(key!("host"), Some("api.example:8443"));
            l.status(key!("status"), status);
            l.bool(key!("retried"), true);
            l.end();
            String::from_utf8(buf).unwrap()
        };
        assert!(line(Some("a-long-user-name"), 200).contains("a-long-user-name"));
        for (status, text) in [(99, "99"), (100, "100"), (999, "999"), (1000, "1000"), (0, "0")] {
            assert!(line(None, status).contains(&format!(",\"status\":{text},")), "{status}");
        }
        let line = line(None, 200);
        assert!(line.starts_with("{\"time\"") && line.ends_with("}\n") && line.matches('\n').count() == 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2025-12-02T18:26:40.123456Z");
        assert_eq!(v["kind"], "credential_use");
        assert_eq!((v["org"].as_str(), v["user"].is_null(), v["status"].as_u64()), (Some("org_a"), true, Some(200)));
        assert_eq!(v["host"], "api.example:8443");
        assert_eq!(v["retried"], true);
    }

    #[test]
    fn the_file_rotates_between_batches_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut f = RotatingFile::open(&path, 10, 2).unwrap();
        for batch in ["aaaa\n", "bbbb\n", "cccc\n", "dddd\n", "eeeeeeeeeeeeeeee\n"] {
            f.write_all(batch.as_bytes()).unwrap();
        }
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        // 10 bytes a file: two batches each; the long batch alone in a new one.
        assert_eq!(read(path.clone()), "eeeeeeeeeeeeeeee\n");
        assert_eq!(read(f.rotated(1)), "cccc\ndddd\n");
        assert_eq!(read(f.rotated(2)), "aaaa\nbbbb\n");
        assert!(!f.rotated(3).exists());
        // Reopened: appends, and knows the size it found.
        drop(f);
        let mut f = RotatingFile::open(&path, 10, 2).unwrap();
        f.write_all(b"ffff\n").unwrap();
        assert_eq!(read(path.clone()), "ffff\n");
        assert_eq!(read(f.rotated(1)), "eeeeeeeeeeeeeeee\n");
        assert_eq!(read(f.rotated(2)), "cccc\ndddd\n");
    }

    #[test]
    fn a_failed_write_is_counted() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let m = metrics();
        let mut c = Counted { out: Broken, metrics: m.clone() };
        assert!(c.write_all(b"x\n").is_err());
        let text = m.render(&Default::default(), (0, 0), None, false);
        assert!(text.contains("credproxy_audit_write_errors_total 1\n"), "{text}");
    }
}
