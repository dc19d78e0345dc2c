//! The `clock` capability: time as the node sees it.

use crate::bindings::breakwater::plugin::clock as abi;

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    abi::now_ms()
}

/// A monotonic clock in nanoseconds, for measuring durations only.
pub fn monotonic_ns() -> u64 {
    abi::monotonic_ns()
}
