//! Command-line definitions (clap derive): the global flags, the subcommands and their arguments.
//! Every `run` flag is an `Option` so `config` can layer flags over env over `backdrop.toml` over
//! defaults; nothing here decides a default value.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use backdrop::domain::ProviderKind;
use backdrop::report::Format;
use clap::builder::{PossibleValuesParser, TypedValueParser as _};

use crate::exit::EXIT_CODES_HELP;

/// Parses the process's arguments (clap exits with its own message and code 2 on a usage error).
pub(crate) fn parse() -> Cli {
    Cli::parse()
}

/// `--provider`: the library's [`ProviderKind`], with its names listed in `--help`.
fn provider_parser() -> impl clap::builder::TypedValueParser<Value = ProviderKind> {
    PossibleValuesParser::new(ProviderKind::ALL.map(ProviderKind::as_str))
        .try_map(|s| s.parse::<ProviderKind>())
}

/// `--format`: the library's report [`Format`], with its names listed in `--help`.
fn format_parser() -> impl clap::builder::TypedValueParser<Value = Format> {
    PossibleValuesParser::new(Format::ALL.map(Format::as_str)).try_map(|s| s.parse::<Format>())
}

/// Runs a product catalog through ByteDance's Seedream image models: resumable, rate-limited,
/// and never pays twice for a row.
#[derive(Debug, Parser)]
#[command(name = "backdrop", version, max_term_width = 100, after_long_help = EXIT_CODES_HELP, args_override_self = true)]
pub(crate) struct Cli {
    /// Flags every subcommand takes.
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The help heading of the flags every subcommand takes, apart from each one's own.
const GLOBAL: &str = "Global options";

/// Flags every subcommand takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct GlobalArgs {
    /// Read settings from this TOML file: any `run` flag, as `kebab-case = value` (flags win).
    #[arg(long, global = true, env = "BACKDROP_CONFIG", value_name = "FILE", help_heading = GLOBAL)]
    pub(crate) config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = GLOBAL)]
    pub(crate) verbose: u8,
    /// Print nothing on stderr but errors.
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    pub(crate) quiet: bool,
    /// Log format on stderr: human text, or one JSON object per event for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BACKDROP_LOG_FORMAT", help_heading = GLOBAL)]
    pub(crate) log_format: LogFormat,
}

/// `--max-credits`, `--max-cost`, `--low-credit-warning`: a finite number, zero or more. Negative
/// numbers are let through clap's flag parsing so that `-5` gets this message, not "unexpected
/// argument".
fn non_negative(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err("must be zero or more (a finite number), e.g. 500".into()),
        Err(_) => Err("must be a number, e.g. 500 or 12.5".into()),
    }
}

/// The end of `backdrop run --help`.
const RUN_EXAMPLES: &str = "\
Examples:
  # No key, no network, no charge: the simulator runs inside the process.
  backdrop run sample-catalog.csv --prompt prompts/marble-counter.txt --simulate
  # Price a catalog, send nothing (the sample's pictures are local files):
  backdrop run sample-catalog.csv --prompt prompts/marble-counter.txt --dry-run \\
      --inline-local-images
  # A real run with a budget:
  SEEDANCE_API_KEY=... backdrop run sample-catalog.csv --prompt prompts/marble-counter.txt \\
      --inline-local-images --concurrency 10 --rate 5/s --max-credits 500
  # A SQLite catalog on fal, settings from a file:
  FAL_KEY=... backdrop --config backdrop.toml run products.db --table products --provider fal";

/// The end of `backdrop status --help`.
const STATUS_EXAMPLES: &str = "\
Examples:
  backdrop status
  backdrop status --json
  backdrop status --state nightly.db";

/// The end of `backdrop retry --help`.
const RETRY_EXAMPLES: &str = "\
Examples:
  # Rows that failed permanently, after you fixed the cause:
  backdrop retry --failed
  # Rows whose paid request may have left before a crash (may be charged twice):
  backdrop retry --ambiguous
  backdrop retry --sku MUG-001 --sku MUG-002
  # Rows the quality gate held, generated again with a new seed (paid again):
  backdrop retry --review
  backdrop retry --review --sku MUG-001";

