//! The shared request rate limit: one governor limiter that keeps submits within the rate, a
//! drift-free schedule of slots 2% wider than that, and a "not before" gate every worker honours,
//! raised when a server answers 429 with `Retry-After` (a governor quota cannot change at run
//! time, so the slowdown is a shared instant instead).

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::domain::Rate;

/// Paces every HTTP request of a run; share it through an `Arc`.
#[derive(Debug)]
pub struct Limiter {
    limiter: DefaultDirectRateLimiter,
    /// Nobody sends before this instant (a tokio instant, so paused-time tests can drive it).
    not_before: Mutex<Option<Instant>>,
    /// The waiter whose turn it is to take the next cell.
    turn: tokio::sync::Mutex<()>,
    /// The schedule's theoretical arrival time: when the next slot would be with no burst left.
    next_slot: Mutex<Option<Instant>>,
    /// Slot spacing: the sustained interval plus [`PACING_MARGIN`].
    spacing: Duration,
    /// How far ahead of `next_slot` a slot may be taken: `burst - 1` spacings.
    tolerance: Duration,
}

/// How much wider than the sustained interval the slots are (2%).
const PACING_MARGIN: f64 = 1.02;

/// How many submits may leave back to back: 2% of the rate per second, at least 1. Below 100 a
/// second that is 1, so `10/s`, `20/s` and `600/m` are evenly spaced; `1000/s` may send 20 at
/// once.
///
/// A burst matters at high rates: with a burst of 1 every submit waits for the one before it,
/// so the jobs whose slots free up together (one poll round) queue up behind each other, a
/// millisecond each at `1000/s`, which at 50 in flight costs a few percent of the throughput.
#[must_use]
pub fn burst(rate: Rate) -> u32 {
    let per_second = f64::from(rate.count) / rate.period.as_secs_f64().max(1e-9);
    // Saturating float-to-int cast: huge rates give u32::MAX, clamped to the count below.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let burst = (per_second / 50.0) as u32;
    burst.clamp(1, rate.count.max(1))
}

