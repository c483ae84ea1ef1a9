//! The public listener: the connect pages, where an end user creates,
//! re-authorizes and tests their own connection in a browser, and the
//! OAuth2 callback. Nothing else is served here: the admin API and
//! `/metrics` stay on the private admin listener.
//!
//! A session URL (`/connect/session/{token}`, minted by the admin API)
//! sets an `HttpOnly` cookie and redirects to the pages; every form carries
//! a token derived from the session's. A credential typed into a form is
//! tested (when the integration has a `[test]`) before it is stored, and is
//! never rendered back into a page.
//!
//! Uses `creds`, `outbound` and `audit`; `server` and `admin` import this.

mod pages;
pub mod session;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{AdminAction, Audit};
use crate::creds::{unix_now, AuthorizeError, AuthorizeRequest, Connections, CreateError, NewConnection};
use crate::integrations::{AuthMethod, Grant, Integration};
use crate::outbound::Outbound;
use crate::problem::{Code, Problem};
use crate::secret::SecretValue;
use crate::store::{ConnectSession, ConnectionMeta, LastTest};

pub use session::{ConnectSettings, NewSession, SessionError, SessionRequest};

use pages::{see_other, with_query, Pages};

/// The session cookie.
const COOKIE: &str = "credproxy_connect";

pub struct PublicState {
    connections: Arc<Connections>,
    outbound: Arc<Outbound>,
    settings: Arc<ConnectSettings>,
    audit: Audit,
    pages: Pages,
    guard: session::Guard,
}

impl PublicState {
    pub fn new(
        connections: Arc<Connections>,
        outbound: Arc<Outbound>,
        settings: Arc<ConnectSettings>,
        audit: Audit,
    ) -> Self {
        // Forms lead (through redirects) to return_to origins and providers.
        let mut targets = settings.allowed_return_origins.clone();
        for i in connections.integrations().iter() {
            for m in &i.auth_methods {
                let authorize = m.oauth2().and_then(|o| o.authorize_url.as_ref());
                if let Some(origin) = authorize.and_then(|u| crate::ids::origin_of(&u.to_string())) {
                    if !targets.contains(&origin) {
                        targets.push(origin);
                    }
                }
            }
        }
        let pages = Pages::new(&settings.frame_ancestors, &targets);
        let guard = session::Guard::new(settings.failed_lookups_per_minute);
        Self { connections, outbound, settings, audit, pages, guard }
    }
}

pub fn router(state: Arc<PublicState>) -> Router {
    Router::new()
        .route("/oauth2/callback", get(oauth2_callback))
        .route("/connect", get(choose))
        .route("/connect/session/{token}", get(open_session))
        .route("/connect/static/connect.css", get(stylesheet))
        .route("/connect/{integration}/{method}", get(show_form).post(submit_form))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), secure_headers))
        .with_state(state)
}

async fn secure_headers(State(st): State<Arc<PublicState>>, req: axum::extract::Request, next: Next) -> Response {
    let r = next.run(req).await;
    st.pages.secure(r)
}

async fn not_found(State(st): State<Arc<PublicState>>) -> Response {
    st.pages.error(Code::NotFound, "There is no page here.")
}

async fn stylesheet(State(st): State<Arc<PublicState>>) -> Response {
    st.pages.stylesheet()
}

/// A page answering a refused request.
struct PageError(Code, String);

impl PageError {
    fn new(code: Code, detail: impl Into<String>) -> Self {
        Self(code, detail.into())
    }

    fn render(self, st: &PublicState) -> Response {
        st.pages.error(self.0, &self.1)
    }
}

fn session_problem(code: Code) -> PageError {
    let detail = match code {
        Code::SessionNotFound => "This link is not valid. Ask the application for a new one.",
        Code::SessionExpired => "This link has expired. Ask the application for a new one.",
        Code::SessionUsed => "This link was already used to connect an account. Ask the application for a new one.",
        Code::TooManyAttempts => "Too many invalid links from your address. Wait a minute and try again.",
        _ => "This session cannot be used.",
    };
    PageError::new(code, detail)
}

fn store_problem(e: impl std::fmt::Display) -> PageError {
    tracing::error!(error = %e, "connect: store error");
    PageError::new(Code::StoreUnavailable, "The service is temporarily unavailable. Try again in a moment.")
}

