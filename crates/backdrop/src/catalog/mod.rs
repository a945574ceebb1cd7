//! Catalog sources: streaming row readers for CSV files ([`csv`]) and SQLite tables or queries
//! ([`sqlite`]), and the row validation both share ([`Catalog`]): SKUs, duplicates, image
//! references, ragged rows, invalid UTF-8. Every problem carries its line (CSV) or rowid (SQLite).

pub mod csv;
pub mod sqlite;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::domain::job::Task;

/// At most this many images per row (the providers' limit; fal silently drops extras).
pub const MAX_IMAGES: usize = 10;

/// How many problems an error message lists before "and N more".
pub const MAX_LISTED: usize = 50;

/// What the run can do with an image that is a local file, so the catalog refuses at plan time
/// a row the provider could not be sent (instead of every row failing after the run started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LocalImages {
    /// Accepted as they are: nothing checks how they will be sent (a library caller's choice).
    #[default]
    Accepted,
    /// Sent inline as `data:` URIs: each must be a PNG, JPEG or WebP of at most `max_bytes`.
    Inline {
        /// The largest file sent inline (`--inline-max-bytes`).
        max_bytes: u64,
    },
    /// Uploaded to the provider's storage (fal): each must be a PNG, JPEG or WebP of at most
    /// `max_bytes`, checked here so a bad file is refused before anything is sent.
    Uploaded {
        /// The largest file the storage takes.
        max_bytes: u64,
    },
    /// Refused: the run has no way to send a local file (`--inline-local-images` is off).
    Refused,
}

/// Where a row is in its catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// A CSV line (1-based; the header is line 1). A record with quoted newlines is named by
    /// the line it starts on.
    Line(u64),
    /// A SQLite rowid (`--table`).
    Rowid(i64),
    /// The n-th row (1-based) of a `--query` result.
    Row(u64),
    /// The column list of a SQLite table or query.
    Columns,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(n) => write!(f, "line {n}"),
            Self::Rowid(n) => write!(f, "rowid {n}"),
            Self::Row(n) => write!(f, "row {n}"),
            Self::Columns => f.write_str("columns"),
        }
    }
}

/// One problem with one row (or the header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowProblem {
    /// Where.
    pub location: Location,
    /// What is wrong, for a person.
    pub message: String,
    /// For a duplicate: its SKU, so the first occurrence can be found afterwards.
    duplicate_of: Option<String>,
}

impl RowProblem {
    /// A problem at `location`.
    pub fn new(location: Location, message: impl Into<String>) -> Self {
        Self { location, message: message.into(), duplicate_of: None }
    }
}

impl fmt::Display for RowProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Errors reading or validating a catalog. None of them is retryable: nothing was sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// The catalog file could not be opened or read.
    #[error("cannot read catalog {path}: {source}")]
    Io {
        /// The catalog.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The SQLite catalog could not be opened or queried.
    #[error("catalog {path}: {message}")]
    Sqlite {
        /// The database.
        path: PathBuf,
        /// What SQLite said, and about what.
        message: String,
    },
    /// The catalog cannot be used at all (empty file, a database without `--table`).
    #[error("catalog {path}: {message}")]
    Unusable {
        /// The catalog.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Rows or columns are invalid. Lists every problem (up to [`MAX_LISTED`]).
    #[error("{}", describe_problems(.path, .problems, *.total))]
    Invalid {
        /// The catalog.
        path: PathBuf,
        /// The problems, in catalog order (at most a bounded number are kept).
        problems: Vec<RowProblem>,
        /// How many problems there were in all (may exceed `problems.len()`).
        total: u64,
    },
}

impl CatalogError {
    /// A bad catalog never fixes itself.
    #[must_use]
    pub const fn is_retryable(&self) -> bool {
        false
    }
}

/// `sample.csv: 3 problems:\n  line 4: empty sku\n ...`, capped at [`MAX_LISTED`] lines.
#[must_use]
pub fn describe_problems(path: &Path, problems: &[RowProblem], total: u64) -> String {
    use std::fmt::Write as _;
    let name = path.display();
    let mut out =
        if total == 1 { format!("{name}: 1 problem:") } else { format!("{name}: {total} problems:") };
    for p in problems.iter().take(MAX_LISTED) {
        // A problem may quote a cell: one line each, its control characters escaped.
        let _ = write!(out, "\n  {}", crate::domain::text::terminal_safe_line(&p.to_string()));
    }
    let listed = problems.len().min(MAX_LISTED) as u64;
    if total > listed {
        let _ = write!(out, "\n  and {} more", total - listed);
    }
    out
}

/// Which catalog to read: a CSV file, or a SQLite database with a table or a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogSpec {
    /// The file.
    pub path: PathBuf,
    /// SQLite table.
    pub table: Option<String>,
    /// SQLite query.
    pub query: Option<String>,
}

