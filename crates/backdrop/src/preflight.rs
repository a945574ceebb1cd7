//! Input preflight: before the first paid request, every distinct input image of a catalog (URL
//! or local file) is checked once: reachable, an image type the provider accepts by its magic
//! bytes, and size and dimensions (read from the header bytes only) within the provider's limits.
//! Passed URL checks are cached in the state file with the host's validators.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RANGE};
use tokio::io::AsyncReadExt as _;

use crate::catalog::{Catalog, CatalogError, CatalogSpec, Input};
use crate::domain::Task;
use crate::domain::text::terminal_safe_line;
use crate::fetch::DownloadClient;
use crate::prompt::Template;
use crate::store::inputs::CheckedInput;
use crate::store::{Store, StoreError, now_ms};

/// Bytes read from the start of each input: enough for the header of any PNG or WebP, and of a
/// JPEG whose metadata (EXIF, an embedded thumbnail, an ICC profile) comes before its frame header
/// in all but rare cases. Asked for with a `Range` request; a host that ignores it is read only
/// this far.
pub const HEAD_BYTES: usize = 256 * 1024;

/// How long a passed check of a URL stands before the next run revalidates it (a conditional
/// request: one 304 without a body when the image is unchanged).
pub const DEFAULT_TTL: Duration = Duration::from_secs(60 * 60);

/// Inputs checked at once by default.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// What the provider accepts as an input image. Both providers serve the same model (Seedream
/// v4.5 edit), whose limits these are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputLimits {
    /// Largest file, in bytes.
    pub max_bytes: u64,
    /// Each side must be longer than this, in pixels.
    pub min_side: u32,
    /// Largest width × height.
    pub max_pixels: u64,
    /// Largest ratio of the long side to the short one.
    pub max_aspect: f64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self { max_bytes: 10 * 1024 * 1024, min_side: 14, max_pixels: 6000 * 6000, max_aspect: 16.0 }
    }
}

/// How preflight runs.
#[derive(Debug, Clone)]
pub struct PreflightOptions {
    /// Inputs checked at once.
    pub concurrency: usize,
    /// How long a passed URL check stands before it is revalidated.
    pub ttl: Duration,
    /// The provider's limits.
    pub limits: InputLimits,
    /// Print a progress line on stderr every so many checks (0: never).
    pub progress_every: u64,
    /// Write what was learned to the state file (a dry run only reads it).
    pub record: bool,
}

impl Default for PreflightOptions {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            ttl: DEFAULT_TTL,
            limits: InputLimits::default(),
            progress_every: 1000,
            record: true,
        }
    }
}

/// Why preflight could not run at all (a bad input is not an error: it is in [`Preflight::refused`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    /// The catalog could not be read.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PreflightError {
    /// True when trying again may work (a busy store); bad input never does.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Catalog(_) => false,
        }
    }
}

/// What preflight found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preflight {
    /// Inputs that failed, by their stored form (URL or absolute path), with the reason.
    pub refused: HashMap<String, String>,
    /// Distinct inputs in the catalog.
    pub distinct: u64,
    /// URLs whose cached check still stood: nothing was sent.
    pub cached: u64,
    /// URLs revalidated with a conditional request that answered 304.
    pub revalidated: u64,
    /// Inputs checked in full (URLs fetched, local files read).
    pub checked: u64,
    /// How long the checks took.
    pub elapsed: Duration,
    /// For each URL that passed: its validators (`ETag`, `Last-Modified`) as one string, so the
    /// planner notices a picture that changed under the same URL.
    pub validators: HashMap<String, String>,
}

impl Preflight {
    /// The one-line account printed before the plan.
    #[must_use]
    pub fn render_line(&self) -> String {
        format!(
            "input check: {} distinct inputs, {} cached, {} unchanged (304), {} checked, {} refused in {:.1}s",
            self.distinct,
            self.cached,
            self.revalidated,
            self.checked,
            self.refused.len(),
            self.elapsed.as_secs_f64()
        )
    }
}

/// The image kinds the provider accepts, known by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Png,
    Jpeg,
    Webp,
}

