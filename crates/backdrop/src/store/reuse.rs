//! Rows that share another row's paid request or done result (`jobs.reuse_of`): finding them,
//! releasing them when their leader will not give a result, and recording their copied outputs.

use std::path::PathBuf;

use super::{Store, StoreError, now_ms};
use crate::domain::SavedOutput;

/// A row waiting for its leader's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follower {
    /// The follower's job id.
    pub id: i64,
    /// Its SKU.
    pub sku: String,
    /// The leader's SKU.
    pub leader_sku: String,
    /// The leader's job id and state; `None` when no row has that SKU any more.
    pub leader: Option<(i64, String)>,
    /// The leader still asks the provider for the same thing.
    pub same_key: bool,
}

type FollowerRow = (i64, String, String, Option<i64>, Option<String>, i64);
type OutputRow = (i64, String, String, i64, i64, i64, String, String);

impl Store {
    /// The next page of followers (rows to submit that share a leader), by id.
    ///
    /// # Errors
    /// Database errors.
    pub async fn followers(&self, after_id: i64, limit: i64) -> Result<Vec<Follower>, StoreError> {
        let rows: Vec<FollowerRow> = sqlx::query_as(
            "SELECT f.id, f.sku, f.reuse_of, l.id, l.state, \
             coalesce(l.request_key = f.request_key, 0) \
             FROM jobs f LEFT JOIN jobs l ON l.sku = f.reuse_of \
             WHERE f.reuse_of IS NOT NULL AND f.state IN ('pending', 'waiting') AND f.id > ? \
             ORDER BY f.id LIMIT ?",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, sku, leader_sku, lid, lstate, same)| Follower {
                id,
                sku,
                leader_sku,
                leader: lid.zip(lstate),
                same_key: same != 0,
            })
            .collect())
    }

    /// The recorded outputs of job `job_id`, by index (a leader's to copy, a row's to export).
    ///
    /// # Errors
    /// Database errors, and [`StoreError::Corrupt`] for a size or index out of range.
    pub async fn job_outputs(&self, job_id: i64) -> Result<Vec<SavedOutput>, StoreError> {
        let rows: Vec<OutputRow> = sqlx::query_as(
            "SELECT idx, path, sha256, bytes, width, height, content_type, source_url \
             FROM outputs WHERE job_id = ? ORDER BY idx",
        )
        .bind(job_id)
        .fetch_all(self.pool())
        .await?;
        let int = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("output {what} {v} is out of range")))
        };
        rows.into_iter()
            .map(|(idx, path, sha256, bytes, width, height, content_type, source_url)| {
                Ok(SavedOutput {
                    index: int(idx, "index")?,
                    path: PathBuf::from(path),
                    sha256,
                    bytes: u64::try_from(bytes)
                        .map_err(|_| StoreError::Corrupt(format!("output size {bytes} is negative")))?,
                    width: int(width, "width")?,
                    height: int(height, "height")?,
                    content_type,
                    source_url,
                })
            })
            .collect()
    }

    /// Makes a follower an ordinary row again: the next claim submits it.
    ///
    /// # Errors
    /// Database errors.
    pub async fn release_follower(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET reuse_of = NULL, updated_at = ? WHERE id = ?")
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Records a follower's copied, verified, durable outputs and makes it done, at no cost. Does
    /// nothing (and says so) if the row stopped being a follower meanwhile.
    ///
    /// # Errors
    /// Database errors.
    pub async fn complete_follower(&self, id: i64, outputs: &[SavedOutput]) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let updated = sqlx::query(
            "UPDATE jobs SET state = 'done', error = NULL, error_class = NULL, next_attempt_at = NULL, \
             updated_at = ? WHERE id = ? AND reuse_of IS NOT NULL AND state IN ('pending', 'waiting')",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM outputs WHERE job_id = ?").bind(id).execute(&mut *tx).await?;
        for o in outputs {
            sqlx::query(
                "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(i64::from(o.index))
            .bind(o.path.to_string_lossy().into_owned())
            .bind(&o.sha256)
            .bind(i64::try_from(o.bytes).unwrap_or(i64::MAX))
            .bind(i64::from(o.width))
            .bind(i64::from(o.height))
            .bind(&o.content_type)
            .bind(&o.source_url)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}