/// The end of `backdrop report --help`.
const REPORT_EXAMPLES: &str = "\
Examples:
  # At a terminal the html gallery goes to report.html; piped, to stdout:
  backdrop report
  backdrop report --format html > gallery.html
  backdrop report --format csv --output report.csv
  backdrop report --format json | jq '.rows[] | select(.state == \"failed\")'";

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Plan the catalog against the state database, then process what is new, changed or unfinished.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Counts per state, credits spent, failures with reasons, the last run.
    #[command(after_help = STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// Put failed, ambiguous, named or review rows back in the queue for the next `run`.
    #[command(after_help = RETRY_EXAMPLES)]
    Retry(RetryArgs),
    /// Mark rows the quality gate held for review as done, after looking at them.
    #[command(after_help = ACCEPT_EXAMPLES)]
    Accept(AcceptArgs),
    /// Write a report of every row: csv, json, or an html before/after gallery.
    #[command(after_help = REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// Start the local simulator of the Seedance and fal.ai APIs.
    Sim(Box<SimCommand>),
}

/// Arguments of `backdrop sim`: the simulator's own flags. It reads no `--config` (its
/// settings file is `--scenario`), so the global flag is replaced here by a hidden one that
/// `sim` refuses, and its help does not describe `run` settings.
#[derive(Debug, Clone, Args)]
pub(crate) struct SimCommand {
    /// The simulator's flags.
    #[command(flatten)]
    pub(crate) args: backdrop_sim::SimArgs,
    /// Not a `sim` flag: refused with a pointer to --scenario.
    #[arg(long, hide = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

/// Arguments of `backdrop run`. Every field is optional so a config file can supply it; the
/// same struct is what `backdrop.toml` deserializes into (unknown keys are errors).
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RunArgs {
    /// The catalog: a CSV file, or a SQLite database with --table or --query.
    #[arg(value_name = "CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
    /// Table to read when CATALOG is a SQLite database.
    #[arg(long, env = "BACKDROP_TABLE", conflicts_with = "query")]
    pub(crate) table: Option<String>,
    /// Query to read when CATALOG is a SQLite database (must return a `sku` column).
    #[arg(long, env = "BACKDROP_QUERY")]
    pub(crate) query: Option<String>,
    /// Prompt template file (see prompts/).
    #[arg(long, env = "BACKDROP_PROMPT", value_name = "FILE")]
    pub(crate) prompt: Option<PathBuf>,
    /// State database, created if missing [default: backdrop.db].
    #[arg(long, env = "BACKDROP_STATE", value_name = "FILE")]
    pub(crate) state: Option<PathBuf>,
    /// Output folder for finished images [default: out], or a bucket: s3://bucket/prefix, gs://...,
    /// az://... (credentials from the cloud's usual environment).
    #[arg(long, env = "BACKDROP_OUT", value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Output file names, relative to --out: {sku}, {index}, {ext} [default: {sku}/{index}.{ext}]
    #[arg(long, env = "BACKDROP_OUTPUT_NAME", value_name = "TEMPLATE")]
    pub(crate) output_name: Option<String>,
    /// Which API protocol to speak [default: seedance].
    #[arg(long, value_parser = provider_parser(), env = "BACKDROP_PROVIDER")]
    pub(crate) provider: Option<ProviderKind>,
    /// Base URL of the API (default: the provider's public endpoint).
    #[arg(long, env = "BACKDROP_API_BASE", value_name = "URL")]
    pub(crate) api_base: Option<String>,
    /// Base URL of fal's REST API, where local input files are uploaded (default: --api-base
    /// when set, the simulator's with --simulate, else https://rest.fal.ai).
    #[arg(long, env = "BACKDROP_FAL_REST_BASE", value_name = "URL")]
    pub(crate) fal_rest_base: Option<String>,
    /// Model, overriding the prompt's front matter.
    #[arg(long, env = "BACKDROP_MODEL")]
    pub(crate) model: Option<String>,
    /// Jobs in flight at once, submit to download [default: 5].
    #[arg(long, env = "BACKDROP_CONCURRENCY")]
    pub(crate) concurrency: Option<u32>,
    /// Request rate limit shared by every worker, e.g. 10/s or 600/m [default: 10/s].
    #[arg(long, env = "BACKDROP_RATE")]
    pub(crate) rate: Option<String>,
    /// How long the server may answer nothing but 429 (too many requests) before the run stops,
    /// resumably, with exit code 7 [default: 5m]. A 429 never uses up a row's attempts.
    #[arg(long, env = "BACKDROP_PATIENCE", value_name = "DURATION")]
    pub(crate) patience: Option<String>,
    /// Submissions per row before it fails [default: 5].
    #[arg(long, env = "BACKDROP_MAX_ATTEMPTS")]
    pub(crate) max_attempts: Option<u32>,
    /// Stop submitting once this many credits are spent or reserved (seedance).
    #[arg(long, env = "BACKDROP_MAX_CREDITS", value_name = "CREDITS", allow_negative_numbers = true, value_parser = non_negative)]
    pub(crate) max_credits: Option<f64>,
    /// Stop submitting once this many dollars are spent or reserved.
    #[arg(long, env = "BACKDROP_MAX_COST", value_name = "USD", allow_negative_numbers = true, value_parser = non_negative)]
    pub(crate) max_cost: Option<f64>,
    /// Warn when the provider reports fewer credits remaining than this.
    #[arg(long, env = "BACKDROP_LOW_CREDIT_WARNING", value_name = "CREDITS", allow_negative_numbers = true, value_parser = non_negative)]
    pub(crate) low_credit_warning: Option<f64>,
    /// Process at most this many rows in this run.
    #[arg(long, env = "BACKDROP_LIMIT")]
    pub(crate) limit: Option<u64>,
    /// Plan and price only; send nothing.
    #[arg(long)]
    #[serde(default)]
    pub(crate) dry_run: bool,
    /// Re-run rows that are already done.
    #[arg(long)]
    #[serde(default)]
    pub(crate) force: bool,
    /// Process the valid rows of a catalog with errors, listing the invalid ones.
    #[arg(long)]
    #[serde(default)]
    pub(crate) skip_invalid: bool,
    /// Do not check input images before paying. Risks: a dead link, an HTML error page or an
    /// oversized picture in the catalog costs a paid request or a failed row at run time.
    #[arg(long)]
    #[serde(default)]
    pub(crate) no_check_inputs: bool,
    /// Send one paid request per row even when rows ask for the same image (same model, prompt,
    /// inputs and parameters); by default they share one request, or a done result.
    #[arg(long)]
    #[serde(default)]
    pub(crate) no_reuse: bool,
    /// Mark rows done without comparing each output with its input. Risks: a moved, recoloured,
    /// reshaped or missing product, or a blank or cut-short image, reaches the catalog unseen.
    #[arg(long)]
    #[serde(default)]
    pub(crate) no_quality_gate: bool,
    /// Input images checked at once before the run [default: 16].
    #[arg(long, env = "BACKDROP_INPUT_CHECKS", value_name = "N")]
    pub(crate) input_checks: Option<usize>,
    /// How long a passed input check stands before it is revalidated with a conditional
    /// request [default: 1h].
    #[arg(long, env = "BACKDROP_INPUT_CHECK_TTL", value_name = "DURATION")]
    pub(crate) input_check_ttl: Option<String>,
    /// Start the built-in simulator on a free port and send everything there (no key needed).
    #[arg(long)]
    #[serde(default)]
    pub(crate) simulate: bool,
    /// Send local image files from the catalog as data: URIs (refused above --inline-max-bytes).
    /// Without it, a catalog with local files is refused before anything is sent. --simulate
    /// turns it on.
    #[arg(long)]
    #[serde(default)]
    pub(crate) inline_local_images: bool,
    /// Largest local image sent as a data: URI [default: 4000000].
    #[arg(long, env = "BACKDROP_INLINE_MAX_BYTES")]
    pub(crate) inline_max_bytes: Option<u64>,
    /// Seedance edits: wait for the answer in the submit call instead of polling.
    #[arg(long)]
    #[serde(default)]
    pub(crate) sync: bool,
    /// Poll delay to start from [default: 250ms]. Until a job of the run is seen done, first
    /// polls fall between half of it and all of it; after that they go where jobs finish.
    #[arg(long, env = "BACKDROP_POLL_INITIAL", value_name = "DURATION")]
    pub(crate) poll_initial: Option<String>,
    /// Status polls per row, on average, once generation times are known (this run's, or
    /// earlier runs' from the state file): polls go where jobs finish [default: 6].
    #[arg(long, env = "BACKDROP_POLLS_PER_ROW")]
    pub(crate) polls_per_row: Option<f64>,
    /// Polls back off up to this interval [default: 5s].
    #[arg(long, env = "BACKDROP_POLL_MAX", value_name = "DURATION")]
    pub(crate) poll_max: Option<String>,
    /// First retry delay; doubles each attempt, with full jitter [default: 1s].
    #[arg(long, env = "BACKDROP_RETRY_BASE", value_name = "DURATION")]
    pub(crate) retry_base: Option<String>,
    /// Longest retry delay, and the cap on a server's Retry-After [default: 60s].
    #[arg(long, env = "BACKDROP_RETRY_MAX", value_name = "DURATION")]
    pub(crate) retry_max: Option<String>,
    /// Time limit of one HTTP request, downloads included [default: 120s].
    #[arg(long, env = "BACKDROP_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub(crate) request_timeout: Option<String>,
    /// Largest output file accepted [default: 50000000].
    #[arg(long, env = "BACKDROP_MAX_DOWNLOAD_BYTES")]
    pub(crate) max_download_bytes: Option<u64>,
    /// Address the embedded webhook receiver listens on, e.g. 127.0.0.1:8080.
    #[arg(long, env = "BACKDROP_WEBHOOK_LISTEN", value_name = "ADDR")]
    pub(crate) webhook_listen: Option<String>,
    /// Public URL the provider should deliver webhooks to (reaches --webhook-listen).
    #[arg(long, env = "BACKDROP_WEBHOOK_URL", value_name = "URL")]
    pub(crate) webhook_url: Option<String>,
    /// JWKS document with the keys that sign fal webhooks.
    #[arg(long, env = "BACKDROP_JWKS_URL", value_name = "URL")]
    pub(crate) jwks_url: Option<String>,
    /// Write the run's outcome as JSON here at the end of every run (interrupted runs too).
    #[arg(long, env = "BACKDROP_SUMMARY_JSON", value_name = "FILE")]
    pub(crate) summary_json: Option<PathBuf>,
    /// Simulator scenario (TOML) for --simulate.
    #[arg(long, env = "BACKDROP_SIM_SCENARIO", value_name = "FILE")]
    pub(crate) sim_scenario: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    #[serde(default)]
    pub(crate) no_progress: bool,
    /// Price table overrides: model name to price per image, in the provider's unit.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) prices: Option<std::collections::BTreeMap<String, f64>>,
}

/// Where the state database is, for the commands that only read or re-queue.
#[derive(Debug, Clone, Args)]
pub(crate) struct StateArgs {
    /// State database [default: backdrop.db, or `state` from the config file].
    #[arg(long, env = "BACKDROP_STATE", value_name = "FILE")]
    pub(crate) state: Option<PathBuf>,
}

/// Arguments of `backdrop status`.
#[derive(Debug, Clone, Args)]
pub(crate) struct StatusArgs {
    /// The state database.
    #[command(flatten)]
    pub(crate) state: StateArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `backdrop retry`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["failed", "ambiguous", "sku", "review"])))]
