//! The upstream side: the proxy's connection [`pool`] (HTTP/1.1 driven
//! inline, h2 by ALPN, rustls with ring) and a pooled hyper client for
//! credproxy's own calls (token endpoints), both connecting through a
//! connector that resolves names itself, checks every address
//! against the [`EgressPolicy`], and connects only to addresses it checked —
//! there is no second lookup an attacker could race.
//!
//! The client never reads `HTTP_PROXY`/`HTTPS_PROXY`: our own traffic must not
//! loop through a proxy. Imports `policy` and `h1` only.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::policy::ssrf::{EgressPolicy, Prohibited};

pub mod pool;

/// An enum of body kinds, each a named variant, as one [`http_body::Body`]
/// (a named enum instead of nested `Either`s: a match says which kind it
/// handles). Every variant is `Unpin`, carries [`Bytes`], and its error
/// becomes a boxed error; `is_end_stream` and `size_hint` are the variant's
/// (the HTTP/1.1 client frames a request by them).
macro_rules! body_enum {
    ($(#[$doc:meta])* $vis:vis enum $name:ident { $($(#[$vdoc:meta])* $variant:ident($ty:ty)),+ $(,)? }) => {
        $(#[$doc])*
        $vis enum $name {
            $($(#[$vdoc])* $variant($ty)),+
        }

        impl http_body::Body for $name {
            type Data = ::bytes::Bytes;
            type Error = Box<dyn std::error::Error + Send + Sync>;

            #[inline]
            fn poll_frame(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
                match self.get_mut() {
                    $(Self::$variant(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into)),+
                }
            }

            #[inline]
            fn is_end_stream(&self) -> bool {
                match self {
                    $(Self::$variant(b) => b.is_end_stream()),+
                }
            }

            #[inline]
            fn size_hint(&self) -> http_body::SizeHint {
                match self {
                    $(Self::$variant(b) => b.size_hint()),+
                }
            }
        }
    };
}
pub(crate) use body_enum;

body_enum! {
    /// A caller's request body.
    pub enum CallerBody {
        /// Read by our HTTP/1.1 codec.
        H1(crate::h1::server::RequestBody),
        /// An h2 stream (intercepted tunnels, served by hyper).
        H2(Incoming),
    }
}

body_enum! {
    /// A request body we forward.
    pub enum UpstreamBody {
        /// The caller's, streamed.
        Caller(CallerBody),
        /// Buffered: rewritten by a body placement, replayed after a 401, or
        /// empty (a retry on a fresh connection).
        Buffered(Full<Bytes>),
    }
}

/// The host and port of a URI's authority, as [`Uri::host`] and
/// [`Uri::port_u16`] give them (an IPv6 literal keeps its brackets), found
/// in one short scan: `http`'s accessors each split the authority with
/// generic string searches, about 700 instructions a request for the two.
pub fn host_port(uri: &Uri) -> Option<(&str, Option<u16>)> {
    authority_host_port(uri.authority()?.as_str())
}

/// [`host_port`] of an authority (`host[:port]`, userinfo skipped).
pub fn authority_host_port(a: &str) -> Option<(&str, Option<u16>)> {
    authority_parts(a).map(|(host, port, _)| (host, port))
}

/// Where `part` — a slice of `whole`, as [`authority_parts`] gives its
/// host — sits in it (kept as a place by the per-connection memos, which
/// keep their own copy of the text). `None` if it is not a slice of it:
/// a range of `whole` that starts where `part` does and is as long is
/// `part`'s own bytes (nothing to compare).
pub fn place(whole: &str, part: &str) -> Option<std::ops::Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let range = start..start.checked_add(part.len())?;
    whole.get(range.clone()).is_some().then_some(range)
}

/// [`authority_host_port`], and whether the authority has userinfo (an
/// `@`), found in the same scan.
pub fn authority_parts(a: &str) -> Option<(&str, Option<u16>, bool)> {
    // Nearly every target has no userinfo and no IP literal: the host runs
    // to the first ':' and only digits follow. One tight scan up to the
    // first byte that could end the host; anything else takes the general
    // pass below.
    let bytes = a.as_bytes();
    match first_delimiter(bytes) {
        None => return Some((a, None, false)),
        Some(c) if bytes[c] == b':' => match &a[c + 1..] {
            "" => return Some((&a[..c], None, false)),
            p => {
                // Only digits after the ':': no '@' anywhere.
                if let Some(port) = parse_port(p) {
                    return Some((&a[..c], Some(port), false));
                }
            }
        },
        Some(_) => {}
    }
    // One pass: where the host starts (after any userinfo), where the
    // first ':' after it is, whether an IPv6 literal's ']' came first.
    let (mut start, mut colon, mut bracket_end) = (0, None, None);
    for (i, b) in a.bytes().enumerate() {
        match b {
            b'@' => (start, colon, bracket_end) = (i + 1, None, None),
            b']' if bracket_end.is_none() => bracket_end = Some(i + 1),
            b':' if colon.is_none() => colon = Some(i),
            _ => {}
        }
    }
    let (host, port) = if a[start..].starts_with('[') {
        let end = bracket_end.filter(|e| *e > start)?;
        // After the literal, only `:port` (`http::Uri` also takes `[::1]08:10`).
        let rest = &a[end..];
        if !rest.is_empty() && !rest.starts_with(':') {
            return None;
        }
        (&a[start..end], rest.strip_prefix(':'))
    } else {
        let (host, port) = match colon {
            Some(c) => (&a[start..c], Some(&a[c + 1..])),
            None => (&a[start..], None),
        };
        // A bracket outside an IP literal (`http` reads `Y[::1]:8080` as
        // host `Y[`, port 8080).
        if bracket_end.is_some() || host.contains('[') {
            return None;
        }
        (host, port)
    };
    // An empty port is the default (RFC 3986 §3.2.3); another that is not
    // 1*DIGIT fitting a u16 (`+443`, which `http` reads as 443) is refused.
    // `start` is past the last '@', if there is one.
    let userinfo = start > 0;
    match port {
        None | Some("") => Some((host, None, userinfo)),
        Some(p) => Some((host, Some(parse_port(p)?), userinfo)),
    }
}

/// Where the first byte that ends a plain host (`:`, `@`, `[` or `]`)
/// is, eight bytes at a time (read twice a request).
fn first_delimiter(s: &[u8]) -> Option<usize> {
    use crate::scan::{equal, first};
    first(s, |w| equal(w, b':') | equal(w, b'@') | equal(w, b'[') | equal(w, b']'))
}

/// `1*DIGIT` that fits a `u16`.
fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() {
        return None;
    }
    p.bytes().try_fold(0u16, |n, b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u16::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Why the connector did not produce a connection. Found again by the proxy
/// in the client error's source chain to pick the right status.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("destination {host} resolves to {ip}, which is {why} and not allowed by egress.allow_cidrs")]
    Prohibited { host: String, ip: IpAddr, why: Prohibited },
    #[error("cannot resolve {host}: {source}")]
    Dns {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} has no addresses")]
    NoAddresses { host: String },
    #[error("connecting to {host} ({addr}) failed: {source}")]
    Connect {
        host: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {host} timed out")]
    Timeout { host: String },
    #[error("invalid upstream URI")]
    InvalidUri,
}

/// TCP connector with the SSRF guard built in.
#[derive(Clone)]
pub struct GuardedConnector {
    policy: Arc<EgressPolicy>,
    connect_timeout: Duration,
}

impl GuardedConnector {
    pub fn new(policy: Arc<EgressPolicy>, connect_timeout: Duration) -> Self {
        Self { policy, connect_timeout }
    }

    /// Resolves `host:port` and checks every address. Refuses the whole name
    /// if any address is prohibited: mixed answers are a rebinding trick.
    pub async fn resolve_checked(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|source| ConnectError::Dns { host: host.to_owned(), source })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(ConnectError::NoAddresses { host: host.to_owned() });
        }
        for a in &addrs {
            self.policy.check(a.ip()).map_err(|why| ConnectError::Prohibited {
                host: host.to_owned(),
                ip: a.ip(),
                why,
            })?;
        }
        Ok(addrs)
    }

    async fn connect(self, uri: Uri) -> Result<TokioIo<TcpStream>, ConnectError> {
        let (host, port) = host_port(&uri).ok_or(ConnectError::InvalidUri)?;
        let port = port.unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        self.connect_checked(host, port).await.map(TokioIo::new)
    }

    /// Resolves, checks every address, and connects to a checked one.
    pub async fn connect_checked(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let host = host.to_owned();
        let addrs = self.resolve_checked(&host, port).await?;
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(source)) => last = Some(ConnectError::Connect { host: host.clone(), addr, source }),
                Err(_) => last = Some(ConnectError::Timeout { host: host.clone() }),
            }
        }
        Err(last.unwrap_or(ConnectError::NoAddresses { host }))
    }
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// Settings for [`build_client`].
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    /// Trusted in addition to the webpki roots (private CAs, test CAs).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

