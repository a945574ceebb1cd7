//! `backdrop sim`: starts the simulator of both APIs on `--listen`, prints the base URL and an
//! example, and serves until Ctrl-C.

use crate::error::Error;
use crate::exit::ExitCode;
use crate::sim::{SimArgs, SimConfig, SimError};

fn fail(e: &SimError) -> Error {
    let exit = match e {
        SimError::Config(_) | SimError::Scenario { .. } => ExitCode::Usage,
        _ => ExitCode::Fatal,
    };
    Error::Other { message: e.to_string(), exit }
}

/// Runs the simulator until Ctrl-C.
///
/// # Errors
/// A usage error for bad flags or scenario, a fatal one when the address cannot be opened.
pub async fn execute(args: &SimArgs) -> Result<ExitCode, Error> {
    let config = SimConfig::from_args(args).map_err(|e| fail(&e))?;
    let handle = crate::sim::start_on(args.listen, config).await.map_err(|e| fail(&e))?;
    let base = handle.base_url();
    println!("backdrop sim listening on {base}");
    println!(
        "  seedance: SEEDANCE_API_KEY=anything backdrop run sample-catalog.csv --prompt prompts/marble.txt --api-base {base}"
    );
    println!(
        "  fal:      FAL_KEY=anything backdrop run sample-catalog.csv --prompt prompts/marble.txt --provider fal --api-base {base} --jwks-url {}",
        handle.jwks_url()
    );
    println!("  ledger:   curl {base}/__sim/ledger    stats: curl {base}/__sim/stats    (Ctrl-C to stop)");
    if tokio::signal::ctrl_c().await.is_err() {
        tracing::warn!("cannot listen for Ctrl-C; stopping");
    }
    handle.shutdown().await;
    Ok(ExitCode::Success)
}
