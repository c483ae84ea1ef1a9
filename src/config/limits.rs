//! Provider quotas as written: rate limits, in-flight caps and the upstream
//! back-off policy, the same tables in an integration file
//! (`[[rate_limits]]`, `[[in_flight_limits]]`, `[backoff]`) and, as the
//! defaults for integrations that declare none, in `credproxy.toml`'s
//! `[limits]`. `quota` turns them into limiters.
//!
//! Durations here are written with a unit (`"1s"`, `"10s"`, `"1h"`,
//! `"500ms"`) or as whole seconds.

use std::time::Duration;

use serde::{de::Error as _, Deserialize, Deserializer};

use super::{ConfigError, MAX_DURATION};

/// Whose requests one limit counts together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// Each connection has its own allowance (a provider's per-token quota).
    Connection,
    /// Each organization, over all its connections of the integration.
    Org,
    /// The whole integration, every organization together (an app's quota).
    Integration,
}

impl Per {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Org => "org",
            Self::Integration => "integration",
        }
    }
}

/// `[[rate_limits]]`: `requests` per `period`, spent in bursts of at most
/// `burst` (GCRA: one request's allowance comes back every
/// `period / requests`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Names the limit in problems, metrics and logs (default: `per`).
    #[serde(default)]
    pub name: Option<String>,
    pub per: Per,
    pub requests: u32,
    #[serde(deserialize_with = "human")]
    pub period: Duration,
    /// Default: `requests` (the whole period's allowance at once, as a
    /// provider counting fixed windows allows).
    #[serde(default)]
    pub burst: Option<u32>,
    /// How long a request over the limit waits for its turn before it is
    /// refused (default 0: at once).
    #[serde(default, deserialize_with = "human")]
    pub max_wait: Duration,
    /// Only requests whose path matches one of these (`*` matches any
    /// run of characters, `/` included); none: every request.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// `[[in_flight_limits]]`: at most `max_in_flight` requests at once, from
/// sending the request to the end of the response body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlightLimit {
    #[serde(default)]
    pub name: Option<String>,
    pub per: Per,
    pub max_in_flight: u32,
    #[serde(default, deserialize_with = "human")]
    pub max_wait: Duration,
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Whom an upstream's `Retry-After` cools down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CooldownScope {
    /// The connection whose request was answered 429/503.
    #[default]
    Connection,
    /// Every connection of the integration.
    Integration,
}

impl CooldownScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Integration => "integration",
        }
    }
}

/// `[backoff]`: what an upstream's `429`/`503` with `Retry-After` does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Answer further requests with 429 until the upstream's `Retry-After`
    /// has passed, without calling the upstream.
    pub respect_retry_after: bool,
    pub per: CooldownScope,
    /// The longest cool-down an upstream can impose.
    #[serde(deserialize_with = "human")]
    pub max_cooldown: Duration,
    /// Also read these fields of a 429/503 (opt-in: `x-ratelimit-reset`,
    /// `ratelimit-reset`): a value above 10^9 is a Unix time in seconds,
    /// anything else seconds from now.
    pub reset_headers: Vec<String>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            respect_retry_after: true,
            per: CooldownScope::Connection,
            max_cooldown: Duration::from_secs(3600),
            reset_headers: Vec::new(),
        }
    }
}

/// Most limits of one kind a set of quotas may hold.
pub const MAX_LIMITS: usize = 8;

/// Quotas as one file declares them: an integration file's (each part
/// left out takes `[limits]`' default), or `[limits]`' own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Declared {
    #[serde(default)]
    pub rate_limits: Option<Vec<RateLimit>>,
    #[serde(default)]
    pub in_flight_limits: Option<Vec<InFlightLimit>>,
    #[serde(default)]
    pub backoff: Option<Backoff>,
}

impl Declared {
    /// Checks every limit; `prefix` is where they sit (`""` in an
    /// integration file, `"limits."` in credproxy.toml).
    pub fn validate(&self, source: &str, prefix: &str) -> Result<(), ConfigError> {
        let rates = self.rate_limits.as_deref().unwrap_or_default();
        let caps = self.in_flight_limits.as_deref().unwrap_or_default();
        for (kind, n) in [("rate_limits", rates.len()), ("in_flight_limits", caps.len())] {
            if n > MAX_LIMITS {
                return Err(ConfigError::new(source, format!("{prefix}{kind}"), format!("at most {MAX_LIMITS}")));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in rates.iter().enumerate() {
            let key = |k: &str| format!("{prefix}rate_limits[{i}].{k}");
            if r.requests == 0 {
                return Err(ConfigError::new(source, key("requests"), "must be at least 1"));
            }
            if r.period.is_zero() {
                return Err(ConfigError::new(source, key("period"), "must be longer than 0"));
            }
            if r.burst == Some(0) {
                return Err(ConfigError::new(source, key("burst"), "must be at least 1 (or left out: requests)"));
            }
            check_name(source, &key("name"), &mut names, "rate", r.name.as_deref(), r.per)?;
            check_paths(source, &key("paths"), &r.paths)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, l) in caps.iter().enumerate() {
            let key = |k: &str| format!("{prefix}in_flight_limits[{i}].{k}");
            if l.max_in_flight == 0 {
                return Err(ConfigError::new(source, key("max_in_flight"), "must be at least 1"));
            }
            check_name(source, &key("name"), &mut names, "in-flight", l.name.as_deref(), l.per)?;
            check_paths(source, &key("paths"), &l.paths)?;
        }
        let headers = self.backoff.as_ref().map_or(&[][..], |b| &b.reset_headers[..]);
        if let Some(h) = headers.iter().find(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err()) {
            return Err(ConfigError::new(
                source,
                format!("{prefix}backoff.reset_headers"),
                format!("{h:?} is not a header field name"),
            ));
        }
        Ok(())
    }
}

fn check_name(
    source: &str,
    key: &str,
    names: &mut std::collections::BTreeSet<String>,
    kind: &str,
    name: Option<&str>,
    per: Per,
) -> Result<(), ConfigError> {
    let name = name.unwrap_or(per.as_str());
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !ok {
        return Err(ConfigError::new(source, key, "must be 1-64 characters of [A-Za-z0-9_.-]"));
    }
    if !names.insert(name.to_owned()) {
        return Err(ConfigError::new(
            source,
            key,
            format!("another {kind} limit is named {name:?} (two limits per {} need names)", per.as_str()),
        ));
    }
    Ok(())
}

fn check_paths(source: &str, key: &str, paths: &[String]) -> Result<(), ConfigError> {
    match paths.iter().find(|p| !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace() || b == b'?')) {
        Some(p) => {
            Err(ConfigError::new(source, key, format!("{p:?}: a path starts with / and has no query or spaces")))
        }
        None => Ok(()),
    }
}

/// A duration with a unit (`"10s"`, `"1h"`, `"500ms"`), or whole seconds.
pub fn human<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Secs(u64),
        Text(String),
    }
    let t = match Written::deserialize(d)? {
        Written::Secs(n) => Duration::from_secs(n.min(MAX_DURATION.as_secs() + 1)),
        Written::Text(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            D::Error::custom(format!(
                "invalid value: {s:?} is not a duration such as \"10s\", \"1h\" or \"500ms\" ({e})"
            ))
        })?,
    };
    if t > MAX_DURATION {
        return Err(D::Error::custom("invalid value: must be at most one year"));
    }
    Ok(t)
}
