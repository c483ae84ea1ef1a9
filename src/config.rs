//! `credproxy.toml`: typed settings with documented defaults, `CREDPROXY_*`
//! environment overrides, `${VAR}` substitution, and validation whose errors
//! name the file, the key and the reason.
//!
//! Each section's `Default` impl is the one statement of its defaults: the
//! shipped `config/credproxy.toml` is held to them by a test. Durations are
//! [`Duration`]s; their TOML keys keep the unit in the name (`*_ms`,
//! `*_secs`, `*_hours`).
//!
//! Imports only `secret`, `ids` (id shapes) and `policy` (host patterns).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::secret::SecretValue;

/// Where the CLI looks for the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "config/credproxy.toml";

/// Environment variable that adds one global admin token.
pub const ADMIN_TOKEN_ENV: &str = "CREDPROXY_ADMIN_TOKEN";
const ENV_PREFIX: &str = "CREDPROXY_";

/// The longest duration any key takes: longer is a typo (and would overflow
/// a deadline).
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A configuration error: where (file or environment variable), which key, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {key}: {reason}")]
pub struct ConfigError {
    pub source_name: String,
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(source_name: impl fmt::Display, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { source_name: source_name.to_string(), key: key.into(), reason: reason.into() }
    }
}

pub mod limits;

/// Durations written as whole units in TOML (the key names the unit).
mod duration {
    use super::{Duration, MAX_DURATION};
    use serde::{de::Error, Deserialize, Deserializer};

    fn bounded<'de, D: Deserializer<'de>>(d: D, unit: u64, name: &str) -> Result<Duration, D::Error> {
        let n = u64::deserialize(d)?;
        n.checked_mul(unit)
            .map(Duration::from_millis)
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| D::Error::custom(format!("invalid value: must be at most one year in {name}")))
    }

    pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        bounded(d, 1, "milliseconds")
    }

    pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        bounded(d, 1_000, "seconds")
    }

    pub fn hours<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        bounded(d, 3_600_000, "hours")
    }
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where this configuration came from (its file's path): errors about
    /// what it names (CA files, key files) say so.
    #[serde(skip)]
    pub source: String,
    /// Environment variables its `${VAR}` substitutions used.
    #[serde(skip)]
    pub env_refs: std::collections::BTreeSet<String>,
    /// Keys set by `CREDPROXY_<SECTION>__<KEY>` variables, with the variable.
    #[serde(skip)]
    pub overrides: Vec<(String, String)>,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub public: PublicConfig,
    pub store: StoreConfig,
    pub crypto: CryptoConfig,
    pub cache: CacheConfig,
    pub egress: EgressConfig,
    pub upstream: UpstreamConfig,
    pub integrations: IntegrationsConfig,
    pub oauth2: OAuth2Config,
    pub tls_intercept: TlsInterceptConfig,
    pub run_tokens: RunTokensConfig,
    pub audit: AuditConfig,
    pub events: EventsConfig,
    /// Endpoints that receive connection events (Standard Webhooks).
    pub webhooks: Vec<WebhookConfig>,
    /// Provider quotas: the defaults for integrations that declare none.
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads serving requests; 0 = one per CPU. A sidecar sharing a small
    /// CPU budget with its runner does best with 1 (see the load bench).
    pub worker_threads: usize,
    /// The proxy served by one single-threaded runtime per thread
    /// (`worker_threads` of them), each with its own upstream pool, no work
    /// stealing: the acceptor hands each new connection to the next thread
    /// in turn. The admin and public listeners and background work stay on
    /// a one-thread main runtime. Off: one work-stealing runtime serves
    /// everything (the load bench compares the two). Unset: on in shared
    /// mode (remote callers: lower p99 under an external load generator,
    /// fewer instructions), off in sidecar mode (a runner on the same cores:
    /// a descheduled thread's connections wait where work stealing would
    /// serve them). [`Config::thread_per_core`] reads it.
    pub thread_per_core: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// In-flight requests and tunnels get this long to finish after SIGTERM
    /// or SIGINT (new connections are refused and `/readyz` answers 503 at
    /// once). `grace_secs`.
    #[serde(rename = "grace_secs", deserialize_with = "duration::secs")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace: secs(30) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsInterceptConfig {
    /// Terminate TLS inside `CONNECT` tunnels with leaf certificates minted
    /// from the CA below, so `https://` requests can carry credentials.
    pub enabled: bool,
    /// CA certificate (PEM), e.g. from `credproxy ca init`.
    pub ca_cert: PathBuf,
    /// CA private key (PEM).
    pub ca_key: PathBuf,
    /// How long a minted leaf certificate is valid. `leaf_validity_hours`.
    #[serde(rename = "leaf_validity_hours", deserialize_with = "duration::hours")]
    pub leaf_validity: Duration,
    /// Hosts tunnelled blind (no interception), still SSRF-guarded.
    pub passthrough_hosts: Vec<crate::policy::hosts::HostPattern>,
}

impl Default for TlsInterceptConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ca_cert: PathBuf::from("certs/credproxy-ca.pem"),
            ca_key: PathBuf::from("certs/credproxy-ca.key"),
            leaf_validity: secs(24 * 3600),
            passthrough_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuth2Config {
    /// How long a token or revocation endpoint call may take in total.
    /// `token_timeout_ms`.
    #[serde(rename = "token_timeout_ms", deserialize_with = "duration::millis")]
    pub token_timeout: Duration,
    /// How long an authorization `state` (and its PKCE verifier) stays
    /// valid. `state_ttl_secs`.
    #[serde(rename = "state_ttl_secs", deserialize_with = "duration::secs")]
    pub state_ttl: Duration,
    /// How long a request waits for another instance's refresh of the same
    /// connection (the row lock) before failing with 503.
    /// `refresh_lock_wait_ms`.
    #[serde(rename = "refresh_lock_wait_ms", deserialize_with = "duration::millis")]
    pub refresh_lock_wait: Duration,
    /// How often each instance looks for idle connections to refresh (auth
    /// methods with `idle_refresh_after_days`). `idle_sweep_interval_secs`.
    #[serde(rename = "idle_sweep_interval_secs", deserialize_with = "duration::secs")]
    pub idle_sweep_interval: Duration,
}

impl Default for OAuth2Config {
    fn default() -> Self {
        Self {
            token_timeout: ms(10_000),
            state_ttl: secs(600),
            refresh_lock_wait: ms(15_000),
            idle_sweep_interval: secs(600),
        }
    }
}

