//! The llama forward pass on the device: one step's inputs up, the layers
//! as kernel launches and cuBLAS GEMMs, the last tokens' logits (or only
//! their argmax) down.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::super::CudaError;
use super::super::kernels::{self, ATTENTION_THREADS};
use super::{CudaRunner, CudaSequence, ROW_THREADS};
use crate::model::{ModelError, Step};

/// Device buffers of one step, grown to the largest step seen.
pub(super) struct Scratch {
    pub(super) rows: usize,
    pub(super) seqs: usize,
    pub(super) table: usize,
    pub(super) x: CudaSlice<f32>,
    pub(super) normed: CudaSlice<u16>,
    pub(super) qkv: CudaSlice<f32>,
    pub(super) attn: CudaSlice<u16>,
    pub(super) gate_up: CudaSlice<f32>,
    pub(super) hidden: CudaSlice<u16>,
    pub(super) logits: CudaSlice<f32>,
    pub(super) argmax: CudaSlice<i32>,
    pub(super) tokens: CudaSlice<u32>,
    pub(super) row_seq: CudaSlice<i32>,
    pub(super) row_pos: CudaSlice<i32>,
    pub(super) last_rows: CudaSlice<i32>,
    pub(super) tables: CudaSlice<i32>,
}

/// The same step's inputs on the host, reused so a step allocates nothing
/// once the batch has peaked.
#[derive(Default)]
pub(super) struct HostInputs {
    pub(super) tokens: Vec<u32>,
    pub(super) row_seq: Vec<i32>,
    pub(super) row_pos: Vec<i32>,
    pub(super) last_rows: Vec<i32>,
    pub(super) tables: Vec<i32>,
    pub(super) logits: Vec<f32>,
    pub(super) argmax: Vec<i32>,
}

impl CudaRunner {
    pub(super) fn check(&self, steps: &[Step<'_, CudaSequence>]) -> Result<(), ModelError> {
        for step in steps {
            if step.tokens.is_empty() {
                return Err(ModelError::NoTokens);
            }
            if step.state.len + step.tokens.len() > step.state.capacity {
                return Err(ModelError::ContextFull {
                    capacity: step.state.capacity,
                });
            }
            if let Some(&token) = step
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(ModelError::TokenOutOfRange {
                    token,
                    vocab_size: self.config.vocab_size,
                });
            }
        }
        Ok(())
    }

