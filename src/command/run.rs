//! `backdrop run`: resolve settings, lock and recover the store, plan the catalog (or only price
//! it with `--dry-run`), start the provider (or the simulator with `--simulate`), run the worker
//! pool, and turn what happened into an exit code and a summary a scheduler can read.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use backdrop::domain::{ApiKey, ProviderKind};
use backdrop::money::{PriceTable, Unit};

use super::leftovers::{FreshState, Scratch};
use super::status::print_stdout;
use crate::cli::{GlobalArgs, LogFormat, RunArgs};
use crate::config::{self, Settings};
use crate::error::Error;
use crate::exit::ExitCode;
use backdrop::fetch::{self, Fetcher};
use backdrop::money::Budget;
use backdrop::pipeline::limiter::Limiter;
use backdrop::pipeline::scheduler::{self, FoundLimits, Pool, PoolOutcome, Stop};
use backdrop::pipeline::stats::RunStats;
use backdrop::pipeline::webhooks::{WebhookSettings, Webhooks};
use backdrop::plan;
use backdrop::progress;
use backdrop::prompt::Template;
use backdrop::provider::Provider;
use backdrop::provider::fal::{Fal, upload};
use backdrop::provider::seedance::Seedance;
use backdrop::provider::{self as providers};
use backdrop::store::{JobState, RunLock, Store, now_ms};

/// Version of the `--summary-json` document.
pub(crate) const SUMMARY_VERSION: u32 = 1;

/// The outcome of one `run`, as written to `--summary-json` and `runs.summary`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunOutcome {
    /// Document version.
    pub(crate) version: u32,
    /// The run's id in the store.
    pub(crate) run_id: i64,
    /// `done`, `rows_failed`, `out_of_credits`, `budget`, `key_rejected`, `interrupted`, `fatal`.
    pub(crate) outcome: String,
    /// The process exit code.
    pub(crate) exit_code: u8,
    /// Unix ms.
    pub(crate) started_at: i64,
    /// Unix ms.
    pub(crate) ended_at: i64,
    /// Wall time.
    pub(crate) duration_secs: f64,
    /// `seedance` or `fal`.
    pub(crate) provider: String,
    /// The model.
    pub(crate) model: String,
    /// Rows of the catalog by state at the end (this run's plan plus rows still at the provider).
    pub(crate) counts: std::collections::BTreeMap<String, u64>,
    /// Rows that reached done in this run.
    pub(crate) done_this_run: u64,
    /// Rows that failed in this run.
    pub(crate) failed_this_run: u64,
    /// Submissions sent in this run.
    pub(crate) submits: u64,
    /// Retries in this run.
    pub(crate) retries: u64,
    /// Charged in this run, in the provider's unit (credits or dollars).
    pub(crate) spent: f64,
    /// Charged in this run, in dollars.
    pub(crate) spent_usd: f64,
    /// Jobs left at the provider because polls kept failing.
    pub(crate) unfinished: u64,
    /// The server's limits as the run found them (absent when no submit could be sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) limits: Option<FoundLimits>,
}

