//! The Seedance REST protocol: synchronous text-to-image, edits that are synchronous, polled
//! (`async: true`) or pushed to a webhook, the status endpoint, and `{"error": {code, message}}`
//! bodies: 400 for a bad request or a failed generation, 401 for a missing or revoked key, 402
//! when the credits run out, 429 `rate_limited` (with `Retry-After` unless configured off) when
//! over the rate limit, 429 `concurrency_limit_exceeded` (never with `Retry-After`) when over
//! the cap on requests in flight, and 5xx for server faults.

#![expect(
    clippy::result_large_err,
    reason = "validation helpers return the finished error response; only the error path pays for its size"
)]

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::faults::chance;
use super::imagegen::{Format, Source};
use super::money::{Protocol, SEEDANCE_EDIT_MODEL, price};
use super::submit::{self, Order, Scheme, Verdict, authorized};
use super::{Sim, hex_sha256};

/// A seedance error answer.
pub(crate) fn error(status: u16, code: &str, message: &str, extra: Value) -> Response {
    let mut body = json!({ "code": code, "message": message });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "error": body }))).into_response()
}

fn invalid(message: &str) -> Response {
    error(400, "invalid_request", message, Value::Null)
}

fn unauthorized() -> Response {
    error(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)", Value::Null)
}

/// The answer to a submit the fault gate refused.
fn refused(sim: &Sim, refusal: submit::Refusal) -> Response {
    let (status, code, message) = match refusal.status {
        0 | 500 => (500, "server_error", "internal server error, please retry"),
        429 if refusal.cause == submit::Cause::TooManyInFlight => (
            429,
            "concurrency_limit_exceeded",
            "too many requests in flight; submit again when one of yours has finished",
        ),
        429 => (429, "rate_limited", "too many requests, slow down"),
        503 => (503, "service_unavailable", "the service is overloaded, please retry"),
        s if s >= 500 => (s, "server_error", "upstream error, please retry"),
        400 => (400, "invalid_request", "the request was rejected"),
        401 => (401, "unauthorized", "missing or invalid API key"),
        402 => (402, "insufficient_credits", "not enough credits"),
        s => (s, "error", "the request was rejected"),
    };
    let mut response = error(status, code, message, Value::Null);
    if let Some(wait) = refusal.retry_after_header() {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            submit::retry_after_value(sim.config.faults.retry_after_format, wait),
        );
    }
    response
}

fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid("the body must be a JSON object")),
        Err(e) => Err(invalid(&format!("the body is not valid JSON: {e}"))),
    }
}

fn opt_int(
    map: &serde_json::Map<String, Value>,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, Response> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(invalid(&format!("{key} must be an integer in {}..={}", range.start(), range.end()))),
        },
    }
}

fn required_prompt(map: &serde_json::Map<String, Value>) -> Result<String, Response> {
    match map.get("prompt").and_then(Value::as_str) {
        Some(p) if !p.trim().is_empty() => Ok(p.to_owned()),
        _ => Err(invalid("prompt is required and must be a non-empty string")),
    }
}

/// Charges, records and, on a drop fault, drops the connection. `Err` is the answer to send.
fn take_order(
    sim: &Arc<Sim>,
    order: Order,
    verdict: Verdict,
    rng: &mut rand::rngs::StdRng,
) -> Result<submit::Accepted, Response> {
    let accepted = submit::accept(sim, order, rng).map_err(|short| {
        error(
            402,
            "insufficient_credits",
            "not enough credits for this request; nothing was charged",
            json!({ "credits_required": short.required, "credits_available": short.available }),
        )
    })?;
    if matches!(verdict, Verdict::Drop) {
        sim.drop_connection();
    }
    if matches!(verdict, Verdict::Gateway) {
        // Charged, and nobody will ever collect it: it leaves flight at once.
        sim.with_gen(&accepted.id, |g| sim.close(g));
        return Err(submit::gateway_page());
    }
    Ok(accepted)
}

/// The refusal of the key-echo fault: a 400 whose message repeats the key.
fn echo_key(headers: &HeaderMap) -> Response {
    invalid(&submit::key_echo_message(submit::presented_key(headers)))
}

