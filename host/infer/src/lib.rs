//! The GPU host runtime's inference engine: model files, tokenizers, chat
//! templates, llama-family models and the backends they run on.
//!
//! Layers, each usable and testable alone:
//!
//! - [`gguf`] reads model files; [`quant`] knows their block formats;
//!   [`hf`] reads Hugging Face model directories (safetensors); [`weights`]
//!   is what a model reads from either; [`loader`] opens either kind.
//! - [`tokenizer`] and [`chat_template`] turn chat messages into token ids.
//! - [`cpu`] holds the CPU kernels (quantized dot products, norms,
//!   attention in ggml's order) and the thread pool they run on.
//! - [`model`] holds architectures, whose forward passes read like the math
//!   (on the CPU kernels), behind a neutral [`model::Model`].
//! - [`backend`] runs a model for the scheduler: the CPU runner, or the
//!   CUDA runner with the same arithmetic on a GPU.
//! - [`generate`] and [`sampling`] turn logits into tokens.
//! - [`scheduler`] batches many sequences continuously on one engine
//!   thread; [`server`] puts the OpenAI-compatible API in front of it and
//!   [`telemetry`] counts what happens.
//! - [`demo_model`] fetches the model the demo serves; [`test_model`] writes
//!   random ones for tests, as GGUF or as Hugging Face directories.

pub mod backend;
pub mod chat_template;
pub mod cpu;
pub mod demo_model;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod loader;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod telemetry;
pub mod test_model;
pub mod tokenizer;
pub mod weights;
