//! Reports of a state store: [`RunSummary`] (totals, money, the last run, one [`ReportRow`] per
//! catalog row) built from store queries, and the [`ReportFormatter`]s that write it as CSV,
//! versioned JSON, or a self-contained HTML before/after gallery.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::store::{
    ExportRecord, JobRecord, JobState, OutputRecord, RunRecord, Spend, StateCounts, Store, StoreError,
};

pub mod csv;
pub mod html;
pub mod json;

/// The version of the JSON report shape (and of the CSV header). Bumped on any breaking change.
pub const REPORT_VERSION: u32 = 1;

/// Errors writing a report. None is worth retrying: they are a full disk, a closed pipe or a bug.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Writing the report failed.
    #[error("cannot write the report: {0}")]
    Io(#[from] std::io::Error),
    /// JSON serialization failed.
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    /// CSV writing failed.
    #[error("cannot write the CSV report: {0}")]
    Csv(#[from] ::csv::Error),
}

impl ReportError {
    /// Report errors never go away by trying again.
    #[must_use]
    pub const fn is_retryable(&self) -> bool {
        false
    }

    /// Whether the reader went away (`backdrop report | head`): not an error for the user.
    #[must_use]
    pub fn is_broken_pipe(&self) -> bool {
        let kind = match self {
            Self::Io(e) => Some(e.kind()),
            Self::Csv(e) => match e.kind() {
                ::csv::ErrorKind::Io(e) => Some(e.kind()),
                _ => None,
            },
            Self::Json(e) => e.io_error_kind(),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    }
}

/// Everything a report shows. Its JSON form is the `--format json` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// When the report was made (RFC 3339, UTC).
    pub generated_at: String,
    /// The state database it was made from.
    pub state_file: String,
    /// Jobs per state.
    pub counts: StateCounts,
    /// Money charged so far.
    pub spent: Spend,
    /// The most recent run.
    pub last_run: Option<RunRecord>,
    /// One row per job, in catalog order.
    pub rows: Vec<ReportRow>,
}

/// One catalog row of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    /// The row's SKU.
    pub sku: String,
    /// The product's name, from the catalog's `name` column when it has one.
    pub name: Option<String>,
    /// Catalog order (`jobs.position`).
    pub position: i64,
    /// Its state.
    pub state: JobState,
    /// `seedance` (credits) or `fal` (dollars).
    pub provider: String,
    /// The model.
    pub model: String,
    /// `edit` or `generate`.
    pub task: String,
    /// The provider's request id of the last submission.
    pub request_id: Option<String>,
    /// The rendered prompt.
    pub prompt: String,
    /// Input images: http(s) URLs or absolute local paths.
    pub inputs: Vec<String>,
    /// Output files, relative to the output folder.
    pub outputs: Vec<ReportOutput>,
    /// Charged for this row, all attempts, in the provider's unit.
    pub credits: f64,
    /// The same charge in dollars.
    pub dollars: f64,
    /// Submissions since the row was last (re-)queued.
    pub attempts: i64,
    /// Why it failed or waits.
    pub error: Option<String>,
    /// `retry`, `fail`, `stop` or `ambiguous`.
    pub error_class: Option<String>,
    /// The SKU whose paid request or done result this row shares: its files are copies of that
    /// row's and it cost nothing. `None` for a row that made its own request.
    pub reused_from: Option<String>,
    /// The quality gate's scores per check (`output:check=score`, `;`-separated), empty when it
    /// did not run.
    pub quality_scores: String,
    /// Why the gate held the row (a reason per flag), empty when it passed or did not run.
    pub quality_reasons: String,
    /// The gate's stored judgement (JSON), for the gallery's review cards; not a report column.
    #[serde(skip)]
    pub quality: Option<String>,
    /// Last change (RFC 3339, UTC).
    pub updated_at: String,
    /// Files the template's export presets made from the outputs, by output and preset.
    pub exports: Vec<ReportExport>,
}

/// One export file of a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportExport {
    /// The index of the output it was made from.
    pub index: i64,
    /// The preset's name.
    pub preset: String,
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

impl From<ExportRecord> for ReportExport {
    fn from(e: ExportRecord) -> Self {
        Self {
            index: e.idx,
            preset: e.preset,
            path: e.path,
            sha256: e.sha256,
            bytes: e.bytes,
            width: e.width,
            height: e.height,
            content_type: e.content_type,
        }
    }
}

/// One output file of a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportOutput {
    /// Index among the row's outputs.
    pub index: i64,
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

