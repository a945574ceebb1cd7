//! What the scheduler reads from the store: start-up crash recovery ([`Store::recover`]), the
//! runs table, and the paging of resumable and claimable jobs as [`StoredJob`]s.

use std::time::Duration;

use sqlx::Row;

use super::{JobState, Store, StoreError, now_ms};
use crate::domain::{JobSpec, Params, RequestRef, Task};

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

/// What start-up recovery found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// `submitting` jobs turned `ambiguous`: a paid request may have left before the crash.
    pub ambiguous: u64,
    /// `submitted`/`fetching` jobs to resume by polling or re-downloading.
    pub resumable: u64,
}

const JOB_COLUMNS: &str = "id, sku, task, model, prompt, inputs, params, state, attempts, next_attempt_at,
     request_id, status_url, response_url, cancel_url, result, credits, position, seed_override";

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
    let mut params: Params = serde_json::from_str(&params).map_err(|e| corrupt("jobs.params", &e))?;
    // `retry --review` gave the row another seed: its request asks with that one.
    if let Some(seed) = row.try_get::<Option<i64>, _>("seed_override")? {
        params.seed = Some(seed);
    }
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
        .await.map_err(|e| self.write_error(e))?
        .rows_affected();
        sqlx::query(
            "UPDATE attempts SET finished_at = ?, error_class = 'ambiguous', error = 'interrupted'
             WHERE finished_at IS NULL AND job_id IN (SELECT id FROM jobs WHERE state = 'ambiguous')",
        )
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(|e| self.write_error(e))?;
        let (resumable,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE state IN ('submitted', 'fetching')")
                .fetch_one(self.pool())
                .await
                .map_err(|e| self.write_error(e))?;
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
        .await.map_err(|e| self.write_error(e))?;
        Ok(row.try_get(0)?)
    }

    /// Records the run's model once the plan has resolved it (flag, template front matter or
    /// the provider's default), so `status` and reports never show a run without one.
    ///
    /// # Errors
    /// Database errors.
    pub async fn set_run_model(&self, run_id: i64, model: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE runs SET model = ? WHERE id = ?")
            .bind(model)
            .bind(run_id)
            .execute(self.pool())
            .await?;
        Ok(())
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
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// The most recent generation times (at most `limit`) this state file saw for `provider`,
    /// oldest first: the prior a run's poll plan starts from.
    ///
    /// # Errors
    /// Database errors.
    pub async fn recent_latencies(&self, provider: &str, limit: i64) -> Result<Vec<Duration>, StoreError> {
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT latency_ms FROM (SELECT id, latency_ms FROM latencies WHERE provider = ?
             ORDER BY id DESC LIMIT ?) ORDER BY id",
        )
        .bind(provider)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(ms,)| Duration::from_millis(u64::try_from(ms).unwrap_or(0))).collect())
    }

    /// Appends the generation times a run learned (`(model, time)`), in one transaction, and
    /// drops all but the most recent `keep` of the provider's.
    ///
    /// # Errors
    /// Database errors.
    pub async fn save_latencies(
        &self,
        run_id: i64,
        provider: &str,
        seen: &[(String, Duration)],
        keep: i64,
    ) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool().begin().await.map_err(|e| self.write_error(e))?;
        for (model, latency) in seen {
            sqlx::query("INSERT INTO latencies (run_id, provider, model, latency_ms) VALUES (?, ?, ?, ?)")
                .bind(run_id)
                .bind(provider)
                .bind(model)
                .bind(i64::try_from(latency.as_millis()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        sqlx::query(
            "DELETE FROM latencies WHERE provider = ? AND id NOT IN
             (SELECT id FROM latencies WHERE provider = ? ORDER BY id DESC LIMIT ?)",
        )
        .bind(provider)
        .bind(provider)
        .bind(keep)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.write_error(e))?;
        tx.commit().await.map_err(|e| self.write_error(e))?;
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
    /// (whatever their `next_attempt_at`: the worker waits it out, keeping catalog order). Rows
    /// that share another row's request (`reuse_of`) are never claimed.
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
             WHERE planned_run = ? AND state IN ('pending', 'waiting') AND position > ? AND reuse_of IS NULL
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
