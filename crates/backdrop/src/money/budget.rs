//! The spending cap of one run (`--max-credits`, `--max-cost`): spend is reserved before each
//! submit so concurrent workers can never overshoot together, a submit that may have been charged
//! keeps its reservation, and the run starts from what killed runs before it spent or may have
//! spent (the store works that out), so a crash and its restart stay under one cap.

use std::sync::Mutex;

/// Spent and reserved money, in the provider's unit, against an optional limit.
#[derive(Debug)]
pub struct Budget {
    limit: Option<f64>,
    used: Mutex<Used>,
    /// Woken whenever a reservation is settled, so a worker refused only because of other
    /// workers' pending reservations can try again.
    settled: tokio::sync::Notify,
}

#[derive(Debug, Default, Clone, Copy)]
struct Used {
    spent: f64,
    reserved: f64,
}

/// What [`Budget::try_reserve`] decided.
#[derive(Debug)]
pub enum Decision {
    /// Reserved.
    Granted(Reservation),
    /// Not now: other reservations may still be released.
    Wait,
    /// Never: what is already spent leaves no room.
    Exhausted,
}

/// Money set aside for one submit. Settle it with what was really charged, or release it.
#[derive(Debug)]
#[must_use = "a reservation must be charged or released"]
pub struct Reservation {
    amount: f64,
}

impl Budget {
    /// A budget that has already spent `spent` of `limit` (what killed runs before this one
    /// spent or may have spent).
    #[must_use]
    pub fn new(limit: Option<f64>, spent: f64) -> Self {
        Self { limit, used: Mutex::new(Used { spent, reserved: 0.0 }), settled: tokio::sync::Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Used> {
        // A poisoned lock only means another worker panicked mid-update of two plain f64s.
        self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets `amount` aside if spent plus reserved leaves room for it.
    pub fn try_reserve(&self, amount: f64) -> Decision {
        let mut used = self.lock();
        if let Some(limit) = self.limit {
            // A small epsilon so 0.04 * 25 == 1.00 fits a $1 cap despite float rounding.
            if used.spent + amount > limit + 1e-9 {
                return Decision::Exhausted;
            }
            if used.spent + used.reserved + amount > limit + 1e-9 {
                return Decision::Wait;
            }
        }
        used.reserved += amount;
        Decision::Granted(Reservation { amount })
    }

    /// Sets `amount` aside, waiting while other workers' reservations might still be released;
    /// answers `None` once what is really spent leaves no room.
    pub async fn reserve(&self, amount: f64) -> Option<Reservation> {
        loop {
            // Registered before the check, so a settlement between the check and the wait is
            // not missed.
            let settled = self.settled.notified();
            match self.try_reserve(amount) {
                Decision::Granted(r) => return Some(r),
                Decision::Exhausted => return None,
                Decision::Wait => settled.await,
            }
        }
    }

    /// The submit was charged `charged`: replace the reservation with it.
    pub fn charge(&self, reservation: Reservation, charged: f64) {
        {
            let mut used = self.lock();
            used.reserved -= reservation.amount;
            used.spent += charged;
        }
        self.settled.notify_waiters();
    }

    /// Nothing was charged: give the reservation back.
    pub fn release(&self, reservation: Reservation) {
        self.lock().reserved -= reservation.amount;
        self.settled.notify_waiters();
    }

    /// A later correction (a poll reported a different charge than estimated).
    pub fn adjust(&self, delta: f64) {
        self.lock().spent += delta;
        self.settled.notify_waiters();
    }

    /// Spent plus reserved.
    #[must_use]
    pub fn used(&self) -> f64 {
        let used = *self.lock();
        used.spent + used.reserved
    }

    /// The limit, if any.
    #[must_use]
    pub fn limit(&self) -> Option<f64> {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, Decision, Reservation};

    fn granted(d: Decision) -> Reservation {
        match d {
            Decision::Granted(r) => r,
            other => panic!("expected a reservation, got {other:?}"),
        }
    }

    #[test]
    fn reservations_never_pass_the_limit() {
        let b = Budget::new(Some(20.0), 4.0);
        let r1 = granted(b.try_reserve(8.0));
        let r2 = granted(b.try_reserve(8.0));
        assert!(
            matches!(b.try_reserve(8.0), Decision::Wait),
            "4 + 8 + 8 + 8 > 20, but reservations may go back"
        );
        b.release(r2);
        let r3 = granted(b.try_reserve(8.0));
        b.charge(r1, 6.0);
        b.charge(r3, 8.0);
        assert!((b.used() - 18.0).abs() < 1e-9);
        assert!(matches!(b.try_reserve(8.0), Decision::Exhausted), "18 spent + 8 > 20 for good");
    }

    #[test]
    fn float_rounding_does_not_refuse_the_last_exact_fit() {
        let b = Budget::new(Some(1.0), 0.0);
        for _ in 0..25 {
            let r = granted(b.try_reserve(0.04));
            b.charge(r, 0.04);
        }
        assert!(matches!(b.try_reserve(0.04), Decision::Exhausted));
    }

    #[test]
    fn no_limit_always_reserves() {
        let b = Budget::new(None, 1e12);
        let r = granted(b.try_reserve(1e12));
        b.charge(r, 1e12);
    }

    #[tokio::test]
    async fn a_waiting_reservation_goes_through_when_another_is_released() {
        let b = std::sync::Arc::new(Budget::new(Some(10.0), 0.0));
        let held = granted(b.try_reserve(8.0));
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(8.0).await.is_some() }
        });
        tokio::task::yield_now().await;
        b.release(held);
        assert!(waiter.await.unwrap(), "the released room is granted");
        let b2 = Budget::new(Some(10.0), 0.0);
        let r = granted(b2.try_reserve(8.0));
        b2.charge(r, 8.0);
        assert!(b2.reserve(8.0).await.is_none(), "spent money is never released");
    }

    #[test]
    fn twenty_threads_never_overshoot() {
        let b = std::sync::Arc::new(Budget::new(Some(100.0), 0.0));
        let granted: usize = (0..20)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut n = 0;
                    loop {
                        match b.try_reserve(8.0) {
                            Decision::Granted(r) => {
                                b.charge(r, 8.0);
                                n += 1;
                            }
                            Decision::Wait => std::thread::yield_now(),
                            Decision::Exhausted => break,
                        }
                    }
                    n
                })
            })
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(granted, 12, "floor(100 / 8)");
        assert!(b.used() <= 100.0);
    }
}