/// Whom a proxy serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    /// One organization (`proxy.org_id`), callers its own pod.
    #[default]
    Sidecar,
    /// Every organization: each request and `CONNECT` proves its caller
    /// with a run token.
    Shared,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address of the proxy listener (`HTTP_PROXY` points here).
    pub listen: SocketAddr,
    /// `sidecar` (one organization) or `shared` (run tokens name it).
    pub mode: ProxyMode,
    /// Sidecar mode: the organization every caller acts for. Required in
    /// sidecar mode, refused in shared mode.
    pub org_id: Option<String>,
    /// Sidecar mode: require a run token all the same.
    pub require_run_token: bool,
    /// Largest request body (bytes) buffered for body placements of the
    /// `custom` auth method; larger bodies get 413.
    pub max_buffered_body: u64,
    /// Time a client gets to send a complete request head.
    /// `header_read_timeout_ms`.
    #[serde(rename = "header_read_timeout_ms", deserialize_with = "duration::millis")]
    pub header_read_timeout: Duration,
    /// Serve the proxy listener over TLS with this certificate chain (PEM);
    /// clients then use an `https://` proxy URL. Needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Largest request head (request line + headers) a client may send;
    /// larger heads get 431.
    pub max_header_bytes: usize,
    /// Most client connections (including CONNECT tunnels) served at once;
    /// further connections are closed at accept.
    pub max_connections: usize,
    /// How long a request body may go without a byte arriving; then 408 (or
    /// the connection closes, if the response has started).
    /// `body_idle_timeout_ms`.
    #[serde(rename = "body_idle_timeout_ms", deserialize_with = "duration::millis")]
    pub body_idle_timeout: Duration,
    /// How long a body that is buffered (body placements, OAuth2 replay) may
    /// take to arrive in full. `buffered_body_timeout_ms`.
    #[serde(rename = "buffered_body_timeout_ms", deserialize_with = "duration::millis")]
    pub buffered_body_timeout: Duration,
    /// Bytes of request bodies buffered at once, all requests together;
    /// a request that would go past it gets 503 with `Retry-After`.
    pub max_buffered_total: u64,
    /// How long a response may wait for the caller to take more of it (a
    /// caller that stopped reading); then the connection closes.
    /// `send_timeout_ms`.
    #[serde(rename = "send_timeout_ms", deserialize_with = "duration::millis")]
    pub send_timeout: Duration,
    /// How long a `CONNECT` tunnel (blind, or intercepted h2) may carry no
    /// byte either way before it is closed. `tunnel_idle_timeout_secs`.
    #[serde(rename = "tunnel_idle_timeout_secs", deserialize_with = "duration::secs")]
    pub tunnel_idle_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            mode: ProxyMode::Sidecar,
            org_id: None,
            require_run_token: false,
            max_buffered_body: 1024 * 1024,
            header_read_timeout: ms(10_000),
            tls_cert: None,
            tls_key: None,
            max_header_bytes: 65_536,
            max_connections: 10_000,
            body_idle_timeout: ms(30_000),
            buffered_body_timeout: ms(60_000),
            max_buffered_total: 64 * 1024 * 1024,
            send_timeout: ms(60_000),
            tunnel_idle_timeout: secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API listener.
    pub listen: SocketAddr,
    /// Bearer tokens accepted by the admin API. `CREDPROXY_ADMIN_TOKEN` adds
    /// one global token.
    pub tokens: Vec<AdminToken>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8081)), tokens: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// The bearer token (use `${VAR}` to keep it out of the file).
    #[serde(deserialize_with = "deserialize_secret")]
    pub token: SecretValue,
    /// Restrict the token to one organization; absent = global.
    #[serde(default)]
    pub org_id: Option<String>,
    /// What the audit trail calls this token (never its value). Default:
    /// its place in the file, `admin.tokens[N]`.
    #[serde(default)]
    pub name: Option<String>,
}

impl AdminToken {
    /// The token's name in the audit trail; `index` is its place in `admin.tokens`.
    pub fn audit_name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("admin.tokens[{index}]"))
    }
}

fn deserialize_secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretValue, D::Error> {
    String::deserialize(d).map(SecretValue::new)
}

fn deserialize_secret_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretValue>, D::Error> {
    String::deserialize(d).map(|s| Some(SecretValue::new(s)))
}