/// A session opened from a token (the URL's or the cookie's).
struct Open {
    session: ConnectSession,
    token: String,
}

impl PublicState {
    /// The usable session `token` names; unknown tokens count against the
    /// client's address.
    async fn session(&self, token: Option<&str>, peer: SocketAddr) -> Result<Open, PageError> {
        if self.guard.blocked(peer.ip()) {
            return Err(session_problem(Code::TooManyAttempts));
        }
        let Some(token) = token.filter(|t| session::is_token(t)) else {
            self.guard.failed(peer.ip());
            return Err(session_problem(Code::SessionNotFound));
        };
        let found = self.connections.store().connect_session(&session::token_hash(token)).await;
        let Some(session) = found.map_err(store_problem)? else {
            self.guard.failed(peer.ip());
            return Err(session_problem(Code::SessionNotFound));
        };
        session::usable(&session, unix_now()).map_err(session_problem)?;
        Ok(Open { session, token: token.to_owned() })
    }

    /// The session of the browser's cookie.
    async fn cookie_session(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Open, PageError> {
        let token = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v);
        if token.is_none() {
            return Err(PageError::new(
                Code::SessionNotFound,
                "No connect session in this browser: open the link the application gave you.",
            ));
        }
        self.session(token, peer).await
    }

    /// What the session offers: `(integration, method)` pairs a user can
    /// connect with (not client-credentials methods: nothing to type).
    async fn offered(&self, s: &ConnectSession) -> Result<Vec<(Arc<Integration>, Arc<AuthMethod>)>, PageError> {
        let integrations = self.connections.integrations();
        if let Some(id) = &s.connection_id {
            let meta = self.connections.get_meta(Some(&s.org_id), id).await.map_err(store_problem)?;
            let Some(meta) = meta else {
                return Err(PageError::new(Code::ConnectionNotFound, "The connection to reconnect no longer exists."));
            };
            let pair = integrations
                .get(&meta.integration)
                .and_then(|i| i.auth_method(&meta.auth_method).map(|m| (i.clone(), m.clone())));
            return Ok(pair.into_iter().collect());
        }
        let mut out = Vec::new();
        for i in integrations.iter() {
            if s.integrations.as_ref().is_some_and(|l| !l.contains(&i.id)) {
                continue;
            }
            for m in &i.auth_methods {
                if m.oauth2().is_none_or(|o| o.grant == Grant::AuthorizationCode) {
                    out.push((i.clone(), m.clone()));
                }
            }
        }
        Ok(out)
    }

    async fn pick(
        &self,
        s: &ConnectSession,
        integration: &str,
        method: &str,
    ) -> Result<(Arc<Integration>, Arc<AuthMethod>, bool), PageError> {
        let offered = self.offered(s).await?;
        let several = offered.len() > 1;
        offered
            .into_iter()
            .find(|(i, m)| i.id == integration && m.id == method)
            .map(|(i, m)| (i, m, several))
            .ok_or_else(|| PageError::new(Code::NotInSession, "This session does not offer that service or method."))
    }

    /// Where a finished session goes: `return_to` with `connection_id`, or
    /// a page of its own.
    fn finish(&self, return_to: Option<&str>, made: &ConnectionMeta) -> Response {
        match return_to {
            Some(rt) => see_other(&with_query(rt, "connection_id", &made.id)),
            None => self.pages.render(
                StatusCode::OK,
                "done.html",
                json!({ "integration": self.integration_name(&made.integration), "connection_id": made.id }),
            ),
        }
    }

    fn integration_name(&self, id: &str) -> String {
        self.connections.integrations().get(id).map_or_else(|| id.to_owned(), |i| i.name.clone())
    }

    fn audit(
        &self,
        action: &str,
        s: &ConnectSession,
        made: Option<&ConnectionMeta>,
        target: (&str, &str),
        status: u16,
        code: Option<Code>,
    ) {
        let who =
            Browser { session: Some(&s.id), org: &s.org_id, user: &s.user_id, connection: s.connection_id.as_deref() };
        self.audit_as(action, who, made, target, status, code);
    }

