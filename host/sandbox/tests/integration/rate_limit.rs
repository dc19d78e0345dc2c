//! The bundled `rate-limit` plugin through the real host, with the
//! `counters` capability granted: bursts, sustained rates, the 429 and its
//! headers, key isolation, costs, and configurations refused at load.

use std::time::Duration;

use crate::common::{get, replace_header, sandbox, sandbox_on_manual_clock, spec};
use breakwater_sandbox::{Capability, LoadError, LoadedPlugin, Request, RequestDecision, Sandbox};

fn try_load(sandbox: &Sandbox, config: &str) -> Result<LoadedPlugin, LoadError> {
    let mut spec = spec("rate-limit", "rate_limit", config);
    spec.grants.insert(Capability::Counters);
    sandbox.load(spec)
}

fn load(sandbox: &Sandbox, config: &str) -> LoadedPlugin {
    try_load(sandbox, config).expect("load rate-limit")
}

fn from_ip(mut req: Request, ip: &str) -> Request {
    req.client_ip = ip.to_owned();
    req
}

/// A refused request's answer.
struct Refusal {
    headers: Vec<(String, String)>,
    body: String,
}

impl Refusal {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no `{name}` header in {:?}", self.headers))
    }

    /// `retry_after_ms` from the JSON body.
    fn retry_after_ms(&self) -> u64 {
        let rest = self
            .body
            .split_once(r#""retry_after_ms":"#)
            .unwrap_or_else(|| panic!("no retry_after_ms in {}", self.body))
            .1;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("retry_after_ms is a number")
    }
}

/// Calls the plugin: `None` when the request continues unchanged, the 429
/// otherwise (anything else fails the test).
#[track_caller]
fn call(plugin: &LoadedPlugin, req: &Request) -> Option<Refusal> {
    match plugin.on_request(req).expect("call").decision {
        RequestDecision::Continue => None,
        RequestDecision::Respond(response) => {
            assert_eq!(response.status, 429);
            let refusal = Refusal {
                headers: response.headers,
                body: String::from_utf8(response.body).expect("utf-8 body"),
            };
            assert_eq!(refusal.header("content-type"), "application/json");
            Some(refusal)
        }
        other => panic!("unexpected decision {other:?}"),
    }
}

#[track_caller]
fn allowed(plugin: &LoadedPlugin, req: &Request) -> bool {
    call(plugin, req).is_none()
}

/// How many of `n` back-to-back requests are allowed.
fn allowed_of(plugin: &LoadedPlugin, req: &Request, n: usize) -> usize {
    (0..n).filter(|_| allowed(plugin, req)).count()
}

/// Tiers refilling so slowly that no token comes back during a test.
const SLOW: &str = r#"{
    "tiers": {
        "free": { "rate_per_second": 0.001, "burst": 3 },
        "pro": { "rate_per_second": 0.001, "burst": 5 }
    },
    "keys": { "k-free": "free", "k-pro": "pro", "k-free-2": "free" },
    "anonymous": { "rate_per_second": 0.001, "burst": 2 }
}"#;

#[test]
fn the_burst_is_honoured_exactly() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, SLOW);
    let free = replace_header(get("/v1/models"), "x-api-key", "k-free");
    for _ in 0..3 {
        assert!(allowed(&plugin, &free));
    }
    assert!(!allowed(&plugin, &free));
    assert!(!allowed(&plugin, &free));

    let pro = replace_header(get("/v1/models"), "x-api-key", "k-pro");
    assert_eq!(allowed_of(&plugin, &pro, 10), 5);

    let anonymous = get("/v1/models");
    assert_eq!(allowed_of(&plugin, &anonymous, 10), 2);
}

/// On a clock the test moves, so that the count is exact whatever the
/// machine's load: a wall-clock window counts the calls the machine
/// happened to make in it.
#[test]
fn a_tier_rate_holds_exactly_over_two_seconds() {
    let (sandbox, clock) = sandbox_on_manual_clock();
    let (rate, burst) = (100, 20);
    let plugin = load(
        &sandbox,
        &format!(
            r#"{{"tiers":{{"t":{{"rate_per_second":{rate},"burst":{burst}}}}},"keys":{{"k":"t"}}}}"#
        ),
    );
    let req = replace_header(get("/v1/chat/completions"), "authorization", "Bearer k");
    // Three requests every millisecond, from 0 to 2000 ms: far more than
    // one token per 10 ms.
    let mut allowed_count = 0;
    for ms in 0..=2000 {
        if ms > 0 {
            clock.advance(Duration::from_millis(1));
        }
        allowed_count += allowed_of(&plugin, &req, 3);
    }
    // The burst at once, then one token every 10 ms from 10 to 2000 ms.
    assert_eq!(allowed_count, burst + 2 * rate);
}

