//! The simulator against real HTTP on 127.0.0.1: both protocols (status codes, bodies, headers),
//! signed webhooks checked with the published key, money and the ledger, every fault, the
//! determinism of a seed, and the `backdrop sim` binary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use backdrop_sim::{Faults, Latency, ScriptStep, SimConfig};
use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{Charge, Sim, Stats};

const EDIT: &str = "/v1/seedream/v4.5/edit";
const FAL_EDIT: &str = "/fal-ai/bytedance/seedream/v4.5/edit";
const KEY: &str = "sk-sentinel-sim-tests";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

async fn sim_with(faults: Faults) -> Sim {
    Sim::start(SimConfig { faults, ..SimConfig::default() }).await
}

fn edit_body(sim: &Sim, sku: &str) -> Value {
    json!({ "prompt": "Replace the background with polished marble", "image_urls": [sim.input_url(sku)] })
}

async fn post_seedance(c: &reqwest::Client, sim: &Sim, path: &str, body: &Value) -> reqwest::Response {
    c.post(format!("{}{path}", sim.base_url())).bearer_auth(KEY).json(body).send().await.unwrap()
}

async fn post_fal(c: &reqwest::Client, sim: &Sim, query: &str, body: &Value) -> reqwest::Response {
    c.post(format!("{}{FAL_EDIT}{query}", sim.base_url()))
        .header("authorization", format!("Key {KEY}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn fal_get(c: &reqwest::Client, url: &str) -> reqwest::Response {
    c.get(url).header("authorization", format!("Key {KEY}")).send().await.unwrap()
}

async fn png(c: &reqwest::Client, url: &str) -> image::RgbImage {
    let response = c.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let bytes = response.bytes().await.unwrap();
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgb8()
}

#[tokio::test]
async fn seedance_generate_and_sync_edit_return_real_images() {
    let sim = Sim::start(SimConfig { max_side: 128, ..SimConfig::default() }).await;
    let c = client();
    let body = json!({ "model": "seedream-v3", "prompt": "a teapot on oak", "width": 2048, "height": 1152, "num_images": 2 });
    let response = post_seedance(&c, &sim, "/v1/images/generate", &body).await;
    assert_eq!(response.status(), 200);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["model"], "seedream-v3");
    assert_eq!(v["credits_used"], 12.0);
    assert!(v["credits_remaining"].as_f64().unwrap() < 1e9);
    assert!(v["id"].as_str().unwrap().starts_with("req_"));
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0]["width"].as_u64(), images[0]["height"].as_u64()), (Some(128), Some(72)));
    let first = png(&c, images[0]["url"].as_str().unwrap()).await;
    assert_eq!(first.dimensions(), (128, 72));

    let response = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "SKU-1")).await;
    assert_eq!(response.status(), 200);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["credits_used"], 8.0);
    assert!(v["seed"].is_u64());
    assert_eq!(v["images"][0]["content_type"], "image/png");
    let edited = png(&c, v["images"][0]["url"].as_str().unwrap()).await;
    let input = png(&c, &sim.input_url("SKU-1")).await;
    assert_eq!(input.get_pixel(0, 0).0, [255, 255, 255], "inputs are products on white");
    assert_ne!(edited.get_pixel(0, 0), input.get_pixel(0, 0), "the white background was replaced");

    // JPEG output when asked.
    let mut body = edit_body(&sim, "SKU-2");
    body["output_format"] = json!("jpeg");
    let v: Value = post_seedance(&c, &sim, EDIT, &body).await.json().await.unwrap();
    let response = c.get(v["images"][0]["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    let bytes = response.bytes().await.unwrap();
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn seedance_async_edit_is_polled_to_completion_and_errors_have_the_spec_shape() {
    let sim = sim_with(Faults { latency: Latency::Fixed { ms: 300 }, ..Faults::default() }).await;
    let c = client();
    let mut body = edit_body(&sim, "SKU-A");
    body["async"] = json!(true);
    let v: Value = post_seedance(&c, &sim, EDIT, &body).await.json().await.unwrap();
    assert_eq!(v["status"], "queued");
    let id = v["request_id"].as_str().unwrap().to_owned();
    let status_url = format!("{}/v1/requests/{id}", sim.base_url());
    let first: Value = c.get(&status_url).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
    assert!(matches!(first["status"].as_str(), Some("queued" | "in_progress")), "{first}");
    assert!(first.get("images").is_none());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let done: Value = c.get(&status_url).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(done["status"], "completed");
    assert_eq!(done["request_id"], id.as_str());
    assert_eq!(done["credits_used"], 8.0);
    png(&c, done["images"][0]["url"].as_str().unwrap()).await;

    // Errors: {"error": {code, message}} with the statuses each API documents.
    let no_key = c.post(format!("{}{EDIT}", sim.base_url())).json(&body).send().await.unwrap();
    assert_eq!(no_key.status(), 401);
    let v: Value = no_key.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let wrong_scheme = c
        .post(format!("{}{EDIT}", sim.base_url()))
        .header("authorization", format!("Key {KEY}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_scheme.status(), 401);
    let bad =
        post_seedance(&c, &sim, EDIT, &json!({ "prompt": "x", "image_urls": ["ftp://nope/a.png"] })).await;
    assert_eq!(bad.status(), 400);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request");
    assert!(v["error"]["message"].as_str().unwrap().contains("image_urls[0]"));
    let bad =
        post_seedance(&c, &sim, "/v1/images/generate", &json!({ "model": "nope", "prompt": "x" })).await;
    assert_eq!(bad.status(), 400);
    let missing =
        c.get(format!("{}/v1/requests/req_missing", sim.base_url())).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    // A generation that fails is `failed` with an error object.
    let mut body = edit_body(&sim, "SKU-B");
    body["async"] = json!(true);
    body["prompt"] = json!("marble [sim:fail]");
    let v: Value = post_seedance(&c, &sim, EDIT, &body).await.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let failed: Value = c
        .get(format!("{}/v1/requests/{}", sim.base_url(), v["request_id"].as_str().unwrap()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "generation_failed");
    sim.shutdown().await;
}

#[tokio::test]
async fn fal_queue_lifecycle_uses_the_urls_it_hands_out() {
    let sim = sim_with(Faults { latency: Latency::Fixed { ms: 400 }, ..Faults::default() }).await;
    let c = client();
    let response = post_fal(&c, &sim, "", &edit_body(&sim, "SKU-F")).await;
    assert_eq!(response.status(), 200);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["status"], "IN_QUEUE");
    let id = v["request_id"].as_str().unwrap();
    let status_url = v["status_url"].as_str().unwrap();
    let response_url = v["response_url"].as_str().unwrap();
    assert!(status_url.starts_with(&sim.base_url()) && status_url.contains(id));
    assert!(v["cancel_url"].as_str().unwrap().starts_with("http://"));
    // A URL rebuilt from the model id, as some docs suggest, does not exist.
    for rebuilt in [
        format!("{}/fal-ai/bytedance/requests/{id}/status", sim.base_url()),
        format!("{}/fal-ai/bytedance/seedream/v4.5/edit/requests/{id}/status", sim.base_url()),
    ] {
        assert_eq!(fal_get(&c, &rebuilt).await.status(), 404, "{rebuilt}");
    }

    let waiting = fal_get(&c, &format!("{status_url}?logs=1")).await;
    assert_eq!(waiting.status(), 202);
    let w: Value = waiting.json().await.unwrap();
    assert!(matches!(w["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS")), "{w}");
    assert!(w["logs"].is_array());
    assert_eq!(fal_get(&c, response_url).await.status(), 400, "no result while running");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = fal_get(&c, status_url).await;
    assert_eq!(done.status(), 200);
    assert_eq!(done.json::<Value>().await.unwrap()["status"], "COMPLETED");
    let result: Value = fal_get(&c, response_url).await.json().await.unwrap();
    assert!(result.get("seed").is_none(), "the edit model returns no seed");
    assert_eq!(result["images"][0]["content_type"], "image/png");
    png(&c, result["images"][0]["url"].as_str().unwrap()).await;

    // Auth is `Key`, not `Bearer`.
    let bearer = c.get(status_url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(bearer.status(), 401);
    // 422 with a detail array.
    let bad = post_fal(&c, &sim, "", &json!({ "image_urls": [sim.input_url("x")] })).await;
    assert_eq!(bad.status(), 422);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["detail"][0]["loc"], json!(["body", "prompt"]));
    assert!(v["detail"][0]["msg"].is_string() && v["detail"][0]["type"].is_string());
    // Unknown model ids are 404.
    let unknown = c
        .post(format!("{}/fal-ai/flux/dev", sim.base_url()))
        .header("authorization", format!("Key {KEY}"))
        .json(&json!({ "prompt": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // Cancel works while queued, and refunds.
    let v: Value = post_fal(&c, &sim, "", &edit_body(&sim, "SKU-G")).await.json().await.unwrap();
    let before = sim.fal_balance().await;
    let cancel = c
        .put(v["cancel_url"].as_str().unwrap())
        .header("authorization", format!("Key {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    assert!((sim.fal_balance().await - before - 0.04).abs() < 1e-6);
    assert!(sim.ledger().await.last().unwrap().amount < 0.0);
    sim.shutdown().await;
}

/// What a webhook receiver got: headers and raw body of each delivery.
type Deliveries = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

async fn receiver() -> (String, Deliveries) {
    let got: Deliveries = Arc::default();
    let sink = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push((headers, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

async fn wait_for(got: &Deliveries, n: usize) -> Vec<(HeaderMap, Bytes)> {
    for _ in 0..200 {
        if got.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got.lock().unwrap().clone()
}

/// A small fal webhook verifier, written from fal's documented message format, not from the simulator's code.
fn verify_fal_webhook(jwks: &Value, headers: &HeaderMap, body: &[u8], now: u64) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (Some(id), Some(user), Some(ts), Some(sig)) = (
        header("x-fal-webhook-request-id"),
        header("x-fal-webhook-user-id"),
        header("x-fal-webhook-timestamp"),
        header("x-fal-webhook-signature"),
    ) else {
        return false;
    };
    let Ok(ts_n) = ts.parse::<u64>() else { return false };
    if ts_n.abs_diff(now) > 300 {
        return false;
    }
    let message = format!("{id}\n{user}\n{ts}\n{}", hex::encode(Sha256::digest(body)));
    let Ok(sig) = hex::decode(sig) else { return false };
    let Ok(sig) = <[u8; 64]>::try_from(sig.as_slice()) else { return false };
    let signature = Signature::from_bytes(&sig);
    jwks["keys"].as_array().into_iter().flatten().any(|k| {
        k["kty"] == "OKP"
            && k["crv"] == "Ed25519"
            && k["x"]
                .as_str()
                .and_then(|x| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(x).ok())
                .and_then(|x| <[u8; 32]>::try_from(x.as_slice()).ok())
                .and_then(|x| VerifyingKey::from_bytes(&x).ok())
                .is_some_and(|key| key.verify(message.as_bytes(), &signature).is_ok())
    })
}

#[tokio::test]
async fn fal_webhooks_are_signed_with_the_published_key_and_tampering_is_caught() {
    let sim = sim_with(Faults { webhook_duplicate_rate: 1.0, ..Faults::default() }).await;
    let c = client();
    let (hook, got) = receiver().await;
    let query =
        format!("?fal_webhook={}", url::form_urlencoded::byte_serialize(hook.as_bytes()).collect::<String>());
    let v: Value = post_fal(&c, &sim, &query, &edit_body(&sim, "SKU-W")).await.json().await.unwrap();
    let deliveries = wait_for(&got, 2).await;
    assert_eq!(deliveries.len(), 2, "delivered twice, as duplicate_rate = 1 asks");
    let jwks: Value = c.get(sim.jwks_url()).send().await.unwrap().json().await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (headers, body) = &deliveries[0];
    assert!(verify_fal_webhook(&jwks, headers, body, now));
    let payload: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(payload["request_id"], v["request_id"]);
    assert_eq!(payload["status"], "OK");
    assert!(payload["payload"]["images"][0]["url"].is_string());
    // A tampered body, a replay from long ago, or a foreign key all fail.
    let mut tampered = body.to_vec();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    assert!(!verify_fal_webhook(&jwks, headers, &tampered, now));
    assert!(!verify_fal_webhook(&jwks, headers, body, now + 3600));
    let foreign = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let other = json!({ "keys": [{
        "kty": "OKP",
        "crv": "Ed25519",
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(foreign.to_bytes()),
        "kid": "foreign",
        "use": "sig",
        "alg": "EdDSA",
    }] });
    assert!(!verify_fal_webhook(&other, headers, body, now));
    sim.shutdown().await;
}

#[tokio::test]
async fn seedance_webhooks_arrive_unsigned_and_can_be_dropped() {
    let sim = sim_with(Faults::default()).await;
    let c = client();
    let (hook, got) = receiver().await;
    let mut body = edit_body(&sim, "SKU-S");
    body["webhook_url"] = json!(hook);
    let v: Value = post_seedance(&c, &sim, EDIT, &body).await.json().await.unwrap();
    assert_eq!(v["status"], "queued", "a webhook implies async");
    let deliveries = wait_for(&got, 1).await;
    let payload: Value = serde_json::from_slice(&deliveries[0].1).unwrap();
    assert_eq!(payload["request_id"], v["request_id"]);
    assert_eq!(payload["status"], "completed");
    assert!(payload["images"][0]["url"].is_string());
    assert!(deliveries[0].0.get("x-fal-webhook-signature").is_none());
    sim.shutdown().await;

    let sim = sim_with(Faults { webhook_drop_rate: 1.0, ..Faults::default() }).await;
    let (hook, got) = receiver().await;
    let mut body = edit_body(&sim, "SKU-S");
    body["webhook_url"] = json!(hook);
    post_seedance(&c, &sim, EDIT, &body).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(got.lock().unwrap().is_empty());
    assert_eq!(sim.stats().await.webhooks_failed, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn balance_runs_out_with_402_before_any_charge_and_the_ledger_has_every_charge() {
    let sim = Sim::start(SimConfig { credits: 20.0, fal_balance: 0.05, ..SimConfig::default() }).await;
    let c = client();
    let mut bodies = Vec::new();
    for sku in ["A", "B"] {
        let body = edit_body(&sim, sku);
        let response = c
            .post(format!("{}{EDIT}", sim.base_url()))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(serde_json::to_vec(&body).unwrap());
    }
    let refused = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "C")).await;
    assert_eq!(refused.status(), 402);
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_credits");
    assert_eq!(v["error"]["credits_required"], 8.0);
    assert_eq!(v["error"]["credits_available"], 4.0);
    assert_eq!(sim.credits().await, 4.0);
    let ledger = sim.ledger().await;
    assert_eq!(ledger.len(), 2, "the 402 charged nothing");
    for (charge, body) in ledger.iter().zip(&bodies) {
        assert_eq!(charge.body_sha256, hex::encode(Sha256::digest(body)));
        assert_eq!(charge.amount, 8.0);
        assert_eq!(charge.model, "seedream-v4-5");
        assert!(charge.request_id.starts_with("req_"));
    }
    // The admin API gives the same ledger on every read, and tops up the balance.
    let remote: Vec<Charge> =
        c.get(format!("{}/__sim/ledger", sim.base_url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(remote, ledger);
    let b: Value = c
        .post(format!("{}/__sim/balance", sim.base_url()))
        .json(&json!({ "add_credits": 10.0 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(b["credits"], 14.0);
    assert_eq!(post_seedance(&c, &sim, EDIT, &edit_body(&sim, "C")).await.status(), 200);

    // fal: $0.05 buys one image at $0.04.
    assert_eq!(post_fal(&c, &sim, "", &edit_body(&sim, "F1")).await.status(), 200);
    let refused = post_fal(&c, &sim, "", &edit_body(&sim, "F2")).await;
    assert_eq!(refused.status(), 402);
    assert!(refused.json::<Value>().await.unwrap()["detail"].is_string());
    sim.set_fal_balance(1.0).await;
    assert_eq!(post_fal(&c, &sim, "", &edit_body(&sim, "F2")).await.status(), 200);
    assert_eq!(sim.ledger().await.iter().filter(|c| c.protocol == "fal").count(), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn revoked_keys_get_401_until_restored() {
    let sim = sim_with(Faults::default()).await;
    let c = client();
    let set = |revoked: bool| {
        c.post(format!("{}/__sim/keys", sim.base_url())).json(&json!({ "revoked": revoked })).send()
    };
    set(true).await.unwrap();
    assert_eq!(post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.status(), 401);
    assert_eq!(post_fal(&c, &sim, "", &edit_body(&sim, "A")).await.status(), 401);
    set(false).await.unwrap();
    assert_eq!(post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.status(), 200);
    sim.revoke_keys(true).await;
    assert_eq!(post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.status(), 401);
    assert_eq!(sim.ledger().await.len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn scripted_429s_rate_limits_and_bursts_answer_with_the_right_headers() {
    let script = vec![ScriptStep::parse("429x2:1").unwrap(), ScriptStep::parse("503x1").unwrap()];
    let sim = sim_with(Faults { script, ..Faults::default() }).await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await;
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "rate_limited");
        }
    }
    assert_eq!(statuses, [429, 429, 503, 200]);
    assert_eq!(sim.ledger().await.len(), 1, "refused submits are never charged");
    sim.start_burst(503, Duration::from_secs(30)).await;
    let r = post_fal(&c, &sim, "", &edit_body(&sim, "A")).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("x-fal-error-type"));
    sim.shutdown().await;

    let sim = sim_with(Faults {
        rate_limit_per_sec: Some(3),
        retry_after_format: backdrop_sim::RetryAfterFormat::HttpDate,
        ..Faults::default()
    })
    .await;
    let mut limited = 0;
    for _ in 0..6 {
        let r = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await;
        if r.status() == 429 {
            limited += 1;
            let date = r.headers()["retry-after"].to_str().unwrap().to_owned();
            assert!(httpdate::parse_http_date(&date).is_ok(), "{date}");
        }
    }
    assert!(limited >= 3, "{limited}");
    let stats = sim.stats().await;
    assert!(stats.peak_submits_per_second >= 6, "{stats:?}");
    assert_eq!(stats.by_status.get(&429).copied(), Some(limited));
    assert_eq!(stats.by_route.get("POST /v1/seedream/v4.5/edit").copied(), Some(6));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_dropped_connection_is_an_error_to_the_client_after_the_charge() {
    let script = vec![ScriptStep::parse("dropx1").unwrap()];
    let sim = sim_with(Faults { script, ..Faults::default() }).await;
    let c = client();
    let err = c
        .post(format!("{}{EDIT}", sim.base_url()))
        .bearer_auth(KEY)
        .json(&edit_body(&sim, "A"))
        .send()
        .await
        .expect_err("the connection was dropped");
    assert!(!err.is_status() && !err.is_timeout(), "{err:?}");
    assert_eq!(sim.ledger().await.len(), 1, "charged before the drop");
    assert_eq!(sim.stats().await.dropped_connections, 1);
    // The server is fine afterwards.
    assert_eq!(post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.status(), 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn download_faults_truncate_expire_and_mislabel() {
    let c = client();
    let sim = sim_with(Faults { truncate_rate: 1.0, ..Faults::default() }).await;
    let v: Value = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.json().await.unwrap();
    let response = c.get(v["images"][0]["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let promised = response.content_length().unwrap();
    assert!(promised > 100);
    assert!(response.bytes().await.is_err(), "the body stops short of its Content-Length");
    assert_eq!(sim.stats().await.in_flight, 1, "a cut download does not count as downloaded");
    sim.shutdown().await;

    let sim = sim_with(Faults { url_ttl_secs: Some(0.2), ..Faults::default() }).await;
    let v: Value = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.json().await.unwrap();
    let url = v["images"][0]["url"].as_str().unwrap();
    png(&c, url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.get(url).send().await.unwrap().status(), 403);
    sim.shutdown().await;

    let sim = sim_with(Faults { wrong_content_type_rate: 1.0, ..Faults::default() }).await;
    let v: Value = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.json().await.unwrap();
    let response = c.get(v["images"][0]["url"].as_str().unwrap()).send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(!response.bytes().await.unwrap().starts_with(b"\x89PNG"));
    sim.shutdown().await;

    let sim = sim_with(Faults { slow_rate: 1.0, slow_bytes_per_sec: 200_000, ..Faults::default() }).await;
    let v: Value = post_seedance(&c, &sim, EDIT, &edit_body(&sim, "A")).await.json().await.unwrap();
    png(&c, v["images"][0]["url"].as_str().unwrap()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn in_flight_counts_generations_until_their_outputs_are_downloaded() {
    let sim = sim_with(Faults::default()).await;
    let c = client();
    let mut urls = Vec::new();
    for sku in ["A", "B", "C"] {
        let mut body = edit_body(&sim, sku);
        body["async"] = json!(true);
        let v: Value = post_seedance(&c, &sim, EDIT, &body).await.json().await.unwrap();
        let s: Value = c
            .get(format!("{}/v1/requests/{}", sim.base_url(), v["request_id"].as_str().unwrap()))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        urls.push(s["images"][0]["url"].as_str().unwrap().to_owned());
    }
    assert_eq!(sim.stats().await.in_flight, 3);
    for url in &urls {
        png(&c, url).await;
    }
    let stats = sim.stats().await;
    assert_eq!((stats.in_flight, stats.peak_in_flight, stats.accepted), (0, 3, 3));
    let remote: Stats =
        c.get(format!("{}/__sim/stats", sim.base_url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(remote.peak_in_flight, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn data_uri_inputs_are_edited() {
    let sim = sim_with(Faults::default()).await;
    let c = client();
    // The simulator's own "product on white", downloaded and sent back inline.
    let encoded = c
        .get(format!("{}?w=80&h=60", sim.input_url("local-file")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let input = image::load_from_memory_with_format(&encoded, image::ImageFormat::Png).unwrap().to_rgb8();
    assert_eq!(input.dimensions(), (80, 60));
    let uri = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&encoded));
    let body = json!({ "prompt": "on linen", "image_urls": [uri] });
    let v: Value = post_seedance(&c, &sim, EDIT, &body).await.json().await.unwrap();
    let out = png(&c, v["images"][0]["url"].as_str().unwrap()).await;
    assert_eq!(out.dimensions(), (80, 60));
    assert_ne!(out.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(out.get_pixel(40, 30), input.get_pixel(40, 30));
    let bad = json!({ "prompt": "on linen", "image_urls": ["data:image/png;base64,bm90IGFuIGltYWdl"] });
    assert_eq!(post_seedance(&c, &sim, EDIT, &bad).await.status(), 400);
    sim.shutdown().await;
}

async fn fault_sequence(seed: u64) -> (Vec<u16>, Vec<String>) {
    let faults = Faults { error_rate: 0.4, ..Faults::default() };
    let sim = Sim::start(SimConfig { seed, faults, ..SimConfig::default() }).await;
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..24 {
        let r = post_seedance(&c, &sim, EDIT, &edit_body(&sim, &format!("S{i}"))).await;
        statuses.push(r.status().as_u16());
    }
    let ids = sim.ledger().await.into_iter().map(|c| c.request_id).collect();
    sim.shutdown().await;
    (statuses, ids)
}

/// A seedance id without its first 32 bits, which are random per simulator instance.
fn seeded_part(id: &str) -> &str {
    &id["req_".len() + 8..]
}

#[tokio::test]
async fn the_same_seed_gives_the_same_faults_and_ids() {
    let (a, ids_a) = fault_sequence(42).await;
    let (b, ids_b) = fault_sequence(42).await;
    assert_eq!(a, b);
    let seeded = |ids: &[String]| ids.iter().map(|id| seeded_part(id).to_owned()).collect::<Vec<_>>();
    assert_eq!(seeded(&ids_a), seeded(&ids_b), "the seeded part of every id repeats");
    // ... but never a whole id: two simulators must not hand out the same one (issue 16).
    assert!(ids_a.iter().all(|id| !ids_b.contains(id)), "{ids_a:?} vs {ids_b:?}");
    assert!(a.contains(&500) && a.contains(&200), "{a:?}");
    let (c, _) = fault_sequence(43).await;
    assert_ne!(a, c, "another seed, another sequence");
}

#[test]
fn the_binary_serves_and_documents_every_flag() {
    use std::io::BufRead as _;
    let exe = env!("CARGO_BIN_EXE_backdrop");
    let help = std::process::Command::new(exe).args(["sim", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--listen",
        "--scenario",
        "--seed",
        "--credits",
        "--fal-balance",
        "--latency",
        "--rate-limit",
        "--script",
        "--burst",
        "--url-ttl",
        "--webhook-drop-rate",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let mut child = std::process::Command::new(exe)
        .args(["sim", "--listen", "127.0.0.1:0", "--credits", "16"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let base = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let balance: Value = rt.block_on(async {
        client().get(format!("{base}/__sim/balance")).send().await.unwrap().json().await.unwrap()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdout);
    assert_eq!(balance["credits"], 16.0);
}

#[test]
fn the_binary_refuses_a_bad_scenario_with_the_usage_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[faults]\nerror_rate = 2.0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backdrop"))
        .args(["sim", "--listen", "127.0.0.1:0", "--scenario"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error_rate"));
}

#[tokio::test]
async fn fal_text_to_image_returns_images_and_a_seed() {
    let sim = Sim::start(SimConfig { max_side: 64, ..SimConfig::default() }).await;
    let c = client();
    let submit: Value = c
        .post(format!("{}/fal-ai/bytedance/seedream/v4.5/text-to-image", sim.base_url()))
        .header("authorization", format!("Key {KEY}"))
        .json(&json!({ "prompt": "a vase on walnut", "image_size": "landscape_16_9", "seed": 5 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let result: Value = fal_get(&c, submit["response_url"].as_str().unwrap()).await.json().await.unwrap();
    assert_eq!(result["seed"], 5);
    assert_eq!(
        (result["images"][0]["width"].as_u64(), result["images"][0]["height"].as_u64()),
        (Some(64), Some(36))
    );
    assert_eq!(png(&c, result["images"][0]["url"].as_str().unwrap()).await.dimensions(), (64, 36));
    sim.shutdown().await;
}

#[tokio::test]
async fn poll_errors_are_5xx_in_each_protocols_shape_and_late_webhooks_wait() {
    let faults = Faults { poll_error_rate: 1.0, webhook_delay_ms: 300, ..Faults::default() };
    let sim = sim_with(faults).await;
    let c = client();
    let mut body = edit_body(&sim, "P");
    body["async"] = json!(true);
    let v: Value = post_seedance(&c, &sim, EDIT, &body).await.json().await.unwrap();
    let poll = c
        .get(format!("{}/v1/requests/{}", sim.base_url(), v["request_id"].as_str().unwrap()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status(), 500);
    assert_eq!(poll.json::<Value>().await.unwrap()["error"]["code"], "server_error");

    let (hook, got) = receiver().await;
    let query =
        format!("?fal_webhook={}", url::form_urlencoded::byte_serialize(hook.as_bytes()).collect::<String>());
    let v: Value = post_fal(&c, &sim, &query, &edit_body(&sim, "P")).await.json().await.unwrap();
    let poll = fal_get(&c, v["status_url"].as_str().unwrap()).await;
    assert_eq!(poll.status(), 503);
    assert_eq!(poll.headers()["x-fal-error-type"], "runner_unavailable");
    assert_eq!(poll.json::<Value>().await.unwrap()["error_type"], "runner_unavailable");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(got.lock().unwrap().is_empty(), "the webhook is late on purpose");
    assert_eq!(wait_for(&got, 1).await.len(), 1);
    sim.shutdown().await;
}
