//! pipeline (being built).
