//! The crash clean-up: temporary files (named with [`TEMP_MARKER`]) that an interrupted run left
//! under the output folder.

use std::io;
use std::path::Path;

/// The marker in temporary file names; anything holding it is a leftover of an interrupted run.
pub const TEMP_MARKER: &str = ".backdrop-tmp-";

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
