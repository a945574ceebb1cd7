//! What the process still writes when a second SIGINT or SIGTERM makes it exit at once: the
//! running `backdrop run` registers its `--summary-json` path here, and `main` writes a partial
//! "interrupted" summary from the run's live counters before exiting.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use backdrop::money::Unit;
use backdrop::pipeline::stats::RunStats;
use backdrop::store::now_ms;

use super::run::RunOutcome;
use crate::exit::ExitCode;

/// A run in progress whose summary a forced exit must write.
struct Registered {
    path: PathBuf,
    /// The summary as known at the start: ids, times, provider and model.
    start: RunOutcome,
    stats: Arc<RunStats>,
    unit: Unit,
    started: std::time::Instant,
}

/// One run at a time per process; a plain mutex, read once on the way out.
static REGISTERED: Mutex<Option<Registered>> = Mutex::new(None);

fn slot() -> std::sync::MutexGuard<'static, Option<Registered>> {
    // A panic elsewhere while holding it only leaves a stale registration behind.
    REGISTERED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// From now until [`settle`], a forced exit writes an "interrupted" summary to `path`, built from
/// `start` (the run began at `started`) and the counters in `stats`. Registering again replaces
/// the earlier registration.
pub(crate) fn register(
    path: PathBuf,
    start: RunOutcome,
    started: std::time::Instant,
    stats: Arc<RunStats>,
    unit: Unit,
) {
    *slot() = Some(Registered { path, start, stats, unit, started });
}

/// The run writes its own summary with `write`: a forced exit arriving meanwhile waits for it,
/// then writes nothing, so a complete summary is never replaced by a partial one.
pub(crate) fn settle<T>(write: impl FnOnce() -> T) -> T {
    let mut registered = slot();
    let written = write();
    *registered = None;
    written
}

/// Called by `main` just before a forced exit: writes the registered run's summary, marked
/// `"partial": true` because the state file was not read (its counts are empty). Errors are
/// printed, never raised: the process is exiting either way.
pub(crate) fn write_summary() {
    let Some(reg) = slot().take() else { return };
    let exit = ExitCode::Interrupted;
    let spent = reg.stats.spent();
    let outcome = RunOutcome {
        outcome: "interrupted".to_owned(),
        exit_code: exit.code(),
        ended_at: now_ms(),
        duration_secs: reg.started.elapsed().as_secs_f64(),
        done_this_run: RunStats::get(&reg.stats.done),
        failed_this_run: RunStats::get(&reg.stats.failed),
        submits: RunStats::get(&reg.stats.submits),
        retries: RunStats::get(&reg.stats.retries),
        spent,
        spent_usd: reg.unit.to_dollars(spent),
        ..reg.start
    };
    let json = match serde_json::to_value(&outcome) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("partial".to_owned(), serde_json::Value::Bool(true));
            serde_json::to_string_pretty(&map).unwrap_or_default()
        }
        _ => return,
    };
    if let Err(e) = super::run::write_summary(&reg.path, &json) {
        eprintln!("backdrop: error: {e}");
    }
}
