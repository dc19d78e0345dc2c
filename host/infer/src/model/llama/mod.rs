//! The llama family (Llama, SmolLM2, …): pre-norm decoder blocks of
//! grouped-query attention with rotary positions and a SwiGLU MLP.
//!
//! The forward pass below is meant to be read next to the math; every
//! kernel it calls lives in [`crate::cpu`].

mod hf;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{ModelError, ModelShape, Step};
use crate::cpu::{self, CpuBackend, Input, ggml};
use crate::gguf::{Gguf, GgufError};
use crate::hf::HfDir;
use crate::quant::dequantize_row;
use crate::weights::{Matrix, Weights};

/// Positions from which a token's attention heads run in parallel.
const PARALLEL_ATTENTION_FROM: usize = 128;

/// Tokens in a step from which their norms and activations are shared
/// among the threads ([`tokens_per_task`]).
const PARALLEL_TOKENS_FROM: usize = 4;

/// Hyperparameters, from the GGUF `llama.*` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Model width (`embedding_length`).
    pub dim: usize,
    /// MLP width (`feed_forward_length`).
    pub hidden_dim: usize,
    /// Decoder blocks (`block_count`).
    pub n_layers: usize,
    /// Query heads (`attention.head_count`).
    pub n_heads: usize,
    /// Key/value heads (`attention.head_count_kv`); fewer than `n_heads`
    /// means grouped-query attention.
    pub n_kv_heads: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Longest sequence the model was trained for (`context_length`).
    pub context_length: usize,
    /// RoPE base frequency (`rope.freq_base`).
    pub rope_theta: f32,
    /// Leading dimensions of each head that RoPE rotates
    /// (`rope.dimension_count`, default the head size).
    pub rope_dim: usize,
    /// Positions are multiplied by this before rotation: `1 / factor` under
    /// linear RoPE scaling, else 1.
    pub rope_position_scale: f32,
    /// RMSNorm epsilon (`attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
}

impl LlamaConfig {
    /// Reads the configuration of a `llama` GGUF.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        let arch = gguf.str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_owned()));
        }
        let key = |k: &str| format!("llama.{k}");
        let dim = gguf.usize(&key("embedding_length"))?;
        let n_heads = gguf.usize(&key("attention.head_count"))?;
        let n_kv_heads = match gguf.get(&key("attention.head_count_kv")) {
            Some(_) => gguf.usize(&key("attention.head_count_kv"))?,
            None => n_heads,
        };
        if dim == 0
            || n_heads == 0
            || n_kv_heads == 0
            || dim % n_heads != 0
            || n_heads % n_kv_heads != 0
        {
            return Err(ModelError::BadConfig(format!(
                "{dim} dims over {n_heads} heads and {n_kv_heads} kv heads"
            )));
        }
        let head_dim = dim / n_heads;
        let rope_dim = match gguf.get(&key("rope.dimension_count")) {
            Some(_) => gguf.usize(&key("rope.dimension_count"))?,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "rope over {rope_dim} of {head_dim} head dims"
            )));
        }
        let vocab_size = gguf
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1))
            .map(|&v| v as usize)
            .ok_or_else(|| GgufError::MissingTensor("token_embd.weight".into()))?;
        let rope_position_scale = match gguf.get(&key("rope.scaling.type")).and_then(|v| v.as_str())
        {
            None | Some("none") => 1.0,
            Some("linear") => 1.0 / gguf.f32(&key("rope.scaling.factor"))?,
            Some(other) => {
                return Err(ModelError::BadConfig(format!(
                    "rope scaling {other:?} is not supported (linear is)"
                )));
            }
        };
        let config = Self {
            dim,
            hidden_dim: gguf.usize(&key("feed_forward_length"))?,
            n_layers: gguf.usize(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            vocab_size,
            context_length: gguf.usize(&key("context_length"))?,
            rope_theta: match gguf.get(&key("rope.freq_base")) {
                Some(_) => gguf.f32(&key("rope.freq_base"))?,
                None => 10_000.0,
            },
            rope_dim,
            rope_position_scale,
            rms_eps: gguf.f32(&key("attention.layer_norm_rms_epsilon"))?,
        };
        if !(config.rope_position_scale.is_finite() && config.rope_position_scale > 0.0) {
            return Err(ModelError::BadConfig(
                "rope scaling factor must be positive".into(),
            ));
        }
        Ok(config)
    }

    /// Values per attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }

    /// What the engine and the backends see of it.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            layers: self.n_layers,
            kv_heads: self.n_kv_heads,
            head_dim: self.head_dim(),
            vocab_size: self.vocab_size,
            context_length: self.context_length,
        }
    }
}

