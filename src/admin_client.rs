//! A small client for the admin API, used by the CLI (and tests). Plain HTTP
//! to a configured address; never goes through an environment proxy.

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::secret::SecretValue;

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("invalid admin URL {0:?}")]
    Url(String),
    #[error("admin API request failed: {0}")]
    Transport(String),
    #[error("admin API answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

pub struct AdminClient {
    base: String,
    token: SecretValue,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(base: &str, token: SecretValue) -> Result<Self, AdminClientError> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(AdminClientError::Url(base));
        }
        Ok(Self { base, token, client: Client::builder(TokioExecutor::new()).build_http() })
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
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token.expose()));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(bytes)).map_err(|_| AdminClientError::Url(uri.clone()))?;
        let resp = self.client.request(req).await.map_err(|e| AdminClientError::Transport(e.to_string()))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| AdminClientError::Transport(e.to_string()))?.to_bytes();
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
        } else {
            Err(AdminClientError::Status { status, body: value.to_string() })
        }
    }
}
