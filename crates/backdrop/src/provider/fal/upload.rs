//! Local input files uploaded to fal's storage the way fal's own client does it, so a request
//! carries a URL instead of a data URI: the CDN v3 flow (a storage token, then the bytes to
//! `{base_url}/files/upload`) with the older initiate-and-PUT flow as the fallback. Owns
//! [`Uploader`]: uploads are recorded in the state file by sha256, so the same bytes are never
//! uploaded twice while their URL lives; they are not paid work and retry on their own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder as _;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use sha2::Digest as _;

use futures::future::BoxFuture;

use crate::domain::ApiKey;
use crate::provider::ProviderError;
use crate::provider::http::{self, Auth, Dialect};

/// fal's REST API, where storage tokens and upload slots come from (a host of its own, not the
/// queue's).
pub const DEFAULT_REST_BASE: &str = "https://rest.fal.ai";

/// How long backdrop asks fal to keep an uploaded file (`X-Fal-Object-Lifecycle`), and so how
/// long its URL is taken to live.
pub const UPLOAD_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// An upload is reused only while its URL has at least this long to live: a request may wait in
/// fal's queue for hours before the model reads its input.
pub const REUSE_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// A storage token is renewed this long before fal says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

/// A token whose `expires_at` cannot be read is used for this long.
const UNREADABLE_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Largest local file uploaded: a product photo is a few megabytes, and the whole file is held
/// in memory while it is hashed and sent.
pub const MAX_UPLOAD_BYTES: u64 = 64 * 1024 * 1024;

/// Tries per upload (the first and its retries).
const UPLOAD_TRIES: usize = 6;

/// One upload, as the log keeps it. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadEntry {
    /// Hex sha256 of the bytes.
    pub sha256: String,
    /// The storage endpoint (the REST base) the bytes went to.
    pub storage: String,
    /// The URL the storage returned.
    pub url: String,
    /// Size in bytes.
    pub bytes: i64,
    /// The sniffed content type.
    pub content_type: String,
    /// When it was uploaded.
    pub uploaded_at: i64,
    /// When its URL stops working.
    pub expires_at: i64,
}

/// Where uploads are remembered across runs (the state file; the pipeline implements it for
/// the store, which this layer does not see). Errors are messages: a log that fails only costs
/// an upload.
pub trait UploadLog: Send + Sync + 'static {
    /// The URL of `sha256` on `storage` if it still lives at `alive_until`.
    fn live_upload<'a>(
        &'a self,
        sha256: &'a str,
        storage: &'a str,
        alive_until: i64,
    ) -> BoxFuture<'a, Result<Option<String>, String>>;

    /// Remembers an upload.
    fn record_upload<'a>(&'a self, entry: &'a UploadEntry) -> BoxFuture<'a, Result<(), String>>;
}

fn now_ms() -> i64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// What the uploads of a run did, for the summary line and the figures.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Files uploaded.
    pub uploaded: AtomicU64,
    /// Their bytes.
    pub uploaded_bytes: AtomicU64,
    /// Local inputs answered from an earlier upload (this run's or a previous one's).
    pub reused: AtomicU64,
    /// Failed tries that were retried.
    pub retries: AtomicU64,
}

/// A storage token and where it lets bytes go.
#[derive(Clone)]
struct Token {
    /// `<token_type> <token>`, marked sensitive.
    header: HeaderValue,
    base_url: String,
    renew_at: SystemTime,
}

/// Uploads local files to fal's storage, at most once per content while the URL lives.
pub struct Uploader {
    client: reqwest::Client,
    rest_base: String,
    auth: Auth,
    log: Arc<dyn UploadLog>,
    token: tokio::sync::Mutex<Option<Token>>,
    /// Set once the CDN v3 token endpoint is found missing: the initiate flow from then on.
    v3_missing: AtomicBool,
    /// One lock per content hash, so two rows sharing a photo upload it once.
    in_progress: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The first retry's delay (later ones grow exponentially).
    first_retry: Duration,
    stats: Arc<UploadStats>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader").field("rest_base", &self.rest_base).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: String,
    token_type: String,
    base_url: String,
    #[serde(default)]
    expires_at: Option<String>,
}

