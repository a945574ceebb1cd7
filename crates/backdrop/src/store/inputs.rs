//! The input preflight's cache: one row per image URL that passed its checks, with the host's
//! validators, read in batches before checking and written in one transaction after.

use std::collections::HashMap;

use super::{Store, StoreError};

/// What a passed check of one input URL found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedInput {
    /// The URL, as in the catalog.
    pub url: String,
    /// Unix ms of the last check or revalidation.
    pub checked_at: i64,
    /// The host's `ETag`, if it sent one.
    pub etag: Option<String>,
    /// The host's `Last-Modified`, if it sent one.
    pub last_modified: Option<String>,
    /// `png`, `jpeg` or `webp`.
    pub kind: String,
    /// The whole file's size, when the host said.
    pub bytes: Option<i64>,
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
}

/// URLs per batched read (one variable each, far below SQLite's limit).
const READ_BATCH: usize = 1000;

type Row = (String, i64, Option<String>, Option<String>, String, Option<i64>, i64, i64);

impl Store {
    /// The cached checks of `urls` that have one.
    ///
    /// # Errors
    /// [`StoreError`] when the database fails.
    pub async fn checked_inputs(&self, urls: &[&str]) -> Result<HashMap<String, CheckedInput>, StoreError> {
        let mut out = HashMap::with_capacity(urls.len());
        for chunk in urls.chunks(READ_BATCH) {
            let mut sql = String::from(
                "SELECT url, checked_at, etag, last_modified, kind, bytes, width, height \
                 FROM input_checks WHERE url IN (",
            );
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "?" } else { ",?" });
            }
            sql.push(')');
            let mut q = sqlx::query_as::<_, Row>(&sql);
            for url in chunk {
                q = q.bind(*url);
            }
            for (url, checked_at, etag, last_modified, kind, bytes, width, height) in
                q.fetch_all(self.pool()).await?
            {
                out.insert(
                    url.clone(),
                    CheckedInput { url, checked_at, etag, last_modified, kind, bytes, width, height },
                );
            }
        }
        Ok(out)
    }

    /// Records passed checks (replacing older ones) and forgets `failed` URLs, in one transaction.
    ///
    /// # Errors
    /// [`StoreError`] when the database fails.
    pub async fn save_input_checks(
        &self,
        passed: &[CheckedInput],
        failed: &[&str],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        for c in passed {
            sqlx::query(
                "INSERT INTO input_checks (url, checked_at, etag, last_modified, kind, bytes, width, height) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(url) DO UPDATE SET \
                 checked_at = excluded.checked_at, etag = excluded.etag, \
                 last_modified = excluded.last_modified, kind = excluded.kind, bytes = excluded.bytes, \
                 width = excluded.width, height = excluded.height",
            )
            .bind(&c.url)
            .bind(c.checked_at)
            .bind(&c.etag)
            .bind(&c.last_modified)
            .bind(&c.kind)
            .bind(c.bytes)
            .bind(c.width)
            .bind(c.height)
            .execute(&mut *tx)
            .await?;
        }
        for url in failed {
            sqlx::query("DELETE FROM input_checks WHERE url = ?").bind(*url).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_round_trip_and_failures_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let c = CheckedInput {
            url: "https://x/a.png".into(),
            checked_at: 5,
            etag: Some("\"v1\"".into()),
            last_modified: None,
            kind: "png".into(),
            bytes: Some(100),
            width: 10,
            height: 20,
        };
        store.save_input_checks(std::slice::from_ref(&c), &[]).await.unwrap();
        let got = store.checked_inputs(&["https://x/a.png", "https://x/b.png"]).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got["https://x/a.png"], c);
        store.save_input_checks(&[], &["https://x/a.png"]).await.unwrap();
        assert!(store.checked_inputs(&["https://x/a.png"]).await.unwrap().is_empty());
    }
}
