//! `status`, `retry` and `report` against a real state file: fixtures are written with SQL into a
//! store opened in a tempdir (with real PNGs for inputs and outputs), then the real binary runs.
//! The HTML report is loaded in headless Chromium to check every picture decodes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use backdrop::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_backdrop");

struct Fixture {
    dir: tempfile::TempDir,
    state: PathBuf,
    out: PathBuf,
}

/// A product on a plain backdrop: a coloured disc, so before/after thumbnails are recognisable.
fn product_png(path: &Path, size: u32, disc: [u8; 3], backdrop: impl Fn(u32, u32) -> [u8; 3]) {
    let c = f64::from(size) / 2.0;
    let r = f64::from(size) / 3.0;
    let img = image::RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (f64::from(x) - c, f64::from(y) - c);
        image::Rgb(if dx * dx + dy * dy < r * r { disc } else { backdrop(x, y) })
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

struct JobRow<'a> {
    sku: &'a str,
    position: i64,
    state: &'a str,
    provider: &'a str,
    inputs: Vec<String>,
    credits: f64,
    attempts: i64,
    request_id: Option<&'a str>,
    error: Option<&'a str>,
    prompt: &'a str,
}

async fn insert_job(store: &Store, j: &JobRow<'_>) -> i64 {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO jobs (sku, position, planned_run, fingerprint, provider, model, task, prompt, inputs, params,
                           state, attempts, next_attempt_at, request_id, status_url, credits, error, error_class,
                           created_at, updated_at)
         VALUES (?1, ?2, 2, 'fp', ?3, 'seedream-4', 'edit', ?4, ?5, '{\"num_images\":1}', ?6, ?7,
                 CASE WHEN ?6 = 'waiting' THEN 1795000100000 END, ?8, CASE WHEN ?8 IS NOT NULL THEN 'http://x/s' END,
                 ?9, ?10, CASE WHEN ?10 IS NOT NULL THEN 'fail' END, 1795000000000, 1795000050000)
         RETURNING id",
    )
    .bind(j.sku)
    .bind(j.position)
    .bind(j.provider)
    .bind(j.prompt)
    .bind(serde_json::to_string(&j.inputs).unwrap())
    .bind(j.state)
    .bind(j.attempts)
    .bind(j.request_id)
    .bind(j.credits)
    .bind(j.error)
    .fetch_one(store.pool())
    .await
    .unwrap();
    id
}

async fn insert_output(store: &Store, out: &Path, job: i64, idx: i64, rel: &str, disc: [u8; 3]) {
    product_png(&out.join(rel), 640, disc, |x, y| {
        let t = u8::try_from((x + y) * 255 / 1280).unwrap();
        [230 - t / 4, 220 - t / 3, 200]
    });
    sqlx::query(
        "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url)
         VALUES (?1, ?2, ?3, ?4, 1000, 640, 640, 'image/png', 'http://sim/out.png')",
    )
    .bind(job)
    .bind(idx)
    .bind(rel)
    .bind(format!("{:064x}", job * 10 + idx))
    .execute(store.pool())
    .await
    .unwrap();
}

