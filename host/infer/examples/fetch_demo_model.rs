//! Fetches the demo model into `<workspace>/.cache/models` unless it is
//! already there, and prints its path. `cargo xtask up` and `cargo xtask
//! test` run this, so the fetching logic lives in one place
//! ([`breakwater_infer::demo_model::ensure`]).

fn main() -> Result<(), breakwater_infer::demo_model::DemoModelError> {
    let dir = breakwater_infer::demo_model::default_dir();
    let path = breakwater_infer::demo_model::ensure(&dir)?;
    println!("{}", path.display());
    Ok(())
}
