//! `backdrop-sim`: a local simulator of the two remote image APIs backdrop talks to (Seedance
//! REST and the fal.ai queue), with money, a ledger, seeded fault injection and real images.
//!
//! This crate owns the simulator's whole surface: the HTTP server (an axum app), its launch
//! configuration ([`SimConfig`], [`Faults`], and a scenario TOML file with the same keys), its
//! command line ([`SimArgs`], the flags of `backdrop sim`), and the `/__sim/*` admin endpoints
//! through which a client reads the ledger and the counters and changes balances, keys and
//! bursts. It depends on no other backdrop crate. A program starts it with [`start`] or
//! [`start_on`] (or [`serve`] on a listener it owns) and stops it with
//! [`SimHandle::shutdown`]; everything else can be done over HTTP.
//!
//! # Routes
//! - Seedance: `POST /v1/images/generate`, `POST /v1/seedream/v4.5/edit`, `GET /v1/requests/{id}`.
//! - fal: `POST /{model_id}`, then the status/response/cancel URLs the submit hands out.
//! - Outputs: `GET /files/{id}/{index}.{ext}`; JWKS: `GET /.well-known/jwks.json`.
//! - Simulator only (never part of the real API surface): `/__sim/*` (see [`admin`]).
//!
//! # In flight
//! A generation is *in flight* from the moment it is accepted (and charged) until the client has
//! downloaded every output once, or has read its failure, or cancelled it. That is what the
//! providers' concurrency limits count and what backdrop's `--concurrency` caps, so
//! [`SimStats::peak_in_flight`] proves the cap; [`SimStats::peak_open_requests`] separately
//! counts HTTP requests being served at once.

pub mod admin;
mod args;
mod fal;
pub mod faults;
mod files;
pub mod imagegen;
mod limits;
pub mod money;
mod seedance;
mod storage;
mod submit;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use args::{SCENARIO_HELP, SIM_EXAMPLES, SIM_LONG_HELP, Scenario, SimArgs};
pub use faults::{Burst, Faults, Latency, LatencyTail, LimitChange, RetryAfterFormat, ScriptStep};
pub use money::{Charge, Protocol};

use faults::{Dice, SecondWindow};
use imagegen::ImageKey;
use money::Money;

/// Default port of `backdrop sim`.
pub const DEFAULT_PORT: u16 = 8787;
/// Default cap on an output's longest side, in pixels (small: the simulator must be fast).
pub const DEFAULT_MAX_SIDE: u32 = 256;
/// Default balances: large enough that only a test that means to run out does.
pub const DEFAULT_BALANCE: f64 = 1e9;
/// The fal user id the simulator signs webhooks as.
pub const SIM_USER_ID: &str = "sim-user";

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A flag or scenario value is invalid.
    #[error("simulator config: {0}")]
    Config(String),
    /// The scenario file could not be read or parsed.
    #[error("scenario {path}: {message}")]
    Scenario {
        /// The file.
        path: String,
        /// What is wrong, with the line when known.
        message: String,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("simulator server: {0}")]
    Serve(#[source] std::io::Error),
}

impl SimError {
    /// True when trying again may work (a port that may free up); config errors never do.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Bind { source, .. } => source.kind() == std::io::ErrorKind::AddrInUse,
            Self::Serve(_) => true,
            Self::Config(_) | Self::Scenario { .. } => false,
        }
    }
}

/// Everything the simulator does, decided before it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Seed of every random decision (faults, latencies, the webhook signing key, and request
    /// ids but for their first 32 bits, which are random per simulator instance).
    pub seed: u64,
    /// Starting seedance credits.
    pub credits: f64,
    /// Starting fal balance, in dollars.
    pub fal_balance: f64,
    /// Longest side of an output image, in pixels.
    pub max_side: u32,
    /// Faults to inject (all off by default).
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            credits: DEFAULT_BALANCE,
            fal_balance: DEFAULT_BALANCE,
            max_side: DEFAULT_MAX_SIDE,
            faults: Faults::default(),
        }
    }
}

