//! The one place that turns errors into responses: RFC 9457
//! `application/problem+json` bodies with a stable `code`, plus (for responses
//! the proxy makes itself) an RFC 9209 `Proxy-Status` header.
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

/// A problem to report to the caller.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// Stable, machine-readable, snake_case. Part of the API.
    pub code: &'static str,
    pub title: &'static str,
    /// Human text for the caller. Never a secret.
    pub detail: Cow<'static, str>,
    pub proxy_error: ProxyErrorType,
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: &'a str,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<Cow<'static, str>>,
        proxy_error: ProxyErrorType,
    ) -> Self {
        Self { status, code, title, detail: detail.into(), proxy_error, retry_after_secs: None }
    }

    pub fn body_bytes(&self) -> Bytes {
        let body = Body {
            kind: format!("urn:{PROXY_NAME}:problem:{}", self.code),
            title: self.title,
            status: self.status.as_u16(),
            code: self.code,
            detail: &self.detail,
        };
        Bytes::from(serde_json::to_vec(&body).expect("problem bodies always serialize"))
    }

    /// A response made by the proxy itself: carries `Proxy-Status`.
    pub fn to_proxy_response(&self) -> Response<Bytes> {
        let mut resp = self.to_response();
        // RFC 9209: `details` is an sf-string; the code is always a safe token.
        let ps = format!("{PROXY_NAME}; error={}; details=\"{}\"", self.proxy_error.as_str(), self.code);
        resp.headers_mut().insert("proxy-status", HeaderValue::from_str(&ps).expect("proxy-status is ascii"));
        resp
    }

    /// A problem response without `Proxy-Status` (the admin API).
    pub fn to_response(&self) -> Response<Bytes> {
        let mut resp = Response::new(self.body_bytes());
        *resp.status_mut() = self.status;
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
        let p = Problem::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            "Host not allowed",
            "nope",
            ProxyErrorType::HttpRequestDenied,
        );
        let r = p.to_proxy_response();
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["proxy-status"], "credproxy; error=http_request_denied; details=\"host_not_allowed\"");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["code"], "host_not_allowed");
        assert_eq!(v["status"], 403);
        assert_eq!(v["type"], "urn:credproxy:problem:host_not_allowed");
    }
}
