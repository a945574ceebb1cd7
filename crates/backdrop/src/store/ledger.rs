//! Money per run, from the attempts table: what each run was charged (the provider answered with
//! a request id or a result) and what it may have been charged ([`RunSpend::possibly_charged`]:
//! paid requests that left with no answer the API itself wrote, or that were in the air when the
//! process died), and what a run inherits from killed runs before it ([`Store::carried_spend`]).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Store, StoreError};
use crate::domain::ProviderKind;
use crate::money::{PriceTable, Unit};

/// What one run spent, in its provider's unit (seedance credits, fal dollars).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSpend {
    /// `runs.id`.
    pub run_id: i64,
    /// Start, unix ms.
    pub started_at: i64,
    /// End, unix ms; `None` while it runs, or when it was killed before recording its end.
    pub ended_at: Option<i64>,
    /// How it ended (`done`, `budget`, `interrupted`...); `None` like `ended_at`.
    pub outcome: Option<String>,
    /// `seedance` or `fal`: the unit of the amounts.
    pub provider: String,
    /// Charged: the provider answered its submits with a request id or a result.
    pub spent: f64,
    /// `spent` in dollars.
    pub spent_usd: f64,
    /// The price of its submits that may have been charged: the request left, and neither a
    /// request id nor an answer the API itself wrote came back (a gateway's page, a timeout, a
    /// dropped connection, the process killed mid-submit). Priced at the row's current model.
    pub possibly_charged: f64,
    /// `possibly_charged` in dollars.
    pub possibly_charged_usd: f64,
    /// How many submits may have been charged.
    pub possibly_charged_requests: u64,
    /// Of those, how many have no price (their model is not in the price table): they are not in
    /// `possibly_charged`.
    pub unpriced_requests: u64,
}

impl RunSpend {
    /// Spent plus possibly charged: the most this run may have cost.
    #[must_use]
    pub fn at_most(&self) -> f64 {
        self.spent + self.possibly_charged
    }
}

/// What a run inherits from the killed runs just before it (see [`Store::carried_spend`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Carried {
    /// The killed runs, oldest first.
    pub runs: Vec<i64>,
    /// What they were charged, in the provider's unit.
    pub spent: f64,
    /// What they may have been charged.
    pub possibly_charged: f64,
    /// Their submits that may have been charged but have no price.
    pub unpriced_requests: u64,
}

impl Carried {
    /// Spent plus possibly charged.
    #[must_use]
    pub fn total(&self) -> f64 {
        self.spent + self.possibly_charged
    }
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: i64,
    started_at: i64,
    ended_at: Option<i64>,
    outcome: Option<String>,
    provider: String,
}

/// Submits of one run that may have been charged, grouped by what prices them.
#[derive(sqlx::FromRow)]
struct ExposedRow {
    run_id: i64,
    provider: String,
    model: String,
    images: i64,
    requests: i64,
}

/// The `WHERE` of a submit that may have been charged: no charge recorded, and either it ended
/// ambiguous or it never ended (in the air now, or when the process died).
const POSSIBLY_CHARGED: &str = "a.credits IS NULL AND (a.error_class = 'ambiguous' OR a.finished_at IS NULL)";