impl SimConfig {
    /// Reads a scenario TOML file (the same keys as this struct; `[faults]` holds the faults).
    ///
    /// # Errors
    /// [`SimError::Scenario`] when the file cannot be read, has unknown keys or bad values.
    pub fn from_scenario_file(path: impl AsRef<Path>) -> Result<Self, SimError> {
        let path = path.as_ref();
        let scenario_err = |message: String| SimError::Scenario { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| scenario_err(e.to_string()))?;
        let config: Self = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            scenario_err(match line {
                Some(line) => format!("line {line}: {}", e.message().trim()),
                None => e.message().trim().to_owned(),
            })
        })?;
        config.validate().map_err(|e| scenario_err(e.to_string()))?;
        Ok(config)
    }

    /// Checks every value.
    ///
    /// # Errors
    /// [`SimError::Config`] naming the bad value.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.max_side < 16 || self.max_side > 4096 {
            return Err(SimError::Config(format!("max_side {} is outside 16..=4096", self.max_side)));
        }
        for (name, v) in [("credits", self.credits), ("fal_balance", self.fal_balance)] {
            if !v.is_finite() || v < 0.0 {
                return Err(SimError::Config(format!("{name} must be a number >= 0")));
            }
        }
        self.faults.validate()
    }
}

/// The simulator's counters, as `GET /__sim/stats` shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Submit requests received (both protocols, whatever their answer).
    pub submits: u64,
    /// Submits accepted and charged.
    pub accepted: u64,
    /// Generations in flight now (see the crate docs).
    pub in_flight: u64,
    /// Most generations in flight at once.
    pub peak_in_flight: u64,
    /// HTTP requests being served now.
    pub open_requests: u64,
    /// Most HTTP requests served at once.
    pub peak_open_requests: u64,
    /// Most submit requests received in any one-second window.
    pub peak_submits_per_second: u64,
    /// Output downloads answered in full.
    pub downloads: u64,
    /// Connections dropped on purpose.
    pub dropped_connections: u64,
    /// Downloads cut short on purpose.
    pub truncated_downloads: u64,
    /// Webhook deliveries the receiver answered with a 2xx.
    pub webhooks_delivered: u64,
    /// Webhook deliveries that failed (after retries) or were dropped on purpose.
    pub webhooks_failed: u64,
    /// Files stored by fal's storage (both flows).
    #[serde(default)]
    pub uploads: u64,
    /// Bytes of those files.
    #[serde(default)]
    pub uploaded_bytes: u64,
    /// fal storage tokens handed out.
    #[serde(default)]
    pub storage_tokens: u64,
    /// Uploads refused because their storage token had expired.
    #[serde(default)]
    pub expired_token_refusals: u64,
    /// Responses by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests by route, e.g. `"POST /v1/seedream/v4.5/edit"`.
    pub by_route: BTreeMap<String, u64>,
}

/// One accepted generation.
#[derive(Debug, Clone)]
pub(crate) struct Gen {
    pub(crate) protocol: Protocol,
    pub(crate) model: String,
    pub(crate) started: Instant,
    pub(crate) ready: Instant,
    pub(crate) outputs: Vec<ImageKey>,
    /// Images the client asked for (`outputs` holds more when the extra-outputs fault hit).
    pub(crate) requested: u32,
    pub(crate) failure: Option<String>,
    pub(crate) cancelled: bool,
    pub(crate) seed: u64,
    pub(crate) cost: f64,
    pub(crate) text_to_image: bool,
    /// Bit i set once output i was downloaded in full.
    pub(crate) downloaded: u8,
    /// Still counted in `in_flight`.
    pub(crate) open: bool,
}

const SHARDS: usize = 16;

/// Counters behind a lock (the rest are atomics).
#[derive(Debug, Default)]
struct Tallies {
    by_status: HashMap<u16, u64>,
    by_route: HashMap<&'static str, u64>,
}

