//! Model architectures. Each reads its hyperparameters and weights from a
//! model file (GGUF, or a Hugging Face directory) and runs its forward pass
//! on a backend.

pub mod llama;

use crate::gguf::GgufError;
use crate::hf::HfError;

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
