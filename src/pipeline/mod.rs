//! The run engine: a bounded worker pool ([`scheduler`]) that takes planned jobs from the store
//! through a provider, with a shared rate limiter ([`limiter`]), a retry policy ([`retry`]), a
//! spending cap ([`budget`]) and live counters ([`stats`]).

pub mod budget;
pub mod scheduler;
pub mod stats;
pub mod webhook;
