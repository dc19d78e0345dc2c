//! The bundled `cache-policy` plugin through the real host: key
//! normalization, TTL by route, bypass rules, keys over canonical AI
//! completion bodies, and bad configurations refusing to load.

use crate::common::{get, sandbox, spec, with_header, with_host};
use breakwater_sandbox::{LoadError, LoadedPlugin, Request, RequestDecision, Sandbox};

fn try_load(sandbox: &Sandbox, config: &str) -> Result<LoadedPlugin, LoadError> {
    // The plugin imports nothing, so it is loaded with no grants at all.
    sandbox.load(spec("cache-policy", "cache_policy", config))
}

fn load(sandbox: &Sandbox, config: &str) -> LoadedPlugin {
    try_load(sandbox, config).expect("load cache-policy")
}

fn post(path: &str, body: &str) -> Request {
    let mut req = get(path);
    req.method = "POST".to_owned();
    req.body = Some(body.as_bytes().to_vec());
    req
}

/// What the plugin decided for the cache.
#[derive(Debug, PartialEq)]
enum Cache {
    Key(String, Option<u64>),
    Bypass,
}

#[track_caller]
fn decide(plugin: &LoadedPlugin, req: &Request) -> Cache {
    match plugin.on_request(req).expect("call").decision {
        RequestDecision::ContinueWith(changes) => {
            assert!(changes.set_headers.is_empty() && changes.remove_headers.is_empty());
            assert!(changes.upstream_pool.is_none() && changes.rewrite_path.is_none());
            if changes.cache_bypass {
                assert!(changes.cache_key.is_none() && changes.cache_ttl_ms.is_none());
                Cache::Bypass
            } else {
                Cache::Key(
                    changes.cache_key.expect("a key or a bypass"),
                    changes.cache_ttl_ms,
                )
            }
        }
        other => panic!("{} {} got {other:?}", req.method, req.path),
    }
}

#[track_caller]
fn key(plugin: &LoadedPlugin, req: &Request) -> String {
    match decide(plugin, req) {
        Cache::Key(key, _) => key,
        Cache::Bypass => panic!("{} {} bypassed", req.method, req.path),
    }
}

#[track_caller]
fn ttl_ms(plugin: &LoadedPlugin, req: &Request) -> Option<u64> {
    match decide(plugin, req) {
        Cache::Key(_, ttl) => ttl,
        Cache::Bypass => panic!("{} {} bypassed", req.method, req.path),
    }
}

#[test]
fn dropped_and_sorted_query_params_give_the_same_key() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    let plain = key(&plugin, &get("/p?a=1&b=2"));
    assert_eq!(plain, "GET|example.test|/p?a=1&b=2");
    for path in [
        "/p?b=2&a=1",
        "/p?utm_source=x&a=1&utm_medium=y&b=2",
        "/p?a=1&fbclid=abc&b=2&gclid=def",
        "/p?utm_campaign=z&b=2&a=1&",
    ] {
        assert_eq!(key(&plugin, &get(path)), plain, "{path}");
    }
    // Only trackers go: another parameter or value is another key.
    assert_ne!(key(&plugin, &get("/p?a=1&b=3")), plain);
    assert_ne!(key(&plugin, &get("/p?a=1&b=2&c=3")), plain);
    // Repeated names sort by value, stably.
    assert_eq!(
        key(&plugin, &get("/p?x=2&x=1")),
        key(&plugin, &get("/p?x=1&x=2"))
    );
    // Nothing left: no `?`.
    assert_eq!(key(&plugin, &get("/p?utm_source=x")), "GET|example.test|/p");
}

#[test]
fn configured_drop_list_replaces_the_default() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, r#"{"drop_query_params": ["ref", "tr_*"]}"#);
    assert_eq!(
        key(&plugin, &get("/p?ref=a&tr_x=1&utm_source=s")),
        "GET|example.test|/p?utm_source=s"
    );
}

#[test]
fn host_is_case_folded() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    assert_eq!(
        key(&plugin, &with_host(get("/a"), "Example.TEST")),
        key(&plugin, &get("/a"))
    );
}