impl Kind {
    fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(Self::Jpeg)
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some(Self::Webp)
        } else {
            None
        }
    }

    const fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    const fn format(self) -> image::ImageFormat {
        match self {
            Self::Png => image::ImageFormat::Png,
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Webp => image::ImageFormat::WebP,
        }
    }
}

/// What the first bytes of a file say, judged against the limits: its kind and dimensions, or
/// why it is refused. `total` is the whole file's size when known; `complete` says `head` is the
/// whole file.
fn judge(
    head: &[u8],
    total: Option<u64>,
    complete: bool,
    limits: &InputLimits,
) -> Result<(Kind, u32, u32), String> {
    if let Some(total) = total
        && total > limits.max_bytes
    {
        return Err(format!("{} bytes, more than the {} the provider accepts", total, limits.max_bytes));
    }
    let Some(kind) = Kind::sniff(head) else {
        let what = if head.is_empty() {
            "it is empty".to_owned()
        } else if head.iter().take(512).any(|b| *b == b'<')
            && std::str::from_utf8(&head[..head.len().min(512)]).is_ok()
        {
            "it looks like an HTML or XML page".to_owned()
        } else {
            "its first bytes are not an image's".to_owned()
        };
        return Err(format!("not a PNG, JPEG or WebP image ({what})"));
    };
    let reader = image::ImageReader::with_format(Cursor::new(head), kind.format());
    let (width, height) = match reader.into_dimensions() {
        Ok(d) => d,
        Err(e) if complete => return Err(format!("a broken {} file: {e}", kind.as_str())),
        // The frame header lies beyond the bytes read (a JPEG with large metadata): the kind is
        // right and the provider will judge the rest; refusing would fail a good image.
        Err(_) => return Ok((kind, 0, 0)),
    };
    let (long, short) = (width.max(height), width.min(height));
    if short <= limits.min_side {
        return Err(format!("{width}×{height} pixels: each side must be more than {}", limits.min_side));
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(format!(
            "{width}×{height} pixels, more than the {} the provider accepts",
            limits.max_pixels
        ));
    }
    if f64::from(long) / f64::from(short) > limits.max_aspect {
        return Err(format!("{width}×{height} pixels: the sides' ratio is above {}", limits.max_aspect));
    }
    Ok((kind, width, height))
}

/// The outcome of checking one URL.
enum UrlOutcome {
    /// A conditional request answered 304: the cached check stands, renewed.
    Unchanged,
    /// Fetched and passed.
    Passed(CheckedInput),
    /// Refused, with the reason.
    Refused(String),
}

/// A passed check's validators as one string; with neither, the kind, size and dimensions stand
/// in (a host without validators whose picture changes size is still noticed).
fn validators(c: &CheckedInput) -> String {
    match (&c.etag, &c.last_modified) {
        (None, None) => format!("\u{1f}{}\u{1f}{:?}\u{1f}{}x{}", c.kind, c.bytes, c.width, c.height),
        (etag, lm) => format!("{}\u{1f}{}", etag.as_deref().unwrap_or(""), lm.as_deref().unwrap_or("")),
    }
}

/// The whole size a `Content-Range: bytes a-b/TOTAL` header states.
fn range_total(value: &str) -> Option<u64> {
    value.rsplit_once('/').and_then(|(_, total)| total.trim().parse().ok())
}

/// Describes a request error for a person, naming the guard's refusal when it stopped it.
fn describe(e: &reqwest::Error) -> String {
    if let Some(refused) = crate::fetch::guard::refusal(e) {
        return format!("refused: {refused}");
    }
    if e.is_timeout() {
        return "cannot be reached: timed out".to_owned();
    }
    if e.is_connect() {
        return "cannot be reached: connection failed".to_owned();
    }
    format!("cannot be reached: {e}")
}

