//! Catalog sources: streaming row readers for CSV files and SQLite tables, with validation
//! that reports every problem with its line (CSV) or rowid (SQLite).

/// Errors reading or validating a catalog.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// Placeholder until the catalog reader lands.
    #[error("catalog: {0}")]
    Invalid(String),
}
