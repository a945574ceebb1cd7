//! Fault injection for the simulator: the declarative [`Faults`] (latency distribution, rate
//! limit, 5xx rate, bursts, scripted answers, drops, gateway pages after a charge, bad downloads,
//! redirects, oversized bodies, extra outputs, unusable ids, key echoes, webhook mishaps, and the
//! server limits a client must discover: a cap on generations in flight, fal's account queue,
//! limits that change during the run) and the seeded random source every decision draws from,
//! so a failing test can be replayed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::SimError;
use super::imagegen::{Alteration, Jitter};

/// How long a generation takes, from accept to result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Latency {
    /// Results are ready at once.
    #[default]
    Zero,
    /// Always this long.
    Fixed {
        /// Milliseconds.
        ms: u64,
    },
    /// Uniform between two bounds.
    Uniform {
        /// Shortest, in milliseconds.
        min_ms: u64,
        /// Longest, in milliseconds.
        max_ms: u64,
    },
    /// Log-normal with this median and 99th percentile (the shape real generation times have).
    Lognormal {
        /// Median, in milliseconds.
        median_ms: u64,
        /// 99th percentile, in milliseconds.
        p99_ms: u64,
    },
    /// Normal with this mean and standard deviation, never below zero.
    Normal {
        /// Mean, in milliseconds.
        mean_ms: u64,
        /// Standard deviation, in milliseconds.
        sd_ms: u64,
    },
}

/// z of the 99th percentile of the standard normal distribution.
const Z_P99: f64 = 2.326_347_874;

impl Latency {
    /// Parses `0`, `fixed:200ms`, `uniform:100ms..2s`, `normal:250ms,12ms` (mean, standard
    /// deviation; also `normal:250ms,5%`), `lognormal:200ms,2s` (median, p99) or
    /// `lognormal:400ms,sigma=0.5` (median, σ of the logarithm).
    ///
    /// # Errors
    /// [`SimError::Config`] naming what could not be read.
    pub fn parse(spec: &str) -> Result<Self, SimError> {
        let bad = |why: String| SimError::Config(format!("--latency {spec:?}: {why}"));
        let ms = |s: &str| -> Result<u64, SimError> {
            let d = humantime::parse_duration(s.trim()).map_err(|e| bad(format!("{s:?}: {e}")))?;
            u64::try_from(d.as_millis()).map_err(|e| bad(e.to_string()))
        };
        let spec_t = spec.trim();
        if spec_t == "0" || spec_t == "zero" || spec_t == "none" {
            return Ok(Self::Zero);
        }
        let (kind, rest) = spec_t.split_once(':').ok_or_else(|| bad("expected KIND:VALUES".into()))?;
        let latency = match kind {
            "fixed" => Self::Fixed { ms: ms(rest)? },
            "uniform" => {
                let (a, b) = rest.split_once("..").ok_or_else(|| bad("expected MIN..MAX".into()))?;
                Self::Uniform { min_ms: ms(a)?, max_ms: ms(b)? }
            }
            "lognormal" => {
                let (a, b) = rest
                    .split_once(',')
                    .ok_or_else(|| bad("expected MEDIAN,P99 or MEDIAN,sigma=S".into()))?;
                let median_ms = ms(a)?;
                let p99_ms = match b.trim().strip_prefix("sigma=") {
                    Some(sigma) => {
                        let sigma: f64 = sigma.parse().map_err(|_| bad(format!("sigma {sigma:?}")))?;
                        if !(0.0..=5.0).contains(&sigma) {
                            return Err(bad(format!("sigma {sigma} is outside 0..=5")));
                        }
                        // Whole milliseconds: the p99 form is what the scenario file stores.
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        let p99 = (median_ms as f64 * (Z_P99 * sigma).exp()).round() as u64;
                        p99
                    }
                    None => ms(b)?,
                };
                Self::Lognormal { median_ms, p99_ms }
            }
            "normal" => {
                let (a, b) =
                    rest.split_once(',').ok_or_else(|| bad("expected MEAN,SD or MEAN,PERCENT%".into()))?;
                let mean_ms = ms(a)?;
                let sd_ms = match b.trim().strip_suffix('%') {
                    Some(pct) => {
                        let pct: f64 = pct.parse().map_err(|_| bad(format!("percentage {pct:?}")))?;
                        if !(0.0..=100.0).contains(&pct) {
                            return Err(bad(format!("{pct}% is outside 0..=100")));
                        }
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        let sd = (mean_ms as f64 * pct / 100.0).round() as u64;
                        sd
                    }
                    None => ms(b)?,
                };
                Self::Normal { mean_ms, sd_ms }
            }
            other => return Err(bad(format!("unknown kind {other:?} (fixed, uniform, normal, lognormal)"))),
        };
        latency.validate()?;
        Ok(latency)
    }

