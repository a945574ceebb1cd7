//! The review workflow end to end: a run leaves altered edits in review; the html gallery lists
//! them first, each with a difference picture that decodes at the size its card states, its
//! flags and the commands that resolve it; `retry --review` says it costs money again, keeps the
//! old outputs, and the next run pays for exactly the review rows once each, with a new seed.

use std::collections::{BTreeMap, BTreeSet};

use backdrop_sim::faults::Alterations;
use backdrop_sim::{Faults, SimConfig};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::harness::{TestEnv, code, output, stderr};

const ROWS: usize = 16;

async fn held_env() -> TestEnv {
    let alterations =
        Alterations { moved_rate: 0.12, recolored_rate: 0.12, missing_rate: 0.06, ..Alterations::default() };
    let config =
        SimConfig { seed: 23, faults: Faults { alterations, ..Faults::default() }, ..SimConfig::default() };
    TestEnv::new(config).await
}

/// (sku, state, request_id) of every row.
async fn rows(env: &TestEnv) -> Vec<(String, String, Option<String>)> {
    let store = env.store().await;
    let rows = sqlx::query_as("SELECT sku, state, request_id FROM jobs ORDER BY sku")
        .fetch_all(store.pool())
        .await
        .expect("jobs");
    store.close().await;
    rows
}

/// (sku, path, sha256) of every recorded output of `skus`.
async fn outputs_of(env: &TestEnv, skus: &BTreeSet<String>) -> Vec<(String, String, String)> {
    let store = env.store().await;
    let all: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT j.sku, o.path, o.sha256 FROM outputs o JOIN jobs j ON j.id = o.job_id ORDER BY j.sku, o.idx",
    )
    .fetch_all(store.pool())
    .await
    .expect("outputs");
    store.close().await;
    all.into_iter().filter(|(sku, _, _)| skus.contains(sku)).collect()
}

