//! The shape of one unit of paid work, shared by the planner (which writes it to the store) and
//! the providers (which send it): the task, the model, the rendered prompt, the input images and
//! the generation parameters from the prompt's front matter.

use serde::{Deserialize, Serialize};

/// What the model is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Edit the row's image(s) (background swap): needs `image_url`/`image_urls`.
    #[default]
    Edit,
    /// Text to image: no input image.
    Generate,
}

impl Task {
    /// The name stored in `jobs.task`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Edit => "edit",
            Self::Generate => "generate",
        }
    }
}

/// Generation parameters. Stored as JSON in `jobs.params` and part of the fingerprint, so a
/// change to any of them re-runs the row. Field order is fixed: it is serialized for hashing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Images per row, 1–6.
    pub num_images: u32,
    /// `png` or `jpeg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<String>,
    /// Output size: `WIDTHxHEIGHT` (e.g. `2048x2048`) or a fal enum name (e.g. `square_hd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Seed for reproducible output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
}

impl Default for Params {
    fn default() -> Self {
        Self { num_images: 1, output_format: None, size: None, seed: None }
    }
}

impl Params {
    /// `size` as width and height when it is `WIDTHxHEIGHT`.
    #[must_use]
    pub fn dimensions(&self) -> Option<(u32, u32)> {
        let (w, h) = self.size.as_deref()?.split_once(['x', 'X'])?;
        Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
    }
}

/// One job as the provider sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// `jobs.id`.
    pub id: i64,
    /// The row's SKU (for logs and errors).
    pub sku: String,
    /// Edit or generate.
    pub task: Task,
    /// The model name (seedance `model`, or the fal model id's family, see `provider::fal`).
    pub model: String,
    /// The rendered prompt.
    pub prompt: String,
    /// Input images as stored: http(s) URLs or absolute local paths (the provider inlines those).
    pub inputs: Vec<String>,
    /// Generation parameters.
    pub params: Params,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_parse_only_width_by_height() {
        let p = |s: &str| Params { size: Some(s.into()), ..Params::default() };
        assert_eq!(p("2048x1152").dimensions(), Some((2048, 1152)));
        assert_eq!(p("square_hd").dimensions(), None);
        assert_eq!(Params::default().dimensions(), None);
    }
}
