//! The run engine: a bounded worker pool ([`scheduler`]) that takes planned jobs from the store
//! through a provider, with a shared rate limiter ([`limiter`]) whose pace and window of jobs in
//! flight adapt to the server ([`adaptive`]), the retry and poll timing ([`backoff`], and
//! [`polling`], which learns the latency), live counters ([`stats`]) and the webhook receiver
//! ([`webhooks`]).

pub mod adaptive;
pub mod backoff;
pub mod gate;
pub mod limiter;
pub mod polling;
pub mod reuse;
pub mod scheduler;
pub mod stats;
pub mod webhooks;
