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

use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState, RunTokenIssuer};
use crate::audit::Audit;
use crate::config::{AuditSink, Config, ConfigError, KeyProviderKind};
use crate::connect::{self, ConnectSettings, PublicState};
use crate::creds::Connections;
use crate::crypto::{CryptoError, Envelope, KeyProvider, Keyring, LocalKeyProvider};
use crate::integrations::Integrations;
use crate::metrics::Metrics;
use crate::oauth2::TokenClient;
use crate::outbound::{BufferBudget, Outbound};
use crate::policy::ssrf::EgressPolicy;
use crate::proxy::{self, ClientLimits, ProxyState};
use crate::quota::Quotas;
use crate::runtoken::{self, RunTokenKeys};
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::store::StoreError;
use crate::tls::Interceptor;
use crate::upstream::pool::{Pool, PoolSettings};
use crate::upstream::{self, GuardedConnector};
use crate::webhooks::Webhooks;

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
    #[error("cannot start the proxy's runtime for thread {thread} (runtime.thread_per_core): {source}")]
    Runtime {
        thread: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The three listening sockets: the proxy (runners), the admin API
/// (private: the platform's backend, Prometheus) and the public listener
/// (end users' browsers: connect pages and the OAuth2 callback).
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    pub public: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source })
        };
        Ok(Self {
            proxy: bind("proxy.listen", config.proxy.listen).await?,
            admin: bind("admin.listen", config.admin.listen).await?,
            public: bind("public.listen", config.public.listen).await?,
        })
    }
}

/// `runtime.thread_per_core`: one single-threaded runtime per thread, each
/// with its own upstream pool. The proxy listener's acceptor hands each new
/// connection to the next thread in turn (the connection then lives there);
/// see the README's load benchmark for what this was measured against.
struct Cores(Vec<tokio::runtime::Runtime>);