/// Runs `backdrop run`.
///
/// # Errors
/// Config, catalog and prompt errors (exit 2), a locked or broken store, a simulator that cannot
/// start. Row failures are not errors: they set the exit code.
pub(crate) async fn execute(
    global: &GlobalArgs,
    args: RunArgs,
    interrupt: CancellationToken,
) -> Result<ExitCode, Error> {
    let file = match &global.config {
        Some(path) => config::load_file(path)?,
        None => RunArgs::default(),
    };
    let settings = Settings::resolve(config::merge(args, file)?)?;
    // Paths first: a mistyped catalog is the problem to report even when the key is missing too.
    settings.check_files()?;
    // The key is checked before anything else touches the network or the store.
    let key = match (settings.simulate, settings.dry_run) {
        (true, _) => Some(ApiKey::new("simulated-key")),
        (false, true) => None,
        (false, false) => Some(settings.api_key()?),
    };
    if settings.dry_run {
        return dry_run(&settings).await;
    }
    let key = match key {
        Some(key) => key,
        None => settings.api_key()?,
    };

    // Building the HTTP client reads the system's root certificates, tens of milliseconds on a
    // cold start: it runs on the blocking pool while the store is opened and the catalog planned.
    let timeout = settings.request_timeout;
    let client = tokio::task::spawn_blocking(move || providers::http::client(timeout));

    let fresh = FreshState::note(&settings.state);
    // Held until the process exits: no other run may use this database (by any name).
    let lock = RunLock::acquire(&settings.state)?;
    let store = Store::open_locked(&lock).await?;
    let recovery = store.recover().await?;
    if recovery.ambiguous > 0 {
        warn!(
            rows = recovery.ambiguous,
            "rows were being submitted when the last run stopped; they may have been charged and are \
             marked ambiguous (see `backdrop status`, re-queue with `backdrop retry --ambiguous`)"
        );
    }
    if recovery.resumable > 0 {
        info!(rows = recovery.resumable, "resuming requests already accepted by the provider (no resubmit)");
    }
    let catalog = settings.catalog.display().to_string();
    let model_hint = settings.model.clone().unwrap_or_default();
    let run_id = store.start_run(&catalog, settings.provider.as_str(), &model_hint, false).await?;
    let started = Instant::now();
    let started_at = now_ms();
    let stats = Arc::new(RunStats::default());
    let start = summary_start(&settings, run_id, started_at, &model_hint);
    register_forced_summary(&settings, &start, started, &stats);
    let input = match check_inputs(&settings, &store, true).await {
        Ok(input) => input,
        Err(e) => {
            end_early(&settings, &store, &start, started, e.exit_code(), "usage").await;
            // Nothing was planned: a state file this run created holds nothing worth keeping.
            fresh.discard_if_empty(store).await;
            return Err(e);
        }
    };
    let plan = match plan::plan(&store, &input, Some(run_id)).await {
        Ok(plan) => plan,
        Err(e) => {
            end_early(&settings, &store, &start, started, ExitCode::Usage, "usage").await;
            // Nothing was planned: a state file this run created holds nothing worth keeping.
            fresh.discard_if_empty(store).await;
            return Err(e.into());
        }
    };
    store.set_run_model(run_id, &plan.model).await?;
    print_stdout(&plan.render_text())?;
    if settings.simulate {
        info!("{SIMULATE_NOTE}");
    }
    let model = plan.model.clone();
    let start = RunOutcome { model: model.clone(), ..start };
    if let Err(e) = settings.check_priced(&model, plan.estimate.unit_price) {
        end_early(&settings, &store, &start, started, ExitCode::Usage, "usage").await;
        return Err(e.into());
    }
    // After the plan (a refused plan creates no output folder), before the first paid request.
    if let Err(e) = check_writable(&settings) {
        end_early(&settings, &store, &start, started, ExitCode::DiskFailing, "disk_failing").await;
        return Err(e);
    }
    register_forced_summary(&settings, &start, started, &stats);

    let sim = if settings.simulate { Some(start_simulator(&settings).await?) } else { None };
    let api_base = match (&sim, &settings.api_base) {
        (Some(sim), _) => Some(sim.base_url()),
        (None, base) => base.clone(),
    };

    let prices = settings.price_table();
    let bar_done = CancellationToken::new();
    let json_logs = global.log_format == LogFormat::Json;
    let bar = progress::wanted(global.quiet, global.verbose, json_logs, settings.no_progress)
        .then(|| progress::spawn(Arc::clone(&stats), Unit::of(settings.provider), bar_done.clone()));
    info!(run_id, provider = settings.provider.as_str(), model = %model, rows = plan.to_run, "run started");
    let client = client.await.map_err(other_fatal)?.map_err(other_fatal)?;
    let result = match settings.provider {
        ProviderKind::Seedance => {
            let provider = Seedance::new(
                client.clone(),
                api_base.as_deref().unwrap_or(providers::seedance::DEFAULT_BASE_URL),
                key,
                settings.seedance_options(),
            )
            .map_err(other_usage)?;
            drive(&settings, &input.template, &store, provider, client, &prices, run_id, &stats, interrupt)
                .await
        }
        ProviderKind::Fal => {
            let provider = Fal::new(
                client.clone(),
                api_base.as_deref().unwrap_or(providers::fal::DEFAULT_BASE_URL),
                key.clone(),
                settings.fal_options(),
            )
            .map_err(other_usage)?;
            // Local input files go to fal's storage (a host of its own; the simulator serves both).
            let rest_base = match (&sim, &settings.fal_rest_base) {
                (_, Some(base)) => base.clone(),
                (Some(sim), None) => sim.base_url(),
                (None, None) => {
                    settings.api_base.clone().unwrap_or_else(|| upload::DEFAULT_REST_BASE.to_owned())
                }
            };
            let uploader = Arc::new(
                upload::Uploader::new(client.clone(), &rest_base, key, Arc::new(store.clone()))
                    .map_err(other_usage)?,
            );
            let uploads = uploader.stats();
            let outcome = drive(
                &settings,
                &input.template,
                &store,
                provider.with_uploader(uploader),
                client,
                &prices,
                run_id,
                &stats,
                interrupt,
            )
            .await;
            let uploaded = uploads.uploaded.load(std::sync::atomic::Ordering::Relaxed);
            let reused = uploads.reused.load(std::sync::atomic::Ordering::Relaxed);
            if uploaded + reused > 0 {
                info!(
                    uploaded,
                    uploaded_bytes = uploads.uploaded_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    reused,
                    retries = uploads.retries.load(std::sync::atomic::Ordering::Relaxed),
                    "local inputs on fal's storage"
                );
            }
            outcome
        }
    };
    bar_done.cancel();
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    let pool_outcome = match result {
        Ok(o) => o,
        Err(e) => {
            let exit = e.exit_code();
            let outcome = match exit {
                ExitCode::Usage => "usage",
                ExitCode::DiskFailing => "disk_failing",
                _ => "fatal",
            };
            end_early(&settings, &store, &start, started, exit, outcome).await;
            if let Some(sim) = sim {
                sim.shutdown().await;
            }
            return Err(e);
        }
    };

    let counts = store.run_counts(run_id).await?;
    let count = |st: JobState| counts.iter().find(|(s, _)| *s == st).map_or(0, |(_, n)| *n);
    let (exit, outcome) =
        decide(&pool_outcome, count(JobState::Failed), count(JobState::Ambiguous), count(JobState::Review));
    let summary = RunOutcome {
        version: SUMMARY_VERSION,
        run_id,
        outcome: outcome.to_owned(),
        exit_code: exit.code(),
        started_at,
        ended_at: now_ms(),
        duration_secs: started.elapsed().as_secs_f64(),
        provider: settings.provider.as_str().to_owned(),
        model,
        counts: counts.iter().map(|(s, n)| (s.as_str().to_owned(), *n)).collect(),
        done_this_run: RunStats::get(&stats.done),
        failed_this_run: RunStats::get(&stats.failed),
        submits: RunStats::get(&stats.submits),
        retries: RunStats::get(&stats.retries),
        spent: stats.spent(),
        spent_usd: prices.to_dollars(stats.spent()),
        unfinished: pool_outcome.unfinished,
        limits: Some(pool_outcome.limits),
    };
    let json = serde_json::to_string_pretty(&summary).unwrap_or_else(|_| "{}".into());
    store.finish_run(run_id, outcome, exit.code(), &json).await?;
    info!(
        run_id,
        outcome,
        exit_code = exit.code(),
        done = summary.done_this_run,
        failed = summary.failed_this_run,
        spent = summary.spent,
        "run finished"
    );
    if let Some(path) = &settings.summary_json {
        crate::command::forced_exit::settle(|| write_summary(path, &json))?;
    }
    print_stdout(&format!("{}\n", render_summary(&summary, settings.provider)))?;
    store.close().await;
    if let Some(sim) = sim {
        sim.shutdown().await;
    }
    Ok(exit)
}

