//! Load loop for the simulator: many workers run submit → poll → download cycles against an
//! in-process simulator with zero latency and report cycles per second, to show the simulator
//! is never a benchmark's bottleneck.
//!
//! Run: `cargo run --release --example sim_load -- [seconds] [workers] [seedance|fal]`
//! (defaults: 5 seconds, 64 workers, seedance). With `SIM_URL=http://127.0.0.1:8787` it drives
//! a separate `backdrop sim` process instead, so the server's own CPU time can be measured.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backdrop_sim::{SimConfig, start};
use serde::Deserialize;
use serde_json::{Value, json};

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// What the report needs from `GET /__sim/stats`.
#[derive(Debug, Deserialize)]
struct Stats {
    by_status: std::collections::BTreeMap<u16, u64>,
    peak_in_flight: u64,
}

async fn seedance_cycle(client: &reqwest::Client, base: &str, n: u64) -> Result<(), Failure> {
    let body = json!({
        "prompt": "on polished marble",
        "image_urls": [format!("{base}/__sim/input/item-{}.png", n % 8)],
        "async": true,
    });
    let submit: Value = client
        .post(format!("{base}/v1/seedream/v4.5/edit"))
        .bearer_auth("sk-sentinel-load")
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = submit["request_id"].as_str().ok_or("no request_id")?;
    let status: Value = client
        .get(format!("{base}/v1/requests/{id}"))
        .bearer_auth("sk-sentinel-load")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let url = status["images"][0]["url"].as_str().ok_or("not completed")?;
    let bytes = client.get(url).send().await?.error_for_status()?.bytes().await?;
    if !bytes.starts_with(b"\x89PNG") {
        return Err("not a PNG".into());
    }
    Ok(())
}

async fn fal_cycle(client: &reqwest::Client, base: &str, n: u64) -> Result<(), Failure> {
    let auth = "Key sk-sentinel-load";
    let body = json!({
        "prompt": "on polished marble",
        "image_urls": [format!("{base}/__sim/input/item-{}.png", n % 8)],
    });
    let submit: Value = client
        .post(format!("{base}/fal-ai/bytedance/seedream/v4.5/edit"))
        .header("authorization", auth)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let status_url = submit["status_url"].as_str().ok_or("no status_url")?;
    let response_url = submit["response_url"].as_str().ok_or("no response_url")?;
    let status = client.get(status_url).header("authorization", auth).send().await?;
    if status.status() != reqwest::StatusCode::OK {
        return Err("not completed".into());
    }
    let result: Value = client
        .get(response_url)
        .header("authorization", auth)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let url = result["images"][0]["url"].as_str().ok_or("no image")?;
    let bytes = client.get(url).send().await?.error_for_status()?.bytes().await?;
    if !bytes.starts_with(b"\x89PNG") {
        return Err("not a PNG".into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args.first().map_or(Ok(5), |s| s.parse())?;
    let workers: u64 = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let fal = args.get(2).is_some_and(|p| p == "fal");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let external = std::env::var("SIM_URL").ok();
    let sim = match external {
        Some(_) => None,
        None => Some(start(SimConfig::default()).await?),
    };
    let base = match (&sim, external) {
        (Some(sim), _) => sim.base_url(),
        (None, Some(url)) => url.trim_end_matches('/').to_owned(),
        (None, None) => return Err("no simulator".into()),
    };
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Warm the image cache and the connection pool before the clock starts.
    for n in 0..8 {
        seedance_cycle(&client, &base, n).await?;
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, base, done, errors, stop) =
            (client.clone(), base.clone(), Arc::clone(&done), Arc::clone(&errors), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                let outcome = if fal {
                    fal_cycle(&client, &base, n).await
                } else {
                    seedance_cycle(&client, &base, n).await
                };
                match outcome {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                n += workers;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cycles = done.load(Ordering::Relaxed);
    let stats: Stats =
        client.get(format!("{base}/__sim/stats")).send().await?.error_for_status()?.json().await?;
    println!(
        "{} cycles in {elapsed:.1}s = {:.0} cycles/s ({} workers, {} errors, {} requests, peak in flight {})",
        if fal { "fal submit+status+response+download" } else { "seedance submit+poll+download" },
        cycles as f64 / elapsed,
        workers,
        errors.load(Ordering::Relaxed),
        stats.by_status.values().sum::<u64>(),
        stats.peak_in_flight,
    );
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    Ok(())
}
