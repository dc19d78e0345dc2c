//! Opening a model for serving, whatever its format: a GGUF file, or a
//! Hugging Face model directory (`config.json`, `tokenizer.json`,
//! `*.safetensors`). Either way the result is the same [`Model`], tokenizer
//! and chat template, so everything downstream runs unchanged.
//!
//! ```
//! # use breakwater_infer::loader::{self, ModelFormat};
//! # use breakwater_infer::test_model::hf::{HfDtype, HfTestShape, write_hf_dir};
//! let dir = tempfile::tempdir().unwrap();
//! write_hf_dir(dir.path(), &HfTestShape::tiny(), 7, HfDtype::F32).unwrap();
//! let loaded = loader::load(dir.path()).unwrap();
//! assert_eq!(loaded.format, ModelFormat::HuggingFace);
//! assert_eq!(loaded.model.shape().vocab_size, 320);
//! assert_eq!(loaded.tokenizer.eos(), 2);
//!
//! let gguf = dir.path().join("tiny.gguf");
//! std::fs::write(&gguf, breakwater_infer::test_model::tiny_llama(7)).unwrap();
//! assert_eq!(loader::load(&gguf).unwrap().format, ModelFormat::Gguf);
//! ```

use std::path::Path;

use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::gguf::{Gguf, Value};
use crate::hf::HfDir;
use crate::model::{Model, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Where a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// One GGUF file.
    Gguf,
    /// A Hugging Face model directory.
    HuggingFace,
}

/// What serving a model needs, read from its files.
#[derive(Debug)]
pub struct LoadedModel {
    /// The weights, in their architecture.
    pub model: Model,
    /// Text ⇄ token ids.
    pub tokenizer: Tokenizer,
    /// Chat messages → prompt.
    pub template: ChatTemplate,
    /// Tokens that end a generation as the files name them: the tokenizer's
    /// EOS first, then GGUF's `eot_token_id` or Hugging Face's
    /// `eos_token_id`s. (The server adds the common end-of-turn tokens.)
    pub end_tokens: Vec<u32>,
    /// The format it was read from.
    pub format: ModelFormat,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The files, the weights or the hyperparameters.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template.
    #[error(transparent)]
    Template(#[from] ChatTemplateError),
}

/// Loads the model at `path`: a directory is read as a Hugging Face model
/// directory, anything else as a GGUF file.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedModel, LoaderError> {
    let path = path.as_ref();
    if path.is_dir() {
        let dir = HfDir::open(path).map_err(ModelError::from)?;
        LoadedModel::from_hf(&dir)
    } else {
        let gguf = Gguf::open(path).map_err(ModelError::from)?;
        LoadedModel::from_gguf(&gguf)
    }
}

impl LoadedModel {
    /// The model, tokenizer and template of a parsed GGUF file.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, LoaderError> {
        let model = Model::from_gguf(gguf)?;
        let tokenizer = Tokenizer::from_gguf(gguf)?;
        let template = ChatTemplate::from_gguf(gguf)?;
        let mut end_tokens = vec![tokenizer.eos()];
        if let Some(eot) = gguf
            .get("tokenizer.ggml.eot_token_id")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
        {
            end_tokens.push(eot);
        }
        Ok(Self {
            model,
            tokenizer,
            template,
            end_tokens,
            format: ModelFormat::Gguf,
        })
    }

    /// The model, tokenizer and template of an opened Hugging Face model
    /// directory.
    pub fn from_hf(dir: &HfDir) -> Result<Self, LoaderError> {
        let model = Model::from_hf(dir)?;
        let tokenizer = Tokenizer::from_hf(dir)?;
        let template = ChatTemplate::from_hf(dir)?;
        let mut end_tokens = vec![tokenizer.eos()];
        for id in dir.end_token_ids() {
            if !end_tokens.contains(&id) {
                end_tokens.push(id);
            }
        }
        Ok(Self {
            model,
            tokenizer,
            template,
            end_tokens,
            format: ModelFormat::HuggingFace,
        })
    }
}
