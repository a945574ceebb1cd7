//! The worker pool: resumes jobs a crash left at the provider, then claims this run's jobs in
//! catalog order, at most the adaptive window of jobs in flight end to end (submit → poll →
//! download; `concurrency` is its ceiling), and drives each through the provider with the
//! budget, the adaptive rate limiter, retry policy and store writer. A 429 means "later": it
//! moves the pace or the window, never a row's attempts; only 429s for `patience` stop the run.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::adaptive::{Said, Throttle};
use super::backoff::{PollSchedule, PollTiming, RetryPolicy};
use super::limiter::{Limiter, Window, WindowPermit};
use super::polling::{LatencySample, PollBudget, PollPlan, SAMPLE_SIZE};
use super::stats::RunStats;
use super::webhooks::Webhooks;
use crate::domain::{JobSpec, RequestRef};
use crate::fetch::{Downloaded, FetchError, Fetcher, Persister};
use crate::money::{Budget, PriceTable};
use crate::provider::{
    ErrorClass, JobResult, PollOutcome, Provider, ProviderError, StopReason, Submission, Throttled,
};
use crate::store::{AttemptEnd, Change, JobState, Store, StoreError, StoredJob, Writer, now_ms};

/// Rows read from the store per page: memory stays flat whatever the catalog size.
const PAGE: i64 = 256;
/// Consecutive failed polls before a job is left `submitted` for the next run.
const MAX_POLL_ERRORS: u32 = 30;
/// Times an expired output URL is re-resolved through the provider.
const MAX_RERESOLVE: u32 = 2;
/// After Ctrl-C or SIGTERM, how long rows in flight may still poll once and download a result
/// that is ready (output URLs expire: 24 h for seedance), before everything stops. Inside
/// Docker's 10 s between SIGTERM and SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Why a run stopped submitting before the queue was empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// 402 from the provider.
    OutOfCredits,
    /// `--max-credits` / `--max-cost` reached.
    Budget,
    /// 401/403 from the provider.
    KeyRejected,
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// The output folder cannot be written (full, read-only, not permitted, failing).
    OutputFailing,
    /// The server answered nothing but 429s for the run's patience.
    Throttled,
}

/// How long a run may get nothing but 429s before it stops, unless the user says otherwise.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(300);

/// A synchronous submit still unanswered after this long was taken by the server: a refusal
/// (429, 402, a bad request) comes with the first answer, within a round trip.
const TAKEN_AFTER: Duration = Duration::from_millis(200);

/// How the pool ended.
#[derive(Debug, Clone, Default)]
pub struct PoolOutcome {
    /// The first stop, if any.
    pub stop: Option<Stop>,
    /// Jobs left at the provider (polls kept failing); the next run collects them.
    pub unfinished: u64,
    /// Where the pace and the window stood at the end, below the user's ceilings.
    pub limits: FoundLimits,
}

/// The server's limits as this run found them: the adaptive pace and window at the end, beside
/// the ceilings the user set, and how many submits were answered 429 on the way.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct FoundLimits {
    /// Submits answered 429 in this run.
    pub throttled: u64,
    /// The pace at the end, in submits per second.
    pub pace_per_sec: f64,
    /// `--rate`, in submits per second.
    pub rate_ceiling_per_sec: f64,
    /// The window of jobs in flight at the end.
    pub window: u32,
    /// `--concurrency`.
    pub concurrency_ceiling: u32,
}

/// What the workers share.
pub struct Pool<P: Provider> {
    /// The state store (reads).
    pub store: Store,
    /// The state writer.
    pub writer: Writer,
    /// The provider.
    pub provider: Arc<P>,
    /// Downloads.
    pub fetcher: Arc<Fetcher>,
    /// Makes downloads durable, in batches.
    pub persister: Persister,
    /// The shared rate limiter and Retry-After gate.
    pub limiter: Arc<Limiter>,
    /// Submit retries.
    pub retry: RetryPolicy,
    /// Poll cadence.
    pub poll: PollSchedule,
    /// The spending cap.
    pub budget: Arc<Budget>,
    /// Prices per image, in the provider's unit (a model missing from it costs 0).
    pub prices: Arc<PriceTable>,
    /// Live counters.
    pub stats: Arc<RunStats>,
    /// This run.
    pub run_id: i64,
    /// Jobs in flight at once at most: the ceiling of the adaptive window.
    pub concurrency: usize,
    /// How long the server may answer nothing but 429s before the run stops (resumable).
    pub patience: Duration,
    /// Status polls per row, on average, the learned poll plan may spend.
    pub polls_per_row: f64,
    /// Rows to claim at most (resumed jobs not counted: they are already paid for).
    pub limit: Option<u64>,
    /// Warn when the provider reports fewer credits than this.
    pub low_credit_warning: Option<f64>,
    /// Cancelled on Ctrl-C/SIGTERM: stop claiming, leave at safe points.
    pub interrupt: CancellationToken,
    /// The webhook receiver, when `--webhook-listen` is set: a delivery wakes its poller early.
    pub webhooks: Option<Webhooks>,
    /// The quality gate, unless turned off: a flagged row ends `review`, not `done`.
    pub gate: Option<Arc<super::gate::Gate>>,
    /// The template's export presets, when it has any: a row is `done` only with its exports.
    pub exporter: Option<Arc<super::export::Exporter>>,
}

struct Shared<P: Provider> {
    pool: Pool<P>,
    stop: Mutex<Option<Stop>>,
    /// Cancelled when submits must stop (402, budget, 401, interrupt).
    stop_submits: CancellationToken,
    /// Cancelled when everything must stop now (401, a store failure, the end of the grace after
    /// an interrupt).
    stop_all: CancellationToken,
    low_credit_warned: std::sync::atomic::AtomicBool,
    /// When this run's jobs tend to be done, for the first polls.
    timing: PollTiming,
    /// The adaptive window of jobs in flight.
    window: Arc<Window>,
    /// The generation times seen (earlier runs' as the prior) and the poll plan made from them.
    learned: Mutex<Learned>,
    /// The provider's push is missing (its stream answered 404): poll only.
    no_push: std::sync::atomic::AtomicBool,
    /// Since when the run has seen no progress (a submit answered other than 429, or a job
    /// completed), when its last submit answer was a 429: the patience counts from here.
    throttled: Mutex<Option<Instant>>,
}

