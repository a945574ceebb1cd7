//! Export presets in real runs: every done row gets one durable, recorded file per preset and
//! output (the requested size, format and canvas), originals stay as they were, a review row gets
//! its exports when accepted, and exports lost to a crash or a kill are made again without any
//! request being paid for twice.

use std::path::Path;

use backdrop_sim::faults::Alterations;
use backdrop_sim::{Faults, SimConfig};
use sha2::{Digest, Sha256};

use crate::harness::{TestEnv, code, output, stderr};

/// Two presets: a white 400×200 JPEG canvas (wider than the square outputs, so padded) and a WebP at most 64 px on its longest side.
const TEMPLATE: &str = "+++
model = \"seedream-v4-5\"
task = \"edit\"

[export.square]
canvas = \"400x200\"
background = \"#ffffff\"
format = \"jpeg\"
quality = 85

[export.thumb]
resize = \"64x64\"
format = \"webp\"
+++
Place the {color} {name} on a plain white background
";

fn template(env: &TestEnv, text: &str) -> String {
    let path = env.path("exports-prompt.md");
    std::fs::write(&path, text).expect("write the template");
    path.display().to_string()
}

/// `(sku, state, preset, path, sha256, bytes, width, height, content type)` of every export.
type ExportRow = (String, String, String, String, String, i64, i64, i64, String);

async fn exports(env: &TestEnv) -> Vec<ExportRow> {
    let store = env.store().await;
    let rows = sqlx::query_as(
        "SELECT j.sku, j.state, e.preset, e.path, e.sha256, e.bytes, e.width, e.height, e.content_type
         FROM exports e JOIN jobs j ON j.id = e.job_id ORDER BY j.sku, e.idx, e.preset",
    )
    .fetch_all(store.pool())
    .await
    .expect("exports");
    store.close().await;
    rows
}

/// sha256 of every original, by path, from the files themselves.
fn originals(env: &TestEnv, paths: &[String]) -> Vec<(String, String)> {
    paths
        .iter()
        .map(|p| {
            let data = std::fs::read(env.out().join(p)).expect("original on disk");
            (p.clone(), format!("{:x}", Sha256::digest(&data)))
        })
        .collect()
}

async fn output_paths(env: &TestEnv) -> Vec<String> {
    let store = env.store().await;
    let rows: Vec<(String,)> = sqlx::query_as("SELECT path FROM outputs ORDER BY path")
        .fetch_all(store.pool())
        .await
        .expect("outputs");
    store.close().await;
    rows.into_iter().map(|(p,)| p).collect()
}

