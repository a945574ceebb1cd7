//! HTTP plumbing shared by both providers: the one [`client`] builder, the authorization header
//! ([`Auth`], the only place an API key is read, and [`Auth::redact`], which scrubs it from
//! anything a server sends back), sending a request and turning every failure into a
//! [`ProviderError`] ([`send`], judging error answers by each API's own error shape, [`Dialect`]),
//! reading bodies under a cap ([`read_capped`], [`MAX_BODY_BYTES`]), `Retry-After` parsing, and
//! inlining local images as data URIs (fal uploads them instead: `fal/upload.rs`).

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::Value;

use super::ProviderError;
use crate::domain::ApiKey;

/// How long to wait for a TCP (and TLS) connection before giving up: a connect failure is always
/// safe to retry, so there is no point waiting for the OS default of minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest error body kept in a message: enough for any API's explanation, short enough for
/// a log line and the store.
const MAX_MESSAGE_CHARS: usize = 500;

/// The most bytes read of any API answer or JWKS document (4 MiB). A real answer is a few
/// kilobytes; the cap keeps a broken or hostile server from making backdrop hold hundreds of
/// megabytes per request. It is enforced while the body streams in, so no more than this is ever
/// buffered. Image downloads have their own cap (`--max-download-bytes`).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Builds the HTTP client every provider and the downloader share (one connection pool).
///
/// `request_timeout` bounds a whole request (connect, send, answer, body) and also every gap
/// between two reads of a body, so a stalled server cannot hold a worker.
///
/// # Errors
/// [`ProviderError::Connect`] when the TLS backend cannot be set up.
pub fn client(request_timeout: Duration) -> Result<reqwest::Client, ProviderError> {
    client_builder(request_timeout)
        .build()
        .map_err(|e| ProviderError::Connect(format!("cannot build the HTTP client: {}", chain(&e))))
}

/// The settings every backdrop HTTP client shares (timeouts, user agent, TLS provider), for
/// [`client`] and for the download client, which adds its own redirect and address rules.
pub fn client_builder(request_timeout: Duration) -> reqwest::ClientBuilder {
    // reqwest is built with `rustls-no-provider`: without a process-wide provider the first TLS
    // handshake would panic. Installing twice is harmless (the second call just returns Err).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(request_timeout))
        .read_timeout(request_timeout)
        .timeout(request_timeout)
        .user_agent(concat!("backdrop/", env!("CARGO_PKG_VERSION")))
}

/// Whose documented error shape an error answer must carry to count as written by the API
/// itself. Only such an answer proves that a paid request was not charged: a 5xx from a gateway
/// or proxy in front of the API (an HTML page, an empty body) proves nothing, since the API
/// behind it may have taken and charged the request before the gateway gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": {"code": "...", "message": "..."}}`.
    Seedance,
    /// A JSON object with `detail` (`{"detail": [...]}` or `{"detail": "...", "error_type": ...}`),
    /// or any `X-Fal-*` response header (set by fal's own edge, never by a generic proxy).
    Fal,
}

impl Dialect {
    /// True when `headers` and `body` are this API's own error answer.
    fn wrote(self, headers: &HeaderMap, body: &[u8]) -> bool {
        let value = serde_json::from_slice::<Value>(body).ok();
        match self {
            Self::Seedance => value
                .as_ref()
                .and_then(|v| v.get("error"))
                .is_some_and(|e| ["code", "message"].iter().any(|k| e.get(*k).is_some_and(Value::is_string))),
            Self::Fal => {
                headers.keys().any(|name| name.as_str().starts_with("x-fal-"))
                    || value.as_ref().and_then(Value::as_object).is_some_and(|o| o.contains_key("detail"))
            }
        }
    }
}

/// The `Authorization` header of one provider, and the key it hides. Its `Debug` never shows the
/// key, and [`Auth::redact`] scrubs it from anything a server sends back.
#[derive(Clone)]
pub struct Auth {
    header: HeaderValue,
    key: ApiKey,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth([redacted])")
    }
}

