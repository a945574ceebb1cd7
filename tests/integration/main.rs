//! The integration test binary: every end-to-end test, compiled once.

mod harness;

mod badinput;
mod budget;
mod chaos;
mod crash;
mod exports;
mod firsthour;
mod gate;
mod hostile;
mod limits;
mod operate;
mod ops;
mod plan;
mod preflight;
mod prompts;
mod provider;
mod quality;
mod reuse;
mod review;
mod run;
mod s3;
mod sim;
mod tidy;
mod trust;
mod uploads;
