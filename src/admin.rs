//! The admin API: health, integrations and connections. JSON in and out,
//! problem+json errors, bearer tokens (global or org-scoped). No response
//! ever contains a credential value.
//!
//! Uses `creds` and `outbound`; only `server` imports this module.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ring::digest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::audit::{AdminAction, Audit};
use crate::config::AdminToken;
use crate::connect::{ConnectSettings, NewSession, SessionError, SessionRequest};
use crate::creds::{AuthorizeError, AuthorizeRequest, Connections, CreateError, NewConnection, Revocation};
use crate::outbound::{Outbound, ProxyError};
use crate::problem::{Code, Problem};
use crate::runtoken::{RunClaims, RunTokenKeys};
use crate::secret::SecretValue;
use crate::store::{ConnectionMeta, LastTest, StoreError};

pub struct AdminState {
    pub connections: Arc<Connections>,
    /// Sends connection tests through the same inject/refresh/forward path as the proxy.
    outbound: Arc<Outbound>,
    /// The public listener's settings: the OAuth2 redirect URI, and what
    /// connect sessions may ask for.
    connect: Arc<ConnectSettings>,
    /// SHA-256 of each token with its scope and name; compared in constant time.
    tokens: Vec<([u8; 32], Scope, TokenName)>,
    interceptor: Option<Arc<crate::tls::Interceptor>>,
    /// Set when shutdown starts: `/readyz` answers 503.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Mints run tokens (`POST /v1/run-tokens`).
    run_tokens: Option<RunTokenIssuer>,
    /// One line per action on a credential.
    audit: Audit,
    /// Cool-downs in force (shown on a connection), quota metrics.
    quotas: Arc<crate::quota::Quotas>,
    /// Where a reload reads the integration files (none: no reloads).
    integrations_dir: Option<std::path::PathBuf>,
}

/// What minting run tokens needs: the keys and the lifetimes allowed.
pub struct RunTokenIssuer {
    pub keys: Arc<RunTokenKeys>,
    pub default_ttl: std::time::Duration,
    pub max_ttl: std::time::Duration,
}

impl AdminState {
    pub fn new(
        connections: Arc<Connections>,
        outbound: Arc<Outbound>,
        tokens: &[AdminToken],
        connect: Arc<ConnectSettings>,
        interceptor: Option<Arc<crate::tls::Interceptor>>,
        draining: Arc<std::sync::atomic::AtomicBool>,
        audit: Audit,
    ) -> Self {
        let tokens = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let scope = t.org_id.clone().map_or(Scope::Global, Scope::Org);
                (sha256(t.token.expose().as_bytes()), scope, TokenName(t.audit_name(i).into()))
            })
            .collect();
        let quotas = Arc::new(crate::quota::Quotas::none());
        Self {
            connections,
            outbound,
            connect,
            tokens,
            interceptor,
            draining,
            run_tokens: None,
            audit,
            quotas,
            integrations_dir: None,
        }
    }

    /// Reloads from `dir` (`POST /v1/integrations/reload`, `SIGHUP`).
    pub fn with_integrations_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.integrations_dir = Some(dir);
        self
    }

    /// Reads the integration files again and, if every one is valid, puts
    /// them in force: the credential cache is dropped (the next request of
    /// each connection resolves against the new set; a connection whose
    /// method is gone gets 409 `auth_method_removed`) and the quotas are
    /// rebuilt (unchanged limiters keep their state). An invalid set
    /// changes nothing. Request metrics of an integration added by a
    /// reload count under `none` until a restart.
    pub fn reload_integrations(&self) -> Result<Vec<String>, crate::config::ConfigError> {
        let dir = self.integrations_dir.as_ref().ok_or_else(|| {
            crate::config::ConfigError::new("(reload)", "integrations.dir", "this server was started without one")
        })?;
        let env = crate::config::process_env();
        let new = Arc::new(crate::integrations::Integrations::load_dir(dir, &env)?);
        self.connections.replace_integrations(new.clone());
        self.quotas.reload(&new);
        let ids: Vec<String> = new.iter().map(|i| i.id.clone()).collect();
        tracing::info!(integrations = %ids.join(","), "integrations reloaded");
        Ok(ids)
    }

    /// Shows `quotas`' cool-downs and metrics.
    pub fn with_quotas(mut self, quotas: Arc<crate::quota::Quotas>) -> Self {
        self.quotas = quotas;
        self
    }

    /// Serves `POST /v1/run-tokens` with `issuer`.
    pub fn with_run_tokens(mut self, issuer: RunTokenIssuer) -> Self {
        self.run_tokens = Some(issuer);
        self
    }

    fn scope_for(&self, presented: &str) -> Option<(Scope, TokenName)> {
        let h = sha256(presented.as_bytes());
        let mut found = None;
        // Check every token so timing does not depend on which one matched.
        for (t, scope, name) in &self.tokens {
            if crate::secret::constant_time_eq(t, &h) {
                found = Some((scope.clone(), name.clone()));
            }
        }
        found
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The name of the admin token a request came with (`admin.tokens[].name`).
#[derive(Debug, Clone)]
struct TokenName(Arc<str>);

/// What an admin action did, for its audit line: set by the handler on
/// its answer. A refused action has none; its line has what the request
/// named.
#[derive(Debug, Clone, Default)]
struct Audited {
    /// Instead of the route's action (re-authorization).
    action: Option<&'static str>,
    org: Option<String>,
    user: Option<String>,
    connection: Option<String>,
    integration: Option<String>,
    auth_method: Option<String>,
    run_token: Option<String>,
    run_subject: Option<String>,
    connect_session: Option<String>,
    /// What went wrong in an answer that is not an error (a failed test).
    code: Option<Code>,
}

impl Audited {
    fn connection(m: &ConnectionMeta) -> Self {
        Self {
            org: Some(m.org_id.clone()),
            user: Some(m.user_id.clone()),
            connection: Some(m.id.clone()),
            integration: Some(m.integration.clone()),
            auth_method: Some(m.auth_method.clone()),
            ..Self::default()
        }
    }
}

/// The audited admin actions: every one that touches a credential.
fn audited_action(method: &axum::http::Method, route: &str) -> Option<&'static str> {
    use axum::http::Method;
    Some(match (method, route) {
        (&Method::POST, "/v1/connections") => "connection.create",
        (&Method::DELETE, "/v1/connections/{id}") => "connection.delete",
        (&Method::POST, "/v1/connections/{id}/test") => "connection.test",
        (&Method::POST, "/v1/oauth2/authorize") => "connection.authorize",
        (&Method::POST, "/v1/connect-sessions") => "connect_session.create",
        (&Method::POST, "/v1/run-tokens") => "run_token.mint",
        (&Method::PUT, "/v1/orgs/{org}/oauth-apps/{integration}/{auth_method}") => "oauth_app.put",
        (&Method::DELETE, "/v1/orgs/{org}/oauth-apps/{integration}/{auth_method}") => "oauth_app.delete",
        _ => return None,
    })
}

