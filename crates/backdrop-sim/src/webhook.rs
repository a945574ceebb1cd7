//! Webhook delivery: seedance's unsigned `{request_id, status, images}` posts and fal's
//! Ed25519-signed ones (message `request_id \n user_id \n timestamp \n hex(sha256(body))`), late,
//! twice or never as the faults say, plus the JWKS document that publishes the signing key.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::faults::chance;
use super::money::Protocol;
use super::{SIM_USER_ID, Sim};

/// Delivery attempts per webhook before it counts as failed.
const ATTEMPTS: u32 = 3;

/// `GET /.well-known/jwks.json`: the public key that signs fal webhooks.
pub(crate) async fn jwks(State(sim): State<Arc<Sim>>) -> Response {
    axum::Json(jwks_document(&sim.signing_key.verifying_key())).into_response()
}

/// A JWKS document (`kty: OKP`, `crv: Ed25519`, `x` base64url without padding) for `key`.
#[must_use]
pub fn jwks_document(key: &ed25519_dalek::VerifyingKey) -> Value {
    let bytes = key.to_bytes();
    json!({
        "keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
            "kid": format!("sim-{}", hex::encode(&bytes[..4])),
            "use": "sig",
            "alg": "EdDSA",
        }]
    })
}

/// The message fal signs for a webhook.
#[must_use]
pub fn signed_message(request_id: &str, user_id: &str, timestamp: u64, body: &[u8]) -> String {
    format!("{request_id}\n{user_id}\n{timestamp}\n{}", hex::encode(Sha256::digest(body)))
}

/// Plans the webhook of request `id` to `url`: decides now (from the request's seeded
/// generator) whether it is dropped or duplicated, then delivers it once the result is ready.
pub(crate) fn schedule(sim: &Arc<Sim>, id: String, url: String, rng: &mut StdRng) {
    let faults = &sim.config.faults;
    if chance(rng, faults.webhook_drop_rate) {
        sim.webhooks_failed.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let copies = if chance(rng, faults.webhook_duplicate_rate) { 2 } else { 1 };
    let delay = Duration::from_millis(faults.webhook_delay_ms);
    let sim_task = Arc::clone(sim);
    sim.tasks.spawn(async move {
        let sim = sim_task;
        // A request in fal's account queue has no ready time until it starts.
        let Some(ready) = sim.limits.ready_at(&sim, &id).await else { return };
        let at = ready + delay;
        tokio::select! {
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
            () = sim.shutdown.cancelled() => return,
        }
        for copy in 0..copies {
            if copy > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            deliver(&sim, &id, &url).await;
        }
    });
}

async fn deliver(sim: &Sim, id: &str, url: &str) {
    let Some(protocol) = sim.with_gen(id, |g| (!g.cancelled).then_some(g.protocol)).flatten() else {
        return;
    };
    let now = Instant::now();
    let body = match protocol {
        Protocol::Seedance => match super::seedance::status_body(sim, id, now) {
            Some(body) => body,
            None => return,
        },
        Protocol::Fal => match super::fal::result_body(sim, id, now) {
            Some(Ok(payload)) => {
                json!({ "request_id": id, "gateway_request_id": id, "status": "OK", "payload": payload })
            }
            Some(Err((status, payload))) => json!({
                "request_id": id,
                "gateway_request_id": id,
                "status": "ERROR",
                "error": format!("Invalid status code: {status}"),
                "payload": payload,
            }),
            None => return,
        },
    };
    let body = match serde_json::to_vec(&body) {
        Ok(body) => body,
        Err(_) => return,
    };
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        let mut request = sim.http.post(url).header("content-type", "application/json").body(body.clone());
        if protocol == Protocol::Fal {
            // Signed at send time: a retried delivery carries a fresh timestamp, as fal's do.
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let signature =
                sim.signing_key.sign(signed_message(id, SIM_USER_ID, timestamp, &body).as_bytes());
            request = request
                .header("x-fal-webhook-request-id", id)
                .header("x-fal-webhook-user-id", SIM_USER_ID)
                .header("x-fal-webhook-timestamp", timestamp.to_string())
                .header("x-fal-webhook-signature", hex::encode(signature.to_bytes()));
        }
        let sent = tokio::select! {
            r = request.send() => r,
            () = sim.shutdown.cancelled() => return,
        };
        match sent {
            Ok(response) if response.status().is_success() => {
                sim.webhooks_delivered.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(response) => tracing::debug!(status = %response.status(), attempt, "webhook refused"),
            Err(e) => tracing::debug!(error = %e, attempt, "webhook delivery failed"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    sim.webhooks_failed.fetch_add(1, Ordering::SeqCst);
}
