//! `backdrop sim`: starts the simulator of both APIs on `--listen`, prints the base URL and an
//! example, and serves until the first SIGINT or SIGTERM (what systemd and Docker send).

use std::io::Write as _;

use backdrop_sim::{SimArgs, SimConfig, SimError};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::exit::ExitCode;

fn fail(e: &SimError) -> Error {
    let exit = match e {
        SimError::Config(_) | SimError::Scenario { .. } => ExitCode::Usage,
        _ => ExitCode::Fatal,
    };
    Error::Other { message: e.to_string(), exit }
}

/// Runs the simulator until `stop` fires: `main` cancels it on the first SIGINT or SIGTERM.
///
/// # Errors
/// A usage error for bad flags or scenario, a fatal one when the address cannot be opened.
pub(crate) async fn execute(args: &SimArgs, stop: CancellationToken) -> Result<ExitCode, Error> {
    let config = SimConfig::from_args(args).map_err(|e| fail(&e))?;
    let handle = backdrop_sim::start_on(args.listen, config).await.map_err(|e| fail(&e))?;
    let base = handle.base_url();
    let banner = format!(
        "backdrop sim listening on {base}\n  \
         seedance: SEEDANCE_API_KEY=anything backdrop run sample-catalog.csv --prompt prompts/marble.txt --api-base {base}\n  \
         fal:      FAL_KEY=anything backdrop run sample-catalog.csv --prompt prompts/marble.txt --provider fal --api-base {base} --jwks-url {jwks}\n  \
         ledger:   curl {base}/__sim/ledger    stats: curl {base}/__sim/stats    (Ctrl-C to stop)\n",
        jwks = handle.jwks_url(),
    );
    // A closed stdout (a script that read the URL and went away) must not stop the server.
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(banner.as_bytes()).and_then(|()| stdout.flush());
    // One signal is enough: the process's signal watcher turns the first SIGINT or SIGTERM into
    // this token (listening for Ctrl-C here as well left SIGTERM to the watcher alone, so a
    // service manager's single SIGTERM was ignored until a second one forced the exit).
    stop.cancelled().await;
    // Bounded: open keep-alive connections are given a few seconds, not forever.
    handle.shutdown().await;
    Ok(ExitCode::Success)
}
