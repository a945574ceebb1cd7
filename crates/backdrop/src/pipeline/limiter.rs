//! One limiter for the pace of submits: governor enforces the user's ceiling where each request
//! leaves, and one adaptive controller ([`AdaptiveRate`]) paces below it, on a drift-free
//! schedule of slots, from the server's answers ([`Limiter::on_success`], [`Limiter::on_429`]).
//! A server's `Retry-After` is also a shared "not before" gate every worker honours. Beside it,
//! [`Window`] holds the adaptive window of jobs in flight ([`AdaptiveConcurrency`]).
//!
//! Every clock here is tokio's (governor's through [`TokioClock`]), so paused-time tests drive
//! the ceiling, the pace and the gate together.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::adaptive::{AdaptiveConcurrency, AdaptiveRate};
use crate::domain::Rate;

/// governor's clock on tokio's time: the real monotonic clock in a run, the paused one in tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        Instant::now().into_std()
    }
}

/// The ceiling's limiter.
type Ceiling = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// Paces every submit of a run; share it through an `Arc`.
#[derive(Debug)]
pub struct Limiter {
    /// The user's ceiling, checked where each request leaves: the server never sees more.
    ceiling: Ceiling,
    /// Nobody sends before this instant.
    not_before: Mutex<Option<Instant>>,
    /// The waiter whose turn it is to take the next slot.
    turn: tokio::sync::Mutex<()>,
    pace: Mutex<Pace>,
    /// Slot spacing at the ceiling: the sustained interval plus [`PACING_MARGIN`].
    ceiling_spacing: Duration,
    /// How far ahead of the schedule a slot may be taken at the ceiling: `burst - 1` spacings.
    tolerance: Duration,
}

/// The adaptive pace and its schedule.
#[derive(Debug)]
struct Pace {
    adaptive: AdaptiveRate,
    /// The schedule's theoretical arrival time: when the next slot would be with no burst left.
    next_slot: Option<Instant>,
}

