//! Materialising followers: a row that shares another row's request (`reuse_of`) becomes done,
//! at no cost, once that row is done: its files are copied under the follower's own names,
//! verified by sha256, synced and renamed into place, then recorded. Runs at a run's start (a
//! crash between the shared request and its copies loses nothing) and at the pool's end.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::domain::SavedOutput;
use crate::fetch::{output_path, temp_file_name};
use crate::store::{JobState, Store, StoreError};

/// Followers read per page.
const PAGE: i64 = 500;

/// Why materialising stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReuseError {
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A copy could not be written (a disk problem): nothing was recorded for that row.
    #[error("copying {leader}'s outputs for {sku}: {source}")]
    Copy {
        /// The leader's SKU.
        leader: String,
        /// The follower's SKU.
        sku: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ReuseError {
    /// True when trying again may work (a busy store, a transient disk error).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Copy { .. } => true,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Materialised {
    /// Followers made done from their leader's files.
    pub copied: u64,
    /// Followers whose leader failed, changed or lost its files: submitted on their own from now.
    pub released: u64,
    /// Followers whose leader is still to run or in flight.
    pub waiting: u64,
}

/// Copies `src` to `dest` through a temporary name beside it, checking the copy's sha256 against
/// `sha256` before the rename; syncs the data and the folder. Blocking.
fn copy_verified(src: &Path, dest: &Path, sha256: &str) -> std::io::Result<bool> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(temp_file_name(&name));
    let data = std::fs::read(src)?;
    if hex::encode(Sha256::digest(&data)) != sha256 {
        return Ok(false);
    }
    let mut file = std::fs::File::create(&temp)?;
    let written = file.write_all(&data).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    // Read back what reached the disk: the copy is trusted for what it is, not for what was sent.
    let back = std::fs::read(&temp)?;
    if hex::encode(Sha256::digest(&back)) != sha256 {
        let _ = std::fs::remove_file(&temp);
        return Ok(false);
    }
    std::fs::rename(&temp, dest)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(true)
}

/// Copies every output of a leader for `sku`; `None` when a file is missing or altered.
fn copy_outputs(
    out_dir: &Path,
    name_template: &str,
    sku: &str,
    outputs: &[SavedOutput],
) -> std::io::Result<Option<Vec<SavedOutput>>> {
    let mut saved = Vec::with_capacity(outputs.len());
    for o in outputs {
        let ext = o.path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        let rel: PathBuf = output_path(name_template, sku, o.index, &ext);
        let src = out_dir.join(&o.path);
        match copy_verified(&src, &out_dir.join(&rel), &o.sha256) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !src.exists() => return Ok(None),
            Err(e) => return Err(e),
        }
        saved.push(SavedOutput { path: rel, ..o.clone() });
    }
    Ok(Some(saved))
}