/// What a run knows of its generation times.
#[derive(Default)]
struct Learned {
    sample: LatencySample,
    /// This run's own observations, `(model, time)`, stored at the end as the next run's prior.
    this_run: Vec<(String, Duration)>,
    plan: Option<Arc<PollPlan>>,
    /// Observations since the plan was made.
    fresh: usize,
}

impl<P: Provider> Shared<P> {
    /// The poll plan for this run's jobs, remade as observations come: after each of the first
    /// eight, then after an eighth of the sample's size in new ones (at most 32). A plan costs
    /// about half a millisecond of CPU under the lock, and one observation moves a large sample
    /// little. `None` before anything is known.
    fn poll_plan(&self) -> Option<Arc<PollPlan>> {
        let mut learned = self.learned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let every = (learned.sample.len() / 8).clamp(1, 32);
        let due = learned.plan.is_none() || learned.fresh >= every;
        if due && !learned.sample.is_empty() {
            let budget = PollBudget {
                polls_per_row: self.pool.polls_per_row,
                min_gap: Duration::ZERO,
                max_gap: self.pool.poll.max,
            };
            learned.plan = PollPlan::for_observations(&learned.sample, budget).map(Arc::new);
            learned.fresh = 0;
        }
        learned.plan.clone()
    }

    /// A job of this run was done `latency` after its submit, exactly (the provider pushed it).
    fn learn_exact(&self, model: &str, latency: Duration) {
        let mut learned = self.learned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        learned.sample.record(latency);
        learned.this_run.push((model.to_owned(), latency));
        learned.fresh += 1;
    }

    /// A job of this run was seen running `running_at` after its submit (`None`: never polled
    /// before) and done at `done_at`.
    fn learn(&self, model: &str, running_at: Option<Duration>, done_at: Duration) {
        let mut learned = self.learned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        learned.sample.record_bracket(running_at, done_at);
        learned.fresh += 1;
        // Only a time known to within a quarter is kept for later runs: the prior forgets how
        // wide a bracket was, and "done at the first poll" says little about when.
        if let Some(low) = running_at.filter(|low| *low <= done_at && (done_at - *low) * 4 <= done_at) {
            learned.this_run.push((model.to_owned(), low + (done_at - low) / 2));
        }
    }

    /// After the first poll, poll in steps of a tenth of the learned latency (at least 10 ms),
    /// growing to `--poll-max`; before anything is learned, the configured schedule.
    fn poll_schedule(&self) -> PollSchedule {
        let configured = self.pool.poll;
        match self.timing.fastest() {
            Some(l) => PollSchedule {
                initial: (l / 10)
                    .clamp(Duration::from_millis(10), configured.initial.max(Duration::from_millis(10))),
                max: configured.max,
            },
            None => configured,
        }
    }

    fn stop(&self, why: Stop) {
        let mut stop = self.stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if stop.is_none() {
            match why {
                Stop::OutOfCredits => {
                    warn!("out of credits (402): no new submits; finishing the jobs in flight")
                }
                Stop::Budget => warn!("budget reached: no new submits; finishing the jobs in flight"),
                Stop::KeyRejected => warn!("the API rejected the key: stopping now"),
                Stop::Interrupted => warn!(
                    grace_secs = SHUTDOWN_GRACE.as_secs(),
                    "interrupted: no new submits; downloading results that are ready, then exiting"
                ),
                Stop::OutputFailing => warn!(
                    "the output folder cannot be written: no new submits; paid rows keep their results \
                     and the next run downloads them"
                ),
                Stop::Throttled => warn!(
                    patience_secs = self.pool.patience.as_secs(),
                    "the server answered nothing but 429 (too many requests) for the whole patience: \
                     no new submits; finishing the jobs in flight. Run again later to resume"
                ),
            }
            *stop = Some(why);
        }
        drop(stop);
        self.stop_submits.cancel();
        // An interrupt stops everything only after the grace (see `run`).
        if why == Stop::KeyRejected {
            self.stop_all.cancel();
        }
    }

    /// A submit was answered 429: the run is throttled from now, unless it already was.
    fn saw_429(&self) {
        let mut throttled = self.throttled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        throttled.get_or_insert_with(Instant::now);
    }

    /// A submit was answered other than 429, or a job completed: the run is not stuck.
    fn saw_progress(&self) {
        *self.throttled.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Since when the run has got nothing but 429s, if it has.
    fn throttled_since(&self) -> Option<Instant> {
        *self.throttled.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn price(&self, job: &JobSpec) -> f64 {
        self.pool.prices.job_price(&job.model, job.params.num_images).unwrap_or(0.0)
    }

    async fn commit(&self, change: Change) -> Result<i64, StoreError> {
        self.pool.writer.commit(change).await
    }

    /// Sleeps, unless `token` fires first; answers false when cut short.
    async fn sleep(&self, d: Duration, token: &CancellationToken) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = token.cancelled() => false,
        }
    }

    /// Sleeps until the next poll: answers false when everything must stop, true to poll, early
    /// (setting `last_poll`) when the run is interrupted.
    async fn poll_sleep(&self, d: Duration, last_poll: &mut bool) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.stop_all.cancelled() => false,
            () = self.pool.interrupt.cancelled() => {
                *last_poll = true;
                true
            }
        }
    }

    fn note_credits_remaining(&self, result: &JobResult) {
        if let (Some(left), Some(threshold)) = (result.credits_remaining, self.pool.low_credit_warning)
            && left < threshold
            && !self.low_credit_warned.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            warn!(credits_remaining = left, threshold, "provider balance is low");
        }
    }
}

/// A job's place among the `concurrency` in flight. Released as soon as the provider's part is
/// over (the last output is on disk), before the final bookkeeping commit, so the next job can
/// start while the store catches up.
struct InFlight {
    permit: Option<WindowPermit>,
    stats: Arc<RunStats>,
}

impl InFlight {
    fn release(&mut self) {
        drop(self.take());
    }

