//! The integration test binary: every end-to-end test, compiled once.

mod harness;

mod chaos;
mod crash;
mod ops;
mod plan;
mod provider;
mod run;
mod sim;
