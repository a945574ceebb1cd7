//! The plan: every valid catalog row becomes a job with a fingerprint over (sku, task, model,
//! prompt, inputs, params), diffed against the store (new, changed, done, failed, waiting, ...),
//! written in batches (or only counted, for a dry run) and priced with [`PriceTable`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::catalog::{Catalog, CatalogError, CatalogSpec, Input, LocalImages, Row, RowProblem};
use crate::domain::text::{is_forbidden_in_prompt, terminal_safe_line};
use crate::domain::{Params, ProviderKind, Task};
use crate::money::{PriceTable, Unit};
use crate::prompt::{Body, Template, check_rendered, max_prompt_chars};
use crate::store::planning::{Existing, JobShared, NewJob, PlanTx, Touch};
use crate::store::{JobState, Store, StoreError, now_ms};

/// What the planner is asked to plan: the catalog, the template, and the flags that shape jobs.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The catalog file and, for SQLite, its table or query.
    pub catalog: CatalogSpec,
    /// The prompt template, read once by the caller. Every stage of a run uses this copy: a
    /// template given as a pipe (`--prompt <(…)`) can be read only once, and one edited while the
    /// run starts must not change what the plan priced.
    pub template: Template,
    /// The provider the jobs are for.
    pub provider: ProviderKind,
    /// `--model`, overriding the template's front matter.
    pub model: Option<String>,
    /// `--force`: re-run rows that are done.
    pub force: bool,
    /// `--skip-invalid`: plan the valid rows, list the rest.
    pub skip_invalid: bool,
    /// `--limit`: submit at most this many rows.
    pub limit: Option<u64>,
    /// The config's `[prices]`: price per image by model, over the built-in table.
    pub price_overrides: BTreeMap<String, f64>,
    /// What the run can do with local image files; rows it cannot send are invalid rows.
    pub local_images: LocalImages,
    /// Inputs the preflight refused (URL or absolute path → reason): a row using one is invalid.
    pub refused_inputs: Arc<HashMap<String, String>>,
    /// The validators (ETag, Last-Modified) the preflight saw for each input URL that passed: a
    /// done row whose inputs' validators changed is re-run. Empty when checks are off.
    pub input_validators: Arc<HashMap<String, String>>,
    /// Rows asking the provider for the same thing share one paid request, and reuse a done
    /// result of the same request (`--no-reuse` turns it off).
    pub reuse: bool,
}

impl PlanInput {
    /// Plans `catalog` (a CSV file, or SQLite with `catalog.table` or `catalog.query` set) with
    /// `template` for `provider`, with every flag at its default and local image
    /// files accepted as they are (set [`PlanInput::local_images`] to check them).
    #[must_use]
    pub fn new(catalog: impl Into<PathBuf>, template: Template, provider: ProviderKind) -> Self {
        Self {
            catalog: CatalogSpec { path: catalog.into(), table: None, query: None },
            template,
            provider,
            model: None,
            force: false,
            skip_invalid: false,
            limit: None,
            price_overrides: BTreeMap::new(),
            local_images: LocalImages::Accepted,
            refused_inputs: Arc::default(),
            input_validators: Arc::default(),
            reuse: true,
        }
    }
}

/// Why a plan could not be made. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The catalog could not be read or has invalid rows.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug: the catalog reader died, or the parameters could not be encoded.
    #[error("{0}")]
    Internal(String),
}

impl PlanError {
    /// True when planning again may work (a busy or failing store); bad input never does.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Catalog(_) | Self::Internal(_) => false,
        }
    }
}

/// Rows per batched statement: keeps every statement under SQLite's variable limit
/// (16 × 1000 < 32766) while making sqlx's per-query overhead negligible.
const BATCH: usize = 1000;
/// Rendered prompts shown by a dry run.
const SAMPLES: usize = 3;
/// Characters of each sample prompt shown.
const SAMPLE_CHARS: usize = 300;
/// Invalid rows kept for the listing (`counts.invalid` has the full number).
const MAX_KEPT: usize = 10_000;

/// The price of a run before it starts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// The provider's unit.
    pub unit: Unit,
    /// Price of one image; `None` when the model is not in the price table.
    pub unit_price: Option<f64>,
    /// Images the run will ask for (rows × `num_images`).
    pub images: u64,
    /// Total in the provider's unit.
    pub amount: Option<f64>,
    /// Total in dollars.
    pub dollars: Option<f64>,
}

