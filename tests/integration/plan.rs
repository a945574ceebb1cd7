//! The planner end to end, in-process: real catalogs (the sample, fixtures, a SQLite file) planned
//! into a real state file, then the `jobs` rows checked: new, changed, done, forced, in flight,
//! dry runs that write nothing, bad catalogs that write nothing and mean exit 2.

use std::path::{Path, PathBuf};

use backdrop::domain::ProviderKind;
use backdrop::money::Unit;
use backdrop::plan::{PlanError, PlanInput, plan};
use backdrop::prompt::{PromptError, Template};
use backdrop::store::Store;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/catalog").join(name)
}

fn settings(catalog: &Path, prompt: &Path, edit: impl FnOnce(&mut PlanInput)) -> PlanInput {
    let template = Template::load(prompt).unwrap_or_else(|e| panic!("{e}"));
    let mut input = PlanInput::new(catalog, template, ProviderKind::Seedance);
    edit(&mut input);
    input
}

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).await.unwrap();
        Self { _dir: dir, store }
    }

    async fn run_id(&self) -> i64 {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO runs (started_at, catalog, provider, model) VALUES (0, 'c', 'seedance', 'm') RETURNING id",
        )
        .fetch_one(self.store.pool())
        .await
        .unwrap();
        id
    }

    async fn count(&self, sql: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(self.store.pool()).await.unwrap();
        n
    }

    async fn exec(&self, sql: &str) {
        sqlx::query(sql).execute(self.store.pool()).await.unwrap();
    }

    async fn job(
        &self,
        sku: &str,
    ) -> (String, String, String, i64, Option<i64>, String, i64, Option<String>) {
        sqlx::query_as(
            "SELECT state, prompt, inputs, position, planned_run, fingerprint, attempts, request_id FROM jobs WHERE sku = ?",
        )
        .bind(sku)
        .fetch_one(self.store.pool())
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn sample_catalog_plans_into_an_empty_store() {
    let env = Env::new().await;
    let s = settings(&root().join("sample-catalog.csv"), &root().join("prompts/marble-counter.txt"), |_| {});
    let run = env.run_id().await;
    let p = plan(&env.store, &s, Some(run)).await.unwrap();
    assert_eq!(p.counts.new, 12);
    assert_eq!(p.counts.valid(), 12);
    assert_eq!(p.to_run, 12);
    assert_eq!(p.model, "seedream-v4-5");
    assert_eq!(p.estimate.unit, Unit::Credits);
    assert_eq!(p.estimate.images, 12);
    assert_eq!(p.estimate.amount, Some(96.0));
    assert!((p.estimate.dollars.unwrap() - 0.96).abs() < 1e-9);
    let text = p.render_text();
    assert!(text.contains("new 12"), "{text}");
    assert!(text.contains("96 credits ($0.96)"), "{text}");
    assert!(
        text.contains("MUG-CER-WHT: Replace the background with a polished white Carrara marble"),
        "{text}"
    );
    assert!(!text.contains("Dry run"), "{text}");

    assert_eq!(env.count("SELECT count(*) FROM jobs WHERE state = 'pending'").await, 12);
    let (state, prompt, inputs, position, planned, fp, attempts, _) = env.job("MUG-CER-WHT").await;
    assert_eq!(state, "pending");
    assert_eq!(position, 2, "CSV line");
    assert_eq!(planned, Some(run));
    assert_eq!(attempts, 0);
    assert_eq!(fp.len(), 64);
    assert!(
        prompt.contains("Keep the Stoneware coffee mug exactly as it is: same shape, same warm white colour")
    );
    let inputs: Vec<String> = serde_json::from_str(&inputs).unwrap();
    let expected = root().join("samples/mug-white.png").canonicalize().unwrap();
    assert_eq!(inputs, [expected.to_str().unwrap()], "local images are stored as absolute canonical paths");
    let (provider, model, task, params): (String, String, String, String) =
        sqlx::query_as("SELECT provider, model, task, params FROM jobs WHERE sku = 'HDP-WRL-RED'")
            .fetch_one(env.store.pool())
            .await
            .unwrap();
    assert_eq!((provider.as_str(), model.as_str(), task.as_str()), ("seedance", "seedream-v4-5", "edit"));
    assert_eq!(params, r#"{"num_images":1,"output_format":"png"}"#);
}

#[tokio::test]
async fn dry_run_counts_the_same_and_writes_nothing() {
    let env = Env::new().await;
    let s = settings(&root().join("sample-catalog.csv"), &root().join("prompts/white-studio.txt"), |a| {
        a.limit = Some(5);
    });
    let dry = plan(&env.store, &s, None).await.unwrap();
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 0);
    assert_eq!(dry.counts.new, 12);
    assert_eq!(dry.to_run, 5, "--limit");
    assert_eq!(dry.estimate.images, 10, "two images per row");
    assert_eq!(dry.estimate.amount, Some(80.0));
    assert!(dry.render_text().contains("Dry run: nothing was sent"));
    assert!(dry.render_text().contains("(--limit; 12 in all)"));

    // Plan for real, mark some rows done, then a dry run sees exactly what a real plan sees.
    let run = env.run_id().await;
    plan(&env.store, &s, Some(run)).await.unwrap();
    env.exec("UPDATE jobs SET state = 'done' WHERE sku IN ('MUG-CER-WHT', 'MUG-CER-BLU')").await;
    let before = env.count("SELECT count(*) FROM jobs WHERE planned_run = 1").await;
    let dry = plan(&env.store, &s, None).await.unwrap();
    assert_eq!((dry.counts.done, dry.counts.pending), (2, 10));
    assert_eq!(env.count("SELECT count(*) FROM jobs WHERE planned_run = 1").await, before);
    let run2 = env.run_id().await;
    let real = plan(&env.store, &s, Some(run2)).await.unwrap();
    assert_eq!(real.counts, dry.counts);
}

#[tokio::test]
async fn replanning_follows_the_rules_per_state() {
    let env = Env::new().await;
    let catalog = root().join("sample-catalog.csv");
    let marble = settings(&catalog, &root().join("prompts/marble-counter.txt"), |_| {});
    let run1 = env.run_id().await;
    plan(&env.store, &marble, Some(run1)).await.unwrap();
    env.exec("UPDATE jobs SET state = 'done', attempts = 1, request_id = 'r-1' WHERE sku = 'MUG-CER-WHT'")
        .await;
    env.exec("UPDATE jobs SET state = 'failed', error = 'bad' WHERE sku = 'MUG-CER-BLU'").await;
    env.exec("UPDATE jobs SET state = 'submitted', request_id = 'r-3' WHERE sku = 'BTL-STL-BLK'").await;
    env.exec("UPDATE jobs SET state = 'ambiguous' WHERE sku = 'LMP-BRS-GLD'").await;
    env.exec("UPDATE jobs SET state = 'waiting', next_attempt_at = 5 WHERE sku = 'BAG-CNV-OLV'").await;
    env.exec(
        "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url) \
         SELECT id, 0, 'out/x.png', 'h', 1, 1, 1, 'image/png', 'u' FROM jobs WHERE sku = 'MUG-CER-WHT'",
    )
    .await;

    // Same catalog, same prompt: everything keeps its state and joins the new run.
    let run2 = env.run_id().await;
    let p = plan(&env.store, &marble, Some(run2)).await.unwrap();
    let c = p.counts;
    assert_eq!(
        (c.new, c.changed, c.done, c.failed, c.in_flight, c.ambiguous, c.waiting, c.pending),
        (0, 0, 1, 1, 1, 1, 1, 7)
    );
    assert_eq!(p.to_run, 8, "pending + waiting");
    assert_eq!(env.count(&format!("SELECT count(*) FROM jobs WHERE planned_run = {run2}")).await, 12);
    assert_eq!(env.job("MUG-CER-WHT").await.0, "done");

    // --force re-runs the done row only.
    let forced = settings(&catalog, &root().join("prompts/marble-counter.txt"), |a| a.force = true);
    let p = plan(&env.store, &forced, None).await.unwrap();
    assert_eq!((p.counts.forced, p.counts.done, p.counts.failed), (1, 0, 1));

    // Another prompt: every row changes, except the two with a paid request out.
    let wood = settings(&catalog, &root().join("prompts/wooden-table.txt"), |_| {});
    let run3 = env.run_id().await;
    let p = plan(&env.store, &wood, Some(run3)).await.unwrap();
    let c = p.counts;
    assert_eq!((c.changed, c.in_flight, c.ambiguous, c.done, c.failed), (10, 1, 1, 0, 0));
    let (state, prompt, _, _, planned, _, attempts, request_id) = env.job("MUG-CER-WHT").await;
    assert_eq!((state.as_str(), attempts, request_id), ("pending", 0, None));
    assert!(prompt.contains("rustic oak dining table"), "{prompt}");
    assert_eq!(planned, Some(run3));
    assert_eq!(env.count("SELECT count(*) FROM outputs").await, 0, "old outputs rows go");
    let (state, prompt, ..) = env.job("BTL-STL-BLK").await;
    assert_eq!(state, "submitted");
    assert!(prompt.contains("marble"), "in-flight rows keep their old prompt");
    assert_eq!(env.job("LMP-BRS-GLD").await.0, "ambiguous");
    let (state, .., next): (String, Option<i64>) =
        sqlx::query_as("SELECT state, next_attempt_at FROM jobs WHERE sku = 'BAG-CNV-OLV'")
            .fetch_one(env.store.pool())
            .await
            .unwrap();
    assert_eq!((state.as_str(), next), ("pending", None));
}

#[tokio::test]
async fn a_changed_local_image_reruns_its_row() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    std::fs::copy(root().join("samples/mug-white.png"), dir.path().join("img/a.png")).unwrap();
    std::fs::copy(root().join("samples/mug-blue.png"), dir.path().join("img/b.png")).unwrap();
    let catalog = dir.path().join("c.csv");
    std::fs::write(&catalog, "sku,name,color,image_url\nA,Mug,white,img/a.png\nB,Mug,blue,img/b.png\n")
        .unwrap();
    let s = settings(&catalog, &fixture("simple.txt"), |_| {});
    let run = env.run_id().await;
    plan(&env.store, &s, Some(run)).await.unwrap();
    env.exec("UPDATE jobs SET state = 'done'").await;
    std::fs::copy(root().join("samples/lamp-brass.png"), dir.path().join("img/a.png")).unwrap();
    let p = plan(&env.store, &s, None).await.unwrap();
    assert_eq!((p.counts.changed, p.counts.done), (1, 1));
}