impl Auth {
    /// `Authorization: Bearer <key>` (seedance).
    ///
    /// # Errors
    /// [`ProviderError::Input`] when the key holds bytes an HTTP header cannot carry (the message
    /// does not show the key).
    pub fn bearer(key: ApiKey) -> Result<Self, ProviderError> {
        Self::with_scheme("Bearer", key)
    }

    /// `Authorization: Key <key>` (fal: the word `Key`, not `Bearer`).
    ///
    /// # Errors
    /// As [`Auth::bearer`].
    pub fn fal(key: ApiKey) -> Result<Self, ProviderError> {
        Self::with_scheme("Key", key)
    }

    fn with_scheme(scheme: &str, key: ApiKey) -> Result<Self, ProviderError> {
        let mut header = HeaderValue::from_str(&format!("{scheme} {}", key.expose())).map_err(|_| {
            ProviderError::Input("the API key contains characters an HTTP header cannot carry".into())
        })?;
        // Marks the value so hyper's and reqwest's own Debug output print `Sensitive`.
        header.set_sensitive(true);
        Ok(Self { header, key })
    }

    /// Replaces every occurrence of the key in `text` (a server may echo the header it got):
    /// in any letter case, and also where some or all of its characters are percent-encoded.
    /// Call it on whole texts, before any truncation: a cut key is no longer recognisable.
    #[must_use]
    pub fn redact(&self, text: &str) -> String {
        redact_secret(text, self.key.expose())
    }
}

/// The marker that replaces a scrubbed key.
const REDACTED: &str = "[redacted]";

/// Removes every occurrence of `secret` from `text`, ASCII-case-insensitively, matching against
/// the percent-decoded text so that `%73k-...` or `SK%2D...` are caught too; each match replaces
/// the original characters it came from. Hand-written because the `percent-encoding` crate's
/// decoder does not say which input bytes produced which output byte, and the cut must be made
/// in the original text.
fn redact_secret(text: &str, secret: &str) -> String {
    let needle = secret.as_bytes();
    if needle.is_empty() || text.len() < needle.len() {
        return text.to_owned();
    }
    let raw = text.as_bytes();
    // The decoded bytes, each with the start of its source in `raw` (one byte, or three for %XX).
    let mut decoded = Vec::with_capacity(raw.len());
    let mut starts = Vec::with_capacity(raw.len() + 1);
    let mut i = 0;
    while i < raw.len() {
        starts.push(i);
        let escaped = (raw[i] == b'%')
            .then(|| raw.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(raw[i]);
                i += 1;
            }
        }
    }
    starts.push(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    let (mut copied, mut at) = (0, 0);
    while at + needle.len() <= decoded.len() {
        if decoded[at..at + needle.len()].eq_ignore_ascii_case(needle) {
            out.extend_from_slice(&raw[copied..starts[at]]);
            out.extend_from_slice(REDACTED.as_bytes());
            at += needle.len();
            copied = starts[at];
        } else {
            at += 1;
        }
    }
    if copied == 0 {
        return text.to_owned();
    }
    out.extend_from_slice(&raw[copied..]);
    // A match starts and ends on character boundaries (the key is ASCII in practice); lossy
    // conversion keeps this infallible whatever the key holds.
    String::from_utf8_lossy(&out).into_owned()
}

/// A 2xx answer: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status (2xx).
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// Decodes the body as JSON.
    ///
    /// # Errors
    /// [`ProviderError::Decode`] naming what was expected, redacted.
    pub fn json<T: serde::de::DeserializeOwned>(&self, what: &str, auth: &Auth) -> Result<T, ProviderError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ProviderError::Decode(auth.redact(&format!("{what}: {e}; body: {}", snippet(&self.body, auth))))
        })
    }
}

/// Why [`read_capped`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body is longer than the cap (announced, or found while streaming).
    #[error("the answer is larger than {limit} bytes, the cap on what backdrop reads")]
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The transfer failed part-way.
    #[error(transparent)]
    Transport(reqwest::Error),
}

