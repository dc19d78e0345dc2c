//! The `counters` capability: token buckets shared by every instance of the
//! plugin on the node.

use crate::bindings::breakwater::plugin::counters as abi;

pub use abi::TakeResult;

/// A token bucket shape: refills at `rate_per_second` up to `burst` tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Tokens added per second.
    pub rate_per_second: f64,
    /// The most tokens the bucket holds.
    pub burst: u32,
}

impl Bucket {
    /// A bucket refilling at `rate_per_second` up to `burst` tokens.
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        Bucket {
            rate_per_second,
            burst,
        }
    }

    /// Takes `cost` tokens from this bucket under `key`; refused (and
    /// nothing taken) when not enough are left.
    pub fn take(&self, key: &str, cost: u32) -> Result<TakeResult, String> {
        abi::take(key, cost, self.rate_per_second, self.burst)
    }
}
