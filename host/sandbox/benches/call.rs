//! Per-call cost of a plugin, for the template and the router plugins:
//! with a fresh instance per call (instantiate, `init`, `on-request`) and
//! with reused instances (`on-request` alone). `cargo bench -p
//! breakwater-sandbox`.

#[path = "../tests/integration/common/mod.rs"]
mod common;

use std::hint::black_box;

use breakwater_sandbox::{Isolation, PluginSpec};
use criterion::{Criterion, criterion_group, criterion_main};

const REUSED: Isolation = Isolation::Reused {
    recycle_after: u64::MAX,
};

/// Benchmarks `spec` called with `request`, both ways.
fn both_ways(
    c: &mut Criterion,
    label: &str,
    spec: PluginSpec,
    request: &breakwater_sandbox::Request,
) {
    let sandbox = common::sandbox();
    for (isolation, way) in [
        (Isolation::PerRequest, "instantiate + init + on_request"),
        (REUSED, "reused instance, on_request"),
    ] {
        let mut spec = spec.clone();
        spec.isolation = isolation;
        let plugin = sandbox.load(spec).expect("load the plugin");
        c.bench_function(&format!("{label}: {way}"), |b| {
            b.iter(|| black_box(plugin.on_request(black_box(request)).expect("call")));
        });
    }
}

fn template(c: &mut Criterion) {
    let spec = common::spec("template", "template", r#"{"deny_prefixes":["/admin"]}"#);
    both_ways(c, "template", spec, &common::get("/v1/chat/completions"));
}

/// The router with a realistic rule set: host and prefix rules and a sticky
/// canary split, so `init` parses real configuration.
const ROUTER_CONFIG: &str = r#"{
  "rules": [
    {"host": "*.internal.example", "pool": "internal"},
    {"path_prefix": "/v1/embeddings", "pool": "embeddings"},
    {"path_prefix": "/v1/", "split": [{"pool": "stable", "weight": 95}, {"pool": "canary", "weight": 5}],
     "sticky": {"header": "x-user-id"}}
  ],
  "default_pool": "web"
}"#;

fn router(c: &mut Criterion) {
    let spec = common::spec("router", "router", ROUTER_CONFIG);
    let request = common::with_header(common::get("/v1/chat/completions"), "x-user-id", "user-42");
    both_ways(c, "router", spec, &request);
}

criterion_group!(benches, template, router);
criterion_main!(benches);
