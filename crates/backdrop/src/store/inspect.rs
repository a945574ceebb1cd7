//! The store queries behind `status`, `retry` and `report`: counts per state, money spent, the
//! last run, paid rows still to download and when their URLs expire ([`DueDownload`]), the rows
//! of a report with their outputs, and re-queueing rows ([`Requeue`]) for the next `run`.
//! Read-only apart from [`Store::apply_requeue`].

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::FromRow;

use super::{JobState, Store, StoreError, now_ms};

/// How many jobs are in each state. Serialized with one key per state, in life order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    /// Planned, not yet claimed.
    pub pending: i64,
    /// A paid request may be leaving.
    pub submitting: i64,
    /// Accepted by the provider, being polled.
    pub submitted: i64,
    /// Downloading outputs.
    pub fetching: i64,
    /// Finished and verified.
    pub done: i64,
    /// Waiting to retry a transient error.
    pub waiting: i64,
    /// Failed permanently.
    pub failed: i64,
    /// A paid request may have left without its id being saved.
    pub ambiguous: i64,
    /// Paid, held by the quality gate for a person.
    pub review: i64,
    /// Every job.
    pub total: i64,
}

impl StateCounts {
    /// The count of one state.
    #[must_use]
    pub const fn get(&self, state: JobState) -> i64 {
        match state {
            JobState::Pending => self.pending,
            JobState::Submitting => self.submitting,
            JobState::Submitted => self.submitted,
            JobState::Fetching => self.fetching,
            JobState::Done => self.done,
            JobState::Waiting => self.waiting,
            JobState::Failed => self.failed,
            JobState::Ambiguous => self.ambiguous,
            JobState::Review => self.review,
        }
    }

    const fn slot(&mut self, state: JobState) -> &mut i64 {
        match state {
            JobState::Pending => &mut self.pending,
            JobState::Submitting => &mut self.submitting,
            JobState::Submitted => &mut self.submitted,
            JobState::Fetching => &mut self.fetching,
            JobState::Done => &mut self.done,
            JobState::Waiting => &mut self.waiting,
            JobState::Failed => &mut self.failed,
            JobState::Ambiguous => &mut self.ambiguous,
            JobState::Review => &mut self.review,
        }
    }
}

/// Money charged so far, in each provider's own unit (`SUM(jobs.credits)` per provider).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spend {
    /// Seedance credits (1 credit = $0.01).
    pub seedance_credits: f64,
    /// fal.ai dollars.
    pub fal_dollars: f64,
    /// Both, in dollars.
    pub total_dollars: f64,
}

/// One row of the `runs` table.
#[derive(Debug, Clone, PartialEq, Serialize, FromRow)]
pub struct RunRecord {
    /// `runs.id`.
    pub id: i64,
    /// Start, unix ms.
    pub started_at: i64,
    /// End, unix ms; `None` while running or after a crash.
    pub ended_at: Option<i64>,
    /// The catalog it read.
    pub catalog: String,
    /// The provider it spoke to.
    pub provider: String,
    /// The model it asked for.
    pub model: String,
    /// Whether it only planned and priced.
    pub dry_run: bool,
    /// `done`, `rows_failed`, `out_of_credits`, `budget`, `key_rejected`, `interrupted`, `fatal`.
    pub outcome: Option<String>,
    /// The exit code it ended with.
    pub exit_code: Option<i64>,
}

#[derive(FromRow)]
struct BriefRow {
    id: i64,
    sku: String,
    state: String,
    attempts: i64,
    request_id: Option<String>,
    error: Option<String>,
    error_class: Option<String>,
    updated_at: i64,
    has_result: bool,
}

/// A job as `status` and `retry` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobBrief {
    /// `jobs.id`.
    #[serde(skip)]
    pub id: i64,
    /// The row's SKU.
    pub sku: String,
    /// Its state.
    pub state: JobState,
    /// Submissions so far.
    pub attempts: i64,
    /// The saved request id, if any.
    pub request_id: Option<String>,
    /// Why it failed or waits.
    pub error: Option<String>,
    /// `retry`, `fail`, `stop` or `ambiguous`.
    pub error_class: Option<String>,
    /// Last change, unix ms.
    pub updated_at: i64,
    /// Whether the provider's result (its output URLs) is saved: a paid row can be downloaded
    /// again from it without paying.
    #[serde(skip)]
    pub has_result: bool,
}

impl JobBrief {
    /// Whether the provider has already charged for this row's current request: it was
    /// accepted (a saved request id), answered with a result, or finished. Only `--pay-again`
    /// resubmits such a row.
    #[must_use]
    pub const fn charged(&self) -> bool {
        self.request_id.is_some() || self.has_result || matches!(self.state, JobState::Done)
    }
}

impl TryFrom<BriefRow> for JobBrief {
    type Error = StoreError;

