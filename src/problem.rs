//! The one place that turns errors into responses: RFC 9457
//! `application/problem+json` bodies with a stable `code`, plus (for responses
//! the proxy makes itself) an RFC 9209 `Proxy-Status` header.
//!
//! Every code credproxy answers with — proxy and admin API alike — is a row
//! of [`Code`]'s table: its HTTP status, the stable string, a title and the
//! Proxy-Status error type. Metrics count by it, the README lists it (a
//! test holds the two together).
//!
//! Leaf module. A `Problem`'s `detail` is shown to callers: it must never
//! contain a secret, and should say what to do. Internal detail goes to the log.

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

/// Name used in `Proxy-Status` and problem `type` URIs.
pub const PROXY_NAME: &str = "credproxy";

/// RFC 9209 proxy error types used by credproxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyErrorType {
    HttpRequestError,
    HttpRequestDenied,
    DestinationIpProhibited,
    DestinationNotFound,
    DestinationUnavailable,
    ConnectionRefused,
    ConnectionTimeout,
    TlsCertificateError,
    HttpResponseTimeout,
    HttpProtocolError,
    ProxyInternalError,
    ProxyConfigurationError,
}

impl ProxyErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpRequestError => "http_request_error",
            Self::HttpRequestDenied => "http_request_denied",
            Self::DestinationIpProhibited => "destination_ip_prohibited",
            Self::DestinationNotFound => "destination_not_found",
            Self::DestinationUnavailable => "destination_unavailable",
            Self::ConnectionRefused => "connection_refused",
            Self::ConnectionTimeout => "connection_timeout",
            Self::TlsCertificateError => "tls_certificate_error",
            Self::HttpResponseTimeout => "http_response_timeout",
            Self::HttpProtocolError => "http_protocol_error",
            Self::ProxyInternalError => "proxy_internal_error",
            Self::ProxyConfigurationError => "proxy_configuration_error",
        }
    }
}

/// Declares [`Code`] from one table: `Name = STATUS, "code", "Title", ProxyErrorType;`.
macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $status:ident, $code:literal, $title:literal, $kind:ident; )*) => {
        /// Every problem code credproxy answers with: the stable part of its API.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $( $(#[$doc])* $name, )*
        }

        impl Code {
            /// Every code, in table order ([`Code::index`] is the position).
            pub const ALL: &'static [Code] = &[ $( Code::$name, )* ];

            /// The stable, machine-readable string.
            pub fn as_str(self) -> &'static str {
                match self { $( Code::$name => $code, )* }
            }

            /// The HTTP status of a response with this code.
            pub fn status(self) -> StatusCode {
                match self { $( Code::$name => StatusCode::$status, )* }
            }

            pub fn title(self) -> &'static str {
                match self { $( Code::$name => $title, )* }
            }

            /// The RFC 9209 error type in `Proxy-Status` (proxy-made responses).
            pub fn proxy_error(self) -> ProxyErrorType {
                match self { $( Code::$name => ProxyErrorType::$kind, )* }
            }
        }
    };
}

