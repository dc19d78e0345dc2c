//! The plugin ABI's versions and phases: a component built against 0.1.0
//! still loads and answers through the host's adapter; one built against
//! 0.2.0 links against 0.2.1's interfaces; a plugin's phases are what it
//! implements; the context from `on-request` is bounded.

use crate::common::{get, sandbox, spec};
use breakwater_sandbox::{
    Capability, FailureKind, Isolation, LoadError, Phases, RequestDecision, ResponseDecision,
    ResponseHead,
};

fn head() -> ResponseHead {
    ResponseHead {
        status: 200,
        headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
    }
}

#[test]
fn a_plugin_built_against_abi_0_1_loads_and_answers_both_phases() {
    let sandbox = sandbox();
    for isolation in [
        Isolation::PerRequest,
        Isolation::Reused { recycle_after: 10 },
    ] {
        let mut spec = spec("old", "fixture_abi_v0_1", "");
        spec.grants.insert(Capability::Log);
        spec.isolation = isolation;
        let plugin = sandbox.load(spec).expect("a 0.1.0 component loads");
        assert_eq!(plugin.abi_version(), "0.1.0");
        assert_eq!(plugin.phases(), Phases::REQUEST | Phases::RESPONSE);

        for _ in 0..3 {
            let outcome = plugin.on_request(&get("/old")).expect("on-request");
            assert_eq!(outcome.context, None, "0.1.0 has no context");
            match outcome.decision {
                RequestDecision::ContinueWith(changes) => assert_eq!(
                    changes.set_headers,
                    [("x-abi".to_owned(), "0.1.0".to_owned())]
                ),
                other => panic!("unexpected {other:?}"),
            }
            // A context handed to a 0.1.0 plugin is dropped by the adapter.
            match plugin
                .on_response(&get("/old"), &head(), Some(b"ignored"))
                .expect("on-response")
            {
                ResponseDecision::ContinueWith(changes) => assert_eq!(
                    changes.set_headers,
                    [("x-abi-response".to_owned(), "/old".to_owned())]
                ),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn a_0_1_plugin_still_needs_its_grants_and_may_refuse_its_configuration() {
    let sandbox = sandbox();
    // It imports `log` (at 0.1.0): without the grant it does not load.
    let refused = sandbox
        .load(spec("old", "fixture_abi_v0_1", ""))
        .expect_err("log is not granted");
    assert!(
        matches!(
            &refused,
            LoadError::NotGranted { capability: "log", import, .. } if import.contains("@0.1.0")
        ),
        "{refused:?}"
    );

    let mut refusing = spec("old", "fixture_abi_v0_1", "\"refuse\"");
    refusing.grants.insert(Capability::Log);
    match sandbox.load(refusing).expect_err("init refuses") {
        LoadError::Config { message, .. } => assert_eq!(message, "refused on purpose"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_plugin_has_the_phases_it_implements() {
    let sandbox = sandbox();
    let phases = |name: &str, component: &str, grants: &[Capability]| {
        let mut spec = spec(name, component, "");
        spec.grants.extend(grants.iter().copied());
        let plugin = sandbox.load(spec).expect("load");
        assert_eq!(plugin.abi_version(), "0.2.1", "{name}");
        plugin.phases()
    };
    // The bundled chain: only rate-limit looks at answers.
    assert_eq!(phases("router", "router", &[]), Phases::REQUEST);
    assert_eq!(phases("waf", "waf", &[]), Phases::REQUEST);
    assert_eq!(phases("cache-policy", "cache_policy", &[]), Phases::REQUEST);
    assert_eq!(
        phases("rate-limit", "rate_limit", &[Capability::Counters]),
        Phases::REQUEST | Phases::RESPONSE
    );
    assert_eq!(
        phases("template", "template", &[]),
        Phases::REQUEST | Phases::RESPONSE
    );
}

#[test]
fn a_context_over_the_limit_fails_the_call_that_leaves_it() {
    let sandbox = sandbox();
    let mut spec = spec("big", "fixture_misbehave", r#"{"mode": "big-context"}"#);
    spec.isolation = Isolation::Reused { recycle_after: 100 };
    let plugin = sandbox.load(spec).expect("load");
    for _ in 0..2 {
        let error = plugin.on_request(&get("/")).expect_err("context too big");
        assert_eq!(error.kind, FailureKind::InvalidDecision, "{error}");
        assert!(error.message.contains("context"), "{error}");
    }
}

#[test]
fn a_plugin_built_against_abi_0_2_0_links_against_0_2_1() {
    let sandbox = sandbox();
    let mut spec = spec("older", "fixture_abi_v0_2_0", "");
    spec.grants.insert(Capability::Counters);
    let plugin = sandbox.load(spec).expect("a 0.2.0 component loads");
    assert_eq!(plugin.abi_version(), "0.2.1");
    assert_eq!(plugin.phases(), Phases::REQUEST);
    // Its `counters@0.2.0` import is the host's 0.2.1 bucket store: the
    // burst of 1 is taken, then refused.
    for allowed in [true, false] {
        match plugin.on_request(&get("/")).expect("on-request").decision {
            RequestDecision::ContinueWith(changes) => assert_eq!(
                changes.set_headers,
                [("x-abi".to_owned(), format!("0.2.0 allowed={allowed}"))]
            ),
            other => panic!("unexpected {other:?}"),
        }
    }
}
