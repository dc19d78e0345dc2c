//! Integration tests of the plugin sandbox, with the real plugins built from plugins/.
//!
//! One test binary per crate: every file here is a module of it, so the
//! workspace links a handful of test executables instead of one per file
//! (each links the whole dependency tree; CI's disk and link time pay for
//! every one). nextest still runs each test in its own process.

mod common;

mod abi;
mod cache_policy;
mod capabilities;
mod isolation;
mod loading;
mod metrics;
mod rate_limit;
mod router;
mod token_budgets;
mod waf;