/// One decoder block's weights.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Matrix,
    pub(crate) wk: Matrix,
    pub(crate) wv: Matrix,
    pub(crate) wo: Matrix,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: Matrix,
    pub(crate) w_up: Matrix,
    pub(crate) w_down: Matrix,
}

/// A llama-family model whose weights stay memory-mapped in their file
/// format.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    pub(crate) token_embd: Matrix,
    pub(crate) layers: Vec<Layer>,
    pub(crate) output_norm: Vec<f32>,
    /// The unembedding; the embedding matrix itself when the two are tied.
    pub(crate) output: Matrix,
    /// Per-frequency divisors of RoPE angles (Llama 3's `rope_freqs`), if any.
    pub(crate) rope_freq_factors: Option<Vec<f32>>,
}

impl Llama {
    /// Loads a model from a parsed GGUF file, checking every tensor's shape.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        Self::from_weights(LlamaConfig::from_gguf(gguf)?, gguf)
    }

    /// Loads a model from a Hugging Face model directory (`config.json` and
    /// `*.safetensors`), checking every tensor's shape.
    pub fn from_hf(dir: &HfDir) -> Result<Self, ModelError> {
        Self::from_weights(LlamaConfig::from_hf(dir)?, &hf::HfLlamaWeights { hf: dir })
    }

    /// Assembles a model of configuration `c` from `weights`, named as in
    /// GGUF, whatever the file format they come from.
    fn from_weights<W: Weights>(c: LlamaConfig, weights: &W) -> Result<Self, ModelError>
    where
        ModelError: From<W::Error>,
    {
        let (dim, kv_dim, hidden) = (c.dim, c.kv_dim(), c.hidden_dim);
        if dim % crate::quant::QK != 0 || hidden % crate::quant::QK != 0 || hidden == 0 {
            return Err(ModelError::BadConfig(format!(
                "widths {dim} and {hidden} must be positive multiples of 32"
            )));
        }
        let layers = (0..c.n_layers)
            .map(|l| {
                let m = |name: &str, cols, rows| {
                    weights.matrix(&format!("blk.{l}.{name}.weight"), cols, rows)
                };
                let v = |name: &str| weights.vector(&format!("blk.{l}.{name}.weight"), dim);
                Ok(Layer {
                    attn_norm: v("attn_norm")?,
                    wq: m("attn_q", dim, dim)?,
                    wk: m("attn_k", dim, kv_dim)?,
                    wv: m("attn_v", dim, kv_dim)?,
                    wo: m("attn_output", dim, dim)?,
                    ffn_norm: v("ffn_norm")?,
                    w_gate: m("ffn_gate", dim, hidden)?,
                    w_up: m("ffn_up", dim, hidden)?,
                    w_down: m("ffn_down", hidden, dim)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let token_embd = weights.matrix("token_embd.weight", dim, c.vocab_size)?;
        let output = if weights.contains("output.weight") {
            weights.matrix("output.weight", dim, c.vocab_size)?
        } else {
            token_embd.clone()
        };
        let rope_freq_factors = if weights.contains("rope_freqs.weight") {
            Some(weights.vector("rope_freqs.weight", c.rope_dim / 2)?)
        } else {
            None
        };
        Ok(Self {
            output_norm: weights.vector("output_norm.weight", dim)?,
            config: c,
            token_embd,
            layers,
            output,
            rope_freq_factors,
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// A fresh sequence state whose KV cache holds up to `max_tokens`
    /// (capped at the model's context length).
    pub fn new_state(&self, max_tokens: usize) -> State {
        State::new(&self.config, max_tokens.min(self.config.context_length))
    }

    /// Feeds `token` at the next position of `state` and returns the logits
    /// for the token after it.
    pub fn forward<'s>(
        &self,
        backend: &CpuBackend,
        token: u32,
        state: &'s mut State,
    ) -> Result<&'s [f32], ModelError> {
        self.forward_tokens(backend, &[token], state)
    }

    /// Feeds `tokens` (a prompt, or a chunk of one) at the next positions of
    /// `state` in one pass, each weight read once for all of them, and
    /// returns the logits after the last. Gives the same logits as feeding
    /// them one by one.
    pub fn forward_tokens<'s>(
        &self,
        backend: &CpuBackend,
        tokens: &[u32],
        state: &'s mut State,
    ) -> Result<&'s [f32], ModelError> {
        let mut batch = std::mem::take(&mut state.batch);
        let result = self.forward_batch(backend, &mut batch, &mut [Step { tokens, state }]);
        state.batch = batch;
        result.map(|()| state.logits())
    }

    /// One step of continuous batching: feeds each sequence its tokens (one
    /// for a decoding sequence, a chunk for a prompt) in a single pass over
    /// the weights. Afterwards each state's [`State::logits`] are those after
    /// its last token, exactly as if it had been fed alone.
    ///
    /// Nothing is fed unless every step is valid.
    pub fn forward_batch(
        &self,
        backend: &CpuBackend,
        b: &mut Batch,
        steps: &mut [Step<'_>],
    ) -> Result<(), ModelError> {
        self.forward_batch_in(backend, b, None, steps)
    }

    /// [`Llama::forward_batch`] for states made by [`State::in_pool`]
    /// (and states with their own cache), whose keys and values live in
    /// `pool`.
    pub fn forward_batch_in(
        &self,
        backend: &CpuBackend,
        b: &mut Batch,
        mut pool: Option<&mut KvBlocks>,
        steps: &mut [Step<'_>],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        for step in steps.iter() {
            if step.tokens.is_empty() {
                return Err(ModelError::NoTokens);
            }
            let kv = step.state.own.as_ref().or(pool.as_deref());
            if !kv.is_some_and(|kv| kv.kv_dim == c.kv_dim() && kv.layers == c.n_layers) {
                return Err(ModelError::Backend(
                    "a sequence's KV blocks are not this model's".into(),
                ));
            }
            if step.state.len + step.tokens.len() > step.state.capacity {
                return Err(ModelError::ContextFull {
                    capacity: step.state.capacity,
                });
            }
            if let Some(&token) = step.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    token,
                    vocab_size: c.vocab_size,
                });
            }
        }
        if steps.is_empty() {
            return Ok(());
        }
        let (dim, head_dim, kv_dim) = (c.dim, c.head_dim(), c.kv_dim());
        // Row i of the batch is token `pos` of sequence `seq`.
        b.rows.clear();
        for (seq, step) in steps.iter().enumerate() {
            let pos0 = step.state.len;
            b.rows
                .extend((0..step.tokens.len()).map(|i| (seq, pos0 + i)));
        }
        let n = b.rows.len();
        b.reserve(c, n, steps.len());

        // x = embedding[token], one row per token
        let tokens = steps.iter().flat_map(|s| s.tokens.iter());
        for (x, &token) in b.x.chunks_exact_mut(dim).zip(tokens) {
            dequantize_row(self.token_embd.ty, self.token_embd.row(token as usize), x);
        }

        if let Some(first) = self.layers.first() {
            b.norm_into_inputs(&first.attn_norm, c.rms_eps);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention: q, k, v = W·rmsnorm(x), the norm done at the end
            // of the layer before
            backend.matmul_many(
                &b.inputs[..n],
                &mut [
                    (&layer.wq, &mut b.q[..n * dim]),
                    (&layer.wk, &mut b.k[..n * kv_dim]),
                    (&layer.wv, &mut b.v[..n * kv_dim]),
                ],
            );

            // Rotate q and k by their positions; k and v join their
            // sequence's cache.
            let rows = b.rows.iter().zip(b.q.chunks_exact_mut(dim));
            for ((&(seq, pos), q), (k, v)) in
                rows.zip(b.k.chunks_exact_mut(kv_dim).zip(b.v.chunks_exact(kv_dim)))
            {
                self.rope_angles(pos, &mut b.rope_cos_sin);
                rotate(q, head_dim, c.rope_dim, &b.rope_cos_sin);
                rotate(k, head_dim, c.rope_dim, &b.rope_cos_sin);
                let State { table, own, .. } = &mut *steps[seq].state;
                let kv = own
                    .as_mut()
                    .or(pool.as_deref_mut())
                    .expect("checked at the start of the pass");
                // The cache holds f16 values, as llama.cpp's does: half the
                // memory attention streams through, and the rounding its
                // arithmetic expects.
                let heads = k.chunks_exact(head_dim).zip(v.chunks_exact(head_dim));
                for (kv_head, (k, v)) in heads.enumerate() {
                    let at = kv.offset(l, table, pos, kv_head);
                    kv.keys[at..at + head_dim].convert_from_f32_slice(k);
                    kv.values[at..at + head_dim].convert_from_f32_slice(v);
                }
            }
            let pool = pool.as_deref();

            // Each group of query heads attends over the cached keys of its
            // kv head up to its own position: att = softmax(q·K / √d),
            // xb = att·V
            let group = c.n_heads / c.n_kv_heads;
            let geometry = Attention {
                head_dim,
                group,
                scale: 1.0 / (head_dim as f32).sqrt(),
                layer: l,
                // A lone token's order; rows of prompt chunks say otherwise.
                order: ggml::DotOrder::VecDot,
            };
            let steps: &[Step<'_>] = steps;
            let max_len = b.rows.iter().map(|&(_, pos)| pos + 1).max().unwrap_or(1);
            // Per worker: a group's scores over the positions, then its
            // scratch.
            let stride = group * max_len + ggml::attend_scratch_len(head_dim, group);
            let threads = backend.threads();
            if n > 1 {
                // Several tokens: each thread takes a share of them.
                let per = n.div_ceil(threads);
                if b.att.len() < threads * stride {
                    b.att.resize(threads * stride, 0.0);
                }
                let (xb, q, rows, att) = (&mut b.xb, &b.q, &b.rows, &mut b.att);
                let inputs = &mut b.inputs[..n];
                backend.install(|| {
                    xb.par_chunks_mut(per * dim)
                        .zip(q.par_chunks(per * dim))
                        .zip(rows.par_chunks(per))
                        .zip(inputs.par_chunks_mut(per))
                        .zip(att.par_chunks_mut(stride))
                        .for_each(|((((out, q), rows), inputs), att)| {
                            let (att, scratch) = att.split_at_mut(group * max_len);
                            let tokens = out.chunks_exact_mut(dim).zip(q.chunks_exact(dim));
                            for (((out, q), &(seq, pos)), input) in tokens.zip(rows).zip(inputs) {
                                let state = &*steps[seq].state;
                                let kv = state.kv(pool);
                                let row = Attention {
                                    order: dot_order(steps[seq].tokens.len()),
                                    ..geometry
                                };
                                let groups = out.chunks_exact_mut(group * head_dim).enumerate();
                                for (kv_head, out) in groups {
                                    let att = &mut att[..group * (pos + 1)];
                                    let first = kv_head * group;
                                    row.heads(kv, &state.table, first, q, out, att, scratch);
                                }
                                // Wo's input, quantized while the token is
                                // at hand.
                                input.set(out);
                            }
                        });
                });
            } else {
                let (seq, pos) = b.rows[0];
                let state = &*steps[seq].state;
                let (kv, table) = (state.kv(pool), &state.table[..]);
                let (q, out) = (&b.q[..dim], &mut b.xb[..dim]);
                if b.att.len() < c.n_heads * stride {
                    b.att.resize(c.n_heads * stride, 0.0);
                }
                let groups = out.chunks_exact_mut(group * head_dim);
                // Over a short past the heads are too little work to be
                // worth waking the other threads for.
                if pos < PARALLEL_ATTENTION_FROM {
                    let (att, scratch) = b.att.split_at_mut(group * max_len);
                    for (kv_head, out) in groups.enumerate() {
                        let att = &mut att[..group * (pos + 1)];
                        geometry.heads(kv, table, kv_head * group, q, out, att, scratch);
                    }
                } else {
                    // Whole groups per task where there are enough of them
                    // to keep every thread busy; otherwise a head per task
                    // (three groups on two threads left one idle a third
                    // of the time).
                    let unit = if c.n_kv_heads >= 2 * threads {
                        group
                    } else {
                        1
                    };
                    let att = &mut b.att;
                    backend.install(|| {
                        out.par_chunks_exact_mut(unit * head_dim)
                            .zip(att.par_chunks_mut(stride))
                            .enumerate()
                            .for_each(|(task, (out, att))| {
                                let (att, scratch) = att.split_at_mut(group * max_len);
                                let att = &mut att[..unit * (pos + 1)];
                                geometry.heads(kv, table, task * unit, q, out, att, scratch);
                            });
                    });
                }
                b.inputs[0].set(&b.xb[..dim]);
            }

            // x += Wo·xb
            let to = &mut b.t[..n * dim];
            backend.matmul_many(&b.inputs[..n], &mut [(&layer.wo, &mut *to)]);

            // MLP: x += W_down·(silu(W_gate·h) * W_up·h), h = rmsnorm(x)
            b.add_then_norm_into_inputs(backend, &layer.ffn_norm, c.rms_eps);
            backend.matmul_many(
                &b.inputs[..n],
                &mut [
                    (&layer.w_gate, &mut b.hb[..n * c.hidden_dim]),
                    (&layer.w_up, &mut b.hb2[..n * c.hidden_dim]),
                ],
            );
            let (hidden, per) = (c.hidden_dim, tokens_per_task(backend, n));
            let (inputs, gate, up) = (&mut b.hidden_inputs[..n], &mut b.hb, &b.hb2);
            backend.install(|| {
                inputs
                    .par_chunks_mut(per)
                    .zip(gate.par_chunks_mut(per * hidden))
                    .zip(up.par_chunks(per * hidden))
                    .for_each(|((inputs, gates), ups)| {
                        let tokens = gates.chunks_exact_mut(hidden).zip(ups.chunks_exact(hidden));
                        for (input, (gate, up)) in inputs.iter_mut().zip(tokens) {
                            ggml::swiglu(gate, up);
                            input.set(gate);
                        }
                    });
            });
            let td = &mut b.t[..n * dim];
            backend.matmul_many(&b.hidden_inputs[..n], &mut [(&layer.w_down, &mut *td)]);
            match self.layers.get(l + 1) {
                Some(next) => b.add_then_norm_into_inputs(backend, &next.attn_norm, c.rms_eps),
                None => add(&mut b.x, &b.t[..n * dim]),
            }
        }

        // logits = W_out·rmsnorm(x), for each sequence's last token only
        let mut last_row = 0;
        for (i, step) in steps.iter().enumerate() {
            last_row += step.tokens.len();
            let x = &b.x[(last_row - 1) * dim..last_row * dim];
            cpu::rmsnorm(&mut b.xb[..dim], x, &self.output_norm, c.rms_eps);
            b.inputs[i].set(&b.xb[..dim]);
        }
        let m = steps.len();
        let logits = &mut b.logits[..m * c.vocab_size];
        backend.matmul_many(&b.inputs[..m], &mut [(&self.output, &mut *logits)]);
        for (step, logits) in steps.iter_mut().zip(logits.chunks_exact(c.vocab_size)) {
            step.state.logits.copy_from_slice(logits);
            step.state.len += step.tokens.len();
        }
        Ok(())
    }

    /// Rotary position embedding, ggml's "normal" variant: consecutive pairs
    /// `(x[2i], x[2i+1])` of the first `rope_dim` values of every head turn
    /// by `pos · θ^(-2i/rope_dim)`. These are those angles' cosines and
    /// sines, for [`rotate`].
    fn rope_angles(&self, pos: usize, cos_sin: &mut [(f32, f32)]) {
        let c = &self.config;
        // The angles and the rotation are computed as ggml computes them
        // (each frequency the previous one times θ^(-2/d), fused
        // multiply-adds in the rotation), so that they round alike.
        let theta_scale = c.rope_theta.powf(-2.0 / c.rope_dim as f32);
        let mut theta = pos as f32;
        for (i, cs) in cos_sin.iter_mut().enumerate() {
            let divisor = self.rope_freq_factors.as_ref().map_or(1.0, |f| f[i]);
            let angle = c.rope_position_scale * (theta / divisor);
            *cs = (angle.cos(), angle.sin());
            theta *= theta_scale;
        }
    }
}

/// Turns the first `rope_dim` values of every head of `x` pair by pair by
/// the angles of `cos_sin`.
fn rotate(x: &mut [f32], head_dim: usize, rope_dim: usize, cos_sin: &[(f32, f32)]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA, detected just above.
        unsafe { rotate_fma(x, head_dim, rope_dim, cos_sin) };
        return;
    }
    rotate_portable(x, head_dim, rope_dim, cos_sin);
}

