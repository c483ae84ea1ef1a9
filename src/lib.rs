//! credproxy: an outbound forward proxy that holds the credentials of an
//! integration platform's connections and injects them into requests on their
//! way out, so workflow runners never see a secret.
//!
//! # Layout
//!
//! A module imports only modules below it in this list (one line, one
//! level; modules on the same line do not import each other), and nothing
//! but `server` imports [`proxy`] or [`admin`]. `tests/layering.rs` reads
//! this list and the sources and holds them together.
//!
//! - [`cli`]: argument parsing and the `credproxy` subcommands (binary edge).
//! - [`server`]: checks what the configuration names, builds the shared
//!   state, owns the listeners and shutdown.
//! - [`proxy`]: the proxy listener and the request pipeline, top to bottom.
//! - [`admin`]: the admin HTTP API (connections, integrations, health).
//! - [`connect`]: the public listener: connect pages where end users make
//!   their own connections, connect sessions, the OAuth2 callback.
//! - [`admin_client`]: the small HTTP client the CLI uses to drive the admin API.
//! - [`openapi`]: OpenAPI 3.0/3.1 documents turned into integration files,
//!   with a report of what was and was not imported. Pure.
//! - [`outbound`]: the credentialed request (fresh token, inject, forward,
//!   OAuth2 401 retry, echo scrubbing) shared by the proxy and the connection
//!   test; its errors and their codes.
//! - [`inject`]: turns an auth method plus a credential into request edits,
//!   and takes them back out of URL response fields. Pure.
//! - [`creds`]: connection resolution (cache, store, decrypt), OAuth2
//!   refresh and authorization, key rotation, credential types.
//! - [`oauth2`]: token sets, PKCE, and the token/revocation endpoint client.
//! - [`webhooks`]: delivery of connection events from the outbox
//!   (Standard Webhooks signatures, retries, leases).
//! - [`upstream`]: the proxy's upstream pool, the pooled client for token
//!   calls, and their SSRF-guarded connector.
//! - [`quota`]: provider quotas on the request path: rate limits, in-flight
//!   caps, cool-downs learnt from an upstream's `Retry-After`.
//! - [`integrations`]: integration definitions loaded from `config/integrations/*.toml`.
//! - [`audit`]: the audit trail: one JSON line per credential use and per
//!   admin action on a credential, to stdout or a file rotated by size.
//! - [`config`]: `credproxy.toml` loading, environment overrides, validation.
//! - [`metrics`]: Prometheus counters (atomics) and their text rendering.
//! - [`tls`]: the interception CA and per-host leaf certificates.
//! - [`events`]: connection lifecycle events (the outbox rows' JSON).
//! - [`store`]: the `Store` trait and its SQLite and PostgreSQL
//!   implementations. Never imports `crypto`.
//! - [`crypto`]: envelope encryption and key providers. Never imports `store`.
//! - [`runtoken`]: run tokens (HMAC-signed claims: organization, user,
//!   usable connections), minted and verified with a keyring. Pure.
//! - [`h1`]: HTTP/1.1 on the data plane, both sides (caller and upstream),
//!   driven by the task serving the request. Imports nothing but `scan`
//!   (its head tokenizer's eight-byte scans).
//! - [`policy`]: `allowed_hosts` matching, the SSRF address classifier and
//!   the egress policy. Pure.
//! - [`problem`]: every problem code, and the one place that turns errors
//!   into problem+json responses.
//! - [`ids`], [`secret`], [`telemetry`], [`scan`]: leaves (`scan`: first byte
//!   of a kind, eight bytes at a time).

pub mod admin;
pub mod admin_client;
pub mod audit;
pub mod cli;
pub mod config;
pub mod connect;
pub mod creds;
pub mod crypto;
pub mod events;
pub mod h1;
pub mod ids;
pub mod inject;
pub mod integrations;
pub mod metrics;
pub mod oauth2;
pub mod openapi;
pub mod outbound;
pub mod policy;
pub mod problem;
pub mod proxy;
pub mod quota;
pub mod runtoken;
pub mod scan;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod webhooks;
