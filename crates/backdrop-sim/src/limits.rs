//! The server limits a client has to discover: the limits in force at a moment (the configured
//! ones, changed by [`LimitChange`]s as the run goes on), the cap on generations in flight, and
//! fal's account queue, where submits beyond the account concurrency wait `IN_QUEUE` and start,
//! first in first out, the moment a running request completes.
//!
//! The queue is computed lazily and exactly: every reader first calls [`Limits::advance`], which
//! starts each waiting request at the instant a slot freed (a running request's `ready`), so
//! the answers do not depend on when anyone looked.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::faults::{Faults, LimitChange};
use super::{Sim, lock};

/// How far in the future a queued request's `started`/`ready` are set until it gets a slot.
const NOT_YET: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The limits in force at one moment (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Current {
    pub(crate) rate_limit_per_sec: Option<u32>,
    pub(crate) max_in_flight: Option<u32>,
    pub(crate) fal_concurrency: Option<u32>,
}

/// A fal request waiting for a slot of the account.
#[derive(Debug)]
struct Waiting {
    id: String,
    enqueued: Instant,
    run: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// Submits that passed the fault gate and are being charged: counted against the cap on
    /// generations in flight until they are inserted (or refused for the balance).
    reserved: u64,
    waiting: VecDeque<Waiting>,
    /// When each request holding an account slot completes.
    running: BinaryHeap<Reverse<Instant>>,
    peak_waiting: u64,
    /// Seconds of account slots in use, summed over requests that started.
    slot_secs: f64,
}

/// Limit bookkeeping shared by every handler.
#[derive(Debug)]
pub(crate) struct Limits {
    base: Current,
    changes: Vec<LimitChange>,
    /// A cap on generations in flight exists at some point of the run: submits reserve.
    capped: bool,
    /// fal's account queue exists at some point of the run.
    queued: bool,
    state: Mutex<State>,
    rate_limited: AtomicU64,
    too_many_in_flight: AtomicU64,
}

/// A change's value: `0` lifts the limit.
fn lifted(v: u32) -> Option<u32> {
    (v > 0).then_some(v)
}

impl Limits {
    pub(crate) fn new(faults: &Faults) -> Self {
        let changes = faults.limit_changes.clone();
        Self {
            base: Current {
                rate_limit_per_sec: faults.rate_limit_per_sec,
                max_in_flight: faults.max_in_flight,
                fal_concurrency: faults.fal_concurrency,
            },
            capped: faults.max_in_flight.is_some() || changes.iter().any(|c| c.max_in_flight.is_some()),
            queued: faults.fal_concurrency.is_some() || changes.iter().any(|c| c.fal_concurrency.is_some()),
            changes,
            state: Mutex::new(State::default()),
            rate_limited: AtomicU64::new(0),
            too_many_in_flight: AtomicU64::new(0),
        }
    }

    /// Whether fal requests go through the account queue in this run.
    pub(crate) fn queues_fal(&self) -> bool {
        self.queued
    }

    /// The limits in force `elapsed` after the start, once `submits` submits have arrived.
    pub(crate) fn at(&self, elapsed: Duration, submits: u64) -> Current {
        let mut current = self.base;
        let t = elapsed.as_secs_f64();
        for change in &self.changes {
            let reached = change.after_secs.is_some_and(|s| t >= s)
                || change.after_submits.is_some_and(|n| submits >= n);
            if reached {
                if let Some(v) = change.rate_limit_per_sec {
                    current.rate_limit_per_sec = lifted(v);
                }
                if let Some(v) = change.max_in_flight {
                    current.max_in_flight = lifted(v);
                }
                if let Some(v) = change.fal_concurrency {
                    current.fal_concurrency = lifted(v);
                }
            }
        }
        current
    }

    /// The limits in force now.
    pub(crate) fn now(&self, sim: &Sim, now: Instant, submits: u64) -> Current {
        if self.changes.is_empty() {
            return self.base;
        }
        self.at(now.saturating_duration_since(sim.started), submits)
    }

    /// Counts a rate-limit 429.
    pub(crate) fn count_rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether one more generation fits under `cap`; if so it is reserved until
    /// [`Limits::admit`] or [`Limits::release`]. Submits past the fault gate always call one
    /// of them, so a reservation never leaks.
    pub(crate) fn reserve(&self, sim: &Sim, cap: Option<u32>) -> bool {
        if !self.capped {
            return true;
        }
        let mut state = lock(&self.state);
        if let Some(cap) = cap
            && sim.in_flight() + state.reserved >= u64::from(cap)
        {
            self.too_many_in_flight.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        state.reserved += 1;
        true
    }

    /// A reserved submit was refused for its balance: nothing was inserted.
    pub(crate) fn release(&self) {
        if self.capped {
            let mut state = lock(&self.state);
            state.reserved = state.reserved.saturating_sub(1);
        }
    }

    /// Inserts an accepted generation (through `insert`, which counts it in flight) in place of
    /// its reservation, atomically with respect to [`Limits::reserve`]. A fal request joins the
    /// account queue when there is one; it returns `(started, ready)` as they stand after the
    /// queue moved.
    pub(crate) fn admit(
        &self,
        sim: &Sim,
        id: &str,
        fal: bool,
        now: Instant,
        run: Duration,
        insert: impl FnOnce(),
    ) -> Option<(Instant, Instant)> {
        let queued = self.queued && fal;
        if !self.capped && !queued {
            insert();
            return None;
        }
        let mut state = lock(&self.state);
        insert();
        if self.capped {
            state.reserved = state.reserved.saturating_sub(1);
        }
        if !queued {
            return None;
        }
        state.waiting.push_back(Waiting { id: id.to_owned(), enqueued: now, run });
        state.peak_waiting = state.peak_waiting.max(state.waiting.len() as u64);
        self.advance_locked(sim, &mut state, now);
        sim.with_gen(id, |g| (g.started, g.ready))
    }

    /// The `started`/`ready` a request waiting in the account queue has.
    pub(crate) fn not_yet(now: Instant) -> Instant {
        now + NOT_YET
    }

    /// Starts every waiting request whose slot has freed by `now`, at the instant it freed.
    pub(crate) fn advance(&self, sim: &Sim, now: Instant) {
        if self.queued {
            let mut state = lock(&self.state);
            self.advance_locked(sim, &mut state, now);
        }
    }

    fn advance_locked(&self, sim: &Sim, state: &mut State, now: Instant) {
        // A change of the account concurrency applies to the queue from the moment it is read.
        let limit = self.now(sim, now, sim.submits()).fal_concurrency;
        loop {
            let Some(front) = state.waiting.front() else {
                // Nobody waits for the slots that freed: forget them.
                while state.running.peek().is_some_and(|Reverse(t)| *t <= now) {
                    state.running.pop();
                }
                return;
            };
            let enqueued = front.enqueued;
            let start = match limit {
                Some(k) if state.running.len() >= k as usize => match state.running.peek() {
                    Some(Reverse(free)) if *free <= now => {
                        let free = *free;
                        state.running.pop();
                        free.max(enqueued)
                    }
                    _ => return,
                },
                _ => enqueued,
            };
            let Some(w) = state.waiting.pop_front() else { return };
            let ready = start + w.run;
            state.running.push(Reverse(ready));
            state.slot_secs += w.run.as_secs_f64();
            sim.with_gen(&w.id, |g| {
                g.started = start;
                g.ready = ready;
            });
        }
    }

    /// The queue position of request `id` (0: next to start) after the queue moved to `now`;
    /// `None` when it is not waiting.
    pub(crate) fn position(&self, sim: &Sim, id: &str, now: Instant) -> Option<u64> {
        if !self.queued {
            return None;
        }
        let mut state = lock(&self.state);
        self.advance_locked(sim, &mut state, now);
        state.waiting.iter().position(|w| w.id == id).map(|p| p as u64)
    }

    /// When the next running request completes (the queue can move then), if any is waiting.
    pub(crate) fn next_move(&self) -> Option<Instant> {
        let state = lock(&self.state);
        if state.waiting.is_empty() {
            return None;
        }
        state.running.peek().map(|Reverse(t)| *t)
    }

    /// Takes a cancelled request out of the queue (it never runs, so it frees no slot).
    pub(crate) fn forget(&self, id: &str) {
        if self.queued {
            lock(&self.state).waiting.retain(|w| w.id != id);
        }
    }

    /// When request `id` will be ready, waiting (without holding anything) while it is still in
    /// the account queue; `None` if it is unknown or the simulator is shutting down.
    pub(crate) async fn ready_at(&self, sim: &Sim, id: &str) -> Option<Instant> {
        loop {
            let now = Instant::now();
            self.advance(sim, now);
            let ready = sim.with_gen(id, |g| (!g.cancelled).then_some(g.ready)).flatten()?;
            if ready < now + NOT_YET / 2 {
                return Some(ready);
            }
            let wake = self
                .next_move()
                .unwrap_or(now + Duration::from_millis(50))
                .max(now + Duration::from_millis(1));
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
                () = sim.shutdown.cancelled() => return None,
            }
        }
    }

    fn report(&self, sim: &Sim) -> LimitsReport {
        let now = Instant::now();
        self.advance(sim, now);
        let current = self.now(sim, now, sim.submits());
        let state = lock(&self.state);
        let running = state.running.iter().filter(|Reverse(t)| *t > now).count() as u64;
        LimitsReport {
            current,
            in_flight: sim.in_flight(),
            fal_running: running,
            fal_queued: state.waiting.len() as u64,
            peak_fal_queued: state.peak_waiting,
            fal_slot_secs: state.slot_secs,
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            too_many_in_flight: self.too_many_in_flight.load(Ordering::Relaxed),
        }
    }
}

/// What `GET /__sim/limits` shows.
#[derive(Debug, Serialize)]
struct LimitsReport {
    /// The limits in force now.
    current: Current,
    /// Generations in flight now.
    in_flight: u64,
    /// fal requests holding an account slot now.
    fal_running: u64,
    /// fal requests waiting in the account queue now.
    fal_queued: u64,
    /// Most fal requests waiting at once.
    peak_fal_queued: u64,
    /// Seconds of account slots used by the requests that started.
    fal_slot_secs: f64,
    /// Submits answered 429 for the rate limit.
    rate_limited: u64,
    /// Submits answered 429 for the cap on generations in flight.
    too_many_in_flight: u64,
}

/// `GET /__sim/limits`: the limits in force, the in-flight count, fal's queue and the 429s by
/// cause.
pub(crate) async fn report(axum::extract::State(sim): axum::extract::State<Arc<Sim>>) -> Response {
    axum::Json(sim.limits.report(&sim)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_apply_in_order_and_zero_lifts_a_limit() {
        let faults = Faults {
            rate_limit_per_sec: Some(8),
            limit_changes: vec![
                LimitChange::parse("at=10s,rate=4,in-flight=3").unwrap(),
                LimitChange::parse("submits=100,rate=0").unwrap(),
            ],
            ..Faults::default()
        };
        let limits = Limits::new(&faults);
        let at = |secs, submits| limits.at(Duration::from_secs(secs), submits);
        assert_eq!(at(0, 0).rate_limit_per_sec, Some(8));
        assert_eq!(at(0, 0).max_in_flight, None);
        assert_eq!(at(10, 0).rate_limit_per_sec, Some(4));
        assert_eq!(at(10, 0).max_in_flight, Some(3));
        assert_eq!(at(10, 100).rate_limit_per_sec, None, "lifted");
        assert_eq!(at(0, 100).rate_limit_per_sec, None);
        assert!(limits.capped && !limits.queued);
    }

    #[test]
    fn limit_changes_parse_and_refuse_nonsense() {
        let c = LimitChange::parse("at=1.5s,fal-concurrency=2").unwrap();
        assert_eq!((c.after_secs, c.fal_concurrency), (Some(1.5), Some(2)));
        assert!(LimitChange::parse("rate=4").is_err(), "no trigger");
        assert!(LimitChange::parse("at=1s").is_err(), "nothing changes");
        assert!(LimitChange::parse("at=1s,submits=3,rate=1").is_err(), "two triggers");
        assert!(LimitChange::parse("at=1s,speed=1").is_err());
    }
}
