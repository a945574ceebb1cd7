//! What `run` leaves on disk when it sends nothing: a dry run plans a fresh state path against a
//! scratch database it then deletes, and a run whose plan fails on a state file it created
//! itself removes that file (and its `-wal`, `-shm` and `.lock`) as long as it holds no job.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use backdrop::store::Store;

/// The files SQLite and the run lock keep beside a state database.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", ".lock"];

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Removes a database and its side files; a file that is already gone is fine.
fn remove_all(path: &Path) {
    let _ = std::fs::remove_file(path);
    for suffix in SIDE_FILES {
        let _ = std::fs::remove_file(with_suffix(path, suffix));
    }
}

/// A state database in the temp folder for one dry run, deleted (with its side files) when
/// dropped, whatever happened in between.
#[derive(Debug)]
pub(crate) struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A new, unused path in the temp folder.
    pub(crate) fn new() -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!("backdrop-dry-run-{}-{nanos}.db", std::process::id());
        Self { path: std::env::temp_dir().join(name) }
    }

    /// Where the scratch database lives.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        remove_all(&self.path);
    }
}

/// Whether `run` is about to create the state file, so that a plan that fails can take it away
/// again without ever touching a file someone else wrote.
#[derive(Debug, Clone)]
pub(crate) struct FreshState {
    path: PathBuf,
    created: bool,
}

impl FreshState {
    /// Looks before the run opens anything: neither the database nor its lock file exists yet.
    pub(crate) fn note(path: &Path) -> Self {
        let created = !path.exists() && !with_suffix(path, ".lock").exists();
        Self { path: path.to_owned(), created }
    }

    /// Closes the store and, when this run created it and it holds no job, deletes it with its
    /// side files. Must be called while the run lock is still held: then no other process has
    /// written to the file since it was created. A database with any job is always kept.
    pub(crate) async fn discard_if_empty(&self, store: Store) {
        let empty = matches!(store.state_counts().await, Ok(counts) if counts.total == 0);
        store.close().await;
        if self.created && empty {
            remove_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_state_this_run_created_goes_and_any_other_stays() {
        let dir = tempfile::tempdir().unwrap();
        let fresh_path = dir.path().join("fresh.db");
        let fresh = FreshState::note(&fresh_path);
        let _lock = backdrop::store::RunLock::acquire(&fresh_path).unwrap();
        fresh.discard_if_empty(Store::open(&fresh_path).await.unwrap()).await;
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{left:?}");

        // A state file that was there before the run is never removed, even when empty.
        let old_path = dir.path().join("old.db");
        Store::open(&old_path).await.unwrap().close().await;
        let old = FreshState::note(&old_path);
        old.discard_if_empty(Store::open(&old_path).await.unwrap()).await;
        assert!(old_path.is_file());
    }

    #[test]
    fn scratch_files_are_removed_on_drop() {
        let scratch = Scratch::new();
        let path = scratch.path().to_owned();
        std::fs::write(&path, b"x").unwrap();
        std::fs::write(with_suffix(&path, "-wal"), b"x").unwrap();
        drop(scratch);
        assert!(!path.exists() && !with_suffix(&path, "-wal").exists());
    }
}
