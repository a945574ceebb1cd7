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
            PlanError::Prompt(e) => Self::Prompt(e),
            PlanError::Catalog(e) => Self::Catalog(e),
            PlanError::Store(e) => Self::Store(e),
            other => Self::Other { message: other.to_string(), exit: ExitCode::Fatal },
        }
    }
}

impl From<backdrop::preflight::PreflightError> for Error {
    fn from(e: backdrop::preflight::PreflightError) -> Self {
        use backdrop::preflight::PreflightError;
        match e {
            PreflightError::Prompt(e) => Self::Prompt(e),
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