    /// Checks the bounds are ordered.
    ///
    /// # Errors
    /// [`SimError::Config`] when a minimum exceeds its maximum.
    pub fn validate(&self) -> Result<(), SimError> {
        match *self {
            Self::Uniform { min_ms, max_ms } if min_ms > max_ms => {
                Err(SimError::Config(format!("latency: min {min_ms}ms > max {max_ms}ms")))
            }
            Self::Lognormal { median_ms, p99_ms } if median_ms == 0 || p99_ms < median_ms => {
                Err(SimError::Config(format!("latency: need 0 < median ({median_ms}ms) <= p99 ({p99_ms}ms)")))
            }
            _ => Ok(()),
        }
    }

    /// Draws one generation time.
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        match *self {
            Self::Zero => Duration::ZERO,
            Self::Fixed { ms } => Duration::from_millis(ms),
            Self::Uniform { min_ms, max_ms } => Duration::from_millis(rng.random_range(min_ms..=max_ms)),
            Self::Lognormal { median_ms, p99_ms } => {
                let (median, p99) = (median_ms as f64, p99_ms as f64);
                let sigma = (p99.ln() - median.ln()) / Z_P99;
                let z = standard_normal(rng);
                // Cap the tail: a 1-in-a-billion draw must not stall a test for hours.
                let ms = (median.ln() + sigma * z).exp().min(p99 * 10.0);
                Duration::from_secs_f64(ms.max(0.0) / 1000.0)
            }
            Self::Normal { mean_ms, sd_ms } => {
                let ms = mean_ms as f64 + sd_ms as f64 * standard_normal(rng);
                Duration::from_secs_f64(ms.max(0.0) / 1000.0)
            }
        }
    }
}

/// One standard normal draw (Box-Muller, from two uniforms in (0, 1]).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// How a 429's `Retry-After` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterFormat {
    /// Delay in whole seconds (`Retry-After: 1`).
    #[default]
    Seconds,
    /// An HTTP date (`Retry-After: Sun, 22 Nov 2026 08:00:01 GMT`).
    HttpDate,
}

/// One step of a scripted sequence: the next `count` submits get this answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptStep {
    /// How many consecutive submits this step answers.
    pub count: u32,
    /// The HTTP status to answer (429, 500, 503...); `0` lets the submit through untouched.
    #[serde(default)]
    pub status: u16,
    /// `Retry-After` seconds to send with the status.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
    /// Accept and charge the submit, then drop the connection without answering.
    #[serde(default)]
    pub drop: bool,
}

impl ScriptStep {
    /// Parses `429x3:1` (status, count, optional Retry-After), `dropx2`, or `okx5`.
    ///
    /// # Errors
    /// [`SimError::Config`] naming what could not be read.
    pub fn parse(spec: &str) -> Result<Self, SimError> {
        let bad =
            |why: &str| SimError::Config(format!("--script {spec:?}: {why} (e.g. 429x3:1, dropx1, okx2)"));
        let (what, rest) = spec.trim().split_once('x').ok_or_else(|| bad("expected WHATxCOUNT"))?;
        let (count, retry) = match rest.split_once(':') {
            Some((c, r)) => (c, Some(r.parse::<u64>().map_err(|_| bad("bad Retry-After"))?)),
            None => (rest, None),
        };
        let count = count.parse::<u32>().map_err(|_| bad("bad count"))?;
        let (status, drop) = match what {
            "drop" => (0, true),
            "ok" => (0, false),
            s => (
                s.parse::<u16>().ok().filter(|s| (400..=599).contains(s)).ok_or_else(|| bad("bad status"))?,
                false,
            ),
        };
        Ok(Self { count, status, retry_after_secs: retry, drop })
    }
}

/// A window of time during which every submit gets the same error status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    /// Seconds after the simulator started.
    pub after_secs: f64,
    /// How long the burst lasts, in seconds.
    pub duration_secs: f64,
    /// The status every submit gets meanwhile [default: 503].
    #[serde(default = "default_burst_status")]
    pub status: u16,
    /// A 429 burst's answers carry no `Retry-After` (as fal's and many gateways' 429s do not);
    /// by default they say `Retry-After: 1`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_retry_after: bool,
}

const fn default_burst_status() -> u16 {
    503
}

