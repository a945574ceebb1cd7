//! The flags of `backdrop sim` and how they become a [`SimConfig`]: a scenario TOML file
//! (`--scenario`, the same keys as [`SimConfig`]) first, then every flag given on top of it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::faults::{Burst, Latency, LatencyTail, LimitChange, RetryAfterFormat, ScriptStep};
use super::{SimConfig, SimError};

/// A scenario file's contents: the same shape as [`SimConfig`].
pub type Scenario = SimConfig;

/// Flags of `backdrop sim`. Every fault is off unless a flag or the scenario turns it on.
#[derive(Debug, Clone, Args)]
#[command(after_help = SIM_EXAMPLES, after_long_help = SIM_LONG_HELP)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Scenario file (TOML; `--help` lists its keys). Flags given here override its values.
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Seed of every random decision, so a failing run can be replayed [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Starting seedance credits [default: 1e9].
    #[arg(long)]
    pub credits: Option<f64>,
    /// Starting fal balance in dollars [default: 1e9].
    #[arg(long, value_name = "USD")]
    pub fal_balance: Option<f64>,
    /// Longest side of output images, in pixels [default: 256].
    #[arg(long, value_name = "PX")]
    pub max_side: Option<u32>,
    /// Generation time: 0, fixed:200ms, uniform:100ms..2s, normal:MEAN,SD (e.g. normal:250ms,5%),
    /// lognormal:MEDIAN,P99 (e.g. lognormal:5s,15s) or lognormal:MEDIAN,sigma=S.
    #[arg(long, value_name = "SPEC")]
    pub latency: Option<String>,
    /// Accepted submits per second; more get 429 with Retry-After.
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
    /// How Retry-After is written.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub retry_after: Option<RetryAfterFormat>,
    /// Probability that a submit gets a 5xx (nothing charged).
    #[arg(long, value_name = "P")]
    pub error_rate: Option<f64>,
    /// Probability that a status poll gets a 5xx.
    #[arg(long, value_name = "P")]
    pub poll_error_rate: Option<f64>,
    /// Probability that a submit is accepted and charged, then its connection dropped unanswered.
    #[arg(long, value_name = "P")]
    pub drop_rate: Option<f64>,
    /// Probability that a submit is charged, then answered by a gateway: 502 with an HTML page.
    #[arg(long, value_name = "P")]
    pub gateway_error_rate: Option<f64>,
    /// Probability that a status poll is answered with an oversized JSON body.
    #[arg(long, value_name = "P")]
    pub oversized_rate: Option<f64>,
    /// Size of an oversized body in bytes [default: 64 MiB].
    #[arg(long, value_name = "N")]
    pub oversized_bytes: Option<u64>,
    /// Probability that a generation lists more images than were asked for.
    #[arg(long, value_name = "P")]
    pub extra_outputs_rate: Option<f64>,
    /// How many extra images such a generation lists [default: 3].
    #[arg(long, value_name = "N")]
    pub extra_outputs: Option<u32>,
    /// Probability that a download is redirected (on the simulator's own address) before the image.
    #[arg(long, value_name = "P")]
    pub redirect_rate: Option<f64>,
    /// Redirects before the image [default: 2].
    #[arg(long, value_name = "N")]
    pub redirect_hops: Option<u32>,
    /// Probability that a submit is refused with a message echoing the API key (cut, upper-cased,
    /// percent-encoded).
    #[arg(long, value_name = "P")]
    pub key_echo_rate: Option<f64>,
    /// Probability that an accepted asynchronous submit answers with the request id "..".
    #[arg(long, value_name = "P")]
    pub bad_request_id_rate: Option<f64>,
    /// Probability that a generation fails (prompts containing "[sim:fail]" always do).
    #[arg(long, value_name = "P")]
    pub failure_rate: Option<f64>,
    /// Probability that a download stops half-way (Content-Length promises more).
    #[arg(long, value_name = "P")]
    pub truncate_rate: Option<f64>,
    /// Probability that a download is throttled to --slow-bytes-per-sec.
    #[arg(long, value_name = "P")]
    pub slow_rate: Option<f64>,
    /// Throughput of a throttled download.
    #[arg(long, value_name = "N")]
    pub slow_bytes_per_sec: Option<u64>,
    /// Probability that a download answers an HTML page instead of the image.
    #[arg(long, value_name = "P")]
    pub wrong_content_type_rate: Option<f64>,
    /// Output URLs expire this long after the result is ready (then 403), e.g. 30s.
    #[arg(long, value_name = "DURATION")]
    pub url_ttl: Option<String>,
    /// Webhooks leave this long after the result is ready, e.g. 2s.
    #[arg(long, value_name = "DURATION")]
    pub webhook_delay: Option<String>,
    /// Probability that a webhook is delivered twice.
    #[arg(long, value_name = "P")]
    pub webhook_duplicate_rate: Option<f64>,
    /// Probability that a webhook is never delivered.
    #[arg(long, value_name = "P")]
    pub webhook_drop_rate: Option<f64>,
    /// Scripted answers to the first submits, in order: 429x3:1 (three 429s with Retry-After: 1),
    /// 503x2, dropx1 (charge then drop the connection), okx5 (let five through). Repeatable.
    #[arg(long, value_name = "STEP")]
    pub script: Vec<String>,
    /// A window of errors: AFTER+DURATION[:STATUS[:no-retry-after]], e.g. 10s+30s:503 (the 30 s
    /// after the first 10 are all 503); a 429 burst says `Retry-After: 1` unless told
    /// `no-retry-after`. Repeatable.
    #[arg(long, value_name = "WINDOW")]
    pub burst: Vec<String>,
    /// Stragglers: RATExFACTOR, e.g. 2%x5 (2% of generations take five times longer).
    #[arg(long, value_name = "TAIL")]
    pub latency_tail: Option<String>,
    /// Rate-limit 429s carry no Retry-After.
    #[arg(long)]
    pub rate_limit_no_retry_after: bool,
    /// Generations in flight at once; more get 429 "too many in flight" without Retry-After.
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<u32>,
    /// fal account concurrency: fal requests running at once; later ones wait IN_QUEUE.
    #[arg(long, value_name = "N")]
    pub fal_concurrency: Option<u32>,
    /// A change of limits during the run: at=10s,rate=4 or submits=200,in-flight=8 (keys: at,
    /// submits, rate, in-flight, fal-concurrency; 0 lifts a limit). Repeatable.
    #[arg(long, value_name = "CHANGE")]
    pub limit_change: Vec<String>,
}