    /// An audit line for what a browser did (no admin token).
    fn audit_as(
        &self,
        action: &str,
        who: Browser<'_>,
        made: Option<&ConnectionMeta>,
        (integration, auth_method): (&str, &str),
        status: u16,
        code: Option<Code>,
    ) {
        self.audit.admin_action(&AdminAction {
            time: std::time::SystemTime::now(),
            action,
            admin_token: None,
            connect_session: who.session,
            org: Some(who.org),
            user: Some(who.user),
            connection: made.map(|m| m.id.as_str()).or(who.connection),
            integration: Some(integration),
            auth_method: Some(auth_method),
            run_token: None,
            run_subject: None,
            status,
            code: code.map(Code::as_str),
        });
    }
}

/// Whom a browser's audit line names: its connect session (if any), the
/// organization and user, and the connection it acted on (if one existed).
struct Browser<'a> {
    session: Option<&'a str>,
    org: &'a str,
    user: &'a str,
    connection: Option<&'a str>,
}

/// `GET /connect/session/{token}`: the link the platform gave its user.
/// The token goes into an `HttpOnly` cookie and out of the address bar.
async fn open_session(
    State(st): State<Arc<PublicState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
) -> Response {
    let open = match st.session(Some(&token), peer).await {
        Ok(o) => o,
        Err(e) => return e.render(&st),
    };
    let max_age = (open.session.expires_at - unix_now()).max(0);
    let secure = if st.settings.secure_cookies { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={}; Path=/connect; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}", open.token);
    let mut r = see_other("/connect");
    if let Ok(v) = cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Serialize)]
struct MethodView {
    id: String,
    label: String,
}

#[derive(Serialize)]
struct IntegrationView {
    id: String,
    name: String,
    methods: Vec<MethodView>,
}

fn method_label(i: &Integration, m: &AuthMethod) -> String {
    match m.kind_name() {
        "api_key" => "API key".to_owned(),
        "basic" => "Username and password".to_owned(),
        "bearer" => "Access token".to_owned(),
        "oauth2" => format!("Sign in with {}", i.name),
        _ => {
            let words = m.id.replace(['_', '-'], " ");
            let mut c = words.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        }
    }
}

/// `GET /connect`: pick an integration and a method (straight to the form
/// when the session offers one).
async fn choose(
    State(st): State<Arc<PublicState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let open = st.cookie_session(&headers, peer).await?;
        let offered = st.offered(&open.session).await?;
        if let [(i, m)] = offered.as_slice() {
            return Ok(see_other(&format!("/connect/{}/{}", i.id, m.id)));
        }
        if offered.is_empty() {
            return Err(PageError::new(Code::NotInSession, "This session offers nothing to connect."));
        }
        let mut views: Vec<IntegrationView> = Vec::new();
        for (i, m) in &offered {
            let label = method_label(i, m);
            match views.last_mut() {
                Some(v) if v.id == i.id => v.methods.push(MethodView { id: m.id.clone(), label }),
                _ => views.push(IntegrationView {
                    id: i.id.clone(),
                    name: i.name.clone(),
                    methods: vec![MethodView { id: m.id.clone(), label }],
                }),
            }
        }
        // Two methods of one integration with the same label: say which is which.
        for v in &mut views {
            let labels: Vec<String> = v.methods.iter().map(|m| m.label.clone()).collect();
            for m in &mut v.methods {
                if labels.iter().filter(|l| **l == m.label).count() > 1 {
                    m.label = format!("{} ({})", m.label, m.id);
                }
            }
        }
        Ok(st.pages.render(StatusCode::OK, "choose.html", json!({ "integrations": views })))
    }
    .await;
    result.unwrap_or_else(|e: PageError| e.render(&st))
}

#[derive(Serialize)]
struct FieldView {
    name: String,
    label: String,
    description: Option<String>,
    secret: bool,
    optional: bool,
    placeholder: Option<String>,
    /// What the user typed, for a form shown again: never a secret field's.
    value: String,
    invalid: bool,
}

#[derive(Serialize)]
struct ErrorView {
    title: &'static str,
    detail: String,
    code: &'static str,
}

