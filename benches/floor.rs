//! The bench's CPU floor (`bench/run` runs it next to backdrop on the clean case): the least a
//! program must do to keep backdrop's promises on a catalog, and nothing else. Same crates as
//! backdrop (tokio on one thread, reqwest, sqlx, sha2), no features: no retries, no rate limit,
//! no reports, no progress, no batching of state changes.
//!
//! Per row, with `--stage all`: the intent committed and fsynced before the submit leaves; the
//! request id committed the moment it returns; one poll after `--poll-initial`, then every 25 ms;
//! the image downloaded, hashed, written to a temporary file, fsynced and renamed into place;
//! then `done` committed (the folder is not synced after the rename, which backdrop's batched
//! `syncfs` covers: the floor errs low). Two state connections, so no commit changes the
//! `synchronous` setting: one with `FULL` for intents, one with `NORMAL` for everything else.
//! `--stage http` stops after the hash (no state, no file); `--stage files` adds the file,
//! without its fsync.
//!
//! ```text
//! cargo bench --bench floor -- --api-base URL --catalog CSV --state DB --out DIR [--concurrency 5]
//! ```
//!
//! The catalog is the bench's (`sku,name,color,image_url`); the simulator is `backdrop sim`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use backdrop::store::now_ms;
use sha2::Digest as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions as _, Row as _};
use tokio::sync::{Mutex, Semaphore};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Http,
    Files,
    All,
}

struct Args {
    api_base: String,
    catalog: PathBuf,
    state: PathBuf,
    out: PathBuf,
    concurrency: usize,
    poll_initial: Duration,
    stage: Stage,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut api_base, mut catalog, mut state, mut out) = (None, None, None, None);
    let (mut concurrency, mut poll_initial, mut stage) = (5, Duration::from_millis(250), Stage::All);
    while let Some(flag) = args.next() {
        // `cargo bench` passes `--bench` to every bench target.
        if flag == "--bench" {
            continue;
        }
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--api-base" => api_base = Some(value.trim_end_matches('/').to_owned()),
            "--catalog" => catalog = Some(PathBuf::from(value)),
            "--state" => state = Some(PathBuf::from(value)),
            "--out" => out = Some(PathBuf::from(value)),
            "--concurrency" => concurrency = value.parse().context("--concurrency")?,
            "--poll-initial" => {
                poll_initial = Duration::from_millis(value.parse().context("--poll-initial (ms)")?)
            }
            "--stage" => {
                stage = match value.as_str() {
                    "http" => Stage::Http,
                    "files" => Stage::Files,
                    "all" => Stage::All,
                    other => bail!("--stage {other}: expected http, files or all"),
                }
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        api_base: api_base.context("--api-base is required")?,
        catalog: catalog.context("--catalog is required")?,
        state: state.context("--state is required")?,
        out: out.context("--out is required")?,
        concurrency: concurrency.max(1),
        poll_initial,
        stage,
    })
}

struct Row {
    id: i64,
    sku: String,
    prompt: String,
    image_url: String,
}

fn read_catalog(path: &Path) -> Result<Vec<Row>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for (id, record) in (1..).zip(reader.records()) {
        let record = record?;
        let field =
            |i: usize| record.get(i).map(str::to_owned).with_context(|| format!("row {id}: column {i}"));
        rows.push(Row {
            id,
            sku: field(0)?,
            prompt: format!("Place the {} {} on marble", field(2)?, field(1)?),
            image_url: field(3)?,
        });
    }
    Ok(rows)
}

/// The two state connections: intents on the synced one, everything else on the other.
struct State {
    synced: Mutex<SqliteConnection>,
    unsynced: Mutex<SqliteConnection>,
}