/// Seven rows in every interesting state, two runs, real input and output PNGs.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let out = dir.path().join("out");
    let store = Store::open(&state).await.unwrap();
    for (id, started, ended, outcome, code) in [
        (1, 1_794_990_000_000_i64, Some(1_794_990_060_000_i64), "interrupted", 130),
        (2, 1_795_000_000_000, Some(1_795_000_120_000), "rows_failed", 3),
    ] {
        sqlx::query(
            "INSERT INTO runs (id, started_at, ended_at, catalog, provider, model, outcome, exit_code)
             VALUES (?1, ?2, ?3, 'catalog.csv', 'seedance', 'seedream-4', ?4, ?5)",
        )
        .bind(id)
        .bind(started)
        .bind(ended)
        .bind(outcome)
        .bind(code)
        .execute(store.pool())
        .await
        .unwrap();
    }
    let input = |name: &str, disc: [u8; 3]| {
        let p = dir.path().join("catalog").join(name);
        product_png(&p, 500, disc, |_, _| [128, 128, 128]);
        p.display().to_string()
    };
    let red = [200, 40, 40];
    let blue = [40, 70, 200];
    let green = [40, 160, 80];
    let rows = [
        // Inserted out of catalog order: reports must follow `position`, not `id`.
        JobRow {
            sku: "SKU-004",
            position: 4,
            state: "done",
            provider: "fal",
            inputs: vec![input("4.png", green)],
            credits: 0.03,
            attempts: 1,
            request_id: Some("fal-req-4"),
            error: None,
            prompt: "forest floor",
        },
        JobRow {
            sku: "SKU-001",
            position: 1,
            state: "done",
            provider: "seedance",
            inputs: vec![input("1.png", red)],
            credits: 30.0,
            attempts: 1,
            request_id: Some("sd-req-1"),
            error: None,
            prompt: "white studio",
        },
        JobRow {
            sku: "SKU-002",
            position: 2,
            state: "failed",
            provider: "seedance",
            inputs: vec![input("2.png", blue)],
            credits: 0.0,
            attempts: 1,
            request_id: None,
            error: Some("HTTP 422 content_policy: <b>blocked</b> & \"refused\""),
            prompt: "beach",
        },
        JobRow {
            sku: "SKU-003",
            position: 3,
            state: "ambiguous",
            provider: "fal",
            inputs: vec!["https://cdn.example.com/3.jpg".into()],
            credits: 0.03,
            attempts: 1,
            request_id: None,
            error: None,
            prompt: "marble",
        },
        JobRow {
            sku: "SKU-005",
            position: 5,
            state: "pending",
            provider: "seedance",
            inputs: vec![input("5.png", red)],
            credits: 0.0,
            attempts: 0,
            request_id: None,
            error: None,
            prompt: "=HYPERLINK(\"http://evil\")",
        },
        JobRow {
            sku: "SKU-006",
            position: 6,
            state: "waiting",
            provider: "seedance",
            inputs: vec![input("6.png", blue)],
            credits: 0.0,
            attempts: 2,
            request_id: None,
            error: Some("HTTP 503"),
            prompt: "kitchen",
        },
        JobRow {
            sku: "SKU-007",
            position: 7,
            state: "failed",
            provider: "seedance",
            inputs: vec![dir.path().join("gone.png").display().to_string()],
            credits: 0.0,
            attempts: 5,
            request_id: None,
            error: Some("timed out after 5 attempts"),
            prompt: "<script>alert('x')</script>",
        },
    ];
    for row in &rows {
        let id = insert_job(&store, row).await;
        match row.sku {
            "SKU-001" => insert_output(&store, &out, id, 0, "SKU-001/0.png", red).await,
            "SKU-004" => {
                insert_output(&store, &out, id, 0, "SKU-004/0.png", green).await;
                insert_output(&store, &out, id, 1, "SKU-004/1.png", [240, 180, 20]).await;
            }
            _ => {}
        }
    }
    store.close().await;
    Fixture { dir, state, out }
}