/// Checks one URL: a ranged GET of its first [`HEAD_BYTES`], conditional when a cached check
/// has validators. The client is the downloads' one: no key, the same address rules.
async fn check_url(
    client: &DownloadClient,
    url: &str,
    cached: Option<&CheckedInput>,
    limits: &InputLimits,
) -> UrlOutcome {
    let mut request = client.client().get(url).header(RANGE, format!("bytes=0-{}", HEAD_BYTES - 1));
    if let Some(c) = cached {
        if let Some(etag) = &c.etag {
            request = request.header(IF_NONE_MATCH, etag);
        } else if let Some(lm) = &c.last_modified {
            request = request.header(IF_MODIFIED_SINCE, lm);
        }
    }
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return UrlOutcome::Refused(describe(&e)),
    };
    let status = response.status();
    if status == StatusCode::NOT_MODIFIED && cached.is_some() {
        return UrlOutcome::Unchanged;
    }
    if !status.is_success() {
        return UrlOutcome::Refused(format!("the host answered HTTP {}", status.as_u16()));
    }
    let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let etag = header(ETAG);
    let last_modified = header(LAST_MODIFIED);
    let total = if status == StatusCode::PARTIAL_CONTENT {
        header(CONTENT_RANGE).as_deref().and_then(range_total)
    } else {
        response.content_length()
    };
    let mut head = Vec::with_capacity(HEAD_BYTES.min(64 * 1024));
    let mut complete = true;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = HEAD_BYTES - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if head.len() >= HEAD_BYTES {
                    // Dropping the response closes the connection if the host sent more.
                    complete = total.is_some_and(|t| t <= head.len() as u64);
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return UrlOutcome::Refused(describe(&e)),
        }
    }
    let complete = complete && total.is_none_or(|t| t <= head.len() as u64);
    match judge(&head, total, complete, limits) {
        Ok((kind, width, height)) => UrlOutcome::Passed(CheckedInput {
            url: url.to_owned(),
            checked_at: now_ms(),
            etag,
            last_modified,
            kind: kind.as_str().to_owned(),
            bytes: total.and_then(|t| i64::try_from(t).ok()),
            width: i64::from(width),
            height: i64::from(height),
        }),
        Err(why) => UrlOutcome::Refused(why),
    }
}

/// Checks one local file from its first [`HEAD_BYTES`].
async fn check_file(path: &Path, limits: &InputLimits) -> Result<(), String> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| format!("cannot be read: {e}"))?;
    let total = file.metadata().await.map_err(|e| format!("cannot be read: {e}"))?.len();
    let mut head = Vec::with_capacity(HEAD_BYTES.min(usize::try_from(total).unwrap_or(HEAD_BYTES)));
    (&mut file)
        .take(HEAD_BYTES as u64)
        .read_to_end(&mut head)
        .await
        .map_err(|e| format!("cannot be read: {e}"))?;
    judge(&head, Some(total), total <= head.len() as u64, limits).map(|_| ())
}

