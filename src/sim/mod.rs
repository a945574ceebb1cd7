//! The simulator (being built).

/// Flags of `backdrop sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {}