#[tokio::test]
async fn a_bad_catalog_writes_nothing_and_means_exit_2() {
    let env = Env::new().await;
    let s = settings(&fixture("mixed.csv"), &fixture("simple.txt"), |_| {});
    let run = env.run_id().await;
    let err = plan(&env.store, &s, Some(run)).await.unwrap_err();
    assert!(!err.is_retryable(), "a bad catalog is a usage error (exit 2), not worth retrying");
    let msg = err.to_string();
    assert!(msg.contains("mixed.csv: 3 problems:"), "{msg}");
    assert!(msg.contains("\n  line 3: empty sku"), "{msg}");
    assert!(msg.contains("\n  line 5: duplicate sku \"A-1\" (first on line 2)"), "{msg}");
    assert!(msg.contains("\n  line 6: image \"../outside.png\": "), "{msg}");
    assert!(matches!(err, PlanError::Catalog(_)));
    assert_eq!(
        env.count("SELECT count(*) FROM jobs").await,
        0,
        "valid rows before the errors are not written"
    );

    let missing =
        settings(&fixture("missing-columns.csv"), &fixture("simple.txt"), |a| a.skip_invalid = true);
    let err = plan(&env.store, &missing, Some(run)).await.unwrap_err();
    assert!(
        err.to_string().contains("line 1: missing column sku"),
        "header problems stop even --skip-invalid"
    );

    // A bad template is refused when it is read, before any plan.
    let err = Template::load(&fixture("bad-front-matter.txt")).unwrap_err();
    assert!(matches!(err, PromptError::FrontMatter { .. }), "{err}");
}

