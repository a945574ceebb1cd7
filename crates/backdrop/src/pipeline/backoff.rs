//! When to try again: [`RetryPolicy`] (exponential backoff with full jitter, a hard cap on
//! attempts, and a capped server `Retry-After`) and [`PollSchedule`] (how long to wait between
//! status polls). Both are pure functions of the attempt number and a jitter sample.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};

/// Beyond this many doublings every sane base has long reached any cap; counting further would
/// only spin the backoff iterator.
const MAX_DOUBLINGS: u32 = 64;

/// How often and how long a row is retried after a transient failure.
///
/// The delay after attempt `n` failed is drawn uniformly from `[0, min(cap, base * 2^(n-1))]`
/// ("full jitter"), so workers that failed together do not come back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Submissions per row, the first included.
    pub max_attempts: u32,
    /// The ceiling of the first delay.
    pub base: Duration,
    /// The largest delay, and the largest `Retry-After` honoured.
    pub cap: Duration,
}

impl RetryPolicy {
    /// `min(cap, base * 2^(n-1))`, the upper bound of the delay after attempt `n` (1-based; `0`
    /// counts as `1`).
    ///
    /// The exponential schedule comes from backon's `ExponentialBuilder`. Its own `with_jitter`
    /// is not used: it *adds* up to one more delay (`[d, 2d)`) and so can exceed the cap, where
    /// full jitter draws below the ceiling; the jitter is applied in [`RetryPolicy::delay_with`].
    #[must_use]
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let n = attempt.clamp(1, MAX_DOUBLINGS);
        let schedule = ExponentialBuilder::new()
            .with_factor(2.0)
            .with_min_delay(self.base)
            .with_max_delay(self.cap)
            .with_max_times(n as usize)
            .build();
        // The first step is `min_delay` unclamped, so a base above the cap is clamped here.
        schedule.last().unwrap_or(self.base).min(self.cap)
    }

    /// The delay after attempt `attempt` failed, with a fresh random jitter.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// The delay after attempt `attempt` failed, for a jitter sample `unit` in `[0, 1]`:
    /// `unit * min(cap, base * 2^(n-1))`. Pure, so the schedule is testable.
    #[must_use]
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// What to do after attempt `attempt` (1-based) failed with a retryable error: `None` when
    /// the row has used all its attempts; otherwise the wait, which is the server's `Retry-After`
    /// when it sent one (capped at `cap`, so a server that always answers 429 with a huge value
    /// cannot hold a row forever), else [`RetryPolicy::delay`].
    #[must_use]
    pub fn next_delay(&self, attempt: u32, server_retry_after: Option<Duration>) -> Option<Duration> {
        self.next_delay_with(attempt, server_retry_after, rand::random::<f64>())
    }

    /// [`RetryPolicy::next_delay`] with a given jitter sample.
    #[must_use]
    pub fn next_delay_with(
        &self,
        attempt: u32,
        server_retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        Some(match server_retry_after {
            Some(wait) => self.cap_server_wait(wait),
            None => self.delay_with(attempt, unit),
        })
    }

    /// A server's `Retry-After`, capped at `cap` with a warning when it was longer. Use it for the
    /// limiter's shared gate too, so one answer cannot stall the whole run for hours.
    #[must_use]
    pub fn cap_server_wait(&self, wait: Duration) -> Duration {
        if wait > self.cap {
            tracing::warn!(
                retry_after = %humantime::format_duration(wait),
                cap = %humantime::format_duration(self.cap),
                "server asked to wait longer than --retry-max; waiting the cap instead"
            );
            self.cap
        } else {
            wait
        }
    }
}

/// How long to wait before each status poll: the first poll comes soon (most fast jobs finish
/// within a few seconds), then the interval grows ×1.75 per poll up to `max`, with ±10% jitter so
/// jobs submitted together do not poll in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollSchedule {
    /// The wait before the first poll.
    pub initial: Duration,
    /// The longest wait between two polls.
    pub max: Duration,
}

