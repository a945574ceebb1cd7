//! Live counters of a run, shared by the workers, the progress bar and the final summary.
//! Plain atomics: workers bump them, readers sample them; the store stays the source of truth.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for the run in progress.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Rows this run set out to process (resumed + claimable, capped by --limit).
    pub total: AtomicU64,
    /// Rows that reached `done` in this run.
    pub done: AtomicU64,
    /// Rows that failed in this run.
    pub failed: AtomicU64,
    /// Rows turned ambiguous in this run.
    pub ambiguous: AtomicU64,
    /// Rows the quality gate held for review in this run.
    pub review: AtomicU64,
    /// Jobs in flight now (submit to download).
    pub in_flight: AtomicU64,
    /// Retries scheduled (submits and downloads).
    pub retries: AtomicU64,
    /// Submissions sent.
    pub submits: AtomicU64,
    /// Submissions answered 429 (not taken, nothing charged; sent again later).
    pub throttled: AtomicU64,
    /// Money charged in this run, in millionths of the provider's unit.
    spent_micros: AtomicU64,
}

impl RunStats {
    /// Adds a charge.
    pub fn add_spent(&self, amount: f64) {
        if amount > 0.0 {
            // Rounded to millionths: credits and cents are far coarser than that.
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "positive, bounded")]
            let micros = (amount * 1e6).round() as u64;
            self.spent_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// Money charged in this run.
    #[must_use]
    pub fn spent(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "display only")]
        let v = self.spent_micros.load(Ordering::Relaxed) as f64;
        v / 1e6
    }

    /// Reads a counter.
    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Bumps a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