impl Store {
    /// Money per run, oldest first (dry runs, which send nothing, are left out). `prices` is the
    /// config's `[prices]`, over the built-in table.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`] for a provider backdrop does not know.
    pub async fn run_spends(&self, prices: &BTreeMap<String, f64>) -> Result<Vec<RunSpend>, StoreError> {
        let runs: Vec<RunRow> = sqlx::query_as(
            "SELECT id, started_at, ended_at, outcome, provider FROM runs WHERE dry_run = 0 ORDER BY id",
        )
        .fetch_all(self.pool())
        .await?;
        let charged: BTreeMap<i64, f64> = sqlx::query_as::<_, (i64, f64)>(
            "SELECT run_id, COALESCE(SUM(credits), 0.0) FROM attempts WHERE run_id IS NOT NULL GROUP BY run_id",
        )
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .collect();
        let sql = format!(
            "SELECT a.run_id, j.provider, j.model,
                    COALESCE(json_extract(j.params, '$.num_images'), 1) AS images, COUNT(*) AS requests
             FROM attempts a JOIN jobs j ON j.id = a.job_id
             WHERE a.run_id IS NOT NULL AND {POSSIBLY_CHARGED}
             GROUP BY 1, 2, 3, 4"
        );
        let exposed: Vec<ExposedRow> = sqlx::query_as(&sql).fetch_all(self.pool()).await?;
        let mut tables: BTreeMap<String, PriceTable> = BTreeMap::new();
        let mut spends = Vec::with_capacity(runs.len());
        for RunRow { id: run_id, started_at, ended_at, outcome, provider } in runs {
            let unit = Unit::of(parse_provider(&provider)?);
            let spent = charged.get(&run_id).copied().unwrap_or(0.0);
            let mut possibly = 0.0;
            let (mut requests, mut unpriced) = (0, 0);
            for e in exposed.iter().filter(|e| e.run_id == run_id) {
                let count = u64::try_from(e.requests).unwrap_or(0);
                let images = u64::try_from(e.images).unwrap_or(1).max(1);
                requests += count;
                let kind = parse_provider(&e.provider)?;
                let table = tables.entry(e.provider.clone()).or_insert_with(|| PriceTable::new(kind, prices));
                match table.images_price(&e.model, images.saturating_mul(count)) {
                    // A row of another provider in this run's list would be a bug elsewhere;
                    // its amount is still counted, in this run's unit.
                    Some(amount) => possibly += unit.from_dollars(table.to_dollars(amount)),
                    None => unpriced += count,
                }
            }
            spends.push(RunSpend {
                run_id,
                started_at,
                ended_at,
                outcome,
                provider,
                spent,
                spent_usd: unit.to_dollars(spent),
                possibly_charged: possibly,
                possibly_charged_usd: unit.to_dollars(possibly),
                possibly_charged_requests: requests,
                unpriced_requests: unpriced,
            });
        }
        Ok(spends)
    }

    /// What run `run_id` inherits against its cap: the spend, charged and possibly charged, of the
    /// runs just before it that never recorded their end. Such a run was killed (SIGKILL, power
    /// loss, a crash, a forced second Ctrl-C): no one decided to stop it, so the run that picks up
    /// its work continues its budget instead of starting a fresh one, and a crash loop cannot
    /// spend a cap per restart. A run that ended (done, budget, out of credits, interrupted by
    /// one signal, failed) leaves the next run a fresh cap.
    ///
    /// # Errors
    /// A database error, or [`StoreError::Corrupt`].
    pub async fn carried_spend(
        &self,
        run_id: i64,
        prices: &BTreeMap<String, f64>,
    ) -> Result<Carried, StoreError> {
        let spends = self.run_spends(prices).await?;
        let mut carried = Carried::default();
        for run in spends.iter().rev().filter(|r| r.run_id < run_id) {
            if run.ended_at.is_some() {
                break;
            }
            carried.runs.insert(0, run.run_id);
            carried.spent += run.spent;
            carried.possibly_charged += run.possibly_charged;
            carried.unpriced_requests += run.unpriced_requests;
        }
        Ok(carried)
    }
}