/// The running simulator's state, shared by every handler.
#[derive(Debug)]
pub(crate) struct Sim {
    pub(crate) config: SimConfig,
    pub(crate) base_url: String,
    pub(crate) started: Instant,
    /// Random path segment of fal queue URLs, so they cannot be rebuilt from the model id.
    pub(crate) queue_token: String,
    /// Random per start (not seeded): the first 32 bits of every request id, so no two
    /// simulators (two `--simulate` runs, a restarted `backdrop sim`) share an id.
    pub(crate) instance: u32,
    pub(crate) signing_key: ed25519_dalek::SigningKey,
    pub(crate) money: Mutex<Money>,
    pub(crate) revoked: AtomicBool,
    dice: Mutex<Dice>,
    gens: Vec<Mutex<HashMap<String, Gen>>>,
    hasher: std::collections::hash_map::RandomState,
    pub(crate) images: Mutex<HashMap<ImageKey, bytes::Bytes>>,
    submit_window: Mutex<SecondWindow>,
    accept_window: Mutex<SecondWindow>,
    /// A burst started through the admin API: (until, status).
    pub(crate) manual_burst: Mutex<Option<(Instant, u16)>>,
    /// Set through the admin API: every output ready by then answers 410 Gone (URLs that expired
    /// while the client was away).
    pub(crate) urls_expired_at: Mutex<Option<Instant>>,
    /// Set through the admin API: the version of each named input picture (0 when absent). A new
    /// version is another picture, with another ETag, under the same URL.
    pub(crate) input_versions: Mutex<HashMap<String, u32>>,
    submit_seq: AtomicU64,
    pub(crate) accepted: AtomicU64,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    open_requests: AtomicU64,
    peak_open_requests: AtomicU64,
    pub(crate) downloads: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) truncated: AtomicU64,
    pub(crate) webhooks_delivered: AtomicU64,
    pub(crate) webhooks_failed: AtomicU64,
    tallies: Mutex<Tallies>,
    pub(crate) http: reqwest::Client,
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    /// The limits in force, the cap on generations in flight and fal's account queue.
    pub(crate) limits: limits::Limits,
    /// fal's file storage: tokens, uploaded files.
    pub(crate) storage: storage::Storage,
}

