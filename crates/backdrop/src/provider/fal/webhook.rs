//! fal webhook verification ([`Verifier`]): the four `X-Fal-Webhook-*` headers, an Ed25519
//! signature over `request_id \n user_id \n timestamp \n hex(sha256(body))`, keys from fal's JWKS
//! document (cached, refetched on rotation, rate-limited), and a 300 s replay window.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, VerifyingKey};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Where fal publishes the keys that sign its webhooks.
pub const DEFAULT_JWKS_URL: &str = "https://rest.alpha.fal.ai/.well-known/jwks.json";

/// A signed timestamp further than this from now is a replay (or a badly wrong clock).
pub const REPLAY_WINDOW_SECS: u64 = 300;

/// Signing keys are refetched once they are this old.
pub const JWKS_MAX_AGE: Duration = Duration::from_hours(24);

/// A signature no cached key verifies triggers a refetch (key rotation) at most this often, so
/// forged deliveries cannot make us hammer the JWKS endpoint.
pub const JWKS_MIN_REFETCH: Duration = Duration::from_mins(1);

/// After a failed JWKS fetch, deliveries are answered 503 without refetching for this long.
pub const JWKS_FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// One JWKS fetch may take this long; deliveries wait for it.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

const HEADER_REQUEST_ID: &str = "x-fal-webhook-request-id";

const HEADER_USER_ID: &str = "x-fal-webhook-user-id";

const HEADER_TIMESTAMP: &str = "x-fal-webhook-timestamp";

const HEADER_SIGNATURE: &str = "x-fal-webhook-signature";

/// The four fal signature headers, parsed.
#[derive(Debug)]
struct SignedHeaders {
    request_id: String,
    user_id: String,
    /// The header exactly as sent: it is what the sender signed.
    timestamp_text: String,
    timestamp: i64,
    signature: Signature,
}

impl SignedHeaders {
    fn parse(headers: &HeaderMap) -> Result<Self, VerifyError> {
        let text = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or(VerifyError::MissingHeader(name))
        };
        let request_id = text(HEADER_REQUEST_ID)?.to_owned();
        let user_id = text(HEADER_USER_ID)?.to_owned();
        let timestamp_text = text(HEADER_TIMESTAMP)?;
        let timestamp = timestamp_text
            .parse::<i64>()
            .map_err(|_| VerifyError::BadHeader { name: HEADER_TIMESTAMP, reason: "not unix seconds" })?;
        let bytes = hex::decode(text(HEADER_SIGNATURE)?)
            .map_err(|_| VerifyError::BadHeader { name: HEADER_SIGNATURE, reason: "not hex" })?;
        let signature = Signature::from_slice(&bytes)
            .map_err(|_| VerifyError::BadHeader { name: HEADER_SIGNATURE, reason: "not 64 bytes" })?;
        Ok(Self { request_id, user_id, timestamp_text: timestamp_text.to_owned(), timestamp, signature })
    }

    /// `request_id \n user_id \n timestamp \n hex(sha256(body))`, as fal documents it, built
    /// from the header texts as received (not re-rendered), since those are what was signed.
    fn message(&self, body: &[u8]) -> Vec<u8> {
        let digest = hex::encode(Sha256::digest(body));
        format!("{}\n{}\n{}\n{digest}", self.request_id, self.user_id, self.timestamp_text).into_bytes()
    }
}

