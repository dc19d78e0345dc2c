//! Random llama models as Hugging Face directories, deterministic from a
//! seed: `config.json`, `tokenizer.json`, `tokenizer_config.json` (ChatML),
//! `generation_config.json` and `model.safetensors`, loadable here (see
//! [`crate::loader`]) and by `transformers`' `LlamaForCausalLM`.
//!
//! Two shapes: [`HfTestShape::tiny`] (the tiny GGUF's geometry, well under a
//! megabyte) and [`HfTestShape::smollm2_135m`] (SmolLM2-135M's exact shape,
//! 270 MB in f16, written in seconds by an optimised build), so that a
//! machine that cannot download a model can still make one of the real
//! size.
//!
//! The tokenizer is the tiny GGUF's byte-level BPE (control tokens, bytes,
//! [`TINY_MERGES`]) padded with tokens `Ġtok0`, `Ġtok1`, … that no text
//! encodes to, up to the vocabulary size.
//!
//! Weights are scaled so that activations stay well-conditioned: matrices
//! have standard deviation `1/√fan_in` (the residual outputs `o_proj` and
//! `down_proj` a further `1/√(2·layers)`, the embeddings `1/√hidden_size`)
//! and norms are `1 ± 0.1`, except the final norm, `LOGIT_STD · (1 ± 0.1)`,
//! which spreads the logits with a standard deviation of about
//! [`LOGIT_STD`]. Greedy decoding then has clear top-1 margins: over 64
//! steps of the 135M shape, seeds 1 to 4, the median margin was 3 to 5.6
//! and 90% of steps had more than 1.2, though, as random models do, it
//! soon repeats a few tokens.
//!
//! ```
//! # use breakwater_infer::test_model::hf::{self, HfDtype};
//! let dir = tempfile::tempdir().unwrap();
//! let shape = hf::generate(dir.path(), "tiny", 1, HfDtype::Bf16).unwrap();
//! assert_eq!(shape, hf::HfTestShape::tiny());
//! for file in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
//!     assert!(dir.path().join(file).is_file(), "{file}");
//! }
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

use super::{CHAT_TEMPLATE, CONTROL_TOKENS, TINY_MERGES, byte_alphabet};

/// The names [`generate`] knows.
pub const SHAPE_NAMES: [&str; 2] = ["tiny", "smollm2-135m"];

/// About the standard deviation of the logits.
pub const LOGIT_STD: f32 = 4.0;

/// Elements generated from one seeded stream; tensors are split into such
/// chunks so that big ones generate in parallel, the same on any machine.
const CHUNK: usize = 1 << 16;

/// The hyperparameters of a test model, as `config.json` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct HfTestShape {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Tokens in the vocabulary (and rows of the embedding).
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the unembedding is the embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Linear RoPE scaling factor, if any.
    pub rope_linear_factor: Option<f64>,
}

impl HfTestShape {
    /// The tiny GGUF's geometry (width 64, 2 layers, 4 query and 2 kv
    /// heads) with a vocabulary of 320 and an untied `lm_head`.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size: 320,
            max_position_embeddings: 256,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            rope_linear_factor: None,
        }
    }

    /// SmolLM2-135M's exact shape: width 576, MLP 1536, 30 layers, 9 query
    /// and 3 kv heads, 49152 tokens, 8192 positions, θ = 100000, tied
    /// embeddings.
    pub fn smollm2_135m() -> Self {
        Self {
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            vocab_size: 49152,
            max_position_embeddings: 8192,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            rope_linear_factor: None,
        }
    }

    /// The shape called `name` (one of [`SHAPE_NAMES`]).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "smollm2-135m" | "smollm2_135m" => Some(Self::smollm2_135m()),
            _ => None,
        }
    }

    /// Values per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of weights.
    pub fn parameters(&self) -> usize {
        tensor_specs(self)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}

/// The element type of the weights written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl HfDtype {
    /// `torch_dtype` in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

