//! The planner's queries: read the stored state of a batch of SKUs, insert or reset jobs, and
//! stamp every planned row with its run and position. All set-based and batched (one statement
//! per few hundred rows) inside one transaction, so a million-row plan costs seconds, not hours.

use std::collections::HashMap;

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
    /// The catalog's `name` cell, for reports (not fingerprinted).
    pub(crate) name: Option<String>,
    pub(crate) input_tag: Option<String>,
    pub(crate) request_key: Option<String>,
    pub(crate) reuse_of: Option<String>,
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
    pub(crate) input_tag: Option<String>,
    /// The seed `retry --review` gave the row for its next request, instead of the template's.
    pub(crate) seed_override: Option<i64>,
}

/// One plan's transaction. Dropping it without [`PlanTx::commit`] rolls everything back, which
/// is how a catalog with errors leaves the store untouched.
/// A row the plan keeps as it is, restamped with this run and its current facts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Touch<'a> {
    pub(crate) sku: &'a str,
    pub(crate) position: i64,
    /// The catalog's `name` cell now (a renamed product keeps its job).
    pub(crate) name: Option<&'a str>,
    pub(crate) input_tag: Option<&'a str>,
    pub(crate) request_key: Option<&'a str>,
    /// Recomputed each plan; only a row still to be submitted takes it.
    pub(crate) reuse_of: Option<&'a str>,
    /// False when this plan cannot tell (reuse on, but the row's key is unknown because its
    /// inputs were not checked): the row keeps the leader an earlier plan gave it.
    pub(crate) reuse_known: bool,
}

#[derive(Debug)]
pub(crate) struct PlanTx {
    tx: Transaction<'static, Sqlite>,
    /// The connection's own `cache_size`, restored before it goes back to the pool.
    cache_size: i64,
}

/// Page cache for the plan's connection, in KiB (SQLite's negative `cache_size`). The default
/// 2 MB makes a million-row plan re-read and re-spill the same index pages from the OS over and
/// over; 48 MB keeps the hot part of the `sku` index and the pages being written in memory
/// while staying well inside the planner's memory budget.
const PLAN_CACHE_KIB: i64 = 48 * 1024;

impl Store {
    /// Starts a plan. `write` takes the write lock at once (`BEGIN IMMEDIATE`), so the states
    /// the planner reads cannot change before it writes; a dry run only reads, from one snapshot.
    ///
    /// # Errors
    /// [`StoreError::Db`] when the database is busy beyond the timeout.
    pub(crate) async fn begin_plan(&self, write: bool) -> Result<PlanTx, StoreError> {
        let mut tx = if write {
            self.pool().begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool().begin().await?
        };
        let (cache_size,): (i64,) = sqlx::query_as("PRAGMA cache_size").fetch_one(&mut *tx).await?;
        sqlx::query(&format!("PRAGMA cache_size = -{PLAN_CACHE_KIB}")).execute(&mut *tx).await?;
        Ok(PlanTx { tx, cache_size })
    }
}