/// [`rotate`] with the fused multiply-adds in instructions: without the
/// feature each `mul_add` was a call into the C library.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn rotate_fma(x: &mut [f32], head_dim: usize, rope_dim: usize, cos_sin: &[(f32, f32)]) {
    rotate_portable(x, head_dim, rope_dim, cos_sin);
}

#[inline(always)]
fn rotate_portable(x: &mut [f32], head_dim: usize, rope_dim: usize, cos_sin: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, &(cos, sin)) in head[..rope_dim].chunks_exact_mut(2).zip(cos_sin) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0.mul_add(cos, -(x1 * sin));
            pair[1] = x0.mul_add(sin, x1 * cos);
        }
    }
}

/// How llama.cpp sums a sequence's attention products when it is fed
/// `tokens` tokens in a step: a prompt chunk goes through a GEMM, a lone
/// token through a dot product. Decided per sequence, so that a sequence's
/// results do not depend on what it is batched with.
fn dot_order(tokens: usize) -> ggml::DotOrder {
    if tokens > 1 {
        ggml::DotOrder::Gemm
    } else {
        ggml::DotOrder::VecDot
    }
}

/// The shape of one layer's attention.
#[derive(Clone, Copy)]
struct Attention {
    head_dim: usize,
    /// Query heads per kv head.
    group: usize,
    /// `1 / √head_dim`
    scale: f32,
    layer: usize,
    /// How llama.cpp would sum this row's products ([`dot_order`]).
    order: ggml::DotOrder,
}