/// Writes the audit line of an audited action, after its answer: who
/// (the admin token's name), what, on which connection, and the outcome.
async fn audit(State(st): State<Arc<AdminState>>, route: MatchedPath, req: Request, next: Next) -> Response {
    let Some(action) = audited_action(req.method(), route.as_str()).filter(|_| st.audit.is_on()) else {
        return next.run(req).await;
    };
    let time = std::time::SystemTime::now();
    let token = req.extensions().get::<TokenName>().map(|t| t.0.clone());
    let scope_org = req.extensions().get::<Scope>().and_then(|s| s.org().map(str::to_owned));
    // `/v1/connections/{id}…`: the connection the request named.
    let named = route
        .as_str()
        .starts_with("/v1/connections/")
        .then(|| req.uri().path().split('/').nth(3).map(str::to_owned))
        .flatten();
    let resp = next.run(req).await;
    let done = resp.extensions().get::<Audited>().cloned().unwrap_or_default();
    let code = resp.extensions().get::<Code>().copied().or(done.code);
    st.audit.admin_action(&AdminAction {
        time,
        action: done.action.unwrap_or(action),
        admin_token: token.as_deref(),
        connect_session: done.connect_session.as_deref(),
        org: done.org.as_deref().or(scope_org.as_deref()),
        user: done.user.as_deref(),
        connection: done.connection.as_deref().or(named.as_deref()),
        integration: done.integration.as_deref(),
        auth_method: done.auth_method.as_deref(),
        run_token: done.run_token.as_deref(),
        run_subject: done.run_subject.as_deref(),
        status: resp.status().as_u16(),
        code: code.map(Code::as_str),
    });
    resp
}

/// What an admin token may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Org(String),
}

impl Scope {
    fn org(&self) -> Option<&str> {
        match self {
            Scope::Global => None,
            Scope::Org(o) => Some(o),
        }
    }

    /// The organization a listing asked for (`?org_id=`) as this token may
    /// see it: its own for an org-scoped token (another is 403), and for a
    /// global token the one asked for, or every one (`None`).
    fn filter(&self, asked: Option<String>) -> Result<Option<String>, ApiError> {
        match (self.org(), asked) {
            (Some(s), Some(q)) if s != q => {
                Err(ApiError::new(Code::ForbiddenOrg, "this admin token is scoped to another organization"))
            }
            (Some(s), _) => Ok(Some(s.to_owned())),
            (None, q) => Ok(q),
        }
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    let v1 = Router::new()
        .route("/v1/integrations", get(list_integrations))
        .route("/v1/integrations/reload", axum::routing::post(reload_integrations))
        .route(
            "/v1/integrations/import-openapi",
            axum::routing::post(import_openapi)
                .layer(axum::extract::DefaultBodyLimit::max(crate::openapi::MAX_DOCUMENT_BYTES)),
        )
        .route("/v1/integrations/{id}", get(get_integration))
        .route("/v1/connections", get(list_connections).post(create_connection))
        .route("/v1/connections/{id}", get(get_connection).delete(delete_connection))
        .route("/v1/oauth2/authorize", axum::routing::post(oauth2_authorize))
        .route("/v1/connections/{id}/test", axum::routing::post(test_connection))
        .route("/v1/run-tokens", axum::routing::post(mint_run_token))
        .route("/v1/connect-sessions", axum::routing::post(create_connect_session))
        .route("/v1/orgs/{org}/oauth-apps", get(list_oauth_apps))
        .route(
            "/v1/orgs/{org}/oauth-apps/{integration}/{auth_method}",
            get(get_oauth_app).put(put_oauth_app).delete(delete_oauth_app),
        )
        .route("/v1/events", get(list_events))
        .route("/v1/events/{id}/redeliver", axum::routing::post(redeliver_event))
        // Inside `authenticate`: the audit line names the token that acted.
        .route_layer(middleware::from_fn_with_state(state.clone(), audit))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // Prometheus scrapes without a token: the admin port is private and
        // no label carries a connection id or a secret.
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(state)
}

/// A problem+json error from the admin API.
#[derive(Debug)]
pub struct ApiError(Problem);

impl ApiError {
    fn new(code: Code, detail: impl Into<String>) -> Self {
        Self(Problem::new(code, detail.into()))
    }

