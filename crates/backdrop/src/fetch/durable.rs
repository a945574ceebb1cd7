//! [`Persister`]: makes finished downloads durable in batches: each file's data synced, renamed
//! to its final name, and the names synced (on Linux one `syncfs` before the renames and one after,
//! for the whole batch), plus [`TempFile`], the temporary file a download is written to. With a
//! bucket as the output location ([`Persister::start_object`]), each output is instead put as one
//! object, checked, and its staged file removed.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use super::object::{ObjectError, ObjectTarget};
use super::{Downloaded, FetchError, check_image};
use crate::domain::SavedOutput;

/// Most jobs made durable by one pair of filesystem syncs.
const MAX_PERSIST_BATCH: usize = 256;
/// How long a batch waits for more jobs before it is synced, unless one of them is urgent. It
/// delays only the `done` record, never a slot: the provider's part is over by then.
const LINGER: std::time::Duration = std::time::Duration::from_millis(200);

/// Makes finished downloads durable, many jobs at a time: one task takes every job that queued
/// while the previous batch was syncing, checks each image header, syncs the data, renames the
/// temporary files to their final names and syncs the names. A batch waits up to [`LINGER`] for
/// company unless a job says it is urgent (nothing else is in flight to join it). On Linux both
/// syncs are one
/// `syncfs` of the output folder's filesystem each, whatever the batch size, instead of a file
/// fsync plus folder fsyncs per output; this is what keeps durability off the CPU budget. If
/// `syncfs` fails or is missing, every file and folder is fsynced one by one, as before.
#[derive(Debug, Clone)]
pub struct Persister {
    tx: tokio::sync::mpsc::Sender<PersistJob>,
}

struct PersistJob {
    outputs: Vec<Downloaded>,
    urgent: bool,
    reply: tokio::sync::oneshot::Sender<Result<Vec<SavedOutput>, FetchError>>,
}

