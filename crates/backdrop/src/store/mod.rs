//! The state store: one SQLite file (WAL, `synchronous=FULL` unless the writer says a commit may
//! wait for the next sync; see `writer::Durability`) holding runs, jobs, attempts and
//! outputs. Owns [`Store`] (opening, migrating, locking) and the job state machine [`JobState`];
//! the queries live beside it, one method per statement, grouped by who uses them: [`planning`]
//! (the planner), [`queue`] (the scheduler's reads and crash recovery), [`writer`] (every job state
//! change), [`inspect`] (status, retry and report), [`ledger`] (money per run) and [`uploads`]
//! (local files already uploaded to a provider's storage).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub mod exports;
pub mod inputs;
pub mod inspect;
pub mod ledger;
mod lock;
pub mod planning;
pub mod queue;
pub mod reuse;
pub mod uploads;
pub mod writer;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, SqliteConnection, SqlitePool};

pub use exports::{ExportCandidate, ExportRecord};
pub use inspect::{
    DueDownload, JobBrief, JobRecord, KeepReason, KeptOutput, OutputRecord, REVIEW_KEPT_DIR, Requeue,
    RequeuePlan, ReviewPlan, ReviewRetry, RunRecord, Spend, StateCounts, kept_path, review_seed,
};
pub use ledger::{Carried, RunSpend};
pub use lock::{FileIdentity, RunLock};
pub use queue::{Recovery, StoredJob};
pub use uploads::UploadRecord;
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
    /// A migration failed (a newer backdrop wrote this file).
    #[error("cannot migrate state database {path}: {source}")]
    Migrate {
        /// The database path.
        path: PathBuf,
        /// What sqlx said.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// The file is not a backdrop state database (another program's SQLite file, or not SQLite at
    /// all): backdrop refuses to add its tables to it.
    #[error("{path} is not a backdrop state database ({what}); refusing to change it: pass another --state")]
    NotBackdrop {
        /// The database path.
        path: PathBuf,
        /// What gave it away.
        what: String,
    },
    /// Another backdrop process is running on the same state database.
    #[error(
        "another backdrop run is using {}{}{}; wait for it to finish or use another --state",
        path.display(),
        same_file.as_ref().map(|p| format!(" (the same file as {})", p.display())).unwrap_or_default(),
        holder.map(|pid| format!(" (pid {pid} holds its lock)")).unwrap_or_default()
    )]
    Locked {
        /// The database path, as given.
        path: PathBuf,
        /// The process holding the lock, when the OS says.
        holder: Option<u32>,
        /// The file the path leads to, when that is another name (a symlink).
        same_file: Option<PathBuf>,
    },
    /// The database file could not be opened or locked.
    #[error("cannot lock state database {path}: {source}")]
    LockFile {
        /// The database path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The path of the database this run writes to now names another file, or none: whatever
    /// this run records would be lost, and the next run would pay again for it.
    #[error(
        "the state database {} was {how} while this run was using it; stopped before sending another \
         paid request (requests already accepted are recorded only in the file this run opened)",
        path.display()
    )]
    Replaced {
        /// The database path.
        path: PathBuf,
        /// `deleted` or `replaced by another file`.
        how: &'static str,
    },
    /// The disk (or quota) under the state database is full.
    #[error("disk full: cannot write state database{}", shown(path.as_deref()))]
    DiskFull {
        /// The database path, when known where the error was seen.
        path: Option<PathBuf>,
    },
    /// The state database cannot be written: an I/O error, a read-only file or filesystem.
    #[error("cannot write state database{}: {message}", shown(path.as_deref()))]
    Unwritable {
        /// The database path, when known where the error was seen.
        path: Option<PathBuf>,
        /// What SQLite or the OS said.
        message: String,
    },
    /// The state writer takes no more changes (one could not be saved, or it has ended).
    #[error("state changes stopped: {0}")]
    WriterStopped(String),
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

/// ` /path/to/state.db`, or nothing when the path is not known.
fn shown(path: Option<&Path>) -> String {
    path.map(|p| format!(" {}", p.display())).unwrap_or_default()
}

/// SQLite's primary result codes that mean the file cannot be written.
const SQLITE_READONLY: i32 = 8;
const SQLITE_IOERR: i32 = 10;
const SQLITE_FULL: i32 = 13;
const SQLITE_NOTADB: i32 = 26;