    fn not_found(detail: &'static str) -> Self {
        Self::new(Code::NotFound, detail)
    }

    fn connection_not_found() -> Self {
        Self::new(Code::ConnectionNotFound, "no connection with this id is visible to this token")
    }

    fn store(e: StoreError) -> Self {
        tracing::error!(error = %e, "admin: store error");
        Self::new(Code::StoreUnavailable, "the store cannot be reached; retry later")
    }

    fn draining() -> Self {
        Self::new(Code::ShuttingDown, "this instance is draining")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code;
        let mut r = self.0.to_response().map(Body::from);
        // For the audit line.
        r.extensions_mut().insert(code);
        r
    }
}

async fn authenticate(State(st): State<Arc<AdminState>>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented.and_then(|t| st.scope_for(t)) {
        Some((scope, name)) => {
            req.extensions_mut().insert(scope);
            req.extensions_mut().insert(name);
            next.run(req).await
        }
        None => {
            let detail = if presented.is_some() {
                "the admin token was not accepted"
            } else {
                "no admin token: send Authorization: Bearer <admin token>"
            };
            let mut r = ApiError::new(Code::Unauthorized, detail).into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"credproxy-admin\""));
            r
        }
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    if st.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::draining());
    }
    st.connections.store().ping().await.map_err(ApiError::store)?;
    Ok(Json(json!({"status": "ready"})))
}

