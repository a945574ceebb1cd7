//! The spending cap (`--max-credits`, `--max-cost`): spend is reserved before each submit so
//! concurrent workers can never overshoot together, and it starts from what the store says was
//! already spent, so the cap holds across restarts.

use std::sync::Mutex;

/// Spent plus reserved money, in the provider's unit, against an optional limit.
#[derive(Debug)]
pub struct Budget {
    limit: Option<f64>,
    used: Mutex<f64>,
}

/// Money set aside for one submit. Settle it with what was really charged, or release it.
#[derive(Debug)]
#[must_use = "a reservation must be charged or released"]
pub struct Reservation {
    amount: f64,
}

impl Budget {
    /// A budget that has already spent `spent` (from the store) of `limit`.
    #[must_use]
    pub fn new(limit: Option<f64>, spent: f64) -> Self {
        Self { limit, used: Mutex::new(spent) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, f64> {
        // A poisoned lock only means another worker panicked mid-update of a plain f64.
        self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets `amount` aside, or answers `None` when that would pass the limit.
    pub fn reserve(&self, amount: f64) -> Option<Reservation> {
        let mut used = self.lock();
        if let Some(limit) = self.limit {
            // A small epsilon so 0.04 * 25 == 1.00 fits a $1 cap despite float rounding.
            if *used + amount > limit + 1e-9 {
                return None;
            }
        }
        *used += amount;
        Some(Reservation { amount })
    }

    /// The submit was charged `charged`: replace the reservation with it.
    pub fn charge(&self, reservation: Reservation, charged: f64) {
        *self.lock() += charged - reservation.amount;
    }

    /// Nothing was charged: give the reservation back.
    pub fn release(&self, reservation: Reservation) {
        *self.lock() -= reservation.amount;
    }

    /// A later correction (a poll reported a different charge than estimated).
    pub fn adjust(&self, delta: f64) {
        *self.lock() += delta;
    }

    /// Spent plus reserved.
    #[must_use]
    pub fn used(&self) -> f64 {
        *self.lock()
    }

    /// The limit, if any.
    #[must_use]
    pub fn limit(&self) -> Option<f64> {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn reservations_never_pass_the_limit() {
        let b = Budget::new(Some(20.0), 4.0);
        let r1 = b.reserve(8.0).unwrap();
        let r2 = b.reserve(8.0).unwrap();
        assert!(b.reserve(8.0).is_none(), "4 + 8 + 8 + 8 > 20");
        b.release(r2);
        let r3 = b.reserve(8.0).unwrap();
        b.charge(r1, 6.0);
        b.charge(r3, 8.0);
        assert!((b.used() - 18.0).abs() < 1e-9);
    }

    #[test]
    fn float_rounding_does_not_refuse_the_last_exact_fit() {
        let b = Budget::new(Some(1.0), 0.0);
        for _ in 0..25 {
            let r = b.reserve(0.04).unwrap();
            b.charge(r, 0.04);
        }
        assert!(b.reserve(0.04).is_none());
    }

    #[test]
    fn no_limit_always_reserves() {
        let b = Budget::new(None, 1e12);
        assert!(b.reserve(1e12).is_some());
    }

    #[test]
    fn twenty_threads_never_overshoot() {
        let b = std::sync::Arc::new(Budget::new(Some(100.0), 0.0));
        let granted: usize = (0..20)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut n = 0;
                    while let Some(r) = b.reserve(8.0) {
                        b.charge(r, 8.0);
                        n += 1;
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
