//! The pipeline's side of the store: crash recovery at start, the runs table, the queries that
//! page claimable jobs, and [`Writer`], the single task through which every job state change is
//! committed in group commits (one fsync for many changes; see the design's "Durability costs").

use std::time::Duration;

use sqlx::{Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::{JobState, Store, StoreError, now_ms};
use crate::fetch::SavedOutput;
use crate::job::{JobSpec, Params, Task};
use crate::provider::RequestRef;

/// Most changes committed in one transaction; bounds the latency a change can add to others.
const MAX_BATCH: usize = 512;

/// A job the pipeline may work on, as stored.
#[derive(Debug, Clone)]
pub struct StoredJob {
    /// The job, ready for a provider.
    pub spec: JobSpec,
    /// Its state when read.
    pub state: JobState,
    /// Submissions so far.
    pub attempts: u32,
    /// When a waiting job may be tried again (unix ms).
    pub next_attempt_at: Option<i64>,
    /// The saved request, for submitted jobs.
    pub request: Option<RequestRef>,
    /// The saved result JSON, for fetching jobs.
    pub result: Option<String>,
    /// Credits (or dollars) charged so far.
    pub credits: f64,
    /// Catalog position.
    pub position: i64,
}

/// The outcome of one HTTP submission, recorded on its attempt row.
#[derive(Debug, Clone, Default)]
pub struct AttemptEnd {
    /// HTTP status, when the server answered.
    pub status_code: Option<u16>,
    /// `retry`, `fail`, `stop`, `ambiguous`, or `None` on success.
    pub error_class: Option<&'static str>,
    /// The error, for the attempt and the job.
    pub error: Option<String>,
    /// Time from send to answer.
    pub latency_ms: Option<i64>,
}

/// A job state change. Each is applied by the writer inside a group commit.
#[derive(Debug, Clone)]
pub enum Change {
    /// Before a paid request leaves: `submitting`, attempts + 1, a new attempt row.
    /// Answers the attempt id.
    Intent {
        /// The job.
        job_id: i64,
        /// The current run.
        run_id: i64,
    },
    /// The provider accepted the request: save its id (and fal URLs) at once.
    Accepted {
        /// The job.
        job_id: i64,
        /// The attempt.
        attempt_id: i64,
        /// Where to find it again.
        request: RequestRef,
        /// What the acceptance charged (estimated when the API does not say).
        charged: f64,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// The result is known: save it and move to `fetching`.
    Completed {
        /// The job.
        job_id: i64,
        /// The attempt, when the result came with the submit.
        attempt_id: Option<i64>,
        /// The request id, when the API gave one with a synchronous answer.
        request_id: Option<String>,
        /// The result JSON (`provider::JobResult`).
        result: String,
        /// Credits to add to the job (a sync answer's charge, or a poll's correction).
        charged: f64,
        /// How the attempt ended (sync answers).
        end: AttemptEnd,
    },
    /// A transient error: wait, then submit again.
    Waiting {
        /// The job.
        job_id: i64,
        /// The attempt.
        attempt_id: Option<i64>,
        /// When to try again (unix ms).
        next_attempt_at: i64,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// A permanent error: the row fails with a reason.
    Failed {
        /// The job.
        job_id: i64,
        /// The attempt, when the failure answered a submit.
        attempt_id: Option<i64>,
        /// How the attempt ended; `end.error` is the row's reason.
        end: AttemptEnd,
    },
    /// The request may have been charged but no id came back.
    Ambiguous {
        /// The job.
        job_id: i64,
        /// The attempt.
        attempt_id: i64,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// Nothing was charged and the run is stopping (402, 401, budget, shutdown before sending):
    /// back to `pending`, and the attempt does not count against `--max-attempts`.
    Released {
        /// The job.
        job_id: i64,
        /// The attempt, when one was opened.
        attempt_id: Option<i64>,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// Every output file is durable and verified.
    Done {
        /// The job.
        job_id: i64,
        /// The files.
        outputs: Vec<SavedOutput>,
        /// The result JSON, when it was not saved by an earlier [`Change::Completed`] (a polled
        /// result: after a crash, polling again finds it, so it need not cost its own commit).
        result: Option<String>,
        /// Credits to add with it (a poll's correction of the estimate made at submit).
        charged: f64,
    },
}

struct Op {
    change: Change,
    /// `None` for changes sent without waiting ([`Writer::send`]).
    reply: Option<oneshot::Sender<Result<i64, StoreError>>>,
}

/// The single writer of job state changes. Cheap to clone; every clone feeds one task that
/// commits whatever has queued up while the previous commit was in its fsync.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
}

impl Writer {
    /// Starts the writer task on its own connection.
    ///
    /// # Errors
    /// When no connection can be had.
    pub async fn start(store: &Store) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let conn = store.pool().acquire().await?.detach();
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let handle = tokio::spawn(writer_loop(conn, rx));
        Ok((Self { tx }, handle))
    }

    /// Commits `change` and waits until it is durable. Answers the new attempt id for
    /// [`Change::Intent`], 0 otherwise.
    ///
    /// # Errors
    /// The database error, or [`StoreError::Corrupt`] when the writer has stopped.
    pub async fn commit(&self, change: Change) -> Result<i64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Op { change, reply: Some(reply) }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Queues `change` without waiting for its commit. Changes are committed in the order they
    /// are queued, so a later awaited [`Writer::commit`] of the same job is durable only after
    /// this one; if this one fails, the writer refuses every later change, so the failure
    /// surfaces at the next awaited commit.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the writer has stopped.
    pub async fn send(&self, change: Change) -> Result<(), StoreError> {
        self.tx.send(Op { change, reply: None }).await.map_err(|_| stopped())
    }
}

fn stopped() -> StoreError {
    StoreError::Corrupt("the state writer has stopped".into())
}

async fn writer_loop(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Op>) {
    // Set once a change nobody waits for could not be committed: from then on every change is
    // refused, so no later state (a `done`) can be recorded on top of a missing earlier one.
    let mut poisoned: Option<String> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if let Some(why) = &poisoned {
            for op in batch {
                reply(op, Err(StoreError::Corrupt(format!("an earlier state change failed: {why}"))));
            }
            continue;
        }
        match apply_batch(&mut conn, &batch).await {
            Ok(ids) => {
                for (op, id) in batch.into_iter().zip(ids) {
                    reply(op, Ok(id));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, changes = batch.len(), "group commit failed; committing one by one");
                for op in batch {
                    let res = apply_batch(&mut conn, std::slice::from_ref(&op)).await.map(|ids| ids[0]);
                    if let (Err(e), None) = (&res, &op.reply) {
                        tracing::error!(error = %e, "a state change failed; refusing every later one");
                        poisoned.get_or_insert_with(|| e.to_string());
                    }
                    reply(op, res);
                }
            }
        }
    }
    let _ = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await;
}

fn reply(op: Op, result: Result<i64, StoreError>) {
    if let Some(reply) = op.reply {
        // The worker may have been cancelled meanwhile; its change is durable anyway.
        let _ = reply.send(result);
    }
}

async fn apply_batch(conn: &mut SqliteConnection, batch: &[Op]) -> Result<Vec<i64>, StoreError> {
    let mut attempt = 0;
    loop {
        match try_apply(conn, batch).await {
            Ok(ids) => return Ok(ids),
            Err(e) if e.is_retryable() && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_apply(conn: &mut SqliteConnection, batch: &[Op]) -> Result<Vec<i64>, StoreError> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let mut ids = Vec::with_capacity(batch.len());
    for op in batch {
        match apply(conn, &op.change).await {
            Ok(id) => ids.push(id),
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                return Err(e);
            }
        }
    }
    if let Err(e) = sqlx::query("COMMIT").execute(&mut *conn).await {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return Err(e.into());
    }
    Ok(ids)
}

async fn end_attempt(
    conn: &mut SqliteConnection,
    attempt_id: Option<i64>,
    end: &AttemptEnd,
    request_id: Option<&str>,
    credits: Option<f64>,
) -> Result<(), StoreError> {
    let Some(id) = attempt_id else { return Ok(()) };
    sqlx::query(
        "UPDATE attempts SET finished_at = ?, status_code = ?, error_class = ?, error = ?, latency_ms = ?,
                request_id = COALESCE(?, request_id), credits = COALESCE(?, credits)
         WHERE id = ?",
    )
    .bind(now_ms())
    .bind(end.status_code.map(i64::from))
    .bind(end.error_class)
    .bind(end.error.as_deref())
    .bind(end.latency_ms)
    .bind(request_id)
    .bind(credits)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn apply(conn: &mut SqliteConnection, change: &Change) -> Result<i64, StoreError> {
    let now = now_ms();
    match change {
        Change::Intent { job_id, run_id } => {
            let row = sqlx::query(
                "UPDATE jobs SET state = 'submitting', attempts = attempts + 1, next_attempt_at = NULL,
                        updated_at = ? WHERE id = ? RETURNING attempts",
            )
            .bind(now)
            .bind(job_id)
            .fetch_one(&mut *conn)
            .await?;
            let number: i64 = row.try_get(0)?;
            let id = sqlx::query(
                "INSERT INTO attempts (job_id, run_id, number, started_at) VALUES (?, ?, ?, ?) RETURNING id",
            )
            .bind(job_id)
            .bind(run_id)
            .bind(number)
            .bind(now)
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
            Ok(id)
        }
        Change::Accepted { job_id, attempt_id, request, charged, end } => {
            sqlx::query(
                "UPDATE jobs SET state = 'submitted', request_id = ?, status_url = ?, response_url = ?,
                        cancel_url = ?, credits = credits + ?, error = NULL, error_class = NULL,
                        updated_at = ? WHERE id = ?",
            )
            .bind(&request.request_id)
            .bind(request.status_url.as_deref())
            .bind(request.response_url.as_deref())
            .bind(request.cancel_url.as_deref())
            .bind(charged)
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            end_attempt(conn, Some(*attempt_id), end, Some(&request.request_id), Some(*charged)).await?;
            Ok(0)
        }
        Change::Completed { job_id, attempt_id, request_id, result, charged, end } => {
            sqlx::query(
                "UPDATE jobs SET state = 'fetching', result = ?, request_id = COALESCE(?, request_id),
                        credits = credits + ?, error = NULL, error_class = NULL, updated_at = ? WHERE id = ?",
            )
            .bind(result)
            .bind(request_id.as_deref())
            .bind(charged)
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            let credits = attempt_id.map(|_| *charged);
            end_attempt(conn, *attempt_id, end, request_id.as_deref(), credits).await?;
            Ok(0)
        }
        Change::Waiting { job_id, attempt_id, next_attempt_at, end } => {
            sqlx::query(
                "UPDATE jobs SET state = 'waiting', next_attempt_at = ?, error = ?, error_class = ?,
                        updated_at = ? WHERE id = ?",
            )
            .bind(next_attempt_at)
            .bind(end.error.as_deref())
            .bind(end.error_class)
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            end_attempt(conn, *attempt_id, end, None, None).await?;
            Ok(0)
        }
        Change::Failed { job_id, attempt_id, end } => {
            sqlx::query(
                "UPDATE jobs SET state = 'failed', next_attempt_at = NULL, error = ?, error_class = ?,
                        updated_at = ? WHERE id = ?",
            )
            .bind(end.error.as_deref())
            .bind(end.error_class.unwrap_or("fail"))
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            end_attempt(conn, *attempt_id, end, None, None).await?;
            Ok(0)
        }
        Change::Ambiguous { job_id, attempt_id, end } => {
            sqlx::query(
                "UPDATE jobs SET state = 'ambiguous', error = ?, error_class = 'ambiguous', updated_at = ?
                 WHERE id = ?",
            )
            .bind(end.error.as_deref())
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            end_attempt(conn, Some(*attempt_id), end, None, None).await?;
            Ok(0)
        }
        Change::Released { job_id, attempt_id, end } => {
            let uncount = i64::from(attempt_id.is_some());
            sqlx::query(
                "UPDATE jobs SET state = 'pending', attempts = MAX(attempts - ?, 0), next_attempt_at = NULL,
                        error = ?, error_class = ?, updated_at = ? WHERE id = ?",
            )
            .bind(uncount)
            .bind(end.error.as_deref())
            .bind(end.error_class)
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            end_attempt(conn, *attempt_id, end, None, None).await?;
            Ok(0)
        }
        Change::Done { job_id, outputs, result, charged } => {
            sqlx::query("DELETE FROM outputs WHERE job_id = ?").bind(job_id).execute(&mut *conn).await?;
            for o in outputs {
                sqlx::query(
                    "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(job_id)
                .bind(i64::from(o.index))
                .bind(o.path.to_string_lossy())
                .bind(&o.sha256)
                .bind(i64::try_from(o.bytes).unwrap_or(i64::MAX))
                .bind(i64::from(o.width))
                .bind(i64::from(o.height))
                .bind(&o.content_type)
                .bind(&o.source_url)
                .execute(&mut *conn)
                .await?;
            }
            sqlx::query(
                "UPDATE jobs SET state = 'done', next_attempt_at = NULL, error = NULL, error_class = NULL,
                        result = COALESCE(?, result), credits = credits + ?, updated_at = ? WHERE id = ?",
            )
            .bind(result.as_deref())
            .bind(charged)
            .bind(now)
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
            Ok(0)
        }
    }
}

/// What start-up recovery found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// `submitting` jobs turned `ambiguous`: a paid request may have left before the crash.
    pub ambiguous: u64,
    /// `submitted`/`fetching` jobs to resume by polling or re-downloading.
    pub resumable: u64,
}

const JOB_COLUMNS: &str = "id, sku, task, model, prompt, inputs, params, state, attempts, next_attempt_at,
     request_id, status_url, response_url, cancel_url, result, credits, position";

fn job_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<StoredJob, StoreError> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    let task: String = row.try_get("task")?;
    let task = match task.as_str() {
        "edit" => Task::Edit,
        "generate" => Task::Generate,
        other => return Err(StoreError::Corrupt(format!("unknown task {other:?}"))),
    };
    let inputs: String = row.try_get("inputs")?;
    let inputs: Vec<String> = serde_json::from_str(&inputs).map_err(|e| corrupt("jobs.inputs", &e))?;
    let params: String = row.try_get("params")?;
    let params: Params = serde_json::from_str(&params).map_err(|e| corrupt("jobs.params", &e))?;
    let state: String = row.try_get("state")?;
    let request_id: Option<String> = row.try_get("request_id")?;
    let request = request_id
        .map(|request_id| -> Result<RequestRef, StoreError> {
            Ok(RequestRef {
                request_id,
                status_url: row.try_get("status_url")?,
                response_url: row.try_get("response_url")?,
                cancel_url: row.try_get("cancel_url")?,
            })
        })
        .transpose()?;
    let attempts: i64 = row.try_get("attempts")?;
    Ok(StoredJob {
        spec: JobSpec {
            id: row.try_get("id")?,
            sku: row.try_get("sku")?,
            task,
            model: row.try_get("model")?,
            prompt: row.try_get("prompt")?,
            inputs,
            params,
        },
        state: state.parse()?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_at: row.try_get("next_attempt_at")?,
        request,
        result: row.try_get("result")?,
        credits: row.try_get("credits")?,
        position: row.try_get("position")?,
    })
}

impl Store {
    /// Start-up recovery, run under the run lock before anything else: a job left in
    /// `submitting` may have been charged, so it becomes `ambiguous` and is never resubmitted
    /// unless the user asks (`backdrop retry --ambiguous`).
    ///
    /// # Errors
    /// Database errors.
    pub async fn recover(&self) -> Result<Recovery, StoreError> {
        let now = now_ms();
        let ambiguous = sqlx::query(
            "UPDATE jobs SET state = 'ambiguous', error_class = 'ambiguous',
                    error = 'the process stopped after a paid request may have left and before its request id was saved',
                    updated_at = ? WHERE state = 'submitting'",
        )
        .bind(now)
        .execute(self.pool())
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE attempts SET finished_at = ?, error_class = 'ambiguous', error = 'interrupted'
             WHERE finished_at IS NULL AND job_id IN (SELECT id FROM jobs WHERE state = 'ambiguous')",
        )
        .bind(now)
        .execute(self.pool())
        .await?;
        let (resumable,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE state IN ('submitted', 'fetching')")
                .fetch_one(self.pool())
                .await?;
        Ok(Recovery { ambiguous, resumable: u64::try_from(resumable).unwrap_or(0) })
    }

    /// Records the start of a run; answers its id.
    ///
    /// # Errors
    /// Database errors.
    pub async fn start_run(
        &self,
        catalog: &str,
        provider: &str,
        model: &str,
        dry_run: bool,
    ) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO runs (started_at, catalog, provider, model, dry_run) VALUES (?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(now_ms())
        .bind(catalog)
        .bind(provider)
        .bind(model)
        .bind(dry_run)
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get(0)?)
    }

    /// Records how a run ended.
    ///
    /// # Errors
    /// Database errors.
    pub async fn finish_run(
        &self,
        run_id: i64,
        outcome: &str,
        exit_code: u8,
        summary_json: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE runs SET ended_at = ?, outcome = ?, exit_code = ?, summary = ? WHERE id = ?")
            .bind(now_ms())
            .bind(outcome)
            .bind(i64::from(exit_code))
            .bind(summary_json)
            .bind(run_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Jobs left `submitted` or `fetching` by an earlier run, to resume without resubmitting.
    ///
    /// # Errors
    /// Database errors, or a corrupt row.
    pub async fn resumable_jobs(&self, after_id: i64, limit: i64) -> Result<Vec<StoredJob>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('submitted', 'fetching') AND id > ?
             ORDER BY id LIMIT ?"
        );
        let rows = sqlx::query(&sql).bind(after_id).bind(limit).fetch_all(self.pool()).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The next page of this run's jobs to submit, in catalog order: `pending`, and `waiting`
    /// (whatever their `next_attempt_at`: the worker waits it out, keeping catalog order).
    ///
    /// # Errors
    /// Database errors, or a corrupt row.
    pub async fn claimable_jobs(
        &self,
        run_id: i64,
        after_position: i64,
        limit: i64,
    ) -> Result<Vec<StoredJob>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE planned_run = ? AND state IN ('pending', 'waiting') AND position > ?
             ORDER BY position LIMIT ?"
        );
        let rows =
            sqlx::query(&sql).bind(run_id).bind(after_position).bind(limit).fetch_all(self.pool()).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Credits (or dollars) charged so far across every run, for the budget.
    ///
    /// # Errors
    /// Database errors.
    pub async fn total_spent(&self) -> Result<f64, StoreError> {
        let (spent,): (Option<f64>,) =
            sqlx::query_as("SELECT SUM(credits) FROM jobs").fetch_one(self.pool()).await?;
        Ok(spent.unwrap_or(0.0))
    }

    /// Counts per state among the rows of one run's plan (and in-flight rows of any run).
    ///
    /// # Errors
    /// Database errors.
    pub async fn run_counts(&self, run_id: i64) -> Result<Vec<(JobState, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, COUNT(*) FROM jobs WHERE planned_run = ? OR state IN ('submitted', 'fetching')
             GROUP BY state",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(|(s, n)| Ok((s.parse()?, u64::try_from(n).unwrap_or(0)))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store_with_jobs(n: i64) -> (tempfile::TempDir, Store, i64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let run = store.start_run("c.csv", "seedance", "seedream-v4-5", false).await.unwrap();
        for i in 0..n {
            sqlx::query(
                "INSERT INTO jobs (sku, position, planned_run, fingerprint, provider, model, task, prompt,
                                   inputs, params, created_at, updated_at)
                 VALUES (?, ?, ?, 'f', 'seedance', 'seedream-v4-5', 'edit', 'p', '[]', '{\"num_images\":1}', 0, 0)",
            )
            .bind(format!("SKU-{i}"))
            .bind(i + 1)
            .bind(run)
            .execute(store.pool())
            .await
            .unwrap();
        }
        (dir, store, run)
    }

    async fn state(store: &Store, id: i64) -> (String, i64, Option<String>) {
        sqlx::query_as("SELECT state, attempts, request_id FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_job_walks_the_whole_state_machine() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let jobs = store.claimable_jobs(run, 0, 10).await.unwrap();
        assert_eq!(jobs.len(), 1);
        let id = jobs[0].spec.id;

        let a1 = w.commit(Change::Intent { job_id: id, run_id: run }).await.unwrap();
        assert_eq!(state(&store, id).await, ("submitting".into(), 1, None));
        let end = AttemptEnd { status_code: Some(429), error_class: Some("retry"), ..AttemptEnd::default() };
        w.commit(Change::Waiting { job_id: id, attempt_id: Some(a1), next_attempt_at: 5, end })
            .await
            .unwrap();
        assert_eq!(state(&store, id).await.0, "waiting");
        assert_eq!(store.claimable_jobs(run, 0, 10).await.unwrap().len(), 1, "waiting jobs are claimable");

        let a2 = w.commit(Change::Intent { job_id: id, run_id: run }).await.unwrap();
        let request = RequestRef {
            request_id: "req-1".into(),
            status_url: Some("http://x/s".into()),
            response_url: None,
            cancel_url: None,
        };
        w.commit(Change::Accepted {
            job_id: id,
            attempt_id: a2,
            request,
            charged: 8.0,
            end: AttemptEnd::default(),
        })
        .await
        .unwrap();
        assert_eq!(state(&store, id).await, ("submitted".into(), 2, Some("req-1".into())));
        let resumable = store.resumable_jobs(0, 10).await.unwrap();
        assert_eq!(resumable[0].request.as_ref().unwrap().status_url.as_deref(), Some("http://x/s"));

        w.commit(Change::Completed {
            job_id: id,
            attempt_id: None,
            request_id: None,
            result: "{}".into(),
            charged: 0.0,
            end: AttemptEnd::default(),
        })
        .await
        .unwrap();
        assert_eq!(state(&store, id).await.0, "fetching");
        let out = SavedOutput {
            index: 0,
            path: "SKU-0/0.png".into(),
            sha256: "ab".into(),
            bytes: 10,
            width: 4,
            height: 4,
            content_type: "image/png".into(),
            source_url: "http://x/o.png".into(),
        };
        w.commit(Change::Done { job_id: id, outputs: vec![out], result: None, charged: 0.0 }).await.unwrap();
        assert_eq!(state(&store, id).await.0, "done");
        assert!((store.total_spent().await.unwrap() - 8.0).abs() < 1e-9);
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM attempts WHERE job_id = ?")
            .bind(id)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn recovery_turns_submitting_into_ambiguous_and_keeps_submitted() {
        let (_dir, store, run) = store_with_jobs(2).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        let a = w.commit(Change::Intent { job_id: 2, run_id: run }).await.unwrap();
        let request =
            RequestRef { request_id: "r".into(), status_url: None, response_url: None, cancel_url: None };
        w.commit(Change::Accepted {
            job_id: 2,
            attempt_id: a,
            request,
            charged: 8.0,
            end: AttemptEnd::default(),
        })
        .await
        .unwrap();
        let rec = store.recover().await.unwrap();
        assert_eq!(rec, Recovery { ambiguous: 1, resumable: 1 });
        assert_eq!(state(&store, 1).await.0, "ambiguous");
        assert_eq!(state(&store, 2).await.0, "submitted");
        assert!(store.claimable_jobs(run, 0, 10).await.unwrap().is_empty(), "neither is resubmitted");
    }

    #[tokio::test]
    async fn released_jobs_go_back_to_pending_without_spending_an_attempt() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let a = w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        let end = AttemptEnd { status_code: Some(402), error_class: Some("stop"), ..AttemptEnd::default() };
        w.commit(Change::Released { job_id: 1, attempt_id: Some(a), end }).await.unwrap();
        assert_eq!(state(&store, 1).await, ("pending".into(), 0, None));
    }

    #[tokio::test]
    async fn many_concurrent_changes_are_all_committed() {
        let (_dir, store, run) = store_with_jobs(200).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let mut tasks = Vec::new();
        for id in 1..=200 {
            let w = w.clone();
            tasks.push(tokio::spawn(
                async move { w.commit(Change::Intent { job_id: id, run_id: run }).await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE state = 'submitting'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 200);
    }
}
