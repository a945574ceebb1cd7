//! The state store: one SQLite file (WAL, `synchronous=FULL` unless the writer says a commit may
//! wait for the next sync; see `writer::Durability`) holding runs, jobs, attempts and
//! outputs. Owns [`Store`] (opening, migrating, locking) and the job state machine [`JobState`];
//! the queries live beside it, one method per statement, grouped by who uses them: [`planning`]
//! (the planner), [`queue`] (the scheduler's reads and crash recovery), [`writer`] (every job state
//! change), [`inspect`] (status, retry and report) and [`ledger`] (money per run).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub mod inspect;
pub mod ledger;
pub mod planning;
pub mod queue;
pub mod writer;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use inspect::{
    JobBrief, JobRecord, KeepReason, OutputRecord, Requeue, RequeuePlan, RunRecord, Spend, StateCounts,
};
pub use ledger::{Carried, RunSpend};
pub use queue::{Recovery, StoredJob};
pub use writer::{AttemptEnd, Change, Writer};

/// Default path of the state database.
pub const DEFAULT_STATE: &str = "backdrop.db";

/// How long a connection waits for another writer before SQLite answers "busy".
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from the state store. Callers never match on `sqlx` errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open state database {path}: {source}")]
    Open {
        /// The database path.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed (a newer backdrop wrote this file, or it is not a backdrop database).
    #[error("cannot migrate state database {path}: {source}")]
    Migrate {
        /// The database path.
        path: PathBuf,
        /// What sqlx said.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// Another backdrop process is running on the same state file.
    #[error(
        "another backdrop run is using {path} (lock file {lock} is held); wait for it to finish or use another --state"
    )]
    Locked {
        /// The database path.
        path: PathBuf,
        /// The lock file path.
        lock: PathBuf,
    },
    /// The lock file could not be created.
    #[error("cannot create lock file {path}: {source}")]
    LockFile {
        /// The lock file path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A row the caller expected is not there.
    #[error("not found: {0}")]
    NotFound(String),
    /// A value in the database is not one backdrop writes (a hand-edited or corrupt file).
    #[error("corrupt state database: {0}")]
    Corrupt(String),
    /// Any other database error.
    #[error("state database error: {0}")]
    Db(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => Self::NotFound("row".into()),
            other => Self::Db(other),
        }
    }
}

impl StoreError {
    /// A busy or locked database is worth another try; everything else is not.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Db(sqlx::Error::Database(db)) => {
                let msg = db.message();
                msg.contains("database is locked") || msg.contains("busy")
            }
            Self::Db(sqlx::Error::PoolTimedOut) => true,
            _ => false,
        }
    }
}

/// Where a job is in its life (see the design's "Job life").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Planned, not yet claimed.
    Pending,
    /// Intent committed; a paid request may be leaving right now.
    Submitting,
    /// The provider accepted it and its request id is saved; poll it.
    Submitted,
    /// The result is known; downloading its files.
    Fetching,
    /// Every output file is durable and verified.
    Done,
    /// A transient error; retry at `next_attempt_at`.
    Waiting,
    /// A permanent error; the reason is kept.
    Failed,
    /// The process died after a paid request may have left and before its id was saved.
    Ambiguous,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Submitting,
        Self::Submitted,
        Self::Fetching,
        Self::Done,
        Self::Waiting,
        Self::Failed,
        Self::Ambiguous,
    ];

    /// The name stored in the `jobs.state` column.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Submitting => "submitting",
            Self::Submitted => "submitted",
            Self::Fetching => "fetching",
            Self::Done => "done",
            Self::Waiting => "waiting",
            Self::Failed => "failed",
            Self::Ambiguous => "ambiguous",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown job state {s:?}")))
    }
}

/// A handle on the state database. Cheap to clone (it wraps a pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if missing) and migrates the state database at `path`.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be opened or created, [`StoreError::Migrate`]
    /// when it is not a backdrop database or was written by a newer backdrop.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Open { path: path.to_owned(), source: sqlx::Error::Io(e) })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit that is lost on power failure can be a saved request id, i.e. a
            // second charge. See the design's note on group commits for how we keep it fast.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open { path: path.to_owned(), source })?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate { path: path.to_owned(), source })?;
        Ok(Self { pool, path: path.to_owned() })
    }

    /// The connection pool, for the query modules.
    #[must_use]
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the pool, waiting for connections to finish (checkpoints the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Held for the whole of a `run`: a second process on the same state file refuses to start.
/// The OS drops the lock when the process dies, so a SIGKILL never leaves a stale lock behind.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the exclusive lock beside the database (`<state>.lock`).
    ///
    /// # Errors
    /// [`StoreError::Locked`] when another process holds it.
    pub fn acquire(state: &Path) -> Result<Self, StoreError> {
        let mut lock = state.as_os_str().to_owned();
        lock.push(".lock");
        let lock = PathBuf::from(lock);
        if let Some(parent) = lock.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|source| StoreError::LockFile { path: lock.clone(), source })?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|source| StoreError::LockFile { path: lock.clone(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(StoreError::Locked { path: state.to_owned(), lock })
            }
            Err(std::fs::TryLockError::Error(source)) => Err(StoreError::LockFile { path: lock, source }),
        }
    }
}

/// Milliseconds since the unix epoch, the time unit of every column.
#[must_use]
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_creates_migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.db");
        let store = Store::open(&path).await.unwrap();
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode").fetch_one(store.pool()).await.unwrap();
        assert_eq!(mode, "wal");
        let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous").fetch_one(store.pool()).await.unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let (fk,): (i64,) = sqlx::query_as("PRAGMA foreign_keys").fetch_one(store.pool()).await.unwrap();
        assert_eq!(fk, 1);
        store.close().await;
        Store::open(&path).await.unwrap();
    }

    #[test]
    fn second_lock_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let first = RunLock::acquire(&path).unwrap();
        let err = RunLock::acquire(&path).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        drop(first);
        RunLock::acquire(&path).unwrap();
    }

    #[test]
    fn states_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>().unwrap(), st);
        }
        assert!("nope".parse::<JobState>().is_err());
    }
}
