//! OAuth2 connections: single-flight refresh, the authorization-code flow
//! (`state`, PKCE, callback), and revocation at the provider.
//!
//! Single flight, in two layers: every refresh of one connection runs under
//! that connection's async mutex in this process, and then under the store's
//! row lock (PostgreSQL `SELECT … FOR UPDATE`) across instances. Whoever gets
//! the lock re-reads the row and refreshes only if the token is still the
//! stale one, so a storm over many instances produces one refresh. The new
//! token set is committed (sealed) before the lock is released and before it
//! is used, so a rotated refresh token is never lost; a process that dies
//! mid-refresh drops its database connection, which rolls back and frees the
//! lock.

use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use zeroize::Zeroizing;

use super::{unix_now, Connections, CreateError, Credential, ResolveError, Resolved};
use crate::crypto::CryptoError;
use crate::events::{self, Kind};
use crate::integrations::{Grant, OAuth2Method};
use crate::oauth2::{self, Pkce, TokenClient, TokenError, TokenSet};
use crate::secret::{sha256_hex, SecretValue};
use crate::store::{ConnectionMeta, ConnectionState, PendingAuthorization, RowLock, RowUpdate, StoreError};

/// After a failed refresh, requests for that connection fail fast for this long
/// instead of hammering the token endpoint.
pub const REFRESH_COOLDOWN: Duration = Duration::from_secs(5);

pub(super) struct OAuthState {
    client: TokenClient,
    locks: Cache<String, Arc<tokio::sync::Mutex<()>>>,
    cooldown: Cache<String, ()>,
    /// Organizations' own OAuth apps by `integration/method/org` (`None`:
    /// none, the integration's client serves).
    pub(super) apps: Cache<String, Option<Arc<crate::oauth2::OAuthClient>>>,
    /// How long an authorization `state` stays valid.
    pub(super) state_ttl: Duration,
    /// Longest wait for another instance's refresh of the same connection.
    pub(super) lock_wait: Duration,
}

impl OAuthState {
    pub(super) fn new(client: TokenClient) -> Self {
        let defaults = crate::config::OAuth2Config::default();
        Self {
            client,
            // Idle locks expire; an entry in use is held by its Arc.
            locks: Cache::builder().time_to_idle(Duration::from_secs(600)).build(),
            cooldown: Cache::builder().time_to_live(REFRESH_COOLDOWN).build(),
            apps: Cache::builder().time_to_live(super::apps::APP_CACHE_TTL).max_capacity(100_000).build(),
            state_ttl: defaults.state_ttl,
            lock_wait: defaults.refresh_lock_wait,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    #[error("the connection needs re-authorization")]
    NeedsReauth,
    #[error("token refresh is cooling down after a failure")]
    CoolingDown,
    /// Refreshing with the refresh token failed.
    #[error(transparent)]
    Token(TokenError),
    /// Getting a client-credentials token failed (there is nothing to refresh).
    #[error("fetching a client-credentials token failed: {0}")]
    Fetch(TokenError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// What happened at the provider when a connection was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    NotApplicable,
    Revoked,
    Failed(String),
}

impl Revocation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotApplicable => "not_applicable",
            Self::Revoked => "revoked",
            Self::Failed(_) => "failed",
        }
    }
}