/// Printed by `run --simulate`: the in-process simulator cannot demonstrate crash-resume.
const SIMULATE_NOTE: &str = "--simulate: the simulator runs inside this process, so the jobs it \
    holds end with it; after a kill, resumed rows fail with \"no request\". To try crash-resume, \
    start `backdrop sim` in another terminal and run with --api-base http://127.0.0.1:8787 \
    --inline-local-images instead of --simulate";

/// `run --dry-run`: plans and prices, writes nothing, and on a state path that does not exist
/// yet leaves nothing behind (it plans against a scratch database in the temp folder).
async fn dry_run(settings: &Settings) -> Result<ExitCode, Error> {
    let scratch = (!settings.state.exists()).then(Scratch::new);
    let path = scratch.as_ref().map_or(settings.state.as_path(), Scratch::path);
    let store = Store::open(path).await?;
    let planned = match check_inputs(settings, &store, false).await {
        Ok(input) => plan::plan(&store, &input, None).await.map_err(Error::from),
        Err(e) => Err(e),
    };
    store.close().await;
    let plan = planned?;
    print_stdout(&plan.render_text())?;
    // A dry run answers what the run would do, and the run would refuse.
    settings.check_priced(&plan.model, plan.estimate.unit_price)?;
    Ok(ExitCode::Success)
}

