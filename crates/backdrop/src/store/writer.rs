//! [`Writer`]: the single task through which every job state change ([`Change`]) is committed,
//! in group commits (one fsync for many changes: with `synchronous=FULL` a commit costs a few ms of
//! fsync, so committing one change at a time would cap a run at a few hundred changes a second),
//! each synced only as soon as its `Durability` requires.

use std::time::Duration;

use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments as _, Row as _, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::{FileIdentity, Store, StoreError, now_ms};
use crate::domain::{RequestRef, SavedExport, SavedOutput};
/// Most changes committed in one transaction; bounds the latency a change can add to others.
const MAX_BATCH: usize = 512;

/// Changes sent to the connection's thread as one statement text. A batch goes in chunks of
/// this many, each prepared once and then found in the statement cache: sorted by kind (see
/// [`canonical_order`]), chunks take few shapes, while preparing a whole batch's statements
/// anew each time was a fifth of the writer's CPU and most of a large group commit's time.
const CHUNK: usize = 8;

/// The longest an unhurried change ([`Writer::commit_unhurried`]) waits for company.
const UNHURRIED: Duration = Duration::from_millis(100);

/// The outcome of one HTTP submission, recorded on its attempt row.
#[derive(Debug, Clone, Default)]
pub struct AttemptEnd {
    /// HTTP status, when the server answered.
    pub status_code: Option<u16>,
    /// `retry`, `fail`, `stop`, `ambiguous`, or `None` on success.
    pub error_class: Option<&'static str>,
    /// The error, for the attempt and the job.
    pub error: Option<String>,
    /// Time from send to answer.
    pub latency_ms: Option<i64>,
}