codes! {
    // The proxy port.
    /// Origin-form request: someone browsing to the proxy port.
    NotAProxyRequest = BAD_REQUEST, "not_a_proxy_request", "Not a proxy request", HttpRequestError;
    UnsupportedScheme = BAD_REQUEST, "unsupported_scheme", "Unsupported scheme", HttpRequestError;
    MalformedRequest = BAD_REQUEST, "malformed_request", "Malformed request", HttpRequestError;
    RequestHeaderTooLarge = REQUEST_HEADER_FIELDS_TOO_LARGE, "request_header_too_large", "Request header too large", HttpRequestError;
    InvalidConnectionId = BAD_REQUEST, "invalid_connection_id", "Invalid X-Connection-Id", HttpRequestError;
    /// Shared mode (or `proxy.require_run_token`): no run token.
    RunTokenMissing = PROXY_AUTHENTICATION_REQUIRED, "run_token_missing", "Run token required", HttpRequestDenied;
    /// Malformed, truncated, an unknown key id or a signature that does not verify.
    RunTokenInvalid = PROXY_AUTHENTICATION_REQUIRED, "run_token_invalid", "Invalid run token", HttpRequestDenied;
    RunTokenExpired = PROXY_AUTHENTICATION_REQUIRED, "run_token_expired", "Run token expired", HttpRequestDenied;
    TraceNotAllowed = FORBIDDEN, "trace_not_allowed", "TRACE with a credential", HttpRequestDenied;
    PassthroughDenied = FORBIDDEN, "passthrough_denied", "Pass-through denied", HttpRequestDenied;
    HostNotAllowed = FORBIDDEN, "host_not_allowed", "Host not allowed for this connection", HttpRequestDenied;
    DestinationIpProhibited = FORBIDDEN, "destination_ip_prohibited", "Destination prohibited", DestinationIpProhibited;
    ConnectionNotFound = NOT_FOUND, "connection_not_found", "Connection not found", HttpRequestDenied;
    ConnectionNeedsReauth = CONFLICT, "connection_needs_reauth", "Connection needs re-authorization", HttpRequestDenied;
    ConnectionRevoked = CONFLICT, "connection_revoked", "Connection revoked", HttpRequestDenied;
    /// The connection's integration or auth method was removed from the integration files.
    AuthMethodRemoved = CONFLICT, "auth_method_removed", "Auth method no longer configured", HttpRequestDenied;
    RequestBodyNotInjectable = BAD_REQUEST, "request_body_not_injectable", "Request body cannot carry the credential", HttpRequestError;
    RequestBodyRequired = BAD_REQUEST, "request_body_required", "Request body required", HttpRequestError;
    RequestBodyError = BAD_REQUEST, "request_body_error", "Request body error", HttpRequestError;
    RequestBodyTimeout = REQUEST_TIMEOUT, "request_body_timeout", "Request body timeout", HttpRequestError;
    RequestBodyTooLarge = PAYLOAD_TOO_LARGE, "request_body_too_large", "Request body too large", HttpRequestError;
    ConnectionUnusable = INTERNAL_SERVER_ERROR, "connection_unusable", "Connection unusable", ProxyConfigurationError;
    CredentialNotInjectable = INTERNAL_SERVER_ERROR, "credential_not_injectable", "Credential cannot be injected", ProxyConfigurationError;
    InternalError = INTERNAL_SERVER_ERROR, "internal_error", "Internal error", ProxyInternalError;
    /// A rate limit of the integration (`[[rate_limits]]`); `Retry-After` says when.
    RateLimited = TOO_MANY_REQUESTS, "rate_limited", "Rate limit reached", HttpRequestDenied;
    /// An in-flight cap of the integration (`[[in_flight_limits]]`).
    InFlightLimit = TOO_MANY_REQUESTS, "in_flight_limit", "Too many requests in flight", HttpRequestDenied;
    /// The upstream answered 429/503 with `Retry-After`: credproxy answers until then.
    UpstreamCoolingDown = TOO_MANY_REQUESTS, "upstream_cooling_down", "Upstream asked to back off", HttpRequestDenied;
    DestinationNotFound = BAD_GATEWAY, "destination_not_found", "Destination not found", DestinationNotFound;
    UpstreamUnreachable = BAD_GATEWAY, "upstream_unreachable", "Upstream unreachable", ConnectionRefused;
    UpstreamTlsError = BAD_GATEWAY, "upstream_tls_error", "Upstream TLS error", TlsCertificateError;
    UpstreamError = BAD_GATEWAY, "upstream_error", "Upstream error", HttpProtocolError;
    /// `scrub_response_bodies` is on and the upstream answered with a
    /// `Content-Encoding` (credproxy asked for `identity`): the body cannot be scrubbed.
    ResponseNotScrubbable = BAD_GATEWAY, "response_not_scrubbable", "Response cannot be scrubbed", HttpProtocolError;
    TokenEndpointUnavailable = BAD_GATEWAY, "token_endpoint_unavailable", "Token endpoint unavailable", DestinationUnavailable;
    TokenEndpointRejected = BAD_GATEWAY, "token_endpoint_rejected", "Token endpoint rejected the request", ProxyConfigurationError;
    StoreUnavailable = SERVICE_UNAVAILABLE, "store_unavailable", "Store unavailable", ProxyInternalError;
    KeyServiceUnavailable = SERVICE_UNAVAILABLE, "key_service_unavailable", "Key service unavailable", ProxyInternalError;
    RefreshLockTimeout = SERVICE_UNAVAILABLE, "refresh_lock_timeout", "Refresh in progress elsewhere", ProxyInternalError;
    BufferBudgetExhausted = SERVICE_UNAVAILABLE, "buffer_budget_exhausted", "Too many buffered bodies", ProxyInternalError;
    UpstreamConnectTimeout = GATEWAY_TIMEOUT, "upstream_connect_timeout", "Upstream connect timeout", ConnectionTimeout;
    UpstreamTimeout = GATEWAY_TIMEOUT, "upstream_timeout", "Upstream timeout", HttpResponseTimeout;
    // The admin API only (it also answers with connection_not_found,
    // store_unavailable, key_service_unavailable and internal_error above).
    Unauthorized = UNAUTHORIZED, "unauthorized", "Unauthorized", HttpRequestError;
    ForbiddenOrg = FORBIDDEN, "forbidden_org", "Forbidden", HttpRequestError;
    NotFound = NOT_FOUND, "not_found", "Not found", HttpRequestError;
    IntegrationNotFound = NOT_FOUND, "integration_not_found", "Integration not found", HttpRequestError;
    /// `/v1/orgs/{org}/oauth-apps/{integration}/{auth_method}`: the organization has none.
    OauthAppNotFound = NOT_FOUND, "oauth_app_not_found", "OAuth app not found", HttpRequestError;
    InvalidJson = BAD_REQUEST, "invalid_json", "Invalid request", HttpRequestError;
    InvalidRequest = BAD_REQUEST, "invalid_request", "Invalid request", HttpRequestError;
    InvalidCredentials = BAD_REQUEST, "invalid_credentials", "Invalid request", HttpRequestError;
    UnknownIntegration = BAD_REQUEST, "unknown_integration", "Invalid request", HttpRequestError;
    UnknownAuthMethod = BAD_REQUEST, "unknown_auth_method", "Invalid request", HttpRequestError;
    UseOauth2Authorize = BAD_REQUEST, "use_oauth2_authorize", "Invalid request", HttpRequestError;
    ConnectionMismatch = BAD_REQUEST, "connection_mismatch", "Invalid request", HttpRequestError;
    InvalidState = BAD_REQUEST, "invalid_state", "Invalid request", HttpRequestError;
    StateExpired = BAD_REQUEST, "state_expired", "Invalid request", HttpRequestError;
    AuthorizationDenied = BAD_REQUEST, "authorization_denied", "Invalid request", HttpRequestError;
    NoTestRequest = BAD_REQUEST, "no_test_request", "No test request", HttpRequestError;
    /// A reload found an invalid integration file; the set in force stays.
    InvalidIntegrations = UNPROCESSABLE_ENTITY, "invalid_integrations", "Invalid integration files", HttpRequestError;
    /// `POST /v1/integrations/import-openapi`: the document cannot be read
    /// (syntax, version, a dangling `$ref`, a wrong type); the detail names where.
    InvalidOpenapi = UNPROCESSABLE_ENTITY, "invalid_openapi", "Unreadable OpenAPI document", HttpRequestError;
    /// An import with `write=true` of a document that yields no integration (the report says why).
    OpenapiNotImportable = UNPROCESSABLE_ENTITY, "openapi_not_importable", "Nothing to import", HttpRequestError;
    /// An import with `write=true` whose integration file already exists.
    IntegrationExists = CONFLICT, "integration_exists", "Integration exists", HttpRequestError;
    CodeExchangeFailed = BAD_GATEWAY, "code_exchange_failed", "Code exchange failed", DestinationUnavailable;
    ShuttingDown = SERVICE_UNAVAILABLE, "shutting_down", "Shutting down", ProxyInternalError;
    // The public listener (connect pages; HTML pages and redirects carry these).
    SessionNotFound = NOT_FOUND, "session_not_found", "Unknown connect session", HttpRequestDenied;
    SessionExpired = GONE, "session_expired", "Connect session expired", HttpRequestDenied;
    SessionUsed = GONE, "session_used", "Connect session already used", HttpRequestDenied;
    NotInSession = FORBIDDEN, "not_in_session", "Not offered by this connect session", HttpRequestDenied;
    ReturnToNotAllowed = BAD_REQUEST, "return_to_not_allowed", "return_to not allowed", HttpRequestError;
    CsrfFailed = FORBIDDEN, "csrf_failed", "Form token missing or wrong", HttpRequestDenied;
    TooManyAttempts = TOO_MANY_REQUESTS, "too_many_attempts", "Too many attempts", HttpRequestDenied;
    /// The connect page's test of a credential before storing it failed.
    ConnectionTestFailed = UNPROCESSABLE_ENTITY, "connection_test_failed", "The credential did not work", HttpRequestError;
    /// Not a response: a connection test's result when the upstream's status
    /// was not the expected one (`{"ok": false, "error": {"code": …}}`).
    UnexpectedStatus = BAD_GATEWAY, "unexpected_status", "Unexpected status", HttpProtocolError;
}

