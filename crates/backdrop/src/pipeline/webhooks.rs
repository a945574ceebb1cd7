//! The embedded webhook receiver ([`Webhooks`]): an axum server that verifies fal deliveries
//! (Ed25519 over the documented message, keys from a cached JWKS, 300 s replay window), takes
//! seedance deliveries as unsigned hints, and wakes the poller of the request they name.
//!
//! A delivery is never trusted for its result: it only resolves [`Webhooks::delivered`], and the
//! poller then confirms with the provider's status endpoint. A lost or refused webhook therefore
//! only delays a row until the next (slower) fallback poll.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::ProviderKind;

/// Where fal publishes the keys that sign its webhooks.
pub const DEFAULT_JWKS_URL: &str = "https://rest.alpha.fal.ai/.well-known/jwks.json";
/// Largest delivery body accepted; real deliveries carry a few URLs, far below this.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
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
/// Deliveries for ids nobody waits for (yet), and ids forgotten after delivery, are remembered
/// up to this many each; beyond it the oldest go, which at worst delays a row to its next poll.
const MAX_REMEMBERED: usize = 10_000;
/// Request ids are short provider-issued tokens; longer ones are refused to bound memory.
const MAX_REQUEST_ID_LEN: usize = 256;

const HEADER_REQUEST_ID: &str = "x-fal-webhook-request-id";
const HEADER_USER_ID: &str = "x-fal-webhook-user-id";
const HEADER_TIMESTAMP: &str = "x-fal-webhook-timestamp";
const HEADER_SIGNATURE: &str = "x-fal-webhook-signature";

/// What the receiver needs: where to listen, which protocol's deliveries to expect, and where
/// fal's signing keys live.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Address to listen on (`--webhook-listen`); port 0 picks a free port.
    pub listen: SocketAddr,
    /// The provider whose deliveries arrive: fal deliveries must be signed, seedance ones are not.
    pub provider: ProviderKind,
    /// The JWKS document with fal's signing keys (`--jwks-url`, default [`DEFAULT_JWKS_URL`]).
    pub jwks_url: String,
    /// The shared HTTP client, used to fetch the JWKS.
    pub client: reqwest::Client,
}