    /// Gives the place up (to hand it back to the window with a verdict).
    fn take(&mut self) -> Option<WindowPermit> {
        let permit = self.permit.take();
        if permit.is_some() {
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        permit
    }

    /// Takes a new place.
    fn hold(&mut self, permit: WindowPermit) {
        self.release();
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.permit = Some(permit);
    }
}

/// How one job's turn ended, for the counters.
enum JobEnd {
    Done,
    /// Paid and saved, held by the quality gate.
    Review,
    Failed,
    Ambiguous,
    /// Left for a later run (stop, interrupt, polls failing): nothing lost.
    Left,
    Unfinished,
}

/// Runs the pool to completion (or to a stop) and answers how it ended.
///
/// # Errors
/// A store error: the state file can no longer be written, so nothing is safe to send.
pub async fn run<P: Provider>(pool: Pool<P>) -> Result<PoolOutcome, StoreError> {
    let concurrency = u32::try_from(pool.concurrency.max(1)).unwrap_or(u32::MAX);
    // Earlier runs' generation times: the first polls go where their jobs finished.
    let keep = i64::try_from(SAMPLE_SIZE).unwrap_or(256);
    let prior = pool.store.recent_latencies(pool.provider.name(), keep).await?;
    let shared = Arc::new(Shared {
        window: Window::new(concurrency),
        throttled: Mutex::new(None),
        learned: Mutex::new(Learned { sample: LatencySample::with_prior(prior), ..Learned::default() }),
        no_push: std::sync::atomic::AtomicBool::new(false),
        stop_submits: pool.interrupt.child_token(),
        stop_all: CancellationToken::new(),
        pool,
        stop: Mutex::new(None),
        low_credit_warned: std::sync::atomic::AtomicBool::new(false),
        timing: PollTiming::default(),
    });
    let mut tasks: JoinSet<Result<JobEnd, StoreError>> = JoinSet::new();
    let mut outcome = PoolOutcome::default();
    let mut fatal: Option<StoreError> = None;
    // On Ctrl-C or SIGTERM: no new submits at once; rows in flight poll once more and download
    // what is ready (paid results whose URLs would expire while the process is away), and
    // everything stops after the grace.
    // Aborted on every way out: it holds the writer, whose task ends only when all its holders do.
    let grace = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            shared.pool.interrupt.cancelled().await;
            shared.stop(Stop::Interrupted);
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            warn!("shutdown grace over: leaving what is still in flight for the next run");
            shared.stop_all.cancel();
        }
    }));
    // A server that answers nothing but 429s for the patience stops the run (resumable).
    let patience = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            let tick = (shared.pool.patience / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = tokio::time::sleep(tick) => {}
                    () = shared.stop_submits.cancelled() => return,
                }
                if shared.throttled_since().is_some_and(|t| t.elapsed() >= shared.pool.patience) {
                    shared.stop(Stop::Throttled);
                    return;
                }
            }
        }
    }));

    // 1. Jobs a previous run left at the provider: poll or re-download them, never resubmit.
    let mut after_id = 0;
    'resume: loop {
        let page = shared.pool.store.resumable_jobs(after_id, PAGE).await?;
        let Some(last) = page.last() else { break };
        after_id = last.spec.id;
        for job in page {
            let permit = tokio::select! {
                permit = acquire(&shared, &shared.stop_all) => permit,
                // Interrupted: what is in flight finishes; nothing more is taken on.
                () = shared.pool.interrupt.cancelled() => None,
            };
            let Some(permit) = permit else { break 'resume };
            RunStats::bump(&shared.pool.stats.total);
            spawn(&mut tasks, &shared, job, permit);
            reap(&mut tasks, &mut outcome, &mut fatal, &shared);
        }
    }

    // 2. This run's plan, in catalog order.
    let mut after_position = i64::MIN;
    let mut claimed: u64 = 0;
    'claim: loop {
        if fatal.is_some() || shared.stop_submits.is_cancelled() {
            break;
        }
        let page = shared.pool.store.claimable_jobs(shared.pool.run_id, after_position, PAGE).await?;
        let Some(last) = page.last() else { break };
        after_position = last.position;
        for job in page {
            if shared.pool.limit.is_some_and(|limit| claimed >= limit) {
                break 'claim;
            }
            let Some(permit) = acquire(&shared, &shared.stop_submits).await else { break 'claim };
            claimed += 1;
            RunStats::bump(&shared.pool.stats.total);
            spawn(&mut tasks, &shared, job, permit);
            reap(&mut tasks, &mut outcome, &mut fatal, &shared);
            if fatal.is_some() {
                break 'claim;
            }
        }
    }

    while let Some(joined) = tasks.join_next().await {
        record(joined, &mut outcome, &mut fatal, &shared);
    }
    drop(grace);
    drop(patience);
    if let Some(e) = fatal {
        return Err(e);
    }
    // What this run learned of its generation times is the next run's prior.
    let seen = std::mem::take(
        &mut shared.learned.lock().unwrap_or_else(std::sync::PoisonError::into_inner).this_run,
    );
    shared.pool.store.save_latencies(shared.pool.run_id, shared.pool.provider.name(), &seen, keep).await?;
    if shared.pool.interrupt.is_cancelled() {
        shared.stop(Stop::Interrupted);
    }
    outcome.stop = *shared.stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    outcome.limits = FoundLimits {
        throttled: RunStats::get(&shared.pool.stats.throttled),
        pace_per_sec: shared.pool.limiter.rate(),
        rate_ceiling_per_sec: shared.pool.limiter.ceiling(),
        window: shared.window.limit(),
        concurrency_ceiling: shared.window.ceiling(),
    };
    Ok(outcome)
}

async fn acquire<P: Provider>(shared: &Shared<P>, token: &CancellationToken) -> Option<WindowPermit> {
    tokio::select! {
        permit = shared.window.acquire() => Some(permit),
        () = token.cancelled() => None,
    }
}

fn spawn<P: Provider>(
    tasks: &mut JoinSet<Result<JobEnd, StoreError>>,
    shared: &Arc<Shared<P>>,
    job: StoredJob,
    permit: WindowPermit,
) {
    let shared = Arc::clone(shared);
    let span = info_span!("job", sku = %job.spec.sku, id = job.spec.id);
    tasks.spawn(
        async move {
            shared.pool.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let mut in_flight = InFlight { permit: Some(permit), stats: Arc::clone(&shared.pool.stats) };
            let end = work(&shared, job, &mut in_flight).await;
            in_flight.release();
            end
        }
        .instrument(span),
    );
}

