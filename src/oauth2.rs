//! OAuth2 on the wire: token sets, PKCE, and the token-endpoint client
//! (authorization code, refresh, client credentials, RFC 7009 revocation).
//!
//! The client is built explicitly: it never reads `HTTP_PROXY`/`HTTPS_PROXY`
//! (our calls must not loop through credproxy), it has timeouts, and its
//! connector applies the same SSRF guard as the proxy. Uses `integrations`,
//! `upstream`, `secret`; must not import `creds`, `proxy` or `admin`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::integrations::{ClientAuth, OAuth2Method};
use crate::policy::ssrf::EgressPolicy;
use crate::secret::SecretValue;
use crate::upstream::{self, ClientSettings, GuardedConnector};

/// Largest token-endpoint response we read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// What a connection of an `oauth2` auth method stores (sealed). The
/// tokens are [`SecretValue`]s: zeroized on drop, `[redacted]` in `Debug`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenSet {
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::secret::serde_opt")]
    pub access_token: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::secret::serde_opt")]
    pub refresh_token: Option<SecretValue>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Unix seconds when the access token was obtained (absent in records
    /// written before it was kept): with `expires_at`, its lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl TokenSet {
    /// True if there is no access token, or it expires within the skew.
    /// The skew is `skew_secs`, but never more than half the token's
    /// lifetime: a provider issuing tokens shorter than the skew would
    /// otherwise get a token call on every request.
    pub fn needs_refresh(&self, now: i64, skew_secs: u64) -> bool {
        match (&self.access_token, self.expires_at) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(_), Some(exp)) => exp - now <= self.effective_skew(skew_secs),
        }
    }

    /// `skew_secs`, bounded by half of the token's lifetime when known.
    pub fn effective_skew(&self, skew_secs: u64) -> i64 {
        let skew = skew_secs as i64;
        match (self.issued_at, self.expires_at) {
            (Some(issued), Some(exp)) if exp > issued => skew.min((exp - issued) / 2),
            _ => skew,
        }
    }

    /// Applies a token response: a response without a new refresh token
    /// keeps the old one; no `expires_in` means the configured default.
    pub fn updated(&self, resp: TokenResponse, now: i64, default_lifetime: u64) -> TokenSet {
        let mut resp = resp;
        TokenSet {
            access_token: Some(SecretValue::new(std::mem::take(&mut resp.access_token))),
            refresh_token: resp.refresh_token.take().map(SecretValue::new).or_else(|| self.refresh_token.clone()),
            expires_at: Some(now + resp.expires_in.unwrap_or(default_lifetime) as i64),
            issued_at: Some(now),
            token_type: resp.token_type.take(),
            scope: resp.scope.take().or_else(|| self.scope.clone()),
        }
    }
}

/// A successful token-endpoint response (RFC 6749 §5.1).
#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default)]
    #[zeroize(skip)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// Why a token request failed, tagged by what the caller should do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The grant is dead (RFC 6749 `invalid_grant`): a user must re-authorize.
    #[error("the provider rejected the grant (invalid_grant)")]
    InvalidGrant,
    /// The provider refused for another reason (`invalid_client`, ...): a configuration problem.
    #[error("the token endpoint refused the request: {0}")]
    Rejected(String),
    /// Unreachable, 5xx, timeout, garbage: try again later.
    #[error("the token endpoint is unavailable: {0}")]
    Unavailable(String),
}

/// PKCE (RFC 7636) verifier and S256 challenge, plus a `state`.
pub struct Pkce {
    pub verifier: SecretValue,
    pub challenge: String,
}

pub fn random_urlsafe(bytes: usize) -> String {
    let mut b = Zeroizing::new(vec![0u8; bytes]);
    SystemRandom::new().fill(&mut b).expect("the system random source failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b[..])
}

impl Pkce {
    pub fn new() -> Self {
        let verifier = random_urlsafe(48); // 64 characters
        Self::from_verifier(SecretValue::new(verifier))
    }

    pub fn from_verifier(verifier: SecretValue) -> Self {
        let d = digest::digest(&digest::SHA256, verifier.expose().as_bytes());
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref());
        Self { verifier, challenge }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

/// The OAuth client credproxy acts as for a connection: the integration's
/// (`client_id`/`client_secret` in its file), or the organization's own
/// app (`PUT /v1/orgs/{org}/oauth-apps/…`).
#[derive(Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: SecretValue,
    /// An organization's own app rather than the integration's client.
    pub org_app: bool,
}

impl OAuthClient {
    /// The integration's client.
    pub fn of_integration(m: &OAuth2Method) -> Self {
        Self { client_id: m.client_id.clone(), client_secret: m.client_secret.clone(), org_app: false }
    }
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("org_app", &self.org_app)
            .finish()
    }
}