/// The extended code of a database error, when SQLite gave one.
fn sqlite_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse::<i32>().ok()),
        _ => None,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match (sqlite_code(&e).map(|c| c & 0xff), e) {
            (_, sqlx::Error::RowNotFound) => Self::NotFound("row".into()),
            (Some(SQLITE_FULL), _) => Self::DiskFull { path: None },
            (Some(SQLITE_IOERR | SQLITE_READONLY), sqlx::Error::Database(db)) => Self::Unwritable {
                path: None,
                message: format!("{} (SQLite code {})", db.message(), db.code().unwrap_or_default()),
            },
            (_, sqlx::Error::Io(io))
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                Self::DiskFull { path: None }
            }
            (_, sqlx::Error::Io(io)) => Self::Unwritable { path: None, message: io.to_string() },
            (_, other) => Self::Db(other),
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

    /// True when the disk under the state database failed (full, read-only, I/O error): the run
    /// can resume once that is fixed.
    #[must_use]
    pub const fn is_disk_failure(&self) -> bool {
        matches!(self, Self::DiskFull { .. } | Self::Unwritable { .. })
    }

    /// Names `path` in an error seen where the path was not known.
    #[must_use]
    pub fn at(self, path: &Path) -> Self {
        match self {
            Self::DiskFull { path: None } => Self::DiskFull { path: Some(path.to_owned()) },
            Self::Unwritable { path: None, message } => {
                Self::Unwritable { path: Some(path.to_owned()), message }
            }
            other => other,
        }
    }
}