/// Rows per class. `new + changed + forced + done + failed + waiting + pending + in_flight +
/// ambiguous` is the number of valid rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanCounts {
    /// Not in the store yet.
    pub new: u64,
    /// In the store with another fingerprint: re-run.
    pub changed: u64,
    /// Done with the same fingerprint, re-run because of `--force`.
    pub forced: u64,
    /// Done with the same fingerprint: skipped.
    pub done: u64,
    /// Failed with the same fingerprint: left failed (`backdrop retry --failed`).
    pub failed: u64,
    /// Waiting for a retry.
    pub waiting: u64,
    /// Pending from an earlier plan.
    pub pending: u64,
    /// Submitting, submitted or fetching: a paid request is out; the pipeline finishes it.
    pub in_flight: u64,
    /// The process died mid-submit (`backdrop retry --ambiguous`).
    pub ambiguous: u64,
    /// Paid, held by the quality gate (`backdrop accept`, `backdrop retry --review`): skipped.
    pub review: u64,
    /// Invalid rows (left out with `--skip-invalid`).
    pub invalid: u64,
    /// Rows to submit that share another row's paid request or done result instead: counted in
    /// their class above, but not paid for.
    pub reused: u64,
}

impl PlanCounts {
    /// Valid rows.
    #[must_use]
    pub const fn valid(&self) -> u64 {
        self.new
            + self.changed
            + self.forced
            + self.done
            + self.failed
            + self.waiting
            + self.pending
            + self.in_flight
            + self.ambiguous
            + self.review
    }

    /// Rows that need a (paid) submission: new, changed, forced, pending, waiting.
    #[must_use]
    pub const fn to_submit(&self) -> u64 {
        self.new + self.changed + self.forced + self.pending + self.waiting
    }
}

/// The outcome of planning a catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Rows per class.
    pub counts: PlanCounts,
    /// Paid requests this run will send (rows to submit less the reused ones, after `--limit`).
    pub to_run: u64,
    /// The price of `to_run`.
    pub estimate: Estimate,
    /// With `--skip-invalid`: the problems of the rows left out (at most 10,000 kept).
    pub invalid: Vec<RowProblem>,
    /// The first few (sku, rendered prompt) of the rows this run will submit, in catalog order
    /// (empty when it submits none).
    pub samples: Vec<(String, String)>,
    /// The provider.
    pub provider: ProviderKind,
    /// The model.
    pub model: String,
    /// Edit or generate.
    pub task: Task,
    /// Generation parameters from the template.
    pub params: Params,
    /// The catalog file.
    pub catalog: PathBuf,
    /// The template file.
    pub prompt_file: PathBuf,
    /// False for a dry run (nothing was written).
    pub written: bool,
}

/// How a row relates to its stored job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    New,
    Changed,
    Forced,
    Done,
    Failed,
    Waiting,
    Pending,
    InFlight,
    Ambiguous,
    Review,
}

impl Class {
    /// Rows whose job is (re)written with the new prompt and set pending.
    const fn resets(self) -> bool {
        matches!(self, Self::New | Self::Changed | Self::Forced)
    }

    /// Rows the run will submit: the reset ones and those already queued. A queued row's stored
    /// prompt is the one just rendered, since the prompt is part of the fingerprint.
    const fn submits(self) -> bool {
        matches!(self, Self::New | Self::Changed | Self::Forced | Self::Pending | Self::Waiting)
    }
}

/// The plan rules: a changed row in flight or ambiguous is
/// left alone because a paid request is already out; the next plan sees the change.
fn classify(existing: Option<&Existing>, fingerprint: &str, input_tag: Option<&str>, force: bool) -> Class {
    let Some(e) = existing else { return Class::New };
    // A picture that changed under the same URL is a changed row; without a tag on either side
    // (input checks off now or then) nothing is known, and the row counts as unchanged.
    let picture_changed = matches!((e.input_tag.as_deref(), input_tag), (Some(a), Some(b)) if a != b);
    let same = e.fingerprint == fingerprint && !picture_changed;
    match e.state {
        JobState::Submitting | JobState::Submitted | JobState::Fetching => Class::InFlight,
        JobState::Ambiguous => Class::Ambiguous,
        // Paid and held for a person: only `accept`, `retry --review` or `--force` moves it, so a
        // plan never pays for it again on its own, even after the prompt changed.
        JobState::Review if force => Class::Forced,
        JobState::Review => Class::Review,
        _ if !same => Class::Changed,
        JobState::Done if force => Class::Forced,
        JobState::Done => Class::Done,
        JobState::Failed => Class::Failed,
        JobState::Waiting => Class::Waiting,
        JobState::Pending => Class::Pending,
    }
}