/// The time between submits once the burst is spent: `period / (count - burst + 1)`.
///
/// A limiter with burst `b` and interval `T` can put `b + ceil(w / T) - 1` requests in a
/// half-open window of length `w`: `b` at its start, then one every `T`. With `w` the period and
/// `T` as above that is exactly `count`, so the guarantee "never more than `count` in any one
/// period" holds whatever the burst; the burst costs `b - 1` requests of the sustained rate.
#[must_use]
pub fn interval(rate: Rate) -> Duration {
    let sustained = u128::from(rate.count.max(1) - burst(rate) + 1);
    // Rounded up: rounded down, `sustained` intervals would fall a few nanoseconds short of the
    // period and one more request would fit in it.
    let nanos = rate.period.as_nanos().div_ceil(sustained).max(1);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The governor quota for a rate: one request every [`interval`], [`burst`] at once.
///
/// governor's burst defaults to the rate itself, which would let `10/s` send 10 requests at once
/// after an idle second and then 10 more as the bucket refills: up to 20 in one second at the
/// server. With the burst and interval above a half-open window of one period never holds more
/// than `count`.
///
/// governor alone drifts, though: a worker that wakes a millisecond late pushes every later cell
/// a millisecond later too, and on a busy machine that costs several percent of the rate. So
/// [`Limiter::acquire`] keeps a schedule of slots `interval × 1.02` apart, fixed in advance: a
/// late wake does not move the next slot. governor itself is checked at the send
/// ([`Limiter::space_send`]), where the 2% lets it absorb a send held up by up to `interval / 50`
/// without slowing the rate, and leaves room for network jitter at the server.
#[must_use]
pub fn quota(rate: Rate) -> Quota {
    let burst = NonZeroU32::new(burst(rate)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(interval(rate))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

impl Limiter {
    /// A limiter for `rate`.
    #[must_use]
    pub fn new(rate: Rate) -> Self {
        let spacing = interval(rate).mul_f64(PACING_MARGIN);
        Self {
            limiter: RateLimiter::direct(quota(rate)),
            not_before: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
            next_slot: Mutex::new(None),
            spacing,
            tolerance: spacing * (burst(rate) - 1),
        }
    }

    /// Holds every worker until `until` (a server's `Retry-After`). Keeps the later of the
    /// current gate and the new one, so a short wait never shortens a longer one.
    pub fn pause_until(&self, until: Instant) {
        let mut gate = self.not_before.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if gate.is_none_or(|current| current < until) {
            *gate = Some(until);
        }
    }

    /// [`Limiter::pause_until`] `now + wait`.
    pub fn pause_for(&self, wait: Duration) {
        self.pause_until(Instant::now() + wait);
    }

    /// The gate, when it lies in the future.
    #[must_use]
    pub fn paused_until(&self) -> Option<Instant> {
        let gate = *self.not_before.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        gate.filter(|g| *g > Instant::now())
    }

    /// Waits until a request may be sent: first past the gate, then for a rate-limit slot. If
    /// the gate was raised while this worker waited for its slot, it waits again (and takes a
    /// new slot), so the workers released by a gate are still paced, at most a burst at once.
    pub async fn acquire(&self) {
        // One waiter at a time takes a slot, in arrival order (tokio's mutex is fair): no
        // thundering herd, and rows keep their catalog order.
        let _turn = self.turn.lock().await;
        loop {
            while let Some(gate) = self.paused_until() {
                tokio::time::sleep_until(gate).await;
            }
            // GCRA on a schedule fixed in advance: a slot may be taken up to `tolerance` ahead of
            // the theoretical arrival time, which then moves one spacing on from where it was
            // (or from now, after an idle spell), never from when the worker happened to wake.
            let slot = {
                let mut next = self.next_slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                let tat = next.map_or(now, |n| n.max(now));
                *next = Some(tat + self.spacing);
                tat.checked_sub(self.tolerance).map_or(now, |s| s.max(now))
            };
            // A slot due now is taken without a timer: tokio rounds every sleep up to its next
            // millisecond tick, and the turn is held meanwhile, so a burst would queue a tick apiece.
            if slot > Instant::now() {
                tokio::time::sleep_until(slot).await;
            }
            // A 429 may have raised the gate while this worker waited: wait for the gate and
            // take a new slot.
            if self.paused_until().is_none() {
                return;
            }
        }
    }

    /// Called right before the request leaves, after the work between [`Limiter::acquire`]
    /// and the send (the intent commit, whose fsync time varies): governor keeps consecutive
    /// sends at least `period / count` apart, so that variance cannot bunch them up at the
    /// server. With slots 2% wider this waits only when an earlier send was held up by more
    /// than that, so the wait is short.
    pub async fn space_send(&self) {
        while let Err(not_until) = self.limiter.check() {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(self.limiter.clock()));
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use governor::clock::FakeRelativeClock;

    use super::*;

    /// Drives a limiter for `rate` on a fake clock, trying to send every millisecond for `span`,
    /// and returns the send times in milliseconds.
    fn sends(rate: Rate, span: Duration) -> Vec<u64> {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::direct_with_clock(quota(rate), clock.clone());
        let mut times = Vec::new();
        let span_ms = u64::try_from(span.as_millis()).unwrap();
        for now_ms in 0..span_ms {
            while limiter.check().is_ok() {
                times.push(now_ms);
            }
            clock.advance(Duration::from_millis(1));
        }
        times
    }

    fn max_in_any_window(times: &[u64], window_ms: u64) -> usize {
        let mut open = VecDeque::new();
        let mut best = 0;
        for &t in times {
            open.push_back(t);
            // Half-open window [t - window, t].
            while open.front().is_some_and(|&f| f + window_ms <= t) {
                open.pop_front();
            }
            best = best.max(open.len());
        }
        best
    }

    #[test]
    fn ten_per_second_never_puts_eleven_in_one_second() {
        let rate: Rate = "10/s".parse().unwrap();
        let times = sends(rate, Duration::from_secs(5));
        assert_eq!(max_in_any_window(&times, 1000), 10, "{times:?}");
        assert!(times.len() >= 49, "paced, not starved: {}", times.len());
        assert!(times.windows(2).all(|w| w[1] - w[0] >= 100), "evenly spaced: {times:?}");
    }

    #[test]
    fn per_minute_rates_pace_evenly() {
        let rate: Rate = "120/m".parse().unwrap();
        let times = sends(rate, Duration::from_secs(10));
        assert_eq!(times.len(), 20);
        assert_eq!(max_in_any_window(&times, 500), 1);
    }

    #[test]
    fn high_rates_allow_a_small_burst_and_still_never_exceed_the_count() {
        let rate: Rate = "1000/s".parse().unwrap();
        assert_eq!(burst(rate), 20);
        let times = sends(rate, Duration::from_secs(5));
        assert_eq!(times.iter().take_while(|&&t| t == 0).count(), 20, "20 at once from idle");
        assert!(max_in_any_window(&times, 1000) <= 1000, "{}", max_in_any_window(&times, 1000));
        // 20 + 981 per second after that: the burst costs 19 of the 1000.
        assert!(times.len() >= 4900, "paced, not starved: {}", times.len());
        for (text, b) in [("10/s", 1), ("20/s", 1), ("99/s", 1), ("100/s", 2), ("600/m", 1), ("60000/m", 20)]
        {
            let rate: Rate = text.parse().unwrap();
            assert_eq!(burst(rate), b, "{text}");
        }
    }

    #[test]
    fn the_sustained_intervals_never_fall_short_of_the_period() {
        // After a burst of b, the next count - b requests come one interval apart: the last of
        // them must not fit inside the period that began with the burst.
        for text in ["1/s", "7/s", "10/s", "20/s", "100/s", "333/s", "1000/s", "60000/m", "7/m", "3600/h"] {
            let rate: Rate = text.parse().unwrap();
            let sustained = rate.count - burst(rate) + 1;
            assert!(interval(rate) * sustained >= rate.period, "{text}: {:?}", interval(rate));
        }
    }

    /// Every slot [`Limiter::acquire`] hands out, in milliseconds from the start, when `workers`
    /// ask at once and then each asks again the moment it is served.
    async fn slots(rate: Rate, total: usize) -> Vec<u64> {
        let limiter = Limiter::new(rate);
        let start = Instant::now();
        let mut times = Vec::with_capacity(total);
        for _ in 0..total {
            limiter.acquire().await;
            times.push(u64::try_from((Instant::now() - start).as_millis()).unwrap());
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn the_schedule_bursts_at_high_rates_and_spaces_low_ones() {
        let fast = slots("1000/s".parse().unwrap(), 3000).await;
        assert_eq!(fast.iter().take_while(|&&t| t == 0).count(), 20, "{:?}", &fast[..25]);
        assert!(max_in_any_window(&fast, 1000) <= 1000);
        let slow = slots("10/s".parse().unwrap(), 30).await;
        assert_eq!(slow.iter().take_while(|&&t| t == 0).count(), 1);
        assert!(slow.windows(2).all(|w| w[1] - w[0] >= 100), "{slow:?}");
        assert_eq!(max_in_any_window(&slow, 1000), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_holds_every_worker_and_only_grows() {
        let limiter = Arc::new(Limiter::new("1000/s".parse().unwrap()));
        let start = Instant::now();
        limiter.pause_for(Duration::from_secs(30));
        limiter.pause_for(Duration::from_secs(5));
        assert_eq!(limiter.paused_until(), Some(start + Duration::from_secs(30)), "max of both");

        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let limiter = Arc::clone(&limiter);
            workers.spawn(async move {
                limiter.acquire().await;
                Instant::now()
            });
        }
        while let Some(done) = workers.join_next().await {
            let at = done.unwrap();
            assert!(at >= start + Duration::from_secs(30), "released early at {:?}", at - start);
        }
        assert_eq!(limiter.paused_until(), None);
    }
}