/// Collects finished tasks without waiting, so the JoinSet does not grow with the catalog.
fn reap<P: Provider>(
    tasks: &mut JoinSet<Result<JobEnd, StoreError>>,
    outcome: &mut PoolOutcome,
    fatal: &mut Option<StoreError>,
    shared: &Shared<P>,
) {
    while let Some(joined) = tasks.try_join_next() {
        record(joined, outcome, fatal, shared);
    }
}

fn record<P: Provider>(
    joined: Result<Result<JobEnd, StoreError>, tokio::task::JoinError>,
    outcome: &mut PoolOutcome,
    fatal: &mut Option<StoreError>,
    shared: &Shared<P>,
) {
    let stats = &shared.pool.stats;
    match joined {
        Ok(Ok(JobEnd::Done)) => RunStats::bump(&stats.done),
        Ok(Ok(JobEnd::Review)) => RunStats::bump(&stats.review),
        Ok(Ok(JobEnd::Failed)) => RunStats::bump(&stats.failed),
        Ok(Ok(JobEnd::Ambiguous)) => RunStats::bump(&stats.ambiguous),
        Ok(Ok(JobEnd::Left)) => {}
        Ok(Ok(JobEnd::Unfinished)) => outcome.unfinished += 1,
        Ok(Err(e)) => {
            // Without a working store nothing else may be sent: stop everything.
            tracing::error!(error = %e, "state database write failed; stopping");
            shared.stop_submits.cancel();
            shared.stop_all.cancel();
            fatal.get_or_insert(e);
        }
        Err(join) => {
            tracing::error!(error = %join, "a worker panicked; its row keeps its last saved state");
            RunStats::bump(&stats.failed);
        }
    }
}

async fn work<P: Provider>(
    shared: &Shared<P>,
    job: StoredJob,
    in_flight: &mut InFlight,
) -> Result<JobEnd, StoreError> {
    match job.state {
        JobState::Submitted => match &job.request {
            Some(request) => poll_phase(shared, &job, request.clone(), None, in_flight).await,
            None => fail(shared, &job, None, "submitted without a request id (corrupt row)").await,
        },
        JobState::Fetching => {
            let parsed = job.result.as_deref().map(serde_json::from_str::<JobResult>);
            match parsed {
                Some(Ok(result)) => {
                    fetch_phase(shared, &job, job.request.clone(), result, None, in_flight).await
                }
                // The result was lost; poll again if we can, the outputs are still paid for.
                _ => match &job.request {
                    Some(request) => poll_phase(shared, &job, request.clone(), None, in_flight).await,
                    None => {
                        fail(shared, &job, None, "paid, not downloaded: the saved result is unreadable").await
                    }
                },
            }
        }
        JobState::Pending | JobState::Waiting => submit_phase(shared, &job, in_flight).await,
        // Never claimed; listed for completeness.
        JobState::Submitting | JobState::Done | JobState::Failed | JobState::Ambiguous | JobState::Review => {
            Ok(JobEnd::Left)
        }
    }
}

async fn fail<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    attempt_id: Option<i64>,
    reason: &str,
) -> Result<JobEnd, StoreError> {
    warn!(sku = %job.spec.sku, reason, "row failed");
    let end =
        AttemptEnd { error_class: Some("fail"), error: Some(reason.to_owned()), ..AttemptEnd::default() };
    shared.commit(Change::Failed { job_id: job.spec.id, attempt_id, end }).await?;
    Ok(JobEnd::Failed)
}

fn attempt_end(e: &ProviderError, class: &'static str, latency: Duration) -> AttemptEnd {
    AttemptEnd {
        status_code: e.status(),
        error_class: Some(class),
        error: Some(e.to_string()),
        latency_ms: Some(i64::try_from(latency.as_millis()).unwrap_or(i64::MAX)),
    }
}