/// The fingerprint of a job: sha256 over length-prefixed fields, so no two different jobs
/// can encode the same bytes. Local images count by content (sha256), URLs by their text.
#[must_use]
pub fn fingerprint(
    sku: &str,
    task: Task,
    model: &str,
    prompt: &str,
    inputs: &[Input],
    params_json: &str,
) -> String {
    let mut h = Sha256::new();
    hash_field(&mut h, b"backdrop-fingerprint-v1");
    hash_field(&mut h, sku.as_bytes());
    hash_field(&mut h, task.as_str().as_bytes());
    hash_field(&mut h, model.as_bytes());
    hash_field(&mut h, prompt.as_bytes());
    hash_field(&mut h, params_json.as_bytes());
    h.update((inputs.len() as u64).to_le_bytes());
    for input in inputs {
        match input {
            Input::Url(u) => {
                hash_field(&mut h, b"url");
                hash_field(&mut h, u.as_bytes());
            }
            Input::File { sha256, .. } => {
                hash_field(&mut h, b"file");
                hash_field(&mut h, sha256.as_bytes());
            }
        }
    }
    hex::encode(h.finalize())
}

/// Feeds one length-prefixed field to a digest, so moving a boundary between fields changes it.
fn hash_field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The digest of the validators of a row's input URLs, when every one of them has passed the
/// preflight (`None` for a row without URLs, or planned with checks off). Local files are in the
/// fingerprint by content already.
fn input_tag(inputs: &[Input], validators: &HashMap<String, String>) -> Option<String> {
    let mut h = Sha256::new();
    let mut any = false;
    for input in inputs {
        if let Input::Url(url) = input {
            let v = validators.get(url)?;
            hash_field(&mut h, url.as_bytes());
            hash_field(&mut h, v.as_bytes());
            any = true;
        }
    }
    any.then(|| hex::encode(h.finalize()))
}

/// The request key: sha256 over what the provider is asked, without the SKU, so rows asking the
/// same thing can share one paid request. Local files count by content; URLs by their text and
/// the validators the preflight saw. `None` when an input URL was not checked (its picture could
/// have changed unseen, so a stored result of the same URL is not trusted).
#[must_use]
pub fn request_key(
    task: Task,
    model: &str,
    prompt: &str,
    inputs: &[Input],
    params_json: &str,
    validators: &HashMap<String, String>,
) -> Option<String> {
    let mut h = Sha256::new();
    hash_field(&mut h, b"backdrop-request-key-v1");
    hash_field(&mut h, task.as_str().as_bytes());
    hash_field(&mut h, model.as_bytes());
    hash_field(&mut h, prompt.as_bytes());
    hash_field(&mut h, params_json.as_bytes());
    h.update((inputs.len() as u64).to_le_bytes());
    for input in inputs {
        match input {
            Input::Url(u) => {
                hash_field(&mut h, b"url");
                hash_field(&mut h, u.as_bytes());
                hash_field(&mut h, validators.get(u)?.as_bytes());
            }
            Input::File { sha256, .. } => {
                hash_field(&mut h, b"file");
                hash_field(&mut h, sha256.as_bytes());
            }
        }
    }
    Some(hex::encode(h.finalize()))
}

/// The request key of a row asking what `key` asks but with `seed` instead of the template's
/// seed (a row `retry --review` re-queued): never equal to a template key or another seed's.
#[must_use]
pub fn seeded_request_key(key: &str, seed: i64) -> String {
    let mut h = Sha256::new();
    hash_field(&mut h, b"backdrop-request-key-seed-override-v1");
    hash_field(&mut h, key.as_bytes());
    hash_field(&mut h, &seed.to_le_bytes());
    hex::encode(h.finalize())
}

/// What the store side of a plan needs to know.
struct Context<'a> {
    force: bool,
    run_id: Option<i64>,
    shared: JobShared<'a>,
    reuse: bool,
    /// The first row to submit with each request key: the leader the rows after it share.
    leaders: HashMap<String, String>,
}

/// The catalog side of a plan: reads, validates, renders and fingerprints rows, and hands
/// batches to the store side. It runs as its own task so that parsing the next batch overlaps
/// the database work on the current one (on two cores that is most of the plan's time).
struct Producer {
    catalog: Catalog,
    template: Template,
    task: Task,
    model: String,
    params_json: String,
    skip_invalid: bool,
    /// The longest prompt the provider is sent.
    max_prompt_chars: usize,
    /// Inputs the preflight refused, with the reason.
    refused_inputs: Arc<HashMap<String, String>>,
    /// The validators of input URLs that passed the preflight.
    input_validators: Arc<HashMap<String, String>>,
}

