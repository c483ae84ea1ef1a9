//! The `aws-kms` key provider: `GenerateDataKey` for new records and
//! `Decrypt` for existing ones, both with the encryption context
//! `{org_id, connection_id}` so a record copied onto another row fails to
//! open. Unwrapped data keys are cached (bounded, TTL) so a connection-cache
//! miss does not always cost a KMS call.
//!
//! The HTTP client is built explicitly (rustls + ring): it never reads
//! `HTTP_PROXY`/`HTTPS_PROXY`, so KMS calls cannot loop through credproxy.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use moka::future::Cache;
use ring::digest;
use zeroize::Zeroizing;

use super::{Context, CryptoError, KeyProvider, DATA_KEY_LEN};

/// Prefix of the `key_id` stored with records wrapped by KMS.
pub const KEY_ID_PREFIX: &str = "aws-kms:";

pub struct KmsKeyProvider {
    client: aws_sdk_kms::Client,
    kms_key: String,
    key_id: String,
    unwrapped: Cache<[u8; 32], Arc<Zeroizing<Vec<u8>>>>,
}

impl std::fmt::Debug for KmsKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsKeyProvider").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl KmsKeyProvider {
    /// `kms_key` is a key id, ARN or alias; credentials come from the usual
    /// AWS environment (variables, web identity, container/instance roles).
    /// `timeout` bounds each call (connecting included; `crypto.kms_timeout_ms`).
    pub async fn new(
        kms_key: &str,
        region: &str,
        endpoint: Option<&str>,
        cache_ttl: Duration,
        timeout: Duration,
    ) -> Self {
        use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
        let http =
            aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_owned()))
            .http_client(http)
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(timeout)
                    .operation_attempt_timeout(timeout)
                    .operation_timeout(timeout * 2)
                    .build(),
            );
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        Self {
            client: aws_sdk_kms::Client::new(&conf),
            kms_key: kms_key.to_owned(),
            key_id: format!("{KEY_ID_PREFIX}{kms_key}"),
            unwrapped: Cache::builder().max_capacity(100_000).time_to_live(cache_ttl).build(),
        }
    }

    fn context(ctx: Context<'_>) -> std::collections::HashMap<String, String> {
        [("org_id".to_owned(), ctx.org_id.to_owned()), ("connection_id".to_owned(), ctx.connection_id.to_owned())]
            .into_iter()
            .collect()
    }
}

/// Sorts KMS failures: a ciphertext that does not open (wrong context, wrong
/// key, garbage) is `Open`; anything else means KMS could not be asked.
fn kms_error<E, R>(e: aws_sdk_kms::error::SdkError<E, R>) -> CryptoError
where
    E: aws_sdk_kms::error::ProvideErrorMetadata + std::fmt::Debug,
{
    match e.as_service_error().and_then(|s| s.code()) {
        Some("InvalidCiphertextException" | "IncorrectKeyException" | "AccessDeniedException") => CryptoError::Open,
        Some(code) => CryptoError::KeyService(format!("KMS refused the request: {code}")),
        None => CryptoError::KeyService("KMS is unreachable".into()),
    }
}

#[async_trait]
impl KeyProvider for KmsKeyProvider {
    fn current_key_id(&self) -> &str {
        &self.key_id
    }

    /// Any KMS key: a symmetric KMS ciphertext names its key, so one client
    /// decrypts records of every KMS key the credentials may use.
    fn owns(&self, key_id: &str) -> bool {
        key_id.starts_with(KEY_ID_PREFIX)
    }

    async fn wrap(&self, data_key: &[u8], ctx: Context<'_>) -> Result<Vec<u8>, CryptoError> {
        let out = self
            .client
            .encrypt()
            .key_id(&self.kms_key)
            .plaintext(Blob::new(data_key.to_vec()))
            .set_encryption_context(Some(Self::context(ctx)))
            .send()
            .await
            .map_err(kms_error)?;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| CryptoError::KeyService("KMS returned no ciphertext".into()))
    }

    async fn generate(&self, ctx: Context<'_>) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), CryptoError> {
        let out = self
            .client
            .generate_data_key()
            .key_id(&self.kms_key)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(Self::context(ctx)))
            .send()
            .await
            .map_err(kms_error)?;
        let plaintext = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        let wrapped = out.ciphertext_blob.map(Blob::into_inner).unwrap_or_default();
        if plaintext.len() != DATA_KEY_LEN || wrapped.is_empty() {
            return Err(CryptoError::KeyService("KMS returned a malformed data key".into()));
        }
        Ok((plaintext, wrapped))
    }

    async fn unwrap(&self, key_id: &str, wrapped: &[u8], ctx: Context<'_>) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if !self.owns(key_id) {
            return Err(CryptoError::UnknownKey(key_id.to_owned()));
        }
        // The cache key covers the blob and its context: a hit is exactly the
        // answer KMS gave before.
        let mut h = digest::Context::new(&digest::SHA256);
        h.update(wrapped);
        h.update(&ctx.aad());
        let mut cache_key = [0u8; 32];
        cache_key.copy_from_slice(h.finish().as_ref());
        if let Some(k) = self.unwrapped.get(&cache_key).await {
            return Ok(Zeroizing::new(k.to_vec()));
        }
        let out = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(wrapped.to_vec()))
            .set_encryption_context(Some(Self::context(ctx)))
            .send()
            .await
            .map_err(kms_error)?;
        let key = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        if key.len() != DATA_KEY_LEN {
            return Err(CryptoError::Open);
        }
        self.unwrapped.insert(cache_key, Arc::new(key.clone())).await;
        Ok(key)
    }
}