    /// Fills the host inputs for `steps`; returns (rows, max blocks a
    /// sequence holds).
    pub(super) fn plan(&mut self, steps: &[Step<'_, CudaSequence>]) -> (usize, usize) {
        let h = &mut self.host;
        h.tokens.clear();
        h.row_seq.clear();
        h.row_pos.clear();
        h.last_rows.clear();
        h.tables.clear();
        for (seq, step) in steps.iter().enumerate() {
            let pos0 = step.state.len;
            h.tokens.extend_from_slice(step.tokens);
            h.row_seq
                .extend(std::iter::repeat_n(seq as i32, step.tokens.len()));
            h.row_pos
                .extend((0..step.tokens.len()).map(|i| (pos0 + i) as i32));
            h.last_rows.push(h.tokens.len() as i32 - 1);
        }
        let max_blocks = steps
            .iter()
            .map(|s| s.state.blocks.len())
            .max()
            .unwrap_or(1)
            .max(1);
        for step in steps {
            let blocks = &step.state.blocks;
            h.tables.extend(blocks.iter().map(|&b| b as i32));
            h.tables
                .extend(std::iter::repeat_n(0, max_blocks - blocks.len()));
        }
        (h.tokens.len(), max_blocks)
    }

    /// Makes the scratch buffers hold `rows` rows, `seqs` sequences and a
    /// `table`-entry block table.
    fn ensure_scratch(&mut self, rows: usize, seqs: usize, table: usize) -> Result<(), CudaError> {
        if let Some(s) = &self.scratch
            && s.rows >= rows
            && s.seqs >= seqs
            && s.table >= table
        {
            return Ok(());
        }
        let (old_rows, old_seqs, old_table) = self
            .scratch
            .as_ref()
            .map_or((0, 0, 0), |s| (s.rows, s.seqs, s.table));
        // Grow past the request so a batch that creeps up does not
        // reallocate every step.
        let rows = rows.max(old_rows).next_power_of_two();
        let seqs = seqs.max(old_seqs).next_power_of_two();
        let table = table.max(old_table).next_power_of_two();
        self.scratch = None;
        let c = &self.config;
        let st = &self.stream;
        let (dim, kv_dim, hidden) = (c.dim, c.kv_dim(), c.hidden_dim);
        self.scratch = Some(Scratch {
            rows,
            seqs,
            table,
            x: st.alloc_zeros(rows * dim)?,
            normed: st.alloc_zeros(rows * dim.max(hidden))?,
            qkv: st.alloc_zeros(rows * (dim + 2 * kv_dim))?,
            attn: st.alloc_zeros(rows * dim)?,
            gate_up: st.alloc_zeros(rows * 2 * hidden)?,
            hidden: st.alloc_zeros(rows * hidden)?,
            logits: st.alloc_zeros(seqs * c.vocab_size)?,
            argmax: st.alloc_zeros(seqs)?,
            tokens: st.alloc_zeros(rows)?,
            row_seq: st.alloc_zeros(rows)?,
            row_pos: st.alloc_zeros(rows)?,
            last_rows: st.alloc_zeros(seqs)?,
            tables: st.alloc_zeros(table)?,
        });
        Ok(())
    }

    /// The device part of a step; leaves each sequence's most likely token
    /// in `host.argmax` and, for those in `needs_logits`, its logits in
    /// `host.logits` (the rest of it stale).
    pub(super) fn run(
        &mut self,
        rows: usize,
        max_blocks: usize,
        needs_logits: &[bool],
    ) -> Result<(), CudaError> {
        let seqs = needs_logits.len();
        // The engine thread is not the one that loaded the model, and
        // cudarc frees buffers (growing the scratch below) without making
        // their context current first.
        self.ctx.bind_to_thread()?;
        self.ensure_scratch(rows, seqs, self.host.tables.len())?;
        let (Some(s), Some(kv)) = (self.scratch.as_mut(), self.kv.as_mut()) else {
            return Err(CudaError::Unsupported(
                "the KV cache was not reserved before the first step".into(),
            ));
        };
        let (st, k, w, h) = (&self.stream, &self.kernels, &self.weights, &self.host);
        let c = &self.config;
        st.memcpy_htod(&h.tokens, &mut s.tokens.slice_mut(..rows))?;
        st.memcpy_htod(&h.row_seq, &mut s.row_seq.slice_mut(..rows))?;
        st.memcpy_htod(&h.row_pos, &mut s.row_pos.slice_mut(..rows))?;
        st.memcpy_htod(&h.last_rows, &mut s.last_rows.slice_mut(..seqs))?;
        st.memcpy_htod(&h.tables, &mut s.tables.slice_mut(..h.tables.len()))?;
        self.step_start.record(st)?;

        let dim = c.dim as i32;
        let kv_dim = c.kv_dim();
        let qkv_width = c.dim + 2 * kv_dim;
        let hidden = c.hidden_dim;
        let n_rows = rows as u32;
        let row_cfg = LaunchConfig {
            grid_dim: (n_rows, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_heads, n_kv_heads, head_dim) =
            (c.n_heads as i32, c.n_kv_heads as i32, c.head_dim() as i32);
        let (rope_dim, pos_scale) = (c.rope_dim as i32, c.rope_position_scale);
        let (block_tokens, max_blocks) = (kv.block_tokens as i32, max_blocks as i32);
        let scale = 1.0 / (c.head_dim() as f32).sqrt();
        let use_div = i32::from(w.freq_div.is_some());
        let freq_div = w.freq_div.as_ref().unwrap_or(&w.inv_freq);
        let eps = c.rms_eps;
        let layer_stride = (kv.blocks * kv.block_tokens * kv_dim) as u64;

        // SAFETY (every launch below): the arguments match the kernel
        // signatures in `kernels::SOURCE`, and every buffer holds what the
        // grid indexes: scratch rows ≥ rows, tables sized from the host copy.
        unsafe {
            st.launch_builder(&k.embed)
                .arg(&mut s.x)
                .arg(&w.embed)
                .arg(&s.tokens)
                .arg(&dim)
                .launch(row_cfg)?;
        }
        for (l, layer) in w.layers.iter().enumerate() {
            let layer_offset = l as u64 * layer_stride;
            let norm = &layer.attn_norm;
            launch_rmsnorm(
                st,
                &k.rmsnorm,
                &mut s.normed,
                &s.x,
                norm,
                &s.last_rows,
                false,
                rows,
                dim,
                eps,
            )?;
            gemm(
                &self.blas,
                st,
                &mut s.qkv,
                &s.normed,
                &layer.wqkv,
                rows,
                c.dim,
                qkv_width,
                false,
            )?;
            unsafe {
                st.launch_builder(&k.rope_store_kv)
                    .arg(&mut s.qkv)
                    .arg(&mut kv.keys)
                    .arg(&mut kv.values)
                    .arg(&s.row_seq)
                    .arg(&s.row_pos)
                    .arg(&s.tables)
                    .arg(&max_blocks)
                    .arg(&w.inv_freq)
                    .arg(freq_div)
                    .arg(&use_div)
                    .arg(&n_heads)
                    .arg(&n_kv_heads)
                    .arg(&head_dim)
                    .arg(&rope_dim)
                    .arg(&pos_scale)
                    .arg(&block_tokens)
                    .arg(&layer_offset)
                    .launch(LaunchConfig {
                        grid_dim: (n_rows, 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    })?;
                st.launch_builder(&k.attention)
                    .arg(&mut s.attn)
                    .arg(&s.qkv)
                    .arg(&kv.keys)
                    .arg(&kv.values)
                    .arg(&s.row_seq)
                    .arg(&s.row_pos)
                    .arg(&s.tables)
                    .arg(&max_blocks)
                    .arg(&n_heads)
                    .arg(&n_kv_heads)
                    .arg(&head_dim)
                    .arg(&block_tokens)
                    .arg(&layer_offset)
                    .arg(&scale)
                    .launch(LaunchConfig {
                        grid_dim: (c.n_heads as u32, n_rows, 1),
                        block_dim: (ATTENTION_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    })?;
            }
            gemm(
                &self.blas, st, &mut s.x, &s.attn, &layer.wo, rows, c.dim, c.dim, true,
            )?;
            let norm = &layer.ffn_norm;
            launch_rmsnorm(
                st,
                &k.rmsnorm,
                &mut s.normed,
                &s.x,
                norm,
                &s.last_rows,
                false,
                rows,
                dim,
                eps,
            )?;
            gemm(
                &self.blas,
                st,
                &mut s.gate_up,
                &s.normed,
                &layer.w_gate_up,
                rows,
                c.dim,
                2 * hidden,
                false,
            )?;
            let (rows_i, hidden_i) = (rows as i32, hidden as i32);
            let blocks = (rows * hidden).div_ceil(ROW_THREADS as usize).min(65_535) as u32;
            unsafe {
                st.launch_builder(&k.swiglu)
                    .arg(&mut s.hidden)
                    .arg(&s.gate_up)
                    .arg(&rows_i)
                    .arg(&hidden_i)
                    .launch(LaunchConfig {
                        grid_dim: (blocks, 1, 1),
                        block_dim: (ROW_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    })?;
            }
            gemm(
                &self.blas,
                st,
                &mut s.x,
                &s.hidden,
                &layer.w_down,
                rows,
                hidden,
                c.dim,
                true,
            )?;
        }

        let norm = &w.output_norm;
        launch_rmsnorm(
            st,
            &k.rmsnorm,
            &mut s.normed,
            &s.x,
            norm,
            &s.last_rows,
            true,
            seqs,
            dim,
            eps,
        )?;
        let output = w.output.as_ref().unwrap_or(&w.embed);
        gemm(
            &self.blas,
            st,
            &mut s.logits,
            &s.normed,
            output,
            seqs,
            c.dim,
            c.vocab_size,
            false,
        )?;
        let vocab = c.vocab_size as i32;
        unsafe {
            st.launch_builder(&k.argmax)
                .arg(&mut s.argmax)
                .arg(&s.logits)
                .arg(&vocab)
                .launch(LaunchConfig {
                    grid_dim: (seqs as u32, 1, 1),
                    block_dim: (kernels::ARGMAX_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })?;
        }
        self.step_end.record(st)?;
        self.host.argmax.resize(seqs, 0);
        st.memcpy_dtoh(&s.argmax.slice(..seqs), &mut self.host.argmax)?;
        // Only the rows someone samples from cross the bus: a vocabulary of
        // floats per sequence would cost more than the step at large batch.
        let v = c.vocab_size;
        self.host.logits.resize(seqs * v, 0.0);
        for (i, _) in needs_logits.iter().enumerate().filter(|(_, need)| **need) {
            st.memcpy_dtoh(
                &s.logits.slice(i * v..(i + 1) * v),
                &mut self.host.logits[i * v..(i + 1) * v],
            )?;
        }
        st.synchronize()?;
        self.last_step_seconds = f64::from(self.step_start.elapsed_ms(&self.step_end)?) / 1e3;
        Ok(())
    }
}

/// `out[r] = rmsnorm(x[r or rows[r]]) · weight` for `count` output rows,
/// selecting source rows through `rows` when `select` is set.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_rmsnorm(
    st: &Arc<CudaStream>,
    f: &CudaFunction,
    out: &mut CudaSlice<u16>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    rows: &CudaSlice<i32>,
    select: bool,
    count: usize,
    dim: i32,
    eps: f32,
) -> Result<(), CudaError> {
    let select = i32::from(select);
    // SAFETY: the arguments match `rmsnorm` in `kernels::SOURCE`; `out`
    // holds `count` rows of `dim` and `x` every row `rows` can name.
    unsafe {
        st.launch_builder(f)
            .arg(out)
            .arg(x)
            .arg(weight)
            .arg(rows)
            .arg(&select)
            .arg(&dim)
            .arg(&eps)
            .launch(LaunchConfig {
                grid_dim: (count as u32, 1, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })?;
    }
    Ok(())
}

/// `out[rows × out_f] (+)= input[rows × in_f] · w[out_f × in_f]ᵀ`: f16
/// inputs, f32 output and accumulation, all row-major.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    blas: &CudaBlas,
    stream: &CudaStream,
    out: &mut CudaSlice<f32>,
    input: &CudaSlice<u16>,
    w: &CudaSlice<u16>,
    rows: usize,
    in_f: usize,
    out_f: usize,
    accumulate: bool,
) -> Result<(), CudaError> {
    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    let (out_ptr, _out) = out.device_ptr_mut(stream);
    let (in_ptr, _in) = input.device_ptr(stream);
    let (w_ptr, _w) = w.device_ptr(stream);
    let dims = |v: usize| {
        i32::try_from(v).map_err(|_| CudaError::Unsupported(format!("GEMM dimension {v}")))
    };
    // Row-major Y = X·Wᵀ is column-major Yᵀ = W·Xᵀ with W read transposed
    // (it is stored in_f-major): m = out_f, n = rows, k = in_f.
    // SAFETY: the pointers are live device buffers of at least the sizes
    // the dimensions imply (checked by the callers' scratch sizing), and
    // alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            dims(out_f)?,
            dims(rows)?,
            dims(in_f)?,
            (&alpha as *const f32).cast(),
            w_ptr as *const std::ffi::c_void,
            cudaDataType::CUDA_R_16F,
            dims(in_f)?,
            in_ptr as *const std::ffi::c_void,
            cudaDataType::CUDA_R_16F,
            dims(in_f)?,
            (&beta as *const f32).cast(),
            out_ptr as *mut std::ffi::c_void,
            cudaDataType::CUDA_R_32F,
            dims(out_f)?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}