/// `POST /v1/images/generate`: synchronous text-to-image.
pub(crate) async fn generate(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let seq = sim.count_submit();
    if !authorized(&sim, &headers, Scheme::Bearer) {
        return unauthorized();
    }
    let order = match generate_order(&body) {
        Ok(order) => order,
        Err(response) => return response,
    };
    let mut rng = sim.rng();
    let verdict = submit::gate(&sim, seq, &mut rng);
    match verdict {
        Verdict::Refuse(r) => return refused(&sim, r),
        Verdict::EchoKey => return echo_key(&headers),
        Verdict::Pass | Verdict::Drop | Verdict::Gateway => {}
    }
    let model = order.model.clone();
    let accepted = match take_order(&sim, order, verdict, &mut rng) {
        Ok(a) => a,
        Err(response) => return response,
    };
    submit::wait_until(accepted.ready).await;
    if let Some(failure) = &accepted.rec.failure {
        sim.with_gen(&accepted.id, |g| sim.close(g));
        return error(400, "generation_failed", failure, Value::Null);
    }
    let images: Vec<Value> = submit::images_json(&sim, &accepted.id, &accepted.rec)
        .into_iter()
        .map(|mut img| {
            if let Some(obj) = img.as_object_mut() {
                obj.remove("content_type");
                obj.insert("seed".into(), json!(accepted.rec.seed));
            }
            img
        })
        .collect();
    axum::Json(json!({
        "id": accepted.id,
        "model": model,
        "created": super::money::unix_ms() / 1000,
        "images": images,
        "credits_used": accepted.cost,
        "credits_remaining": accepted.remaining,
    }))
    .into_response()
}

fn generate_order(body: &[u8]) -> Result<Order, Response> {
    let map = parse_object(body)?;
    let model = match map.get("model").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => return Err(invalid("model is required")),
    };
    let price_each =
        price(Protocol::Seedance, &model).ok_or_else(|| invalid(&format!("unknown model {model:?}")))?;
    let prompt = required_prompt(&map)?;
    let width = opt_int(&map, "width", 64..=4096)?.unwrap_or(1024);
    let height = opt_int(&map, "height", 64..=4096)?.unwrap_or(1024);
    if width * height > 2048 * 2048 {
        return Err(invalid("width × height must be at most 4 MP (2048×2048)"));
    }
    let num_images = opt_int(&map, "num_images", 1..=6)?.unwrap_or(1);
    if map.get("guidance_scale").is_some_and(|g| !g.is_null() && !g.is_number()) {
        return Err(invalid("guidance_scale must be a number"));
    }
    let seed = opt_int(&map, "seed", 0..=u64::from(u32::MAX))?;
    Ok(Order {
        protocol: Protocol::Seedance,
        model,
        prompt,
        source: Source::Prompt,
        size: (u32::try_from(width).unwrap_or(1024), u32::try_from(height).unwrap_or(1024)),
        num_images: u32::try_from(num_images).unwrap_or(1),
        format: Format::Png,
        seed,
        price_each,
        body_sha256: hex_sha256(body),
    })
}

/// What an edit body asked for besides the order.
struct EditMode {
    asynchronous: bool,
    webhook_url: Option<String>,
}

fn edit_order(sim: &Sim, body: &[u8]) -> Result<(Order, EditMode), Response> {
    let map = parse_object(body)?;
    let prompt = required_prompt(&map)?;
    let urls = match map.get("image_urls").and_then(Value::as_array) {
        Some(urls) if (1..=10).contains(&urls.len()) => urls,
        _ => return Err(invalid("image_urls must be an array of 1 to 10 image URLs")),
    };
    let mut primary = None;
    for (i, url) in urls.iter().enumerate() {
        let url = url.as_str().ok_or_else(|| invalid(&format!("image_urls[{i}] must be a string")))?;
        let resolved =
            submit::resolve_source(sim, url).map_err(|m| invalid(&format!("image_urls[{i}]: {m}")))?;
        if i == 0 {
            primary = Some(resolved);
        }
    }
    let (source, size) = primary.ok_or_else(|| invalid("image_urls is empty"))?;
    let num_images = opt_int(&map, "num_images", 1..=6)?.unwrap_or(1);
    let format = match map.get("output_format").and_then(Value::as_str) {
        None | Some("png") => Format::Png,
        Some("jpeg" | "jpg") => Format::Jpeg,
        Some(other) => return Err(invalid(&format!("output_format {other:?} must be png or jpeg"))),
    };
    let seed = opt_int(&map, "seed", 0..=u64::from(u32::MAX))?;
    let asynchronous = match map.get("async") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("async must be a boolean")),
    };
    let webhook_url = match map.get("webhook_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(u))
            if url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) =>
        {
            Some(u.clone())
        }
        Some(_) => return Err(invalid("webhook_url must be an http(s) URL")),
    };
    // The path names the model; a `model` field, if any, must agree with the price table.
    let model = map.get("model").and_then(Value::as_str).unwrap_or(SEEDANCE_EDIT_MODEL).to_owned();
    let price_each =
        price(Protocol::Seedance, &model).ok_or_else(|| invalid(&format!("unknown model {model:?}")))?;
    let order = Order {
        protocol: Protocol::Seedance,
        model,
        prompt,
        source,
        size,
        num_images: u32::try_from(num_images).unwrap_or(1),
        format,
        seed,
        price_each,
        body_sha256: hex_sha256(body),
    };
    Ok((order, EditMode { asynchronous: asynchronous || webhook_url.is_some(), webhook_url }))
}