/// The input preflight, unless `--no-check-inputs`: what the planner needs, with the inputs it
/// refused (rows using them are invalid: exit 2, or left out with `--skip-invalid`). Inputs are
/// fetched with the downloads' client and address rules, never with the key.
async fn check_inputs(settings: &Settings, store: &Store, record: bool) -> Result<plan::PlanInput, Error> {
    let mut input = settings.plan_input()?;
    refuse_exports_to_bucket(settings, &input.template)?;
    if !settings.check_inputs {
        eprintln!(
            "input check: off (--no-check-inputs): a dead link, an HTML page or an oversized image in the \
             catalog costs a paid request or fails its row at run time"
        );
        return Ok(input);
    }
    let policy = if settings.simulate {
        // The simulator starts after the plan, on loopback, and serves the inputs of its scenarios.
        fetch::AddressPolicy::allowing([fetch::guard::AddressClass::Loopback])
    } else {
        let base = settings.api_base.as_deref().unwrap_or(match settings.provider {
            ProviderKind::Seedance => providers::seedance::DEFAULT_BASE_URL,
            ProviderKind::Fal => providers::fal::DEFAULT_BASE_URL,
        });
        fetch::AddressPolicy::for_api_base(base).await
    };
    let client = fetch::DownloadClient::new(settings.request_timeout, policy).map_err(other_fatal)?;
    let options = backdrop::preflight::PreflightOptions { record, ..settings.preflight_options() };
    let found =
        backdrop::preflight::check_catalog(store, &input.catalog, &input.template, &client, &options).await?;
    if found.distinct > 0 {
        eprintln!("{}", found.render_line());
    }
    input.refused_inputs = Arc::new(found.refused);
    input.input_validators = Arc::new(found.validators);
    Ok(input)
}

