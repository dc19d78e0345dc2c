//! Failures and plugin metrics reach the node's Prometheus metrics.

use crate::common::{get, load_all_granted, sandbox, spec};
use breakwater_sandbox::FailureKind;
use metrics_exporter_prometheus::PrometheusBuilder;

#[test]
fn failures_are_counted_by_plugin_and_kind_and_plugin_metrics_are_exported() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let sandbox = sandbox();
        let trap = sandbox
            .load(spec("trapper", "fixture_misbehave", r#"{"mode":"trap"}"#))
            .expect("load");
        for _ in 0..2 {
            let error = trap.on_request(&get("/")).expect_err("traps");
            assert_eq!(error.kind, FailureKind::Trap);
        }
        let calls = load_all_granted(&sandbox, "observer", "fixture_host_calls");
        calls.on_request(&get("/observe")).expect("call");
    });
    let text = handle.render();
    assert!(
        text.contains(r#"breakwater_plugin_failures_total{plugin="trapper",kind="trap"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"breakwater_plugin_observations_total{plugin="observer",path="observe"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("breakwater_plugin_call_seconds"), "{text}");
}
