//! A llama in a Hugging Face model directory: what its `config.json` says
//! in [`LlamaConfig`]'s terms, and its tensors under GGUF's names.

use serde_json::Value;

use super::LlamaConfig;
use crate::hf::{CONFIG_FILE, HfConfig, HfDir, HfError};
use crate::weights::{Matrix, Weights};

impl LlamaConfig {
    /// The hyperparameters of a Hugging Face llama's `config.json`,
    /// checked for what this crate supports.
    pub fn from_hf(dir: &HfDir) -> Result<Self, HfError> {
        let c = dir.config();
        let bad = |reason: String| HfError::Invalid {
            path: dir.path().join(CONFIG_FILE),
            reason,
        };
        let is_llama = c.model_type.as_deref() == Some("llama")
            || c.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            return Err(bad(format!(
                "model_type {:?} (architectures {:?}) is not supported (llama is)",
                c.model_type, c.architectures
            )));
        }
        if let Some(act) = c.hidden_act.as_deref().filter(|&a| a != "silu") {
            return Err(bad(format!(
                "hidden_act {act:?} is not supported (silu is)"
            )));
        }
        if c.attention_bias || c.mlp_bias {
            return Err(bad("attention_bias and mlp_bias are not supported".into()));
        }
        let (dim, n_heads) = (c.hidden_size, c.num_attention_heads);
        let n_kv_heads = c.num_key_value_heads.unwrap_or(n_heads);
        if dim == 0
            || n_heads == 0
            || n_kv_heads == 0
            || dim % n_heads != 0
            || n_heads % n_kv_heads != 0
        {
            return Err(bad(format!(
                "hidden_size {dim} over {n_heads} attention heads and {n_kv_heads} key/value heads"
            )));
        }
        let head_dim = dim / n_heads;
        if head_dim % 2 != 0 || c.head_dim.is_some_and(|h| h != head_dim) {
            return Err(bad(format!(
                "head_dim {:?} with hidden_size {dim} over {n_heads} heads: heads must be \
                 hidden_size / num_attention_heads wide, an even number",
                c.head_dim
            )));
        }
        if c.vocab_size == 0 || c.max_position_embeddings == 0 {
            return Err(bad(
                "vocab_size and max_position_embeddings must be positive".into(),
            ));
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            return Err(bad(format!("rope_theta {} must be positive", c.rope_theta)));
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
            return Err(bad(format!(
                "rms_norm_eps {} must be non-negative",
                c.rms_norm_eps
            )));
        }
        Ok(LlamaConfig {
            dim,
            hidden_dim: c.intermediate_size,
            n_layers: c.num_hidden_layers,
            n_heads,
            n_kv_heads,
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
            rope_theta: c.rope_theta as f32,
            rope_dim: head_dim,
            rope_position_scale: rope_position_scale(c).map_err(bad)?,
            rms_eps: c.rms_norm_eps as f32,
        })
    }
}

/// `1 / factor` under linear RoPE scaling, else 1.
fn rope_position_scale(c: &HfConfig) -> Result<f32, String> {
    let Some(scaling) = c.rope_scaling.as_ref().filter(|s| !s.is_null()) else {
        return Ok(1.0);
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str);
    match kind {
        Some("default") => Ok(1.0),
        Some("linear") => match scaling.get("factor").and_then(Value::as_f64) {
            Some(f) if f.is_finite() && f > 0.0 => Ok((1.0 / f) as f32),
            _ => Err(format!(
                "rope_scaling {scaling}: linear scaling needs a positive factor"
            )),
        },
        _ => Err(format!(
            "rope_scaling {scaling} is not supported (linear is)"
        )),
    }
}

/// The llama weights of an [`HfDir`], asked for by their GGUF names, each
/// looked up under its Hugging Face name.
pub(super) struct HfLlamaWeights<'a> {
    pub(super) hf: &'a HfDir,
}

impl HfLlamaWeights<'_> {
    /// The Hugging Face name of the GGUF tensor `name`, and for the query
    /// and key projections the number of heads to reorder their rows over.
    fn hf_name(&self, name: &str) -> Option<(String, Option<usize>)> {
        let c = self.hf.config();
        let heads = c.num_attention_heads;
        let kv_heads = c.num_key_value_heads.unwrap_or(heads);
        let plain = |n: &str| Some((n.to_owned(), None));
        match name {
            "token_embd.weight" => return plain("model.embed_tokens.weight"),
            "output_norm.weight" => return plain("model.norm.weight"),
            "output.weight" => return plain("lm_head.weight"),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (hf, rope) = match rest.strip_suffix(".weight")? {
            "attn_norm" => ("input_layernorm", None),
            "attn_q" => ("self_attn.q_proj", Some(heads)),
            "attn_k" => ("self_attn.k_proj", Some(kv_heads)),
            "attn_v" => ("self_attn.v_proj", None),
            "attn_output" => ("self_attn.o_proj", None),
            "ffn_norm" => ("post_attention_layernorm", None),
            "ffn_gate" => ("mlp.gate_proj", None),
            "ffn_up" => ("mlp.up_proj", None),
            "ffn_down" => ("mlp.down_proj", None),
            _ => return None,
        };
        Some((format!("model.layers.{layer}.{hf}.weight"), rope))
    }

    fn unknown(&self, name: &str) -> HfError {
        HfError::Invalid {
            path: self.hf.path().join(CONFIG_FILE),
            reason: format!("no Hugging Face tensor stands for {name:?}"),
        }
    }
}

impl Weights for HfLlamaWeights<'_> {
    type Error = HfError;

    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Matrix, HfError> {
        let (hf, rope) = self.hf_name(name).ok_or_else(|| self.unknown(name))?;
        self.hf.tensors().matrix(&hf, cols, rows, rope)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, HfError> {
        let (hf, _) = self.hf_name(name).ok_or_else(|| self.unknown(name))?;
        self.hf.tensors().vector(&hf, len)
    }

    fn contains(&self, name: &str) -> bool {
        match name {
            // Untied: lm_head.weight must be there (and its absence is an
            // error); tied: it is the embedding, whatever the file holds.
            "output.weight" => !self.hf.config().tie_word_embeddings,
            _ => self
                .hf_name(name)
                .is_some_and(|(hf, _)| self.hf.tensors().contains(&hf)),
        }
    }
}
