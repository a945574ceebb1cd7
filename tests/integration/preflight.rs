//! Input preflight end to end: inputs that cannot succeed are refused before anything is paid,
//! passed checks are cached in the state file, and a picture that changed under the same URL is
//! noticed through its validators before the row is trusted as done.

use backdrop_sim::SimConfig;

use crate::harness::{TestEnv, all_output, code, output, stderr};

/// A catalog of `(sku, image URL)` rows, written next to the state file.
fn catalog(env: &TestEnv, rows: &[(&str, String)]) -> std::path::PathBuf {
    let mut text = String::from("sku,name,color,image_url\n");
    for (i, (sku, url)) in rows.iter().enumerate() {
        text.push_str(&format!("{sku},Mug {i},blue,{url}\n"));
    }
    let path = env.path("catalog.csv");
    std::fs::write(&path, text).expect("write catalog");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_links_html_pages_and_oversized_pictures_are_refused_before_paying() {
    let env = TestEnv::new(SimConfig::default()).await;
    let base = env.sim.input_url("shirt");
    let rows = [
        ("GOOD-1", base.clone()),
        ("DEAD-1", format!("{base}?status=404")),
        ("HTML-1", format!("{base}?html=1")),
        ("HUGE-1", format!("{base}?pad_kb=11000")),
    ];
    let path = catalog(&env, &rows);
    let out = output(env.run_cmd(&path, &[])).await;
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    for expected in ["line 3", "HTTP 404", "line 4", "HTML", "line 5", "bytes, more than"] {
        assert!(err.contains(expected), "stderr names {expected:?}: {err}");
    }
    assert!(!err.contains("line 2:"), "the good row is not refused: {err}");
    assert!(env.sim.ledger().await.is_empty(), "nothing was charged");
    assert_eq!(env.sim.stats().await.submits, 0, "nothing was submitted");

    // --skip-invalid runs the good row and lists the others.
    let out = output(env.run_cmd(&path, &["--skip-invalid"])).await;
    let err = all_output(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(err.contains("Skipped 3 invalid rows"), "{err}");
    assert_eq!(env.sim.ledger().await.len(), 1, "only the good row was paid for");
    assert_eq!(env.states().await.get("done"), Some(&1));
    assert_eq!(env.verify_outputs().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_within_the_time_to_live_checks_nothing_again() {
    let env = TestEnv::plain().await;
    let path = env.catalog(3);
    let out = output(env.run_cmd(&path, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("3 distinct inputs, 0 cached, 0 unchanged (304), 3 checked, 0 refused"));
    let after_first = env.sim.input_requests().await;
    assert!(after_first >= 3, "each input was checked: {after_first}");

    let again = output(env.run_cmd(&path, &[])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert!(stderr(&again).contains("3 cached"), "{}", stderr(&again));
    assert_eq!(env.sim.input_requests().await, after_first, "no input was requested again");
    assert_eq!(env.sim.ledger().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_changed_under_the_same_url_is_checked_again_and_re_run() {
    let env = TestEnv::plain().await;
    let path = env.catalog(2);
    // A time to live of zero: every run revalidates with a conditional request.
    let ttl = ["--input-check-ttl", "0s"];
    let out = output(env.run_cmd(&path, &ttl)).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.sim.ledger().await.len(), 2);

    let unchanged = output(env.run_cmd(&path, &ttl)).await;
    assert_eq!(code(&unchanged), 0, "{}", stderr(&unchanged));
    assert!(stderr(&unchanged).contains("2 unchanged (304)"), "{}", stderr(&unchanged));
    assert_eq!(env.sim.ledger().await.len(), 2, "unchanged pictures cost nothing");

    env.sim.change_input("img0").await;
    let changed = output(env.run_cmd(&path, &ttl)).await;
    let err = all_output(&changed);
    assert_eq!(code(&changed), 0, "{err}");
    assert!(err.contains("1 unchanged (304), 1 checked"), "{err}");
    assert!(err.contains("changed 1"), "the row with the new picture is re-planned: {err}");
    assert_eq!(env.sim.ledger().await.len(), 3, "the new picture was paid for once");
    assert_eq!(env.states().await.get("done"), Some(&2));
    assert_eq!(env.verify_outputs().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_check_inputs_requests_no_input_and_says_what_it_risks() {
    let env = TestEnv::plain().await;
    let dead = format!("{}?status=404", env.sim.input_url("gone"));
    let path = catalog(&env, &[("DEAD-1", dead)]);
    let out = output(env.run_cmd(&path, &["--dry-run", "--no-check-inputs"])).await;
    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(err.contains("input check: off"), "{err}");
    assert!(err.contains("costs a paid request"), "{err}");
    assert_eq!(env.sim.input_requests().await, 0);
    // With checks on, the same dry run refuses the row.
    let out = output(env.run_cmd(&path, &["--dry-run"])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_slower_than_the_request_timeout_is_refused_as_unreachable() {
    let env = TestEnv::plain().await;
    let slow = format!("{}?delay_ms=3000", env.sim.input_url("slow"));
    let path = catalog(&env, &[("SLOW-1", slow)]);
    let out = output(env.run_cmd(&path, &["--dry-run", "--request-timeout", "1s"])).await;
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(err.contains("line 2") && err.contains("timed out"), "{err}");
}
