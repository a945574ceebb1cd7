//! When to poll a job: [`LatencySample`], the generation times this run (and earlier runs, as
//! a prior) have seen, and [`PollPlan::for_sample`], the poll times that make the expected delay
//! between a job's completion and its detection as small as a budget of status polls per row
//! allows. Pure functions of the sample, so the plan is testable without a clock.
//!
//! Hand-written: no maintained crate plans inspections against an empirical distribution.

use std::collections::VecDeque;
use std::time::Duration;

/// The default poll budget: status polls per row, on average.
///
/// The expected delay between completion and detection falls roughly as 1/polls once the
/// polls cover the distribution, so each extra poll buys less. For log-normal generation times
/// with σ 0.5 (the shape real ones have) the optimal plans give, as a share of the mean
/// latency: 2 polls 24%, 3 polls 14%, 4 polls 10%, 6 polls 6.6%, 8 polls 5.5%, 10 polls 4.9%
/// (8.3 spent), 16 polls 4.1% (10 spent). From 4 to 6 each extra poll saves 1.6% of the mean,
/// which is 1.6% of the run's throughput at a fixed concurrency; past 6 about 0.3%. So six: the
/// detection delay stays under 7% of the mean, and a row takes 8 requests (submit, 6 polls,
/// download). At the providers' scales six means about 0.5 s of delay on 5-15 s
/// generations (5.7 polls per row) and 2.0 s on 30-60 s edits (4.3 polls; the guides' 5 s
/// interval: 2.5 s for 9 polls); on a steady latency a row costs one or two polls. Where the
/// provider pushes (webhooks, fal's status stream) nothing is polled at all.
pub const DEFAULT_POLLS_PER_ROW: f64 = 6.0;

/// A poll is worth making only when it cuts the expected detection delay by at least this share
/// of the median generation time. The budget is a ceiling, not a target: on a fixed latency a
/// fourth poll would shave a fraction of a percent off a delay that is already about 1% of the
/// latency, and costs a request. Lognormal times with σ 0.5 are worth far more than this per
/// poll, so there the budget binds. A budget above the default lowers it in proportion, so a
/// larger `--polls-per-row` is spent rather than left unused.
pub const MIN_POLL_WORTH: f64 = 0.01;

/// [`MIN_POLL_WORTH`] at the default budget, and in proportion below it for a larger one: a user
/// who asks for more polls per row than the default gets them, each saving less.
fn min_poll_worth(polls_per_row: f64) -> f64 {
    MIN_POLL_WORTH * (DEFAULT_POLLS_PER_ROW / polls_per_row).min(1.0)
}

/// How many observations a sample keeps: the most recent ones (generation times drift).
pub const SAMPLE_SIZE: usize = 256;

/// Before any generation time is known (no earlier run in the state file, no completion yet in
/// this one), each poll comes this share of the time since the submit after the one before: a
/// job is then found done within 20% of its time however long it takes. The jobs submitted
/// together probe from staggered first polls, and the first to find its job done wakes the rest,
/// so the wave as a whole learns far sooner than that. It costs about `ln(L / first poll) /
/// ln(1.2)` polls per job of the first wave only: 8 to 1 s from a 250 ms first poll, 30 to 60 s
/// (fewer where `--poll-max` caps the gaps).
pub const LEARNING_STEP: f64 = 0.2;

/// The wait before the next poll of a job submitted `elapsed` ago, while nothing is learned:
/// [`LEARNING_STEP`] of `elapsed`, at least 10 ms, at most `max_gap`.
#[must_use]
pub fn learning_delay(elapsed: Duration, max_gap: Duration) -> Duration {
    let floor = Duration::from_millis(10);
    elapsed.mul_f64(LEARNING_STEP).clamp(floor, max_gap.max(floor))
}

/// The generation times seen so far, most recent last, each with how precisely it is known.
#[derive(Debug, Clone, Default)]
pub struct LatencySample {
    /// (time, width of the bracket it lies in: zero when known exactly)
    seen: VecDeque<(Duration, Duration)>,
}

impl LatencySample {
    /// A sample that starts from `prior` (earlier runs' times, most recent last); this run's
    /// observations replace the prior's oldest as they come. The prior counts as known to
    /// within half its value: generation times drift between runs, and this run's narrow
    /// brackets soon outweigh it.
    #[must_use]
    pub fn with_prior(prior: impl IntoIterator<Item = Duration>) -> Self {
        let mut sample = Self::default();
        for d in prior {
            sample.push(d, d / 2);
        }
        sample
    }

