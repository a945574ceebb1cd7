//! Crash safety: the real binary is killed with SIGKILL at seeded random moments and restarted
//! until it finishes; the simulator's ledger must show that no row was ever charged twice.

use std::time::Duration;

use backdrop_sim::{Faults, Latency, SimConfig};
use rand::{Rng, SeedableRng};

use crate::harness::{TestEnv, code, output, stderr};

/// Kills `backdrop run` `kills` times at random moments, then lets it finish. Answers the
/// number of rows left ambiguous (killed between intent and saved request id).
async fn kill_and_restart(env: &TestEnv, provider: &str, rows: usize, kills: u32, seed: u64) -> i64 {
    let catalog = env.catalog(rows);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let args = ["--provider", provider, "--concurrency", &CONCURRENCY.to_string(), "--max-attempts", "20"];
    let mut killed = 0;
    let mut finished = false;
    for _ in 0..(kills + 20) {
        let mut child = env.run_cmd(&catalog, &args).spawn().expect("spawn backdrop");
        if killed < kills {
            let at = Duration::from_millis(rng.random_range(100..700));
            tokio::select! {
                status = child.wait() => {
                    // It finished before the kill; fine, keep going.
                    let status = status.unwrap();
                    assert!(matches!(status.code(), Some(0 | 3)), "unexpected exit {status:?}");
                }
                () = tokio::time::sleep(at) => {
                    child.start_kill().expect("SIGKILL");
                    let status = child.wait().await.unwrap();
                    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
                    killed += 1;
                }
            }
            continue;
        }
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("finishes")
            .unwrap();
        let states = env.states().await;
        let unsettled: i64 = ["pending", "waiting", "submitting", "submitted", "fetching"]
            .iter()
            .filter_map(|s| states.get(*s))
            .sum();
        if unsettled == 0 {
            assert!(matches!(out.status.code(), Some(0 | 3)), "{}", String::from_utf8_lossy(&out.stderr));
            finished = true;
            break;
        }
    }
    assert!(finished, "the run never settled after {killed} kills");
    assert_eq!(killed, kills);
    let states = env.states().await;
    let done = states.get("done").copied().unwrap_or(0);
    let ambiguous = states.get("ambiguous").copied().unwrap_or(0);
    assert_eq!(done + ambiguous, rows as i64, "every row done or ambiguous: {states:?}");
    // The only fault is the kills, and a kill strands at most the submits in the air: each
    // ambiguous row's last attempt was interrupted, and there are at most `--concurrency` per kill.
    let store = env.store().await;
    let (interrupted,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM jobs j JOIN attempts a ON a.id = (SELECT MAX(id) FROM attempts WHERE job_id = j.id)
         WHERE j.state = 'ambiguous' AND a.error = 'interrupted'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    store.close().await;
    assert_eq!(interrupted, ambiguous, "every ambiguous row was caught mid-submit by a kill");
    assert!(
        ambiguous <= i64::from(kills) * i64::from(CONCURRENCY),
        "{ambiguous} ambiguous rows after {kills} kills at concurrency {CONCURRENCY}"
    );
    assert_eq!(env.verify_outputs().await, usize::try_from(done).unwrap());
    assert!(env.temp_files().is_empty(), "partial downloads left: {:?}", env.temp_files());
    let doubles = env.double_charges().await;
    assert!(doubles.is_empty(), "charged twice: {doubles:?}");
    let store = env.store().await;
    let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check").fetch_one(store.pool()).await.unwrap();
    assert_eq!(check, "ok");
    store.close().await;
    ambiguous
}

/// Jobs in flight per run: also the most rows one SIGKILL can leave ambiguous.
const CONCURRENCY: u32 = 4;

fn crashy() -> SimConfig {
    let faults = Faults { latency: Latency::Uniform { min_ms: 50, max_ms: 400 }, ..Faults::default() };
    SimConfig { seed: 11, faults, ..SimConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seedance_sigkill_twelve_times_never_pays_twice() {
    let env = TestEnv::new(crashy()).await;
    let ambiguous = kill_and_restart(&env, "seedance", 120, 12, 1).await;
    eprintln!("seedance crash test: {ambiguous} ambiguous rows, {} charges", env.sim.ledger().await.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_sigkill_twelve_times_never_pays_twice() {
    let env = TestEnv::new(crashy()).await;
    let ambiguous = kill_and_restart(&env, "fal", 120, 12, 2).await;
    eprintln!("fal crash test: {ambiguous} ambiguous rows, {} charges", env.sim.ledger().await.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_130_and_the_next_run_resumes() {
    let faults = Faults { latency: Latency::Fixed { ms: 300 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(20);
    let child = env.run_cmd(&catalog, &["--concurrency", "4"]).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    send_signal(pid, "TERM");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let states = env.states().await;
    assert_eq!(states.get("ambiguous"), None, "a graceful stop never leaves ambiguous rows: {states:?}");

    let again = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(env.states().await.get("done"), Some(&20));
    assert!(env.double_charges().await.is_empty());
    assert_eq!(env.sim.ledger().await.len(), 20);
}

/// The crate forbids unsafe code, so tests send signals other than SIGKILL with `kill(1)`.
fn send_signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_interrupt_exits_at_once_and_recovery_sorts_it_out() {
    // Synchronous edits that take 20 s: the first Ctrl-C waits for the answers (they carry what
    // was paid for), the second does not wait.
    let faults = Faults { latency: Latency::Fixed { ms: 20_000 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(4);
    let summary = env.path("summary.json");
    let summary_arg = summary.to_string_lossy().into_owned();
    let args = ["--sync", "--concurrency", "2", "--request-timeout", "60s", "--summary-json", &summary_arg];
    let child = env.run_cmd(&catalog, &args).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    send_signal(pid, "INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_signal(pid, "INT");
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the second interrupt does not wait for the 20 s answers")
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let states = env.states().await;
    assert_eq!(states.get("submitting"), Some(&2), "two submits were in the air: {states:?}");
    // Issue 15, item 18: the forced exit still leaves a summary for the scheduler, marked partial
    // (it was written without reading the state file).
    let text = std::fs::read_to_string(&summary).expect("a summary file after the second interrupt");
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(s["outcome"], "interrupted", "{s}");
    assert_eq!(s["exit_code"], 130);
    assert_eq!(s["partial"], true);
    assert_eq!(s["version"], 1);
    assert_eq!(s["submits"], 2, "the live counters: {s}");
    assert!(s["run_id"].as_i64().is_some_and(|id| id > 0), "{s}");
    assert_eq!(s["model"], "seedream-v4-5");

    // The next start marks them ambiguous instead of paying again.
    let store = env.store().await;
    let recovery = store.recover().await.unwrap();
    assert_eq!(recovery.ambiguous, 2);
}

/// Issue 15, item 17: `backdrop sim` stops on one SIGTERM or one SIGINT, as systemd and Docker
/// expect (it used to ignore the first SIGTERM and exit 130 on the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_stops_on_one_signal() {
    use tokio::io::AsyncBufReadExt as _;
    for signal in ["TERM", "INT"] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_backdrop"))
            .args(["sim", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The banner's first line comes once the server listens (and the signal watcher runs).
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line)).await.unwrap().unwrap();
        assert!(line.contains("listening on http://127.0.0.1:"), "{line}");
        let base = line.trim().rsplit(' ').next().unwrap().to_owned();
        let client = reqwest::Client::new();
        let alive = client.get(format!("{base}/__sim/stats")).send().await.unwrap();
        assert!(alive.status().is_success());
        send_signal(i32::try_from(child.id().unwrap()).unwrap(), signal);
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("one SIG{signal} stops the simulator"))
            .unwrap();
        assert_eq!(status.code(), Some(0), "SIG{signal}: a requested stop is a clean exit");
        assert!(client.get(format!("{base}/__sim/stats")).send().await.is_err(), "the port is closed");
    }
}