#[test]
fn vary_headers_are_part_of_the_key() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, r#"{"vary_headers": ["Accept-Language"]}"#);
    let en = key(
        &plugin,
        &with_header(get("/p?b=2&a=1"), "Accept-Language", "en"),
    );
    assert_eq!(en, "GET|example.test|/p?a=1&b=2|accept-language=en");
    let fr = key(&plugin, &with_header(get("/p"), "accept-language", "fr"));
    assert_eq!(fr, "GET|example.test|/p|accept-language=fr");
    assert_eq!(
        key(&plugin, &get("/p")),
        "GET|example.test|/p|accept-language"
    );
}

#[test]
fn ttl_by_first_matching_route() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"routes": [
            {"path_prefix": "/static/", "ttl": 86400},
            {"path_prefix": "/", "ttl": 60}
        ]}"#,
    );
    assert_eq!(ttl_ms(&plugin, &get("/static/app.js")), Some(86_400_000));
    assert_eq!(ttl_ms(&plugin, &get("/index.html")), Some(60_000));

    let plugin = load(
        &sandbox,
        r#"{"routes": [{"path_prefix": "/a/", "ttl": 5}], "default_ttl": 7}"#,
    );
    assert_eq!(ttl_ms(&plugin, &get("/a/x")), Some(5_000));
    assert_eq!(ttl_ms(&plugin, &get("/b")), Some(7_000));
    // No route and no default: a key but no TTL.
    let plugin = load(&sandbox, "");
    assert_eq!(ttl_ms(&plugin, &get("/b")), None);
}

#[test]
fn authorization_bypasses_unless_shareable() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"routes": [
            {"path_prefix": "/public/", "ttl": 30, "shareable": true},
            {"path_prefix": "/", "ttl": 10}
        ]}"#,
    );
    let private = with_header(get("/me"), "Authorization", "Bearer t");
    assert_eq!(decide(&plugin, &private), Cache::Bypass);
    assert!(matches!(decide(&plugin, &get("/me")), Cache::Key(..)));
    let shared = with_header(get("/public/x"), "authorization", "Bearer t");
    assert_eq!(
        decide(&plugin, &shared),
        Cache::Key("GET|example.test|/public/x".into(), Some(30_000))
    );
}

#[test]
fn bypass_cookie_and_unsafe_methods_bypass() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, r#"{"bypass_cookies": ["session"]}"#);
    let logged_in = with_header(get("/"), "Cookie", "theme=dark; session=abc");
    assert_eq!(decide(&plugin, &logged_in), Cache::Bypass);
    let other = with_header(get("/"), "Cookie", "theme=dark; sessionx=1");
    assert!(matches!(decide(&plugin, &other), Cache::Key(..)));

    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let mut req = get("/form");
        req.method = method.to_owned();
        assert_eq!(decide(&plugin, &req), Cache::Bypass, "{method}");
    }
    let mut head = get("/");
    head.method = "HEAD".to_owned();
    assert_eq!(key(&plugin, &head), "HEAD|example.test|/");
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}],"temperature":0,"max_tokens":64}"#;

#[test]
fn deterministic_chat_completion_is_keyed_by_canonical_body() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"routes": [{"path_prefix": "/v1/", "ttl": 600}]}"#,
    );
    let (key0, ttl) = match decide(&plugin, &post("/v1/chat/completions", CHAT)) {
        Cache::Key(key, ttl) => (key, ttl),
        Cache::Bypass => panic!("temperature 0 bypassed"),
    };
    let hex = key0
        .strip_prefix("POST|example.test|/v1/chat/completions|-|")
        .expect("key format");
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(ttl, Some(600_000));

    // Same body, keys in another order, other whitespace, 0.0 for 0.
    let reordered = r#"{
        "max_tokens": 64,
        "temperature": 0.0,
        "messages": [ { "content": "Hi", "role": "user" } ],
        "model": "gpt-4o",
        "user": "someone"
    }"#;
    assert_eq!(key(&plugin, &post("/v1/chat/completions", reordered)), key0);

    // Another message, model, sampling parameter or `stream`: another key.
    for other in [
        CHAT.replace("Hi", "Hello"),
        CHAT.replace("gpt-4o", "gpt-4o-mini"),
        CHAT.replace("64", "65"),
        CHAT.replace("\"temperature\":0", "\"temperature\":0,\"stream\":true"),
    ] {
        assert_ne!(
            key(&plugin, &post("/v1/chat/completions", &other)),
            key0,
            "{other}"
        );
    }
    // The legacy completions endpoint keys its prompt.
    let a = key(
        &plugin,
        &post(
            "/v1/completions",
            r#"{"model":"m","prompt":"a","temperature":0}"#,
        ),
    );
    let b = key(
        &plugin,
        &post(
            "/v1/completions",
            r#"{"model":"m","prompt":"b","temperature":0}"#,
        ),
    );
    assert_ne!(a, b);
}