/// Where a job is in its life: `pending → submitting → submitted → fetching → done`, with
/// `waiting` (retry later), `failed` (permanent) and `ambiguous` (maybe charged, held for the user;
/// see `ARCHITECTURE.md`).
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
    /// Paid and its files durable, but the quality gate flagged an output: held for a person
    /// (`accept` makes it done, `retry --review` pays for a new image). Never resubmitted by a plan.
    Review,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [Self; 9] = [
        Self::Pending,
        Self::Submitting,
        Self::Submitted,
        Self::Fetching,
        Self::Done,
        Self::Waiting,
        Self::Failed,
        Self::Ambiguous,
        Self::Review,
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
            Self::Review => "review",
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

/// Lets `jobs.state` hold `review`. SQLite cannot change a CHECK constraint in place: the table
/// is rebuilt (its own definition with the longer list, rows copied, indexes remade) on one
/// connection with foreign keys off, so dropping the old table does not cascade to `attempts`
/// and `outputs`; sqlx runs every SQLite migration inside a transaction, where that pragma is
/// ignored, hence this step after the migrations. Done once: a rebuilt table already allows it.
async fn allow_review_state(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    const OLD: &str = "'ambiguous')";
    const NEW: &str = "'ambiguous', 'review')";
    let mut conn = pool.acquire().await?;
    let (sql,): (String,) =
        sqlx::query_as("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'jobs'")
            .fetch_one(&mut *conn)
            .await?;
    if sql.contains("'review'") || !sql.contains(OLD) {
        return Ok(());
    }
    let rebuilt = sql.replacen(OLD, NEW, 1).replacen("CREATE TABLE jobs", "CREATE TABLE jobs_rebuilt", 1);
    sqlx::query("PRAGMA foreign_keys = OFF").execute(&mut *conn).await?;
    let step = async {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query(&rebuilt).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO jobs_rebuilt SELECT * FROM jobs").execute(&mut *tx).await?;
        sqlx::query("DROP TABLE jobs").execute(&mut *tx).await?;
        sqlx::query("ALTER TABLE jobs_rebuilt RENAME TO jobs").execute(&mut *tx).await?;
        sqlx::query(
            "CREATE INDEX jobs_by_state ON jobs (state, position);
             CREATE INDEX jobs_by_plan ON jobs (planned_run, state, position);
             CREATE INDEX jobs_by_request_key ON jobs (request_key, state);",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
    .await;
    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
    step
}

/// backdrop's mark in the SQLite header (`PRAGMA application_id`), "bdrp": a database without it
/// that already holds tables belongs to another program and is refused.
pub const APPLICATION_ID: i32 = 0x6264_7270;

/// Tables every backdrop state database has had since its first version: a database with these
/// but without [`APPLICATION_ID`] was made by a backdrop from before the mark, and is adopted.
const BACKDROP_TABLES: [&str; 5] = ["_sqlx_migrations", "runs", "jobs", "attempts", "outputs"];

/// A handle on the state database. Cheap to clone (it wraps a pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
    /// The file this store was opened on, when under a [`RunLock`]: the writer refuses to let a
    /// paid request leave once the path names another file (see [`StoreError::Replaced`]).
    identity: Option<FileIdentity>,
}

impl Store {
    /// Opens (creating if missing) and migrates the state database at `path`.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be opened or created, [`StoreError::NotBackdrop`]
    /// when it is another program's database, [`StoreError::Migrate`] when a newer backdrop
    /// wrote it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_as(path, None).await
    }

    /// Opens the database `lock` holds, and remembers which file that is.
    ///
    /// # Errors
    /// As [`Store::open`], and [`StoreError::Replaced`] when the path no longer names the locked
    /// file.
    pub async fn open_locked(lock: &RunLock) -> Result<Self, StoreError> {
        let store = Self::open_as(lock.path(), lock.identity()).await?;
        // The file SQLite opened is the locked one only if the path still names it.
        lock.check()?;
        Ok(store)
    }

    async fn open_as(path: &Path, identity: Option<FileIdentity>) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Open { path: path.to_owned(), source: sqlx::Error::Io(e) })?;
        }
        // Looked at read-only first: opening it the normal way would already switch another
        // program's database to WAL.
        let has_content = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        let marked = if has_content { check_owner(path).await? } else { false };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit that is lost on power failure can be a saved request id, i.e. a
            // second charge. The writer (`writer.rs`) keeps it fast by group-committing many changes per fsync.
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
        allow_review_state(&pool).await.map_err(|e| StoreError::from(e).at(path))?;
        if !marked {
            sqlx::query(&format!("PRAGMA application_id = {APPLICATION_ID}"))
                .execute(&pool)
                .await
                .map_err(|e| StoreError::from(e).at(path))?;
        }
        Ok(Self { pool, path: path.to_owned(), identity })
    }

    /// The identity of the locked file this store was opened on ([`Store::open_locked`]).
    #[must_use]
    pub const fn identity(&self) -> Option<FileIdentity> {
        self.identity
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

    /// A failed write as a [`StoreError`], naming this database when the disk under it failed.
    pub(crate) fn write_error(&self, e: sqlx::Error) -> StoreError {
        StoreError::from(e).at(&self.path)
    }

    /// Closes the pool, waiting for connections to finish; the last connection to close
    /// checkpoints the WAL and removes the `-wal` and `-shm` files.
    pub async fn close(&self) {
        // sqlx returns a connection to the pool from a spawned task (a ping, then back to the
        // idle queue, or closed if the pool is closed by then). Two ways that leaves the WAL:
        // a connection that lands idle after `close` emptied the queue is never closed (the
        // process exits with the database open), and two connections closing at once on their
        // own threads each see the other still open, so neither removes the WAL. So: wait until
        // every connection is back idle (briefly: callers have finished with the pool), let
        // `close` close them one after another, and close again whatever came back late.
        let deadline = std::time::Instant::now() + CLOSE_SETTLE;
        while self.pool.num_idle() < self.pool.size() as usize && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.pool.close().await;
        while self.pool.size() > 0 {
            self.pool.close().await;
        }
    }
}

/// How long [`Store::close`] waits for connections still on their way back to the pool.
const CLOSE_SETTLE: Duration = Duration::from_secs(2);

/// Decides whether the non-empty database at `path` is backdrop's, reading it on a read-only
/// connection before anything is written to it. Answers whether it already carries
/// [`APPLICATION_ID`]; one an earlier backdrop made (its tables, no mark) is backdrop's to mark.
async fn check_owner(path: &Path) -> Result<bool, StoreError> {
    let not_backdrop = |what: String| StoreError::NotBackdrop { path: path.to_owned(), what };
    let classify = |source: sqlx::Error| match sqlite_code(&source) {
        Some(code) if code & 0xff == SQLITE_NOTADB => not_backdrop("not an SQLite database".into()),
        _ => StoreError::Open { path: path.to_owned(), source },
    };
    let options = SqliteConnectOptions::new().filename(path).read_only(true).busy_timeout(BUSY_TIMEOUT);
    let mut conn = SqliteConnection::connect_with(&options).await.map_err(classify)?;
    let found = owner_of(&mut conn).await.map_err(classify);
    let _ = conn.close().await;
    let (id, tables) = found?;
    if id == APPLICATION_ID {
        return Ok(true);
    }
    if id != 0 {
        return Err(not_backdrop(format!(
            "its application_id is {id:#x}, backdrop's is {APPLICATION_ID:#x}"
        )));
    }
    if tables.is_empty() || BACKDROP_TABLES.iter().all(|t| tables.iter().any(|have| have == t)) {
        return Ok(false);
    }
    let mut listed = tables.iter().take(5).map(String::as_str).collect::<Vec<_>>().join(", ");
    if tables.len() > 5 {
        listed.push_str(", ...");
    }
    Err(not_backdrop(format!("it holds other tables: {listed}")))
}

