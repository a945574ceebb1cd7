//! The quality gate in a real run: the simulator alters a seeded share of its edits (it says
//! which through `GET /__sim/alterations`); altered rows end `review` with their verdict kept,
//! faithful rows `done`, the run exits 3, and a second run pays for none of them again.

use std::collections::BTreeMap;

use backdrop_sim::faults::Alterations;
use backdrop_sim::{Faults, SimConfig};
use serde_json::Value;

use crate::harness::{TestEnv, code, output, stderr};

const ROWS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_edits_are_held_for_review_and_faithful_ones_are_done() {
    let alterations = Alterations {
        moved_rate: 0.08,
        recolored_rate: 0.08,
        missing_rate: 0.08,
        blank_rate: 0.08,
        ..Alterations::default()
    };
    let config =
        SimConfig { seed: 23, faults: Faults { alterations, ..Faults::default() }, ..SimConfig::default() };
    let env = TestEnv::new(config).await;
    let catalog = env.catalog(ROWS);
    let out = output(env.run_cmd(&catalog, &[])).await;
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "rows left in review exit 3: {err}");

    let altered: Vec<Value> = reqwest::get(format!("{}/__sim/alterations", env.sim.base_url()))
        .await
        .expect("GET alterations")
        .json()
        .await
        .expect("JSON");
    let kinds: BTreeMap<String, String> = altered
        .iter()
        .map(|a| {
            (
                a["request_id"].as_str().unwrap_or_default().to_owned(),
                a["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(kinds.len() >= 4, "the seed alters a few rows: {kinds:?}");

    let store = env.store().await;
    let rows: Vec<(String, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT sku, state, request_id, quality FROM jobs ORDER BY sku")
            .fetch_all(store.pool())
            .await
            .expect("jobs");
    store.close().await;
    assert_eq!(rows.len(), ROWS);
    let (mut held, mut missed, mut false_holds) = (0, Vec::new(), Vec::new());
    for (sku, state, request, quality) in &rows {
        let quality = quality.as_deref().expect("every gated row keeps its verdict");
        let verdict: Value = serde_json::from_str(quality).expect("verdict JSON");
        assert!(
            verdict["outputs"][0]["verdict"]["checks"].as_array().is_some_and(|c| !c.is_empty()),
            "{quality}"
        );
        let kind = request.as_deref().and_then(|r| kinds.get(r));
        match (kind, state.as_str()) {
            (Some(_), "review") => held += 1,
            (Some(k), s) => missed.push(format!("{sku} {k} ended {s}")),
            (None, "done") => {}
            (None, s) => false_holds.push(format!("{sku} ended {s}: {quality}")),
        }
    }
    assert!(missed.is_empty(), "every altered row is held: {missed:?}");
    assert!(false_holds.is_empty(), "no faithful row is held: {false_holds:?}");
    assert_eq!(held, kinds.len());
    assert_eq!(env.states().await.get("review").copied(), Some(i64::try_from(held).unwrap()));
    assert_eq!(env.verify_outputs().await, ROWS, "review rows keep their paid, verified files");
    assert_eq!(env.sim.ledger().await.len(), ROWS);

    // A second run resubmits nothing: review rows are paid, held for a person.
    let again = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&again), 3, "{}", stderr(&again));
    assert_eq!(env.sim.ledger().await.len(), ROWS, "nothing is charged twice");
    assert!(env.double_charges().await.is_empty());

    // The report gives each check's score and the reasons for each flag, in columns at the end.
    let report = env.csv_report().await;
    assert!(report.lines().next().is_some_and(|h| h.contains(",quality_scores,quality_reasons")), "{report}");
    let review_lines: Vec<&str> = report.lines().filter(|l| l.contains(",review,")).collect();
    assert_eq!(review_lines.len(), held, "{report}");
    assert!(review_lines.iter().all(|l| l.contains("0:presence=") && l.contains("0: the ")), "{report}");

    // `accept` makes one named review row done, then every other one; nothing is paid.
    let first = rows.iter().find(|(_, s, _, _)| s == "review").map(|r| r.0.clone()).expect("a review row");
    let mut cmd = env.cmd();
    cmd.args(["accept", "--sku", &first, "--state"]).arg(env.state());
    let acc = output(cmd).await;
    assert_eq!(code(&acc), 0, "{}", stderr(&acc));
    assert!(String::from_utf8_lossy(&acc.stdout).contains(&format!("accepted {first}")));
    assert_eq!(env.states().await.get("review").copied(), Some(i64::try_from(held - 1).unwrap()));
    let mut cmd = env.cmd();
    cmd.args(["accept", "--all-review", "--state"]).arg(env.state());
    let acc = output(cmd).await;
    assert_eq!(code(&acc), 0, "{}", stderr(&acc));
    assert_eq!(env.states().await.get("review"), None);
    assert_eq!(env.states().await.get("done").copied(), Some(i64::try_from(ROWS).unwrap()));
    let last = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&last), 0, "accepted rows are done: {}", stderr(&last));
    assert_eq!(env.sim.ledger().await.len(), ROWS, "accepting pays for nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_gate_off_altered_edits_are_done() {
    let alterations = Alterations { blank_rate: 0.5, ..Alterations::default() };
    let config =
        SimConfig { seed: 5, faults: Faults { alterations, ..Faults::default() }, ..SimConfig::default() };
    let env = TestEnv::new(config).await;
    let catalog = env.catalog(6);
    let out = output(env.run_cmd(&catalog, &["--no-quality-gate"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&6));
}