/// Growth of the poll interval per poll.
const POLL_GROWTH: f64 = 1.75;
/// Half-width of the poll jitter, as a fraction of the interval.
const POLL_JITTER: f64 = 0.1;

impl PollSchedule {
    /// The wait before poll `poll_number` (1-based; `0` counts as `1`) for a jitter sample
    /// `jitter_source` in `[0, 1]`: `min(max, initial * 1.75^(n-1)) * (0.9 + 0.2 * jitter)`,
    /// never above `max`.
    #[must_use]
    pub fn delay(&self, poll_number: u32, jitter_source: f64) -> Duration {
        let exponent = i32::try_from(poll_number.saturating_sub(1).min(MAX_DOUBLINGS)).unwrap_or(0);
        let nominal = self.initial.as_secs_f64() * POLL_GROWTH.powi(exponent);
        let nominal = nominal.min(self.max.as_secs_f64());
        let factor = 1.0 - POLL_JITTER + 2.0 * POLL_JITTER * jitter_source.clamp(0.0, 1.0);
        Duration::try_from_secs_f64(nominal * factor).unwrap_or(self.max).min(self.max)
    }
}

impl PollSchedule {
    /// A first-wave job's first poll, before the run has seen any job done, for a sample in
    /// `[0, 1]`: spread over the second half of `initial`, so that the earliest of the jobs
    /// submitted together finds out when they are done for all of them (see `PollTiming`).
    #[must_use]
    pub fn first_probe(&self, sample: f64) -> Duration {
        self.initial.mul_f64(0.5 + 0.5 * sample.clamp(0.0, 1.0))
    }
}

/// What a run has learned about how long its jobs take, so the first poll of a job lands just
/// when it is likely done instead of at a fixed delay.
///
/// It keeps two bounds, shared by every worker: the fastest time at which a poll saw a job
/// completed (`done`), and the longest time, still below that, at which a poll saw one running
/// (`running`). A job's first poll probes at a random point between them (between the submit and
/// `done` while no lower bound is known) and its second goes at `done`. A probe that finds
/// the job done lowers `done`; one that finds it running raises `running`. Random probes, not the
/// midpoint: the jobs submitted together all probe at once, and spread out they narrow the gap
/// by a factor of their number in one round instead of halving it, so the first rounds of a run
/// are not held back by a bound learned from the run's very first (late) poll.
#[derive(Debug)]
pub struct PollTiming {
    done_us: std::sync::atomic::AtomicU64,
    running_us: std::sync::atomic::AtomicU64,
    /// Woken when the first completion is learned, so jobs sleeping on the configured schedule
    /// can move their first poll to where the job is likely done.
    first_done: tokio::sync::Notify,
}

impl Default for PollTiming {
    fn default() -> Self {
        Self {
            done_us: std::sync::atomic::AtomicU64::new(u64::MAX),
            running_us: std::sync::atomic::AtomicU64::new(0),
            first_done: tokio::sync::Notify::new(),
        }
    }
}

impl PollTiming {
    fn load(&self) -> (Option<u64>, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let done = self.done_us.load(Relaxed);
        ((done != u64::MAX).then_some(done), self.running_us.load(Relaxed))
    }

    /// When to poll a job the first time, counted from its submit; `None` until a completion
    /// has been seen.
    #[must_use]
    pub fn probe(&self) -> Option<Duration> {
        self.probe_at(rand::random::<f64>())
    }

    /// [`PollTiming::probe`] for a sample `at` in `[0, 1]`: 0 is the lower bound, 1 is `done`.
    #[must_use]
    pub fn probe_at(&self, at: f64) -> Option<Duration> {
        let (done, running) = self.load();
        let done = done?;
        let low = if running < done { running } else { 0 };
        // Microsecond counts below 2^53 convert to f64 and back exactly; the cast saturates.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let offset = ((done - low) as f64 * at.clamp(0.0, 1.0)) as u64;
        Some(Duration::from_micros(low + offset))
    }

