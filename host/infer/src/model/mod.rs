//! Model architectures. Each reads its hyperparameters and weights from a
//! model file (GGUF, or a Hugging Face directory) and runs its forward pass
//! on a backend.
//!
//! The engine and the backends see a model through what is neutral here:
//! [`Model`] (one variant per architecture), its [`ModelShape`] and the
//! [`Step`]s of a batched forward pass. A new architecture is a module and a
//! variant.

pub mod llama;

use crate::gguf::{Gguf, GgufError};
use crate::hf::{HfDir, HfError};

use self::llama::Llama;

/// What the engine and the backends need to know of a model, whatever its
/// architecture: its KV cache's shape, its vocabulary and its context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Decoder layers, each with its own keys and values.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Tokens in the vocabulary (the logits' length).
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
}

impl ModelShape {
    /// Keys (or values) per token per layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One sequence's part in a batched step of any backend's forward pass.
#[derive(Debug)]
pub struct Step<'a, S = llama::State> {
    /// The tokens to feed: one while decoding, a chunk of the prompt while
    /// prefilling.
    pub tokens: &'a [u32],
    /// The sequence they extend.
    pub state: &'a mut S,
}

/// A loaded model, of whichever architecture its file names.
#[derive(Debug)]
pub enum Model {
    /// The llama family (Llama, SmolLM2, …).
    Llama(Llama),
}

impl Model {
    /// The model in a parsed GGUF file (`general.architecture`).
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        match gguf.str("general.architecture")? {
            "llama" => Ok(Self::Llama(Llama::from_gguf(gguf)?)),
            other => Err(ModelError::UnsupportedArchitecture(other.to_owned())),
        }
    }

    /// The model in a Hugging Face model directory (`model_type`).
    pub fn from_hf(dir: &HfDir) -> Result<Self, ModelError> {
        // The llama reader checks config.json itself and says what it
        // found when that is no llama.
        Ok(Self::Llama(Llama::from_hf(dir)?))
    }

    /// Its shape.
    pub fn shape(&self) -> ModelShape {
        match self {
            Self::Llama(m) => m.config().shape(),
        }
    }

    /// The architecture's name, for logs.
    pub fn architecture(&self) -> &'static str {
        match self {
            Self::Llama(_) => "llama",
        }
    }
}

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file is unreadable or lacks a tensor or key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The Hugging Face model directory is unreadable, or lacks or
    /// misshapes a tensor.
    #[error(transparent)]
    Hf(#[from] HfError),
    /// The file holds an architecture this crate does not implement.
    #[error("architecture {0:?} is not supported (llama is)")]
    UnsupportedArchitecture(String),
    /// Hyperparameters that contradict each other or the weights.
    #[error("invalid model configuration: {0}")]
    BadConfig(String),
    /// A token id outside the vocabulary.
    #[error("token {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        /// The id given.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A forward pass was asked to feed no tokens.
    #[error("no tokens to feed")]
    NoTokens,
    /// The backend's device failed (a CUDA call, out of device memory).
    #[error("backend: {0}")]
    Backend(String),
    /// The sequence has reached the length its KV cache was sized for.
    #[error("the sequence is full ({capacity} tokens)")]
    ContextFull {
        /// The cache's capacity in tokens.
        capacity: usize,
    },
}
