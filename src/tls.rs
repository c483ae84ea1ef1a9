//! TLS interception material: the CA that `credproxy ca init` creates, and
//! leaf certificates minted from it for exactly the host of a `CONNECT`
//! (SAN = that name or IP, never a wildcard, short validity), cached per host;
//! and the TLS algorithms every TLS side of credproxy uses ([`crypto_provider`]).
//!
//! Leaf module: imports only `config` errors' shapes through plain strings.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

pub const CA_CERT_FILE: &str = "credproxy-ca.pem";
pub const CA_KEY_FILE: &str = "credproxy-ca.key";
/// Subject common name of CAs made by `credproxy ca init`.
pub const CA_COMMON_NAME: &str = "credproxy TLS interception CA (not a public CA)";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("minting a certificate failed: {0}")]
    Mint(String),
}

fn file_err(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.into() }
}

/// ring's TLS algorithms, AES-128-GCM first among TLS 1.3's cipher
/// suites (ring's own order puts AES-256-GCM first). Every TLS 1.3 peer
/// has it (RFC 8446 §9.1 makes it mandatory) and it is 128-bit secure;
/// with AES in hardware its 10 rounds to AES-256's 14 make each record
/// cheaper, and an intercepted tunnel seals and opens four records a
/// request (the caller's and the upstream's, each way). Our TLS servers
/// pick by this order (`ignore_client_order`: most clients, curl and
/// rustls among them, offer AES-256 first); as a client we offer it first
/// and the upstream decides. TLS 1.2 suites keep ring's order.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            let aes128 = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
            if let Some(i) = p.cipher_suites.iter().position(|s| s.suite() == aes128) {
                let suite = p.cipher_suites.remove(i);
                p.cipher_suites.insert(0, suite);
            }
            Arc::new(p)
        })
        .clone()
}

/// A TLS server configuration presenting `chain` with `key`, as every
/// TLS server of credproxy is made: [`crypto_provider`]'s algorithms,
/// chosen by our order rather than the client's, no client certificates.
/// The caller sets the ALPN protocols. An error: the key does not match.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    Ok(config)
}

/// Creates a CA key (0600) and certificate in `dir`. Refuses to overwrite.
pub fn init_ca(dir: &Path, validity_days: u32) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(file_err(p, "already exists; remove it first to create a new CA"));
        }
    }
    fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
    let key = KeyPair::generate().map_err(|e| TlsError::Mint(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "credproxy");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(validity_days.max(1)));
    let cert = params.self_signed(&key).map_err(|e| TlsError::Mint(e.to_string()))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| file_err(&key_path, e.to_string()))?;
    f.write_all(key.serialize_pem().as_bytes()).map_err(|e| file_err(&key_path, e.to_string()))?;
    fs::write(&cert_path, cert.pem()).map_err(|e| file_err(&cert_path, e.to_string()))?;
    Ok((cert_path, key_path))
}

/// Mints and caches per-host server configurations signed by the CA.
pub struct Interceptor {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaf_validity: Duration,
    cache: Cache<String, Arc<ServerConfig>>,
    minted: AtomicU64,
    hits: AtomicU64,
}

impl Interceptor {
    pub fn load(cert_path: &Path, key_path: &Path, leaf_validity: Duration) -> Result<Self, TlsError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(|e| file_err(cert_path, e.to_string()))?;
        let key_pem = fs::read_to_string(key_path).map_err(|e| file_err(key_path, e.to_string()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(key_path, format!("not a private key: {e}")))?;
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| file_err(cert_path, format!("not a PEM certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| file_err(cert_path, format!("not a usable CA certificate: {e}")))?;
        Ok(Self {
            issuer,
            ca_der,
            leaf_validity,
            cache: Cache::builder().max_capacity(10_000).time_to_live(leaf_validity / 2).build(),
            minted: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    /// A TLS server configuration presenting a leaf for exactly `host`.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(c) = self.cache.get(host) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c);
        }
        let config = Arc::new(self.mint(host)?);
        self.minted.fetch_add(1, Ordering::Relaxed);
        self.cache.insert(host.to_owned(), config.clone());
        Ok(config)
    }

    fn mint(&self, host: &str) -> Result<ServerConfig, TlsError> {
        let mint = |e: rcgen::Error| TlsError::Mint(e.to_string());
        let key = KeyPair::generate().map_err(mint)?;
        let mut params = CertificateParams::default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        params.subject_alt_names = vec![match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(bare.to_owned().try_into().map_err(mint)?),
        }];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, bare);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(self.leaf_validity.as_secs() as i64);
        let cert = params.signed_by(&key, &self.issuer).map_err(mint)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = server_config(vec![cert.der().clone(), self.ca_der.clone()], key_der)
            .map_err(|e| TlsError::Mint(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Leaf certificates minted so far.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// Tunnels served from a cached leaf.
    pub fn cache_hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_init_then_mint_and_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init_ca(dir.path(), 30).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert!(init_ca(dir.path(), 30).is_err(), "must not overwrite a CA");
        let i = Interceptor::load(&cert, &key, Duration::from_secs(86_400)).unwrap();
        let a = i.server_config("api.example.com").unwrap();
        let b = i.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        i.server_config("127.0.0.1").unwrap();
        assert_eq!((i.minted(), i.cache_hits()), (2, 1));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    /// A client with rustls's own order (AES-256-GCM first, as curl's
    /// OpenSSL offers too) gets AES-128-GCM from an intercepting server;
    /// a client that offers only AES-256-GCM still gets it.
    #[test]
    fn intercepting_server_picks_aes_128_gcm() {
        use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init_ca(dir.path(), 30).unwrap();
        let i = Interceptor::load(&cert, &key, Duration::from_secs(86_400)).unwrap();
        let server = i.server_config("api.example.com").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(i.ca_der.clone()).unwrap();
        let negotiated = |provider: rustls::crypto::CryptoProvider| {
            let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
            let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            // The handshake in memory: each side's records handed to the other.
            let mut wire = Vec::new();
            for _ in 0..10 {
                wire.clear();
                c.write_tls(&mut wire).unwrap();
                s.read_tls(&mut wire.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                wire.clear();
                s.write_tls(&mut wire).unwrap();
                c.read_tls(&mut wire.as_slice()).unwrap();
                c.process_new_packets().unwrap();
                if !c.is_handshaking() && !s.is_handshaking() {
                    break;
                }
            }
            assert!(!s.is_handshaking(), "the handshake completes");
            s.negotiated_cipher_suite().unwrap().suite()
        };
        let rustls_order = rustls::crypto::ring::default_provider();
        assert_eq!(rustls_order.cipher_suites[0].suite(), TLS13_AES_256_GCM_SHA384, "the client prefers AES-256");
        assert_eq!(negotiated(rustls_order), TLS13_AES_128_GCM_SHA256);
        let mut only_256 = rustls::crypto::ring::default_provider();
        only_256.cipher_suites.retain(|s| s.suite() == TLS13_AES_256_GCM_SHA384);
        assert_eq!(negotiated(only_256), TLS13_AES_256_GCM_SHA384);
        // Our own client offers AES-128-GCM first, the rest in ring's order.
        let ours: Vec<_> = crypto_provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut ring: Vec<_> =
            rustls::crypto::ring::default_provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(ours[0], TLS13_AES_128_GCM_SHA256);
        ring.retain(|s| *s != TLS13_AES_128_GCM_SHA256);
        assert_eq!(ours[1..], ring[..]);
    }
}
