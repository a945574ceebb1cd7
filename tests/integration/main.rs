//! The integration test binary: every end-to-end test, compiled once.

mod harness;

mod badinput;
mod budget;
mod chaos;
mod crash;
mod hostile;
mod operate;
mod ops;
mod plan;
mod prompts;
mod provider;
mod run;
mod s3;
mod sim;
mod tidy;
mod trust;
mod uploads;
