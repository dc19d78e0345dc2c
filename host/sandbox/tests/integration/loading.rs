//! What gets loaded: the sha256 pin, granted capabilities, configuration,
//! and the precompiled cache.

use crate::common::{component, get, sandbox, spec};
use breakwater_sandbox::{Capability, LoadError, Sandbox, SandboxConfig};

#[test]
fn a_sha256_mismatch_refuses_to_load() {
    let sandbox = sandbox();
    let mut spec = spec("template", "template", "");
    let pinned = spec.sha256.clone();
    spec.sha256 = "0".repeat(64);
    let error = sandbox.load(spec).expect_err("wrong pin");
    assert!(matches!(error, LoadError::Sha256Mismatch { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&pinned) && message.contains(&"0".repeat(64)),
        "{message}"
    );
}

#[test]
fn the_pin_accepts_a_prefix_and_upper_case() {
    let sandbox = sandbox();
    let mut spec = spec("template", "template", "");
    spec.sha256 = format!("sha256:{}", spec.sha256.to_uppercase());
    sandbox.load(spec).expect("same digest, other spelling");
}

#[test]
fn an_ungranted_import_refuses_to_load_naming_it() {
    let sandbox = sandbox();
    let mut spec = spec("calls", "fixture_host_calls", "");
    spec.grants
        .extend(Capability::ALL.into_iter().filter(|c| *c != Capability::Kv));
    let error = sandbox.load(spec).expect_err("kv is not granted");
    match &error {
        LoadError::NotGranted {
            capability, import, ..
        } => {
            assert_eq!(*capability, "kv");
            assert!(import.starts_with("breakwater:plugin/kv"), "{import}");
        }
        other => panic!("expected NotGranted, got {other}"),
    }
    assert!(error.to_string().contains("\"kv\""), "{error}");
}

#[test]
fn a_plugin_importing_nothing_loads_with_no_grants() {
    let sandbox = sandbox();
    sandbox
        .load(spec("template", "template", ""))
        .expect("load");
}

#[test]
fn a_missing_artifact_is_a_read_error() {
    let sandbox = sandbox();
    let mut spec = spec("template", "template", "");
    spec.path = component("no_such_plugin");
    assert!(matches!(sandbox.load(spec), Err(LoadError::Read { .. })));
}

#[test]
fn a_configuration_the_plugin_rejects_refuses_to_load() {
    let sandbox = sandbox();
    for config in [r#"{"header":""}"#, r#"{"no_such_field":1}"#, "not json"] {
        let error = sandbox
            .load(spec("template", "template", config))
            .expect_err(config);
        assert!(
            matches!(error, LoadError::Config { .. }),
            "{config}: {error}"
        );
    }
}

#[test]
fn precompiled_components_are_cached_and_reused() {
    let cache = tempfile::tempdir().expect("tempdir");
    let config = SandboxConfig {
        max_concurrent_instances: 8,
        cache_dir: Some(cache.path().to_owned()),
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(config.clone()).expect("sandbox");
    sandbox
        .load(spec("template", "template", ""))
        .expect("first load compiles");
    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].extension().is_some_and(|e| e == "cwasm"));

    // A second sandbox with the same settings loads from the cache.
    let again = Sandbox::new(config).expect("sandbox");
    let plugin = again
        .load(spec("template", "template", ""))
        .expect("cached load");
    plugin.on_request(&get("/")).expect("call");

    // A corrupt entry is recompiled, not trusted.
    std::fs::write(&entries[0], b"garbage").expect("corrupt");
    let plugin = again
        .load(spec("template", "template", ""))
        .expect("recompiled");
    plugin.on_request(&get("/")).expect("call");
}
