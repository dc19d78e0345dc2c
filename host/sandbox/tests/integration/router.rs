//! The bundled `router` plugin through the real host: each matcher picks its
//! pool, first match wins, splits hold their weights and stay sticky, and a
//! bad configuration refuses to load.

use std::collections::HashMap;

use crate::common::{get, sandbox, spec, with_header, with_host};
use breakwater_sandbox::{LoadError, LoadedPlugin, Request, RequestDecision, Sandbox};

fn try_load(sandbox: &Sandbox, config: &str) -> Result<LoadedPlugin, LoadError> {
    // The router imports nothing, so it is loaded with no grants at all.
    sandbox.load(spec("router", "router", config))
}

fn load(sandbox: &Sandbox, config: &str) -> LoadedPlugin {
    try_load(sandbox, config).expect("load router")
}

fn with_method(mut req: Request, method: &str) -> Request {
    req.method = method.to_owned();
    req
}

fn with_id(mut req: Request, id: &str) -> Request {
    req.request_id = id.to_owned();
    req
}

/// The pool the router chose, none when it let the request continue
/// unchanged; panics on any other decision or change.
#[track_caller]
fn route(plugin: &LoadedPlugin, req: &Request) -> Option<String> {
    route_and_path(plugin, req).0
}

/// The pool and the rewritten path, if any.
#[track_caller]
fn route_and_path(plugin: &LoadedPlugin, req: &Request) -> (Option<String>, Option<String>) {
    match plugin.on_request(req).expect("call").decision {
        RequestDecision::Continue => (None, None),
        RequestDecision::ContinueWith(changes) => {
            assert!(changes.set_headers.is_empty() && changes.remove_headers.is_empty());
            assert!(changes.cache_key.is_none() && changes.cache_ttl_ms.is_none());
            assert!(!changes.cache_bypass);
            assert!(changes.upstream_pool.is_some(), "changes without a pool");
            (changes.upstream_pool, changes.rewrite_path)
        }
        other => panic!("{} {} got {other:?}", req.method, req.path),
    }
}

#[track_caller]
fn assert_pool(plugin: &LoadedPlugin, req: &Request, pool: Option<&str>) {
    assert_eq!(
        route(plugin, req).as_deref(),
        pool,
        "{} {}{}",
        req.method,
        req.host,
        req.path
    );
}

#[test]
fn no_rule_and_no_default_continues_unchanged() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    assert_pool(&plugin, &get("/"), None);
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"path_prefix":"/api/","pool":"api"}]}"#,
    );
    assert_pool(&plugin, &get("/web"), None);
}

#[test]
fn default_pool_catches_what_no_rule_matches() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"path_prefix":"/api/","pool":"api"}],"default_pool":"web"}"#,
    );
    assert_pool(&plugin, &get("/api/x"), Some("api"));
    assert_pool(&plugin, &get("/index.html"), Some("web"));
}

#[test]
fn host_exact_is_case_insensitive_and_ignores_the_port() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"host":"API.example.com","pool":"api"}]}"#,
    );
    for host in [
        "api.example.com",
        "Api.Example.COM",
        "api.example.com:8443",
        "api.example.com.",
    ] {
        assert_pool(&plugin, &with_host(get("/"), host), Some("api"));
    }
    for host in ["example.com", "x.api.example.com", "api.example.com.evil"] {
        assert_pool(&plugin, &with_host(get("/"), host), None);
    }
}

#[test]
fn host_wildcard_matches_subdomains_only() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"host":"*.example.com","pool":"sub"}]}"#,
    );
    for host in ["a.example.com", "A.B.Example.com", "x.example.com:80"] {
        assert_pool(&plugin, &with_host(get("/"), host), Some("sub"));
    }
    for host in [
        "example.com",
        "badexample.com",
        "a.example.com.evil",
        "a.example.org",
    ] {
        assert_pool(&plugin, &with_host(get("/"), host), None);
    }
}

