//! A hostile or broken server, end to end (issue 15): gateway pages after a charge, oversized
//! answers, more outputs than asked, redirecting downloads, error bodies that echo the key, and
//! request ids that are not path segments. Each runs the real binary against the simulator with
//! the matching seeded fault and checks the ledger, the rows, the files and the exit code.

use std::collections::BTreeMap;

use backdrop_sim::{Faults, SimConfig};

use crate::harness::{SENTINEL_KEY, TestEnv, code, output, stderr};

fn with(faults: Faults) -> SimConfig {
    SimConfig { seed: 15, faults, ..SimConfig::default() }
}

fn state(states: &BTreeMap<String, i64>, name: &str) -> i64 {
    states.get(name).copied().unwrap_or(0)
}

/// `backdrop retry --ambiguous` on the test's state file.
async fn retry_ambiguous(env: &TestEnv) {
    let mut cmd = env.cmd();
    cmd.arg("retry").arg("--ambiguous").arg("--state").arg(env.state());
    let out = output(cmd).await;
    assert_eq!(code(&out), 0, "retry --ambiguous: {}", stderr(&out));
}

/// A gateway answers 502 with an HTML page after the API charged the submit: the row is
/// ambiguous (held, never resubmitted by the run), the run exits 3, and only `retry --ambiguous`
/// sends it again. Every charge in the ledger is a finished row or an injected gateway page.
async fn gateway_pages_after_a_charge(provider: &str) {
    let rows = 16;
    let env = TestEnv::new(with(Faults { gateway_error_rate: 0.25, ..Faults::default() })).await;
    let catalog = env.catalog(rows);
    let args = ["--provider", provider, "--concurrency", "4", "--max-attempts", "6"];

    let out = output(env.run_cmd(&catalog, &args)).await;
    let log = stderr(&out);
    let gateway_pages = env.sim.stats().await.by_status.get(&502).copied().unwrap_or(0);
    let states = env.states().await;
    assert!(gateway_pages >= 2, "the fault must hit several rows (seed 15 hit {gateway_pages})");
    assert_eq!(state(&states, "ambiguous"), i64::try_from(gateway_pages).unwrap(), "{states:?}\n{log}");
    assert_eq!(state(&states, "done") + state(&states, "ambiguous"), rows as i64, "{states:?}\n{log}");
    assert!(env.double_charges().await.is_empty(), "paid twice: {:?}", env.double_charges().await);
    assert_eq!(env.sim.ledger().await.len(), rows, "one charge per row, no resubmit of a maybe-charged row");
    assert_eq!(code(&out), 3, "a run that leaves rows ambiguous never exits 0: {log}");

    // Only an explicit `retry --ambiguous` sends them again (and may pay again: that is its warning).
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 10, "ambiguous rows never finished: {:?}", env.states().await);
        retry_ambiguous(&env).await;
        let out = output(env.run_cmd(&catalog, &args)).await;
        let states = env.states().await;
        if state(&states, "ambiguous") == 0 {
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            break;
        }
        assert_eq!(code(&out), 3, "{}", stderr(&out));
    }
    let states = env.states().await;
    assert_eq!(state(&states, "done"), rows as i64, "{states:?}");
    assert_eq!(env.verify_outputs().await, rows);
    let gateway_pages = env.sim.stats().await.by_status.get(&502).copied().unwrap_or(0);
    assert_eq!(
        env.sim.ledger().await.len() as u64,
        rows as u64 + gateway_pages,
        "every charge is a finished row or a gateway page the user chose to resubmit"
    );
    env.sim.shutdown().await;
}

#[tokio::test]
async fn seedance_gateway_pages_after_a_charge_are_ambiguous_never_paid_twice() {
    gateway_pages_after_a_charge("seedance").await;
}

#[tokio::test]
async fn fal_gateway_pages_after_a_charge_are_ambiguous_never_paid_twice() {
    gateway_pages_after_a_charge("fal").await;
}