/// Why the receiver could not start, or why it refused one delivery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The listen address could not be bound.
    #[error("cannot listen for webhooks on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the bind failed.
        #[source]
        source: std::io::Error,
    },
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
    /// The signed request id header names another request than the body.
    #[error("signed request id does not match the body's request_id")]
    RequestIdMismatch,
    /// The body is not a delivery this receiver understands.
    #[error("body is not a delivery: {0}")]
    BadBody(String),
    /// The body is larger than [`DEFAULT_MAX_BODY_BYTES`].
    #[error("body is larger than {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// The signing keys could not be fetched, so nothing can be verified now.
    #[error("cannot fetch signing keys from {url}: {message}")]
    Jwks {
        /// The JWKS URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

impl WebhookError {
    /// True when the same delivery may succeed later: only a JWKS outage, which is why it is
    /// answered 503 (fal then retries the delivery).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Jwks { .. })
    }

    /// The HTTP status a delivery refused for this reason is answered with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Bind { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::MissingHeader(_)
            | Self::BadHeader { .. }
            | Self::Stale { .. }
            | Self::BadSignature
            | Self::RequestIdMismatch => StatusCode::UNAUTHORIZED,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Jwks { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Deliveries seen since start, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookCounts {
    /// Verified (fal) or well-formed (seedance) first deliveries: each woke a poller.
    pub accepted: u64,
    /// Repeat deliveries of a request already accepted: answered 200, ignored.
    pub duplicates: u64,
    /// Forged, tampered, stale, malformed or oversized deliveries (answered 4xx).
    pub rejected: u64,
    /// Deliveries answered 503 because the signing keys could not be fetched.
    pub deferred: u64,
}

/// The webhook hub: the running receiver plus the registry pollers wait on. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
}

impl Webhooks {
    /// Binds the listen address and serves deliveries until `shutdown` is cancelled.
    ///
    /// # Errors
    /// [`WebhookError::Bind`] when the address cannot be bound.
    pub async fn start(settings: WebhookSettings, shutdown: CancellationToken) -> Result<Self, WebhookError> {
        Self::start_with(settings, KeyPolicy::default(), shutdown).await
    }

    async fn start_with(
        settings: WebhookSettings,
        policy: KeyPolicy,
        shutdown: CancellationToken,
    ) -> Result<Self, WebhookError> {
        let addr = settings.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| WebhookError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| WebhookError::Bind { addr, source })?;
        let inner = Arc::new(Inner {
            provider: settings.provider,
            jwks_url: settings.jwks_url,
            client: settings.client,
            keys: tokio::sync::Mutex::new(KeyCache::default()),
            policy,
            registry: Mutex::new(Registry::default()),
            counts: Counters::default(),
        });
        let app = Router::new()
            .route("/", post(receive))
            // The public URL may reach us through a proxy that keeps its own path.
            .route("/{*path}", post(receive))
            .layer(DefaultBodyLimit::max(DEFAULT_MAX_BODY_BYTES))
            .with_state(Arc::clone(&inner));
        tracing::info!(%local_addr, provider = settings.provider.as_str(), "webhook receiver listening");
        tokio::spawn(async move {
            if let Err(e) =
                axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
            {
                tracing::error!(error = %e, "webhook receiver stopped");
            }
        });
        Ok(Self { inner, local_addr })
    }

    /// The address actually bound (useful with port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Resolves once a delivery for `request_id` has been accepted (at once if one already was).
    ///
    /// It stays resolved: a poller whose status check does not yet confirm the delivery should
    /// fall back to its timer alone rather than select on this again. If [`Self::forget`] is
    /// called for the request while this waits, it never resolves.
    pub async fn delivered(&self, request_id: &str) {
        let subscription = self.inner.registry().subscribe(request_id);
        let Some(mut rx) = subscription else { return };
        if rx.wait_for(|delivered| *delivered).await.is_err() {
            // Forgotten while waiting: no delivery can reach this waiter any more.
            std::future::pending::<()>().await;
        }
    }

    /// Forget a request once its job is finished (bounded memory on long runs).
    ///
    /// A delivered request stays known (in a bounded list) so late redeliveries still count as
    /// duplicates.
    pub fn forget(&self, request_id: &str) {
        self.inner.registry().forget(request_id);
    }

    /// Deliveries seen so far, by outcome.
    #[must_use]
    pub fn counts(&self) -> WebhookCounts {
        let c = &self.inner.counts;
        WebhookCounts {
            accepted: c.accepted.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            deferred: c.deferred.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct Inner {
    provider: ProviderKind,
    jwks_url: String,
    client: reqwest::Client,
    /// An async mutex on purpose: it is held across the JWKS fetch so concurrent deliveries
    /// wait for one fetch instead of each starting their own.
    keys: tokio::sync::Mutex<KeyCache>,
    policy: KeyPolicy,
    registry: Mutex<Registry>,
    counts: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    deferred: AtomicU64,
}

/// Whether a delivery was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Accepted,
    Duplicate,
}

async fn receive(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let outcome = match body {
        Ok(body) => inner.accept(&headers, &body).await,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(WebhookError::TooLarge { limit: DEFAULT_MAX_BODY_BYTES })
        }
        Err(rejection) => Err(WebhookError::BadBody(rejection.body_text())),
    };
    match outcome {
        Ok((Delivery::Accepted, id)) => {
            inner.counts.accepted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request_id = %id, "webhook accepted");
            (StatusCode::OK, "accepted").into_response()
        }
        Ok((Delivery::Duplicate, id)) => {
            inner.counts.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request_id = %id, "duplicate webhook ignored");
            (StatusCode::OK, "duplicate").into_response()
        }
        Err(e) if e.is_retryable() => {
            inner.counts.deferred.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(reason = %e, "webhook deferred (503): signing keys unavailable");
            (e.status(), e.to_string()).into_response()
        }
        Err(e) => {
            inner.counts.rejected.fetch_add(1, Ordering::Relaxed);
            // The reason only: bodies are attacker-controlled and may be large.
            tracing::warn!(reason = %e, status = e.status().as_u16(), "webhook rejected");
            (e.status(), e.to_string()).into_response()
        }
    }
}

