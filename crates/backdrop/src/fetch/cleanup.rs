//! The output folder's health and housekeeping: [`probe_writable`] (can a file be written there at
//! all), [`FetchError::is_output_failure`] (an error that says the folder is failing, not the
//! download), [`OutputFolderLock`] (which runs use the folder) and the clean-up of temporary files
//! (named with [`TEMP_MARKER`]) that only a dead run can have left.

use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use super::FetchError;

/// The marker in temporary file names; it is followed by the writing process's pid and `-`.
pub const TEMP_MARKER: &str = ".backdrop-tmp-";

/// The temporary name under which `final_name` is received: hidden, marked, and carrying this
/// process's pid so a later run can tell its own leftovers from another live run's downloads.
#[must_use]
pub fn temp_file_name(final_name: &str) -> String {
    format!(".{final_name}{TEMP_MARKER}{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// The pid in a temporary file's name; `None` for names of other versions or other programs.
fn temp_owner(name: &str) -> Option<u32> {
    let (_, rest) = name.rsplit_once(TEMP_MARKER)?;
    rest.split_once('-')?.0.parse().ok()
}

/// Whether an I/O error says the output location itself is failing (full, over quota, read-only,
/// not permitted, a path through a file, a failing device), so every later download there would
/// fail too: the run stops submitting and keeps what it was paid for. Other I/O errors (a temp
/// file removed under a download) concern one file, and fail only that row.
#[must_use]
pub fn is_output_failure(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::StorageFull
            | K::QuotaExceeded
            | K::ReadOnlyFilesystem
            | K::PermissionDenied
            | K::NotADirectory
            | K::FileTooLarge
    ) {
        return true;
    }
    // EIO has no `ErrorKind` of its own.
    #[cfg(target_os = "linux")]
    if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) {
        return true;
    }
    false
}

impl FetchError {
    /// True when writing the output failed in a way that says the output folder is failing (see
    /// [`is_output_failure`]): stop new submits, keep the row's result for the next run.
    #[must_use]
    pub fn is_output_failure(&self) -> bool {
        // A bucket that keeps failing after the retries is an output that cannot be written.
        matches!(self, Self::Io { source, .. } if is_output_failure(source))
            || matches!(self, Self::Object(_))
    }
}

/// Checks that files can be created, written, synced and removed in `dir` (created if missing),
/// before anything is paid for: a probe file of a few KiB (an empty one can be created on a
/// full disk) named like a temporary file, so a crash in between leaves nothing a later run does
/// not remove.
///
/// # Errors
/// The I/O error, with the path it concerns.
pub fn probe_writable(dir: &Path) -> Result<(), FetchError> {
    std::fs::create_dir_all(dir).map_err(|e| FetchError::io(dir, e))?;
    let probe = dir.join(temp_file_name("probe"));
    let written = File::options()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(&[0u8; 4096]).and_then(|()| f.sync_all()));
    let removed = std::fs::remove_file(&probe);
    written.map_err(|e| FetchError::io(&probe, e))?;
    removed.map_err(|e| FetchError::io(&probe, e))
}

/// Held for a whole run: a shared `flock` on the output folder itself (not on a file in it, which
/// could be deleted), so a starting run can tell whether any live run is using the folder.
#[derive(Debug)]
pub struct OutputFolderLock {
    _dir: Option<File>,
}

/// What [`OutputFolderLock::claim`] removed and left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanUp {
    /// Temporary files removed: left by a run that is no longer alive.
    pub removed: usize,
    /// Temporary files left in place: they may be another live run's downloads in progress.
    pub kept: usize,
}

impl OutputFolderLock {
    /// Creates `out_dir` if needed, takes the run's shared lock on it, and removes the temporary
    /// files it can prove abandoned: all of them when no other run holds the folder (its
    /// exclusive lock could be had), else only those named with this process's pid (a dead
    /// process's, since this one has written none yet).
    ///
    /// # Errors
    /// An I/O error creating, opening or locking the folder, or reading or cleaning it.
    pub fn claim(out_dir: &Path) -> io::Result<(Self, CleanUp)> {
        std::fs::create_dir_all(out_dir)?;
        let Some(dir) = open_dir(out_dir)? else {
            // No folder locks here: only this process's own leftovers are provably abandoned.
            let own = std::process::id();
            let clean = clean_where(out_dir, |name| temp_owner(name) == Some(own))?;
            return Ok((Self { _dir: None }, clean));
        };
        let alone = match dir.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) => false,
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        };
        let clean = if alone {
            let clean = clean_where(out_dir, |_| true)?;
            // Down to shared, so other runs may start. (Not atomic: a run that slips in between
            // finds the folder free and cleans it, while this one has no temporary file yet.)
            dir.lock_shared()?;
            clean
        } else {
            // Waits only while another run is cleaning up with the exclusive lock.
            dir.lock_shared()?;
            let own = std::process::id();
            clean_where(out_dir, |name| temp_owner(name) == Some(own))?
        };
        Ok((Self { _dir: Some(dir) }, clean))
    }
}

