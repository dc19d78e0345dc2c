//! Integration tests of object storage against a real S3-compatible server.
//!
//! One test binary per crate: every file here is a module of it, so the
//! workspace links a handful of test executables instead of one per file
//! (each links the whole dependency tree; CI's disk and link time pay for
//! every one). nextest still runs each test in its own process.

mod model;
mod s3;
