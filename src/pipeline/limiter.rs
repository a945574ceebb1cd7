//! The shared request rate limit: one governor limiter (burst 1) that keeps consecutive submits at
//! least `period / count` apart, a drift-free schedule of slots 2% wider than that, and a "not
//! before" gate every worker honours, raised when a server answers 429 with `Retry-After` (a
//! governor quota cannot change at run time, so the slowdown is a shared instant instead).

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::Rate;

/// Paces every HTTP request of a run; share it through an `Arc`.
#[derive(Debug)]
pub struct Limiter {
    limiter: DefaultDirectRateLimiter,
    /// Nobody sends before this instant (a tokio instant, so paused-time tests can drive it).
    not_before: Mutex<Option<Instant>>,
    /// The waiter whose turn it is to take the next cell.
    turn: tokio::sync::Mutex<()>,
    /// The next slot of the schedule.
    next_slot: Mutex<Option<Instant>>,
    /// Slot spacing: the nominal interval plus [`PACING_MARGIN`].
    spacing: Duration,
}

/// How much wider than the nominal interval the slots are (2%).
const PACING_MARGIN: f64 = 1.02;

/// The governor quota for a rate: one request every `period / count`, burst 1.
///
/// governor's burst defaults to the rate itself, which would let `10/s` send 10 requests at once
/// after an idle second and then 10 more as the bucket refills: up to 20 in one second at the
/// server. With a burst of 1 consecutive requests are at least `period / count` apart, so a
/// half-open window of one period never holds more than `count`.
///
/// governor alone drifts, though: a worker that wakes a millisecond late pushes every later cell
/// a millisecond later too, and on a busy machine that costs several percent of the rate. So
/// [`Limiter::acquire`] keeps a schedule of slots `period / count × 1.02` apart, fixed in
/// advance: a late wake does not move the next slot. governor itself is checked at the send
/// ([`Limiter::space_send`]), where the 2% lets it absorb a send held up by up to `period / 50`
/// without slowing the rate, and `count + 1` slots always span more than a period, which leaves
/// room for network jitter at the server.
#[must_use]
pub fn quota(rate: Rate) -> Quota {
    let interval = (rate.period / rate.count.max(1)).max(Duration::from_nanos(1));
    Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(NonZeroU32::MIN)
}

impl Limiter {
    /// A limiter for `rate`.
    #[must_use]
    pub fn new(rate: Rate) -> Self {
        Self {
            limiter: RateLimiter::direct(quota(rate)),
            not_before: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
            next_slot: Mutex::new(None),
            spacing: (rate.period / rate.count.max(1)).mul_f64(PACING_MARGIN),
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
    /// new slot), so the workers released by a gate are still paced and not sent as one burst.
    pub async fn acquire(&self) {
        // One waiter at a time takes a slot, in arrival order (tokio's mutex is fair): no
        // thundering herd, and rows keep their catalog order.
        let _turn = self.turn.lock().await;
        loop {
            while let Some(gate) = self.paused_until() {
                tokio::time::sleep_until(gate).await;
            }
            let slot = {
                let mut next = self.next_slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let slot = next.map_or_else(Instant::now, |n| n.max(Instant::now()));
                *next = Some(slot + self.spacing);
                slot
            };
            tokio::time::sleep_until(slot).await;
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