/// Maps how the pool ended to the exit code and the outcome word.
fn decide(pool: &PoolOutcome, failed: u64, ambiguous: u64, review: u64) -> (ExitCode, &'static str) {
    match pool.stop {
        Some(Stop::Interrupted) => (ExitCode::Interrupted, "interrupted"),
        Some(Stop::KeyRejected) => (ExitCode::KeyRejected, "key_rejected"),
        Some(Stop::OutOfCredits) => (ExitCode::OutOfCredits, "out_of_credits"),
        Some(Stop::Budget) => (ExitCode::OutOfCredits, "budget"),
        Some(Stop::OutputFailing) => (ExitCode::DiskFailing, "output_failing"),
        Some(Stop::Throttled) => (ExitCode::Throttled, "throttled"),
        None if failed > 0 || ambiguous > 0 || pool.unfinished > 0 => (ExitCode::RowsFailed, "rows_failed"),
        // Paid and saved, but held by the quality gate: a person must look (`backdrop accept`).
        None if review > 0 => (ExitCode::RowsFailed, "review"),
        None => (ExitCode::Success, "done"),
    }
}

/// Before anything is paid for: a file can be written, synced and removed in the output folder and
/// in the state file's folder (exit 6 naming the path and the OS error otherwise).
fn check_writable(settings: &Settings) -> Result<(), Error> {
    let state_dir = match settings.state.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    for (what, dir) in [("output folder", settings.out.as_path()), ("state file's folder", state_dir)] {
        fetch::probe_writable(dir).map_err(|e| Error::Other {
            message: format!("the {what} cannot be written, so nothing was sent: {e}"),
            exit: ExitCode::DiskFailing,
        })?;
    }
    Ok(())
}

/// The quality gate of this run, from the template's `[quality]` table, unless it or
/// `--no-quality-gate` turns it off.
fn quality_gate(
    settings: &Settings,
    template: &Template,
    downloads: &fetch::DownloadClient,
) -> Result<Option<Arc<backdrop::pipeline::gate::Gate>>, Error> {
    if !settings.quality_gate {
        warn!(
            "quality gate off (--no-quality-gate): outputs are marked done without being compared with their inputs"
        );
        return Ok(None);
    }
    let quality = template.quality();
    if !quality.enabled {
        info!("quality gate off ([quality] enabled = false in the template)");
        return Ok(None);
    }
    Ok(Some(Arc::new(backdrop::pipeline::gate::Gate::new(
        quality,
        downloads.clone(),
        &settings.out,
        settings.max_download_bytes,
    ))))
}

/// `[export.NAME]` presets write derived files beside the originals in a local output folder;
/// with a bucket as the output location they are refused before anything is planned or paid.
fn refuse_exports_to_bucket(settings: &Settings, template: &Template) -> Result<(), Error> {
    let Some(bucket) = &settings.out_object else { return Ok(()) };
    if template.exports().is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = template.exports().keys().map(String::as_str).collect();
    Err(Error::Other {
        message: format!(
            "the template's export presets ({}) need a local output folder; --out {bucket} is object \
             storage: remove the [export.NAME] tables or write to a folder",
            names.join(", ")
        ),
        exit: ExitCode::Usage,
    })
}

/// The run's exporter, from the template's `[export.NAME]` presets (none without any), with the
/// presets and output folder recorded for `backdrop accept`.
async fn exporter(
    settings: &Settings,
    template: &Template,
    store: &Store,
    persister: &fetch::Persister,
) -> Result<Option<Arc<backdrop::pipeline::export::Exporter>>, Error> {
    use backdrop::pipeline::export::Exporter;
    // A bucket takes no presets (refused before the plan).
    let none = std::collections::BTreeMap::new();
    let presets = if settings.out_object.is_some() { &none } else { template.exports() };
    // Recorded even when empty: `accept` then makes none, as this run would.
    let out_dir = std::fs::canonicalize(&settings.out).unwrap_or_else(|_| settings.out.clone());
    store.save_export_settings(&out_dir.to_string_lossy(), &Exporter::presets_json(presets)).await?;
    Ok(Exporter::new(presets, &settings.out, persister.clone()).map(Arc::new))
}

