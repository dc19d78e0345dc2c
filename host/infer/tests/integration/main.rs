//! Integration tests of the inference runtime: model files, kernels and the API server.
//!
//! One test binary per crate: every file here is a module of it, so the
//! workspace links a handful of test executables instead of one per file
//! (each links the whole dependency tree; CI's disk and link time pay for
//! every one). nextest still runs each test in its own process.

mod support;

mod chat_control_tokens;
mod cuda_parity;
mod gpu_host_lifecycle;
mod hf_layout;
mod llama_cpp_reference;
mod openai_python;
mod prefix_cache;
mod server_listener;
mod server_resume;
mod server_smollm2;
mod server_swap;
mod server_tiny;
mod smollm2;
mod tiny_llama;
