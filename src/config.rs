//! Settings: merges `run` flags, `BACKDROP_*` environment variables, the `--config` TOML file and
//! built-in defaults (in that order of precedence) into one validated [`Settings`], and reads API
//! keys from the environment into an [`ApiKey`] that never prints itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backdrop::catalog::{CatalogSpec, LocalImages};
use backdrop::domain::{ApiKey, ProviderKind, Rate};
use backdrop::money::{self, PriceTable};
use backdrop::pipeline::backoff::{PollSchedule, RetryPolicy};
use backdrop::plan::PlanInput;
use backdrop::prompt::{PromptError, Template};
use backdrop::provider::fal::FalOptions;
use backdrop::provider::http::InlinePolicy;
use backdrop::provider::seedance::SeedanceOptions;

use crate::cli::RunArgs;

/// Default jobs in flight.
pub(crate) const DEFAULT_CONCURRENCY: u32 = 5;
/// Default request rate.
pub(crate) const DEFAULT_RATE: &str = "10/s";
/// Default submissions per row.
pub(crate) const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default output folder.
pub(crate) const DEFAULT_OUT: &str = "out";
/// Default output file name template.
pub(crate) use backdrop::fetch::DEFAULT_OUTPUT_NAME;
/// Default first poll delay.
pub(crate) const DEFAULT_POLL_INITIAL: Duration = Duration::from_millis(250);
/// Default longest poll interval.
pub(crate) const DEFAULT_POLL_MAX: Duration = Duration::from_secs(5);
/// Default first retry delay.
pub(crate) const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(1);
/// Default longest retry delay (and cap on Retry-After).
pub(crate) const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);
/// Default time limit of one HTTP request.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Default cap on one output file.
pub(crate) const DEFAULT_MAX_DOWNLOAD_BYTES: u64 = 50_000_000;
/// Default cap on a local image sent inline.
pub(crate) const DEFAULT_INLINE_MAX_BYTES: u64 = 4_000_000;

/// Errors in flags or the config file. All of them mean: nothing was sent (exit 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key (the message names key and line).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A setting has a value backdrop cannot use.
    #[error("invalid {name}: {message}")]
    Invalid {
        /// The flag or key.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// An amount of money (a cap, a threshold, a price) is NaN, infinite or negative.
    #[error(transparent)]
    Money(money::MoneyError),
    /// A cap is set but the model's price is unknown, so the cap could not be held.
    #[error(
        "the price of model {model:?} is unknown, so the cap (--max-credits / --max-cost) cannot be held; \
         nothing was sent. Add its price per image, in {unit}, to the config file and pass it with \
         --config FILE:\n\n[prices]\n{model:?} = {example}\n"
    )]
    UnpricedModel {
        /// The model.
        model: String,
        /// `credits` or `dollars`.
        unit: &'static str,
        /// An example price in that unit.
        example: &'static str,
    },
    /// A required setting is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// The catalog or the prompt template cannot be read.
    #[error("cannot read {what} {path}: {reason}")]
    Unreadable {
        /// `catalog` or `prompt template`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why, in the OS's words (kept as text: it is the whole message, not a cause to chain).
        reason: String,
    },
    /// The provider's API key is not in the environment.
    #[error("{var} is not set: export your {provider} API key (or use --simulate or --dry-run)")]
    MissingKey {
        /// The variable name.
        var: &'static str,
        /// The provider.
        provider: &'static str,
    },
}

