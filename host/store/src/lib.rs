//! Object storage for Breakwater: the one place that talks to S3-compatible
//! services and local stores, and that fetches artifacts by sha256 pin.
//!
//! - [`StoreUrl`] / [`ObjectUrl`]: `s3://bucket/prefix` and `file:///dir`.
//! - [`Store`]: a store opened with [`StoreOptions`] (endpoint, region and
//!   credentials, else the standard `AWS_*` environment variables), with
//!   deadlines on every request; [`Store::get`] with a size cap and
//!   [`Store::put`].
//! - [`fetch_verified`]: an object fetched into a local content-addressed
//!   cache, hashed while it streams, refused on a pin mismatch, and served
//!   from the cache without the network once there.
//! - [`model`]: model versions in a store (manifests, channels), pushed,
//!   pulled into a verified local cache, verified and replicated.
//! - [`wheel`]: files shipped in sha256-pinned PyPI wheels (the demo model,
//!   the test server).
//! - `testing` (feature `test-server`): a real S3 server for test suites.
//!
//! ```
//! # async fn demo() -> Result<(), breakwater_store::StoreError> {
//! use breakwater_store::{ObjectUrl, Sha256Digest, StoreOptions, fetch_verified};
//! let url: ObjectUrl = "s3://plugins/waf.wasm".parse()?;
//! let pin: Sha256Digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".parse()?;
//! let path = fetch_verified(&url, &pin, "/var/cache/breakwater".as_ref(), 64 << 20, &StoreOptions::default()).await?;
//! # let _ = path; Ok(())
//! # }
//! ```

mod digest;
mod error;
mod fetch;
pub mod model;
mod store;
mod url;
pub mod wheel;

#[cfg(feature = "test-server")]
pub mod testing;

pub use digest::{DigestParseError, Sha256Digest};
pub use error::StoreError;
pub use fetch::fetch_verified;
pub use store::{Store, StoreOptions};
pub use url::{ObjectUrl, StoreUrl, UrlError};