    fn try_from(r: BriefRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: r.id,
            sku: r.sku,
            state: r.state.parse()?,
            attempts: r.attempts,
            request_id: r.request_id,
            error: r.error,
            error_class: r.error_class,
            updated_at: r.updated_at,
            has_result: r.has_result,
        })
    }
}

/// A paid row whose outputs are not on disk yet, and the latest moment its output URLs are sure
/// to work: `status` lists these so nobody waits past it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DueDownload {
    /// The row's SKU.
    pub sku: String,
    /// `submitted` or `fetching` (the next `run` downloads it), or `failed` (after a failed
    /// download: `backdrop retry --failed` re-queues the download only).
    pub state: JobState,
    /// The provider's request id, if any.
    pub request_id: Option<String>,
    /// Unix ms: when the provider accepted the request, plus its URL lifetime (seedance 24 h,
    /// fal 7 days). The URLs cannot have been made earlier, so they work at least until then.
    pub deadline: i64,
}

#[derive(FromRow)]
struct JobRow {
    id: i64,
    sku: String,
    name: Option<String>,
    position: i64,
    provider: String,
    model: String,
    task: String,
    prompt: String,
    inputs: String,
    state: String,
    attempts: i64,
    request_id: Option<String>,
    credits: f64,
    error: Option<String>,
    error_class: Option<String>,
    updated_at: i64,
    reuse_of: Option<String>,
    quality: Option<String>,
}

/// A job with everything a report shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    /// `jobs.id`.
    #[serde(skip)]
    pub id: i64,
    /// The row's SKU.
    pub sku: String,
    /// The product's name, from the catalog's `name` column when it has one.
    pub name: Option<String>,
    /// Catalog order.
    pub position: i64,
    /// `seedance` or `fal`: the unit of `credits`.
    pub provider: String,
    /// The model.
    pub model: String,
    /// `edit` or `generate`.
    pub task: String,
    /// The rendered prompt.
    pub prompt: String,
    /// Input images: http(s) URLs or absolute local paths.
    pub inputs: Vec<String>,
    /// Its state.
    pub state: JobState,
    /// Submissions so far.
    pub attempts: i64,
    /// The saved request id, if any.
    pub request_id: Option<String>,
    /// Charged so far, in the provider's unit.
    pub credits: f64,
    /// Why it failed or waits.
    pub error: Option<String>,
    /// `retry`, `fail`, `stop` or `ambiguous`.
    pub error_class: Option<String>,
    /// Last change, unix ms.
    pub updated_at: i64,
    /// The SKU whose paid request or done result this row shares (its files are copies of that
    /// row's, and it cost nothing); `None` for a row that made its own request.
    pub reused_from: Option<String>,
    /// The quality gate's verdicts (JSON), when it ran.
    pub quality: Option<String>,
    /// Its output files, by index.
    pub outputs: Vec<OutputRecord>,
    /// The files export presets made from them, by output index and preset.
    pub exports: Vec<super::ExportRecord>,
}

/// One output file of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct OutputRecord {
    /// `outputs.job_id`.
    #[serde(skip)]
    pub job_id: i64,
    /// Index among the job's outputs.
    pub idx: i64,
    /// Path relative to the output folder.
    pub path: String,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: i64,
    /// Pixel width.
    pub width: i64,
    /// Pixel height.
    pub height: i64,
    /// MIME type.
    pub content_type: String,
}

/// Which rows `backdrop retry` puts back in the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requeue {
    /// Every failed row.
    pub failed: bool,
    /// Every ambiguous row (and `submitting` rows a dead process left behind).
    pub ambiguous: bool,
    /// These SKUs, whatever their state (rows with a live paid request excepted).
    pub skus: Vec<String>,
    /// Also resubmit rows the provider already charged (done, or failed after their request was
    /// accepted): the next run pays for them again.
    pub pay_again: bool,
}

/// Why a selected row is left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// It is pending already.
    AlreadyPending,
    /// It has a saved request id the next run resumes; re-queueing it would pay again.
    InFlight,
    /// The provider already charged for it (it is done, or failed after its request was
    /// accepted) and no result is saved to download again: only `--pay-again` resubmits it.
    Charged,
}

/// What a [`Requeue`] would do: computed by [`Store::plan_requeue`], done by
/// [`Store::apply_requeue`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequeuePlan {
    /// Rows to move back to pending, in catalog order, as they are now.
    pub requeue: Vec<JobBrief>,
    /// Failed rows whose paid result is saved: moved back to `fetching`, so the next run downloads
    /// them again from the saved result (nothing is submitted or paid again).
    pub download: Vec<JobBrief>,
    /// Selected rows left alone, and why.
    pub kept: Vec<(JobBrief, KeepReason)>,
    /// `--sku` values with no job.
    pub unknown: Vec<String>,
}

impl RequeuePlan {
    /// The rows to re-queue whose paid request may already have gone out: re-queueing them may
    /// charge twice.
    pub fn at_risk(&self) -> impl Iterator<Item = &JobBrief> {
        self.requeue.iter().filter(|j| may_be_charged_twice(j.state))
    }

