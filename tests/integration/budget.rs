//! Budgets mean what they say: `--max-credits` and `--max-cost` bound what one run spends
//! (killed runs and their re-runs count as one), an unknown price never counts as free, a
//! request that may have been charged counts against the cap, and a cap that is not a number is
//! refused before anything is sent.

use crate::harness::{TestEnv, all_output, code, output, stderr};

/// Issue 15, item 10: NaN, infinities and negative caps are refused (exit 2) whether they come
/// from a flag or from the config file, and nothing is sent. NaN and inf used to pass as
/// "no cap" (the merge of flags and file went through JSON, which has no NaN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_that_are_not_amounts_are_refused_before_anything_is_sent() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(3);
    for (flag, value) in
        [("--max-credits", "NaN"), ("--max-credits", "inf"), ("--max-cost", "-0.5"), ("--max-cost", "nan")]
    {
        let out = output(env.run_cmd(&catalog, &[&format!("{flag}={value}")])).await;
        assert_eq!(code(&out), 2, "{flag}={value}: {}", stderr(&out));
        assert!(stderr(&out).contains(flag), "{flag}={value} is named: {}", stderr(&out));
    }
    for line in ["max-credits = nan", "max-cost = inf", "max-credits = -8.0"] {
        let config = env.path("budget.toml");
        std::fs::write(&config, format!("{line}\n")).unwrap();
        let mut cmd = env.run_cmd(&catalog, &[]);
        cmd.arg("--config").arg(&config);
        let out = output(cmd).await;
        assert_eq!(code(&out), 2, "config {line:?}: {}", stderr(&out));
    }
    assert_eq!(env.sim.stats().await.submits, 0, "nothing was sent");
    assert!(env.sim.ledger().await.is_empty());
}

/// Issue 15, item 8: a nightly job with a cap in its config file. Night 2 brings new rows whose
/// price fits the cap on its own: it runs them all. (The cap used to count the state file's
/// all-time spend, so every night after the first planned, sent almost nothing and exited 4.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_night_gets_its_own_cap() {
    let env = TestEnv::plain().await;
    let config = env.path("nightly.toml");
    // 48 credits: six images at 8. Each night brings five rows (40 credits); both nights, 80.
    std::fs::write(&config, "max-credits = 48\n").unwrap();
    let night = |skus: std::ops::Range<usize>| {
        let skus: Vec<String> = skus.map(|i| format!("SKU-{i:04}")).collect();
        let catalog = env.catalog_with(&skus);
        let mut cmd = env.run_cmd(&catalog, &[]);
        cmd.arg("--config").arg(&config);
        cmd
    };
    let first = output(night(0..5)).await;
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let second = output(night(0..10)).await;
    assert_eq!(code(&second), 0, "night 2 is not stopped by night 1's spend: {}", stderr(&second));
    assert_eq!(env.states().await.get("done"), Some(&10));
    let ledger = env.sim.ledger().await;
    assert_eq!(ledger.len(), 10);
    assert!((ledger.iter().map(|c| c.amount).sum::<f64>() - 80.0).abs() < 1e-9);

    // `status` shows each night's spend and the total.
    let status = output(status_cmd(&env)).await;
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(text.contains("spent: seedance 80 credits ($0.80)"), "{text}");
    assert!(text.contains("money per run:"), "{text}");
    let nights: Vec<&str> = text.lines().filter(|l| l.contains(" done: spent 40 cr ($0.40)")).collect();
    assert_eq!(nights.len(), 2, "{text}");
}

fn status_cmd(env: &TestEnv) -> tokio::process::Command {
    let mut cmd = env.cmd();
    cmd.arg("status").arg("--state").arg(env.state());
    cmd
}

/// Issue 15, item 9: a model missing from the price table counts as free, so with a cap the run
/// refuses to start (exit 2, nothing sent) and says how to add a `[prices]` entry; with the entry
/// the plan is priced. (It used to submit every row and report "spent $0.00".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_price_with_a_cap_refuses_to_start() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(4);
    let prompt = env.path("new-model.txt");
    for (provider, model, cap) in [
        ("fal", "fal-ai/bytedance/seedream/v9/edit", "--max-cost=0.10"),
        ("seedance", "seedream-v9", "--max-credits=16"),
    ] {
        std::fs::write(&prompt, format!("+++\nmodel = \"{model}\"\n+++\nPut the {{name}} on oak\n")).unwrap();
        let mut cmd = env.run_cmd(&catalog, &["--provider", provider, cap]);
        cmd.arg("--prompt").arg(&prompt);
        let out = output(cmd).await;
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{provider}: {err}");
        assert!(
            err.contains(&format!("[prices]\n\"{model}\" = ")),
            "{provider}: says how to price it: {err}"
        );
        assert!(err.contains("nothing was sent"), "{err}");
        // A dry run says the same: the run it previews would refuse.
        let mut dry = env.run_cmd(&catalog, &["--provider", provider, cap, "--dry-run"]);
        dry.arg("--prompt").arg(&prompt);
        assert_eq!(code(&output(dry).await), 2, "{provider} dry run");
    }
    assert_eq!(env.sim.stats().await.submits, 0, "nothing was sent");
    // A run that ends before its pool starts still leaves its summary for the scheduler.
    let summary = env.path("summary.json");
    let mut cmd = env.run_cmd(&catalog, &["--max-credits=16", "--summary-json", &summary.to_string_lossy()]);
    cmd.arg("--prompt").arg(&prompt);
    assert_eq!(code(&output(cmd).await), 2);
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!((s["outcome"].as_str(), s["exit_code"].as_i64()), (Some("usage"), Some(2)), "{s}");
    assert_eq!(s["model"], "seedream-v9");

    // With a price in the config file the plan is priced, and the cap holds it.
    let config = env.path("priced.toml");
    std::fs::write(&config, "[prices]\n\"seedream-v9\" = 9\n").unwrap();
    let mut dry = env.run_cmd(&catalog, &["--max-credits=16", "--dry-run"]);
    dry.arg("--prompt").arg(&prompt).arg("--config").arg(&config);
    let out = output(dry).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 images × 9 credits = 36 credits"));
}