/// What the catalog side found, besides the batches it sent.
struct Produced {
    problems: Vec<RowProblem>,
    total_problems: u64,
    invalid: u64,
    /// A row was invalid without `--skip-invalid`: the plan must fail and write nothing.
    failing: bool,
}

impl Producer {
    async fn run(mut self, batches: mpsc::Sender<Vec<NewJob>>) -> Result<Produced, CatalogError> {
        let mut problems: Vec<RowProblem> = Vec::new();
        let mut total_problems: u64 = 0;
        let mut invalid: u64 = 0;
        let mut batch: Vec<NewJob> = Vec::with_capacity(BATCH);
        let mut prompt_buf = String::new();
        // Once a row is invalid without --skip-invalid the plan will fail: stop sending batches
        // but keep reading, so every problem is listed.
        let mut failing = false;
        while let Some(item) = self.catalog.next().await? {
            let prepared = item.and_then(|row| self.prepare(&row, &mut prompt_buf).map_err(|p| vec![p]));
            match prepared {
                Ok(job) => {
                    if !failing {
                        batch.push(job);
                    }
                }
                Err(row_problems) => {
                    invalid += 1;
                    total_problems += row_problems.len() as u64;
                    let room = MAX_KEPT.saturating_sub(problems.len());
                    problems.extend(row_problems.into_iter().take(room));
                    if !self.skip_invalid {
                        failing = true;
                        batch.clear();
                    }
                }
            }
            if batch.len() >= BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                // The store side only hangs up when it failed; its error is the one reported.
                if batches.send(full).await.is_err() {
                    failing = true;
                }
            }
        }
        if !failing && !batch.is_empty() {
            let _ = batches.send(batch).await;
        }
        drop(batches);
        if !problems.is_empty() {
            self.catalog.describe_duplicates(&mut problems).await?;
        }
        Ok(Produced { problems, total_problems, invalid, failing })
    }

    /// Renders a valid row's prompt and fingerprints it.
    fn prepare(&self, row: &Row, buf: &mut String) -> Result<NewJob, RowProblem> {
        if let Some((input, why)) = row
            .inputs
            .iter()
            .find_map(|i| self.refused_inputs.get(i.as_stored()).map(|why| (i.as_stored(), why)))
        {
            return Err(RowProblem::new(row.location, format!("input {}: {why}", terminal_safe_line(input))));
        }
        let catalog = &self.catalog;
        let lookup = |name: &str| catalog.column(name).and_then(|i| row.values.get(i)).map(String::as_str);
        let own = catalog
            .prompt_column()
            .and_then(|i| row.values.get(i))
            .map(|p| p.trim())
            .filter(|p| !p.is_empty());
        match own {
            Some(text) => {
                let body = Body::parse(text, 1)
                    .map_err(|(_, m)| RowProblem::new(row.location, format!("prompt column: {m}")))?;
                body.render_into(buf, lookup).map_err(|name| {
                    RowProblem::new(
                        row.location,
                        format!("prompt column: placeholder {{{name}}} names no column"),
                    )
                })?;
            }
            None => {
                // Placeholders were checked against the columns when the catalog was opened.
                self.template.body().render_into(buf, lookup).map_err(|name| {
                    RowProblem::new(row.location, format!("placeholder {{{name}}} names no column"))
                })?;
            }
        }
        let prompt = buf.trim();
        if prompt.is_empty() {
            return Err(RowProblem::new(row.location, "the rendered prompt is empty"));
        }
        // Checked here, at plan time, so a bad row is an error naming its line before anything
        // is sent, not a paid request with a megabyte or an escape sequence in it.
        check_rendered(prompt, self.max_prompt_chars).map_err(|m| {
            // Name the column the bad text came from, when one of the template's did.
            let column = self.template.body().placeholders().find(|name| {
                catalog.column(name).and_then(|i| row.values.get(i)).is_some_and(|v| {
                    v.chars().any(is_forbidden_in_prompt) || v.chars().count() > self.max_prompt_chars
                })
            });
            let source = match (own.is_some(), column) {
                (true, _) => " (from the prompt column)".to_owned(),
                (false, Some(name)) => format!(" (from column {name})"),
                (false, None) => String::new(),
            };
            RowProblem::new(row.location, format!("{m}{source}"))
        })?;
        let fingerprint =
            fingerprint(&row.sku, self.task, &self.model, prompt, &row.inputs, &self.params_json);
        let stored: Vec<&str> = row.inputs.iter().map(Input::as_stored).collect();
        let inputs =
            serde_json::to_string(&stored).map_err(|e| RowProblem::new(row.location, e.to_string()))?;
        let name = lookup("name").map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned);
        Ok(NewJob {
            name,
            sku: row.sku.clone(),
            position: row.position,
            fingerprint,
            prompt: prompt.to_owned(),
            inputs,
            input_tag: input_tag(&row.inputs, &self.input_validators),
            request_key: request_key(
                self.task,
                &self.model,
                prompt,
                &row.inputs,
                &self.params_json,
                &self.input_validators,
            ),
            reuse_of: None,
        })
    }
}