/// Everything `backdrop run` needs, validated, with defaults applied.
#[derive(Debug, Clone)]
#[expect(clippy::struct_excessive_bools, reason = "each bool is an independent user flag")]
pub(crate) struct Settings {
    /// The catalog file or database.
    pub(crate) catalog: PathBuf,
    /// Table to read from a SQLite catalog.
    pub(crate) table: Option<String>,
    /// Query to read from a SQLite catalog.
    pub(crate) query: Option<String>,
    /// The prompt template file.
    pub(crate) prompt: PathBuf,
    /// The state database.
    pub(crate) state: PathBuf,
    /// The output folder.
    pub(crate) out: PathBuf,
    /// `--out s3://bucket/prefix` (or `gs://`, `az://`): outputs become objects there, and `out`
    /// is the local staging folder downloads pass through.
    pub(crate) out_object: Option<String>,
    /// The output file name template.
    pub(crate) output_name: String,
    /// Which protocol to speak.
    pub(crate) provider: ProviderKind,
    /// Base URL override; `None` means the provider's public endpoint (or the simulator's).
    pub(crate) api_base: Option<String>,
    /// `--fal-rest-base`: where fal uploads go; `None` means `api_base`, else fal's own.
    pub(crate) fal_rest_base: Option<String>,
    /// Model override.
    pub(crate) model: Option<String>,
    /// Jobs in flight at once.
    pub(crate) concurrency: u32,
    /// Shared request rate.
    pub(crate) rate: Rate,
    /// Submissions per row.
    pub(crate) max_attempts: u32,
    /// How long nothing but 429s may come before the run stops.
    pub(crate) patience: Duration,
    /// Status polls per row, on average, the learned poll plan may spend.
    pub(crate) polls_per_row: f64,
    /// The tighter of `--max-credits` and `--max-cost`, in the provider's unit: what this run
    /// may spend.
    pub(crate) spending_cap: Option<f64>,
    /// Low-balance warning threshold.
    pub(crate) low_credit_warning: Option<f64>,
    /// Row limit for this run.
    pub(crate) limit: Option<u64>,
    /// Plan and price only.
    pub(crate) dry_run: bool,
    /// Re-run done rows.
    pub(crate) force: bool,
    /// Process the valid rows of a bad catalog.
    pub(crate) skip_invalid: bool,
    /// Share identical requests and reuse identical results (not `--no-reuse`).
    pub(crate) reuse: bool,
    /// Compare each output with its input before done (not `--no-quality-gate`).
    pub(crate) quality_gate: bool,
    /// Check input images before paying (not `--no-check-inputs`).
    pub(crate) check_inputs: bool,
    /// Input checks at once.
    pub(crate) input_checks: usize,
    /// How long a passed input check stands.
    pub(crate) input_check_ttl: Duration,
    /// Use the in-process simulator.
    pub(crate) simulate: bool,
    /// Send local images as data URIs.
    pub(crate) inline_local_images: bool,
    /// Cap on inline images.
    pub(crate) inline_max_bytes: u64,
    /// Seedance synchronous edits.
    pub(crate) sync: bool,
    /// First poll delay.
    pub(crate) poll_initial: Duration,
    /// Longest poll interval.
    pub(crate) poll_max: Duration,
    /// First retry delay.
    pub(crate) retry_base: Duration,
    /// Longest retry delay and Retry-After cap.
    pub(crate) retry_max: Duration,
    /// One HTTP request's time limit.
    pub(crate) request_timeout: Duration,
    /// Cap on one output file.
    pub(crate) max_download_bytes: u64,
    /// Webhook receiver address.
    pub(crate) webhook_listen: Option<SocketAddr>,
    /// Public webhook URL.
    pub(crate) webhook_url: Option<String>,
    /// JWKS URL for fal webhook signatures.
    pub(crate) jwks_url: Option<String>,
    /// Where to write the run summary.
    pub(crate) summary_json: Option<PathBuf>,
    /// Simulator scenario for --simulate.
    pub(crate) sim_scenario: Option<PathBuf>,
    /// Hide the progress bar.
    pub(crate) no_progress: bool,
    /// Price overrides per model.
    pub(crate) prices: BTreeMap<String, f64>,
}

/// Reads a config file into the same shape as the flags.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`] (unknown keys name the key and line).
pub(crate) fn load_file(path: &Path) -> Result<RunArgs, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<RunArgs, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: describe_toml_error(text, &e) })
}

fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_owned();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

