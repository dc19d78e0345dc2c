//! [`CudaRunner`]: the llama forward pass of [`crate::model::llama`] on one
//! GPU, step by step for the continuous-batching scheduler.
//!
//! Weights are dequantized to f16 once at load and stay on the device, the
//! q/k/v and gate/up projections fused into one matrix each so a layer is
//! four GEMMs. The residual stream stays f32; the inputs cuBLAS reads are
//! f16 with f32 accumulation, and the two GEMMs that feed the residual add
//! into it directly (beta = 1). The KV cache is one pool of fixed-size
//! blocks per layer, sized from the scheduler's budget; each sequence holds
//! a list of blocks and the kernels read it through a block table.
//!
//! Per step the host sends only the token ids, each row's sequence and
//! position, and the block tables (a few KB), and reads back the logits of
//! each sequence's last token; everything else stays on the device.
//!
//! Three parts: [`weights`] uploads a model, [`forward`] is the llama
//! forward pass (kernel launches and cuBLAS GEMMs over a step), and this
//! module holds the device, the KV pool and the sequences, behind
//! [`Runner`].

mod forward;
mod weights;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream};

use self::forward::{HostInputs, Scratch};
use self::weights::{DeviceWeights, upload_weights};
use super::kernels::{self, MAX_HEAD_DIM};
use super::{CudaError, probe, ptx_arch};
use crate::backend::{DeviceStats, Runner, Sequence};
use crate::model::llama::LlamaConfig;
use crate::model::{Model, ModelError, ModelShape, Step};

/// Threads per block of the row-wise kernels.
const ROW_THREADS: u32 = 256;

struct Kernels {
    embed: CudaFunction,
    rmsnorm: CudaFunction,
    rope_store_kv: CudaFunction,
    attention: CudaFunction,
    swiglu: CudaFunction,
    argmax: CudaFunction,
}

impl Kernels {
    fn load(module: &Arc<cudarc::driver::CudaModule>) -> Result<Self, CudaError> {
        Ok(Self {
            embed: module.load_function("embed")?,
            rmsnorm: module.load_function("rmsnorm")?,
            rope_store_kv: module.load_function("rope_store_kv")?,
            attention: module.load_function("attention")?,
            swiglu: module.load_function("swiglu")?,
            argmax: module.load_function("argmax")?,
        })
    }
}

/// The KV pool: `[layer][block][slot][kv_dim]` keys and values, f16.
struct KvPool {
    keys: CudaSlice<u16>,
    values: CudaSlice<u16>,
    block_tokens: usize,
    blocks: usize,
}

/// A llama model resident on one CUDA device.
pub struct CudaRunner {
    config: LlamaConfig,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    weights: DeviceWeights,
    kv: Option<KvPool>,
    scratch: Option<Scratch>,
    host: HostInputs,
    step_start: CudaEvent,
    step_end: CudaEvent,
    last_step_seconds: f64,
    device_name: String,
}

impl Drop for CudaRunner {
    fn drop(&mut self) {
        // The buffers are freed after this, by cudarc, which does not make
        // their context current on the dropping thread itself.
        let _ = self.ctx.bind_to_thread();
    }
}

impl std::fmt::Debug for CudaRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRunner")
            .field("device", &self.device_name)
            .field("kv_blocks", &self.kv.as_ref().map(|kv| kv.blocks))
            .finish_non_exhaustive()
    }
}

/// One sequence's block table and logits; the scheduler owns the blocks.
#[derive(Debug)]
pub struct CudaSequence {
    len: usize,
    capacity: usize,
    blocks: Vec<u32>,
    logits: Vec<f32>,
    greedy: Option<u32>,
}

impl Sequence for CudaSequence {
    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn fed(&self) -> usize {
        self.len
    }

    fn greedy_token(&self) -> Option<u32> {
        self.greedy
    }
}