fn backdrop(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("BACKDROP_STATE")
        .env_remove("BACKDROP_OUT")
        .env_remove("BACKDROP_CONFIG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn job_row(state: &Path, sku: &str) -> (String, i64, Option<String>, Option<i64>, Option<String>) {
    let store = Store::open(state).await.unwrap();
    let row =
        sqlx::query_as("SELECT state, attempts, error, next_attempt_at, request_id FROM jobs WHERE sku = ?1")
            .bind(sku)
            .fetch_one(store.pool())
            .await
            .unwrap();
    store.close().await;
    row
}

#[tokio::test]
async fn status_shows_counts_money_failures_and_the_last_run() {
    let f = fixture().await;
    let o = backdrop(&["status", "--state", s(&f.state)]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    assert!(text.contains("rows: 7"), "{text}");
    assert!(text.contains("  done             2\n"), "{text}");
    assert!(text.contains("  failed           2\n"), "{text}");
    assert!(text.contains("spent: seedance 30 credits ($0.30); fal $0.06; total $0.36"), "{text}");
    assert!(text.contains("last run: #2 started 2026-11-18T11:06:40Z, ended 2026-11-18T11:08:40Z, outcome rows_failed (exit 3)"), "{text}");
    assert!(text.contains("SKU-002  (1 attempt) HTTP 422 content_policy"), "{text}");
    assert!(text.contains("SKU-007  (5 attempts) timed out after 5 attempts"), "{text}");
    assert!(text.contains("ambiguous (1)") && text.contains("may be charged twice"), "{text}");
    assert!(text.contains("SKU-003"), "{text}");

    let o = backdrop(&["status", "--json", "--state", s(&f.state)]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["counts"]["total"], 7);
    assert_eq!(v["counts"]["ambiguous"], 1);
    assert_eq!(v["spent"]["seedance_credits"], 30.0);
    assert_eq!(v["last_run"]["id"], 2);
    assert_eq!(v["last_run"]["outcome"], "rows_failed");
    let failed: Vec<&str> =
        v["failed"].as_array().unwrap().iter().map(|j| j["sku"].as_str().unwrap()).collect();
    assert_eq!(failed, ["SKU-002", "SKU-007"]);
    assert_eq!(v["ambiguous"][0]["sku"], "SKU-003");
}

#[tokio::test]
async fn status_of_a_missing_state_file_is_a_usage_error_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("nope.db");
    for cmd in [&["status"][..], &["retry", "--failed"], &["report", "--format", "json"]] {
        let mut args = cmd.to_vec();
        args.extend(["--state", s(&state)]);
        let o = backdrop(&args);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("no state database at"), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing may be created");
}

#[tokio::test]
async fn the_state_path_can_come_from_the_config_file() {
    let f = fixture().await;
    let config = f.dir.path().join("backdrop.toml");
    std::fs::write(&config, format!("state = {:?}\n", s(&f.state))).unwrap();
    let o = backdrop(&["--config", s(&config), "status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["counts"]["total"], 7);
}

#[tokio::test]
async fn retry_failed_requeues_and_resets_them() {
    let f = fixture().await;
    let o = backdrop(&["retry", "--failed", "--state", s(&f.state)]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    assert!(text.contains("re-queued 2 rows (2 failed)"), "{text}");
    assert!(!text.contains("charged twice"), "no ambiguous row was selected: {text}");
    for sku in ["SKU-002", "SKU-007"] {
        assert_eq!(job_row(&f.state, sku).await, ("pending".into(), 0, None, None, None), "{sku}");
    }
    assert_eq!(job_row(&f.state, "SKU-003").await.0, "ambiguous");
    // Money spent stays spent.
    let v: serde_json::Value =
        serde_json::from_slice(&backdrop(&["status", "--json", "--state", s(&f.state)]).stdout).unwrap();
    assert_eq!(v["counts"]["pending"], 3);
    assert_eq!(v["spent"]["total_dollars"], 0.36);

    let o = backdrop(&["retry", "--failed", "--state", s(&f.state)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("nothing to re-queue"), "{}", stdout(&o));
}

#[tokio::test]
async fn retry_ambiguous_lists_the_risk_before_requeueing() {
    let f = fixture().await;
    let o = backdrop(&["retry", "--ambiguous", "--state", s(&f.state)]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    let warning = text.find("may be charged twice").expect(&text);
    let listed = text.find("  SKU-003  (ambiguous, 1 attempt(s)").expect(&text);
    let done = text.find("re-queued 1 row (1 ambiguous);").expect(&text);
    assert!(warning < listed && listed < done, "{text}");
    assert_eq!(job_row(&f.state, "SKU-003").await, ("pending".into(), 0, None, None, None));
}

#[tokio::test]
async fn retry_by_sku_reports_unknown_skus_and_keeps_live_requests() {
    let f = fixture().await;
    let o = backdrop(&["retry", "--sku", "NOPE-1", "NOPE-2", "--state", s(&f.state)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stdout(&o).contains("unknown SKU: NOPE-1"), "{}", stdout(&o));
    assert!(stderr(&o).contains("nothing was re-queued"), "{}", stderr(&o));

    // SKU-001 is done: the provider charged it, so naming it is not enough to pay again.
    // SKU-006 waits with no live request.
    let o = backdrop(&["retry", "--sku", "SKU-001", "SKU-006", "SKU-005", "NOPE", "--state", s(&f.state)]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    assert!(text.contains("unknown SKU: NOPE"), "{text}");
    assert!(text.contains("SKU-005: already pending"), "{text}");
    assert!(
        text.contains("SKU-001: left as done: the provider already charged for it (request sd-req-1)"),
        "{text}"
    );
    assert!(text.contains("re-queued 1 row (1 waiting)"), "{text}");
    assert_eq!(job_row(&f.state, "SKU-001").await.0, "done");
    // With the flag that says so, it is re-queued, and the warning says it is paid for again.
    let o = backdrop(&["retry", "--sku", "SKU-001", "--pay-again", "--state", s(&f.state)]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    assert!(text.contains("warning: --pay-again: 1 row(s) the provider already charged are re-queued: the next run pays for them again"), "{text}");
    assert!(text.contains("re-queued 1 row (1 done)"), "{text}");
    assert_eq!(job_row(&f.state, "SKU-001").await, ("pending".into(), 0, None, None, None));
    assert_eq!(job_row(&f.state, "SKU-006").await, ("pending".into(), 0, None, None, None));

    // A row with a saved, live request is left for `run` to resume: re-queueing it would pay twice.
    let store = Store::open(&f.state).await.unwrap();
    sqlx::query("UPDATE jobs SET state = 'submitted', request_id = 'sd-live' WHERE sku = 'SKU-004'")
        .execute(store.pool())
        .await
        .unwrap();
    store.close().await;
    let o = backdrop(&["retry", "--sku", "SKU-004", "--state", s(&f.state)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("SKU-004: left as submitted: its paid request sd-live is saved"),
        "{}",
        stdout(&o)
    );
    assert_eq!(job_row(&f.state, "SKU-004").await.4.as_deref(), Some("sd-live"));
}

#[tokio::test]
async fn retry_refuses_while_a_run_holds_the_state_file() {
    let f = fixture().await;
    let _lock = backdrop::store::RunLock::acquire(&f.state).unwrap();
    let o = backdrop(&["retry", "--failed", "--state", s(&f.state)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("another backdrop run is using"), "{}", stderr(&o));
    assert_eq!(job_row(&f.state, "SKU-002").await.0, "failed");
}

#[tokio::test]
async fn csv_report_is_in_catalog_order_and_spreadsheet_safe() {
    let f = fixture().await;
    let file = f.dir.path().join("report.csv");
    let o = backdrop(&["report", "--format", "csv", "--output", s(&file), "--state", s(&f.state)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut r = csv::Reader::from_path(&file).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(
        header,
        [
            "sku",
            "state",
            "provider",
            "request_id",
            "prompt",
            "output_paths",
            "sha256",
            "credits",
            "attempts",
            "error",
            "reused_from",
            "quality_scores",
            "quality_reasons",
            "export_paths",
            "export_sha256"
        ]
    );
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let skus: Vec<&str> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(skus, ["SKU-001", "SKU-002", "SKU-003", "SKU-004", "SKU-005", "SKU-006", "SKU-007"]);
    assert_eq!(&rows[0][3], "sd-req-1");
    assert_eq!(&rows[0][5], "SKU-001/0.png");
    assert_eq!(&rows[0][7], "30");
    assert_eq!(&rows[3][5], "SKU-004/0.png;SKU-004/1.png");
    assert_eq!(rows[3][6].split(';').count(), 2);
    assert_eq!(&rows[4][4], "'=HYPERLINK(\"http://evil\")");
    assert_eq!(&rows[1][9], "HTTP 422 content_policy: <b>blocked</b> & \"refused\"");

    // Stdout gives the same bytes.
    let o = backdrop(&["report", "--format", "csv", "--state", s(&f.state)]);
    assert_eq!(o.stdout, std::fs::read(&file).unwrap());
}

#[tokio::test]
async fn json_report_is_versioned_with_every_row() {
    let f = fixture().await;
    let o = backdrop(&["report", "--format", "json", "--state", s(&f.state)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7);
    assert_eq!(rows[0]["sku"], "SKU-001");
    assert_eq!(rows[0]["dollars"], 0.3);
    assert_eq!(rows[3]["outputs"][1]["path"], "SKU-004/1.png");
    assert_eq!(rows[3]["outputs"][1]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(rows[1]["error"], "HTTP 422 content_policy: <b>blocked</b> & \"refused\"");
    assert_eq!(v["spent"]["fal_dollars"], 0.06);
}

/// Clicks the `done` filter and the first visible picture, then records what is shown.
const CLICK_SCRIPT: &str = r#"<script>
window.addEventListener('load', function () {
  document.querySelector('[data-filter="done"]').click();
  var cards = Array.prototype.filter.call(document.querySelectorAll('.card'), function (c) { return !c.hidden; });
  document.body.dataset.visible = cards.length;
  cards[0].querySelector('img.thumb').click();
  var box = document.getElementById('lightbox');
  document.body.dataset.lightbox = (box.hidden ? 'closed' : 'open') + ':' + document.getElementById('lightbox-img').alt;
});
</script></body>"#;

/// The browser `scripts/test` found (`BACKDROP_CHROMIUM`), else the first of Chromium's usual
/// names on PATH (the same names `.ci/install-chromium` looks for).
fn chromium() -> Option<PathBuf> {
    if let Some(exe) = std::env::var_os("BACKDROP_CHROMIUM").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(exe);
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .find_map(|name| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Runs headless Chromium with its quiet, offline flags and a fresh profile; kills it after a
/// generous timeout so a wedged browser fails the test instead of hanging it.
/// Output goes to files: a dumped DOM full of data: URIs would fill a pipe nobody reads yet.
fn run_chromium(exe: &Path, profile: &Path, extra: &[&str], url: &str) -> Output {
    std::fs::create_dir_all(profile).unwrap();
    let out_path = profile.with_extension("stdout");
    let err_path = profile.with_extension("stderr");
    let mut child = Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Output {
        status: child.wait().unwrap(),
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&err_path).unwrap(),
    }
}

#[tokio::test]
async fn html_report_is_a_self_contained_gallery_that_chromium_renders() {
    let f = fixture().await;
    let file = f.dir.path().join("report.html");
    let o = backdrop(&[
        "report",
        "--format",
        "html",
        "--output",
        s(&file),
        "--out",
        s(&f.out),
        "--state",
        s(&f.state),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let html = std::fs::read_to_string(&file).unwrap();

    // Offline and escaped: no reference to anything but data: URIs and the one remote input link.
    assert!(!html.contains("src=\"http"), "images must be embedded");
    assert!(!html.contains("src=\"/"), "images must be embedded");
    assert!(html.contains("href=\"https://cdn.example.com/3.jpg\""));
    assert!(!html.contains("<b>blocked</b>") && html.contains("&lt;b&gt;blocked&lt;/b&gt;"));
    assert!(!html.contains("<script>alert"));
    // Failed rows first, each with its reason.
    let first_card = html.find("<article").unwrap();
    assert!(html[first_card..].starts_with("<article class=\"card\" data-state=\"failed\""));
    // 4 local inputs that exist + 3 outputs; SKU-007's input is gone and shows a placeholder.
    let thumbs = html.matches("<img class=\"thumb\"").count();
    assert_eq!(thumbs, 8, "SKU-001,2,4,5,6 before + 3 after");
    assert!(html.contains("gone.png<br><small>cannot open"));

    if std::env::var("BACKDROP_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("BACKDROP_SKIP_BROWSER=1: not loading the report in Chromium");
        return;
    }
    let exe = chromium().unwrap_or_else(|| {
        panic!(
            "no Chromium on PATH (chromium, chromium-browser, google-chrome): install one (.ci/install-chromium \
             does, where it can), or set BACKDROP_SKIP_BROWSER=1 to skip this test"
        )
    });
    let url = format!("file://{}", file.display());
    let dom = run_chromium(
        &exe,
        &f.dir.path().join("profile-dom"),
        &["--virtual-time-budget=5000", "--dump-dom"],
        &url,
    );
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.status.success(), "chromium --dump-dom failed: {}", String::from_utf8_lossy(&dom.stderr));
    assert!(
        dom_text.contains(&format!("data-decoded=\"{thumbs}/{thumbs}\"")),
        "every <img> must decode (naturalWidth > 0); body was: {}",
        dom_text.lines().find(|l| l.contains("<body")).unwrap_or("no <body> line")
    );

    // The filters and the lightbox: a copy of the page with a script that clicks them (the
    // report's CSP allows inline scripts, and nothing else).
    let clicks = f.dir.path().join("clicks.html");
    std::fs::write(&clicks, html.replace("</body>", CLICK_SCRIPT)).unwrap();
    let dom = run_chromium(
        &exe,
        &f.dir.path().join("profile-clicks"),
        &["--virtual-time-budget=5000", "--dump-dom"],
        &format!("file://{}", clicks.display()),
    );
    let body = String::from_utf8_lossy(&dom.stdout);
    let body = body.lines().find(|l| l.contains("<body")).unwrap_or("no <body> line");
    assert!(body.contains("data-visible=\"2\""), "the `done` filter shows the 2 done rows: {body}");
    assert!(body.contains("data-lightbox=\"open:SKU-001 before\""), "a click enlarges the picture: {body}");

    let shot = f.dir.path().join("report.png");
    let o = run_chromium(
        &exe,
        &f.dir.path().join("profile-shot"),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,900",
            "--virtual-time-budget=5000",
        ],
        &url,
    );
    assert!(o.status.success(), "chromium --screenshot failed: {}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(&shot).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 900));
    // For a person to look at: BACKDROP_KEEP_REPORT=DIR keeps the report and its screenshot.
    if let Some(keep) = std::env::var_os("BACKDROP_KEEP_REPORT") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(&file, keep.join("report.html")).unwrap();
        std::fs::copy(&shot, keep.join("report.png")).unwrap();
    }
}

/// The size and time of a 1,000-row gallery with photo-like (gradients plus sensor-like noise,
/// 1024 px) pictures. Slow in
/// a debug build, so it runs on demand: `cargo test --test integration thousand -- --ignored
/// --nocapture`.
#[tokio::test]
#[ignore = "a measurement: about a minute in a debug build"]
async fn thousand_row_html_report_stays_a_reasonable_size() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let out = dir.path().join("out");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut photo = |path: &Path| {
        let base: [u8; 3] = rng.random();
        let img = image::RgbImage::from_fn(1024, 1024, |x, y| {
            let n: u8 = rng.random_range(0..12);
            let shade = |c: u8, t: u32| u8::try_from((u32::from(c) + t + u32::from(n)) % 256).unwrap();
            image::Rgb([shade(base[0], x / 8), shade(base[1], y / 8), shade(base[2], (x + y) / 16)])
        });
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    };
    // Ten distinct pictures each side; every row still decodes and downscales its own.
    for i in 0..10 {
        photo(&dir.path().join(format!("in/{i}.png")));
        photo(&out.join(format!("p/{i}.png")));
    }
    let store = Store::open(&state).await.unwrap();
    sqlx::query(
        "INSERT INTO runs (id, started_at, catalog, provider, model) VALUES (2, 1, 'c.csv', 'seedance', 'm')",
    )
    .execute(store.pool())
    .await
    .unwrap();
    for i in 0..1000_i64 {
        let input = dir.path().join(format!("in/{}.png", i % 10)).display().to_string();
        let id = insert_job(
            &store,
            &JobRow {
                sku: &format!("SKU-{i:04}"),
                position: i,
                state: if i % 50 == 0 { "failed" } else { "done" },
                provider: "seedance",
                inputs: vec![input],
                credits: 30.0,
                attempts: 1,
                request_id: Some("r"),
                error: (i % 50 == 0).then_some("HTTP 422"),
                prompt: "studio",
            },
        )
        .await;
        sqlx::query(
            "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url)
             VALUES (?1, 0, ?2, 'x', 1, 1024, 1024, 'image/png', 'http://sim/x')",
        )
        .bind(id)
        .bind(format!("p/{}.png", i % 10))
        .execute(store.pool())
        .await
        .unwrap();
    }
    store.close().await;
    let file = dir.path().join("report.html");
    let started = Instant::now();
    let o = backdrop(&[
        "report",
        "--format",
        "html",
        "--output",
        s(&file),
        "--out",
        s(&out),
        "--state",
        s(&state),
    ]);
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let bytes = std::fs::metadata(&file).unwrap().len();
    eprintln!("1000-row html report: {bytes} bytes ({} KB per row) in {took:?}", bytes / 1000 / 1024);
    assert!(bytes < 50_000_000, "{bytes} bytes");
}