    /// Completes when the run's first completion is learned. Only that one event wakes it: one
    /// created afterwards never completes, so create it first, then check
    /// [`PollTiming::fastest`], and wait on it only while that is still `None`.
    pub fn first_done(&self) -> tokio::sync::futures::Notified<'_> {
        self.first_done.notified()
    }

    /// The fastest confirmed completion: the second poll's time.
    #[must_use]
    pub fn fastest(&self) -> Option<Duration> {
        self.load().0.map(Duration::from_micros)
    }

    /// A poll `elapsed` after the submit found the job completed.
    pub fn saw_done(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX - 1);
        let before = self.done_us.fetch_min(us, std::sync::atomic::Ordering::Relaxed);
        if before == u64::MAX {
            self.first_done.notify_waiters();
        }
    }

    /// A poll `elapsed` after the submit found the job still running.
    pub fn saw_running(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX - 1);
        // Only a bound below the fastest completion says anything about the typical job.
        if self.load().0.is_none_or(|done| us < done) {
            self.running_us.fetch_max(us, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 5, base: S(1), cap: S(10) }
    }

    #[test]
    fn ceiling_doubles_then_stops_at_the_cap() {
        let p = policy();
        let ceilings: Vec<_> = (1..=7).map(|n| p.ceiling(n)).collect();
        assert_eq!(ceilings, [S(1), S(2), S(4), S(8), S(10), S(10), S(10)]);
        assert_eq!(p.ceiling(0), S(1));
        assert_eq!(p.ceiling(u32::MAX), S(10));
        let odd = RetryPolicy { max_attempts: 3, base: S(30), cap: S(10) };
        assert_eq!(odd.ceiling(1), S(10), "a base above the cap is capped");
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = policy();
        assert_eq!(p.delay_with(3, 0.0), Duration::ZERO);
        assert_eq!(p.delay_with(3, 1.0), S(4));
        assert_eq!(p.delay_with(3, 0.5), S(2));
        assert_eq!(p.delay_with(3, 7.0), S(4), "samples are clamped");
        for n in 1..=8 {
            for _ in 0..50 {
                let d = p.delay(n);
                assert!(d <= p.ceiling(n) && d <= p.cap, "attempt {n}: {d:?}");
            }
        }
    }

    #[test]
    fn attempts_run_out() {
        let p = policy();
        assert!(p.next_delay_with(4, None, 0.5).is_some());
        assert_eq!(p.next_delay_with(5, None, 0.5), None);
        assert_eq!(p.next_delay_with(5, Some(S(1)), 0.5), None, "Retry-After does not add attempts");
        let once = RetryPolicy { max_attempts: 1, ..p };
        assert_eq!(once.next_delay_with(1, None, 0.5), None);
    }

    #[test]
    fn retry_after_replaces_the_delay_but_is_capped() {
        let p = policy();
        assert_eq!(p.next_delay_with(1, Some(S(3)), 0.0), Some(S(3)));
        assert_eq!(p.next_delay_with(1, Some(S(3600)), 0.0), Some(S(10)));
        assert_eq!(p.next_delay_with(2, None, 1.0), Some(S(2)));
    }

    #[test]
    fn a_server_that_always_says_429_cannot_hold_a_row_forever() {
        let p = policy();
        let mut total = Duration::ZERO;
        let mut attempt = 1;
        while let Some(wait) = p.next_delay(attempt, Some(S(86_400))) {
            total += wait;
            attempt += 1;
        }
        assert_eq!(attempt, p.max_attempts);
        assert!(total <= p.cap * p.max_attempts, "{total:?}");
    }

    #[test]
    fn polls_start_soon_grow_and_stop_at_max() {
        let s = PollSchedule { initial: Duration::from_millis(250), max: S(5) };
        let mid: Vec<_> = (1..=8).map(|n| s.delay(n, 0.5)).collect();
        assert_eq!(mid[0], Duration::from_millis(250));
        for pair in mid.windows(2) {
            let ratio = pair[1].as_secs_f64() / pair[0].as_secs_f64();
            assert!(pair[1] == s.max || (1.5..=2.0).contains(&ratio), "{mid:?}");
        }
        assert_eq!(s.delay(30, 0.5), S(5));
        assert_eq!(s.delay(30, 1.0), S(5), "jitter never exceeds max");
        assert_eq!(s.delay(1, 0.0), Duration::from_millis(225));
        assert_eq!(s.delay(1, 1.0), Duration::from_millis(275));
        assert_eq!(s.delay(0, 0.5), s.delay(1, 0.5));
        assert_eq!(s.delay(u32::MAX, 0.5), S(5));
    }

    #[test]
    fn first_wave_probes_spread_over_the_second_half_of_the_first_delay() {
        let s = PollSchedule { initial: Duration::from_millis(250), max: S(5) };
        assert_eq!(s.first_probe(0.0), Duration::from_millis(125));
        assert_eq!(s.first_probe(1.0), Duration::from_millis(250));
        assert_eq!(s.first_probe(9.0), Duration::from_millis(250), "samples are clamped");
    }

    #[test]
    fn poll_timing_converges_on_a_steady_latency_from_above() {
        let t = PollTiming::default();
        assert_eq!(t.probe(), None);
        let latency = Duration::from_millis(200);
        // The first job was polled late, at 250 ms.
        t.saw_done(Duration::from_millis(250));
        for _ in 0..20 {
            let probe = t.probe_at(0.5).unwrap();
            if probe >= latency { t.saw_done(probe) } else { t.saw_running(probe) }
        }
        let done = t.fastest().unwrap();
        assert!(done >= latency && done < latency + Duration::from_millis(2), "{done:?}");
    }

    #[test]
    fn poll_timing_finds_a_short_latency_quickly() {
        let t = PollTiming::default();
        t.saw_done(Duration::from_millis(250));
        let latency = Duration::from_millis(3);
        let mut rounds = 0;
        while t.fastest().unwrap() > Duration::from_millis(4) {
            let probe = t.probe_at(0.5).unwrap();
            if probe >= latency {
                t.saw_done(probe)
            } else {
                t.saw_running(probe)
            }
            rounds += 1;
        }
        assert!(rounds <= 10, "halving, not creeping: {rounds} rounds");
    }

    #[test]
    fn a_slow_job_running_late_does_not_move_the_probe_past_the_fastest_completion() {
        let t = PollTiming::default();
        t.saw_done(Duration::from_millis(100));
        t.saw_running(Duration::from_secs(5));
        assert_eq!(t.probe_at(0.0), Some(Duration::ZERO));
        assert_eq!(t.probe_at(0.5), Some(Duration::from_millis(50)));
        for _ in 0..100 {
            let p = t.probe().unwrap();
            assert!(p <= Duration::from_millis(100), "{p:?}");
        }
    }

    #[test]
    fn one_round_of_spread_probes_closes_most_of_the_gap() {
        // 50 jobs submitted together probe once each before any of them answers.
        let t = PollTiming::default();
        t.saw_done(Duration::from_millis(250));
        let latency = Duration::from_millis(200);
        let probes: Vec<_> = (0..50).map(|i| t.probe_at(f64::from(i) / 49.0).unwrap()).collect();
        for p in probes {
            if p >= latency { t.saw_done(p) } else { t.saw_running(p) }
        }
        let (done, running) = (t.fastest().unwrap(), Duration::from_micros(t.load().1));
        assert!(running < latency && latency <= done, "{running:?} .. {done:?}");
        // From 250 ms of doubt to one step of the spread: 250 / 49 ms.
        assert!(done - running <= Duration::from_millis(6), "{running:?} .. {done:?}");
    }

    #[tokio::test]
    async fn the_first_completion_wakes_the_waiters() {
        let t = std::sync::Arc::new(PollTiming::default());
        let waiter = {
            let t = std::sync::Arc::clone(&t);
            tokio::spawn(async move {
                let learned = t.first_done();
                if t.fastest().is_none() {
                    learned.await;
                }
                t.fastest()
            })
        };
        tokio::task::yield_now().await;
        t.saw_done(Duration::from_millis(30));
        let seen = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        assert_eq!(seen, Some(Duration::from_millis(30)));
    }
}