/// Makes every follower whose leader is done done too, and releases those whose leader failed,
/// is ambiguous, asks for something else now, or whose files are gone or altered.
///
/// # Errors
/// [`ReuseError`] when the database fails or a copy cannot be written (a disk problem).
pub async fn materialise(
    store: &Store,
    out_dir: &Path,
    name_template: &str,
) -> Result<Materialised, ReuseError> {
    let mut done = Materialised::default();
    let mut after = 0;
    loop {
        let page = store.followers(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for f in page {
            let leader = match &f.leader {
                Some((id, state)) if f.same_key => Some((*id, state.parse::<JobState>()?)),
                _ => None,
            };
            match leader {
                Some((id, JobState::Done)) => {
                    let outputs = store.job_outputs(id).await?;
                    let (dir, template, sku) = (out_dir.to_owned(), name_template.to_owned(), f.sku.clone());
                    let copied =
                        tokio::task::spawn_blocking(move || copy_outputs(&dir, &template, &sku, &outputs))
                            .await
                            .map_err(|e| ReuseError::Copy {
                                leader: f.leader_sku.clone(),
                                sku: f.sku.clone(),
                                source: std::io::Error::other(e.to_string()),
                            })?
                            .map_err(|source| ReuseError::Copy {
                                leader: f.leader_sku.clone(),
                                sku: f.sku.clone(),
                                source,
                            })?;
                    match copied {
                        Some(saved) => {
                            if store.complete_follower(f.id, &saved).await? {
                                done.copied += 1;
                            }
                        }
                        None => {
                            tracing::warn!(sku = %f.sku, leader = %f.leader_sku, "the shared result's files are missing or altered; the row will be requested on its own");
                            store.release_follower(f.id).await?;
                            done.released += 1;
                        }
                    }
                }
                Some((_, JobState::Failed | JobState::Ambiguous)) | None => {
                    store.release_follower(f.id).await?;
                    done.released += 1;
                }
                Some(_) => done.waiting += 1,
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn job(store: &Store, sku: &str, state: &str, key: &str, reuse_of: Option<&str>) -> i64 {
        sqlx::query(
            "INSERT INTO jobs (sku, position, fingerprint, provider, model, task, prompt, inputs, params, \
             state, request_key, reuse_of, created_at, updated_at) \
             VALUES (?, 1, 'fp', 'seedance', 'm', 'edit', 'p', '[]', '{}', ?, ?, ?, 1, 1)",
        )
        .bind(sku)
        .bind(state)
        .bind(key)
        .bind(reuse_of)
        .execute(store.pool())
        .await
        .unwrap()
        .last_insert_rowid()
    }

    async fn state(store: &Store, sku: &str) -> (String, Option<String>) {
        sqlx::query_as("SELECT state, reuse_of FROM jobs WHERE sku = ?")
            .bind(sku)
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn followers_copy_a_done_leader_and_are_released_by_a_failed_or_altered_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let data = b"not really a png, but bytes with a hash".to_vec();
        let sha = hex::encode(Sha256::digest(&data));
        std::fs::write(out.join("LEAD-0.png"), &data).unwrap();
        let lead = job(&store, "LEAD", "done", "k1", None).await;
        sqlx::query(
            "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url) \
             VALUES (?, 0, 'LEAD-0.png', ?, ?, 4, 3, 'image/png', 'http://x/0.png')",
        )
        .bind(lead)
        .bind(&sha)
        .bind(data.len() as i64)
        .execute(store.pool())
        .await
        .unwrap();
        job(&store, "COPY", "pending", "k1", Some("LEAD")).await;
        job(&store, "BAD", "failed", "k2", None).await;
        job(&store, "ORPHAN", "pending", "k2", Some("BAD")).await;
        job(&store, "OTHER", "pending", "k3", Some("LEAD")).await; // the leader asks for k1 now
        job(&store, "LATER", "pending", "k4", None).await;
        job(&store, "WAITS", "pending", "k4", Some("LATER")).await;

        let m = materialise(&store, &out, "{sku}-{index}.{ext}").await.unwrap();
        assert_eq!(m, Materialised { copied: 1, released: 2, waiting: 1 });
        assert_eq!(state(&store, "COPY").await, ("done".into(), Some("LEAD".into())));
        assert_eq!(std::fs::read(out.join("COPY-0.png")).unwrap(), data);
        assert_eq!(state(&store, "ORPHAN").await, ("pending".into(), None));
        assert_eq!(state(&store, "OTHER").await, ("pending".into(), None));
        assert_eq!(state(&store, "WAITS").await, ("pending".into(), Some("LATER".into())));

        // An altered leader file is not copied: the follower is requested on its own.
        std::fs::write(out.join("LEAD-0.png"), b"tampered").unwrap();
        job(&store, "COPY2", "pending", "k1", Some("LEAD")).await;
        let m = materialise(&store, &out, "{sku}-{index}.{ext}").await.unwrap();
        assert_eq!(m.released, 1);
        assert_eq!(state(&store, "COPY2").await, ("pending".into(), None));
        assert!(!out.join("COPY2-0.png").exists());
    }
}
