//! The `clock` capability: the sandbox's [`Clock`](crate::Clock).

use crate::bindings::breakwater::plugin::clock::Host;
use crate::host::HostState;

impl Host for HostState {
    fn now_ms(&mut self) -> u64 {
        self.plugin.clock.unix_ms()
    }

    fn monotonic_ns(&mut self) -> u64 {
        u64::try_from(self.plugin.clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