pub struct AuthorizeRequest {
    pub integration: String,
    pub auth_method: String,
    pub org_id: String,
    pub user_id: String,
    pub scopes: Option<Vec<String>>,
    pub return_to: Option<String>,
    /// Re-authorize this existing connection (same org, integration and
    /// method) instead of creating a new one.
    pub connection_id: Option<String>,
    /// Started from a connect page: its session (claimed when the
    /// callback makes the connection).
    pub connect_session: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error(transparent)]
    Create(#[from] CreateError),
    #[error("auth method {0:?} is not an OAuth2 authorization-code method")]
    NotAuthorizationCode(String),
    #[error("return_to must be an absolute http(s) URL")]
    BadReturnTo,
    #[error("connection not found")]
    ConnectionNotFound,
    #[error("connection_id belongs to another integration, auth method or organization")]
    ConnectionMismatch,
    #[error("unknown or already used state")]
    UnknownState,
    #[error("the authorization expired; start again")]
    StateExpired,
    #[error("the connect session was already used or has expired")]
    SessionUsed,
    #[error("the provider returned error {0:?}")]
    Provider(String),
    #[error("the provider rejected the authorization code: {0}")]
    Exchange(TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl Connections {
    /// The OAuth client for a resolved connection's token calls.
    async fn client_for(
        &self,
        r: &Resolved,
        o: &OAuth2Method,
    ) -> Result<Arc<crate::oauth2::OAuthClient>, super::AppLookupError> {
        self.oauth_client(&r.meta.org_id, &r.integration.id, &r.method.id, o).await
    }
}

pub(super) fn pending_context(state_hash: &str) -> String {
    format!("oauth2-pending:{state_hash}")
}

impl Connections {
    /// Sets how long an OAuth2 authorization (`state`) stays valid.
    pub fn with_authorization_ttl(mut self, ttl: Duration) -> Self {
        self.oauth.state_ttl = ttl;
        self
    }

    /// Sets the longest wait for the cross-instance refresh lock.
    pub fn with_refresh_lock_wait(mut self, wait: Duration) -> Self {
        self.oauth.lock_wait = wait;
        self
    }

    /// Number of refreshes this process performed (token endpoint calls that
    /// returned a token).
    pub fn refresh_count(&self) -> u64 {
        self.stats.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns a connection whose access token is usable, refreshing it under
    /// the single-flight lock if it expires within the skew. Non-OAuth2
    /// connections pass through untouched.
    pub async fn ensure_fresh(&self, r: Arc<Resolved>) -> Result<Arc<Resolved>, RefreshError> {
        let Some(o) = r.method.oauth2() else { return Ok(r) };
        let stale = r.tokens.as_ref().is_none_or(|t| t.needs_refresh(unix_now(), o.refresh_skew_secs));
        if !stale {
            return Ok(r);
        }
        let seen = r.tokens.as_ref().and_then(|t| t.access_token.clone());
        // Boxed: a refresh is rare next to the requests that only check.
        Box::pin(self.refresh_single_flight(&r, seen.as_ref().map(SecretValue::expose), false)).await
    }

    /// After an upstream 401: refresh, but only if `failed` is still the
    /// current access token (another request may have refreshed already).
    pub async fn force_refresh(&self, r: &Arc<Resolved>, failed: &str) -> Result<Arc<Resolved>, RefreshError> {
        Box::pin(self.refresh_single_flight(r, Some(failed), true)).await
    }

    async fn refresh_single_flight(
        &self,
        r: &Arc<Resolved>,
        seen: Option<&str>,
        forced: bool,
    ) -> Result<Arc<Resolved>, RefreshError> {
        let id = &*r.meta.id;
        let o = r.method.oauth2().expect("only OAuth2 connections refresh");
        let lock = self.oauth.locks.get_with_by_ref(id, async { Arc::new(tokio::sync::Mutex::new(())) }).await;
        let _guard = lock.lock().await;

        // Whoever held the lock before us may have refreshed: look again,
        // first in the cache, then in the store (the authority).
        let superseded = |c: &Resolved| {
            let t = c.tokens.as_ref();
            let current = t.and_then(|t| t.access_token.as_ref()).map(SecretValue::expose);
            current.is_some()
                && current != seen
                && (forced || !t.is_some_and(|t| t.needs_refresh(unix_now(), o.refresh_skew_secs)))
        };
        if let Some(c) = self.cache.get(id).await {
            if superseded(&c) {
                return Ok(c);
            }
        }
        // Across instances: the row lock. Whoever held it before us may have
        // refreshed and committed; we read the row under the lock.
        let lock = self.lock_row(id).await?;
        let current = self.decrypt_row(lock.row().clone()).await?;
        if current.meta.state != ConnectionState::Active {
            return Err(RefreshError::NeedsReauth);
        }
        if superseded(&current) {
            self.cache.insert(current.meta.id.clone(), current.clone()).await;
            self.changed();
            return Ok(current);
        }
        if self.oauth.cooldown.contains_key(id) {
            return Err(RefreshError::CoolingDown);
        }

        let tokens = current.tokens.as_deref().cloned().unwrap_or_default();
        let client = self.client_for(&current, o).await?;
        let result = match (o.grant, tokens.refresh_token.as_ref().map(SecretValue::expose)) {
            (Grant::ClientCredentials, _) => self.oauth.client.client_credentials(o, &client).await,
            (Grant::AuthorizationCode, Some(rt)) => self.oauth.client.refresh(o, &client, rt).await,
            (Grant::AuthorizationCode, None) => Err(TokenError::InvalidGrant),
        };
        match result {
            Ok(resp) => {
                let fresh = tokens.updated(resp, unix_now(), o.default_expires_in_secs);
                self.stats.refreshes.fetch_add(1, Relaxed);
                self.store_refreshed(lock, &current, fresh).await
            }
            Err(e) => Err(self.refresh_failed(lock, &current, o.grant, e).await),
        }
    }

    /// A refresh the provider refused: a dead grant (`invalid_grant`) turns
    /// the connection `needs_reauth` under the row lock; anything else
    /// starts the cool-down (the row is left as it was).
    async fn refresh_failed(
        &self,
        lock: Box<dyn RowLock>,
        current: &Resolved,
        grant: Grant,
        e: TokenError,
    ) -> RefreshError {
        let (id, integration) = (&*current.meta.id, &current.integration.id);
        self.stats.refresh_failures.fetch_add(1, Relaxed);
        if let TokenError::InvalidGrant = e {
            let state = ConnectionState::NeedsReauth;
            let code = crate::problem::Code::ConnectionNeedsReauth.as_str();
            let event = events::connection_event(Kind::NeedsReauth, &lock.row().meta, state, Some(code), None);
            let committed = lock.commit(Some(RowUpdate::State(state)), unix_now(), Some(&event)).await;
            if let Err(e) = committed {
                return e.into();
            }
            self.cache.invalidate(id).await;
            self.changed();
            tracing::warn!(connection = %id, integration = %integration, "oauth2 grant rejected: connection needs re-authorization");
            return RefreshError::NeedsReauth;
        }
        self.oauth.cooldown.insert(id.to_owned(), ()).await;
        tracing::warn!(connection = %id, integration = %integration, error = %e, "oauth2 refresh failed");
        // The first failure of a streak is an event (written only if the
        // streak was not on already).
        let code = match e {
            TokenError::Unavailable(_) => crate::problem::Code::TokenEndpointUnavailable,
            _ => crate::problem::Code::TokenEndpointRejected,
        };
        let meta = &lock.row().meta;
        let event = events::connection_event(Kind::RefreshFailed, meta, meta.state, Some(code.as_str()), None);
        if let Err(err) = lock.commit(Some(RowUpdate::RefreshFailed), unix_now(), Some(&event)).await {
            tracing::warn!(connection = %id, error = %err, "recording the failed refresh failed");
        }
        match grant {
            Grant::ClientCredentials => RefreshError::Fetch(e),
            Grant::AuthorizationCode => RefreshError::Token(e),
        }
    }

    /// One round of the idle sweeper: refreshes the tokens of connections
    /// of every auth method with `idle_refresh_after_days` that nobody used
    /// or refreshed for that long, so the provider does not let their
    /// refresh tokens lapse. Returns how many it refreshed.
    pub async fn sweep_idle(&self) -> usize {
        let now = unix_now();
        let mut refreshed = 0;
        let integrations = self.integrations();
        for i in integrations.iter() {
            for m in &i.auth_methods {
                let Some(after) = m.oauth2().and_then(|o| o.idle_refresh_after) else { continue };
                let cutoff = now - after.as_secs() as i64;
                let ids = match self.store.idle_connections(&i.id, &m.id, cutoff, 100).await {
                    Ok(ids) => ids,
                    Err(e) => {
                        tracing::warn!(integration = %i.id, error = %e, "idle sweep: listing connections failed");
                        continue;
                    }
                };
                for id in ids {
                    match self.refresh_if_idle(&id, cutoff).await {
                        Ok(true) => refreshed += 1,
                        Ok(false) => {}
                        Err(e) => tracing::info!(connection = %id, error = %e, "idle sweep: refresh failed"),
                    }
                }
            }
        }
        refreshed
    }

    /// Refreshes `id` if, under its row lock, it is still idle since before
    /// `cutoff`: a connection another instance's sweeper (or a request)
    /// refreshed meanwhile, or one used since, is left alone. The same
    /// locks as a request's refresh: never two refreshes of one connection.
    async fn refresh_if_idle(&self, id: &str, cutoff: i64) -> Result<bool, RefreshError> {
        let local = self.oauth.locks.get_with_by_ref(id, async { Arc::new(tokio::sync::Mutex::new(())) }).await;
        let _guard = local.lock().await;
        let lock = self.lock_row(id).await?;
        let m = &lock.row().meta;
        let a = &m.activity;
        let last_active = m.created_at.max(a.last_used_at.unwrap_or(0)).max(a.last_refreshed_at.unwrap_or(0));
        if m.state != ConnectionState::Active || last_active >= cutoff || self.oauth.cooldown.contains_key(id) {
            return Ok(false);
        }
        let current = self.decrypt_row(lock.row().clone()).await?;
        let Some(o) = current.method.oauth2() else { return Ok(false) };
        let tokens = current.tokens.as_deref().cloned().unwrap_or_default();
        let Some(rt) = tokens.refresh_token.clone() else { return Ok(false) };
        let client = self.client_for(&current, o).await?;
        match self.oauth.client.refresh(o, &client, rt.expose()).await {
            Ok(resp) => {
                let fresh = tokens.updated(resp, unix_now(), o.default_expires_in_secs);
                self.stats.refreshes.fetch_add(1, Relaxed);
                self.store_refreshed(lock, &current, fresh).await?;
                tracing::info!(connection = %id, integration = %current.integration.id, "idle connection refreshed");
                Ok(true)
            }
            Err(e) => Err(self.refresh_failed(lock, &current, o.grant, e).await),
        }
    }

    /// The connection's row lock (another instance's refresh ends first),
    /// waiting at most `oauth2.refresh_lock_wait_ms`, counted in the stats.
    async fn lock_row(&self, id: &str) -> Result<Box<dyn RowLock>, RefreshError> {
        let waited = std::time::Instant::now();
        let lock = self.store.lock_connection(id, self.oauth.lock_wait).await;
        self.stats.lock_waits.fetch_add(1, Relaxed);
        self.stats.lock_wait_micros.fetch_add(waited.elapsed().as_micros() as u64, Relaxed);
        if let Err(StoreError::LockTimeout(_)) = &lock {
            self.stats.lock_timeouts.fetch_add(1, Relaxed);
        }
        Ok(lock?.ok_or(ResolveError::NotFound)?)
    }

    /// Seals and commits a refreshed token set under the row lock (and so
    /// releases it) before anyone uses it — a rotated refresh token must
    /// survive a crash — then caches it.
    async fn store_refreshed(
        &self,
        lock: Box<dyn RowLock>,
        current: &Resolved,
        fresh: TokenSet,
    ) -> Result<Arc<Resolved>, RefreshError> {
        let id = &*current.meta.id;
        let plaintext = Zeroizing::new(serde_json::to_vec(&fresh).expect("token sets serialize"));
        let sealed = self.seal(&current.meta.org_id, id, &plaintext).await?;
        let now = unix_now();
        // The first success after failures: `connection.recovered`.
        let row = &lock.row().meta;
        let recovered = row.activity.refresh_failed_at.is_some();
        let event =
            recovered.then(|| events::connection_event(Kind::Recovered, row, ConnectionState::Active, None, None));
        lock.commit(Some(RowUpdate::Credential(sealed)), now, event.as_ref()).await?;
        let mut meta = current.meta.clone();
        meta.updated_at = now;
        let next = Arc::new(Resolved {
            meta,
            integration: current.integration.clone(),
            method: current.method.clone(),
            credential: Credential::from_tokens(&fresh),
            tokens: Some(Box::new(fresh)),
            use_noted: AtomicI64::new(current.use_noted.load(Relaxed)),
        });
        self.cache.insert(next.meta.id.clone(), next.clone()).await;
        self.changed();
        tracing::info!(connection = %id, integration = %current.integration.id, "oauth2 token refreshed");
        Ok(next)
    }

    /// Starts an authorization-code flow: stores `state` (hashed) and the
    /// sealed PKCE verifier, and returns the provider URL and its expiry.
    pub async fn start_authorization(
        &self,
        req: AuthorizeRequest,
        redirect_uri: &str,
    ) -> Result<(String, i64), AuthorizeError> {
        super::check_ids(&req.org_id, &req.user_id)?;
        if let Some(rt) = &req.return_to {
            let ok = rt
                .parse::<http::Uri>()
                .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                return Err(AuthorizeError::BadReturnTo);
            }
        }
        let integration = self
            .integrations()
            .get(&req.integration)
            .cloned()
            .ok_or_else(|| CreateError::UnknownIntegration(req.integration.clone()))?;
        let method = integration.auth_method(&req.auth_method).ok_or_else(|| CreateError::UnknownAuthMethod {
            integration: req.integration.clone(),
            method: req.auth_method.clone(),
        })?;
        let o = match method.oauth2() {
            Some(o) if o.grant == Grant::AuthorizationCode => o,
            _ => return Err(AuthorizeError::NotAuthorizationCode(method.id.clone())),
        };
        if let Some(id) = &req.connection_id {
            let existing = self.store.get_connection(id).await?.ok_or(AuthorizeError::ConnectionNotFound)?.meta;
            if existing.org_id != req.org_id {
                // Another organization's connection: indistinguishable from none.
                return Err(AuthorizeError::ConnectionNotFound);
            }
            if existing.integration != req.integration || existing.auth_method != req.auth_method {
                return Err(AuthorizeError::ConnectionMismatch);
            }
        }
        let client = self.oauth_client(&req.org_id, &req.integration, &req.auth_method, o).await?;
        let state = oauth2::random_urlsafe(32);
        let state_hash = sha256_hex(&state);
        let pkce = o.pkce.then(Pkce::new);
        let verifier = pkce.as_ref().map_or("", |p| p.verifier.expose());
        let sealed = self.seal(&req.org_id, &pending_context(&state_hash), verifier.as_bytes()).await?;
        let now = unix_now();
        let expires_at = now + self.oauth.state_ttl.as_secs() as i64;
        self.store
            .insert_pending(&PendingAuthorization {
                state_hash,
                org_id: req.org_id,
                user_id: req.user_id,
                integration: req.integration,
                auth_method: req.auth_method,
                redirect_uri: redirect_uri.to_owned(),
                return_to: req.return_to,
                connection_id: req.connection_id,
                connect_session: req.connect_session,
                verifier: sealed,
                created_at: now,
                expires_at,
            })
            .await?;
        let scopes = req.scopes.unwrap_or_else(|| o.scopes.clone());
        let url = oauth2::authorization_url(
            o,
            &client,
            redirect_uri,
            &state,
            pkce.as_ref().map(|p| p.challenge.as_str()),
            &scopes,
        );
        Ok((url, expires_at))
    }

    /// The callback's first step: consumes `state` (once) and returns
    /// what was pending under it, unless it expired.
    pub async fn take_authorization(&self, state: &str) -> Result<PendingAuthorization, AuthorizeError> {
        let pending = self.store.take_pending(&sha256_hex(state)).await?.ok_or(AuthorizeError::UnknownState)?;
        if pending.expires_at < unix_now() {
            return Err(AuthorizeError::StateExpired);
        }
        Ok(pending)
    }

    /// The callback's second step: exchanges the code with the verifier,
    /// stores the token set and creates (or re-authorizes) the connection.
    /// One started from a connect page claims its session first: a session
    /// makes one connection at most.
    pub async fn finish_authorization(
        &self,
        pending: &PendingAuthorization,
        outcome: Result<&str, &str>,
    ) -> Result<ConnectionMeta, AuthorizeError> {
        let code = outcome
            .map_err(|e| AuthorizeError::Provider(e.chars().filter(|c| c.is_ascii_graphic()).take(64).collect()))?;
        let Some(session) = &pending.connect_session else {
            return self.exchange_and_store(pending, code).await;
        };
        if !self.store.claim_connect_session(session, unix_now()).await? {
            return Err(AuthorizeError::SessionUsed);
        }
        let made = self.exchange_and_store(pending, code).await;
        let finished = self.store.finish_connect_session(session, made.as_ref().ok().map(|m| m.id.as_str())).await;
        if let Err(e) = finished {
            tracing::warn!(session = %session, error = %e, "recording the connect session's outcome failed");
        }
        made
    }

    async fn exchange_and_store(
        &self,
        pending: &PendingAuthorization,
        code: &str,
    ) -> Result<ConnectionMeta, AuthorizeError> {
        let method = self
            .integrations()
            .get(&pending.integration)
            .and_then(|i| i.auth_method(&pending.auth_method))
            .cloned()
            .ok_or_else(|| CreateError::UnknownAuthMethod {
                integration: pending.integration.clone(),
                method: pending.auth_method.clone(),
            })?;
        let o: &OAuth2Method =
            method.oauth2().ok_or_else(|| AuthorizeError::NotAuthorizationCode(method.id.clone()))?;
        let ctx =
            crate::crypto::Context { org_id: &pending.org_id, connection_id: &pending_context(&pending.state_hash) };
        let verifier = self.envelope.open(ctx, &super::from_store(pending.verifier.clone())).await?;
        let verifier = SecretValue::new(String::from_utf8(verifier.to_vec()).map_err(|_| CryptoError::Open)?);
        let verifier = (!verifier.expose().is_empty()).then_some(verifier);
        let client = self.oauth_client(&pending.org_id, &pending.integration, &pending.auth_method, o).await?;
        let resp = self
            .oauth
            .client
            .exchange_code(o, &client, code, &pending.redirect_uri, verifier.as_ref())
            .await
            .map_err(AuthorizeError::Exchange)?;
        let tokens = TokenSet::default().updated(resp, unix_now(), o.default_expires_in_secs);
        let plaintext = Zeroizing::new(serde_json::to_vec(&tokens).expect("token sets serialize"));
        if let Some(id) = &pending.connection_id {
            // Re-authorization: new tokens replace the old ones, the state is active again.
            let sealed = self.seal(&pending.org_id, id, &plaintext).await?;
            let before = self.store.get_connection(id).await?.ok_or(AuthorizeError::ConnectionNotFound)?.meta;
            let active = ConnectionState::Active;
            let event = events::connection_event(Kind::Reauthorized, &before, active, None, None);
            if !self.store.update_credential(id, &sealed, active, unix_now(), Some(&event)).await? {
                return Err(AuthorizeError::ConnectionNotFound);
            }
            self.cache.invalidate(id.as_str()).await;
            self.changed();
            self.oauth.cooldown.invalidate(id).await;
            let meta = self.store.get_connection(id).await?.ok_or(AuthorizeError::ConnectionNotFound)?.meta;
            tracing::info!(connection = %meta.id, org = %meta.org_id, integration = %meta.integration, "oauth2 connection re-authorized");
            return Ok(meta);
        }
        let p = pending.clone();
        let meta = self.insert_new(p.org_id, p.user_id, p.integration, p.auth_method, &plaintext).await?;
        tracing::info!(connection = %meta.id, org = %meta.org_id, integration = %meta.integration, "oauth2 connection authorized");
        Ok(meta)
    }

    /// Revokes an OAuth2 connection's tokens at the provider (RFC 7009):
    /// the refresh token first (it usually takes the grant with it), then
    /// the access token.
    pub async fn revoke_at_provider(&self, id: &str) -> Revocation {
        let r = match self.load(id).await {
            Ok(r) => r,
            Err(e) => return Revocation::Failed(e.to_string()),
        };
        let (Some(o), Some(tokens)) = (r.method.oauth2(), r.tokens.as_ref()) else {
            return Revocation::NotApplicable;
        };
        if o.revocation_url.is_none() {
            return Revocation::NotApplicable;
        }
        let client = match self.client_for(&r, o).await {
            Ok(c) => c,
            Err(e) => return Revocation::Failed(e.to_string()),
        };
        let mut outcome = Revocation::NotApplicable;
        for (token, hint) in [(&tokens.refresh_token, "refresh_token"), (&tokens.access_token, "access_token")] {
            let token = token.as_ref().map(SecretValue::expose);
            let Some(token) = token else { continue };
            match self.oauth.client.revoke(o, &client, token, hint).await {
                Ok(()) if outcome == Revocation::NotApplicable => outcome = Revocation::Revoked,
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(connection = %id, error = %e, "oauth2 revocation failed");
                    outcome = Revocation::Failed(e.to_string());
                }
            }
        }
        outcome
    }
}
