//! The fal.ai queue protocol: `POST /{model_id}` (with `?fal_webhook=`), the status, response and
//! cancel URLs handed out at submit (under a random path segment, so a client that rebuilds them
//! from the model id gets 404), the status stream (`status_url/stream`, server-sent events),
//! 422 `detail` arrays, and `detail` + `X-Fal-Error-Type` 5xx bodies.

#![expect(
    clippy::result_large_err,
    reason = "validation helpers return the finished error response; only the error path pays for its size"
)]

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::faults::chance;
use super::imagegen::{Format, Source};
use super::money::{Protocol, price, refund_entry};
use super::submit::{self, Order, Scheme, Verdict, authorized};
use super::{Sim, hex_sha256, lock};

fn detail(status: u16, detail: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "detail": detail }))).into_response()
}

fn unprocessable(loc: &[&str], msg: &str, kind: &str) -> Response {
    detail(422, json!([{ "loc": loc, "msg": msg, "type": kind }]))
}

fn unauthorized() -> Response {
    detail(401, json!("No valid credentials were provided (Authorization: Key <key>)"))
}

fn not_found(what: &str) -> Response {
    detail(404, json!(what))
}

/// A 5xx the way fal sends it: `{detail, error_type}` and `X-Fal-Error-Type`.
fn server_error(status: u16) -> Response {
    let (status, kind, message) = match status {
        500 => (500, "internal_error", "Internal server error"),
        502 => (502, "bad_gateway", "Bad gateway"),
        504 => (504, "request_timeout", "The request timed out upstream"),
        s => (s, "runner_unavailable", "No runner is available right now, please retry"),
    };
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut response = (code, axum::Json(json!({ "detail": message, "error_type": kind }))).into_response();
    response.headers_mut().insert("x-fal-error-type", HeaderValue::from_static(kind));
    if status == 504 {
        response.headers_mut().insert("x-fal-request-timeout-type", HeaderValue::from_static("system"));
    }
    response
}

fn refused(sim: &Sim, refusal: submit::Refusal) -> Response {
    let mut response = match refusal.status {
        0 => server_error(503),
        429 if refusal.cause == submit::Cause::TooManyInFlight => {
            let kind = "concurrency_limit_exceeded";
            let body = json!({
                "detail": "Too many requests in flight for this account; submit again when one has finished",
                "error_type": kind,
            });
            let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
            response.headers_mut().insert("x-fal-error-type", HeaderValue::from_static(kind));
            response
        }
        429 => detail(429, json!("Too many requests")),
        s if s >= 500 => server_error(s),
        401 => unauthorized(),
        s => detail(s, json!("The request was rejected")),
    };
    if let Some(wait) = refusal.retry_after_header() {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            submit::retry_after_value(sim.config.faults.retry_after_format, wait),
        );
    }
    response
}

/// Output size for an `image_size` value (enum name or `{width, height}`).
fn image_size(value: &Value) -> Result<(u32, u32), Response> {
    let bad = || {
        unprocessable(
            &["body", "image_size"],
            "image_size must be a known preset or {width, height}",
            "value_error",
        )
    };
    match value {
        Value::String(preset) => Ok(match preset.as_str() {
            "square_hd" => (1024, 1024),
            "square" => (512, 512),
            "portrait_4_3" => (768, 1024),
            "portrait_16_9" => (576, 1024),
            "landscape_4_3" => (1024, 768),
            "landscape_16_9" => (1024, 576),
            "auto_2K" => (2048, 2048),
            "auto_4K" => (4096, 4096),
            _ => return Err(bad()),
        }),
        Value::Object(o) => {
            let side = |k: &str| o.get(k).and_then(Value::as_u64).filter(|v| (1..=8192).contains(v));
            match (side("width"), side("height")) {
                (Some(w), Some(h)) => {
                    Ok((u32::try_from(w).map_err(|_| bad())?, u32::try_from(h).map_err(|_| bad())?))
                }
                _ => Err(bad()),
            }
        }
        _ => Err(bad()),
    }
}

fn int_field(map: &serde_json::Map<String, Value>, key: &str, max: u64) -> Result<Option<u64>, Response> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max).contains(&n) || (key == "seed" && n == 0) => Ok(Some(n)),
            _ => Err(unprocessable(
                &["body", key],
                &format!("ensure this value is an integer in 1..={max}"),
                "value_error",
            )),
        },
    }
}