impl Cores {
    /// `worker_threads` runtimes (0: one per CPU).
    fn new(config: &Config) -> Result<Self, StartError> {
        let n = match config.runtime.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        (0..n)
            .map(|thread| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| StartError::Runtime { thread, source })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Starts the threads; returns the acceptor, which hands connections
    /// round-robin to the threads (each serves them with its own upstream
    /// pool and drain signal, the rest of `state` shared), and the threads.
    /// A thread's runtime lives until [`CoreThreads::stop`], the last step of
    /// a shutdown: tasks it started for everyone (a store connection's
    /// driver, a pooled token-endpoint connection) serve the shutdown's own
    /// last writes. No thread could start: the acceptor serves on this
    /// runtime.
    fn serve(
        self,
        listener: TcpListener,
        state: &Arc<ProxyState>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        stop: watch::Receiver<bool>,
    ) -> (impl std::future::Future<Output = ()>, CoreThreads) {
        let (halt, halted) = watch::channel(false);
        let (mut hands, mut threads) = (Vec::new(), Vec::new());
        for (thread, rt) in self.0.into_iter().enumerate() {
            let (hand, handed) = tokio::sync::mpsc::unbounded_channel();
            let (state, tls, stop, mut halted) = (state.clone(), tls.clone(), stop.clone(), halted.clone());
            let spawned = std::thread::Builder::new().name(format!("proxy-core-{thread}")).spawn(move || {
                rt.block_on(async move {
                    let outbound = Arc::new(state.outbound.with_pool(state.outbound.pool.sibling()));
                    proxy::serve_handed(handed, Arc::new(state.for_core(outbound)), tls, stop).await;
                    let _ = halted.wait_for(|h| *h).await;
                });
            });
            match spawned {
                Ok(t) => {
                    hands.push((thread, hand));
                    threads.push(t);
                }
                Err(e) => tracing::error!(thread, error = %e, "cannot start a proxy thread"),
            }
        }
        let state = state.clone();
        let acceptor = async move {
            if hands.is_empty() {
                return proxy::serve(listener, state, tls, stop).await;
            }
            let mut turns = Turns { hands, next: 0 };
            proxy::accept(listener, &state, stop, |stream, peer| {
                let counted = state.tracker.token();
                match stream.into_std() {
                    Ok(stream) => {
                        if !turns.hand((stream, peer, counted)) {
                            tracing::error!(%peer, "no proxy thread is left; closing a new connection");
                        }
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "a proxy connection cannot be handed over"),
                }
            })
            .await;
        };
        (acceptor, CoreThreads { halt, threads })
    }
}

/// New connections to the proxy's threads in turn. A thread that has
/// ended (a panic: its receiver is gone) is skipped from then on, and the
/// connection goes to the next one instead of being dropped.
struct Turns<T> {
    /// (thread number, its hand).
    hands: Vec<(usize, tokio::sync::mpsc::UnboundedSender<T>)>,
    next: usize,
}

impl<T> Turns<T> {
    /// False: no thread is left to take `item`.
    fn hand(&mut self, mut item: T) -> bool {
        while !self.hands.is_empty() {
            self.next %= self.hands.len();
            match self.hands[self.next].1.send(item) {
                Ok(()) => {
                    self.next += 1;
                    return true;
                }
                Err(tokio::sync::mpsc::error::SendError(back)) => {
                    let (thread, _) = self.hands.remove(self.next);
                    tracing::error!(thread, "a proxy thread has ended; new connections go to the others");
                    item = back;
                }
            }
        }
        false
    }
}

/// The proxy's threads under `runtime.thread_per_core`.
struct CoreThreads {
    halt: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CoreThreads {
    /// Ends every thread's runtime (what still runs there is dropped) and
    /// waits for the threads.
    async fn stop(self) {
        let _ = self.halt.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// A running server. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub public_addr: SocketAddr,
    pub connections: Arc<Connections>,
    /// The TLS interception CA, when enabled (leaf mint/cache counters).
    pub interceptor: Option<Arc<Interceptor>>,
    pub metrics: Arc<Metrics>,
    /// Reloads the integrations (`SIGHUP`, as `POST /v1/integrations/reload`).
    admin: Arc<AdminState>,
    /// Stops the proxy listener and drains its connections.
    shutdown: watch::Sender<bool>,
    /// Stops the admin and public listeners (after the drain, so `/readyz`
    /// and `/metrics` answer throughout).
    admin_shutdown: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    /// Client connections and tunnels.
    tracker: TaskTracker,
    /// PostgreSQL change listener (cache invalidation across instances).
    listener: Option<tokio::task::JoinHandle<()>>,
    tasks: JoinSet<()>,
    /// Written out and closed last.
    audit: Audit,
    /// `runtime.thread_per_core`: the proxy's threads, stopped after that.
    core_threads: Option<CoreThreads>,
}

impl Running {
    /// Reads the integration files again and puts them in force; an
    /// invalid set leaves the one in force serving (the error names file,
    /// key and reason). Returns the ids now in force.
    pub fn reload_integrations(&self) -> Result<Vec<String>, ConfigError> {
        self.admin.reload_integrations()
    }

    /// [`Running::reload_integrations`], for a task that outlives this
    /// handle's borrow (the binary's `SIGHUP` handler).
    pub fn reloader(&self) -> impl Fn() -> Result<Vec<String>, ConfigError> + Send + Sync + 'static {
        let admin = self.admin.clone();
        move || admin.reload_integrations()
    }

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
        self.connections.flush_uses().await;
        self.audit.close();
        if let Some(threads) = self.core_threads.take() {
            threads.stop().await;
        }
        abandoned
    }

    /// Client connections and tunnels currently open.
    pub fn open_connections(&self) -> usize {
        self.tracker.len()
    }

