//! The CUDA backend: the llama forward pass on an NVIDIA GPU through
//! `cudarc`, with cuBLAS GEMMs in f16 (f32 accumulation) for every
//! projection and NVRTC-compiled kernels ([`kernels`]) for the rest.
//!
//! Nothing CUDA is linked: the driver, NVRTC and cuBLAS are loaded at run
//! time, so the same binary builds and runs on machines without them.
//! cudarc panics when it cannot load a library, so every entry point here
//! checks first ([`require_library`]) and turns absence into a
//! [`CudaError`]; the caller then falls back to the CPU.

pub mod kernels;
mod runner;

use std::path::Path;
use std::sync::OnceLock;

pub use runner::{CudaRunner, CudaSequence};

/// Why the CUDA backend is unavailable or failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library is not on the loader's path.
    #[error("{0} was not found (no NVIDIA driver or CUDA libraries on the library path)")]
    LibraryMissing(&'static str),
    /// The driver loaded but reports no device.
    #[error("the NVIDIA driver reports no CUDA device")]
    NoDevice,
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0:?}")]
    Blas(cudarc::cublas::result::CublasError),
    /// NVRTC rejected the kernels; the log names the line.
    #[error("compiling the CUDA kernels: {0}")]
    Compile(String),
    /// The model has a shape the kernels do not handle.
    #[error("the CUDA backend cannot run this model: {0}")]
    Unsupported(String),
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Blas(e)
    }
}

/// The run-time libraries the backend needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// `libcuda`, the driver.
    Driver,
    /// `libnvrtc`, the kernel compiler.
    Nvrtc,
    /// `libcublas`.
    Cublas,
}

impl Library {
    fn name(self) -> &'static str {
        match self {
            Library::Driver => "libcuda (the NVIDIA driver)",
            Library::Nvrtc => "libnvrtc (NVRTC)",
            Library::Cublas => "libcublas (cuBLAS)",
        }
    }
}

/// Fails unless `library` can be loaded; cudarc would panic on first use
/// otherwise. Each answer is looked up once per process.
pub fn require_library(library: Library) -> Result<(), CudaError> {
    static DRIVER: OnceLock<bool> = OnceLock::new();
    static NVRTC: OnceLock<bool> = OnceLock::new();
    static CUBLAS: OnceLock<bool> = OnceLock::new();
    // SAFETY: these only try to dlopen the library by its usual names.
    let present = match library {
        Library::Driver => {
            *DRIVER.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
        }
        Library::Nvrtc => *NVRTC.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }),
        Library::Cublas => {
            *CUBLAS.get_or_init(|| unsafe { cudarc::cublas::sys::is_culib_present() })
        }
    };
    if present {
        Ok(())
    } else {
        Err(CudaError::LibraryMissing(library.name()))
    }
}

/// Loads `dir/libnvrtc.so.12` (or `.13`) for good, so that cudarc's later
/// lookup by soname finds it without `LD_LIBRARY_PATH`. For tests and tools
/// that keep NVRTC in a cache directory; returns whether one was loaded.
pub fn preload_nvrtc(dir: &Path) -> bool {
    ["libnvrtc.so.13", "libnvrtc.so.12"].iter().any(|name| {
        let path = dir.join(name);
        if !path.is_file() {
            return false;
        }
        // SAFETY: NVRTC's initialisers only set up its own state.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => {
                // Kept loaded for the life of the process on purpose.
                std::mem::forget(lib);
                true
            }
            Err(_) => false,
        }
    })
}

/// The PTX target for a device of compute capability `major.minor`: its own
/// where NVRTC knows it, else the newest older one (PTX runs forward).
pub fn ptx_arch(major: i32, minor: i32) -> &'static str {
    const KNOWN: [(i32, i32, &str); 9] = [
        (12, 0, "compute_120"),
        (10, 0, "compute_100"),
        (9, 0, "compute_90"),
        (8, 9, "compute_89"),
        (8, 6, "compute_86"),
        (8, 0, "compute_80"),
        (7, 5, "compute_75"),
        (7, 0, "compute_70"),
        (6, 0, "compute_60"),
    ];
    KNOWN
        .iter()
        .find(|&&(ma, mi, _)| (major, minor) >= (ma, mi))
        .map_or("compute_60", |&(_, _, arch)| arch)
}