impl std::str::FromStr for HfDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!("unknown dtype {s:?}: use f32, f16 or bf16")),
        }
    }
}

impl std::fmt::Display for HfDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Why a test model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TestModelError {
    /// [`generate`] was given a name it does not know.
    #[error("unknown test model shape {0:?} (known: {known})", known = SHAPE_NAMES.join(", "))]
    UnknownShape(String),
    /// The shape cannot be written (e.g. a vocabulary smaller than the
    /// byte-level alphabet).
    #[error("invalid test model shape: {0}")]
    BadShape(String),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The safetensors writer failed.
    #[error("writing {path}: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the writer said.
        reason: String,
    },
}

/// Writes the test model `shape_name` (one of [`SHAPE_NAMES`]) into `dir`,
/// creating it if needed, and returns its shape: the entry point of
/// `breakwater model gen-test`.
pub fn generate(
    dir: &Path,
    shape_name: &str,
    seed: u64,
    dtype: HfDtype,
) -> Result<HfTestShape, TestModelError> {
    let shape = HfTestShape::named(shape_name)
        .ok_or_else(|| TestModelError::UnknownShape(shape_name.to_owned()))?;
    write_hf_dir(dir, &shape, seed, dtype)?;
    Ok(shape)
}

/// Writes a random model of `shape` into `dir` (created if needed), its
/// weights in `dtype` and determined by `seed` alone. Each file lands by
/// write-then-rename, `config.json` last.
pub fn write_hf_dir(
    dir: &Path,
    shape: &HfTestShape,
    seed: u64,
    dtype: HfDtype,
) -> Result<(), TestModelError> {
    let s = shape;
    let fixed = CONTROL_TOKENS.len() + 256 + TINY_MERGES.len();
    if s.vocab_size < fixed {
        return Err(TestModelError::BadShape(format!(
            "vocab_size {} is under the {fixed} tokens of the byte-level vocabulary",
            s.vocab_size
        )));
    }
    if s.num_attention_heads == 0
        || s.num_key_value_heads == 0
        || !s.hidden_size.is_multiple_of(s.num_attention_heads)
        || !s.num_attention_heads.is_multiple_of(s.num_key_value_heads)
        || !s.head_dim().is_multiple_of(2)
    {
        return Err(TestModelError::BadShape(format!(
            "hidden_size {} over {} heads and {} kv heads",
            s.hidden_size, s.num_attention_heads, s.num_key_value_heads
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| TestModelError::Io {
        path: dir.to_owned(),
        source,
    })?;

    let weights = dir.join("model.safetensors");
    let tensors = random_tensors(shape, seed, dtype);
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(dtype.safetensors(), shape.clone(), bytes).map(|v| (name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TestModelError::Safetensors {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    // Writes a temporary file beside it and renames it into place.
    safetensors::serialize_to_file(views, Some(metadata), &weights).map_err(|e| {
        TestModelError::Safetensors {
            path: weights.clone(),
            reason: e.to_string(),
        }
    })?;

    write_json(dir, "tokenizer.json", &tokenizer_json(shape.vocab_size))?;
    write_json(dir, "tokenizer_config.json", &tokenizer_config_json(shape))?;
    write_json(
        dir,
        "generation_config.json",
        &json!({ "_from_model_config": true, "bos_token_id": 1, "eos_token_id": 2 }),
    )?;
    write_json(dir, "config.json", &config_json(shape, dtype))
}

/// One tensor to generate: its Hugging Face name, shape and how to fill it.
struct Spec {
    name: String,
    shape: Vec<usize>,
    fill: Fill,
}

enum Fill {
    /// Noise of this standard deviation around zero.
    Noise(f32),
    /// A norm weight: this times `1 ± 0.1`.
    Norm(f32),
}

fn tensor_specs(s: &HfTestShape) -> Vec<Spec> {
    let (dim, hidden, vocab) = (s.hidden_size, s.intermediate_size, s.vocab_size);
    let kv_dim = s.num_key_value_heads * s.head_dim();
    let inv_sqrt = |n: usize| 1.0 / (n as f32).sqrt();
    let residual = inv_sqrt(2 * s.num_hidden_layers.max(1));
    let spec = |name: String, shape: &[usize], fill| Spec {
        name,
        shape: shape.to_vec(),
        fill,
    };
    let mut specs = vec![spec(
        "model.embed_tokens.weight".into(),
        &[vocab, dim],
        Fill::Noise(inv_sqrt(dim)),
    )];
    for l in 0..s.num_hidden_layers {
        let name = |n: &str| format!("model.layers.{l}.{n}.weight");
        specs.extend([
            spec(name("input_layernorm"), &[dim], Fill::Norm(1.0)),
            spec(
                name("self_attn.q_proj"),
                &[dim, dim],
                Fill::Noise(inv_sqrt(dim)),
            ),
            spec(
                name("self_attn.k_proj"),
                &[kv_dim, dim],
                Fill::Noise(inv_sqrt(dim)),
            ),
            spec(
                name("self_attn.v_proj"),
                &[kv_dim, dim],
                Fill::Noise(inv_sqrt(dim)),
            ),
            spec(
                name("self_attn.o_proj"),
                &[dim, dim],
                Fill::Noise(inv_sqrt(dim) * residual),
            ),
            spec(name("post_attention_layernorm"), &[dim], Fill::Norm(1.0)),
            spec(
                name("mlp.gate_proj"),
                &[hidden, dim],
                Fill::Noise(inv_sqrt(dim)),
            ),
            spec(
                name("mlp.up_proj"),
                &[hidden, dim],
                Fill::Noise(inv_sqrt(dim)),
            ),
            spec(
                name("mlp.down_proj"),
                &[dim, hidden],
                Fill::Noise(inv_sqrt(hidden) * residual),
            ),
        ]);
    }
    specs.push(spec(
        "model.norm.weight".into(),
        &[dim],
        Fill::Norm(LOGIT_STD),
    ));
    if !s.tie_word_embeddings {
        specs.push(spec(
            "lm_head.weight".into(),
            &[vocab, dim],
            Fill::Noise(inv_sqrt(dim)),
        ));
    }
    specs
}

/// Every tensor's name, shape and bytes in `dtype`. Each chunk of
/// [`CHUNK`] values comes from its own stream, seeded by `seed`, the
/// tensor's name and the chunk's index, so the result does not depend on
/// how the work is spread over threads.
fn random_tensors(
    s: &HfTestShape,
    seed: u64,
    dtype: HfDtype,
) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let size = dtype.size();
    tensor_specs(s)
        .into_par_iter()
        .map(|spec| {
            let len: usize = spec.shape.iter().product();
            let mut bytes = vec![0u8; len * size];
            let name_seed = fnv1a(spec.name.as_bytes());
            bytes
                .par_chunks_mut(CHUNK * size)
                .enumerate()
                .for_each(|(i, out)| {
                    let mut rng = StdRng::seed_from_u64(mix(mix(seed ^ name_seed) ^ i as u64));
                    for out in out.chunks_exact_mut(size) {
                        let v = match spec.fill {
                            Fill::Noise(std) => normalish(&mut rng) * std,
                            Fill::Norm(scale) => scale * (1.0 + 0.1 * normalish(&mut rng)),
                        };
                        match dtype {
                            HfDtype::F32 => out.copy_from_slice(&v.to_le_bytes()),
                            HfDtype::F16 => out.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                            HfDtype::Bf16 => out.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                        }
                    }
                });
            (spec.name, spec.shape, bytes)
        })
        .collect()
}

/// A bell-shaped value of mean 0 and standard deviation 1, bounded by
/// ±√12: the sum of four uniform 16-bit draws.
fn normalish(rng: &mut StdRng) -> f32 {
    let r = rng.next_u64();
    let sum: u64 = (0..4).map(|i| (r >> (16 * i)) & 0xffff).sum();
    // Four uniforms on [0, 1) sum to mean 2 and variance 1/3.
    (sum as f32 / 65536.0 - 2.0) * 3f32.sqrt()
}

/// SplitMix64's finalizer.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The vocabulary: control tokens, the 256 bytes, one token per merge, then
/// padding tokens up to `vocab_size`.
fn vocabulary(vocab_size: usize) -> Vec<String> {
    let mut tokens: Vec<String> = CONTROL_TOKENS.iter().map(|t| t.to_string()).collect();
    tokens.extend(byte_alphabet().iter().map(char::to_string));
    tokens.extend(TINY_MERGES.iter().map(|m| m.replace(' ', "")));
    let fixed = tokens.len();
    tokens.extend((0..vocab_size.saturating_sub(fixed)).map(|i| format!("Ġtok{i}")));
    tokens
}

/// `tokenizer.json`: the tiny GGUF's byte-level BPE, with SmolLM2's
/// pre-tokenizer (digits split one by one, then GPT-2's byte-level split).
fn tokenizer_json(vocab_size: usize) -> Value {
    let tokens = vocabulary(vocab_size);
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = CONTROL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                { "type": "Digits", "individual_digits": true },
                { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true }
            ]
        },
        "post_processor": null,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": TINY_MERGES,
        }
    })
}

