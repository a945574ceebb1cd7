//! The top-level error a command returns: each module's typed error, and the exit code it means.
//! `main.rs` prints the chain and exits with [`Error::exit_code`]; nothing else decides exit codes
//! for errors.

use crate::exit::ExitCode;

/// Why a command stopped before producing its normal outcome.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Error {
    /// Flags or config file.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The catalog could not be read or has invalid rows.
    #[error(transparent)]
    Catalog(#[from] backdrop::catalog::CatalogError),
    /// The prompt template is invalid.
    #[error(transparent)]
    Prompt(#[from] backdrop::prompt::PromptError),
    /// The state database.
    #[error(transparent)]
    Store(#[from] backdrop::store::StoreError),
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What backdrop was doing.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else that ends a command, with its exit code.
    #[error("{message}")]
    Other {
        /// What happened.
        message: String,
        /// The exit code it means.
        exit: ExitCode,
    },
}

impl From<backdrop::plan::PlanError> for Error {
    fn from(e: backdrop::plan::PlanError) -> Self {
        use backdrop::plan::PlanError;
        match e {
            PlanError::Catalog(e) => Self::Catalog(e),
            PlanError::Store(e) => Self::Store(e),
            other => Self::Other { message: other.to_string(), exit: ExitCode::Fatal },
        }
    }
}

/// The error and its causes on one line, `outer: cause: root`, leaving out a cause whose text
/// the line already holds: most errors quote their source in their own message, and printing
/// the chain as well would say "No such file or directory (os error 2)" twice.
#[must_use]
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl From<backdrop::preflight::PreflightError> for Error {
    fn from(e: backdrop::preflight::PreflightError) -> Self {
        use backdrop::preflight::PreflightError;
        match e {
            PreflightError::Catalog(e) => Self::Catalog(e),
            PreflightError::Store(e) => Self::Store(e),
            other => Self::Other { message: other.to_string(), exit: ExitCode::Fatal },
        }
    }
}

impl Error {
    /// The exit code this error means.
    #[must_use]
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_) | Self::Catalog(_) | Self::Prompt(_) => ExitCode::Usage,
            Self::Store(
                backdrop::store::StoreError::Locked { .. } | backdrop::store::StoreError::NotBackdrop { .. },
            ) => ExitCode::Usage,
            Self::Store(e) if e.is_disk_failure() => ExitCode::DiskFailing,
            Self::Store(_) | Self::Io { .. } => ExitCode::Fatal,
            Self::Other { exit, .. } => *exit,
        }
    }

    /// Wraps an I/O error with what backdrop was doing.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan that cannot run is a usage error (exit 2, nothing was sent); a planner bug is fatal.
    #[test]
    fn plan_errors_map_to_usage_or_fatal() {
        use backdrop::plan::PlanError;
        let catalog = PlanError::Catalog(backdrop::catalog::CatalogError::Io {
            path: "c.csv".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(Error::from(catalog).exit_code(), ExitCode::Usage);
        let prompt = backdrop::prompt::PromptError::Empty { path: "p.txt".into() };
        assert_eq!(Error::from(prompt).exit_code(), ExitCode::Usage);
        assert_eq!(Error::from(PlanError::Internal("reader died".into())).exit_code(), ExitCode::Fatal);
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let os = missing().to_string();
        let e = Error::io("reading x.csv", missing());
        assert_eq!(describe(&e), format!("reading x.csv: {os}"));
        let e = Error::from(backdrop::catalog::CatalogError::Io { path: "c.csv".into(), source: missing() });
        assert_eq!(describe(&e).matches(&os).count(), 1, "{}", describe(&e));

        // A cause the message does not quote is still shown.
        #[derive(Debug, thiserror::Error)]
        #[error("opening the state")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(describe(&Outer(missing())), format!("opening the state: {os}"));
    }
}