fn order(sim: &Sim, model: &str, body: &[u8]) -> Result<Order, Response> {
    let map = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        _ => return Err(unprocessable(&["body"], "the body must be a JSON object", "type_error.dict")),
    };
    let prompt = match map.get("prompt").and_then(Value::as_str) {
        Some(p) if !p.trim().is_empty() => p.to_owned(),
        _ => return Err(unprocessable(&["body", "prompt"], "field required", "value_error.missing")),
    };
    let edit = model.ends_with("/edit");
    let (source, input_size) = if edit {
        let urls = match map.get("image_urls").and_then(Value::as_array) {
            Some(urls) if !urls.is_empty() => urls,
            _ => return Err(unprocessable(&["body", "image_urls"], "field required", "value_error.missing")),
        };
        // fal silently keeps the last ten.
        let urls = &urls[urls.len().saturating_sub(10)..];
        let mut primary = None;
        for (i, url) in urls.iter().enumerate() {
            let loc = ["body", "image_urls", &i.to_string()].map(str::to_owned);
            let loc: Vec<&str> = loc.iter().map(String::as_str).collect();
            let url =
                url.as_str().ok_or_else(|| unprocessable(&loc, "str type expected", "type_error.str"))?;
            let resolved =
                submit::resolve_source(sim, url).map_err(|m| unprocessable(&loc, &m, "image_load_error"))?;
            if i == 0 {
                primary = Some(resolved);
            }
        }
        primary
            .ok_or_else(|| unprocessable(&["body", "image_urls"], "field required", "value_error.missing"))?
    } else {
        (Source::Prompt, (1024, 1024))
    };
    let size = match map.get("image_size") {
        None | Some(Value::Null) => input_size,
        Some(v) => image_size(v)?,
    };
    let num_images = int_field(&map, "num_images", 6)?.unwrap_or(1);
    int_field(&map, "max_images", 6)?;
    let seed = int_field(&map, "seed", u64::from(u32::MAX))?;
    for flag in ["sync_mode", "enable_safety_checker"] {
        if map.get(flag).is_some_and(|v| !v.is_null() && !v.is_boolean()) {
            return Err(unprocessable(
                &["body", flag],
                "value could not be parsed to a boolean",
                "type_error.bool",
            ));
        }
    }
    Ok(Order {
        protocol: Protocol::Fal,
        model: model.to_owned(),
        prompt,
        source,
        size,
        num_images: u32::try_from(num_images).unwrap_or(1),
        format: Format::Png,
        seed,
        price_each: price(Protocol::Fal, model).unwrap_or(0.0),
        body_sha256: hex_sha256(body),
    })
}

fn queue_url(sim: &Sim, id: &str, what: &str) -> String {
    format!("{}/queue/{}/requests/{id}/{what}", sim.base_url, sim.queue_token)
}

/// The query of a submit.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct SubmitQuery {
    fal_webhook: Option<String>,
}

/// `POST /{model_id}` (the router's fallback: model ids contain slashes). Anything else that
/// matches no route is a 404.
pub(crate) async fn submit(
    State(sim): State<Arc<Sim>>,
    method: Method,
    uri: Uri,
    Query(query): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let model = uri.path().trim_start_matches('/');
    if method != Method::POST || price(Protocol::Fal, model).is_none() {
        return not_found(&format!("Application {model:?} not found"));
    }
    let seq = sim.count_submit();
    if !authorized(&sim, &headers, Scheme::Key) {
        return unauthorized();
    }
    let webhook = match query.fal_webhook {
        Some(url) if url::Url::parse(&url).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) => Some(url),
        Some(_) => {
            return unprocessable(
                &["query", "fal_webhook"],
                "invalid or missing URL scheme",
                "value_error.url",
            );
        }
        None => None,
    };
    let order = match order(&sim, model, &body) {
        Ok(order) => order,
        Err(response) => return response,
    };
    let mut rng = sim.rng();
    let verdict = submit::gate(&sim, seq, &mut rng);
    match verdict {
        Verdict::Refuse(r) => return refused(&sim, r),
        Verdict::EchoKey => {
            let msg = submit::key_echo_message(submit::presented_key(&headers));
            return unprocessable(&["header", "authorization"], &msg, "value_error");
        }
        Verdict::Pass | Verdict::Drop | Verdict::Gateway => {}
    }
    let accepted = match submit::accept(&sim, order, &mut rng) {
        Ok(a) => a,
        Err(short) => {
            return (
                StatusCode::PAYMENT_REQUIRED,
                axum::Json(json!({
                    "detail": format!("Insufficient balance: ${:.2} required, ${:.2} available. Nothing was charged.", short.required, short.available),
                    "error_type": "insufficient_balance",
                })),
            )
                .into_response();
        }
    };
    if matches!(verdict, Verdict::Drop) {
        sim.drop_connection();
    }
    if matches!(verdict, Verdict::Gateway) {
        // Charged, and nobody will ever collect it: it leaves flight at once.
        sim.with_gen(&accepted.id, |g| sim.close(g));
        return submit::gateway_page();
    }
    if let Some(url) = webhook {
        super::webhook::schedule(&sim, accepted.id.clone(), url, &mut rng);
    }
    let id = &accepted.id;
    // The fault: an id that is not a usable path segment (the URLs still name the real one).
    let shown = if chance(&mut rng, sim.config.faults.bad_request_id_rate) { ".." } else { id.as_str() };
    let position = sim.limits.position(&sim, id, Instant::now()).unwrap_or(0);
    axum::Json(json!({
        "request_id": shown,
        "status": "IN_QUEUE",
        "status_url": queue_url(&sim, id, "status"),
        "response_url": queue_url(&sim, id, "response"),
        "cancel_url": queue_url(&sim, id, "cancel"),
        "queue_position": position,
    }))
    .into_response()
}