/// `POST /v1/seedream/v4.5/edit`: synchronous, `async: true`, or with a `webhook_url`.
pub(crate) async fn edit(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let seq = sim.count_submit();
    if !authorized(&sim, &headers, Scheme::Bearer) {
        return unauthorized();
    }
    let (order, mode) = match edit_order(&sim, &body) {
        Ok(v) => v,
        Err(response) => return response,
    };
    let mut rng = sim.rng();
    let verdict = submit::gate(&sim, seq, &mut rng);
    match verdict {
        Verdict::Refuse(r) => return refused(&sim, r),
        Verdict::EchoKey => return echo_key(&headers),
        Verdict::Pass | Verdict::Drop | Verdict::Gateway => {}
    }
    let accepted = match take_order(&sim, order, verdict, &mut rng) {
        Ok(a) => a,
        Err(response) => return response,
    };
    if mode.asynchronous {
        if let Some(url) = mode.webhook_url {
            super::webhook::schedule(&sim, accepted.id.clone(), url, &mut rng);
        }
        // The fault: an id that is not a usable path segment (the generation keeps its own).
        let id = if chance(&mut rng, sim.config.faults.bad_request_id_rate) { ".." } else { &accepted.id };
        return axum::Json(json!({ "request_id": id, "status": "queued" })).into_response();
    }
    submit::wait_until(accepted.ready).await;
    if let Some(failure) = &accepted.rec.failure {
        sim.with_gen(&accepted.id, |g| sim.close(g));
        return error(400, "generation_failed", failure, Value::Null);
    }
    axum::Json(json!({
        "images": submit::images_json(&sim, &accepted.id, &accepted.rec),
        "seed": accepted.rec.seed,
        "credits_used": accepted.cost,
    }))
    .into_response()
}

/// The status of a seedance request at `now`: `(status, body)`.
pub(crate) fn status_body(sim: &Sim, id: &str, now: Instant) -> Option<Value> {
    sim.with_gen(id, |rec| {
        if rec.protocol != Protocol::Seedance {
            return None;
        }
        let body = if now < rec.started {
            json!({ "request_id": id, "status": "queued" })
        } else if now < rec.ready {
            json!({ "request_id": id, "status": "in_progress" })
        } else if let Some(failure) = rec.failure.clone() {
            // Reading the verdict ends the generation's time in flight.
            sim.close(rec);
            json!({
                "request_id": id,
                "status": "failed",
                "error": { "code": "generation_failed", "message": failure },
                "credits_used": rec.cost,
            })
        } else {
            json!({
                "request_id": id,
                "status": "completed",
                "images": submit::images_json(sim, id, rec),
                "seed": rec.seed,
                "credits_used": rec.cost,
            })
        };
        Some(body)
    })
    .flatten()
}

/// `GET /v1/requests/{id}`.
pub(crate) async fn status(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&sim, &headers, Scheme::Bearer) {
        return unauthorized();
    }
    if sim.config.faults.poll_error_rate > 0.0 && chance(&mut sim.rng(), sim.config.faults.poll_error_rate) {
        return error(500, "server_error", "internal server error, please retry", Value::Null);
    }
    let faults = &sim.config.faults;
    let oversized = faults.oversized_rate > 0.0 && chance(&mut sim.rng(), faults.oversized_rate);
    match status_body(&sim, &id, Instant::now()) {
        Some(body) if oversized => super::oversized_json(StatusCode::OK, &body, faults.oversized_bytes()),
        Some(body) => axum::Json(body).into_response(),
        None => error(404, "not_found", &format!("no request {id}"), Value::Null),
    }
}