/// Layers flags (and their env variables, which clap already applied) over the config file:
/// a flag given on the command line wins; an unset flag takes the file's value.
///
/// # Errors
/// Never in practice: both sides are the same serde shape.
pub(crate) fn merge(flags: RunArgs, file: RunArgs) -> Result<RunArgs, ConfigError> {
    // Checked before the layers meet: the merge goes through JSON, where NaN and the infinities
    // have no spelling and would silently become "not set", i.e. no cap at all.
    check_amounts(&flags)?;
    check_amounts(&file)?;
    let invalid = |e: serde_json::Error| ConfigError::Invalid { name: "config", message: e.to_string() };
    let mut merged = serde_json::to_value(file).map_err(invalid)?;
    let flags = serde_json::to_value(flags).map_err(invalid)?;
    if let (Some(merged), serde_json::Value::Object(flags)) = (merged.as_object_mut(), flags) {
        for (key, value) in flags {
            // `false` is how clap says "switch not given": it must not erase a `true` in the file.
            if !(value.is_null() || value == serde_json::Value::Bool(false)) {
                merged.insert(key, value);
            }
        }
    }
    serde_json::from_value(merged).map_err(invalid)
}

/// Every amount of money in one layer of settings (caps, the low-balance threshold, `[prices]`)
/// must be finite and ≥ 0.
fn check_amounts(args: &RunArgs) -> Result<(), ConfigError> {
    let invalid = |e: money::MoneyError| ConfigError::Money(e);
    for (name, v) in [
        ("--max-credits", args.max_credits),
        ("--max-cost", args.max_cost),
        ("--low-credit-warning", args.low_credit_warning),
    ] {
        if let Some(v) = v {
            money::amount(name, v).map_err(invalid)?;
        }
    }
    for (model, price) in args.prices.iter().flatten() {
        money::amount(&format!("[prices] {model:?}"), *price).map_err(invalid)?;
    }
    Ok(())
}

fn duration(name: &'static str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v.trim())
            .map_err(|e| ConfigError::Invalid { name, message: format!("{v:?}: {e}") }),
    }
}

/// `--polls-per-row`: a finite number of at least 1.
fn polls_per_row(value: Option<f64>) -> Result<f64, ConfigError> {
    let v = value.unwrap_or(backdrop::pipeline::polling::DEFAULT_POLLS_PER_ROW);
    if v.is_finite() && (1.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::Invalid { name: "--polls-per-row", message: format!("{v} is outside 1..=100") })
    }
}

