//! Prompt templates: `{column}` placeholders, `{{`/`}}` escapes, optional TOML front matter.

/// Errors parsing or rendering a template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromptError {
    /// Placeholder until the template engine lands.
    #[error("prompt: {0}")]
    Invalid(String),
}