impl From<OutputRecord> for ReportOutput {
    fn from(o: OutputRecord) -> Self {
        Self {
            index: o.idx,
            path: o.path,
            sha256: o.sha256,
            bytes: o.bytes,
            width: o.width,
            height: o.height,
            content_type: o.content_type,
        }
    }
}

/// The stored form of the gate's judgement of a row.
#[derive(serde::Deserialize)]
struct StoredJudgement {
    outputs: Vec<StoredOutputJudgement>,
    /// The gate's copy of a held row's URL input, relative to the output folder.
    #[serde(default)]
    input_copy: Option<String>,
}

#[derive(serde::Deserialize)]
struct StoredOutputJudgement {
    index: u32,
    verdict: Option<crate::quality::Verdict>,
    error: Option<String>,
}

/// The report's two quality cells from the stored judgement: every check's score, and the
/// reasons for each flag (or why an output could not be checked).
fn quality_cells(stored: Option<&str>) -> (String, String) {
    let Some(judged) = stored.and_then(|s| serde_json::from_str::<StoredJudgement>(s).ok()) else {
        return (String::new(), String::new());
    };
    let (mut scores, mut reasons) = (Vec::new(), Vec::new());
    for o in &judged.outputs {
        if let Some(e) = &o.error {
            reasons.push(format!("{}: not checked: {e}", o.index));
        }
        if let Some(v) = &o.verdict {
            for c in &v.checks {
                if let Some(score) = c.score {
                    scores.push(format!("{}:{}={score:.3}", o.index, c.check.name()));
                }
                if c.outcome == crate::quality::Outcome::Flag
                    && let Some(r) = &c.reason
                {
                    reasons.push(format!("{}: {r}", o.index));
                }
            }
        }
    }
    (scores.join(";"), reasons.join("; "))
}

impl From<JobRecord> for ReportRow {
    fn from(j: JobRecord) -> Self {
        Self {
            dollars: crate::money::stored_to_dollars(&j.provider, j.credits),
            updated_at: rfc3339(j.updated_at),
            reused_from: j.reused_from,
            quality_scores: quality_cells(j.quality.as_deref()).0,
            quality_reasons: quality_cells(j.quality.as_deref()).1,
            quality: j.quality,
            sku: j.sku,
            name: j.name,
            position: j.position,
            state: j.state,
            provider: j.provider,
            model: j.model,
            task: j.task,
            request_id: j.request_id,
            prompt: j.prompt,
            inputs: j.inputs,
            outputs: j.outputs.into_iter().map(ReportOutput::from).collect(),
            exports: j.exports.into_iter().map(ReportExport::from).collect(),
            credits: j.credits,
            attempts: j.attempts,
            error: j.error,
            error_class: j.error_class,
        }
    }
}

impl RunSummary {
    /// Builds the summary from the store: nothing comes from memory.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`].
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            version: REPORT_VERSION,
            generated_at: rfc3339(crate::store::now_ms()),
            state_file: store.path().display().to_string(),
            counts: store.state_counts().await?,
            spent: store.spend().await?,
            last_run: store.last_run().await?,
            rows: store.report_jobs().await?.into_iter().map(ReportRow::from).collect(),
        })
    }
}

/// Writes a [`RunSummary`] in one format (hyperfine's exporters, lychee's `StatsFormatter`).
pub trait ReportFormatter {
    /// Writes the whole report to `out`.
    ///
    /// # Errors
    /// [`ReportError`] when writing fails. Problems with single rows (a missing image) are
    /// shown in the report, not returned.
    fn write_report(&self, summary: &RunSummary, out: &mut dyn Write) -> Result<(), ReportError>;
}

/// Report formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One line per row, spreadsheet-safe.
    Csv,
    /// A versioned JSON document.
    Json,
    /// A self-contained before/after gallery.
    Html,
}

impl Format {
    /// Every format, as `--format` lists them.
    pub const ALL: [Self; 3] = [Self::Csv, Self::Json, Self::Html];

    /// The lowercase name used by `--format`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Json => "json",
            Self::Html => "html",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown report format {s:?} (use csv, json or html)"))
    }
}

/// The formatter for `format`; `out_dir` is where the html report finds the output images.
#[must_use]
pub fn formatter(format: Format, out_dir: &Path) -> Box<dyn ReportFormatter + Send + Sync> {
    match format {
        Format::Csv => Box::new(csv::CsvFormatter),
        Format::Json => Box::new(json::JsonFormatter),
        Format::Html => Box::new(html::HtmlFormatter::new(PathBuf::from(out_dir))),
    }
}