/// The database's `application_id` and its tables.
async fn owner_of(conn: &mut SqliteConnection) -> Result<(i32, Vec<String>), sqlx::Error> {
    let (id,): (i32,) = sqlx::query_as("PRAGMA application_id").fetch_one(&mut *conn).await?;
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok((id, tables.into_iter().map(|(t,)| t).collect()))
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

    /// The last query's connection goes back to the pool from a spawned task; closing right
    /// after it must still close that connection, or the process exits with the database open
    /// and its `-wal` and `-shm` stay beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_right_after_a_query_leaves_no_wal_or_shm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        for round in 0..40 {
            let store = Store::open(&path).await.unwrap();
            let _: Vec<(i64,)> = sqlx::query_as("SELECT 1").fetch_all(store.pool()).await.unwrap();
            store.close().await;
            assert_eq!(store.pool().size(), 0, "round {round}: a connection is still open");
            for side in ["state.db-wal", "state.db-shm"] {
                assert!(!dir.path().join(side).exists(), "round {round}: {side} left behind");
            }
        }
    }

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

    async fn application_id(path: &Path) -> i32 {
        let mut conn =
            SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path).read_only(true))
                .await
                .unwrap();
        let (id,): (i32,) = sqlx::query_as("PRAGMA application_id").fetch_one(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        id
    }

    /// Another program's database: a rollback journal (the default) and one table of its own.
    async fn foreign_db(path: &Path, application_id: i32) {
        let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(&format!("PRAGMA application_id = {application_id}")).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_new_database_is_marked_as_backdrops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Store::open(&path).await.unwrap().close().await;
        assert_eq!(application_id(&path).await, APPLICATION_ID);
        // An empty file (what `RunLock` leaves before the first open) is a new database too.
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        Store::open(&empty).await.unwrap().close().await;
        assert_eq!(application_id(&empty).await, APPLICATION_ID);
    }

    #[tokio::test]
    async fn another_programs_database_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        for (name, id) in [("plain.db", 0), ("marked.db", 0x1234_5678)] {
            let path = dir.path().join(name);
            foreign_db(&path, id).await;
            let before = std::fs::read(&path).unwrap();
            let err = Store::open(&path).await.unwrap_err();
            assert!(matches!(err, StoreError::NotBackdrop { .. }), "{name}: {err}");
            assert!(err.to_string().contains("is not a backdrop state database"), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), before, "{name} was changed");
            assert!(!dir.path().join(format!("{name}-wal")).exists(), "{name} was switched to WAL");
        }
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a database at all, just some text that is long enough\n".repeat(20))
            .unwrap();
        let err = Store::open(&text).await.unwrap_err();
        assert!(err.to_string().contains("not an SQLite database"), "{err}");
    }

    #[tokio::test]
    async fn a_database_from_before_the_mark_opens_and_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let store = Store::open(&path).await.unwrap();
        sqlx::query(
            "INSERT INTO runs (started_at, catalog, provider, model) VALUES (1, 'c.csv', 'seedance', 'm')",
        )
        .execute(store.pool())
        .await
        .unwrap();
        // What backdrop wrote before it marked its files.
        sqlx::query("PRAGMA application_id = 0").execute(store.pool()).await.unwrap();
        store.close().await;
        assert_eq!(application_id(&path).await, 0);
        let store = Store::open(&path).await.unwrap();
        let (runs,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM runs").fetch_one(store.pool()).await.unwrap();
        assert_eq!(runs, 1);
        store.close().await;
        assert_eq!(application_id(&path).await, APPLICATION_ID);
    }

    #[test]
    fn states_round_trip() {
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>().unwrap(), st);
        }
        assert!("nope".parse::<JobState>().is_err());
    }
}
