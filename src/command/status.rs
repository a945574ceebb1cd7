//! `backdrop status`: what the state database says, as text or `--json`: jobs per state, money
//! spent, failed rows with their reasons, ambiguous rows, and the last run. Also owns the state
//! path resolution the read-and-re-queue commands share ([`state_path`], [`open_existing`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cli::{GlobalArgs, RunArgs, StateArgs, StatusArgs};
use crate::error::Error;
use crate::exit::ExitCode;
use backdrop::report::{REPORT_VERSION, describe_spend, rfc3339};
use backdrop::store::{
    DEFAULT_STATE, DueDownload, JobBrief, JobState, RunRecord, RunSpend, Spend, StateCounts, Store,
};

/// At most this many failed or ambiguous rows are listed in text; `--json` and `report` list all.
const TEXT_LIST_LIMIT: usize = 50;
/// The most recent runs whose money `status` lists in text; `--json` lists every run.
const TEXT_RUNS_LIMIT: usize = 10;

/// What `status` shows. Its JSON form is `status --json` (versioned like the report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Status {
    /// The shape version, the same as the report's.
    pub(crate) version: u32,
    /// The state database.
    pub(crate) state_file: String,
    /// Jobs per state.
    pub(crate) counts: StateCounts,
    /// Money charged so far (from the store).
    pub(crate) spent: Spend,
    /// Paid requests that may have been charged with no charge on record (ambiguous submits, and
    /// submits in the air when a run was killed), priced at their row's model.
    pub(crate) possibly_charged: Spend,
    /// Money per run, oldest first: charged and possibly charged.
    pub(crate) runs: Vec<RunSpend>,
    /// The most recent run.
    pub(crate) last_run: Option<RunRecord>,
    /// Failed rows with their reasons, in catalog order.
    pub(crate) failed: Vec<JobBrief>,
    /// Rows whose paid request may have left without its id being saved.
    pub(crate) ambiguous: Vec<JobBrief>,
    /// Paid rows not downloaded yet, soonest deadline first: their output URLs work at least
    /// until `deadline` (unix ms).
    pub(crate) downloads_due: Vec<DueDownload>,
}

impl Status {
    /// Reads everything from the store.
    ///
    /// # Errors
    /// A database error.
    pub(crate) async fn load(store: &Store, prices: &BTreeMap<String, f64>) -> Result<Self, Error> {
        let runs = store.run_spends(prices).await?;
        Ok(Self {
            version: REPORT_VERSION,
            state_file: store.path().display().to_string(),
            counts: store.state_counts().await?,
            spent: store.spend().await?,
            possibly_charged: possibly_charged(&runs),
            runs,
            last_run: store.last_run().await?,
            failed: store.jobs_in_state(JobState::Failed).await?,
            ambiguous: store.jobs_in_state(JobState::Ambiguous).await?,
            downloads_due: store.downloads_due().await?,
        })
    }

    /// The human-readable form.
    #[must_use]
    pub(crate) fn to_text(&self) -> String {
        let mut s = self.main_text();
        due_text(&mut s, &self.downloads_due, backdrop::store::now_ms());
        s
    }

