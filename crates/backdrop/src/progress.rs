//! The terminal progress bar of `backdrop run` (rows done/total, in flight, rate, ETA, money,
//! retries, failures) and the log writer that hides the bar while a log line is printed, so the
//! two never interleave. The bar exists only when stderr is a terminal and logs are not verbose.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::money::Unit;
use crate::pipeline::stats::RunStats;

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn current() -> Option<ProgressBar> {
    BAR.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

/// Whether a bar should be drawn: stderr is a terminal and nothing asked for quiet or verbose output.
#[must_use]
pub fn wanted(quiet: bool, verbose: u8, json_logs: bool, no_progress: bool) -> bool {
    !(quiet || verbose > 0 || json_logs || no_progress) && std::io::stderr().is_terminal()
}

/// Draws the bar from `stats` until `done` is cancelled, then clears it.
pub fn spawn(stats: Arc<RunStats>, unit: Unit, done: CancellationToken) -> tokio::task::JoinHandle<()> {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
    // The template is a constant known to parse; fall back to the default style if it ever does not.
    let style =
        ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:28}] {pos}/{len} rows  {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    *BAR.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bar.clone());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        loop {
            let total = RunStats::get(&stats.total);
            let done_rows = RunStats::get(&stats.done);
            let failed = RunStats::get(&stats.failed) + RunStats::get(&stats.ambiguous);
            let finished = done_rows + failed;
            bar.set_length(total.max(1));
            bar.set_position(finished);
            let minutes = started.elapsed().as_secs_f64() / 60.0;
            #[expect(clippy::cast_precision_loss, reason = "display only")]
            let rate = if minutes > 0.0 { finished as f64 / minutes } else { 0.0 };
            #[expect(clippy::cast_precision_loss, reason = "display only")]
            let eta = if rate > 0.0 {
                let left = total.saturating_sub(finished) as f64 / rate;
                humantime::format_duration(Duration::from_secs_f64((left * 60.0).round().max(0.0)))
                    .to_string()
            } else {
                "-".into()
            };
            let spent = stats.spent();
            let money = unit.show(spent);
            bar.set_message(format!(
                "in flight {} | {rate:.0}/min | ETA {eta} | {money} | retries {} | failed {failed}",
                RunStats::get(&stats.in_flight),
                RunStats::get(&stats.retries),
            ));
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = done.cancelled() => break,
            }
        }
        bar.finish_and_clear();
        *BAR.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    })
}

/// A `tracing` writer for stderr that hides the bar while a line is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match current() {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write_all(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}