/// The form for one method; `typed` and `error` when it is shown again.
fn form_page(
    st: &PublicState,
    open: &Open,
    (i, m, several): (&Integration, &AuthMethod, bool),
    typed: &BTreeMap<String, String>,
    error: Option<(Code, String, Option<String>)>,
) -> Response {
    let bad_field = error.as_ref().and_then(|e| e.2.clone());
    let fields: Vec<FieldView> = m
        .form
        .iter()
        .map(|f| FieldView {
            name: f.name.clone(),
            label: f.label.clone(),
            description: f.description.clone(),
            secret: f.secret,
            optional: f.optional,
            placeholder: f.placeholder.clone(),
            value: if f.secret { String::new() } else { typed.get(&f.name).cloned().unwrap_or_default() },
            invalid: bad_field.as_deref() == Some(f.name.as_str()),
        })
        .collect();
    let provider =
        m.oauth2().and_then(|o| o.authorize_url.as_ref()).and_then(|u| u.host().map(str::to_owned)).unwrap_or_default();
    let status = error.as_ref().map_or(StatusCode::OK, |e| e.0.status());
    let code = error.as_ref().map(|e| e.0);
    let error = error.map(|(code, detail, _)| ErrorView { title: code.title(), detail, code: code.as_str() });
    let mut r = st.pages.render(
        status,
        "form.html",
        json!({
            "integration": { "id": i.id, "name": i.name },
            "method": { "id": m.id, "label": method_label(i, m) },
            "csrf": session::csrf_token(&open.token),
            "oauth2": m.oauth2().is_some(),
            "provider": provider,
            "fields": fields,
            "has_test": i.test.is_some(),
            "error": error,
            "back": several,
            "reauthorize": open.session.connection_id.is_some(),
        }),
    );
    if let Some(c) = code {
        r.extensions_mut().insert(c);
    }
    r
}

/// `GET /connect/{integration}/{method}`.
async fn show_form(
    State(st): State<Arc<PublicState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((integration, method)): Path<(String, String)>,
) -> Response {
    let result = async {
        let open = st.cookie_session(&headers, peer).await?;
        let (i, m, several) = st.pick(&open.session, &integration, &method).await?;
        Ok(form_page(&st, &open, (&i, &m, several), &BTreeMap::new(), None))
    }
    .await;
    result.unwrap_or_else(|e: PageError| e.render(&st))
}