#[test]
fn the_429_says_when_to_retry() {
    let (sandbox, clock) = sandbox_on_manual_clock();
    let plugin = load(
        &sandbox,
        r#"{
            "tiers": { "slow": { "rate_per_second": 0.5, "burst": 1 }, "fast": { "rate_per_second": 2, "burst": 2 } },
            "keys": { "k-slow": "slow", "k-fast": "fast" }
        }"#,
    );

    let mut slow = replace_header(get("/v1/models"), "x-api-key", "k-slow");
    slow.request_id = "req-slow".to_owned();
    assert!(allowed(&plugin, &slow));
    let refusal = call(&plugin, &slow).expect("second request refused");
    // One token every 2 s, and the clock has not moved: due in 2000 ms.
    let retry_ms = refusal.retry_after_ms();
    assert_eq!(retry_ms, 2000);
    assert_eq!(
        refusal.body,
        format!(
            r#"{{"error":"rate_limited","retry_after_ms":{retry_ms},"request_id":"req-slow"}}"#
        )
    );
    assert_eq!(refusal.header("retry-after"), "2");
    assert_eq!(refusal.header("ratelimit-policy"), r#""slow";q=1;w=2"#);
    assert_eq!(refusal.header("ratelimit"), r#""slow";r=0;t=2"#);
    assert_eq!(refusal.header("ratelimit-limit"), "1");
    assert_eq!(refusal.header("ratelimit-remaining"), "0");
    assert_eq!(refusal.header("ratelimit-reset"), "2");

    // Two tokens a second: retry in 500 ms, and `Retry-After` is rounded
    // up to a whole second.
    let fast = replace_header(get("/v1/models"), "x-api-key", "k-fast");
    assert_eq!(allowed_of(&plugin, &fast, 2), 2);
    let refusal = call(&plugin, &fast).expect("third request refused");
    let retry_ms = refusal.retry_after_ms();
    assert_eq!(retry_ms, 500);
    assert_eq!(refusal.header("retry-after"), "1");
    assert_eq!(refusal.header("ratelimit-policy"), r#""fast";q=2;w=1"#);

    // Waiting as told is enough, and needed.
    clock.advance(Duration::from_millis(retry_ms - 1));
    let refusal = call(&plugin, &fast).expect("a millisecond early");
    assert_eq!(refusal.retry_after_ms(), 1);
    clock.advance(Duration::from_millis(1));
    assert!(allowed(&plugin, &fast));
}

#[test]
fn keys_are_isolated_from_each_other_and_from_anonymous_ips() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, SLOW);
    let free = replace_header(get("/v1/models"), "x-api-key", "k-free");
    let free_2 = replace_header(get("/v1/models"), "x-api-key", "k-free-2");
    assert_eq!(allowed_of(&plugin, &free, 10), 3);
    // Another key of the same tier has a bucket of its own.
    assert_eq!(allowed_of(&plugin, &free_2, 10), 3);
    // Anonymous traffic from the same IP is unaffected by the keys.
    assert_eq!(allowed_of(&plugin, &get("/v1/models"), 10), 2);
    // Each anonymous IP has its own bucket.
    let other_ip = from_ip(get("/v1/models"), "198.51.100.20");
    assert_eq!(allowed_of(&plugin, &other_ip, 10), 2);
    // A key keeps its bucket whichever IP it comes from.
    assert!(!allowed(&plugin, &from_ip(free.clone(), "203.0.113.9")));
    // The anonymous 429 names its tier.
    let refusal = call(&plugin, &get("/v1/models")).expect("refused");
    assert_eq!(
        refusal.header("ratelimit-policy"),
        r#""anonymous";q=2;w=2000"#
    );
}