impl Attention {
    /// Query heads `first..first + out.len() / head_dim` of a token (`q`
    /// is the token's whole query vector), all of one kv group, attend over
    /// the first `att.len()` / (that many) positions of the sequence whose
    /// block table is `table`, the token's own included:
    /// `out = softmax(q·K/√d)·V` for each head.
    #[allow(clippy::too_many_arguments)]
    fn heads(
        &self,
        kv: &KvBlocks,
        table: &[u32],
        first: usize,
        q: &[f32],
        out: &mut [f32],
        att: &mut [f32],
        scratch: &mut [f32],
    ) {
        let hd = self.head_dim;
        let heads = first * hd..first * hd + out.len();
        let kv_head = first / self.group;
        debug_assert_eq!(
            kv_head,
            (first + out.len() / hd - 1) / self.group,
            "one kv group"
        );
        let cached = kv.head(self.layer, table, kv_head);
        ggml::attend(
            self.order, &q[heads], &cached, self.scale, att, scratch, out,
        );
    }
}

/// Tokens per task when a step's `n` tokens share per-token work (norms,
/// activations, quantization) among the threads: a share per thread, or
/// all of them in one task where so few that waking the other threads
/// costs more.
fn tokens_per_task(backend: &CpuBackend, n: usize) -> usize {
    if n < PARALLEL_TOKENS_FROM {
        n.max(1)
    } else {
        n.div_ceil(backend.threads())
    }
}