#[derive(Deserialize)]
struct CdnAnswer {
    access_url: String,
}

#[derive(Deserialize)]
struct Initiated {
    upload_url: String,
    file_url: String,
}

/// True when trying the upload again may work. Uploads cost nothing, so any failure that is not
/// a verdict on the key or on the file is retried.
fn retryable(e: &ProviderError) -> bool {
    match e {
        ProviderError::Connect(_) | ProviderError::NoAnswer { .. } | ProviderError::Decode(_) => true,
        ProviderError::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
        _ => false,
    }
}

/// `expires_at` as fal writes it (`2025-01-01T00:00:00.123456+00:00`, or with `Z`).
fn parse_expiry(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let utc = text.strip_suffix("+00:00").or_else(|| text.strip_suffix('Z')).unwrap_or(text);
    humantime::parse_rfc3339_weak(utc).ok()
}

/// Only http(s) URLs: a storage that answers with anything else is not used.
fn check_url(url: &str, what: &str) -> Result<(), ProviderError> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(ProviderError::Decode(format!("fal storage answered a {what} that is not an http(s) URL"))),
    }
}

fn lifecycle() -> HeaderValue {
    HeaderValue::from_str(&format!("{{\"expiration_duration_seconds\":{}}}", UPLOAD_LIFETIME.as_secs()))
        .unwrap_or_else(|_| HeaderValue::from_static("{}"))
}

