//! The one Wasmtime engine of a sandbox, and the ticker that drives its CPU
//! deadlines.

use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use crate::{SandboxConfig, SandboxError};

/// Builds the engine: component model, epoch interruption for deadlines,
/// and the pooling allocator so that a fresh instance per request costs a
/// slot reuse rather than an mmap.
pub(crate) fn build(config: &SandboxConfig) -> Result<Engine, SandboxError> {
    let instances = config.max_concurrent_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        // A Rust component holds a few core instances (the program, its
        // shims) with one memory and a couple of tables.
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_memory_size(config.max_memory_bytes)
        // A fresh instance per request touches the same few pages (the top
        // of the stack, static data, the start of the heap) every time.
        // Zeroing them in place on reuse is cheaper than handing them back
        // to the kernel and faulting them in again: this halved the cost of
        // a template call (instantiate + init + on-request) when measured.
        .linear_memory_keep_resident(256 << 10)
        .table_keep_resident(64 << 10);

    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&wasm).map_err(|e| SandboxError::Engine(format!("{e:#}")))
}

/// Starts the thread that advances the engine's epoch every `tick`. It
/// holds only a weak reference and ends when the engine is dropped.
pub(crate) fn start_ticker(engine: &Engine, tick: Duration) -> Result<(), SandboxError> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("breakwater-epoch".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })
        .map(drop)
        .map_err(SandboxError::Ticker)
}
