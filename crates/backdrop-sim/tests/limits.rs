//! The server limits a client has to discover, over real HTTP on 127.0.0.1: the rate limit with
//! and without `Retry-After`, the cap on generations in flight (429 "too many in flight" in each
//! protocol's error shape), limits that change during the run, fal's account queue (queue
//! positions, first in first out, cancelling a queued request) and fal's status stream.

use std::time::Duration;

use backdrop_sim::{Faults, Latency, LatencyTail, LimitChange, SimConfig, SimHandle};
use serde_json::{Value, json};

const KEY: &str = "sk-sim-limits-tests";
const EDIT: &str = "/v1/seedream/v4.5/edit";
const FAL_EDIT: &str = "/fal-ai/bytedance/seedream/v4.5/edit";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

async fn sim_with(faults: Faults) -> SimHandle {
    backdrop_sim::start(SimConfig { faults, ..SimConfig::default() }).await.unwrap()
}

fn body(sim: &SimHandle, sku: &str) -> Value {
    json!({ "prompt": "Replace the background with polished marble", "image_urls": [sim.input_url(sku)] })
}

/// An asynchronous seedance edit.
async fn seedance(c: &reqwest::Client, sim: &SimHandle, sku: &str) -> reqwest::Response {
    let mut b = body(sim, sku);
    b["async"] = json!(true);
    c.post(format!("{}{EDIT}", sim.base_url())).bearer_auth(KEY).json(&b).send().await.unwrap()
}

async fn fal(c: &reqwest::Client, sim: &SimHandle, sku: &str) -> reqwest::Response {
    c.post(format!("{}{FAL_EDIT}", sim.base_url()))
        .header("authorization", format!("Key {KEY}"))
        .json(&body(sim, sku))
        .send()
        .await
        .unwrap()
}

async fn fal_get(c: &reqwest::Client, url: &str) -> Value {
    let r = c.get(url).header("authorization", format!("Key {KEY}")).send().await.unwrap();
    r.json().await.unwrap()
}

/// The simulator's ledger and stats, read over HTTP like any client would.
async fn ledger(sim: &SimHandle) -> Vec<Value> {
    client().get(format!("{}/__sim/ledger", sim.base_url())).send().await.unwrap().json().await.unwrap()
}

async fn stats(sim: &SimHandle) -> backdrop_sim::SimStats {
    client().get(format!("{}/__sim/stats", sim.base_url())).send().await.unwrap().json().await.unwrap()
}

async fn fal_balance(sim: &SimHandle) -> f64 {
    let b: Value =
        client().get(format!("{}/__sim/balance", sim.base_url())).send().await.unwrap().json().await.unwrap();
    b["fal_balance"].as_f64().unwrap()
}

async fn limits(c: &reqwest::Client, sim: &SimHandle) -> Value {
    c.get(format!("{}/__sim/limits", sim.base_url())).send().await.unwrap().json().await.unwrap()
}