/// Locks a mutex, ignoring poisoning: a handler that unwound on purpose (a dropped connection)
/// never holds a lock, and counters stay meaningful either way.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sim {
    fn new(config: SimConfig, base_url: String) -> Result<Self, SimError> {
        use sha2::Digest;
        // The signing key follows the seed, so a replayed run signs the same way.
        let key_seed: [u8; 32] = sha2::Sha256::digest(format!("backdrop-sim-key-{}", config.seed)).into();
        let token: [u8; 32] = sha2::Sha256::digest(format!("backdrop-sim-queue-{}", config.seed)).into();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let limits = limits::Limits::new(&config.faults);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SimError::Config(format!("webhook client: {e}")))?;
        Ok(Self {
            money: Mutex::new(Money {
                credits: config.credits,
                fal_balance: config.fal_balance,
                ledger: Vec::new(),
            }),
            dice: Mutex::new(Dice::new(config.seed)),
            config,
            base_url,
            started: Instant::now(),
            queue_token: hex::encode(&token[..6]),
            instance: rand::random(),
            signing_key: ed25519_dalek::SigningKey::from_bytes(&key_seed),
            revoked: AtomicBool::new(false),
            gens: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            images: Mutex::new(HashMap::new()),
            submit_window: Mutex::new(SecondWindow::default()),
            accept_window: Mutex::new(SecondWindow::default()),
            manual_burst: Mutex::new(None),
            urls_expired_at: Mutex::new(None),
            input_versions: Mutex::new(HashMap::new()),
            submit_seq: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            open_requests: AtomicU64::new(0),
            peak_open_requests: AtomicU64::new(0),
            downloads: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            webhooks_delivered: AtomicU64::new(0),
            webhooks_failed: AtomicU64::new(0),
            tallies: Mutex::new(Tallies::default()),
            http,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            limits,
            storage: storage::Storage::default(),
        })
    }

    fn shard(&self, id: &str) -> &Mutex<HashMap<String, Gen>> {
        let h = self.hasher.hash_one(id);
        &self.gens[usize::try_from(h % SHARDS as u64).unwrap_or(0)]
    }

    /// A private random generator for one request (see [`faults::Dice`]).
    pub(crate) fn rng(&self) -> rand::rngs::StdRng {
        lock(&self.dice).fork()
    }

    /// Records an accepted generation and counts it in flight.
    pub(crate) fn insert(&self, id: String, rec: Gen) {
        lock(self.shard(&id)).insert(id, rec);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    }

    /// Runs `f` on a generation, if it exists.
    pub(crate) fn with_gen<R>(&self, id: &str, f: impl FnOnce(&mut Gen) -> R) -> Option<R> {
        let mut shard = lock(self.shard(id));
        shard.get_mut(id).map(f)
    }

    /// Ends a generation's time in flight (idempotent).
    pub(crate) fn close(&self, rec: &mut Gen) {
        if rec.open {
            rec.open = false;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Every altered output so far, as (request id, output index, kind), sorted.
    pub(crate) fn alterations(&self) -> Vec<(String, usize, &'static str)> {
        let mut found = Vec::new();
        for shard in &self.gens {
            for (id, rec) in lock(shard).iter() {
                for (index, key) in rec.outputs.iter().enumerate() {
                    if key.alteration != imagegen::Alteration::None {
                        found.push((id.clone(), index, key.alteration.kind()));
                    }
                }
            }
        }
        found.sort_unstable();
        found
    }

    /// Counts a submit request and returns its 0-based sequence number.
    pub(crate) fn count_submit(&self) -> u64 {
        lock(&self.submit_window).record(Instant::now());
        self.submit_seq.fetch_add(1, Ordering::SeqCst)
    }

    /// The status every submit gets right now because of a burst, if one is on, and whether
    /// its 429s go without `Retry-After`.
    pub(crate) fn burst_status(&self, now: Instant) -> Option<(u16, bool)> {
        if let Some((until, status)) = *lock(&self.manual_burst)
            && now < until
        {
            return Some((status, false));
        }
        let t = now.duration_since(self.started).as_secs_f64();
        self.config
            .faults
            .bursts
            .iter()
            .find(|b| t >= b.after_secs && t < b.after_secs + b.duration_secs)
            .map(|b| (b.status, b.no_retry_after))
    }

    /// Generations in flight now.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Submit requests received so far.
    pub(crate) fn submits(&self) -> u64 {
        self.submit_seq.load(Ordering::SeqCst)
    }

    /// With a rate `limit`: `Err(wait)` when this submit is over it; otherwise counts it.
    pub(crate) fn take_rate_slot(&self, now: Instant, limit: Option<u32>) -> Result<(), Duration> {
        // Without a limit there is nothing to count: keep the lock off the hot path.
        let Some(limit) = limit else { return Ok(()) };
        let mut window = lock(&self.accept_window);
        if let Some(wait) = window.wait_for_room(now, limit) {
            return Err(wait);
        }
        window.record(now);
        Ok(())
    }

    /// The current counters.
    pub(crate) fn stats(&self) -> SimStats {
        let tallies = lock(&self.tallies);
        SimStats {
            submits: self.submit_seq.load(Ordering::SeqCst),
            accepted: self.accepted.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            peak_in_flight: self.peak_in_flight.load(Ordering::SeqCst),
            open_requests: self.open_requests.load(Ordering::SeqCst),
            peak_open_requests: self.peak_open_requests.load(Ordering::SeqCst),
            peak_submits_per_second: lock(&self.submit_window).peak() as u64,
            downloads: self.downloads.load(Ordering::SeqCst),
            dropped_connections: self.dropped.load(Ordering::SeqCst),
            truncated_downloads: self.truncated.load(Ordering::SeqCst),
            webhooks_delivered: self.webhooks_delivered.load(Ordering::SeqCst),
            webhooks_failed: self.webhooks_failed.load(Ordering::SeqCst),
            uploads: self.storage.uploads.load(Ordering::SeqCst),
            uploaded_bytes: self.storage.uploaded_bytes.load(Ordering::SeqCst),
            storage_tokens: self.storage.tokens_issued.load(Ordering::SeqCst),
            expired_token_refusals: self.storage.expired_token_refusals.load(Ordering::SeqCst),
            by_status: tallies.by_status.iter().map(|(k, v)| (*k, *v)).collect(),
            by_route: tallies.by_route.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    /// Ends the connection without an answer. The unwind is caught by the connection's task,
    /// which drops the socket; `resume_unwind` skips the panic hook, so nothing is printed.
    pub(crate) fn drop_connection(&self) -> ! {
        self.dropped.fetch_add(1, Ordering::SeqCst);
        std::panic::resume_unwind(Box::new("backdrop sim: connection dropped on purpose"))
    }
}

/// Decrements the open-request gauge even when a handler unwinds to drop its connection.
struct OpenGuard<'a>(&'a Sim);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn track(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Response {
    let route = route_label(req.method(), req.uri().path());
    let now = sim.open_requests.fetch_add(1, Ordering::SeqCst) + 1;
    sim.peak_open_requests.fetch_max(now, Ordering::SeqCst);
    let guard = OpenGuard(&sim);
    let response = next.run(req).await;
    drop(guard);
    let mut tallies = lock(&sim.tallies);
    *tallies.by_status.entry(response.status().as_u16()).or_default() += 1;
    *tallies.by_route.entry(route).or_default() += 1;
    response
}

/// The route a request belongs to, for the per-route counts (static, so counting allocates
/// nothing on the hot path).
fn route_label(method: &axum::http::Method, path: &str) -> &'static str {
    use axum::http::Method;
    let get = method == Method::GET;
    match path {
        "/v1/images/generate" => "POST /v1/images/generate",
        "/v1/seedream/v4.5/edit" => "POST /v1/seedream/v4.5/edit",
        "/.well-known/jwks.json" => "GET /.well-known/jwks.json",
        "/__sim/ledger" => "GET /__sim/ledger",
        "/__sim/stats" => "GET /__sim/stats",
        "/__sim/balance" if get => "GET /__sim/balance",
        "/__sim/balance" => "POST /__sim/balance",
        "/__sim/keys" => "POST /__sim/keys",
        "/__sim/burst" => "POST /__sim/burst",
        "/__sim/config" => "GET /__sim/config",
        "/__sim/limits" => "GET /__sim/limits",
        "/__sim/input-version" => "POST /__sim/input-version",
        "/storage/auth/token" => "POST /storage/auth/token",
        "/storage/upload/initiate" => "POST /storage/upload/initiate",
        "/cdn/files/upload" => "POST {base_url}/files/upload",
        p if p.starts_with("/storage/put/") => "PUT {upload_url}",
        p if p.starts_with("/storage/files/") => "GET /storage/files/{id}/{name}",
        p if p.starts_with("/v1/requests/") => "GET /v1/requests/{id}",
        p if p.starts_with("/files/") => "GET /files/{id}/{file}",
        p if p.starts_with("/__sim/input/") => "GET /__sim/input/{file}",
        p if p.starts_with("/queue/") && p.ends_with("/status") => "GET {status_url}",
        p if p.starts_with("/queue/") && p.ends_with("/status/stream") => "GET {status_url}/stream",
        p if p.starts_with("/queue/") && p.ends_with("/response") => "GET {response_url}",
        p if p.starts_with("/queue/") && p.ends_with("/cancel") => "PUT {cancel_url}",
        _ if method == Method::POST => "POST /{model_id}",
        _ => "(unknown)",
    }
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/images/generate", post(seedance::generate))
        .route("/v1/seedream/v4.5/edit", post(seedance::edit))
        .route("/v1/requests/{id}", get(seedance::status))
        .route("/queue/{token}/requests/{id}/status", get(fal::status))
        .route("/queue/{token}/requests/{id}/status/stream", get(fal::status_stream))
        .route("/queue/{token}/requests/{id}/response", get(fal::response))
        .route("/queue/{token}/requests/{id}/cancel", axum::routing::put(fal::cancel))
        .route("/files/{id}/{file}", get(files::output))
        .route("/.well-known/jwks.json", get(webhook::jwks))
        .route("/storage/auth/token", post(storage::token))
        .route("/storage/upload/initiate", post(storage::initiate))
        .route("/cdn/files/upload", post(storage::cdn_upload))
        .route("/storage/put/{slot}", axum::routing::put(storage::put))
        .route("/storage/files/{id}/{name}", get(storage::file))
        .merge(admin::routes())
        .fallback(fal::submit)
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&sim), track))
        .with_state(sim)
}

