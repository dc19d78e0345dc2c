//! The `clock` capability.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bindings::breakwater::plugin::clock::Host;
use crate::host::HostState;

impl Host for HostState {
    fn now_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }

    fn monotonic_ns(&mut self) -> u64 {
        u64::try_from(self.plugin.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
