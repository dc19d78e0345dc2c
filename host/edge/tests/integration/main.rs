//! Integration tests of the edge node against real upstreams and real plugins.
//!
//! One test binary per crate: every file here is a module of it, so the
//! workspace links a handful of test executables instead of one per file
//! (each links the whole dependency tree; CI's disk and link time pay for
//! every one). nextest still runs each test in its own process.

mod common;

mod cache;
mod limits;
mod listener;
mod plugin_url;
mod plugins;
mod proxy;
mod reload;
mod request_hygiene;
mod shared_cache;
mod static_assets;