impl Settings {
    /// Applies defaults and checks every value.
    ///
    /// # Errors
    /// [`ConfigError::Missing`] without a catalog or prompt, [`ConfigError::Invalid`] for a value
    /// out of range.
    pub(crate) fn resolve(args: RunArgs) -> Result<Self, ConfigError> {
        check_amounts(&args)?;
        let catalog = args.catalog.ok_or(ConfigError::Missing("CATALOG (the catalog file)"))?;
        let prompt = args.prompt.ok_or(ConfigError::Missing("--prompt FILE"))?;
        let concurrency = args.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 || concurrency > 1000 {
            return Err(ConfigError::Invalid {
                name: "--concurrency",
                message: format!("{concurrency} is outside 1..=1000"),
            });
        }
        let rate = args
            .rate
            .as_deref()
            .unwrap_or(DEFAULT_RATE)
            .parse::<Rate>()
            .map_err(|message| ConfigError::Invalid { name: "--rate", message })?;
        let max_attempts = args.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 {
            return Err(ConfigError::Invalid {
                name: "--max-attempts",
                message: "must be at least 1".into(),
            });
        }
        let provider = args.provider.unwrap_or_default();
        let spending_cap =
            money::cap(provider, args.max_credits, args.max_cost).map_err(ConfigError::Money)?;
        let webhook_listen = args
            .webhook_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                    name: "--webhook-listen",
                    message: format!("{a:?}: {e}"),
                })
            })
            .transpose()?;
        if webhook_listen.is_some() != args.webhook_url.is_some() {
            return Err(ConfigError::Invalid {
                name: "--webhook-url",
                message: "--webhook-listen and --webhook-url go together".into(),
            });
        }
        for (name, v) in [
            ("--api-base", &args.api_base),
            ("--webhook-url", &args.webhook_url),
            ("--fal-rest-base", &args.fal_rest_base),
        ] {
            if let Some(v) = v {
                url::Url::parse(v)
                    .map_err(|e| ConfigError::Invalid { name, message: format!("{v:?}: {e}") })?;
            }
        }
        let state = args.state.clone().unwrap_or_else(|| PathBuf::from(backdrop::store::DEFAULT_STATE));
        let (out_dir, out_object) = match args.out.clone() {
            Some(out) if backdrop::fetch::object::is_object_url(&out.to_string_lossy()) => {
                // Downloads are staged beside the state file, then put as objects.
                let staging = state.parent().unwrap_or(Path::new(".")).join("backdrop-staging");
                (staging, Some(out.to_string_lossy().into_owned()))
            }
            out => (out.unwrap_or_else(|| PathBuf::from(DEFAULT_OUT)), None),
        };
        let output_name = args.output_name.unwrap_or_else(|| DEFAULT_OUTPUT_NAME.to_owned());
        if !output_name.contains("{sku}") || !output_name.contains("{index}") {
            return Err(ConfigError::Invalid {
                name: "--output-name",
                message: "must contain {sku} and {index} so no two outputs share a file".into(),
            });
        }
        Ok(Self {
            catalog,
            table: args.table,
            query: args.query,
            prompt,
            state: args.state.unwrap_or_else(|| PathBuf::from(backdrop::store::DEFAULT_STATE)),
            out: out_dir,
            out_object,
            output_name,
            provider,
            api_base: args.api_base,
            fal_rest_base: args.fal_rest_base,
            model: args.model,
            concurrency,
            rate,
            max_attempts,
            patience: duration(
                "--patience",
                args.patience.as_deref(),
                backdrop::pipeline::scheduler::DEFAULT_PATIENCE,
            )?,
            polls_per_row: polls_per_row(args.polls_per_row)?,
            spending_cap,
            low_credit_warning: args.low_credit_warning,
            limit: args.limit,
            dry_run: args.dry_run,
            force: args.force,
            skip_invalid: args.skip_invalid,
            check_inputs: !args.no_check_inputs,
            reuse: !args.no_reuse,
            quality_gate: !args.no_quality_gate,
            input_checks: match args.input_checks {
                Some(0) => {
                    return Err(ConfigError::Invalid {
                        name: "--input-checks",
                        message: "must be at least 1".into(),
                    });
                }
                Some(n) => n,
                None => backdrop::preflight::DEFAULT_CONCURRENCY,
            },
            input_check_ttl: duration(
                "--input-check-ttl",
                args.input_check_ttl.as_deref(),
                backdrop::preflight::DEFAULT_TTL,
            )?,
            simulate: args.simulate,
            inline_local_images: args.inline_local_images || args.simulate,
            inline_max_bytes: args.inline_max_bytes.unwrap_or(DEFAULT_INLINE_MAX_BYTES),
            sync: args.sync,
            poll_initial: duration("--poll-initial", args.poll_initial.as_deref(), DEFAULT_POLL_INITIAL)?,
            poll_max: duration("--poll-max", args.poll_max.as_deref(), DEFAULT_POLL_MAX)?,
            retry_base: duration("--retry-base", args.retry_base.as_deref(), DEFAULT_RETRY_BASE)?,
            retry_max: duration("--retry-max", args.retry_max.as_deref(), DEFAULT_RETRY_MAX)?,
            request_timeout: duration(
                "--request-timeout",
                args.request_timeout.as_deref(),
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            max_download_bytes: args.max_download_bytes.unwrap_or(DEFAULT_MAX_DOWNLOAD_BYTES),
            webhook_listen,
            webhook_url: args.webhook_url,
            jwks_url: args.jwks_url,
            summary_json: args.summary_json,
            sim_scenario: args.sim_scenario,
            no_progress: args.no_progress,
            prices: args.prices.unwrap_or_default(),
        })
    }
}

