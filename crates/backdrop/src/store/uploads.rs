//! Local input files uploaded to a provider's storage, keyed by their sha256 and the storage
//! they went to: the lookup that keeps the same bytes from being uploaded twice while their URL
//! lives, and the record written after each upload.

use super::{Store, StoreError};

/// One recorded upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// Hex sha256 of the bytes.
    pub sha256: String,
    /// The storage endpoint the bytes went to.
    pub storage: String,
    /// The URL the storage returned.
    pub url: String,
    /// Size in bytes.
    pub bytes: i64,
    /// The sniffed content type.
    pub content_type: String,
    /// When it was uploaded, unix ms.
    pub uploaded_at: i64,
    /// When its URL stops working, unix ms.
    pub expires_at: i64,
}

impl Store {
    /// The URL of `sha256` on `storage` if it still lives at `alive_until` (unix ms).
    ///
    /// # Errors
    /// [`StoreError`] when the query fails.
    pub async fn live_upload(
        &self,
        sha256: &str,
        storage: &str,
        alive_until: i64,
    ) -> Result<Option<String>, StoreError> {
        let url: Option<(String,)> =
            sqlx::query_as("SELECT url FROM uploads WHERE sha256 = ? AND storage = ? AND expires_at > ?")
                .bind(sha256)
                .bind(storage)
                .bind(alive_until)
                .fetch_optional(self.pool())
                .await?;
        Ok(url.map(|(u,)| u))
    }

    /// Records an upload, replacing an older one of the same bytes. Not synced on its own: a
    /// record lost to a crash only costs uploading the file again.
    ///
    /// # Errors
    /// [`StoreError`] when the write fails.
    pub async fn record_upload(&self, record: &UploadRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO uploads (sha256, storage, url, bytes, content_type, uploaded_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (sha256, storage) DO UPDATE SET url = excluded.url, bytes = excluded.bytes, \
             content_type = excluded.content_type, uploaded_at = excluded.uploaded_at, \
             expires_at = excluded.expires_at",
        )
        .bind(&record.sha256)
        .bind(&record.storage)
        .bind(&record.url)
        .bind(record.bytes)
        .bind(&record.content_type)
        .bind(record.uploaded_at)
        .bind(record.expires_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_upload_is_found_while_it_lives_and_per_storage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let record = UploadRecord {
            sha256: "ab".into(),
            storage: "http://127.0.0.1:1".into(),
            url: "http://127.0.0.1:1/storage/files/1/a.png".into(),
            bytes: 10,
            content_type: "image/png".into(),
            uploaded_at: 1_000,
            expires_at: 5_000,
        };
        store.record_upload(&record).await.unwrap();
        assert_eq!(store.live_upload("ab", &record.storage, 4_999).await.unwrap(), Some(record.url.clone()));
        assert_eq!(store.live_upload("ab", &record.storage, 5_000).await.unwrap(), None, "expired");
        assert_eq!(store.live_upload("ab", "https://rest.fal.ai", 0).await.unwrap(), None, "other storage");
        assert_eq!(store.live_upload("cd", &record.storage, 0).await.unwrap(), None);
        let again =
            UploadRecord { url: "http://127.0.0.1:1/new".into(), expires_at: 9_000, ..record.clone() };
        store.record_upload(&again).await.unwrap();
        assert_eq!(store.live_upload("ab", &record.storage, 6_000).await.unwrap(), Some(again.url));
    }
}