fn parse_provider(name: &str) -> Result<ProviderKind, StoreError> {
    name.parse::<ProviderKind>()
        .map_err(|_| StoreError::Corrupt(format!("unknown provider {name:?} in runs")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    async fn fixture() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        (dir, store)
    }

    async fn job(store: &Store, sku: &str, model: &str, images: u32) -> i64 {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO jobs (sku, position, fingerprint, provider, model, task, prompt, inputs, params,
                               created_at, updated_at)
             VALUES (?, 1, 'f', 'seedance', ?, 'edit', 'p', '[]', ?, 0, 0) RETURNING id",
        )
        .bind(sku)
        .bind(model)
        .bind(format!("{{\"num_images\":{images}}}"))
        .fetch_one(store.pool())
        .await
        .unwrap();
        id
    }

    /// An attempt of `job` in `run`: charged `credits`, or ended with `class`, or still open.
    async fn attempt(
        store: &Store,
        job: i64,
        run: i64,
        credits: Option<f64>,
        class: Option<&str>,
        open: bool,
    ) {
        sqlx::query(
            "INSERT INTO attempts (job_id, run_id, number, started_at, finished_at, error_class, credits)
             VALUES (?, ?, 1, 0, ?, ?, ?)",
        )
        .bind(job)
        .bind(run)
        .bind((!open).then_some(1_i64))
        .bind(class)
        .bind(credits)
        .execute(store.pool())
        .await
        .unwrap();
    }

    async fn end(store: &Store, run: i64, outcome: &str) {
        store.finish_run(run, outcome, 0, "{}").await.unwrap();
    }

    #[tokio::test]
    async fn each_run_has_its_charges_and_its_possible_charges() {
        let (_dir, store) = fixture().await;
        let none = BTreeMap::new();
        let r1 = store.start_run("c.csv", "seedance", "seedream-v4-5", false).await.unwrap();
        let a = job(&store, "A", "seedream-v4-5", 1).await;
        let b = job(&store, "B", "seedream-v4-5", 2).await;
        let c = job(&store, "C", "new-model", 1).await;
        attempt(&store, a, r1, Some(8.0), None, false).await;
        attempt(&store, b, r1, None, Some("ambiguous"), false).await; // 2 images: 16 credits
        attempt(&store, c, r1, None, None, true).await; // in the air, unpriced
        attempt(&store, a, r1, None, Some("retry"), false).await; // the API said: not charged
        end(&store, r1, "rows_failed").await;
        let dry = store.start_run("c.csv", "seedance", "seedream-v4-5", true).await.unwrap();
        let r2 = store.start_run("c.csv", "seedance", "seedream-v4-5", false).await.unwrap();
        attempt(&store, b, r2, Some(16.0), None, false).await;
        let spends = store.run_spends(&none).await.unwrap();
        assert_eq!(spends.iter().map(|s| s.run_id).collect::<Vec<_>>(), [r1, r2], "dry run {dry} left out");
        let s1 = &spends[0];
        assert!((s1.spent - 8.0).abs() < 1e-9);
        assert!((s1.possibly_charged - 16.0).abs() < 1e-9, "{s1:?}");
        assert_eq!((s1.possibly_charged_requests, s1.unpriced_requests), (2, 1));
        assert!((s1.at_most() - 24.0).abs() < 1e-9);
        assert!((s1.possibly_charged_usd - 0.16).abs() < 1e-9);
        let s2 = &spends[1];
        assert!((s2.spent - 16.0).abs() < 1e-9 && s2.possibly_charged == 0.0, "{s2:?}");
        // With a price for the new model, its request in the air counts too.
        let priced = BTreeMap::from([("new-model".to_owned(), 5.0)]);
        let s1 = store.run_spends(&priced).await.unwrap().remove(0);
        assert!((s1.possibly_charged - 21.0).abs() < 1e-9 && s1.unpriced_requests == 0, "{s1:?}");
    }

    #[tokio::test]
    async fn killed_runs_carry_their_spend_into_the_next_run_and_ended_runs_do_not() {
        let (_dir, store) = fixture().await;
        let none = BTreeMap::new();
        let a = job(&store, "A", "seedream-v4-5", 1).await;
        let r1 = store.start_run("c.csv", "seedance", "m", false).await.unwrap();
        attempt(&store, a, r1, Some(8.0), None, false).await;
        end(&store, r1, "budget").await;
        let r2 = store.start_run("c.csv", "seedance", "m", false).await.unwrap();
        assert_eq!(store.carried_spend(r2, &none).await.unwrap(), Carried::default(), "r1 ended");
        attempt(&store, a, r2, Some(8.0), None, false).await;
        attempt(&store, a, r2, None, Some("ambiguous"), false).await;
        // r2 is killed; r3 is killed too; r4 inherits both.
        let r3 = store.start_run("c.csv", "seedance", "m", false).await.unwrap();
        attempt(&store, a, r3, None, None, true).await;
        let r4 = store.start_run("c.csv", "seedance", "m", false).await.unwrap();
        let carried = store.carried_spend(r4, &none).await.unwrap();
        assert_eq!(carried.runs, [r2, r3]);
        assert!((carried.spent - 8.0).abs() < 1e-9);
        assert!((carried.possibly_charged - 16.0).abs() < 1e-9);
        assert!((carried.total() - 24.0).abs() < 1e-9);
    }
}
