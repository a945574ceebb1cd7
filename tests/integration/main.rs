//! The integration test binary: every end-to-end test, compiled once.

mod harness;

mod badinput;
mod chaos;
mod crash;
mod operate;
mod ops;
mod plan;
mod provider;
mod quality;
mod run;
mod sim;
mod tidy;