/// One input image of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An http(s) URL, as given.
    Url(String),
    /// A local file inside the catalog's folder.
    File {
        /// Absolute canonical path.
        path: String,
        /// sha256 of its bytes (hex), so a changed image changes the fingerprint.
        sha256: String,
    },
}

impl Input {
    /// What goes into `jobs.inputs`: the URL, or the absolute path.
    #[must_use]
    pub fn as_stored(&self) -> &str {
        match self {
            Self::Url(u) => u,
            Self::File { path, .. } => path,
        }
    }
}

/// A row as a source yields it, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    /// Where it is.
    pub location: Location,
    /// Its catalog order (CSV line, rowid, query row number).
    pub position: i64,
    /// The cell values, or why the row could not be split into them.
    pub values: Result<Vec<String>, String>,
}

/// A streaming source of raw rows.
#[derive(Debug)]
pub enum Source {
    /// A CSV file (boxed: its reader and buffers dwarf the other variant).
    Csv(Box<csv::CsvSource>),
    /// A SQLite table or query.
    Sqlite(sqlite::SqliteSource),
}

impl Source {
    /// Opens the catalog `spec` names.
    ///
    /// # Errors
    /// [`CatalogError`] when it cannot be opened, is empty, or is a SQLite file without
    /// `--table`/`--query`.
    pub async fn open(spec: &CatalogSpec) -> Result<Self, CatalogError> {
        if spec.table.is_some() || spec.query.is_some() {
            return Ok(Self::Sqlite(sqlite::SqliteSource::open(spec).await?));
        }
        if sqlite::looks_like_sqlite(&spec.path) {
            return Err(CatalogError::Unusable {
                path: spec.path.clone(),
                message: "this is a SQLite database: add --table NAME or --query \"SELECT ...\"".into(),
            });
        }
        Ok(Self::Csv(Box::new(csv::CsvSource::open(&spec.path)?)))
    }

    /// The column names, in order, or the problem with the header.
    pub fn columns(&self) -> &Result<Vec<String>, String> {
        match self {
            Self::Csv(s) => s.columns(),
            Self::Sqlite(s) => s.columns(),
        }
    }

    /// Where header problems are reported.
    #[must_use]
    pub fn header_location(&self) -> Location {
        match self {
            Self::Csv(_) => Location::Line(1),
            Self::Sqlite(_) => Location::Columns,
        }
    }

    /// The next row, or `None` at the end.
    ///
    /// # Errors
    /// [`CatalogError`] when reading fails part-way (an I/O or SQLite error, not a bad row).
    pub async fn next_row(&mut self) -> Result<Option<RawRow>, CatalogError> {
        match self {
            Self::Csv(s) => s.next_row(),
            Self::Sqlite(s) => s.next_row().await,
        }
    }
}

/// A validated row, ready to render and fingerprint.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Where it is.
    pub location: Location,
    /// Catalog order.
    pub position: i64,
    /// The SKU (trimmed).
    pub sku: String,
    /// Every cell, by column index (see [`Catalog::column`]).
    pub values: Vec<String>,
    /// The input images (empty for text-to-image).
    pub inputs: Vec<Input>,
}

/// The catalog's columns that mean something to backdrop.
#[derive(Debug, Clone)]
struct Columns {
    names: Vec<String>,
    index: HashMap<String, usize>,
    sku: usize,
    images: Option<usize>,
    prompt: Option<usize>,
}