/// Size of an oversized body when `oversized_bytes` is not set: far above any sane API answer.
pub const DEFAULT_OVERSIZED_BYTES: u64 = 64 * 1024 * 1024;
/// Extra outputs when `extra_outputs` is not set.
pub const DEFAULT_EXTRA_OUTPUTS: u32 = 3;
/// Most extra outputs a generation may get (what the field report saw: 100 for 1).
pub const MAX_EXTRA_OUTPUTS: u32 = 100;
/// Redirects before the image when `redirect_hops` is not set.
pub const DEFAULT_REDIRECT_HOPS: u32 = 2;
/// Most redirects a download may be sent through.
pub const MAX_REDIRECT_HOPS: u32 = 20;

/// Every fault the simulator can inject. All off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Generation time (async requests stay queued/in progress this long; sync calls block).
    pub latency: Latency,
    /// Accepted submits per second (both protocols together); beyond it, 429 + `Retry-After`.
    pub rate_limit_per_sec: Option<u32>,
    /// How `Retry-After` is written.
    pub retry_after_format: RetryAfterFormat,
    /// Probability that a submit is answered with a 5xx (500 seedance, 503 fal), uncharged.
    pub error_rate: f64,
    /// Probability that a status poll is answered with a 5xx.
    pub poll_error_rate: f64,
    /// Probability that a submit is accepted and charged, then its connection is dropped.
    pub drop_rate: f64,
    /// Probability that a submit is accepted and charged, then answered by a gateway in front of
    /// the API: 502 with an HTML page, none of the API's own error body or headers.
    pub gateway_error_rate: f64,
    /// Probability that a status poll is answered with a valid JSON body padded to
    /// `oversized_bytes` (streamed, without Content-Length).
    pub oversized_rate: f64,
    /// Size of an oversized body [default: 64 MiB].
    pub oversized_bytes: Option<u64>,
    /// Probability that a generation lists `extra_outputs` more images than were asked for.
    pub extra_outputs_rate: f64,
    /// How many extra images [default: 3, at most 100].
    pub extra_outputs: Option<u32>,
    /// Probability that a download is redirected `redirect_hops` times, on the simulator's own
    /// (loopback) address, before the image is served.
    pub redirect_rate: f64,
    /// Redirects before the image [default: 2, at most 20].
    pub redirect_hops: Option<u32>,
    /// Probability that a submit is refused (uncharged: 400 seedance, 422 fal) with a message that
    /// echoes the API key three ways: straddling the 500th character, upper-cased, and
    /// percent-encoded.
    pub key_echo_rate: f64,
    /// Probability that an accepted asynchronous submit answers with the request id `..` (the
    /// generation runs under its real id, which the client never learns).
    pub bad_request_id_rate: f64,
    /// Probability that an accepted generation fails (seedance `failed`, fal error result).
    pub failure_rate: f64,
    /// Probability that a download sends half its bytes (Content-Length says all), then closes.
    pub truncate_rate: f64,
    /// Probability that a download is throttled to `slow_bytes_per_sec`.
    pub slow_rate: f64,
    /// Throughput of a slow download.
    pub slow_bytes_per_sec: u64,
    /// Probability that a download answers 200 with an HTML page instead of the image.
    pub wrong_content_type_rate: f64,
    /// Output URLs stop working this many seconds after the result is ready (then 403).
    pub url_ttl_secs: Option<f64>,
    /// Webhooks leave this long after the result is ready.
    pub webhook_delay_ms: u64,
    /// Probability that a webhook is delivered twice.
    pub webhook_duplicate_rate: f64,
    /// Probability that a webhook is never delivered.
    pub webhook_drop_rate: f64,
    /// Scripted answers for the first submits, in order.
    pub script: Vec<ScriptStep>,
    /// Windows of all-error answers.
    pub bursts: Vec<Burst>,

    // Server limits a client has to discover (none is ever told to it), and stragglers.
    /// A share of generations that take several times their drawn latency.
    #[serde(default)]
    pub latency_tail: Option<LatencyTail>,
    /// Rate-limit 429s carry no `Retry-After` (many providers send none).
    #[serde(default)]
    pub rate_limit_omits_retry_after: bool,
    /// Generations in flight at once (accepted, outputs not yet all downloaded, as the crate
    /// docs define it); a submit beyond it gets 429 "too many in flight" without `Retry-After`.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// fal account concurrency: fal requests that run at once. Later submits are accepted and
    /// wait `IN_QUEUE` (with their `queue_position`), first in first out, until a slot frees.
    #[serde(default)]
    pub fal_concurrency: Option<u32>,
    /// Limits that change during the run, in order.
    #[serde(default)]
    pub limit_changes: Vec<LimitChange>,
    /// Edits that come back unfaithful to their input (`[faults.alterations]`).
    #[serde(default)]
    pub alterations: Alterations,

    // fal storage.
    /// Probability that a file upload (either flow) is answered 503, storing nothing.
    #[serde(default)]
    pub upload_error_rate: f64,
    /// Every file upload takes this long before it is answered (slow uploads).
    #[serde(default)]
    pub upload_delay_ms: u64,
    /// Storage tokens stop working this many seconds after they are issued, whatever their
    /// announced `expires_at` (an hour) says [default: 3600]; an upload with an expired token is
    /// answered 401.
    #[serde(default)]
    pub storage_token_ttl_secs: Option<f64>,
    /// The CDN v3 token endpoint answers 404, so clients must use the older initiate flow.
    #[serde(default)]
    pub storage_v3_unavailable: bool,
}

