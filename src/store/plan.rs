//! The planner's queries: read the stored state of a batch of SKUs, insert or reset jobs, and
//! stamp every planned row with its run and position. All set-based and batched (one statement
//! per few hundred rows) inside one transaction, so a million-row plan costs seconds, not hours.

use std::collections::HashMap;
use std::fmt::Write as _;

use sqlx::{Sqlite, Transaction};

use super::{JobState, Store, StoreError};

/// A job as the planner writes it (new, changed, or forced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewJob {
    pub(crate) sku: String,
    pub(crate) position: i64,
    pub(crate) fingerprint: String,
    pub(crate) prompt: String,
    /// JSON array of input references.
    pub(crate) inputs: String,
}

/// What every job of one plan shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobShared<'a> {
    pub(crate) provider: &'a str,
    pub(crate) model: &'a str,
    pub(crate) task: &'a str,
    /// JSON of `job::Params`.
    pub(crate) params: &'a str,
}

/// A stored job's fingerprint and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Existing {
    pub(crate) fingerprint: String,
    pub(crate) state: JobState,
}

/// One plan's transaction. Dropping it without [`PlanTx::commit`] rolls everything back, which
/// is how a catalog with errors leaves the store untouched.
#[derive(Debug)]
pub(crate) struct PlanTx {
    tx: Transaction<'static, Sqlite>,
}

impl Store {
    /// Starts a plan. `write` takes the write lock at once (`BEGIN IMMEDIATE`), so the states
    /// the planner reads cannot change before it writes; a dry run only reads, from one snapshot.
    ///
    /// # Errors
    /// [`StoreError::Db`] when the database is busy beyond the timeout.
    pub(crate) async fn begin_plan(&self, write: bool) -> Result<PlanTx, StoreError> {
        let tx = if write {
            self.pool().begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool().begin().await?
        };
        Ok(PlanTx { tx })
    }
}

fn placeholders(out: &mut String, rows: usize, per_row: usize, first: usize) {
    let mut n = first;
    for r in 0..rows {
        out.push_str(if r == 0 { "(" } else { ",(" });
        for c in 0..per_row {
            let _ = write!(out, "{}?{n}", if c == 0 { "" } else { "," });
            n += 1;
        }
        out.push(')');
    }
}

impl PlanTx {
    /// The stored fingerprint and state of each of `skus` that has a job.
    pub(crate) async fn existing(&mut self, skus: &[&str]) -> Result<HashMap<String, Existing>, StoreError> {
        if skus.is_empty() {
            return Ok(HashMap::new());
        }
        let mut sql = String::from("SELECT sku, fingerprint, state FROM jobs WHERE sku IN (");
        for i in 0..skus.len() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
        }
        sql.push(')');
        let mut q = sqlx::query_as::<_, (String, String, String)>(&sql);
        for sku in skus {
            q = q.bind(*sku);
        }
        let rows = q.fetch_all(&mut *self.tx).await?;
        let mut out = HashMap::with_capacity(rows.len());
        for (sku, fingerprint, state) in rows {
            out.insert(sku, Existing { fingerprint, state: state.parse()? });
        }
        Ok(out)
    }

    /// Inserts new jobs and resets changed ones to `pending` with the new prompt, inputs,
    /// params and fingerprint: attempts back to 0, request id, fal URLs, result, error and
    /// retry time cleared, and their old `outputs` rows deleted (the files stay on disk).
    /// Credits already charged are kept: they were spent.
    pub(crate) async fn reset_jobs(
        &mut self,
        run_id: i64,
        shared: &JobShared<'_>,
        jobs: &[NewJob],
        now: i64,
    ) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut sql = String::from("DELETE FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE sku IN (");
        for i in 0..jobs.len() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
        }
        sql.push_str("))");
        let mut q = sqlx::query(&sql);
        for job in jobs {
            q = q.bind(job.sku.as_str());
        }
        q.execute(&mut *self.tx).await?;

        // ?1..?6 are shared by every row; each row then binds its own five values.
        let mut sql = String::from(
            "INSERT INTO jobs (planned_run, provider, model, task, params, created_at, updated_at, \
             sku, position, fingerprint, prompt, inputs) VALUES ",
        );
        let mut n = 7;
        for (r, _) in jobs.iter().enumerate() {
            let _ = write!(
                sql,
                "{}(?1,?2,?3,?4,?5,?6,?6,?{},?{},?{},?{},?{})",
                if r == 0 { "" } else { "," },
                n,
                n + 1,
                n + 2,
                n + 3,
                n + 4
            );
            n += 5;
        }
        sql.push_str(
            " ON CONFLICT(sku) DO UPDATE SET planned_run = excluded.planned_run, \
             position = excluded.position, fingerprint = excluded.fingerprint, \
             provider = excluded.provider, model = excluded.model, task = excluded.task, \
             prompt = excluded.prompt, inputs = excluded.inputs, params = excluded.params, \
             state = 'pending', attempts = 0, next_attempt_at = NULL, request_id = NULL, \
             status_url = NULL, response_url = NULL, cancel_url = NULL, result = NULL, \
             error = NULL, error_class = NULL, updated_at = excluded.updated_at",
        );
        let mut q = sqlx::query(&sql)
            .bind(run_id)
            .bind(shared.provider)
            .bind(shared.model)
            .bind(shared.task)
            .bind(shared.params)
            .bind(now);
        for job in jobs {
            q = q
                .bind(job.sku.as_str())
                .bind(job.position)
                .bind(job.fingerprint.as_str())
                .bind(job.prompt.as_str())
                .bind(job.inputs.as_str());
        }
        q.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Stamps rows the plan keeps as they are with this run and their catalog position.
    pub(crate) async fn touch_jobs(&mut self, run_id: i64, rows: &[(&str, i64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut sql = String::from("WITH v(sku, pos) AS (VALUES ");
        placeholders(&mut sql, rows.len(), 2, 2);
        sql.push_str(") UPDATE jobs SET planned_run = ?1, position = v.pos FROM v WHERE jobs.sku = v.sku");
        let mut q = sqlx::query(&sql).bind(run_id);
        for (sku, pos) in rows {
            q = q.bind(*sku).bind(*pos);
        }
        q.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Makes the plan durable.
    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Discards everything the plan wrote (a dry run, or a catalog with errors).
    pub(crate) async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_from_first() {
        let mut s = String::new();
        placeholders(&mut s, 2, 2, 2);
        assert_eq!(s, "(?2,?3),(?4,?5)");
    }
}