fn tokenizer_config_json(s: &HfTestShape) -> Value {
    let added: serde_json::Map<String, Value> = CONTROL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            let token = json!({
                "content": content, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true
            });
            (id.to_string(), token)
        })
        .collect();
    json!({
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "bos_token": CONTROL_TOKENS[1],
        "eos_token": CONTROL_TOKENS[2],
        "pad_token": CONTROL_TOKENS[2],
        "unk_token": CONTROL_TOKENS[0],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": s.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

fn config_json(s: &HfTestShape, dtype: HfDtype) -> Value {
    let rope_scaling = match s.rope_linear_factor {
        Some(factor) => json!({ "rope_type": "linear", "factor": factor }),
        None => Value::Null,
    };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "head_dim": s.head_dim(),
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings,
        "mlp_bias": false,
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": s.tie_word_embeddings,
        "torch_dtype": dtype.torch_name(),
        "use_cache": true,
        "vocab_size": s.vocab_size,
    })
}

/// Writes `value` to `dir/name` through a temporary file and a rename.
fn write_json(dir: &Path, name: &str, value: &Value) -> Result<(), TestModelError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io = |source| TestModelError::Io {
        path: path.clone(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| io(e.into()))?;
    bytes.push(b'\n');
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_shape_has_its_parameter_count() {
        // SmolLM2-135M: 134,515,008 parameters.
        assert_eq!(HfTestShape::smollm2_135m().parameters(), 134_515_008);
        assert_eq!(
            HfTestShape::named("smollm2-135m"),
            Some(HfTestShape::smollm2_135m())
        );
        assert_eq!(HfTestShape::named("huge"), None);
    }

    #[test]
    fn noise_has_unit_variance_and_the_same_values_every_time() {
        let mut rng = StdRng::seed_from_u64(1);
        let v: Vec<f32> = (0..100_000).map(|_| normalish(&mut rng)).collect();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        let a = random_tensors(&HfTestShape::tiny(), 3, HfDtype::F16);
        let b = random_tensors(&HfTestShape::tiny(), 3, HfDtype::F16);
        let c = random_tensors(&HfTestShape::tiny(), 4, HfDtype::F16);
        assert!(a == b && a != c);
    }

    #[test]
    fn vocabulary_is_distinct_and_padded() {
        let v = vocabulary(320);
        assert_eq!(v.len(), 320);
        let distinct: std::collections::HashSet<&String> = v.iter().collect();
        assert_eq!(distinct.len(), 320);
        assert_eq!(v[264], "Ġtok0");
    }
}
