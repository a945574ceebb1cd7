//! The run engine: a bounded worker pool ([`scheduler`]) that takes planned jobs from the store
//! through a provider, with a shared rate limiter ([`limiter`]), the retry and poll timing
//! ([`backoff`]), live counters ([`stats`]) and the webhook receiver ([`webhooks`]).

pub mod backoff;
pub mod limiter;
pub mod scheduler;
pub mod stats;
pub mod webhooks;