fn deserialize_secrets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SecretValue>, D::Error> {
    Vec::<String>::deserialize(d).map(|v| v.into_iter().map(SecretValue::new).collect())
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (relative to the working directory), or
    /// `postgres://user:password@host:port/db` for shared deployments.
    pub url: String,
    /// PostgreSQL: most pooled connections per instance.
    pub pool_size: usize,
    /// PostgreSQL: how long any one wait on the database may take
    /// (connecting, a pooled connection, a statement). `timeout_ms`.
    #[serde(rename = "timeout_ms", deserialize_with = "duration::millis")]
    pub timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { url: "sqlite://data/credproxy.db".to_owned(), pool_size: 16, timeout: ms(5_000) }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A URL without the password of its user information.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:[redacted]{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl StoreConfig {
    pub fn sqlite_path(&self) -> Option<&Path> {
        self.url.strip_prefix("sqlite://").map(Path::new)
    }

    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyProviderKind {
    Local,
    AwsKms,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CryptoConfig {
    /// Key provider that wraps each connection's data key.
    pub provider: KeyProviderKind,
    /// `local` provider: 32-byte master key, created 0600 on first start;
    /// refused if group or others can read it.
    pub key_file: PathBuf,
    /// `aws-kms` provider: key id, ARN or alias.
    pub kms_key_id: Option<String>,
    /// `aws-kms` provider: AWS region.
    pub kms_region: String,
    /// `aws-kms` provider: endpoint override (VPC endpoint, a test server).
    pub kms_endpoint: Option<String>,
    /// How long an unwrapped data key stays cached. `data_key_cache_ttl_secs`.
    #[serde(rename = "data_key_cache_ttl_secs", deserialize_with = "duration::secs")]
    pub data_key_cache_ttl: Duration,
    /// `aws-kms` provider: how long one KMS call may take (connecting
    /// included). `kms_timeout_ms`.
    #[serde(rename = "kms_timeout_ms", deserialize_with = "duration::millis")]
    pub kms_timeout: Duration,
    /// Earlier `local` master keys, used only to unwrap records not yet
    /// rewrapped by `credproxy keys rotate`. Must exist; never created.
    pub previous_key_files: Vec<PathBuf>,
}

impl Default for CryptoConfig {
    fn default() -> Self {
        Self {
            provider: KeyProviderKind::Local,
            key_file: PathBuf::from("data/master.key"),
            kms_key_id: None,
            kms_region: "us-east-1".to_owned(),
            kms_endpoint: None,
            data_key_cache_ttl: secs(300),
            kms_timeout: ms(5_000),
            previous_key_files: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most decrypted connections held in memory.
    pub max_entries: u64,
    /// How long a decrypted connection stays cached. `ttl_secs`.
    #[serde(rename = "ttl_secs", deserialize_with = "duration::secs")]
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { max_entries: 100_000, ttl: secs(300) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Destinations normally refused by the SSRF guard (loopback, private,
    /// link-local, ...) that are allowed anyway, e.g. `["10.1.0.0/16"]`.
    pub allow_cidrs: Vec<IpNet>,
    /// Forward requests that carry no `X-Connection-Id` (still SSRF-guarded).
    pub allow_passthrough: bool,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self { allow_cidrs: Vec::new(), allow_passthrough: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// How long establishing a TCP connection upstream may take.
    /// `connect_timeout_ms`.
    #[serde(rename = "connect_timeout_ms", deserialize_with = "duration::millis")]
    pub connect_timeout: Duration,
    /// How long the TLS handshake with an `https://` upstream may take.
    /// `tls_handshake_timeout_ms`.
    #[serde(rename = "tls_handshake_timeout_ms", deserialize_with = "duration::millis")]
    pub tls_handshake_timeout: Duration,
    /// Time from sending a request to receiving the response head.
    /// `response_header_timeout_ms`.
    #[serde(rename = "response_header_timeout_ms", deserialize_with = "duration::millis")]
    pub response_header_timeout: Duration,
    /// How long a response body may go without a byte arriving from the
    /// upstream; then the caller's connection closes (nginx's
    /// `proxy_read_timeout`). `response_body_idle_timeout_ms`.
    #[serde(rename = "response_body_idle_timeout_ms", deserialize_with = "duration::millis")]
    pub response_body_idle_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    /// `pool_idle_timeout_secs`.
    #[serde(rename = "pool_idle_timeout_secs", deserialize_with = "duration::secs")]
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    /// PEM files of CAs trusted for upstream TLS besides the public roots.
    pub extra_ca_certs: Vec<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: ms(5_000),
            tls_handshake_timeout: ms(10_000),
            response_header_timeout: ms(60_000),
            response_body_idle_timeout: ms(60_000),
            pool_idle_timeout: secs(90),
            pool_max_idle_per_host: 64,
            extra_ca_certs: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunTokensConfig {
    /// The key that signs run tokens (base64 of at least 32 random bytes),
    /// created 0600 on first start. Default: `run-token.key` beside
    /// `crypto.key_file`.
    pub signing_key_file: Option<PathBuf>,
    /// The signing key itself (use `${VAR}`); instead of the file.
    #[serde(deserialize_with = "deserialize_secret_opt")]
    pub signing_key: Option<SecretValue>,
    /// Earlier signing keys, verification only (a rotation): files...
    pub verification_key_files: Vec<PathBuf>,
    /// ...or values (`${VAR}`).
    #[serde(deserialize_with = "deserialize_secrets")]
    pub verification_keys: Vec<SecretValue>,
    /// Lifetime of a token minted without `ttl_secs`. `default_ttl_secs`.
    #[serde(rename = "default_ttl_secs", deserialize_with = "duration::secs")]
    pub default_ttl: Duration,
    /// Longest lifetime a token may be minted with. `max_ttl_secs`.
    #[serde(rename = "max_ttl_secs", deserialize_with = "duration::secs")]
    pub max_ttl: Duration,
}

impl Default for RunTokensConfig {
    fn default() -> Self {
        Self {
            signing_key_file: None,
            signing_key: None,
            verification_key_files: Vec::new(),
            verification_keys: Vec::new(),
            default_ttl: secs(15 * 60),
            max_ttl: secs(24 * 3600),
        }
    }
}

impl RunTokensConfig {
    /// The signing key's file (when not given as a value).
    pub fn signing_key_path(&self, crypto: &CryptoConfig) -> PathBuf {
        match &self.signing_key_file {
            Some(p) => p.clone(),
            None => crypto.key_file.parent().unwrap_or(Path::new("")).join("run-token.key"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegrationsConfig {
    /// Directory of integration files (`*.toml`, one integration each).
    pub dir: PathBuf,
    /// Reload when a file in `dir` is added, changed or removed (polled:
    /// works for a Kubernetes ConfigMap's symlink swap too). Off by
    /// default: SIGHUP and `POST /v1/integrations/reload` always work.
    pub watch: bool,
    /// How often `dir` is looked at when `watch` is on.
    pub watch_interval_ms: u64,
}

impl Default for IntegrationsConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("config/integrations"), watch: false, watch_interval_ms: 2000 }
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditSink {
    /// Standard output, one JSON line each (the log is on stderr).
    #[default]
    Stdout,
    /// `audit.path`, rotated by size.
    File,
    /// No audit trail.
    Off,
}

/// Connection events: their delivery to webhook endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// One delivery attempt may take this long. `delivery_timeout_secs`.
    #[serde(rename = "delivery_timeout_secs", deserialize_with = "duration::secs")]
    pub delivery_timeout: Duration,
    /// An event is retried (exponential backoff with jitter) for this long
    /// after it happened, then marked failed. `retry_for_secs`.
    #[serde(rename = "retry_for_secs", deserialize_with = "duration::secs")]
    pub retry_for: Duration,
    /// How often the outbox is read for new events and due retries.
    #[serde(rename = "poll_interval_ms", deserialize_with = "duration::millis")]
    pub poll_interval: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self { delivery_timeout: secs(10), retry_for: secs(86_400), poll_interval: ms(1000) }
    }
}

/// One webhook endpoint (`[[webhooks]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the endpoint in the outbox, logs and metrics (default
    /// `webhooks[N]`); keep it when the list changes.
    #[serde(default)]
    pub name: Option<String>,
    /// Where events are POSTed (http or https; the SSRF guard applies).
    pub url: String,
    /// The signing secret, `whsec_` + base64 (Standard Webhooks).
    #[serde(deserialize_with = "deserialize_secret")]
    pub secret: SecretValue,
    /// Event types sent here (default: every one).
    #[serde(default)]
    pub events: Vec<String>,
    /// Only this organization's events.
    #[serde(default)]
    pub org_id: Option<String>,
}

impl WebhookConfig {
    /// The endpoint's name: `name`, or its place in the list.
    pub fn name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("webhooks[{index}]"))
    }
}

/// `[limits]`: how many instances share each quota, and the quotas of
/// integrations whose files declare none (`quota` keeps them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Instances that share a deployment's quotas: each keeps
    /// `1/instances` of every rate, burst and in-flight cap.
    pub instances: u32,
    pub rate_limits: Vec<limits::RateLimit>,
    pub in_flight_limits: Vec<limits::InFlightLimit>,
    pub backoff: limits::Backoff,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            instances: 1,
            rate_limits: Vec::new(),
            in_flight_limits: Vec::new(),
            backoff: limits::Backoff::default(),
        }
    }
}

impl LimitsConfig {
    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        if self.instances == 0 {
            return Err(ConfigError::new(name, "limits.instances", "must be at least 1"));
        }
        let declared = limits::Declared {
            rate_limits: Some(self.rate_limits.clone()),
            in_flight_limits: Some(self.in_flight_limits.clone()),
            backoff: Some(self.backoff.clone()),
        };
        declared.validate(name, "limits.")
    }
}

/// The public listener: what end users' browsers reach (the OAuth2
/// callback and the connect pages), apart from the private admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicConfig {
    /// Address of the public listener.
    pub listen: SocketAddr,
    /// The URL browsers reach the public listener at (through an ingress);
    /// the OAuth2 redirect URI is this + `/oauth2/callback`. Default:
    /// `http://` + the bound address.
    pub base_url: Option<String>,
    /// Origins (`https://app.example.com`) a connect session's `return_to`
    /// may point at; none: sessions end on a page of their own.
    pub allowed_return_origins: Vec<String>,
    /// The pages' CSP `frame-ancestors` (who may embed them in a frame).
    pub frame_ancestors: String,
    /// A connect session's lifetime when its request names none.
    #[serde(rename = "session_ttl_secs", deserialize_with = "duration::secs")]
    pub session_ttl: Duration,
    /// The longest lifetime a connect session may ask for.
    #[serde(rename = "max_session_ttl_secs", deserialize_with = "duration::secs")]
    pub max_session_ttl: Duration,
    /// Unknown session tokens one client address may present per minute
    /// before it is refused (429) for the rest of that minute.
    pub failed_lookups_per_minute: u32,
}

impl EventsConfig {
    fn validate(&self, name: &str, webhooks: &[WebhookConfig]) -> Result<(), ConfigError> {
        if self.delivery_timeout.is_zero() || self.retry_for.is_zero() || self.poll_interval.is_zero() {
            return Err(ConfigError::new(
                name,
                "events",
                "delivery_timeout_secs, retry_for_secs and poll_interval_ms must be greater than 0",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in webhooks.iter().enumerate() {
            let key = |k: &str| format!("webhooks[{i}].{k}");
            let ok = w
                .url
                .parse::<http::Uri>()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                return Err(ConfigError::new(name, key("url"), "must be an absolute http(s) URL"));
            }
            let secret = w.secret.expose().strip_prefix("whsec_").unwrap_or(w.secret.expose());
            let decoded = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, secret);
            if !decoded.is_ok_and(|k| (24..=64).contains(&k.len())) {
                return Err(ConfigError::new(
                    name,
                    key("secret"),
                    "must be whsec_ followed by the base64 of 24 to 64 random bytes",
                ));
            }
            if let Some(e) = w.events.iter().find(|e| crate::events::Kind::parse(e).is_none()) {
                return Err(ConfigError::new(name, key("events"), format!("unknown event type {e:?}")));
            }
            if w.org_id.as_deref().is_some_and(|o| !crate::ids::is_valid_external_id(o)) {
                return Err(ConfigError::new(name, key("org_id"), "must be 1-128 characters of [A-Za-z0-9_.:@-]"));
            }
            if !names.insert(w.name(i)) {
                return Err(ConfigError::new(name, key("name"), "another endpoint has this name"));
            }
        }
        Ok(())
    }
}

impl PublicConfig {
    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        if let Some(u) = &self.base_url {
            let ok = u.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() && u.query().is_none()
            });
            if !ok {
                return Err(ConfigError::new(
                    name,
                    "public.base_url",
                    "must be an absolute http(s) URL without a query",
                ));
            }
        }
        for (i, o) in self.allowed_return_origins.iter().enumerate() {
            if crate::ids::origin_of(o).as_deref() != Some(o.as_str()) {
                return Err(ConfigError::new(
                    name,
                    format!("public.allowed_return_origins[{i}]"),
                    "must be an origin: scheme://host[:port], no path, no trailing slash",
                ));
            }
        }
        let fa = &self.frame_ancestors;
        if fa.is_empty() || fa.bytes().any(|b| matches!(b, b';' | b',' | b'\r' | b'\n') || !(0x20..0x7f).contains(&b)) {
            return Err(ConfigError::new(
                name,
                "public.frame_ancestors",
                "must be a CSP source list ('none', 'self', https://app.example.com …) without ; or ,",
            ));
        }
        if self.session_ttl.is_zero() || self.session_ttl > self.max_session_ttl {
            return Err(ConfigError::new(name, "public.session_ttl_secs", "must be 1 to public.max_session_ttl_secs"));
        }
        if self.failed_lookups_per_minute == 0 {
            return Err(ConfigError::new(name, "public.failed_lookups_per_minute", "must be greater than 0"));
        }
        Ok(())
    }
}

impl Default for PublicConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8082)),
            base_url: None,
            allowed_return_origins: Vec::new(),
            frame_ancestors: "'none'".to_owned(),
            session_ttl: secs(1800),
            max_session_ttl: secs(86_400),
            failed_lookups_per_minute: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `stdout`, `file` or `off`.
    pub sink: AuditSink,
    /// The audit file (`sink = "file"`); its directory must exist.
    pub path: PathBuf,
    /// A file reaching this size is renamed to `PATH.1` (`PATH.1` to
    /// `PATH.2`, …) and a new one started.
    pub max_file_bytes: u64,
    /// Rotated files kept (`PATH.1` … `PATH.N`); older ones are deleted.
    pub keep_files: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { sink: AuditSink::Stdout, path: PathBuf::from("audit.log"), max_file_bytes: 100 << 20, keep_files: 5 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter (e.g. `info`, `credproxy=debug`); `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".to_owned() }
    }
}

impl Config {
    /// Reads `path`, applies `CREDPROXY_*` overrides from `env`, substitutes
    /// `${VAR}`, deserializes and validates.
    pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&name, "(file)", format!("cannot read: {e}")))?;
        Self::from_toml_str(&name, &text, env)
    }

    pub fn from_toml_str(name: &str, text: &str, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(text)
            .map_err(|e| ConfigError::new(name, "(syntax)", e.message().to_owned() + &line_of(text, e.span())))?;
        let overrides = apply_env_overrides(&mut value, env)?;
        if value.get("admin").and_then(|a| a.get("public_url")).is_some() {
            return Err(ConfigError::new(
                name,
                "admin.public_url",
                "moved: the OAuth2 callback is served on the public listener now; set public.base_url \
                 (the redirect URI becomes <public.base_url>/oauth2/callback; register it with the provider)",
            ));
        }
        let mut refs = std::collections::BTreeSet::new();
        substitute_env_refs(&mut value, env, name, "", &mut refs)?;
        let mut cfg: Config = deserialize_value(name, value).map_err(|e| blame_environment(e, &overrides))?;
        cfg.source = name.to_owned();
        cfg.env_refs = refs;
        cfg.overrides = overrides.clone();
        if let Some(token) = env.get(ADMIN_TOKEN_ENV).filter(|t| !t.is_empty()) {
            cfg.admin.tokens.push(AdminToken {
                token: SecretValue::new(token.clone()),
                org_id: None,
                name: Some(ADMIN_TOKEN_ENV.to_owned()),
            });
        }
        cfg.validate(name).map_err(|e| blame_environment(e, &overrides))?;
        Ok(cfg)
    }

    /// An error about `key` (or something it names, such as a file): blamed
    /// on the environment variable that set it, else on the file.
    pub fn error(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        blame_environment(ConfigError::new(&self.source, key, reason), &self.overrides)
    }

    /// `runtime.thread_per_core` as set, else as the mode has it (on for
    /// a shared tier, off for a sidecar).
    pub fn thread_per_core(&self) -> bool {
        self.runtime.thread_per_core.unwrap_or(self.proxy.mode == ProxyMode::Shared)
    }

    /// Semantic checks the types cannot express. Always called by the loader.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        match (&self.proxy.org_id, self.proxy.mode) {
            (None, ProxyMode::Sidecar) => {
                return Err(ConfigError::new(
                    name,
                    "proxy.org_id",
                    "required in sidecar mode: the organization this proxy serves (or proxy.mode = \"shared\")",
                ))
            }
            (Some(_), ProxyMode::Shared) => {
                return Err(ConfigError::new(
                    name,
                    "proxy.org_id",
                    "not used in shared mode: each caller's run token names its organization",
                ))
            }
            (Some(org), _) if !crate::ids::is_valid_external_id(org) => {
                return Err(ConfigError::new(name, "proxy.org_id", "must be 1-128 characters of [A-Za-z0-9_.:@-]"))
            }
            _ => {}
        }
        if !(100..=3_600_000).contains(&self.integrations.watch_interval_ms) {
            return Err(ConfigError::new(name, "integrations.watch_interval_ms", "must be 100 to 3600000"));
        }
        if self.audit.sink == AuditSink::File {
            if self.audit.max_file_bytes < 4096 {
                return Err(ConfigError::new(name, "audit.max_file_bytes", "must be at least 4096"));
            }
            if self.audit.keep_files == 0 {
                return Err(ConfigError::new(name, "audit.keep_files", "must be at least 1"));
            }
        }
        if self.run_tokens.default_ttl > self.run_tokens.max_ttl {
            return Err(ConfigError::new(
                name,
                "run_tokens.default_ttl_secs",
                "must not exceed run_tokens.max_ttl_secs",
            ));
        }
        if self.proxy.tls_cert.is_some() != self.proxy.tls_key.is_some() {
            return Err(ConfigError::new(name, "proxy.tls_key", "proxy.tls_cert and proxy.tls_key go together"));
        }
        if self.store.sqlite_path().is_none() && !self.store.is_postgres() {
            return Err(ConfigError::new(name, "store.url", "must be sqlite://PATH or postgres://…"));
        }
        if self.store.is_postgres() && !cfg!(feature = "postgres") {
            return Err(ConfigError::new(
                name,
                "store.url",
                "this build has no PostgreSQL store (cargo feature `postgres`)",
            ));
        }
        // The key that asks for KMS: the provider, or a decrypt-only KMS key.
        let kms_named = match self.crypto.provider {
            KeyProviderKind::AwsKms => Some("crypto.provider"),
            KeyProviderKind::Local => self.crypto.kms_key_id.as_ref().map(|_| "crypto.kms_key_id"),
        };
        if let (Some(key), false) = (kms_named, cfg!(feature = "kms")) {
            return Err(ConfigError::new(name, key, "this build has no AWS KMS key provider (cargo feature `kms`)"));
        }
        if self.crypto.provider == KeyProviderKind::AwsKms && self.crypto.kms_key_id.as_deref().unwrap_or("").is_empty()
        {
            return Err(ConfigError::new(name, "crypto.kms_key_id", "required when crypto.provider = \"aws-kms\""));
        }
        if let Some(i) = self
            .crypto
            .previous_key_files
            .iter()
            .position(|p| self.crypto.provider == KeyProviderKind::Local && p == &self.crypto.key_file)
        {
            return Err(ConfigError::new(
                name,
                format!("crypto.previous_key_files[{i}]"),
                "is the current crypto.key_file; list only keys being rotated away from",
            ));
        }
        if self.proxy.max_buffered_total < self.proxy.max_buffered_body {
            return Err(ConfigError::new(
                name,
                "proxy.max_buffered_total",
                "must be at least proxy.max_buffered_body (one buffered body must fit)",
            ));
        }
        if self.proxy.max_header_bytes < 8192 {
            return Err(ConfigError::new(name, "proxy.max_header_bytes", "must be at least 8192"));
        }
        if self.store.pool_size == 0 {
            return Err(ConfigError::new(name, "store.pool_size", "must be greater than 0"));
        }
        self.public.validate(name)?;
        self.events.validate(name, &self.webhooks)?;
        self.limits.validate(name)?;
        if self.admin.tokens.is_empty() {
            return Err(ConfigError::new(
                name,
                "admin.tokens",
                format!("no admin token: add [[admin.tokens]] or set {ADMIN_TOKEN_ENV}"),
            ));
        }
        for (i, t) in self.admin.tokens.iter().enumerate() {
            if t.token.expose().len() < 16 {
                return Err(ConfigError::new(
                    name,
                    format!("admin.tokens[{i}].token"),
                    "must be at least 16 characters",
                ));
            }
            if t.name.as_deref().is_some_and(|n| !crate::ids::is_valid_external_id(n)) {
                return Err(ConfigError::new(
                    name,
                    format!("admin.tokens[{i}].name"),
                    "must be 1-128 characters of [A-Za-z0-9_.:@-]",
                ));
            }
            if let Some(org) = &t.org_id {
                if !crate::ids::is_valid_external_id(org) {
                    return Err(ConfigError::new(
                        name,
                        format!("admin.tokens[{i}].org_id"),
                        "must be 1-128 characters of [A-Za-z0-9_.:@-]",
                    ));
                }
            }
        }
        if self.cache.max_entries == 0 {
            return Err(ConfigError::new(name, "cache.max_entries", "must be greater than 0"));
        }
        if self.proxy.max_connections == 0 {
            return Err(ConfigError::new(name, "proxy.max_connections", "must be greater than 0"));
        }
        for (key, d) in [
            ("cache.ttl_secs", self.cache.ttl),
            ("upstream.connect_timeout_ms", self.upstream.connect_timeout),
            ("upstream.tls_handshake_timeout_ms", self.upstream.tls_handshake_timeout),
            ("upstream.response_header_timeout_ms", self.upstream.response_header_timeout),
            ("upstream.response_body_idle_timeout_ms", self.upstream.response_body_idle_timeout),
            ("proxy.header_read_timeout_ms", self.proxy.header_read_timeout),
            ("proxy.body_idle_timeout_ms", self.proxy.body_idle_timeout),
            ("proxy.buffered_body_timeout_ms", self.proxy.buffered_body_timeout),
            ("proxy.send_timeout_ms", self.proxy.send_timeout),
            ("proxy.tunnel_idle_timeout_secs", self.proxy.tunnel_idle_timeout),
            ("oauth2.token_timeout_ms", self.oauth2.token_timeout),
            ("oauth2.state_ttl_secs", self.oauth2.state_ttl),
            ("oauth2.refresh_lock_wait_ms", self.oauth2.refresh_lock_wait),
            ("tls_intercept.leaf_validity_hours", self.tls_intercept.leaf_validity),
            ("store.timeout_ms", self.store.timeout),
            ("crypto.kms_timeout_ms", self.crypto.kms_timeout),
            ("run_tokens.default_ttl_secs", self.run_tokens.default_ttl),
            ("run_tokens.max_ttl_secs", self.run_tokens.max_ttl),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(name, key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}

/// Deserializes a TOML value, reporting the failing key path. The reason
/// never holds a value (after `${VAR}` substitution it may be a secret):
/// the key, the expected type and what was wrong, only.
pub fn deserialize_value<T: serde::de::DeserializeOwned>(name: &str, value: toml::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = without_values(&e.into_inner().to_string());
        // serde names a missing field in its message, at the table's path.
        if let Some(field) = reason.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`')) {
            let key = if path == "." { field.to_owned() } else { format!("{path}.{field}") };
            return ConfigError::new(name, key, "required");
        }
        let key = if path == "." { "(top level)".to_owned() } else { path };
        ConfigError::new(name, key, reason)
    })
}

