//! Local photos on fal: uploaded to fal's storage (both flows, with the storage's faults) before
//! the paid request, once per content across runs, never counted as an attempt.

use std::path::PathBuf;

use backdrop_sim::SimConfig;
use backdrop_sim::faults::Faults;

use super::harness::{TestEnv, code, output, stderr};

/// A small product photo: a box of `colour` on a white background. The simulator edits the
/// uploaded photo itself, so it needs a background to swap (a photo of one flat colour would
/// come back blank, and the quality gate would rightly hold it).
fn photo(colour: [u8; 3]) -> image::RgbImage {
    image::RgbImage::from_fn(64, 48, |x, y| {
        if (20..44).contains(&x) && (10..38).contains(&y) { image::Rgb(colour) } else { image::Rgb([255; 3]) }
    })
}

/// Writes `n` distinct small PNG photos, `photo{i}.png`.
fn photos(env: &TestEnv, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let path = env.path(&format!("photo{i}.png"));
            let shade = u8::try_from(i * 20 % 250).unwrap();
            photo([shade, 100, 200]).save(&path).unwrap();
            path
        })
        .collect()
}

/// A catalog whose row `i` uses photo `uses[i]`.
fn catalog(env: &TestEnv, name: &str, prefix: &str, photos: &[PathBuf], uses: &[usize]) -> PathBuf {
    let mut text = String::from("sku,name,color,image_url\n");
    for (i, &p) in uses.iter().enumerate() {
        text.push_str(&format!("{prefix}-{i},Mug {i},blue,{}\n", photos[p].display()));
    }
    let path = env.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn attempts(env: &TestEnv) -> i64 {
    let store = env.store().await;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM attempts").fetch_one(store.pool()).await.unwrap();
    store.close().await;
    n
}

#[tokio::test]
async fn local_photos_are_uploaded_once_across_runs_through_failures_and_expired_tokens() {
    let faults = Faults {
        upload_error_rate: 0.5,
        upload_delay_ms: 150,
        storage_token_ttl_secs: Some(0.1),
        ..Faults::default()
    };
    let env = TestEnv::new(SimConfig { seed: 5, faults, ..SimConfig::default() }).await;
    let photos = photos(&env, 4);
    // Six rows, four photos: rows 4 and 5 share photos with rows 0 and 1.
    let night1 = catalog(&env, "night1.csv", "A", &photos, &[0, 1, 2, 3, 0, 1]);
    let out = output(env.run_cmd(&night1, &["--provider", "fal", "--concurrency", "3"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&6), "{}", stderr(&out));
    let stats = env.sim.stats().await;
    assert_eq!(stats.uploads, 4, "each photo stored once: {stats:?}");
    assert_eq!(stats.accepted, 6);
    assert!(stats.by_status.get(&503).copied().unwrap_or(0) > 0, "the 5xx fault fired: {stats:?}");
    assert!(stats.expired_token_refusals > 0, "a token expired under the client: {stats:?}");
    assert_eq!(attempts(&env).await, 6, "an upload is never a paid attempt");
    assert!(env.double_charges().await.is_empty());
    assert_eq!(env.verify_outputs().await, 6);

    // The next night: new rows on the same photos, one of them re-shot.
    photo([1, 2, 3]).save(&photos[3]).unwrap();
    let night2 = catalog(&env, "night2.csv", "B", &photos, &[0, 1, 2, 3]);
    // Without reuse every row is a new paid request, so the upload log is what saves the bytes
    // (with reuse, rows on unchanged photos would copy last night's results and upload nothing).
    let out = output(env.run_cmd(&night2, &["--provider", "fal", "--no-reuse"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let after = env.sim.stats().await;
    assert_eq!(after.uploads, 5, "only the changed photo goes up again: {after:?}");
    assert_eq!(after.accepted, 10);
    env.sim.shutdown().await;
}

#[tokio::test]
async fn without_the_v3_flow_the_initiate_flow_uploads() {
    let faults = Faults { storage_v3_unavailable: true, ..Faults::default() };
    let env = TestEnv::new(SimConfig { seed: 3, faults, ..SimConfig::default() }).await;
    let photos = photos(&env, 3);
    let cat = catalog(&env, "c.csv", "C", &photos, &[0, 1, 2]);
    let out = output(env.run_cmd(&cat, &["--provider", "fal", "--fal-rest-base", &env.sim.base_url()])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stats = env.sim.stats().await;
    assert_eq!(stats.uploads, 3, "{stats:?}");
    assert_eq!(stats.by_route.get("PUT {upload_url}"), Some(&3), "{stats:?}");
    assert_eq!(stats.by_route.get("POST /storage/upload/initiate"), Some(&3), "{stats:?}");
    assert_eq!(env.verify_outputs().await, 3);
    env.sim.shutdown().await;
}

#[tokio::test]
async fn a_file_that_is_not_an_image_is_refused_before_anything_is_paid() {
    let env = TestEnv::plain().await;
    let mut files = photos(&env, 1);
    let text = env.path("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    files.push(text);
    let cat = catalog(&env, "c.csv", "D", &files, &[0, 1]);
    // Refused when the catalog is planned: nothing is sent, the line is named.
    let out = output(env.run_cmd(&cat, &["--provider", "fal"])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("line 3: image"), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a PNG, JPEG or WebP image"), "{}", stderr(&out));
    assert_eq!(env.sim.stats().await.accepted, 0);
    // --skip-invalid runs the good row; the refused file is never uploaded or paid for.
    let out = output(env.run_cmd(&cat, &["--provider", "fal", "--skip-invalid"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let states = env.states().await;
    assert_eq!(states.get("done"), Some(&1), "{}", stderr(&out));
    assert_eq!(env.sim.stats().await.accepted, 1);
    assert_eq!(attempts(&env).await, 1, "the refused file never became an attempt");
    env.sim.shutdown().await;
}