    fn push(&mut self, d: Duration, width: Duration) {
        if self.seen.len() == SAMPLE_SIZE {
            self.seen.pop_front();
        }
        self.seen.push_back((d, width));
    }

    /// A completion whose time is known exactly (pushed by a webhook or a status stream).
    pub fn record(&mut self, latency: Duration) {
        self.push(latency, Duration::ZERO);
    }

    /// A completion a poll found: the job was still running at `running_at` (`None`: never
    /// polled before) and done at `done_at`. It finished somewhere between: the midpoint is
    /// kept, with the bracket's width, so that a plan trusts narrow brackets more (as plans
    /// poll denser where jobs finish, the brackets narrow).
    pub fn record_bracket(&mut self, running_at: Option<Duration>, done_at: Duration) {
        let low = running_at.unwrap_or(Duration::ZERO).min(done_at);
        self.push(low + (done_at - low) / 2, done_at - low);
    }

    /// The observations, oldest first.
    #[must_use]
    pub fn values(&self) -> Vec<Duration> {
        self.seen.iter().map(|(d, _)| *d).collect()
    }

    /// The observations with their weights: `1 / (relative bracket width + 5%)`, so a time
    /// known to within a few percent counts several times one only known to within a factor.
    fn weighted(&self) -> Vec<(Duration, f64)> {
        self.seen
            .iter()
            .map(|(d, width)| {
                let relative = width.as_secs_f64() / d.as_secs_f64().max(1e-6);
                (*d, 1.0 / (relative + 0.05))
            })
            .collect()
    }

    /// How many observations there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing was observed yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// What a plan may spend and how close polls may come.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollBudget {
    /// Status polls per row, on average over the sample's distribution (at least 1).
    pub polls_per_row: f64,
    /// Polls never come closer than this (a provider's guidance); it pushes polls later.
    pub min_gap: Duration,
    /// Polls past the plan never wait longer than this between them.
    pub max_gap: Duration,
}

impl Default for PollBudget {
    fn default() -> Self {
        Self {
            polls_per_row: DEFAULT_POLLS_PER_ROW,
            min_gap: Duration::ZERO,
            max_gap: Duration::from_secs(30),
        }
    }
}

/// The poll times for a job, counted from its submit.
#[derive(Debug, Clone, PartialEq)]
pub struct PollPlan {
    /// The planned polls, in order; the last one comes after every observed time.
    times: Vec<Duration>,
    min_gap: Duration,
    max_gap: Duration,
}

/// Points each observation spreads into: the standard normal's quantiles at (i + ½)/8, so the
/// plan sees a smoothed distribution rather than the exact times seen (a fresh job's time is
/// never exactly one already seen).
const KERNEL: [f64; 8] = [-1.534_1, -0.887_1, -0.488_7, -0.157_3, 0.157_3, 0.488_7, 0.887_1, 1.534_1];
/// The narrowest smoothing, relative: even a fixed latency jitters by about 1%.
const MIN_BANDWIDTH: f64 = 0.01;
/// Equal-weight points the plan is optimised over.
const ATOMS: usize = 128;
/// Beyond the plan's last poll (a job slower than everything seen), the gaps start at 5% of that
/// time and double.
const TAIL_FIRST_GAP: f64 = 0.05;

impl PollPlan {
    /// The plan that minimises the expected delay between completion and detection over the
    /// distribution of `sample` (smoothed), spending on average at most `budget.polls_per_row`
    /// polls per row; `None` for an empty sample.
    ///
    /// Method: the sample is smoothed in log time with a Gaussian kernel (Silverman's bandwidth,
    /// at least 1%) and reduced to 128 equal-weight quantiles. Polls at those points are chosen
    /// by dynamic programming to minimise `E[delay] + λ·E[polls]`, where a poll is paid for
    /// whenever the job is still running before it; `λ` is found by bisection as the smallest
    /// whose plan keeps within the budget. Polling only at the points is no loss: a poll between
    /// two of them detects nothing more than one at the next.
    #[must_use]
    pub fn for_sample(sample: &[Duration], budget: PollBudget) -> Option<Self> {
        let weighted: Vec<(Duration, f64)> = sample.iter().map(|d| (*d, 1.0)).collect();
        Self::for_weighted(&weighted, budget)
    }

