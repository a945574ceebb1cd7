//! The run engine: a bounded worker pool ([`scheduler`]) that takes planned jobs from the store
//! through a provider, with a shared rate limiter ([`limiter`]), a retry policy ([`retry`]), a
//! spending cap ([`budget`]), live counters ([`stats`]) and the webhook receiver ([`webhook`]).

pub mod budget;
pub mod limiter;
pub mod retry;
pub mod scheduler;
pub mod stats;
pub mod webhook;