/// A running simulator. Dropping it leaves the server running until the runtime ends; call
/// [`SimHandle::shutdown`] to stop it.
#[derive(Debug)]
pub struct SimHandle {
    sim: Arc<Sim>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<Result<(), SimError>>,
}

/// Starts the simulator on a free port of 127.0.0.1.
///
/// # Errors
/// [`SimError::Config`] for an invalid config, [`SimError::Bind`] if no port can be opened.
pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
    start_on(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0), config).await
}

/// Starts the simulator on `addr` (port 0 picks a free port).
///
/// # Errors
/// [`SimError::Config`] for an invalid config, [`SimError::Bind`] if the address is taken.
pub async fn start_on(addr: SocketAddr, config: SimConfig) -> Result<SimHandle, SimError> {
    config.validate()?;
    let listener = TcpListener::bind(addr).await.map_err(|source| SimError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| SimError::Bind { addr, source })?;
    let sim = Arc::new(Sim::new(config, base_url_for(local))?);
    let app = router(Arc::clone(&sim));
    let token = sim.shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
            .map_err(SimError::Serve)
    });
    tracing::info!(base_url = %sim.base_url, "simulator listening");
    Ok(SimHandle { sim, addr: local, server })
}

/// Serves the simulator on `listener` until `shutdown` completes (the shape `backdrop sim`
/// and embedders use when they own the listener and the shutdown signal).
///
/// # Errors
/// [`SimError::Config`] for an invalid config, [`SimError::Serve`] if the server fails.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SimError> {
    config.validate()?;
    let local = listener.local_addr().map_err(SimError::Serve)?;
    let sim = Arc::new(Sim::new(config, base_url_for(local))?);
    let app = router(Arc::clone(&sim));
    let token = sim.shutdown.clone();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            token.cancel();
        })
        .await
        .map_err(SimError::Serve);
    sim.tasks.close();
    sim.tasks.wait().await;
    result
}