/// Plans the catalog in `settings` against the store. With `Some(run_id)` the jobs are written
/// (new ones pending, changed ones reset, every valid row stamped with the run and its
/// position); with `None` (a dry run) the same counts are computed and nothing is written.
///
/// # Errors
/// [`PlanError::Catalog`] for an unreadable catalog or one with invalid rows (unless
/// `--skip-invalid`; then they are listed in [`Plan::invalid`]), [`PlanError::Store`] when the
/// state database fails. On any error nothing is written. (A bad template is refused when it is
/// read, before the plan: see [`Template::load`].)
pub async fn plan(store: &Store, settings: &PlanInput, run_id: Option<i64>) -> Result<Plan, PlanError> {
    let template = &settings.template;
    let task = template.task();
    let model = settings
        .model
        .clone()
        .or_else(|| template.front().model.clone())
        .unwrap_or_else(|| settings.provider.default_model(task).to_owned());
    let params = template.params();
    let params_json = serde_json::to_string(&params)
        .map_err(|e| PlanError::Internal(format!("cannot encode params: {e}")))?;
    let spec = settings.catalog.clone();
    let catalog = Catalog::open(&spec, task, template.body().placeholders(), template.path())
        .await?
        .with_local_images(settings.local_images);
    let mut ctx = Context {
        reuse: settings.reuse,
        leaders: HashMap::new(),
        force: settings.force,
        run_id,
        shared: JobShared {
            provider: settings.provider.as_str(),
            model: &model,
            task: task.as_str(),
            params: &params_json,
        },
    };
    let producer = Producer {
        catalog,
        template: template.clone(),
        task,
        model: model.clone(),
        params_json: params_json.clone(),
        skip_invalid: settings.skip_invalid,
        max_prompt_chars: max_prompt_chars(settings.provider),
        refused_inputs: Arc::clone(&settings.refused_inputs),
        input_validators: Arc::clone(&settings.input_validators),
    };

    let mut tx = store.begin_plan(run_id.is_some()).await?;
    let (batches, mut incoming) = mpsc::channel(2);
    let reader = tokio::spawn(producer.run(batches));
    let mut counts = PlanCounts::default();
    let mut samples = Vec::new();
    let now = now_ms();
    let mut stored = Ok(());
    while let Some(mut batch) = incoming.recv().await {
        stored = flush(&mut ctx, &mut tx, &mut batch, &mut counts, &mut samples, now).await;
        if stored.is_err() {
            break;
        }
    }
    // Hanging up tells the reader to stop sending; it still finishes listing problems.
    drop(incoming);
    let produced =
        reader.await.map_err(|e| PlanError::Internal(format!("the catalog reader stopped: {e}")))?;
    stored?;
    let Produced { problems, total_problems, invalid, failing } = produced?;
    counts.invalid = invalid;
    if failing {
        tx.rollback().await?;
        return Err(CatalogError::Invalid { path: spec.path, problems, total: total_problems }.into());
    }
    if run_id.is_some() {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }

    let submit = counts.to_submit().saturating_sub(counts.reused);
    let to_run = settings.limit.map_or(submit, |l| l.min(submit));
    let table = &PriceTable::new(settings.provider, &settings.price_overrides);
    let unit_price = table.unit_price(&model);
    let images = to_run * u64::from(params.num_images);
    let amount = table.images_price(&model, images);
    let estimate = Estimate {
        unit: table.unit(),
        unit_price,
        images,
        amount,
        dollars: amount.map(|a| table.to_dollars(a)),
    };
    // `--limit` takes rows in catalog order, like the samples: show only rows that will run.
    samples.truncate(usize::try_from(to_run).unwrap_or(usize::MAX));
    Ok(Plan {
        counts,
        to_run,
        estimate,
        invalid: problems,
        samples,
        provider: settings.provider,
        model,
        task,
        params,
        catalog: settings.catalog.path.clone(),
        prompt_file: template.path().to_owned(),
        written: run_id.is_some(),
    })
}