#[test]
fn an_unknown_key_is_limited_as_anonymous() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, SLOW);
    let invented = replace_header(get("/v1/models"), "x-api-key", "k-invented");
    assert_eq!(allowed_of(&plugin, &invented, 10), 2);
    // It drew from the IP's anonymous bucket, now empty.
    assert!(!allowed(&plugin, &get("/v1/models")));
    let other_invented = replace_header(get("/v1/models"), "authorization", "Bearer nope");
    assert!(!allowed(&plugin, &other_invented));
}

#[test]
fn bearer_tokens_and_the_key_header_both_name_keys() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, SLOW);
    let bearer = replace_header(get("/v1/models"), "Authorization", "Bearer k-pro");
    let header = replace_header(get("/v1/models"), "X-Api-Key", "k-pro");
    // Both name the same key, so they share its bucket of 5.
    assert_eq!(allowed_of(&plugin, &bearer, 3), 3);
    assert_eq!(allowed_of(&plugin, &header, 5), 2);
    // Anonymous traffic from the same IP still has its own.
    assert_eq!(allowed_of(&plugin, &get("/"), 5), 2);

    // A configured header replaces `x-api-key`.
    let plugin = load(
        &sandbox,
        r#"{
            "tiers": { "t": { "rate_per_second": 0.001, "burst": 1 } },
            "keys": { "k-custom": "t" },
            "key_header": "x-customer-key"
        }"#,
    );
    let custom = replace_header(get("/"), "x-customer-key", "k-custom");
    assert_eq!(allowed_of(&plugin, &custom, 3), 1);
    // No anonymous limit is configured: the old header is now just
    // anonymous traffic, which is unlimited.
    let old = replace_header(get("/"), "x-api-key", "k-custom");
    assert_eq!(allowed_of(&plugin, &old, 5), 5);
}

#[test]
fn the_cost_header_takes_several_tokens() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{
            "tiers": { "t": { "rate_per_second": 0.001, "burst": 10 } },
            "keys": { "k1": "t", "k2": "t", "k3": "t" },
            "cost_header": "x-request-cost"
        }"#,
    );
    let key = |key: &str, cost: &str| {
        replace_header(
            replace_header(get("/v1/chat/completions"), "x-api-key", key),
            "x-request-cost",
            cost,
        )
    };
    assert!(allowed(&plugin, &key("k1", "4")));
    assert!(allowed(&plugin, &key("k1", "4")));
    let refusal = call(&plugin, &key("k1", "4")).expect("4 of 2 left");
    assert_eq!(refusal.header("ratelimit-remaining"), "2");
    assert!(allowed(&plugin, &key("k1", "2")));
    assert!(!allowed(&plugin, &key("k1", "1")));

    // A cost above the burst is capped at the burst, so it empties the bucket.
    assert!(allowed(&plugin, &key("k2", "1000")));
    assert!(!allowed(&plugin, &key("k2", "1")));

    // Zero or garbage cost one token.
    assert_eq!(allowed_of(&plugin, &key("k3", "0"), 5), 5);
    assert_eq!(allowed_of(&plugin, &key("k3", "lots"), 10), 5);
}

#[test]
fn only_the_listed_path_prefixes_are_limited() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{ "anonymous": { "rate_per_second": 0.001, "burst": 1 }, "path_prefixes": ["/v1/"] }"#,
    );
    assert_eq!(allowed_of(&plugin, &get("/healthz"), 5), 5);
    assert_eq!(allowed_of(&plugin, &get("/v1/models?x=1"), 5), 1);
    assert!(allowed(&plugin, &get("/v2/v1/models")));
}

/// The headers a request goes on with (panics on a 429 or no changes).
#[track_caller]
fn set_headers(plugin: &LoadedPlugin, req: &Request) -> Vec<(String, String)> {
    match plugin.on_request(req).expect("call").decision {
        RequestDecision::ContinueWith(changes) => changes.set_headers,
        other => panic!("expected the request to go on with changes, got {other:?}"),
    }
}

