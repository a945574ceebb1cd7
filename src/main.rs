//! The `backdrop` binary: parse flags, set up logging and the runtime, run the subcommand, and
//! turn its outcome into an exit code. The pipeline itself is the `backdrop` library; this crate
//! is the application layer on top of it, the only place that knows clap, the config file and
//! exit codes.
//!
//! - [`cli`]: clap definitions; [`config`]: flags + env + `backdrop.toml` → [`config::Settings`].
//! - [`command`]: one module per subcommand; [`exit`]: the exit codes; [`error`]: the top-level
//!   error that maps to them; [`command::forced_exit`]: what a second signal still writes.

mod cli;
mod command;
mod config;
mod error;
mod exit;

use std::process::ExitCode;

use cli::{GlobalArgs, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::parse();
    init_logging(&cli.global);
    // One thread: backdrop waits on the network and the disk, not the CPU, and on a small machine a
    // second worker mostly wakes up to steal tasks (measured: a third fewer context switches and
    // less CPU per row). Blocking file work still goes to the blocking pool, SQLite to its own
    // thread.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backdrop: error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ExitCode::Fatal.code());
        }
    };
    let interrupt = CancellationToken::new();
    runtime.spawn(watch_signals(interrupt.clone()));
    let outcome = runtime.block_on(command::dispatch(cli, interrupt));
    // Don't wait for stray blocking tasks (a download stuck in a syscall) on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(code) => ExitCode::from(code.code()),
        Err(e) => {
            let code = e.exit_code();
            // Errors quote catalog cells and server answers: never their control characters.
            eprintln!("backdrop: error: {}", backdrop::domain::text::terminal_safe(&error::describe(&e)));
            ExitCode::from(code.code())
        }
    }
}

fn init_logging(global: &GlobalArgs) {
    let level = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // Per-row events (submitted, retrying, done) are info: every one of them in JSON logs for
    // shippers, but on a terminal only with -v, where the progress bar says the same thing.
    let rows = match (global.log_format, global.verbose, global.quiet) {
        (_, _, true) => "error",
        (LogFormat::Text, 0, false) => "warn",
        _ => level,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},backdrop::pipeline::scheduler={rows},sqlx=warn,hyper=warn,reqwest=warn,axum=warn,h2=warn"
        ))
    });
    // Colours only for a person at a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(backdrop::progress::LogWriter)
        .with_ansi(ansi);
    match global.log_format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// The first Ctrl-C or SIGTERM asks the command to stop (a run stops at safe points and exits
/// 130; the simulator shuts down); the second exits at once, after writing the run's summary file
/// if it has one, leaving the store's crash recovery to sort out the rest on the next run.
async fn watch_signals(interrupt: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return };
    for first in [true, false] {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if first {
            eprintln!("backdrop: interrupted: stopping at a safe point (again to quit now)");
            interrupt.cancel();
        }
    }
    command::forced_exit::write_summary();
    std::process::exit(i32::from(exit::ExitCode::Interrupted.code()));
}
