//! Object storage as a place for outputs and inputs (`s3://`, `gs://`, `az://` through the
//! `object_store` crate): [`ObjectTarget`] parses a bucket URL and builds the store from each
//! cloud's usual environment, writes a verified output as one object (one PUT, so an interrupted
//! upload never leaves a partial object under its name), checks what the store holds, and signs
//! GET URLs for the gallery (inputs are presigned in `provider/http.rs`).

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use sha2::{Digest as _, Sha256};

/// How long a gallery link to an output object works: a report is read within a week.
pub const GALLERY_URL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// The URL is not a bucket URL backdrop can use.
    #[error("{url:?} is not an object storage URL backdrop can use: {why}")]
    BadUrl {
        /// The URL, as given.
        url: String,
        /// Why.
        why: String,
    },
    /// The store answered with an error or could not be reached.
    #[error("object storage {what}: {message}")]
    Store {
        /// What was being done.
        what: String,
        /// The store's error (no credentials in it: `object_store` never prints them).
        message: String,
    },
    /// The stored object is not what was written.
    #[error("object {key} does not match what was written: {why}")]
    Mismatch {
        /// The object key.
        key: String,
        /// What differs.
        why: String,
    },
}

impl ObjectError {
    /// True when trying again may work: the store's failures are (a timeout, a 5xx, a throttle);
    /// a bad URL or a mismatch are not, without someone looking.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Store { .. })
    }
}

/// The clouds a URL may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// `s3://bucket/prefix` (and `s3a://`): Amazon S3 or any S3-compatible store.
    S3,
    /// `gs://bucket/prefix`: Google Cloud Storage.
    Gcs,
    /// `az://container/prefix` (and `abfs://`, `azure://`): Azure Blob Storage.
    Azure,
}

impl Cloud {
    /// The cloud a URL names, or `None` when it is not an object storage URL.
    #[must_use]
    pub fn of(url: &str) -> Option<Self> {
        let scheme = url.split_once("://")?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "s3" | "s3a" => Some(Self::S3),
            "gs" => Some(Self::Gcs),
            "az" | "abfs" | "abfss" | "azure" => Some(Self::Azure),
            _ => None,
        }
    }
}

/// True when `url` names an object in a bucket (`s3://`, `gs://`, `az://`...).
#[must_use]
pub fn is_object_url(url: &str) -> bool {
    Cloud::of(url).is_some()
}

/// A store that can also sign URLs (every cloud backdrop builds can).
trait SigningStore: ObjectStore + Signer {}
impl<T: ObjectStore + Signer> SigningStore for T {}

/// A bucket (and a prefix in it) outputs go to or inputs come from.
#[derive(Clone)]
pub struct ObjectTarget {
    store: Arc<dyn SigningStore>,
    url: String,
    prefix: String,
}

impl std::fmt::Debug for ObjectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTarget").field("url", &self.url).finish_non_exhaustive()
    }
}

fn store_error(what: &str, e: &object_store::Error) -> ObjectError {
    ObjectError::Store { what: what.to_owned(), message: e.to_string() }
}

