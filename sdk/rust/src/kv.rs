//! The `kv` capability: a small store that outlives requests, namespaced
//! per plugin.

use std::time::Duration;

use crate::bindings::breakwater::plugin::kv as abi;

pub use abi::KvError;

/// The value under `key`; none when absent or expired.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    abi::get(key)
}

/// Stores `value` under `key`, expiring after `ttl` when given.
pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), KvError> {
    let ttl_ms = ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    abi::set(key, value, ttl_ms)
}

/// Removes `key`.
pub fn delete(key: &str) -> Result<(), KvError> {
    abi::delete(key)
}

/// The value under `key` read as JSON; a value that is not JSON of this
/// shape reads as absent.
pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, KvError> {
    Ok(get(key)?.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// Stores `value` as JSON under `key`.
pub fn set_json<T: serde::Serialize>(
    key: &str,
    value: &T,
    ttl: Option<Duration>,
) -> Result<(), KvError> {
    let bytes =
        serde_json::to_vec(value).map_err(|e| KvError::Storage(format!("encoding JSON: {e}")))?;
    set(key, &bytes, ttl)
}
