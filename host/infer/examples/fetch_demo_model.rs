//! Fetches the demo model into `<workspace>/.cache/models` unless it is
//! already there, puts it into the local model store
//! (`<workspace>/.cache/model-store`, which `breakwater up` serves it from)
//! unless it is there, and prints the model file's path. `cargo xtask up`
//! and `cargo xtask test` run this, so the logic lives in one place
//! ([`breakwater_infer::demo_model`]).

use breakwater_infer::demo_model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = demo_model::default_dir();
    let path = demo_model::ensure(&dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(demo_model::ensure_store(
        &dir,
        &demo_model::default_store_dir(),
    ))?;
    println!("{}", path.display());
    Ok(())
}