/// Makes the exports done rows lack (no provider request).
async fn backfill_exports(
    store: &Store,
    exporter: &backdrop::pipeline::export::Exporter,
) -> Result<(), Error> {
    let made = backdrop::pipeline::export::backfill(store, exporter).await?;
    if made.failed > 0 {
        warn!(
            rows = made.failed,
            "some done rows lack exports that could not be made; the next run tries again"
        );
    }
    Ok(())
}

fn other_fatal(e: impl std::fmt::Display) -> Error {
    Error::Other { message: e.to_string(), exit: ExitCode::Fatal }
}

async fn start_simulator(settings: &Settings) -> Result<backdrop_sim::SimHandle, Error> {
    let config = match &settings.sim_scenario {
        Some(path) => backdrop_sim::SimConfig::from_scenario_file(path).map_err(other_usage)?,
        None => backdrop_sim::SimConfig::default(),
    };
    let sim = backdrop_sim::start(config).await.map_err(other_fatal)?;
    info!(base_url = %sim.base_url(), "simulator started");
    Ok(sim)
}

fn other_usage(e: impl std::fmt::Display) -> Error {
    Error::Other { message: e.to_string(), exit: ExitCode::Usage }
}

#[expect(clippy::too_many_arguments, reason = "one call per provider; a struct would only rename them")]
async fn drive<P: Provider>(
    settings: &Settings,
    template: &Template,
    store: &Store,
    provider: P,
    client: reqwest::Client,
    prices: &PriceTable,
    run_id: i64,
    stats: &Arc<RunStats>,
    interrupt: CancellationToken,
) -> Result<PoolOutcome, Error> {
    // Held while this run may write there: another run's start-up clean-up leaves our downloads
    // in progress alone.
    let (_out_lock, clean) = fetch::OutputFolderLock::claim(&settings.out)
        .map_err(|e| Error::io(format!("claiming the output folder {}", settings.out.display()), e))?;
    if clean.removed > 0 {
        info!(files = clean.removed, "removed partial downloads left by an earlier run");
    }
    if clean.kept > 0 {
        info!(
            files = clean.kept,
            "left partial downloads alone: another live run is using this output folder"
        );
    }
    // Downloads get their own client: only http(s), few redirects, and no loopback, private or
    // link-local address unless the API base is one (the simulator's is).
    let policy = fetch::AddressPolicy::for_api_base(provider.base_url()).await;
    let downloads = fetch::DownloadClient::new(settings.request_timeout, policy).map_err(other_fatal)?;
    let gate_downloads = downloads.clone();
    let fetcher = Fetcher::new(
        downloads,
        settings.out.clone(),
        settings.output_name.clone(),
        settings.max_download_bytes,
    );
    let limit = settings.spending_cap();
    // The cap bounds this run, and a run killed before it could record its end (with the requests
    // it may have had charged) counts as part of the run that picks up its work.
    let carried = store.carried_spend(run_id, &settings.prices).await?;
    if let Some(limit) = limit {
        if carried.total() > 0.0 {
            warn!(
                limit,
                killed_runs = ?carried.runs,
                spent = carried.spent,
                possibly_charged = carried.possibly_charged,
                "earlier runs were killed before they ended: what they spent or may have been charged \
                 counts against this run's cap"
            );
        } else {
            info!(limit, "budget for this run");
        }
    }
    let webhooks = match settings.webhook_listen {
        Some(listen) => {
            let jwks_url = settings
                .jwks_url
                .clone()
                .unwrap_or_else(|| backdrop::pipeline::webhooks::DEFAULT_JWKS_URL.to_owned());
            let hooks = Webhooks::start(
                WebhookSettings { listen, provider: settings.provider, jwks_url, client: client.clone() },
                interrupt.child_token(),
            )
            .await
            .map_err(other_usage)?;
            info!(listen = %hooks.local_addr(), "webhook receiver listening");
            Some(hooks)
        }
        None => None,
    };
    // Rows sharing a result that is already done (a crash between the shared request and its
    // copies, or a result of an earlier run) become done before anything is claimed.
    materialise_shared(store, settings).await?;
    let persister = match &settings.out_object {
        Some(url) => fetch::Persister::start_object(
            fetch::object::ObjectTarget::from_url(url)
                .map_err(|e| Error::Other { message: e.to_string(), exit: ExitCode::Usage })?,
        ),
        None => fetch::Persister::start(&settings.out),
    };
    // Done rows that lack exports (reused rows, a preset added or changed, a crash) get them
    // from the files on disk before anything is claimed.
    let exporter = exporter(settings, template, store, &persister).await?;
    if let Some(exporter) = &exporter {
        backfill_exports(store, exporter).await?;
    }
    let (writer, writer_task) = backdrop::store::Writer::start(store).await?;
    let pool = Pool {
        store: store.clone(),
        writer,
        provider: Arc::new(provider),
        persister,
        fetcher: Arc::new(fetcher),
        limiter: Arc::new(Limiter::new(settings.rate)),
        retry: settings.retry_policy(),
        poll: settings.poll_schedule(),
        budget: Arc::new(Budget::new(limit, carried.total())),
        prices: Arc::new(prices.clone()),
        stats: Arc::clone(stats),
        run_id,
        concurrency: usize::try_from(settings.concurrency).unwrap_or(1),
        patience: settings.patience,
        polls_per_row: settings.polls_per_row,
        limit: settings.limit,
        low_credit_warning: settings.low_credit_warning,
        interrupt: interrupt.clone(),
        webhooks,
        gate: quality_gate(settings, template, &gate_downloads)?,
        exporter: exporter.clone(),
    };
    let outcome = scheduler::run(pool).await;
    // Every worker is gone, so the writer's channel closes and it finishes its last commit.
    let _ = writer_task.await;
    let outcome = outcome?;
    materialise_shared(store, settings).await?;
    // Rows that became done just now by sharing another's result.
    if let Some(exporter) = &exporter {
        backfill_exports(store, exporter).await?;
    }
    Ok(outcome)
}