    /// The audit trail (e.g. to flush it).
    pub fn audit(&self) -> &Audit {
        &self.audit
    }
}

/// The configured key provider, with the decrypt-only keys a rotation moves
/// away from (`crypto.previous_key_files`; KMS when `provider = "local"` and
/// `kms_key_id` is set).
pub async fn key_provider(config: &Config) -> Result<Arc<dyn KeyProvider>, StartError> {
    let c = &config.crypto;
    #[cfg(feature = "kms")]
    let kms = || async {
        let key = c.kms_key_id.as_deref().unwrap_or_default();
        let (ttl, timeout) = (c.data_key_cache_ttl, c.kms_timeout);
        let kms = crate::crypto::kms::KmsKeyProvider::new(key, &c.kms_region, c.kms_endpoint.as_deref(), ttl, timeout);
        Ok::<_, StartError>(Arc::new(kms.await) as Arc<dyn KeyProvider>)
    };
    // Config validation refuses KMS in a build without it; this is that error again.
    #[cfg(not(feature = "kms"))]
    let kms = || async {
        Err::<Arc<dyn KeyProvider>, StartError>(
            config.error("crypto.provider", "this build has no AWS KMS key provider").into(),
        )
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
                previous.push(kms().await?);
            }
            Arc::new(LocalKeyProvider::open_or_create(&c.key_file)?)
        }
        KeyProviderKind::AwsKms => kms().await?,
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
    extra_roots: Vec<CertificateDer<'static>>,
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
        let i = Interceptor::load(&t.ca_cert, &t.ca_key, t.leaf_validity).map_err(|e| {
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
    run_token_keys(config, false)?;
    if config.audit.sink == AuditSink::File {
        let dir = config.audit.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(config.error("audit.path", format!("directory {} does not exist", dir.display())));
        }
    }
    Ok(Prepared { extra_roots, interceptor, proxy_tls })
}

/// Opens the store and key provider, builds the pipeline state and starts
/// serving on `listeners`. Everything the configuration names is checked
/// ([`prepare`]) before the store or a key is created.
pub async fn start(listeners: Listeners, config: &Config, integrations: Integrations) -> Result<Running, StartError> {
    let prepared = prepare(config)?;
    let bound = |what, addr, l: &TcpListener| l.local_addr().map_err(|source| StartError::Bind { what, addr, source });
    let proxy_addr = bound("proxy.listen", config.proxy.listen, &listeners.proxy)?;
    let admin_addr = bound("admin.listen", config.admin.listen, &listeners.admin)?;
    let public_addr = bound("public.listen", config.public.listen, &listeners.public)?;
    let cores = config.thread_per_core().then(|| Cores::new(config)).transpose()?;
    let app = App::build(config, integrations, prepared, public_addr).await?;
    Ok(app.serve(listeners, cores, config, Addrs { proxy: proxy_addr, admin: admin_addr, public: public_addr }))
}

/// Where the three listeners are bound.
struct Addrs {
    proxy: SocketAddr,
    admin: SocketAddr,
    public: SocketAddr,
}

/// How often queued connection uses are written (`last_used_at`).
const USES_WRITTEN_EVERY: Duration = Duration::from_secs(10);

/// What the two listeners serve, built from the configuration.
struct App {
    connections: Arc<Connections>,
    metrics: Arc<Metrics>,
    interceptor: Option<Arc<Interceptor>>,
    proxy: Arc<ProxyState>,
    proxy_tls: Option<tokio_rustls::TlsAcceptor>,
    admin: Arc<AdminState>,
    public: Arc<PublicState>,
    /// Delivers events to `[[webhooks]]` (none configured: `None`).
    webhooks: Option<Arc<Webhooks>>,
    audit: Audit,
    /// Set when the drain starts (`/readyz` turns 503).
    draining: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
}

impl App {
    /// Opens the store and the key provider and builds the pipeline: the
    /// credential cache over them, the upstream pool, the proxy's and the
    /// admin API's state. Serves nothing yet.
    async fn build(
        config: &Config,
        integrations: Integrations,
        prepared: Prepared,
        public_addr: SocketAddr,
    ) -> Result<Self, StartError> {
        let Prepared { extra_roots, interceptor, proxy_tls } = prepared;
        let policy = Arc::new(EgressPolicy::new(config.egress.allow_cidrs.clone()));
        let connections = Arc::new(connections(config, integrations, &policy, &extra_roots).await?);
        let metrics = Arc::new(Metrics::new(connections.integrations().iter().map(|i| i.id.as_str())));
        let connector = GuardedConnector::new(policy.clone(), config.upstream.connect_timeout);
        let outbound = Arc::new(outbound(config, &connections, connector.clone(), &extra_roots, &metrics));
        let audit = Audit::open(&config.audit, metrics.clone())
            .map_err(|e| config.error("audit.path", format!("cannot open {}: {e}", config.audit.path.display())))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let quotas = Arc::new(Quotas::new(
            &config.limits,
            &connections.integrations(),
            config.store.is_postgres().then(|| connections.store().clone()),
        ));
        let p = &config.proxy;
        let proxy = Arc::new(ProxyState {
            mode: p.mode,
            org_id: p.org_id.clone().unwrap_or_default(),
            require_run_token: p.require_run_token,
            run_tokens: Arc::new(run_token_keys(config, true)?.expect("created")),
            connections: connections.clone(),
            outbound: outbound.clone(),
            quotas: quotas.clone(),
            allow_passthrough: config.egress.allow_passthrough,
            connector,
            interceptor: interceptor.clone(),
            passthrough_hosts: config.tls_intercept.passthrough_hosts.clone(),
            limits: ClientLimits {
                header_read_timeout: p.header_read_timeout,
                max_header_bytes: p.max_header_bytes,
                max_connections: p.max_connections,
                body_idle_timeout: p.body_idle_timeout,
                send_timeout: p.send_timeout,
                tunnel_idle_timeout: p.tunnel_idle_timeout,
            },
            audit: audit.clone(),
            tracker: TaskTracker::new(),
            shutdown: shutdown_rx,
            drain: proxy::Drain::default(),
        });
        let draining = Arc::new(AtomicBool::new(false));
        let settings = Arc::new(ConnectSettings::new(&config.public, public_addr));
        let public = Arc::new(PublicState::new(connections.clone(), outbound.clone(), settings.clone(), audit.clone()));
        let admin = Arc::new(
            AdminState::new(
                connections.clone(),
                outbound,
                &config.admin.tokens,
                settings,
                interceptor.clone(),
                draining.clone(),
                audit.clone(),
            )
            .with_run_tokens(RunTokenIssuer {
                keys: proxy.run_tokens.clone(),
                default_ttl: config.run_tokens.default_ttl,
                max_ttl: config.run_tokens.max_ttl,
            })
            .with_quotas(quotas)
            .with_integrations_dir(config.integrations.dir.clone()),
        );
        let webhooks = Webhooks::new(
            &config.events,
            &config.webhooks,
            connections.store().clone(),
            policy.clone(),
            config.upstream.connect_timeout,
            &extra_roots,
            metrics.clone(),
        )
        .map(Arc::new);
        Ok(Self {
            connections,
            metrics,
            interceptor,
            proxy,
            proxy_tls,
            admin,
            public,
            webhooks,
            audit,
            draining,
            shutdown,
        })
    }