fn sha256_file(path: &std::path::Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gallery_shows_review_rows_first_with_a_difference_picture() {
    let env = held_env().await;
    let catalog = env.catalog(ROWS);
    let run = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&run), 3, "{}", stderr(&run));
    let held: BTreeSet<String> =
        rows(&env).await.into_iter().filter(|(_, s, _)| s == "review").map(|r| r.0).collect();
    assert!(held.len() >= 2, "the seed holds a few rows: {held:?}");

    let page = env.path("gallery.html");
    let mut cmd = env.cmd();
    cmd.args(["report", "--format", "html", "--output"])
        .arg(&page)
        .arg("--state")
        .arg(env.state())
        .arg("--out")
        .arg(env.out());
    let rep = output(cmd).await;
    assert_eq!(code(&rep), 0, "{}", stderr(&rep));
    let html = std::fs::read_to_string(&page).expect("the gallery");

    let cards: Vec<&str> = html.split("<article ").skip(1).collect();
    assert_eq!(cards.len(), ROWS);
    let states: Vec<bool> =
        cards.iter().map(|c| c.starts_with("class=\"card\" data-state=\"review\"")).collect();
    assert!(
        states.iter().take(held.len()).all(|r| *r) && !states.iter().skip(held.len()).any(|r| *r),
        "review rows come first: {states:?}"
    );
    for card in cards.iter().take(held.len()) {
        let sku = card.split("<span class=\"sku\">").nth(1).and_then(|s| s.split('<').next()).expect("sku");
        assert!(held.contains(sku), "{sku}");
        assert!(card.contains(&format!("backdrop accept --sku {sku}")), "{card}");
        assert!(card.contains(&format!("backdrop retry --review --sku {sku}")), "{card}");
        assert!(card.contains("<li>output 0: <b>"), "each flag with its score and reason: {card}");
        // The input is a URL: the card shows the gate's copy, embedded, not a link.
        assert!(!card.contains("remote image (not fetched)"), "{card}");
        let Some(img) = card.split("<img class=\"thumb diff\" ").nth(1) else {
            panic!(
                "{sku}: no difference picture: {}",
                card.split("difference</figcaption>").nth(1).unwrap_or(card)
            )
        };
        let attr = |name: &str| -> u32 {
            img.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .expect(name)
                .parse()
                .expect(name)
        };
        let b64 = img
            .split("src=\"data:image/png;base64,")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .expect("an embedded PNG");
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
        let decoded = image::load_from_memory(&bytes).expect("the difference picture decodes");
        assert_eq!((decoded.width(), decoded.height()), (attr("width"), attr("height")), "{sku}");
        assert!(decoded.width() >= 64 && decoded.height() >= 64, "{sku}");
    }
    // Self-contained: nothing to fetch, and nothing written beside the page.
    assert!(!html.contains("src=\"http"), "the page fetches nothing");
    let beside: Vec<String> = std::fs::read_dir(page.parent().expect("dir"))
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gallery"))
        .collect();
    assert_eq!(beside, ["gallery.html"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_review_pays_again_for_exactly_the_review_rows_with_new_seeds_and_keeps_old_outputs() {
    let env = held_env().await;
    let catalog = env.catalog(ROWS);
    let run = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&run), 3, "{}", stderr(&run));
    let before = rows(&env).await;
    let held: BTreeSet<String> =
        before.iter().filter(|(_, s, _)| s == "review").map(|r| r.0.clone()).collect();
    assert!(held.len() >= 2, "the seed holds a few rows: {held:?}");
    let first_ledger = env.sim.ledger().await;
    assert_eq!(first_ledger.len(), ROWS);
    let old_seeds: BTreeMap<String, Option<u64>> =
        first_ledger.iter().map(|c| (c.request_id.clone(), c.seed)).collect();
    let old_outputs = outputs_of(&env, &held).await;
    assert!(!old_outputs.is_empty());

    let mut cmd = env.cmd();
    cmd.args(["retry", "--review", "--state"]).arg(env.state()).arg("--out").arg(env.out());
    let retry = output(cmd).await;
    assert_eq!(code(&retry), 0, "{}", stderr(&retry));
    let said = String::from_utf8_lossy(&retry.stdout).into_owned();
    assert!(
        said.contains(&format!("{} row(s) held for review are re-queued", held.len()))
            && said.contains("PAYS FOR THEM AGAIN")
            && said.contains(" cr ($"),
        "the cost warning, with the estimate: {said}"
    );
    let after_retry = rows(&env).await;
    for (sku, state, _) in &after_retry {
        assert_eq!(state == "pending", held.contains(sku), "{sku} is {state}");
    }
    // The old, paid outputs are moved aside, unchanged, and recorded.
    for (sku, path, sha) in &old_outputs {
        let kept = env.out().join("review-kept/1").join(path);
        assert_eq!(&sha256_file(&kept), sha, "{sku}'s old output kept as {}", kept.display());
        assert!(!env.out().join(path).exists(), "{path} moved, not copied");
    }
    let store = env.store().await;
    let recorded: Vec<(String, i64, Option<i64>, i64)> = sqlx::query_as(
        "SELECT j.sku, r.retry, r.old_seed, r.new_seed FROM review_retries r JOIN jobs j ON j.id = r.job_id",
    )
    .fetch_all(store.pool())
    .await
    .expect("review_retries");
    store.close().await;
    assert_eq!(recorded.len(), held.len());

    let again = output(env.run_cmd(&catalog, &[])).await;
    assert!(matches!(code(&again), 0 | 3), "{}", stderr(&again));
    let ledger = env.sim.ledger().await;
    assert_eq!(&ledger[..ROWS], &first_ledger[..], "the first run's charges are untouched");
    let new_charges = &ledger[ROWS..];
    assert_eq!(new_charges.len(), held.len(), "exactly the review rows are paid again: {new_charges:?}");
    let now = rows(&env).await;
    let by_request: BTreeMap<&str, &str> =
        now.iter().filter_map(|(sku, _, r)| r.as_deref().map(|r| (r, sku.as_str()))).collect();
    let mut paid_again = BTreeSet::new();
    for c in new_charges {
        let sku = by_request.get(c.request_id.as_str()).expect("a new charge belongs to a row");
        assert!(held.contains(*sku), "{sku} was not in review and was paid again");
        assert!(paid_again.insert((*sku).to_owned()), "{sku} paid twice");
        let old_request =
            before.iter().find(|(s, _, _)| s == sku).and_then(|r| r.2.clone()).expect("old request");
        let old_seed = old_seeds.get(&old_request).copied().flatten();
        assert!(c.seed.is_some() && c.seed != old_seed, "{sku}: seed {:?} after {old_seed:?}", c.seed);
        let stored = recorded.iter().find(|r| r.0 == **sku).expect("recorded");
        assert_eq!(c.seed, u64::try_from(stored.3).ok(), "the recorded seed is the one sent");
    }
    assert_eq!(paid_again, held);
    assert!(env.double_charges().await.is_empty());
    for (_, path, sha) in &old_outputs {
        assert_eq!(
            &sha256_file(&env.out().join("review-kept/1").join(path)),
            sha,
            "still kept after the run"
        );
    }
    assert_eq!(env.verify_outputs().await, ROWS, "every row has its new, verified outputs");
}