    fn main_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "state: {}", self.state_file);
        let _ = writeln!(s, "rows: {}", self.counts.total);
        for state in JobState::ALL {
            let n = self.counts.get(state);
            if n > 0 {
                let _ = writeln!(s, "  {:<11}{n:>7}", state.as_str());
            }
        }
        if self.counts.review > 0 {
            let _ = writeln!(
                s,
                "review ({}): paid, held by the quality gate; look at them (`backdrop report`), then \
                 `backdrop accept --sku SKU` or `--all-review`",
                self.counts.review
            );
        }
        let _ = writeln!(s, "spent: {}", describe_spend(&self.spent));
        let exposed: u64 = self.runs.iter().map(|r| r.possibly_charged_requests).sum();
        if exposed > 0 {
            let unpriced: u64 = self.runs.iter().map(|r| r.unpriced_requests).sum();
            let unpriced = if unpriced > 0 {
                format!(", {unpriced} of them at an unknown price (add the model under [prices])")
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "possibly charged: {} ({exposed} paid requests got no answer from the API itself{unpriced})",
                describe_spend(&self.possibly_charged)
            );
        }
        if !self.runs.is_empty() {
            let _ = writeln!(s, "money per run:");
            let skipped = self.runs.len().saturating_sub(TEXT_RUNS_LIMIT);
            if skipped > 0 {
                let _ = writeln!(s, "  … {skipped} earlier runs (`status --json` lists all)");
            }
            for run in self.runs.iter().skip(skipped) {
                let _ = writeln!(s, "  {}", describe_run_spend(run));
            }
        }
        match &self.last_run {
            None => s.push_str("last run: none\n"),
            Some(run) => {
                let ended =
                    run.ended_at.map_or_else(|| "not ended".to_owned(), |t| format!("ended {}", rfc3339(t)));
                let outcome = match (&run.outcome, run.exit_code) {
                    (Some(o), Some(code)) => format!("{o} (exit {code})"),
                    (Some(o), None) => o.clone(),
                    (None, _) => "unknown: still running, or the process died".to_owned(),
                };
                let _ = writeln!(
                    s,
                    "last run: #{}{} started {}, {}, outcome {}",
                    run.id,
                    if run.dry_run { " (dry run)" } else { "" },
                    rfc3339(run.started_at),
                    ended,
                    one_line(&outcome),
                );
            }
        }
        if !self.failed.is_empty() {
            let _ = writeln!(s, "failed ({}): `backdrop retry --failed` re-queues them", self.failed.len());
            list(&mut s, &self.failed, |j| {
                j.error.as_deref().map_or_else(|| "no reason recorded".into(), one_line)
            });
        }
        if self.counts.submitting > 0 {
            let _ = writeln!(
                s,
                "submitting ({}): a paid request was leaving; if no run is going now, the next run marks \
                 them ambiguous",
                self.counts.submitting
            );
        }
        if !self.ambiguous.is_empty() {
            let _ = writeln!(
                s,
                "ambiguous ({}): a paid request may already have gone out; `backdrop retry --ambiguous` \
                 re-queues them and may be charged twice",
                self.ambiguous.len()
            );
            list(&mut s, &self.ambiguous, |j| format!("since {}", rfc3339(j.updated_at)));
        }
        s
    }
}

/// Paid rows still to download, each with the deadline of its output URLs.
fn due_text(s: &mut String, due: &[DueDownload], now: i64) {
    use std::fmt::Write as _;
    if due.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "paid, not downloaded ({}): `backdrop run` downloads them (failed ones after `backdrop retry \
         --failed`) while their output URLs work:",
        due.len()
    );
    for d in due.iter().take(TEXT_LIST_LIMIT) {
        let when = if d.deadline <= now {
            format!("URLs expired {}", rfc3339(d.deadline))
        } else {
            let left = std::time::Duration::from_secs(u64::try_from((d.deadline - now) / 1000).unwrap_or(0));
            format!(
                "download by {} (in {})",
                rfc3339(d.deadline),
                humantime::format_duration(round_to_minutes(left))
            )
        };
        let _ = writeln!(s, "  {}  ({}) {when}", one_line(&d.sku), d.state);
    }
    if due.len() > TEXT_LIST_LIMIT {
        let _ = writeln!(s, "  … and {} more (`status --json` lists all)", due.len() - TEXT_LIST_LIMIT);
    }
}

/// A time left, to the minute: the seconds of a 24-hour deadline are noise.
fn round_to_minutes(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs().max(60) / 60 * 60)
}

/// Totals of what every run may have been charged, per provider.
fn possibly_charged(runs: &[RunSpend]) -> Spend {
    let mut total = Spend::default();
    for run in runs {
        match run.provider.as_str() {
            "fal" => total.fal_dollars += run.possibly_charged,
            _ => total.seedance_credits += run.possibly_charged,
        }
        total.total_dollars += run.possibly_charged_usd;
    }
    total
}

