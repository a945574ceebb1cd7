//! [`ApiKey`]: a provider's key, read from the environment only, whose `Debug` and `Display`
//! print `[redacted]` so it cannot reach a log, the state file, a report or an error by accident.

use super::ProviderKind;

/// An API key from the environment. Its `Debug` and `Display` print `[redacted]`, so a key can
/// never reach a log, a report or an error message by accident; only [`ApiKey::expose`] reads it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Reads `provider`'s key from its environment variable
    /// ([`ProviderKind::key_env_var`]); `None` when it is unset or blank.
    #[must_use]
    pub fn from_env(provider: ProviderKind) -> Option<Self> {
        match std::env::var(provider.key_env_var()) {
            Ok(v) if !v.trim().is_empty() => Some(Self(v.trim().to_owned())),
            _ => None,
        }
    }

    /// Wraps a key (the simulator's, or a test's).
    #[must_use]
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the one place that builds the Authorization header.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}