/// Reads a response body, refusing it as soon as it is known to exceed `limit` bytes: at once
/// when `Content-Length` says so, otherwise while the chunks arrive, so at most `limit` bytes are
/// ever held.
///
/// # Errors
/// [`BodyError::TooLarge`] above the cap, [`BodyError::Transport`] when the transfer fails.
pub async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    let announced = response.content_length();
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(announced.map_or(0, |n| usize::try_from(n).unwrap_or(limit)));
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Sends `request` with the authorization header, reads the answer (at most [`MAX_BODY_BYTES`])
/// and maps failures: a non-2xx status becomes [`ProviderError::Http`] (see
/// [`error_from_response`]; `dialect` says whose error shape proves the API wrote it), a 2xx
/// above the cap [`ProviderError::TooLarge`], transport failures [`ProviderError::Connect`] or
/// [`ProviderError::NoAnswer`] (see [`transport_error`]).
///
/// # Errors
/// Any [`ProviderError`] but `Generation` and `Input`.
pub async fn send(
    request: RequestBuilder,
    auth: &Auth,
    dialect: Dialect,
    what: &str,
) -> Result<Answer, ProviderError> {
    send_request(request.header(reqwest::header::AUTHORIZATION, auth.header.clone()), auth, dialect, what)
        .await
}

/// As [`send`], without the key: for requests to hosts that must never see it (a storage
/// host's upload URL, which carries its own grant). `auth` only scrubs the answer.
///
/// # Errors
/// As [`send`].
pub async fn send_without_key(
    request: RequestBuilder,
    auth: &Auth,
    dialect: Dialect,
    what: &str,
) -> Result<Answer, ProviderError> {
    send_request(request, auth, dialect, what).await
}

async fn send_request(
    request: RequestBuilder,
    auth: &Auth,
    dialect: Dialect,
    what: &str,
) -> Result<Answer, ProviderError> {
    let response = request.send().await.map_err(|e| {
        let error = transport_error(&e, what, auth);
        tracing::debug!(what, %error, "no answer");
        error
    })?;
    let status = response.status();
    let headers = response.headers().clone();
    // A body cut short after a 2xx head on a submit is a request the server took: ambiguous.
    let body = match read_capped(response, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(BodyError::Transport(e)) => return Err(transport_error(&e, what, auth)),
        Err(BodyError::TooLarge { limit }) if status.is_success() => {
            let error = ProviderError::TooLarge { limit };
            tracing::debug!(what, %error, "answer too large");
            return Err(error);
        }
        // No API writes an error that large: it is judged by its status and headers alone.
        Err(BodyError::TooLarge { .. }) => Bytes::new(),
    };
    if status.is_success() {
        Ok(Answer { status, headers, body })
    } else {
        let error = error_from_response(status, &headers, &body, dialect, SystemTime::now(), auth);
        tracing::debug!(what, %error, "error answer");
        Err(error)
    }
}

/// Sends `request` with the key and answers the response of a 2xx head, its body unread (a
/// stream the caller reads piece by piece); an error status is read and classified as
/// [`send`] does.
///
/// # Errors
/// A [`ProviderError`], as for [`send`].
pub async fn open_stream(
    request: RequestBuilder,
    auth: &Auth,
    dialect: Dialect,
    what: &str,
) -> Result<reqwest::Response, ProviderError> {
    let response = request
        .header(reqwest::header::AUTHORIZATION, auth.header.clone())
        .send()
        .await
        .map_err(|e| transport_error(&e, what, auth))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = read_capped(response, MAX_BODY_BYTES).await.unwrap_or_default();
    Err(error_from_response(status, &headers, &body, dialect, SystemTime::now(), auth))
}

/// Maps a reqwest failure. A connect failure never reached the server; anything later (timeout,
/// reset, a body cut short) may have, so it is `NoAnswer { sent: true }`: on a submit the request
/// may have been charged ([`ProviderError::class`] says ambiguous; `poll_class` says retry). The URL is left out of the message (the key is never in a URL, but a
/// webhook URL's query may carry a secret of the user's).
#[must_use]
pub fn transport_error(e: &reqwest::Error, what: &str, auth: &Auth) -> ProviderError {
    let message = auth.redact(&format!("{what}: {}", chain(e)));
    if e.is_connect() {
        ProviderError::Connect(message)
    } else if e.is_builder() {
        // The request could not even be built (a bad URL): it never left.
        ProviderError::NoAnswer { sent: false, message }
    } else if e.is_decode() {
        ProviderError::Decode(message)
    } else {
        ProviderError::NoAnswer { sent: true, message }
    }
}