/// A deserializer's error message without the value it quotes. serde's
/// messages quote what they got (`invalid type: string "…", expected …`,
/// `unknown variant `…``); these keep only its kind. `toml` appends the
/// key (`in `admin.tokens``), which the error's key already names.
pub fn without_values(message: &str) -> String {
    let message = message.split("\nin `").next().unwrap_or(message).trim_end();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // What follows the last ", expected " is our own type's name.
            let Some(at) = rest.rfind(", expected ") else { return format!("{prefix}the value is not accepted") };
            let got = rest[..at].split(['`', '"']).next().unwrap_or("").trim();
            return format!("{prefix}{got}, expected {}", &rest[at + ", expected ".len()..]);
        }
    }
    if message.starts_with("unknown variant ") {
        return match message.rfind("`, expected ") {
            Some(at) => format!("unknown variant, expected {}", &message[at + "`, expected ".len()..]),
            None => "unknown variant".to_owned(),
        };
    }
    message.to_owned()
}

/// An error about a key an environment variable set names that variable,
/// not the file.
fn blame_environment(mut e: ConfigError, overrides: &[(String, String)]) -> ConfigError {
    let hit = overrides.iter().find(|(path, _)| {
        e.key == *path
            || path.starts_with(&format!("{}.", e.key))
            || e.key.starts_with(&format!("{path}."))
            || e.key.starts_with(&format!("{path}["))
    });
    if let Some((_, var)) = hit {
        e.source_name = format!("environment {var}");
        if e.reason.starts_with("invalid type: string") {
            e.reason.push_str(
                " (a value that is not TOML is read as a string: write lists and tables as TOML, e.g. '[\"10.0.0.0/8\"]')",
            );
        }
    }
    e
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => format!(" (line {})", text[..r.start.min(text.len())].matches('\n').count() + 1),
        None => String::new(),
    }
}