impl Code {
    /// Position in [`Code::ALL`]: an index for per-code counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem to report to the caller.
#[derive(Debug, Clone)]
pub struct Problem {
    pub code: Code,
    /// Human text for the caller. Never a secret.
    pub detail: Cow<'static, str>,
    pub retry_after_secs: Option<u64>,
    /// The limit that refused the request (an extension member, `limit`).
    pub limit: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<&'a serde_json::Value>,
}

impl Problem {
    pub fn new(code: Code, detail: impl Into<Cow<'static, str>>) -> Self {
        Self { code, detail: detail.into(), retry_after_secs: None, limit: None }
    }

    /// With `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn body_bytes(&self) -> Bytes {
        let body = Body {
            kind: format!("urn:{PROXY_NAME}:problem:{}", self.code),
            title: self.code.title(),
            status: self.code.status().as_u16(),
            code: self.code.as_str(),
            detail: &self.detail,
            limit: self.limit.as_ref(),
        };
        Bytes::from(serde_json::to_vec(&body).expect("problem bodies always serialize"))
    }

    /// A response made by the proxy itself: carries `Proxy-Status`.
    pub fn to_proxy_response(&self) -> Response<Bytes> {
        let mut resp = self.to_response();
        // RFC 9209: `details` is an sf-string; the code is always a safe token.
        let ps = format!("{PROXY_NAME}; error={}; details=\"{}\"", self.code.proxy_error().as_str(), self.code);
        let h = resp.headers_mut();
        h.insert("proxy-status", HeaderValue::from_str(&ps).expect("proxy-status is ascii"));
        if self.code.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            // Both ways a caller can present a run token (RFC 9110 §11.7.1).
            for scheme in ["Basic realm=\"credproxy\"", "Bearer realm=\"credproxy\""] {
                h.append(header::PROXY_AUTHENTICATE, HeaderValue::from_static(scheme));
            }
        }
        resp
    }

    /// A problem response without `Proxy-Status` (the admin API).
    pub fn to_response(&self) -> Response<Bytes> {
        let mut resp = Response::new(self.body_bytes());
        *resp.status_mut() = self.code.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after_secs {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_response_has_proxy_status_and_problem_json() {
        let r = Problem::new(Code::HostNotAllowed, "nope").to_proxy_response();
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["proxy-status"], "credproxy; error=http_request_denied; details=\"host_not_allowed\"");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["code"], "host_not_allowed");
        assert_eq!(v["status"], 403);
        assert_eq!(v["type"], "urn:credproxy:problem:host_not_allowed");
    }

    #[test]
    fn codes_are_unique_snake_case_and_indexed_by_position() {
        for (i, c) in Code::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c}");
            let s = c.as_str();
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{s}");
            assert_eq!(Code::ALL.iter().filter(|o| o.as_str() == s).count(), 1, "{s} twice");
            assert!(c.status().is_client_error() || c.status().is_server_error(), "{s}");
        }
    }

    /// The README's two tables of codes ("What callers see when credproxy
    /// refuses", and the admin API's) list every code, with its status, and
    /// no other.
    #[test]
    fn the_readme_lists_every_code_with_its_status() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let mut listed: Vec<(String, u16)> = Vec::new();
        for line in readme.lines() {
            // `| 403 | `a`, `b` | when |`
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let Some(status) = cells.get(1).and_then(|c| c.parse::<u16>().ok()) else { continue };
            let Some(codes) = cells.get(2) else { continue };
            // Codes are snake_case; `Retry-After` and the like are not codes.
            let is_code = |c: &&str| c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            for code in codes.split('`').skip(1).step_by(2).filter(is_code) {
                listed.push((code.to_owned(), status));
            }
        }
        for c in Code::ALL {
            let rows: Vec<u16> = listed.iter().filter(|(s, _)| s == c.as_str()).map(|(_, st)| *st).collect();
            assert!(!rows.is_empty(), "the README lists no `{c}`");
            assert!(rows.iter().all(|s| *s == c.status().as_u16()), "README gives `{c}` status {rows:?}");
        }
        for (s, _) in &listed {
            assert!(Code::ALL.iter().any(|c| c.as_str() == s), "the README lists `{s}`, which is no code");
        }
    }
}