/// Issue 15, item 9: a `--sync` run with `--max-credits 64` is killed with SIGKILL while its
/// paid requests are in the air, then run again. The killed run's requests may have been charged
/// (here they were): they count against the cap of the run that picks up its work, and `status`
/// shows them as "possibly charged". The simulator's ledger never passes the cap. (The second run
/// used to start from the recorded spend only, so 64 credits of cap let 96 be charged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_and_its_rerun_stay_under_one_cap() {
    use backdrop_sim::{Faults, Latency, SimConfig};
    let faults = Faults { latency: Latency::Fixed { ms: 2_500 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(20);
    let args = ["--sync", "--concurrency", "4", "--max-credits", "64"];
    let mut child = env.run_cmd(&catalog, &args).spawn().unwrap();
    // Killed once its first paid requests are in the air (charged at the simulator, unanswered):
    // two, the adaptive window's start (it grows as the server answers, after 2.5 s here).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while env.sim.ledger().await.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "two submits never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_eq!(env.sim.ledger().await.len(), 2, "killed before any answer came back");

    // Before any run recovers them, status counts them as possibly charged.
    let status = output(status_cmd(&env)).await;
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(text.contains("possibly charged: seedance 16 credits ($0.16)"), "{text}");

    let again = output(env.run_cmd(&catalog, &args)).await;
    assert_eq!(code(&again), 4, "stopped by the cap: {}", stderr(&again));
    let charged: f64 = env.sim.ledger().await.iter().map(|c| c.amount).sum();
    assert!(charged <= 64.0 + 1e-9, "the ledger passed the cap: {charged}");
    assert!(charged > 16.0, "the second run still spent what was left of the cap: {charged}");
    assert!(env.double_charges().await.is_empty());

    let status = output(status_cmd(&env)).await;
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(text.contains("spent: seedance 48 credits ($0.48)"), "{text}");
    assert!(
        text.contains("possibly charged: seedance 16 credits ($0.16); total $0.16 (2 paid requests"),
        "{text}"
    );
    assert!(
        text.contains("not ended (running, or killed): spent 0 cr ($0.00), possibly charged 16 cr"),
        "{text}"
    );
    assert!(text.contains(" budget: spent 48 cr ($0.48)"), "{text}");
    let mut json = status_cmd(&env);
    json.arg("--json");
    let json: serde_json::Value = serde_json::from_slice(&output(json).await.stdout).unwrap();
    assert_eq!(json["possibly_charged"]["seedance_credits"], 16.0, "{json}");
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(2), "{json}");
}

/// A submit whose answer never came (the connection dropped after the simulator charged it) may
/// have been charged: it keeps its reservation, so the run's cap holds against the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_may_have_been_charged_count_against_the_runs_cap() {
    use backdrop_sim::{Faults, ScriptStep, SimConfig};
    let drop = ScriptStep { count: 2, status: 0, retry_after_secs: None, drop: true };
    let faults = Faults { script: vec![drop], ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(6);
    let out = output(env.run_cmd(&catalog, &["--concurrency", "1", "--max-credits", "24"])).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let charged: f64 = env.sim.ledger().await.iter().map(|c| c.amount).sum();
    assert!((charged - 24.0).abs() < 1e-9, "two dropped (charged) and one answered: {charged}");
    let states = env.states().await;
    assert_eq!((states.get("ambiguous"), states.get("done")), (Some(&2), Some(&1)), "{states:?}");
    let status = output(status_cmd(&env)).await;
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        text.contains(" budget: spent 8 cr ($0.08), possibly charged 16 cr ($0.16) (2 requests)"),
        "{text}"
    );
}

/// fal accepts Seedream's short model names (`seedream-v4-5`) and bills them at the price of the
/// fal id they map to: the cap holds with them too. (They used to be missing from the price
/// table, so `--max-cost 0.10` on fal submitted every row and reported "spent $0.00".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_short_model_names_are_priced_and_capped() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(6);
    let out =
        output(env.run_cmd(&catalog, &["--provider", "fal", "--max-cost", "0.10", "--concurrency", "1"]))
            .await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let charged: f64 = env.sim.ledger().await.iter().map(|c| c.amount).sum();
    assert!(
        (charged - 0.08).abs() < 1e-9,
        "two images at $0.04 fit under $0.10, a third does not: {charged}"
    );
    assert!(all_output(&out).contains("spent $0.08"), "{}", all_output(&out));
}