fn base_url_for(addr: SocketAddr) -> String {
    // A wildcard listen address is not somewhere a client can connect to: hand out loopback.
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

impl SimHandle {
    /// The base URL clients use, e.g. `http://127.0.0.1:40123` (no trailing slash).
    #[must_use]
    pub fn base_url(&self) -> String {
        self.sim.base_url.clone()
    }

    /// The address the server listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    // Everything else a client learns or changes goes over HTTP (`/__sim/*`, see `admin`), so a
    // test observes the simulator the way backdrop does: through the wire, sharing no types.

    /// The JWKS document with the key that signs fal webhooks.
    #[must_use]
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.sim.base_url)
    }

    /// URL of a deterministic "product on white" input picture named `name`.
    #[must_use]
    pub fn input_url(&self, name: &str) -> String {
        format!("{}/__sim/input/{name}.png", self.sim.base_url)
    }

    /// Stops accepting connections, lets open requests finish, and cancels pending webhooks.
    pub async fn shutdown(self) {
        self.sim.shutdown.cancel();
        self.sim.tasks.close();
        // Keep-alive connections of a client that is still running could hold the server:
        // give them a moment, then stop waiting.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.sim.tasks.wait()).await;
    }
}

/// `body` (a JSON object) with a `padding` string that makes the whole answer `size` bytes:
/// still valid JSON, streamed in chunks without a Content-Length, so a client that reads answers
/// whole buffers all of it and one that caps them stops early (and the rest is never produced).
pub(crate) fn oversized_json(
    status: axum::http::StatusCode,
    body: &serde_json::Value,
    size: u64,
) -> Response {
    use axum::body::{Body, Bytes};
    const CHUNK: usize = 64 * 1024;
    let text = body.to_string();
    let head = match text.strip_suffix('}') {
        Some(open) if open.len() > 1 => format!("{open},\"padding\":\""),
        _ => "{\"padding\":\"".to_owned(),
    };
    let tail = Bytes::from_static(b"\"}");
    let filler = Bytes::from(vec![b'x'; CHUNK]);
    let fixed = (head.len() + tail.len()) as u64;
    let mut left = size.saturating_sub(fixed);
    let mut parts = vec![Bytes::from(head)].into_iter();
    let mut done = false;
    let stream = futures::stream::poll_fn(move |_| {
        if let Some(part) = parts.next() {
            return std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(part)));
        }
        if left > 0 {
            let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            left -= n as u64;
            return std::task::Poll::Ready(Some(Ok(filler.slice(..n))));
        }
        if done {
            std::task::Poll::Ready(None)
        } else {
            done = true;
            std::task::Poll::Ready(Some(Ok(tail.clone())))
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    response
}

/// Hex sha256 of `bytes` (ledger fingerprints, data-URI cache keys).
pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