async fn submit_phase<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    in_flight: &mut InFlight,
) -> Result<JobEnd, StoreError> {
    let spec = &job.spec;
    let mut attempts = job.attempts;
    if let Some(at) = job.next_attempt_at {
        let wait = u64::try_from(at - now_ms()).unwrap_or(0);
        if wait > 0 && !shared.sleep(Duration::from_millis(wait), &shared.stop_submits).await {
            return Ok(JobEnd::Left);
        }
    }
    // Unpaid work first (fal uploads local inputs): before any intent, never counted as an
    // attempt, retried by the provider on its own.
    let prepared = tokio::select! {
        p = shared.pool.provider.prepare(spec) => p,
        () = shared.stop_submits.cancelled() => return Ok(JobEnd::Left),
    };
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            if let ErrorClass::Stop(reason) = e.class() {
                shared.stop(match reason {
                    StopReason::KeyRejected => Stop::KeyRejected,
                    StopReason::OutOfCredits => Stop::OutOfCredits,
                });
                return Ok(JobEnd::Left);
            }
            return fail(shared, job, None, &format!("preparing the inputs failed: {e}")).await;
        }
    };
    loop {
        if attempts >= shared.pool.retry.max_attempts {
            return fail(shared, job, None, &format!("gave up after {attempts} attempts")).await;
        }
        if shared.stop_submits.is_cancelled() {
            return Ok(JobEnd::Left);
        }
        let ready = tokio::select! {
            () = shared.pool.limiter.acquire() => true,
            () = shared.stop_submits.cancelled() => false,
        };
        if !ready {
            return Ok(JobEnd::Left);
        }
        // Reserved after the rate limiter, so workers queued there hold no money.
        let price = shared.price(spec);
        let reservation = tokio::select! {
            r = shared.pool.budget.reserve(price) => r,
            () = shared.stop_submits.cancelled() => return Ok(JobEnd::Left),
        };
        let Some(reservation) = reservation else {
            shared.stop(Stop::Budget);
            return Ok(JobEnd::Left);
        };
        if shared.stop_submits.is_cancelled() {
            shared.pool.budget.release(reservation);
            return Ok(JobEnd::Left);
        }
        // The intent is durable before the request leaves: a crash from here on shows up as
        // `submitting` → `ambiguous`, never as a silent second charge.
        let attempt_id =
            shared.commit(Change::Intent { job_id: spec.id, run_id: shared.pool.run_id }).await?;
        // Pacing is enforced where the request leaves, after the intent's variable fsync.
        shared.pool.limiter.space_send().await;
        attempts += 1;
        RunStats::bump(&shared.pool.stats.submits);
        let started = Instant::now();
        let sent = tokio::time::Instant::now();
        // Not raced against shutdown: the answer carries the request id we must save. The
        // client's request timeout bounds the wait.
        let submit = shared.pool.provider.submit(&prepared);
        // A synchronous call is answered only when its generation is done: waiting for that to
        // grow the window would hold a run at two jobs in flight for whole generations (seconds
        // to a minute each) before it reached its --concurrency. A refusal comes with the first
        // answer, so one still unanswered after `TAKEN_AFTER` was taken.
        let synchronous = shared.pool.provider.answers_at_completion(&prepared);
        let answer = if synchronous {
            tokio::pin!(submit);
            tokio::select! {
                answer = &mut submit => answer,
                () = tokio::time::sleep(TAKEN_AFTER) => {
                    if let Some(permit) = &in_flight.permit {
                        shared.window.on_accepted(permit);
                    }
                    submit.await
                }
            }
        } else {
            submit.await
        };
        let latency = started.elapsed();
        let latency_ms = Some(i64::try_from(latency.as_millis()).unwrap_or(i64::MAX));
        // The answer's verdict on the pace and the window (a 429 below).
        if answer.is_ok() {
            shared.saw_progress();
            shared.pool.limiter.on_success(sent);
            if (!synchronous || latency < TAKEN_AFTER)
                && let Some(permit) = &in_flight.permit
            {
                shared.window.on_accepted(permit);
            }
        }
        if let Ok(Submission::Queued { position, .. }) = &answer {
            // Paid and waiting behind others in the provider's queue: the account runs all it
            // may, so the window shrinks instead of stacking paid requests in the queue.
            debug!(position, "accepted into the provider's queue behind others");
            shared.window.on_queued(sent, u64::from(*position));
        }
        if let Err(e) = &answer
            && e.status() != Some(429)
        {
            shared.saw_progress();
        }
        match answer {
            Ok(Submission::Accepted(request) | Submission::Queued { request, .. }) => {
                info!(request_id = %request.request_id, attempt = attempts, latency_ms, "submitted");
                shared.pool.budget.charge(reservation, price);
                shared.pool.stats.add_spent(price);
                let end = AttemptEnd { status_code: Some(200), latency_ms, ..AttemptEnd::default() };
                // Queued at once, not awaited: polling can start while the writer commits it,
                // and the writer's order guarantees it is durable before any later change.
                shared
                    .pool
                    .writer
                    .send(Change::Accepted {
                        job_id: spec.id,
                        attempt_id,
                        request: request.clone(),
                        charged: price,
                        end,
                    })
                    .await?;
                let accepted = StoredJob { credits: job.credits + price, ..job.clone() };
                return poll_phase(shared, &accepted, request, Some(started), in_flight).await;
            }
            Ok(Submission::Completed { request_id, result }) => {
                let charged = result.charged.unwrap_or(price);
                info!(
                    request_id = request_id.as_deref().unwrap_or(""),
                    attempt = attempts,
                    latency_ms,
                    "completed"
                );
                shared.pool.budget.charge(reservation, charged);
                shared.pool.stats.add_spent(charged);
                shared.note_credits_remaining(&result);
                let end = AttemptEnd { status_code: Some(200), latency_ms, ..AttemptEnd::default() };
                shared
                    .pool
                    .writer
                    .send(Change::Completed {
                        job_id: spec.id,
                        attempt_id: Some(attempt_id),
                        request_id: request_id.clone(),
                        result: result_json(&result),
                        charged,
                        end,
                    })
                    .await?;
                let request = request_id.map(|request_id| RequestRef {
                    request_id,
                    status_url: None,
                    response_url: None,
                    cancel_url: None,
                });
                return fetch_phase(shared, job, request, result, None, in_flight).await;
            }
            Err(e) if e.throttled().is_some() => {
                // 429: the API wrote that it did not take the request (nothing charged), and
                // that it wants it later. It costs the row no attempt: the pace or the window
                // adapts, and only the patience (nothing but 429s for that long) stops the run.
                shared.pool.budget.release(reservation);
                shared.saw_429();
                RunStats::bump(&shared.pool.stats.throttled);
                attempts = attempts.saturating_sub(1);
                RunStats::bump(&shared.pool.stats.retries);
                shared
                    .commit(Change::Released {
                        job_id: spec.id,
                        attempt_id: Some(attempt_id),
                        end: attempt_end(&e, "retry", latency),
                    })
                    .await?;
                let retry_after = e.retry_after().map(|ra| ra.min(shared.pool.retry.cap));
                let said = match e.throttled() {
                    Some(Throttled::Rate) => Said::Rate,
                    Some(Throttled::InFlight) => Said::InFlight,
                    Some(Throttled::Unsaid) | None => Said::Nothing,
                };
                match Throttle::classify(retry_after, said) {
                    Throttle::Rate { retry_after } => {
                        debug!(retry_after_ms = retry_after.map(|d| d.as_millis()), "429: slowing the pace");
                        shared.pool.limiter.on_429(sent, retry_after);
                    }
                    Throttle::InFlight => {
                        let alone = shared.window.in_flight() <= 1;
                        if let Some(permit) = in_flight.take() {
                            shared.window.on_too_many(permit, sent);
                        }
                        // Refused with nothing else of ours in flight: the server's count is not
                        // ours to lower by waiting for a job to end, so the pace slows instead
                        // (else a lone job would resubmit at the ceiling's pace).
                        if alone {
                            shared.pool.limiter.on_429(sent, retry_after);
                        }
                        debug!(
                            window = shared.window.limit(),
                            "429 too many in flight: shrinking the window"
                        );
                        let Some(permit) = acquire(shared, &shared.stop_submits).await else {
                            return Ok(JobEnd::Left);
                        };
                        in_flight.hold(permit);
                    }
                }
            }
            Err(e) => match e.class() {
                ErrorClass::Retry => {
                    shared.pool.budget.release(reservation);
                    if let Some(ra) = e.retry_after() {
                        let pause = ra.min(shared.pool.retry.cap);
                        shared.pool.limiter.pause_until(tokio::time::Instant::now() + pause);
                        info!(
                            pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                            "rate limited: pausing all submits"
                        );
                    }
                    let Some(delay) = shared.pool.retry.next_delay(attempts, e.retry_after()) else {
                        let reason = format!("gave up after {attempts} attempts: {e}");
                        warn!(reason, "row failed");
                        let end = attempt_end(&e, "fail", latency);
                        let end = AttemptEnd { error: Some(reason), ..end };
                        shared
                            .commit(Change::Failed { job_id: spec.id, attempt_id: Some(attempt_id), end })
                            .await?;
                        return Ok(JobEnd::Failed);
                    };
                    RunStats::bump(&shared.pool.stats.retries);
                    info!(attempt = attempts, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), status = e.status(), error = %e, "retrying");
                    let next_attempt_at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                    shared
                        .commit(Change::Waiting {
                            job_id: spec.id,
                            attempt_id: Some(attempt_id),
                            next_attempt_at,
                            end: attempt_end(&e, "retry", latency),
                        })
                        .await?;
                    if !shared.sleep(delay, &shared.stop_submits).await {
                        return Ok(JobEnd::Left);
                    }
                }
                ErrorClass::Fail => {
                    shared.pool.budget.release(reservation);
                    warn!(status = e.status(), error = %e, "row failed");
                    let end = attempt_end(&e, "fail", latency);
                    shared
                        .commit(Change::Failed { job_id: spec.id, attempt_id: Some(attempt_id), end })
                        .await?;
                    return Ok(JobEnd::Failed);
                }
                ErrorClass::Stop(reason) => {
                    // 401 and 402 are answered before any work: nothing was charged.
                    shared.pool.budget.release(reservation);
                    let end = attempt_end(&e, "stop", latency);
                    shared
                        .commit(Change::Released { job_id: spec.id, attempt_id: Some(attempt_id), end })
                        .await?;
                    shared.stop(match reason {
                        StopReason::KeyRejected => Stop::KeyRejected,
                        StopReason::OutOfCredits => Stop::OutOfCredits,
                    });
                    return Ok(JobEnd::Left);
                }
                ErrorClass::Ambiguous => {
                    // It may have been charged: keep the reservation so the budget stays safe.
                    shared.pool.budget.charge(reservation, price);
                    warn!(error = %e, "the request may have been charged but no id came back: ambiguous");
                    let end = attempt_end(&e, "ambiguous", latency);
                    shared.commit(Change::Ambiguous { job_id: spec.id, attempt_id, end }).await?;
                    return Ok(JobEnd::Ambiguous);
                }
            },
        }
    }
}

