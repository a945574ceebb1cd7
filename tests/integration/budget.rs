//! Budgets mean what they say: `--max-credits` and `--max-cost` bound what one run spends
//! (killed runs and their re-runs count as one), an unknown price never counts as free, a
//! request that may have been charged counts against the cap, and a cap that is not a number is
//! refused before anything is sent.

use crate::harness::{TestEnv, code, output, stderr};

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