/// The error's chain on one line, without the URL reqwest attaches.
fn chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        let text = err.to_string();
        // reqwest's own Display appends " for url (...)": cut it off.
        let text = text.split(" for url (").next().unwrap_or_default().to_owned();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = err.source();
    }
    parts.join(": ")
}

/// Turns a non-2xx answer into [`ProviderError::Http`], reading both protocols' error shapes:
/// seedance `{"error": {"code", "message", "credits_required"?, "credits_available"?}}`, fal
/// `{"detail": [{"loc", "msg", "type"}]}` or `{"detail": "text", "error_type"?}`, plus the
/// `Retry-After`, `X-Fal-Retryable`, `X-Fal-Error-Type` and `X-Fal-Request-Timeout-Type` headers.
/// `from_api` is set when the answer has `dialect`'s own shape (see [`Dialect`]). The key is
/// scrubbed from the whole text before it is cut to length.
#[must_use]
pub fn error_from_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    dialect: Dialect,
    now: SystemTime,
    auth: &Auth,
) -> ProviderError {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let retry_after = header("retry-after").and_then(|v| parse_retry_after(v, now));
    let retryable_hint = header("x-fal-retryable").and_then(|v| match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    });
    let user_timeout = header("x-fal-request-timeout-type").is_some_and(|v| v.eq_ignore_ascii_case("user"));
    let (code, message) = parse_error_body(body);
    let code = code.or_else(|| header("x-fal-error-type").map(str::to_owned));
    let message = match message {
        Some(message) => truncate(&auth.redact(&message)),
        None => {
            let text = snippet(body, auth);
            if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text }
        }
    };
    ProviderError::Http {
        status: status.as_u16(),
        code: code.map(|c| truncate(&auth.redact(&c))),
        message,
        retry_after,
        retryable_hint,
        user_timeout,
        from_api: dialect.wrote(headers, body),
    }
}

/// Reads `(code, message)` out of an error body of either protocol, whole: the caller redacts,
/// then truncates.
fn parse_error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return (None, None) };
    if let Some(err) = value.get("error") {
        if let Some(text) = err.as_str() {
            return (None, Some(text.to_owned()));
        }
        let code = err.get("code").and_then(Value::as_str).map(str::to_owned);
        let mut message = err.get("message").and_then(Value::as_str).map(str::to_owned);
        // The 402 numbers are what the user needs to decide how many credits to buy.
        let num = |k: &str| err.get(k).filter(|v| v.is_number()).map(ToString::to_string);
        if let (Some(req), Some(avail)) = (num("credits_required"), num("credits_available")) {
            let base = message.unwrap_or_else(|| "insufficient credits".into());
            message = Some(format!("{base} (required {req}, available {avail})"));
        }
        return (code, message);
    }
    let code = value.get("error_type").and_then(Value::as_str).map(str::to_owned);
    let message = match value.get("detail") {
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Array(items)) => {
            let parts: Vec<String> = items.iter().map(describe_detail).collect();
            (!parts.is_empty()).then(|| parts.join("; "))
        }
        Some(other) => Some(other.to_string()),
        None => value.get("message").and_then(Value::as_str).map(str::to_owned),
    };
    (code, message)
}

/// One FastAPI-style validation item: `body.image_urls: field required`.
fn describe_detail(item: &Value) -> String {
    let msg = item.get("msg").and_then(Value::as_str).map_or_else(|| item.to_string(), str::to_owned);
    let loc = item.get("loc").and_then(Value::as_array).map(|parts| {
        parts
            .iter()
            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(".")
    });
    match loc {
        Some(loc) if !loc.is_empty() => format!("{loc}: {msg}"),
        _ => msg,
    }
}

/// A short, printable prefix of a body for messages, the key scrubbed before the cut.
fn snippet(body: &[u8], auth: &Auth) -> String {
    truncate(auth.redact(String::from_utf8_lossy(body).trim()).trim())
}