/// Dollars for people: two decimals, more only when a sub-cent amount would show as $0.00.
#[must_use]
pub fn format_dollars(amount: f64) -> String {
    if amount != 0.0 && amount.abs() < 0.01 { format!("${amount:.4}") } else { format!("${amount:.2}") }
}

/// A credit count for people: no decimals when whole.
#[must_use]
pub fn format_amount(amount: f64) -> String {
    if amount.fract() == 0.0 && amount.abs() < 1e15 {
        format!("{amount:.0}")
    } else {
        let s = format!("{amount:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// The money line of a status or report: credits and dollars per provider, then the total.
#[must_use]
pub fn describe_spend(spend: &Spend) -> String {
    let mut parts = Vec::new();
    if spend.seedance_credits != 0.0 {
        parts.push(format!(
            "seedance {} credits ({})",
            format_amount(spend.seedance_credits),
            format_dollars(crate::money::Unit::Credits.to_dollars(spend.seedance_credits))
        ));
    }
    if spend.fal_dollars != 0.0 {
        parts.push(format!("fal {}", format_dollars(spend.fal_dollars)));
    }
    let total = format!("total {}", format_dollars(spend.total_dollars));
    if parts.is_empty() { total } else { format!("{}; {total}", parts.join("; ")) }
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
#[must_use]
pub fn rfc3339(ms: i64) -> String {
    let at = u64::try_from(ms).map_or(UNIX_EPOCH, |ms| UNIX_EPOCH + Duration::from_millis(ms));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Now, as RFC 3339.
#[must_use]
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_reads_well() {
        assert_eq!(format_dollars(1.5), "$1.50");
        assert_eq!(format_dollars(0.0), "$0.00");
        assert_eq!(format_dollars(0.0035), "$0.0035");
        assert_eq!(format_amount(120.0), "120");
        assert_eq!(format_amount(2.5), "2.5");
        let spend = Spend { seedance_credits: 120.0, fal_dollars: 0.09, total_dollars: 1.29 };
        assert_eq!(describe_spend(&spend), "seedance 120 credits ($1.20); fal $0.09; total $1.29");
        assert_eq!(describe_spend(&Spend::default()), "total $0.00");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn broken_pipe_is_recognised() {
        let e = ReportError::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(e.is_broken_pipe());
        let e = ReportError::Io(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(!e.is_broken_pipe());
        assert!(!e.is_retryable());
    }
}

/// A small summary the formatters' unit tests share.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn summary() -> RunSummary {
        let output = |i: i64| ReportOutput {
            index: i,
            path: format!("A/{i}.png"),
            sha256: format!("{i:064}"),
            bytes: 10,
            width: 4,
            height: 4,
            content_type: "image/png".into(),
        };
        let row = |sku: &str, state| ReportRow {
            sku: sku.into(),
            name: None,
            position: 1,
            state,
            provider: "seedance".into(),
            model: "seedream-4".into(),
            task: "edit".into(),
            request_id: None,
            prompt: "white studio background".into(),
            inputs: vec![],
            outputs: vec![],
            credits: 0.0,
            dollars: 0.0,
            attempts: 1,
            error: None,
            error_class: None,
            updated_at: rfc3339(0),
            reused_from: None,
            quality_scores: String::new(),
            quality_reasons: String::new(),
            quality: None,
            exports: vec![],
        };
        let mut done = row("=HYPERLINK(\"x\")", JobState::Done);
        done.outputs = vec![output(0), output(1)];
        done.exports = vec![ReportExport {
            index: 0,
            preset: "amazon".into(),
            path: "amazon/A/0.jpg".into(),
            sha256: "e".repeat(64),
            bytes: 20,
            width: 2000,
            height: 2000,
            content_type: "image/jpeg".into(),
        }];
        done.credits = 30.0;
        done.dollars = 0.3;
        done.request_id = Some("req-1".into());
        let mut failed = row("B", JobState::Failed);
        failed.position = 2;
        failed.error = Some("-HTTP 422, \"content policy\"\nsecond line".into());
        RunSummary {
            version: REPORT_VERSION,
            generated_at: rfc3339(0),
            state_file: "backdrop.db".into(),
            counts: StateCounts { done: 1, failed: 1, total: 2, ..StateCounts::default() },
            spent: Spend { seedance_credits: 30.0, fal_dollars: 0.0, total_dollars: 0.3 },
            last_run: None,
            rows: vec![done, failed],
        }
    }
}