/// One run's line: `#3 2026-11-22T02:30:00Z budget: spent 64 cr ($0.64), possibly charged …`.
fn describe_run_spend(run: &RunSpend) -> String {
    let unit = run.provider.parse::<backdrop::domain::ProviderKind>().ok().map(backdrop::money::Unit::of);
    let show = |amount: f64| unit.map_or_else(|| format!("{amount}"), |u| u.show(amount));
    let outcome = run
        .outcome
        .as_ref()
        .map_or_else(|| "not ended (running, or killed)".to_owned(), |o| o.replace('_', " "));
    let mut line =
        format!("#{} {} {outcome}: spent {}", run.run_id, rfc3339(run.started_at), show(run.spent));
    if run.possibly_charged_requests > 0 {
        line.push_str(&format!(
            ", possibly charged {} ({} requests)",
            show(run.possibly_charged),
            run.possibly_charged_requests
        ));
    }
    line
}

fn list(s: &mut String, jobs: &[JobBrief], detail: impl Fn(&JobBrief) -> String) {
    use std::fmt::Write as _;
    for j in jobs.iter().take(TEXT_LIST_LIMIT) {
        let attempts =
            if j.attempts == 1 { "1 attempt".to_owned() } else { format!("{} attempts", j.attempts) };
        let _ = writeln!(s, "  {}  ({attempts}) {}", one_line(&j.sku), detail(j));
    }
    if jobs.len() > TEXT_LIST_LIMIT {
        let _ = writeln!(s, "  … and {} more (`backdrop report` lists all)", jobs.len() - TEXT_LIST_LIMIT);
    }
}

/// Runs `backdrop status`.
///
/// # Errors
/// Exit 2 when the state database does not exist; a database error otherwise.
pub(crate) async fn execute(global: &GlobalArgs, args: &StatusArgs) -> Result<ExitCode, Error> {
    let store = open_existing(global, &args.state).await?;
    // The config's `[prices]` prices the requests that may have been charged, as `run` does.
    let prices = config_file(global)?.and_then(|f| f.prices).unwrap_or_default();
    let status = Status::load(&store, &prices).await?;
    store.close().await;
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&status).map_err(|e| Error::Other {
            message: format!("cannot encode status: {e}"),
            exit: ExitCode::Fatal,
        })?;
        json.push('\n');
        json
    } else {
        status.to_text()
    };
    print_stdout(&text)?;
    Ok(ExitCode::Success)
}

/// The config file's settings, when `--config` was given.
pub(crate) fn config_file(global: &GlobalArgs) -> Result<Option<RunArgs>, Error> {
    Ok(global.config.as_deref().map(crate::config::load_file).transpose()?)
}

/// The state database path: `--state` (or `BACKDROP_STATE`), else `state` in the config file,
/// else [`DEFAULT_STATE`].
pub(crate) fn state_path(state: &StateArgs, file: Option<&RunArgs>) -> PathBuf {
    state
        .state
        .clone()
        .or_else(|| file.and_then(|f| f.state.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE))
}

/// Refuses a state database that does not exist (exit 2): opening would create an empty one,
/// and an empty status would hide a wrong `--state`.
pub(crate) fn require_existing(path: &Path) -> Result<(), Error> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::Other {
            message: format!(
                "no state database at {}: nothing has run here yet (pass --state FILE, or run `backdrop run` first)",
                path.display()
            ),
            exit: ExitCode::Usage,
        })
    }
}

/// Opens the state database the flags and config name, which must exist.
pub(crate) async fn open_existing(global: &GlobalArgs, state: &StateArgs) -> Result<Store, Error> {
    let path = state_path(state, config_file(global)?.as_ref());
    require_existing(&path)?;
    Ok(Store::open(&path).await?)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
pub(crate) fn print_stdout(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("writing to stdout", e)),
        _ => Ok(()),
    }
}