/// Every status poll answers a valid JSON body of 16 MiB: each poll fails at the cap (never read
/// whole), the paid rows stay `submitted` for the next run (not failed, not resubmitted), exit 3.
#[tokio::test]
async fn oversized_poll_answers_fail_the_poll_not_the_paid_row() {
    let faults = Faults { oversized_rate: 1.0, oversized_bytes: Some(16 * 1024 * 1024), ..Faults::default() };
    let env = TestEnv::new(with(faults)).await;
    let catalog = env.catalog(3);
    let out = output(env.run_cmd(&catalog, &["--poll-max", "20ms"])).await;
    let log = stderr(&out);
    let states = env.states().await;
    assert_eq!(state(&states, "submitted"), 3, "{states:?}\n{log}");
    assert!(log.contains("larger than"), "the cap is named: {log}");
    assert_eq!(code(&out), 3, "{log}");
    assert_eq!(env.sim.ledger().await.len(), 3);
    assert!(env.double_charges().await.is_empty());
    env.sim.shutdown().await;
}

/// The provider lists five more images than asked: only the requested one is downloaded.
#[tokio::test]
async fn extra_outputs_are_a_protocol_error_and_only_the_requested_count_is_kept() {
    for provider in ["seedance", "fal"] {
        let faults = Faults { extra_outputs_rate: 1.0, extra_outputs: Some(5), ..Faults::default() };
        let env = TestEnv::new(with(faults)).await;
        let catalog = env.catalog(3);
        let out = output(env.run_cmd(&catalog, &["--provider", provider])).await;
        let log = stderr(&out);
        assert_eq!(code(&out), 0, "{provider}: {log}");
        assert_eq!(state(&env.states().await, "done"), 3, "{provider}");
        assert_eq!(env.verify_outputs().await, 3, "{provider}: one recorded output per row");
        let files: Vec<_> = walk(&env.out());
        assert_eq!(files.len(), 3, "{provider}: files written == requested: {files:?}");
        assert!(
            log.contains("more outputs than requested"),
            "{provider}: the protocol error is logged: {log}"
        );
        env.sim.shutdown().await;
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                pending.push(e.path());
            } else {
                found.push(e.path());
            }
        }
    }
    found
}

/// Downloads redirected three times (on the simulator's own loopback address) are followed.
#[tokio::test]
async fn downloads_follow_a_short_redirect_chain() {
    let faults = Faults { redirect_rate: 1.0, redirect_hops: Some(3), ..Faults::default() };
    let env = TestEnv::new(with(faults)).await;
    let catalog = env.catalog(3);
    let out = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.verify_outputs().await, 3);
    assert_eq!(env.sim.stats().await.by_status.get(&302).copied(), Some(9), "3 redirects per download");
    env.sim.shutdown().await;
}

/// A chain longer than the limit is not followed: no file, the row is not done.
#[tokio::test]
async fn downloads_refuse_a_long_redirect_chain() {
    let faults = Faults { redirect_rate: 1.0, redirect_hops: Some(5), ..Faults::default() };
    let env = TestEnv::new(with(faults)).await;
    let catalog = env.catalog(2);
    let out = output(env.run_cmd(&catalog, &[])).await;
    let log = stderr(&out);
    assert_ne!(code(&out), 0, "{log}");
    assert_eq!(state(&env.states().await, "done"), 0, "{log}");
    assert!(walk(&env.out()).is_empty(), "{:?}", walk(&env.out()));
    assert!(log.contains("redirect"), "the reason names the redirects: {log}");
    // Refused for good: one chain per row, not retried as if the network had hiccuped.
    assert_eq!(env.sim.stats().await.by_status.get(&302).copied(), Some(2 * 4), "{log}");
    env.sim.shutdown().await;
}

