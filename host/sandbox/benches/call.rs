//! Per-call cost of a plugin: a fresh instance, `init` and `on-request`,
//! for the template plugin. `cargo bench -p breakwater-sandbox`.

#[path = "../tests/common/mod.rs"]
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

criterion_group!(benches, instantiate_and_on_request);
criterion_main!(benches);
