//! The `credproxy` command line: `serve`, `check-config`, and `connections`
//! subcommands that drive the admin API. The binary's edge: it may print and
//! use `anyhow`-style reporting; library code below it may not.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "the CLI talks to a terminal")]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use http::Method;
use serde_json::{json, Value};

use crate::admin_client::AdminClient;
use crate::config::{self, Config, ConfigError};
use crate::integrations::Integrations;
use crate::secret::SecretValue;
use crate::server::{self, Listeners, StartError};

/// Exit status for configuration errors (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "credproxy", version, about = "Credential-injecting forward proxy for integration workflows")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, admin and public (connect pages) listeners.
    Serve {
        /// Configuration file (CREDPROXY_<SECTION>__<KEY> variables override its keys).
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Apply pending store migrations (also done on every start), then exit.
    Migrate {
        /// Configuration file naming the store.
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Check the configuration, the integrations and every file they name
    /// (CA files, key files) exactly as `serve` does, then exit; creates nothing.
    CheckConfig {
        /// Configuration file to check.
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Probe a running instance (container HEALTHCHECK, no curl needed):
    /// exit 0 if `GET <url>` answers 200 within 2 s.
    Health {
        /// URL to probe.
        #[arg(long, default_value = "http://127.0.0.1:8081/healthz")]
        url: String,
    },
    /// Data-key wrapping keys: rotation and where records stand.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage the TLS interception CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Manage connections through the admin API.
    Connections {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: ConnCommand,
    },
    /// Show the integrations a running instance loaded, through the admin API.
    Integrations {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: IntegrationsCommand,
    },
    /// Run tokens (shared mode: what a workflow run presents to the proxy),
    /// through the admin API.
    RunTokens {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: RunTokensCommand,
    },
}

#[derive(Subcommand)]
enum RunTokensCommand {
    /// Mint a run token; prints {token, expires_at, id, key_id}. The run
    /// then uses HTTP_PROXY=http://[CONNECTION_ID]:TOKEN@PROXY_HOST:PORT.
    Mint {
        /// The organization the run acts for.
        #[arg(long = "org")]
        org_id: String,
        /// The user the run acts for.
        #[arg(long = "user")]
        user_id: Option<String>,
        /// Only this connection (repeat for more).
        #[arg(long = "connection")]
        connections: Vec<String>,
        /// Only connections of this integration (repeat for more).
        #[arg(long = "integration")]
        integrations: Vec<String>,
        /// Lifetime in seconds (default run_tokens.default_ttl_secs).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
}

#[derive(Subcommand)]
enum IntegrationsCommand {
    /// List every integration: id, name, allowed hosts, auth methods.
    List,
    /// Show one integration.
    Show {
        /// Integration id (e.g. github).
        id: String,
    },
    /// Write an integration file from an OpenAPI 3.0/3.1 document (YAML or
    /// JSON), locally (no admin API). The report (JSON, on stderr) lists
    /// what was imported and everything that was not, and why. Exit 0 with
    /// a file, 1 when the document yields none, 65 when it cannot be read.
    Import {
        /// The OpenAPI document.
        spec: PathBuf,
        /// Integration id (default: from info.title).
        #[arg(long)]
        id: Option<String>,
        /// Directory to write <id>.toml into (default: print the file).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where relative server URLs (or a document without servers) point.
        #[arg(long)]
        base_url: Option<String>,
        /// Fetch openIdConnect discovery documents to configure those schemes.
        #[arg(long)]
        fetch_discovery: bool,
        /// Leave [test] out.
        #[arg(long)]
        no_test: bool,
        /// Replace an existing <id>.toml in --out.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA key (mode 0600) and certificate for TLS interception.
    Init {
        /// Directory for credproxy-ca.pem and credproxy-ca.key (the key is created 0600).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Days the CA certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-wrap every record's data key under the configured provider and key
    /// (crypto.provider, crypto.kms_key_id / crypto.key_file), reading old
    /// records with crypto.previous_key_files. Safe while instances serve;
    /// resumes where an interrupted run stopped. Exit 0 only when every
    /// record is under the current key.
    Rotate {
        /// Configuration file naming the store and the current key.
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Records per batch.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
        /// Milliseconds to pause between batches (spreads store and KMS load).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// Count records per table and wrapping key. Exit 0 when all are under
    /// the current key, 1 otherwise.
    Status {
        /// Configuration file naming the store and the current key.
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// Admin API base URL: http://HOST:PORT, or https:// behind a TLS-terminating ingress.
    #[arg(long, env = "CREDPROXY_ADMIN_URL", default_value = "http://127.0.0.1:8081", global = true)]
    admin_url: String,
    /// Admin bearer token (prefer the environment variable: arguments show in `ps`).
    #[arg(long, env = "CREDPROXY_ADMIN_TOKEN", hide_env_values = true, global = true)]
    admin_token: Option<String>,
    /// PEM file of a CA to trust for an https:// admin URL, besides the public roots.
    #[arg(long, env = "CREDPROXY_ADMIN_CA_CERT", global = true)]
    admin_ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConnCommand {
    /// Create a connection. Credential values: `name=value`, `name=@file`, or `name=@-` (stdin).
    Create {
        /// Integration id (see `credproxy integrations list`).
        #[arg(long)]
        integration: String,
        /// Auth method id of that integration.
        #[arg(long)]
        auth_method: String,
        /// Organization that owns the connection.
        #[arg(long = "org")]
        org_id: String,
        /// User who owns the connection.
        #[arg(long = "user")]
        user_id: String,
        /// A credential field (repeatable): NAME=VALUE, NAME=@FILE, or NAME=@- for stdin.
        #[arg(long = "credential", value_name = "NAME=VALUE")]
        credentials: Vec<String>,
    },
    /// List connections: one organization's, or (global admin token, no
    /// --org) every organization's; an org-scoped token lists its own.
    List {
        /// Only this organization's connections.
        #[arg(long = "org")]
        org_id: Option<String>,
        /// Only this user's.
        #[arg(long = "user")]
        user_id: Option<String>,
        /// Only this integration's.
        #[arg(long)]
        integration: Option<String>,
        /// Only those in this state: active, needs_reauth or revoked.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one connection.
    Get {
        /// Connection id (conn_…).
        id: String,
    },
    /// Delete a connection (revokes OAuth2 tokens at the provider where possible).
    Delete {
        /// Connection id (conn_…).
        id: String,
    },
    /// Send the integration's test request through the connection; exit 1
    /// when the test fails.
    Test {
        /// Connection id (conn_…).
        id: String,
    },
    /// Start an OAuth2 authorization-code flow; prints the URL to open in a
    /// browser (`authorization_url`) and when it expires, as JSON.
    Authorize {
        /// Integration id.
        #[arg(long)]
        integration: String,
        /// OAuth2 authorization-code auth method of that integration.
        #[arg(long)]
        auth_method: String,
        /// Organization that will own the connection.
        #[arg(long = "org")]
        org_id: String,
        /// User who will own the connection.
        #[arg(long = "user")]
        user_id: String,
        /// Scopes to request instead of the integration's (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Where the callback redirects with `connection_id` once done.
        #[arg(long)]
        return_to: Option<String>,
        /// Re-authorize this existing connection instead of creating one.
        #[arg(long)]
        connection_id: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // `serve` sizes its runtime from the configuration (errors are reported
    // by `serve` itself once the runtime runs).
    if let Command::Serve { config } = &cli.command {
        if let Ok(cfg) = Config::load(config, &config::process_env()) {
            if cfg.thread_per_core() {
                // The proxy has threads of its own; this runtime serves the
                // admin and public listeners and background work.
                builder.worker_threads(1);
            } else if cfg.runtime.worker_threads > 0 {
                builder.worker_threads(cfg.runtime.worker_threads);
            }
        }
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(&config).await,
            Command::Migrate { config } => match load(&config) {
                Ok((cfg, _)) => match server::open_store(&cfg).await {
                    Ok(_) => {
                        println!("store migrated: {}", config::redact_url(&cfg.store.url));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("credproxy: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => config_error(&e),
            },
            Command::CheckConfig { config } => match load(&config).and_then(|(cfg, ints)| {
                server::prepare(&cfg)?;
                Ok(ints)
            }) {
                Ok(ints) => {
                    println!("{}: ok ({} integrations)", config.display(), ints.len());
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(&e),
            },
            Command::Connections { admin, command } => connections(admin, command).await,
            Command::Integrations { admin, command } => integrations(admin, command).await,
            Command::RunTokens { admin, command } => run_tokens(admin, command).await,
            Command::Keys { command } => keys(command).await,
            Command::Health { url } => health(&url).await,
            Command::Ca { command: CaCommand::Init { out, days } } => match crate::tls::init_ca(&out, days) {
                Ok((cert, key)) => {
                    println!("CA certificate: {} (distribute to clients)", cert.display());
                    println!("CA key:         {} (mode 0600; keep private)", key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("credproxy: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    });
    // Log lines still in the buffer (start-up errors, the last access lines).
    crate::telemetry::flush();
    code
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("credproxy: configuration error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// The configuration and integrations, and a check that every `CREDPROXY_*`
/// variable means something.
fn load(path: &Path) -> Result<(Config, Integrations), ConfigError> {
    let env = config::process_env();
    let cfg = Config::load(path, &env)?;
    let ints = Integrations::load_dir(&cfg.integrations.dir, &env)?;
    let used = cfg.env_refs.union(&ints.env_refs).cloned().collect();
    config::check_environment(&env, &used)?;
    Ok((cfg, ints))
}

async fn serve(path: &Path) -> ExitCode {
    let (cfg, ints) = match load(path) {
        Ok(x) => x,
        Err(e) => return config_error(&e),
    };
    crate::telemetry::init(&cfg.log.level);
    let started = async {
        let listeners = Listeners::bind(&cfg).await?;
        server::start(listeners, &cfg, ints).await
    };
    let running = match started.await {
        Ok(r) => r,
        Err(StartError::Config(e)) => return config_error(&e),
        Err(e) => {
            eprintln!("credproxy: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP reloads the integration files (as POST /v1/integrations/reload).
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let reload = running.reloader();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(e) = reload() {
                    tracing::warn!(error = %e, "SIGHUP: integrations not reloaded; the set in force stays");
                }
            }
        });
    }
    wait_for_signal().await;
    let grace = cfg.shutdown.grace;
    tracing::info!(grace_secs = grace.as_secs(), open = running.open_connections(), "shutting down: draining");
    let abandoned = running.shutdown(grace).await;
    tracing::info!(abandoned, "shut down");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn health(url: &str) -> ExitCode {
    let probe = async {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let authority = uri.authority().ok_or_else(|| format!("{url}: needs host:port"))?.clone();
        let stream = tokio::net::TcpStream::connect(authority.as_str()).await.map_err(|e| e.to_string())?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let status = tx.send_request(req).await.map_err(|e| e.to_string())?.status();
        if status == http::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("{url} answered {status}"))
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), probe).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("credproxy: unhealthy: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("credproxy: unhealthy: {url} did not answer within 2 s");
            ExitCode::FAILURE
        }
    }
}

async fn keys(command: KeysCommand) -> ExitCode {
    let path = match &command {
        KeysCommand::Rotate { config, .. } | KeysCommand::Status { config } => config,
    };
    let env = config::process_env();
    let cfg = match Config::load(path, &env).and_then(|c| config::check_environment(&env, &c.env_refs).map(|()| c)) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    crate::telemetry::init(&cfg.log.level);
    let opened = async { Ok::<_, StartError>((server::open_store(&cfg).await?, server::key_provider(&cfg).await?)) };
    let (store, provider) = match opened.await {
        Ok(x) => x,
        Err(StartError::Config(e)) => return config_error(&e),
        Err(e) => {
            eprintln!("credproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let current = provider.current_key_id().to_owned();
    match command {
        KeysCommand::Status { .. } => match store.key_usage().await {
            Ok(usage) => {
                println!("current key: {current}");
                for u in &usage {
                    let mark = if u.key_id == current { "  (current)" } else { "" };
                    println!("{:<16} {:<48} {:>8}{mark}", u.table.table(), u.key_id, u.records);
                }
                let behind: u64 = usage.iter().filter(|u| u.key_id != current).map(|u| u.records).sum();
                println!("records under other keys: {behind}");
                if behind == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("credproxy: {e}");
                ExitCode::FAILURE
            }
        },
        KeysCommand::Rotate { batch_size, pause_ms, .. } => {
            use crate::creds::rotate::{rotate_keys, RotateOptions};
            let envelope = crate::crypto::Envelope::new(provider);
            let opts = RotateOptions { batch_size, pause: std::time::Duration::from_millis(pause_ms) };
            eprintln!("rotating to {current}");
            let mut progress = |table: crate::store::SealedTable, r: &crate::creds::rotate::RotateReport| {
                eprintln!("{}: rewrapped {} so far ({} failed)", table.table(), r.rewrapped, r.failed.len());
            };
            match rotate_keys(&*store, &envelope, &opts, &mut progress).await {
                Ok(report) => {
                    for f in &report.failed {
                        eprintln!("credproxy: {} {}: {}", f.table.table(), f.id, f.reason);
                    }
                    for u in &report.remaining {
                        eprintln!("credproxy: {} records of {} still under {}", u.records, u.table.table(), u.key_id);
                    }
                    println!(
                        "rewrapped {} records ({} rewritten concurrently, {} failed, {} still under other keys)",
                        report.rewrapped,
                        report.raced,
                        report.failed.len(),
                        report.remaining.iter().map(|u| u.records).sum::<u64>()
                    );
                    if report.complete() {
                        ExitCode::SUCCESS
                    } else {
                        if report.failed.is_empty() {
                            eprintln!(
                                "credproxy: records keep arriving under another key: is every instance configured with {current}?"
                            );
                        }
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("credproxy: key rotation stopped: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The admin API client from the common flags; an exit code when they do not make one.
fn admin_client(admin: AdminArgs) -> Result<AdminClient, ExitCode> {
    let Some(token) = admin.admin_token.filter(|t| !t.is_empty()) else {
        eprintln!("credproxy: set CREDPROXY_ADMIN_TOKEN or pass --admin-token");
        return Err(ExitCode::from(EXIT_CONFIG));
    };
    let cas: Vec<PathBuf> = admin.admin_ca_cert.into_iter().collect();
    AdminClient::with_ca_certs(&admin.admin_url, SecretValue::new(token), &cas).map_err(|e| {
        eprintln!("credproxy: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Prints a JSON answer (exit 0) or the error (exit 1).
fn report(result: Result<Value, crate::admin_client::AdminClientError>) -> ExitCode {
    match result {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status for a document that cannot be read (EX_DATAERR).
pub const EXIT_DATA: u8 = 65;

async fn integrations(admin: AdminArgs, command: IntegrationsCommand) -> ExitCode {
    if let IntegrationsCommand::Import { spec, id, out, base_url, fetch_discovery, no_test, force } = command {
        return import_openapi(&spec, id, out, base_url, fetch_discovery, no_test, force).await;
    }
    let client = match admin_client(admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    report(match command {
        IntegrationsCommand::List => client.call(Method::GET, "/v1/integrations", None).await,
        IntegrationsCommand::Show { id } => {
            client.call(Method::GET, &format!("/v1/integrations/{}", path_segment(&id)), None).await
        }
        IntegrationsCommand::Import { .. } => unreachable!("handled above"),
    })
}

/// `credproxy integrations import`.
async fn import_openapi(
    spec: &Path,
    id: Option<String>,
    out: Option<PathBuf>,
    base_url: Option<String>,
    fetch_discovery: bool,
    no_test: bool,
    force: bool,
) -> ExitCode {
    let bytes = match std::fs::read(spec) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("credproxy: cannot read {}: {e}", spec.display());
            return ExitCode::from(EXIT_DATA);
        }
    };
    let mut opts = crate::openapi::ImportOptions { id, base_url, no_test, ..Default::default() };
    if fetch_discovery {
        let urls = match crate::openapi::openid_connect_urls(&bytes) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("credproxy: {}: {e}", spec.display());
                return ExitCode::from(EXIT_DATA);
            }
        };
        for url in urls {
            match crate::admin_client::get_json(&url).await {
                Ok(v) => match serde_json::from_value::<crate::openapi::Discovery>(v) {
                    Ok(d) => {
                        opts.discovery.insert(url, d);
                    }
                    Err(e) => eprintln!("credproxy: discovery document at {url} is not usable: {e}"),
                },
                Err(e) => eprintln!("credproxy: discovery at {url} not fetched: {e}"),
            }
        }
    }
    let source = spec.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let import = match crate::openapi::import(&source, &bytes, &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("credproxy: {}: {e}", spec.display());
            return ExitCode::from(EXIT_DATA);
        }
    };
    eprintln!("{}", serde_json::to_string_pretty(&import.report).unwrap_or_default());
    let Some(file) = import.file else {
        eprintln!(
            "credproxy: no integration file: {}",
            import.report.no_file_because.as_deref().unwrap_or("see the report")
        );
        return ExitCode::FAILURE;
    };
    let Some(dir) = out else {
        print!("{file}");
        return ExitCode::SUCCESS;
    };
    let path = dir.join(format!("{}.toml", import.report.integration_id));
    if path.exists() && !force {
        eprintln!("credproxy: {} exists (pass --force to replace it)", path.display());
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, file)) {
        eprintln!("credproxy: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!("credproxy: wrote {} (running instances: SIGHUP or POST /v1/integrations/reload)", path.display());
    ExitCode::SUCCESS
}

async fn connections(admin: AdminArgs, command: ConnCommand) -> ExitCode {
    let client = match admin_client(admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match command {
        ConnCommand::Create { integration, auth_method, org_id, user_id, credentials } => {
            let creds = match parse_credentials(&credentials) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("credproxy: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let body = json!({
                "integration": integration, "auth_method": auth_method,
                "org_id": org_id, "user_id": user_id, "credentials": creds,
            });
            client.call(Method::POST, "/v1/connections", Some(&body)).await
        }
        ConnCommand::List { org_id, user_id, integration, state } => {
            // Every page, as one list.
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (k, v) in [("org_id", org_id), ("user_id", user_id), ("integration", integration), ("state", state)] {
                if let Some(v) = v {
                    query.append_pair(k, &v);
                }
            }
            query.append_pair("limit", "1000");
            let query = query.finish();
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    None => format!("/v1/connections?{query}"),
                    Some(c) => format!("/v1/connections?{query}&cursor={c}"),
                };
                match client.call(Method::GET, &path, None).await {
                    Ok(mut page) => {
                        if let Some(items) = page["connections"].as_array_mut() {
                            all.append(items);
                        }
                        match page["next_cursor"].as_str() {
                            Some(c) => cursor = Some(c.to_owned()),
                            None => break Ok(json!({ "connections": all })),
                        }
                    }
                    Err(e) => break Err(e),
                }
            }
        }
        ConnCommand::Get { id } => {
            client.call(Method::GET, &format!("/v1/connections/{}", path_segment(&id)), None).await
        }
        ConnCommand::Test { id } => {
            let path = format!("/v1/connections/{}/test", path_segment(&id));
            match client.call(Method::POST, &path, None).await {
                // The test ran and failed: the answer says why, the exit code says so.
                Ok(v) if v["ok"] != Value::Bool(true) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    let why = v["error"]["detail"].as_str().unwrap_or("the test failed");
                    eprintln!("credproxy: connection test failed: {why}");
                    return ExitCode::FAILURE;
                }
                other => other,
            }
        }
        ConnCommand::Authorize { integration, auth_method, org_id, user_id, scopes, return_to, connection_id } => {
            let mut body = json!({
                "integration": integration, "auth_method": auth_method, "org_id": org_id, "user_id": user_id,
            });
            if !scopes.is_empty() {
                body["scopes"] = json!(scopes);
            }
            if let Some(rt) = return_to {
                body["return_to"] = json!(rt);
            }
            if let Some(id) = connection_id {
                body["connection_id"] = json!(id);
            }
            client.call(Method::POST, "/v1/oauth2/authorize", Some(&body)).await
        }
        ConnCommand::Delete { id } => {
            client.call(Method::DELETE, &format!("/v1/connections/{}", path_segment(&id)), None).await
        }
    };
    report(result)
}

async fn run_tokens(admin: AdminArgs, command: RunTokensCommand) -> ExitCode {
    let client = match admin_client(admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let RunTokensCommand::Mint { org_id, user_id, connections, integrations, ttl_secs } = command;
    let mut body = json!({ "org_id": org_id });
    if let Some(u) = user_id {
        body["user_id"] = json!(u);
    }
    if !connections.is_empty() {
        body["connection_ids"] = json!(connections);
    }
    if !integrations.is_empty() {
        body["integrations"] = json!(integrations);
    }
    if let Some(t) = ttl_secs {
        body["ttl_secs"] = json!(t);
    }
    report(client.call(Method::POST, "/v1/run-tokens", Some(&body)).await)
}

fn path_segment(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

fn parse_credentials(items: &[String]) -> Result<BTreeMap<String, Value>, String> {
    let mut out = BTreeMap::new();
    for item in items {
        let (name, raw) = item
            .split_once('=')
            .ok_or_else(|| format!("--credential {:?}: expected NAME=VALUE", item.split('=').next().unwrap_or("")))?;
        let value = if raw == "@-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| format!("--credential {name}: reading stdin: {e}"))?;
            s.trim_end_matches(['\r', '\n']).to_owned()
        } else if let Some(file) = raw.strip_prefix('@') {
            let s = std::fs::read_to_string(file).map_err(|e| format!("--credential {name}: reading {file}: {e}"))?;
            s.trim_end_matches(['\r', '\n']).to_owned()
        } else {
            raw.to_owned()
        };
        out.insert(name.to_owned(), Value::String(value));
    }
    Ok(out)
}