/// Stragglers: a share `rate` of generations take `factor` times their drawn latency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyTail {
    /// Probability that a generation is a straggler.
    pub rate: f64,
    /// How many times longer a straggler takes.
    pub factor: f64,
}

impl LatencyTail {
    /// Parses `2%x5` or `0.02x5`: 2% of generations take five times longer.
    ///
    /// # Errors
    /// [`SimError::Config`] naming what could not be read.
    pub fn parse(spec: &str) -> Result<Self, SimError> {
        let bad = |why: &str| SimError::Config(format!("--latency-tail {spec:?}: {why} (e.g. 2%x5)"));
        let (rate, factor) = spec.trim().split_once('x').ok_or_else(|| bad("expected RATExFACTOR"))?;
        let rate = match rate.strip_suffix('%') {
            Some(pct) => pct.parse::<f64>().map_err(|_| bad("bad percentage"))? / 100.0,
            None => rate.parse::<f64>().map_err(|_| bad("bad rate"))?,
        };
        let factor = factor.parse::<f64>().map_err(|_| bad("bad factor"))?;
        let tail = Self { rate, factor };
        tail.validate()?;
        Ok(tail)
    }

    fn validate(&self) -> Result<(), SimError> {
        if !(0.0..=1.0).contains(&self.rate) || !(1.0..=1000.0).contains(&self.factor) {
            return Err(SimError::Config(format!(
                "latency_tail: rate {} must be in [0, 1] and factor {} in [1, 1000]",
                self.rate, self.factor
            )));
        }
        Ok(())
    }
}

/// From a moment in the run on, some limits take new values. A change is reached `after_secs`
/// seconds after the simulator started, or once `after_submits` submit requests have arrived;
/// every reached change applies, in order, so the last one reached wins. `0` lifts a limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitChange {
    /// Seconds after the simulator started.
    #[serde(default)]
    pub after_secs: Option<f64>,
    /// Submit requests received before this one.
    #[serde(default)]
    pub after_submits: Option<u64>,
    /// New accepted submits per second (`0`: no limit).
    #[serde(default)]
    pub rate_limit_per_sec: Option<u32>,
    /// New cap on generations in flight (`0`: no cap).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// New fal account concurrency (`0`: no queue).
    #[serde(default)]
    pub fal_concurrency: Option<u32>,
}

impl LimitChange {
    /// Parses `at=10s,rate=4` or `submits=200,in-flight=8,fal-concurrency=2`: one trigger
    /// (`at` a duration, or `submits` a count) and at least one new limit.
    ///
    /// # Errors
    /// [`SimError::Config`] naming what could not be read.
    pub fn parse(spec: &str) -> Result<Self, SimError> {
        let bad = |why: String| {
            SimError::Config(format!(
                "--limit-change {spec:?}: {why} (e.g. at=10s,rate=4 or submits=200,in-flight=8)"
            ))
        };
        let mut change = Self::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) =
                part.split_once('=').ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
            let count = || value.parse::<u32>().map_err(|_| bad(format!("{key} {value:?} is not a count")));
            match key {
                "at" => {
                    let d =
                        humantime::parse_duration(value).map_err(|e| bad(format!("at {value:?}: {e}")))?;
                    change.after_secs = Some(d.as_secs_f64());
                }
                "submits" => {
                    change.after_submits =
                        Some(value.parse().map_err(|_| bad(format!("submits {value:?} is not a count")))?);
                }
                "rate" => change.rate_limit_per_sec = Some(count()?),
                "in-flight" => change.max_in_flight = Some(count()?),
                "fal-concurrency" => change.fal_concurrency = Some(count()?),
                other => {
                    return Err(bad(format!(
                        "unknown key {other:?} (at, submits, rate, in-flight, fal-concurrency)"
                    )));
                }
            }
        }
        change.validate()?;
        Ok(change)
    }

    fn validate(&self) -> Result<(), SimError> {
        let trigger = match (self.after_secs, self.after_submits) {
            (Some(secs), None) => secs.is_finite() && secs >= 0.0,
            (None, Some(_)) => true,
            _ => false,
        };
        let changes_something = self.rate_limit_per_sec.is_some()
            || self.max_in_flight.is_some()
            || self.fal_concurrency.is_some();
        if trigger && changes_something {
            Ok(())
        } else {
            Err(SimError::Config(format!(
                "limit change {self:?}: needs exactly one of after_secs (>= 0) or after_submits, and a new limit"
            )))
        }
    }
}

