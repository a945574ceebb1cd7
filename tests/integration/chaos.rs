//! The chaos suite: seeded scenarios that mix latency, 429 storms with Retry-After, 5xx bursts,
//! dropped connections, truncated downloads and webhook mishaps, while the real binary is
//! killed with SIGKILL or SIGTERM at random moments and restarted until it finishes. After each
//! scenario: every row done, except those a named fault explains: no fault here makes a row fail
//! (5xx, 429 and truncated downloads are all retried), and a row may end ambiguous only because a
//! SIGKILL caught its submit in the air (at most `--concurrency` rows per kill) or the simulator
//! dropped the connection of a charged submit (at most one row per drop); nothing charged twice;
//! every file matches its sha256; no temp files; the database is intact; the sentinel key is
//! nowhere. `BACKDROP_SOAK=1` runs hundreds of kills and prints the totals.

use std::time::Duration;

use backdrop_sim::{Burst, Faults, Latency, ScriptStep, SimConfig};
use rand::{Rng, SeedableRng};

use crate::harness::{SENTINEL_KEY, TestEnv};

/// Jobs in flight per run: also the most rows one SIGKILL can leave ambiguous.
const CONCURRENCY: &str = "8";

#[derive(Debug, Default)]
struct Totals {
    kills: u32,
    terms: u32,
    runs: u32,
    done: i64,
    failed: i64,
    ambiguous: i64,
    charges: usize,
}

fn scenario(seed: u64) -> SimConfig {
    let faults = Faults {
        latency: Latency::Lognormal { median_ms: 80, p99_ms: 600 },
        rate_limit_per_sec: Some(40),
        error_rate: 0.08,
        poll_error_rate: 0.05,
        drop_rate: 0.02,
        truncate_rate: 0.1,
        script: vec![ScriptStep { count: 4, status: 429, retry_after_secs: Some(1), drop: false }],
        bursts: vec![Burst { after_secs: 1.0, duration_secs: 0.5, status: 503, no_retry_after: false }],
        webhook_delay_ms: 150,
        webhook_duplicate_rate: 0.3,
        webhook_drop_rate: 0.2,
        ..Faults::default()
    };
    SimConfig { seed, faults, ..SimConfig::default() }
}

