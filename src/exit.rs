//! The process exit codes backdrop promises to schedulers and scripts (see the README).
//! One enum, so the code that decides an outcome and the code that documents it cannot drift.

/// Every way a backdrop command can end, with the number the process exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ExitCode {
    /// Every row is done or was skipped.
    Success,
    /// A fatal error: the database could not be opened, the simulator could not start, a bug.
    Fatal,
    /// Usage, config or catalog error: nothing was sent.
    Usage,
    /// The run finished and some rows failed.
    RowsFailed,
    /// Stopped by out-of-credits (402) or the budget cap; resumable.
    OutOfCredits,
    /// The API rejected the key (401/403).
    KeyRejected,
    /// The output folder or the state file cannot be written (disk full, read-only, permissions,
    /// I/O errors); paid rows keep their results. Resumable once the disk is fixed.
    DiskFailing,
    /// The server answered nothing but 429 (too many requests) for `--patience`; resumable.
    Throttled,
    /// Interrupted by Ctrl-C or SIGTERM; resumable.
    Interrupted,
}

impl ExitCode {
    /// The number the process exits with.
    #[must_use]
    pub(crate) const fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Fatal => 1,
            Self::Usage => 2,
            Self::RowsFailed => 3,
            Self::OutOfCredits => 4,
            Self::KeyRejected => 5,
            Self::DiskFailing => 6,
            Self::Throttled => 7,
            Self::Interrupted => 130,
        }
    }
}

/// The exit codes as shown at the end of `backdrop --help`.
pub(crate) const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    every row done or skipped
  1    fatal error
  2    usage, config or catalog error (nothing was sent)
  3    finished, some rows failed
  4    stopped by out-of-credits or the budget cap (resumable)
  5    the API rejected the key
  6    stopped: the output folder or state file cannot be written (resumable once fixed)
  7    stopped: the server answered only 429 (too many requests) for --patience (resumable)
  130  interrupted (resumable)";

#[cfg(test)]
mod tests {
    use super::ExitCode;

    #[test]
    fn codes_match_the_readme() {
        let all = [
            (ExitCode::Success, 0),
            (ExitCode::Fatal, 1),
            (ExitCode::Usage, 2),
            (ExitCode::RowsFailed, 3),
            (ExitCode::OutOfCredits, 4),
            (ExitCode::KeyRejected, 5),
            (ExitCode::DiskFailing, 6),
            (ExitCode::Throttled, 7),
            (ExitCode::Interrupted, 130),
        ];
        for (exit, code) in all {
            assert_eq!(exit.code(), code, "{exit:?}");
            assert!(super::EXIT_CODES_HELP.contains(&format!("  {code} ")));
        }
    }
}