/// Classifies a batch against the store and, when writing, applies it.
async fn flush(
    ctx: &mut Context<'_>,
    tx: &mut PlanTx,
    batch: &mut Vec<NewJob>,
    counts: &mut PlanCounts,
    samples: &mut Vec<(String, String)>,
    now: i64,
) -> Result<(), PlanError> {
    if batch.is_empty() {
        return Ok(());
    }
    let skus: Vec<&str> = batch.iter().map(|j| j.sku.as_str()).collect();
    let existing = tx.existing(&skus).await?;
    // A row `retry --review` re-queued asks with its own seed: another request than the
    // template's, so it must neither share nor lend a result under the template's key.
    for job in batch.iter_mut() {
        if let Some(e) = existing.get(&job.sku)
            && let Some(seed) = e.seed_override
            && !classify(Some(e), &job.fingerprint, job.input_tag.as_deref(), ctx.force).resets()
        {
            job.request_key = job.request_key.as_deref().map(|k| seeded_request_key(k, seed));
        }
    }
    let holders = if ctx.reuse {
        let keys: Vec<&str> = batch.iter().filter_map(|j| j.request_key.as_deref()).collect();
        tx.key_holders(&keys).await?
    } else {
        HashMap::new()
    };
    let mut reset = Vec::new();
    let mut replaced = Vec::new();
    let mut touch = Vec::new();
    for job in batch.drain(..) {
        let class = classify(existing.get(&job.sku), &job.fingerprint, job.input_tag.as_deref(), ctx.force);
        let counter = match class {
            Class::New => &mut counts.new,
            Class::Changed => &mut counts.changed,
            Class::Forced => &mut counts.forced,
            Class::Done => &mut counts.done,
            Class::Failed => &mut counts.failed,
            Class::Waiting => &mut counts.waiting,
            Class::Pending => &mut counts.pending,
            Class::InFlight => &mut counts.in_flight,
            Class::Ambiguous => &mut counts.ambiguous,
            Class::Review => &mut counts.review,
        };
        *counter += 1;
        if class.submits() && samples.len() < SAMPLES {
            samples.push((job.sku.clone(), job.prompt.clone()));
        }
        let mut job = job;
        job.reuse_of = None;
        let submits = class.submits();
        if ctx.reuse
            && submits
            && let Some(key) = job.request_key.as_deref()
        {
            // A done result (or a request already out) with the same key first; else the first
            // row of this plan that asks the same.
            // `--force` asks for fresh results: only rows of this plan share a request then.
            let holder = holders.get(key).filter(|s| **s != job.sku && !ctx.force).cloned();
            job.reuse_of = match holder {
                Some(sku) => Some(sku),
                None => match ctx.leaders.get(key) {
                    Some(leader) if *leader != job.sku => Some(leader.clone()),
                    Some(_) => None,
                    None => {
                        ctx.leaders.insert(key.to_owned(), job.sku.clone());
                        None
                    }
                },
            };
            if job.reuse_of.is_some() {
                counts.reused += 1;
            }
        }
        if class.resets() {
            if class != Class::New {
                replaced.push(job.sku.clone());
            }
            reset.push(job);
        } else {
            touch.push(job);
        }
    }
    if let Some(run_id) = ctx.run_id {
        let replaced: Vec<&str> = replaced.iter().map(String::as_str).collect();
        tx.delete_outputs(&replaced).await?;
        tx.reset_jobs(run_id, &ctx.shared, reset, now).await?;
        let touch: Vec<Touch<'_>> = touch
            .iter()
            .map(|j| Touch {
                sku: &j.sku,
                position: j.position,
                name: j.name.as_deref(),
                input_tag: j.input_tag.as_deref(),
                request_key: j.request_key.as_deref(),
                reuse_of: j.reuse_of.as_deref(),
                reuse_known: !ctx.reuse || j.request_key.is_some(),
            })
            .collect();
        tx.touch_jobs(run_id, &touch).await?;
    }
    Ok(())
}

