//! backdrop runs a product catalog through ByteDance's Seedream image models: every row of a CSV
//! or SQLite catalog becomes a paid image request whose life is recorded in a SQLite state file,
//! so a run interrupted anywhere resumes, skips what is done, and never pays twice for a row.
//!
//! The data flows catalog → [`plan`] → [`store`] → [`pipeline`] → [`provider`] → [`fetch`] →
//! [`store`] → [`report`]: rows are validated and fingerprinted, diffed against the store,
//! claimed by a bounded, rate-limited worker pool, submitted, polled, downloaded atomically, and
//! only then marked done.
//!
//! # Layout
//! - [`cli`]: clap definitions; [`config`]: flags + env + `backdrop.toml` → [`config::Settings`].
//! - [`catalog`]: streaming CSV and SQLite row sources with line-numbered errors.
//! - [`prompt`]: prompt templates (`{column}` placeholders, TOML front matter).
//! - [`plan`]: fingerprints, the diff against the store, the price of a run.
//! - [`store`]: the SQLite state file (runs, jobs, attempts, outputs) and its queries.
//! - [`pipeline`]: scheduler, rate limiter, retry policy, shutdown.
//! - [`job`]: the shape of one job (task, params) shared by planner and providers.
//! - [`provider`]: the provider trait and its two protocols (seedance, fal).
//! - [`fetch`]: verified, durable downloads of output images.
//! - [`progress`]: the progress bar and the log writer that keeps logs off it.
//! - [`report`]: csv, json and html reports built from the store.
//! - [`command`]: one function per subcommand; [`exit`]: the exit codes; [`error`]: the
//!   top-level error that maps to them.

pub mod catalog;
pub mod cli;
pub mod command;
pub mod config;
pub mod error;
pub mod exit;
pub mod fetch;
pub mod job;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod prompt;
pub mod provider;
pub mod report;
pub mod store;
