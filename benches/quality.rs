//! The quality gate's cost: CPU per 2048×2048 output for `assess` (the target is under 50 ms),
//! with decoding and an export measured beside it for scale. The pictures are the simulator's:
//! a product on white and a faithful marble edit of it (relit and shifted a little), PNG.
//!
//! ```text
//! cargo bench --bench quality [-- --iterations 20] [--side 256]
//! ```
//!
//! CPU time is the process's (user + system, from `/proc/self/stat`, so the threads an image
//! library starts count too); elsewhere the wall time stands in for it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use backdrop::quality::{self, ExportPreset, QualitySettings};
use backdrop_sim::imagegen::{self, Alteration, Format, ImageKey, Jitter, Source, Texture};

/// The pictures' side unless `--side` says otherwise (the simulator's images are 256 px).
const SIDE: u32 = 2048;

/// The process's CPU time so far, if the platform tells.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // Linux reports clock ticks of 1/100 s (USER_HZ) here.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Runs `f` `n` times; returns (CPU, wall) per run.
fn measure(n: u32, mut f: impl FnMut() -> Result<()>) -> Result<(Option<Duration>, Duration)> {
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    for _ in 0..n {
        f()?;
    }
    let wall = wall0.elapsed() / n;
    let cpu = cpu0.and_then(|c0| cpu_time().map(|c1| (c1.saturating_sub(c0)) / n));
    Ok((cpu, wall))
}

fn report(what: &str, (cpu, wall): (Option<Duration>, Duration)) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match cpu {
        Some(cpu) => println!("{what:<44} {:>8.1} ms CPU {:>8.1} ms wall", ms(cpu), ms(wall)),
        None => println!("{what:<44} {:>8} ms CPU {:>8.1} ms wall", "?", ms(wall)),
    }
}

fn main() -> Result<()> {
    let mut iterations = 20u32;
    let mut side = SIDE;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--iterations" {
            iterations = args.next().context("--iterations needs a number")?.parse()?;
        } else if arg == "--side" {
            side = args.next().context("--side needs a number of pixels")?.parse()?;
        }
    }
    let key = |texture, jitter| ImageKey {
        source: Source::Named { name: "BENCH-1".into(), width: side, height: side },
        texture,
        width: side,
        height: side,
        format: Format::Png,
        variant: 0,
        alteration: Alteration::None,
        jitter,
    };
    let input_png = imagegen::render(&key(Texture::Original, Jitter::default()))?;
    let output_png = imagegen::render(&key(Texture::Marble, Jitter { dx: 8, dy: -5, gain: 104 }))?;
    let input = quality::decode(&input_png, "input")?;
    let output = quality::decode(&output_png, "output")?;
    let settings = QualitySettings::default();

    let verdict = quality::assess(&input, &output, &settings)?;
    anyhow::ensure!(verdict.passed(), "a faithful edit must pass: {}", verdict.summary());
    println!("{iterations} iterations, {side}×{side} RGB, working side {}", settings.working_side);
    report(
        "assess (input vs output)",
        measure(iterations, || quality::assess(&input, &output, &settings).map(drop).map_err(Into::into))?,
    );
    report(
        "assess_output (soundness only)",
        measure(iterations, || quality::assess_output(&output, &settings).map(drop).map_err(Into::into))?,
    );
    report(
        "decode one PNG (for scale)",
        measure(iterations.min(5), || quality::decode(&output_png, "output").map(drop).map_err(Into::into))?,
    );
    let preset: ExportPreset =
        toml::from_str("canvas = \"2000x2000\"\nbackground = \"#ffffff\"\nformat = \"jpeg\"\nquality = 90")?;
    report(
        "export: 2000×2000 white-canvas JPEG (for scale)",
        measure(iterations.min(5), || {
            quality::render_export(&output, &preset).map(drop).map_err(Into::into)
        })?,
    );
    Ok(())
}
