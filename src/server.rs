//! Builds the shared state from configuration, binds the listeners and runs
//! the proxy and admin servers until shutdown.
//!
//! `run`-style entry used by the binary and, with listeners on `127.0.0.1:0`,
//! by the tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigError, KeyProviderKind};
use crate::creds::Connections;
use crate::crypto::kms::KmsKeyProvider;
use crate::crypto::{CryptoError, Envelope, KeyProvider, Keyring, LocalKeyProvider};
use crate::integrations::Integrations;
use crate::metrics::Metrics;
use crate::oauth2::TokenClient;
use crate::outbound::{BufferBudget, Outbound};
use crate::policy::ssrf::EgressPolicy;
use crate::proxy::{self, ClientLimits, ProxyState};
use crate::store::postgres::{spawn_listener, Change, PgStore};
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::store::StoreError;
use crate::tls::Interceptor;
use crate::upstream::pool::{Pool, PoolSettings};
use crate::upstream::{self, GuardedConnector};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The two listening sockets.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source })
        };
        Ok(Self {
            proxy: bind("proxy.listen", config.proxy.listen).await?,
            admin: bind("admin.listen", config.admin.listen).await?,
        })
    }
}

/// A running server. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub connections: Arc<Connections>,
    /// The TLS interception CA, when enabled (leaf mint/cache counters).
    pub interceptor: Option<Arc<Interceptor>>,
    pub metrics: Arc<Metrics>,
    /// Stops the proxy listener and drains its connections.
    shutdown: watch::Sender<bool>,
    /// Stops the admin listener (after the drain, so `/readyz` and
    /// `/metrics` answer throughout).
    admin_shutdown: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    /// Client connections and tunnels.
    tracker: TaskTracker,
    /// PostgreSQL change listener (cache invalidation across instances).
    listener: Option<tokio::task::JoinHandle<()>>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Graceful shutdown: `/readyz` turns 503, the proxy listener closes (new
    /// connections are refused), open connections finish their in-flight
    /// request and close, tunnels run to their end; after `grace` whatever is
    /// still open is abandoned. Returns how many connections were abandoned.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        self.tracker.close();
        let abandoned = match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let open = self.tracker.len();
                tracing::warn!(open, grace_secs = grace.as_secs(), "shutdown grace period over; closing what is left");
                open
            }
        };
        let _ = self.admin_shutdown.send(true);
        if let Some(l) = self.listener.take() {
            l.abort();
        }
        while self.tasks.join_next().await.is_some() {}
        abandoned
    }

    /// Client connections and tunnels currently open.
    pub fn open_connections(&self) -> usize {
        self.tracker.len()
    }
}

/// The configured key provider, with the decrypt-only keys a rotation moves
/// away from (`crypto.previous_key_files`; KMS when `provider = "local"` and
/// `kms_key_id` is set).
pub async fn key_provider(config: &Config) -> Result<Arc<dyn KeyProvider>, StartError> {
    let c = &config.crypto;
    let kms = || async {
        let ttl = Duration::from_secs(c.data_key_cache_ttl_secs);
        let key = c.kms_key_id.as_deref().unwrap_or_default();
        let timeout = Duration::from_millis(c.kms_timeout_ms);
        Arc::new(KmsKeyProvider::new(key, &c.kms_region, c.kms_endpoint.as_deref(), ttl, timeout).await)
            as Arc<dyn KeyProvider>
    };
    let mut previous: Vec<Arc<dyn KeyProvider>> = Vec::new();
    for (i, path) in c.previous_key_files.iter().enumerate() {
        let key = LocalKeyProvider::open(path)
            .map_err(|e| config.error(format!("crypto.previous_key_files[{i}]"), e.to_string()))?;
        previous.push(Arc::new(key));
    }
    let current: Arc<dyn KeyProvider> = match c.provider {
        KeyProviderKind::Local => {
            if c.kms_key_id.is_some() {
                previous.push(kms().await);
            }
            Arc::new(LocalKeyProvider::open_or_create(&c.key_file)?)
        }
        KeyProviderKind::AwsKms => kms().await,
    };
    if previous.is_empty() {
        return Ok(current);
    }
    Ok(Arc::new(Keyring::new(current, previous)))
}

