//! Hugging Face model directories: `config.json`, `tokenizer.json` (with
//! an optional `tokenizer_config.json` and `generation_config.json`) and the
//! weights in one or more `*.safetensors` files (sharded ones listed in
//! `model.safetensors.index.json`).
//!
//! [`HfDir::open`] reads the JSON files and maps the weights; the model,
//! the tokenizer and the chat template are then built from it as from a
//! GGUF file: [`Llama::from_hf`](crate::model::llama::Llama::from_hf),
//! [`Tokenizer::from_hf`](crate::tokenizer::Tokenizer::from_hf) and
//! [`ChatTemplate::from_hf`](crate::chat_template::ChatTemplate::from_hf).
//! [`crate::loader::load`] does all of it for a path of either kind.
//!
//! Weights in F32 and F16 stay memory-mapped; BF16 ones are converted at
//! load (see [`tensors`]). The query and key projections are reordered at
//! load from Hugging Face's "rotate half" RoPE layout to the interleaved
//! pairs the forward pass rotates, exactly as llama.cpp's converter does.
//!
//! ```
//! # use breakwater_infer::hf::HfDir;
//! # use breakwater_infer::test_model::hf::{HfDtype, HfTestShape, write_hf_dir};
//! let dir = tempfile::tempdir().unwrap();
//! write_hf_dir(dir.path(), &HfTestShape::tiny(), 7, HfDtype::F16).unwrap();
//! let hf = HfDir::open(dir.path()).unwrap();
//! assert_eq!(hf.config().num_hidden_layers, 2);
//! let config = breakwater_infer::model::llama::LlamaConfig::from_hf(&hf).unwrap();
//! assert_eq!(config.n_kv_heads, 2);
//! ```

pub mod tensors;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use self::tensors::Tensors;

/// The file holding the model's hyperparameters.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer, in the `tokenizers` library's format.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Special tokens and the chat template.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Default generation settings (its `eos_token_id` ends generations too).
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// Which shard holds which tensor, for sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Why a Hugging Face model directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read or mapped.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file is malformed or lacks a required field.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// A file parses but says something this crate cannot use.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The directory holds no `*.safetensors` file.
    #[error("{dir}: no *.safetensors weights")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// A tensor the model needs is in none of the weight files.
    #[error("{dir}: tensor {name:?} is missing")]
    MissingTensor {
        /// The model directory.
        dir: PathBuf,
        /// The tensor's Hugging Face name.
        name: String,
    },
    /// A tensor has the wrong shape or an unsupported dtype.
    #[error("{path}: tensor {name:?}: {reason}")]
    BadTensor {
        /// The weight file holding it.
        path: PathBuf,
        /// The tensor's Hugging Face name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// One token id or several (`eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids, in order.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of a `LlamaForCausalLM` `config.json` this crate reads;
/// absent optional ones take `transformers`' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HfConfig {
    /// Model classes, e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `llama`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (default: as many as query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Values per head, when given (must be `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Tokens in the embedding.
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Whether the unembedding is the embedding (no `lm_head.weight`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// RoPE scaling: `{"rope_type" (or "type"): "linear", "factor": f}`.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// The MLP's activation (`silu`).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Biases on the attention projections (unsupported).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections (unsupported).
    #[serde(default)]
    pub mlp_bias: bool,
    /// The beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// The end-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// An opened Hugging Face model directory: its JSON files parsed, its
/// weight files mapped.
#[derive(Debug)]
pub struct HfDir {
    dir: PathBuf,
    config: HfConfig,
    /// `tokenizer_config.json`, `Null` when absent.
    tokenizer_config: Value,
    /// `generation_config.json`'s `eos_token_id`, if any.
    generation_eos: Option<TokenIds>,
    tensors: Tensors,
}

impl HfDir {
    /// Reads the directory `dir`: `config.json` and the weights are required,
    /// the tokenizer files are read when the tokenizer is built.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, HfError> {
        let dir = dir.as_ref().to_owned();
        let config: HfConfig =
            serde_json::from_value(read_json(&dir.join(CONFIG_FILE))?).map_err(|source| {
                HfError::Json {
                    path: dir.join(CONFIG_FILE),
                    source,
                }
            })?;
        let tokenizer_config = read_optional_json(&dir.join(TOKENIZER_CONFIG_FILE))?;
        let generation = dir.join(GENERATION_CONFIG_FILE);
        let generation_eos = match read_optional_json(&generation)?.get("eos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(TokenIds::deserialize(v).map_err(|source| HfError::Json {
                path: generation,
                source,
            })?),
        };
        let tensors = Tensors::open(&dir)?;
        Ok(Self {
            dir,
            config,
            tokenizer_config,
            generation_eos,
            tensors,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `config.json`.
    pub fn config(&self) -> &HfConfig {
        &self.config
    }

    /// The tensors of all weight files.
    pub fn tensors(&self) -> &Tensors {
        &self.tensors
    }

    /// The text of a special token in `tokenizer_config.json` (`bos_token`,
    /// `eos_token`, …), given as a string or as `{"content": …}`.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        let v = self.tokenizer_config.get(key)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))
    }

    /// `tokenizer_config.json`'s `add_bos_token`, if it says.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.tokenizer_config
            .get("add_bos_token")
            .and_then(Value::as_bool)
    }

    /// The chat template: `tokenizer_config.json`'s `chat_template` (the one
    /// named `default` when it lists several), else `chat_template.jinja`,
    /// else `chat_template.json`'s.
    pub fn chat_template(&self) -> Result<String, HfError> {
        let path = self.dir.join(TOKENIZER_CONFIG_FILE);
        match self.tokenizer_config.get("chat_template") {
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(Value::Array(named)) => {
                let pick = named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| named.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str);
                return pick.map(str::to_owned).ok_or_else(|| HfError::Invalid {
                    path,
                    reason: "chat_template lists no {name, template} entry".into(),
                });
            }
            Some(Value::Null) | None => {}
            Some(_) => {
                return Err(HfError::Invalid {
                    path,
                    reason: "chat_template is neither a string nor a list".into(),
                });
            }
        }
        let jinja = self.dir.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja).map_err(|source| HfError::Io {
                path: jinja,
                source,
            });
        }
        let json = self.dir.join("chat_template.json");
        if json.is_file() {
            let v = read_json(&json)?;
            return v
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| HfError::Invalid {
                    path: json,
                    reason: "no chat_template string".into(),
                });
        }
        Err(HfError::Invalid {
            path,
            reason: "no chat_template (nor chat_template.jinja or chat_template.json)".into(),
        })
    }

    /// Token ids that end a generation besides the tokenizer's EOS:
    /// `config.json`'s and `generation_config.json`'s `eos_token_id`.
    pub fn end_token_ids(&self) -> Vec<u32> {
        [&self.config.eos_token_id, &self.generation_eos]
            .into_iter()
            .flatten()
            .flat_map(TokenIds::ids)
            .collect()
    }
}

/// Parses the JSON file at `path`.
pub(crate) fn read_json(path: &Path) -> Result<Value, HfError> {
    let bytes = std::fs::read(path).map_err(|source| HfError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| HfError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Parses the JSON file at `path`, or `Null` when there is none.
fn read_optional_json(path: &Path) -> Result<Value, HfError> {
    if path.exists() {
        read_json(path)
    } else {
        Ok(Value::Null)
    }
}
