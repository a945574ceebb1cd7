//! [`RunLock`]: one run per state database. The lock is an exclusive `flock` on the database file
//! itself, so it follows the file and not its name: a symlink, a second hard link or a deleted
//! side file cannot let two runs share one state. [`FileIdentity`] (device and inode) lets a run
//! notice that the path it opened now names another file, or none.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::StoreError;

/// The device and inode of a file: what stays the same whatever name reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    /// The identity of an open file.
    #[cfg(unix)]
    fn of_file(file: &File) -> std::io::Result<Option<Self>> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = file.metadata()?;
        Ok(Some(Self { dev: meta.dev(), ino: meta.ino() }))
    }

    #[cfg(not(unix))]
    fn of_file(_file: &File) -> std::io::Result<Option<Self>> {
        Ok(None)
    }

    /// The identity of the file `path` names now (symlinks followed); `None` when nothing is
    /// there.
    ///
    /// # Errors
    /// An I/O error other than "not found".
    #[cfg(unix)]
    pub fn of_path(path: &Path) -> std::io::Result<Option<Self>> {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Some(Self { dev: meta.dev(), ino: meta.ino() })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Without inode numbers there is nothing to compare: every path looks unchanged.
    ///
    /// # Errors
    /// Never.
    #[cfg(not(unix))]
    pub fn of_path(_path: &Path) -> std::io::Result<Option<Self>> {
        Ok(None)
    }

    /// Checks that `path` still names this file: [`StoreError::Replaced`] when it was deleted,
    /// renamed away or replaced by another file. One `stat`, a microsecond or two.
    ///
    /// # Errors
    /// [`StoreError::Replaced`].
    pub fn check(self, path: &Path) -> Result<(), StoreError> {
        match Self::of_path(path) {
            Ok(Some(now)) if now == self => Ok(()),
            Ok(Some(_)) => {
                Err(StoreError::Replaced { path: path.to_owned(), how: "replaced by another file" })
            }
            Ok(None) => Err(StoreError::Replaced { path: path.to_owned(), how: "deleted" }),
            // A path that cannot even be looked at can no longer be trusted to be ours.
            Err(_) => Err(StoreError::Replaced { path: path.to_owned(), how: "no longer readable" }),
        }
    }
}

/// Held for the whole of a `run` (and of a `retry`): a second process on the same state database
/// refuses to start and is told the holder's pid. The OS drops the lock when the process dies, so
/// a SIGKILL never leaves a stale lock behind.
#[derive(Debug)]
pub struct RunLock {
    file: Option<File>,
    path: PathBuf,
    identity: Option<FileIdentity>,
}

impl RunLock {
    /// Takes the exclusive lock on the database file `state` (creating an empty file when there
    /// is none: SQLite takes an empty file for a new database).
    ///
    /// # Errors
    /// [`StoreError::Locked`] when another process holds it, [`StoreError::LockFile`] when the
    /// file cannot be opened or locked.
    pub fn acquire(state: &Path) -> Result<Self, StoreError> {
        let lock_error = |source| StoreError::LockFile { path: state.to_owned(), source };
        if let Some(parent) = state.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(lock_error)?;
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(state)
            .map_err(lock_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let identity = FileIdentity::of_file(&file).ok().flatten();
                let holder = identity.and_then(holder_pid);
                let same_file = link_target(state);
                // Closing this descriptor is safe: this process has no SQLite connection to the
                // file (see `Drop`).
                drop(file);
                return Err(StoreError::Locked { path: state.to_owned(), holder, same_file });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(lock_error(source)),
        }
        let identity = FileIdentity::of_file(&file).map_err(lock_error)?;
        Ok(Self { file: Some(file), path: state.to_owned(), identity })
    }

    /// The database path the lock was taken through.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked file's identity (`None` where the platform has no inode numbers).
    #[must_use]
    pub fn identity(&self) -> Option<FileIdentity> {
        self.identity
    }

    /// Checks that the path still names the locked file.
    ///
    /// # Errors
    /// [`StoreError::Replaced`] when it was deleted or replaced.
    pub fn check(&self) -> Result<(), StoreError> {
        self.identity.map_or(Ok(()), |id| id.check(&self.path))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = file.unlock();
            // The descriptor is left open until the process exits. Closing any descriptor of a
            // file drops every POSIX lock the process holds on it, SQLite's own included, and
            // this process's SQLite connections to the database may outlive the lock by a
            // moment (a pool closes in the background). With SQLite's shared lock gone, another
            // process could checkpoint and delete the WAL under a live connection.
            #[cfg(unix)]
            {
                let _ = std::os::fd::IntoRawFd::into_raw_fd(file);
            }
            #[cfg(not(unix))]
            drop(file);
        }
    }
}

