//! Verified, durable downloads of output images: [`Fetcher`] streams to a temp file beside the
//! final name (size-capped, PNG/JPEG checked), [`Persister`] makes finished downloads durable in
//! batches (data synced, renamed, names synced), plus the output naming rule [`output_path`] and
//! the crash clean-up [`clean_temp_files`].

use std::io::{self, Write as _};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::provider::OutputRef;

/// The marker in temporary file names; anything holding it is a leftover of an interrupted run.
pub const TEMP_MARKER: &str = ".backdrop-tmp-";

/// The longest side backdrop accepts (a larger header is a decompression bomb, not a photo).
pub const MAX_SIDE: u32 = 16_384;
/// The most pixels backdrop accepts (64 MP).
pub const MAX_PIXELS: u64 = 64_000_000;

/// Bytes needed to recognise the image type.
const SNIFF_BYTES: usize = 16;
/// Bytes kept from the end of a download to find the image's end marker.
const TAIL_BYTES: usize = 64;

/// Longest path component built from a SKU, in bytes (filesystems allow 255).
const MAX_COMPONENT: usize = 120;
/// Longest readable stem kept in front of a hashed SKU's suffix.
const MAX_STEM: usize = 100;
/// Hex characters of sha256(sku) appended to a SKU that is not kept verbatim.
const HASH_CHARS: usize = 10;

/// One output written to disk and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedOutput {
    /// The output's index within its job.
    pub index: u32,
    /// The file, relative to the output folder.
    pub path: PathBuf,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
    /// Width read from the file's header.
    pub width: u32,
    /// Height read from the file's header.
    pub height: u32,
    /// `image/png` or `image/jpeg`, from the bytes (not from the server).
    pub content_type: String,
    /// The URL it came from.
    pub source_url: String,
}

/// Why a download failed. [`FetchError::is_retryable`] and [`FetchError::is_expired`] tell the
/// pipeline what to do; everything else is permanent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The server could not be reached.
    #[error("cannot connect to download {url}: {message}")]
    Connect {
        /// The output URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The transfer stopped part-way (timeout, reset, a body shorter than announced).
    #[error("download of {url} interrupted: {message}")]
    Interrupted {
        /// The output URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The server answered with an error status.
    #[error("download of {url} failed: HTTP {status}")]
    Status {
        /// The output URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The file is larger than `--max-download-bytes`.
    #[error("download of {url} is larger than the {limit}-byte limit")]
    TooLarge {
        /// The output URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The bytes are not a PNG or JPEG image (or its header is corrupt).
    #[error("download of {url} is not a valid PNG or JPEG image: {message}")]
    NotImage {
        /// The output URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The image header claims more pixels than backdrop will handle.
    #[error("download of {url} claims {width}x{height} pixels, above the {MAX_SIDE}-per-side / 64 MP limit")]
    TooManyPixels {
        /// The output URL.
        url: String,
        /// Claimed width.
        width: u32,
        /// Claimed height.
        height: u32,
    },
    /// The output URL cannot be downloaded by backdrop (not http or https).
    #[error("output URL {url:?} is not an http(s) URL")]
    BadUrl {
        /// The output URL.
        url: String,
    },
    /// Writing to the output folder failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl FetchError {
    /// True when downloading again may succeed: connection failures, interrupted or truncated
    /// transfers, 408, 429 and 5xx, and a body that is not an image (a proxy's error page
    /// answered with 200 is usually gone on the next try; the image is paid for, so it is worth
    /// the few bounded tries the pipeline makes).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Interrupted { .. } | Self::NotImage { .. } => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            _ => false,
        }
    }

    /// True when the output URL is gone (403, 404, 410): the image was paid for, so the pipeline
    /// re-resolves the URL (fal `response_url`) or fails the row as "paid, not downloaded".
    #[must_use]
    pub fn is_expired(&self) -> bool {
        matches!(self, Self::Status { status: 403 | 404 | 410, .. })
    }

    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }
}

/// Downloads outputs into one folder. Cheap to clone; shares the HTTP client's pool.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    out_dir: PathBuf,
    name_template: String,
    max_bytes: u64,
}

impl Fetcher {
    /// A fetcher writing under `out_dir` with names from `name_template` (see [`output_path`]).
    #[must_use]
    pub fn new(
        client: reqwest::Client,
        out_dir: impl Into<PathBuf>,
        name_template: impl Into<String>,
        max_bytes: u64,
    ) -> Self {
        Self { client, out_dir: out_dir.into(), name_template: name_template.into(), max_bytes }
    }