fn result_json(result: &JobResult) -> String {
    // JobResult is plain data; serializing it cannot fail.
    serde_json::to_string(result).unwrap_or_else(|_| "{}".to_owned())
}

async fn poll_phase<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    request: RequestRef,
    submitted_at: Option<Instant>,
    in_flight: &mut InFlight,
) -> Result<JobEnd, StoreError> {
    // Where the provider pushes (fal's status stream), the push says when the job is done and
    // one poll fetches the result; with webhooks configured those wake the poller instead.
    let pushed = shared.pool.webhooks.is_none() && watch(shared, job, &request, submitted_at).await;
    let end = poll_loop(shared, job, &request, submitted_at, pushed, in_flight).await;
    if let Some(hooks) = &shared.pool.webhooks {
        hooks.forget(&request.request_id);
    }
    end
}

/// Follows the request by the provider's push until it is done (true), or until the push is
/// unavailable, breaks, or the run is interrupted (false): polling takes over.
async fn watch<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    request: &RequestRef,
    submitted_at: Option<Instant>,
) -> bool {
    if shared.no_push.load(Ordering::Relaxed) {
        return false;
    }
    let watched = tokio::select! {
        r = shared.pool.provider.watch(request) => r,
        () = shared.pool.interrupt.cancelled() => return false,
        () = shared.stop_all.cancelled() => return false,
    };
    match watched {
        Ok(true) => {
            if let Some(t) = submitted_at {
                shared.learn_exact(&job.spec.model, t.elapsed());
            }
            true
        }
        Ok(false) => false,
        Err(e) => {
            // A server without the stream (404, 405) says so once for the whole run.
            if matches!(e.status(), Some(404 | 405 | 501)) {
                shared.no_push.store(true, Ordering::Relaxed);
            }
            debug!(error = %e, "status stream failed: polling instead");
            false
        }
    }
}