/// The one field every delivery of both protocols carries; the rest is not trusted anyway.
#[derive(Debug, Deserialize)]
struct DeliveryBody {
    request_id: String,
}

fn request_id_of(body: &[u8]) -> Result<String, WebhookError> {
    let parsed: DeliveryBody =
        serde_json::from_slice(body).map_err(|e| WebhookError::BadBody(e.to_string()))?;
    if parsed.request_id.is_empty() || parsed.request_id.len() > MAX_REQUEST_ID_LEN {
        return Err(WebhookError::BadBody(format!("request_id must be 1 to {MAX_REQUEST_ID_LEN} bytes")));
    }
    Ok(parsed.request_id)
}

impl Inner {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic elsewhere cannot leave the registry half-updated in a way that matters: at
        // worst a poller waits for its next fallback poll.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn accept(&self, headers: &HeaderMap, body: &[u8]) -> Result<(Delivery, String), WebhookError> {
        let id = match self.provider {
            ProviderKind::Fal => {
                let signed = SignedHeaders::parse(headers)?;
                check_timestamp(signed.timestamp, unix_now())?;
                self.verify(&signed.message(body), &signed.signature).await?;
                let id = request_id_of(body)?;
                if id != signed.request_id {
                    return Err(WebhookError::RequestIdMismatch);
                }
                id
            }
            // Unsigned by design: a seedance delivery is only a hint the poller confirms.
            ProviderKind::Seedance => request_id_of(body)?,
        };
        let delivery = self.registry().record(&id);
        Ok((delivery, id))
    }

    /// Verifies with the cached keys, fetching them when missing or old, and refetching once
    /// (rate-limited) when none verifies, in case fal rotated its key.
    async fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), WebhookError> {
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
        Err(WebhookError::BadSignature)
    }

    async fn refresh(&self, cache: &mut KeyCache, now: Instant) -> Result<(), WebhookError> {
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

    fn jwks_error(&self, message: String) -> WebhookError {
        WebhookError::Jwks { url: self.jwks_url.clone(), message }
    }
}

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
    fn parse(headers: &HeaderMap) -> Result<Self, WebhookError> {
        let text = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or(WebhookError::MissingHeader(name))
        };
        let request_id = text(HEADER_REQUEST_ID)?.to_owned();
        let user_id = text(HEADER_USER_ID)?.to_owned();
        let timestamp_text = text(HEADER_TIMESTAMP)?;
        let timestamp = timestamp_text
            .parse::<i64>()
            .map_err(|_| WebhookError::BadHeader { name: HEADER_TIMESTAMP, reason: "not unix seconds" })?;
        let bytes = hex::decode(text(HEADER_SIGNATURE)?)
            .map_err(|_| WebhookError::BadHeader { name: HEADER_SIGNATURE, reason: "not hex" })?;
        let signature = Signature::from_slice(&bytes)
            .map_err(|_| WebhookError::BadHeader { name: HEADER_SIGNATURE, reason: "not 64 bytes" })?;
        Ok(Self { request_id, user_id, timestamp_text: timestamp_text.to_owned(), timestamp, signature })
    }

    /// `request_id \n user_id \n timestamp \n hex(sha256(body))`, as fal documents it, built
    /// from the header texts as received (not re-rendered), since those are what was signed.
    fn message(&self, body: &[u8]) -> Vec<u8> {
        let digest = hex::encode(Sha256::digest(body));
        format!("{}\n{}\n{}\n{digest}", self.request_id, self.user_id, self.timestamp_text).into_bytes()
    }
}