/// Checks each recorded export against its file: on disk, the recorded sha256 and size, and the
/// preset's format, size and canvas.
fn check_files(out: &Path, rows: &[ExportRow]) {
    for (sku, _, preset, path, sha, bytes, w, h, content_type) in rows {
        let data = std::fs::read(out.join(path)).unwrap_or_else(|e| panic!("{sku} {preset}: {path}: {e}"));
        assert_eq!(data.len() as i64, *bytes, "{sku} {preset}: size");
        assert_eq!(&format!("{:x}", Sha256::digest(&data)), sha, "{sku} {preset}: sha256");
        let format = image::guess_format(&data).expect("an image format");
        let img = image::load_from_memory(&data).expect("the export decodes");
        assert_eq!((i64::from(img.width()), i64::from(img.height())), (*w, *h), "{sku} {preset}");
        match preset.as_str() {
            "square" => {
                assert_eq!(format, image::ImageFormat::Jpeg, "{sku}");
                assert_eq!(content_type, "image/jpeg");
                assert_eq!((img.width(), img.height()), (400, 200), "{sku}: the canvas size");
                assert!(path.starts_with("square/") && path.ends_with(".jpg"), "{path}");
                // The square output is padded left and right with the background colour, white.
                let corner = img.to_rgb8().get_pixel(0, 0).0;
                assert!(corner.iter().all(|&c| c >= 245), "{sku}: corner {corner:?}");
            }
            "thumb" => {
                assert_eq!(format, image::ImageFormat::WebP, "{sku}");
                assert_eq!(content_type, "image/webp");
                assert_eq!(img.width().max(img.height()), 64, "{sku}: fits inside 64x64");
                assert!(path.starts_with("thumb/") && path.ends_with(".webp"), "{path}");
            }
            other => panic!("unexpected preset {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_rows_get_every_preset_and_accepted_review_rows_get_them_on_accept() {
    const ROWS: usize = 12;
    let alterations = Alterations { blank_rate: 0.25, ..Alterations::default() };
    let config =
        SimConfig { seed: 11, faults: Faults { alterations, ..Faults::default() }, ..SimConfig::default() };
    let env = TestEnv::new(config).await;
    let catalog = env.catalog(ROWS);
    let prompt = template(&env, TEMPLATE);
    let out = output(env.run_cmd(&catalog, &["--prompt", &prompt])).await;
    let states = env.states().await;
    let review = usize::try_from(states.get("review").copied().unwrap_or(0)).unwrap();
    assert!(review > 0 && review < ROWS, "the seed holds some rows: {states:?} {}", stderr(&out));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let paths = output_paths(&env).await;
    let before = originals(&env, &paths);

    // Each done row has both exports of its one output; review rows have none yet.
    let rows = exports(&env).await;
    assert_eq!(rows.len(), 2 * (ROWS - review), "{rows:?}");
    assert!(rows.iter().all(|r| r.1 == "done"), "only done rows have exports: {rows:?}");
    check_files(&env.out(), &rows);
    assert_eq!(env.verify_outputs().await, ROWS, "originals are recorded and verified");
    assert!(env.temp_files().is_empty(), "{:?}", env.temp_files());

    // The report lists each row's exports, in columns appended at the end.
    let report = env.csv_report().await;
    let mut reader = csv::Reader::from_reader(report.as_bytes());
    let header: Vec<String> = reader.headers().expect("header").iter().map(str::to_owned).collect();
    assert_eq!(&header[header.len() - 2..], ["export_paths", "export_sha256"], "{header:?}");
    for record in reader.records() {
        let record = record.expect("a row");
        let (state, paths, hashes) = (&record[1], &record[header.len() - 2], &record[header.len() - 1]);
        let n = if state == "done" { 2 } else { 0 };
        assert_eq!(paths.split(';').filter(|p| !p.is_empty()).count(), n, "{record:?}");
        assert_eq!(hashes.split(';').filter(|p| !p.is_empty()).count(), n, "{record:?}");
    }
    let json = env.path("report.json");
    let mut cmd = env.cmd();
    cmd.args(["report", "--format", "json", "--output"]).arg(&json).arg("--state").arg(env.state());
    assert_eq!(code(&output(cmd).await), 0);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("JSON");
    let listed: usize = doc["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["exports"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(listed, rows.len());

    // Accepting the review rows makes their exports first; nothing is paid.
    let paid = env.sim.ledger().await.len();
    let mut cmd = env.cmd();
    cmd.args(["accept", "--all-review", "--state"]).arg(env.state());
    let acc = output(cmd).await;
    assert_eq!(code(&acc), 0, "{}", stderr(&acc));
    assert_eq!(env.states().await.get("done").copied(), Some(i64::try_from(ROWS).unwrap()));
    let rows = exports(&env).await;
    assert_eq!(rows.len(), 2 * ROWS, "{rows:?}");
    check_files(&env.out(), &rows);
    assert_eq!(originals(&env, &paths), before, "originals are never changed");
    assert_eq!(env.sim.ledger().await.len(), paid, "accepting pays for nothing");
    assert!(env.temp_files().is_empty(), "{:?}", env.temp_files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_exports_are_made_again_from_the_originals_without_a_request() {
    const ROWS: usize = 5;
    let env = TestEnv::plain().await;
    let catalog = env.catalog(ROWS);
    let prompt = template(&env, TEMPLATE);
    let out = output(env.run_cmd(&catalog, &["--prompt", &prompt, "--no-quality-gate"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let first = exports(&env).await;
    assert_eq!(first.len(), 2 * ROWS);
    let paths = output_paths(&env).await;
    let before = originals(&env, &paths);
    let (paid, submits) = (env.sim.ledger().await.len(), env.sim.stats().await.submits);

    // As if the process had died after the originals and before the exports: files and records gone.
    for preset in ["square", "thumb"] {
        std::fs::remove_dir_all(env.out().join(preset)).expect("remove an export folder");
    }
    let store = env.store().await;
    sqlx::query("DELETE FROM exports").execute(store.pool()).await.expect("delete the records");
    store.close().await;

    let again = output(env.run_cmd(&catalog, &["--prompt", &prompt, "--no-quality-gate"])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    let rows = exports(&env).await;
    assert_eq!(rows.len(), 2 * ROWS);
    check_files(&env.out(), &rows);
    // The same pixels through the same preset: the same files.
    let key = |r: &ExportRow| (r.0.clone(), r.2.clone(), r.4.clone());
    assert_eq!(rows.iter().map(key).collect::<Vec<_>>(), first.iter().map(key).collect::<Vec<_>>());
    assert_eq!(originals(&env, &paths), before);
    assert_eq!(env.sim.ledger().await.len(), paid, "nothing is paid again");
    assert_eq!(env.sim.stats().await.submits, submits, "no request is sent");
    assert!(env.double_charges().await.is_empty());

    // A changed preset is made again the same way; the other one is left alone.
    let changed = TEMPLATE.replace("canvas = \"400x200\"", "canvas = \"200x200\"");
    let prompt = template(&env, &changed);
    let third = output(env.run_cmd(&catalog, &["--prompt", &prompt, "--no-quality-gate"])).await;
    assert_eq!(code(&third), 0, "{}", stderr(&third));
    let rows = exports(&env).await;
    assert!(rows.iter().filter(|r| r.2 == "square").all(|r| (r.6, r.7) == (200, 200)), "{rows:?}");
    let thumbs = |rows: &[ExportRow]| rows.iter().filter(|r| r.2 == "thumb").map(key).collect::<Vec<_>>();
    assert_eq!(thumbs(&rows), thumbs(&first));
    assert_eq!(env.sim.ledger().await.len(), paid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_while_exporting_is_finished_by_the_next_without_paying_twice() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(1);
    // A large lossless canvas takes a while to render and encode: the kill lands after the
    // original is durable and before the row is done.
    let slow = TEMPLATE.replace(
        "[export.thumb]\nresize = \"64x64\"\nformat = \"webp\"",
        "[export.thumb]\nresize = \"64x64\"\nformat = \"webp\"\n\n[export.poster]\ncanvas = \"4000x4000\"\nformat = \"png\"",
    );
    let prompt = template(&env, &slow);
    let mut child =
        env.run_cmd(&catalog, &["--prompt", &prompt, "--no-quality-gate"]).spawn().expect("spawn");
    let original = env.out().join("SKU-0000");
    let seen = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let ready = std::fs::read_dir(&original)
                .map(|d| d.flatten().any(|e| !e.file_name().to_string_lossy().contains("backdrop-tmp")))
                .unwrap_or(false);
            if ready {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "the original appears");
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("wait");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    let states = env.states().await;
    assert_eq!(states.get("done"), None, "killed while exporting, before the row was done: {states:?}");
    assert_eq!(env.sim.ledger().await.len(), 1);

    let again = output(env.run_cmd(&catalog, &["--prompt", &prompt, "--no-quality-gate"])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(env.states().await.get("done"), Some(&1));
    let rows = exports(&env).await;
    assert_eq!(rows.iter().map(|r| r.2.as_str()).collect::<Vec<_>>(), ["poster", "square", "thumb"]);
    for (_, _, preset, path, sha, ..) in &rows {
        let data = std::fs::read(env.out().join(path)).expect("export on disk");
        assert_eq!(&format!("{:x}", Sha256::digest(&data)), sha, "{preset}");
    }
    let poster = rows.iter().find(|r| r.2 == "poster").expect("poster");
    assert_eq!((poster.6, poster.7), (4000, 4000));
    assert_eq!(env.verify_outputs().await, 1);
    assert_eq!(env.sim.ledger().await.len(), 1, "the resumed row is collected, not paid again");
    assert!(env.double_charges().await.is_empty());
    assert!(env.temp_files().is_empty(), "{:?}", env.temp_files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_presets_with_object_storage_are_refused_before_anything_is_sent() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(2);
    let prompt = template(&env, TEMPLATE);
    let out = output(env.run_cmd(&catalog, &["--prompt", &prompt, "--out", "s3://bucket/prefix"])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("export presets (square, thumb) need a local output folder"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.sim.stats().await.submits, 0);
}