#[test]
fn path_prefix_is_a_plain_prefix_of_the_path_without_query() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"path_prefix":"/api/v1","pool":"v1"}]}"#,
    );
    assert_pool(&plugin, &get("/api/v1"), Some("v1"));
    assert_pool(&plugin, &get("/api/v1/models?x=1"), Some("v1"));
    assert_pool(&plugin, &get("/api/v10"), Some("v1"));
    assert_pool(&plugin, &get("/api/v2"), None);
    assert_pool(&plugin, &get("/x?/api/v1"), None);
}

#[test]
fn path_glob_star_stays_in_a_segment_and_double_star_crosses() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[
            {"path_glob":"/users/*/avatar","pool":"one"},
            {"path_glob":"/static/**/*.css","pool":"css"},
            {"path_glob":"/files/**","pool":"files"}
        ]}"#,
    );
    assert_pool(&plugin, &get("/users/42/avatar"), Some("one"));
    assert_pool(&plugin, &get("/users/42/avatar?size=2"), Some("one"));
    assert_pool(&plugin, &get("/users/42/x/avatar"), None);
    assert_pool(&plugin, &get("/users//avatar"), Some("one"));
    assert_pool(&plugin, &get("/users/42/avatar/big"), None);
    // `/**/` also matches zero segments.
    assert_pool(&plugin, &get("/static/site.css"), Some("css"));
    assert_pool(&plugin, &get("/static/a/b/c/site.css"), Some("css"));
    assert_pool(&plugin, &get("/static/a/site.js"), None);
    assert_pool(&plugin, &get("/files/a/b/c"), Some("files"));
    assert_pool(&plugin, &get("/files/"), Some("files"));
    assert_pool(&plugin, &get("/filesystem"), None);
}

#[test]
fn prefix_and_glob_differ_on_the_same_rule_set() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[
            {"path_glob":"/v1/*/completions","pool":"glob"},
            {"path_prefix":"/v1/","pool":"prefix"}
        ]}"#,
    );
    assert_pool(&plugin, &get("/v1/chat/completions"), Some("glob"));
    assert_pool(&plugin, &get("/v1/a/b/completions"), Some("prefix"));
    assert_pool(&plugin, &get("/v1/models"), Some("prefix"));
}

#[test]
fn a_pathological_glob_is_still_fast() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"path_glob":"/**a**a**a**a**a**a**a**b","pool":"x"}]}"#,
    );
    let path = format!("/{}", "a".repeat(2000));
    assert_pool(&plugin, &get(&path), None);
}

#[test]
fn methods_match_any_listed_case_insensitively() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"methods":["POST","put"],"pool":"writes"}],"default_pool":"reads"}"#,
    );
    assert_pool(&plugin, &with_method(get("/"), "POST"), Some("writes"));
    assert_pool(&plugin, &with_method(get("/"), "PUT"), Some("writes"));
    assert_pool(&plugin, &get("/"), Some("reads"));
    assert_pool(&plugin, &with_method(get("/"), "DELETE"), Some("reads"));
}

#[test]
fn headers_match_by_value_and_by_presence() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[
            {"headers":[{"name":"X-Tenant","equals":"acme"}],"pool":"acme"},
            {"headers":[{"name":"x-beta","present":true},{"name":"x-no-beta","present":false}],"pool":"beta"}
        ]}"#,
    );
    assert_pool(
        &plugin,
        &with_header(get("/"), "x-tenant", "acme"),
        Some("acme"),
    );
    // Any value of a repeated header counts; the value is exact.
    let repeated = with_header(
        with_header(get("/"), "x-tenant", "other"),
        "X-TENANT",
        "acme",
    );
    assert_pool(&plugin, &repeated, Some("acme"));
    assert_pool(&plugin, &with_header(get("/"), "x-tenant", "ACME"), None);
    assert_pool(&plugin, &with_header(get("/"), "x-beta", ""), Some("beta"));
    let opted_out = with_header(with_header(get("/"), "x-beta", "1"), "x-no-beta", "1");
    assert_pool(&plugin, &opted_out, None);
    assert_pool(&plugin, &get("/"), None);
}