impl Faults {
    /// Checks the server-limit faults.
    fn validate_limits(&self) -> Result<(), SimError> {
        if let Some(tail) = &self.latency_tail {
            tail.validate()?;
        }
        if self.max_in_flight == Some(0) || self.fal_concurrency == Some(0) {
            return Err(SimError::Config("max_in_flight and fal_concurrency must be at least 1".into()));
        }
        self.limit_changes.iter().try_for_each(LimitChange::validate)
    }

    /// A generation's latency: the distribution's draw, times the tail's factor for a straggler.
    pub(crate) fn draw_latency(&self, rng: &mut StdRng) -> Duration {
        let latency = self.latency.sample(rng);
        match self.latency_tail {
            Some(tail) if chance(rng, tail.rate) => latency.mul_f64(tail.factor),
            _ => latency,
        }
    }
}

impl Faults {
    /// Checks probabilities are in [0, 1] and the latency bounds are ordered.
    ///
    /// # Errors
    /// [`SimError::Config`] naming the bad value.
    pub fn validate(&self) -> Result<(), SimError> {
        self.latency.validate()?;
        let probabilities = [
            ("error_rate", self.error_rate),
            ("poll_error_rate", self.poll_error_rate),
            ("drop_rate", self.drop_rate),
            ("gateway_error_rate", self.gateway_error_rate),
            ("oversized_rate", self.oversized_rate),
            ("extra_outputs_rate", self.extra_outputs_rate),
            ("redirect_rate", self.redirect_rate),
            ("key_echo_rate", self.key_echo_rate),
            ("bad_request_id_rate", self.bad_request_id_rate),
            ("failure_rate", self.failure_rate),
            ("truncate_rate", self.truncate_rate),
            ("slow_rate", self.slow_rate),
            ("wrong_content_type_rate", self.wrong_content_type_rate),
            ("webhook_duplicate_rate", self.webhook_duplicate_rate),
            ("webhook_drop_rate", self.webhook_drop_rate),
            ("upload_error_rate", self.upload_error_rate),
        ];
        for (name, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return Err(SimError::Config(format!("{name} = {p} is not a probability in [0, 1]")));
            }
        }
        if self.slow_rate > 0.0 && self.slow_bytes_per_sec == 0 {
            return Err(SimError::Config("slow_rate needs slow_bytes_per_sec > 0".into()));
        }
        if self.storage_token_ttl_secs.is_some_and(|s| !s.is_finite() || s < 0.0) {
            return Err(SimError::Config("storage_token_ttl_secs must be a number >= 0".into()));
        }
        if self.oversized_bytes == Some(0) {
            return Err(SimError::Config("oversized_bytes must be at least 1".into()));
        }
        if self.extra_outputs.is_some_and(|n| n == 0 || n > MAX_EXTRA_OUTPUTS) {
            return Err(SimError::Config(format!("extra_outputs must be in 1..={MAX_EXTRA_OUTPUTS}")));
        }
        if self.redirect_hops.is_some_and(|n| n == 0 || n > MAX_REDIRECT_HOPS) {
            return Err(SimError::Config(format!("redirect_hops must be in 1..={MAX_REDIRECT_HOPS}")));
        }
        if self.rate_limit_per_sec == Some(0) {
            return Err(SimError::Config("rate_limit_per_sec must be at least 1".into()));
        }
        self.alterations.validate()?;
        for b in &self.bursts {
            if !(400..=599).contains(&b.status) || b.duration_secs < 0.0 || b.after_secs < 0.0 {
                return Err(SimError::Config(format!("bad burst {b:?}")));
            }
        }
        self.validate_limits()
    }

    /// Size of an oversized body.
    #[must_use]
    pub fn oversized_bytes(&self) -> u64 {
        self.oversized_bytes.unwrap_or(DEFAULT_OVERSIZED_BYTES)
    }

    /// Extra outputs of a generation the fault hits.
    #[must_use]
    pub fn extra_outputs(&self) -> u32 {
        self.extra_outputs.unwrap_or(DEFAULT_EXTRA_OUTPUTS)
    }

    /// Redirects of a download the fault hits.
    #[must_use]
    pub fn redirect_hops(&self) -> u32 {
        self.redirect_hops.unwrap_or(DEFAULT_REDIRECT_HOPS)
    }

    /// The scripted step for the `n`th submit (0-based), if the script reaches that far.
    #[must_use]
    pub fn script_step(&self, n: u64) -> Option<&ScriptStep> {
        let mut end = 0u64;
        for step in &self.script {
            end += u64::from(step.count);
            if n < end {
                return Some(step);
            }
        }
        None
    }
}