#[tokio::test]
async fn skip_invalid_plans_the_valid_rows_and_lists_the_rest() {
    let env = Env::new().await;
    let s = settings(&fixture("mixed.csv"), &fixture("simple.txt"), |a| a.skip_invalid = true);
    let run = env.run_id().await;
    let p = plan(&env.store, &s, Some(run)).await.unwrap();
    assert_eq!((p.counts.new, p.counts.invalid), (3, 3));
    let lines: Vec<String> = p.invalid.iter().map(|x| x.location.to_string()).collect();
    assert_eq!(lines, ["line 3", "line 5", "line 6"]);
    let text = p.render_text();
    assert!(text.contains("Skipped 3 invalid rows:\n  line 3: empty sku"), "{text}");
    let skus: Vec<(String,)> =
        sqlx::query_as("SELECT sku FROM jobs ORDER BY position").fetch_all(env.store.pool()).await.unwrap();
    assert_eq!(skus.into_iter().map(|s| s.0).collect::<Vec<_>>(), ["A-1", "A-3", "A-6"]);
    let (_, prompt, ..) = env.job("A-3").await;
    assert_eq!(prompt, "Put the olive Tote on white marble.");
}

#[tokio::test]
async fn sqlite_catalogs_plan_by_table_and_by_query() {
    use sqlx::Connection;
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("products.db");
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&db).create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE products (sku TEXT, name TEXT, color TEXT, image_url TEXT, active INTEGER);
         INSERT INTO products (rowid, sku, name, color, image_url, active) VALUES
           (10, 'S-1', 'Mug', 'white', 'https://cdn.example.com/s1.png', 1),
           (20, 'S-2', 'Lamp', 'brass', 'https://cdn.example.com/s2.png', 0),
           (30, 'S-1', 'Dup', 'red', 'https://cdn.example.com/s3.png', 1),
           (40, '', 'NoSku', 'red', 'https://cdn.example.com/s4.png', 1);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let s = settings(&db, &fixture("simple.txt"), |a| a.catalog.table = Some("products".into()));
    let err = plan(&env.store, &s, None).await.unwrap_err().to_string();
    assert!(err.contains("rowid 30: duplicate sku \"S-1\" (first on rowid 10)"), "{err}");
    assert!(err.contains("rowid 40: empty sku"), "{err}");

    let q = settings(&db, &fixture("simple.txt"), |a| {
        a.catalog.query = Some(
            "SELECT sku, name, color, image_url FROM products WHERE active = 1 AND sku <> '' AND rowid < 30"
                .into(),
        );
    });
    let run = env.run_id().await;
    let p = plan(&env.store, &q, Some(run)).await.unwrap();
    assert_eq!(p.counts.new, 1);
    let s = settings(&db, &fixture("simple.txt"), |a| {
        a.catalog.table = Some("products".into());
        a.skip_invalid = true;
    });
    let run = env.run_id().await;
    let p = plan(&env.store, &s, Some(run)).await.unwrap();
    assert_eq!((p.counts.pending, p.counts.new, p.counts.invalid), (1, 1, 2));
    let (.., position, _, _, _, _) = env.job("S-2").await;
    assert_eq!(position, 20, "rowid is the position");
    let (state, prompt, inputs, ..) = env.job("S-1").await;
    assert_eq!(state, "pending");
    assert_eq!(prompt, "Put the white Mug on white marble.");
    assert_eq!(inputs, r#"["https://cdn.example.com/s1.png"]"#);

    let no_table = settings(&db, &fixture("simple.txt"), |_| {});
    let err = plan(&env.store, &no_table, None).await.unwrap_err().to_string();
    assert!(err.contains("--table"), "{err}");
}

