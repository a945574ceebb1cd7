//! [`ProviderKind`]: which remote API protocol a run speaks, and the names it goes by in flags,
//! config files, the state file and the environment.

use serde::{Deserialize, Serialize};

use super::Task;

/// Default seedance model.
pub const DEFAULT_SEEDANCE_MODEL: &str = "seedream-v4-5";

/// Default fal model for edits.
pub const DEFAULT_FAL_EDIT_MODEL: &str = "fal-ai/bytedance/seedream/v4.5/edit";

/// Default fal model for text to image.
pub const DEFAULT_FAL_GENERATE_MODEL: &str = "fal-ai/bytedance/seedream/v4.5/text-to-image";

/// Which remote API protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The Seedance REST API (credits; `SEEDANCE_API_KEY`).
    #[default]
    Seedance,
    /// The fal.ai queue API (dollars; `FAL_KEY`).
    Fal,
}

impl ProviderKind {
    /// Every provider, in the order help text lists them.
    pub const ALL: [Self; 2] = [Self::Seedance, Self::Fal];

    /// The lowercase name used in flags, config and the store.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Seedance => "seedance",
            Self::Fal => "fal",
        }
    }

    /// The model used when neither `--model` nor the template names one.
    #[must_use]
    pub const fn default_model(self, task: Task) -> &'static str {
        match (self, task) {
            (Self::Seedance, _) => DEFAULT_SEEDANCE_MODEL,
            (Self::Fal, Task::Edit) => DEFAULT_FAL_EDIT_MODEL,
            (Self::Fal, Task::Generate) => DEFAULT_FAL_GENERATE_MODEL,
        }
    }

    /// How long the provider keeps a result's output URLs working, from when it made them
    /// (seedance: 24 hours; fal: at least 7 days). A paid result not downloaded by then is lost.
    #[must_use]
    pub const fn output_url_lifetime(self) -> std::time::Duration {
        match self {
            Self::Seedance => std::time::Duration::from_secs(24 * 3600),
            Self::Fal => std::time::Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// The environment variable that holds this provider's key.
    #[must_use]
    pub const fn key_env_var(self) -> &'static str {
        match self {
            Self::Seedance => "SEEDANCE_API_KEY",
            Self::Fal => "FAL_KEY",
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProviderKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown provider {s:?} (use seedance or fal)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in ProviderKind::ALL {
            assert_eq!(p.as_str().parse::<ProviderKind>(), Ok(p));
        }
        assert!("openai".parse::<ProviderKind>().is_err());
    }

    #[test]
    fn default_models_follow_provider_and_task() {
        assert_eq!(ProviderKind::Seedance.default_model(Task::Generate), "seedream-v4-5");
        assert_eq!(ProviderKind::Fal.default_model(Task::Edit), DEFAULT_FAL_EDIT_MODEL);
        assert_eq!(ProviderKind::Fal.default_model(Task::Generate), DEFAULT_FAL_GENERATE_MODEL);
    }
}