impl Plan {
    /// What `--dry-run` prints (and `run` prints before starting).
    #[must_use]
    pub fn render_text(&self) -> String {
        let c = &self.counts;
        let mut out = String::new();
        let per_row = if self.params.num_images == 1 {
            "1 image".to_owned()
        } else {
            format!("{} images", self.params.num_images)
        };
        let _ = writeln!(out, "Plan for {} with {}", self.catalog.display(), self.prompt_file.display());
        let _ = writeln!(
            out,
            "  provider {}, model {}, task {}, {per_row} per row",
            self.provider.as_str(),
            terminal_safe_line(&self.model),
            self.task.as_str()
        );
        let _ = writeln!(out, "  rows: {} valid, {} invalid", c.valid(), c.invalid);
        let _ = writeln!(
            out,
            "  new {} · changed {} · forced {} · pending {} · waiting {} · done (skip) {} · failed {} · in flight {} · ambiguous {}{}",
            c.new,
            c.changed,
            c.forced,
            c.pending,
            c.waiting,
            c.done,
            c.failed,
            c.in_flight,
            c.ambiguous,
            if c.review > 0 { format!(" · review {}", c.review) } else { String::new() }
        );
        let paid = c.to_submit().saturating_sub(c.reused);
        let limited = if self.to_run < paid { format!(" (--limit; {paid} in all)") } else { String::new() };
        if c.reused > 0 {
            let rows = c.to_submit();
            let _ = writeln!(
                out,
                "  {rows} rows → {} paid requests ({} reused: same model, prompt, inputs and parameters as another row)",
                rows.saturating_sub(c.reused),
                c.reused
            );
        }
        let e = &self.estimate;
        let (unit_name, fmt_amount): (&str, fn(f64) -> String) = match e.unit {
            Unit::Credits => ("credits", |a| format!("{a:.0}")),
            Unit::Dollars => ("dollars", |a| format!("${a:.2}")),
        };
        match (e.unit_price, e.amount, e.dollars) {
            (Some(p), Some(a), Some(d)) => {
                let each = match e.unit {
                    Unit::Credits => format!("{p} credits"),
                    Unit::Dollars => format!("${p}"),
                };
                let total = match e.unit {
                    Unit::Credits => format!("{} credits (${d:.2})", fmt_amount(a)),
                    Unit::Dollars => fmt_amount(a),
                };
                let _ = writeln!(
                    out,
                    "  to run: {} rows{limited} → {} images × {each} = {total}",
                    self.to_run, e.images
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "  to run: {} rows{limited} → {} images; price unknown: model {} is not in the price table (add it under [prices] in the config file, in {unit_name} per image)",
                    self.to_run,
                    e.images,
                    terminal_safe_line(&self.model)
                );
            }
        }
        if c.in_flight > 0 {
            let _ =
                writeln!(out, "  {} rows have a paid request out: this run finishes them first", c.in_flight);
        }
        if c.failed > 0 {
            let _ = writeln!(
                out,
                "  {} failed rows stay failed: `backdrop retry --failed` re-queues them",
                c.failed
            );
        }
        if c.ambiguous > 0 {
            let _ = writeln!(
                out,
                "  {} ambiguous rows may have been charged: `backdrop retry --ambiguous` re-queues them",
                c.ambiguous
            );
        }
        if !self.invalid.is_empty() {
            let _ = writeln!(out, "Skipped {} invalid rows:", c.invalid);
            for p in self.invalid.iter().take(crate::catalog::MAX_LISTED) {
                let _ = writeln!(out, "  {}", terminal_safe_line(&p.to_string()));
            }
            let shown = self.invalid.len().min(crate::catalog::MAX_LISTED) as u64;
            let total = self.invalid.len() as u64;
            if total > shown {
                let _ = writeln!(out, "  and {} more", total - shown);
            }
        }
        if !self.samples.is_empty() {
            let _ = writeln!(out, "First prompts to send:");
            for (sku, prompt) in &self.samples {
                // Catalog text, shown one line each with control characters escaped, and cut
                // short: a sample is for recognising the prompt, not reading all of it.
                let shown = match prompt.char_indices().nth(SAMPLE_CHARS) {
                    Some((cut, _)) => format!("{}…", &prompt[..cut]),
                    None => prompt.clone(),
                };
                let _ = writeln!(out, "  {}: {}", terminal_safe_line(sku), terminal_safe_line(&shown));
            }
        }
        if !self.written {
            let _ = writeln!(out, "Dry run: nothing was sent, nothing was charged.");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(fp: &str, state: JobState) -> Existing {
        Existing { fingerprint: fp.into(), state, input_tag: None, seed_override: None }
    }

    #[test]
    fn plan_rules() {
        assert_eq!(classify(None, "a", None, false), Class::New);
        assert_eq!(classify(Some(&existing("a", JobState::Done)), "a", None, false), Class::Done);
        assert_eq!(classify(Some(&existing("a", JobState::Done)), "a", None, true), Class::Forced);
        assert_eq!(classify(Some(&existing("a", JobState::Done)), "b", None, false), Class::Changed);
        assert_eq!(classify(Some(&existing("a", JobState::Failed)), "a", None, true), Class::Failed);
        assert_eq!(classify(Some(&existing("a", JobState::Failed)), "b", None, false), Class::Changed);
        assert_eq!(classify(Some(&existing("a", JobState::Waiting)), "a", None, false), Class::Waiting);
        assert_eq!(classify(Some(&existing("a", JobState::Pending)), "a", None, false), Class::Pending);
        for st in [JobState::Submitting, JobState::Submitted, JobState::Fetching] {
            assert_eq!(classify(Some(&existing("a", st)), "b", None, false), Class::InFlight, "{st}");
        }
        assert_eq!(classify(Some(&existing("a", JobState::Ambiguous)), "b", None, true), Class::Ambiguous);
    }

    #[test]
    fn a_seed_override_makes_another_request_key() {
        let key = "k".repeat(64);
        assert_ne!(seeded_request_key(&key, 1), key);
        assert_ne!(seeded_request_key(&key, 1), seeded_request_key(&key, 2));
        assert_ne!(seeded_request_key(&key, 1), seeded_request_key(&"j".repeat(64), 1));
        assert_eq!(seeded_request_key(&key, 1), seeded_request_key(&key, 1));
    }

    #[test]
    fn a_changed_picture_under_the_same_url_is_a_changed_row() {
        let tagged = |t: Option<&str>| Existing {
            fingerprint: "a".into(),
            state: JobState::Done,
            input_tag: t.map(str::to_owned),
            seed_override: None,
        };
        assert_eq!(classify(Some(&tagged(Some("t1"))), "a", Some("t1"), false), Class::Done);
        assert_eq!(classify(Some(&tagged(Some("t1"))), "a", Some("t2"), false), Class::Changed);
        // Checks off now, or when the row was planned: nothing is known, nothing re-runs.
        assert_eq!(classify(Some(&tagged(Some("t1"))), "a", None, false), Class::Done);
        assert_eq!(classify(Some(&tagged(None)), "a", Some("t2"), false), Class::Done);
        let url = |u: &str| Input::Url(u.into());
        let v: HashMap<String, String> =
            [("https://x/a.png".to_owned(), "\"e1\"".to_owned())].into_iter().collect();
        assert!(input_tag(&[url("https://x/a.png")], &v).is_some());
        assert_eq!(input_tag(&[url("https://x/b.png")], &v), None, "an unchecked URL: no tag");
        assert_eq!(input_tag(&[], &v), None);
        let v2: HashMap<String, String> =
            [("https://x/a.png".to_owned(), "\"e2\"".to_owned())].into_iter().collect();
        assert_ne!(input_tag(&[url("https://x/a.png")], &v), input_tag(&[url("https://x/a.png")], &v2));
    }

    #[test]
    fn fingerprint_covers_every_field() {
        let url = [Input::Url("https://x/a.png".into())];
        let base = fingerprint("A-1", Task::Edit, "m", "p", &url, "{}");
        assert_eq!(base.len(), 64);
        assert_eq!(base, fingerprint("A-1", Task::Edit, "m", "p", &url, "{}"), "stable");
        let file = |h: &str| [Input::File { path: "/c/a.png".into(), sha256: h.into() }];
        let variants = [
            fingerprint("A-2", Task::Edit, "m", "p", &url, "{}"),
            fingerprint("A-1", Task::Generate, "m", "p", &url, "{}"),
            fingerprint("A-1", Task::Edit, "m2", "p", &url, "{}"),
            fingerprint("A-1", Task::Edit, "m", "p2", &url, "{}"),
            fingerprint("A-1", Task::Edit, "m", "p", &url, "{\"seed\":1}"),
            fingerprint("A-1", Task::Edit, "m", "p", &[Input::Url("https://x/b.png".into())], "{}"),
            fingerprint("A-1", Task::Edit, "m", "p", &[], "{}"),
            fingerprint("A-1", Task::Edit, "m", "p", &file("aa"), "{}"),
        ];
        for v in &variants {
            assert_ne!(v, &base);
        }
        // A file is its content: the same bytes under another path are the same job; other bytes are not.
        let moved = [Input::File { path: "/elsewhere/a.png".into(), sha256: "aa".into() }];
        assert_eq!(
            fingerprint("A-1", Task::Edit, "m", "p", &file("aa"), "{}"),
            fingerprint("A-1", Task::Edit, "m", "p", &moved, "{}")
        );
        assert_ne!(
            fingerprint("A-1", Task::Edit, "m", "p", &file("aa"), "{}"),
            fingerprint("A-1", Task::Edit, "m", "p", &file("bb"), "{}")
        );
        // Length prefixes: moving a boundary between fields changes the fingerprint.
        assert_ne!(
            fingerprint("ab", Task::Edit, "c", "p", &[], "{}"),
            fingerprint("a", Task::Edit, "bc", "p", &[], "{}")
        );
    }
}