fn unix_now() -> i64 {
    // A clock before 1970 is not a state this program can do anything useful in; 0 then makes
    // every delivery stale, which polling survives.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Refuses timestamps more than [`REPLAY_WINDOW_SECS`] away from `now`, in either direction.
fn check_timestamp(timestamp: i64, now: i64) -> Result<(), WebhookError> {
    if timestamp.abs_diff(now) > REPLAY_WINDOW_SECS {
        return Err(WebhookError::Stale { skew_secs: timestamp.saturating_sub(now) });
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
            // Tolerate padded base64url: the spec says unpadded, publishers vary.
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
struct KeyPolicy {
    max_age: Duration,
    min_refetch: Duration,
    failure_backoff: Duration,
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

/// Which requests were delivered and who waits for which. Plain data behind a std mutex that
/// is never held across an await.
#[derive(Debug, Default)]
struct Registry {
    deliveries: HashMap<String, Delivered>,
    /// Delivered ids no poller has asked about yet, oldest first: a webhook can beat the submit
    /// answer that tells us the id, but unsigned seedance deliveries can also be junk, so these
    /// are capped.
    unclaimed: VecDeque<String>,
    /// Delivered then forgotten ids, kept (capped) so fal's redeliveries count as duplicates.
    retired: HashSet<String>,
    retired_order: VecDeque<String>,
}

#[derive(Debug)]
struct Delivered {
    delivered: watch::Sender<bool>,
    /// A poller has asked for this id, so it is never evicted as junk.
    claimed: bool,
}

impl Registry {
    fn record(&mut self, id: &str) -> Delivery {
        if self.retired.contains(id) {
            return Delivery::Duplicate;
        }
        if let Some(entry) = self.deliveries.get(id) {
            if *entry.delivered.borrow() {
                return Delivery::Duplicate;
            }
            // send_replace, not send: it stores the value even when no receiver is alive.
            entry.delivered.send_replace(true);
            return Delivery::Accepted;
        }
        let (delivered, _) = watch::channel(true);
        self.deliveries.insert(id.to_owned(), Delivered { delivered, claimed: false });
        self.unclaimed.push_back(id.to_owned());
        while self.unclaimed.len() > MAX_REMEMBERED {
            if let Some(old) = self.unclaimed.pop_front()
                && self.deliveries.get(&old).is_some_and(|d| !d.claimed)
            {
                self.deliveries.remove(&old);
            }
        }
        Delivery::Accepted
    }

    /// A receiver that turns `true` on delivery, or `None` when the request was delivered and
    /// already forgotten.
    fn subscribe(&mut self, id: &str) -> Option<watch::Receiver<bool>> {
        if self.retired.contains(id) {
            return None;
        }
        let entry = self
            .deliveries
            .entry(id.to_owned())
            .or_insert_with(|| Delivered { delivered: watch::channel(false).0, claimed: true });
        entry.claimed = true;
        Some(entry.delivered.subscribe())
    }

    fn forget(&mut self, id: &str) {
        let Some(entry) = self.deliveries.remove(id) else { return };
        if *entry.delivered.borrow() && self.retired.insert(id.to_owned()) {
            self.retired_order.push_back(id.to_owned());
            while self.retired_order.len() > MAX_REMEMBERED {
                if let Some(old) = self.retired_order.pop_front() {
                    self.retired.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use axum::routing::get;
    use ed25519_dalek::{Signer, SigningKey};
    use futures::FutureExt as _;
    use serde_json::json;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// A JWKS endpoint whose document the test can swap and break, counting fetches.
    #[derive(Clone)]
    struct JwksServer {
        doc: Arc<Mutex<serde_json::Value>>,
        broken: Arc<AtomicBool>,
        hits: Arc<AtomicU64>,
        url: String,
    }

    impl JwksServer {
        async fn start(key: &SigningKey, shutdown: &CancellationToken) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
            let server = Self {
                doc: Arc::new(Mutex::new(jwks_of(key))),
                broken: Arc::new(AtomicBool::new(false)),
                hits: Arc::new(AtomicU64::new(0)),
                url,
            };
            let state = server.clone();
            let app = Router::new().route(
                "/.well-known/jwks.json",
                get(move || async move {
                    state.hits.fetch_add(1, Ordering::SeqCst);
                    if state.broken.load(Ordering::SeqCst) {
                        return (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response();
                    }
                    axum::Json(state.doc.lock().unwrap().clone()).into_response()
                }),
            );
            let token = shutdown.clone();
            tokio::spawn(async move {
                axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned()).await.unwrap();
            });
            server
        }

        fn serve_key(&self, key: &SigningKey) {
            *self.doc.lock().unwrap() = jwks_of(key);
        }

        fn hits(&self) -> u64 {
            self.hits.load(Ordering::SeqCst)
        }
    }

    fn jwks_of(key: &SigningKey) -> serde_json::Value {
        json!({"keys": [
            // A key of another type first: it must be skipped, not break the document.
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes())},
        ]})
    }

    fn fal_key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn client() -> reqwest::Client {
        // The crate uses rustls without a built-in provider; main installs ring, tests must too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().timeout(WAIT).build().unwrap()
    }

    struct Harness {
        hooks: Webhooks,
        jwks: JwksServer,
        client: reqwest::Client,
        shutdown: CancellationToken,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn harness(provider: ProviderKind, policy: KeyPolicy) -> Harness {
        let shutdown = CancellationToken::new();
        let jwks = JwksServer::start(&fal_key(), &shutdown).await;
        let client = client();
        let settings = WebhookSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            provider,
            jwks_url: jwks.url.clone(),
            client: client.clone(),
        };
        let hooks = Webhooks::start_with(settings, policy, shutdown.clone()).await.unwrap();
        Harness { hooks, jwks, client, shutdown }
    }

    fn fal_body(id: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "request_id": id,
            "gateway_request_id": id,
            "status": "OK",
            "payload": {"images": [{"url": "https://example.invalid/out.png"}]},
        }))
        .unwrap()
    }

    impl Harness {
        fn url(&self) -> String {
            format!("http://{}/hook", self.hooks.local_addr())
        }

        async fn post_signed(&self, key: &SigningKey, id: &str, timestamp: i64, body: &[u8]) -> StatusCode {
            let sent_body = body.to_vec();
            self.post_signed_tampered(key, id, timestamp, body, sent_body).await
        }

        /// Signs `signed_body` but sends `sent_body`.
        async fn post_signed_tampered(
            &self,
            key: &SigningKey,
            id: &str,
            timestamp: i64,
            signed_body: &[u8],
            sent_body: Vec<u8>,
        ) -> StatusCode {
            let user = "user-sentinel";
            let message = format!("{id}\n{user}\n{timestamp}\n{}", hex::encode(Sha256::digest(signed_body)));
            let signature = hex::encode(key.sign(message.as_bytes()).to_bytes());
            self.client
                .post(self.url())
                .header("X-Fal-Webhook-Request-Id", id)
                .header("X-Fal-Webhook-User-Id", user)
                .header("X-Fal-Webhook-Timestamp", timestamp.to_string())
                .header("X-Fal-Webhook-Signature", signature)
                .header("content-type", "application/json")
                .body(sent_body)
                .send()
                .await
                .unwrap()
                .status()
        }

        async fn post_plain(&self, body: Vec<u8>) -> StatusCode {
            self.client.post(self.url()).body(body).send().await.unwrap().status()
        }

        fn is_delivered(&self, id: &str) -> bool {
            self.hooks.delivered(id).now_or_never().is_some()
        }
    }

    #[tokio::test]
    async fn a_valid_fal_delivery_wakes_its_waiter() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        let hooks = h.hooks.clone();
        let waiter = tokio::spawn(async move { hooks.delivered("req-1").await });
        // Let the waiter register first, so this covers waking, not only the late path.
        tokio::task::yield_now().await;
        assert!(!h.is_delivered("req-1"));

        assert_eq!(h.post_signed(&fal_key(), "req-1", unix_now(), &fal_body("req-1")).await, StatusCode::OK);
        tokio::time::timeout(WAIT, waiter).await.expect("delivered() resolves").unwrap();
        assert_eq!(h.hooks.counts(), WebhookCounts { accepted: 1, ..WebhookCounts::default() });
        assert!(!h.is_delivered("req-other"), "only the named request is woken");
    }

    #[tokio::test]
    async fn a_request_delivered_earlier_resolves_at_once() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        // The webhook beats the submit answer: nobody waits yet when it arrives.
        assert_eq!(h.post_signed(&fal_key(), "early", unix_now(), &fal_body("early")).await, StatusCode::OK);
        assert!(h.is_delivered("early"));
        assert!(h.is_delivered("early"), "stays resolved");
    }

    #[tokio::test]
    async fn a_delivery_signed_by_another_key_is_401() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        let forger = SigningKey::from_bytes(&[9u8; 32]);
        assert_eq!(
            h.post_signed(&forger, "req-f", unix_now(), &fal_body("req-f")).await,
            StatusCode::UNAUTHORIZED
        );
        assert!(!h.is_delivered("req-f"));
        assert_eq!(h.hooks.counts(), WebhookCounts { rejected: 1, ..WebhookCounts::default() });
    }

    #[tokio::test]
    async fn one_flipped_body_byte_is_401() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        let body = fal_body("req-t");
        let mut tampered = body.clone();
        // Inside the image URL, so the JSON (and its request_id) stays valid.
        let at = tampered.len() - 10;
        tampered[at] ^= 0x01;
        assert!(serde_json::from_slice::<serde_json::Value>(&tampered).is_ok());
        let status = h.post_signed_tampered(&fal_key(), "req-t", unix_now(), &body, tampered).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(!h.is_delivered("req-t"));
    }

    #[tokio::test]
    async fn timestamps_outside_the_replay_window_are_401() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        let now = unix_now();
        for (id, ts) in [("stale", now - 301), ("future", now + 301)] {
            assert_eq!(
                h.post_signed(&fal_key(), id, ts, &fal_body(id)).await,
                StatusCode::UNAUTHORIZED,
                "{id}"
            );
            assert!(!h.is_delivered(id));
        }
        // Well inside the window on both sides: accepted.
        for (id, ts) in [("late", now - 250), ("early", now + 250)] {
            assert_eq!(h.post_signed(&fal_key(), id, ts, &fal_body(id)).await, StatusCode::OK, "{id}");
        }
        assert_eq!(h.hooks.counts(), WebhookCounts { accepted: 2, rejected: 2, ..WebhookCounts::default() });
    }

    #[tokio::test]
    async fn a_duplicate_is_200_and_counted_not_applied() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        let body = fal_body("dup");
        assert_eq!(h.post_signed(&fal_key(), "dup", unix_now(), &body).await, StatusCode::OK);
        assert_eq!(h.post_signed(&fal_key(), "dup", unix_now(), &body).await, StatusCode::OK);
        assert_eq!(
            h.hooks.counts(),
            WebhookCounts { accepted: 1, duplicates: 1, ..WebhookCounts::default() }
        );

        // Still a duplicate after the job finished and the hub forgot it.
        h.hooks.forget("dup");
        assert_eq!(h.post_signed(&fal_key(), "dup", unix_now(), &body).await, StatusCode::OK);
        assert_eq!(h.hooks.counts().duplicates, 2);
        assert!(h.is_delivered("dup"));
    }

    #[tokio::test]
    async fn missing_headers_or_mismatched_ids_are_401() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        assert_eq!(h.post_plain(fal_body("nosig")).await, StatusCode::UNAUTHORIZED);
        // Validly signed for header id "a", but the body names "b".
        assert_eq!(
            h.post_signed(&fal_key(), "a", unix_now(), &fal_body("b")).await,
            StatusCode::UNAUTHORIZED
        );
        assert!(!h.is_delivered("a") && !h.is_delivered("b"));
        assert_eq!(h.hooks.counts().rejected, 2);
    }

    #[tokio::test]
    async fn an_unsigned_seedance_delivery_wakes_its_waiter() {
        let h = harness(ProviderKind::Seedance, KeyPolicy::default()).await;
        let hooks = h.hooks.clone();
        let waiter = tokio::spawn(async move { hooks.delivered("sd-1").await });
        tokio::task::yield_now().await;
        let body = json!({"request_id": "sd-1", "status": "completed", "images": [{"url": "https://x.invalid/a.png"}]});
        assert_eq!(h.post_plain(serde_json::to_vec(&body).unwrap()).await, StatusCode::OK);
        tokio::time::timeout(WAIT, waiter).await.expect("delivered() resolves").unwrap();
        assert_eq!(h.post_plain(b"not json".to_vec()).await, StatusCode::BAD_REQUEST);
        assert_eq!(h.post_plain(br#"{"status":"completed"}"#.to_vec()).await, StatusCode::BAD_REQUEST);
        assert_eq!(h.hooks.counts(), WebhookCounts { accepted: 1, rejected: 2, ..WebhookCounts::default() });
        assert_eq!(h.jwks.hits(), 0, "seedance never needs signing keys");
    }

    #[tokio::test]
    async fn an_oversized_body_is_413_and_other_methods_405() {
        let h = harness(ProviderKind::Seedance, KeyPolicy::default()).await;
        let big = vec![b' '; DEFAULT_MAX_BODY_BYTES + 1];
        assert_eq!(h.post_plain(big).await, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(h.hooks.counts().rejected, 1);
        let status = h.client.get(h.url()).send().await.unwrap().status();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn keys_are_cached_and_refetched_at_most_once_a_minute() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        for id in ["k1", "k2", "k3"] {
            assert_eq!(h.post_signed(&fal_key(), id, unix_now(), &fal_body(id)).await, StatusCode::OK);
        }
        assert_eq!(h.jwks.hits(), 1, "one fetch serves every delivery");
        // A rotation within the minute: the unknown key is refused, without a refetch per forgery.
        let rotated = SigningKey::from_bytes(&[8u8; 32]);
        h.jwks.serve_key(&rotated);
        for id in ["r1", "r2"] {
            assert_eq!(
                h.post_signed(&rotated, id, unix_now(), &fal_body(id)).await,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(h.jwks.hits(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_deliveries_share_one_key_fetch() {
        let h = Arc::new(harness(ProviderKind::Fal, KeyPolicy::default()).await);
        let ids: Vec<String> = (0..16).map(|i| format!("burst-{i}")).collect();
        let posts = ids.iter().cloned().map(|id| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.post_signed(&fal_key(), &id, unix_now(), &fal_body(&id)).await })
        });
        for status in futures::future::join_all(posts).await {
            assert_eq!(status.unwrap(), StatusCode::OK);
        }
        assert_eq!(h.jwks.hits(), 1, "deliveries wait for the fetch in flight instead of starting their own");
        assert!(ids.iter().all(|id| h.is_delivered(id)));
        assert_eq!(h.hooks.counts().accepted, 16);
    }

    #[tokio::test]
    async fn a_rotated_key_is_picked_up_by_a_refetch() {
        let policy = KeyPolicy { min_refetch: Duration::ZERO, ..KeyPolicy::default() };
        let h = harness(ProviderKind::Fal, policy).await;
        assert_eq!(
            h.post_signed(&fal_key(), "before", unix_now(), &fal_body("before")).await,
            StatusCode::OK
        );
        let rotated = SigningKey::from_bytes(&[8u8; 32]);
        h.jwks.serve_key(&rotated);
        assert_eq!(h.post_signed(&rotated, "after", unix_now(), &fal_body("after")).await, StatusCode::OK);
        assert_eq!(h.jwks.hits(), 2);
        assert!(h.is_delivered("after"));
    }

    #[tokio::test]
    async fn a_jwks_outage_is_503_then_recovers() {
        let policy = KeyPolicy { failure_backoff: Duration::ZERO, ..KeyPolicy::default() };
        let h = harness(ProviderKind::Fal, policy).await;
        h.jwks.broken.store(true, Ordering::SeqCst);
        let body = fal_body("out");
        assert_eq!(
            h.post_signed(&fal_key(), "out", unix_now(), &body).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(!h.is_delivered("out"));
        assert_eq!(h.hooks.counts(), WebhookCounts { deferred: 1, ..WebhookCounts::default() });
        // fal retries the delivery; by then the keys are back.
        h.jwks.broken.store(false, Ordering::SeqCst);
        assert_eq!(h.post_signed(&fal_key(), "out", unix_now(), &body).await, StatusCode::OK);
        assert!(h.is_delivered("out"));
    }

    #[tokio::test]
    async fn after_a_failed_fetch_deliveries_get_503_without_refetching() {
        let h = harness(ProviderKind::Fal, KeyPolicy::default()).await;
        h.jwks.broken.store(true, Ordering::SeqCst);
        for id in ["o1", "o2"] {
            let status = h.post_signed(&fal_key(), id, unix_now(), &fal_body(id)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(h.jwks.hits(), 1);
    }

    #[tokio::test]
    async fn a_bind_failure_is_a_typed_error() {
        let shutdown = CancellationToken::new();
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = WebhookSettings {
            listen: taken.local_addr().unwrap(),
            provider: ProviderKind::Seedance,
            jwks_url: DEFAULT_JWKS_URL.into(),
            client: client(),
        };
        let err = Webhooks::start(settings, shutdown).await.unwrap_err();
        assert!(matches!(err, WebhookError::Bind { .. }));
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn forgetting_while_waiting_never_resolves_the_waiter() {
        let h = harness(ProviderKind::Seedance, KeyPolicy::default()).await;
        let mut waiting = Box::pin(h.hooks.delivered("gone"));
        assert!((&mut waiting).now_or_never().is_none());
        h.hooks.forget("gone");
        assert!(waiting.now_or_never().is_none());
        // Never delivered, so it is not remembered as done either.
        assert!(!h.is_delivered("gone"));
    }

    #[test]
    fn the_replay_window_is_300_seconds_either_way() {
        assert!(check_timestamp(1_000, 1_000).is_ok());
        assert!(check_timestamp(700, 1_000).is_ok());
        assert!(check_timestamp(1_300, 1_000).is_ok());
        assert!(matches!(check_timestamp(699, 1_000), Err(WebhookError::Stale { skew_secs: -301 })));
        assert!(matches!(check_timestamp(1_301, 1_000), Err(WebhookError::Stale { skew_secs: 301 })));
        assert!(check_timestamp(i64::MIN, 1_000).is_err());
    }

    #[test]
    fn jwks_parsing_keeps_only_ed25519_keys() {
        let key = fal_key().verifying_key();
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

    #[test]
    fn unclaimed_deliveries_are_capped_but_claimed_ones_kept() {
        let mut registry = Registry::default();
        let _waiter = registry.subscribe("claimed");
        assert_eq!(registry.record("claimed"), Delivery::Accepted);
        for i in 0..=MAX_REMEMBERED {
            assert_eq!(registry.record(&format!("junk-{i}")), Delivery::Accepted);
        }
        assert!(!registry.deliveries.contains_key("junk-0"), "the oldest unclaimed delivery is evicted");
        assert!(registry.deliveries.contains_key(&format!("junk-{MAX_REMEMBERED}")));
        assert!(registry.deliveries.contains_key("claimed"));
        assert!(registry.deliveries.len() <= MAX_REMEMBERED + 1);
    }

    #[test]
    fn retired_ids_are_capped() {
        let mut registry = Registry::default();
        for i in 0..=MAX_REMEMBERED {
            let id = format!("done-{i}");
            registry.record(&id);
            registry.forget(&id);
        }
        assert!(registry.deliveries.is_empty());
        assert_eq!(registry.retired.len(), MAX_REMEMBERED);
        assert_eq!(registry.record("done-0"), Delivery::Accepted, "the oldest retired id was dropped");
        assert_eq!(registry.record(&format!("done-{MAX_REMEMBERED}")), Delivery::Duplicate);
    }
}