    /// Serves the proxy and the admin API on `listeners`, and (PostgreSQL)
    /// follows other instances' changes; logs the start-up line.
    fn serve(self, listeners: Listeners, cores: Option<Cores>, config: &Config, addrs: Addrs) -> Running {
        // Every instance evicts what another one changed (PostgreSQL LISTEN/NOTIFY).
        #[cfg(feature = "postgres")]
        let listener = config.store.is_postgres().then(|| {
            use crate::store::Change;
            let (c, quotas) = (self.connections.clone(), self.proxy.quotas.clone());
            let on_change: Arc<dyn Fn(Change) + Send + Sync> = Arc::new(move |change| match change {
                Change::Cooldown(payload) => quotas.learn_remote(&payload),
                change => {
                    let c = c.clone();
                    tokio::spawn(async move { c.apply_change(change).await });
                }
            });
            crate::store::postgres::spawn_listener(config.store.url.clone(), on_change)
        });
        #[cfg(not(feature = "postgres"))]
        let listener: Option<tokio::task::JoinHandle<()>> = None;
        let mut tasks = JoinSet::new();
        // `last_used_at`: queued uses are written every few seconds (and at shutdown).
        let (c, mut stop) = (self.connections.clone(), self.proxy.shutdown.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(USES_WRITTEN_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => c.flush_uses().await,
                    _ = stop.changed() => break,
                }
            }
        });
        // The idle sweeper (when an auth method sets idle_refresh_after_days).
        let sweeps = self
            .connections
            .integrations()
            .iter()
            .any(|i| i.auth_methods.iter().any(|m| m.oauth2().is_some_and(|o| o.idle_refresh_after.is_some())));
        if sweeps {
            let (c, mut stop, every) =
                (self.connections.clone(), self.proxy.shutdown.clone(), config.oauth2.idle_sweep_interval);
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => { c.sweep_idle().await; }
                        _ = stop.changed() => break,
                    }
                }
            });
        }
        if let Some(w) = self.webhooks.clone() {
            tasks.spawn(w.run(self.proxy.shutdown.clone()));
        }
        let proxy_tls_on = self.proxy_tls.is_some();
        let tracker = self.proxy.tracker.clone();
        let stop = self.proxy.shutdown.clone();
        let core_threads = match cores {
            None => {
                tasks.spawn(proxy::serve(listeners.proxy, self.proxy, self.proxy_tls, stop));
                None
            }
            Some(cores) => {
                let (acceptor, threads) = cores.serve(listeners.proxy, &self.proxy, self.proxy_tls, stop);
                tasks.spawn(acceptor);
                Some(threads)
            }
        };
        let (admin_shutdown, admin_rx) = watch::channel(false);
        let admin = self.admin.clone();
        // integrations.watch: reload when the directory changes.
        if config.integrations.watch {
            let (admin, dir, mut stop) = (admin.clone(), config.integrations.dir.clone(), admin_rx.clone());
            let every = Duration::from_millis(config.integrations.watch_interval_ms);
            tasks.spawn(async move {
                let mut seen = dir_fingerprint(&dir);
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => break,
                    }
                    let now = dir_fingerprint(&dir);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match admin.reload_integrations() {
                        Ok(ids) => tracing::info!(integrations = %ids.join(","), "integrations directory changed: reloaded"),
                        Err(e) => tracing::warn!(error = %e, "integrations directory changed but is invalid; the set in force stays"),
                    }
                }
            });
        }
        let app = admin::router(self.admin);
        let mut stop = admin_rx.clone();
        let admin_listener = listeners.admin;
        tasks.spawn(async move {
            let served = axum::serve(admin_listener, app).with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            });
            if let Err(e) = served.await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
        // The public listener: the peer address counts failed session lookups.
        let app = connect::router(self.public).into_make_service_with_connect_info::<SocketAddr>();
        let mut stop = admin_rx;
        let public_listener = listeners.public;
        tasks.spawn(async move {
            let served = axum::serve(public_listener, app).with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            });
            if let Err(e) = served.await {
                tracing::error!(error = %e, "public server failed");
            }
        });
        let integrations = self.connections.integrations();
        let loaded: Vec<&str> = integrations.iter().map(|i| i.id.as_str()).collect();
        tracing::info!(
            proxy = %addrs.proxy,
            admin = %addrs.admin,
            public = %addrs.public,
            org = %config.proxy.org_id.as_deref().unwrap_or("-"),
            interception = %if self.interceptor.is_some() { "on" } else { "off" },
            proxy_tls = %if proxy_tls_on { "on" } else { "off" },
            store = %if config.store.is_postgres() { "postgres" } else { "sqlite" },
            integrations = %loaded.join(","),
            "credproxy listening"
        );
        Running {
            proxy_addr: addrs.proxy,
            admin_addr: addrs.admin,
            public_addr: addrs.public,
            connections: self.connections,
            interceptor: self.interceptor,
            metrics: self.metrics,
            admin,
            shutdown: self.shutdown,
            admin_shutdown,
            draining: self.draining,
            tracker,
            listener,
            tasks,
            audit: self.audit,
            core_threads,
        }
    }
}