    /// [`PollPlan::for_sample`] for a run's observations, each weighted by how precisely it is
    /// known.
    #[must_use]
    pub fn for_observations(sample: &LatencySample, budget: PollBudget) -> Option<Self> {
        Self::for_weighted(&sample.weighted(), budget)
    }

    fn for_weighted(sample: &[(Duration, f64)], budget: PollBudget) -> Option<Self> {
        let atoms = atoms(sample)?;
        let polls_per_row = budget.polls_per_row.max(1.0);
        // The cheapest price of a poll: below it no poll is worth its request.
        let floor = min_poll_worth(polls_per_row) * atoms[ATOMS / 2];
        let (mut low, mut high) = (floor, atoms[ATOMS - 1] * 4.0 + 1.0);
        let mut best = optimal(&atoms, high);
        let cheapest = optimal(&atoms, floor);
        let within = expected(&atoms, &cheapest).0 <= polls_per_row;
        if within {
            best = cheapest;
        }
        for _ in 0..if within { 0 } else { 50 } {
            let lambda = (low + high) / 2.0;
            let plan = optimal(&atoms, lambda);
            if expected(&atoms, &plan).0 > polls_per_row {
                low = lambda;
            } else {
                high = lambda;
                best = plan;
            }
        }
        let mut times = Vec::with_capacity(best.len());
        let mut last = Duration::ZERO;
        for i in best {
            // A minimum gap pushes a poll later; the order stays.
            let at = Duration::from_secs_f64(atoms[i]).max(last + budget.min_gap);
            times.push(at);
            last = at;
        }
        Some(Self { times, min_gap: budget.min_gap, max_gap: budget.max_gap.max(budget.min_gap) })
    }

    /// The planned polls, from the submit.
    #[must_use]
    pub fn times(&self) -> &[Duration] {
        &self.times
    }

    /// When poll `n` (0-based) goes, counted from the submit: the planned ones, then gaps of 5%
    /// of the last planned time, doubling, but never more than [`LEARNING_STEP`] of the time
    /// since the submit (a plan made from the first few completions, the fastest, would else
    /// find the slower jobs of the wave far too late), between `min_gap` and `max_gap`.
    #[must_use]
    pub fn poll_at(&self, n: usize) -> Duration {
        if let Some(t) = self.times.get(n) {
            return *t;
        }
        let last = self.times.last().copied().unwrap_or(self.min_gap);
        let mut at = last;
        let mut gap = last.mul_f64(TAIL_FIRST_GAP);
        for _ in self.times.len()..=n {
            let step = gap.min(at.mul_f64(LEARNING_STEP));
            at += step.clamp(self.min_gap.max(Duration::from_millis(1)), self.max_gap);
            gap *= 2;
        }
        at
    }

    /// The first poll later than `elapsed` after the submit.
    #[must_use]
    pub fn next_after(&self, elapsed: Duration) -> Duration {
        let mut n = self.times.partition_point(|t| *t <= elapsed);
        loop {
            let at = self.poll_at(n);
            if at > elapsed {
                return at;
            }
            n += 1;
        }
    }

    /// For jobs taking `latencies`: (polls per row, mean delay between completion and
    /// detection), polling by this plan.
    #[must_use]
    pub fn evaluate(&self, latencies: &[Duration]) -> (f64, Duration) {
        if latencies.is_empty() {
            return (0.0, Duration::ZERO);
        }
        let (mut polls, mut delay) = (0usize, Duration::ZERO);
        for &latency in latencies {
            let mut n = 0;
            loop {
                let at = self.poll_at(n);
                n += 1;
                if at >= latency {
                    delay += at - latency;
                    break;
                }
            }
            polls += n;
        }
        let count = latencies.len();
        (polls as f64 / count as f64, delay / u32::try_from(count).unwrap_or(u32::MAX))
    }
}

