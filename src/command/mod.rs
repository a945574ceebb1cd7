//! One function per subcommand; `dispatch` picks it. Each returns the exit code of its outcome,
//! or an [`Error`] that knows its own.

pub mod sim;

use crate::cli::{Cli, Command};
use crate::error::Error;
use crate::exit::ExitCode;

/// Runs the subcommand the user asked for.
///
/// # Errors
/// Whatever stopped the command; [`Error::exit_code`] says how to exit.
pub async fn dispatch(cli: Cli) -> Result<ExitCode, Error> {
    if let Command::Sim(args) = &cli.command {
        return sim::execute(args).await;
    }
    let name = match cli.command {
        Command::Run(_) => "run",
        Command::Status(_) => "status",
        Command::Retry(_) => "retry",
        Command::Report(_) => "report",
        Command::Sim(_) => "sim",
    };
    Err(Error::Other { message: format!("{name} is being built"), exit: ExitCode::Fatal })
}