/// Copies finished shared results to the rows that share them (no request, no cost).
async fn materialise_shared(store: &Store, settings: &Settings) -> Result<(), Error> {
    use backdrop::pipeline::reuse::{self, ReuseError};
    match reuse::materialise(store, &settings.out, &settings.output_name).await {
        Ok(m) => {
            if m.copied > 0 {
                info!(rows = m.copied, "rows reused a shared result at no cost (files copied and verified)");
            }
            if m.released > 0 {
                info!(
                    rows = m.released,
                    "rows whose shared request failed or changed will be requested on their own"
                );
            }
            Ok(())
        }
        Err(ReuseError::Store(e)) => Err(e.into()),
        Err(e) => Err(Error::Other { message: e.to_string(), exit: ExitCode::DiskFailing }),
    }
}

/// The summary of run `run_id` as known when it starts: what a run that ends early reports.
fn summary_start(settings: &Settings, run_id: i64, started_at: i64, model: &str) -> RunOutcome {
    RunOutcome {
        version: SUMMARY_VERSION,
        run_id,
        outcome: String::new(),
        exit_code: 0,
        started_at,
        ended_at: started_at,
        duration_secs: 0.0,
        provider: settings.provider.as_str().to_owned(),
        model: model.to_owned(),
        counts: std::collections::BTreeMap::new(),
        done_this_run: 0,
        failed_this_run: 0,
        submits: 0,
        retries: 0,
        spent: 0.0,
        spent_usd: 0.0,
        unfinished: 0,
        limits: None,
    }
}