/// `x += y`: a residual add.
fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// Keys and values of every layer in blocks of `block_tokens` positions,
/// `[layer][block][kv head][slot][head_dim]`: within a block, one head's
/// positions are contiguous, so attention over them streams through
/// memory rather than picking one head's values out of every position's
/// row of all heads. A sequence finds its position `p` in
/// block `table[p / block_tokens]` of its block table, so sequences that
/// start alike can share the blocks of their common prefix (the scheduler's
/// prefix cache, [`crate::scheduler::kv`]).
#[derive(Debug)]
pub struct KvBlocks {
    block_tokens: usize,
    blocks: usize,
    layers: usize,
    kv_dim: usize,
    head_dim: usize,
    keys: Vec<f16>,
    values: Vec<f16>,
}

impl KvBlocks {
    /// `blocks` blocks of `block_tokens` positions for a model of shape
    /// `shape`. The memory is zeroed lazily by the system, so an unused
    /// block costs address space only.
    pub fn new(shape: &ModelShape, block_tokens: usize, blocks: usize) -> Self {
        let block_tokens = block_tokens.max(1);
        let len = shape.layers * blocks * block_tokens * shape.kv_dim();
        Self {
            block_tokens,
            blocks,
            layers: shape.layers,
            kv_dim: shape.kv_dim(),
            head_dim: shape.head_dim,
            keys: vec![f16::ZERO; len],
            values: vec![f16::ZERO; len],
        }
    }

