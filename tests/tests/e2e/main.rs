//! End-to-end tests against the real breakwater binary.
//!
//! One test binary per crate: every file here is a module of it, so the
//! workspace links a handful of test executables instead of one per file
//! (each links the whole dependency tree; CI's disk and link time pay for
//! every one). nextest still runs each test in its own process.

mod access_log;
mod ai_cache;
mod cache_kill;
mod client_faults;
mod cluster_cache;
mod cluster_limits;
mod config_check;
mod deploy_metrics;
mod drain;
mod gpu_host_device;
mod model_hot_swap;
mod model_store;
mod plugin_cli;
mod plugin_url;
mod reload;
mod stream_resume;
mod token_budgets;
mod traces;
mod up;
mod upstream_gpu_hosts;
mod upstream_resilience;