impl Persister {
    /// Starts the persisting task for outputs under `out_dir`.
    #[must_use]
    pub fn start(out_dir: &Path) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_PERSIST_BATCH);
        tokio::spawn(persist_loop(out_dir.to_owned(), rx));
        Self { tx }
    }

    /// Starts the task that puts outputs in `target` (a bucket and prefix) instead: each output
    /// downloaded to the staging folder is checked, put as one object under its relative name,
    /// verified (see [`ObjectTarget::put_verified`]), and its staged file removed.
    #[must_use]
    pub fn start_object(target: ObjectTarget) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_PERSIST_BATCH);
        tokio::spawn(object_loop(target, rx));
        Self { tx }
    }

    /// Makes one job's outputs durable under their final names, with whichever batch is next.
    /// `urgent` (no other job is in flight to share the sync with) syncs that batch at once.
    ///
    /// # Errors
    /// [`FetchError::NotImage`] or [`FetchError::TooManyPixels`] for a bad image, or the I/O
    /// error, for the first output that failed; on error none of the job's temporary files is
    /// left behind (some final files may already be in place).
    pub async fn persist(
        &self,
        outputs: Vec<Downloaded>,
        urgent: bool,
    ) -> Result<Vec<SavedOutput>, FetchError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let stopped = || FetchError::io(Path::new("."), io::Error::other("the file persister has stopped"));
        self.tx.send(PersistJob { outputs, urgent, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn persist_loop(out_dir: PathBuf, mut rx: tokio::sync::mpsc::Receiver<PersistJob>) {
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut urgent = first.urgent;
        let mut batch = vec![first];
        while batch.len() < MAX_PERSIST_BATCH {
            let next = if urgent {
                rx.try_recv().ok()
            } else {
                tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
            };
            let Some(job) = next else { break };
            urgent |= job.urgent;
            batch.push(job);
        }
        let out_dir = out_dir.clone();
        // A panic drops the replies, which their waiters see as an error.
        let _ = tokio::task::spawn_blocking(move || persist_batch(&out_dir, batch)).await;
    }
}

/// Tries per object put (the store's own client retries transient errors within each).
const OBJECT_TRIES: u32 = 3;

async fn object_loop(target: ObjectTarget, mut rx: tokio::sync::mpsc::Receiver<PersistJob>) {
    // Jobs are independent objects: each is stored on its own task, so one slow PUT does not
    // hold the others.
    while let Some(job) = rx.recv().await {
        let target = target.clone();
        tokio::spawn(async move {
            let PersistJob { outputs, reply, .. } = job;
            drop(reply.send(store_objects(&target, outputs).await));
        });
    }
}

/// Checks, puts and verifies one job's outputs.
async fn store_objects(
    target: &ObjectTarget,
    outputs: Vec<Downloaded>,
) -> Result<Vec<SavedOutput>, FetchError> {
    let group = match tokio::task::spawn_blocking(move || Group::check(outputs)).await {
        Ok(group) => group?,
        Err(e) => return Err(FetchError::io(Path::new("."), io::Error::other(e.to_string()))),
    };
    let mut saved = Vec::with_capacity(group.pending.len());
    // Each staged file is removed when its `Downloaded` drops, either way: on success the object
    // is the output, on failure the row keeps its result and downloads again.
    for d in group.pending {
        put_one(target, &d).await?;
        saved.push(d.saved);
    }
    Ok(saved)
}

async fn put_one(target: &ObjectTarget, d: &Downloaded) -> Result<(), FetchError> {
    let bytes = tokio::fs::read(&d.temp.path).await.map_err(|e| FetchError::io(&d.temp.path, e))?;
    let bytes = bytes::Bytes::from(bytes);
    let relative = d.saved.path.to_string_lossy().into_owned();
    let mut tries = 0;
    loop {
        tries += 1;
        match target.put_verified(&relative, bytes.clone()).await {
            Ok(sha256) if sha256 == d.saved.sha256 => return Ok(()),
            Ok(sha256) => {
                // The staged file changed after it was downloaded and hashed.
                return Err(ObjectError::Mismatch {
                    key: relative,
                    why: format!("sha256 {sha256} stored, {} downloaded", d.saved.sha256),
                }
                .into());
            }
            Err(e) if e.is_retryable() && tries < OBJECT_TRIES => {
                tracing::info!(error = %e, tries, "storing an output failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500 * u64::from(tries))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The blocking half of [`Persister`]: every job in `batch` is answered.
fn persist_batch(out_dir: &Path, batch: Vec<PersistJob>) {
    let mut groups = Vec::with_capacity(batch.len());
    for PersistJob { outputs, reply, .. } in batch {
        match Group::check(outputs) {
            Ok(group) => groups.push((group, reply)),
            Err(e) => drop(reply.send(Err(e))),
        }
    }
    if groups.is_empty() {
        return;
    }
    let data_synced = sync_filesystem(out_dir);
    let mut renamed = Vec::with_capacity(groups.len());
    for (mut group, reply) in groups {
        match group.sync_data(data_synced.as_ref()).and_then(|()| group.rename()) {
            Ok(()) => renamed.push((group, reply)),
            Err(e) => drop(reply.send(Err(e))),
        }
    }
    let names_synced = if renamed.is_empty() { None } else { sync_filesystem(out_dir) };
    for (mut group, reply) in renamed {
        let result = group.sync_names(names_synced.as_ref()).map(|()| group.saved);
        drop(reply.send(result));
    }
}

/// Proof that a `syncfs` covered everything written before it on the output folder's filesystem.
struct FsSynced;

/// Syncs the whole filesystem holding `dir` (Linux `syncfs`), or `None` when it cannot, in which
/// case the caller fsyncs file by file.
#[cfg(target_os = "linux")]
fn sync_filesystem(dir: &Path) -> Option<FsSynced> {
    let folder = std::fs::File::open(dir).ok()?;
    match rustix::fs::syncfs(&folder) {
        Ok(()) => Some(FsSynced),
        Err(e) => {
            tracing::debug!(error = %e, "syncfs failed; syncing file by file");
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem(_dir: &Path) -> Option<FsSynced> {
    None
}

/// One job's downloads on their way to durability.
pub(super) struct Group {
    pending: Vec<Downloaded>,
    saved: Vec<SavedOutput>,
    /// Folders whose entries changed: each renamed file's folder, and folders this job created
    /// with the output folder they live under.
    dirs: Vec<(PathBuf, Option<PathBuf>)>,
}

impl Group {
    /// Reads every image header (type, dimension bombs); the first bad one fails the group and
    /// its temporary files are removed.
    pub(super) fn check(outputs: Vec<Downloaded>) -> Result<Self, FetchError> {
        let mut pending = Vec::with_capacity(outputs.len());
        for mut d in outputs {
            let (width, height) = check_image(&d.temp.path, &d.saved.source_url)?;
            d.saved.width = width;
            d.saved.height = height;
            pending.push(d);
        }
        Ok(Self { saved: Vec::with_capacity(pending.len()), pending, dirs: Vec::new() })
    }

    /// Makes the temporary files' bytes durable: already done by a filesystem sync, else fsync.
    fn sync_data(&mut self, synced: Option<&FsSynced>) -> Result<(), FetchError> {
        if synced.is_none() {
            for d in &mut self.pending {
                d.temp.sync()?;
            }
        }
        Ok(())
    }

    /// Moves every temporary file to its final name.
    fn rename(&mut self) -> Result<(), FetchError> {
        for d in self.pending.drain(..) {
            let Downloaded { temp, final_path, new_dir, saved } = d;
            temp.rename_to(&final_path)?;
            if let Some(dir) = final_path.parent() {
                self.dirs.push((dir.to_owned(), None));
            }
            if let Some((dir, out_dir)) = new_dir {
                self.dirs.push((dir, Some(out_dir)));
            }
            self.saved.push(saved);
        }
        Ok(())
    }

    /// Makes the new names durable: already done by a filesystem sync, else fsync each folder
    /// that names them (a new folder's own name lives in its parent, up to the output folder).
    fn sync_names(&mut self, synced: Option<&FsSynced>) -> Result<(), FetchError> {
        if synced.is_some() {
            return Ok(());
        }
        self.dirs.sort();
        self.dirs.dedup();
        for (dir, created_under) in &self.dirs {
            match created_under {
                None => sync_dir(dir).map_err(|e| FetchError::io(dir, e))?,
                Some(out_dir) => sync_new_dirs(dir, out_dir).map_err(|e| FetchError::io(dir, e))?,
            }
        }
        Ok(())
    }
}

/// A temporary file that removes itself unless committed.
#[derive(Debug)]
pub(super) struct TempFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl TempFile {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn create(path: &Path) -> Result<Self, FetchError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| FetchError::io(path, e))?;
        Ok(Self { path: path.to_owned(), file: Some(file) })
    }

    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
        // Chunks are small (a network read); a blocking write of one is cheaper than a hop to
        // the blocking pool per chunk.
        match &mut self.file {
            Some(file) => file.write_all(bytes).map_err(|e| FetchError::io(&self.path, e)),
            None => Err(FetchError::io(&self.path, io::Error::other("temporary file already closed"))),
        }
    }

    /// fsync: the bytes survive a power loss (under the temporary name).
    fn sync(&mut self) -> Result<(), FetchError> {
        match &self.file {
            Some(file) => file.sync_all().map_err(|e| FetchError::io(&self.path, e)),
            None => Ok(()),
        }
    }

    /// Renames over `target`; its folder still has to be synced for the name to be durable.
    fn rename_to(mut self, target: &Path) -> Result<(), FetchError> {
        drop(self.file.take());
        std::fs::rename(&self.path, target).map_err(|e| FetchError::io(target, e))?;
        // The rename is done: from here on the temp name no longer exists.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.path.as_os_str().is_empty() {
            // Best effort: a leftover is removed by `clean_temp_files` at the next run start.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Syncs every folder from `dir`'s parent up to `top`'s parent: the entries that name the folders
/// just created, `top` being the highest of them.
fn sync_new_dirs(dir: &Path, top: &Path) -> io::Result<()> {
    let mut current = dir;
    while let Some(parent) = current.parent() {
        // A relative `out` is named in the current folder.
        let named_in = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        sync_dir(named_in)?;
        if current == top || parent.as_os_str().is_empty() || !parent.starts_with(top) {
            break;
        }
        current = parent;
    }
    Ok(())
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    // Windows cannot open a directory as a file; NTFS journals the rename itself.
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{TEMP_MARKER, clean_temp_files, output_path};
    use super::*;

    const T: &str = super::super::DEFAULT_OUTPUT_NAME;

    /// A download as `Fetcher::download` leaves it: bytes in a temp file beside `sku/0.png`.
    fn received(out: &Path, sku: &str, bytes: &[u8]) -> Downloaded {
        let relative = output_path(T, sku, 0, "png");
        let final_path = out.join(&relative);
        let dir = final_path.parent().unwrap().to_owned();
        std::fs::create_dir(&dir).unwrap();
        let mut temp = TempFile::create(&dir.join(format!(".0.png{TEMP_MARKER}{sku}"))).unwrap();
        temp.write(bytes).unwrap();
        Downloaded {
            temp,
            final_path,
            new_dir: Some((dir.clone(), dir)),
            saved: SavedOutput {
                index: 0,
                path: relative,
                sha256: String::new(),
                bytes: bytes.len() as u64,
                width: 0,
                height: 0,
                content_type: "image/png".into(),
                source_url: format!("http://sim/{sku}"),
            },
        }
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::new(width, height)
            .write_to(&mut io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_batch_makes_every_job_durable_and_a_bad_one_fails_alone() {
        let out = tempfile::tempdir().unwrap();
        let persister = Persister::start(out.path());
        let (a, bad, b) = tokio::join!(
            persister.persist(vec![received(out.path(), "A", &png(3, 2))], false),
            persister.persist(vec![received(out.path(), "BAD", b"\x89PNG\r\n\x1a\n not really")], false),
            persister.persist(vec![received(out.path(), "B", &png(5, 4))], true),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a[0].width, a[0].height, b[0].width, b[0].height), (3, 2, 5, 4));
        assert_eq!(std::fs::read(out.path().join("A/0.png")).unwrap(), png(3, 2));
        assert_eq!(std::fs::read(out.path().join("B/0.png")).unwrap(), png(5, 4));
        assert!(matches!(bad, Err(FetchError::NotImage { .. })), "{bad:?}");
        assert!(!out.path().join("BAD/0.png").exists(), "a bad image never gets its final name");
        assert_eq!(clean_temp_files(out.path()).unwrap(), 0, "no temporary file is left behind");
    }
}
