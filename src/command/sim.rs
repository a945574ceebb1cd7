//! `backdrop sim`: starts the simulator of both APIs on `--listen`, prints the base URL and an
//! example, and serves until the first SIGINT or SIGTERM (what systemd and Docker send).

use std::io::Write as _;

use backdrop_sim::{SimArgs, SimConfig, SimError};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::exit::ExitCode;

/// The catalog and prompt the start-up hint runs: the repository's sample, whose pictures are
/// local files (hence `--inline-local-images`).
const HINT_CATALOG: &str = "sample-catalog.csv";
const HINT_PROMPT: &str = "prompts/marble-counter.txt";

/// What `backdrop sim` prints when it is ready: where it listens and how to point a run at it.
fn banner(base: &str, jwks: &str) -> String {
    let run = format!("backdrop run {HINT_CATALOG} --prompt {HINT_PROMPT} --inline-local-images");
    format!(
        "backdrop sim listening on {base}\n  \
         seedance: SEEDANCE_API_KEY=anything {run} --api-base {base}\n  \
         fal:      FAL_KEY=anything {run} --provider fal --api-base {base} --jwks-url {jwks}\n  \
         ledger:   curl {base}/__sim/ledger    stats: curl {base}/__sim/stats    (Ctrl-C to stop)\n"
    )
}

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
    let banner = banner(&handle.base_url(), &handle.jwks_url());
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// Every command of the hint parses, and every file it names exists in the repository
    /// (the hint is run from a clone's root).
    #[test]
    fn the_start_up_hint_names_files_that_exist_and_flags_that_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = banner("http://127.0.0.1:8787", "http://127.0.0.1:8787/.well-known/jwks.json");
        let mut commands = 0;
        for line in text.lines() {
            let Some(start) = line.find("backdrop run") else { continue };
            commands += 1;
            let words: Vec<&str> = line[start..].split_whitespace().collect();
            crate::cli::Cli::try_parse_from(&words).unwrap_or_else(|e| panic!("{line}: {e}"));
            for w in words.iter().filter(|w| w.ends_with(".csv") || w.ends_with(".txt")) {
                assert!(root.join(w).is_file(), "the hint names {w}, which does not exist");
            }
        }
        assert_eq!(commands, 2, "{text}");
        assert!(root.join(HINT_CATALOG).is_file() && root.join(HINT_PROMPT).is_file());
    }
}