/// Appends `(?,?),(?,?)...`: `rows` groups of `per_row` anonymous parameters.
fn placeholders(out: &mut String, rows: usize, per_row: usize) {
    for r in 0..rows {
        out.push_str(if r == 0 { "(?" } else { ",(?" });
        for _ in 1..per_row {
            out.push_str(",?");
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
        // One aggregated row instead of one per job: sqlx hands every result row across threads
        // separately, which cost more than the query itself. The separators are control
        // characters, which the catalog rejects in SKUs.
        let mut sql = String::from(
            "SELECT group_concat(sku || char(31) || fingerprint || char(31) || state || char(31) || \
             coalesce(input_tag, '') || char(31) || coalesce(seed_override, ''), char(30)) \
             FROM jobs WHERE sku IN (",
        );
        for i in 0..skus.len() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
        }
        sql.push(')');
        let mut q = sqlx::query_as::<_, (Option<String>,)>(&sql);
        for sku in skus {
            q = q.bind(*sku);
        }
        let (joined,) = q.fetch_one(&mut *self.tx).await?;
        let mut out = HashMap::with_capacity(skus.len());
        for record in joined.as_deref().unwrap_or("").split('\u{1e}').filter(|r| !r.is_empty()) {
            let mut fields = record.split('\u{1f}');
            let (Some(sku), Some(fingerprint), Some(state), Some(tag), Some(seed), None) =
                (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(StoreError::Corrupt(format!("job record {record:?} has a control character")));
            };
            out.insert(
                sku.to_owned(),
                Existing {
                    fingerprint: fingerprint.to_owned(),
                    state: state.parse()?,
                    input_tag: (!tag.is_empty()).then(|| tag.to_owned()),
                    seed_override: if seed.is_empty() {
                        None
                    } else {
                        Some(seed.parse().map_err(|e| {
                            StoreError::Corrupt(format!("jobs.seed_override of {sku:?} is {seed:?}: {e}"))
                        })?)
                    },
                },
            );
        }
        Ok(out)
    }

    /// Deletes the `outputs` rows of jobs about to be reset (the files stay on disk).
    /// For each of `keys`, the SKU of a row with that request key whose result is done (preferred)
    /// or whose paid request is out: a row asking the same can share it.
    pub(crate) async fn key_holders(&mut self, keys: &[&str]) -> Result<HashMap<String, String>, StoreError> {
        let mut out = HashMap::new();
        if keys.is_empty() {
            return Ok(out);
        }
        let mut sql = String::from(
            "SELECT request_key, sku, state FROM jobs WHERE state IN ('done', 'submitted', 'fetching') \
             AND request_key IN (",
        );
        for i in 0..keys.len() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
        }
        sql.push_str(") ORDER BY state = 'done' DESC, id");
        let mut q = sqlx::query_as::<_, (String, String, String)>(&sql);
        for key in keys {
            q = q.bind(*key);
        }
        for (key, sku, _) in q.fetch_all(&mut *self.tx).await? {
            out.entry(key).or_insert(sku);
        }
        Ok(out)
    }

    pub(crate) async fn delete_outputs(&mut self, skus: &[&str]) -> Result<(), StoreError> {
        if skus.is_empty() {
            return Ok(());
        }
        let mut sql = String::from("DELETE FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE sku IN (");
        for i in 0..skus.len() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
        }
        sql.push_str("))");
        let mut q = sqlx::query(&sql);
        for sku in skus {
            q = q.bind(*sku);
        }
        q.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Inserts new jobs and resets changed ones to `pending` with the new prompt, inputs,
    /// params and fingerprint: attempts back to 0, request id, fal URLs, result, error and
    /// retry time cleared. Credits already charged are kept: they were spent. Takes the jobs
    /// by value so their strings move into the statement instead of being copied.
    pub(crate) async fn reset_jobs(
        &mut self,
        run_id: i64,
        shared: &JobShared<'_>,
        jobs: Vec<NewJob>,
        now: i64,
    ) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        // Anonymous `?` only: for numbered `?NNN` parameters sqlx asks SQLite each one's name,
        // a linear search per parameter, which made large batches quadratic.
        let mut sql = String::from(
            "INSERT INTO jobs (planned_run, provider, model, task, params, created_at, updated_at, \
             sku, position, fingerprint, prompt, inputs, name, input_tag, request_key, reuse_of) VALUES ",
        );
        placeholders(&mut sql, jobs.len(), 16);
        sql.push_str(
            " ON CONFLICT(sku) DO UPDATE SET planned_run = excluded.planned_run, \
             position = excluded.position, fingerprint = excluded.fingerprint, \
             provider = excluded.provider, model = excluded.model, task = excluded.task, \
             prompt = excluded.prompt, inputs = excluded.inputs, params = excluded.params, \
             name = excluded.name, \
             input_tag = excluded.input_tag, request_key = excluded.request_key, \
             reuse_of = excluded.reuse_of, seed_override = NULL, \
             state = 'pending', attempts = 0, next_attempt_at = NULL, request_id = NULL, \
             status_url = NULL, response_url = NULL, cancel_url = NULL, result = NULL, \
             error = NULL, error_class = NULL, updated_at = excluded.updated_at",
        );
        let mut q = sqlx::query(&sql);
        for job in jobs {
            q = q
                .bind(run_id)
                .bind(shared.provider)
                .bind(shared.model)
                .bind(shared.task)
                .bind(shared.params)
                .bind(now)
                .bind(now)
                .bind(job.sku)
                .bind(job.position)
                .bind(job.fingerprint)
                .bind(job.prompt)
                .bind(job.inputs)
                .bind(job.name)
                .bind(job.input_tag)
                .bind(job.request_key)
                .bind(job.reuse_of);
        }
        q.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Stamps rows the plan keeps as they are with this run, their catalog position and their
    /// current name (a renamed product keeps its job and shows its new name).
    pub(crate) async fn touch_jobs(&mut self, run_id: i64, rows: &[Touch<'_>]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut sql = String::from("WITH v(sku, pos, name, tag, key, reuse, known) AS (VALUES ");
        placeholders(&mut sql, rows.len(), 7);
        // A row planned without input checks gains its tag the first time it is planned with
        // them, so a later change of picture is noticed.
        sql.push_str(
            ") UPDATE jobs SET planned_run = ?, position = v.pos, name = v.name, \
             input_tag = coalesce(v.tag, jobs.input_tag), \
             request_key = coalesce(v.key, jobs.request_key), \
             reuse_of = CASE WHEN jobs.state IN ('pending', 'waiting') AND v.known THEN v.reuse ELSE jobs.reuse_of END \
             FROM v WHERE jobs.sku = v.sku",
        );
        let mut q = sqlx::query(&sql);
        for t in rows {
            q = q
                .bind(t.sku)
                .bind(t.position)
                .bind(t.name)
                .bind(t.input_tag)
                .bind(t.request_key)
                .bind(t.reuse_of)
                .bind(t.reuse_known);
        }
        q = q.bind(run_id);
        q.execute(&mut *self.tx).await?;
        Ok(())
    }

    /// Makes the plan durable.
    pub(crate) async fn commit(mut self) -> Result<(), StoreError> {
        self.restore_cache().await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Discards everything the plan wrote (a dry run, or a catalog with errors).
    pub(crate) async fn rollback(mut self) -> Result<(), StoreError> {
        self.restore_cache().await?;
        self.tx.rollback().await?;
        Ok(())
    }

    async fn restore_cache(&mut self) -> Result<(), StoreError> {
        sqlx::query(&format!("PRAGMA cache_size = {}", self.cache_size)).execute(&mut *self.tx).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_group_per_row() {
        let mut s = String::new();
        placeholders(&mut s, 2, 3);
        assert_eq!(s, "(?,?,?),(?,?,?)");
    }
}