/// Checks every distinct input of the catalog that `spec` and `template` describe
/// (nothing for a text-to-image template). Invalid rows are skipped here: the plan lists them.
///
/// # Errors
/// [`PreflightError`] when the catalog cannot be read or the store fails.
pub async fn check_catalog(
    store: &Store,
    spec: &CatalogSpec,
    template: &Template,
    client: &DownloadClient,
    options: &PreflightOptions,
) -> Result<Preflight, PreflightError> {
    let started = std::time::Instant::now();
    if template.task() != Task::Edit {
        return Ok(Preflight::default());
    }
    let mut catalog =
        Catalog::open(spec, template.task(), template.body().placeholders(), template.path()).await?;
    let mut urls: Vec<String> = Vec::new();
    let mut files: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(item) = catalog.next().await? {
        let Ok(row) = item else { continue };
        for input in row.inputs {
            let stored = input.as_stored().to_owned();
            if seen.insert(stored.clone()) {
                match input {
                    // A bucket object is read with the user's cloud credentials, which never go
                    // to an image host: it is checked when the run presigns it, not here.
                    Input::Url(_) if crate::fetch::object::is_object_url(&stored) => {}
                    Input::Url(_) => urls.push(stored),
                    Input::File { .. } => files.push(stored),
                }
            }
        }
    }
    drop(seen);
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let cache = store.checked_inputs(&url_refs).await?;
    let now = now_ms();
    let ttl_ms = i64::try_from(options.ttl.as_millis()).unwrap_or(i64::MAX);
    let mut out = Preflight { distinct: (urls.len() + files.len()) as u64, ..Preflight::default() };
    let fresh = |c: &CheckedInput| now.saturating_sub(c.checked_at) < ttl_ms;
    let mut to_check: Vec<&str> = Vec::with_capacity(url_refs.len());
    for url in &url_refs {
        match cache.get(*url) {
            Some(c) if fresh(c) => {
                out.validators.insert((*url).to_owned(), validators(c));
            }
            _ => to_check.push(url),
        }
    }
    out.cached = (urls.len() - to_check.len()) as u64;

    let total = (to_check.len() + files.len()) as u64;
    let done = AtomicU64::new(0);
    let tick = || {
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        if options.progress_every > 0 && n.is_multiple_of(options.progress_every) && n < total {
            eprintln!("input check: {n}/{total}");
        }
    };
    let limits = options.limits;
    let concurrency = options.concurrency.max(1);
    let url_results: Vec<(&str, UrlOutcome)> = futures::stream::iter(to_check)
        .map(|url| {
            let cached = cache.get(url);
            async move { (url, check_url(client, url, cached, &limits).await) }
        })
        .buffer_unordered(concurrency)
        .inspect(|_| tick())
        .collect()
        .await;
    let file_results: Vec<(&str, Result<(), String>)> = futures::stream::iter(files.iter())
        .map(|path| async move { (path.as_str(), check_file(Path::new(path), &limits).await) })
        .buffer_unordered(concurrency)
        .inspect(|_| tick())
        .collect()
        .await;

    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for (url, outcome) in url_results {
        match outcome {
            UrlOutcome::Unchanged => {
                out.revalidated += 1;
                if let Some(c) = cache.get(url) {
                    out.validators.insert(url.to_owned(), validators(c));
                    passed.push(CheckedInput { checked_at: now_ms(), ..c.clone() });
                }
            }
            UrlOutcome::Passed(c) => {
                out.checked += 1;
                out.validators.insert(url.to_owned(), validators(&c));
                passed.push(c);
            }
            UrlOutcome::Refused(why) => {
                out.checked += 1;
                failed.push(url);
                out.refused.insert(url.to_owned(), terminal_safe_line(&why).into_owned());
            }
        }
    }
    for (path, result) in file_results {
        out.checked += 1;
        if let Err(why) = result {
            out.refused.insert(path.to_owned(), terminal_safe_line(&why).into_owned());
        }
    }
    if options.record {
        store.save_input_checks(&passed, &failed).await?;
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::new(w, h);
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn judging_by_magic_bytes_and_header_dimensions() {
        let limits = InputLimits::default();
        let good = png(64, 48);
        assert_eq!(judge(&good, Some(good.len() as u64), true, &limits).unwrap(), (Kind::Png, 64, 48));
        let html = b"<!doctype html><html><body>sign in</body></html>";
        let why = judge(html, Some(html.len() as u64), true, &limits).unwrap_err();
        assert!(why.contains("HTML"), "{why}");
        let why = judge(&good, Some(11 * 1024 * 1024), false, &limits).unwrap_err();
        assert!(why.contains("more than"), "{why}");
        let tiny = png(10, 10);
        assert!(judge(&tiny, None, true, &limits).unwrap_err().contains("each side"));
        let thin = png(400, 20);
        assert!(judge(&thin, None, true, &limits).unwrap_err().contains("ratio"));
        let huge = InputLimits { max_pixels: 1000, ..limits };
        assert!(judge(&good, None, true, &huge).unwrap_err().contains("pixels"));
        // A cut-off head of a good file is accepted by kind; a whole broken file is refused.
        assert!(judge(&good[..20], Some(good.len() as u64), false, &limits).is_ok());
        assert!(judge(&good[..20], Some(20), true, &limits).unwrap_err().contains("broken"));
        assert_eq!(Kind::sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Kind::Webp));
        assert_eq!(Kind::sniff(&[0xff, 0xd8, 0xff, 0xe0]), Some(Kind::Jpeg));
        assert_eq!(Kind::sniff(b"GIF89a"), None);
    }

    #[test]
    fn content_range_totals() {
        assert_eq!(range_total("bytes 0-262143/1048576"), Some(1_048_576));
        assert_eq!(range_total("bytes 0-9/*"), None);
    }
}