/// What a configuration names that must be read and checked before the
/// server creates anything (database, master key): the upstream CA roots,
/// the interception CA, the proxy listener's certificate, earlier and
/// current key files. `check-config` and `serve` run the same [`prepare`].
pub struct Prepared {
    extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    interceptor: Option<Arc<Interceptor>>,
    proxy_tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Reads and checks every file the configuration names, creating nothing.
/// Errors name the configuration file and the key.
pub fn prepare(config: &Config) -> Result<Prepared, ConfigError> {
    let mut extra_roots = Vec::new();
    for (i, path) in config.upstream.extra_ca_certs.iter().enumerate() {
        let certs = upstream::load_pem_certs(path)
            .map_err(|reason| config.error(format!("upstream.extra_ca_certs[{i}]"), reason))?;
        extra_roots.extend(certs);
    }
    let interceptor = if config.tls_intercept.enabled {
        let t = &config.tls_intercept;
        let leaf_validity = Duration::from_secs(t.leaf_validity_hours * 3600);
        let i = Interceptor::load(&t.ca_cert, &t.ca_key, leaf_validity).map_err(|e| {
            let key = match &e {
                crate::tls::TlsError::File { path, .. } if Path::new(path) == t.ca_key => "tls_intercept.ca_key",
                _ => "tls_intercept.ca_cert",
            };
            config.error(key, format!("{e} (create the CA with `credproxy ca init`)"))
        })?;
        Some(Arc::new(i))
    } else {
        None
    };
    let proxy_tls = match (&config.proxy.tls_cert, &config.proxy.tls_key) {
        (Some(cert), Some(key)) => Some(proxy_tls_acceptor(config, cert, key)?),
        _ => None,
    };
    for (i, path) in config.crypto.previous_key_files.iter().enumerate() {
        LocalKeyProvider::open(path)
            .map_err(|e| config.error(format!("crypto.previous_key_files[{i}]"), e.to_string()))?;
    }
    // The current key file is created on first start; one that exists must be usable.
    if config.crypto.provider == KeyProviderKind::Local && config.crypto.key_file.exists() {
        LocalKeyProvider::open(&config.crypto.key_file).map_err(|e| config.error("crypto.key_file", e.to_string()))?;
    }
    Ok(Prepared { extra_roots, interceptor, proxy_tls })
}

/// Opens the store and key provider, builds the pipeline state and starts
/// serving on `listeners`. Everything the configuration names is checked
/// ([`prepare`]) before the store or a key is created.
pub async fn start(listeners: Listeners, config: &Config, integrations: Integrations) -> Result<Running, StartError> {
    let Prepared { extra_roots, interceptor, proxy_tls } = prepare(config)?;
    let store = open_store(config).await?;
    let keys = key_provider(config).await?;
    let policy = Arc::new(EgressPolicy::new(config.egress.allow_cidrs.clone()));
    // Token and revocation calls: explicit client, same SSRF rules, own timeout.
    let token_client = TokenClient::new(
        policy.clone(),
        Duration::from_millis(config.upstream.connect_timeout_ms),
        Duration::from_millis(config.oauth2.token_timeout_ms),
        &extra_roots,
    );
    let connections = Arc::new(
        Connections::new(
            store,
            Envelope::new(keys),
            Arc::new(integrations),
            config.cache.max_entries,
            Duration::from_secs(config.cache.ttl_secs),
            token_client,
        )
        .with_authorization_ttl(Duration::from_secs(config.oauth2.state_ttl_secs))
        .with_refresh_lock_wait(Duration::from_millis(config.oauth2.refresh_lock_wait_ms)),
    );
    let connect_timeout = Duration::from_millis(config.upstream.connect_timeout_ms);
    let pool = Pool::new(
        GuardedConnector::new(policy.clone(), connect_timeout),
        upstream::tls_config(&extra_roots),
        PoolSettings {
            tls_handshake_timeout: Duration::from_millis(config.upstream.tls_handshake_timeout_ms),
            body_idle_timeout: Duration::from_millis(config.upstream.response_body_idle_timeout_ms),
            idle_timeout: Duration::from_secs(config.upstream.pool_idle_timeout_secs),
            max_idle_per_host: config.upstream.pool_max_idle_per_host,
        },
    );
    let metrics = Arc::new(Metrics::new(connections.integrations().iter().map(|i| i.id.as_str())));
    let outbound = Arc::new(Outbound {
        connections: connections.clone(),
        pool,
        response_header_timeout: Duration::from_millis(config.upstream.response_header_timeout_ms),
        max_buffered_body: config.proxy.max_buffered_body,
        buffered_body_timeout: Duration::from_millis(config.proxy.buffered_body_timeout_ms),
        buffer_budget: Arc::new(BufferBudget::new(config.proxy.max_buffered_total)),
        metrics: metrics.clone(),
    });
    let (tx, rx) = watch::channel(false);
    let (admin_tx, mut admin_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let draining = Arc::new(AtomicBool::new(false));
    let proxy_state = Arc::new(ProxyState {
        org_id: config.proxy.org_id.clone().unwrap_or_default(),
        connections: connections.clone(),
        outbound: outbound.clone(),
        allow_passthrough: config.egress.allow_passthrough,
        connector: GuardedConnector::new(policy, connect_timeout),
        interceptor: interceptor.clone(),
        passthrough_hosts: config.tls_intercept.passthrough_hosts.clone(),
        limits: ClientLimits {
            header_read_timeout: Duration::from_millis(config.proxy.header_read_timeout_ms),
            max_header_bytes: config.proxy.max_header_bytes,
            max_connections: config.proxy.max_connections,
            body_idle_timeout: Duration::from_millis(config.proxy.body_idle_timeout_ms),
            send_timeout: Duration::from_millis(config.proxy.send_timeout_ms),
            tunnel_idle_timeout: Duration::from_secs(config.proxy.tunnel_idle_timeout_secs),
        },
        tracker: tracker.clone(),
        shutdown: rx.clone(),
        drain: proxy::Drain::default(),
    });

    let proxy_addr = listeners.proxy.local_addr().map_err(|source| StartError::Bind {
        what: "proxy.listen",
        addr: config.proxy.listen,
        source,
    })?;
    let admin_addr = listeners.admin.local_addr().map_err(|source| StartError::Bind {
        what: "admin.listen",
        addr: config.admin.listen,
        source,
    })?;
    let public_url = config.admin.public_url.clone().unwrap_or_else(|| format!("http://{admin_addr}"));
    let admin_state = Arc::new(AdminState::new(
        connections.clone(),
        outbound,
        &config.admin.tokens,
        &public_url,
        interceptor.clone(),
        draining.clone(),
    ));
    // Every instance evicts what another one changed (PostgreSQL LISTEN/NOTIFY).
    let listener = config.store.is_postgres().then(|| {
        let c = connections.clone();
        let on_change: Arc<dyn Fn(Change) + Send + Sync> = Arc::new(move |change| {
            let c = c.clone();
            tokio::spawn(async move { c.apply_change(change).await });
        });
        spawn_listener(config.store.url.clone(), on_change)
    });
    let mut tasks = JoinSet::new();
    let proxy_tls_on = proxy_tls.is_some();
    tasks.spawn(proxy::serve(listeners.proxy, proxy_state, proxy_tls, rx));
    let app = admin::router(admin_state);
    let admin_listener = listeners.admin;
    tasks.spawn(async move {
        let served = axum::serve(admin_listener, app).with_graceful_shutdown(async move {
            let _ = admin_rx.changed().await;
        });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    let loaded: Vec<&str> = connections.integrations().iter().map(|i| i.id.as_str()).collect();
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        org = %config.proxy.org_id.as_deref().unwrap_or("-"),
        interception = %if interceptor.is_some() { "on" } else { "off" },
        proxy_tls = %if proxy_tls_on { "on" } else { "off" },
        store = %if config.store.is_postgres() { "postgres" } else { "sqlite" },
        integrations = %loaded.join(","),
        "credproxy listening"
    );
    Ok(Running {
        proxy_addr,
        admin_addr,
        connections,
        interceptor,
        metrics,
        shutdown: tx,
        admin_shutdown: admin_tx,
        draining,
        tracker,
        listener,
        tasks,
    })
}

/// The proxy listener's own TLS (`proxy.tls_cert` / `proxy.tls_key`).
fn proxy_tls_acceptor(
    config: &Config,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = upstream::load_pem_certs(cert).map_err(|r| config.error("proxy.tls_cert", r))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| config.error("proxy.tls_key", format!("{}: {e}", key.display())))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| config.error("proxy.tls_cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain.into_iter().map(CertificateDer::into_owned).collect(), key)
        .map_err(|e| config.error("proxy.tls_cert", format!("certificate and key do not match: {e}")))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// Opens the configured store and applies its migrations.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    if config.store.is_postgres() {
        let timeout = Duration::from_millis(config.store.timeout_ms);
        return Ok(Arc::new(PgStore::open_with_timeout(&config.store.url, config.store.pool_size, timeout).await?));
    }
    let path =
        config.store.sqlite_path().ok_or_else(|| config.error("store.url", "must be sqlite://PATH or postgres://…"))?;
    Ok(Arc::new(SqliteStore::open(path)?))
}
