//! Connect sessions: minted by the platform's backend (admin API), opened
//! by the end user's browser. The token is random, single-purpose (it opens
//! this session's pages and nothing else) and stored only as its hash; a
//! session makes one connection at most and expires.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use ring::hmac;

use crate::config::PublicConfig;
use crate::creds::{unix_now, Connections};
use crate::problem::Code;
use crate::secret::SecretValue;
use crate::store::{ConnectSession, StoreError};

/// Session tokens start with this (so a leaked one is recognizable).
const TOKEN_PREFIX: &str = "cps_";
/// Random bytes in a token (256 bits).
const TOKEN_BYTES: usize = 32;

/// What the connect pages and the session API need from the configuration.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// `public.base_url` (no trailing slash).
    pub base_url: String,
    pub allowed_return_origins: Vec<String>,
    pub frame_ancestors: String,
    pub session_ttl: Duration,
    pub max_session_ttl: Duration,
    pub failed_lookups_per_minute: u32,
    /// `Secure` cookies: the base URL is https.
    pub secure_cookies: bool,
}

impl ConnectSettings {
    /// From `[public]`; `bound` is the public listener's address (the
    /// base URL's default).
    pub fn new(c: &PublicConfig, bound: std::net::SocketAddr) -> Self {
        let base_url = c.base_url.clone().unwrap_or_else(|| format!("http://{bound}"));
        let base_url = base_url.trim_end_matches('/').to_owned();
        Self {
            secure_cookies: base_url.starts_with("https://"),
            base_url,
            allowed_return_origins: c.allowed_return_origins.clone(),
            frame_ancestors: c.frame_ancestors.clone(),
            session_ttl: c.session_ttl,
            max_session_ttl: c.max_session_ttl,
            failed_lookups_per_minute: c.failed_lookups_per_minute,
        }
    }

    /// The OAuth2 redirect URI registered with providers.
    pub fn callback_url(&self) -> String {
        format!("{}/oauth2/callback", self.base_url)
    }

    /// True if `return_to` is an http(s) URL on an allowed origin.
    pub fn return_to_allowed(&self, return_to: &str) -> bool {
        crate::ids::origin_of(return_to).is_some_and(|o| self.allowed_return_origins.contains(&o))
    }
}

/// `POST /v1/connect-sessions`.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub org_id: String,
    pub user_id: String,
    pub integrations: Option<Vec<String>>,
    pub connection_id: Option<String>,
    pub return_to: Option<String>,
    pub expires_in_secs: Option<u64>,
}

/// A refused session request: a stable code and a detail naming the field.
#[derive(Debug)]
pub struct SessionError {
    pub code: Code,
    pub detail: String,
}

impl SessionError {
    fn new(code: Code, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into() }
    }
}

impl From<StoreError> for SessionError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "connect session: store error");
        Self::new(Code::StoreUnavailable, "the store cannot be reached; retry later")
    }
}

/// A new session: the URL to open (it carries the token) and the row.
pub struct NewSession {
    pub url: SecretValue,
    pub session: ConnectSession,
}

/// Checks a session request and stores the session.
pub async fn create(
    connections: &Connections,
    settings: &ConnectSettings,
    req: SessionRequest,
) -> Result<NewSession, SessionError> {
    let invalid = |d: String| SessionError::new(Code::InvalidRequest, d);
    for (field, v) in [("org_id", &req.org_id), ("user_id", &req.user_id)] {
        if !crate::ids::is_valid_external_id(v) {
            return Err(invalid(format!("{field}: must be 1-128 characters of [A-Za-z0-9_.:@-]")));
        }
    }
    if let Some(rt) = &req.return_to {
        if !settings.return_to_allowed(rt) {
            return Err(SessionError::new(
                Code::ReturnToNotAllowed,
                "return_to: not on an origin in public.allowed_return_origins",
            ));
        }
    }
    let ttl = req.expires_in_secs.map_or(settings.session_ttl, Duration::from_secs);
    if ttl.is_zero() || ttl > settings.max_session_ttl {
        return Err(invalid(format!(
            "expires_in_secs: must be 1 to {} (public.max_session_ttl_secs)",
            settings.max_session_ttl.as_secs()
        )));
    }
    let integrations = connections.integrations();
    if let Some(list) = &req.integrations {
        if list.is_empty() {
            return Err(invalid("integrations: name at least one, or leave it out for every one".into()));
        }
        for (i, id) in list.iter().enumerate() {
            if integrations.get(id).is_none() {
                return Err(SessionError::new(
                    Code::UnknownIntegration,
                    format!("integrations[{i}]: no such integration"),
                ));
            }
        }
    }
    if let Some(id) = &req.connection_id {
        // Re-authorization: the user's own connection in this organization.
        let meta = connections.get_meta(Some(&req.org_id), id).await?;
        let Some(meta) = meta.filter(|m| m.user_id == req.user_id) else {
            return Err(SessionError::new(
                Code::ConnectionNotFound,
                "connection_id: no connection of this organization and user",
            ));
        };
        if req.integrations.as_ref().is_some_and(|l| !l.contains(&meta.integration)) {
            return Err(SessionError::new(
                Code::ConnectionMismatch,
                "connection_id: its integration is not in integrations",
            ));
        }
    }
    let token = format!("{TOKEN_PREFIX}{}", crate::oauth2::random_urlsafe(TOKEN_BYTES));
    let now = unix_now();
    let session = ConnectSession {
        id: crate::ids::new_id("cs_"),
        token_hash: token_hash(&token),
        org_id: req.org_id,
        user_id: req.user_id,
        integrations: req.integrations,
        connection_id: req.connection_id,
        return_to: req.return_to,
        created_at: now,
        expires_at: now + ttl.as_secs() as i64,
        claimed_at: None,
        connection_made: None,
    };
    connections.store().insert_connect_session(&session).await?;
    let url = SecretValue::new(format!("{}/connect/session/{token}", settings.base_url));
    Ok(NewSession { url, session })
}

