//! The per-call host state and the capabilities plugins import, one module
//! per capability.

pub(crate) mod clock;
pub(crate) mod counters;
pub(crate) mod kv;
pub(crate) mod log;
pub(crate) mod metrics;
pub(crate) mod tokens;

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::PluginShared;

/// How much of a plugin's stderr is kept for the error message of a failed
/// call: enough for a panic message, not enough to matter.
const STDERR_CAPACITY: usize = 4 * 1024;

/// Tables hold function references; no honest plugin needs many.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The state of one store, that is of one call: created fresh and dropped
/// with the instance.
pub(crate) struct HostState {
    pub(crate) plugin: Arc<PluginShared>,
    wasi: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
    memory_cap: usize,
    memory_used: usize,
    /// The token reservations of the `on-request` call in progress; none
    /// outside one, where `tokens.reserve` is refused.
    pub(crate) token_grants: Option<tokens::TokenGrants>,
    /// Set when a memory grow was refused, so that the trap that usually
    /// follows (an allocation failure aborts) is reported as a memory failure.
    pub(crate) memory_refused: bool,
}

impl HostState {
    pub(crate) fn new(plugin: Arc<PluginShared>, memory_cap: usize) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .build();
        HostState {
            plugin,
            wasi,
            table: ResourceTable::new(),
            stderr,
            memory_cap,
            memory_used: 0,
            token_grants: None,
            memory_refused: false,
        }
    }

    /// A call starts: a refusal seen by an earlier call of a reused
    /// instance must not name this call's failure.
    pub(crate) fn begin_call(&mut self) {
        self.memory_refused = false;
    }

    /// Past half its capacity, the stderr buffer could fill up during the
    /// next call and fail the plugin's writes: a reused instance is
    /// replaced first.
    pub(crate) fn stderr_nearly_full(&self) -> bool {
        self.stderr.contents().len() > STDERR_CAPACITY / 2
    }

    /// What the plugin wrote to stderr, lossily decoded.
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.contents())
            .trim()
            .to_owned()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The cap is on all of the instance's memories together, so a
        // component cannot dodge it by spreading over several.
        let after = self.memory_used - current.min(self.memory_used) + desired;
        if after > self.memory_cap {
            self.memory_refused = true;
            return Ok(false);
        }
        self.memory_used = after;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