/// A job state change. Each is applied by the writer inside a group commit.
#[derive(Debug, Clone)]
pub enum Change {
    /// Before a paid request leaves: `submitting`, attempts + 1, a new attempt row.
    /// Answers the attempt id.
    Intent {
        /// The job.
        job_id: i64,
        /// The current run.
        run_id: i64,
    },
    /// The provider accepted the request: save its id (and fal URLs) at once.
    Accepted {
        /// The job.
        job_id: i64,
        /// The attempt.
        attempt_id: i64,
        /// Where to find it again.
        request: RequestRef,
        /// What the acceptance charged (estimated when the API does not say).
        charged: f64,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// The result is known: save it and move to `fetching`.
    Completed {
        /// The job.
        job_id: i64,
        /// The attempt, when the result came with the submit.
        attempt_id: Option<i64>,
        /// The request id, when the API gave one with a synchronous answer.
        request_id: Option<String>,
        /// The result JSON (`provider::JobResult`).
        result: String,
        /// Credits to add to the job (a sync answer's charge, or a poll's correction).
        charged: f64,
        /// How the attempt ended (sync answers).
        end: AttemptEnd,
    },
    /// A transient error: wait, then submit again.
    Waiting {
        /// The job.
        job_id: i64,
        /// The attempt.
        attempt_id: Option<i64>,
        /// When to try again (unix ms).
        next_attempt_at: i64,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// A permanent error: the row fails with a reason.
    Failed {
        /// The job.
        job_id: i64,
        /// The attempt, when the failure answered a submit.
        attempt_id: Option<i64>,
        /// How the attempt ended; `end.error` is the row's reason.
        end: AttemptEnd,
    },
    /// The request may have been charged but no id came back.
    Ambiguous {
        /// The job.
        job_id: i64,
        /// The attempt.
        attempt_id: i64,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// Nothing was charged and the run is stopping (402, 401, budget, shutdown before sending):
    /// back to `pending`, and the attempt does not count against `--max-attempts`.
    Released {
        /// The job.
        job_id: i64,
        /// The attempt, when one was opened.
        attempt_id: Option<i64>,
        /// How the attempt ended.
        end: AttemptEnd,
    },
    /// The provider cancelled the accepted request before it started (it waited in the
    /// provider's queue when the run was interrupted), so it is not charged: back to `pending`,
    /// its request forgotten, the charge its attempt recorded taken back (the attempt keeps
    /// `cancelled` as its end), and the attempt not counted.
    Cancelled {
        /// The job.
        job_id: i64,
    },
    /// Every output file is durable and verified.
    Done {
        /// The job.
        job_id: i64,
        /// The files.
        outputs: Vec<SavedOutput>,
        /// The result JSON, when it was not saved by an earlier [`Change::Completed`] (a polled
        /// result: after a crash, polling again finds it, so it need not cost its own commit).
        result: Option<String>,
        /// Credits to add with it (a poll's correction of the estimate made at submit).
        charged: f64,
        /// The quality gate's verdicts (JSON), when it ran.
        quality: Option<String>,
        /// The gate flagged an output: the row becomes `review`, not `done`.
        review: bool,
        /// The files the template's export presets made from the outputs, already durable and
        /// verified: recorded in the same transaction, so a `done` row has them.
        exports: Vec<SavedExport>,
    },
}

struct Op {
    change: Change,
    /// `None` for changes sent without waiting ([`Writer::send`]).
    reply: Option<oneshot::Sender<Result<i64, StoreError>>>,
    /// May wait up to [`UNHURRIED`] for another change to share its transaction.
    unhurried: bool,
}

/// The single writer of job state changes. Cheap to clone; every clone feeds one task that
/// commits whatever has queued up while the previous commit was in its fsync.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
}

impl Writer {
    /// Starts the writer task on its own connection.
    ///
    /// # Errors
    /// When no connection can be had.
    pub async fn start(store: &Store) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        Self::start_waiting(store, UNHURRIED).await
    }

    /// [`Writer::start`], with unhurried changes waiting up to `unhurried`.
    async fn start_waiting(
        store: &Store,
        unhurried: Duration,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let conn = store.pool().acquire().await.map_err(|e| StoreError::from(e).at(store.path()))?.detach();
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let file = StateFile { path: store.path().to_owned(), identity: store.identity(), gone: None };
        let handle = tokio::spawn(writer_loop(conn, rx, unhurried, file));
        Ok((Self { tx }, handle))
    }

    /// Commits `change` and waits until it is durable. Answers the new attempt id for
    /// [`Change::Intent`], 0 otherwise.
    ///
    /// # Errors
    /// The database error, or [`StoreError::Corrupt`] when the writer has stopped.
    pub async fn commit(&self, change: Change) -> Result<i64, StoreError> {
        self.commit_op(change, false).await
    }

    /// Like [`Writer::commit`], but the change may wait up to [`UNHURRIED`] for another one to
    /// share its transaction. For a change that nothing else waits on and that costs nothing to
    /// lose (a `done`: the next run downloads again), sent while other jobs are in flight, so that
    /// company is likely: a transaction and its round trip to the connection's thread cost more
    /// CPU than the statements in it.
    ///
    /// # Errors
    /// As [`Writer::commit`].
    pub async fn commit_unhurried(&self, change: Change) -> Result<i64, StoreError> {
        self.commit_op(change, true).await
    }

    async fn commit_op(&self, change: Change, unhurried: bool) -> Result<i64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Op { change, reply: Some(reply), unhurried }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Queues `change` without waiting for its commit. Changes are committed in the order they
    /// are queued, so a later awaited [`Writer::commit`] of the same job is durable only after
    /// this one; if this one fails, the writer refuses every later change, so the failure
    /// surfaces at the next awaited commit.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the writer has stopped.
    pub async fn send(&self, change: Change) -> Result<(), StoreError> {
        self.tx.send(Op { change, reply: None, unhurried: false }).await.map_err(|_| stopped())
    }
}

fn stopped() -> StoreError {
    StoreError::WriterStopped("the state writer has ended".into())
}

/// The file the writer writes to, and whether its path was found to name another file.
struct StateFile {
    path: std::path::PathBuf,
    /// The locked file's identity; `None` when the store was opened without a lock.
    identity: Option<FileIdentity>,
    /// Set once the path was found deleted or replaced: every later intent is refused.
    gone: Option<&'static str>,
}

impl StateFile {
    /// Checks that the path still names the database this writer writes to. A `stat` per batch
    /// holding an intent: far below the intent's own fsync, and it means no paid request leaves
    /// once the check has failed.
    fn check(&mut self) -> Result<(), StoreError> {
        if let Some(how) = self.gone {
            return Err(StoreError::Replaced { path: self.path.clone(), how });
        }
        let Some(identity) = self.identity else { return Ok(()) };
        identity.check(&self.path).inspect_err(|e| {
            if let StoreError::Replaced { how, .. } = e {
                self.gone = Some(how);
            }
            tracing::error!(error = %e, "the state database is gone: refusing every new paid request");
        })
    }
}

async fn writer_loop(
    conn: SqliteConnection,
    mut rx: mpsc::Receiver<Op>,
    unhurried: Duration,
    file: StateFile,
) {
    let mut w = WriterState {
        conn: WriterConn { conn, sync: None },
        file,
        poisoned: None,
        sync_by: None,
        parked: Vec::new(),
        parked_until: None,
        unhurried,
    };
    loop {
        let deadline = match (w.sync_by, w.parked_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let first = match deadline {
            Some(deadline) => tokio::select! {
                op = rx.recv() => op,
                () = tokio::time::sleep_until(deadline) => {
                    if w.parked.is_empty() {
                        // Nothing came along to carry the fsync: bump the heartbeat, synced.
                        w.heartbeat().await;
                    } else {
                        // Nothing came along to carry the unhurried changes: they go alone (and
                        // carry the fsync, if one is due).
                        w.commit(Vec::new(), true).await;
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        w.commit(batch, false).await;
    }
    // Leave everything committed and power-safe (the run's own end is recorded on another
    // connection, synced).
    if !w.parked.is_empty() {
        w.commit(Vec::new(), true).await;
    }
    if w.sync_by.is_some() {
        w.heartbeat().await;
    }
    let _ = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut w.conn.conn).await;
}

/// The writer's connection and its `synchronous` setting, when known: the setting is only
/// changed when a commit needs the other one (a pragma is prepared anew each time it runs).
struct WriterConn {
    conn: SqliteConnection,
    sync: Option<Sync>,
}

impl WriterConn {
    /// Runs one text of a transaction begun with `sync` (see [`BatchSql::begin`]); answers the
    /// rows it returned. On success the setting is known to be `sync`; on error the transaction
    /// is rolled back, since the failed statement left it open (or never began it).
    async fn run(
        &mut self,
        sql: BatchSql<'_>,
        sync: Sync,
    ) -> Result<Vec<sqlx::sqlite::SqliteRow>, StoreError> {
        match sql.run(&mut self.conn).await {
            Ok(rows) => {
                self.sync = Some(sync);
                Ok(rows)
            }
            Err(e) => {
                self.rollback().await;
                Err(e.into())
            }
        }
    }

    /// Ends whatever transaction is open; its error is not worth more than the one that led here.
    async fn rollback(&mut self) {
        let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
    }
}

/// The writer task's connection and what it keeps between batches.
struct WriterState {
    conn: WriterConn,
    /// The database file, checked before intents.
    file: StateFile,
    /// Set once a change nobody waits for could not be committed: from then on every change is
    /// refused, so no later state (a `done`) can be recorded on top of a missing earlier one.
    poisoned: Option<StoreError>,
    /// When the oldest committed but not yet power-safe `Soon` change must be fsynced.
    sync_by: Option<tokio::time::Instant>,
    /// Unhurried changes waiting for company, oldest first.
    parked: Vec<Op>,
    /// When the oldest parked change stops waiting.
    parked_until: Option<tokio::time::Instant>,
    /// How long an unhurried change may wait ([`UNHURRIED`]).
    unhurried: Duration,
}

impl WriterState {
    /// Commits `batch` with whatever parked changes may join it (all of them with `flush`).
    /// Unhurried changes stay parked while the batch holds an intent (its sender waits to send a
    /// paid request, so its transaction is kept short), and while nothing else comes along.
    async fn commit(&mut self, mut batch: Vec<Op>, flush: bool) {
        let now = tokio::time::Instant::now();
        let deadline_passed = flush || self.parked_until.is_some_and(|d| d <= now);
        let has_intent = batch.iter().any(|op| op.change.durability() == Durability::Now);
        let touches_parked =
            batch.iter().any(|op| self.parked.iter().any(|p| p.change.job_id() == op.change.job_id()));
        if deadline_passed || touches_parked || (!has_intent && batch.iter().any(|op| !op.unhurried)) {
            // Parked changes were queued first: they go first.
            let mut all = std::mem::take(&mut self.parked);
            all.append(&mut batch);
            batch = all;
            self.parked_until = None;
        } else {
            let (unhurried, rest): (Vec<Op>, Vec<Op>) = batch.into_iter().partition(|op| op.unhurried);
            if !unhurried.is_empty() {
                self.parked_until.get_or_insert(now + self.unhurried);
                self.parked.extend(unhurried);
            }
            batch = rest;
        }
        if batch.iter().any(|op| matches!(op.change, Change::Intent { .. }))
            && let Err(e) = self.file.check()
        {
            // No paid request may leave once its record would go to a file nobody will read.
            let (intents, rest): (Vec<Op>, Vec<Op>) =
                batch.into_iter().partition(|op| matches!(op.change, Change::Intent { .. }));
            for op in intents {
                reply(op, Err(refused(&e)));
            }
            batch = rest;
        }
        if batch.is_empty() {
            return;
        }
        canonical_order(&mut batch);
        if let Some(why) = &self.poisoned {
            for op in batch {
                reply(op, Err(refused(why)));
            }
            return;
        }
        let needs = batch.iter().map(|op| op.change.durability()).max().unwrap_or(Durability::Whenever);
        let sync = if needs == Durability::Now || self.sync_by.is_some_and(|d| d <= now) {
            Sync::Full
        } else {
            Sync::Normal
        };
        // Whether a transaction committed with `sync`: only then are earlier commits power-safe.
        let mut committed = false;
        let path = self.file.path.clone();
        match apply_batch(&mut self.conn, &batch, sync).await {
            Ok(ids) => {
                committed = true;
                for (op, id) in batch.into_iter().zip(ids) {
                    settle(op, id.map_err(|e| e.at(&path)), &mut self.poisoned);
                }
            }
            Err(e) => {
                let e = e.at(&path);
                tracing::warn!(error = %e, changes = batch.len(), "group commit failed; committing one by one");
                for op in batch {
                    // A change nobody waited for failed just before: nothing after it may land.
                    if let Some(why) = &self.poisoned {
                        reply(op, Err(refused(why)));
                        continue;
                    }
                    let res = match apply_batch(&mut self.conn, std::slice::from_ref(&op), sync).await {
                        Ok(mut ids) => {
                            committed = true;
                            ids.pop().unwrap_or(Ok(0))
                        }
                        Err(e) => Err(e),
                    };
                    let res = res.map_err(|e| e.at(&path));
                    settle(op, res, &mut self.poisoned);
                }
            }
        }
        match sync {
            // Nothing committed synced: the deadline stays, and a heartbeat will try again.
            Sync::Full if !committed => {}
            Sync::Full => self.sync_by = None,
            Sync::Normal if needs == Durability::Soon => {
                self.sync_by = Some(self.sync_by.map_or(now + SOON, |d| d.min(now + SOON)));
            }
            Sync::Normal => {}
        }
    }

    async fn heartbeat(&mut self) {
        match heartbeat(&mut self.conn).await {
            Ok(()) => self.sync_by = None,
            Err(e) => {
                tracing::warn!(error = %e, "could not sync the state file; trying again shortly");
                // Not at once: a failing disk must not turn the writer into a busy loop.
                self.sync_by = Some(tokio::time::Instant::now() + SOON);
            }
        }
    }
}

/// Adds whatever has queued up, up to [`MAX_BATCH`].
fn drain(rx: &mut mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Sorts a batch by kind of change when no job appears twice in it (changes to different jobs
/// commute inside one transaction; two of one job must keep their order), so the few shapes a
/// small batch takes are each prepared once and then found in the statement cache.
fn canonical_order(batch: &mut [Op]) {
    if batch.len() < 2 {
        return;
    }
    let mut jobs: Vec<i64> = batch.iter().map(|op| op.change.job_id()).collect();
    jobs.sort_unstable();
    if jobs.windows(2).all(|w| w[0] != w[1]) {
        batch.sort_by_key(|op| op.change.kind());
    }
}

/// A synced commit of a real change (an unchanged row would write nothing), so every earlier
/// commit in the WAL becomes power-safe.
async fn heartbeat(conn: &mut WriterConn) -> Result<(), StoreError> {
    let mut sql = BatchSql::default();
    sql.begin(Sync::Full, &mut conn.sync);
    sql.statement("UPDATE heartbeat SET beats = beats + 1 WHERE id = 1");
    sql.statement("COMMIT");
    conn.run(sql, Sync::Full).await.map(drop)
}

/// The error of a change refused because of an earlier error `why`: a full or failing disk and a
/// replaced file are reported as themselves (with the path), anything else as the writer having
/// stopped because of it.
fn refused(why: &StoreError) -> StoreError {
    match why {
        StoreError::DiskFull { path } => StoreError::DiskFull { path: path.clone() },
        StoreError::Unwritable { path, message } => {
            StoreError::Unwritable { path: path.clone(), message: message.clone() }
        }
        StoreError::Replaced { path, how } => StoreError::Replaced { path: path.clone(), how },
        StoreError::WriterStopped(message) => StoreError::WriterStopped(message.clone()),
        other => StoreError::WriterStopped(format!("an earlier change could not be saved: {other}")),
    }
}

/// Answers `op`; a change nobody waits for that failed poisons the writer.
fn settle(op: Op, result: Result<i64, StoreError>, poisoned: &mut Option<StoreError>) {
    if let (Err(e), None) = (&result, &op.reply) {
        tracing::error!(error = %e, "a state change failed; refusing every later one");
        if poisoned.is_none() {
            *poisoned = Some(refused(e));
        }
    }
    reply(op, result);
}

fn reply(op: Op, result: Result<i64, StoreError>) {
    if let Some(reply) = op.reply {
        // The worker may have been cancelled meanwhile; its change is durable anyway.
        let _ = reply.send(result);
    }
}

async fn apply_batch(
    conn: &mut WriterConn,
    batch: &[Op],
    sync: Sync,
) -> Result<Vec<Result<i64, StoreError>>, StoreError> {
    let mut attempt = 0;
    loop {
        match try_apply(conn, batch, sync).await {
            Ok(ids) => return Ok(ids),
            Err(e) if e.is_retryable() && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How soon a change must survive a power cut. Every change survives a crash of this process the
/// moment it is committed; power-safety needs an fsync of the WAL, which also covers every commit
/// before it, so only the changes that cannot wait pay for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Durability {
    /// Lost, the next run redoes it by itself at no cost: a `done` (the row is polled or
    /// downloaded again, never resubmitted) and a polled result (polled again).
    Whenever,
    /// Lost, a paid row would turn `ambiguous` (a saved request id, a sync answer, an error):
    /// power-safe within [`SOON`], usually carried by the next intent's fsync.
    Soon,
    /// The intent: power-safe before the writer answers, because the paid request leaves next.
    Now,
}

/// The longest a [`Durability::Soon`] change waits for another commit to carry its fsync.
const SOON: Duration = Duration::from_millis(100);

impl Change {
    fn job_id(&self) -> i64 {
        match self {
            Self::Intent { job_id, .. }
            | Self::Accepted { job_id, .. }
            | Self::Completed { job_id, .. }
            | Self::Waiting { job_id, .. }
            | Self::Failed { job_id, .. }
            | Self::Ambiguous { job_id, .. }
            | Self::Released { job_id, .. }
            | Self::Cancelled { job_id }
            | Self::Done { job_id, .. } => *job_id,
        }
    }

    /// The statements a change runs depend on its kind only (and on a `done`'s number of
    /// files), so batches sorted by it repeat.
    fn kind(&self) -> (u8, usize) {
        match self {
            Self::Intent { .. } => (0, 0),
            Self::Accepted { .. } => (1, 0),
            Self::Completed { attempt_id, .. } => (2, usize::from(attempt_id.is_some())),
            Self::Waiting { attempt_id, .. } => (3, usize::from(attempt_id.is_some())),
            Self::Failed { attempt_id, .. } => (4, usize::from(attempt_id.is_some())),
            Self::Ambiguous { .. } => (5, 0),
            Self::Released { attempt_id, .. } => (6, usize::from(attempt_id.is_some())),
            Self::Done { outputs, .. } => (7, outputs.len()),
            Self::Cancelled { .. } => (8, 0),
        }
    }

    fn durability(&self) -> Durability {
        match self {
            Self::Intent { .. } => Durability::Now,
            Self::Done { .. } | Self::Completed { attempt_id: None, .. } => Durability::Whenever,
            _ => Durability::Soon,
        }
    }
}

/// The `synchronous` setting of one commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// fsync the WAL at commit: this commit and every one before it survive a power cut.
    Full,
    /// No fsync: survives a crash of this process; power-safe at the next `Full` commit.
    Normal,
}

impl Sync {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "PRAGMA synchronous = FULL;",
            Self::Normal => "PRAGMA synchronous = NORMAL;",
        }
    }
}

/// A chunk of a batch as one multi-statement query, so a group commit costs one round trip to
/// the connection's thread per [`CHUNK`] changes instead of one per statement.
#[derive(Default)]
struct BatchSql<'q> {
    sql: String,
    args: SqliteArguments<'q>,
    /// Per change, the job id whose new attempt id comes back as a row (intents only).
    returns: Vec<Option<i64>>,
}

impl<'q> BatchSql<'q> {
    /// Opens the transaction, committed with `sync`. The setting is unknown until the text has
    /// run.
    fn begin(&mut self, sync: Sync, current: &mut Option<Sync>) {
        if *current != Some(sync) {
            self.sql.push_str(sync.pragma());
            *current = None;
        }
        self.sql.push_str("BEGIN IMMEDIATE;");
    }

    fn bind<T>(&mut self, value: T) -> Result<(), StoreError>
    where
        T: sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + 'q,
    {
        self.args.add(value).map_err(|e| StoreError::Corrupt(format!("cannot bind a value: {e}")))
    }

    /// Runs the whole text (prepared once, then cached); answers the rows it returned.
    async fn run(self, conn: &mut SqliteConnection) -> Result<Vec<sqlx::sqlite::SqliteRow>, sqlx::Error> {
        sqlx::query_with(&self.sql, self.args).persistent(true).fetch_all(&mut *conn).await
    }

    fn statement(&mut self, sql: &str) {
        self.sql.push_str(sql);
        self.sql.push(';');
    }

    fn end_attempt(
        &mut self,
        now: i64,
        attempt_id: Option<i64>,
        end: &'q AttemptEnd,
        request_id: Option<&'q str>,
        credits: Option<f64>,
    ) -> Result<(), StoreError> {
        let Some(id) = attempt_id else { return Ok(()) };
        self.statement(
            "UPDATE attempts SET finished_at = ?, status_code = ?, error_class = ?, error = ?, latency_ms = ?,
                    request_id = COALESCE(?, request_id), credits = COALESCE(?, credits)
             WHERE id = ?",
        );
        self.bind(now)?;
        self.bind(end.status_code.map(i64::from))?;
        self.bind(end.error_class)?;
        self.bind(end.error.as_deref())?;
        self.bind(end.latency_ms)?;
        self.bind(request_id)?;
        self.bind(credits)?;
        self.bind(id)
    }

    /// A poll's correction of a charge (`delta`, usually 0) belongs to the submit that was
    /// charged, so that each run's spend, the sum of its attempts, stays exact.
    fn correct_charge(&mut self, job_id: i64, delta: f64) -> Result<(), StoreError> {
        if delta == 0.0 {
            return Ok(());
        }
        self.statement(
            "UPDATE attempts SET credits = credits + ?
             WHERE id = (SELECT MAX(id) FROM attempts WHERE job_id = ? AND credits IS NOT NULL)",
        );
        self.bind(delta)?;
        self.bind(job_id)
    }

    #[allow(clippy::too_many_lines)] // one arm per change, each a few statements
    fn change(&mut self, change: &'q Change) -> Result<(), StoreError> {
        let now = now_ms();
        let mut returns = None;
        match change {
            Change::Intent { job_id, run_id } => {
                self.statement(
                    "UPDATE jobs SET state = 'submitting', attempts = attempts + 1, next_attempt_at = NULL,
                            accepted_at = NULL, updated_at = ? WHERE id = ?",
                );
                self.bind(now)?;
                self.bind(*job_id)?;
                self.statement(
                    "INSERT INTO attempts (job_id, run_id, number, started_at)
                     SELECT id, ?, attempts, ? FROM jobs WHERE id = ? RETURNING id, job_id",
                );
                self.bind(*run_id)?;
                self.bind(now)?;
                self.bind(*job_id)?;
                returns = Some(*job_id);
            }
            Change::Accepted { job_id, attempt_id, request, charged, end } => {
                self.statement(
                    "UPDATE jobs SET state = 'submitted', request_id = ?, status_url = ?, response_url = ?,
                            cancel_url = ?, credits = credits + ?, error = NULL, error_class = NULL,
                            accepted_at = ?, updated_at = ? WHERE id = ?",
                );
                self.bind(request.request_id.as_str())?;
                self.bind(request.status_url.as_deref())?;
                self.bind(request.response_url.as_deref())?;
                self.bind(request.cancel_url.as_deref())?;
                self.bind(*charged)?;
                self.bind(now)?;
                self.bind(now)?;
                self.bind(*job_id)?;
                self.end_attempt(now, Some(*attempt_id), end, Some(&request.request_id), Some(*charged))?;
            }
            Change::Completed { job_id, attempt_id, request_id, result, charged, end } => {
                self.statement(
                    "UPDATE jobs SET state = 'fetching', result = ?, request_id = COALESCE(?, request_id),
                            credits = credits + ?, error = NULL, error_class = NULL,
                            accepted_at = COALESCE(accepted_at, ?), updated_at = ? WHERE id = ?",
                );
                self.bind(result.as_str())?;
                self.bind(request_id.as_deref())?;
                self.bind(*charged)?;
                self.bind(now)?;
                self.bind(now)?;
                self.bind(*job_id)?;
                let credits = attempt_id.map(|_| *charged);
                self.end_attempt(now, *attempt_id, end, request_id.as_deref(), credits)?;
                if attempt_id.is_none() {
                    self.correct_charge(*job_id, *charged)?;
                }
            }
            Change::Waiting { job_id, attempt_id, next_attempt_at, end } => {
                self.statement(
                    "UPDATE jobs SET state = 'waiting', next_attempt_at = ?, error = ?, error_class = ?,
                            updated_at = ? WHERE id = ?",
                );
                self.bind(*next_attempt_at)?;
                self.bind(end.error.as_deref())?;
                self.bind(end.error_class)?;
                self.bind(now)?;
                self.bind(*job_id)?;
                self.end_attempt(now, *attempt_id, end, None, None)?;
            }
            Change::Failed { job_id, attempt_id, end } => {
                self.statement(
                    "UPDATE jobs SET state = 'failed', next_attempt_at = NULL, error = ?, error_class = ?,
                            updated_at = ? WHERE id = ?",
                );
                self.bind(end.error.as_deref())?;
                self.bind(end.error_class.unwrap_or("fail"))?;
                self.bind(now)?;
                self.bind(*job_id)?;
                self.end_attempt(now, *attempt_id, end, None, None)?;
            }
            Change::Ambiguous { job_id, attempt_id, end } => {
                self.statement(
                    "UPDATE jobs SET state = 'ambiguous', error = ?, error_class = 'ambiguous', updated_at = ?
                     WHERE id = ?",
                );
                self.bind(end.error.as_deref())?;
                self.bind(now)?;
                self.bind(*job_id)?;
                self.end_attempt(now, Some(*attempt_id), end, None, None)?;
            }
            Change::Released { job_id, attempt_id, end } => {
                self.statement(
                    "UPDATE jobs SET state = 'pending', attempts = MAX(attempts - ?, 0), next_attempt_at = NULL,
                            error = ?, error_class = ?, updated_at = ? WHERE id = ?",
                );
                self.bind(i64::from(attempt_id.is_some()))?;
                self.bind(end.error.as_deref())?;
                self.bind(end.error_class)?;
                self.bind(now)?;
                self.bind(*job_id)?;
                self.end_attempt(now, *attempt_id, end, None, None)?;
            }
            Change::Cancelled { job_id } => {
                // The job's credits first, while the attempt still holds what it recorded.
                self.statement(
                    "UPDATE jobs SET state = 'pending', attempts = MAX(attempts - 1, 0), next_attempt_at = NULL,
                            request_id = NULL, status_url = NULL, response_url = NULL, cancel_url = NULL,
                            accepted_at = NULL, error = 'cancelled while queued (not charged)',
                            error_class = 'cancelled', updated_at = ?,
                            credits = credits - COALESCE((SELECT credits FROM attempts WHERE id =
                                (SELECT MAX(id) FROM attempts WHERE job_id = jobs.id AND credits IS NOT NULL)), 0)
                     WHERE id = ?",
                );
                self.bind(now)?;
                self.bind(*job_id)?;
                self.statement(
                    "UPDATE attempts SET credits = 0, error_class = 'cancelled',
                            error = 'cancelled in the provider''s queue before it started: not charged'
                     WHERE id = (SELECT MAX(id) FROM attempts WHERE job_id = ? AND credits IS NOT NULL)",
                );
                self.bind(*job_id)?;
            }
            Change::Done { job_id, outputs, result, charged, quality, review, exports } => {
                self.statement("DELETE FROM outputs WHERE job_id = ?");
                self.bind(*job_id)?;
                for o in outputs {
                    self.statement(
                        "INSERT INTO outputs (job_id, idx, path, sha256, bytes, width, height, content_type, source_url)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    );
                    self.bind(*job_id)?;
                    self.bind(i64::from(o.index))?;
                    self.bind(o.path.to_string_lossy().into_owned())?;
                    self.bind(o.sha256.as_str())?;
                    self.bind(i64::try_from(o.bytes).unwrap_or(i64::MAX))?;
                    self.bind(i64::from(o.width))?;
                    self.bind(i64::from(o.height))?;
                    self.bind(o.content_type.as_str())?;
                    self.bind(o.source_url.as_str())?;
                }
                // Deleting the outputs above removed their exports (a trigger): these replace them.
                for e in exports {
                    self.statement(super::exports::INSERT_EXPORT);
                    self.bind(*job_id)?;
                    self.bind(i64::from(e.index))?;
                    self.bind(e.preset.as_str())?;
                    self.bind(e.path.to_string_lossy().into_owned())?;
                    self.bind(e.sha256.as_str())?;
                    self.bind(i64::try_from(e.bytes).unwrap_or(i64::MAX))?;
                    self.bind(i64::from(e.width))?;
                    self.bind(i64::from(e.height))?;
                    self.bind(e.content_type.as_str())?;
                    self.bind(e.recipe.as_str())?;
                    self.bind(e.source_sha256.as_str())?;
                }
                self.statement(
                    "UPDATE jobs SET state = ?, quality = ?, next_attempt_at = NULL, error = NULL, error_class = NULL,
                            result = COALESCE(?, result), credits = credits + ?, updated_at = ? WHERE id = ?",
                );
                self.bind(if *review { "review" } else { "done" })?;
                self.bind(quality.as_deref())?;
                self.bind(result.as_deref())?;
                self.bind(*charged)?;
                self.bind(now)?;
                self.bind(*job_id)?;
                self.correct_charge(*job_id, *charged)?;
            }
        }
        self.returns.push(returns);
        Ok(())
    }
}

/// Applies `batch` in one transaction committed with `sync`, [`CHUNK`] changes per round trip.
/// Answers, per change, the new attempt id for an intent and 0 otherwise. On error nothing is
/// kept: the transaction is rolled back.
async fn try_apply(
    conn: &mut WriterConn,
    batch: &[Op],
    sync: Sync,
) -> Result<Vec<Result<i64, StoreError>>, StoreError> {
    let mut returns = Vec::with_capacity(batch.len());
    let mut rows = Vec::new();
    let chunks = batch.len().div_ceil(CHUNK);
    for (i, chunk) in batch.chunks(CHUNK).enumerate() {
        let mut sql = BatchSql::default();
        if i == 0 {
            sql.begin(sync, &mut conn.sync);
        }
        let built = chunk.iter().try_for_each(|op| sql.change(&op.change));
        if i + 1 == chunks {
            sql.statement("COMMIT");
        }
        returns.append(&mut sql.returns);
        if let Err(e) = built {
            // Earlier chunks may have opened the transaction.
            conn.rollback().await;
            return Err(e);
        }
        rows.append(&mut conn.run(sql, sync).await?);
    }
    // The batch is committed: an intent whose job is missing fails alone (its statements
    // changed nothing, and returned no row), the others are answered with their own rows.
    let mut opened: std::collections::HashMap<i64, std::collections::VecDeque<i64>> =
        std::collections::HashMap::new();
    for row in &rows {
        if let (Ok(id), Ok(job)) = (row.try_get::<i64, _>(0), row.try_get::<i64, _>(1)) {
            opened.entry(job).or_default().push_back(id);
        }
    }
    let ids = returns
        .into_iter()
        .map(|job| match job {
            None => Ok(0),
            Some(job_id) => opened
                .get_mut(&job_id)
                .and_then(std::collections::VecDeque::pop_front)
                .ok_or_else(|| StoreError::Corrupt(format!("job {job_id} is not in the store"))),
        })
        .collect();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Recovery;

    /// The one output the done tests record.
    fn one_output() -> SavedOutput {
        SavedOutput {
            index: 0,
            path: "SKU-0/0.png".into(),
            sha256: "ab".into(),
            bytes: 10,
            width: 4,
            height: 4,
            content_type: "image/png".into(),
            source_url: "http://x/o.png".into(),
        }
    }

    async fn store_with_jobs(n: i64) -> (tempfile::TempDir, Store, i64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let run = store.start_run("c.csv", "seedance", "seedream-v4-5", false).await.unwrap();
        for i in 0..n {
            sqlx::query(
                "INSERT INTO jobs (sku, position, planned_run, fingerprint, provider, model, task, prompt,
                                   inputs, params, created_at, updated_at)
                 VALUES (?, ?, ?, 'f', 'seedance', 'seedream-v4-5', 'edit', 'p', '[]', '{\"num_images\":1}', 0, 0)",
            )
            .bind(format!("SKU-{i}"))
            .bind(i + 1)
            .bind(run)
            .execute(store.pool())
            .await
            .unwrap();
        }
        (dir, store, run)
    }

    async fn state(store: &Store, id: i64) -> (String, i64, Option<String>) {
        sqlx::query_as("SELECT state, attempts, request_id FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    async fn attempt_owner(store: &Store, attempt: i64) -> i64 {
        sqlx::query_as::<_, (i64,)>("SELECT job_id FROM attempts WHERE id = ?")
            .bind(attempt)
            .fetch_one(store.pool())
            .await
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn a_job_walks_the_whole_state_machine() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let jobs = store.claimable_jobs(run, 0, 10).await.unwrap();
        assert_eq!(jobs.len(), 1);
        let id = jobs[0].spec.id;

        let a1 = w.commit(Change::Intent { job_id: id, run_id: run }).await.unwrap();
        assert_eq!(state(&store, id).await, ("submitting".into(), 1, None));
        let end = AttemptEnd { status_code: Some(429), error_class: Some("retry"), ..AttemptEnd::default() };
        w.commit(Change::Waiting { job_id: id, attempt_id: Some(a1), next_attempt_at: 5, end })
            .await
            .unwrap();
        assert_eq!(state(&store, id).await.0, "waiting");
        assert_eq!(store.claimable_jobs(run, 0, 10).await.unwrap().len(), 1, "waiting jobs are claimable");

        let a2 = w.commit(Change::Intent { job_id: id, run_id: run }).await.unwrap();
        let request = RequestRef {
            request_id: "req-1".into(),
            status_url: Some("http://x/s".into()),
            response_url: None,
            cancel_url: None,
        };
        w.commit(Change::Accepted {
            job_id: id,
            attempt_id: a2,
            request,
            charged: 8.0,
            end: AttemptEnd::default(),
        })
        .await
        .unwrap();
        assert_eq!(state(&store, id).await, ("submitted".into(), 2, Some("req-1".into())));
        let resumable = store.resumable_jobs(0, 10).await.unwrap();
        assert_eq!(resumable[0].request.as_ref().unwrap().status_url.as_deref(), Some("http://x/s"));

        w.commit(Change::Completed {
            job_id: id,
            attempt_id: None,
            request_id: None,
            result: "{}".into(),
            charged: 0.0,
            end: AttemptEnd::default(),
        })
        .await
        .unwrap();
        assert_eq!(state(&store, id).await.0, "fetching");
        let out = one_output();
        // The poll said 9 credits, not the 8 estimated at submit: the correction lands on the
        // charged attempt too, so the run's spend and the row's agree.
        w.commit(Change::Done {
            job_id: id,
            outputs: vec![out],
            result: None,
            charged: 1.0,
            quality: None,
            review: false,
            exports: Vec::new(),
        })
        .await
        .unwrap();
        assert_eq!(state(&store, id).await.0, "done");
        assert!((store.total_spent().await.unwrap() - 9.0).abs() < 1e-9);
        let spends = store.run_spends(&std::collections::BTreeMap::new()).await.unwrap();
        assert!((spends[0].spent - 9.0).abs() < 1e-9, "{spends:?}");
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM attempts WHERE job_id = ?")
            .bind(id)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn a_done_records_its_exports_with_it_and_a_new_result_replaces_them() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let a = w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        w.commit(accepted(1, a, "r")).await.unwrap();
        let out = one_output();
        let export = |preset: &str| SavedExport {
            index: 0,
            preset: preset.into(),
            path: format!("{preset}/SKU-0/0.jpg").into(),
            sha256: "cd".into(),
            bytes: 7,
            width: 2,
            height: 2,
            content_type: "image/jpeg".into(),
            recipe: "r".into(),
            source_sha256: "ab".into(),
        };
        let done = |exports| Change::Done {
            job_id: 1,
            outputs: vec![out.clone()],
            result: Some("{}".into()),
            charged: 0.0,
            quality: None,
            review: false,
            exports,
        };
        w.commit(done(vec![export("a"), export("b")])).await.unwrap();
        assert_eq!(state(&store, 1).await.0, "done");
        let presets = || async {
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT preset FROM exports WHERE job_id = 1 ORDER BY preset")
                    .fetch_all(store.pool())
                    .await
                    .unwrap();
            rows.into_iter().map(|(p,)| p).collect::<Vec<_>>()
        };
        assert_eq!(presets().await, ["a", "b"]);
        // A later result of the same row (retry --review) replaces the outputs and their exports.
        w.commit(done(vec![export("c")])).await.unwrap();
        assert_eq!(presets().await, ["c"]);
    }

    #[tokio::test]
    async fn a_flagged_done_becomes_review_with_its_verdict_and_is_never_claimed() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let a = w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        w.commit(accepted(1, a, "r")).await.unwrap();
        let out = one_output();
        let verdict = r#"{"outputs":[{"index":0,"verdict":null,"error":"x"}]}"#;
        w.commit(Change::Done {
            job_id: 1,
            outputs: vec![out],
            result: Some("{}".into()),
            charged: 0.0,
            quality: Some(verdict.into()),
            review: true,
            exports: Vec::new(),
        })
        .await
        .unwrap();
        assert_eq!(state(&store, 1).await.0, "review");
        let (q,): (Option<String>,) =
            sqlx::query_as("SELECT quality FROM jobs WHERE id = 1").fetch_one(store.pool()).await.unwrap();
        assert_eq!(q.as_deref(), Some(verdict));
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outputs WHERE job_id = 1")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 1, "the paid file is recorded");
        assert!(
            store.claimable_jobs(run, 0, 10).await.unwrap().is_empty(),
            "a review row is never resubmitted"
        );
        // Reopening (the rebuild of the state's CHECK runs once) keeps the row, its attempt and file.
        drop(w);
        store.close().await;
        let again = Store::open(store.path()).await.unwrap();
        assert_eq!(state(&again, 1).await.0, "review");
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM attempts WHERE job_id = 1")
            .fetch_one(again.pool())
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn recovery_turns_submitting_into_ambiguous_and_keeps_submitted() {
        let (_dir, store, run) = store_with_jobs(2).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        let a = w.commit(Change::Intent { job_id: 2, run_id: run }).await.unwrap();
        w.commit(accepted(2, a, "r")).await.unwrap();
        let rec = store.recover().await.unwrap();
        assert_eq!(rec, Recovery { ambiguous: 1, resumable: 1 });
        assert_eq!(state(&store, 1).await.0, "ambiguous");
        assert_eq!(state(&store, 2).await.0, "submitted");
        assert!(store.claimable_jobs(run, 0, 10).await.unwrap().is_empty(), "neither is resubmitted");
    }

    #[tokio::test]
    async fn released_jobs_go_back_to_pending_without_spending_an_attempt() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let a = w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        let end = AttemptEnd { status_code: Some(402), error_class: Some("stop"), ..AttemptEnd::default() };
        w.commit(Change::Released { job_id: 1, attempt_id: Some(a), end }).await.unwrap();
        assert_eq!(state(&store, 1).await, ("pending".into(), 0, None));
    }

    /// A plain seedance acceptance: a request id only, 8 credits, a clean attempt end.
    fn accepted(job_id: i64, attempt_id: i64, request_id: &str) -> Change {
        let request = RequestRef {
            request_id: request_id.into(),
            status_url: None,
            response_url: None,
            cancel_url: None,
        };
        Change::Accepted { job_id, attempt_id, request, charged: 8.0, end: AttemptEnd::default() }
    }

    async fn beats(store: &Store) -> i64 {
        sqlx::query_as::<_, (i64,)>("SELECT beats FROM heartbeat").fetch_one(store.pool()).await.unwrap().0
    }

    #[test]
    fn only_the_intent_is_synced_before_the_answer() {
        let end = AttemptEnd::default;
        let request =
            RequestRef { request_id: "r".into(), status_url: None, response_url: None, cancel_url: None };
        let cases = [
            (Change::Intent { job_id: 1, run_id: 1 }, Durability::Now),
            (
                Change::Accepted { job_id: 1, attempt_id: 1, request, charged: 0.0, end: end() },
                Durability::Soon,
            ),
            (Change::Failed { job_id: 1, attempt_id: Some(1), end: end() }, Durability::Soon),
            (
                Change::Completed {
                    job_id: 1,
                    attempt_id: Some(1),
                    request_id: None,
                    result: String::new(),
                    charged: 0.0,
                    end: end(),
                },
                Durability::Soon,
            ),
            (
                Change::Completed {
                    job_id: 1,
                    attempt_id: None,
                    request_id: None,
                    result: String::new(),
                    charged: 0.0,
                    end: end(),
                },
                Durability::Whenever,
            ),
            (
                Change::Done {
                    job_id: 1,
                    outputs: Vec::new(),
                    result: None,
                    charged: 0.0,
                    quality: None,
                    review: false,
                    exports: Vec::new(),
                },
                Durability::Whenever,
            ),
        ];
        for (change, want) in cases {
            assert_eq!(change.durability(), want, "{change:?}");
        }
    }

    #[tokio::test]
    async fn a_saved_request_id_is_synced_soon_even_when_nothing_follows() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let attempt = w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        assert_eq!(beats(&store).await, 0, "the intent carries its own fsync");
        w.send(accepted(1, attempt, "req-9")).await.unwrap();
        // Committed at once (a crash of this process keeps it)...
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while state(&store, 1).await.0 != "submitted" {
            assert!(std::time::Instant::now() < deadline, "the request id was never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ...and made power-safe by a synced heartbeat, since no other commit came to carry it.
        while beats(&store).await == 0 {
            assert!(std::time::Instant::now() < deadline, "no synced commit followed the request id");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_intent_for_a_missing_job_fails_alone() {
        let (_dir, store, run) = store_with_jobs(2).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let (a, missing, b) = tokio::join!(
            w.commit(Change::Intent { job_id: 1, run_id: run }),
            w.commit(Change::Intent { job_id: 999, run_id: run }),
            w.commit(Change::Intent { job_id: 2, run_id: run }),
        );
        assert!(missing.is_err());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a, b);
        for (job, attempt) in [(1, a), (2, b)] {
            assert_eq!(attempt_owner(&store, attempt).await, job, "each intent gets its own job's attempt");
            assert_eq!(state(&store, job).await, ("submitting".into(), 1, None));
        }
        // Nothing was applied twice by a retry of the batch.
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM attempts").fetch_one(store.pool()).await.unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn the_sync_setting_is_sent_whenever_it_is_not_known_to_be_right() {
        let text = |sync, current: &mut Option<Sync>| {
            let mut sql = BatchSql::default();
            sql.begin(sync, current);
            sql.sql
        };
        let mut current = None;
        assert_eq!(text(Sync::Full, &mut current), "PRAGMA synchronous = FULL;BEGIN IMMEDIATE;");
        assert_eq!(current, None, "unknown until the text has run");
        current = Some(Sync::Full);
        assert_eq!(text(Sync::Full, &mut current), "BEGIN IMMEDIATE;");
        assert_eq!(current, Some(Sync::Full));
        assert_eq!(text(Sync::Normal, &mut current), "PRAGMA synchronous = NORMAL;BEGIN IMMEDIATE;");
        assert_eq!(current, None);
        current = Some(Sync::Normal);
        assert_eq!(text(Sync::Full, &mut current), "PRAGMA synchronous = FULL;BEGIN IMMEDIATE;");
    }

    fn done(job_id: i64) -> Change {
        Change::Done {
            job_id,
            outputs: Vec::new(),
            result: None,
            charged: 0.0,
            quality: None,
            review: false,
            exports: Vec::new(),
        }
    }

    #[tokio::test]
    async fn an_unhurried_done_waits_for_a_change_that_is_not_an_intent() {
        let (_dir, store, run) = store_with_jobs(2).await;
        // Long enough that only company can end the wait.
        let (w, _h) = Writer::start_waiting(&store, Duration::from_secs(600)).await.unwrap();
        w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        let lazy = {
            let w = w.clone();
            tokio::spawn(async move { w.commit_unhurried(done(1)).await })
        };
        tokio::task::yield_now().await;
        // An intent's transaction stays short: the parked `done` does not join it.
        let attempt = w.commit(Change::Intent { job_id: 2, run_id: run }).await.unwrap();
        assert_eq!(state(&store, 2).await.0, "submitting");
        assert_eq!(state(&store, 1).await.0, "submitting", "the done waits");
        assert!(!lazy.is_finished());
        // The request id, committed at once, takes the parked `done` along.
        w.send(accepted(2, attempt, "req-2")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), lazy).await.unwrap().unwrap().unwrap();
        assert_eq!(state(&store, 1).await.0, "done");
        assert_eq!(state(&store, 2).await.0, "submitted");
    }

    #[tokio::test]
    async fn an_unhurried_done_alone_is_committed_after_its_wait() {
        let (_dir, store, run) = store_with_jobs(1).await;
        let (w, _h) = Writer::start_waiting(&store, Duration::from_millis(50)).await.unwrap();
        w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        let asked = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(30), w.commit_unhurried(done(1))).await.unwrap().unwrap();
        // It waited for company (a timer never fires early), then went alone.
        assert!(asked.elapsed() >= Duration::from_millis(50), "committed without waiting");
        assert_eq!(state(&store, 1).await.0, "done");
    }

    /// An op as the writer holds it, for driving `try_apply` directly.
    fn op(change: Change) -> Op {
        Op { change, reply: None, unhurried: false }
    }

    async fn writer_conn(store: &Store) -> WriterConn {
        WriterConn { conn: store.pool().acquire().await.unwrap().detach(), sync: None }
    }

    #[tokio::test]
    async fn a_batch_of_several_chunks_commits_whole_and_answers_each_intent_with_its_own_attempt() {
        let n = i64::try_from(3 * CHUNK + 3).unwrap();
        let (_dir, store, run) = store_with_jobs(2 * n).await;
        let mut conn = writer_conn(&store).await;
        // Jobs 1..=n have an open attempt; n+1..=2n are new. The two kinds alternate, so every
        // chunk mixes them.
        let opened = try_apply(
            &mut conn,
            &(1..=n).map(|id| op(Change::Intent { job_id: id, run_id: run })).collect::<Vec<_>>(),
            Sync::Full,
        )
        .await
        .unwrap();
        let mut batch = Vec::new();
        for id in 1..=n {
            let attempt = *opened[usize::try_from(id - 1).unwrap()].as_ref().unwrap();
            batch.push(op(accepted(id, attempt, &format!("r{id}"))));
            batch.push(op(Change::Intent { job_id: n + id, run_id: run }));
        }
        assert!(batch.len() > 3 * CHUNK);
        let answers = try_apply(&mut conn, &batch, Sync::Full).await.unwrap();
        assert_eq!(answers.len(), batch.len());
        assert_eq!(conn.sync, Some(Sync::Full));
        for (op, answer) in batch.iter().zip(answers) {
            let answer = answer.unwrap();
            match op.change {
                Change::Intent { job_id, .. } => {
                    assert_eq!(attempt_owner(&store, answer).await, job_id, "intent of job {job_id}");
                }
                _ => assert_eq!(answer, 0),
            }
        }
        for id in 1..=n {
            assert_eq!(state(&store, id).await, ("submitted".into(), 1, Some(format!("r{id}"))));
            assert_eq!(state(&store, n + id).await, ("submitting".into(), 1, None));
        }
    }

    #[tokio::test]
    async fn a_failure_in_a_later_chunk_rolls_back_the_earlier_ones() {
        let n = i64::try_from(2 * CHUNK + 1).unwrap();
        let (_dir, store, run) = store_with_jobs(n).await;
        let mut conn = writer_conn(&store).await;
        let mut batch: Vec<Op> = (1..=n).map(|id| op(Change::Intent { job_id: id, run_id: run })).collect();
        // The last chunk records an output for a job that does not exist: a foreign key fails.
        let output = SavedOutput {
            index: 0,
            path: "x/0.png".into(),
            sha256: "0".repeat(64),
            bytes: 1,
            width: 1,
            height: 1,
            content_type: "image/png".into(),
            source_url: "http://x/0.png".into(),
        };
        batch.push(op(Change::Done {
            job_id: 999,
            outputs: vec![output],
            result: None,
            charged: 0.0,
            quality: None,
            review: false,
            exports: Vec::new(),
        }));
        assert!(try_apply(&mut conn, &batch, Sync::Full).await.is_err());
        for id in 1..=n {
            assert_eq!(state(&store, id).await, ("pending".into(), 0, None), "job {id} was rolled back");
        }
        let (attempts,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM attempts").fetch_one(store.pool()).await.unwrap();
        assert_eq!(attempts, 0);
        // The connection is usable again, outside any transaction.
        try_apply(&mut conn, &batch[..1], Sync::Full).await.unwrap();
        assert_eq!(state(&store, 1).await.0, "submitting");
    }

    #[tokio::test]
    async fn many_concurrent_changes_are_all_committed() {
        let (_dir, store, run) = store_with_jobs(200).await;
        let (w, _h) = Writer::start(&store).await.unwrap();
        let mut tasks = Vec::new();
        for id in 1..=200 {
            let w = w.clone();
            tasks.push(tokio::spawn(
                async move { w.commit(Change::Intent { job_id: id, run_id: run }).await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE state = 'submitting'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 200);
    }

    #[tokio::test]
    async fn a_full_disk_is_reported_as_disk_full_with_the_path_not_as_corruption() {
        let (_dir, store, run) = store_with_jobs(300).await;
        // SQLite's own page limit answers SQLITE_FULL exactly as a full disk (ENOSPC) does.
        let mut conn = store.pool().acquire().await.unwrap().detach();
        let (pages,): (i64,) = sqlx::query_as("PRAGMA page_count").fetch_one(&mut conn).await.unwrap();
        sqlx::query(&format!("PRAGMA max_page_count = {pages}")).execute(&mut conn).await.unwrap();
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let file = StateFile { path: store.path().to_owned(), identity: None, gone: None };
        tokio::spawn(writer_loop(conn, rx, UNHURRIED, file));
        let w = Writer { tx };
        // Changes nobody waits for: the first that fails poisons the writer...
        for id in 1..=300 {
            w.send(Change::Intent { job_id: id, run_id: run }).await.unwrap();
        }
        // ...and what comes after is refused with the same cause, named.
        let err = w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap_err();
        let text = err.to_string();
        assert!(err.is_disk_failure(), "{text}");
        assert!(text.starts_with("disk full"), "{text}");
        assert!(text.contains(&store.path().display().to_string()), "{text}");
        assert!(!text.contains("corrupt"), "{text}");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn no_intent_is_committed_once_the_state_file_is_deleted_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let lock = crate::store::RunLock::acquire(&path).unwrap();
        let store = Store::open_locked(&lock).await.unwrap();
        let run = store.start_run("c.csv", "seedance", "m", false).await.unwrap();
        sqlx::query(
            "INSERT INTO jobs (sku, position, planned_run, fingerprint, provider, model, task, prompt,
                               inputs, params, created_at, updated_at)
             VALUES ('A', 1, ?, 'f', 'seedance', 'm', 'edit', 'p', '[]', '{}', 0, 0),
                    ('B', 2, ?, 'f', 'seedance', 'm', 'edit', 'p', '[]', '{}', 0, 0)",
        )
        .bind(run)
        .bind(run)
        .execute(store.pool())
        .await
        .unwrap();
        let (w, _h) = Writer::start(&store).await.unwrap();
        let attempt = w.commit(Change::Intent { job_id: 1, run_id: run }).await.unwrap();
        // Moved away, as `mv` or a clean-up script would: the open file lives on, unnamed here.
        std::fs::rename(&path, dir.path().join("moved.db")).unwrap();
        let err = w.commit(Change::Intent { job_id: 2, run_id: run }).await.unwrap_err();
        assert!(matches!(err, StoreError::Replaced { how: "deleted", .. }), "{err}");
        assert!(err.to_string().contains("stopped before sending another paid request"), "{err}");
        // What an accepted request reports is still recorded; only new spending is refused.
        w.commit(accepted(1, attempt, "req-1")).await.unwrap();
        std::fs::write(&path, b"").unwrap();
        let err = w.commit(Change::Intent { job_id: 2, run_id: run }).await.unwrap_err();
        assert!(matches!(err, StoreError::Replaced { .. }), "{err}");
        assert_eq!(state(&store, 2).await.0, "pending");
    }
}