/// The folder opened for locking, where folders can be opened as files.
#[cfg(unix)]
fn open_dir(dir: &Path) -> io::Result<Option<File>> {
    File::open(dir).map(Some)
}

#[cfg(not(unix))]
fn open_dir(_dir: &Path) -> io::Result<Option<File>> {
    Ok(None)
}

/// Removes every temporary file left under `out_dir`, whoever wrote it, and returns how many.
/// Only for a folder no live run uses (tests, and [`OutputFolderLock::claim`] when alone).
///
/// # Errors
/// An I/O error reading a folder or removing a file (a missing `out_dir` is not an error).
pub fn clean_temp_files(out_dir: &Path) -> io::Result<usize> {
    clean_where(out_dir, |_| true).map(|c| c.removed)
}

/// Removes the temporary files under `out_dir` whose name `abandoned` accepts.
fn clean_where(out_dir: &Path, abandoned: impl Fn(&str) -> bool) -> io::Result<CleanUp> {
    let mut clean = CleanUp::default();
    let mut pending: Vec<PathBuf> = vec![out_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() && name.contains(TEMP_MARKER) {
                if !abandoned(&name) {
                    clean.kept += 1;
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => clean.removed += 1,
                    // Its owner finished with it meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(clean)
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

    #[test]
    fn temp_names_carry_the_pid() {
        let name = temp_file_name("0.png");
        assert!(name.starts_with(".0.png.backdrop-tmp-"), "{name}");
        assert_eq!(temp_owner(&name), Some(std::process::id()));
        assert_eq!(temp_owner(&format!(".0.png{TEMP_MARKER}0123456789abcdef")), None, "old names");
        assert_eq!(temp_owner("0.png"), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_live_runs_temp_files_survive_another_runs_start() {
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(out.path().join("A")).unwrap();
        // A dead run of an older version, and this process's own earlier incarnation.
        let stale = out.path().join("A").join(format!(".0.png{TEMP_MARKER}0123456789abcdef"));
        std::fs::write(&stale, b"x").unwrap();
        let (first, clean) = OutputFolderLock::claim(out.path()).unwrap();
        assert_eq!(clean, CleanUp { removed: 1, kept: 0 }, "alone: every leftover goes");
        // The first run is downloading (another pid's name, as a live run elsewhere writes).
        let live = out.path().join("A").join(format!(".1.png{TEMP_MARKER}1-0123456789abcdef"));
        std::fs::write(&live, b"x").unwrap();
        let own = out.path().join("A").join(temp_file_name("2.png"));
        std::fs::write(&own, b"x").unwrap();
        // A second run starts on the same folder: it removes only what is provably its own.
        let (second, clean) = OutputFolderLock::claim(out.path()).unwrap();
        assert_eq!(clean, CleanUp { removed: 1, kept: 1 });
        assert!(live.exists() && !own.exists());
        drop((first, second));
        let (_third, clean) = OutputFolderLock::claim(out.path()).unwrap();
        assert_eq!(clean, CleanUp { removed: 1, kept: 0 }, "no run is left: the leftover goes");
    }

    #[test]
    fn output_failures_are_told_from_single_file_errors() {
        use io::ErrorKind as K;
        for kind in
            [K::StorageFull, K::QuotaExceeded, K::ReadOnlyFilesystem, K::PermissionDenied, K::NotADirectory]
        {
            assert!(is_output_failure(&io::Error::from(kind)), "{kind:?}");
        }
        for kind in [K::NotFound, K::AlreadyExists, K::InvalidFilename, K::Other] {
            assert!(!is_output_failure(&io::Error::from(kind)), "{kind:?}");
        }
        #[cfg(target_os = "linux")]
        {
            for errno in [
                rustix::io::Errno::NOSPC,
                rustix::io::Errno::DQUOT,
                rustix::io::Errno::ROFS,
                rustix::io::Errno::ACCESS,
                rustix::io::Errno::IO,
                rustix::io::Errno::NOTDIR,
            ] {
                let e = io::Error::from_raw_os_error(errno.raw_os_error());
                assert!(is_output_failure(&e), "{e}");
            }
            assert!(!is_output_failure(&io::Error::from_raw_os_error(
                rustix::io::Errno::NOENT.raw_os_error()
            )));
            // A real ENOSPC from the kernel: /dev/full refuses every write.
            if let Ok(mut full) = File::options().write(true).open("/dev/full") {
                let e = full.write_all(b"x").and_then(|()| full.flush()).unwrap_err();
                assert!(is_output_failure(&e), "{e}");
                let fetch = FetchError::Io { path: "/dev/full".into(), source: e };
                assert!(fetch.is_output_failure() && !fetch.is_retryable());
            }
        }
    }

    #[test]
    fn the_probe_names_the_folder_that_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        probe_writable(&dir.path().join("new/out")).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("new/out")).unwrap().count(), 0, "the probe is removed");
        // A path through a regular file fails for root too (ENOTDIR), where chmod would not.
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let err = probe_writable(&dir.path().join("file/out")).unwrap_err();
        assert!(err.is_output_failure(), "{err}");
        assert!(err.to_string().contains("file/out"), "{err}");
    }
}