/// With `--summary-json`, a second signal (which exits at once) still leaves a summary.
fn register_forced_summary(settings: &Settings, start: &RunOutcome, started: Instant, stats: &Arc<RunStats>) {
    if let Some(path) = &settings.summary_json {
        let unit = Unit::of(settings.provider);
        crate::command::forced_exit::register(path.clone(), start.clone(), started, Arc::clone(stats), unit);
    }
}

/// Records a run that ended before its outcome could be counted (a refused plan, a fatal error)
/// in the store and, with `--summary-json`, in the summary file. Best effort: the error that
/// ended the run is the one reported.
async fn end_early(
    settings: &Settings,
    store: &Store,
    start: &RunOutcome,
    started: Instant,
    exit: ExitCode,
    outcome: &str,
) {
    let summary = RunOutcome {
        outcome: outcome.to_owned(),
        exit_code: exit.code(),
        ended_at: now_ms(),
        duration_secs: started.elapsed().as_secs_f64(),
        ..start.clone()
    };
    let json = serde_json::to_string_pretty(&summary).unwrap_or_else(|_| "{}".into());
    let _ = store.finish_run(start.run_id, outcome, exit.code(), &json).await;
    match &settings.summary_json {
        Some(path) => {
            if let Err(e) = crate::command::forced_exit::settle(|| write_summary(path, &json)) {
                warn!(error = %e, "cannot write the summary file");
            }
        }
        None => crate::command::forced_exit::settle(|| ()),
    }
}

pub(crate) fn write_summary(path: &std::path::Path, json: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    std::fs::write(path, json).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn render_summary(s: &RunOutcome, provider: ProviderKind) -> String {
    let money = match provider {
        ProviderKind::Seedance => format!("{:.0} credits (${:.2})", s.spent, s.spent_usd),
        ProviderKind::Fal => format!("${:.2}", s.spent_usd),
    };
    let counts: Vec<String> = s.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mut text = format!(
        "run {} {} in {:.1}s: {} done, {} failed this run; {} submits, {} retries; spent {money}\nrows: {}",
        s.run_id,
        s.outcome.replace('_', " "),
        s.duration_secs,
        s.done_this_run,
        s.failed_this_run,
        s.submits,
        s.retries,
        counts.join(", ")
    );
    if let Some(line) = s.limits.as_ref().and_then(render_limits) {
        text.push('\n');
        text.push_str(&line);
    }
    text
}

/// One line on what the server's 429s taught the run, when it got any: where the pace and the
/// window ended, beside the ceilings (a setting for the next run, and a sign of a tight account).
fn render_limits(l: &FoundLimits) -> Option<String> {
    (l.throttled > 0).then(|| {
        format!(
            "limits: {} submits answered 429; pace at the end {:.1}/s (--rate {:.1}/s), window {} (--concurrency {})",
            l.throttled, l.pace_per_sec, l.rate_ceiling_per_sec, l.window, l.concurrency_ceiling
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_outrank_failures_and_failures_outrank_success() {
        let pool = |stop| PoolOutcome { stop, ..PoolOutcome::default() };
        assert_eq!(decide(&pool(None), 0, 0, 0).0, ExitCode::Success);
        assert_eq!(decide(&pool(None), 2, 0, 0).0, ExitCode::RowsFailed);
        assert_eq!(decide(&pool(None), 0, 1, 0).0, ExitCode::RowsFailed);
        assert_eq!(decide(&pool(None), 0, 0, 2), (ExitCode::RowsFailed, "review"));
        assert_eq!(decide(&pool(Some(Stop::Budget)), 2, 0, 0), (ExitCode::OutOfCredits, "budget"));
        assert_eq!(decide(&pool(Some(Stop::OutOfCredits)), 0, 0, 0).0, ExitCode::OutOfCredits);
        assert_eq!(decide(&pool(Some(Stop::KeyRejected)), 0, 0, 0).0, ExitCode::KeyRejected);
        assert_eq!(decide(&pool(Some(Stop::Interrupted)), 3, 0, 0).0, ExitCode::Interrupted);
    }
}
