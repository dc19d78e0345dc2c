//! LLM token budgets through the real host and the bundled `rate-limit`
//! plugin: a request reserves its worst case, is capped to what the budget
//! holds, is refused with the wait when nothing fits, and gives back what
//! its answer did not use when the node settles it.

use std::time::Duration;

use crate::common::{get, sandbox_on_manual_clock, spec, with_header};
use breakwater_sandbox::{
    Capability, LoadedPlugin, Request, RequestDecision, TokenGrants, TokenUsage,
};

/// `k-free`: 1,000 tokens a minute; requests themselves are not scarce.
const CONFIG: &str = r#"{
    "tiers": { "free": { "rate_per_second": 1000, "burst": 1000, "tokens": { "per_minute": 1000 } } },
    "keys": { "k-free": "free" },
    "token_estimate": { "bytes_per_token": 4 }
}"#;

fn load(sandbox: &breakwater_sandbox::Sandbox) -> LoadedPlugin {
    let mut spec = spec("rate-limit", "rate_limit", CONFIG);
    spec.grants.insert(Capability::Counters);
    sandbox.load(spec).expect("load rate-limit")
}

/// A chat completion of exactly `bytes` bytes asking for `max_tokens`.
fn completion(bytes: usize, max_tokens: u32) -> Request {
    let head = format!(
        r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":""#
    );
    let tail = r#""}]}"#;
    let filler = "x".repeat(bytes - head.len() - tail.len());
    let body = format!("{head}{filler}{tail}").into_bytes();
    let mut req = with_header(
        get("/v1/chat/completions"),
        "authorization",
        "Bearer k-free",
    );
    req.method = "POST".to_owned();
    req.body = Some(body);
    req
}

/// The grants of an admitted request; panics on a refusal.
#[track_caller]
fn admitted(plugin: &LoadedPlugin, req: &Request) -> TokenGrants {
    let (outcome, grants) = plugin.on_request_granting(req).expect("call");
    assert!(
        !matches!(outcome.decision, RequestDecision::Respond(_)),
        "refused: {:?}",
        outcome.decision
    );
    grants
}

/// The 429 of a refused request: its `Retry-After` (if any) and body.
#[track_caller]
fn refused(plugin: &LoadedPlugin, req: &Request) -> (Option<String>, String) {
    let (outcome, grants) = plugin.on_request_granting(req).expect("call");
    assert!(grants.is_empty(), "a refusal reserves nothing");
    match outcome.decision {
        RequestDecision::Respond(response) => {
            assert_eq!(response.status, 429);
            let retry_after = response
                .headers
                .iter()
                .find(|(name, _)| name == "retry-after")
                .map(|(_, value)| value.clone());
            (
                retry_after,
                String::from_utf8(response.body).expect("utf-8"),
            )
        }
        other => panic!("admitted: {other:?}"),
    }
}

#[test]
fn a_key_with_1000_tokens_a_minute_is_capped_then_refused_at_the_right_point() {
    let (sandbox, clock) = sandbox_on_manual_clock();
    let plugin = load(&sandbox);
    // 400 bytes: a prompt estimate of 100 tokens, and 300 asked for.
    let req = completion(400, 300);

    let first = admitted(&plugin, &req);
    assert_eq!((first.completion_cap(), first.reserved()), (Some(300), 400));
    assert!(!first.is_reduced());
    let second = admitted(&plugin, &req);
    assert_eq!(second.completion_cap(), Some(300));
    // 200 left: the prompt and 100 of the 300 asked; the cap ends it.
    let third = admitted(&plugin, &req);
    assert_eq!((third.completion_cap(), third.reserved()), (Some(100), 200));
    assert!(third.is_reduced());

    // Nothing left: refused until 101 tokens (the prompt and one) have
    // come back at 1000 a minute: 6.06 s, so `Retry-After: 7`.
    let (retry_after, body) = refused(&plugin, &req);
    assert_eq!(retry_after.as_deref(), Some("7"));
    assert!(
        body.contains(r#""error":"token_budget_exhausted""#),
        "{body}"
    );
    assert!(body.contains(r#""retry_after_ms":6060"#), "{body}");

    // The first answer really used 90 + 10 tokens: 300 come back, enough
    // for a whole request again.
    assert_eq!(
        first.settle(TokenUsage::Generated {
            prompt: 90,
            completion: 10
        }),
        Some(300)
    );
    let fourth = admitted(&plugin, &req);
    assert_eq!(fourth.completion_cap(), Some(200));
    // A cached answer costs `cached_cost` (0): all of it comes back; a
    // request that got no answer (dropped unsettled) too. The first's 100
    // stay spent.
    assert_eq!(second.settle(TokenUsage::Cached), Some(400));
    drop(third);
    assert_eq!(fourth.settle(TokenUsage::Nothing), Some(900));

    // A prompt longer than estimated is charged the rest: 400 reserved,
    // 800 used.
    let fifth = admitted(&plugin, &req);
    assert_eq!(
        fifth.settle(TokenUsage::Generated {
            prompt: 500,
            completion: 300
        }),
        Some(100)
    );
    // And the bucket refills at its rate: 500 in 30 s.
    clock.advance(Duration::from_secs(30));
    let sixth = admitted(&plugin, &completion(400, 1000));
    assert_eq!(sixth.completion_cap(), Some(500));
}

#[test]
fn a_request_that_could_never_fit_and_one_that_is_not_a_post() {
    let (sandbox, _clock) = sandbox_on_manual_clock();
    let plugin = load(&sandbox);
    // 8,000 bytes: an estimated prompt of 2,000 tokens, over the burst.
    let (retry_after, body) = refused(&plugin, &completion(8000, 10));
    assert_eq!(retry_after, None, "waiting would not help");
    assert!(
        body.contains(r#""error":"request_too_large_for_token_budget""#),
        "{body}"
    );
    // Reads reserve nothing.
    let read = with_header(get("/v1/models"), "authorization", "Bearer k-free");
    assert!(admitted(&plugin, &read).is_empty());
}