pub(crate) struct RetryArgs {
    /// The state database.
    #[command(flatten)]
    pub(crate) state: StateArgs,
    /// Re-queue every failed row.
    #[arg(long)]
    pub(crate) failed: bool,
    /// Re-queue rows whose paid request may have left before the process died (may be charged twice).
    #[arg(long)]
    pub(crate) ambiguous: bool,
    /// Re-queue these SKUs, whatever their state.
    #[arg(long, value_name = "SKU", num_args = 1..)]
    pub(crate) sku: Vec<String>,
    /// Also resubmit selected rows the provider already charged (done, or failed after their
    /// request was accepted): the next run PAYS FOR THEM AGAIN. Without it such rows are left as
    /// they are, and a failed row whose result is saved is only downloaded again.
    #[arg(long)]
    pub(crate) pay_again: bool,
    /// Generate rows the quality gate held for review again, with a new seed (all of them, or
    /// the --sku ones): the next run PAYS FOR THEM AGAIN. Their old outputs are moved to
    /// OUT/review-kept/N/, never deleted.
    #[arg(long, conflicts_with_all = ["failed", "ambiguous", "pay_again"])]
    pub(crate) review: bool,
    /// With --review: the run's output folder, where the old outputs are kept aside
    /// [default: out, or `out` from the config file].
    #[arg(long, env = "BACKDROP_OUT", value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
}

