//! backdrop runs a product catalog through ByteDance's Seedream image models: every row of a CSV
//! or SQLite catalog becomes a paid image request whose life is recorded in a SQLite state file,
//! so a run interrupted anywhere resumes, skips what is done, and never pays twice for a row.
//!
//! This crate is the pipeline; the `backdrop` binary (clap, the config file, the commands and
//! their exit codes) sits on top of it, and the simulator is a crate of its own that this one
//! never imports. The data flows catalog → [`plan`] → [`store`] → [`pipeline`] → [`provider`] →
//! [`fetch`] → [`store`] → [`report`]. `ARCHITECTURE.md` at the repository root is the map.
//!
//! # Layout, lowest first (a module imports only from the lines above its own)
//! - [`domain`]: the shared vocabulary: provider kind, API key, rate, job, request and output refs.
//! - [`money`]: units, prices, the run's cap and the budget gate.
//! - [`quality`]: the quality gate (an output judged against its input) and export presets.
//! - [`prompt`]: prompt templates (`{column}` placeholders, TOML front matter).
//! - [`store`]: the SQLite state file (runs, jobs, attempts, outputs) and its queries.
//! - [`provider`]: the provider trait and its two protocols (seedance, fal).
//! - [`fetch`]: verified, durable downloads of output images.
//! - [`catalog`]: streaming CSV and SQLite row sources with line-numbered errors.
//! - [`preflight`]: input checks before paying: reachable, an accepted image, within limits; cached.
//! - [`plan`]: fingerprints, the diff against the store, the price of a run.
//! - [`pipeline`]: scheduler, rate limiter, retry and poll timing, webhook receiver.
//! - [`report`]: csv, json and html reports built from the store.
//! - [`progress`]: the progress bar and the log writer that keeps logs off it.

pub mod catalog;
pub mod domain;
pub mod fetch;
pub mod money;
pub mod pipeline;
pub mod plan;
pub mod preflight;
pub mod progress;
pub mod prompt;
pub mod provider;
pub mod quality;
pub mod report;
pub mod store;