/// The credential cache over the store and the key provider, with its
/// OAuth2 token client (own timeout, same SSRF rules as proxied traffic).
async fn connections(
    config: &Config,
    integrations: Integrations,
    policy: &Arc<EgressPolicy>,
    extra_roots: &[CertificateDer<'static>],
) -> Result<Connections, StartError> {
    let store = open_store(config).await?;
    let keys = key_provider(config).await?;
    let token_client =
        TokenClient::new(policy.clone(), config.upstream.connect_timeout, config.oauth2.token_timeout, extra_roots);
    let c = Connections::new(
        store,
        Envelope::new(keys),
        Arc::new(integrations),
        config.cache.max_entries,
        config.cache.ttl,
        token_client,
    );
    Ok(c.with_authorization_ttl(config.oauth2.state_ttl).with_refresh_lock_wait(config.oauth2.refresh_lock_wait))
}

/// The outbound pipeline: the upstream pool and the request-body limits.
fn outbound(
    config: &Config,
    connections: &Arc<Connections>,
    connector: GuardedConnector,
    extra_roots: &[CertificateDer<'static>],
    metrics: &Arc<Metrics>,
) -> Outbound {
    let u = &config.upstream;
    let pool = Pool::new(
        connector,
        upstream::tls_config(extra_roots),
        PoolSettings {
            tls_handshake_timeout: u.tls_handshake_timeout,
            body_idle_timeout: u.response_body_idle_timeout,
            idle_timeout: u.pool_idle_timeout,
            max_idle_per_host: u.pool_max_idle_per_host,
        },
    );
    Outbound {
        connections: connections.clone(),
        pool,
        response_header_timeout: u.response_header_timeout,
        max_buffered_body: config.proxy.max_buffered_body,
        buffered_body_timeout: config.proxy.buffered_body_timeout,
        buffer_budget: Arc::new(BufferBudget::new(config.proxy.max_buffered_total)),
        metrics: metrics.clone(),
    }
}

/// The run-token keys: the signing key (a value, or a file created 0600
/// when `create`) and the verification-only ones, which must exist.
/// `None`: not `create`, and the signing key file does not exist yet (the
/// rest was checked).
pub fn run_token_keys(config: &Config, create: bool) -> Result<Option<RunTokenKeys>, ConfigError> {
    let r = &config.run_tokens;
    let mut verifying = Vec::new();
    for (i, path) in r.verification_key_files.iter().enumerate() {
        let key = runtoken::key_file(path, false)
            .map_err(|e| config.error(format!("run_tokens.verification_key_files[{i}]"), e))?;
        verifying.push(key);
    }
    for (i, v) in r.verification_keys.iter().enumerate() {
        verifying
            .push(runtoken::decode_key(v).map_err(|e| config.error(format!("run_tokens.verification_keys[{i}]"), e))?);
    }
    let signing = match &r.signing_key {
        Some(v) => runtoken::decode_key(v).map_err(|e| config.error("run_tokens.signing_key", e))?,
        None => {
            let path = r.signing_key_path(&config.crypto);
            if !create && !path.exists() {
                return Ok(None);
            }
            runtoken::key_file(&path, create).map_err(|e| config.error("run_tokens.signing_key_file", e))?
        }
    };
    Ok(Some(RunTokenKeys::new(&signing, &verifying)))
}

/// The proxy listener's own TLS (`proxy.tls_cert` / `proxy.tls_key`).
fn proxy_tls_acceptor(
    config: &Config,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let chain = upstream::load_pem_certs(cert).map_err(|r| config.error("proxy.tls_cert", r))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| config.error("proxy.tls_key", format!("{}: {e}", key.display())))?;
    let mut server = crate::tls::server_config(chain.into_iter().map(CertificateDer::into_owned).collect(), key)
        .map_err(|e| config.error("proxy.tls_cert", format!("certificate and key do not match: {e}")))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// Opens the configured store and applies its migrations.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    #[cfg(feature = "postgres")]
    if config.store.is_postgres() {
        let s = &config.store;
        return Ok(Arc::new(crate::store::postgres::PgStore::open(&s.url, s.pool_size, s.timeout).await?));
    }
    let path =
        config.store.sqlite_path().ok_or_else(|| config.error("store.url", "must be sqlite://PATH or postgres://…"))?;
    Ok(Arc::new(SqliteStore::open(path)?))
}

/// What a change to an integrations directory changes: each `*.toml`'s
/// name, size and modification time (through symlinks, so a ConfigMap's
/// `..data` swap shows). Unreadable: empty (a reload then says why).
fn dir_fingerprint(dir: &std::path::Path) -> Vec<(std::ffi::OsString, u64, Option<std::time::SystemTime>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<_> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| {
            let meta = std::fs::metadata(e.path()).ok();
            (e.file_name(), meta.as_ref().map_or(0, |m| m.len()), meta.and_then(|m| m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::Turns;

    /// Connections go round the threads; a thread that ended is skipped
    /// (the connection goes to the next), and with none left, `hand` says so.
    #[test]
    fn turns_skip_an_ended_thread() {
        let (mut txs, mut rxs) = (Vec::new(), Vec::new());
        for thread in 0..3 {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
            txs.push((thread, tx));
            rxs.push(Some(rx));
        }
        let mut turns = Turns { hands: txs, next: 0 };
        let got = |rxs: &mut Vec<Option<tokio::sync::mpsc::UnboundedReceiver<u32>>>| {
            rxs.iter_mut()
                .map(|r| r.as_mut().map(|r| std::iter::from_fn(|| r.try_recv().ok()).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
        };
        for i in 0..6 {
            assert!(turns.hand(i));
        }
        assert_eq!(got(&mut rxs), [Some(vec![0, 3]), Some(vec![1, 4]), Some(vec![2, 5])]);
        rxs[1] = None;
        for i in 10..14 {
            assert!(turns.hand(i), "thread 1 ended: the others take {i}");
        }
        assert_eq!(got(&mut rxs), [Some(vec![10, 12]), None, Some(vec![11, 13])]);
        assert_eq!(turns.hands.iter().map(|(t, _)| *t).collect::<Vec<_>>(), [0, 2]);
        rxs = vec![None, None, None];
        assert!(!turns.hand(20), "no thread left");
        assert!(turns.hands.is_empty());
        drop(rxs);
    }
}