impl CudaRunner {
    /// Compiles the kernels for device `ordinal` and uploads `model`'s
    /// weights (as f16). Fails, without panicking, where CUDA is absent.
    pub fn new(model: &Model, ordinal: usize) -> Result<Self, CudaError> {
        let Model::Llama(model) = model;
        let devices = probe()?;
        if ordinal >= devices {
            return Err(CudaError::Unsupported(format!(
                "device cuda:{ordinal} asked for; {devices} present"
            )));
        }
        let c = model.config().clone();
        if c.head_dim() > MAX_HEAD_DIM || c.n_heads % c.n_kv_heads != 0 {
            return Err(CudaError::Unsupported(format!(
                "{} heads of {} values over {} kv heads (at most {MAX_HEAD_DIM} values a head)",
                c.n_heads,
                c.head_dim(),
                c.n_kv_heads
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream does everything, so cudarc's per-buffer events, which
        // order work across streams, would only cost time.
        // SAFETY: no buffer of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability()?;
        let module = ctx.load_module(kernels::compile(ptx_arch(major, minor))?)?;
        let kernels = Kernels::load(&module)?;
        let blas = CudaBlas::new(Arc::clone(&stream))?;
        let weights = upload_weights(&stream, model)?;
        // cudarc's default events cannot be timed.
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let step_start = ctx.new_event(timed)?;
        let step_end = ctx.new_event(timed)?;
        let device_name = ctx.name()?;
        tracing::info!(
            device = %device_name,
            compute_capability = format!("{major}.{minor}"),
            "model weights on the GPU"
        );
        Ok(Self {
            config: c,
            ctx,
            stream,
            blas,
            kernels,
            weights,
            kv: None,
            scratch: None,
            host: HostInputs::default(),
            step_start,
            step_end,
            last_step_seconds: 0.0,
            device_name,
        })
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// A KV budget for this device: `fraction` of the memory free now,
    /// less room for a large step's scratch buffers.
    pub fn suggested_kv_budget(&self, fraction: f64) -> Result<usize, CudaError> {
        let (free, _) = self.ctx.mem_get_info()?;
        let reserve = 512usize << 20;
        Ok(((free.saturating_sub(reserve)) as f64 * fraction.clamp(0.0, 1.0)) as usize)
    }
}

fn backend_error(e: CudaError) -> ModelError {
    ModelError::Backend(e.to_string())
}

impl Runner for CudaRunner {
    type Sequence = CudaSequence;

    fn backend_name(&self) -> &'static str {
        "cuda"
    }

    fn shape(&self) -> ModelShape {
        self.config.shape()
    }

    fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.n_layers * self.config.kv_dim() * std::mem::size_of::<u16>()
    }

    fn reserve_kv(&mut self, block_tokens: usize, blocks: usize) -> Result<(), ModelError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_error(e.into()))?;
        let c = &self.config;
        let len = c.n_layers * blocks * block_tokens * c.kv_dim();
        self.kv = None;
        let alloc = || -> Result<KvPool, CudaError> {
            Ok(KvPool {
                keys: self.stream.alloc_zeros(len)?,
                values: self.stream.alloc_zeros(len)?,
                block_tokens,
                blocks,
            })
        };
        self.kv = Some(alloc().map_err(backend_error)?);
        Ok(())
    }

    fn new_sequence(
        &mut self,
        table: Vec<u32>,
        cached_tokens: usize,
    ) -> Result<CudaSequence, ModelError> {
        let Some(kv) = &self.kv else {
            return Err(ModelError::Backend("the KV cache is not reserved".into()));
        };
        if let Some(&id) = table.iter().find(|&&id| id as usize >= kv.blocks) {
            return Err(ModelError::Backend(format!(
                "KV block {id} asked for, the pool has {}",
                kv.blocks
            )));
        }
        let capacity = (table.len() * kv.block_tokens).min(self.config.context_length);
        if cached_tokens > capacity {
            return Err(ModelError::ContextFull { capacity });
        }
        Ok(CudaSequence {
            len: cached_tokens,
            capacity,
            blocks: table,
            logits: vec![0.0; self.config.vocab_size],
            greedy: None,
        })
    }

    fn forward(&mut self, steps: &mut [Step<'_, CudaSequence>]) -> Result<(), ModelError> {
        let all = vec![true; steps.len()];
        self.forward_for(steps, &all)
    }

    fn forward_for(
        &mut self,
        steps: &mut [Step<'_, CudaSequence>],
        needs_logits: &[bool],
    ) -> Result<(), ModelError> {
        self.check(steps)?;
        if steps.is_empty() {
            return Ok(());
        }
        if needs_logits.len() != steps.len() {
            return Err(ModelError::Backend(format!(
                "{} logits flags for {} steps",
                needs_logits.len(),
                steps.len()
            )));
        }
        let (rows, max_blocks) = self.plan(steps);
        self.run(rows, max_blocks, needs_logits)
            .map_err(backend_error)?;
        let vocab = self.config.vocab_size;
        let results = self
            .host
            .logits
            .chunks_exact(vocab)
            .zip(&self.host.argmax)
            .zip(needs_logits);
        for (step, ((logits, &best), &needed)) in steps.iter_mut().zip(results) {
            if needed {
                step.state.logits.copy_from_slice(logits);
            }
            step.state.greedy = u32::try_from(best).ok();
            step.state.len += step.tokens.len();
        }
        Ok(())
    }

    fn device_stats(&self) -> Option<DeviceStats> {
        let (free, total) = self.ctx.mem_get_info().ok()?;
        Some(DeviceStats {
            memory_used_bytes: total.saturating_sub(free) as u64,
            memory_free_bytes: free as u64,
            last_step_seconds: self.last_step_seconds,
        })
    }
}

/// Each kernel against the CPU implementation of the same arithmetic, on
/// random inputs. They need a GPU; elsewhere each prints why it skipped.
#[cfg(test)]
mod tests {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    use half::f16;

    use super::forward::{gemm, launch_rmsnorm};
    use super::kernels::ATTENTION_THREADS;
    use super::*;
    use crate::cpu;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    struct Gpu {
        stream: Arc<CudaStream>,
        kernels: Kernels,
        blas: CudaBlas,
    }

    fn gpu(test: &str) -> Option<Gpu> {
        let start = || -> Result<Gpu, CudaError> {
            probe()?;
            let ctx = CudaContext::new(0)?;
            let stream = ctx.default_stream();
            let (major, minor) = ctx.compute_capability()?;
            let module = ctx.load_module(kernels::compile(ptx_arch(major, minor))?)?;
            Ok(Gpu {
                kernels: Kernels::load(&module)?,
                blas: CudaBlas::new(Arc::clone(&stream))?,
                stream,
            })
        };
        match start() {
            Ok(gpu) => Some(gpu),
            Err(e) => {
                eprintln!("SKIPPED {test}: no usable GPU ({e})");
                None
            }
        }
    }

    fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn f16_bits(v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| f16::from_f32(x).to_bits()).collect()
    }

    fn from_bits(v: &[u16]) -> Vec<f32> {
        v.iter().map(|&b| f16::from_bits(b).to_f32()).collect()
    }

    /// Largest |a - b| relative to the largest |b| (at least 1).
    fn relative_error(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    fn row_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    #[test]
    fn embed_widens_the_token_rows() {
        let Some(g) = gpu("embed") else { return };
        let mut rng = StdRng::seed_from_u64(1);
        let (vocab, dim) = (50, 72);
        let table = f16_bits(&random(&mut rng, vocab * dim, 2.0));
        let tokens = [3u32, 49, 0, 3];
        let d_table = g.stream.clone_htod(&table).unwrap();
        let d_tokens = g.stream.clone_htod(&tokens).unwrap();
        let mut d_x = g.stream.alloc_zeros::<f32>(tokens.len() * dim).unwrap();
        let dim_i = dim as i32;
        unsafe {
            g.stream
                .launch_builder(&g.kernels.embed)
                .arg(&mut d_x)
                .arg(&d_table)
                .arg(&d_tokens)
                .arg(&dim_i)
                .launch(row_cfg(tokens.len(), ROW_THREADS))
                .unwrap();
        }
        let x = g.stream.clone_dtoh(&d_x).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            let want = from_bits(&table[t as usize * dim..(t as usize + 1) * dim]);
            assert_eq!(&x[i * dim..(i + 1) * dim], &want[..]);
        }
    }

    #[test]
    fn rmsnorm_matches_the_cpu() {
        let Some(g) = gpu("rmsnorm") else { return };
        let mut rng = StdRng::seed_from_u64(2);
        let (rows, dim, eps) = (5, 576, 1e-5f32);
        let x = random(&mut rng, rows * dim, 3.0);
        let w = random(&mut rng, dim, 1.5);
        let picked = [4i32, 1];
        let d_x = g.stream.clone_htod(&x).unwrap();
        let d_w = g.stream.clone_htod(&w).unwrap();
        let d_rows = g.stream.clone_htod(&picked).unwrap();
        let mut d_out = g.stream.alloc_zeros::<u16>(rows * dim).unwrap();
        let dim_i = dim as i32;
        for use_rows in [0i32, 1] {
            let n = if use_rows == 1 { picked.len() } else { rows };
            let (st, f) = (&g.stream, &g.kernels.rmsnorm);
            launch_rmsnorm(
                st,
                f,
                &mut d_out,
                &d_x,
                &d_w,
                &d_rows,
                use_rows == 1,
                n,
                dim_i,
                eps,
            )
            .unwrap();
            let out = from_bits(&g.stream.clone_dtoh(&d_out).unwrap());
            for r in 0..n {
                let src = if use_rows == 1 { picked[r] as usize } else { r };
                let mut want = vec![0.0; dim];
                cpu::rmsnorm(&mut want, &x[src * dim..(src + 1) * dim], &w, eps);
                let err = relative_error(&out[r * dim..(r + 1) * dim], &want);
                assert!(err < 2e-3, "row {r}: relative error {err}");
            }
        }
    }

    #[test]
    fn swiglu_matches_the_cpu() {
        let Some(g) = gpu("swiglu") else { return };
        let mut rng = StdRng::seed_from_u64(3);
        let (rows, hidden) = (3, 1536);
        let gate_up = random(&mut rng, rows * 2 * hidden, 6.0);
        let d_in = g.stream.clone_htod(&gate_up).unwrap();
        let mut d_out = g.stream.alloc_zeros::<u16>(rows * hidden).unwrap();
        let (rows_i, hidden_i) = (rows as i32, hidden as i32);
        unsafe {
            g.stream
                .launch_builder(&g.kernels.swiglu)
                .arg(&mut d_out)
                .arg(&d_in)
                .arg(&rows_i)
                .arg(&hidden_i)
                .launch(row_cfg(4, ROW_THREADS))
                .unwrap();
        }
        let out = from_bits(&g.stream.clone_dtoh(&d_out).unwrap());
        for r in 0..rows {
            let row = &gate_up[r * 2 * hidden..(r + 1) * 2 * hidden];
            let mut gate = row[..hidden].to_vec();
            cpu::swiglu(&mut gate, &row[hidden..]);
            let err = relative_error(&out[r * hidden..(r + 1) * hidden], &gate);
            assert!(err < 2e-3, "row {r}: relative error {err}");
        }
    }

    #[test]
    fn gemm_matches_the_cpu() {
        let Some(g) = gpu("gemm") else { return };
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, in_f, out_f) = (7, 576, 192);
        // f16-exact inputs, so the only difference is summation order.
        let x = from_bits(&f16_bits(&random(&mut rng, rows * in_f, 1.0)));
        let w = from_bits(&f16_bits(&random(&mut rng, out_f * in_f, 0.1)));
        let base = random(&mut rng, rows * out_f, 1.0);
        let d_x = g.stream.clone_htod(&f16_bits(&x)).unwrap();
        let d_w = g.stream.clone_htod(&f16_bits(&w)).unwrap();
        for accumulate in [false, true] {
            let mut d_out = g.stream.clone_htod(&base).unwrap();
            gemm(
                &g.blas, &g.stream, &mut d_out, &d_x, &d_w, rows, in_f, out_f, accumulate,
            )
            .unwrap();
            let out = g.stream.clone_dtoh(&d_out).unwrap();
            let mut want = if accumulate {
                base.clone()
            } else {
                vec![0.0; rows * out_f]
            };
            for r in 0..rows {
                for o in 0..out_f {
                    want[r * out_f + o] +=
                        cpu::dot(&x[r * in_f..(r + 1) * in_f], &w[o * in_f..(o + 1) * in_f]);
                }
            }
            let err = relative_error(&out, &want);
            assert!(err < 1e-4, "accumulate {accumulate}: relative error {err}");
        }
    }

    #[test]
    fn argmax_matches_the_cpu_first_on_ties() {
        let Some(g) = gpu("argmax") else { return };
        let mut rng = StdRng::seed_from_u64(6);
        let (rows, n) = (5, 49_152);
        let mut logits = random(&mut rng, rows * n, 10.0);
        // Row 1: a tie between two maxima, the first must win; row 2: the
        // maximum in the last slot; row 3: everything equal.
        logits[n + 100] = 50.0;
        logits[n + 40_000] = 50.0;
        logits[3 * n - 1] = 99.0;
        logits[3 * n..4 * n].fill(-1.0);
        let d_logits = g.stream.clone_htod(&logits).unwrap();
        let mut d_out = g.stream.alloc_zeros::<i32>(rows).unwrap();
        let n_i = n as i32;
        unsafe {
            g.stream
                .launch_builder(&g.kernels.argmax)
                .arg(&mut d_out)
                .arg(&d_logits)
                .arg(&n_i)
                .launch(row_cfg(rows, kernels::ARGMAX_THREADS))
                .unwrap();
        }
        let out = g.stream.clone_dtoh(&d_out).unwrap();
        for r in 0..rows {
            let want = crate::generate::argmax(&logits[r * n..(r + 1) * n]);
            assert_eq!(out[r], want as i32, "row {r}");
        }
        assert_eq!((out[1], out[2], out[3]), (100, (n - 1) as i32, 0));
    }

    /// Rotation as [`Llama`]'s CPU forward does it: consecutive pairs of
    /// the first `rope_dim` values of each head.
    fn rope_reference(x: &mut [f32], head_dim: usize, rope_dim: usize, pos: usize, theta: f32) {
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..rope_dim / 2 {
                let angle = pos as f32 * theta.powf(-2.0 * i as f32 / rope_dim as f32);
                let (sin, cos) = angle.sin_cos();
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = x0 * cos - x1 * sin;
                head[2 * i + 1] = x0 * sin + x1 * cos;
            }
        }
    }