    /// Blocks in all.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Positions per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Where kv head `kv_head` of position `pos` of layer `layer` starts
    /// for the sequence whose block table is `table`.
    fn offset(&self, layer: usize, table: &[u32], pos: usize, kv_head: usize) -> usize {
        let (block, slot) = (pos / self.block_tokens, pos % self.block_tokens);
        let block = table[block] as usize;
        (layer * self.blocks + block) * self.block_tokens * self.kv_dim
            + (kv_head * self.block_tokens + slot) * self.head_dim
    }

    /// Kv head `kv_head` of layer `layer` for the sequence whose block
    /// table is `table`, as attention reads it.
    fn head<'c>(&'c self, layer: usize, table: &'c [u32], kv_head: usize) -> ggml::CachedHead<'c> {
        let layout = ggml::KvLayout {
            block_tokens: self.block_tokens,
            block_stride: self.block_tokens * self.kv_dim,
            row: self.head_dim,
        };
        let start =
            layer * self.blocks * layout.block_stride + kv_head * self.block_tokens * self.head_dim;
        ggml::CachedHead::new(
            &self.keys,
            &self.values,
            table,
            layout,
            start,
            self.head_dim,
        )
    }
}

/// One sequence: where its keys and values live, its logits, and (for a
/// state fed on its own) the scratch buffers of its forward pass, allocated
/// once and grown to the longest chunk fed so that a decode step allocates
/// nothing.
#[derive(Debug)]
pub struct State {
    len: usize,
    capacity: usize,
    /// The blocks holding its positions, in `own` or in the pool the
    /// runner passes.
    table: Vec<u32>,
    /// Its own cache (one block as long as the sequence), unless it lives
    /// in a runner's pool.
    own: Option<KvBlocks>,
    logits: Vec<f32>,
    batch: Batch,
}