/// Edits that come back unfaithful to their input, each kind with its own probability per output
/// (the kinds exclude each other, so the rates may add up to at most 1). Text-to-image outputs
/// are never altered: there is no input to be unfaithful to. All off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Alterations {
    /// The product is moved by 12-25 % of the frame.
    pub moved_rate: f64,
    /// The product is shrunk to 58-75 % or grown to 135-150 % of its size.
    pub scaled_rate: f64,
    /// The product's hue is turned by 70-290 degrees.
    pub recolored_rate: f64,
    /// The product has another silhouette (procedural inputs) or is squashed (uploaded inputs).
    pub reshaped_rate: f64,
    /// The product has lost its label and logo.
    pub unlabeled_rate: f64,
    /// The product is gone: only the new background is left.
    pub missing_rate: f64,
    /// An edit that asked for a pure white background gets an off-white one (other edits are
    /// not drawn for it).
    pub off_white_rate: f64,
    /// The output is one flat colour.
    pub blank_rate: f64,
    /// The bottom 15-40 % of the output is flat grey or black, as a truncated decode looks.
    pub cut_short_rate: f64,
    /// Faithful edits vary as a real model's do: relit by up to 8 % and shifted by up to 2 %
    /// of the frame.
    pub jitter: bool,
}

impl Alterations {
    fn rates(&self) -> [(&'static str, f64); 9] {
        [
            ("moved_rate", self.moved_rate),
            ("scaled_rate", self.scaled_rate),
            ("recolored_rate", self.recolored_rate),
            ("reshaped_rate", self.reshaped_rate),
            ("unlabeled_rate", self.unlabeled_rate),
            ("missing_rate", self.missing_rate),
            ("off_white_rate", self.off_white_rate),
            ("blank_rate", self.blank_rate),
            ("cut_short_rate", self.cut_short_rate),
        ]
    }

    /// True when any output may be altered or jittered.
    #[must_use]
    pub fn any(&self) -> bool {
        self.jitter || self.rates().iter().any(|(_, p)| *p > 0.0)
    }

    /// Checks each rate is a probability and that together they are at most 1.
    ///
    /// # Errors
    /// [`SimError::Config`] naming the bad rate.
    pub fn validate(&self) -> Result<(), SimError> {
        let mut sum = 0.0;
        for (name, p) in self.rates() {
            if !(0.0..=1.0).contains(&p) {
                return Err(SimError::Config(format!(
                    "alterations.{name} = {p} is not a probability in [0, 1]"
                )));
            }
            sum += p;
        }
        if sum > 1.0 + 1e-9 {
            return Err(SimError::Config(format!("alterations: the rates add up to {sum}, more than 1")));
        }
        Ok(())
    }

    /// Draws what happens to one output of an edit. `white` says whether the edit asked for a
    /// pure white background (the only kind an off-white background is a fault for). Draws
    /// nothing when every rate is 0 and jitter is off, so other faults keep their sequence.
    pub(crate) fn draw(&self, white: bool, rng: &mut impl Rng) -> (Alteration, Jitter) {
        if !self.any() {
            return (Alteration::None, Jitter::default());
        }
        let jitter = if self.jitter {
            Jitter {
                dx: rng.random_range(-20..=20),
                dy: rng.random_range(-20..=20),
                gain: rng.random_range(92..=108),
            }
        } else {
            Jitter::default()
        };
        let u: f64 = rng.random();
        let mut edge = 0.0;
        let mut kind = None;
        for (i, (_, p)) in self.rates().iter().enumerate() {
            edge += p;
            if u < edge {
                kind = Some(i);
                break;
            }
        }
        let alteration = match kind {
            Some(0) => {
                let magnitude = rng.random_range(120.0..=250.0_f64);
                let angle = rng.random_range(0.0..std::f64::consts::TAU);
                Alteration::Moved {
                    dx: (magnitude * angle.cos()).round() as i16,
                    dy: (magnitude * angle.sin()).round() as i16,
                }
            }
            Some(1) => Alteration::Scaled {
                percent: if rng.random_bool(0.5) {
                    rng.random_range(58..=75)
                } else {
                    rng.random_range(135..=150)
                },
            },
            Some(2) => Alteration::Recolored { degrees: rng.random_range(70..=290) },
            Some(3) => Alteration::Reshaped { step: rng.random_range(1..=2) },
            Some(4) => Alteration::Unlabeled,
            Some(5) => Alteration::Missing,
            Some(6) if white => Alteration::OffWhite {
                rgb: [rng.random_range(236..=246), rng.random_range(230..=240), rng.random_range(214..=228)],
            },
            Some(7) => Alteration::Blank { grey: rng.random_range(200..=255) },
            Some(8) => Alteration::CutShort {
                permille: rng.random_range(150..=400),
                grey: if rng.random_bool(0.5) { 0 } else { 128 },
            },
            _ => Alteration::None,
        };
        (alteration, jitter)
    }
}

/// The seeded source of every random decision. Each request draws one seed from it (in arrival
/// order) and makes all its decisions from a generator of its own, so the same seed and the
/// same sequence of requests give the same faults however long each decision takes.
#[derive(Debug)]
pub(crate) struct Dice(StdRng);

impl Dice {
    pub(crate) fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    pub(crate) fn fork(&mut self) -> StdRng {
        StdRng::seed_from_u64(self.0.next_u64())
    }
}

/// True with probability `p` (never draws when `p` is 0, so turning a fault off does not shift
/// the sequence of the others... within one request).
pub(crate) fn chance(rng: &mut StdRng, p: f64) -> bool {
    p > 0.0 && rng.random::<f64>() < p
}

/// Events in the last second: the rate limit and the "peak per second" statistic both use it.
#[derive(Debug, Default)]
pub(crate) struct SecondWindow {
    times: VecDeque<Instant>,
    peak: usize,
}

impl SecondWindow {
    fn trim(&mut self, now: Instant) {
        while let Some(&front) = self.times.front() {
            if now.duration_since(front) >= Duration::from_secs(1) {
                self.times.pop_front();
            } else {
                break;
            }
        }
    }

