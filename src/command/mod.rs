//! One function per subcommand; `dispatch` picks it. Each returns the exit code of its outcome,
//! or an [`Error`] that knows its own.

use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command};
use crate::error::Error;
use crate::exit::ExitCode;

pub(crate) mod accept;
pub(crate) mod forced_exit;
pub(crate) mod leftovers;
pub(crate) mod report;
pub(crate) mod retry;
pub(crate) mod run;
pub(crate) mod sim;
pub(crate) mod status;

/// Runs the subcommand the user asked for.
///
/// # Errors
/// Whatever stopped the command; [`Error::exit_code`] says how to exit.
pub(crate) async fn dispatch(cli: Cli, interrupt: CancellationToken) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Run(args) => run::execute(&cli.global, *args, interrupt).await,
        Command::Status(args) => status::execute(&cli.global, &args).await,
        Command::Retry(args) => retry::execute(&cli.global, &args).await,
        Command::Accept(args) => accept::execute(&cli.global, &args).await,
        Command::Report(args) => report::execute(&cli.global, &args).await,
        Command::Sim(sim) => {
            // clap hands the global flag's value here too, so BACKDROP_CONFIG set for `run`
            // arrives as well: only a --config typed for `sim` is refused.
            let from_env = std::env::var_os("BACKDROP_CONFIG")
                .is_some_and(|v| sim.config.as_deref() == Some(std::path::Path::new(&v)));
            if let Some(file) = sim.config.as_ref().filter(|_| !from_env) {
                return Err(Error::Other {
                    message: format!(
                        "backdrop sim takes no --config (that file holds `run` settings): pass the \
                         simulator's settings with --scenario {}",
                        file.display()
                    ),
                    exit: ExitCode::Usage,
                });
            }
            sim::execute(&sim.args, interrupt).await
        }
    }
}
