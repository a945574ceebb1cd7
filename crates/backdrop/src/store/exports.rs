//! The `exports` table: the files export presets made from each output ([`ExportRecord`]),
//! which rows still lack some ([`Store::export_candidates`]), and the presets and output folder
//! the latest run used (`export_settings`), which `backdrop accept` makes a row's exports with.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use sqlx::FromRow;

use super::{Store, StoreError};
use crate::domain::{SavedExport, SavedOutput};

/// Records one export file, replacing what the same output and preset had; its eleven binds go
/// in column order. The state writer (a row's `done` with its exports) and
/// [`Store::record_exports`] (exports made outside a run's pool) both write it.
pub(super) const INSERT_EXPORT: &str = "INSERT OR REPLACE INTO exports
    (job_id, idx, preset, path, sha256, bytes, width, height, content_type, recipe, source_sha256)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// One export file of a job, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct ExportRecord {
    /// `exports.job_id`.
    #[serde(skip)]
    pub job_id: i64,
    /// The index of the output it was made from.
    pub idx: i64,
    /// The preset's name.
    pub preset: String,
    /// Path relative to the output folder.
    pub path: String,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: i64,
    /// Pixel width.
    pub width: i64,
    /// Pixel height.
    pub height: i64,
    /// MIME type.
    pub content_type: String,
}

/// A row whose outputs exports may be made from: its outputs, and which exports it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCandidate {
    /// `jobs.id`.
    pub job_id: i64,
    /// The row's SKU.
    pub sku: String,
    /// Its recorded outputs, by index.
    pub outputs: Vec<SavedOutput>,
    /// The exports it has: `(output index, preset, recipe, source sha256)`.
    pub have: Vec<(u32, String, String, String)>,
}

