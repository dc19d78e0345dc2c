//! Installs NVRTC from its sha256-pinned PyPI wheel into
//! `<workspace>/.cache/nvrtc-<version>` unless it is already there, and
//! prints the directory. `cargo xtask test` runs this so that the CUDA
//! kernels are compiled (to PTX, no GPU needed) by the test suite.

use std::path::Path;

fn main() -> Result<(), breakwater_store::wheel::WheelError> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = breakwater_infer::backend::cuda::ensure_cached_nvrtc(&workspace)?;
    println!("{}", dir.display());
    Ok(())
}