    /// Fills a paged cache through `rope_store_kv` for two sequences, then
    /// checks the rotated q/k, the cache slots, and attention over it.
    #[test]
    fn rope_store_kv_and_attention_match_the_cpu() {
        let Some(g) = gpu("rope_store_kv/attention") else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(5);
        let (n_heads, n_kv_heads, head_dim, rope_dim) = (9usize, 3usize, 64usize, 64usize);
        let (dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
        let width = dim + 2 * kv_dim;
        let (block_tokens, blocks, layers, layer) = (16usize, 12usize, 2usize, 1usize);
        let theta = 100_000.0f32;
        // Sequence 0 holds 37 tokens in blocks [7, 2, 9]; sequence 1 holds
        // 5 in [4]. Every position of both is a row, fed in one step.
        let tables_per_seq = [vec![7i32, 2, 9], vec![4, 0, 0]];
        let lens = [37usize, 5];
        let mut row_seq = Vec::new();
        let mut row_pos = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            for p in 0..len {
                row_seq.push(s as i32);
                row_pos.push(p as i32);
            }
        }
        let rows = row_seq.len();
        let qkv = random(&mut rng, rows * width, 1.0);
        let tables: Vec<i32> = tables_per_seq.concat();
        let max_blocks = 3i32;
        let inv_freq: Vec<f32> = (0..rope_dim / 2)
            .map(|i| theta.powf(-2.0 * i as f32 / rope_dim as f32))
            .collect();
        let layer_stride = blocks * block_tokens * kv_dim;
        let layer_offset = (layer * layer_stride) as u64;

        let st = &g.stream;
        let mut d_qkv = st.clone_htod(&qkv).unwrap();
        let mut d_k = st.alloc_zeros::<u16>(layers * layer_stride).unwrap();
        let mut d_v = st.alloc_zeros::<u16>(layers * layer_stride).unwrap();
        let d_seq = st.clone_htod(&row_seq).unwrap();
        let d_pos = st.clone_htod(&row_pos).unwrap();
        let d_tables = st.clone_htod(&tables).unwrap();
        let d_inv = st.clone_htod(&inv_freq).unwrap();
        let mut d_out = st.alloc_zeros::<u16>(rows * dim).unwrap();
        let (nh, nkv, hd, rd) = (
            n_heads as i32,
            n_kv_heads as i32,
            head_dim as i32,
            rope_dim as i32,
        );
        let (bt, no_div, pos_scale) = (block_tokens as i32, 0i32, 1.0f32);
        let scale = 1.0 / (head_dim as f32).sqrt();
        unsafe {
            st.launch_builder(&g.kernels.rope_store_kv)
                .arg(&mut d_qkv)
                .arg(&mut d_k)
                .arg(&mut d_v)
                .arg(&d_seq)
                .arg(&d_pos)
                .arg(&d_tables)
                .arg(&max_blocks)
                .arg(&d_inv)
                .arg(&d_inv)
                .arg(&no_div)
                .arg(&nh)
                .arg(&nkv)
                .arg(&hd)
                .arg(&rd)
                .arg(&pos_scale)
                .arg(&bt)
                .arg(&layer_offset)
                .launch(row_cfg(rows, 128))
                .unwrap();
            st.launch_builder(&g.kernels.attention)
                .arg(&mut d_out)
                .arg(&d_qkv)
                .arg(&d_k)
                .arg(&d_v)
                .arg(&d_seq)
                .arg(&d_pos)
                .arg(&d_tables)
                .arg(&max_blocks)
                .arg(&nh)
                .arg(&nkv)
                .arg(&hd)
                .arg(&bt)
                .arg(&layer_offset)
                .arg(&scale)
                .launch(LaunchConfig {
                    grid_dim: (n_heads as u32, rows as u32, 1),
                    block_dim: (ATTENTION_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
                .unwrap();
        }
        let rotated = st.clone_dtoh(&d_qkv).unwrap();
        let keys = from_bits(&st.clone_dtoh(&d_k).unwrap());
        let values = from_bits(&st.clone_dtoh(&d_v).unwrap());
        let out = from_bits(&st.clone_dtoh(&d_out).unwrap());

        // The CPU side: rotate, cache (as f16, as the device stores it),
        // then attend per head.
        let mut want_qkv = qkv.clone();
        for r in 0..rows {
            let row = &mut want_qkv[r * width..(r + 1) * width];
            let (q, rest) = row.split_at_mut(dim);
            rope_reference(q, head_dim, rope_dim, row_pos[r] as usize, theta);
            rope_reference(
                &mut rest[..kv_dim],
                head_dim,
                rope_dim,
                row_pos[r] as usize,
                theta,
            );
        }
        let err = relative_error(&rotated, &want_qkv);
        assert!(err < 1e-5, "rope: relative error {err}");
        let slot = |r: usize| {
            let (s, p) = (row_seq[r] as usize, row_pos[r] as usize);
            let block = tables_per_seq[s][p / block_tokens] as usize;
            layer * layer_stride + (block * block_tokens + p % block_tokens) * kv_dim
        };
        // The device caches its own rotation, rounded to f16; the CPU's may
        // round the other way where the two rotations differ in the last
        // bit, so the cache is checked against the device's rotated values.
        for r in 0..rows {
            let row = &rotated[r * width..(r + 1) * width];
            let at = slot(r);
            let k_want = from_bits(&f16_bits(&row[dim..dim + kv_dim]));
            let v_want = from_bits(&f16_bits(&row[dim + kv_dim..]));
            assert_eq!(&keys[at..at + kv_dim], &k_want[..], "keys of row {r}");
            assert_eq!(&values[at..at + kv_dim], &v_want[..], "values of row {r}");
        }
        for r in 0..rows {
            let (s, p) = (row_seq[r] as usize, row_pos[r] as usize);
            let first = r - p;
            for h in 0..n_heads {
                let kv_off = (h / (n_heads / n_kv_heads)) * head_dim;
                let q = &want_qkv[r * width + h * head_dim..r * width + (h + 1) * head_dim];
                let mut att: Vec<f32> = (0..=p)
                    .map(|t| {
                        let at = slot(first + t) + kv_off;
                        cpu::dot(q, &keys[at..at + head_dim]) * scale
                    })
                    .collect();
                cpu::softmax(&mut att);
                let mut want = vec![0.0; head_dim];
                for (t, &a) in att.iter().enumerate() {
                    let at = slot(first + t) + kv_off;
                    cpu::axpy(&mut want, a, &values[at..at + head_dim]);
                }
                let got = &out[r * dim + h * head_dim..r * dim + (h + 1) * head_dim];
                let err = relative_error(got, &want);
                assert!(
                    err < 2e-3,
                    "attention seq {s} pos {p} head {h}: relative error {err}"
                );
            }
        }
    }
}