/// `POST /connect/{integration}/{method}`: OAuth2 methods go to the
/// provider; the others are validated, tested, and stored.
async fn submit_form(
    State(st): State<Arc<PublicState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((integration, method)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let open = match st.cookie_session(&headers, peer).await {
        Ok(o) => o,
        Err(e) => return e.render(&st),
    };
    let result = async {
        let mut csrf = None;
        let mut typed = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(&body) {
            if k == "csrf" {
                csrf = Some(v.into_owned());
            } else if let Some(name) = k.strip_prefix("f_") {
                typed.insert(name.to_owned(), v.into_owned());
            }
        }
        if !session::csrf_ok(&open.token, csrf.as_deref()) {
            return Err(PageError::new(
                Code::CsrfFailed,
                "This form is missing its security token or has another session's. Reload the page and try again.",
            ));
        }
        let picked = st.pick(&open.session, &integration, &method).await?;
        if picked.1.oauth2().is_some() {
            return start_oauth2(&st, &open.session, &picked.0, &picked.1).await;
        }
        save(&st, &open, picked, typed).await
    }
    .await;
    result.unwrap_or_else(|e: PageError| {
        // A refused post through a live session: who tried what, and why.
        let s = &open.session;
        let action = if s.connection_id.is_some() { "connection.replace" } else { "connection.create" };
        let short = |v: &str| v.chars().take(64).collect::<String>();
        st.audit(action, s, None, (&short(&integration), &short(&method)), e.0.status().as_u16(), Some(e.0));
        e.render(&st)
    })
}

async fn start_oauth2(
    st: &PublicState,
    s: &ConnectSession,
    i: &Integration,
    m: &AuthMethod,
) -> Result<Response, PageError> {
    let started = st
        .connections
        .start_authorization(
            AuthorizeRequest {
                integration: i.id.clone(),
                auth_method: m.id.clone(),
                org_id: s.org_id.clone(),
                user_id: s.user_id.clone(),
                scopes: None,
                return_to: s.return_to.clone(),
                connection_id: s.connection_id.clone(),
                connect_session: Some(s.id.clone()),
            },
            &st.settings.callback_url(),
        )
        .await;
    match started {
        Ok((url, _)) => {
            let action = if s.connection_id.is_some() { "connection.reauthorize" } else { "connection.authorize" };
            st.audit(action, s, None, (&i.id, &m.id), 303, None);
            tracing::info!(session = %s.id, integration = %i.id, "connect: oauth2 authorization started");
            Ok(see_other(&url))
        }
        Err(e) => Err(authorize_problem(e)),
    }
}

/// Validates, tests and stores what the user typed; shows the form again
/// (without secret values) when something is wrong. Nothing is stored
/// unless everything passed.
async fn save(
    st: &PublicState,
    open: &Open,
    (i, m, several): (Arc<Integration>, Arc<AuthMethod>, bool),
    typed: BTreeMap<String, String>,
) -> Result<Response, PageError> {
    let s = &open.session;
    let again = |code: Code, detail: String, field: Option<String>| {
        form_page(st, open, (&i, &m, several), &typed, Some((code, detail, field)))
    };
    let credentials = typed.iter().map(|(k, v)| (k.clone(), SecretValue::new(v.clone()))).collect();
    let new = NewConnection {
        integration: i.id.clone(),
        auth_method: m.id.clone(),
        org_id: s.org_id.clone(),
        user_id: s.user_id.clone(),
        credentials,
    };
    let candidate = match st.connections.candidate(new, s.connection_id.as_deref()) {
        Ok(c) => c,
        Err(CreateError::Credential(e)) => {
            let label = m.form.iter().find(|f| f.name == e.field).map_or(e.field.as_str(), |f| f.label.as_str());
            let detail = format!("{label}: {}.", e.reason);
            return Ok(again(Code::InvalidCredentials, detail, Some(e.field)));
        }
        Err(e) => return Err(PageError::new(Code::InvalidRequest, e.to_string())),
    };
    // Tested before it is stored: a credential that does not work is not kept.
    let tested = if i.test.is_some() {
        let outcome = st.outbound.test_connection(&candidate).await;
        let failure = match outcome {
            Ok((status, expect)) if status == expect => None,
            Ok((status, _)) => Some(format!("{} answered {status}: check what you entered.", i.name)),
            Err(p) => Some(format!("The test request failed ({}): {}", p.code.as_str(), p.detail)),
        };
        if let Some(detail) = failure {
            st.audit("connection.test", s, None, (&i.id, &m.id), 422, Some(Code::ConnectionTestFailed));
            tracing::info!(session = %s.id, integration = %i.id, "connect: the credential failed its test; nothing stored");
            return Ok(again(Code::ConnectionTestFailed, detail, None));
        }
        true
    } else {
        false
    };
    if !st.connections.store().claim_connect_session(&s.id, unix_now()).await.map_err(store_problem)? {
        return Err(session_problem(Code::SessionUsed));
    }
    let replace = s.connection_id.is_some();
    let stored = st.connections.store_candidate(&candidate, replace).await;
    let store = st.connections.store();
    let made = match stored {
        Ok(m) => m,
        Err(e) => {
            if let Err(e) = store.finish_connect_session(&s.id, None).await {
                tracing::warn!(session = %s.id, error = %e, "releasing the connect session failed");
            }
            return Err(match e {
                CreateError::Crypto(crate::crypto::CryptoError::KeyService(_)) => PageError::new(
                    Code::KeyServiceUnavailable,
                    "The service is temporarily unavailable; nothing was saved. Try again in a moment.",
                ),
                other => store_problem(other),
            });
        }
    };
    if let Err(e) = store.finish_connect_session(&s.id, Some(&made.id)).await {
        tracing::warn!(session = %s.id, error = %e, "recording the connect session's connection failed");
    }
    if tested {
        let last = LastTest { at: unix_now(), ok: true, code: None };
        if let Err(e) = store.record_test(&made.id, &last, None).await {
            tracing::warn!(connection = %made.id, error = %e, "recording the test result failed");
        }
    }
    let action = if replace { "connection.replace" } else { "connection.create" };
    st.audit(action, s, Some(&made), (&i.id, &m.id), 303, None);
    tracing::info!(connection = %made.id, session = %s.id, org = %made.org_id, integration = %made.integration, "connect: {action}");
    Ok(st.finish(s.return_to.as_deref(), &made))
}

fn authorize_problem(e: AuthorizeError) -> PageError {
    let (code, detail) = match &e {
        AuthorizeError::UnknownState => {
            (Code::InvalidState, "This sign-in was already completed or never started.".into())
        }
        AuthorizeError::StateExpired => (Code::StateExpired, "This sign-in took too long. Start again.".into()),
        AuthorizeError::SessionUsed => return session_problem(Code::SessionUsed),
        AuthorizeError::Provider(p) => (Code::AuthorizationDenied, format!("The provider said no ({p}).")),
        AuthorizeError::Exchange(_) => {
            tracing::warn!(error = %e, "connect: oauth2 code exchange failed");
            (Code::CodeExchangeFailed, "The provider did not complete the sign-in. Try again.".into())
        }
        AuthorizeError::ConnectionNotFound => {
            (Code::ConnectionNotFound, "The connection to reconnect no longer exists.".into())
        }
        AuthorizeError::Store(s) => return store_problem(s),
        _ => {
            tracing::error!(error = %e, "connect: oauth2 authorization failed");
            (Code::InternalError, "Something went wrong on our side; nothing was saved.".into())
        }
    };
    PageError(code, detail)
}

#[derive(Deserialize)]
struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
}

