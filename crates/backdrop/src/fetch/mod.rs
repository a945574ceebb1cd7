//! Verified downloads of output images: [`Fetcher`] streams each output to a temp file beside its
//! final name (size-capped while streaming, PNG/JPEG checked) through a [`DownloadClient`] whose
//! [`guard`] decides which addresses and redirects a download may follow; [`durable`] makes
//! finished downloads durable in batches, [`naming`] maps a SKU to its file name, and
//! [`cleanup`] removes what a crash left; [`object`] puts outputs in a bucket instead of a folder;
//! [`export`] stages and verifies the files export presets derive from outputs.

pub mod cleanup;
pub mod durable;
pub mod export;
pub mod guard;
pub mod naming;
pub mod object;

pub use cleanup::{CleanUp, OutputFolderLock, TEMP_MARKER, clean_temp_files, probe_writable, temp_file_name};
pub use durable::Persister;
pub use guard::{AddressPolicy, DownloadClient};
pub use naming::{DEFAULT_OUTPUT_NAME, output_path};

use durable::TempFile;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::domain::{OutputRef, SavedOutput};

/// The longest side backdrop accepts (a larger header is a decompression bomb, not a photo).
pub const MAX_SIDE: u32 = 16_384;
/// The most pixels backdrop accepts (64 MP).
pub const MAX_PIXELS: u64 = 64_000_000;

/// Bytes needed to recognise the image type.
const SNIFF_BYTES: usize = 16;
/// Bytes kept from the end of a download to find the image's end marker.
const TAIL_BYTES: usize = 64;

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
    /// The download was not allowed to go where it led: a refused address (loopback, private,
    /// link-local... when the API base is not one), too many redirects, a redirect to another
    /// scheme or from https down to http. Permanent: the same URL leads to the same place.
    #[error("download of {url} refused: {reason}")]
    Refused {
        /// The output URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Storing the output in object storage failed, or the stored object is not what was
    /// written.
    #[error("cannot store the output: {0}")]
    Object(#[from] object::ObjectError),
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

/// Downloads outputs into one folder. Cheap to clone; shares the download client's pool.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: DownloadClient,
    out_dir: PathBuf,
    name_template: String,
    max_bytes: u64,
}

impl Fetcher {
    /// A fetcher writing under `out_dir` with names from `name_template` (see [`output_path`]).
    /// Taking a [`DownloadClient`], not any HTTP client, is what guarantees its address and
    /// redirect rules apply to every download.
    #[must_use]
    pub fn new(
        client: DownloadClient,
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

    /// Receives output `index` of `sku` into a temporary file beside its final name, checking
    /// size and type on the way. Nothing is durable yet: that is [`Persister::persist`]'s job,
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
        let parsed = match url::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => parsed,
            _ => return Err(FetchError::BadUrl { url: url.to_owned() }),
        };
        // An IP literal never reaches the client's resolver: its address is checked here.
        guard::check_url(&parsed, self.client.policy())
            .map_err(|why| FetchError::Refused { url: url.to_owned(), reason: why.to_string() })?;
        let mut response = self.client.client().get(parsed).send().await.map_err(|e| transport(url, &e))?;
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
        // Inline, like the chunk writes below: a mkdir is far cheaper than a hop to the blocking
        // pool and back.
        let mut staging = Staging::open(&self.out_dir, &relative)?;

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
            staging.temp.write(&bytes)?;
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

        Ok(staging.finish(SavedOutput {
            index,
            path: relative,
            sha256: format!("{:x}", hasher.finalize()),
            bytes: written,
            width: 0,
            height: 0,
            content_type: content_type.to_owned(),
            source_url: url.to_owned(),
        }))
    }
}

/// A staging file beside `out_dir/relative`, its folders created: how every output file starts,
/// whether its bytes arrive as a download's chunks or an export's render.
struct Staging {
    temp: TempFile,
    final_path: PathBuf,
    /// As [`Downloaded`]'s.
    new_dir: Option<(PathBuf, PathBuf)>,
}

impl Staging {
    fn open(out_dir: &Path, relative: &Path) -> Result<Self, FetchError> {
        let final_path = out_dir.join(relative);
        let dir = final_path.parent().map_or_else(|| out_dir.to_path_buf(), Path::to_path_buf);
        // `created` is the highest folder whose name is new: its parent must be synced too.
        let created = match std::fs::create_dir(&dir) {
            Ok(()) => Some(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
            Err(_) => {
                std::fs::create_dir_all(&dir).map_err(|e| FetchError::io(&dir, e))?;
                Some(out_dir.to_path_buf())
            }
        };
        let file_name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = TempFile::create(&dir.join(temp_file_name(&file_name)))?;
        Ok(Self { temp, final_path, new_dir: created.map(|top| (dir, top)) })
    }

    /// The staged file, with what was written into it.
    fn finish(self, saved: SavedOutput) -> Downloaded {
        Downloaded { temp: self.temp, final_path: self.final_path, new_dir: self.new_dir, saved }
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
    /// The output's index and the staging file holding its received bytes: what the quality
    /// gate reads, before the file is made durable (locally or as an object) and the staging
    /// copy goes away.
    #[must_use]
    pub fn staged(&self) -> (u32, &Path) {
        (self.saved.index, self.temp.path())
    }
}

fn transport(url: &str, e: &reqwest::Error) -> FetchError {
    if let Some(why) = guard::refusal(e) {
        return FetchError::Refused { url: url.to_owned(), reason: why.to_string() };
    }
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
    // Downloads are PNG or JPEG by their first bytes already; WebP comes from export presets.
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let refused = FetchError::Refused { url: "u".into(), reason: "r".into() };
        assert!(!refused.is_retryable() && !refused.is_expired());
    }
}
