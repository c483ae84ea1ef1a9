//! Organizations' own OAuth apps: an organization registers its own OAuth
//! client for an integration's `oauth2` auth method, and every token call
//! for that organization's connections (authorization, code exchange,
//! refresh, client credentials, revocation) uses it instead of the
//! integration's client. The secret is sealed like a credential (its
//! encryption context binds it to organization, integration and method)
//! and never leaves the process but towards the provider.

use std::sync::Arc;
use std::time::Duration;

use super::{from_store, Connections};
use crate::crypto::{self, CryptoError};
use crate::integrations::OAuth2Method;
use crate::oauth2::OAuthClient;
use crate::secret::SecretValue;
use crate::store::{OAuthApp, OAuthAppRow, StoreError};

/// How long an instance keeps what it read of an organization's app (or
/// that it has none). A change made through this instance applies at
/// once; other instances see it within this time.
pub const APP_CACHE_TTL: Duration = Duration::from_secs(10);

/// What the encryption context of an app's secret is bound to.
pub(super) fn app_context(id: &str) -> String {
    format!("oauth-app:{id}")
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthAppError {
    #[error("unknown integration {0:?}")]
    UnknownIntegration(String),
    #[error("integration {integration:?} has no auth method {method:?}")]
    UnknownAuthMethod { integration: String, method: String },
    #[error("auth method {0:?} is not an oauth2 method: it has no OAuth client")]
    NotOAuth2(String),
    /// A field is missing or malformed (the message names it, never its value).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Reading an organization's app failed (a token call cannot go on).
#[derive(Debug, thiserror::Error)]
pub enum AppLookupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl From<AppLookupError> for super::RefreshError {
    fn from(e: AppLookupError) -> Self {
        match e {
            AppLookupError::Store(e) => Self::Store(e),
            AppLookupError::Crypto(e) => Self::Crypto(e),
        }
    }
}

impl From<AppLookupError> for super::AuthorizeError {
    fn from(e: AppLookupError) -> Self {
        match e {
            AppLookupError::Store(e) => Self::Store(e),
            AppLookupError::Crypto(e) => Self::Crypto(e),
        }
    }
}

/// The longest client id and secret taken.
const MAX_CLIENT_ID: usize = 512;
const MAX_CLIENT_SECRET: usize = 4096;

fn check(field: &str, value: &str, max: usize) -> Result<(), OAuthAppError> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(OAuthAppError::Invalid(format!("{field} must be 1-{max} bytes without control characters")));
    }
    Ok(())
}

impl Connections {
    /// Creates or replaces `org_id`'s own OAuth client for an `oauth2` auth
    /// method. Applies at once on this instance.
    pub async fn put_oauth_app(
        &self,
        org_id: &str,
        integration: &str,
        auth_method: &str,
        client_id: String,
        client_secret: SecretValue,
    ) -> Result<OAuthApp, OAuthAppError> {
        let integrations = self.integrations();
        let i = integrations.get(integration).ok_or_else(|| OAuthAppError::UnknownIntegration(integration.into()))?;
        let m = i.auth_method(auth_method).ok_or_else(|| OAuthAppError::UnknownAuthMethod {
            integration: integration.into(),
            method: auth_method.into(),
        })?;
        if m.oauth2().is_none() {
            return Err(OAuthAppError::NotOAuth2(auth_method.into()));
        }
        check("client_id", &client_id, MAX_CLIENT_ID)?;
        check("client_secret", client_secret.expose(), MAX_CLIENT_SECRET)?;
        let id = OAuthAppRow::id_of(org_id, integration, auth_method);
        let sealed = self.seal(org_id, &app_context(&id), client_secret.expose().as_bytes()).await?;
        let now = super::unix_now();
        let mut app = OAuthApp {
            org_id: org_id.into(),
            integration: integration.into(),
            auth_method: auth_method.into(),
            client_id,
            created_at: now,
            updated_at: now,
        };
        // A replacement keeps its first created_at: the store says which.
        app.created_at = self.store.put_oauth_app(&OAuthAppRow { app: app.clone(), sealed }).await?;
        self.oauth.apps.invalidate(&id).await;
        tracing::info!(org = %org_id, integration, auth_method, "organization oauth app set");
        Ok(app)
    }

    pub async fn get_oauth_app(
        &self,
        org_id: &str,
        integration: &str,
        auth_method: &str,
    ) -> Result<Option<OAuthApp>, StoreError> {
        Ok(self.store.get_oauth_app(org_id, integration, auth_method).await?.map(|r| r.app))
    }

    /// Removes `org_id`'s app: its connections go back to the
    /// integration's client. True if there was one.
    pub async fn delete_oauth_app(
        &self,
        org_id: &str,
        integration: &str,
        auth_method: &str,
    ) -> Result<bool, StoreError> {
        let gone = self.store.delete_oauth_app(org_id, integration, auth_method).await?;
        self.oauth.apps.invalidate(&OAuthAppRow::id_of(org_id, integration, auth_method)).await;
        if gone {
            tracing::info!(org = %org_id, integration, auth_method, "organization oauth app removed");
        }
        Ok(gone)
    }

    pub async fn list_oauth_apps(&self, org_id: &str) -> Result<Vec<OAuthApp>, StoreError> {
        Ok(self.store.list_oauth_apps(org_id).await?.into_iter().map(|r| r.app).collect())
    }

    /// The OAuth client for `org_id`'s connections of this method: the
    /// organization's own app if it has one, else the integration's.
    pub(super) async fn oauth_client(
        &self,
        org_id: &str,
        integration: &str,
        auth_method: &str,
        m: &OAuth2Method,
    ) -> Result<Arc<OAuthClient>, AppLookupError> {
        let id = OAuthAppRow::id_of(org_id, integration, auth_method);
        let found = match self.oauth.apps.get(&id).await {
            Some(found) => found,
            None => {
                let found = match self.store.get_oauth_app(org_id, integration, auth_method).await? {
                    Some(row) => {
                        let ctx = crypto::Context { org_id, connection_id: &app_context(&id) };
                        let secret = self.envelope.open(ctx, &from_store(row.sealed)).await?;
                        let secret = String::from_utf8(secret.to_vec()).map_err(|_| CryptoError::Open)?;
                        Some(Arc::new(OAuthClient {
                            client_id: row.app.client_id,
                            client_secret: SecretValue::new(secret),
                            org_app: true,
                        }))
                    }
                    None => None,
                };
                self.oauth.apps.insert(id, found.clone()).await;
                found
            }
        };
        Ok(found.unwrap_or_else(|| Arc::new(OAuthClient::of_integration(m))))
    }
}