    /// The rows to re-queue that the provider already charged (`--pay-again`): the next run
    /// pays for them again.
    pub fn paid_again(&self) -> impl Iterator<Item = &JobBrief> {
        self.requeue.iter().filter(|j| j.charged())
    }
}

/// `submitting` counts as ambiguous here: `retry` holds the run lock, so no live process is
/// sending it, and the next `run` would mark it ambiguous anyway.
const fn may_be_charged_twice(state: JobState) -> bool {
    matches!(state, JobState::Ambiguous | JobState::Submitting)
}

const BRIEF_COLUMNS: &str =
    "id, sku, state, attempts, request_id, error, error_class, updated_at, result IS NOT NULL AS has_result";

impl Store {
    /// Counts jobs per state.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`] for a state backdrop never writes.
    pub async fn state_counts(&self) -> Result<StateCounts, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetch_all(self.pool()).await?;
        let mut counts = StateCounts::default();
        for (state, n) in rows {
            *counts.slot(state.parse()?) += n;
            counts.total += n;
        }
        Ok(counts)
    }

    /// Money charged so far: `SUM(jobs.credits)` per provider, the same figure the pipeline
    /// adds each attempt's charge to.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`] for an unknown provider.
    pub async fn spend(&self) -> Result<Spend, StoreError> {
        let rows: Vec<(String, f64)> =
            sqlx::query_as("SELECT provider, COALESCE(SUM(credits), 0.0) FROM jobs GROUP BY provider")
                .fetch_all(self.pool())
                .await?;
        let mut spend = Spend::default();
        for (provider, sum) in rows {
            match provider.as_str() {
                "seedance" => spend.seedance_credits += sum,
                "fal" => spend.fal_dollars += sum,
                other => return Err(StoreError::Corrupt(format!("unknown provider {other:?} in jobs"))),
            }
        }
        spend.total_dollars =
            crate::money::Unit::Credits.to_dollars(spend.seedance_credits) + spend.fal_dollars;
        Ok(spend)
    }

    /// The most recent run, if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_run(&self) -> Result<Option<RunRecord>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, started_at, ended_at, catalog, provider, model, dry_run, outcome, exit_code
             FROM runs ORDER BY started_at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(self.pool())
        .await?)
    }

    /// The jobs in one state, in catalog order.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`].
    pub async fn jobs_in_state(&self, state: JobState) -> Result<Vec<JobBrief>, StoreError> {
        let sql = format!("SELECT {BRIEF_COLUMNS} FROM jobs WHERE state = ?1 ORDER BY position, id");
        let rows: Vec<BriefRow> = sqlx::query_as(&sql).bind(state.as_str()).fetch_all(self.pool()).await?;
        rows.into_iter().map(JobBrief::try_from).collect()
    }

    /// Paid rows whose outputs are not on disk: in flight (`submitted`, `fetching`), or failed
    /// after the provider's result was saved. Soonest deadline first.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`] for an unknown state or provider.
    pub async fn downloads_due(&self) -> Result<Vec<DueDownload>, StoreError> {
        let rows: Vec<(String, String, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT sku, state, provider, request_id, COALESCE(accepted_at, updated_at) FROM jobs
             WHERE state IN ('submitted', 'fetching')
                OR (state = 'failed' AND result IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM outputs WHERE outputs.job_id = jobs.id))",
        )
        .fetch_all(self.pool())
        .await?;
        let mut due = rows
            .into_iter()
            .map(|(sku, state, provider, request_id, accepted_at)| {
                let provider: crate::domain::ProviderKind = provider
                    .parse()
                    .map_err(|e: String| StoreError::Corrupt(format!("jobs.provider of {sku:?}: {e}")))?;
                let lifetime = i64::try_from(provider.output_url_lifetime().as_millis()).unwrap_or(i64::MAX);
                Ok(DueDownload {
                    state: state.parse()?,
                    sku,
                    request_id,
                    deadline: accepted_at.saturating_add(lifetime),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        due.sort_by(|a, b| (a.deadline, &a.sku).cmp(&(b.deadline, &b.sku)));
        Ok(due)
    }

    /// Every job with its outputs, in catalog order (`jobs.position`): the rows of a report.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`] for an unknown state or an `inputs` column
    /// that is not a JSON array of strings.
    pub async fn report_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let jobs: Vec<JobRow> = sqlx::query_as(
            "SELECT id, sku, name, position, provider, model, task, prompt, inputs, state, attempts,
                    request_id, credits, error, error_class, updated_at, reuse_of, quality
             FROM jobs ORDER BY position, id",
        )
        .fetch_all(self.pool())
        .await?;
        let outputs: Vec<OutputRecord> = sqlx::query_as(
            "SELECT job_id, idx, path, sha256, bytes, width, height, content_type
             FROM outputs ORDER BY job_id, idx",
        )
        .fetch_all(self.pool())
        .await?;
        let mut by_job: BTreeMap<i64, Vec<OutputRecord>> = BTreeMap::new();
        for o in outputs {
            by_job.entry(o.job_id).or_default().push(o);
        }
        let mut exports = self.exports_by_job().await?;
        jobs.into_iter()
            .map(|j| {
                let inputs: Vec<String> = serde_json::from_str(&j.inputs).map_err(|e| {
                    StoreError::Corrupt(format!("inputs of {:?} are not a JSON list of strings: {e}", j.sku))
                })?;
                Ok(JobRecord {
                    outputs: by_job.remove(&j.id).unwrap_or_default(),
                    exports: exports.remove(&j.id).unwrap_or_default(),
                    id: j.id,
                    sku: j.sku,
                    name: j.name,
                    position: j.position,
                    provider: j.provider,
                    model: j.model,
                    task: j.task,
                    prompt: j.prompt,
                    inputs,
                    state: j.state.parse()?,
                    attempts: j.attempts,
                    request_id: j.request_id,
                    credits: j.credits,
                    error: j.error,
                    error_class: j.error_class,
                    updated_at: j.updated_at,
                    reused_from: j.reuse_of,
                    quality: j.quality,
                })
            })
            .collect()
    }

    /// Works out which rows a [`Requeue`] moves back to pending, without changing anything.
    ///
    /// A `--sku` row with a saved request id that is still live (`submitted`, `fetching`, or
    /// `waiting` on a poll) is kept: the next `run` resumes it, and re-queueing it would drop
    /// a paid request and pay again.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`].
    pub async fn plan_requeue(&self, which: &Requeue) -> Result<RequeuePlan, StoreError> {
        let mut selected: BTreeMap<i64, JobBrief> = BTreeMap::new();
        let mut states = Vec::new();
        if which.failed {
            states.push(JobState::Failed);
        }
        if which.ambiguous {
            states.extend([JobState::Ambiguous, JobState::Submitting]);
        }
        for state in states {
            for job in self.jobs_in_state(state).await? {
                selected.insert(job.id, job);
            }
        }
        let mut plan = RequeuePlan::default();
        let by_sku = format!("SELECT {BRIEF_COLUMNS} FROM jobs WHERE sku = ?1");
        for sku in &which.skus {
            let row: Option<BriefRow> = sqlx::query_as(&by_sku).bind(sku).fetch_optional(self.pool()).await?;
            match row {
                Some(row) => {
                    let job = JobBrief::try_from(row)?;
                    selected.insert(job.id, job);
                }
                None if !plan.unknown.contains(sku) => plan.unknown.push(sku.clone()),
                None => {}
            }
        }
        let mut jobs: Vec<JobBrief> = selected.into_values().collect();
        // Catalog order; ids are a stable tie-break. Positions come from one more query rather
        // than carrying them in every brief.
        let positions: BTreeMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>("SELECT id, position FROM jobs")
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .collect();
        jobs.sort_by_key(|j| (positions.get(&j.id).copied().unwrap_or(i64::MAX), j.id));
        for job in jobs {
            match keep_reason(&job, which.pay_again) {
                Some(reason) => plan.kept.push((job, reason)),
                None if job.state == JobState::Failed && job.has_result && !which.pay_again => {
                    plan.download.push(job);
                }
                None => plan.requeue.push(job),
            }
        }
        Ok(plan)
    }

    /// Moves the plan's rows back in one transaction. [`RequeuePlan::requeue`] rows go to pending:
    /// attempts reset, error and `next_attempt_at` cleared, request id, URLs and result cleared
    /// (a pending row has no live request), and its old output records dropped (the next run
    /// writes new ones). [`RequeuePlan::download`] rows go to `fetching` with their request and
    /// result kept. Credits and the attempt history stay: that money was spent. A row whose state
    /// changed since the plan is left alone. Returns how many rows moved.
    ///
    /// # Errors
    /// A database error; nothing is changed then.
    pub async fn apply_requeue(&self, plan: &RequeuePlan) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await.map_err(|e| self.write_error(e))?;
        let mut moved = 0;
        for job in &plan.requeue {
            let done = sqlx::query(
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = NULL, error = NULL,
                        error_class = NULL, request_id = NULL, status_url = NULL, response_url = NULL,
                        cancel_url = NULL, result = NULL, accepted_at = NULL, updated_at = ?1
                 WHERE id = ?2 AND state = ?3",
            )
            .bind(now)
            .bind(job.id)
            .bind(job.state.as_str())
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                sqlx::query("DELETE FROM outputs WHERE job_id = ?1").bind(job.id).execute(&mut *tx).await?;
                moved += 1;
            }
        }
        for job in &plan.download {
            let done = sqlx::query(
                "UPDATE jobs SET state = 'fetching', next_attempt_at = NULL, error = NULL, error_class = NULL,
                        updated_at = ?1
                 WHERE id = ?2 AND state = ?3 AND result IS NOT NULL",
            )
            .bind(now)
            .bind(job.id)
            .bind(job.state.as_str())
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                sqlx::query("DELETE FROM outputs WHERE job_id = ?1").bind(job.id).execute(&mut *tx).await?;
                moved += 1;
            }
        }
        tx.commit().await.map_err(|e| self.write_error(e))?;
        Ok(moved)
    }
}