async fn poll_loop<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    request: &RequestRef,
    submitted_at: Option<Instant>,
    pushed: bool,
    in_flight: &mut InFlight,
) -> Result<JobEnd, StoreError> {
    let mut polls: u32 = 0;
    let mut errors: u32 = 0;
    let mut woken = false;
    // Set on Ctrl-C/SIGTERM: one more poll at once, and a result that is ready is downloaded
    // (within the grace); a request still running is left for the next run.
    let mut last_poll = false;
    let schedule = shared.poll_schedule();
    let interrupt = &shared.pool.interrupt;
    // When a poll last found the job running, counted from the submit.
    let mut running_at: Option<Duration> = None;
    loop {
        if interrupt.is_cancelled() {
            if last_poll || shared.stop_all.is_cancelled() {
                return Ok(JobEnd::Left);
            }
            last_poll = true;
        }
        // Once generation times are known (this run's, or earlier runs' from the state file),
        // polls go where the plan puts them: the least expected delay between a job's completion
        // and its detection for the run's budget of polls per row.
        let plan = submitted_at.and_then(|_| shared.poll_plan());
        let planned = plan.as_ref().zip(submitted_at).map(|(plan, t)| {
            let elapsed = t.elapsed();
            plan.next_after(elapsed).saturating_sub(elapsed)
        });
        let mut delay = match (polls, submitted_at) {
            // The provider pushed "done": fetch it now.
            (0, _) if pushed => Some(Duration::ZERO),
            _ if planned.is_some() => planned,
            // Nothing learned yet. The first two polls go where this run's jobs are likely done (see PollTiming):
            // short jobs are not held back by a fixed first delay, long ones are not hammered.
            (0, Some(t)) => Some(match shared.timing.probe() {
                Some(p) => p.saturating_sub(t.elapsed()),
                // Nothing learned yet: the jobs of the first wave probe for each other. Their
                // first polls are spread over the second half of the configured first delay,
                // and the earliest to find its job done wakes the rest (below), instead of all
                // of them waiting out the whole delay.
                None => schedule.first_probe(rand::random::<f64>()),
            }),
            (1, Some(t)) if shared.timing.fastest().is_some() => {
                shared.timing.fastest().map(|f| f.saturating_sub(t.elapsed()))
            }
            // Still nothing learned after the first probe: each poll a fixed share later than the
            // time since the submit, so however long the jobs take the first completion is found
            // within that share of it (and wakes the rest).
            (_, Some(t)) if shared.timing.fastest().is_none() => {
                Some(super::polling::learning_delay(t.elapsed(), schedule.max))
            }
            _ => None,
        }
        .unwrap_or_else(|| schedule.delay(polls, rand::random::<f64>()));
        let hooks = shared.pool.webhooks.as_ref().filter(|_| !woken);
        let pushed_now = pushed && polls == 0;
        if hooks.is_some() {
            // With webhooks, polls are only the fallback for a lost delivery: slower.
            delay = delay.max(shared.pool.poll.max) * 2;
        }
        let slept = match hooks {
            _ if last_poll || pushed_now => true,
            Some(hooks) => tokio::select! {
                () = tokio::time::sleep(delay) => true,
                () = hooks.delivered(&request.request_id) => {
                    // A delivery stays delivered: from now on the timer alone paces the polls.
                    woken = true;
                    debug!("webhook delivery: polling now");
                    true
                }
                () = shared.stop_all.cancelled() => false,
                () = interrupt.cancelled() => { last_poll = true; true }
            },
            None if plan.is_none() && submitted_at.is_some() => {
                // Until a first completion is learned, the delay above is a guess (the spread first
                // probe, then the learning ladder); the run's first completion wakes this job to
                // poll where jobs are likely done instead.
                let learned = shared.timing.first_done();
                if shared.timing.fastest().is_some() {
                    shared.poll_sleep(delay, &mut last_poll).await
                } else {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => true,
                        // Another job of this run was just found done: this one, if as old,
                        // likely is too; a younger one polls where jobs are likely done.
                        () = learned => {
                            let fastest = shared.timing.fastest();
                            if submitted_at.zip(fastest).is_none_or(|(t, f)| t.elapsed() < f) {
                                continue;
                            }
                            true
                        }
                        () = shared.stop_all.cancelled() => false,
                        () = interrupt.cancelled() => { last_poll = true; true }
                    }
                }
            }
            None => shared.poll_sleep(delay, &mut last_poll).await,
        };
        if !slept {
            return Ok(JobEnd::Left);
        }
        polls += 1;
        let asked_at = submitted_at.map(|t| t.elapsed());
        match shared.pool.provider.poll(request).await {
            Ok(PollOutcome::Running { queue_position: Some(position) })
                if last_poll && request.cancel_url.is_some() =>
            {
                // Interrupted while the request still waits in the provider's queue: it has
                // not started, so cancelling it costs nothing and frees the account. Only the
                // API's own "cancelled" takes the row back to `pending`; anything else leaves it
                // `submitted`, and the next run collects its result.
                match shared.pool.provider.cancel(request).await {
                    Ok(true) => {
                        info!(position, "interrupted: cancelled the request waiting in the provider's queue");
                        if submitted_at.is_some() {
                            let price = shared.price(&job.spec);
                            shared.pool.budget.adjust(-price);
                            shared.pool.stats.add_spent(-price);
                        }
                        shared.commit(Change::Cancelled { job_id: job.spec.id }).await?;
                    }
                    Ok(false) => debug!("the request started: left for the next run"),
                    Err(e) => warn!(error = %e, "cannot cancel the queued request: left for the next run"),
                }
                return Ok(JobEnd::Left);
            }
            Ok(PollOutcome::Running { queue_position }) => {
                errors = 0;
                // Running when asked (it was running at least until then).
                running_at = asked_at.or(running_at);
                if let Some(t) = submitted_at {
                    shared.timing.saw_running(t.elapsed());
                }
                debug!(polls, queue_position, "still running");
            }
            Ok(PollOutcome::Completed(result)) => {
                shared.saw_progress();
                if let Some(t) = submitted_at {
                    // Done by the time the answer came: it finished between the last poll that
                    // found it running and now.
                    let done_at = t.elapsed();
                    shared.timing.saw_done(done_at);
                    if !pushed {
                        shared.learn(&job.spec.model, running_at, done_at);
                    }
                }
                shared.note_credits_remaining(&result);
                // A poll may report the real charge; correct the estimate made at submit.
                let delta = result.charged.map_or(0.0, |c| c - shared.price(&job.spec));
                if delta.abs() > 1e-9 {
                    shared.pool.budget.adjust(delta);
                    shared.pool.stats.add_spent(delta);
                }
                // Not committed on its own: the request id is saved, so after a crash a poll
                // finds this result again. It is recorded with the outputs (or the failure).
                let unsaved = Some(Unsaved { result: result_json(&result), charged: delta });
                return fetch_phase(shared, job, Some(request.clone()), result, unsaved, in_flight).await;
            }
            Err(e) => match e.poll_class() {
                ErrorClass::Fail => {
                    // `e` names what failed ("generation failed: …", "HTTP 404 …"): not repeated here.
                    let reason = format!("paid, then {e}");
                    return fail(shared, job, None, &reason).await;
                }
                ErrorClass::Stop(StopReason::KeyRejected) => {
                    shared.stop(Stop::KeyRejected);
                    return Ok(JobEnd::Left);
                }
                ErrorClass::Retry | ErrorClass::Stop(StopReason::OutOfCredits) | ErrorClass::Ambiguous => {
                    errors += 1;
                    if let Some(ra) = e.retry_after() {
                        shared
                            .pool
                            .limiter
                            .pause_until(tokio::time::Instant::now() + ra.min(shared.pool.retry.cap));
                        if !shared.sleep(ra.min(shared.pool.retry.cap), &shared.stop_all).await {
                            return Ok(JobEnd::Left);
                        }
                    }
                    if errors >= MAX_POLL_ERRORS {
                        warn!(error = %e, "polls keep failing; leaving the request for the next run");
                        return Ok(JobEnd::Unfinished);
                    }
                    debug!(error = %e, errors, "poll failed; polling again");
                }
            },
        }
    }
}

/// A polled result not yet in the store (see the poll loop).
struct Unsaved {
    result: String,
    charged: f64,
}