#[test]
fn sampled_chat_completion_bypasses_unless_client_sets_max_age() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    let warm = CHAT.replace("\"temperature\":0", "\"temperature\":0.7");
    assert_eq!(
        decide(&plugin, &post("/v1/chat/completions", &warm)),
        Cache::Bypass
    );
    // Absent temperature is the API default of 1: not cacheable.
    let absent = CHAT.replace(",\"temperature\":0", "");
    assert_eq!(
        decide(&plugin, &post("/v1/chat/completions", &absent)),
        Cache::Bypass
    );
    let asked = with_header(
        post("/v1/chat/completions", &warm),
        "Cache-Control",
        "max-age=60",
    );
    match decide(&plugin, &asked) {
        Cache::Key(key, ttl) => {
            assert!(key.starts_with("POST|example.test|/v1/chat/completions|"));
            assert_eq!(ttl, Some(60_000));
        }
        Cache::Bypass => panic!("max-age bypassed"),
    }
    let refused = with_header(
        post("/v1/chat/completions", CHAT),
        "Cache-Control",
        "no-store",
    );
    assert_eq!(decide(&plugin, &refused), Cache::Bypass);
}

#[test]
fn a_completion_is_read_only_by_its_tenant() {
    let sandbox = sandbox();
    let by_key = load(&sandbox, "");
    let as_key = |k: &str| {
        key(
            &by_key,
            &with_header(post("/v1/chat/completions", CHAT), "Authorization", k),
        )
    };
    let anonymous = key(&by_key, &post("/v1/chat/completions", CHAT));
    assert!(anonymous.contains("|-|"), "{anonymous}");
    assert_eq!(as_key("Bearer a"), as_key("Bearer a"));
    assert_ne!(as_key("Bearer a"), as_key("Bearer b"));
    assert_ne!(as_key("Bearer a"), anonymous);
    assert!(!as_key("Bearer a").contains("Bearer"), "the key is hashed");

    let by_tier = load(&sandbox, r#"{"tenant": {"header": "X-Tier"}}"#);
    let in_tier = |tier: &str| {
        key(
            &by_tier,
            &with_header(
                with_header(post("/v1/chat/completions", CHAT), "x-tier", tier),
                "Authorization",
                "Bearer someone",
            ),
        )
    };
    assert_eq!(in_tier("gold"), in_tier("gold"));
    assert_ne!(in_tier("gold"), in_tier("free"));

    let shared = load(&sandbox, r#"{"tenant": "shared"}"#);
    let with_auth = with_header(
        post("/v1/chat/completions", CHAT),
        "Authorization",
        "Bearer a",
    );
    assert_eq!(
        key(&shared, &with_auth),
        key(&shared, &post("/v1/chat/completions", CHAT))
    );
    assert!(try_load(&sandbox, r#"{"tenant": "nobody"}"#).is_err());
}

#[test]
fn malformed_or_missing_body_bypasses() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    for body in ["{not json", "", "[1,2]", "\"text\""] {
        assert_eq!(
            decide(&plugin, &post("/v1/chat/completions", body)),
            Cache::Bypass,
            "{body:?}"
        );
    }
    let mut no_body = post("/v1/chat/completions", CHAT);
    no_body.body = None;
    assert_eq!(decide(&plugin, &no_body), Cache::Bypass);
    // POST elsewhere bypasses even with a deterministic body.
    assert_eq!(decide(&plugin, &post("/v1/other", CHAT)), Cache::Bypass);
}

#[test]
fn bad_configuration_refuses_to_load() {
    let sandbox = sandbox();
    for config in [
        r#"{"unknown": 1}"#,
        r#"{"routes": [{"path_prefix": "/", "ttl": -1}]}"#,
        r#"{"routes": [{"path_prefix": "/", "ttl": 1, "extra": true}]}"#,
        r#"{"routes": [{"path_prefix": "", "ttl": 1}]}"#,
        r#"{"default_ttl": -5}"#,
        "not json",
    ] {
        let error = try_load(&sandbox, config).expect_err(config);
        assert!(
            matches!(error, LoadError::Config { .. }),
            "{config}: {error}"
        );
    }
}