/// How much wider than the sustained interval the slots are (2%).
const PACING_MARGIN: f64 = 1.02;

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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
/// [`Limiter::acquire`] paces on a schedule of slots fixed in advance (a late wake does not move
/// the next slot), at the adaptive pace and never closer than `interval × 1.02`; governor itself
/// is checked at the send ([`Limiter::space_send`]), where the 2% lets it absorb a send held up
/// by up to `interval / 50` without slowing the rate, and leaves room for network jitter at the
/// server.
#[must_use]
pub fn quota(rate: Rate) -> Quota {
    let burst = NonZeroU32::new(burst(rate)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(interval(rate))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

impl Limiter {
    /// A limiter whose ceiling is `rate`; the pace starts there and adapts below it.
    #[must_use]
    pub fn new(rate: Rate) -> Self {
        let spacing = interval(rate).mul_f64(PACING_MARGIN);
        let per_second = f64::from(rate.count.max(1)) / rate.period.as_secs_f64().max(1e-9);
        Self {
            ceiling: RateLimiter::direct_with_clock(quota(rate), TokioClock),
            not_before: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
            pace: Mutex::new(Pace { adaptive: AdaptiveRate::new(per_second), next_slot: None }),
            ceiling_spacing: spacing,
            tolerance: spacing * (burst(rate) - 1),
        }
    }

    /// Holds every worker until `until` (a server's `Retry-After`). Keeps the later of the
    /// current gate and the new one, so a short wait never shortens a longer one.
    pub fn pause_until(&self, until: Instant) {
        let mut gate = locked(&self.not_before);
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
        let gate = *locked(&self.not_before);
        gate.filter(|g| *g > Instant::now())
    }

    /// The submit sent at `sent` was accepted: the pace may grow.
    pub fn on_success(&self, sent: Instant) {
        locked(&self.pace).adaptive.on_success(sent.into_std(), Instant::now().into_std());
    }

    /// The submit sent at `sent` was answered 429 about the rate, with `retry_after` (the
    /// server's, capped as the retry policy caps it): the pace drops, and every worker pauses
    /// until `Retry-After` has passed.
    pub fn on_429(&self, sent: Instant, retry_after: Option<Duration>) {
        let now = Instant::now();
        let pause = locked(&self.pace).adaptive.on_429(sent.into_std(), now.into_std(), retry_after);
        if let Some(until) = pause {
            self.pause_until(Instant::from_std(until));
        }
    }

    /// Submits per second the pace allows now.
    #[must_use]
    pub fn rate(&self) -> f64 {
        locked(&self.pace).adaptive.rate()
    }

    /// The user's ceiling, in submits per second.
    #[must_use]
    pub fn ceiling(&self) -> f64 {
        locked(&self.pace).adaptive.ceiling()
    }

    /// Since when the server has answered nothing but 429s about the rate, if it has.
    #[must_use]
    pub fn throttled_since(&self) -> Option<Instant> {
        locked(&self.pace).adaptive.throttled_since().map(Instant::from_std)
    }

    /// Waits until a request may be sent: first past the gate, then for a slot of the pace. If
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
            // Below the ceiling the spacing is the adaptive pace's, with no burst.
            let slot = {
                let mut pace = locked(&self.pace);
                let adaptive = pace.adaptive.interval();
                let (spacing, tolerance) = if adaptive > self.ceiling_spacing {
                    (adaptive, Duration::ZERO)
                } else {
                    (self.ceiling_spacing, self.tolerance)
                };
                let now = Instant::now();
                let tat = pace.next_slot.map_or(now, |n| n.max(now));
                pace.next_slot = Some(tat + spacing);
                tat.checked_sub(tolerance).map_or(now, |s| s.max(now))
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
    /// sends within the ceiling, so that variance cannot bunch them up at the server. With slots
    /// 2% wider this waits only when an earlier send was held up by more than that.
    pub async fn space_send(&self) {
        while let Err(not_until) = self.ceiling.check() {
            let wait = not_until.wait_time_from(self.ceiling.clock().now());
            tokio::time::sleep(wait).await;
        }
    }
}

/// The adaptive window of jobs in flight, below `--concurrency`: [`Window::acquire`] waits for
/// room, and the answers to submits move the window ([`AdaptiveConcurrency`]).
#[derive(Debug)]
pub struct Window {
    state: Mutex<WindowState>,
    room: tokio::sync::Notify,
}

#[derive(Debug)]
struct WindowState {
    adaptive: AdaptiveConcurrency,
    in_flight: u32,
}

/// One job's place in the window; dropping it frees the place.
#[derive(Debug)]
pub struct WindowPermit {
    window: Arc<Window>,
    /// Jobs in flight besides this one when it took its place.
    others: u32,
}

impl Window {
    /// A window that never exceeds `ceiling` jobs.
    #[must_use]
    pub fn new(ceiling: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(WindowState { adaptive: AdaptiveConcurrency::new(ceiling), in_flight: 0 }),
            room: tokio::sync::Notify::new(),
        })
    }

    /// Jobs that may be in flight now.
    #[must_use]
    pub fn limit(&self) -> u32 {
        locked(&self.state).adaptive.limit()
    }

    /// The user's ceiling on jobs in flight.
    #[must_use]
    pub fn ceiling(&self) -> u32 {
        locked(&self.state).adaptive.ceiling()
    }

    /// Jobs in flight now.
    #[must_use]
    pub fn in_flight(&self) -> u32 {
        locked(&self.state).in_flight
    }

    /// Waits for a place in the window.
    pub async fn acquire(self: &Arc<Self>) -> WindowPermit {
        loop {
            // Registered before the check, so a place freed in between is not missed.
            let room = self.room.notified();
            {
                let mut state = locked(&self.state);
                if state.in_flight < state.adaptive.limit() {
                    let others = state.in_flight;
                    state.in_flight += 1;
                    return WindowPermit { window: Arc::clone(self), others };
                }
            }
            room.await;
        }
    }

    /// The server accepted the permit's submit.
    pub fn on_accepted(&self, permit: &WindowPermit) {
        let mut state = locked(&self.state);
        state.adaptive.on_accepted(permit.others);
        drop(state);
        // The window may have grown.
        self.room.notify_waiters();
    }

    /// The server said "too many in flight" to the permit's submit, sent at `sent`; the
    /// permit's place is freed.
    pub fn on_too_many(&self, permit: WindowPermit, sent: Instant) {
        locked(&self.state).adaptive.on_too_many(sent.into_std(), permit.others);
        drop(permit);
    }

    /// A job sent at `sent` waits in the provider's queue at `position`.
    pub fn on_queued(&self, sent: Instant, position: u64) {
        let mut state = locked(&self.state);
        let in_flight = state.in_flight;
        state.adaptive.on_queued(sent.into_std(), position, in_flight);
    }
}

impl Drop for WindowPermit {
    fn drop(&mut self) {
        let mut state = locked(&self.window.state);
        state.in_flight = state.in_flight.saturating_sub(1);
        drop(state);
        self.window.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

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
    async fn governor_on_tokio_time_holds_the_ceiling_whatever_the_pace() {
        // Sends that skip the pacing entirely are still held to the ceiling where they leave.
        let limiter = Limiter::new("10/s".parse().unwrap());
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..50 {
            limiter.space_send().await;
            times.push(u64::try_from((Instant::now() - start).as_millis()).unwrap());
        }
        assert_eq!(max_in_any_window(&times, 1000), 10, "{times:?}");
        assert!(*times.last().unwrap() < 5_000, "not slower than the ceiling either: {times:?}");
    }

    /// A server that takes `limit` submits in any one second and answers the rest 429 with
    /// `Retry-After: 1`, on tokio's clock; it also records every submit it saw.
    #[derive(Default)]
    struct WindowServer {
        limit: usize,
        accepted: VecDeque<Instant>,
        seen: Vec<u64>,
        refused: usize,
    }

    impl WindowServer {
        fn submit(&mut self, start: Instant) -> Result<(), Duration> {
            let now = Instant::now();
            self.seen.push(u64::try_from((now - start).as_millis()).unwrap());
            while self.accepted.front().is_some_and(|a| now - *a >= Duration::from_secs(1)) {
                self.accepted.pop_front();
            }
            if self.accepted.len() < self.limit {
                self.accepted.push_back(now);
                Ok(())
            } else {
                self.refused += 1;
                Err(Duration::from_secs(1))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_finds_the_servers_rate_below_the_ceiling_which_governor_holds() {
        let limiter = Limiter::new("20/s".parse().unwrap());
        let mut server = WindowServer { limit: 8, ..WindowServer::default() };
        let start = Instant::now();
        let mut accepted_after_5s = 0;
        while Instant::now() - start < Duration::from_secs(60) {
            limiter.acquire().await;
            limiter.space_send().await;
            let sent = Instant::now();
            match server.submit(start) {
                Ok(()) => {
                    limiter.on_success(sent);
                    if sent - start >= Duration::from_secs(5) {
                        accepted_after_5s += 1;
                    }
                }
                Err(retry_after) => limiter.on_429(sent, Some(retry_after)),
            }
        }
        let share = f64::from(accepted_after_5s) / 55.0 / 8.0;
        let refused = server.refused as f64 / server.seen.len() as f64;
        println!(
            "ceiling 20/s, server 8/s with Retry-After: {:.1}% of 8/s after 5 s, {:.2}% of {} submits 429, pace now {:.2}/s",
            share * 100.0,
            refused * 100.0,
            server.seen.len(),
            limiter.rate()
        );
        assert!(share >= 0.9, "{share:.3}");
        assert!(refused <= 0.05, "{refused:.3}");
        assert!(max_in_any_window(&server.seen, 1000) <= 20, "the ceiling held at the server");
    }

    /// The server of the test below: a rate limit (a sliding window, `Retry-After: 1`) and a cap
    /// on jobs in flight (429 without `Retry-After`), each job taking 250 ms.
    struct Server {
        rate: WindowServer,
        cap: u32,
        in_flight: u32,
        refused_in_flight: usize,
        done: usize,
    }

    enum Answer {
        Accepted,
        Rate(Duration),
        InFlight,
    }

    async fn worker(
        limiter: Arc<Limiter>,
        window: Arc<Window>,
        server: Arc<Mutex<Server>>,
        start: Instant,
        until: Duration,
    ) {
        while Instant::now() - start < until {
            let permit = window.acquire().await;
            limiter.acquire().await;
            limiter.space_send().await;
            let sent = Instant::now();
            let answer = {
                let mut s = server.lock().unwrap();
                if s.in_flight >= s.cap {
                    s.refused_in_flight += 1;
                    Answer::InFlight
                } else {
                    match s.rate.submit(start) {
                        Ok(()) => {
                            s.in_flight += 1;
                            Answer::Accepted
                        }
                        Err(ra) => Answer::Rate(ra),
                    }
                }
            };
            match answer {
                Answer::Accepted => {
                    limiter.on_success(sent);
                    window.on_accepted(&permit);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let mut s = server.lock().unwrap();
                    s.in_flight -= 1;
                    if sent - start >= Duration::from_secs(5) {
                        s.done += 1;
                    }
                    drop(permit);
                }
                Answer::Rate(ra) => limiter.on_429(sent, Some(ra)),
                Answer::InFlight => window.on_too_many(permit, sent),
            }
        }
    }

    /// Runs 20 workers for 60 s against a server taking `rate` submits a second and `cap` jobs
    /// in flight; returns (jobs done per second after the first 5 s, share of submits 429).
    async fn against(rate: usize, cap: u32) -> (f64, f64) {
        let limiter = Arc::new(Limiter::new("100/s".parse().unwrap()));
        let window = Window::new(20);
        let server = Arc::new(Mutex::new(Server {
            rate: WindowServer { limit: rate, ..WindowServer::default() },
            cap,
            in_flight: 0,
            refused_in_flight: 0,
            done: 0,
        }));
        let start = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..20 {
            workers.spawn(worker(
                Arc::clone(&limiter),
                Arc::clone(&window),
                Arc::clone(&server),
                start,
                Duration::from_secs(60),
            ));
        }
        while workers.join_next().await.is_some() {}
        let s = server.lock().unwrap();
        let refused =
            (s.rate.refused + s.refused_in_flight) as f64 / (s.rate.seen.len() + s.refused_in_flight) as f64;
        (s.done as f64 / 55.0, refused)
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_and_the_window_together_find_whichever_limit_binds() {
        // A cap of 4 jobs of 250 ms allows 16/s; a rate limit of 50/s does not bind.
        let (per_sec, refused) = against(50, 4).await;
        println!("cap 4 × 250 ms (16/s), rate 50/s: {per_sec:.2} jobs/s, {:.2}% 429s", refused * 100.0);
        assert!(per_sec >= 0.85 * 16.0 && refused <= 0.10, "{per_sec} {refused}");
        // A rate limit of 8/s binds; a cap of 40 does not.
        let (per_sec, refused) = against(8, 40).await;
        println!("rate 8/s, cap 40: {per_sec:.2} jobs/s, {:.2}% 429s", refused * 100.0);
        assert!(per_sec >= 0.9 * 8.0 && refused <= 0.05, "{per_sec} {refused}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_waits_for_room_and_frees_it_on_drop() {
        let window = Window::new(3);
        let first = window.acquire().await;
        let second = window.acquire().await;
        assert_eq!((window.in_flight(), window.limit()), (2, 2), "slow start begins at 2");
        window.on_accepted(&second);
        assert_eq!(window.limit(), 3);
        let third = window.acquire().await;
        let waiting = {
            let window = Arc::clone(&window);
            tokio::spawn(async move { window.acquire().await.others })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "the window is full");
        window.on_too_many(third, Instant::now());
        assert_eq!(window.limit(), 2, "cut to the jobs in flight");
        drop(first);
        let others = tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();
        assert_eq!(others, 1);
        drop(second);
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
