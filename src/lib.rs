//! credproxy: an outbound forward proxy that holds the credentials of an
//! integration platform's connections and injects them into requests on their
//! way out, so workflow runners never see a secret.
//!
//! # Layout
//!
//! Dependencies point down this list; nothing imports [`proxy`] or [`admin`].
//!
//! - [`cli`]: argument parsing and the `credproxy` subcommands (binary edge).
//! - [`server`]: builds the shared state, owns the listeners and shutdown.
//! - [`proxy`]: the proxy listener and the request pipeline, top to bottom.
//! - [`outbound`]: the credentialed request (fresh token, inject, forward,
//!   OAuth2 401 retry) shared by the proxy and the connection test; its errors.
//! - [`admin`]: the admin HTTP API (connections, integrations, health).
//! - [`admin_client`]: the small HTTP client the CLI uses to drive the admin API.
//! - [`policy`]: caller identity, `allowed_hosts` matching, the SSRF address
//!   classifier and the egress policy. Pure.
//! - [`inject`]: turns an auth method plus a credential into request edits. Pure.
//! - [`upstream`]: the pooled upstream client and its SSRF-guarded connector.
//! - [`h1`]: HTTP/1.1 on the data plane, both sides (caller and upstream),
//!   driven by the task serving the request. Leaf.
//! - [`oauth2`]: token sets, PKCE, and the token/revocation endpoint client.
//! - [`creds`]: connection resolution (cache, store, decrypt) and credential types.
//! - [`store`]: the `Store` trait and its SQLite implementation. Never imports `crypto`.
//! - [`crypto`]: envelope encryption and key providers. Never imports `store`.
//! - [`integrations`]: integration definitions loaded from `config/integrations/*.toml`.
//! - [`config`]: `credproxy.toml` loading, environment overrides, validation.
//! - [`problem`]: the one place that turns errors into problem+json responses.
//! - [`tls`]: the interception CA and per-host leaf certificates.
//! - [`metrics`]: Prometheus counters (atomics) and their text rendering. Leaf.
//! - [`ids`], [`secret`], [`telemetry`]: leaves.

pub mod admin;
pub mod admin_client;
pub mod cli;
pub mod config;
pub mod creds;
pub mod crypto;
pub mod h1;
pub mod ids;
pub mod inject;
pub mod integrations;
pub mod metrics;
pub mod oauth2;
pub mod outbound;
pub mod policy;
pub mod problem;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
