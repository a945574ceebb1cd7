//! [`SavedOutput`]: one output image written under the output folder, verified and durable, as
//! the state file records it.

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