#[test]
fn all_matchers_of_a_rule_must_hold() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"host":"api.test","path_prefix":"/v1/","methods":["POST"],
            "headers":[{"name":"x-k","present":true}],"pool":"all"}]}"#,
    );
    let full = with_header(
        with_method(with_host(get("/v1/x"), "api.test"), "POST"),
        "x-k",
        "1",
    );
    assert_pool(&plugin, &full, Some("all"));
    assert_pool(&plugin, &with_host(full.clone(), "web.test"), None);
    assert_pool(&plugin, &with_method(full.clone(), "GET"), None);
    let mut no_header = full.clone();
    no_header.headers.retain(|(n, _)| n != "x-k");
    assert_pool(&plugin, &no_header, None);
    let mut other_path = full;
    other_path.path = "/v2/x".to_owned();
    assert_pool(&plugin, &other_path, None);
}

#[test]
fn the_first_matching_rule_wins() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[
            {"path_prefix":"/api/admin","pool":"admin"},
            {"path_prefix":"/api/","pool":"api"},
            {"path_prefix":"/api/admin/special","pool":"never"},
            {"pool":"catch-all"}
        ],"default_pool":"unused"}"#,
    );
    assert_pool(&plugin, &get("/api/admin/special"), Some("admin"));
    assert_pool(&plugin, &get("/api/users"), Some("api"));
    assert_pool(&plugin, &get("/"), Some("catch-all"));
}

#[test]
fn rewrite_prefix_replaces_the_matched_prefix_and_keeps_the_query() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[
            {"path_prefix":"/legacy/api/","rewrite_prefix":"/v2/","pool":"v2"},
            {"path_prefix":"/old","pool":"old"}
        ]}"#,
    );
    assert_eq!(
        route_and_path(&plugin, &get("/legacy/api/users/7?full=1")),
        (Some("v2".to_owned()), Some("/v2/users/7?full=1".to_owned()))
    );
    assert_eq!(
        route_and_path(&plugin, &get("/old/x")),
        (Some("old".to_owned()), None)
    );
}

const CANARY: &str =
    r#"{"rules":[{"split":[{"pool":"stable","weight":95},{"pool":"canary","weight":5}]}]}"#;

#[test]
fn a_95_5_split_holds_over_10000_request_ids() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, CANARY);
    let total = 10_000;
    let mut counts: HashMap<String, u32> = HashMap::new();
    for i in 0..total {
        let req = with_id(get("/v1/chat"), &format!("req-{i}"));
        *counts
            .entry(route(&plugin, &req).expect("a pool"))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    let canary = f64::from(counts["canary"]) * 100.0 / f64::from(total);
    assert!((canary - 5.0).abs() <= 1.5, "canary got {canary}%");
    assert_eq!(counts["canary"] + counts["stable"], total);
}

#[test]
fn without_a_sticky_value_the_request_id_decides_deterministically() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"split":[{"pool":"a","weight":1},{"pool":"b","weight":1}],
            "sticky":{"header":"x-user-id"}}]}"#,
    );
    for i in 0..50 {
        let req = with_id(get("/"), &format!("id-{i}"));
        let first = route(&plugin, &req);
        assert_eq!(route(&plugin, &req), first);
        // An empty sticky header is no sticky value.
        assert_eq!(route(&plugin, &with_header(req, "x-user-id", "")), first);
    }
}

/// Routes 200 users, each with two different request ids, through a 50/50
/// sticky split, asserting each user stays on one pool and returning how
/// many users each pool got.
fn sticky_spread(
    plugin: &LoadedPlugin,
    user: impl Fn(Request, &str) -> Request,
) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    for u in 0..200 {
        let name = format!("user-{u}");
        let first = route(plugin, &user(with_id(get("/"), &format!("a{u}")), &name));
        let second = route(plugin, &user(with_id(get("/"), &format!("b{u}")), &name));
        assert_eq!(first, second, "{name} moved between pools");
        *counts.entry(first.expect("a pool")).or_default() += 1;
    }
    counts
}