/// `GET /oauth2/callback`: where providers send the browser back. An
/// authorization started from a connect page ends like the page's other
/// flows (a redirect to `return_to`, or a page); one started through the
/// admin API answers JSON (or redirects to its `return_to`).
async fn oauth2_callback(State(st): State<Arc<PublicState>>, Query(q): Query<CallbackQuery>) -> Response {
    let problem = |code: Code, detail: String| Problem::new(code, detail).to_response().map(axum::body::Body::from);
    let Some(state) = q.state else {
        return problem(Code::InvalidState, "the callback has no state parameter".into());
    };
    let outcome = match (&q.code, &q.error) {
        (_, Some(e)) => Err(e.as_str()),
        (Some(c), None) => Ok(c.as_str()),
        (None, None) => return problem(Code::InvalidRequest, "the callback has neither code nor error".into()),
    };
    let pending = match st.connections.take_authorization(&state).await {
        Ok(p) => p,
        Err(e) => {
            let PageError(code, _) = authorize_problem(e);
            let detail = match code {
                Code::InvalidState => "unknown or already used state; start the authorization again",
                Code::StateExpired => "the authorization expired; start again",
                _ => "the authorization cannot be completed",
            };
            return problem(code, detail.into());
        }
    };
    let target = (pending.integration.clone(), pending.auth_method.clone());
    let result = st.connections.finish_authorization(&pending, outcome).await;
    let action = if pending.connection_id.is_some() { "connection.reauthorized" } else { "connection.authorized" };
    let audit = |made: Option<&ConnectionMeta>, status: u16, code: Option<Code>| {
        let who = Browser {
            session: pending.connect_session.as_deref(),
            org: &pending.org_id,
            user: &pending.user_id,
            connection: pending.connection_id.as_deref(),
        };
        st.audit_as(action, who, made, (&target.0, &target.1), status, code)
    };
    let from_page = pending.connect_session.is_some();
    match result {
        Ok(made) => {
            let view =
                json!({ "connection_id": made.id, "integration": made.integration, "state": made.state.as_str() });
            let status = if from_page || pending.return_to.is_some() { 303 } else { 201 };
            audit(Some(&made), status, None);
            if from_page {
                return st.finish(pending.return_to.as_deref(), &made);
            }
            match &pending.return_to {
                Some(rt) => see_other(&with_query(rt, "connection_id", &made.id)),
                None => (StatusCode::CREATED, axum::Json(view)).into_response(),
            }
        }
        Err(e) => {
            let PageError(code, detail) = authorize_problem(e);
            audit(None, code.status().as_u16(), Some(code));
            match (&pending.return_to, from_page) {
                (Some(rt), true) => see_other(&with_query(rt, "error", code.as_str())),
                (None, true) => st.pages.error(code, &detail),
                (_, false) => {
                    let detail = match code {
                        Code::AuthorizationDenied => {
                            format!("the provider returned error {:?}", q.error.unwrap_or_default())
                        }
                        _ => detail,
                    };
                    problem(code, detail)
                }
            }
        }
    }
}