/// Scratch space of a batched step: per-token activations `[token][width]`.
/// Reused across steps, it grows to the largest batch and then allocates no
/// more.
#[derive(Debug, Default)]
pub struct Batch {
    /// `(sequence, position)` of each token row.
    rows: Vec<(usize, usize)>,
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    hb: Vec<f32>,
    hb2: Vec<f32>,
    /// A product's output before it joins the residual stream.
    t: Vec<f32>,
    /// `[sequence][vocab]`, each sequence's last token's.
    logits: Vec<f32>,
    inputs: Vec<Input>,
    hidden_inputs: Vec<Input>,
    /// `[head][position]`, reused token by token.
    att: Vec<f32>,
    rope_cos_sin: Vec<(f32, f32)>,
}

impl Batch {
    /// Sizes the buffers for `n` tokens of `seqs` sequences; buffers whose
    /// length the kernels read are set exactly, the rest only grow.
    fn reserve(&mut self, c: &LlamaConfig, n: usize, seqs: usize) {
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        self.x.resize(n * c.dim, 0.0);
        self.xb.resize(n * c.dim, 0.0);
        self.q.resize(n * c.dim, 0.0);
        self.k.resize(n * c.kv_dim(), 0.0);
        self.v.resize(n * c.kv_dim(), 0.0);
        self.hb.resize(n * c.hidden_dim, 0.0);
        self.hb2.resize(n * c.hidden_dim, 0.0);
        grow(&mut self.t, n * c.dim);
        grow(&mut self.logits, seqs * c.vocab_size);
        if self.inputs.len() < n {
            self.inputs.resize_with(n, Input::default);
            self.hidden_inputs.resize_with(n, Input::default);
        }
        self.rope_cos_sin.resize(c.rope_dim / 2, (0.0, 0.0));
    }