/// The provider URL a user is sent to.
pub fn authorization_url(
    m: &OAuth2Method,
    client: &OAuthClient,
    redirect_uri: &str,
    state: &str,
    challenge: Option<&str>,
    scopes: &[String],
) -> String {
    let base = m.authorize_url.as_ref().map(Uri::to_string).unwrap_or_default();
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("response_type", "code");
    q.append_pair("client_id", &client.client_id);
    q.append_pair("redirect_uri", redirect_uri);
    if !scopes.is_empty() {
        q.append_pair("scope", &scopes.join(" "));
    }
    q.append_pair("state", state);
    if let Some(c) = challenge {
        q.append_pair("code_challenge", c);
        q.append_pair("code_challenge_method", "S256");
    }
    for (k, v) in &m.authorize_params {
        q.append_pair(k, v);
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{}", q.finish())
}

/// The client for token and revocation endpoints.
#[derive(Clone)]
pub struct TokenClient {
    client: Client<HttpsConnector<GuardedConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl TokenClient {
    pub fn new(
        policy: Arc<EgressPolicy>,
        connect_timeout: Duration,
        timeout: Duration,
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Self {
        // No pooling: token calls are rare (one per refresh), and a POST on a
        // keep-alive connection the provider just closed fails without a safe
        // retry — which would turn a routine refresh into a 502.
        let settings = ClientSettings {
            connect_timeout,
            extra_roots: extra_roots.to_vec(),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 0,
        };
        Self { client: upstream::build_client(policy, &settings), timeout }
    }

    pub async fn exchange_code(
        &self,
        m: &OAuth2Method,
        client: &OAuthClient,
        code: &str,
        redirect_uri: &str,
        verifier: Option<&SecretValue>,
    ) -> Result<TokenResponse, TokenError> {
        let mut p: Vec<(&str, &str)> =
            vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect_uri)];
        if let Some(v) = verifier {
            p.push(("code_verifier", v.expose()));
        }
        self.token(m, client, p).await
    }

    pub async fn refresh(
        &self,
        m: &OAuth2Method,
        client: &OAuthClient,
        refresh_token: &str,
    ) -> Result<TokenResponse, TokenError> {
        self.token(m, client, vec![("grant_type", "refresh_token"), ("refresh_token", refresh_token)]).await
    }

    pub async fn client_credentials(
        &self,
        m: &OAuth2Method,
        client: &OAuthClient,
    ) -> Result<TokenResponse, TokenError> {
        let scope = m.scopes.join(" ");
        let mut p = vec![("grant_type", "client_credentials")];
        if !scope.is_empty() {
            p.push(("scope", &scope));
        }
        self.token(m, client, p).await
    }

    /// RFC 7009. `Ok(())` when the provider answered 200.
    pub async fn revoke(
        &self,
        m: &OAuth2Method,
        client: &OAuthClient,
        token: &str,
        hint: &str,
    ) -> Result<(), TokenError> {
        let Some(url) = &m.revocation_url else {
            return Err(TokenError::Rejected("no revocation_url configured".into()));
        };
        let (status, _) = self.post(m, client, url, vec![("token", token), ("token_type_hint", hint)], false).await?;
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() {
            Err(TokenError::Unavailable(format!("revocation endpoint answered {status}")))
        } else {
            Err(TokenError::Rejected(format!("revocation endpoint answered {status}")))
        }
    }

    async fn token(
        &self,
        m: &OAuth2Method,
        client: &OAuthClient,
        mut params: Vec<(&str, &str)>,
    ) -> Result<TokenResponse, TokenError> {
        for (k, v) in &m.token_params {
            params.push((k, v));
        }
        let (status, body) = self.post(m, client, &m.token_url, params, true).await?;
        if status.is_success() {
            // Not JSON (a proxy's error page, a truncated answer): maybe
            // transient. JSON without an access token: the provider's answer,
            // and a refusal in all but name.
            let value: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|_| TokenError::Unavailable(format!("token endpoint answered {status} with no JSON body")))?;
            return serde_json::from_value::<TokenResponse>(value).map_err(|_| {
                TokenError::Rejected(format!("token endpoint answered {status} without a usable access_token"))
            });
        }
        let error = serde_json::from_slice::<ErrorResponse>(&body).map(|e| e.error).ok();
        match (status, error.as_deref()) {
            (_, Some("invalid_grant")) => Err(TokenError::InvalidGrant),
            (s, _) if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(TokenError::Unavailable(format!("token endpoint answered {s}")))
            }
            // Error codes are an RFC 6749 vocabulary, never a secret.
            (s, Some(e)) => Err(TokenError::Rejected(format!(
                "{s}: {}",
                e.chars().filter(|c| c.is_ascii_graphic()).take(64).collect::<String>()
            ))),
            (s, None) => Err(TokenError::Rejected(format!("token endpoint answered {s}"))),
        }
    }

    async fn post(
        &self,
        m: &OAuth2Method,
        client: &OAuthClient,
        url: &Uri,
        mut params: Vec<(&str, &str)>,
        accept_json: bool,
    ) -> Result<(StatusCode, Bytes), TokenError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if accept_json {
            req = req.header(header::ACCEPT, "application/json");
        }
        match m.client_auth {
            ClientAuth::ClientSecretBasic => {
                // RFC 6749 §2.3.1: form-encode id and secret before base64.
                let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let raw = Zeroizing::new(format!("{}:{}", enc(&client.client_id), enc(client.client_secret.expose())));
                let mut v = http::HeaderValue::try_from(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
                ))
                .map_err(|_| TokenError::Rejected("client credentials cannot form a header".into()))?;
                v.set_sensitive(true);
                req = req.header(header::AUTHORIZATION, v);
            }
            ClientAuth::ClientSecretPost => {
                params.push(("client_id", &client.client_id));
                params.push(("client_secret", client.client_secret.expose()));
            }
        }
        // The serializer is not Send: finish it before any await.
        let body = {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &params {
                ser.append_pair(k, v);
            }
            Zeroizing::new(ser.finish())
        };
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|_| TokenError::Rejected("invalid token endpoint URL".into()))?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| TokenError::Unavailable(describe(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .map_err(|_| TokenError::Unavailable("reading the token response failed".into()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| TokenError::Unavailable(format!("no response within {:?}", self.timeout)))?
    }
}

fn describe(e: &hyper_util::client::legacy::Error) -> String {
    match upstream::find_connect_error(e) {
        Some(c) => c.to_string(),
        None if upstream::is_tls_error(e) => "TLS failure".into(),
        None => {
            // hyper/rustls errors describe transport failures; they never carry request data.
            let mut s = String::from("connection failed");
            let mut cur = std::error::Error::source(e);
            while let Some(inner) = cur {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                cur = inner.source();
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_example() {
        let p = Pkce::from_verifier(SecretValue::from("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"));
        assert_eq!(p.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        assert_eq!(Pkce::new().verifier.expose().len(), 64);
    }

    #[test]
    fn refresh_decisions_and_updates() {
        let mut t = TokenSet::default();
        assert!(t.needs_refresh(1000, 60));
        t.access_token = Some("a".into());
        t.refresh_token = Some("r1".into());
        t.expires_at = Some(1100);
        assert!(!t.needs_refresh(1000, 60));
        assert!(t.needs_refresh(1040, 60));
        let resp = TokenResponse {
            access_token: "b".into(),
            token_type: None,
            expires_in: None,
            refresh_token: None,
            scope: None,
        };
        let u = t.updated(resp, 2000, 3600);
        assert_eq!(u.access_token.as_ref().map(SecretValue::expose), Some("b"));
        let kept = u.refresh_token.as_ref().map(SecretValue::expose);
        assert_eq!(kept, Some("r1"), "a response without refresh_token keeps the old one");
        assert_eq!(u.expires_at, Some(5600));
        let dbg = format!("{u:?}");
        assert!(!dbg.contains("r1") && !dbg.contains("\"b\""), "{dbg}");
        assert!(dbg.contains("access_token: Some([redacted])"), "{dbg}");
    }

    /// Sealed token sets written before the tokens were `SecretValue`s
    /// still read, and new ones are written the same way.
    #[test]
    fn the_stored_form_of_a_token_set_is_plain_json_strings() {
        let stored =
            r#"{"access_token":"at-1","refresh_token":"rt-1","expires_at":1100,"issued_at":1000,"scope":"read"}"#;
        let t: TokenSet = serde_json::from_str(stored).unwrap();
        assert_eq!(t.access_token.as_ref().map(SecretValue::expose), Some("at-1"));
        assert_eq!(t.refresh_token.as_ref().map(SecretValue::expose), Some("rt-1"));
        assert_eq!(serde_json::to_string(&t).unwrap(), stored);
        let empty: TokenSet = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, TokenSet::default());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
    }

    #[test]
    fn the_skew_never_exceeds_half_a_tokens_lifetime() {
        let token = |issued: Option<i64>, expires: i64| TokenSet {
            access_token: Some("a".into()),
            issued_at: issued,
            expires_at: Some(expires),
            ..Default::default()
        };
        // A 10-second token with the default 60 s skew: fresh for its first half.
        let t = token(Some(1000), 1010);
        assert_eq!(t.effective_skew(60), 5);
        assert!(!t.needs_refresh(1000, 60));
        assert!(!t.needs_refresh(1004, 60));
        assert!(t.needs_refresh(1005, 60));
        // A long token keeps the configured skew.
        let t = token(Some(1000), 4600);
        assert_eq!(t.effective_skew(60), 60);
        assert!(!t.needs_refresh(4539, 60) && t.needs_refresh(4540, 60));
        // Records from before issued_at was kept: the configured skew.
        assert_eq!(token(None, 1010).effective_skew(60), 60);
        // A token that arrives already expired (expires_in 0) is stale at once.
        assert!(token(Some(1000), 1000).needs_refresh(1000, 60));
    }
}