/// Arguments of `backdrop accept`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["sku", "all_review"])))]
pub(crate) struct AcceptArgs {
    /// The state database.
    #[command(flatten)]
    pub(crate) state: StateArgs,
    /// Accept this review row (repeatable).
    #[arg(long, value_name = "SKU")]
    pub(crate) sku: Vec<String>,
    /// Accept every review row.
    #[arg(long)]
    pub(crate) all_review: bool,
}

const ACCEPT_EXAMPLES: &str = "Examples:
  backdrop report --format html -o review.html      # look at the held rows first
  backdrop accept --sku MUG-001 --sku MUG-007
  backdrop accept --all-review";

/// Arguments of `backdrop report`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ReportArgs {
    /// The state database.
    #[command(flatten)]
    pub(crate) state: StateArgs,
    /// Output format.
    #[arg(long, value_parser = format_parser(), default_value = "html")]
    pub(crate) format: Format,
    /// Write here instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Output folder of the run, where the html report finds the finished images
    /// [default: out, or `out` from the config file]; for a bucket (s3://...) the gallery
    /// links each image through a presigned URL valid 7 days.
    #[arg(long, env = "BACKDROP_OUT", value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// The help text of every subcommand, short (`-h`) and long (`--help`).
    fn helps() -> Vec<(String, String)> {
        let mut cli = Cli::command();
        cli.build();
        let mut out = Vec::new();
        for sub in cli.get_subcommands_mut().filter(|s| s.get_name() != "help") {
            let name = sub.get_name().to_owned();
            out.push((format!("{name} -h"), sub.render_help().to_string()));
            out.push((format!("{name} --help"), sub.render_long_help().to_string()));
        }
        out
    }

    #[test]
    fn every_subcommand_help_ends_with_examples() {
        for (which, text) in helps() {
            let at = text.rfind("Examples:").unwrap_or_else(|| panic!("{which} has no examples:\n{text}"));
            let tail = &text[at + "Examples:".len()..];
            assert!(tail.contains("backdrop "), "{which}: {tail}");
            assert!(
                tail.lines().skip(1).all(|l| l.is_empty() || l.starts_with("  ")),
                "{which}: nothing may follow the examples:\n{tail}"
            );
        }
    }

    #[test]
    fn global_flags_have_their_own_heading_and_sim_has_no_config() {
        for (which, text) in helps() {
            let heading = text.find("Global options:").unwrap_or_else(|| panic!("{which}:\n{text}"));
            for flag in ["--verbose", "--quiet", "--log-format"] {
                let at = text.find(flag).unwrap_or_else(|| panic!("{which} lacks {flag}"));
                assert!(at > heading, "{which}: {flag} is not under Global options");
            }
            let quiet = text.lines().skip_while(|l| !l.contains("--quiet")).take(2).collect::<String>();
            assert!(!quiet.contains("progress"), "{which}: -q promises no progress bar: {quiet}");
            if which.starts_with("sim") {
                assert!(!text.contains("--config"), "{which} must not offer --config:\n{text}");
            } else {
                assert!(text.contains("--config"), "{which}");
            }
        }
    }

    #[test]
    fn a_negative_budget_gets_a_useful_message() {
        let parse = |v: &str| Cli::try_parse_from(["backdrop", "run", "c.csv", "--max-credits", v]);
        let err = parse("-5").unwrap_err().to_string();
        assert!(err.contains("--max-credits") && err.contains("must be zero or more"), "{err}");
        for bad in ["NaN", "inf", "-0.5"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let err = parse("lots").unwrap_err().to_string();
        assert!(err.contains("must be a number"), "{err}");
        let Command::Run(args) = parse("0").unwrap().command else { panic!("run") };
        assert_eq!(args.max_credits, Some(0.0));
    }
}