impl ObjectTarget {
    /// The bucket and prefix `url` names, with credentials, region and endpoint from the cloud's
    /// usual environment (`AWS_*`, `GOOGLE_*`, `AZURE_*` variables, as `object_store`'s
    /// `from_env` reads them).
    ///
    /// # Errors
    /// [`ObjectError::BadUrl`] for a URL that names no bucket, or a store that cannot be built
    /// from the environment.
    pub fn from_url(url: &str) -> Result<Self, ObjectError> {
        let bad = |why: String| ObjectError::BadUrl { url: url.to_owned(), why };
        let cloud = Cloud::of(url).ok_or_else(|| bad("expected s3://, gs:// or az://".into()))?;
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no bucket".into()));
        }
        // object_store's TLS runs on the process-wide rustls provider backdrop uses.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store: Arc<dyn SigningStore> = match cloud {
            Cloud::S3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            Cloud::Gcs => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
            Cloud::Azure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            ),
        };
        let prefix = parsed.path().trim_matches('/').to_owned();
        Ok(Self { store, url: url.trim_end_matches('/').to_owned(), prefix })
    }

    /// The URL as given (no trailing slash), for messages.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object key of `relative` (an output's path under the prefix).
    ///
    /// # Errors
    /// [`ObjectError::BadUrl`] when the path cannot be an object key.
    pub fn key(&self, relative: &str) -> Result<ObjectPath, ObjectError> {
        let relative = relative.replace('\\', "/");
        let joined = if self.prefix.is_empty() { relative } else { format!("{}/{}", self.prefix, relative) };
        ObjectPath::parse(&joined)
            .map_err(|e| ObjectError::BadUrl { url: format!("{}/{joined}", self.url), why: e.to_string() })
    }

    /// Writes `bytes` as the object `relative` under the prefix and checks what the store then
    /// holds: its size (HEAD), and, when the store's ETag is a plain MD5 (a single-part upload
    /// without KMS encryption), that MD5. Answers the object's sha256 (of the bytes sent, which
    /// the size and MD5 checks tie to the object).
    ///
    /// One PUT: an interrupted upload leaves no object under the name, and a complete one
    /// replaces the old object whole.
    ///
    /// # Errors
    /// [`ObjectError::Store`] (retryable) when the store fails, [`ObjectError::Mismatch`] when
    /// the stored object differs.
    pub async fn put_verified(&self, relative: &str, bytes: bytes::Bytes) -> Result<String, ObjectError> {
        let key = self.key(relative)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&bytes));
        let size = bytes.len() as u64;
        let put = self.store.put(&key, PutPayload::from(bytes)).await.map_err(|e| store_error("put", &e))?;
        let meta = self.store.head(&key).await.map_err(|e| store_error("head", &e))?;
        if meta.size != size {
            return Err(ObjectError::Mismatch {
                key: key.to_string(),
                why: format!("{} bytes stored, {size} written", meta.size),
            });
        }
        for etag in [put.e_tag.as_deref(), meta.e_tag.as_deref()].into_iter().flatten() {
            let plain = etag.trim_matches('"');
            // A multipart or encrypted object's ETag is not the MD5 of its bytes: only a plain
            // 32-hex-digit one is compared.
            if plain.len() == 32
                && plain.bytes().all(|b| b.is_ascii_hexdigit())
                && !plain.eq_ignore_ascii_case(&md5)
            {
                return Err(ObjectError::Mismatch {
                    key: key.to_string(),
                    why: format!("ETag {plain} is not the MD5 {md5} of the bytes written"),
                });
            }
        }
        Ok(sha256)
    }

    /// A GET URL of `relative` under the prefix that works for `lifetime`.
    ///
    /// # Errors
    /// [`ObjectError::Store`] when the store cannot sign (missing credentials).
    pub async fn signed_get(&self, relative: &str, lifetime: Duration) -> Result<String, ObjectError> {
        let key = self.key(relative)?;
        self.signed_key(&key, lifetime).await
    }

    async fn signed_key(&self, key: &ObjectPath, lifetime: Duration) -> Result<String, ObjectError> {
        self.store
            .signed_url(object_store::signer::Method::GET, key, lifetime)
            .await
            .map(|u| u.to_string())
            .map_err(|e| store_error("sign", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_name_their_cloud() {
        assert_eq!(Cloud::of("s3://b/p"), Some(Cloud::S3));
        assert_eq!(Cloud::of("S3://b/p"), Some(Cloud::S3));
        assert_eq!(Cloud::of("gs://b"), Some(Cloud::Gcs));
        assert_eq!(Cloud::of("az://c/p"), Some(Cloud::Azure));
        assert_eq!(Cloud::of("https://b/p"), None);
        assert_eq!(Cloud::of("/srv/out"), None);
        assert!(is_object_url("s3://bucket/x.png"));
        assert!(!is_object_url("out"));
    }

    #[test]
    fn keys_live_under_the_prefix() {
        // Building an S3 store reads no network: a region and keys make it complete.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let target = ObjectTarget {
            store: Arc::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name("b")
                    .with_region("us-east-1")
                    .with_access_key_id("k")
                    .with_secret_access_key("s")
                    .build()
                    .unwrap(),
            ),
            url: "s3://b/night".into(),
            prefix: "night".into(),
        };
        assert_eq!(target.key("SKU-1/0.png").unwrap().as_ref(), "night/SKU-1/0.png");
        assert!(target.key("a/../b.png").is_err(), "no dot segments in a key");
    }
}