async fn metrics(State(st): State<Arc<AdminState>>) -> impl IntoResponse {
    let tls = st.interceptor.as_ref().map(|i| (i.minted(), i.cache_hits()));
    let draining = st.draining.load(std::sync::atomic::Ordering::Relaxed);
    let stats = &st.outbound.pool.stats;
    use std::sync::atomic::Ordering::Relaxed;
    let upstream = (stats.opened.load(Relaxed), stats.reused.load(Relaxed));
    let mut body = st.outbound.metrics.render(st.connections.stats(), upstream, tls, draining);
    let outbox = st.connections.store().delivery_counts().await.ok();
    crate::metrics::Metrics::render_outbox(&mut body, outbox);
    st.quotas.render_metrics(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

/// What the admin API shows of an integration: never a client secret.
fn integration_view(st: &AdminState, i: &crate::integrations::Integration) -> Value {
    json!({
        "id": i.id,
        "name": i.name,
        "allowed_hosts": i.allowed_hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "upstream_scheme": i.upstream_scheme.as_str(),
        "base_url": i.base_url,
        "auth_methods": i.auth_methods.iter().map(|m| json!({
            "id": m.id, "type": m.kind_name(), "fields": m.fields,
            // What a form asks for, field by field (empty for OAuth2).
            "form": m.form.iter().map(|f| json!({
                "name": f.name, "label": f.label, "description": f.description, "secret": f.secret,
                "optional": f.optional, "pattern": f.pattern, "placeholder": f.placeholder,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "has_test": i.test.is_some(),
        // The quotas in force: the file's, else `[limits]`' (this instance's share).
        "quotas": st.quotas.describe(&i.id),
    })
}

async fn list_integrations(State(st): State<Arc<AdminState>>) -> Json<Value> {
    let items: Vec<Value> = st.connections.integrations().iter().map(|i| integration_view(&st, i)).collect();
    Json(json!({ "integrations": items }))
}

/// `POST /v1/integrations/reload` (global token): the integration files
/// read again and put in force, or a 422 naming file, key and reason (the
/// set in force stays).
async fn reload_integrations(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
) -> Result<Json<Value>, ApiError> {
    if scope.org().is_some() {
        return Err(ApiError::new(Code::ForbiddenOrg, "reloading integrations needs a global admin token"));
    }
    match st.reload_integrations() {
        Ok(ids) => Ok(Json(json!({ "integrations": ids }))),
        Err(e) => {
            tracing::warn!(error = %e, "integrations not reloaded; the set in force stays");
            Err(ApiError::new(Code::InvalidIntegrations, e.to_string()))
        }
    }
}

#[derive(Deserialize)]
struct ImportQuery {
    id: Option<String>,
    base_url: Option<String>,
    #[serde(default)]
    no_test: bool,
    /// Write `<integrations.dir>/<id>.toml` and reload (default: dry run).
    #[serde(default)]
    write: bool,
}

/// `POST /v1/integrations/import-openapi` (global token): the body is an
/// OpenAPI 3.0/3.1 document (JSON or YAML). A dry run by default: answers
/// the integration file it would write and the report. With `write=true`
/// the file is written into `integrations.dir` (never over an existing
/// one) and the integrations are reloaded. OpenID Connect discovery is not
/// fetched here (the CLI's `--fetch-discovery` does it): the admin API
/// makes no request to a URL a document names.
async fn import_openapi(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Query(q): Query<ImportQuery>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    if scope.org().is_some() {
        return Err(ApiError::new(Code::ForbiddenOrg, "importing integrations needs a global admin token"));
    }
    let opts =
        crate::openapi::ImportOptions { id: q.id, base_url: q.base_url, no_test: q.no_test, ..Default::default() };
    let import = crate::openapi::import("(request body)", &body, &opts)
        .map_err(|e| ApiError::new(Code::InvalidOpenapi, e.to_string()))?;
    let report = serde_json::to_value(&import.report).unwrap_or(Value::Null);
    if !q.write {
        return Ok(Json(json!({ "file": import.file, "report": report, "written": null })));
    }
    let Some(file) = import.file else {
        let why = import.report.no_file_because.unwrap_or_default();
        return Err(ApiError::new(Code::OpenapiNotImportable, format!("no integration file: {why}")));
    };
    let dir = st.integrations_dir.clone().ok_or_else(|| {
        ApiError::new(Code::InvalidRequest, "this server was started without integrations.dir; nothing to write into")
    })?;
    let id = &import.report.integration_id;
    if st.connections.integrations().get(id).is_some() {
        return Err(ApiError::new(
            Code::IntegrationExists,
            format!("an integration {id:?} is in force; pass another id"),
        ));
    }
    let path = dir.join(format!("{id}.toml"));
    // create_new: never over a file another writer put there.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, file.as_bytes()));
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(ApiError::new(Code::IntegrationExists, format!("{id}.toml exists in integrations.dir")));
        }
        tracing::error!(error = %e, "import: cannot write the integration file");
        return Err(ApiError::new(Code::InternalError, "the integration file cannot be written"));
    }
    if let Err(e) = st.reload_integrations() {
        // Another file in the directory is invalid: take ours back out.
        let _ = std::fs::remove_file(&path);
        return Err(ApiError::new(Code::InvalidIntegrations, e.to_string()));
    }
    tracing::info!(integration = %id, "integration imported from an OpenAPI document");
    Ok(Json(json!({ "file": file, "report": report, "written": path.display().to_string() })))
}

async fn get_integration(State(st): State<Arc<AdminState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let integrations = st.connections.integrations();
    let i =
        integrations.get(&id).ok_or_else(|| ApiError::new(Code::IntegrationNotFound, "no integration with this id"))?;
    Ok(Json(integration_view(&st, i)))
}

/// The public view of a connection: metadata and the names of its fields.
#[derive(Serialize)]
struct ConnectionView {
    id: String,
    integration: String,
    auth_method: String,
    org_id: String,
    user_id: String,
    state: &'static str,
    created_at: String,
    updated_at: String,
    credential_fields: Vec<String>,
    /// When a proxied request last used it (to the minute), or null.
    last_used_at: Option<String>,
    /// `{at, ok, code}` of the last connection test, or null.
    last_test: Option<Value>,
    /// The last successful OAuth2 refresh, or null.
    last_refreshed_at: Option<String>,
    /// A cool-down an upstream asked for and this instance knows of:
    /// `{scope, until, retry_after_secs}`, or null.
    cooldown: Option<Value>,
}

fn view(st: &AdminState, m: ConnectionMeta) -> ConnectionView {
    let fields = st
        .connections
        .integrations()
        .get(&m.integration)
        .and_then(|i| i.auth_method(&m.auth_method))
        .map(|a| a.fields.clone())
        .unwrap_or_default();
    let last_test = m.activity.last_test.as_ref().map(|t| json!({"at": rfc3339(t.at), "ok": t.ok, "code": t.code}));
    let cooldown = st.quotas.cooldown_of(&m.integration, &m.id).map(|c| {
        let until = std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.until_ms.max(0) as u64);
        json!({"scope": c.scope.as_str(), "until": humantime::format_rfc3339_millis(until).to_string(),
               "retry_after_secs": c.retry_after_secs})
    });
    ConnectionView {
        cooldown,
        last_used_at: m.activity.last_used_at.map(rfc3339),
        last_refreshed_at: m.activity.last_refreshed_at.map(rfc3339),
        last_test,
        state: m.state.as_str(),
        created_at: rfc3339(m.created_at),
        updated_at: rfc3339(m.updated_at),
        id: m.id,
        integration: m.integration,
        auth_method: m.auth_method,
        org_id: m.org_id,
        user_id: m.user_id,
        credential_fields: fields,
    }
}

fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    integration: String,
    auth_method: String,
    org_id: String,
    user_id: String,
    credentials: serde_json::Map<String, Value>,
}

/// A JSON request body as `T`: 400 `invalid_json` if it is not JSON, 400
/// `invalid_request` naming the field (never its value) if it does not fit.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(Code::InvalidJson, format!("body is not valid JSON: {e}")))?;
    serde_path_to_error::deserialize(value)
        .map_err(|e| ApiError::new(Code::InvalidRequest, format!("{}: {}", e.path(), redact_serde(e.inner()))))
}

async fn create_connection(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    body: Bytes,
) -> Result<(StatusCode, axum::Extension<Audited>, Json<ConnectionView>), ApiError> {
    let req: CreateBody = json_body(&body)?;
    if let Some(org) = scope.org() {
        if org != req.org_id {
            return Err(ApiError::new(Code::ForbiddenOrg, "this admin token is scoped to another organization"));
        }
    }
    let mut credentials = BTreeMap::new();
    for (k, v) in req.credentials {
        match v {
            Value::String(s) => {
                credentials.insert(k, SecretValue::new(s));
            }
            // An imported OAuth2 token set's times may be numbers.
            Value::Number(n) if k == "expires_in" || k == "expires_at" => {
                credentials.insert(k, SecretValue::new(n.to_string()));
            }
            _ => return Err(ApiError::new(Code::InvalidCredentials, format!("credentials.{k}: must be a string"))),
        }
    }
    let meta = st
        .connections
        .create(NewConnection {
            integration: req.integration,
            auth_method: req.auth_method,
            org_id: req.org_id,
            user_id: req.user_id,
            credentials,
        })
        .await
        .map_err(create_error)?;
    tracing::info!(connection = %meta.id, org = %meta.org_id, integration = %meta.integration, "connection created");
    Ok((StatusCode::CREATED, axum::Extension(Audited::connection(&meta)), Json(view(&st, meta))))
}

fn create_error(e: CreateError) -> ApiError {
    match e {
        CreateError::UnknownIntegration(_) => ApiError::new(Code::UnknownIntegration, e.to_string()),
        CreateError::UnknownAuthMethod { .. } => ApiError::new(Code::UnknownAuthMethod, e.to_string()),
        CreateError::InvalidId { .. } => ApiError::new(Code::InvalidRequest, e.to_string()),
        CreateError::UseAuthorize(_) => ApiError::new(Code::UseOauth2Authorize, e.to_string()),
        CreateError::Credential(c) => ApiError::new(Code::InvalidCredentials, c.to_string()),
        CreateError::Store(s) => ApiError::store(s),
        CreateError::Crypto(crate::crypto::CryptoError::KeyService(_)) => ApiError::new(
            Code::KeyServiceUnavailable,
            "the key service (KMS) cannot be reached; nothing was stored; retry later",
        ),
        CreateError::Crypto(c) => {
            tracing::error!(error = %c, "admin: sealing a credential failed");
            ApiError::new(Code::InternalError, "sealing the credential failed; see the log")
        }
    }
}

/// serde messages can quote the offending value ("invalid type: string
/// \"...\""); keep only the kind of problem.
fn redact_serde(e: &serde_json::Error) -> String {
    let s = e.to_string();
    if s.contains("unknown field") || s.contains("missing field") {
        // These quote field names, which are ours, not the caller's values.
        s.split(" at line").next().unwrap_or(&s).to_owned()
    } else {
        "invalid value".to_owned()
    }
}

#[derive(Deserialize)]
struct ListQuery {
    org_id: Option<String>,
    user_id: Option<String>,
    integration: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// A page's end as the next page's `cursor`: `created_at.id`, base64url.
fn cursor_of(m: &ConnectionMeta) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", m.created_at, m.id))
}

fn parse_cursor(c: &str) -> Option<(i64, String)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()?;
    let (at, id) = std::str::from_utf8(&raw).ok()?.split_once('.')?;
    crate::ids::is_connection_id(id).then(|| Some((at.parse().ok()?, id.to_owned())))?
}

/// `GET /v1/connections?org_id&user_id&integration&state&limit&cursor`:
/// a page of connections, oldest first, and the cursor of the next page
/// (`null` after the last).
async fn list_connections(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let invalid = |what: &str| ApiError::new(Code::InvalidRequest, what.to_owned());
    let org_id = scope.filter(q.org_id)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(invalid("limit: 1 to 1000"));
    }
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(
            crate::store::ConnectionState::parse(s).ok_or_else(|| invalid("state: active, needs_reauth or revoked"))?,
        ),
    };
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| invalid("cursor: the next_cursor of a previous page"))?),
    };
    // One more than asked: whether there is a next page.
    let query = crate::store::ConnectionQuery {
        org_id,
        user_id: q.user_id,
        integration: q.integration,
        state,
        after,
        limit: limit + 1,
    };
    let mut items = st.connections.list(&query).await.map_err(ApiError::store)?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next = if more { items.last().map(cursor_of) } else { None };
    let items: Vec<ConnectionView> = items.into_iter().map(|m| view(&st, m)).collect();
    Ok(Json(json!({ "connections": items, "next_cursor": next })))
}

