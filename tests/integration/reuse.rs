//! Reuse of identical results: rows that ask the provider for the same image (same model,
//! rendered prompt, inputs and parameters) share one paid request within a run, and reuse a done
//! result across runs and catalogs of the same state file; the copies are verified by sha256.

use backdrop_sim::SimConfig;

use crate::harness::{TestEnv, all_output, code, output, stderr};

/// A catalog of variant rows: every SKU shows the same picture with the same words.
fn variants(env: &TestEnv, file: &str, skus: &[&str], picture: &str) -> std::path::PathBuf {
    let mut text = String::from("sku,name,color,image_url\n");
    for sku in skus {
        text.push_str(&format!("{sku},T-shirt,blue,{}\n", env.sim.input_url(picture)));
    }
    let path = env.path(file);
    std::fs::write(&path, text).expect("write catalog");
    path
}

async fn outputs_by_sku(env: &TestEnv) -> Vec<(String, String, Option<String>)> {
    let store = env.store().await;
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT j.sku, o.sha256, j.reuse_of FROM outputs o JOIN jobs j ON j.id = o.job_id ORDER BY j.sku",
    )
    .fetch_all(store.pool())
    .await
    .expect("outputs");
    store.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_variant_skus_with_one_photo_pay_for_one_image() {
    let env = TestEnv::new(SimConfig::default()).await;
    let path = variants(&env, "catalog.csv", &["TEE-S", "TEE-M", "TEE-L"], "tee");
    let dry = output(env.run_cmd(&path, &["--dry-run"])).await;
    assert_eq!(code(&dry), 0, "{}", stderr(&dry));
    let text = format!("{}{}", String::from_utf8_lossy(&dry.stdout), stderr(&dry));
    assert!(text.contains("3 rows → 1 paid requests (2 reused"), "{text}");
    assert!(text.contains("to run: 1 rows → 1 images"), "only the paid request is priced: {text}");

    let out = output(env.run_cmd(&path, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.sim.ledger().await.len(), 1, "one paid request for one distinct image");
    assert_eq!(env.states().await.get("done"), Some(&3));
    assert_eq!(env.verify_outputs().await, 3, "three files, each verified by sha256");
    let rows = outputs_by_sku(&env).await;
    assert!(rows.iter().all(|(_, sha, _)| *sha == rows[0].1), "the copies are the shared image: {rows:?}");
    let leaders: Vec<_> = rows.iter().filter(|(_, _, of)| of.is_none()).collect();
    assert_eq!(leaders.len(), 1, "{rows:?}");

    // The report says which rows reused which result.
    let report = env.csv_report().await;
    assert!(report.lines().next().is_some_and(|h| h.contains(",reused_from,")), "{report}");
    assert_eq!(report.lines().filter(|l| l.contains(&format!(",{},", leaders[0].0))).count(), 2, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_result_is_reused_by_another_catalog_at_no_cost() {
    let env = TestEnv::plain().await;
    let first = variants(&env, "spring.csv", &["TEE-S"], "tee");
    let out = output(env.run_cmd(&first, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.sim.ledger().await.len(), 1);

    let second = variants(&env, "summer.csv", &["TEE-XL"], "tee");
    let out = output(env.run_cmd(&second, &[])).await;
    let err = all_output(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(err.contains("1 rows → 0 paid requests (1 reused"), "{err}");
    assert_eq!(env.sim.ledger().await.len(), 1, "nothing was paid the second time");
    assert_eq!(env.sim.stats().await.submits, 1);
    assert_eq!(env.states().await.get("done"), Some(&2));
    assert_eq!(env.verify_outputs().await, 2);

    // --no-reuse asks afresh.
    let third = variants(&env, "autumn.csv", &["TEE-XXL"], "tee");
    let out = output(env.run_cmd(&third, &["--no-reuse"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.sim.ledger().await.len(), 2, "--no-reuse pays for its row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_lost_between_the_shared_request_and_its_copies_are_made_next_run_for_free() {
    let env = TestEnv::plain().await;
    let path = variants(&env, "catalog.csv", &["TEE-S", "TEE-M", "TEE-L"], "tee");
    let out = output(env.run_cmd(&path, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.sim.ledger().await.len(), 1);
    // Put the followers back where a crash right after the leader's result leaves them: still
    // pending, with no outputs and no files.
    let store = env.store().await;
    let paths: Vec<(String,)> = sqlx::query_as(
        "SELECT o.path FROM outputs o JOIN jobs j ON j.id = o.job_id WHERE j.reuse_of IS NOT NULL",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(paths.len(), 2);
    for (p,) in &paths {
        std::fs::remove_file(env.out().join(p)).unwrap();
    }
    sqlx::query("DELETE FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE reuse_of IS NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET state = 'pending' WHERE reuse_of IS NOT NULL")
        .execute(store.pool())
        .await
        .unwrap();
    store.close().await;

    let again = output(env.run_cmd(&path, &[])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(env.sim.ledger().await.len(), 1, "the copies cost nothing");
    assert_eq!(env.states().await.get("done"), Some(&3));
    assert_eq!(env.verify_outputs().await, 3);
}