/// `CREDPROXY_SECTION__KEY=value` sets `section.key`. The value is read as a
/// TOML literal when it is one (`8080`, `true`, `["10.0.0.0/8"]`, `"123"`),
/// otherwise as a string. `CREDPROXY_ADMIN_TOKEN` is handled separately.
/// Returns the keys set, each with its variable.
fn apply_env_overrides(
    root: &mut toml::Value,
    env: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut set = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        if section.is_empty() || key.is_empty() || key.contains("__") {
            return Err(ConfigError::new(
                format!("environment {var}"),
                format!("{section}.{key}"),
                "not a configuration key: overrides are CREDPROXY_<SECTION>__<KEY>",
            ));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let table = root
            .as_table_mut()
            .expect("a parsed document is a table")
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(table) = table.as_table_mut() else {
            return Err(ConfigError::new(format!("environment {var}"), section, "is not a section"));
        };
        table.insert(key.clone(), value);
        set.push((format!("{section}.{key}"), var.clone()));
    }
    Ok(set)
}

/// Variables named `CREDPROXY_*` that are not configuration but are read
/// elsewhere (the CLI's).
pub const NON_CONFIG_ENV: &[&str] = &[ADMIN_TOKEN_ENV, "CREDPROXY_ADMIN_URL", "CREDPROXY_ADMIN_CA_CERT"];