    /// The output folder.
    #[must_use]
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Downloads output `index` of `sku` and makes it durable under its final name:
    /// [`Fetcher::download`] then [`Downloaded::persist`].
    ///
    /// # Errors
    /// A [`FetchError`]; on every error the temporary file is removed and no final file is
    /// created or changed.
    pub async fn fetch(&self, sku: &str, index: u32, output: &OutputRef) -> Result<SavedOutput, FetchError> {
        self.download(sku, index, output).await?.persist().await
    }

    /// Receives output `index` of `sku` into a temporary file beside its final name, checking
    /// size and type on the way. Nothing is durable yet: that is [`Downloaded::persist`]'s job,
    /// which needs nothing more from the server.
    ///
    /// # Errors
    /// A [`FetchError`]; on every error the temporary file is removed.
    #[tracing::instrument(skip_all, fields(sku = %sku, index = index))]
    pub async fn download(
        &self,
        sku: &str,
        index: u32,
        output: &OutputRef,
    ) -> Result<Downloaded, FetchError> {
        let url = output.url.as_str();
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Err(FetchError::BadUrl { url: url.to_owned() });
        }
        let mut response = self.client.get(url).send().await.map_err(|e| transport(url, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status { url: url.to_owned(), status: status.as_u16() });
        }
        let announced = response.content_length();
        if announced.is_some_and(|n| n > self.max_bytes) {
            return Err(FetchError::TooLarge { url: url.to_owned(), limit: self.max_bytes });
        }

        // The name depends on the real bytes (png or jpg), so the first bytes decide it; a slow
        // server may send them a few at a time.
        let mut first = Vec::new();
        while first.len() < SNIFF_BYTES {
            match response.chunk().await.map_err(|e| transport(url, &e))? {
                Some(bytes) => first.extend_from_slice(&bytes),
                None => break,
            }
            if first.len() as u64 > self.max_bytes {
                return Err(FetchError::TooLarge { url: url.to_owned(), limit: self.max_bytes });
            }
        }
        let (content_type, ext) = match crate::provider::http::sniff_mime(&first) {
            Some("image/png") => ("image/png", "png"),
            Some("image/jpeg") => ("image/jpeg", "jpg"),
            _ => {
                return Err(FetchError::NotImage {
                    url: url.to_owned(),
                    message: format!(
                        "the first bytes are not a PNG or JPEG ({} bytes received)",
                        first.len()
                    ),
                });
            }
        };
        let relative = output_path(&self.name_template, sku, index, ext);
        let final_path = self.out_dir.join(&relative);
        let dir = final_path.parent().map_or_else(|| self.out_dir.clone(), Path::to_path_buf);
        // Inline, like the chunk writes below: a mkdir is far cheaper than a hop to the blocking
        // pool and back.
        // `created` is the highest folder whose name is new: its parent must be synced too.
        let created = match std::fs::create_dir(&dir) {
            Ok(()) => Some(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
            Err(_) => {
                std::fs::create_dir_all(&dir).map_err(|e| FetchError::io(&dir, e))?;
                Some(self.out_dir.clone())
            }
        };
        let file_name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp_path = dir.join(format!(".{file_name}{TEMP_MARKER}{:016x}", rand::random::<u64>()));
        let mut temp = TempFile::create(&temp_path)?;

        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let mut tail: Vec<u8> = Vec::with_capacity(2 * TAIL_BYTES);
        let mut chunk = Some(bytes::Bytes::from(first));
        while let Some(bytes) = chunk {
            written += bytes.len() as u64;
            if written > self.max_bytes {
                return Err(FetchError::TooLarge { url: url.to_owned(), limit: self.max_bytes });
            }
            hasher.update(&bytes);
            temp.write(&bytes)?;
            tail.extend_from_slice(&bytes[bytes.len().saturating_sub(TAIL_BYTES)..]);
            tail.drain(..tail.len().saturating_sub(TAIL_BYTES));
            chunk = response.chunk().await.map_err(|e| transport(url, &e))?;
        }
        // hyper reports most short bodies itself; this catches any that slip through.
        if announced.is_some_and(|n| n != written) {
            return Err(FetchError::Interrupted {
                url: url.to_owned(),
                message: format!("got {written} of {} announced bytes", announced.unwrap_or_default()),
            });
        }
        // A body without Content-Length that stops early looks complete to HTTP; the image's own
        // end marker does not.
        if !has_end_marker(ext, &tail) {
            return Err(FetchError::Interrupted {
                url: url.to_owned(),
                message: format!("the {ext} data stops before its end marker ({written} bytes received)"),
            });
        }

        Ok(Downloaded {
            temp,
            final_path,
            new_dir: created.map(|top| (dir, top)),
            saved: SavedOutput {
                index,
                path: relative,
                sha256: format!("{:x}", hasher.finalize()),
                bytes: written,
                width: 0,
                height: 0,
                content_type: content_type.to_owned(),
                source_url: url.to_owned(),
            },
        })
    }
}