async fn fetch_phase<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    request: Option<RequestRef>,
    mut result: JobResult,
    mut unsaved: Option<Unsaved>,
    in_flight: &mut InFlight,
) -> Result<JobEnd, StoreError> {
    let mut reresolved = 0;
    'again: loop {
        if result.images.is_empty() {
            return fail_paid(shared, job, unsaved.take(), "paid, but the provider returned no images").await;
        }
        // More outputs than asked for is a protocol error: the row keeps the requested count.
        let requested = job.spec.params.num_images;
        if let Some(listed) = result.keep_requested(requested) {
            warn!(listed, requested, "protocol error: more outputs than requested; downloading those only");
            if let Some(u) = unsaved.as_mut() {
                u.result = result_json(&result);
            }
        }
        let mut outputs = Vec::with_capacity(result.images.len());
        for (index, image) in result.images.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let mut tries = 0;
            let saved = loop {
                tries += 1;
                let fetched = tokio::select! {
                    r = shared.pool.fetcher.download(&job.spec.sku, index, image) => r,
                    () = shared.stop_all.cancelled() => return Ok(JobEnd::Left),
                };
                match fetched {
                    Ok(saved) => break saved,
                    Err(e) if e.is_output_failure() => {
                        return keep_paid(shared, job, unsaved.take(), &e).await;
                    }
                    Err(e) if e.is_expired() => {
                        let fal = request.as_ref().is_some_and(|r| r.response_url.is_some());
                        if fal && reresolved < MAX_RERESOLVE {
                            reresolved += 1;
                            info!(error = %e, "output URL expired: asking the provider again");
                            if let Some(r) = request.as_ref()
                                && let Ok(PollOutcome::Completed(fresh)) = shared.pool.provider.poll(r).await
                            {
                                if let Some(u) = unsaved.as_mut() {
                                    u.result = result_json(&fresh);
                                }
                                result = fresh;
                                continue 'again;
                            }
                        }
                        return fail_paid(shared, job, unsaved.take(), &format!("paid, not downloaded: {e}"))
                            .await;
                    }
                    Err(e) if e.is_retryable() && tries < shared.pool.retry.max_attempts.max(3) => {
                        RunStats::bump(&shared.pool.stats.retries);
                        let delay =
                            shared.pool.retry.next_delay(tries, None).unwrap_or(shared.pool.retry.cap);
                        info!(error = %e, tries, "download failed; retrying");
                        if !shared.sleep(delay, &shared.stop_all).await {
                            return Ok(JobEnd::Left);
                        }
                    }
                    Err(e) => return fail_paid(shared, job, unsaved.take(), &download_reason(&e)).await,
                }
            };
            outputs.push(saved);
        }
        // Everything is received: the provider's part is over, so the in-flight place goes to the next job
        // while the files are made durable and the row is recorded.
        in_flight.release();
        // The gate reads the received bytes where they are staged, before they are made durable:
        // the same bytes, whether they then go to the output folder or to a bucket.
        let staged: Vec<(u32, &std::path::Path)> = outputs.iter().map(Downloaded::staged).collect();
        let (quality, review) = super::gate::judge_row(shared.pool.gate.as_deref(), &job.spec, &staged).await;
        // Alone in flight, nothing would join this job's sync: don't make it wait for company.
        let urgent = shared.pool.stats.in_flight.load(Ordering::Relaxed) == 0;
        let saved = match shared.pool.persister.persist(outputs, urgent).await {
            Ok(saved) => saved,
            Err(e) if e.is_output_failure() => return keep_paid(shared, job, unsaved.take(), &e).await,
            Err(e) => return fail_paid(shared, job, unsaved.take(), &download_reason(&e)).await,
        };
        // Every file is fsynced and renamed: only now is the row done. With others in flight, the
        // `done` rides along with their next change rather than paying for a transaction alone.
        // A passing row's exports are made durable before its `done`, and recorded with it.
        let exported =
            super::export::export_row(shared.pool.exporter.as_deref(), &saved, quality, review, urgent).await;
        let (quality, review, exports) = match exported {
            Ok(exported) => exported,
            Err(e) => return keep_paid(shared, job, unsaved.take(), &e).await,
        };
        let (result, charged) = unsaved.map_or((None, 0.0), |u| (Some(u.result), u.charged));
        let done =
            Change::Done { job_id: job.spec.id, outputs: saved, result, charged, quality, review, exports };
        if shared.pool.stats.in_flight.load(Ordering::Relaxed) == 0 {
            shared.commit(done).await?;
        } else {
            shared.pool.writer.commit_unhurried(done).await?;
        }
        if review {
            return Ok(JobEnd::Review);
        }
        info!("done");
        return Ok(JobEnd::Done);
    }
}

/// Fails a row whose result was paid for, saving a polled result first so the store keeps what
/// was charged and where the images were.
async fn fail_paid<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    unsaved: Option<Unsaved>,
    reason: &str,
) -> Result<JobEnd, StoreError> {
    save_unsaved(shared, job, unsaved).await?;
    fail(shared, job, None, reason).await
}

/// Records a polled result that no change has saved yet, so the next run can collect it
/// without paying again.
async fn save_unsaved<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    unsaved: Option<Unsaved>,
) -> Result<(), StoreError> {
    let Some(u) = unsaved else { return Ok(()) };
    shared
        .pool
        .writer
        .send(Change::Completed {
            job_id: job.spec.id,
            attempt_id: None,
            request_id: None,
            result: u.result,
            charged: u.charged,
            end: AttemptEnd::default(),
        })
        .await
}

/// The output folder cannot be written: stops new submits, and keeps a paid row `fetching` with
/// its result (saving a polled one first), so the next run downloads it again instead of paying.
async fn keep_paid<P: Provider>(
    shared: &Shared<P>,
    job: &StoredJob,
    unsaved: Option<Unsaved>,
    e: &FetchError,
) -> Result<JobEnd, StoreError> {
    warn!(error = %e, "cannot save the outputs: the row keeps its result for the next run");
    shared.stop(Stop::OutputFailing);
    save_unsaved(shared, job, unsaved).await?;
    Ok(JobEnd::Left)
}

fn download_reason(e: &FetchError) -> String {
    format!("paid, not downloaded: {e}")
}