/// Downloads every output of seedance request `id` (which ends its time in flight).
async fn finish_seedance(c: &reqwest::Client, sim: &SimHandle, id: &str) {
    let status: Value = c
        .get(format!("{}/v1/requests/{id}", sim.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "completed", "{status}");
    for image in status["images"].as_array().unwrap() {
        let r = c.get(image["url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
}

/// Polls `status_url` until COMPLETED (generous timeout: the machine may be busy).
async fn until_completed(c: &reqwest::Client, status_url: &str) -> Value {
    for _ in 0..2000 {
        let s = fal_get(c, status_url).await;
        if s["status"] == "COMPLETED" {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{status_url} never completed");
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after_or_without_it() {
    let c = client();
    for omit in [false, true] {
        let sim = sim_with(Faults {
            rate_limit_per_sec: Some(2),
            rate_limit_omits_retry_after: omit,
            ..Faults::default()
        })
        .await;
        let mut limited = Vec::new();
        for i in 0..5 {
            let r = seedance(&c, &sim, &format!("R{i}")).await;
            if r.status() == 429 {
                limited.push(r);
            }
        }
        assert!(limited.len() >= 3, "2/s lets at most 2 of 5 quick submits through");
        for r in limited {
            assert_eq!(r.headers().contains_key("retry-after"), !omit);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "rate_limited", "{v}");
        }
        let l = limits(&c, &sim).await;
        assert!(l["rate_limited"].as_u64().unwrap() >= 3, "{l}");
        assert_eq!(l["too_many_in_flight"], 0);
        assert_eq!(ledger(&sim).await.len(), 2, "only accepted submits are charged");
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn a_cap_on_generations_in_flight_says_so_without_retry_after_in_each_protocols_shape() {
    let sim = sim_with(Faults { max_in_flight: Some(2), ..Faults::default() }).await;
    let c = client();
    let first: Value = seedance(&c, &sim, "A").await.json().await.unwrap();
    assert_eq!(fal(&c, &sim, "B").await.status(), 200);

    let refused = seedance(&c, &sim, "C").await;
    assert_eq!(refused.status(), 429);
    assert!(!refused.headers().contains_key("retry-after"), "the server cannot know when one ends");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "concurrency_limit_exceeded", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("in flight"));

    let refused = fal(&c, &sim, "C").await;
    assert_eq!(refused.status(), 429);
    assert!(!refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-fal-error-type"], "concurrency_limit_exceeded");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error_type"], "concurrency_limit_exceeded", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("in flight"));

    // Downloading the first request's outputs ends its time in flight: there is room again.
    finish_seedance(&c, &sim, first["request_id"].as_str().unwrap()).await;
    assert_eq!(seedance(&c, &sim, "C").await.status(), 200);
    assert_eq!(seedance(&c, &sim, "D").await.status(), 429);

    let stats = stats(&sim).await;
    assert_eq!(stats.peak_in_flight, 2, "the cap held");
    assert_eq!(ledger(&sim).await.len(), 3, "refused submits are never charged");
    let l = limits(&c, &sim).await;
    assert_eq!(l["too_many_in_flight"], 3, "{l}");
    assert_eq!(l["current"]["max_in_flight"], 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn many_clients_at_once_never_push_the_in_flight_count_past_the_cap() {
    let sim = sim_with(Faults { max_in_flight: Some(3), ..Faults::default() }).await;
    let c = client();
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (c, url, b) = (c.clone(), format!("{}{EDIT}", sim.base_url()), {
            let mut b = body(&sim, &format!("P{i}"));
            b["async"] = json!(true);
            b
        });
        submits.spawn(async move { c.post(url).bearer_auth(KEY).json(&b).send().await.unwrap().status() });
    }
    let mut ok = 0;
    while let Some(status) = submits.join_next().await {
        ok += u32::from(status.unwrap() == 200);
    }
    assert_eq!(ok, 3);
    assert_eq!(stats(&sim).await.peak_in_flight, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn limits_change_after_a_number_of_submits_and_after_a_time() {
    let faults = Faults {
        limit_changes: vec![
            LimitChange::parse("submits=2,in-flight=2").unwrap(),
            LimitChange::parse("submits=4,in-flight=0").unwrap(),
            LimitChange::parse("at=400ms,rate=1").unwrap(),
        ],
        ..Faults::default()
    };
    let sim = sim_with(faults).await;
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(seedance(&c, &sim, &format!("L{i}")).await.status().as_u16());
    }
    // Two submits before any cap, then a cap of 2 with 2 in flight, then no cap again.
    assert_eq!(statuses, [200, 200, 429, 429, 200, 200]);
    let l = limits(&c, &sim).await;
    assert_eq!(l["current"]["max_in_flight"], Value::Null, "{l}");

    tokio::time::sleep(Duration::from_millis(450)).await;
    let l = limits(&c, &sim).await;
    assert_eq!(l["current"]["rate_limit_per_sec"], 1, "{l}");
    let after: Vec<u16> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(seedance(&c, &sim, &format!("M{i}")).await.status().as_u16());
        }
        v
    };
    assert_eq!(after[0], 200);
    assert!(after[1..].iter().all(|s| *s == 429), "1/s from 400 ms on: {after:?}");
    sim.shutdown().await;
}

/// Submits to fal and returns the submit answer.
async fn fal_submit(c: &reqwest::Client, sim: &SimHandle, sku: &str) -> Value {
    let r = fal(c, sim, sku).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn fal_queues_submits_beyond_the_account_concurrency_first_in_first_out() {
    let faults =
        Faults { latency: Latency::Fixed { ms: 600 }, fal_concurrency: Some(2), ..Faults::default() };
    let sim = sim_with(faults).await;
    let c = client();
    let mut subs = Vec::new();
    for i in 0..5 {
        subs.push(fal_submit(&c, &sim, &format!("Q{i}")).await);
    }
    // Never refused; the first two run, the others wait in order.
    let positions: Vec<_> = subs.iter().map(|s| s["queue_position"].as_u64().unwrap()).collect();
    assert_eq!(positions, [0, 0, 0, 1, 2]);
    let statuses: Vec<Value> = {
        let mut v = Vec::new();
        for s in &subs {
            v.push(fal_get(&c, s["status_url"].as_str().unwrap()).await);
        }
        v
    };
    // Generous: the machine may be slow, but nothing completes before 600 ms of its run.
    if statuses.iter().all(|s| s["status"] != "COMPLETED") {
        assert_eq!(statuses[0]["status"], "IN_PROGRESS");
        assert_eq!(statuses[4]["status"], "IN_QUEUE", "{statuses:?}");
        let waiting: Vec<_> = statuses.iter().filter_map(|s| s["queue_position"].as_u64()).collect();
        assert!(waiting.windows(2).all(|w| w[0] < w[1]), "positions keep the order: {statuses:?}");
    }
    let l = limits(&c, &sim).await;
    assert_eq!(l["peak_fal_queued"], 3, "{l}");
    assert!(l["fal_running"].as_u64().unwrap() <= 2, "{l}");

    // Each request runs its whole latency once it has a slot, and they finish in order.
    let mut done = Vec::new();
    for s in &subs {
        let status = until_completed(&c, s["status_url"].as_str().unwrap()).await;
        let ran = status["metrics"]["inference_time"].as_f64().unwrap();
        assert!((0.59..0.61).contains(&ran), "{status}");
        let result = fal_get(&c, s["response_url"].as_str().unwrap()).await;
        assert!(result["images"][0]["url"].is_string(), "{result}");
        done.push(status);
    }
    let l = limits(&c, &sim).await;
    assert_eq!(l["fal_queued"], 0, "{l}");
    assert!((l["fal_slot_secs"].as_f64().unwrap() - 3.0).abs() < 1e-6, "{l}");
    assert_eq!(stats(&sim).await.by_status.get(&429), None, "fal never refuses for concurrency");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_queued_fal_request_can_be_cancelled_and_the_queue_moves_up() {
    let faults =
        Faults { latency: Latency::Fixed { ms: 3_000 }, fal_concurrency: Some(1), ..Faults::default() };
    let sim = sim_with(faults).await;
    let c = client();
    let running = fal_submit(&c, &sim, "A").await;
    let second = fal_submit(&c, &sim, "B").await;
    let third = fal_submit(&c, &sim, "C").await;
    assert_eq!(fal_get(&c, third["status_url"].as_str().unwrap()).await["queue_position"], 1);
    let balance = fal_balance(&sim).await;

    let put = |url: &str| c.put(url).header("authorization", format!("Key {KEY}")).send();
    let cancelled = put(second["cancel_url"].as_str().unwrap()).await.unwrap();
    assert_eq!(cancelled.status(), 202);
    assert_eq!(cancelled.json::<Value>().await.unwrap()["status"], "CANCELLATION_REQUESTED");
    assert!((fal_balance(&sim).await - balance - 0.04).abs() < 1e-6, "refunded");
    assert_eq!(fal_get(&c, third["status_url"].as_str().unwrap()).await["queue_position"], 0, "moved up");
    let again = put(second["cancel_url"].as_str().unwrap()).await.unwrap();
    assert_eq!(again.status(), 400);

    // A running request cannot be cancelled.
    let refused = put(running["cancel_url"].as_str().unwrap()).await.unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(refused.json::<Value>().await.unwrap()["status"], "IN_PROGRESS");
    let result = c
        .get(second["response_url"].as_str().unwrap())
        .header("authorization", format!("Key {KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 400, "a cancelled request has no result");
    let l = limits(&c, &sim).await;
    assert_eq!(l["fal_queued"], 1, "{l}");
    sim.shutdown().await;
}

/// The `data:` events of a server-sent event stream, read to its end.
async fn events(c: &reqwest::Client, url: &str) -> (reqwest::header::HeaderMap, Vec<Value>) {
    let r = c.get(url).header("authorization", format!("Key {KEY}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let text =
        tokio::time::timeout(Duration::from_secs(60), r.text()).await.expect("the stream ends").unwrap();
    let events = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    (headers, events)
}

#[tokio::test]
async fn fals_status_stream_sends_each_change_until_completed_then_ends() {
    let faults =
        Faults { latency: Latency::Fixed { ms: 800 }, fal_concurrency: Some(1), ..Faults::default() };
    let sim = sim_with(faults).await;
    let c = client();
    fal_submit(&c, &sim, "A").await;
    let queued = fal_submit(&c, &sim, "B").await;
    let url = format!("{}/stream", queued["status_url"].as_str().unwrap());
    let (headers, events) = events(&c, &url).await;
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let statuses: Vec<&str> = events.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.last(), Some(&"COMPLETED"), "{events:?}");
    assert_eq!(statuses.iter().filter(|s| **s == "COMPLETED").count(), 1);
    // The statuses only move forward, and every event differs from the one before.
    let rank = |s: &str| ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].iter().position(|r| *r == s).unwrap();
    assert!(statuses.windows(2).all(|w| rank(w[0]) <= rank(w[1])), "{statuses:?}");
    assert!(events.windows(2).all(|w| w[0] != w[1]), "{events:?}");
    assert!(events.iter().all(|e| e["request_id"] == queued["request_id"]));
    // Read at once, it saw the request wait, then run.
    if statuses[0] == "IN_QUEUE" {
        assert!(statuses.contains(&"IN_PROGRESS"), "{statuses:?}");
    }
    let route = stats(&sim).await.by_route.get("GET {status_url}/stream").copied();
    assert_eq!(route, Some(1));

    // Unknown requests and the wrong auth scheme are refused like the status URL.
    let unknown = url.replace(queued["request_id"].as_str().unwrap(), "00000000-0000-4000-8000-000000000000");
    let r = c.get(&unknown).header("authorization", format!("Key {KEY}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(c.get(&url).bearer_auth(KEY).send().await.unwrap().status(), 401);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_webhook_for_a_queued_fal_request_leaves_once_it_has_run() {
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = {
        let got = Arc::clone(&got);
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::Json<Value>| {
                let got = Arc::clone(&got);
                async move {
                    got.lock().unwrap().push(body.0);
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let faults =
        Faults { latency: Latency::Fixed { ms: 200 }, fal_concurrency: Some(1), ..Faults::default() };
    let sim = sim_with(faults).await;
    let c = client();
    let mut ids = Vec::new();
    for sku in ["W1", "W2"] {
        let r = c
            .post(format!("{}{FAL_EDIT}", sim.base_url()))
            .query(&[("fal_webhook", hook.as_str())])
            .header("authorization", format!("Key {KEY}"))
            .json(&body(&sim, sku))
            .send()
            .await
            .unwrap();
        ids.push(r.json::<Value>().await.unwrap()["request_id"].clone());
    }
    for _ in 0..1000 {
        if got.lock().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got.iter().map(|w| w["request_id"].clone()).collect::<Vec<_>>(), ids, "in queue order");
    assert!(got.iter().all(|w| w["status"] == "OK"), "{got:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn latencies_and_stragglers_follow_the_seed() {
    async fn runs(seed: u64) -> Vec<f64> {
        let faults = Faults {
            latency: Latency::Normal { mean_ms: 30, sd_ms: 10 },
            latency_tail: Some(LatencyTail { rate: 0.3, factor: 3.0 }),
            ..Faults::default()
        };
        let sim = backdrop_sim::start(SimConfig { seed, faults, ..SimConfig::default() }).await.unwrap();
        let c = client();
        let mut times = Vec::new();
        for i in 0..6 {
            let s = fal_submit(&c, &sim, &format!("S{i}")).await;
            let done = until_completed(&c, s["status_url"].as_str().unwrap()).await;
            times.push(done["metrics"]["inference_time"].as_f64().unwrap());
        }
        sim.shutdown().await;
        times
    }
    let (a, b) = (runs(11).await, runs(11).await);
    assert_eq!(a, b, "the same seed draws the same latencies");
    assert_ne!(a, runs(12).await);
}