#[tokio::test]
async fn fal_text_to_image_is_priced_in_dollars() {
    let env = Env::new().await;
    let s = settings(&root().join("sample-catalog.csv"), &root().join("prompts/category-header.txt"), |a| {
        a.provider = ProviderKind::Fal;
    });
    let p = plan(&env.store, &s, None).await.unwrap();
    assert_eq!(p.model, "fal-ai/bytedance/seedream/v4.5/text-to-image");
    assert_eq!(p.estimate.unit, Unit::Dollars);
    assert!((p.estimate.dollars.unwrap() - 0.48).abs() < 1e-9);
    assert!(p.render_text().contains("= $0.48"), "{}", p.render_text());
    assert!(
        p.samples[0].1.starts_with("A wide, calm web banner for the \"Kitchen\" section"),
        "{:?}",
        p.samples
    );

    let unknown =
        settings(&root().join("sample-catalog.csv"), &root().join("prompts/marble-counter.txt"), |a| {
            a.model = Some("seedream-v9".into());
            a.price_overrides = [("seedream-v3".to_owned(), 5.0)].into();
        });
    let p = plan(&env.store, &unknown, None).await.unwrap();
    assert_eq!(p.estimate.amount, None);
    assert!(p.render_text().contains("price unknown"), "{}", p.render_text());
}

#[tokio::test]
async fn a_prompt_column_overrides_the_template_per_row() {
    let env = Env::new().await;
    let s = settings(&fixture("prompt-column.csv"), &fixture("simple.txt"), |a| a.skip_invalid = true);
    let run = env.run_id().await;
    let p = plan(&env.store, &s, Some(run)).await.unwrap();
    assert_eq!((p.counts.new, p.counts.invalid), (2, 1));
    assert_eq!(p.invalid[0].to_string(), "line 4: prompt column: placeholder {size} names no column");
    assert_eq!(env.job("P-1").await.1, "Put the white Mug on white marble.");
    assert_eq!(env.job("P-2").await.1, "Hang the Lamp over a brass {sofa}");
}