    /// Records an event at `now`.
    pub(crate) fn record(&mut self, now: Instant) {
        self.trim(now);
        self.times.push_back(now);
        self.peak = self.peak.max(self.times.len());
    }

    /// With `limit` events per second, how long until one more is allowed (`None`: now).
    pub(crate) fn wait_for_room(&mut self, now: Instant, limit: u32) -> Option<Duration> {
        self.trim(now);
        if self.times.len() < limit as usize {
            return None;
        }
        let oldest = self.times.front().copied().unwrap_or(now);
        Some(Duration::from_secs(1).saturating_sub(now.duration_since(oldest)))
    }

    pub(crate) fn peak(&self) -> usize {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_specs_parse() {
        assert_eq!(Latency::parse("0").unwrap(), Latency::Zero);
        assert_eq!(Latency::parse("fixed:200ms").unwrap(), Latency::Fixed { ms: 200 });
        assert_eq!(
            Latency::parse("uniform:100ms..2s").unwrap(),
            Latency::Uniform { min_ms: 100, max_ms: 2000 }
        );
        assert_eq!(
            Latency::parse("lognormal:200ms,2s").unwrap(),
            Latency::Lognormal { median_ms: 200, p99_ms: 2000 }
        );
        assert!(Latency::parse("uniform:2s..1s").is_err());
        assert!(Latency::parse("gamma:1s").is_err());
        assert_eq!(Latency::parse("normal:250ms,12ms").unwrap(), Latency::Normal { mean_ms: 250, sd_ms: 12 });
        assert_eq!(Latency::parse("normal:250ms,5%").unwrap(), Latency::Normal { mean_ms: 250, sd_ms: 13 });
        // σ 0.5: p99 = median × e^(2.326 × 0.5) = median × 3.2.
        assert_eq!(
            Latency::parse("lognormal:400ms,sigma=0.5").unwrap(),
            Latency::Lognormal { median_ms: 400, p99_ms: 1280 }
        );
        assert!(Latency::parse("lognormal:400ms,sigma=x").is_err());
        assert!(Latency::parse("normal:250ms").is_err());
    }

    #[test]
    fn normal_has_the_asked_mean_and_spread_and_never_goes_negative() {
        let latency = Latency::Normal { mean_ms: 250, sd_ms: 25 };
        let mut rng = StdRng::seed_from_u64(2);
        let draws: Vec<f64> = (0..20_000).map(|_| latency.sample(&mut rng).as_secs_f64() * 1000.0).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!((245.0..255.0).contains(&mean), "mean {mean}");
        assert!((22.0..28.0).contains(&var.sqrt()), "sd {}", var.sqrt());
        let wide = Latency::Normal { mean_ms: 10, sd_ms: 100 };
        assert!((0..1000).all(|_| wide.sample(&mut rng) >= Duration::ZERO));
    }

    #[test]
    fn a_latency_tail_makes_stragglers_of_its_share() {
        let faults = Faults {
            latency: Latency::Fixed { ms: 100 },
            latency_tail: Some(LatencyTail::parse("10%x5").unwrap()),
            ..Faults::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        let slow =
            (0..10_000).filter(|_| faults.draw_latency(&mut rng) == Duration::from_millis(500)).count();
        assert!((850..1150).contains(&slow), "{slow}");
        assert!(LatencyTail::parse("150%x2").is_err());
        assert!(LatencyTail::parse("0.1x0.5").is_err(), "a straggler is never faster");
    }

    #[test]
    fn lognormal_has_the_asked_median_and_p99() {
        let latency = Latency::Lognormal { median_ms: 100, p99_ms: 1000 };
        let mut rng = StdRng::seed_from_u64(1);
        let mut draws: Vec<Duration> = (0..20_000).map(|_| latency.sample(&mut rng)).collect();
        draws.sort();
        let median = draws[10_000].as_secs_f64() * 1000.0;
        let p99 = draws[19_800].as_secs_f64() * 1000.0;
        assert!((85.0..115.0).contains(&median), "median {median}");
        assert!((800.0..1250.0).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn script_steps_cover_consecutive_submits() {
        let faults = Faults {
            script: vec![ScriptStep::parse("429x2:1").unwrap(), ScriptStep::parse("dropx1").unwrap()],
            ..Faults::default()
        };
        assert_eq!(faults.script_step(0).map(|s| s.status), Some(429));
        assert_eq!(faults.script_step(1).and_then(|s| s.retry_after_secs), Some(1));
        assert!(faults.script_step(2).is_some_and(|s| s.drop));
        assert!(faults.script_step(3).is_none());
        assert!(ScriptStep::parse("200x1").is_err());
    }

    #[test]
    fn sizes_default_and_are_bounded() {
        let faults = Faults::default();
        assert_eq!(faults.oversized_bytes(), DEFAULT_OVERSIZED_BYTES);
        assert_eq!(faults.extra_outputs(), DEFAULT_EXTRA_OUTPUTS);
        assert_eq!(faults.redirect_hops(), DEFAULT_REDIRECT_HOPS);
        for bad in [
            Faults { extra_outputs: Some(0), ..Faults::default() },
            Faults { extra_outputs: Some(MAX_EXTRA_OUTPUTS + 1), ..Faults::default() },
            Faults { redirect_hops: Some(0), ..Faults::default() },
            Faults { oversized_bytes: Some(0), ..Faults::default() },
            Faults { gateway_error_rate: 1.5, ..Faults::default() },
            Faults { key_echo_rate: -0.1, ..Faults::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn alterations_are_seeded_exclusive_and_validated() {
        let alterations = Alterations {
            moved_rate: 0.2,
            recolored_rate: 0.2,
            off_white_rate: 0.2,
            jitter: true,
            ..Alterations::default()
        };
        alterations.validate().unwrap();
        let draws = |white: bool| {
            let mut rng = StdRng::seed_from_u64(3);
            (0..2000).map(|_| alterations.draw(white, &mut rng)).collect::<Vec<_>>()
        };
        let (white, other) = (draws(true), draws(false));
        assert_eq!(white, draws(true), "the same seed draws the same alterations");
        let count =
            |d: &[(Alteration, Jitter)], kind: &str| d.iter().filter(|(a, _)| a.kind() == kind).count();
        for kind in ["moved", "recolored", "off_white"] {
            assert!((300..500).contains(&count(&white, kind)), "{kind}: {}", count(&white, kind));
        }
        assert_eq!(count(&other, "off_white"), 0, "off-white is drawn only for white backgrounds");
        assert!(white.iter().all(|(_, j)| (92..=108).contains(&j.gain) && j.dx.abs() <= 20));
        assert!(
            Alterations { blank_rate: 0.6, missing_rate: 0.6, ..Alterations::default() }.validate().is_err()
        );
        assert!(Alterations { moved_rate: -0.1, ..Alterations::default() }.validate().is_err());
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(Alterations::default().draw(true, &mut rng), (Alteration::None, Jitter::default()));
        assert_eq!(rng, StdRng::seed_from_u64(3), "nothing is drawn when every alteration is off");
    }

    #[test]
    fn window_counts_the_last_second() {
        let mut w = SecondWindow::default();
        let t0 = Instant::now();
        for i in 0..5 {
            w.record(t0 + Duration::from_millis(i * 100));
        }
        assert_eq!(w.wait_for_room(t0 + Duration::from_millis(450), 10), None);
        let wait = w.wait_for_room(t0 + Duration::from_millis(450), 5).unwrap();
        assert_eq!(wait, Duration::from_millis(550));
        w.record(t0 + Duration::from_millis(1500));
        assert_eq!(w.peak(), 5);
    }
}