/// Cuts `text` to [`MAX_MESSAGE_CHARS`]. Redact first (see [`Auth::redact`]).
#[must_use]
pub fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// Parses a `Retry-After` value: delay seconds (`120`) or an HTTP-date, relative to `now`. A date
/// in the past means "now" (zero); garbage means no hint.
#[must_use]
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // Some servers send fractional seconds; tolerate them.
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether and how large local input files may be sent inline as data URIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InlinePolicy {
    /// `--inline-local-images`.
    pub allowed: bool,
    /// `--inline-max-bytes`.
    pub max_bytes: u64,
}

impl InlinePolicy {
    /// Local files refused.
    #[must_use]
    pub const fn refuse() -> Self {
        Self { allowed: false, max_bytes: 0 }
    }
}

/// Turns one stored input into something the API accepts: http(s) URLs and data URIs pass
/// through; an absolute local path becomes a `data:<mime>;base64,...` URI when the policy allows.
///
/// # Errors
/// [`ProviderError::Input`] for a relative path, a local file when inlining is off, a file above
/// the inline cap, an unreadable file or one that is not a PNG, JPEG or WebP image.
pub async fn resolve_input(input: &str, policy: InlinePolicy) -> Result<String, ProviderError> {
    let lower = input.get(..8).unwrap_or(input).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("data:") {
        return Ok(input.to_owned());
    }
    if let Some(cloud) = input.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase()) {
        return presign_input(input, &cloud).await;
    }
    let path = Path::new(input);
    if !path.is_absolute() {
        return Err(ProviderError::Input(format!(
            "{input:?} is neither an http(s) URL nor an absolute path"
        )));
    }
    if !policy.allowed {
        return Err(ProviderError::Input(format!(
            "{input} is a local file: pass --inline-local-images to send it as a data URI, or host it and use its URL"
        )));
    }
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| ProviderError::Input(format!("cannot read {input}: {e}")))?;
    if meta.len() > policy.max_bytes {
        return Err(ProviderError::Input(format!(
            "{input} is {}, above the {} inline limit; host it and use its URL",
            megabytes(meta.len()),
            megabytes(policy.max_bytes)
        )));
    }
    let bytes =
        tokio::fs::read(path).await.map_err(|e| ProviderError::Input(format!("cannot read {input}: {e}")))?;
    // Checked again after reading: the file may have grown in between.
    if bytes.len() as u64 > policy.max_bytes {
        return Err(ProviderError::Input(format!(
            "{input} is {}, above the {} inline limit; host it and use its URL",
            megabytes(bytes.len() as u64),
            megabytes(policy.max_bytes)
        )));
    }
    let mime = sniff_mime(&bytes)
        .ok_or_else(|| ProviderError::Input(format!("{input} is not a PNG, JPEG or WebP image")))?;
    Ok(format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes)))
}

/// How long a provider may read an input object: long enough for a queued request to start,
/// short enough that a leaked request body is soon useless.
pub const INPUT_URL_LIFETIME: Duration = Duration::from_secs(3600);

/// A presigned GET URL for the bucket object `url` names (`s3://bucket/key`, `gs://`, `az://`),
/// valid for [`INPUT_URL_LIFETIME`]: the provider reads the object without the cloud credentials,
/// which come from the cloud's usual environment and never leave this machine.
async fn presign_input(url: &str, scheme: &str) -> Result<String, ProviderError> {
    use object_store::signer::{Method, Signer as _};
    let bad = |why: String| ProviderError::Input(format!("{url}: {why}"));
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let bucket = format!("{scheme}://{}", parsed.host_str().unwrap_or_default());
    let key =
        object_store::path::Path::parse(parsed.path().trim_matches('/')).map_err(|e| bad(e.to_string()))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let signed = match scheme {
        "s3" | "s3a" => {
            let store = object_store::aws::AmazonS3Builder::from_env().with_url(&bucket).build();
            store.map_err(|e| bad(e.to_string()))?.signed_url(Method::GET, &key, INPUT_URL_LIFETIME).await
        }
        "gs" => {
            let store = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(&bucket).build();
            store.map_err(|e| bad(e.to_string()))?.signed_url(Method::GET, &key, INPUT_URL_LIFETIME).await
        }
        "az" | "abfs" | "abfss" | "azure" => {
            let store = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(&bucket).build();
            store.map_err(|e| bad(e.to_string()))?.signed_url(Method::GET, &key, INPUT_URL_LIFETIME).await
        }
        other => return Err(bad(format!("{other}:// is not an http(s), s3, gs or az URL"))),
    };
    // Signing reads credentials (possibly over the network, from instance metadata): a failure
    // here is the row's input, never a paid request.
    signed.map(|u| u.to_string()).map_err(|e| bad(format!("cannot presign: {e}")))
}