/// A `CREDPROXY_*` variable that is neither an override
/// (`CREDPROXY_<SECTION>__<KEY>`), nor one of [`NON_CONFIG_ENV`], nor used
/// by a `${VAR}` substitution is a mistake (`CREDPROXY_PROXY_LISTEN` with
/// one underscore would otherwise be ignored in silence).
pub fn check_environment(
    env: &BTreeMap<String, String>,
    used: &std::collections::BTreeSet<String>,
) -> Result<(), ConfigError> {
    for var in env.keys().filter(|v| v.starts_with(ENV_PREFIX)) {
        if var.contains("__") || NON_CONFIG_ENV.contains(&var.as_str()) || used.contains(var) {
            continue;
        }
        let hint = var
            .strip_prefix(ENV_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .map(|(s, k)| format!("; did you mean {ENV_PREFIX}{s}__{k}?"))
            .unwrap_or_default();
        return Err(ConfigError::new(
            format!("environment {var}"),
            "(variable)",
            format!("not a configuration variable: overrides are CREDPROXY_<SECTION>__<KEY> (two underscores){hint}"),
        ));
    }
    Ok(())
}

/// Replaces `${VAR}` in every string value; `$$` is a literal `$`.
/// An undefined variable is an error naming the key.
pub fn substitute_env(
    value: &mut toml::Value,
    env: &BTreeMap<String, String>,
    name: &str,
    path: &str,
) -> Result<(), ConfigError> {
    substitute_env_refs(value, env, name, path, &mut std::collections::BTreeSet::new())
}

/// [`substitute_env`], collecting the variables it used into `refs`.
pub fn substitute_env_refs(
    value: &mut toml::Value,
    env: &BTreeMap<String, String>,
    name: &str,
    path: &str,
    refs: &mut std::collections::BTreeSet<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = substitute_str(s, env, refs).map_err(|reason| ConfigError::new(name, path, reason))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_env_refs(item, env, name, &format!("{path}[{i}]"), refs)?;
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                substitute_env_refs(v, env, name, &p, refs)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn substitute_str(
    s: &str,
    env: &BTreeMap<String, String>,
    refs: &mut std::collections::BTreeSet<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(after) = after.strip_prefix('{') {
            let end = after.find('}').ok_or_else(|| "unterminated ${...}".to_owned())?;
            let var = &after[..end];
            let val = env.get(var).ok_or_else(|| format!("environment variable {var} is not set"))?;
            refs.insert(var.to_owned());
            out.push_str(val);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The process environment as a map (tests pass their own).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const MIN: &str = "[proxy]\norg_id = \"org_a\"\n[[admin.tokens]]\ntoken = \"0123456789abcdef\"\n";

    #[test]
    fn shipped_config_file_parses_with_an_admin_token() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let cfg = Config::load(&path, &env(&[(ADMIN_TOKEN_ENV, "dev-admin-token-0123")])).unwrap();
        assert_eq!(cfg.proxy.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(cfg.store.url, "sqlite://data/credproxy.db");
        assert_eq!(cfg.cache.ttl, Duration::from_secs(300));
    }

    /// A build without KMS and PostgreSQL (what the fuzz targets link:
    /// `cargo test --lib --no-default-features config`) refuses a
    /// configuration that needs either, naming the key.
    #[test]
    #[cfg(not(any(feature = "kms", feature = "postgres")))]
    fn a_build_without_kms_or_postgres_refuses_configs_that_need_them() {
        let refused = |extra: &str| Config::from_toml_str("c.toml", &format!("{MIN}{extra}"), &env(&[])).unwrap_err();
        let e = refused("[store]\nurl = \"postgres://db.internal/credproxy\"\n");
        assert_eq!((e.key.as_str(), e.reason.contains("cargo feature `postgres`")), ("store.url", true), "{e:?}");
        let e = refused("[crypto]\nprovider = \"aws-kms\"\nkms_key_id = \"alias/credproxy\"\n");
        assert_eq!((e.key.as_str(), e.reason.contains("cargo feature `kms`")), ("crypto.provider", true), "{e:?}");
        let e = refused("[crypto]\nkms_key_id = \"alias/credproxy-old\"\n");
        assert_eq!(e.key, "crypto.kms_key_id", "{e:?}");
        Config::from_toml_str("c.toml", MIN, &env(&[])).expect("the SQLite default still loads");
    }

    #[test]
    #[cfg(all(feature = "kms", feature = "postgres"))]
    fn shared_example_parses_with_its_variables() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/shared.toml");
        let vars = [
            ("CREDPROXY_ORG_ID", "org_a"),
            ("CREDPROXY_ADMIN_TOKEN_PLATFORM", "platform-admin-token-0123"),
            ("CREDPROXY_DB_PASSWORD", "db-pass"),
        ];
        let cfg = Config::load(&path, &env(&vars)).unwrap();
        assert!(cfg.store.is_postgres());
        assert!(cfg.tls_intercept.enabled);
        assert_eq!(cfg.crypto.provider, KeyProviderKind::AwsKms);
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("platform-admin-token-0123") && !dbg.contains("db-pass"), "{dbg}");
        assert!(dbg.contains("postgres://credproxy:[redacted]@postgres.internal.example"), "{dbg}");
    }

    #[test]
    fn the_current_key_file_cannot_also_be_a_previous_one() {
        let text = format!("{MIN}[crypto]\nkey_file = \"k\"\nprevious_key_files = [\"old\", \"k\"]\n");
        let err = Config::from_toml_str("c.toml", &text, &env(&[])).unwrap_err();
        assert_eq!(err.key, "crypto.previous_key_files[1]");
        assert!(err.reason.contains("current crypto.key_file"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = Config::from_toml_str("c.toml", &format!("{MIN}[cache]\nttl = 3\n"), &env(&[])).unwrap_err();
        assert_eq!(err.source_name, "c.toml");
        assert_eq!(err.key, "cache.ttl");
        assert!(err.reason.contains("unknown field"), "{err}");
    }

    #[test]
    fn thread_per_core_follows_the_mode_unless_set() {
        let shared = "[proxy]\nmode = \"shared\"\n[[admin.tokens]]\ntoken = \"0123456789abcdef\"\n";
        let load = |text: &str| Config::from_toml_str("c.toml", text, &env(&[])).unwrap().thread_per_core();
        assert!(!load(MIN), "a sidecar shares its cores with its runner: work stealing");
        assert!(load(shared), "a shared tier: one runtime per thread");
        assert!(!load(&format!("{shared}[runtime]\nthread_per_core = false\n")));
        assert!(load(&format!("{MIN}[runtime]\nthread_per_core = true\n")));
        let over = env(&[("CREDPROXY_RUNTIME__THREAD_PER_CORE", "false")]);
        assert!(!Config::from_toml_str("c.toml", shared, &over).unwrap().thread_per_core());
    }

    #[test]
    fn modes_decide_whether_an_organization_is_configured() {
        let shared = "[proxy]\nmode = \"shared\"\n[[admin.tokens]]\ntoken = \"0123456789abcdef\"\n";
        let cfg = Config::from_toml_str("c.toml", shared, &env(&[])).unwrap();
        assert_eq!((cfg.proxy.mode, cfg.proxy.org_id), (ProxyMode::Shared, None));
        let err = Config::from_toml_str("c.toml", &format!("{shared}[proxy]\norg_id = \"o\"\n"), &env(&[]));
        assert!(err.is_err(), "TOML refuses a second [proxy]; the override below is the real case");
        let err = Config::from_toml_str("c.toml", shared, &env(&[("CREDPROXY_PROXY__ORG_ID", "org_a")])).unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.source_name.as_str()),
            ("proxy.org_id", "environment CREDPROXY_PROXY__ORG_ID")
        );
        assert!(err.reason.contains("shared mode"), "{err}");
        let err = Config::from_toml_str("c.toml", "[[admin.tokens]]\ntoken = \"0123456789abcdef\"\n", &env(&[]));
        assert!(err.unwrap_err().reason.contains("sidecar mode"));
        let key = Path::new("/var/lib/credproxy/master.key");
        let crypto = CryptoConfig { key_file: key.into(), ..CryptoConfig::default() };
        assert_eq!(RunTokensConfig::default().signing_key_path(&crypto), Path::new("/var/lib/credproxy/run-token.key"));
    }

    #[test]
    fn a_missing_key_is_named() {
        let text = "[proxy]\norg_id = \"org_a\"\n[[admin.tokens]]\norg_id = \"org_a\"\n";
        let err = Config::from_toml_str("c.toml", text, &env(&[])).unwrap_err();
        assert_eq!((err.key.as_str(), err.reason.as_str()), ("admin.tokens[0].token", "required"));
    }

    #[test]
    fn bad_value_names_key() {
        let err = Config::from_toml_str("c.toml", &format!("{MIN}[egress]\nallow_cidrs = [\"nope\"]\n"), &env(&[]))
            .unwrap_err();
        assert_eq!(err.key, "egress.allow_cidrs[0]");
    }

    #[test]
    fn the_public_listener_is_checked_and_the_old_callback_setting_says_where_it_went() {
        let bad = |extra: &str| Config::from_toml_str("c.toml", &format!("{MIN}{extra}"), &env(&[])).unwrap_err();
        let e = bad("[admin]\npublic_url = \"https://x.example\"\n");
        assert_eq!(e.key, "admin.public_url");
        assert!(e.to_string().contains("public.base_url"), "{e}");
        let e = bad("[public]\nallowed_return_origins = [\"https://app.example/done\"]\n");
        assert_eq!(e.key, "public.allowed_return_origins[0]");
        assert_eq!(bad("[public]\nbase_url = \"connect.example\"\n").key, "public.base_url");
        assert_eq!(bad("[public]\nframe_ancestors = \"'none'; script-src *\"\n").key, "public.frame_ancestors");
        assert_eq!(bad("[public]\nsession_ttl_secs = 90000\n").key, "public.session_ttl_secs");
        let ok = "[public]\nbase_url = \"https://connect.example\"\nallowed_return_origins = [\"https://app.example\", \"http://127.0.0.1:3000\"]\n";
        let cfg = Config::from_toml_str("c.toml", &format!("{MIN}{ok}"), &env(&[])).unwrap();
        assert_eq!(cfg.public.allowed_return_origins.len(), 2);
    }

    #[test]
    fn webhook_endpoints_are_checked_key_by_key() {
        const GOOD: &str = "whsec_c2VlZGVkLXdlYmhvb2stc2VjcmV0LTAxMjM0NTY3ODk=";
        let hook = |extra: &str| format!("[[webhooks]]\nurl = \"https://p.example/h\"\nsecret = \"{GOOD}\"\n{extra}");
        let bad = |text: String| Config::from_toml_str("c.toml", &format!("{MIN}{text}"), &env(&[])).unwrap_err();
        assert_eq!(bad("[[webhooks]]\nurl = \"ftp://x\"\nsecret = \"x\"\n".into()).key, "webhooks[0].url");
        let e = bad("[[webhooks]]\nurl = \"https://p.example/h\"\nsecret = \"whsec_c2hvcnQ=\"\n".into());
        assert_eq!(e.key, "webhooks[0].secret");
        assert!(!e.to_string().contains("c2hvcnQ"), "the value is not quoted: {e}");
        assert_eq!(bad(hook("events = [\"connection.nope\"]\n")).key, "webhooks[0].events");
        let twice = hook("name = \"p\"\n") + &hook("name = \"p\"\n");
        assert_eq!(bad(twice).key, "webhooks[1].name", "a name twice");
        let cfg = Config::from_toml_str(
            "c.toml",
            &format!("{MIN}{}", hook("events = [\"connection.deleted\"]\n")),
            &env(&[]),
        );
        assert_eq!(cfg.unwrap().webhooks[0].name(0), "webhooks[0]");
    }

    #[test]
    fn env_overrides_and_admin_token() {
        let cfg = Config::from_toml_str(
            "c.toml",
            "[proxy]\norg_id = \"org_a\"\n",
            &env(&[
                ("CREDPROXY_PROXY__LISTEN", "127.0.0.1:9999"),
                ("CREDPROXY_CACHE__TTL_SECS", "7"),
                ("CREDPROXY_EGRESS__ALLOW_CIDRS", "[\"127.0.0.0/8\"]"),
                (ADMIN_TOKEN_ENV, "an-admin-token-from-env"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.proxy.listen.port(), 9999);
        assert_eq!(cfg.cache.ttl, Duration::from_secs(7));
        assert_eq!(cfg.egress.allow_cidrs.len(), 1);
        assert_eq!(cfg.admin.tokens[0].token.expose(), "an-admin-token-from-env");
    }

    #[test]
    fn substitution_and_missing_variable() {
        let text = "[proxy]\norg_id = \"org_a\"\n[[admin.tokens]]\ntoken = \"${TOK}\"\n";
        let cfg = Config::from_toml_str("c.toml", text, &env(&[("TOK", "from-the-environment")])).unwrap();
        assert_eq!(cfg.admin.tokens[0].token.expose(), "from-the-environment");
        let err = Config::from_toml_str("c.toml", text, &env(&[])).unwrap_err();
        assert_eq!(err.key, "admin.tokens[0].token");
        assert!(err.reason.contains("TOK"));
        let mut refs = std::collections::BTreeSet::new();
        assert_eq!(substitute_str("a$$b${X}c", &env(&[("X", "1")]), &mut refs).unwrap(), "a$b1c");
        assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["X"]);
    }

    #[test]
    fn missing_org_and_tokens_are_reported() {
        let err = Config::from_toml_str("c.toml", "", &env(&[])).unwrap_err();
        assert_eq!(err.key, "proxy.org_id");
        let err = Config::from_toml_str("c.toml", "[proxy]\norg_id=\"o\"\n", &env(&[])).unwrap_err();
        assert_eq!(err.key, "admin.tokens");
    }

    #[test]
    fn admin_token_debug_is_redacted() {
        let cfg = Config::from_toml_str("c.toml", MIN, &env(&[])).unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
    }

    /// Every key of every section, from the parser itself: an unknown key's
    /// error lists the known ones.
    fn known_keys(section: Option<&str>) -> Vec<String> {
        let probe = |text: String| {
            let value: toml::Value = toml::from_str(&text).unwrap();
            serde_path_to_error::deserialize::<_, Config>(value).unwrap_err().into_inner().to_string()
        };
        let mut err = probe(match section {
            None => "zz_unknown = 1\n".to_owned(),
            Some(s) => format!("[{s}]\nzz_unknown = 1\n"),
        });
        if let (Some(s), true) = (section, err.contains("expected a sequence")) {
            // A list of tables (`[[webhooks]]`): its tables' keys.
            err = probe(format!("[[{s}]]\nzz_unknown = 1\n"));
        }
        // serde: "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, …".
        let list = err.split("expected ").nth(1).unwrap_or_else(|| panic!("{err}"));
        let list = list.split('\n').next().unwrap().trim_start_matches("one of ");
        list.split(", ").flat_map(|k| k.split(" or ")).map(|k| k.trim_matches('`').to_owned()).collect()
    }

    /// `config/credproxy.toml` shows every key of every section, each a key
    /// the parser knows (uncommented, the file still parses), and the README's
    /// configuration table names each of them. A commented setting shows its
    /// default, unless it ends in `# example` (keys without a default).
    #[test]
    // Uncommented, the file names a KMS key: a build without `kms` refuses it.
    #[cfg(feature = "kms")]
    fn the_shipped_file_and_the_readme_document_every_key() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join(DEFAULT_CONFIG_PATH)).unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let mut documented: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        let (uncommented, _) = uncomment(&text);
        for line in text.lines() {
            let bare = line.trim_start_matches('#').trim_start();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                // `[limits.backoff]`: the key `backoff` of `[limits]`.
                if let Some((parent, key)) = name.split_once('.') {
                    documented.entry(parent.into()).or_default().push(key.into());
                }
                section = name.to_owned();
            } else if let Some(table) = bare.strip_prefix("[[").and_then(|b| b.split("]]").next()) {
                // `[[admin.tokens]]`: the key `tokens` of `[admin]`.
                if let Some((parent, key)) = table.split_once('.') {
                    documented.entry(parent.into()).or_default().push(key.into());
                }
                section = table.to_owned();
            }
            if let Some((key, _)) = bare.split_once(" = ") {
                if key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    documented.entry(section.clone()).or_default().push(key.to_owned());
                }
            }
        }
        let sections = known_keys(None);
        for s in &sections {
            let mut want = known_keys(Some(s));
            want.sort();
            let mut got = documented.get(s.as_str()).cloned().unwrap_or_default();
            got.sort();
            got.dedup();
            assert_eq!(got, want, "config/credproxy.toml [{s}]");
            for k in &want {
                assert!(readme.contains(&format!("`{s}.{k}`")), "README's configuration table lacks `{s}.{k}`");
            }
        }
        // Every commented setting, examples included, is a value the parser takes.
        let env = env(&[
            (ADMIN_TOKEN_ENV, "dev-admin-token-0123"),
            ("ADMIN_TOKEN_ORG_ACME", "org-acme-token-0123"),
            ("RUN_TOKEN_KEY", "c2lnbmluZy1rZXktb2YtYXQtbGVhc3QtMzItYnl0ZXMh"),
            ("CREDPROXY_WEBHOOK_SECRET", "whsec_c2VlZGVkLXdlYmhvb2stc2VjcmV0LTAxMjM0NTY3ODk="),
        ]);
        if let Err(e) = Config::from_toml_str("uncommented", &uncommented, &env) {
            panic!("the documented defaults do not parse: {e}");
        }
    }

    /// The shipped file with its documented defaults uncommented is
    /// `Config::default()` but for what has no default (the organization,
    /// the admin tokens): the file cannot drift from the `Default` impls.
    #[test]
    fn the_shipped_file_states_the_defaults() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join(DEFAULT_CONFIG_PATH)).unwrap();
        let (_, defaults) = uncomment(&text);
        let mut cfg = Config::from_toml_str("defaults", &defaults, &env(&[(ADMIN_TOKEN_ENV, "dev-admin-token-0123")]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.proxy.org_id.take().as_deref(), Some("org_local"));
        assert_eq!(cfg.admin.tokens.len(), 1);
        cfg.admin.tokens.clear();
        cfg.source.clear();
        let (file, defaults) = (format!("{cfg:#?}"), format!("{:#?}", Config::default()));
        for (i, (f, d)) in file.lines().zip(defaults.lines()).enumerate() {
            assert_eq!(f, d, "config/credproxy.toml states another default than the Default impls (line {i} of Debug)");
        }
        assert_eq!(file, defaults);
    }

    /// The file with every commented setting uncommented, and with only the
    /// defaults uncommented (not the `# example` lines).
    fn uncomment(text: &str) -> (String, String) {
        let (mut all, mut defaults) = (String::new(), String::new());
        for line in text.lines() {
            let bare = line.trim_start_matches('#').trim_start();
            let setting = line.starts_with("# ") && (bare.contains(" = ") || bare.starts_with("[["));
            let live = if setting { &line[2..] } else { line };
            all.push_str(live);
            all.push('\n');
            defaults.push_str(if line.ends_with("# example") { line } else { live });
            defaults.push('\n');
        }
        (all, defaults)
    }
}