/// The scenario file format and the simulator-only endpoints (a macro, so that the long help
/// can put the examples after it at compile time).
macro_rules! scenario_help {
    () => {
        "\
Scenario file (--scenario FILE), every key optional:
  seed = 7
  credits = 1000.0
  fal_balance = 5.0
  max_side = 256
  [faults]
  latency = { kind = \"lognormal\", median_ms = 200, p99_ms = 2000 }   # or fixed/uniform
  rate_limit_per_sec = 20
  retry_after_format = \"seconds\"      # or \"http-date\"
  error_rate = 0.05                    # also: poll_error_rate, drop_rate, failure_rate,
  truncate_rate = 0.02                 #   slow_rate + slow_bytes_per_sec,
  url_ttl_secs = 60.0                  #   wrong_content_type_rate, webhook_delay_ms,
  webhook_duplicate_rate = 0.1         #   webhook_drop_rate, gateway_error_rate,
  oversized_rate = 0.01                #   oversized_bytes, extra_outputs_rate + extra_outputs,
  redirect_rate = 0.1                  #   redirect_hops, key_echo_rate, bad_request_id_rate
  # fal storage (uploads of local files):
  upload_error_rate = 0.1              # uploads answered 503
  upload_delay_ms = 500                # slow uploads
  storage_token_ttl_secs = 5.0         # tokens die early: the upload gets a 401
  storage_v3_unavailable = true        # no CDN v3 token endpoint: the initiate flow only
  [[faults.script]]
  count = 3
  status = 429
  retry_after_secs = 1
  [[faults.bursts]]
  after_secs = 10.0
  duration_secs = 30.0
  status = 503
  no_retry_after = false               # a 429 burst's answers without Retry-After
  # Server limits (discovered by the client, never told to it):
  latency_tail = { rate = 0.02, factor = 5.0 }   # 2% of generations take 5x longer
  rate_limit_omits_retry_after = true  # rate-limit 429s without Retry-After
  max_in_flight = 4                    # 429 \"too many in flight\" beyond, no Retry-After
  fal_concurrency = 4                  # fal: later submits wait IN_QUEUE
  [[faults.limit_changes]]
  after_secs = 10.0                    # or after_submits = 200
  rate_limit_per_sec = 4               # also max_in_flight, fal_concurrency; 0 lifts

  [faults.alterations]                 # edits unfaithful to their input, per output:
  moved_rate = 0.05                    #   also scaled_rate, recolored_rate, reshaped_rate,
  unlabeled_rate = 0.05                #   missing_rate, off_white_rate, blank_rate,
  jitter = true                        #   cut_short_rate; jitter varies faithful edits

Simulator-only endpoints: GET /__sim/ledger, GET /__sim/stats, GET|POST /__sim/balance,
POST /__sim/keys {\"revoked\": true}, POST /__sim/burst {\"status\": 503, \"seconds\": 30},
POST /__sim/expire-urls (every output ready so far answers 410 Gone), GET /__sim/config,
GET /__sim/limits, GET /__sim/input/{name}.png, GET /__sim/alterations. fal storage:
POST /storage/auth/token, POST {base_url}/files/upload, POST /storage/upload/initiate,
PUT {upload_url}, GET /storage/files/{id}/{name}"
    };
}

/// Examples of `backdrop sim`, at the end of its help.
macro_rules! sim_examples {
    () => {
        "\
Examples:
  # Serve both APIs on the default port, no faults, until Ctrl-C:
  backdrop sim
  # Slow generations and 5% server errors:
  backdrop sim --listen 127.0.0.1:8787 --latency lognormal:2s,10s --error-rate 0.05
  # A replayable scenario file, with flags on top:
  backdrop sim --scenario storms.toml --seed 7
  # Then, from another terminal (the sample's pictures are local files):
  SEEDANCE_API_KEY=anything backdrop run sample-catalog.csv --prompt prompts/marble-counter.txt \\
      --inline-local-images --api-base http://127.0.0.1:8787"
    };
}

/// The scenario file format and the simulator-only endpoints.
pub const SCENARIO_HELP: &str = scenario_help!();

/// The end of `backdrop sim -h`: the examples.
pub const SIM_EXAMPLES: &str = sim_examples!();

/// The end of `backdrop sim --help`: the scenario file format, then the examples.
pub const SIM_LONG_HELP: &str = concat!(scenario_help!(), "\n\n", sim_examples!());

fn duration_secs(flag: &str, text: &str) -> Result<f64, SimError> {
    humantime::parse_duration(text.trim())
        .map(|d| d.as_secs_f64())
        .map_err(|e| SimError::Config(format!("{flag} {text:?}: {e}")))
}

fn parse_burst(text: &str) -> Result<Burst, SimError> {
    let bad = || {
        SimError::Config(format!(
            "--burst {text:?}: expected AFTER+DURATION[:STATUS[:no-retry-after]], e.g. 10s+30s:503 or 3s+2s:429:no-retry-after"
        ))
    };
    let mut parts = text.split(':');
    let window = parts.next().unwrap_or_default();
    let status = parts.next().map_or(Ok(503), |s| s.parse::<u16>().map_err(|_| bad()))?;
    let no_retry_after = match parts.next() {
        None => false,
        Some("no-retry-after") => true,
        Some(_) => return Err(bad()),
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    let (after, duration) = window.split_once('+').ok_or_else(bad)?;
    Ok(Burst {
        after_secs: duration_secs("--burst", after)?,
        duration_secs: duration_secs("--burst", duration)?,
        status,
        no_retry_after,
    })
}

impl SimConfig {
    /// The scenario file (if any) with every given flag on top.
    ///
    /// # Errors
    /// [`SimError::Scenario`] for an unreadable scenario, [`SimError::Config`] for a bad flag.
    pub fn from_args(args: &SimArgs) -> Result<Self, SimError> {
        let mut config = match &args.scenario {
            Some(path) => Self::from_scenario_file(path)?,
            None => Self::default(),
        };
        let f = &mut config.faults;
        if let Some(v) = args.seed {
            config.seed = v;
        }
        if let Some(v) = args.credits {
            config.credits = v;
        }
        if let Some(v) = args.fal_balance {
            config.fal_balance = v;
        }
        if let Some(v) = args.max_side {
            config.max_side = v;
        }
        if let Some(spec) = &args.latency {
            f.latency = Latency::parse(spec)?;
        }
        if args.rate_limit.is_some() {
            f.rate_limit_per_sec = args.rate_limit;
        }
        if let Some(v) = args.retry_after {
            f.retry_after_format = v;
        }
        let rates = [
            (args.error_rate, &mut f.error_rate),
            (args.poll_error_rate, &mut f.poll_error_rate),
            (args.drop_rate, &mut f.drop_rate),
            (args.gateway_error_rate, &mut f.gateway_error_rate),
            (args.oversized_rate, &mut f.oversized_rate),
            (args.extra_outputs_rate, &mut f.extra_outputs_rate),
            (args.redirect_rate, &mut f.redirect_rate),
            (args.key_echo_rate, &mut f.key_echo_rate),
            (args.bad_request_id_rate, &mut f.bad_request_id_rate),
            (args.failure_rate, &mut f.failure_rate),
            (args.truncate_rate, &mut f.truncate_rate),
            (args.slow_rate, &mut f.slow_rate),
            (args.wrong_content_type_rate, &mut f.wrong_content_type_rate),
            (args.webhook_duplicate_rate, &mut f.webhook_duplicate_rate),
            (args.webhook_drop_rate, &mut f.webhook_drop_rate),
        ];
        for (flag, field) in rates {
            if let Some(v) = flag {
                *field = v;
            }
        }
        if let Some(v) = args.slow_bytes_per_sec {
            f.slow_bytes_per_sec = v;
        }
        if args.oversized_bytes.is_some() {
            f.oversized_bytes = args.oversized_bytes;
        }
        if args.extra_outputs.is_some() {
            f.extra_outputs = args.extra_outputs;
        }
        if args.redirect_hops.is_some() {
            f.redirect_hops = args.redirect_hops;
        }
        if let Some(ttl) = &args.url_ttl {
            f.url_ttl_secs = Some(duration_secs("--url-ttl", ttl)?);
        }
        if let Some(delay) = &args.webhook_delay {
            let secs = duration_secs("--webhook-delay", delay)?;
            // Whole milliseconds are plenty for a delivery delay.
            f.webhook_delay_ms = (secs * 1000.0).round() as u64;
        }
        if !args.script.is_empty() {
            f.script = args.script.iter().map(|s| ScriptStep::parse(s)).collect::<Result<_, _>>()?;
        }
        if !args.burst.is_empty() {
            f.bursts = args.burst.iter().map(|b| parse_burst(b)).collect::<Result<_, _>>()?;
        }
        if let Some(tail) = &args.latency_tail {
            f.latency_tail = Some(LatencyTail::parse(tail)?);
        }
        if args.rate_limit_no_retry_after {
            f.rate_limit_omits_retry_after = true;
        }
        if args.max_in_flight.is_some() {
            f.max_in_flight = args.max_in_flight;
        }
        if args.fal_concurrency.is_some() {
            f.fal_concurrency = args.fal_concurrency;
        }
        if !args.limit_change.is_empty() {
            f.limit_changes =
                args.limit_change.iter().map(|c| LimitChange::parse(c)).collect::<Result<_, _>>()?;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn parse(args: &[&str]) -> Result<SimConfig, SimError> {
        let mut argv = vec!["sim"];
        argv.extend_from_slice(args);
        SimConfig::from_args(&Wrapper::parse_from(argv).sim)
    }

    #[test]
    fn defaults_have_no_faults() {
        let config = parse(&[]).unwrap();
        assert_eq!(config, SimConfig::default());
    }

    #[test]
    fn flags_override_the_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "seed = 9\ncredits = 100.0\n[faults]\nerror_rate = 0.5\nlatency = { kind = \"fixed\", ms = 20 }\n\
             [[faults.script]]\ncount = 2\nstatus = 429\nretry_after_secs = 1\n",
        )
        .unwrap();
        let config = parse(&[
            "--scenario",
            path.to_str().unwrap(),
            "--credits",
            "50",
            "--burst",
            "1s+2s:500",
            "--gateway-error-rate",
            "0.25",
            "--redirect-hops",
            "4",
        ])
        .unwrap();
        assert_eq!(config.faults.gateway_error_rate, 0.25);
        assert_eq!(config.faults.redirect_hops(), 4);
        assert_eq!(config.seed, 9);
        assert_eq!(config.credits, 50.0);
        assert_eq!(config.faults.error_rate, 0.5);
        assert_eq!(config.faults.latency, Latency::Fixed { ms: 20 });
        assert_eq!(config.faults.script[0].count, 2);
        assert_eq!(
            config.faults.bursts,
            vec![Burst { after_secs: 1.0, duration_secs: 2.0, status: 500, no_retry_after: false }]
        );
        assert!(parse_burst("3s+2s:429:no-retry-after").is_ok_and(|b| b.no_retry_after && b.status == 429));
        assert!(parse_burst("3s+2s:429:later").is_err());
    }

    #[test]
    fn bad_values_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "seed = 1\n[faults]\nerorr_rate = 0.5\n").unwrap();
        let err = SimConfig::from_scenario_file(&path).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(parse(&["--error-rate", "1.5"]).is_err());
        assert!(parse(&["--latency", "uniform:2s..1s"]).is_err());
        assert!(parse(&["--burst", "10s"]).is_err());
        assert!(parse(&["--limit-change", "rate=3"]).is_err(), "a change needs a trigger");
        assert!(parse(&["--max-in-flight", "0"]).is_err());
    }

    #[test]
    fn server_limit_flags_and_keys_agree() {
        let config = parse(&[
            "--latency",
            "lognormal:400ms,sigma=0.5",
            "--latency-tail",
            "2%x5",
            "--rate-limit",
            "8",
            "--rate-limit-no-retry-after",
            "--max-in-flight",
            "4",
            "--fal-concurrency",
            "2",
            "--limit-change",
            "at=10s,rate=4",
            "--limit-change",
            "submits=200,in-flight=0",
        ])
        .unwrap();
        let f = &config.faults;
        assert_eq!(f.latency, Latency::Lognormal { median_ms: 400, p99_ms: 1280 });
        assert_eq!(f.latency_tail, Some(LatencyTail { rate: 0.02, factor: 5.0 }));
        assert!(f.rate_limit_omits_retry_after);
        assert_eq!((f.max_in_flight, f.fal_concurrency), (Some(4), Some(2)));
        assert_eq!(f.limit_changes[0].rate_limit_per_sec, Some(4));
        assert_eq!(f.limit_changes[1].after_submits, Some(200));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        let toml = "[faults]\nlatency = { kind = \"normal\", mean_ms = 250, sd_ms = 12 }\n\
                    latency_tail = { rate = 0.02, factor = 5.0 }\nrate_limit_per_sec = 8\n\
                    rate_limit_omits_retry_after = true\nmax_in_flight = 4\nfal_concurrency = 2\n\
                    [[faults.limit_changes]]\nafter_secs = 10.0\nrate_limit_per_sec = 4\n\
                    [[faults.limit_changes]]\nafter_submits = 200\nmax_in_flight = 0\n";
        std::fs::write(&path, toml).unwrap();
        let from_file = SimConfig::from_scenario_file(&path).unwrap();
        assert_eq!(from_file.faults.latency, Latency::Normal { mean_ms: 250, sd_ms: 12 });
        assert_eq!(from_file.faults.limit_changes, f.limit_changes);
        assert_eq!(from_file.faults.max_in_flight, Some(4));
    }
}