impl Store {
    /// Marks rows held by the quality gate as done (a person looked and accepts the output):
    /// the named SKUs, or with `skus` empty every review row. Rows in another state are left
    /// alone. Returns the SKUs now done, in SKU order.
    ///
    /// # Errors
    /// A database error.
    pub async fn accept_review(&self, skus: &[String]) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool().begin().await?;
        let mut accepted: Vec<String> = if skus.is_empty() {
            sqlx::query_scalar(
                "UPDATE jobs SET state = 'done', updated_at = ?1 WHERE state = 'review' RETURNING sku",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await?
        } else {
            let mut done = Vec::new();
            for sku in skus {
                let row: Option<String> = sqlx::query_scalar(
                    "UPDATE jobs SET state = 'done', updated_at = ?1 WHERE sku = ?2 AND state = 'review' RETURNING sku",
                )
                .bind(now)
                .bind(sku)
                .fetch_optional(&mut *tx)
                .await?;
                done.extend(row);
            }
            done
        };
        tx.commit().await.map_err(|e| self.write_error(e))?;
        accepted.sort();
        Ok(accepted)
    }
}

/// A row held for review that `retry --review` regenerates with another seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewRetry {
    /// `jobs.id`.
    pub job_id: i64,
    /// The SKU.
    pub sku: String,
    /// `seedance` or `fal`.
    pub provider: String,
    /// The model its next request asks for.
    pub model: String,
    /// Outputs its next request asks for (the template's `num_images`).
    pub images: u32,
    /// This row's how-many-th review retry (1 for the first).
    pub retry: i64,
    /// The seed its last request asked with (`None`: the template set none).
    pub old_seed: Option<i64>,
    /// The seed its next request asks with.
    pub new_seed: i64,
    /// The paid request whose outputs are replaced.
    pub request_id: Option<String>,
    /// Those outputs, to keep aside.
    pub outputs: Vec<OutputRecord>,
}