/// The image type from the first bytes, never from the file name.
#[must_use]
pub fn sniff_mime(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// `9.1 MB`, `4 MB`: decimal megabytes, one decimal when it matters.
fn megabytes(bytes: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a human-readable size; precision is irrelevant")]
    let mb = bytes as f64 / 1_000_000.0;
    if (mb - mb.round()).abs() < 0.05 { format!("{mb:.0} MB") } else { format!("{mb:.1} MB") }
}

/// The longest request id accepted (real ids are a few dozen characters).
const MAX_REQUEST_ID_CHARS: usize = 256;

/// Checks that a request id from the server can be one segment of a URL path: not empty, not
/// too long, and free of `/`, `\`, `..` and control characters. Percent-encoding alone is not
/// enough: URL parsers (and many servers) treat `%2e%2e` as `..`, so an id that contains it
/// would still point at another resource.
///
/// # Errors
/// What is wrong with the id (shown escaped, never raw).
pub fn check_request_id(id: &str) -> Result<(), String> {
    let problem = if id.is_empty() {
        "is empty"
    } else if id.chars().count() > MAX_REQUEST_ID_CHARS {
        "is too long"
    } else if id.contains(['/', '\\']) {
        "contains a slash"
    } else if id == "." || id.contains("..") {
        "contains a dot segment"
    } else if id.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    let shown: String = id.chars().take(64).flat_map(char::escape_debug).collect();
    Err(format!("request id \"{shown}\" {problem}, so it cannot be used in a URL path"))
}

/// Joins a base URL and an absolute path (`/v1/...`) without doubling or losing slashes.
#[must_use]
pub fn join(base: &str, path: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::bearer(ApiKey::new("sk-sentinel-http-0001")).unwrap()
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5", now), Some(Duration::from_millis(1500)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn seedance_error_bodies_keep_code_message_and_credit_numbers() {
        let body = br#"{"error":{"code":"insufficient_credits","message":"Not enough credits","credits_required":16,"credits_available":3}}"#;
        let e = error_from_response(
            StatusCode::PAYMENT_REQUIRED,
            &HeaderMap::new(),
            body,
            Dialect::Seedance,
            SystemTime::now(),
            &auth(),
        );
        let ProviderError::Http { status, code, message, .. } = &e else { panic!("{e:?}") };
        assert_eq!(*status, 402);
        assert_eq!(code.as_deref(), Some("insufficient_credits"));
        assert_eq!(message, "Not enough credits (required 16, available 3)");
    }

    #[test]
    fn fal_detail_lists_and_headers_are_read() {
        let body = br#"{"detail":[{"loc":["body","image_urls"],"msg":"field required","type":"missing"}]}"#;
        let mut headers = HeaderMap::new();
        headers.insert("x-fal-retryable", HeaderValue::from_static("true"));
        headers.insert("x-fal-error-type", HeaderValue::from_static("validation_error"));
        let e = error_from_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &headers,
            body,
            Dialect::Fal,
            SystemTime::now(),
            &auth(),
        );
        let ProviderError::Http { code, message, retryable_hint, user_timeout, .. } = &e else { panic!() };
        assert_eq!(message, "body.image_urls: field required");
        assert_eq!(code.as_deref(), Some("validation_error"));
        assert_eq!(*retryable_hint, Some(true));
        assert!(!user_timeout);

        let mut headers = HeaderMap::new();
        headers.insert("x-fal-request-timeout-type", HeaderValue::from_static("user"));
        let body = br#"{"detail":"Request timed out","error_type":"request_timeout"}"#;
        let e = error_from_response(
            StatusCode::GATEWAY_TIMEOUT,
            &headers,
            body,
            Dialect::Fal,
            SystemTime::now(),
            &auth(),
        );
        let ProviderError::Http { code, message, user_timeout, .. } = &e else { panic!() };
        assert_eq!(message, "Request timed out");
        assert_eq!(code.as_deref(), Some("request_timeout"));
        assert!(user_timeout);
        assert_eq!(e.class(), super::super::ErrorClass::Fail);
    }

    #[test]
    fn a_body_echoing_the_key_is_redacted() {
        let body = br#"{"error":{"code":"unauthorized","message":"bad key Bearer sk-sentinel-http-0001"}}"#;
        let e = error_from_response(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            body,
            Dialect::Seedance,
            SystemTime::now(),
            &auth(),
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("sk-sentinel"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(!format!("{:?}", auth()).contains("sk-sentinel"));
    }

    #[test]
    fn non_json_error_bodies_become_the_message() {
        let e = error_from_response(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            b"upstream down",
            Dialect::Seedance,
            SystemTime::now(),
            &auth(),
        );
        assert_eq!(e.to_string(), "HTTP 502: upstream down");
        assert!(matches!(e, ProviderError::Http { from_api: false, .. }));
        let e = error_from_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new(),
            b"",
            Dialect::Fal,
            SystemTime::now(),
            &auth(),
        );
        assert_eq!(e.to_string(), "HTTP 503: Service Unavailable");
        assert_eq!(e.class(), super::super::ErrorClass::Ambiguous);
    }

    #[test]
    fn only_each_api_own_error_shape_counts_as_written_by_it() {
        let none = HeaderMap::new();
        let mut fal_header = HeaderMap::new();
        fal_header.insert("x-fal-error-type", HeaderValue::from_static("runner_unavailable"));
        let seedance_body = br#"{"error":{"code":"server_error","message":"retry"}}"#;
        let fal_body = br#"{"detail":"busy","error_type":"runner_unavailable"}"#;
        let page = b"<html>502 Bad Gateway</html>";
        assert!(Dialect::Seedance.wrote(&none, seedance_body));
        assert!(Dialect::Seedance.wrote(&none, br#"{"error":{"message":"m"}}"#));
        assert!(!Dialect::Seedance.wrote(&none, fal_body));
        assert!(!Dialect::Seedance.wrote(&none, br#"{"error":"text"}"#));
        assert!(!Dialect::Seedance.wrote(&fal_header, page), "fal's headers say nothing about seedance");
        assert!(!Dialect::Seedance.wrote(&none, page));
        assert!(Dialect::Fal.wrote(&none, fal_body));
        assert!(Dialect::Fal.wrote(&none, br#"{"detail":[{"msg":"m"}]}"#));
        assert!(Dialect::Fal.wrote(&fal_header, page));
        assert!(!Dialect::Fal.wrote(&none, seedance_body));
        assert!(!Dialect::Fal.wrote(&none, page));
        assert!(!Dialect::Fal.wrote(&none, b""));
    }

    #[test]
    fn redaction_ignores_case_and_percent_encoding() {
        let key = "sk-sentinel-http-0001";
        assert_eq!(redact_secret("a sk-sentinel-http-0001 b", key), "a [redacted] b");
        assert_eq!(redact_secret("a SK-SENTINEL-HTTP-0001 b", key), "a [redacted] b");
        let encoded: String = key.bytes().map(|b| format!("%{b:02X}")).collect();
        assert_eq!(redact_secret(&format!("k={encoded}&x=1"), key), "k=[redacted]&x=1");
        let lower: String = key.bytes().map(|b| format!("%{b:02x}")).collect();
        assert_eq!(redact_secret(&lower, key), "[redacted]");
        assert_eq!(
            redact_secret("Sk%2DSentinel-HTTP%2d0001Sk-sentinel-http-0001", key),
            "[redacted][redacted]"
        );
        assert_eq!(redact_secret("no key here, 100% sure %zz %", key), "no key here, 100% sure %zz %");
        assert_eq!(redact_secret("héllo sk-sentinel-http-0001 wörld", key), "héllo [redacted] wörld");
        assert_eq!(redact_secret("sk-sentinel-http-000", key), "sk-sentinel-http-000");
        assert_eq!(redact_secret("anything", ""), "anything");
    }

    #[test]
    fn a_key_at_the_cut_is_redacted_before_truncation() {
        let key = "sk-sentinel-http-0001";
        let lead = "x".repeat(MAX_MESSAGE_CHARS - (key.len() - 1));
        for echo in [format!("{lead}{key}"), format!("{lead}{}", key.to_uppercase())] {
            let body = serde_json::json!({"error": {"code": "invalid_request", "message": echo}}).to_string();
            for text in [
                error_from_response(
                    StatusCode::BAD_REQUEST,
                    &HeaderMap::new(),
                    body.as_bytes(),
                    Dialect::Seedance,
                    SystemTime::now(),
                    &auth(),
                )
                .to_string(),
                error_from_response(
                    StatusCode::BAD_GATEWAY,
                    &HeaderMap::new(),
                    echo.as_bytes(),
                    Dialect::Seedance,
                    SystemTime::now(),
                    &auth(),
                )
                .to_string(),
            ] {
                assert!(!text.to_lowercase().contains(&key[..key.len() - 1]), "{text}");
                assert!(!text.to_lowercase().contains("sk-sentinel-http-000"), "{text}");
            }
        }
    }

    #[test]
    fn request_ids_must_be_plain_path_segments() {
        for ok in ["req_0123abcd", "3f2a-11", "a b?c#d%e", "v1.2", "é"] {
            assert_eq!(check_request_id(ok), Ok(()), "{ok}");
        }
        for bad in
            ["", ".", "..", "a/b", "/", "a\\b", "x..y", "a\u{0}", "a\u{1b}[2J", "a\u{7f}", &"x".repeat(257)]
        {
            let err = check_request_id(bad).unwrap_err();
            assert!(!err.chars().any(char::is_control), "{err:?}");
        }
    }

    #[test]
    fn mime_comes_from_magic_bytes() {
        assert_eq!(sniff_mime(b"\x89PNG\r\n\x1a\nrest"), Some("image/png"));
        assert_eq!(sniff_mime(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("image/jpeg"));
        assert_eq!(sniff_mime(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff_mime(b"GIF89a"), None);
        assert_eq!(megabytes(9_100_000), "9.1 MB");
        assert_eq!(megabytes(4_000_000), "4 MB");
    }

    #[tokio::test]
    async fn local_inputs_follow_the_inline_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.png");
        let img = image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]));
        img.save(&path).unwrap();
        let input = path.to_str().unwrap();

        let err = resolve_input(input, InlinePolicy::refuse()).await.unwrap_err();
        assert!(err.to_string().contains("--inline-local-images"), "{err}");

        let uri = resolve_input(input, InlinePolicy { allowed: true, max_bytes: 1_000_000 }).await.unwrap();
        assert!(uri.starts_with("data:image/png;base64,"), "{uri}");

        let err = resolve_input(input, InlinePolicy { allowed: true, max_bytes: 10 }).await.unwrap_err();
        assert!(err.to_string().contains("inline limit"), "{err}");
        assert!(matches!(err, ProviderError::Input(_)));

        let text = dir.path().join("notes.png");
        std::fs::write(&text, "not an image").unwrap();
        let err = resolve_input(text.to_str().unwrap(), InlinePolicy { allowed: true, max_bytes: 1000 })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a PNG"), "{err}");

        let url = "https://cdn.example.com/a.png";
        assert_eq!(resolve_input(url, InlinePolicy::refuse()).await.unwrap(), url);
        assert!(resolve_input("relative/a.png", InlinePolicy::refuse()).await.is_err());
    }

    #[test]
    fn join_handles_slashes() {
        assert_eq!(join("http://h/", "/v1/x"), "http://h/v1/x");
        assert_eq!(join("http://h", "v1/x"), "http://h/v1/x");
    }
}
