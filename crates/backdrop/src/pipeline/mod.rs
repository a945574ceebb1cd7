//! The run engine: a bounded worker pool ([`scheduler`]) that takes planned jobs from the store
//! through a provider, with a shared rate limiter ([`limiter`]) whose pace and window of jobs in
//! flight adapt to the server ([`adaptive`]), the retry and poll timing ([`backoff`], and
//! [`polling`], which learns the latency), live counters ([`stats`]) and the webhook receiver
//! ([`webhooks`]); and the store as the log of fal uploads ([`UploadLog`] for [`Store`]).

pub mod adaptive;
pub mod backoff;
pub mod export;
pub mod gate;
pub mod limiter;
pub mod polling;
pub mod reuse;
pub mod scheduler;
pub mod stats;
pub mod webhooks;

use futures::future::BoxFuture;

use crate::provider::fal::upload::{UploadEntry, UploadLog};
use crate::store::{Store, UploadRecord};

impl UploadLog for Store {
    fn live_upload<'a>(
        &'a self,
        sha256: &'a str,
        storage: &'a str,
        alive_until: i64,
    ) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            Store::live_upload(self, sha256, storage, alive_until).await.map_err(|e| e.to_string())
        })
    }

    fn record_upload<'a>(&'a self, entry: &'a UploadEntry) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let record = UploadRecord {
                sha256: entry.sha256.clone(),
                storage: entry.storage.clone(),
                url: entry.url.clone(),
                bytes: entry.bytes,
                content_type: entry.content_type.clone(),
                uploaded_at: entry.uploaded_at,
                expires_at: entry.expires_at,
            };
            Store::record_upload(self, &record).await.map_err(|e| e.to_string())
        })
    }
}
