//! Shared helpers: the real plugin components, built from `plugins/`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use breakwater_sandbox::{
    Capability, Clock, Limits, LoadedPlugin, ManualClock, PluginSpec, Request, Sandbox,
    SandboxConfig, sha256_hex,
};

const COMPONENTS: &[&str] = &[
    "template",
    "waf",
    "fixture_misbehave",
    "fixture_host_calls",
    "fixture_abi_v0_1",
    "fixture_abi_v0_2_0",
    "rate_limit",
    "router",
    "cache_policy",
];

fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins")
}

/// The directory holding the compiled components, building them once per
/// test process when any is missing. `cargo xtask test` builds them first,
/// so this is only the fallback for a bare `cargo test`; cargo's own lock
/// serializes test processes that build at the same time.
pub fn components() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let plugins = plugins_dir();
        let out = plugins.join("target/wasm32-wasip2/release");
        let missing = COMPONENTS
            .iter()
            .any(|name| !out.join(format!("{name}.wasm")).exists());
        if missing {
            let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .current_dir(&plugins)
                .args([
                    "build",
                    "--release",
                    "--target",
                    "wasm32-wasip2",
                    "--target-dir",
                    "target",
                ])
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "building the plugin components in {} failed; run `cargo xtask test` \
                 (it installs the wasm32-wasip2 target and builds them)",
                plugins.display()
            );
        }
        out
    })
}

/// The path of component `name` (crate name with underscores).
pub fn component(name: &str) -> PathBuf {
    components().join(format!("{name}.wasm"))
}

/// A sandbox with a small pool, so that many can exist in one test process,
/// and a generous CPU deadline: the test machine is shared and loaded, and
/// epochs count wall time, so a 2 ms deadline would fail honest plugins
/// whose thread was merely descheduled. Tests of the deadline itself set
/// [`Limits::default`] on the plugin.
pub fn sandbox() -> Sandbox {
    sandbox_with(Clock::system())
}

/// [`sandbox`] on a clock that moves only when the test advances it:
/// rates, refills and expiries are then exact, however busy the machine.
pub fn sandbox_on_manual_clock() -> (Sandbox, ManualClock) {
    let (clock, hand) = Clock::manual();
    (sandbox_with(clock), hand)
}

fn sandbox_with(clock: Clock) -> Sandbox {
    Sandbox::new(SandboxConfig {
        max_concurrent_instances: 16,
        default_limits: Limits {
            cpu_deadline: Duration::from_millis(500),
            ..Limits::default()
        },
        clock,
        ..SandboxConfig::default()
    })
    .expect("sandbox")
}

/// A spec for component `name`, pinned to its real sha256.
pub fn spec(plugin: &str, component_name: &str, config: &str) -> PluginSpec {
    let path = component(component_name);
    let bytes = std::fs::read(&path).expect("read component");
    let mut spec = PluginSpec::new(plugin, path, sha256_hex(&bytes));
    spec.config = config.to_owned();
    spec
}

/// Loads component `name` with every capability granted.
pub fn load_all_granted(sandbox: &Sandbox, plugin: &str, component_name: &str) -> LoadedPlugin {
    let mut spec = spec(plugin, component_name, "");
    spec.grants.extend(Capability::ALL);
    sandbox.load(spec).expect("load")
}

/// A GET request for `path`.
pub fn get(path: &str) -> Request {
    Request {
        method: "GET".to_owned(),
        host: "example.test".to_owned(),
        path: path.to_owned(),
        headers: vec![("user-agent".to_owned(), "test".to_owned())],
        client_ip: "192.0.2.7".to_owned(),
        request_id: "req-1".to_owned(),
        body: None,
    }
}

/// `req` with one more `name: value` header, after any of that name (a
/// repeated header).
pub fn with_header(mut req: Request, name: &str, value: &str) -> Request {
    req.headers.push((name.to_owned(), value.to_owned()));
    req
}

/// `req` with `name: value` replacing any header of that name.
pub fn replace_header(mut req: Request, name: &str, value: &str) -> Request {
    req.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    req.headers.push((name.to_owned(), value.to_owned()));
    req
}

/// `req` addressed to `host`.
pub fn with_host(mut req: Request, host: &str) -> Request {
    req.host = host.to_owned();
    req
}