/// The weighted sample smoothed and reduced to [`ATOMS`] equal-weight quantiles, in seconds.
fn atoms(sample: &[(Duration, f64)]) -> Option<Vec<f64>> {
    let mut logs: Vec<(f64, f64)> = sample
        .iter()
        .filter(|(_, w)| w.is_finite() && *w > 0.0)
        .map(|(d, w)| (d.as_secs_f64().max(1e-6).ln(), *w))
        .collect();
    if logs.is_empty() {
        return None;
    }
    logs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = logs.iter().map(|l| l.1).sum();
    // The effective sample size of the weights sets the bandwidth (Silverman's rule).
    let n = total.powi(2) / logs.iter().map(|l| l.1 * l.1).sum::<f64>();
    let mean = logs.iter().map(|(l, w)| l * w).sum::<f64>() / total;
    let var = logs.iter().map(|(l, w)| w * (l - mean).powi(2)).sum::<f64>() / total;
    let quantile = |q: f64| {
        let mut acc = 0.0;
        logs.iter()
            .find(|(_, w)| {
                acc += w;
                acc >= q * total
            })
            .map_or(mean, |(l, _)| *l)
    };
    let iqr = quantile(0.75) - quantile(0.25);
    let sd = (var * n / (n - 1.0).max(1.0)).sqrt();
    let spread = if iqr > 0.0 { sd.min(iqr / 1.349) } else { sd };
    let bandwidth = (0.9 * spread * n.powf(-0.2)).max(MIN_BANDWIDTH);
    let mut smoothed: Vec<(f64, f64)> =
        logs.iter().flat_map(|(l, w)| KERNEL.iter().map(move |z| ((l + bandwidth * z).exp(), *w))).collect();
    smoothed.sort_by(|a, b| a.0.total_cmp(&b.0));
    // The atom i is the weighted quantile (i + 1/2) / ATOMS (each point carries its
    // observation's weight, so the smoothed total is KERNEL.len() times the sample's).
    let total = total * KERNEL.len() as f64;
    let mut atoms = Vec::with_capacity(ATOMS);
    let (mut acc, mut next) = (0.0, 0);
    for (value, w) in &smoothed {
        acc += w;
        while next < ATOMS && acc >= (next as f64 + 0.5) / ATOMS as f64 * total {
            atoms.push(*value);
            next += 1;
        }
    }
    let last = smoothed.last().map_or(0.0, |s| s.0);
    atoms.resize(ATOMS, last);
    Some(atoms)
}

/// The atoms to poll at (indices, increasing; the last is the last atom) that minimise
/// `E[delay] + lambda·E[polls]` over equal-weight `atoms`.
fn optimal(atoms: &[f64], lambda: f64) -> Vec<usize> {
    let m = atoms.len();
    let w = 1.0 / m as f64;
    // prefix[i] = sum of atoms[..i]
    let mut prefix = vec![0.0; m + 1];
    for (i, a) in atoms.iter().enumerate() {
        prefix[i + 1] = prefix[i] + a;
    }
    // cost[j]: the least expected cost of covering atoms j.. with the previous poll before atom
    // j (so the job is still running with probability (m - j)/m); next[j]: that plan's poll.
    let mut cost = vec![0.0; m + 1];
    let mut next = vec![m - 1; m];
    for j in (0..m).rev() {
        let running = (m - j) as f64 * w;
        let mut best = f64::INFINITY;
        for k in j..m {
            let covered = (k + 1 - j) as f64;
            let delay = w * (atoms[k] * covered - (prefix[k + 1] - prefix[j]));
            let c = lambda * running + delay + cost[k + 1];
            if c < best {
                best = c;
                next[j] = k;
            }
        }
        cost[j] = best;
    }
    let mut plan = Vec::new();
    let mut j = 0;
    while j < m {
        plan.push(next[j]);
        j = next[j] + 1;
    }
    plan
}