/// What each library part needs, cut from [`Settings`]: the library never sees the whole
/// config, only the options it owns.
impl Settings {
    /// Checks that the catalog and the prompt template can be opened. Runs before the key is
    /// looked up, so a mistyped path is reported even when the key is missing too; the planner
    /// reads both files properly later.
    ///
    /// # Errors
    /// [`ConfigError::Unreadable`] naming the first file that cannot be read.
    pub(crate) fn check_files(&self) -> Result<(), ConfigError> {
        for (what, path) in [("catalog", &self.catalog), ("prompt template", &self.prompt)] {
            let unreadable = |reason: String| ConfigError::Unreadable { what, path: path.clone(), reason };
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => return Err(unreadable("it is a folder, not a file".into())),
                // The template is read once; the catalog twice (the input check, then the plan),
                // and its reader seeks, so a pipe would fail half-way with "Illegal seek".
                Ok(meta) if what == "catalog" && !meta.is_file() => {
                    return Err(unreadable(
                        "it is a pipe or a device, not a file: the catalog is read more than once \
                         (the input check, then the plan), so save it to a file first"
                            .into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(unreadable(e.to_string())),
            }
        }
        Ok(())
    }

    /// The provider's key from the environment.
    ///
    /// # Errors
    /// [`ConfigError::MissingKey`] when the variable is unset or blank.
    pub(crate) fn api_key(&self) -> Result<ApiKey, ConfigError> {
        ApiKey::from_env(self.provider).ok_or(ConfigError::MissingKey {
            var: self.provider.key_env_var(),
            provider: self.provider.as_str(),
        })
    }

    /// The price table: built-in prices with the config's `[prices]` on top.
    #[must_use]
    pub(crate) fn price_table(&self) -> PriceTable {
        PriceTable::new(self.provider, &self.prices)
    }

    /// What the planner needs, with the template read: the one read of the file a run makes
    /// (the plan, the quality gate and the exports all use this copy).
    ///
    /// # Errors
    /// [`PromptError`] when the template cannot be read or is invalid, with its line.
    pub(crate) fn plan_input(&self) -> Result<PlanInput, PromptError> {
        Ok(PlanInput {
            catalog: CatalogSpec {
                path: self.catalog.clone(),
                table: self.table.clone(),
                query: self.query.clone(),
            },
            template: Template::load(&self.prompt)?,
            provider: self.provider,
            model: self.model.clone(),
            force: self.force,
            skip_invalid: self.skip_invalid,
            limit: self.limit,
            price_overrides: self.prices.clone(),
            // Checked at plan time, so a catalog of local files without the flag is refused
            // before anything is sent, not row by row at the provider's rate.
            // fal uploads local files to its storage; seedance takes them only inline.
            local_images: match (self.provider, self.inline_local_images) {
                (ProviderKind::Fal, _) => {
                    LocalImages::Uploaded { max_bytes: backdrop::provider::fal::upload::MAX_UPLOAD_BYTES }
                }
                (ProviderKind::Seedance, true) => LocalImages::Inline { max_bytes: self.inline_max_bytes },
                (ProviderKind::Seedance, false) => LocalImages::Refused,
            },
            refused_inputs: std::sync::Arc::default(),
            input_validators: std::sync::Arc::default(),
            reuse: self.reuse,
        })
    }

    /// What the input preflight needs.
    #[must_use]
    pub(crate) fn preflight_options(&self) -> backdrop::preflight::PreflightOptions {
        backdrop::preflight::PreflightOptions {
            concurrency: self.input_checks,
            ttl: self.input_check_ttl,
            ..backdrop::preflight::PreflightOptions::default()
        }
    }

    /// `--inline-local-images` and `--inline-max-bytes`.
    #[must_use]
    pub(crate) const fn inline_policy(&self) -> InlinePolicy {
        InlinePolicy { allowed: self.inline_local_images, max_bytes: self.inline_max_bytes }
    }

    /// The seedance client's options (`--sync`, `--webhook-url`, local images).
    #[must_use]
    pub(crate) fn seedance_options(&self) -> SeedanceOptions {
        SeedanceOptions {
            sync: self.sync,
            webhook_url: self.webhook_url.clone(),
            inline: self.inline_policy(),
        }
    }

    /// The fal client's options (`--webhook-url`, local images).
    #[must_use]
    pub(crate) fn fal_options(&self) -> FalOptions {
        FalOptions { webhook_url: self.webhook_url.clone(), inline: self.inline_policy() }
    }

    /// Submit retries (`--max-attempts`, `--retry-base`, `--retry-max`).
    #[must_use]
    pub(crate) const fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy { max_attempts: self.max_attempts, base: self.retry_base, cap: self.retry_max }
    }

    /// Poll cadence (`--poll-initial`, `--poll-max`).
    #[must_use]
    pub(crate) const fn poll_schedule(&self) -> PollSchedule {
        PollSchedule { initial: self.poll_initial, max: self.poll_max }
    }

    /// With a cap, every submit must have a price: an unknown one would count as free and let
    /// the run spend past its cap.
    ///
    /// # Errors
    /// [`ConfigError::UnpricedModel`] when a cap is set and `unit_price` (of `model`) is unknown.
    pub(crate) fn check_priced(&self, model: &str, unit_price: Option<f64>) -> Result<(), ConfigError> {
        if self.spending_cap.is_none() || unit_price.is_some() {
            return Ok(());
        }
        let (unit, example) = match money::Unit::of(self.provider) {
            money::Unit::Credits => ("credits", "8"),
            money::Unit::Dollars => ("dollars", "0.04"),
        };
        Err(ConfigError::UnpricedModel { model: model.to_owned(), unit, example })
    }

    /// The cap on this run's spend, in the provider's unit.
    #[must_use]
    pub(crate) const fn spending_cap(&self) -> Option<f64> {
        self.spending_cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!("10/s".parse::<Rate>().unwrap(), Rate { count: 10, period: Duration::from_secs(1) });
        assert_eq!("600/m".parse::<Rate>().unwrap().period, Duration::from_secs(60));
        assert_eq!("7".parse::<Rate>().unwrap().count, 7);
        assert!("0/s".parse::<Rate>().is_err());
        assert!("ten/s".parse::<Rate>().is_err());
        assert!("5/fortnight".parse::<Rate>().is_err());
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let file = parse_file(
            Path::new("b.toml"),
            "concurrency = 9\nrate = \"3/s\"\ndry-run = true\nout = \"file-out\"\n",
        )
        .unwrap();
        let flags = RunArgs {
            concurrency: Some(2),
            catalog: Some("c.csv".into()),
            prompt: Some("p.txt".into()),
            ..RunArgs::default()
        };
        let s = Settings::resolve(merge(flags, file).unwrap()).unwrap();
        assert_eq!(s.concurrency, 2, "flag wins");
        assert_eq!(s.rate.count, 3, "file fills what flags leave unset");
        assert!(s.dry_run, "an unset switch keeps the file's true");
        assert_eq!(s.out, PathBuf::from("file-out"));
        assert_eq!(s.max_attempts, DEFAULT_MAX_ATTEMPTS, "default last");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse_file(Path::new("b.toml"), "concurrency = 2\n\nconcurency = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("concurency"), "{msg}");
    }

    #[test]
    fn api_key_never_prints_itself() {
        let key = ApiKey::new("sk-sentinel-0123456789abcdef");
        assert!(!format!("{key:?} {key}").contains("sentinel"));
        assert_eq!(key.expose(), "sk-sentinel-0123456789abcdef");
    }

    #[test]
    fn bad_values_are_named() {
        let base =
            RunArgs { catalog: Some("c.csv".into()), prompt: Some("p.txt".into()), ..RunArgs::default() };
        let err = Settings::resolve(RunArgs { concurrency: Some(0), ..base.clone() }).unwrap_err();
        assert!(err.to_string().contains("--concurrency"));
        let err = Settings::resolve(RunArgs { poll_max: Some("soon".into()), ..base.clone() }).unwrap_err();
        assert!(err.to_string().contains("--poll-max"));
        let err = Settings::resolve(RunArgs { output_name: Some("{sku}.png".into()), ..base }).unwrap_err();
        assert!(err.to_string().contains("--output-name"));
    }

    #[test]
    fn caps_of_nan_infinity_or_below_zero_are_refused_from_flags_and_file() {
        let base =
            RunArgs { catalog: Some("c.csv".into()), prompt: Some("p.txt".into()), ..RunArgs::default() };
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -5.0] {
            let flags = RunArgs { max_credits: Some(bad), ..base.clone() };
            let err = merge(flags, RunArgs::default()).unwrap_err();
            assert!(err.to_string().contains("--max-credits"), "{bad}: {err}");
            let flags = RunArgs { max_cost: Some(bad), ..base.clone() };
            assert!(Settings::resolve(flags).is_err(), "{bad} refused without a merge too");
        }
        // TOML spells them `nan`, `inf` and `-inf`: the file is checked before the merge, where
        // JSON would turn them into "not set".
        for text in ["max-credits = nan\n", "max-cost = inf\n", "max-cost = -inf\n", "max-credits = -1\n"] {
            let file = parse_file(Path::new("b.toml"), text).unwrap();
            let err = merge(base.clone(), file).unwrap_err();
            assert!(matches!(err, ConfigError::Money(_)), "{text}: {err}");
        }
        let file = parse_file(Path::new("b.toml"), "[prices]\nmy-model = nan\n").unwrap();
        assert!(merge(base.clone(), file).unwrap_err().to_string().contains("my-model"));
        let file = parse_file(Path::new("b.toml"), "low-credit-warning = -inf\n").unwrap();
        assert!(merge(base.clone(), file).is_err());
        let ok = merge(RunArgs { max_credits: Some(80.0), ..base.clone() }, RunArgs::default()).unwrap();
        assert_eq!(Settings::resolve(ok).unwrap().spending_cap(), Some(80.0));
    }
}

#[cfg(test)]
mod example_file {
    use clap::CommandFactory;

