//! Where the arithmetic runs.
//!
//! The scheduler drives a [`Runner`]: it opens sequences, feeds one batched
//! step at a time and reads each sequence's logits. Two runners implement
//! it: [`CpuRunner`], the forward pass of a [`Model`]'s architecture on the
//! kernels of [`crate::cpu`], and [`cuda::CudaRunner`], the same arithmetic on an
//! NVIDIA GPU. [`Device`] picks one at start-up. Neither the trait nor the
//! scheduler knows an architecture: they see a [`ModelShape`].

pub mod cuda;

use std::sync::Arc;

use crate::cpu;
use crate::model::llama::{Batch, KvBlocks, State};
use crate::model::{Model, ModelError, ModelShape, Step};

/// A backend's view of one model, as the continuous-batching scheduler
/// drives it: one thread owns the runner and calls it step by step.
pub trait Runner: Send + 'static {
    /// One sequence's cache and logits; dropping it frees its cache.
    type Sequence: Sequence;

    /// Which backend this is, for logs and metrics (`"cpu"`, `"cuda"`).
    fn backend_name(&self) -> &'static str;

    /// The model's shape.
    fn shape(&self) -> ModelShape;

    /// Bytes of KV cache one token takes in this backend's layout.
    fn kv_bytes_per_token(&self) -> usize;

    /// Sets aside the KV cache the scheduler's block pool hands out:
    /// `blocks` blocks of `block_tokens` tokens, numbered from 0.
    fn reserve_kv(&mut self, block_tokens: usize, blocks: usize) -> Result<(), ModelError>;

    /// A sequence over the reserved blocks `table` (position `p` in block
    /// `table[p / block_tokens]`), whose first `cached_tokens` positions
    /// already hold their keys and values (a prefix another sequence
    /// computed): it is fed from there. The scheduler owns the blocks; the
    /// sequence only reads and writes them, never the cached ones.
    fn new_sequence(
        &mut self,
        table: Vec<u32>,
        cached_tokens: usize,
    ) -> Result<Self::Sequence, ModelError>;

    /// One batched step: feeds each sequence its tokens. Afterwards each
    /// sequence's [`Sequence::logits`] are those after its last token fed.
    /// Nothing is fed unless every step is valid.
    fn forward(&mut self, steps: &mut [Step<'_, Self::Sequence>]) -> Result<(), ModelError>;

    /// [`Runner::forward`], told which sequences will read their logits.
    /// Where `needs_logits[i]` is false the runner may leave step `i`'s
    /// logits stale and provide only [`Sequence::greedy_token`] (a GPU then
    /// sends back one id instead of a vocabulary of floats). The scheduler
    /// asks for logits only for sequences that sample, not for greedy ones.
    fn forward_for(
        &mut self,
        steps: &mut [Step<'_, Self::Sequence>],
        needs_logits: &[bool],
    ) -> Result<(), ModelError> {
        let _ = needs_logits;
        self.forward(steps)
    }

    /// What the device reports, for metrics; `None` on the CPU.
    fn device_stats(&self) -> Option<DeviceStats> {
        None
    }
}

/// One sequence as the scheduler sees it.
pub trait Sequence: Send {
    /// The logits after the last token fed.
    fn logits(&self) -> &[f32];
    /// Tokens fed so far.
    fn fed(&self) -> usize;

    /// The most likely next token (the first on a tie, as
    /// [`crate::generate::argmax`] picks), when the runner computed it
    /// where the logits are; `None` means: take it from [`Sequence::logits`].
    fn greedy_token(&self) -> Option<u32> {
        None
    }
}

/// Device figures a GPU runner reports after each step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceStats {
    /// Device memory in use (by every process), in bytes.
    pub memory_used_bytes: u64,
    /// Device memory free, in bytes.
    pub memory_free_bytes: u64,
    /// Time the last step's kernels took on the device.
    pub last_step_seconds: f64,
}

/// Which device serves a model: `cpu`, `cuda`, `cuda:N`, or `auto` (the
/// first GPU when one is usable, else the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend.
    Cpu,
    /// CUDA device `N`; failing to start it is an error.
    Cuda(usize),
    /// CUDA device 0 when it can start, else the CPU, said once in the log.
    #[default]
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: use cpu, cuda, cuda:N or auto")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Auto => f.write_str("auto"),
        }
    }
}

/// A model's forward pass on the CPU kernels, behind [`Runner`].
#[derive(Debug)]
pub struct CpuRunner {
    model: Arc<Model>,
    backend: cpu::CpuBackend,
    batch: Batch,
    kv: Option<KvBlocks>,
}

impl CpuRunner {
    /// Runs `model` on `backend`'s threads.
    pub fn new(model: Arc<Model>, backend: cpu::CpuBackend) -> Self {
        Self {
            model,
            backend,
            batch: Batch::default(),
            kv: None,
        }
    }
}

impl Runner for CpuRunner {
    type Sequence = State;

    fn backend_name(&self) -> &'static str {
        "cpu"
    }

    fn shape(&self) -> ModelShape {
        self.model.shape()
    }

    fn kv_bytes_per_token(&self) -> usize {
        let shape = self.model.shape();
        2 * shape.layers * shape.kv_dim() * std::mem::size_of::<half::f16>()
    }

    fn reserve_kv(&mut self, block_tokens: usize, blocks: usize) -> Result<(), ModelError> {
        self.kv = None;
        self.kv = Some(KvBlocks::new(&self.model.shape(), block_tokens, blocks));
        Ok(())
    }

    fn new_sequence(&mut self, table: Vec<u32>, cached_tokens: usize) -> Result<State, ModelError> {
        let Some(kv) = &self.kv else {
            return Err(ModelError::Backend("the KV cache is not reserved".into()));
        };
        State::in_pool(&self.model.shape(), kv, table, cached_tokens)
    }

    fn forward(&mut self, steps: &mut [Step<'_, State>]) -> Result<(), ModelError> {
        let kv = self.kv.as_mut();
        let (backend, batch) = (&self.backend, &mut self.batch);
        // The pass runs on a thread of the pool, so that its serial parts
        // (norms, quantizing, transposes) do not compete with the pool's
        // threads for the cores: the caller's thread would be one more
        // runnable thread than cores while the workers spin between jobs.
        backend.install(|| match &*self.model {
            Model::Llama(m) => m.forward_batch_in(backend, batch, kv, steps),
        })
    }
}

impl Sequence for State {
    fn logits(&self) -> &[f32] {
        State::logits(self)
    }

    fn fed(&self) -> usize {
        self.len()
    }
}
