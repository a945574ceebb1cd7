//! The run pipeline: the scheduler that claims and drives jobs, the shared rate [`limiter`], the
//! [`retry`] and poll schedules, and shutdown.

pub mod limiter;
pub mod retry;