pub fn tls_config(extra_roots: &[rustls::pki_types::CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in extra_roots {
        // Validated when the file is loaded; a bad one is a config error there.
        let _ = roots.add(c.clone());
    }
    rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

pub fn build_client<B>(policy: Arc<EgressPolicy>, s: &ClientSettings) -> Client<HttpsConnector<GuardedConnector>, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connector = GuardedConnector::new(policy, s.connect_timeout);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(&s.extra_roots))
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(s.pool_idle_timeout)
        .pool_max_idle_per_host(s.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https)
}

/// Visits an error and everything it wraps. `io::Error::source()` skips the
/// error an `io::Error` wraps (it returns that error's source), so wrapped
/// errors are visited explicitly: TLS failures arrive as an `io::Error`
/// around an `io::Error` around a `rustls::Error`.
fn any_in_chain(
    e: &(dyn std::error::Error + 'static),
    f: &mut dyn FnMut(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    if f(e) {
        return true;
    }
    if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
        let inner: &(dyn std::error::Error + 'static) = inner;
        if any_in_chain(inner, f) {
            return true;
        }
    }
    e.source().is_some_and(|s| any_in_chain(s, f))
}

/// Finds a [`ConnectError`] in an error's chain (see [`any_in_chain`] on
/// why wrapped `io::Error`s are opened explicitly).
pub fn find_connect_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ConnectError> {
    if let Some(c) = e.downcast_ref::<ConnectError>() {
        return Some(c);
    }
    if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
        let inner: &(dyn std::error::Error + 'static) = inner;
        if let Some(c) = find_connect_error(inner) {
            return Some(c);
        }
    }
    e.source().and_then(find_connect_error)
}

/// True if a TLS error (certificate, handshake) is in the chain.
pub fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    any_in_chain(e, &mut |x| x.downcast_ref::<rustls::Error>().is_some())
}

/// Reads PEM certificates (one or more per file) for `upstream.extra_ca_certs`.
pub fn load_pem_certs(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    let mut store = rustls::RootCertStore::empty();
    for c in &certs {
        store.add(c.clone()).map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word scan finds what a byte scan finds: every byte value at
    /// every position of strings of 0–24 safe bytes, and two delimiters.
    #[test]
    fn the_word_scan_finds_the_first_delimiter() {
        let delimiter = |b: u8| matches!(b, b':' | b'@' | b'[' | b']');
        for len in 0..=24 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(first_delimiter(&s), s.iter().position(|&c| delimiter(c)), "{b:#04x} at {at} of {len}");
                    if at + 1 < len {
                        s[len - 1] = b':';
                        assert_eq!(
                            first_delimiter(&s),
                            s.iter().position(|&c| delimiter(c)),
                            "{b:#04x} at {at}, ':' last, of {len}"
                        );
                    }
                }
            }
            assert_eq!(first_delimiter(&[0xffu8; 24][..len]), None);
        }
    }

    /// `parse_port` is `1*DIGIT` read as a `u16`: what `str::parse`
    /// gives for a string of ASCII digits, nothing for anything else.
    #[test]
    fn parse_port_is_digits_that_fit_a_u16() {
        let oracle =
            |p: &str| (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse::<u16>().ok()).flatten();
        let mut inputs: Vec<String> = Vec::new();
        for n in (0..70_000u64).chain([99_999, 100_000, 655_350, 4_294_967_295, 4_294_967_296]) {
            inputs.extend([n.to_string(), format!("0{n}"), format!("000000000000{n}")]);
        }
        for bad in ["", "+1", "-1", " 80", "80 ", "8 0", "1/", ":", "٣", "0x50", "/", ":80"] {
            inputs.push(bad.to_owned());
        }
        // A byte of every value in each place of a port.
        for b in 0..=255u8 {
            for at in 0..3 {
                let mut p = b"443".to_vec();
                p[at] = b;
                if let Ok(p) = String::from_utf8(p) {
                    inputs.push(p);
                }
            }
        }
        for p in &inputs {
            assert_eq!(parse_port(p), oracle(p), "{p:?}");
        }
        assert_eq!(parse_port("65535"), Some(65_535));
        assert_eq!(parse_port("65536"), None);
    }

    /// `host_port` agrees with `http`'s own accessors on every shape of
    /// authority a request target can have.
    #[test]
    fn host_port_matches_http() {
        for u in [
            "http://example.com/",
            "http://example.com:8080/x",
            "https://127.0.0.1:443/",
            "http://[::1]:9000/",
            "http://[::1]/",
            "http://[fe80::1%25eth0]:80/",
            "http://user:pw@host.test:81/",
            "http://user@host.test/",
            "http://u:p@[::1]:8080/",
            "http://a@b@host.test:82/",
            "http://example.com:/",
            "http://example.com:00080/",
            "http://:80/",
            "/origin-form",
        ] {
            let uri: Uri = u.parse().unwrap();
            let ours = host_port(&uri);
            let theirs = uri.host().map(|h| (h, uri.port_u16()));
            assert_eq!(ours, theirs, "{u}");
            // The userinfo flag comes from the same scan: any '@' at all.
            if let Some(a) = uri.authority() {
                let parts = authority_parts(a.as_str()).expect(u);
                assert_eq!(parts.2, a.as_str().contains('@'), "{u}");
            }
        }
        // A port that is not 1*DIGIT fitting a u16 is refused, not defaulted.
        for bad in ["http://host.test:8a/", "http://example.com:99999/", "https://at:+443/"] {
            assert_eq!(host_port(&bad.parse().unwrap()), None, "{bad}");
        }
        // `http` reads port 10 here; the connection would go there while a
        // check asked about the default port. Found by the `authority` fuzz
        // target (fuzz/seeds/authority/regress-*).
        for junk in ["http://[::8]08:10/", "http://Y[::1]:8080/"] {
            let uri: Uri = junk.parse().unwrap();
            assert_eq!(host_port(&uri), None, "{junk}");
        }
    }
}