impl State {
    async fn open(path: &Path, rows: &[Row]) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let mut unsynced = options.clone().synchronous(SqliteSynchronous::Normal).connect().await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, state TEXT NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0, request_id TEXT, sha256 TEXT, updated_at INTEGER);
             CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL,
                 started_at INTEGER NOT NULL, request_id TEXT);",
        )
        .execute(&mut unsynced)
        .await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut unsynced).await?;
        for row in rows {
            sqlx::query("INSERT OR IGNORE INTO jobs (id, sku, state) VALUES (?, ?, 'pending')")
                .bind(row.id)
                .bind(&row.sku)
                .execute(&mut unsynced)
                .await?;
        }
        sqlx::query("COMMIT").execute(&mut unsynced).await?;
        let synced = options.synchronous(SqliteSynchronous::Full).connect().await?;
        Ok(Self { synced: Mutex::new(synced), unsynced: Mutex::new(unsynced) })
    }

    /// The intent, durable before the caller sends the paid request; answers the attempt id.
    async fn intent(&self, job: i64) -> Result<i64> {
        let now = now_ms();
        let rows = sqlx::query(
            "BEGIN IMMEDIATE;
             UPDATE jobs SET state = 'submitting', attempts = attempts + 1, updated_at = ? WHERE id = ?;
             INSERT INTO attempts (job_id, started_at) VALUES (?, ?) RETURNING id;
             COMMIT;",
        )
        .bind(now)
        .bind(job)
        .bind(job)
        .bind(now)
        .fetch_all(&mut *self.synced.lock().await)
        .await?;
        rows.first().map(|r| r.get::<i64, _>(0)).ok_or_else(|| anyhow!("job {job}: no attempt id"))
    }

    async fn accepted(&self, job: i64, attempt: i64, request_id: &str) -> Result<()> {
        sqlx::query(
            "BEGIN IMMEDIATE;
             UPDATE jobs SET state = 'submitted', request_id = ?, updated_at = ? WHERE id = ?;
             UPDATE attempts SET request_id = ? WHERE id = ?;
             COMMIT;",
        )
        .bind(request_id)
        .bind(now_ms())
        .bind(job)
        .bind(request_id)
        .bind(attempt)
        .execute(&mut *self.unsynced.lock().await)
        .await?;
        Ok(())
    }

    async fn done(&self, job: i64, sha256: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET state = 'done', sha256 = ?, updated_at = ? WHERE id = ?")
            .bind(sha256)
            .bind(now_ms())
            .bind(job)
            .execute(&mut *self.unsynced.lock().await)
            .await?;
        Ok(())
    }
}

async fn json(request: reqwest::RequestBuilder) -> Result<serde_json::Value> {
    Ok(request.bearer_auth("floor").send().await?.error_for_status()?.json().await?)
}

async fn row(args: &Args, client: &reqwest::Client, state: Option<&State>, row: &Row) -> Result<()> {
    let attempt = match state {
        Some(state) => Some(state.intent(row.id).await?),
        None => None,
    };
    let body = serde_json::json!({
        "prompt": row.prompt, "image_urls": [row.image_url], "num_images": 1, "output_format": "png", "async": true,
    });
    let submitted = json(client.post(format!("{}/v1/seedream/v4.5/edit", args.api_base)).json(&body)).await?;
    let request_id = submitted["request_id"].as_str().context("no request_id")?.to_owned();
    if let (Some(state), Some(attempt)) = (state, attempt) {
        state.accepted(row.id, attempt, &request_id).await?;
    }
    tokio::time::sleep(args.poll_initial).await;
    let url = loop {
        let status = json(client.get(format!("{}/v1/requests/{request_id}", args.api_base))).await?;
        match status["status"].as_str() {
            Some("completed") => {
                break status["images"][0]["url"].as_str().context("no image url")?.to_owned();
            }
            Some("failed") => bail!("row {}: generation failed", row.id),
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    };
    let bytes = client.get(url).send().await?.error_for_status()?.bytes().await?;
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    if args.stage == Stage::Http {
        return Ok(());
    }
    let sync = args.stage == Stage::All;
    let (tmp, path) =
        (args.out.join(format!(".{}.png.tmp", row.id)), args.out.join(format!("{}.png", row.id)));
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        if sync {
            file.sync_data()?;
        }
        std::fs::rename(&tmp, &path)
    })
    .await??;
    if let Some(state) = state {
        state.done(row.id, &sha256).await?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Arc::new(parse_args()?);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let rows = read_catalog(&args.catalog)?;
        std::fs::create_dir_all(&args.out)?;
        let state = match args.stage {
            Stage::All => Some(Arc::new(State::open(&args.state, &rows).await?)),
            _ => None,
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let slots = Arc::new(Semaphore::new(args.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        let total = rows.len();
        for r in rows {
            let slot = Arc::clone(&slots).acquire_owned().await?;
            let (args, client, state) = (Arc::clone(&args), client.clone(), state.clone());
            tasks.spawn(async move {
                let result = row(&args, &client, state.as_deref(), &r).await;
                drop(slot);
                result.with_context(|| format!("row {} ({})", r.id, r.sku))
            });
        }
        let mut failed = 0;
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined? {
                failed += 1;
                eprintln!("floor: {e:#}");
            }
        }
        if let Some(state) = state {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut *state.unsynced.lock().await).await?;
        }
        println!("floor: {} of {total} rows done", total - failed);
        if failed > 0 {
            bail!("{failed} rows failed");
        }
        Ok(())
    })
}