/// A validating reader over a [`Source`]: yields valid rows or their problems, one row at a time,
/// in bounded memory (duplicate detection keeps 16 bytes per SKU).
#[derive(Debug)]
pub struct Catalog {
    spec: CatalogSpec,
    source: Source,
    columns: Columns,
    task: Task,
    base: PathBuf,
    seen: HashSet<u128>,
    images: ImageResolver,
}

impl Catalog {
    /// Sets what may be done with local image files (by default they are [`LocalImages::Accepted`]).
    /// Rows the policy refuses become row problems, with their line, like any invalid row.
    #[must_use]
    pub fn with_local_images(mut self, policy: LocalImages) -> Self {
        self.images.policy = policy;
        self.images.cache.clear();
        self
    }

    /// Opens the catalog and checks its columns against the task and the template's placeholders.
    ///
    /// # Errors
    /// [`CatalogError::Invalid`] listing every header problem (missing `sku`, missing image column
    /// for an edit, duplicate or unnamed columns, placeholders that name no column); the open
    /// errors of [`Source::open`].
    pub async fn open<'p>(
        spec: &CatalogSpec,
        task: Task,
        placeholders: impl IntoIterator<Item = &'p str>,
        prompt_file: &Path,
    ) -> Result<Self, CatalogError> {
        let source = Source::open(spec).await?;
        let at = source.header_location();
        let invalid = |problems: Vec<RowProblem>| CatalogError::Invalid {
            path: spec.path.clone(),
            total: problems.len() as u64,
            problems,
        };
        let names = match source.columns() {
            Ok(names) => names.clone(),
            Err(message) => return Err(invalid(vec![RowProblem::new(at, message.clone())])),
        };
        let mut problems = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                problems.push(RowProblem::new(at, format!("column {} has no name", i + 1)));
            } else if let Some(first) = index.insert(name.clone(), i) {
                problems.push(RowProblem::new(
                    at,
                    format!("duplicate column \"{name}\" (columns {} and {})", first + 1, i + 1),
                ));
                index.insert(name.clone(), first);
            }
        }
        let sku = index.get("sku").copied();
        if sku.is_none() {
            problems.push(RowProblem::new(at, "missing column sku"));
        }
        let images = match (index.get("image_url"), index.get("image_urls")) {
            (Some(_), Some(_)) => {
                problems.push(RowProblem::new(at, "both image_url and image_urls columns: keep one"));
                None
            }
            (a, b) => a.or(b).copied(),
        };
        if task == Task::Edit && images.is_none() && !index.contains_key("image_url") {
            problems.push(RowProblem::new(
                at,
                "missing column image_url (or image_urls): edit prompts need an input image",
            ));
        }
        let mut reported = HashSet::new();
        for name in placeholders {
            if !index.contains_key(name) && reported.insert(name.to_owned()) {
                problems.push(RowProblem::new(
                    at,
                    format!(
                        "placeholder {{{name}}} in {} names no column (columns: {})",
                        prompt_file.display(),
                        names.join(", ")
                    ),
                ));
            }
        }
        let Some(sku) = sku.filter(|_| problems.is_empty()) else { return Err(invalid(problems)) };
        let prompt = index.get("prompt").copied();
        let base = catalog_dir(&spec.path)?;
        Ok(Self {
            spec: spec.clone(),
            source,
            columns: Columns { names, index, sku, images, prompt },
            task,
            base: base.clone(),
            seen: HashSet::new(),
            images: ImageResolver::new(base),
        })
    }

    /// The column names.
    #[must_use]
    pub fn column_names(&self) -> &[String] {
        &self.columns.names
    }

    /// The index of a column by name.
    #[must_use]
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.index.get(name).copied()
    }

    /// The index of the optional `prompt` column (a per-row template override).
    #[must_use]
    pub fn prompt_column(&self) -> Option<usize> {
        self.columns.prompt
    }

    /// The catalog's folder (canonical): local images must be inside it.
    #[must_use]
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// The catalog this reads.
    #[must_use]
    pub fn spec(&self) -> &CatalogSpec {
        &self.spec
    }

    /// The next row: `Ok(Some(Ok(row)))` when valid, `Ok(Some(Err(problems)))` when not.
    ///
    /// # Errors
    /// [`CatalogError`] when reading fails part-way.
    pub async fn next(&mut self) -> Result<Option<Result<Row, Vec<RowProblem>>>, CatalogError> {
        let Some(raw) = self.source.next_row().await? else { return Ok(None) };
        Ok(Some(self.validate(raw)))
    }

    fn validate(&mut self, raw: RawRow) -> Result<Row, Vec<RowProblem>> {
        let at = raw.location;
        let mut values = raw.values.map_err(|m| vec![RowProblem::new(at, m)])?;
        if values.len() != self.columns.names.len() {
            return Err(vec![RowProblem::new(
                at,
                format!("{} fields, the header has {}", values.len(), self.columns.names.len()),
            )]);
        }
        let mut problems = Vec::new();
        let sku = values[self.columns.sku].trim().to_owned();
        if sku.is_empty() {
            problems.push(RowProblem::new(at, "empty sku"));
        } else if sku.chars().any(char::is_control) {
            problems.push(RowProblem::new(at, format!("sku {sku:?} contains a control character")));
        } else if !self.seen.insert(sku_key(&sku)) {
            problems.push(RowProblem {
                location: at,
                message: format!("duplicate sku \"{sku}\""),
                duplicate_of: Some(sku.clone()),
            });
        }
        let mut inputs = Vec::new();
        if self.task == Task::Edit {
            let cell = self.columns.images.map_or("", |i| values[i].as_str());
            let refs: Vec<&str> = cell.split('|').map(str::trim).filter(|s| !s.is_empty()).collect();
            let name = self.columns.images.map_or("image_url", |i| self.columns.names[i].as_str());
            if refs.is_empty() {
                problems.push(RowProblem::new(at, format!("no image ({name} is empty)")));
            } else if refs.len() > MAX_IMAGES {
                problems.push(RowProblem::new(at, format!("{} images (at most {MAX_IMAGES})", refs.len())));
            } else {
                for r in refs {
                    match self.images.resolve(r) {
                        Ok(input) => inputs.push(input),
                        Err(m) => problems.push(RowProblem::new(at, format!("image \"{r}\": {m}"))),
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        values[self.columns.sku].clone_from(&sku);
        Ok(Row { location: at, position: raw.position, sku, values, inputs })
    }

    /// Completes duplicate-SKU messages with where each SKU first appears ("(first on line 2)").
    /// Reads the catalog again, but only when there are duplicates (an error path), and keeps
    /// only the duplicated SKUs in memory.
    ///
    /// # Errors
    /// [`CatalogError`] when the catalog cannot be read again.
    pub async fn describe_duplicates(&self, problems: &mut [RowProblem]) -> Result<(), CatalogError> {
        let wanted: HashSet<&str> = problems.iter().filter_map(|p| p.duplicate_of.as_deref()).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut first: HashMap<String, Location> = HashMap::new();
        let mut source = Source::open(&self.spec).await?;
        let sku = self.columns.sku;
        while let Some(raw) = source.next_row().await? {
            if let Ok(values) = raw.values
                && let Some(v) = values.get(sku)
            {
                let v = v.trim();
                if wanted.contains(v) && !first.contains_key(v) {
                    first.insert(v.to_owned(), raw.location);
                }
            }
        }
        for p in problems.iter_mut() {
            if let Some(loc) = p.duplicate_of.as_deref().and_then(|s| first.get(s)) {
                if *loc == p.location {
                    // Two different SKUs with the same 128-bit hash: not a duplicate at all.
                    // Astronomically unlikely; say so rather than lie.
                    p.message.push_str(" (hash collision with another sku: please report this)");
                } else {
                    p.message.push_str(&format!(" (first on {loc})"));
                }
            }
        }
        Ok(())
    }
}

/// 128 bits of sha256: collisions among even billions of SKUs are beyond any practical chance,
/// and 16 bytes per row keeps a million-row catalog's duplicate check near 32 MB.
fn sku_key(sku: &str) -> u128 {
    let digest = Sha256::digest(sku.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(b)
}

fn catalog_dir(path: &Path) -> Result<PathBuf, CatalogError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    parent.canonicalize().map_err(|source| CatalogError::Io { path: path.to_owned(), source })
}

/// Checks image references and hashes local files, remembering recent answers (a catalog
/// often reuses one image across rows).
#[derive(Debug)]
struct ImageResolver {
    base: PathBuf,
    policy: LocalImages,
    cache: HashMap<String, Result<Input, String>>,
}

/// Bounded so a million distinct local paths cannot grow the cache without limit.
const IMAGE_CACHE: usize = 4096;

impl ImageResolver {
    fn new(base: PathBuf) -> Self {
        Self { base, policy: LocalImages::Accepted, cache: HashMap::new() }
    }

    fn resolve(&mut self, value: &str) -> Result<Input, String> {
        if let Some(hit) = self.cache.get(value) {
            return hit.clone();
        }
        let answer = self.resolve_uncached(value);
        if self.cache.len() >= IMAGE_CACHE {
            self.cache.clear();
        }
        self.cache.insert(value.to_owned(), answer.clone());
        answer
    }

    fn resolve_uncached(&self, value: &str) -> Result<Input, String> {
        let lower = value.get(..8).unwrap_or(value).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return match url::Url::parse(value) {
                Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(Input::Url(value.to_owned())),
                Ok(_) => Err("URL has no host".into()),
                Err(e) => Err(format!("invalid URL: {e}")),
            };
        }
        // A bucket object (`s3://bucket/key`, `gs://`, `az://`): the provider gets a presigned
        // URL at submit time.
        if ["s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "azure://"]
            .iter()
            .any(|s| lower.starts_with(s))
        {
            return match url::Url::parse(value) {
                Ok(u)
                    if u.host_str().is_some_and(|h| !h.is_empty())
                        && !u.path().trim_matches('/').is_empty() =>
                {
                    Ok(Input::Url(value.to_owned()))
                }
                Ok(_) => Err("object URL names no bucket and key".into()),
                Err(e) => Err(format!("invalid URL: {e}")),
            };
        }
        if value.contains("://") || lower.starts_with("data:") {
            return Err("neither an http(s) URL nor a local file".into());
        }
        let joined = self.base.join(value);
        let canonical = joined.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "no such file (and not an http(s) URL)".to_owned(),
            _ => format!("cannot read: {e}"),
        })?;
        if !canonical.starts_with(&self.base) {
            return Err(format!("outside the catalog's folder {}", self.base.display()));
        }
        if !canonical.is_file() {
            return Err("not a file".into());
        }
        if self.policy == LocalImages::Refused {
            return Err("is a local file: pass --inline-local-images to send it as a data: URI, \
                        or host it and use its URL"
                .into());
        }
        let read = read_file(&canonical).map_err(|e| format!("cannot read: {e}"))?;
        if let LocalImages::Inline { max_bytes } = self.policy {
            if read.size > max_bytes {
                return Err(format!(
                    "is {}, above the {} inline limit (--inline-max-bytes): host it and use its URL",
                    megabytes(read.size),
                    megabytes(max_bytes)
                ));
            }
            if crate::provider::http::sniff_mime(&read.head).is_none() {
                return Err("is not a PNG, JPEG or WebP image".into());
            }
        }
        if let LocalImages::Uploaded { max_bytes } = self.policy {
            if read.size > max_bytes {
                return Err(format!(
                    "is {}, above the {} the provider's storage takes: host it and use its URL",
                    megabytes(read.size),
                    megabytes(max_bytes)
                ));
            }
            if crate::provider::http::sniff_mime(&read.head).is_none() {
                return Err("is not a PNG, JPEG or WebP image".into());
            }
        }
        let path = canonical.to_str().ok_or("path is not valid UTF-8")?.to_owned();
        Ok(Input::File { path, sha256: read.sha256 })
    }
}

/// What one pass over a local image file tells: its hash, its size and its first bytes
/// (enough to recognise PNG, JPEG and WebP).
struct FileRead {
    sha256: String,
    size: u64,
    head: Vec<u8>,
}

/// Bytes of a file's start kept to sniff its image type (WebP needs 12).
const HEAD_BYTES: usize = 16;

fn read_file(path: &Path) -> std::io::Result<FileRead> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size: u64 = 0;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileRead { sha256: hex::encode(hasher.finalize()), size, head })
}

