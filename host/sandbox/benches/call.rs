//! Per-call cost of a plugin: a fresh instance, `init` and `on-request`,
//! for the template and the router plugins. `cargo bench -p breakwater-sandbox`.

#[path = "../tests/integration/common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn instantiate_and_on_request(c: &mut Criterion) {
    let sandbox = common::sandbox();
    let plugin = sandbox
        .load(common::spec(
            "template",
            "template",
            r#"{"deny_prefixes":["/admin"]}"#,
        ))
        .expect("load the template plugin");
    let request = common::get("/v1/chat/completions");
    c.bench_function("template: instantiate + init + on_request", |b| {
        b.iter(|| black_box(plugin.on_request(black_box(&request)).expect("call")));
    });
}

/// The router with a realistic rule set: host and prefix rules and a sticky
/// canary split, so `init` parses real configuration on every call.
const ROUTER_CONFIG: &str = r#"{
  "rules": [
    {"host": "*.internal.example", "pool": "internal"},
    {"path_prefix": "/v1/embeddings", "pool": "embeddings"},
    {"path_prefix": "/v1/", "split": [{"pool": "stable", "weight": 95}, {"pool": "canary", "weight": 5}],
     "sticky": {"header": "x-user-id"}}
  ],
  "default_pool": "web"
}"#;

fn router_on_request(c: &mut Criterion) {
    let sandbox = common::sandbox();
    let plugin = sandbox
        .load(common::spec("router", "router", ROUTER_CONFIG))
        .expect("load the router plugin");
    let request = common::with_header(common::get("/v1/chat/completions"), "x-user-id", "user-42");
    c.bench_function("router: instantiate + init + on_request", |b| {
        b.iter(|| black_box(plugin.on_request(black_box(&request)).expect("call")));
    });
}

criterion_group!(benches, instantiate_and_on_request, router_on_request);
criterion_main!(benches);