/// Whether a CUDA device can be used here, and if not, why.
pub fn probe() -> Result<usize, CudaError> {
    require_library(Library::Driver)?;
    let count = cudarc::driver::CudaContext::device_count()?;
    if count <= 0 {
        return Err(CudaError::NoDevice);
    }
    require_library(Library::Nvrtc)?;
    require_library(Library::Cublas)?;
    Ok(count as usize)
}

/// The NVRTC wheel tests compile the kernels with (`nvidia-cuda-nvrtc-cu12`),
/// no newer than the CUDA 13.0 driver of the target GPUs supports.
pub const NVRTC_WHEEL_VERSION: &str = "12.9.86";

const NVRTC_WHEEL: breakwater_store::wheel::PinnedWheelFile =
    breakwater_store::wheel::PinnedWheelFile {
        requirement: "nvidia-cuda-nvrtc-cu12==12.9.86",
        wheel_file: "nvidia_cuda_nvrtc_cu12-12.9.86-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl",
        wheel_sha256: "210cf05005a447e29214e9ce50851e83fc5f4358df8b453155d5e1918094dcb4",
        platform: Some("manylinux2010_x86_64"),
        member: "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
        member_sha256: "7c67c6b51ea0e0279634cebd676ff7efda1674806444520c84430ad5c35fe625",
        executable: false,
    };

/// NVRTC loads its built-in headers from this library, found beside it.
const NVRTC_BUILTINS: breakwater_store::wheel::PinnedWheelFile =
    breakwater_store::wheel::PinnedWheelFile {
        member: "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.9",
        member_sha256: "6507cf33450cfb22970c2c1e7aa8e7c0a33e39d864720277b05f61a92791e2e8",
        ..NVRTC_WHEEL
    };

/// Where the test setup keeps NVRTC: `<workspace>/.cache/nvrtc-<version>`.
pub fn cached_nvrtc_dir(workspace: &Path) -> std::path::PathBuf {
    workspace.join(format!(".cache/nvrtc-{NVRTC_WHEEL_VERSION}"))
}

/// Installs NVRTC (about 90 MB from PyPI, sha256-pinned) into
/// [`cached_nvrtc_dir`] unless it is there, so the kernel-compile test runs
/// on machines without CUDA. Returns the directory.
pub fn ensure_cached_nvrtc(
    workspace: &Path,
) -> Result<std::path::PathBuf, breakwater_store::wheel::WheelError> {
    let dir = cached_nvrtc_dir(workspace);
    std::fs::create_dir_all(&dir).map_err(|source| breakwater_store::wheel::WheelError::Io {
        what: "creating",
        path: dir.clone(),
        source,
    })?;
    // The builtins first: a present libnvrtc.so.12 then means both are.
    NVRTC_BUILTINS.ensure(&dir.join("libnvrtc-builtins.so.12.9"))?;
    NVRTC_WHEEL.ensure(&dir.join("libnvrtc.so.12"))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_arch_picks_the_newest_known_not_above_the_device() {
        assert_eq!(ptx_arch(9, 0), "compute_90");
        assert_eq!(ptx_arch(8, 7), "compute_86");
        assert_eq!(ptx_arch(13, 0), "compute_120");
        assert_eq!(ptx_arch(5, 0), "compute_60");
    }

    /// NVRTC from the pinned `nvidia-cuda-nvrtc-cu12` wheel, which
    /// `cargo xtask test` unpacks into `.cache/nvrtc-<version>/`.
    fn nvrtc_from_cache() -> Result<(), String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = cached_nvrtc_dir(&root);
        preload_nvrtc(&dir);
        require_library(Library::Nvrtc).map_err(|e| {
            format!(
                "{e}; `cargo xtask test` installs NVRTC into {} (or put libnvrtc on LD_LIBRARY_PATH)",
                dir.display()
            )
        })
    }

    /// Runs without a GPU: NVRTC compiles for a device it is only told
    /// about. Any error in the kernel source fails here, in CI.
    #[test]
    fn every_kernel_compiles_to_ptx_for_compute_90() {
        if let Err(why) = nvrtc_from_cache() {
            panic!("{why}");
        }
        let ptx = kernels::compile("compute_90").unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        assert!(text.contains(".target sm_90"), "PTX targets another arch");
        for name in kernels::KERNELS {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "kernel {name} is missing from the PTX"
            );
        }
    }
}
