//! The integration test binary: every end-to-end test, compiled once.

mod harness;
mod crash;
mod run;