async fn run_scenario(seed: u64, provider: &str, rows: usize, interruptions: u32, totals: &mut Totals) {
    let env = TestEnv::new(scenario(seed)).await;
    let catalog = env.catalog(rows);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let hook_url = format!("http://{listen}/hook");
    let jwks = env.sim.jwks_url();
    let mut args =
        vec!["--provider", provider, "--concurrency", CONCURRENCY, "--max-attempts", "12", "--rate", "50/s"];
    if provider == "fal" {
        // fal scenarios take signed webhooks: late, duplicated or lost, on top of polling.
        args.extend(["--webhook-listen", &listen, "--webhook-url", &hook_url, "--jwks-url", &jwks]);
    }
    let mut logs = Vec::new();
    let mut interrupted = 0;
    let mut kills: i64 = 0;
    let mut settled = false;
    for _ in 0..(interruptions + 30) {
        let mut cmd = env.run_cmd(&catalog, &args);
        cmd.arg("-v").stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        totals.runs += 1;
        if interrupted < interruptions {
            let at = Duration::from_millis(rng.random_range(50..1200));
            let term = rng.random_bool(0.3);
            tokio::select! {
                _ = child.wait() => {}
                () = tokio::time::sleep(at) => {
                    if term {
                        let pid = child.id().expect("pid");
                        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
                        totals.terms += 1;
                    } else {
                        let _ = child.start_kill();
                        totals.kills += 1;
                        kills += 1;
                    }
                    interrupted += 1;
                }
            }
            let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
                .await
                .expect("exits after a signal")
                .expect("wait");
            logs.push(out.stderr);
            // A run that finished on its own before its signal may have settled everything:
            // then there is nothing left to interrupt.
            if out.status.code().is_some_and(|c| c == 0 || c == 3) && open_rows(&env).await == 0 {
                settled = true;
                break;
            }
            continue;
        }
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("finishes")
            .expect("wait");
        logs.push(out.stderr);
        if open_rows(&env).await == 0 {
            assert!(matches!(out.status.code(), Some(0 | 3)), "seed {seed}: exit {:?}", out.status);
            settled = true;
            break;
        }
    }
    assert!(
        settled,
        "seed {seed}: never settled: {:?}; last log:\n{}",
        env.states().await,
        logs.last().map(|l| String::from_utf8_lossy(l).into_owned()).unwrap_or_default()
    );
    let states = env.states().await;
    let (done, failed, ambiguous) = (
        states.get("done").copied().unwrap_or(0),
        states.get("failed").copied().unwrap_or(0),
        states.get("ambiguous").copied().unwrap_or(0),
    );
    assert_eq!(done + failed + ambiguous, rows as i64, "seed {seed}: {states:?}");
    let store = env.store().await;
    // Rows end done unless a named fault explains them. No fault of this scenario fails a row.
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT sku, COALESCE(error, '') FROM jobs WHERE state = 'failed'")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert!(reasons.is_empty(), "seed {seed}: no fault here fails a row, yet: {reasons:?}");
    // An ambiguous row is explained by a kill (its submit was in the air: recovery marked its
    // attempt `interrupted`), at most `--concurrency` per SIGKILL, or by a submit the simulator
    // charged and then dropped, at most one per drop.
    let (by_kill, by_fault): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(a.error = 'interrupted'), 0), COALESCE(SUM(a.error IS NOT 'interrupted'), 0)
         FROM jobs j JOIN attempts a ON a.id = (SELECT MAX(id) FROM attempts WHERE job_id = j.id)
         WHERE j.state = 'ambiguous'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(by_kill + by_fault, ambiguous, "seed {seed}: every ambiguous row has its attempt");
    let per_kill: i64 = CONCURRENCY.parse().unwrap();
    assert!(by_kill <= kills * per_kill, "seed {seed}: {by_kill} ambiguous after {kills} SIGKILLs");
    let drops = i64::try_from(env.sim.stats().await.dropped_connections).unwrap();
    assert!(by_fault <= drops, "seed {seed}: {by_fault} ambiguous without a kill, {drops} dropped submits");
    let (reasonless,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM jobs WHERE state IN ('failed', 'ambiguous') AND (error IS NULL OR error = '')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(reasonless, 0, "seed {seed}: every failed or ambiguous row keeps its reason");
    let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check").fetch_one(store.pool()).await.unwrap();
    assert_eq!(check, "ok");
    store.close().await;
    assert_eq!(env.verify_outputs().await, usize::try_from(done).unwrap());
    assert!(env.temp_files().is_empty(), "seed {seed}: temp files {:?}", env.temp_files());
    let doubles = env.double_charges().await;
    assert!(doubles.is_empty(), "seed {seed}: charged twice {doubles:?}");
    for log in &logs {
        assert!(!String::from_utf8_lossy(log).contains(SENTINEL_KEY), "seed {seed}: key in a log");
    }
    let db = std::fs::read(env.state()).unwrap();
    assert!(!db.windows(SENTINEL_KEY.len()).any(|w| w == SENTINEL_KEY.as_bytes()), "key in the database");
    totals.done += done;
    totals.failed += failed;
    totals.ambiguous += ambiguous;
    totals.charges += env.sim.ledger().await.len();
}

/// Rows that still have work to do.
async fn open_rows(env: &TestEnv) -> i64 {
    let states = env.states().await;
    ["pending", "waiting", "submitting", "submitted", "fetching"].iter().filter_map(|s| states.get(*s)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_mixed_faults_with_kills_and_terms() {
    let soak = std::env::var("BACKDROP_SOAK").is_ok_and(|v| v == "1");
    let (scenarios, interruptions, rows) = if soak { (20, 15, 200) } else { (4, 5, 24) };
    let mut totals = Totals::default();
    for seed in 0..scenarios {
        let provider = if seed % 2 == 0 { "seedance" } else { "fal" };
        run_scenario(1000 + seed, provider, rows, interruptions, &mut totals).await;
    }
    eprintln!("chaos totals: {totals:?}");
    // Most scenarios take every interruption; a scenario that finishes early takes fewer.
    assert!(totals.kills + totals.terms >= scenarios as u32 * interruptions / 2, "{totals:?}");
}