#[test]
fn the_tier_header_carries_the_tier_and_overrides_the_client() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"tiers":{"paid":{"rate_per_second":100,"burst":100}},"keys":{"k-paid":"paid"},
            "anonymous":{"rate_per_second":100,"burst":100},"path_prefixes":["/v1/"],
            "tier_header":"X-Breakwater-Tier"}"#,
    );
    let tier = |headers: Vec<(String, String)>| {
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[0].0, "x-breakwater-tier");
        headers[0].1.clone()
    };
    let paid = replace_header(get("/v1/chat"), "authorization", "Bearer k-paid");
    assert_eq!(tier(set_headers(&plugin, &paid)), "paid");
    // A client claiming a tier gets its real one.
    let claims = replace_header(get("/v1/chat"), "x-breakwater-tier", "paid");
    assert_eq!(tier(set_headers(&plugin, &claims)), "anonymous");
    let unknown_key = replace_header(claims, "x-api-key", "k-invented");
    assert_eq!(tier(set_headers(&plugin, &unknown_key)), "anonymous");
    // Paths that are not limited are still told their tier.
    let elsewhere = replace_header(get("/static/a.css"), "x-breakwater-tier", "paid");
    assert_eq!(tier(set_headers(&plugin, &elsewhere)), "anonymous");
}

#[test]
fn bad_configurations_refuse_to_load() {
    let sandbox = sandbox();
    for config in [
        r#"{"no_such_field":1}"#,
        r#"{"anonymous":{"rate_per_second":1,"burst":1,"window":3}}"#,
        r#"{"tiers":{"t":{"rate_per_second":1,"burst":1}},"keys":{"k":"missing"}}"#,
        r#"{"tiers":{"t":{"rate_per_second":0,"burst":1}}}"#,
        r#"{"tiers":{"t":{"rate_per_second":-2,"burst":1}}}"#,
        r#"{"anonymous":{"rate_per_second":0,"burst":5}}"#,
        r#"{"tiers":{"t":{"rate_per_second":1,"burst":0}}}"#,
        r#"{"tiers":{"\"q\"":{"rate_per_second":1,"burst":1}}}"#,
        r#"{"path_prefixes":[]}"#,
        r#"{"tier_header":""}"#,
        r#"{"tier_header":"x tier"}"#,
        "not json",
    ] {
        let error = try_load(&sandbox, config).expect_err(config);
        assert!(
            matches!(error, LoadError::Config { .. }),
            "{config}: {error}"
        );
    }
}

#[test]
fn loading_without_the_counters_grant_is_refused() {
    let sandbox = sandbox();
    let error = sandbox
        .load(spec("rate-limit", "rate_limit", SLOW))
        .expect_err("loading without grants must fail");
    assert!(
        matches!(
            error,
            LoadError::NotGranted {
                capability: "counters",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn allowed_answers_carry_ratelimit_headers_passed_through_the_context() {
    let (sandbox, _clock) = sandbox_on_manual_clock();
    let plugin = load(
        &sandbox,
        r#"{"anonymous": {"rate_per_second": 2, "burst": 4}, "path_prefixes": ["/v1/"]}"#,
    );
    let head = breakwater_sandbox::ResponseHead {
        status: 200,
        headers: Vec::new(),
    };
    for remaining in [3, 2] {
        let req = get("/v1/models");
        let outcome = plugin.on_request(&req).expect("call");
        assert!(matches!(outcome.decision, RequestDecision::Continue));
        let context = outcome
            .context
            .expect("an allowed request leaves its counts");
        match plugin
            .on_response(&req, &head, Some(&context))
            .expect("call")
        {
            breakwater_sandbox::ResponseDecision::ContinueWith(changes) => {
                // w: 4 tokens at 2/s; t: the tokens spent come back at 2/s,
                // rounded up to whole seconds.
                let refill = (4 - remaining + 1) / 2;
                assert_eq!(
                    changes.set_headers,
                    [
                        (
                            "ratelimit-policy".to_owned(),
                            r#""anonymous";q=4;w=2"#.to_owned()
                        ),
                        (
                            "ratelimit".to_owned(),
                            format!(r#""anonymous";r={remaining};t={refill}"#)
                        ),
                    ]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // A path that is not limited leaves nothing, and its answer is untouched.
    let outcome = plugin.on_request(&get("/index.html")).expect("call");
    assert_eq!(outcome.context, None);
    assert!(matches!(
        plugin
            .on_response(&get("/index.html"), &head, None)
            .expect("call"),
        breakwater_sandbox::ResponseDecision::Continue
    ));
}