    /// The shipped example, with its commented settings switched on.
    fn uncommented() -> String {
        let text = include_str!("../backdrop.example.toml");
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") || rest.starts_with('[') || rest.starts_with('"') => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_example_config_parses_with_every_setting_on() {
        let args = super::parse_file(std::path::Path::new("backdrop.example.toml"), &uncommented()).unwrap();
        assert_eq!(args.concurrency, Some(5));
        assert!(args.prices.is_some_and(|p| p.len() == 2));
    }

    #[test]
    fn the_example_config_has_a_key_for_every_run_flag() {
        let text = uncommented();
        let cli = crate::cli::Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let mut missing = Vec::new();
        for arg in run.get_arguments() {
            let Some(long) = arg
                .get_long()
                .map(str::to_owned)
                .or_else(|| arg.is_positional().then(|| arg.get_id().as_str().to_owned()))
            else {
                continue;
            };
            if ["config", "verbose", "quiet", "log-format", "help"].contains(&long.as_str()) {
                continue;
            }
            if !text.lines().any(|l| l.starts_with(&format!("{long} = "))) {
                missing.push(long);
            }
        }
        assert!(missing.is_empty(), "backdrop.example.toml lacks {missing:?}");
    }

    /// `--help` shows the defaults `Settings::resolve` applies (the two would drift apart
    /// otherwise: clap's `[default: …]` for these is only text).
    #[test]
    fn defaults_of_state_and_out_are_shown_and_true() {
        let mut cli = crate::cli::Cli::command();
        cli.build();
        let run =
            cli.find_subcommand_mut("run").map(|c| c.render_long_help().to_string()).unwrap_or_default();
        assert!(run.contains(&format!("[default: {}]", backdrop::store::DEFAULT_STATE)), "{run}");
        assert!(run.contains(&format!("[default: {}]", super::DEFAULT_OUT)), "{run}");
    }
}