/// Query of a status poll.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct StatusQuery {
    logs: Option<String>,
}

impl StatusQuery {
    /// `?logs=1` (or `true`): the status carries the request's log lines.
    fn wants_logs(&self) -> bool {
        self.logs.as_deref().is_some_and(|l| l == "1" || l == "true")
    }
}

/// Checks auth, the URL token and that `id` is a fal request; `Err` is the answer.
fn check(sim: &Sim, headers: &HeaderMap, token: &str, id: &str) -> Result<(), Response> {
    if !authorized(sim, headers, Scheme::Key) {
        return Err(unauthorized());
    }
    let known =
        token == sim.queue_token && sim.with_gen(id, |g| g.protocol == Protocol::Fal).unwrap_or(false);
    if known { Ok(()) } else { Err(not_found("Request not found")) }
}

/// `GET status_url`: 202 while `IN_QUEUE`/`IN_PROGRESS`, 200 when `COMPLETED`.
pub(crate) async fn status(
    State(sim): State<Arc<Sim>>,
    Path((token, id)): Path<(String, String)>,
    Query(query): Query<StatusQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = check(&sim, &headers, &token, &id) {
        return response;
    }
    if sim.config.faults.poll_error_rate > 0.0 && chance(&mut sim.rng(), sim.config.faults.poll_error_rate) {
        return server_error(503);
    }
    let logs = query.wants_logs();
    let Some(body) = status_body(&sim, &id, Instant::now(), logs) else {
        return not_found("Request not found");
    };
    let code = if body["status"] == "COMPLETED" { StatusCode::OK } else { StatusCode::ACCEPTED };
    let faults = &sim.config.faults;
    if faults.oversized_rate > 0.0 && chance(&mut sim.rng(), faults.oversized_rate) {
        return super::oversized_json(code, &body, faults.oversized_bytes());
    }
    (code, axum::Json(body)).into_response()
}

/// The status JSON of request `id` at `now` (after fal's account queue moved to `now`).
fn status_body(sim: &Sim, id: &str, now: Instant, logs: bool) -> Option<Value> {
    let position = sim.limits.position(sim, id, now);
    let (started, ready, cancelled) = sim.with_gen(id, |g| (g.started, g.ready, g.cancelled))?;
    let mut body = if cancelled || now >= ready {
        json!({ "status": "COMPLETED", "metrics": { "inference_time": ready.saturating_duration_since(started).as_secs_f64() } })
    } else if let Some(position) = position {
        json!({ "status": "IN_QUEUE", "queue_position": position })
    } else if now < started {
        // Position falls to 0 as the start nears: one place per 50 ms of waiting left.
        let left = started.duration_since(now).as_millis() / 50;
        json!({ "status": "IN_QUEUE", "queue_position": u64::try_from(left).unwrap_or(u64::MAX) })
    } else {
        json!({ "status": "IN_PROGRESS" })
    };
    if let Some(obj) = body.as_object_mut() {
        obj.insert("request_id".into(), json!(id));
        obj.insert("response_url".into(), json!(queue_url(sim, id, "response")));
        if logs {
            obj.insert("logs".into(), json!([{ "message": "simulated generation", "level": "INFO" }]));
        }
    }
    Some(body)
}

