//! A small client for the admin API, used by the CLI (and tests): `http://`
//! or `https://` (webpki roots plus any CA files given, for an admin API
//! behind a TLS-terminating ingress) to a configured address; never goes
//! through an environment proxy. Its errors say what to do.

use std::path::PathBuf;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::secret::SecretValue;

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("invalid admin URL {0:?}: expected http://HOST:PORT or https://HOST[:PORT]")]
    Url(String),
    #[error("admin CA certificate: {0}")]
    CaCert(String),
    #[error(
        "cannot reach the admin API at {url} ({cause}); is `credproxy serve` running there? \
         (set --admin-url or CREDPROXY_ADMIN_URL)"
    )]
    Unreachable { url: String, cause: String },
    #[error("the admin API at {url} rejected the admin token (401): check CREDPROXY_ADMIN_TOKEN or --admin-token")]
    Rejected { url: String },
    #[error("admin API answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

/// `GET url` with no credential, its body as JSON (the CLI fetches OpenID
/// Connect discovery documents with it). Public roots for https.
pub async fn get_json(url: &str) -> Result<Value, String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let client = http_client(&[]);
    let req = Request::get(uri).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body =
        http_body_util::Limited::new(resp.into_body(), 1 << 20).collect().await.map_err(|e| e.to_string())?.to_bytes();
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

/// An HTTP/1.1 client for http:// and https:// (webpki roots plus
/// `roots`), never through an environment proxy.
fn http_client(
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::upstream::tls_config(roots))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

pub struct AdminClient {
    base: String,
    token: SecretValue,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(base: &str, token: SecretValue) -> Result<Self, AdminClientError> {
        Self::with_ca_certs(base, token, &[])
    }

    /// A client that also trusts the CA certificates in `ca_files` (PEM)
    /// for an `https://` admin URL.
    pub fn with_ca_certs(base: &str, token: SecretValue, ca_files: &[PathBuf]) -> Result<Self, AdminClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let ok = base
            .parse::<http::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty()));
        if !ok {
            return Err(AdminClientError::Url(base));
        }
        let mut roots = Vec::new();
        for f in ca_files {
            roots.extend(crate::upstream::load_pem_certs(f).map_err(AdminClientError::CaCert)?);
        }
        Ok(Self { base, token, client: http_client(&roots) })
    }

    /// Sends a request; returns status and JSON body (or `Null` if empty).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), AdminClientError> {
        let uri = format!("{}{}", self.base, path);
        let bytes = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("json serializes"))).unwrap_or_default();
        let mut auth = http::HeaderValue::try_from(format!("Bearer {}", self.token.expose()))
            .map_err(|_| AdminClientError::Rejected { url: self.base.clone() })?;
        auth.set_sensitive(true);
        let mut req = Request::builder().method(method).uri(&uri).header(header::AUTHORIZATION, auth);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(bytes)).map_err(|_| AdminClientError::Url(uri.clone()))?;
        let unreachable =
            |e: &dyn std::error::Error| AdminClientError::Unreachable { url: self.base.clone(), cause: cause_of(e) };
        let resp = self.client.request(req).await.map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        Ok((status, value))
    }

    /// Like [`send`](Self::send) but a non-2xx status is an error.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, AdminClientError> {
        let (status, value) = self.send(method, path, body).await?;
        if status.is_success() {
            Ok(value)
        } else if status == StatusCode::UNAUTHORIZED {
            Err(AdminClientError::Rejected { url: self.base.clone() })
        } else {
            Err(AdminClientError::Status { status, body: value.to_string() })
        }
    }
}

/// The innermost cause of a transport error ("Connection refused (os error
/// 111)", a TLS failure), which says more than hyper's outer message.
fn cause_of(e: &dyn std::error::Error) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        last = inner.to_string();
        cur = inner.source();
    }
    last
}
