//! Export files on their way to disk: [`export_path`] (where a preset's file of an output goes),
//! [`stage`] (encoded bytes into a temporary file beside that name, which the [`super::Persister`]
//! then makes durable exactly like a download) and [`verify`] (the durable file read back).

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{Downloaded, FetchError, Staging};
use crate::domain::SavedOutput;

/// Where preset `preset`'s file of the output at `original` (relative to the output folder)
/// goes: `<preset>/<original's path>` with the preset's extension, e.g. `amazon/SKU-1/0.jpg` for
/// `SKU-1/0.png`. An original name template always makes paths of one depth, so an export's
/// path (one folder deeper) can never be an original's.
#[must_use]
pub fn export_path(preset: &str, original: &Path, ext: &str) -> PathBuf {
    // Preset names are letters, digits, `-` and `_` when a template loads; this keeps the
    // folder a single plain component whatever reaches here.
    let folder: String =
        preset.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let mut path = PathBuf::from(if folder.is_empty() { "_".to_owned() } else { folder });
    path.push(original.with_extension(ext));
    path
}

/// Writes `bytes` to a temporary file beside `out_dir/relative` (creating its folders), with
/// the sha256 and size recorded, for [`super::Persister::persist`] to check, sync and rename.
/// Blocking: call it off the async runtime.
///
/// # Errors
/// [`FetchError::Io`] when the folder or file cannot be written.
pub fn stage(
    out_dir: &Path,
    relative: &Path,
    index: u32,
    bytes: &[u8],
    content_type: &str,
) -> Result<Downloaded, FetchError> {
    let mut staging = Staging::open(out_dir, relative)?;
    staging.temp.write(bytes)?;
    Ok(staging.finish(SavedOutput {
        index,
        path: relative.to_path_buf(),
        sha256: format!("{:x}", Sha256::digest(bytes)),
        bytes: bytes.len() as u64,
        width: 0,
        height: 0,
        content_type: content_type.to_owned(),
        source_url: String::new(),
    }))
}

/// Reads a durable file back and checks its size and sha256 against what was written.
/// Blocking: call it off the async runtime.
///
/// # Errors
/// [`FetchError::Io`] when it cannot be read or is not what was written.
pub fn verify(out_dir: &Path, saved: &SavedOutput) -> Result<(), FetchError> {
    let path = out_dir.join(&saved.path);
    let bytes = std::fs::read(&path).map_err(|e| FetchError::io(&path, e))?;
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    if bytes.len() as u64 != saved.bytes || sha256 != saved.sha256 {
        let message = format!(
            "read back {} bytes with sha256 {sha256}, wrote {} bytes with sha256 {}",
            bytes.len(),
            saved.bytes,
            saved.sha256
        );
        return Err(FetchError::io(&path, io::Error::other(message)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_go_one_folder_deeper_under_the_preset() {
        assert_eq!(
            export_path("amazon", Path::new("SKU-1/0.png"), "jpg"),
            PathBuf::from("amazon/SKU-1/0.jpg")
        );
        assert_eq!(export_path("web", Path::new("X1-3.png"), "webp"), PathBuf::from("web/X1-3.webp"));
        assert_eq!(export_path("../x", Path::new("A/0.png"), "png"), PathBuf::from("___x/A/0.png"));
    }

    #[tokio::test]
    async fn a_staged_export_is_made_durable_like_a_download_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(3, 2)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let relative = export_path("web", Path::new("SKU-1/0.png"), "png");
        let staged = stage(dir.path(), &relative, 0, &png, "image/png").unwrap();
        let persister = super::super::Persister::start(dir.path());
        let saved = persister.persist(vec![staged], true).await.unwrap().remove(0);
        assert_eq!((saved.width, saved.height, saved.bytes), (3, 2, png.len() as u64));
        assert_eq!(std::fs::read(dir.path().join("web/SKU-1/0.png")).unwrap(), png);
        verify(dir.path(), &saved).unwrap();
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path().join("web/SKU-1")).unwrap().count(), 1);
        std::fs::write(dir.path().join("web/SKU-1/0.png"), b"changed").unwrap();
        assert!(verify(dir.path(), &saved).unwrap_err().to_string().contains("read back 7 bytes"));
    }
}
