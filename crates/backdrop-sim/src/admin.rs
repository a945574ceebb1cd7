//! Simulator-only endpoints under `/__sim/` (never part of either real API): the ledger, the
//! stats, balance top-ups, key revocation, bursts started on demand, the effective config, and
//! the procedural input pictures. No auth: they exist for tests and for a person at a terminal.
//!
//! | route | does |
//! |---|---|
//! | `GET /__sim/ledger` | every [`Charge`](super::Charge), in order |
//! | `GET /__sim/stats` | [`SimStats`](super::SimStats) |
//! | `GET`/`POST /__sim/balance` | read, or `{credits?, fal_balance?, add_credits?, add_fal_balance?}` |
//! | `POST /__sim/keys` | `{"revoked": true}` makes every key answer 401; `false` restores |
//! | `POST /__sim/burst` | `{"status": 503, "seconds": 30}`: every submit gets that status meanwhile |
//! | `POST /__sim/expire-urls` | every output URL ready so far answers 410 Gone from now on |
//! | `GET /__sim/config` | the effective [`SimConfig`](super::SimConfig) |
//! | `GET /__sim/limits` | the limits in force, in-flight count, fal's account queue, 429s by cause |
//! | `GET /__sim/input/{name}.png` | a deterministic "product on white" picture (`?w=&h=`; faults `?status=404`, `?html=1`, `?pad_kb=N`, `?delay_ms=N`; `ETag`, `If-None-Match`, `Range`) |
//! | `POST /__sim/input-version` | `{"name": "shirt"}`: the input picture `shirt` changes (a new version, a new `ETag`) under the same URL |
//! | `GET /__sim/alterations` | `[{request_id, output, kind}]`: every output altered on purpose |

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{Sim, lock};

/// The admin routes, to merge into the simulator's router.
pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/__sim/ledger", get(ledger))
        .route("/__sim/stats", get(stats))
        .route("/__sim/balance", get(balance).post(set_balance))
        .route("/__sim/keys", post(keys))
        .route("/__sim/burst", post(burst))
        .route("/__sim/expire-urls", post(expire_urls))
        .route("/__sim/config", get(config))
        .route("/__sim/limits", get(super::limits::report))
        .route("/__sim/input/{file}", get(super::files::input))
        .route("/__sim/alterations", get(alterations))
        .route("/__sim/input-version", post(input_version))
}

async fn ledger(State(sim): State<Arc<Sim>>) -> Response {
    Json(lock(&sim.money).ledger.clone()).into_response()
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.stats()).into_response()
}

async fn alterations(State(sim): State<Arc<Sim>>) -> Response {
    let list: Vec<serde_json::Value> = sim
        .alterations()
        .into_iter()
        .map(|(request_id, output, kind)| json!({ "request_id": request_id, "output": output, "kind": kind }))
        .collect();
    Json(list).into_response()
}

async fn config(State(sim): State<Arc<Sim>>) -> Response {
    Json(&sim.config).into_response()
}

fn balances(sim: &Sim) -> Response {
    let money = lock(&sim.money);
    Json(json!({ "credits": money.credits, "fal_balance": money.fal_balance })).into_response()
}

async fn balance(State(sim): State<Arc<Sim>>) -> Response {
    balances(&sim)
}

/// A balance change: set and/or add, per protocol.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceChange {
    credits: Option<f64>,
    fal_balance: Option<f64>,
    add_credits: Option<f64>,
    add_fal_balance: Option<f64>,
}

async fn set_balance(State(sim): State<Arc<Sim>>, Json(change): Json<BalanceChange>) -> Response {
    let values = [change.credits, change.fal_balance, change.add_credits, change.add_fal_balance];
    if values.iter().flatten().any(|v| !v.is_finite()) {
        return (StatusCode::BAD_REQUEST, "balances must be finite numbers").into_response();
    }
    {
        let mut money = lock(&sim.money);
        if let Some(v) = change.credits {
            money.credits = v;
        }
        if let Some(v) = change.fal_balance {
            money.fal_balance = v;
        }
        money.credits += change.add_credits.unwrap_or(0.0);
        money.fal_balance += change.add_fal_balance.unwrap_or(0.0);
    }
    balances(&sim)
}

/// Key revocation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    revoked: bool,
}

async fn keys(State(sim): State<Arc<Sim>>, Json(keys): Json<Keys>) -> Response {
    sim.revoked.store(keys.revoked, Ordering::SeqCst);
    Json(json!({ "revoked": keys.revoked })).into_response()
}

/// A burst started now.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BurstNow {
    #[serde(default = "default_status")]
    status: u16,
    seconds: f64,
}

const fn default_status() -> u16 {
    503
}

async fn burst(State(sim): State<Arc<Sim>>, Json(burst): Json<BurstNow>) -> Response {
    if !(400..=599).contains(&burst.status) || !(0.0..=86_400.0).contains(&burst.seconds) {
        return (StatusCode::BAD_REQUEST, "status must be 400..=599 and seconds 0..=86400").into_response();
    }
    *lock(&sim.manual_burst) = Some((Instant::now() + Duration::from_secs_f64(burst.seconds), burst.status));
    Json(json!({ "status": burst.status, "seconds": burst.seconds })).into_response()
}

/// Output URLs that expired while the client was away: whatever is ready now is gone for good,
/// as a provider's URLs are once their lifetime (24 h for seedance, 7 days for fal) is over.
/// Which input picture gets a new version.
#[derive(Debug, Deserialize)]
struct InputVersion {
    name: String,
}

async fn input_version(State(sim): State<Arc<Sim>>, Json(body): Json<InputVersion>) -> Response {
    let mut versions = lock(&sim.input_versions);
    let version = versions.entry(body.name.clone()).or_insert(0);
    *version += 1;
    Json(json!({ "name": body.name, "version": *version })).into_response()
}

async fn expire_urls(State(sim): State<Arc<Sim>>) -> Response {
    *lock(&sim.urls_expired_at) = Some(Instant::now());
    Json(json!({ "expired": true })).into_response()
}