/// An output received into its temporary file, not yet durable.
#[derive(Debug)]
pub struct Downloaded {
    temp: TempFile,
    final_path: PathBuf,
    /// A folder this download created, and the highest new folder above it (itself, or the
    /// output folder when whole levels were made): their names must be synced too.
    new_dir: Option<(PathBuf, PathBuf)>,
    saved: SavedOutput,
}

impl Downloaded {
    /// Makes this one output durable on its own (see [`Persister`] for the batched way).
    ///
    /// # Errors
    /// [`FetchError::NotImage`] or [`FetchError::TooManyPixels`] for a bad image, or the I/O
    /// error; the temporary file is removed either way.
    pub async fn persist(self) -> Result<SavedOutput, FetchError> {
        let final_path = self.final_path.clone();
        tokio::task::spawn_blocking(move || {
            let mut group = Group::check(vec![self])?;
            group.sync_data(None)?;
            group.rename()?;
            group.sync_names(None)?;
            group
                .saved
                .pop()
                .ok_or_else(|| FetchError::io(&final_path, io::Error::other("nothing was saved")))
        })
        .await
        .map_err(|e| FetchError::io(Path::new("."), io::Error::other(e.to_string())))?
    }
}

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

    /// Makes one job's outputs durable under their final names, with whichever batch is next.
    /// `urgent` (no other job is in flight to share the sync with) syncs that batch at once.
    ///
    /// # Errors
    /// As [`Downloaded::persist`], for the first output that failed; on error none of the job's
    /// temporary files is left behind (some final files may already be in place).
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
struct Group {
    pending: Vec<Downloaded>,
    saved: Vec<SavedOutput>,
    /// Folders whose entries changed: each renamed file's folder, and folders this job created
    /// with the output folder they live under.
    dirs: Vec<(PathBuf, Option<PathBuf>)>,
}

impl Group {
    /// Reads every image header (type, dimension bombs); the first bad one fails the group and
    /// its temporary files are removed.
    fn check(outputs: Vec<Downloaded>) -> Result<Self, FetchError> {
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

fn transport(url: &str, e: &reqwest::Error) -> FetchError {
    let mut message = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        let text = err.to_string();
        let text = text.split(" for url (").next().unwrap_or_default();
        if !message.ends_with(text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(text);
        }
        source = err.source();
    }
    if e.is_connect() {
        FetchError::Connect { url: url.to_owned(), message }
    } else {
        FetchError::Interrupted { url: url.to_owned(), message }
    }
}

/// Whether the last bytes of a file close the image: PNG's `IEND` chunk, JPEG's end-of-image
/// marker (a few trailing bytes after it are tolerated; some encoders pad).
fn has_end_marker(ext: &str, tail: &[u8]) -> bool {
    match ext {
        "png" => tail.ends_with(b"IEND\xAE\x42\x60\x82"),
        "jpg" => tail.windows(2).any(|w| w == [0xFF, 0xD9]),
        _ => false,
    }
}

/// Reads the image header and rejects non-images and dimension bombs.
fn check_image(path: &Path, url: &str) -> Result<(u32, u32), FetchError> {
    let not_image = |message: String| FetchError::NotImage { url: url.to_owned(), message };
    let reader = image::ImageReader::open(path)
        .map_err(|e| FetchError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| FetchError::io(path, e))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        other => return Err(not_image(format!("unexpected format {other:?}"))),
    }
    let (width, height) = reader.into_dimensions().map_err(|e| not_image(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(not_image(format!("empty image {width}x{height}")));
    }
    if width > MAX_SIDE || height > MAX_SIDE || u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(FetchError::TooManyPixels { url: url.to_owned(), width, height });
    }
    Ok((width, height))
}

