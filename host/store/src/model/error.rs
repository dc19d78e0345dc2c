//! What can go wrong with model versions.

use std::path::PathBuf;

use crate::StoreError;
use crate::model::NameError;

/// Why a model operation failed. Messages name the version, the object or
/// file, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A store request or a local file operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A name, version, channel or reference is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The version has no manifest in the store: it does not exist (a push
    /// that never finished leaves none).
    #[error("{reference} does not exist in {store} (no manifest at {url})")]
    VersionNotFound {
        /// `name@version`.
        reference: String,
        /// The store.
        store: String,
        /// Where its manifest would be.
        url: String,
    },
    /// The channel points at no version.
    #[error("{reference} does not exist in {store} (no channel pointer at {url})")]
    ChannelNotFound {
        /// `name:channel`.
        reference: String,
        /// The store.
        store: String,
        /// Where the pointer would be.
        url: String,
    },
    /// A manifest or channel pointer is not what this version writes.
    #[error("{url} is not a valid {what}: {reason}")]
    Malformed {
        /// `manifest` or `channel pointer`.
        what: &'static str,
        /// The object.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An object or file does not hash to its manifest's sha256, or has
    /// the wrong size: the version is refused.
    #[error(
        "{reference}: {url} is corrupt ({detail}); refusing the version \
         (re-push it, or replicate it again from a good store)"
    )]
    Corrupt {
        /// `name@version`.
        reference: String,
        /// The object or file.
        url: String,
        /// `sha256 X, the manifest says Y`, `N bytes, the manifest says M`.
        detail: String,
    },
    /// A version of that name and number exists with other files: versions
    /// are immutable.
    #[error(
        "{reference} already exists in {store} with different files; versions \
         are immutable: push a new version number"
    )]
    VersionExists {
        /// `name@version`.
        reference: String,
        /// The store.
        store: String,
    },
    /// A local model directory cannot be pushed as it is.
    #[error("{path}: {reason}")]
    BadSource {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No store of the list could serve the reference; each one's reason.
    #[error("no store could serve {reference}:{}", failures.iter().map(|(s, e)| format!("\n  {s}: {e}")).collect::<String>())]
    NoStore {
        /// The reference.
        reference: String,
        /// Per store, why it did not.
        failures: Vec<(String, String)>,
    },
    /// An operation ran past its deadline.
    #[error("{what} did not finish within {seconds} s")]
    Deadline {
        /// What it was.
        what: String,
        /// The deadline.
        seconds: u64,
    },
}

impl ModelError {
    /// Whether this says the store could not be reached or answered with a
    /// failure (as opposed to "not there" or "bad bytes").
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ModelError::Store(StoreError::Request { .. } | StoreError::Open { .. })
                | ModelError::Deadline { .. }
        )
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        ModelError::Store(StoreError::io(what, path, e))
    }
}
