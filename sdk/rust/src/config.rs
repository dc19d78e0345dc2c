//! Plugin configuration: JSON from the node's configuration.

use serde::de::{Deserialize, DeserializeOwned, Deserializer, IgnoredAny};

/// The configuration of a plugin that takes none: accepts any JSON.
///
/// ```
/// let _: breakwater_sdk::NoConfig = serde_json::from_str(r#"{"any": 1}"#).unwrap();
/// ```
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoConfig;

impl<'de> Deserialize<'de> for NoConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(deserializer)?;
        Ok(NoConfig)
    }
}

/// Reads the configuration, treating an empty one as `{}` so that a
/// plugin whose fields all have defaults needs no configuration at all.
pub(crate) fn parse<C: DeserializeOwned>(text: &str) -> Result<C, String> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|e| format!("invalid plugin configuration: {e}"))
}
