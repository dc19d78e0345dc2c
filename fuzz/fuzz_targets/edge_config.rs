//! `edge.toml` as an operator (or a config push) could write it: parsed,
//! validated and resolved, or refused with diagnostics.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(error) = edge_config::parse(text, Path::new("fuzz.toml"), Path::new("/nonexistent"))
    {
        // The diagnostics render the source around each problem.
        let _ = error.to_string();
    }
});
