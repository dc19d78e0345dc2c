//! The host capabilities through a real component: kv, counters, log,
//! clock, metrics; and the template's behaviour.

use std::time::Duration;

use crate::common::{get, load_all_granted, sandbox, sandbox_on_manual_clock, spec};
use breakwater_sandbox::{RequestDecision, Response, ResponseDecision, ResponseHead};

fn respond(decision: RequestDecision) -> Response {
    match decision {
        RequestDecision::Respond(response) => response,
        other => panic!("expected a response, got {other:?}"),
    }
}

fn header<'r>(response: &'r Response, name: &str) -> &'r str {
    response
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

#[test]
fn kv_get_set_delete_and_ttl() {
    let (sandbox, clock) = sandbox_on_manual_clock();
    let plugin = load_all_granted(&sandbox, "calls", "fixture_host_calls");
    let call = |path: &str| respond(plugin.on_request(&get(path)).expect(path).decision);

    assert_eq!(call("/kv/get/colour").status, 404);
    assert_eq!(call("/kv/set/colour/blue").status, 200);
    let got = call("/kv/get/colour");
    assert_eq!((got.status, got.body.as_slice()), (200, &b"blue"[..]));
    assert_eq!(call("/kv/delete/colour").status, 200);
    assert_eq!(call("/kv/get/colour").status, 404);

    assert_eq!(call("/kv/set/brief/here?ttl=300").status, 200);
    clock.advance(Duration::from_millis(299));
    assert_eq!(call("/kv/get/brief").status, 200);
    clock.advance(Duration::from_millis(1));
    assert_eq!(call("/kv/get/brief").status, 404, "expired");

    // Another plugin has its own namespace.
    let other = load_all_granted(&sandbox, "other", "fixture_host_calls");
    assert_eq!(call("/kv/set/shared/no").status, 200);
    let seen = respond(
        other
            .on_request(&get("/kv/get/shared"))
            .expect("call")
            .decision,
    );
    assert_eq!(seen.status, 404);
}

#[test]
fn counters_take_honours_rate_and_burst() {
    let (sandbox, clock) = sandbox_on_manual_clock();
    let plugin = load_all_granted(&sandbox, "calls", "fixture_host_calls");
    let take = |query: &str| {
        respond(
            plugin
                .on_request(&get(&format!("/take/{query}")))
                .expect(query)
                .decision,
        )
    };

    // 1/s with a burst of 3: three at once, then one a second (the clock
    // moves only when the test says).
    for remaining in ["2", "1", "0"] {
        let taken = take("k?cost=1&rate=1&burst=3");
        assert_eq!(header(&taken, "x-allowed"), "true");
        assert_eq!(header(&taken, "x-remaining"), remaining);
    }
    let refused = take("k?cost=1&rate=1&burst=3");
    assert_eq!(header(&refused, "x-allowed"), "false");
    assert_eq!(header(&refused, "x-remaining"), "0");
    let retry: u64 = header(&refused, "x-retry-after-ms")
        .parse()
        .expect("number");
    assert_eq!(retry, 1000);
    clock.advance(Duration::from_millis(retry));
    assert_eq!(
        header(&take("k?cost=1&rate=1&burst=3"), "x-allowed"),
        "true"
    );

    // Costs take several tokens; a cost above the burst is an error.
    assert_eq!(
        header(&take("c?cost=5&rate=1&burst=5"), "x-allowed"),
        "true"
    );
    assert_eq!(
        header(&take("c?cost=1&rate=1&burst=5"), "x-allowed"),
        "false"
    );
    assert_eq!(take("c?cost=6&rate=1&burst=5").status, 400);

    // Buckets are shared by all instances of the plugin, not by other plugins.
    let other = load_all_granted(&sandbox, "other", "fixture_host_calls");
    let theirs = respond(
        other
            .on_request(&get("/take/c?cost=5&rate=1&burst=5"))
            .expect("call")
            .decision,
    );
    assert_eq!(header(&theirs, "x-allowed"), "true");
}

#[test]
fn log_clock_and_metrics_are_callable() {
    let sandbox = sandbox();
    let plugin = load_all_granted(&sandbox, "calls", "fixture_host_calls");
    let observed = respond(plugin.on_request(&get("/observe")).expect("call").decision);
    assert_eq!(observed.status, 200);
    let now: u64 = header(&observed, "x-now-ms").parse().expect("number");
    assert!(now > 1_700_000_000_000, "wall clock in ms: {now}");
}

#[test]
fn the_template_stamps_a_header_and_denies_configured_prefixes() {
    let sandbox = sandbox();
    let plugin = sandbox
        .load(spec(
            "template",
            "template",
            r#"{"header":"x-edge","value":"bw","deny_prefixes":["/admin"]}"#,
        ))
        .expect("load");
    match plugin
        .on_request(&get("/public?x=1"))
        .expect("call")
        .decision
    {
        RequestDecision::ContinueWith(changes) => {
            assert_eq!(
                changes.set_headers,
                vec![("x-edge".to_owned(), "bw".to_owned())]
            );
        }
        other => panic!("expected changes, got {other:?}"),
    }
    let denied = respond(
        plugin
            .on_request(&get("/admin/users"))
            .expect("call")
            .decision,
    );
    assert_eq!(denied.status, 403);
    assert!(String::from_utf8_lossy(&denied.body).contains("req-1"));

    let head = ResponseHead {
        status: 200,
        headers: vec![],
    };
    match plugin
        .on_response(&get("/public"), &head, None)
        .expect("call")
    {
        ResponseDecision::ContinueWith(changes) => {
            assert_eq!(
                changes.set_headers,
                vec![("x-edge".to_owned(), "bw".to_owned())]
            );
        }
        other => panic!("expected changes, got {other:?}"),
    }
}