/// Where `path` leads when its last component is a symlink (the file another run may know by its
/// real name); `None` for a plain file.
fn link_target(path: &Path) -> Option<PathBuf> {
    let target = std::fs::canonicalize(path).ok()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let direct = std::fs::canonicalize(parent).ok()?.join(path.file_name()?);
    (target != direct).then_some(target)
}

/// The pid of the process holding a `flock` on the file `id`, read from `/proc/locks` (Linux:
/// `flock` itself never says who holds a lock).
#[cfg(target_os = "linux")]
fn holder_pid(id: FileIdentity) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let device = format!("{:02x}:{:02x}:{}", rustix::fs::major(id.dev), rustix::fs::minor(id.dev), id.ino);
    parse_holder(&text, &device, id.ino)
}

#[cfg(not(target_os = "linux"))]
fn holder_pid(_id: FileIdentity) -> Option<u32> {
    None
}

/// Finds the holder of a `FLOCK` on `device` (`MAJ:MIN:INODE` as `/proc/locks` writes it). Some
/// filesystems (overlay, btrfs subvolumes) show another device number than `stat` does: then
/// the inode alone decides, when exactly one holder has it.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_holder(proc_locks: &str, device: &str, ino: u64) -> Option<u32> {
    let mut by_inode = Vec::new();
    for line in proc_locks.lines() {
        // `N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END`; waiters have `->` after `N:`.
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, _, pid, file, ..] = fields.as_slice() else { continue };
        let Some(pid) = pid.parse::<u32>().ok().filter(|p| *p > 0) else { continue };
        if *file == device {
            return Some(pid);
        }
        if file.rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) == Some(ino) {
            by_inode.push(pid);
        }
    }
    by_inode.dedup();
    match by_inode.as_slice() {
        [pid] => Some(*pid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_file_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let first = RunLock::acquire(&path).unwrap();
        let err = RunLock::acquire(&path).unwrap_err();
        match &err {
            StoreError::Locked { holder, .. } if cfg!(target_os = "linux") => {
                assert_eq!(*holder, Some(std::process::id()), "{err}");
            }
            StoreError::Locked { .. } => {}
            other => panic!("{other}"),
        }
        drop(first);
        RunLock::acquire(&path).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_or_a_second_name_reaches_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let _first = RunLock::acquire(&path).unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let hard = dir.path().join("hard.db");
        std::fs::hard_link(&path, &hard).unwrap();
        for other in [&link, &hard] {
            let err = RunLock::acquire(other).unwrap_err();
            assert!(matches!(err, StoreError::Locked { .. }), "{}: {err}", other.display());
        }
        let real = std::fs::canonicalize(&path).unwrap();
        let err = RunLock::acquire(&link).unwrap_err();
        assert!(err.to_string().contains(&format!("(the same file as {})", real.display())), "{err}");
        let err = RunLock::acquire(&path).unwrap_err();
        assert!(!err.to_string().contains("the same file as"), "{err}");
        // No side file exists whose removal could release the lock.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[cfg(unix)]
    #[test]
    fn the_lock_notices_its_file_deleted_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let lock = RunLock::acquire(&path).unwrap();
        lock.check().unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = lock.check().unwrap_err();
        assert!(err.to_string().contains("deleted"), "{err}");
        std::fs::write(&path, b"").unwrap();
        let err = lock.check().unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");
    }

    #[test]
    fn proc_locks_lines_name_the_holder() {
        let text = "\
1: FLOCK  ADVISORY  WRITE 9832 fe:00:5742847 0 EOF
1: -> FLOCK  ADVISORY  WRITE 7777 fe:00:5742847 0 EOF
2: POSIX  ADVISORY  READ 4242 fe:00:99 1073741826 1073742335
3: FLOCK  ADVISORY  WRITE 1234 00:2f:99 0 EOF
";
        assert_eq!(parse_holder(text, "fe:00:5742847", 5_742_847), Some(9832));
        // Another device number for the same inode (an overlay): the inode decides.
        assert_eq!(parse_holder(text, "fe:00:99", 99), Some(1234));
        assert_eq!(parse_holder(text, "fe:00:5", 5), None);
    }
}