impl Store {
    /// Records the presets (JSON) and the output folder of this run, for `backdrop accept`.
    ///
    /// # Errors
    /// A database error.
    pub async fn save_export_settings(&self, out_dir: &str, presets_json: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT OR REPLACE INTO export_settings (id, out_dir, presets) VALUES (1, ?1, ?2)")
            .bind(out_dir)
            .bind(presets_json)
            .execute(self.pool())
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// The output folder and presets (JSON) the latest run recorded, if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn export_settings(&self) -> Result<Option<(PathBuf, String)>, StoreError> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT out_dir, presets FROM export_settings WHERE id = 1")
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|(dir, presets)| (PathBuf::from(dir), presets)))
    }

    /// `done` rows with outputs, `id > after_id`, at most `limit`, in id order, with the exports
    /// they have: the caller decides which are missing or stale.
    ///
    /// # Errors
    /// A database error.
    pub async fn export_candidates(
        &self,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<ExportCandidate>, StoreError> {
        let ids: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, sku FROM jobs WHERE state = 'done' AND id > ?1
                AND EXISTS (SELECT 1 FROM outputs WHERE outputs.job_id = jobs.id)
             ORDER BY id LIMIT ?2",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        self.candidates(ids).await
    }

    /// `review` rows (all of them, or those of `skus`) with their outputs and exports.
    ///
    /// # Errors
    /// A database error.
    pub async fn review_candidates(&self, skus: &[String]) -> Result<Vec<ExportCandidate>, StoreError> {
        let all: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, sku FROM jobs WHERE state = 'review' ORDER BY position, id")
                .fetch_all(self.pool())
                .await?;
        let ids = all.into_iter().filter(|(_, sku)| skus.is_empty() || skus.contains(sku)).collect();
        self.candidates(ids).await
    }

    async fn candidates(&self, ids: Vec<(i64, String)>) -> Result<Vec<ExportCandidate>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for (job_id, sku) in ids {
            let outputs = self.job_outputs(job_id).await?;
            let have: Vec<(i64, String, String, String)> = sqlx::query_as(
                "SELECT idx, preset, recipe, source_sha256 FROM exports WHERE job_id = ?1 ORDER BY idx, preset",
            )
            .bind(job_id)
            .fetch_all(self.pool())
            .await?;
            found.push(ExportCandidate {
                job_id,
                sku,
                outputs,
                have: have
                    .into_iter()
                    .map(|(i, p, r, s)| (u32::try_from(i).unwrap_or(u32::MAX), p, r, s))
                    .collect(),
            });
        }
        Ok(found)
    }

    /// Records a row's exports (files already durable and verified), replacing what the same
    /// output and preset had, in one transaction.
    ///
    /// # Errors
    /// A database error.
    pub async fn record_exports(&self, job_id: i64, exports: &[SavedExport]) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        for e in exports {
            sqlx::query(INSERT_EXPORT)
                .bind(job_id)
                .bind(i64::from(e.index))
                .bind(e.preset.as_str())
                .bind(e.path.to_string_lossy().into_owned())
                .bind(e.sha256.as_str())
                .bind(i64::try_from(e.bytes).unwrap_or(i64::MAX))
                .bind(i64::from(e.width))
                .bind(i64::from(e.height))
                .bind(e.content_type.as_str())
                .bind(e.recipe.as_str())
                .bind(e.source_sha256.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await.map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Every recorded export, by job, in output and preset order.
    ///
    /// # Errors
    /// A database error.
    pub async fn exports_by_job(&self) -> Result<BTreeMap<i64, Vec<ExportRecord>>, StoreError> {
        let rows: Vec<ExportRecord> = sqlx::query_as(
            "SELECT job_id, idx, preset, path, sha256, bytes, width, height, content_type
             FROM exports ORDER BY job_id, idx, preset",
        )
        .fetch_all(self.pool())
        .await?;
        let mut by_job: BTreeMap<i64, Vec<ExportRecord>> = BTreeMap::new();
        for e in rows {
            by_job.entry(e.job_id).or_default().push(e);
        }
        Ok(by_job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn exports_follow_their_output_and_settings_round_trip() {
        let (_dir, store) = store().await;
        assert_eq!(store.export_settings().await.unwrap(), None);
        store.save_export_settings("/o", "{}").await.unwrap();
        store.save_export_settings("/p", "{\"a\":1}").await.unwrap();
        assert_eq!(store.export_settings().await.unwrap(), Some((PathBuf::from("/p"), "{\"a\":1}".into())));

        let run = store.start_run("c.csv", "seedance", "m", false).await.unwrap();
        sqlx::query(
            "INSERT INTO jobs (id, sku, position, provider, model, task, prompt, inputs, params, fingerprint,
                               state, planned_run, created_at, updated_at)
             VALUES (1, 'A', 1, 'seedance', 'm', 'edit', 'p', '[]', '{}', 'f', 'done', ?1, 0, 0)",
        )
        .bind(run)
        .execute(store.pool())
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url)
             VALUES (1, 0, 'A/0.png', 'aa', 3, 2, 2, 'image/png', 'http://x/0.png')",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let found = store.export_candidates(0, 10).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].outputs[0].path, PathBuf::from("A/0.png"));
        assert!(found[0].have.is_empty());
        let export = SavedExport {
            index: 0,
            preset: "web".into(),
            path: "web/A/0.jpg".into(),
            sha256: "bb".into(),
            bytes: 5,
            width: 4,
            height: 4,
            content_type: "image/jpeg".into(),
            recipe: "r1".into(),
            source_sha256: "aa".into(),
        };
        store.record_exports(1, std::slice::from_ref(&export)).await.unwrap();
        store.record_exports(1, &[SavedExport { recipe: "r2".into(), ..export }]).await.unwrap();
        let found = store.export_candidates(0, 10).await.unwrap();
        assert_eq!(found[0].have, vec![(0, "web".into(), "r2".into(), "aa".into())]);
        assert_eq!(store.exports_by_job().await.unwrap()[&1][0].path, "web/A/0.jpg");
        assert!(store.review_candidates(&[]).await.unwrap().is_empty());
        // A new result replaces the outputs: their exports go with them.
        sqlx::query("DELETE FROM outputs WHERE job_id = 1").execute(store.pool()).await.unwrap();
        assert!(store.exports_by_job().await.unwrap().is_empty());
    }
}