/// What `retry --review` would do: computed by [`Store::plan_review_retry`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReviewPlan {
    /// Review rows to regenerate, in catalog order.
    pub rows: Vec<ReviewRetry>,
    /// Named SKUs that are not in review, with their state: left alone.
    pub not_review: Vec<(String, JobState)>,
    /// Named SKUs with no job.
    pub unknown: Vec<String>,
}

/// One old output moved aside by `retry --review`, as `review_retries.kept` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KeptOutput {
    /// Its index among the row's outputs.
    pub index: i64,
    /// Where it was, relative to the output folder.
    pub path: String,
    /// Where it is now, relative to the output folder.
    pub kept_as: String,
    /// Its hex SHA-256 (unchanged by the move).
    pub sha256: String,
}

/// The folder, under the output folder, where `retry --review` keeps replaced outputs: a path
/// the default output names cannot produce (a SKU kept verbatim has no lowercase letters, and a
/// hashed one always has a `~`).
pub const REVIEW_KEPT_DIR: &str = "review-kept";

/// Where output `path` of a row's `retry`-th review retry is kept, relative to the output folder.
#[must_use]
pub fn kept_path(path: &str, retry: i64) -> String {
    format!("{REVIEW_KEPT_DIR}/{retry}/{path}")
}

/// The seed of a row's `retry`-th review retry: derived from the SKU, the seed it replaces and
/// the retry's number, so it is the same if the command is repeated after a crash, differs per
/// row and per retry, and fits every provider's seed range (0..2^31).
#[must_use]
pub fn review_seed(sku: &str, old_seed: Option<i64>, retry: i64) -> i64 {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"backdrop-review-seed-v1\0");
    h.update((sku.len() as u64).to_le_bytes());
    h.update(sku.as_bytes());
    h.update(old_seed.map_or([0xff; 9], |s| {
        let mut b = [0u8; 9];
        b[1..].copy_from_slice(&s.to_le_bytes());
        b
    }));
    h.update(retry.to_le_bytes());
    let digest = h.finalize();
    let seed = i64::from(u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) & 0x7fff_ffff);
    // Equal to the old seed only by a 1 in 2^31 chance; never hand that back.
    if Some(seed) == old_seed { (seed + 1) & 0x7fff_ffff } else { seed }
}

#[derive(FromRow)]
struct ReviewRow {
    id: i64,
    sku: String,
    state: String,
    provider: String,
    model: String,
    params: String,
    seed_override: Option<i64>,
    request_id: Option<String>,
    retries: i64,
}