impl Uploader {
    /// An uploader talking to `rest_base` ([`DEFAULT_REST_BASE`] for the real service) with
    /// `key`, remembering uploads in `log`.
    ///
    /// # Errors
    /// [`ProviderError::Input`] when the base is not an http(s) URL or the key cannot be put in a
    /// header.
    pub fn new(
        client: reqwest::Client,
        rest_base: &str,
        key: ApiKey,
        log: Arc<dyn UploadLog>,
    ) -> Result<Self, ProviderError> {
        match url::Url::parse(rest_base) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(ProviderError::Input(format!(
                    "fal REST base {rest_base:?} is not an http(s) URL"
                )));
            }
        }
        Ok(Self {
            client,
            rest_base: rest_base.trim_end_matches('/').to_owned(),
            auth: Auth::fal(key)?,
            log,
            token: tokio::sync::Mutex::new(None),
            v3_missing: AtomicBool::new(false),
            in_progress: std::sync::Mutex::new(HashMap::new()),
            first_retry: Duration::from_millis(500),
            stats: Arc::new(UploadStats::default()),
        })
    }

    /// The same uploader with another first retry delay (tests use a short one).
    #[must_use]
    pub fn with_first_retry(mut self, delay: Duration) -> Self {
        self.first_retry = delay;
        self
    }

    /// The run's upload counters.
    #[must_use]
    pub fn stats(&self) -> Arc<UploadStats> {
        Arc::clone(&self.stats)
    }

    /// The fal URL of the local file at `path`: an earlier upload of the same bytes while it
    /// lives, else a new upload (retried on its own), recorded in the state file.
    ///
    /// # Errors
    /// [`ProviderError::Input`] for a file that cannot be read, is too large or is not a PNG,
    /// JPEG or WebP image; a 401/403 on the key ([`ProviderError::class`] stops the run); the
    /// last failure once the retries are spent.
    pub async fn url_for(&self, path: &str) -> Result<String, ProviderError> {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| ProviderError::Input(format!("cannot read {path}: {e}")))?;
        if meta.len() > MAX_UPLOAD_BYTES {
            return Err(ProviderError::Input(format!(
                "{path} is {} bytes, above the {MAX_UPLOAD_BYTES}-byte upload limit",
                meta.len()
            )));
        }
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| ProviderError::Input(format!("cannot read {path}: {e}")))?;
        let mime = http::sniff_mime(&bytes)
            .ok_or_else(|| ProviderError::Input(format!("{path} is not a PNG, JPEG or WebP image")))?;
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let gate = {
            let mut map = self.in_progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(map.entry(sha256.clone()).or_default())
        };
        let _held = gate.lock().await;
        let margin = i64::try_from(REUSE_MARGIN.as_millis()).unwrap_or(i64::MAX);
        let stored = self.log.live_upload(&sha256, &self.rest_base, now_ms().saturating_add(margin)).await;
        match stored {
            Ok(Some(url)) => {
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(path, sha256, "input already uploaded");
                return Ok(url);
            }
            Ok(None) => {}
            // The cache is an optimisation: without it the file is uploaded again.
            Err(e) => tracing::warn!(error = %e, "cannot read the upload record; uploading again"),
        }
        let name = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("input").to_owned();
        let uploaded_at = now_ms();
        let url = self.upload_with_retries(bytes.clone(), mime, &name).await?;
        self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
        self.stats.uploaded_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let lifetime = i64::try_from(UPLOAD_LIFETIME.as_millis()).unwrap_or(i64::MAX);
        let record = UploadEntry {
            sha256,
            storage: self.rest_base.clone(),
            url: url.clone(),
            bytes: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
            content_type: mime.to_owned(),
            uploaded_at,
            expires_at: uploaded_at.saturating_add(lifetime),
        };
        if let Err(e) = self.log.record_upload(&record).await {
            tracing::warn!(error = %e, "cannot record the upload; the file will be uploaded again next time");
        }
        tracing::debug!(path, url, "input uploaded");
        Ok(url)
    }

    async fn upload_with_retries(
        &self,
        bytes: Vec<u8>,
        mime: &str,
        name: &str,
    ) -> Result<String, ProviderError> {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.first_retry)
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(UPLOAD_TRIES - 1)
            .with_jitter()
            .build();
        let bytes = bytes::Bytes::from(bytes);
        loop {
            match self.upload_once(bytes.clone(), mime, name).await {
                Ok(url) => return Ok(url),
                Err(e) if retryable(&e) => {
                    let Some(delay) = delays.next() else { return Err(e) };
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %e, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "upload failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn upload_once(
        &self,
        bytes: bytes::Bytes,
        mime: &str,
        name: &str,
    ) -> Result<String, ProviderError> {
        if !self.v3_missing.load(Ordering::Relaxed) {
            match self.upload_v3(bytes.clone(), mime, name).await {
                Err(ProviderError::Http { status: 404 | 405, .. }) => {
                    self.v3_missing.store(true, Ordering::Relaxed);
                    tracing::info!("fal storage has no CDN v3 token endpoint; using the initiate flow");
                }
                other => return other,
            }
        }
        self.upload_initiate(bytes, mime, name).await
    }

    /// A live token, from the cache or fal; `renew` forces a new one (the last was refused).
    async fn token(&self, renew: bool) -> Result<Token, ProviderError> {
        let mut cached = self.token.lock().await;
        if !renew && let Some(token) = cached.as_ref().filter(|t| t.renew_at > SystemTime::now()) {
            return Ok(token.clone());
        }
        let url = format!("{}/storage/auth/token?storage_type=fal-cdn-v3", self.rest_base);
        let request =
            self.client.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body("{}");
        let answer = http::send(request, &self.auth, Dialect::Fal, "fal storage token").await?;
        let got: TokenAnswer = answer.json("fal storage token", &self.auth)?;
        check_url(&got.base_url, "base_url")?;
        let mut header = HeaderValue::from_str(&format!("{} {}", got.token_type, got.token))
            .map_err(|_| ProviderError::Decode("fal storage token cannot be put in a header".into()))?;
        header.set_sensitive(true);
        let now = SystemTime::now();
        let renew_at = got
            .expires_at
            .as_deref()
            .and_then(parse_expiry)
            .and_then(|at| at.checked_sub(TOKEN_MARGIN))
            .unwrap_or(now + UNREADABLE_TOKEN_LIFETIME);
        let token = Token { header, base_url: got.base_url.trim_end_matches('/').to_owned(), renew_at };
        *cached = Some(token.clone());
        Ok(token)
    }

    /// `POST {base_url}/files/upload` with the storage token; a 401 (the token expired early)
    /// renews the token and tries once more.
    async fn upload_v3(&self, bytes: bytes::Bytes, mime: &str, name: &str) -> Result<String, ProviderError> {
        let mut token = self.token(false).await?;
        for renewed in [false, true] {
            let request = self
                .client
                .post(format!("{}/files/upload", token.base_url))
                .header(reqwest::header::AUTHORIZATION, token.header.clone())
                .header(reqwest::header::CONTENT_TYPE, mime)
                .header("X-Fal-File-Name", name)
                .header("X-Fal-Object-Lifecycle", lifecycle())
                .body(bytes.clone());
            match http::send_without_key(request, &self.auth, Dialect::Fal, "fal storage upload").await {
                Ok(answer) => {
                    let got: CdnAnswer = answer.json("fal storage upload", &self.auth)?;
                    check_url(&got.access_url, "access_url")?;
                    return Ok(got.access_url);
                }
                Err(ProviderError::Http { status: 401 | 403, .. }) if !renewed => {
                    tracing::debug!("storage token refused; renewing it");
                    token = self.token(true).await?;
                }
                Err(ProviderError::Http { status: status @ (401 | 403), message, .. }) => {
                    // Not a verdict on the API key (that went to the token endpoint, which
                    // accepted it): the storage refused a fresh token too.
                    return Err(ProviderError::Input(format!(
                        "fal storage refused a fresh upload token (HTTP {status}): {message}"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Err(ProviderError::Decode("fal storage upload: no answer".into()))
    }

    /// The older flow: `POST /storage/upload/initiate`, then `PUT` the bytes to `upload_url`
    /// (without the key: the URL is its own grant, and may be another host).
    async fn upload_initiate(
        &self,
        bytes: bytes::Bytes,
        mime: &str,
        name: &str,
    ) -> Result<String, ProviderError> {
        let url = format!("{}/storage/upload/initiate?storage_type=fal-cdn-v3", self.rest_base);
        let request = self
            .client
            .post(url)
            .header("X-Fal-Object-Lifecycle", lifecycle())
            .json(&serde_json::json!({ "file_name": name, "content_type": mime }));
        let answer = http::send(request, &self.auth, Dialect::Fal, "fal storage initiate").await?;
        let slot: Initiated = answer.json("fal storage initiate", &self.auth)?;
        check_url(&slot.upload_url, "upload_url")?;
        check_url(&slot.file_url, "file_url")?;
        let put = self.client.put(&slot.upload_url).header(reqwest::header::CONTENT_TYPE, mime).body(bytes);
        http::send_without_key(put, &self.auth, Dialect::Fal, "fal storage put").await?;
        Ok(slot.file_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_reads_both_utc_spellings() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_expiry("2023-11-14T22:13:20.000000+00:00"), Some(at));
        assert_eq!(parse_expiry("2023-11-14T22:13:20Z"), Some(at));
        assert_eq!(parse_expiry("tomorrow"), None);
    }

    #[test]
    fn failures_that_say_nothing_about_the_key_or_file_are_retried() {
        let http = |status| ProviderError::Http {
            status,
            code: None,
            message: String::new(),
            retry_after: None,
            retryable_hint: None,
            user_timeout: false,
            from_api: false,
        };
        for status in [408, 429, 500, 502, 503] {
            assert!(retryable(&http(status)), "{status}");
        }
        for status in [400, 401, 403, 404, 413] {
            assert!(!retryable(&http(status)), "{status}");
        }
        assert!(retryable(&ProviderError::NoAnswer { sent: true, message: String::new() }));
        assert!(!retryable(&ProviderError::Input(String::new())));
        assert!(check_url("javascript:alert(1)", "x").is_err());
        assert!(check_url("https://v3.fal.media/files/a.png", "x").is_ok());
    }
}
