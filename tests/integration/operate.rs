//! Operating backdrop unattended: JSON logs, the summary file for schedulers, the config file,
//! webhooks (on time, late, twice, never), the low-balance warning, and the progress bar that
//! shows only on a terminal.

use std::time::Duration;

use backdrop_sim::{Faults, Latency, SimConfig};

use crate::harness::{TestEnv, code, output, stderr};

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_event_with_row_fields() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(3);
    let out = output(env.run_cmd(&catalog, &["--log-format", "json"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut events = Vec::new();
    for line in stderr(&out).lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        events.push(v);
    }
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or_default().to_owned();
    let submitted: Vec<_> = events.iter().filter(|v| message(v) == "submitted").collect();
    assert_eq!(submitted.len(), 3, "one submit event per row");
    for v in &submitted {
        assert!(v["span"]["sku"].as_str().is_some_and(|s| s.starts_with("SKU-")), "{v}");
        assert!(v["fields"]["request_id"].as_str().is_some(), "{v}");
        assert!(v["fields"]["latency_ms"].is_number(), "{v}");
    }
    assert_eq!(events.iter().filter(|v| message(v) == "done").count(), 3);
    assert!(events.iter().any(|v| message(v) == "run started"));
    assert!(events.iter().any(|v| message(v) == "run finished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_file_is_written_for_finished_and_interrupted_runs() {
    let faults = Faults { latency: Latency::Fixed { ms: 300 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(12);
    let summary = env.path("summary.json");
    let summary_arg = summary.to_string_lossy().into_owned();
    let child =
        env.run_cmd(&catalog, &["--concurrency", "2", "--summary-json", &summary_arg]).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["exit_code"], 130);
    assert_eq!(s["outcome"], "interrupted");
    assert_eq!(s["version"], 1);

    let out = output(env.run_cmd(&catalog, &["--summary-json", &summary_arg])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["exit_code"], 0);
    assert_eq!(s["counts"]["done"], 12);
    assert!(s["spent"].as_f64().unwrap() > 0.0);
    assert!(s["duration_secs"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_supplies_flags_and_flags_win() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(4);
    let config = env.path("backdrop.toml");
    std::fs::write(&config, "max-credits = 8\nconcurrency = 1\n").unwrap();
    let mut cmd = env.run_cmd(&catalog, &[]);
    cmd.arg("--config").arg(&config);
    let out = output(cmd).await;
    assert_eq!(code(&out), 4, "the file's budget of 8 credits buys one row: {}", stderr(&out));
    assert_eq!(env.sim.ledger().await.len(), 1);

    let mut cmd = env.run_cmd(&catalog, &["--max-credits", "1000"]);
    cmd.arg("--config").arg(&config);
    let out = output(cmd).await;
    assert_eq!(code(&out), 0, "the flag wins over the file: {}", stderr(&out));
    assert_eq!(env.sim.ledger().await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_config_key_is_named_with_its_line_and_nothing_is_sent() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(2);
    let config = env.path("backdrop.toml");
    std::fs::write(&config, "concurrency = 2\n# a comment\nconcurency = 3\n").unwrap();
    let mut cmd = env.run_cmd(&catalog, &[]);
    cmd.arg("--config").arg(&config);
    let out = output(cmd).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("line 3") && err.contains("concurency"), "{err}");
    assert_eq!(env.sim.stats().await.submits, 0);
}

/// A fal run whose polls alone would take 20 s per row: webhooks must carry it.
async fn webhook_run(faults: Faults, extra: &[&str]) -> (TestEnv, std::process::Output) {
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(6);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://127.0.0.1:{port}/hook");
    let jwks = env.sim.jwks_url();
    let mut args = vec![
        "--provider",
        "fal",
        "--webhook-listen",
        &listen,
        "--webhook-url",
        &url,
        "--jwks-url",
        &jwks,
        "--poll-initial",
        "20s",
        "--poll-max",
        "30s",
    ];
    args.extend_from_slice(extra);
    let out = output(env.run_cmd(&catalog, &args)).await;
    (env, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_wake_the_pollers() {
    let faults = Faults { latency: Latency::Fixed { ms: 100 }, ..Faults::default() };
    let started = std::time::Instant::now();
    let (env, out) = webhook_run(faults, &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&6));
    assert!(env.sim.stats().await.webhooks_delivered >= 6);
    // Generous: polls alone would need 20 s for the first row.
    assert!(started.elapsed() < Duration::from_secs(15), "webhooks did not wake the pollers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_and_duplicate_webhooks_change_nothing() {
    let faults = Faults {
        latency: Latency::Fixed { ms: 50 },
        webhook_delay_ms: 300,
        webhook_duplicate_rate: 1.0,
        ..Faults::default()
    };
    let (env, out) = webhook_run(faults, &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&6));
    assert_eq!(env.sim.ledger().await.len(), 6);
    assert!(env.double_charges().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_webhooks_only_delay_a_row() {
    let faults = Faults { latency: Latency::Fixed { ms: 50 }, webhook_drop_rate: 1.0, ..Faults::default() };
    let (env, out) = webhook_run(faults, &["--poll-initial", "100ms", "--poll-max", "300ms"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&6));
    assert_eq!(env.sim.stats().await.webhooks_delivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_balance_raises_one_warning() {
    let env = TestEnv::new(SimConfig { credits: 40.0, ..SimConfig::default() }).await;
    let catalog = env.catalog(3);
    let prompt = env.path("generate.txt");
    std::fs::write(&prompt, "+++\ntask = \"generate\"\n+++\nA {color} {name} on a shelf\n").unwrap();
    let prompt = prompt.to_string_lossy().into_owned();
    let out = output(
        env.run_cmd(&catalog, &["--prompt", &prompt, "--low-credit-warning", "30", "--concurrency", "1"]),
    )
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("provider balance is low").count(), 1, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_bar_shows_on_a_terminal_only() {
    let faults = Faults { latency: Latency::Fixed { ms: 200 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(10);
    // Piped stderr: no bar.
    let out = output(env.run_cmd(&catalog, &["--concurrency", "2"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stderr(&out).contains("ETA"), "{}", stderr(&out));

    // A pseudo-terminal (util-linux `script`): the bar is drawn.
    let cmd = env.run_cmd(&catalog, &["--concurrency", "2", "--force"]);
    let std_cmd = cmd.as_std();
    let mut line = shell_quote(std_cmd.get_program().to_string_lossy().as_ref());
    for a in std_cmd.get_args() {
        line.push(' ');
        line.push_str(&shell_quote(&a.to_string_lossy()));
    }
    let mut script = tokio::process::Command::new("script");
    script
        .args(["-qec", &line, "/dev/null"])
        .current_dir(env.dir.path())
        .env("SEEDANCE_API_KEY", crate::harness::SENTINEL_KEY)
        .env("COLUMNS", "160");
    let out = output(script).await;
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{screen}");
    assert!(screen.contains("rows") && screen.contains("ETA") && screen.contains("in flight"), "{screen}");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
