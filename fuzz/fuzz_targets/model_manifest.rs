//! A version's `manifest.json` as a model store serves it: untrusted.
//! One that parses must survive a round trip through its stored form.
#![no_main]

use breakwater_store::model::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(manifest) = Manifest::parse(bytes, "s3://fuzz/models/m/1/manifest.json", None) else {
        return;
    };
    let _ = (manifest.total_size(), manifest.reference());
    let again = Manifest::parse(&manifest.to_bytes(), "round trip", None)
        .expect("a parsed manifest parses again from its stored form");
    assert_eq!(again, manifest);
});