/// (polls per row, mean delay in seconds) of polling at `plan` over equal-weight `atoms`.
fn expected(atoms: &[f64], plan: &[usize]) -> (f64, f64) {
    let (mut polls, mut delay) = (0.0, 0.0);
    let mut from = 0;
    for (n, &k) in plan.iter().enumerate() {
        for a in &atoms[from..=k] {
            polls += (n + 1) as f64;
            delay += atoms[k] - a;
        }
        from = k + 1;
    }
    let m = atoms.len() as f64;
    (polls / m, delay / m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Deterministic log-normal draws with median `median` and σ `sigma` (Box-Muller on two
    /// golden-ratio sequences; `offset` picks an independent stretch).
    fn lognormal(median: Duration, sigma: f64, count: usize, offset: usize) -> Vec<Duration> {
        (offset..offset + count)
            .map(|i| {
                let u1 = ((i as f64 + 1.0) * 0.618_033_988_75).fract().max(1e-9);
                let u2 = ((i as f64 + 1.0) * 0.754_877_666_25).fract();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                median.mul_f64((sigma * z).exp())
            })
            .collect()
    }

    fn mean(d: &[Duration]) -> Duration {
        d.iter().sum::<Duration>() / u32::try_from(d.len()).unwrap()
    }

    fn budget(polls_per_row: f64) -> PollBudget {
        PollBudget { polls_per_row, ..PollBudget::default() }
    }

    #[test]
    fn on_a_fixed_latency_the_poll_lands_right_at_it() {
        let sample = vec![MS(250); 40];
        let one = PollPlan::for_sample(&sample, budget(1.0)).unwrap();
        let first = one.times()[0];
        println!("fixed 250 ms, 1 poll per row: first poll at {first:?}");
        assert!(first >= MS(250) && first <= MS(250).mul_f64(1.05), "{first:?}");
        for polls in [1.0, 2.0, DEFAULT_POLLS_PER_ROW] {
            let plan = PollPlan::for_sample(&sample, budget(polls)).unwrap();
            let (per_row, delay) = plan.evaluate(&[MS(250)]);
            println!("fixed 250 ms, budget {polls}: {per_row} polls, detected {delay:?} after completion");
            assert!(delay <= MS(250).mul_f64(0.05), "{delay:?}");
            assert!(per_row <= polls, "{per_row}");
        }
        // Jitter of ±2% around 250 ms is still caught within 5%.
        let jittered: Vec<Duration> = (0..40).map(|i| MS(245 + (i % 11))).collect();
        let plan = PollPlan::for_sample(&jittered, PollBudget::default()).unwrap();
        let (_, delay) = plan.evaluate(&jittered);
        assert!(delay <= MS(12), "{delay:?}");
    }

    #[test]
    fn on_lognormal_latency_the_delay_falls_with_the_budget() {
        let (median, sigma) = (MS(400), 0.5);
        let seen = lognormal(median, sigma, 200, 0);
        let fresh = lognormal(median, sigma, 20_000, 10_000);
        let mean_latency = mean(&fresh);
        let (mut previous, mut previous_polls) = (Duration::MAX, 0.0);
        for polls in [2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0] {
            let plan = PollPlan::for_sample(&seen, budget(polls)).unwrap();
            let (per_row, delay) = plan.evaluate(&fresh);
            let share = delay.as_secs_f64() / mean_latency.as_secs_f64();
            println!(
                "lognormal median 400 ms σ 0.5, budget {polls}: {per_row:.2} polls per row, mean delay {:.1} ms ({:.1}% of the mean latency)",
                delay.as_secs_f64() * 1000.0,
                share * 100.0
            );
            assert!(per_row <= polls * 1.1, "budget {polls}: {per_row:.2} polls per row");
            // More polls, less delay, as long as a poll saves its worth (MIN_POLL_WORTH of the
            // median at the default budget, less for a larger one).
            if per_row > previous_polls + 0.1 {
                assert!(delay < previous, "more polls, less delay");
            } else {
                assert!(delay <= previous && polls > DEFAULT_POLLS_PER_ROW, "budget {polls} left unspent");
            }
            (previous, previous_polls) = (delay, per_row);
            if polls == DEFAULT_POLLS_PER_ROW {
                assert!(share <= 0.12, "{share:.3}");
            }
            // A budget above the default is the user's ask, and is spent: ten polls per row
            // bring the delay under 5% of the mean.
            if polls >= 10.0 {
                assert!(share <= 0.05 && per_row > 8.0, "{share:.3}, {per_row:.2} polls per row");
            }
        }
    }

    #[test]
    fn at_the_providers_time_scales() {
        // Generations 5-15 s and edits 30-60 s, taken as the 5th-95th percentiles of log-normals.
        for (what, low, high) in [("generations", 5.0_f64, 15.0_f64), ("edits", 30.0, 60.0)] {
            let median = Duration::from_secs_f64((low * high).sqrt());
            let sigma = (high / low).ln() / (2.0 * 1.645);
            let seen = lognormal(median, sigma, 200, 0);
            let fresh = lognormal(median, sigma, 20_000, 10_000);
            let plan = PollPlan::for_sample(&seen, PollBudget::default()).unwrap();
            let (per_row, delay) = plan.evaluate(&fresh);
            let share = delay.as_secs_f64() / mean(&fresh).as_secs_f64();
            println!(
                "{what} {low}-{high} s, default budget: {per_row:.2} polls per row, mean delay {:.2} s ({:.1}% of the mean); polls at {:?}",
                delay.as_secs_f64(),
                share * 100.0,
                plan.times().iter().map(|t| (t.as_secs_f64() * 10.0).round() / 10.0).collect::<Vec<_>>()
            );
            assert!(per_row <= DEFAULT_POLLS_PER_ROW * 1.1 && share <= 0.10, "{what}: {per_row} {share}");
        }
    }

    #[test]
    fn a_minimum_gap_is_kept_and_late_jobs_are_still_found_soon() {
        let seen = lognormal(Duration::from_secs(8), 0.3, 100, 0);
        let plan = PollPlan::for_sample(
            &seen,
            PollBudget {
                polls_per_row: 8.0,
                min_gap: Duration::from_secs(2),
                max_gap: Duration::from_secs(10),
            },
        )
        .unwrap();
        let polls: Vec<Duration> = (0..30).map(|n| plan.poll_at(n)).collect();
        assert!(polls[0] >= Duration::from_secs(2));
        assert!(polls.windows(2).all(|w| w[1] - w[0] >= Duration::from_secs(2)), "{polls:?}");
        assert!(polls.windows(2).all(|w| w[1] - w[0] <= Duration::from_secs(10)), "{polls:?}");
        // A job far slower than anything seen is found within one tail gap.
        let last = *plan.times().last().unwrap();
        let late = last + Duration::from_secs(3);
        let (_, delay) = plan.evaluate(&[late]);
        assert!(delay <= Duration::from_secs(10), "{delay:?}");
        assert_eq!(plan.next_after(Duration::ZERO), plan.poll_at(0));
        assert_eq!(plan.next_after(plan.poll_at(3)), plan.poll_at(4));
        assert!(plan.next_after(late) > late);
    }

    #[test]
    fn a_plan_from_the_fastest_few_still_finds_slow_jobs_within_a_fifth_of_their_time() {
        // The first completions of a wave are its fastest jobs: a plan made from them ends early,
        // and the slower jobs fall in its tail.
        let plan = PollPlan::for_sample(&[MS(190)], PollBudget::default()).unwrap();
        for late in [MS(400), MS(800), MS(2_000), Duration::from_secs(20)] {
            let (polls, delay) = plan.evaluate(&[late]);
            println!(
                "a job of {late:?} after a plan from one of 190 ms: {polls} polls, found {delay:?} late"
            );
            assert!(delay.as_secs_f64() <= late.as_secs_f64() * LEARNING_STEP + 1e-3, "{late:?}: {delay:?}");
        }
    }

    #[test]
    fn the_sample_keeps_the_most_recent_times_and_starts_from_a_prior() {
        assert!(PollPlan::for_sample(&[], PollBudget::default()).is_none());
        let mut sample = LatencySample::with_prior(vec![Duration::from_secs(9); 300]);
        assert_eq!(sample.len(), SAMPLE_SIZE);
        sample.record(MS(300));
        sample.record_bracket(Some(MS(200)), MS(400));
        sample.record_bracket(None, MS(100));
        let values = sample.values();
        assert_eq!(values.len(), SAMPLE_SIZE);
        assert_eq!(&values[SAMPLE_SIZE - 3..], &[MS(300), MS(300), MS(50)]);
        // A plan from the prior alone polls around the earlier runs' times.
        let prior_plan = PollPlan::for_sample(
            &LatencySample::with_prior(vec![Duration::from_secs(9); 20]).values(),
            budget(1.0),
        )
        .unwrap();
        assert!((Duration::from_secs(9)..Duration::from_secs(10)).contains(&prior_plan.times()[0]));
    }

    #[test]
    fn brackets_narrow_onto_a_fixed_latency_as_the_run_learns() {
        // Start from a poor prior (1 s) for jobs that take 250 ms, poll by the plan, and feed
        // each detection back as a bracket.
        let truth = MS(250);
        let mut sample = LatencySample::with_prior(vec![Duration::from_secs(1); 8]);
        let mut delays = Vec::new();
        for _ in 0..60 {
            let plan = PollPlan::for_observations(&sample, PollBudget::default()).unwrap();
            let mut running_at = None;
            let mut n = 0;
            loop {
                let at = plan.poll_at(n);
                if at >= truth {
                    sample.record_bracket(running_at, at);
                    delays.push(at - truth);
                    break;
                }
                running_at = Some(at);
                n += 1;
            }
        }
        let late = mean(&delays[40..]);
        println!("learning a fixed 250 ms from a 1 s prior: mean delay over the last 20 jobs {late:?}");
        assert!(late <= MS(13), "{late:?}");
    }
}