pub(crate) fn unix_now() -> i64 {
    // A clock before 1970 is not a state this program can do anything useful in; 0 then makes
    // every delivery stale, which polling survives.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Refuses timestamps more than [`REPLAY_WINDOW_SECS`] away from `now`, in either direction.
fn check_timestamp(timestamp: i64, now: i64) -> Result<(), VerifyError> {
    if timestamp.abs_diff(now) > REPLAY_WINDOW_SECS {
        return Err(VerifyError::Stale { skew_secs: timestamp.saturating_sub(now) });
    }
    Ok(())
}

fn verify_any(keys: &[VerifyingKey], message: &[u8], signature: &Signature) -> bool {
    // Strict verification refuses malleable signatures and small-order keys.
    keys.iter().any(|key| key.verify_strict(message, signature).is_ok())
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
}

/// The Ed25519 keys of a JWKS document; other key types are skipped, and a document with no
/// usable key is an error (nothing could ever verify).
fn parse_jwks(body: &[u8]) -> Result<Vec<VerifyingKey>, String> {
    let jwks: Jwks = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let keys: Vec<VerifyingKey> = jwks
        .keys
        .iter()
        .filter(|k| k.kty == "OKP" && k.crv.as_deref() == Some("Ed25519"))
        .filter_map(|k| {
            // Tolerate padded base64url: RFC 7517 says unpadded, publishers vary.
            let bytes = URL_SAFE_NO_PAD.decode(k.x.as_deref()?.trim_end_matches('=')).ok()?;
            VerifyingKey::from_bytes(&<[u8; 32]>::try_from(bytes.as_slice()).ok()?).ok()
        })
        .collect();
    if keys.is_empty() {
        return Err("the JWKS document has no Ed25519 key".into());
    }
    Ok(keys)
}

/// How long keys live and how often they may be fetched; constants in production, shortened
/// in tests so key rotation and outages can be exercised without waiting minutes.
#[derive(Debug, Clone, Copy)]
pub struct KeyPolicy {
    /// Keys older than this are refetched.
    pub max_age: Duration,
    /// A signature no cached key verifies triggers a refetch at most this often.
    pub min_refetch: Duration,
    /// After a failed fetch, deliveries are refused as retryable without refetching this long.
    pub failure_backoff: Duration,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self { max_age: JWKS_MAX_AGE, min_refetch: JWKS_MIN_REFETCH, failure_backoff: JWKS_FAILURE_BACKOFF }
    }
}

/// The signing keys with the time they were fetched, and when a fetch was last tried.
#[derive(Debug, Default)]
struct KeyCache {
    keys: Vec<VerifyingKey>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

impl KeyCache {
    fn is_fresh(&self, now: Instant, max_age: Duration) -> bool {
        self.fetched_at.is_some_and(|t| now.saturating_duration_since(t) < max_age)
    }

    fn may_fetch(&self, now: Instant, min_gap: Duration) -> bool {
        self.last_attempt.is_none_or(|t| now.saturating_duration_since(t) >= min_gap)
    }
}

/// Why a fal delivery's signature does not hold.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A signature header is missing or is not text.
    #[error("header {0} is missing")]
    MissingHeader(&'static str),
    /// A signature header does not parse.
    #[error("header {name} is malformed: {reason}")]
    BadHeader {
        /// The header.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The signed timestamp is outside the replay window.
    #[error("timestamp is {skew_secs} s from now (window {REPLAY_WINDOW_SECS} s)")]
    Stale {
        /// Signed timestamp minus now, in seconds.
        skew_secs: i64,
    },
    /// No signing key verifies the signature: forged, tampered, or signed for another body.
    #[error("no signing key verifies the signature")]
    BadSignature,
    /// The signing keys could not be fetched, so nothing can be verified now.
    #[error("cannot fetch signing keys from {url}: {message}")]
    Jwks {
        /// The JWKS URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

impl VerifyError {
    /// True when the same delivery may verify later: only a JWKS outage (fal retries a
    /// delivery answered 503).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Jwks { .. })
    }
}

/// Verifies fal deliveries against the keys of one JWKS document.
#[derive(Debug)]
pub struct Verifier {
    jwks_url: String,
    client: reqwest::Client,
    /// An async mutex on purpose: it is held across the JWKS fetch so concurrent deliveries
    /// wait for one fetch instead of each starting their own.
    keys: tokio::sync::Mutex<KeyCache>,
    policy: KeyPolicy,
}

impl Verifier {
    /// A verifier for the keys published at `jwks_url`, fetched with `client`.
    #[must_use]
    pub fn new(jwks_url: String, client: reqwest::Client, policy: KeyPolicy) -> Self {
        Self { jwks_url, client, keys: tokio::sync::Mutex::new(KeyCache::default()), policy }
    }

    /// Checks a delivery's signature headers against its body and answers the signed request id.
    ///
    /// # Errors
    /// A [`VerifyError`] saying which check failed; only [`VerifyError::Jwks`] is retryable.
    pub async fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<String, VerifyError> {
        let signed = SignedHeaders::parse(headers)?;
        check_timestamp(signed.timestamp, unix_now())?;
        self.check_signature(&signed.message(body), &signed.signature).await?;
        Ok(signed.request_id)
    }

    /// Verifies with the cached keys, fetching them when missing or old, and refetching once
    /// (rate-limited) when none verifies, in case fal rotated its key.
    async fn check_signature(&self, message: &[u8], signature: &Signature) -> Result<(), VerifyError> {
        let mut cache = self.keys.lock().await;
        let now = Instant::now();
        if !cache.is_fresh(now, self.policy.max_age) {
            if !cache.may_fetch(now, self.policy.failure_backoff) {
                return Err(self.jwks_error("a recent fetch failed; retrying shortly".into()));
            }
            self.refresh(&mut cache, now).await?;
        }
        if verify_any(&cache.keys, message, signature) {
            return Ok(());
        }
        if cache.may_fetch(now, self.policy.min_refetch) {
            self.refresh(&mut cache, now).await?;
            if verify_any(&cache.keys, message, signature) {
                return Ok(());
            }
        }
        Err(VerifyError::BadSignature)
    }

    async fn refresh(&self, cache: &mut KeyCache, now: Instant) -> Result<(), VerifyError> {
        cache.last_attempt = Some(now);
        match self.fetch_keys().await {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), url = %self.jwks_url, "fetched webhook signing keys");
                cache.keys = keys;
                cache.fetched_at = Some(now);
                Ok(())
            }
            Err(message) => Err(self.jwks_error(message)),
        }
    }

