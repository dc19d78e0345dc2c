//! A store opened from its URL: the object_store client behind it, with
//! deadlines on every request.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig};

use crate::url::check_key;
use crate::{StoreError, StoreUrl, UrlError};

/// How to reach an `s3://` store. Every field left `None` falls back to the
/// standard AWS environment variable (`AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, also `AWS_SESSION_TOKEN`
/// and `AWS_ALLOW_HTTP`), then to object_store's defaults (AWS itself,
/// `us-east-1`, instance credentials). `file://` stores ignore it.
#[derive(Clone)]
pub struct StoreOptions {
    /// Base URL of an S3-compatible service, e.g. `http://127.0.0.1:8333`.
    pub endpoint: Option<String>,
    /// The region requests are signed for.
    pub region: Option<String>,
    /// Access key id; with [`StoreOptions::secret_access_key`].
    pub access_key_id: Option<String>,
    /// Secret access key; with [`StoreOptions::access_key_id`].
    pub secret_access_key: Option<String>,
    /// Allow plain `http://` endpoints that are not loopback (loopback ones
    /// always are: a local test or sidecar server).
    pub allow_http: bool,
    /// Deadline for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Deadline for one request, from sending it to the last body byte.
    pub request_timeout: Duration,
    /// Transient failures (connection refused, 5xx) are retried within this
    /// window after the first attempt, then reported.
    pub retry_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            retry_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret never reaches a log line.
        f.debug_struct("StoreOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("allow_http", &self.allow_http)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retry_timeout", &self.retry_timeout)
            .finish()
    }
}

/// An opened store: keys are relative to its URL's prefix.
#[derive(Debug, Clone)]
pub struct Store {
    url: StoreUrl,
    inner: Arc<dyn ObjectStore>,
    prefix: String,
}

impl Store {
    /// Opens the store at `url`. No request is made: a wrong endpoint or
    /// credentials show up on the first read or write.
    pub fn open(url: &StoreUrl, options: &StoreOptions) -> Result<Store, StoreError> {
        let open_error = |source| StoreError::Open {
            url: url.to_string(),
            source,
        };
        let (inner, prefix): (Arc<dyn ObjectStore>, String) = match url {
            StoreUrl::S3 { bucket, prefix } => {
                let s3 = s3_builder(bucket, options).build().map_err(open_error)?;
                (Arc::new(s3), prefix.clone())
            }
            StoreUrl::File { root } => {
                let local = LocalFileSystem::new_with_prefix(root).map_err(open_error)?;
                (Arc::new(local), String::new())
            }
        };
        Ok(Store {
            url: url.clone(),
            inner,
            prefix,
        })
    }

    /// The URL the store was opened from.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// The full URL of `key`, for messages.
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{key}", self.url.to_string().trim_end_matches('/'))
    }

    /// Where `key` lives in the underlying store.
    pub(crate) fn location(&self, key: &str) -> Result<ObjectPath, StoreError> {
        check_key(&self.object_url(key), key)?;
        let full = if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjectPath::parse(&full).map_err(|e| {
            StoreError::Url(UrlError {
                url: self.object_url(key),
                reason: e.to_string(),
            })
        })
    }

    pub(crate) fn inner(&self) -> &dyn ObjectStore {
        self.inner.as_ref()
    }

    /// Reads the whole object at `key`, refusing one larger than `limit`
    /// bytes (by its declared size, and again while reading).
    pub async fn get(&self, key: &str, limit: u64) -> Result<Bytes, StoreError> {
        let location = self.location(key)?;
        let url = self.object_url(key);
        let result = self
            .inner
            .get(&location)
            .await
            .map_err(|e| StoreError::request("reading", url.clone(), e))?;
        if result.meta.size > limit {
            return Err(StoreError::TooLarge { url, limit });
        }
        // The declared size is at most `limit`, so this bounds the buffer.
        let mut buf = BytesMut::with_capacity(usize::try_from(result.meta.size).unwrap_or(0));
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| StoreError::request("reading", url.clone(), e))?;
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(StoreError::TooLarge { url, limit });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// Writes `bytes` as the object at `key`, replacing any object there.
    /// Readers see the old object or the new one, never a part.
    pub async fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let location = self.location(key)?;
        self.inner
            .put(&location, bytes.into().into())
            .await
            .map_err(|e| StoreError::request("writing", self.object_url(key), e))?;
        Ok(())
    }
}

fn s3_builder(bucket: &str, options: &StoreOptions) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &options.region {
        builder = builder.with_region(region);
    }
    if let Some(key) = &options.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &options.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    let loopback = builder
        .get_config_value(&AmazonS3ConfigKey::Endpoint)
        .is_some_and(|endpoint| is_loopback_endpoint(&endpoint));
    if options.allow_http || loopback {
        builder = builder.with_allow_http(true);
    }
    let millis = |d: Duration| format!("{}ms", d.as_millis());
    builder
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            millis(options.connect_timeout),
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            millis(options.request_timeout),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: options.retry_timeout,
        })
}

/// Whether `endpoint` (`http://host:port/…`) names this machine.
fn is_loopback_endpoint(endpoint: &str) -> bool {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        // `[::1]:8333`
        Some(bracketed) => bracketed.split(']').next().unwrap_or(bracketed),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_loopback_endpoints() {
        for endpoint in [
            "http://127.0.0.1:8333",
            "http://localhost:9000/",
            "http://[::1]:8333",
            "http://127.1.2.3",
        ] {
            assert!(is_loopback_endpoint(endpoint), "{endpoint}");
        }
        for endpoint in [
            "http://10.0.0.5:9000",
            "https://s3.eu-central-1.amazonaws.com",
            "http://localhost.example.com",
        ] {
            assert!(!is_loopback_endpoint(endpoint), "{endpoint}");
        }
    }

    #[tokio::test]
    async fn file_store_round_trip_and_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = StoreUrl::File {
            root: dir.path().to_path_buf(),
        };
        let store = Store::open(&url, &StoreOptions::default()).expect("open");
        store.put("a/b.bin", vec![7u8; 100]).await.expect("put");
        assert_eq!(store.get("a/b.bin", 100).await.expect("get").len(), 100);
        assert!(matches!(
            store.get("a/b.bin", 99).await,
            Err(StoreError::TooLarge { limit: 99, .. })
        ));
        assert!(matches!(
            store.get("a/none", 99).await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            store.get("a/../b.bin", 100).await,
            Err(StoreError::Url(_))
        ));
    }
}
