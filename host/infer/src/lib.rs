//! The GPU host runtime's inference engine: model files, tokenizers, chat
//! templates, llama-family models and the backends they run on.
//!
//! Layers, each usable and testable alone:
//!
//! - [`gguf`] reads model files; [`quant`] knows their block formats;
//!   [`hf`] reads Hugging Face model directories (safetensors); [`loader`]
//!   opens either kind.
//! - [`tokenizer`] and [`chat_template`] turn chat messages into token ids.
//! - [`model`] holds architectures, whose forward passes read like the math.
//! - [`backend`] runs the kernels those passes call.
//! - [`generate`] and [`sampling`] turn logits into tokens.
//! - [`scheduler`] batches many sequences continuously on one engine
//!   thread; [`server`] puts the OpenAI-compatible API in front of it and
//!   [`telemetry`] counts what happens.
//! - [`demo_model`] fetches the model the demo serves; [`test_model`] writes
//!   random ones for tests, as GGUF or as Hugging Face directories.

pub mod backend;
pub mod chat_template;
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