/// A temporary file that removes itself unless committed.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl TempFile {
    fn create(path: &Path) -> Result<Self, FetchError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| FetchError::io(path, e))?;
        Ok(Self { path: path.to_owned(), file: Some(file) })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
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

/// Removes temporary files left under `out_dir` by an interrupted run and returns how many.
/// Call it at run start, under the run lock, so no live download is touched.
///
/// # Errors
/// An I/O error reading a folder or removing a file (a missing `out_dir` is not an error).
pub fn clean_temp_files(out_dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let mut pending = vec![out_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() && entry.file_name().to_string_lossy().contains(TEMP_MARKER) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// The path of output `index` of `sku`, relative to the output folder, from a template with
/// `{sku}`, `{index}` and `{ext}` placeholders (`/` separates folders).
///
/// A SKU is used verbatim when it is 1–120 bytes of `[A-Z0-9._-]` (no lowercase letters, so two
/// verbatim names never differ only by case), does not start or end with `.`, and is not a
/// Windows device name (`CON`, `NUL.X`, `COM1`...). Any other SKU becomes a lowercased stem of
/// `[a-z0-9_-]` (at most 100 bytes) + `~` + the first 10 hex digits of sha256(sku). Verbatim
/// names never contain `~`, stems never do, so the two forms cannot meet; two hashed names meet
/// only if both their stems and 40 bits of their hashes agree. Every `.`, `..` or empty component
/// the template itself produces is neutralised, so the result always stays inside the folder.
#[must_use]
pub fn output_path(template: &str, sku: &str, index: u32, ext: &str) -> PathBuf {
    let sku_part = sku_component(sku);
    let ext: String = ext.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    let mut path = PathBuf::new();
    for part in template.split(['/', '\\']) {
        let filled =
            part.replace("{sku}", &sku_part).replace("{index}", &index.to_string()).replace("{ext}", &ext);
        match filled.as_str() {
            "" | "." => {}
            ".." => path.push("__"),
            _ => path.push(strip_controls(&filled)),
        }
    }
    if path.as_os_str().is_empty() {
        path.push(format!("{sku_part}-{index}.{ext}"));
    }
    debug_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
    path
}

/// Template text is the user's, but must not smuggle control bytes or a drive prefix in.
fn strip_controls(part: &str) -> String {
    part.chars().map(|c| if c.is_control() || c == ':' { '_' } else { c }).collect()
}

fn sku_component(sku: &str) -> String {
    if is_verbatim(sku) {
        return sku.to_owned();
    }
    let mut stem = String::with_capacity(sku.len().min(MAX_STEM));
    for c in sku.chars() {
        if stem.len() >= MAX_STEM {
            break;
        }
        let c = c.to_ascii_lowercase();
        stem.push(if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' { c } else { '_' });
    }
    let digest = Sha256::digest(sku.as_bytes());
    let hash = hex::encode(digest);
    format!("{stem}~{}", &hash[..HASH_CHARS])
}

fn is_verbatim(sku: &str) -> bool {
    !sku.is_empty()
        && sku.len() <= MAX_COMPONENT
        && sku
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        && !sku.starts_with('.')
        && !sku.ends_with('.')
        && !is_windows_reserved(sku)
}

/// `CON`, `PRN`, `AUX`, `NUL`, `COM0-9`, `LPT0-9`, alone or before an extension.
fn is_windows_reserved(name: &str) -> bool {
    let base = name.split('.').next().unwrap_or(name).to_ascii_uppercase();
    matches!(base.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((base.starts_with("COM") || base.starts_with("LPT"))
            && base.len() == 4
            && base.as_bytes()[3].is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const T: &str = crate::config::DEFAULT_OUTPUT_NAME;

    #[test]
    fn safe_skus_are_kept_verbatim() {
        assert_eq!(output_path(T, "SKU-00123", 1, "png"), PathBuf::from("SKU-00123/1.png"));
        assert_eq!(output_path(T, "AB_12.V2", 0, "jpg"), PathBuf::from("AB_12.V2/0.jpg"));
        assert_eq!(output_path("{sku}-{index}.{ext}", "X1", 3, "png"), PathBuf::from("X1-3.png"));
    }

    #[test]
    fn unsafe_skus_get_a_readable_stem_and_a_hash() {
        let p = output_path(T, "abc", 1, "png");
        let name = p.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        assert!(name.starts_with("abc~") && name.len() == 4 + HASH_CHARS, "{name}");
        let p = output_path(T, "a/b", 1, "png");
        assert_eq!(p.components().count(), 2, "{p:?}");
    }

    fn nasty() -> Vec<String> {
        let mut v: Vec<String> = [
            "a/b",
            "a_b",
            "a\\b",
            "..",
            ".",
            "",
            "...",
            "CON",
            "con",
            "NUL",
            "NUL.TXT",
            "COM1",
            "LPT9",
            "COM",
            "ABC",
            "abc",
            "Abc",
            "ABC.",
            "ABC~1",
            "abc~",
            "a\0b",
            "a\nb",
            "a\tb",
            "/etc/passwd",
            "../../x",
            "C:\\x",
            "C:",
            "~",
            "-",
            "_",
            ".hidden",
            "é",
            "E\u{301}",
            "É",
            "sku 1",
            "SKU 1",
            "SKU_1",
            "SKU-1",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.push("A".repeat(300));
        v.push(format!("{}B", "A".repeat(299)));
        v.push("a".repeat(300));
        v.push("ü".repeat(150));
        v.push("A".repeat(120));
        v.push("A".repeat(121));
        v
    }

    fn assert_inside(p: &Path) {
        assert!(!p.as_os_str().is_empty());
        for c in p.components() {
            let Component::Normal(name) = c else { panic!("{p:?} has {c:?}") };
            let name = name.to_string_lossy();
            assert!(name.len() <= 255, "{p:?}");
            assert!(!name.chars().any(char::is_control), "{p:?}");
            assert!(!name.contains(':'), "{p:?}");
        }
    }

    #[test]
    fn nasty_skus_stay_inside_and_never_collide_even_ignoring_case() {
        let mut seen: HashMap<String, String> = HashMap::new();
        for sku in nasty() {
            let p = output_path(T, &sku, 1, "png");
            assert_inside(&p);
            let first = p.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
            assert!(first.len() <= MAX_COMPONENT, "{sku:?} -> {first}");
            assert!(!is_windows_reserved(&first), "{sku:?} -> {first}");
            let key = p.to_string_lossy().to_lowercase();
            if let Some(other) = seen.insert(key.clone(), sku.clone()) {
                panic!("{sku:?} and {other:?} both map to {key}");
            }
        }
    }

    #[test]
    fn template_components_cannot_escape() {
        let p = output_path("../{sku}/./{index}.{ext}", "A", 1, "png");
        assert_eq!(p, PathBuf::from("__/A/1.png"));
        let p = output_path("/abs/{sku}-{index}.{ext}", "A", 1, "p/../ng");
        assert_inside(&p);
        assert!(!p.is_absolute());
    }

    proptest! {
        #[test]
        fn every_sku_stays_inside(sku in any::<String>(), index in any::<u32>()) {
            let p = output_path(T, &sku, index, "png");
            assert_inside(&p);
            prop_assert_eq!(p.components().count(), 2);
        }

        #[test]
        fn distinct_skus_never_share_a_path_ignoring_case(a in "[ -~]{0,20}", b in "[ -~]{0,20}") {
            prop_assume!(a != b);
            let pa = output_path(T, &a, 1, "png").to_string_lossy().to_lowercase();
            let pb = output_path(T, &b, 1, "png").to_string_lossy().to_lowercase();
            prop_assert_ne!(pa, pb);
        }
    }

    #[test]
    fn leftover_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("A")).unwrap();
        std::fs::write(dir.path().join("A").join(format!(".1.png{TEMP_MARKER}abc")), b"x").unwrap();
        std::fs::write(dir.path().join(format!(".2.png{TEMP_MARKER}def")), b"x").unwrap();
        std::fs::write(dir.path().join("A").join("1.png"), b"keep").unwrap();
        assert_eq!(clean_temp_files(dir.path()).unwrap(), 2);
        assert!(dir.path().join("A").join("1.png").exists());
        assert_eq!(clean_temp_files(&dir.path().join("missing")).unwrap(), 0);
    }

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

    #[test]
    fn errors_know_what_to_do() {
        let s = |status| FetchError::Status { url: "u".into(), status };
        assert!(s(503).is_retryable() && s(429).is_retryable() && !s(503).is_expired());
        for st in [403, 404, 410] {
            assert!(s(st).is_expired() && !s(st).is_retryable());
        }
        assert!(FetchError::Interrupted { url: "u".into(), message: "m".into() }.is_retryable());
        let big = FetchError::TooLarge { url: "u".into(), limit: 1 };
        assert!(!big.is_retryable() && !big.is_expired());
    }
}