/// Text from the database on one terminal line: control characters (newlines, escape
/// sequences a server put in an error message) become spaces.
pub(crate) fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_path_prefers_flag_then_config_then_default() {
        let flag = StateArgs { state: Some("flag.db".into()) };
        let none = StateArgs { state: None };
        let file = RunArgs { state: Some("file.db".into()), ..RunArgs::default() };
        assert_eq!(state_path(&flag, Some(&file)), PathBuf::from("flag.db"));
        assert_eq!(state_path(&none, Some(&file)), PathBuf::from("file.db"));
        assert_eq!(state_path(&none, None), PathBuf::from(DEFAULT_STATE));
    }

    #[test]
    fn one_line_strips_control_characters() {
        assert_eq!(one_line("a\nb\x1b[31mc\r"), "a b [31mc ");
    }

    #[test]
    fn text_lists_failures_with_reasons() {
        let brief = |sku: &str, state, error: Option<&str>| JobBrief {
            id: 1,
            sku: sku.into(),
            state,
            attempts: 2,
            request_id: None,
            error: error.map(Into::into),
            error_class: None,
            updated_at: 0,
            has_result: false,
        };
        let status = Status {
            version: 1,
            state_file: "s.db".into(),
            counts: StateCounts { failed: 1, ambiguous: 1, done: 3, total: 5, ..StateCounts::default() },
            spent: Spend { seedance_credits: 90.0, fal_dollars: 0.0, total_dollars: 0.9 },
            possibly_charged: Spend { seedance_credits: 16.0, fal_dollars: 0.0, total_dollars: 0.16 },
            runs: vec![RunSpend {
                run_id: 7,
                started_at: 0,
                ended_at: None,
                outcome: None,
                provider: "seedance".into(),
                spent: 90.0,
                spent_usd: 0.9,
                possibly_charged: 16.0,
                possibly_charged_usd: 0.16,
                possibly_charged_requests: 2,
                unpriced_requests: 0,
            }],
            last_run: None,
            failed: vec![brief("F-1", JobState::Failed, Some("HTTP 422\ncontent policy"))],
            ambiguous: vec![brief("A-1", JobState::Ambiguous, None)],
            downloads_due: Vec::new(),
        };
        let text = status.to_text();
        assert!(text.contains("  failed           1\n"), "{text}");
        assert!(text.contains("spent: seedance 90 credits ($0.90); total $0.90"), "{text}");
        assert!(text.contains("F-1  (2 attempts) HTTP 422 content policy"), "{text}");
        assert!(text.contains("may be charged twice"), "{text}");
        assert!(text.contains("last run: none"), "{text}");
        assert!(
            text.contains("possibly charged: seedance 16 credits ($0.16); total $0.16 (2 paid requests"),
            "{text}"
        );
        assert!(
            text.contains(
                "#7 1970-01-01T00:00:00Z not ended (running, or killed): spent 90 cr ($0.90), possibly charged 16 cr ($0.16) (2 requests)"
            ),
            "{text}"
        );
    }

    #[test]
    fn text_lists_paid_rows_to_download_with_their_deadline() {
        let due =
            |sku: &str, state, deadline| DueDownload { sku: sku.into(), state, request_id: None, deadline };
        let now = 1_795_000_000_000;
        let mut s = String::new();
        due_text(
            &mut s,
            &[
                due("OLD-1", JobState::Failed, now - 1),
                due("NEW-1", JobState::Fetching, now + 90 * 60 * 1000 + 500),
            ],
            now,
        );
        assert!(s.starts_with("paid, not downloaded (2):"), "{s}");
        assert!(s.contains("  OLD-1  (failed) URLs expired 2026-11-18T11:06:39Z"), "{s}");
        assert!(s.contains("  NEW-1  (fetching) download by 2026-11-18T12:36:40Z (in 1h 30m)"), "{s}");
        let mut none = String::new();
        due_text(&mut none, &[], now);
        assert!(none.is_empty());
    }
}