/// `GET status_url/stream`: the status as server-sent events, the way fal's own clients follow
/// a request: one `data:` event with the status JSON now, one more each time it changes (queue
/// position, `IN_PROGRESS`), and the `COMPLETED` one last, after which the stream ends.
pub(crate) async fn status_stream(
    State(sim): State<Arc<Sim>>,
    Path((token, id)): Path<(String, String)>,
    Query(query): Query<StatusQuery>,
    headers: HeaderMap,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    if let Err(response) = check(&sim, &headers, &token, &id) {
        return response;
    }
    let logs = query.wants_logs();
    // (simulator, request, last status sent, finished)
    let start = (sim, id, Value::Null, false);
    let events = futures::stream::unfold(start, move |(sim, id, last, finished)| async move {
        if finished {
            return None;
        }
        loop {
            let now = Instant::now();
            let body = status_body(&sim, &id, now, logs)?;
            let completed = body["status"] == "COMPLETED";
            if body != last {
                let event = Event::default().json_data(&body).ok()?;
                return Some((Ok::<_, std::convert::Infallible>(event), (sim, id, body, completed)));
            }
            // Nothing changed: sleep until something can (the start, the result, the queue
            // moving), checking at least every 50 ms for queue positions.
            let (started, ready) = sim.with_gen(&id, |g| (g.started, g.ready))?;
            let mut wake = now + std::time::Duration::from_millis(50);
            for t in [Some(started), Some(ready), sim.limits.next_move()].into_iter().flatten() {
                if t > now {
                    wake = wake.min(t);
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
                () = sim.shutdown.cancelled() => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// The result body of a finished fal request: `Ok(output)` or `Err((status, body))`.
pub(crate) fn result_body(sim: &Sim, id: &str, now: Instant) -> Option<Result<Value, (u16, Value)>> {
    sim.limits.advance(sim, now);
    sim.with_gen(id, |rec| {
        if rec.cancelled {
            return Err((400, json!({ "detail": "Request was cancelled" })));
        }
        if now < rec.ready {
            return Err((400, json!({ "detail": "Request is still in progress" })));
        }
        if let Some(failure) = rec.failure.clone() {
            sim.close(rec);
            return Err((
                422,
                json!({ "detail": [{ "loc": ["body", "prompt"], "msg": failure, "type": "content_policy_violation" }] }),
            ));
        }
        let images: Vec<Value> = rec
            .outputs
            .iter()
            .enumerate()
            .map(|(i, key)| {
                json!({
                    "url": submit::output_url(sim, id, i, key.format),
                    "content_type": key.format.content_type(),
                    "file_name": format!("{i}.{}", key.format.ext()),
                    "width": key.width,
                    "height": key.height,
                })
            })
            .collect();
        Ok(if rec.text_to_image { json!({ "images": images, "seed": rec.seed }) } else { json!({ "images": images }) })
    })
}

/// `GET response_url`: the model output, or the model's error.
pub(crate) async fn response(
    State(sim): State<Arc<Sim>>,
    Path((token, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = check(&sim, &headers, &token, &id) {
        return response;
    }
    match result_body(&sim, &id, Instant::now()) {
        Some(Ok(body)) => axum::Json(body).into_response(),
        Some(Err((status, body))) => {
            (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), axum::Json(body))
                .into_response()
        }
        None => not_found("Request not found"),
    }
}

/// `PUT cancel_url`: cancels (and refunds) a request that is still queued.
pub(crate) async fn cancel(
    State(sim): State<Arc<Sim>>,
    Path((token, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = check(&sim, &headers, &token, &id) {
        return response;
    }
    let now = Instant::now();
    sim.limits.advance(&sim, now);
    let outcome = sim.with_gen(&id, |rec| {
        if rec.cancelled {
            (StatusCode::BAD_REQUEST, "ALREADY_CANCELLED", None)
        } else if now < rec.started {
            rec.cancelled = true;
            sim.close(rec);
            (StatusCode::ACCEPTED, "CANCELLATION_REQUESTED", Some((rec.cost, rec.model.clone())))
        } else if now < rec.ready {
            (StatusCode::BAD_REQUEST, "IN_PROGRESS", None)
        } else {
            (StatusCode::BAD_REQUEST, "ALREADY_COMPLETED", None)
        }
    });
    let Some((code, status, refund)) = outcome else {
        return not_found("Request not found");
    };
    if let Some((cost, model)) = refund {
        sim.limits.forget(&id);
        lock(&sim.money).refund(Protocol::Fal, refund_entry(&id, Protocol::Fal, cost, model));
    }
    (code, axum::Json(json!({ "status": status }))).into_response()
}