    /// `inputs[i] = rmsnorm(x[i]) · weight` for every token.
    fn norm_into_inputs(&mut self, weight: &[f32], eps: f32) {
        let dim = weight.len();
        for ((input, x), xb) in self
            .inputs
            .iter_mut()
            .zip(self.x.chunks_exact(dim))
            .zip(self.xb.chunks_exact_mut(dim))
        {
            cpu::rmsnorm(xb, x, weight, eps);
            input.set(xb);
        }
    }

    /// `x[i] += t[i]`, then `inputs[i] = rmsnorm(x[i]) · weight`, for every
    /// token, the tokens shared among the threads.
    fn add_then_norm_into_inputs(&mut self, backend: &CpuBackend, weight: &[f32], eps: f32) {
        let (dim, n) = (weight.len(), self.rows.len());
        let per = tokens_per_task(backend, n);
        let (x, t) = (&mut self.x[..n * dim], &self.t[..n * dim]);
        let (xb, inputs) = (&mut self.xb[..n * dim], &mut self.inputs[..n]);
        backend.install(|| {
            x.par_chunks_mut(per * dim)
                .zip(t.par_chunks(per * dim))
                .zip(xb.par_chunks_mut(per * dim))
                .zip(inputs.par_chunks_mut(per))
                .for_each(|(((x, t), xb), inputs)| {
                    add(x, t);
                    let rows = x.chunks_exact(dim).zip(xb.chunks_exact_mut(dim));
                    for ((x, xb), input) in rows.zip(inputs) {
                        cpu::rmsnorm(xb, x, weight, eps);
                        input.set(xb);
                    }
                });
        });
    }
}

impl State {
    fn new(c: &LlamaConfig, capacity: usize) -> Self {
        let mut batch = Batch::default();
        batch.reserve(c, 1, 1);
        batch.att.resize(c.n_heads * capacity, 0.0);
        Self {
            len: 0,
            capacity,
            table: vec![0],
            own: Some(KvBlocks::new(&c.shape(), capacity, 1)),
            logits: vec![0.0; c.vocab_size],
            batch,
        }
    }

    /// A sequence whose positions live in `pool`'s blocks `table`, the
    /// first `cached` of them already computed (a prefix shared with an
    /// earlier sequence): it goes on from there. It is fed with
    /// [`Llama::forward_batch_in`] and that pool.
    pub fn in_pool(
        shape: &ModelShape,
        pool: &KvBlocks,
        table: Vec<u32>,
        cached: usize,
    ) -> Result<Self, ModelError> {
        let capacity = (table.len() * pool.block_tokens).min(shape.context_length);
        if let Some(&id) = table.iter().find(|&&id| id as usize >= pool.blocks) {
            return Err(ModelError::Backend(format!(
                "KV block {id} asked for, the pool has {}",
                pool.blocks
            )));
        }
        if cached > capacity {
            return Err(ModelError::ContextFull { capacity });
        }
        Ok(Self {
            len: cached,
            capacity,
            table,
            own: None,
            logits: vec![0.0; shape.vocab_size],
            batch: Batch::default(),
        })
    }

    /// The cache this state's positions live in.
    fn kv<'a>(&'a self, pool: Option<&'a KvBlocks>) -> &'a KvBlocks {
        self.own
            .as_ref()
            .or(pool)
            .expect("checked at the start of the pass")
    }
    /// The logits after the last token fed.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Tokens fed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the KV cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