async fn get_connection(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Json<ConnectionView>, ApiError> {
    let meta = st.connections.get_meta(scope.org(), &id).await.map_err(ApiError::store)?;
    meta.map(|m| Json(view(&st, m))).ok_or_else(ApiError::connection_not_found)
}

async fn delete_connection(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path(id): Path<String>,
) -> Result<(axum::Extension<Audited>, Json<Value>), ApiError> {
    let meta = st
        .connections
        .get_meta(scope.org(), &id)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(ApiError::connection_not_found)?;
    // Revoke first (we still hold the tokens); delete even if revocation fails.
    let revocation = st.connections.revoke_at_provider(&id).await;
    let deleted = st.connections.delete(&meta, revocation.as_str()).await.map_err(ApiError::store)?;
    if !deleted {
        return Err(ApiError::connection_not_found());
    }
    tracing::info!(connection = %id, revocation = revocation.as_str(), "connection deleted");
    let mut body = json!({ "id": id, "deleted": true, "provider_revocation": revocation.as_str() });
    if let Revocation::Failed(why) = &revocation {
        body["provider_revocation_error"] = json!(why);
    }
    Ok((axum::Extension(Audited::connection(&meta)), Json(body)))
}

/// `{org}` as this token may act on it (an org token: its own only).
fn own_org(scope: &Scope, org: &str) -> Result<(), ApiError> {
    if scope.org().is_some_and(|o| o != org) {
        return Err(ApiError::new(Code::ForbiddenOrg, "this admin token is scoped to another organization"));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OAuthAppBody {
    client_id: String,
    /// Wrapped in a SecretValue at once.
    client_secret: String,
}

/// `PUT /v1/orgs/{org}/oauth-apps/{integration}/{auth_method}`: the
/// organization's own OAuth client for an `oauth2` method (the secret is
/// sealed; the answer shows the client id only). Authorization, refresh
/// and revocation for that organization's connections use it.
async fn put_oauth_app(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path((org, integration, auth_method)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<(axum::Extension<Audited>, Json<crate::store::OAuthApp>), ApiError> {
    own_org(&scope, &org)?;
    let req: OAuthAppBody = json_body(&body)?;
    use crate::creds::OAuthAppError as E;
    let view = st
        .connections
        .put_oauth_app(&org, &integration, &auth_method, req.client_id, SecretValue::new(req.client_secret))
        .await
        .map_err(|e| match e {
            E::UnknownIntegration(_) => ApiError::new(Code::UnknownIntegration, e.to_string()),
            E::UnknownAuthMethod { .. } => ApiError::new(Code::UnknownAuthMethod, e.to_string()),
            E::NotOAuth2(_) | E::Invalid(_) => ApiError::new(Code::InvalidRequest, e.to_string()),
            E::Store(e) => ApiError::store(e),
            E::Crypto(e) => create_error(CreateError::Crypto(e)),
        })?;
    let audited = Audited {
        org: Some(org),
        integration: Some(integration),
        auth_method: Some(auth_method),
        ..Audited::default()
    };
    Ok((axum::Extension(audited), Json(view)))
}

async fn get_oauth_app(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path((org, integration, auth_method)): Path<(String, String, String)>,
) -> Result<Json<crate::store::OAuthApp>, ApiError> {
    own_org(&scope, &org)?;
    st.connections
        .get_oauth_app(&org, &integration, &auth_method)
        .await
        .map_err(ApiError::store)?
        .map(Json)
        .ok_or_else(|| ApiError::new(Code::OauthAppNotFound, "this organization has no own OAuth app for this method"))
}

/// Removes the organization's app: its connections use the integration's
/// client again.
async fn delete_oauth_app(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path((org, integration, auth_method)): Path<(String, String, String)>,
) -> Result<(axum::Extension<Audited>, StatusCode), ApiError> {
    own_org(&scope, &org)?;
    if !st.connections.delete_oauth_app(&org, &integration, &auth_method).await.map_err(ApiError::store)? {
        return Err(ApiError::new(Code::OauthAppNotFound, "this organization has no own OAuth app for this method"));
    }
    let audited = Audited {
        org: Some(org),
        integration: Some(integration),
        auth_method: Some(auth_method),
        ..Audited::default()
    };
    Ok((axum::Extension(audited), StatusCode::NO_CONTENT))
}

async fn list_oauth_apps(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path(org): Path<String>,
) -> Result<Json<Value>, ApiError> {
    own_org(&scope, &org)?;
    let apps = st.connections.list_oauth_apps(&org).await.map_err(ApiError::store)?;
    Ok(Json(json!({ "oauth_apps": apps })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunTokenBody {
    org_id: String,
    #[serde(default)]
    user_id: Option<String>,
    /// Only these connections.
    #[serde(default)]
    connection_ids: Option<Vec<String>>,
    /// Only connections of these integrations.
    #[serde(default)]
    integrations: Option<Vec<String>>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// Mints a run token for one workflow run: `{token, expires_at, id, key_id}`.
/// An org-scoped admin token mints only for its organization.
async fn mint_run_token(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    body: Bytes,
) -> Result<(StatusCode, axum::Extension<Audited>, Json<Value>), ApiError> {
    let req: RunTokenBody = json_body(&body)?;
    if scope.org().is_some_and(|o| o != req.org_id) {
        return Err(ApiError::new(Code::ForbiddenOrg, "this admin token is scoped to another organization"));
    }
    let Some(issuer) = &st.run_tokens else {
        return Err(ApiError::new(Code::NotFound, "run tokens are not available on this instance"));
    };
    let invalid = |detail: String| ApiError::new(Code::InvalidRequest, detail);
    for (field, value) in [("org_id", Some(&req.org_id)), ("user_id", req.user_id.as_ref())] {
        if value.is_some_and(|v| !crate::ids::is_valid_external_id(v)) {
            return Err(invalid(format!("{field}: must be 1-128 characters of [A-Za-z0-9_.:@-]")));
        }
    }
    for (i, id) in req.connection_ids.iter().flatten().enumerate() {
        if !crate::ids::is_connection_id(id) {
            return Err(invalid(format!("connection_ids[{i}]: not a connection id")));
        }
    }
    for (i, int) in req.integrations.iter().flatten().enumerate() {
        if st.connections.integrations().get(int).is_none() {
            return Err(ApiError::new(Code::UnknownIntegration, format!("integrations[{i}]: no such integration")));
        }
    }
    let ttl = req.ttl_secs.map_or(issuer.default_ttl, std::time::Duration::from_secs);
    if ttl.is_zero() || ttl > issuer.max_ttl {
        return Err(invalid(format!("ttl_secs: must be 1 to {} (run_tokens.max_ttl_secs)", issuer.max_ttl.as_secs())));
    }
    let now = crate::creds::unix_now();
    let claims = RunClaims {
        jti: crate::runtoken::new_jti(),
        org: req.org_id,
        sub: req.user_id,
        conns: req.connection_ids,
        ints: req.integrations,
        iat: now,
        exp: now + ttl.as_secs() as i64,
    };
    let Some(token) = issuer.keys.mint(&claims) else {
        return Err(invalid(format!(
            "the token would be longer than {} bytes: name fewer connection_ids or integrations",
            crate::runtoken::MAX_TOKEN_LEN
        )));
    };
    tracing::info!(run_token = %claims.jti, org = %claims.org, expires_at = claims.exp, "run token minted");
    let body = json!({
        "token": token.expose(),
        "expires_at": claims.exp,
        "id": claims.jti,
        "key_id": issuer.keys.signing_id(),
    });
    let audited =
        Audited { org: Some(claims.org), run_token: Some(claims.jti), run_subject: claims.sub, ..Audited::default() };
    Ok((StatusCode::CREATED, axum::Extension(audited), Json(body)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    integration: String,
    auth_method: String,
    org_id: String,
    user_id: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    return_to: Option<String>,
    /// Re-authorize this connection instead of creating a new one.
    #[serde(default)]
    connection_id: Option<String>,
}

async fn oauth2_authorize(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    body: Bytes,
) -> Result<(axum::Extension<Audited>, Json<Value>), ApiError> {
    let req: AuthorizeBody = json_body(&body)?;
    if scope.org().is_some_and(|o| o != req.org_id) {
        return Err(ApiError::new(Code::ForbiddenOrg, "this admin token is scoped to another organization"));
    }
    let audited = Audited {
        action: req.connection_id.is_some().then_some("connection.reauthorize"),
        org: Some(req.org_id.clone()),
        user: Some(req.user_id.clone()),
        connection: req.connection_id.clone(),
        integration: Some(req.integration.clone()),
        auth_method: Some(req.auth_method.clone()),
        ..Audited::default()
    };
    let (url, expires_at) = st
        .connections
        .start_authorization(
            AuthorizeRequest {
                integration: req.integration,
                auth_method: req.auth_method,
                org_id: req.org_id,
                user_id: req.user_id,
                scopes: req.scopes,
                return_to: req.return_to,
                connection_id: req.connection_id,
                connect_session: None,
            },
            &st.connect.callback_url(),
        )
        .await
        .map_err(authorize_error)?;
    Ok((axum::Extension(audited), Json(json!({ "authorization_url": url, "expires_at": rfc3339(expires_at) }))))
}

#[derive(Deserialize)]
struct EventsQuery {
    org_id: Option<String>,
    /// The `next` of the previous page (an event's `seq`); 0 for the first.
    #[serde(default)]
    after: i64,
    limit: Option<u32>,
}

/// `GET /v1/events?after=…`: the connection lifecycle events, oldest first
/// (a pull feed for platforms without a webhook endpoint). An org-scoped
/// token sees its organization's only. `next` is the cursor of the next
/// page (the last `seq`, or `after` when there is nothing new).
async fn list_events(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let org = scope.filter(q.org_id)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 || q.after < 0 {
        return Err(ApiError::new(Code::InvalidRequest, "limit: 1 to 1000; after: a seq from a previous page"));
    }
    let stored = st.connections.store().list_events(org.as_deref(), q.after, limit).await.map_err(ApiError::store)?;
    let next = stored.last().map_or(q.after, |e| e.seq);
    let events: Vec<Value> = stored
        .into_iter()
        .map(|e| {
            let mut v: Value = serde_json::from_str(&e.event.payload).unwrap_or(Value::Null);
            v["seq"] = json!(e.seq);
            v
        })
        .collect();
    Ok(Json(json!({ "events": events, "next": next })))
}

/// `POST /v1/events/{id}/redeliver`: sends an event again to every
/// endpoint that had it (delivered or given up). Global tokens only: an
/// event's endpoints are the deployment's, not an organization's.
async fn redeliver_event(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if scope.org().is_some() {
        return Err(ApiError::new(Code::ForbiddenOrg, "redelivery needs a global admin token"));
    }
    let n = st.connections.store().redeliver(&id, crate::creds::unix_now()).await.map_err(ApiError::store)?;
    if n == 0 {
        return Err(ApiError::new(
            Code::NotFound,
            "no delivery of this event to redo (unknown id, or no endpoint took it)",
        ));
    }
    tracing::info!(event = %id, endpoints = n, "event queued for redelivery");
    Ok(Json(json!({ "id": id, "redelivered": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectSessionBody {
    org_id: String,
    user_id: String,
    #[serde(default)]
    integrations: Option<Vec<String>>,
    #[serde(default)]
    connection_id: Option<String>,
    #[serde(default)]
    return_to: Option<String>,
    #[serde(default)]
    expires_in_secs: Option<u64>,
}

/// `POST /v1/connect-sessions`: a link for one end user to create (or
/// re-authorize) a connection in a browser: `{url, expires_at, id}`. The
/// URL carries the session's token; the store keeps only its hash.
async fn create_connect_session(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    body: Bytes,
) -> Result<(StatusCode, axum::Extension<Audited>, Json<Value>), ApiError> {
    let req: ConnectSessionBody = json_body(&body)?;
    if scope.org().is_some_and(|o| o != req.org_id) {
        return Err(ApiError::new(Code::ForbiddenOrg, "this admin token is scoped to another organization"));
    }
    let request = SessionRequest {
        org_id: req.org_id,
        user_id: req.user_id,
        integrations: req.integrations,
        connection_id: req.connection_id,
        return_to: req.return_to,
        expires_in_secs: req.expires_in_secs,
    };
    let NewSession { url, session } = crate::connect::session::create(&st.connections, &st.connect, request)
        .await
        .map_err(|e: SessionError| ApiError::new(e.code, e.detail))?;
    tracing::info!(session = %session.id, org = %session.org_id, "connect session created");
    let body = json!({ "url": url.expose(), "expires_at": rfc3339(session.expires_at), "id": session.id });
    let audited = Audited {
        org: Some(session.org_id),
        user: Some(session.user_id),
        connection: session.connection_id,
        connect_session: Some(session.id),
        ..Audited::default()
    };
    Ok((StatusCode::CREATED, axum::Extension(audited), Json(body)))
}

fn authorize_error(e: AuthorizeError) -> ApiError {
    match e {
        AuthorizeError::Create(c) => create_error(c),
        AuthorizeError::NotAuthorizationCode(_) | AuthorizeError::BadReturnTo => {
            ApiError::new(Code::InvalidRequest, e.to_string())
        }
        AuthorizeError::ConnectionNotFound => ApiError::connection_not_found(),
        AuthorizeError::ConnectionMismatch => ApiError::new(Code::ConnectionMismatch, e.to_string()),
        AuthorizeError::UnknownState => {
            ApiError::new(Code::InvalidState, "unknown or already used state; start the authorization again")
        }
        AuthorizeError::StateExpired => ApiError::new(Code::StateExpired, e.to_string()),
        AuthorizeError::SessionUsed => ApiError::new(Code::SessionUsed, e.to_string()),
        AuthorizeError::Provider(_) => ApiError::new(Code::AuthorizationDenied, e.to_string()),
        AuthorizeError::Exchange(t) => {
            tracing::warn!(error = %t, "oauth2 code exchange failed");
            ApiError::new(Code::CodeExchangeFailed, format!("exchanging the authorization code failed: {t}"))
        }
        AuthorizeError::Store(s) => ApiError::store(s),
        AuthorizeError::Crypto(c) => {
            tracing::error!(error = %c, "oauth2: sealing or opening failed");
            ApiError::new(Code::InternalError, "see the log")
        }
    }
}

/// `POST /v1/connections/{id}/test`: the integration's `[test]` request,
/// sent through the same refresh/inject/forward path as proxied traffic.
async fn test_connection(
    State(st): State<Arc<AdminState>>,
    axum::Extension(scope): axum::Extension<Scope>,
    Path(id): Path<String>,
) -> Result<(axum::Extension<Audited>, Json<Value>), ApiError> {
    let meta = st
        .connections
        .get_meta(scope.org(), &id)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(ApiError::connection_not_found)?;
    let mut audited = Audited::connection(&meta);
    let started = std::time::Instant::now();
    let outcome = run_test(&st, &meta).await;
    let latency_ms = started.elapsed().as_millis() as u64;
    let body = match outcome {
        Ok((status, expect)) if status == expect => json!({ "ok": true, "status": status, "latency_ms": latency_ms }),
        Ok((status, expect)) => {
            audited.code = Some(Code::UnexpectedStatus);
            json!({
                "ok": false, "status": status, "latency_ms": latency_ms,
                "error": { "code": Code::UnexpectedStatus.as_str(), "detail": format!("expected status {expect}, got {status}") },
            })
        }
        Err(p) => {
            audited.code = Some(p.code);
            json!({
                "ok": false, "status": null, "latency_ms": latency_ms,
                "error": { "code": p.code.as_str(), "detail": p.detail },
            })
        }
    };
    let ok = body["ok"].as_bool().unwrap_or(false);
    let last = LastTest { at: crate::creds::unix_now(), ok, code: audited.code.map(|c| c.as_str().to_owned()) };
    let event = (!ok).then(|| {
        let kind = crate::events::Kind::TestFailed;
        crate::events::connection_event(kind, &meta, meta.state, last.code.as_deref(), None)
    });
    if let Err(e) = st.connections.store().record_test(&id, &last, event.as_ref()).await {
        // The answer stands: the test ran; only its record is missing.
        tracing::warn!(connection = %id, error = %e, "recording the test result failed");
    }
    tracing::info!(connection = %id, ok, "connection tested");
    Ok((axum::Extension(audited), Json(body)))
}

async fn run_test(st: &AdminState, meta: &ConnectionMeta) -> Result<(u16, u16), Problem> {
    let (resolved, _) =
        st.connections.resolve(&meta.org_id, &meta.id).await.map_err(|e| ProxyError::from(e).problem())?;
    st.outbound.test_connection(&resolved).await
}