/// True if `s` has the shape of a session token (before any lookup).
pub fn is_token(s: &str) -> bool {
    s.strip_prefix(TOKEN_PREFIX)
        .is_some_and(|r| r.len() == 43 && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

pub fn token_hash(token: &str) -> String {
    crate::secret::sha256_hex(token)
}

/// The form token of a session: derived from its (secret) session token,
/// so only a page rendered for that session knows it.
pub fn csrf_token(token: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let tag = hmac::sign(&key, b"credproxy connect form");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
}

/// Compares a presented form token with the session's in constant time.
pub fn csrf_ok(token: &str, presented: Option<&str>) -> bool {
    let Some(p) = presented else { return false };
    crate::secret::constant_time_eq(p.as_bytes(), csrf_token(token).as_bytes())
}

/// Why a session cannot be used.
pub fn usable(s: &ConnectSession, now: i64) -> Result<(), Code> {
    if s.connection_made.is_some() || s.claimed_at.is_some() {
        Err(Code::SessionUsed)
    } else if s.expires_at <= now {
        Err(Code::SessionExpired)
    } else {
        Ok(())
    }
}

/// Counts unknown session tokens per client address and minute: past the
/// limit, the address is refused until the minute is over. (Behind an
/// ingress every browser shares its address: size the limit for that.)
pub struct Guard {
    limit: u32,
    seen: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl Guard {
    pub fn new(limit: u32) -> Self {
        Self { limit, seen: Mutex::new(HashMap::new()) }
    }

    fn minute() -> i64 {
        unix_now() / 60
    }

    /// True if `ip` used up this minute's failures.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        let now = Self::minute();
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&ip).is_some_and(|&(m, n)| m == now && n >= self.limit)
    }

    /// Records an unknown token from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = Self::minute();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= 10_000 {
            seen.retain(|_, (m, _)| *m == now);
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if e.0 != now {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_form_tokens() {
        let t = format!("{TOKEN_PREFIX}{}", crate::oauth2::random_urlsafe(TOKEN_BYTES));
        assert!(is_token(&t), "{t}");
        assert!(!is_token("cps_short") && !is_token(&t.replace("cps_", "cpx_")));
        let csrf = csrf_token(&t);
        assert!(csrf_ok(&t, Some(&csrf)));
        assert!(!csrf_ok(&t, None) && !csrf_ok(&t, Some("")) && !csrf_ok(&t, Some(&csrf[1..])));
        let other = format!("{TOKEN_PREFIX}{}", crate::oauth2::random_urlsafe(TOKEN_BYTES));
        assert!(!csrf_ok(&other, Some(&csrf)), "a form token works for its own session only");
        assert_eq!(token_hash(&t).len(), 64);
    }

    #[test]
    fn settings_follow_the_base_url() {
        let bound: std::net::SocketAddr = "127.0.0.1:8082".parse().unwrap();
        let mut c = PublicConfig { allowed_return_origins: vec!["https://app.example".into()], ..Default::default() };
        let s = ConnectSettings::new(&c, bound);
        assert_eq!((s.base_url.as_str(), s.secure_cookies), ("http://127.0.0.1:8082", false));
        c.base_url = Some("https://connect.example/".into());
        let s = ConnectSettings::new(&c, bound);
        assert_eq!((s.callback_url().as_str(), s.secure_cookies), ("https://connect.example/oauth2/callback", true));
        assert!(s.return_to_allowed("https://app.example/done?x=1"));
        assert!(s.return_to_allowed("https://APP.example:443/done"), "origins are compared normalized");
        assert!(!s.return_to_allowed("https://app.example.evil.example/"));
        assert!(!s.return_to_allowed("http://app.example/done"), "the scheme is part of the origin");
    }

    #[test]
    fn the_guard_blocks_an_address_past_its_limit() {
        let g = Guard::new(3);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(!g.blocked(a));
            g.failed(a);
        }
        assert!(g.blocked(a));
        assert!(!g.blocked(b), "per address");
    }
}