impl Store {
    /// Works out which rows `retry --review` regenerates: every review row, or the named SKUs
    /// that are in review. Changes nothing.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`] for unreadable params or states.
    pub async fn plan_review_retry(&self, skus: &[String]) -> Result<ReviewPlan, StoreError> {
        const COLUMNS: &str = "id, sku, state, provider, model, params, seed_override, request_id,
             (SELECT COUNT(*) FROM review_retries r WHERE r.job_id = jobs.id) AS retries";
        let mut plan = ReviewPlan::default();
        let mut found: Vec<ReviewRow> = Vec::new();
        if skus.is_empty() {
            found = sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE state = 'review' ORDER BY position, id"
            ))
            .fetch_all(self.pool())
            .await?;
        } else {
            let by_sku = format!("SELECT {COLUMNS} FROM jobs WHERE sku = ?1");
            for sku in skus {
                let row: Option<ReviewRow> =
                    sqlx::query_as(&by_sku).bind(sku).fetch_optional(self.pool()).await?;
                match row {
                    Some(r) if found.iter().any(|f| f.id == r.id) => {}
                    Some(r) if r.state == "review" => found.push(r),
                    Some(r) => plan.not_review.push((r.sku, r.state.parse()?)),
                    None if !plan.unknown.contains(sku) => plan.unknown.push(sku.clone()),
                    None => {}
                }
            }
        }
        for r in found {
            let params: crate::domain::Params = serde_json::from_str(&r.params)
                .map_err(|e| StoreError::Corrupt(format!("jobs.params of {:?}: {e}", r.sku)))?;
            let old_seed = r.seed_override.or(params.seed);
            let retry = r.retries + 1;
            let outputs: Vec<OutputRecord> = sqlx::query_as(
                "SELECT job_id, idx, path, sha256, bytes, width, height, content_type
                 FROM outputs WHERE job_id = ?1 ORDER BY idx",
            )
            .bind(r.id)
            .fetch_all(self.pool())
            .await?;
            plan.rows.push(ReviewRetry {
                new_seed: review_seed(&r.sku, old_seed, retry),
                job_id: r.id,
                sku: r.sku,
                provider: r.provider,
                model: r.model,
                images: params.num_images,
                retry,
                old_seed,
                request_id: r.request_id,
                outputs,
            });
        }
        Ok(plan)
    }

    /// Puts the planned review rows back to pending, in one transaction, each with its new seed
    /// (`jobs.seed_override`, which its next request asks with) and a `review_retries` record of
    /// the seeds, the replaced request, its verdict and where its outputs were kept (`kept`, per
    /// row, from the caller, which moved the files before this). Attempts, request, result,
    /// error and verdict are cleared as for any re-queue; credits and attempt history stay. A row
    /// no longer in review is left alone. Returns the SKUs moved.
    ///
    /// # Errors
    /// A database error; nothing is changed then.
    pub async fn apply_review_retry(
        &self,
        rows: &[(ReviewRetry, Vec<KeptOutput>)],
    ) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await.map_err(|e| self.write_error(e))?;
        let mut moved = Vec::new();
        for (row, kept) in rows {
            // The verdict that held it moves to the retry's record; the new request gets its own.
            let verdict: Option<Option<String>> =
                sqlx::query_scalar("SELECT quality FROM jobs WHERE id = ?1 AND state = 'review'")
                    .bind(row.job_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(verdict) = verdict else { continue };
            sqlx::query(
                "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = NULL, error = NULL,
                        error_class = NULL, request_id = NULL, status_url = NULL, response_url = NULL,
                        cancel_url = NULL, result = NULL, accepted_at = NULL, quality = NULL,
                        seed_override = ?1, updated_at = ?2
                 WHERE id = ?3 AND state = 'review'",
            )
            .bind(row.new_seed)
            .bind(now)
            .bind(row.job_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM outputs WHERE job_id = ?1").bind(row.job_id).execute(&mut *tx).await?;
            let kept = serde_json::to_string(kept)
                .map_err(|e| StoreError::Corrupt(format!("kept outputs of {:?}: {e}", row.sku)))?;
            sqlx::query(
                "INSERT INTO review_retries (job_id, retry, old_seed, new_seed, old_request_id, kept,
                                             quality, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .bind(row.job_id)
            .bind(row.retry)
            .bind(row.old_seed)
            .bind(row.new_seed)
            .bind(row.request_id.as_deref())
            .bind(kept)
            .bind(verdict)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            moved.push(row.sku.clone());
        }
        tx.commit().await.map_err(|e| self.write_error(e))?;
        Ok(moved)
    }

    /// Every output `retry --review` kept aside, per SKU, oldest retry first.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`] for an unreadable record.
    pub async fn kept_outputs(&self) -> Result<Vec<(String, i64, Vec<KeptOutput>)>, StoreError> {
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT j.sku, r.retry, r.kept FROM review_retries r JOIN jobs j ON j.id = r.job_id
             ORDER BY j.position, j.id, r.retry",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(sku, retry, kept)| {
                let kept = serde_json::from_str(&kept)
                    .map_err(|e| StoreError::Corrupt(format!("review_retries.kept of {sku:?}: {e}")))?;
                Ok((sku, retry, kept))
            })
            .collect()
    }
}

