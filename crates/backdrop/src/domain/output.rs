//! [`SavedOutput`]: one output image written under the output folder, verified and durable, as
//! the state file records it, and [`SavedExport`], a file derived from one by an export preset.

use std::path::PathBuf;

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

/// One derived file made from an output by an `[export.NAME]` preset, durable and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedExport {
    /// The index of the output it was made from.
    pub index: u32,
    /// The preset's name.
    pub preset: String,
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
    /// `image/jpeg`, `image/png` or `image/webp`.
    pub content_type: String,
    /// sha256 of the preset's settings: a changed preset is made again.
    pub recipe: String,
    /// sha256 of the original it was made from.
    pub source_sha256: String,
}