/// `9.1 MB`, `4 MB`, `640 kB`, `50 bytes`: decimal units, one decimal when it matters.
fn megabytes(bytes: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a human-readable size; precision is irrelevant")]
    let mb = bytes as f64 / 1_000_000.0;
    match bytes {
        0..1_000 => format!("{bytes} bytes"),
        1_000..1_000_000 => format!("{} kB", bytes / 1_000),
        _ if (mb - mb.round()).abs() < 0.05 => format!("{mb:.0} MB"),
        _ => format!("{mb:.1} MB"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_listing_is_capped() {
        let problems: Vec<_> = (0..60).map(|i| RowProblem::new(Location::Line(i + 2), "empty sku")).collect();
        let msg = describe_problems(Path::new("c.csv"), &problems, 75);
        assert!(msg.starts_with("c.csv: 75 problems:\n  line 2: empty sku"), "{msg}");
        assert!(msg.ends_with("\n  and 25 more"), "{msg}");
        assert_eq!(msg.lines().count(), 1 + MAX_LISTED + 1);
    }

    #[test]
    fn image_references_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("img")).unwrap();
        std::fs::write(base.join("img/a.png"), b"png bytes").unwrap();
        std::fs::write(dir.path().parent().unwrap().join("outside-secret.png"), b"x").ok();
        let mut r = ImageResolver::new(base.clone());
        assert_eq!(
            r.resolve("https://cdn.example.com/a.png"),
            Ok(Input::Url("https://cdn.example.com/a.png".into()))
        );
        let Ok(Input::File { path, sha256 }) = r.resolve("img/a.png") else { panic!("local file") };
        assert_eq!(path, base.join("img/a.png").to_str().unwrap());
        assert_eq!(sha256, hex::encode(Sha256::digest(b"png bytes")));
        assert!(r.resolve("img/missing.png").unwrap_err().contains("no such file"));
        assert!(r.resolve("../outside-secret.png").unwrap_err().contains("outside the catalog's folder"));
        assert!(r.resolve("../../../../../../etc/passwd").unwrap_err().contains("outside"));
        assert!(r.resolve("ftp://example.com/a.png").unwrap_err().contains("neither"));
        assert!(r.resolve("img").unwrap_err().contains("not a file"));
        assert!(r.resolve("https://").is_err());
    }

    #[test]
    fn local_images_follow_the_policy_at_plan_time() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let png = [b"\x89PNG\r\n\x1a\n".as_slice(), &[0u8; 100]].concat();
        std::fs::write(base.join("a.png"), &png).unwrap();
        std::fs::write(base.join("notes.txt"), b"not an image at all").unwrap();
        let url = "https://cdn.example.com/a.png";

        let mut refused = ImageResolver { policy: LocalImages::Refused, ..ImageResolver::new(base.clone()) };
        let err = refused.resolve("a.png").unwrap_err();
        assert!(err.contains("is a local file: pass --inline-local-images"), "{err}");
        assert_eq!(refused.resolve(url), Ok(Input::Url(url.into())), "URLs need no policy");
        assert!(refused.resolve("missing.png").unwrap_err().contains("no such file"), "missing first");

        let inline = |max_bytes| ImageResolver {
            policy: LocalImages::Inline { max_bytes },
            ..ImageResolver::new(base.clone())
        };
        assert!(matches!(inline(1_000).resolve("a.png"), Ok(Input::File { .. })));
        let err = inline(50).resolve("a.png").unwrap_err();
        assert!(err.contains("above the 50 bytes inline limit (--inline-max-bytes)"), "{err}");
        let err = inline(1_000).resolve("notes.txt").unwrap_err();
        assert!(err.contains("not a PNG, JPEG or WebP image"), "{err}");
        assert!(matches!(ImageResolver::new(base).resolve("notes.txt"), Ok(Input::File { .. })));
    }

    /// Every problem a fixture has, as "line N: message".
    async fn fixture_problems(file: &str, template: &str) -> Vec<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/catalog");
        let prompt = dir.join(template);
        let t = crate::prompt::Template::load(&prompt).unwrap();
        let spec = CatalogSpec { path: dir.join(file), table: None, query: None };
        let problems = match Catalog::open(&spec, t.task(), t.body().placeholders(), &prompt).await {
            Err(CatalogError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("{e}"),
            Ok(mut catalog) => {
                let mut out = Vec::new();
                while let Some(row) = catalog.next().await.unwrap() {
                    if let Err(p) = row {
                        out.extend(p);
                    }
                }
                catalog.describe_duplicates(&mut out).await.unwrap();
                out
            }
        };
        problems.iter().map(ToString::to_string).collect()
    }

    #[tokio::test]
    async fn missing_and_extra_columns_and_unknown_placeholders() {
        let p = fixture_problems("missing-columns.csv", "simple.txt").await;
        assert_eq!(p[0], "line 1: column 3 has no name");
        assert_eq!(p[1], "line 1: duplicate column \"name\" (columns 2 and 4)");
        assert_eq!(p[2], "line 1: missing column sku");
        assert!(p[3].starts_with("line 1: missing column image_url"), "{p:?}");
        assert!(p[4].starts_with("line 1: placeholder {color} in "), "{p:?}");
        assert_eq!(p.len(), 5, "{p:?}");
        let p = fixture_problems("good.csv", "unknown-placeholder.txt").await;
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("line 1: placeholder {colour} in ") && p[0].contains("names no column"));
        assert!(p[1].starts_with("line 1: placeholder {surface} in "));
    }

    #[tokio::test]
    async fn ragged_rows() {
        let p = fixture_problems("ragged-rows.csv", "name.txt").await;
        assert_eq!(p, ["line 3: 2 fields, the header has 3", "line 4: 4 fields, the header has 3"]);
    }

    #[tokio::test]
    async fn empty_skus() {
        let p = fixture_problems("empty-sku.csv", "name.txt").await;
        assert_eq!(p, ["line 3: empty sku", "line 4: empty sku"]);
    }

    #[tokio::test]
    async fn duplicate_skus_name_the_first_line() {
        // A-3's name spans lines 4 and 5, so the duplicates sit on lines 6 and 7.
        let p = fixture_problems("duplicate-sku.csv", "name.txt").await;
        assert_eq!(
            p,
            [
                "line 6: duplicate sku \"A-1\" (first on line 2)",
                "line 7: duplicate sku \"A-2\" (first on line 3)"
            ]
        );
    }

    #[tokio::test]
    async fn invalid_utf8_has_line_and_byte() {
        let p = fixture_problems("invalid-utf8.csv", "name.txt").await;
        assert_eq!(p, ["line 3: invalid UTF-8 at byte 65"]);
    }

    #[tokio::test]
    async fn image_counts() {
        let p = fixture_problems("too-many-images.csv", "name.txt").await;
        assert_eq!(p, ["line 3: 11 images (at most 10)", "line 4: no image (image_urls is empty)"]);
    }

    #[tokio::test]
    async fn image_values_must_be_urls_or_files_inside_the_folder() {
        let p = fixture_problems("bad-images.csv", "name.txt").await;
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(
            p[0],
            "line 3: image \"ftp://cdn.example.com/a2.png\": neither an http(s) URL nor a local file"
        );
        assert!(p[1].starts_with("line 4: image \"images/missing.png\": no such file"), "{p:?}");
        assert!(p[2].starts_with("line 5: image \"../../../../../../../../etc/passwd\": outside"), "{p:?}");
    }

    #[test]
    fn sku_keys_differ() {
        assert_ne!(sku_key("A-1"), sku_key("A-2"));
        assert_eq!(sku_key("A-1"), sku_key("A-1"));
    }
}