fn keep_reason(job: &JobBrief, pay_again: bool) -> Option<KeepReason> {
    match job.state {
        JobState::Pending => Some(KeepReason::AlreadyPending),
        JobState::Submitted | JobState::Fetching => Some(KeepReason::InFlight),
        JobState::Waiting if job.request_id.is_some() => Some(KeepReason::InFlight),
        // A failed row with its result saved is downloaded again instead (see `plan_requeue`).
        JobState::Failed if job.has_result => None,
        JobState::Done | JobState::Failed if job.charged() && !pay_again => Some(KeepReason::Charged),
        // Held by the quality gate, paid: only `retry --review` regenerates it (and says it pays).
        JobState::Review if !pay_again => Some(KeepReason::Charged),
        JobState::Review
        | JobState::Waiting
        | JobState::Done
        | JobState::Failed
        | JobState::Ambiguous
        | JobState::Submitting => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_seeds_are_stable_and_differ_per_row_retry_and_old_seed() {
        let a1 = review_seed("A", Some(7), 1);
        assert_eq!(a1, review_seed("A", Some(7), 1), "a repeated command picks the same seed");
        assert_ne!(a1, review_seed("A", Some(7), 2));
        assert_ne!(a1, review_seed("B", Some(7), 1));
        assert_ne!(a1, review_seed("A", None, 1));
        for retry in 1..200 {
            let s = review_seed("A", Some(retry), retry);
            assert!((0..1 << 31).contains(&s) && s != retry);
        }
        assert_eq!(kept_path("A/0.png", 2), "review-kept/2/A/0.png");
    }

    async fn fixture() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).await.unwrap();
        let result = Some("{\"images\":[{\"url\":\"http://x/o.png\"}]}");
        let rows = [
            ("A", 1, "done", "seedance", 30.0, Some("req-a"), None, result),
            ("B", 2, "failed", "seedance", 0.0, None, Some("HTTP 422: content policy"), None),
            ("C", 3, "ambiguous", "fal", 0.03, None, None, None),
            ("D", 4, "submitted", "seedance", 30.0, Some("req-d"), None, None),
            ("E", 5, "pending", "seedance", 0.0, None, None, None),
            ("F", 6, "waiting", "seedance", 0.0, Some("req-f"), Some("HTTP 503"), None),
            ("G", 7, "submitting", "seedance", 0.0, None, None, None),
            // Paid; the download failed; the result with its URLs is kept.
            (
                "H",
                8,
                "failed",
                "seedance",
                8.0,
                Some("req-h"),
                Some("paid, not downloaded: HTTP 403"),
                result,
            ),
            // Paid; the provider said the generation failed: nothing to download.
            ("I", 9, "failed", "fal", 0.04, Some("req-i"), Some("paid, generation failed"), None),
        ];
        for (sku, pos, state, provider, credits, req, err, result) in rows {
            sqlx::query(
                "INSERT INTO jobs (sku, position, fingerprint, provider, model, task, prompt, inputs, params,
                                   state, attempts, request_id, credits, error, error_class, next_attempt_at,
                                   result, accepted_at, created_at, updated_at)
                 VALUES (?1, ?2, 'fp', ?3, 'm', 'edit', 'p', '[\"/x.png\"]', '{}', ?4, 2, ?5, ?6, ?7,
                         'fail', 99, ?8, 1000, 1, 1)",
            )
            .bind(sku)
            .bind(pos)
            .bind(provider)
            .bind(state)
            .bind(req)
            .bind(credits)
            .bind(err)
            .bind(result)
            .execute(store.pool())
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url)
             SELECT id, 0, 'A/0.png', 'ab', 10, 4, 4, 'image/png', 'http://x' FROM jobs WHERE sku = 'A'",
        )
        .execute(store.pool())
        .await
        .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn counts_and_spend_come_from_the_store() {
        let (_dir, store) = fixture().await;
        let counts = store.state_counts().await.unwrap();
        assert_eq!((counts.total, counts.done, counts.failed, counts.ambiguous), (9, 1, 3, 1));
        assert_eq!(counts.get(JobState::Waiting), 1);
        let spend = store.spend().await.unwrap();
        assert!((spend.seedance_credits - 68.0).abs() < 1e-9);
        assert!((spend.fal_dollars - 0.07).abs() < 1e-9);
        assert!((spend.total_dollars - 0.75).abs() < 1e-9);
        assert_eq!(store.last_run().await.unwrap(), None);
    }

    #[tokio::test]
    async fn report_jobs_are_in_catalog_order_with_outputs() {
        let (_dir, store) = fixture().await;
        let jobs = store.report_jobs().await.unwrap();
        let skus: Vec<_> = jobs.iter().map(|j| j.sku.as_str()).collect();
        assert_eq!(skus, ["A", "B", "C", "D", "E", "F", "G", "H", "I"]);
        assert_eq!(jobs[0].outputs.len(), 1);
        assert_eq!(jobs[0].inputs, ["/x.png"]);
        assert!(jobs[1].outputs.is_empty());
    }

    #[tokio::test]
    async fn requeue_moves_only_what_is_safe_and_resets_it() {
        let (_dir, store) = fixture().await;
        let mut which = Requeue {
            failed: true,
            ambiguous: true,
            skus: vec!["A".into(), "D".into(), "E".into(), "F".into(), "nope".into()],
            pay_again: false,
        };
        // Without --pay-again nothing the provider charged is resubmitted.
        let plan = store.plan_requeue(&which).await.unwrap();
        let names = |jobs: &[JobBrief]| jobs.iter().map(|j| j.sku.clone()).collect::<Vec<_>>();
        assert_eq!(names(&plan.requeue), ["B", "C", "G"]);
        assert_eq!(names(&plan.download), ["H"], "a saved result is downloaded again, not paid again");
        assert_eq!(plan.paid_again().count(), 0);
        let kept: Vec<_> = plan.kept.iter().map(|(j, r)| (j.sku.as_str(), *r)).collect();
        assert_eq!(
            kept,
            [
                ("A", KeepReason::Charged),
                ("D", KeepReason::InFlight),
                ("E", KeepReason::AlreadyPending),
                ("F", KeepReason::InFlight),
                ("I", KeepReason::Charged),
            ]
        );

        which.pay_again = true;
        let plan = store.plan_requeue(&which).await.unwrap();
        assert_eq!(names(&plan.requeue), ["A", "B", "C", "G", "H", "I"]);
        assert!(plan.download.is_empty());
        let risky: Vec<_> = plan.at_risk().map(|j| j.sku.as_str()).collect();
        assert_eq!(risky, ["C", "G"]);
        let again: Vec<_> = plan.paid_again().map(|j| j.sku.as_str()).collect();
        assert_eq!(again, ["A", "H", "I"]);
        let kept: Vec<_> = plan.kept.iter().map(|(j, r)| (j.sku.as_str(), *r)).collect();
        assert_eq!(
            kept,
            [("D", KeepReason::InFlight), ("E", KeepReason::AlreadyPending), ("F", KeepReason::InFlight)]
        );
        assert_eq!(plan.unknown, ["nope"]);

        assert_eq!(store.apply_requeue(&plan).await.unwrap(), 6);
        type Reset = (String, i64, Option<i64>, Option<String>, Option<String>, Option<String>, f64);
        let row: Reset = sqlx::query_as(
            "SELECT state, attempts, next_attempt_at, error, request_id, result, credits FROM jobs WHERE sku = 'A'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(row, ("pending".into(), 0, None, None, None, None, 30.0));
        let (outputs,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM outputs").fetch_one(store.pool()).await.unwrap();
        assert_eq!(outputs, 0);
        let d: (String, Option<String>) =
            sqlx::query_as("SELECT state, request_id FROM jobs WHERE sku = 'D'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(d, ("submitted".into(), Some("req-d".into())));

        // Applying the same plan again moves nothing: every row changed state since.
        assert_eq!(store.apply_requeue(&plan).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_failed_download_is_requeued_for_its_download_only() {
        let (_dir, store) = fixture().await;
        let which = Requeue { failed: true, ..Requeue::default() };
        let plan = store.plan_requeue(&which).await.unwrap();
        assert_eq!(store.apply_requeue(&plan).await.unwrap(), 2);
        type Kept = (String, i64, Option<String>, Option<String>, Option<String>);
        let h: Kept =
            sqlx::query_as("SELECT state, attempts, request_id, result, error FROM jobs WHERE sku = 'H'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(h.0, "fetching");
        assert_eq!((h.1, h.2.as_deref()), (2, Some("req-h")), "the paid request is kept");
        assert!(h.3.is_some_and(|r| r.contains("http://x/o.png")), "the result with its URLs is kept");
        assert_eq!(h.4, None);
        let (outputs,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM outputs WHERE job_id = (SELECT id FROM jobs WHERE sku = 'H')",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(outputs, 0);
    }

    #[tokio::test]
    async fn downloads_due_carry_the_providers_url_deadline() {
        let (_dir, store) = fixture().await;
        let due = store.downloads_due().await.unwrap();
        let got: Vec<_> = due.iter().map(|d| (d.sku.as_str(), d.state, d.deadline)).collect();
        // Accepted at t = 1000 ms: seedance URLs live 24 h. D is in flight, H failed after its
        // result was saved; A is downloaded, I has no result.
        let day = 24 * 3600 * 1000;
        assert_eq!(got, [("D", JobState::Submitted, 1000 + day), ("H", JobState::Failed, 1000 + day)]);
    }
}
