//! What can go wrong talking to a store or fetching from one.

use std::path::PathBuf;

use crate::{DigestParseError, Sha256Digest, UrlError};

/// Why a store operation failed. Messages name the URL and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL does not name a store or an object.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A pin is not a sha256 digest.
    #[error(transparent)]
    Digest(#[from] DigestParseError),
    /// The store's client could not be configured (endpoint, credentials…).
    #[error("opening {url}: {source}")]
    Open {
        /// The store.
        url: String,
        /// What object_store said.
        #[source]
        source: object_store::Error,
    },
    /// There is no object at that URL.
    #[error("{url} does not exist")]
    NotFound {
        /// The object.
        url: String,
    },
    /// The request failed: refused, timed out, denied, or a server error.
    #[error("{what} {url}: {source}")]
    Request {
        /// `reading`, `writing`, …
        what: &'static str,
        /// The object.
        url: String,
        /// What object_store said.
        #[source]
        source: object_store::Error,
    },
    /// The object is larger than the caller allows.
    #[error("{url} is larger than the limit of {limit} bytes; refusing to read it")]
    TooLarge {
        /// The object.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The object's bytes are not the pinned ones.
    #[error(
        "{url} has sha256 {actual} but the pin is {expected}; refusing it \
         (publish the pinned artifact at that URL, or update the pin)"
    )]
    Mismatch {
        /// The object.
        url: String,
        /// The pin.
        expected: Sha256Digest,
        /// What the fetched bytes hash to.
        actual: Sha256Digest,
    },
    /// A local file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn request(what: &'static str, url: String, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { url },
            source => StoreError::Request { what, url, source },
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