/// Every form of the sentinel key an echo can carry: whole or cut, any case, percent-encoded.
fn leaks(text: &str) -> bool {
    let lowered = text.to_lowercase();
    let decoded = url::form_urlencoded::parse(lowered.as_bytes())
        .flat_map(|(k, v)| [k.into_owned(), v.into_owned()])
        .collect::<Vec<_>>()
        .join(" ");
    let needle = SENTINEL_KEY[..SENTINEL_KEY.len() - 1].to_lowercase();
    // Also without the `sk-` prefix: a cut may fall anywhere.
    let tail = SENTINEL_KEY[3..SENTINEL_KEY.len() - 1].to_lowercase();
    [&lowered, &decoded].iter().any(|t| t.contains(&needle) || t.contains(&tail))
}

/// The simulator refuses every submit with an error that echoes the key at the 500-character
/// cut, upper-cased and percent-encoded. None of it reaches the log (at trace level), the state
/// file or `report.csv`.
#[tokio::test]
async fn a_key_echoed_in_error_bodies_never_reaches_the_log_the_state_or_the_report() {
    assert!(leaks(&format!("x {} y", SENTINEL_KEY.to_uppercase())), "the detector works");
    assert!(leaks(&SENTINEL_KEY.bytes().map(|b| format!("%{b:02X}")).collect::<String>()));
    for provider in ["seedance", "fal"] {
        let env = TestEnv::new(with(Faults { key_echo_rate: 1.0, ..Faults::default() })).await;
        let catalog = env.catalog(2);
        let out = output(env.run_cmd(&catalog, &["--provider", provider, "-vv"])).await;
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert_eq!(code(&out), 3, "{provider}: {log}");
        assert_eq!(state(&env.states().await, "failed"), 2, "{provider}");
        // The marker itself may be what the 500-character cut falls on (`[reda…`).
        assert!(log.contains("[reda"), "{provider}: the echo was seen and scrubbed: {log}");
        assert!(!leaks(&log), "{provider}: key in the log: {log}");

        let csv = env.csv_report().await;
        assert!(csv.contains("[reda"), "{provider}: the error is in the report: {csv}");
        assert!(!leaks(&csv), "{provider}: key in report.csv: {csv}");

        for suffix in ["", "-wal"] {
            let path = env.path(&format!("state.db{suffix}"));
            if let Ok(bytes) = std::fs::read(&path) {
                assert!(!leaks(&String::from_utf8_lossy(&bytes)), "{provider}: key in {}", path.display());
            }
        }
        env.sim.shutdown().await;
    }
}

/// A seedance request id of `..` would poll `/v1/requests` itself: the id is refused and the
/// paid row is ambiguous, not failed. fal's ids are only labels (its URLs are used as given), so
/// the same id there does not stop the row.
#[tokio::test]
async fn an_unusable_request_id_makes_the_row_ambiguous_not_failed() {
    let env = TestEnv::new(with(Faults { bad_request_id_rate: 1.0, ..Faults::default() })).await;
    let catalog = env.catalog(3);
    let out = output(env.run_cmd(&catalog, &[])).await;
    let log = stderr(&out);
    let states = env.states().await;
    assert_eq!(state(&states, "ambiguous"), 3, "{states:?}\n{log}");
    assert_eq!(state(&states, "failed"), 0, "{states:?}");
    assert_eq!(code(&out), 3, "{log}");
    assert_eq!(env.sim.ledger().await.len(), 3);
    let by_route = env.sim.stats().await.by_route;
    assert_eq!(
        by_route.get("GET /v1/requests/{id}"),
        None,
        "never polled a path the id rewrote: {by_route:?}"
    );
    assert_eq!(by_route.get("(unknown)"), None, "{by_route:?}");
    env.sim.shutdown().await;

    let env = TestEnv::new(with(Faults { bad_request_id_rate: 1.0, ..Faults::default() })).await;
    let catalog = env.catalog(3);
    let out = output(env.run_cmd(&catalog, &["--provider", "fal"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(state(&env.states().await, "done"), 3);
    env.sim.shutdown().await;
}
