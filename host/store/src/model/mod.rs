//! Model versions in a store: the layout in the bucket, manifests,
//! channels, and the operations on them.
//!
//! ```text
//! models/<name>/<version>/<file>…        the model's files
//! models/<name>/<version>/manifest.json  written last: no manifest, no version
//! models/<name>/channels/<channel>       {"version": "…", "updated_at": "…"}
//! ```
//!
//! - [`ModelStore`]: push, list, show, promote and verify versions in one
//!   store.
//! - [`pull`]: a version into a local cache directory from the first store
//!   of a list that has it, every byte verified, landed by rename.
//! - [`replicate`]: the versions one store lacks, copied from another.

mod error;
mod manifest;
mod pull;
mod push;
mod registry;
mod replicate;
mod spec;
mod time;

pub use error::ModelError;
pub use manifest::{FileEntry, MANIFEST_FILE, Manifest};
pub use pull::{PullOptions, PulledModel, pull, resolve};
pub use push::{Progress, ProgressEvent, PushOptions, PushReport};
pub use registry::{ChannelPointer, FileCheck, ModelStore, VerifyReport};
pub use replicate::{
    ReplicateOptions, ReplicationReport, VersionReplication, VersionStatus, replicate,
};
pub use spec::StoreSpec;
pub use time::Timestamp;

use std::fmt;
use std::str::FromStr;

/// Why a model name, version, channel or reference is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {what}: {reason}")]
pub struct NameError {
    /// What it was meant to be: `model name`, `version`, …
    pub what: &'static str,
    /// The text as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks a model name, version or channel: 1 to 128 of `A-Z a-z 0-9 . _ -
/// +`, not starting with `.` or `-`, and a version is never `channels`
/// (that key holds the channel pointers).
pub fn check_name(what: &'static str, value: &str) -> Result<(), NameError> {
    let error = |reason: &str| NameError {
        what,
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    if value.is_empty() || value.len() > 128 {
        return Err(error("it must be 1 to 128 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
    {
        return Err(error(
            "it may hold only A-Z, a-z, 0-9, `.`, `_`, `-` and `+`",
        ));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return Err(error("it may not start with `.` or `-`"));
    }
    if what == "version" && value == "channels" {
        return Err(error("`channels` is reserved for the channel pointers"));
    }
    Ok(())
}

/// Which version of a model: `name@version`, or `name:channel` (resolved
/// through the channel pointer when pulled).
///
/// ```
/// use breakwater_store::model::{ModelRef, Selector};
/// let pinned: ModelRef = "smollm2@1.0.0".parse().unwrap();
/// assert_eq!(pinned.selector, Selector::Version("1.0.0".into()));
/// let moving: ModelRef = "smollm2:stable".parse().unwrap();
/// assert_eq!(moving.to_string(), "smollm2:stable");
/// assert!("smollm2".parse::<ModelRef>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// The model's name.
    pub name: String,
    /// The version, or the channel that points at one.
    pub selector: Selector,
}

/// A fixed version or a channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// `@version`.
    Version(String),
    /// `:channel`.
    Channel(String),
}

impl ModelRef {
    /// `name@version`.
    pub fn version(name: &str, version: &str) -> Result<Self, NameError> {
        check_name("model name", name)?;
        check_name("version", version)?;
        Ok(Self {
            name: name.to_owned(),
            selector: Selector::Version(version.to_owned()),
        })
    }

    /// `name:channel`.
    pub fn channel(name: &str, channel: &str) -> Result<Self, NameError> {
        check_name("model name", name)?;
        check_name("channel", channel)?;
        Ok(Self {
            name: name.to_owned(),
            selector: Selector::Channel(channel.to_owned()),
        })
    }
}

impl FromStr for ModelRef {
    type Err = NameError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some((name, version)) = text.split_once('@') {
            return ModelRef::version(name, version);
        }
        if let Some((name, channel)) = text.split_once(':') {
            return ModelRef::channel(name, channel);
        }
        Err(NameError {
            what: "model reference",
            value: text.to_owned(),
            reason: "write `NAME@VERSION` or `NAME:CHANNEL`".to_owned(),
        })
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Version(v) => write!(f, "{}@{v}", self.name),
            Selector::Channel(c) => write!(f, "{}:{c}", self.name),
        }
    }
}

/// Keys of the layout, relative to the store's prefix.
pub(crate) mod keys {
    /// `models/`
    pub const ROOT: &str = "models";

    pub fn model(name: &str) -> String {
        format!("{ROOT}/{name}")
    }
    pub fn file(name: &str, version: &str, path: &str) -> String {
        format!("{ROOT}/{name}/{version}/{path}")
    }
    pub fn manifest(name: &str, version: &str) -> String {
        file(name, version, super::MANIFEST_FILE)
    }
    pub fn channels(name: &str) -> String {
        format!("{ROOT}/{name}/channels")
    }
    pub fn channel(name: &str, channel: &str) -> String {
        format!("{ROOT}/{name}/channels/{channel}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_references() {
        for good in ["smollm2", "SmolLM2-135M", "1.0.0", "v2+cuda", "a_b"] {
            check_name("version", good).unwrap_or_else(|e| panic!("{e}"));
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "ü", "channels"] {
            assert!(check_name("version", bad).is_err(), "{bad}");
        }
        assert!(check_name("model name", "channels").is_ok());
        assert_eq!(
            "m@1".parse::<ModelRef>(),
            Ok(ModelRef {
                name: "m".into(),
                selector: Selector::Version("1".into())
            })
        );
        assert!("m@".parse::<ModelRef>().is_err());
        assert!("@1".parse::<ModelRef>().is_err());
        assert!("m:a/b".parse::<ModelRef>().is_err());
        assert_eq!(keys::manifest("m", "1"), "models/m/1/manifest.json");
        assert_eq!(keys::channel("m", "stable"), "models/m/channels/stable");
    }
}