#[test]
fn sticky_by_header_keeps_a_user_on_one_pool_and_spreads_users() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"split":[{"pool":"a","weight":50},{"pool":"b","weight":50}],
            "sticky":{"header":"X-User-Id"}}]}"#,
    );
    let counts = sticky_spread(&plugin, |req, user| with_header(req, "x-user-id", user));
    assert!(
        (60..=140).contains(&counts["a"]) && (60..=140).contains(&counts["b"]),
        "{counts:?}"
    );
}

#[test]
fn sticky_by_cookie_keeps_a_user_on_one_pool_and_spreads_users() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"split":[{"pool":"a","weight":50},{"pool":"b","weight":50}],
            "sticky":{"cookie":"session"}}]}"#,
    );
    let counts = sticky_spread(&plugin, |req, user| {
        with_header(
            req,
            "cookie",
            &format!("theme=dark; session={user}; lang=en"),
        )
    });
    assert!(
        (60..=140).contains(&counts["a"]) && (60..=140).contains(&counts["b"]),
        "{counts:?}"
    );
    // The cookie is found wherever it sits, in any `Cookie` header, quoted
    // or not, and other cookies do not change the choice.
    let base = route(&plugin, &with_header(get("/"), "cookie", "session=user-7"));
    for cookie in [
        "a=1; session=\"user-7\"",
        "session=user-7;other=2",
        "x=session; session = user-7",
    ] {
        let req = with_header(with_id(get("/"), cookie), "cookie", cookie);
        assert_eq!(route(&plugin, &req), base, "{cookie}");
    }
    let split_headers = with_header(
        with_header(get("/"), "cookie", "a=1"),
        "Cookie",
        "session=user-7",
    );
    assert_eq!(route(&plugin, &split_headers), base);
}

#[test]
fn zero_weight_arms_are_never_chosen() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"rules":[{"split":[{"pool":"off","weight":0},{"pool":"on","weight":3}]}]}"#,
    );
    for i in 0..200 {
        assert_pool(&plugin, &with_id(get("/"), &format!("r{i}")), Some("on"));
    }
}

#[test]
fn a_bad_configuration_refuses_to_load() {
    let sandbox = sandbox();
    for config in [
        r#"{"no_such_key":true}"#,
        r#"{"rules":[{"pool":"a","path_prefx":"/x"}]}"#,
        r#"{"rules":[{"split":[{"pool":"a","weight":0},{"pool":"b","weight":0}]}]}"#,
        r#"{"rules":[{"split":[]}]}"#,
        r#"{"rules":[{"path_prefix":"/x"}]}"#,
        r#"{"rules":[{"pool":"a","split":[{"pool":"b","weight":1}]}]}"#,
        r#"{"rules":[{"pool":"a","sticky":{"header":"x"}}]}"#,
        r#"{"rules":[{"split":[{"pool":"a","weight":1}],"sticky":{"ip":"x"}}]}"#,
        r#"{"rules":[{"split":[{"pool":"a","weight":-1}]}]}"#,
        r#"{"rules":[{"pool":"a","rewrite_prefix":"/b/"}]}"#,
        r#"{"rules":[{"pool":"a","host":"a.*.com"}]}"#,
        r#"{"rules":[{"pool":"a","methods":[]}]}"#,
        r#"{"rules":[{"pool":"a","headers":[{"name":"x"}]}]}"#,
        r#"{"rules":[{"pool":"a","headers":[{"name":"x","equals":"1","present":true}]}]}"#,
        r#"{"rules":[{"pool":""}]}"#,
        r#"{"default_pool":""}"#,
    ] {
        let error = try_load(&sandbox, config).expect_err(config);
        assert!(
            matches!(error, LoadError::Config { .. }),
            "{config}: {error}"
        );
    }
}