    async fn fetch_keys(&self) -> Result<Vec<VerifyingKey>, String> {
        let response = self
            .client
            .get(&self.jwks_url)
            .timeout(JWKS_FETCH_TIMEOUT)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?;
        let body = crate::provider::http::read_capped(response, crate::provider::http::MAX_BODY_BYTES)
            .await
            .map_err(|e| e.to_string())?;
        parse_jwks(&body)
    }

    fn jwks_error(&self, message: String) -> VerifyError {
        VerifyError::Jwks { url: self.jwks_url.clone(), message }
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use serde_json::json;

    use super::*;

    #[test]
    fn the_replay_window_is_300_seconds_either_way() {
        assert!(check_timestamp(1_000, 1_000).is_ok());
        assert!(check_timestamp(700, 1_000).is_ok());
        assert!(check_timestamp(1_300, 1_000).is_ok());
        assert!(matches!(check_timestamp(699, 1_000), Err(VerifyError::Stale { skew_secs: -301 })));
        assert!(matches!(check_timestamp(1_301, 1_000), Err(VerifyError::Stale { skew_secs: 301 })));
        assert!(check_timestamp(i64::MIN, 1_000).is_err());
    }

    #[test]
    fn jwks_parsing_keeps_only_ed25519_keys() {
        let key = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        let padded = format!("{}=", URL_SAFE_NO_PAD.encode(key.to_bytes()));
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "X25519", "x": URL_SAFE_NO_PAD.encode([1u8; 32])},
            {"kty": "OKP", "crv": "Ed25519", "x": "too-short"},
            {"kty": "OKP", "crv": "Ed25519", "x": padded},
        ]});
        assert_eq!(parse_jwks(&serde_json::to_vec(&doc).unwrap()).unwrap(), vec![key]);
        assert!(parse_jwks(br#"{"keys": []}"#).is_err());
        assert!(parse_jwks(b"<html>").is_err());
    }

    #[test]
    fn the_key_cache_expires_after_a_day_and_throttles_fetches() {
        let t0 = Instant::now();
        let mut cache = KeyCache::default();
        assert!(!cache.is_fresh(t0, JWKS_MAX_AGE));
        assert!(cache.may_fetch(t0, JWKS_MIN_REFETCH));
        cache.fetched_at = Some(t0);
        cache.last_attempt = Some(t0);
        assert!(cache.is_fresh(t0 + Duration::from_hours(23), JWKS_MAX_AGE));
        assert!(!cache.is_fresh(t0 + JWKS_MAX_AGE, JWKS_MAX_AGE));
        assert!(!cache.may_fetch(t0 + Duration::from_secs(59), JWKS_MIN_REFETCH));
        assert!(cache.may_fetch(t0 + JWKS_MIN_REFETCH, JWKS_MIN_REFETCH));
    }
}
