//! The bundled `waf` plugin through the real host: each rule blocks its case
//! with a JSON 403 naming the request, and lets a benign neighbour through.

use crate::common::{get, replace_header, sandbox, spec};
use breakwater_sandbox::{LoadError, LoadedPlugin, Request, RequestDecision, Sandbox};

fn try_load(sandbox: &Sandbox, config: &str) -> Result<LoadedPlugin, LoadError> {
    // The waf imports nothing, so it is loaded with no grants at all.
    sandbox.load(spec("waf", "waf", config))
}

fn load(sandbox: &Sandbox, config: &str) -> LoadedPlugin {
    try_load(sandbox, config).expect("load waf")
}

/// Asserts the waf answered 403 for `rule`, with the JSON body and content type.
#[track_caller]
fn assert_blocked(plugin: &LoadedPlugin, req: &Request, rule: &str) {
    match plugin.on_request(req).expect("call").decision {
        RequestDecision::Respond(response) => {
            assert_eq!(response.status, 403, "{} {}", req.method, req.path);
            let content_type = response
                .headers
                .iter()
                .find(|(n, _)| n == "content-type")
                .map(|(_, v)| v.as_str());
            assert_eq!(content_type, Some("application/json"));
            let body = String::from_utf8(response.body).expect("utf-8 body");
            // serde serializes the fields in declaration order, so the exact
            // text is stable.
            let expected = format!(
                r#"{{"error":"forbidden","reason":"{rule}","request_id":"{}"}}"#,
                req.request_id
            );
            assert_eq!(body, expected, "{} {}", req.method, req.path);
        }
        other => panic!(
            "{} {} should be blocked by {rule}, got {other:?}",
            req.method, req.path
        ),
    }
}

#[track_caller]
fn assert_continues(plugin: &LoadedPlugin, req: &Request) {
    let decision = plugin.on_request(req).expect("call").decision;
    assert!(
        matches!(decision, RequestDecision::Continue),
        "{} {} should continue, got {decision:?}",
        req.method,
        req.path
    );
}

#[test]
fn loads_with_no_configuration_and_no_grants() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    assert_continues(&plugin, &get("/v1/models"));
    assert_continues(&plugin, &get("/v1/chat/completions?stream=true"));
}

#[test]
fn the_403_carries_the_request_id() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    let mut req = get("/.env");
    req.request_id = "01J9Z-abc".to_owned();
    assert_blocked(&plugin, &req, "path");
}

#[test]
fn scanner_user_agents_are_blocked_and_curl_is_not() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    for agent in [
        "sqlmap/1.7.2#stable (https://sqlmap.org)",
        "Mozilla/5.00 (Nikto/2.1.6)",
        "Mozilla/5.0 zgrab/0.x",
        "WPScan v3.8.22",
        "gobuster/3.6",
    ] {
        assert_blocked(
            &plugin,
            &replace_header(get("/"), "User-Agent", agent),
            "user_agent",
        );
    }
    assert_continues(
        &plugin,
        &replace_header(get("/"), "user-agent", "curl/8.5.0"),
    );
    assert_continues(
        &plugin,
        &replace_header(
            get("/"),
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
        ),
    );
    // No User-Agent at all is not a scanner signature.
    let mut bare = get("/");
    bare.headers.clear();
    assert_continues(&plugin, &bare);
}

#[test]
fn configured_user_agents_replace_the_defaults() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, r#"{"blocked_user_agents":["BadBot"]}"#);
    assert_blocked(
        &plugin,
        &replace_header(get("/"), "user-agent", "badbot/1.0"),
        "user_agent",
    );
    assert_continues(
        &plugin,
        &replace_header(get("/"), "user-agent", "sqlmap/1.7"),
    );
}

#[test]
fn obvious_sql_injection_in_the_query_is_blocked() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    for path in [
        "/search?q=1' OR '1'='1",
        "/search?q=1'+OR+'1'%3D'1",
        "/search?q=%27%20or%201%3D1--",
        "/search?id=1+or+1=1--",
        "/search?id=1'  or 'a' = 'a",
        "/search?id=1 UNION SELECT username, password FROM users",
        "/search?id=1+union+all+select+null",
        "/search?id=1;%20DROP%20TABLE%20users",
        "/search?id=1'+AND+SLEEP(5)--",
        "/search?id=1+and+benchmark(5000000,md5(1))",
        "/search?id=1+union/**/select+1",
        "/search?t=information_schema.tables",
        "/search?c=exec+master..xp_cmdshell+'dir'",
    ] {
        assert_blocked(&plugin, &get(path), "sql_injection");
    }
}

#[test]
fn ordinary_queries_with_sql_words_pass() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    for path in [
        "/search?q=union+station",
        "/search?q=select+a+plan",
        "/search?q=Union%20Square%20select%20menu",
        "/search?q=tea+or+coffee",
        "/search?q=it's+'orange'+or+blue",
        "/search?q=how+to+sleep+(better)",
        "/search?q=drop+table+tennis",
        "/search?q=a+or+b%3Dc",
        "/search?q=5+%2F+2+*+3",
        "/v1/chat/completions?model=gpt&select=fields",
    ] {
        assert_continues(&plugin, &get(path));
    }
}

#[test]
fn sql_injection_checks_can_be_turned_off() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, r#"{"sql_injection":false}"#);
    assert_continues(&plugin, &get("/search?q=1' OR '1'='1"));
}

#[test]
fn blocked_methods_are_blocked_and_others_pass() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    for method in ["TRACE", "TRACK", "trace"] {
        let mut req = get("/");
        req.method = method.to_owned();
        assert_blocked(&plugin, &req, "method");
    }
    for method in ["GET", "POST", "OPTIONS"] {
        let mut req = get("/");
        req.method = method.to_owned();
        assert_continues(&plugin, &req);
    }
}

#[test]
fn blocked_paths_match_decoded_and_case_insensitive() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, "");
    for path in [
        "/.git/config",
        "/static/../.git/HEAD",
        "/%2Egit/config",
        "/%2egit%2Fconfig",
        "/.ENV",
        "/blog/WP-Admin/install.php",
    ] {
        assert_blocked(&plugin, &get(path), "path");
    }
    for path in [
        "/docs/git-guide",
        "/environment",
        "/v1/models",
        "/?next=/.gitx",
    ] {
        assert_continues(&plugin, &get(path));
    }
}

#[test]
fn content_length_over_the_limit_is_blocked() {
    let sandbox = sandbox();
    let plugin = load(&sandbox, r#"{"max_body_bytes":1024}"#);
    let post = |length: &str| {
        let mut req = replace_header(get("/upload"), "Content-Length", length);
        req.method = "POST".to_owned();
        req
    };
    assert_blocked(&plugin, &post("1025"), "body_size");
    assert_blocked(&plugin, &post("10000000000"), "body_size");
    assert_continues(&plugin, &post("1024"));
    assert_continues(&plugin, &post("0"));
    assert_continues(&plugin, &get("/upload"));
    // A buffered body counts too, whatever the header says.
    let mut buffered = post("10");
    buffered.body = Some(vec![b'x'; 2048]);
    assert_blocked(&plugin, &buffered, "body_size");

    // No limit by default.
    let unlimited = load(&sandbox, "");
    assert_continues(&unlimited, &post("10000000000"));
}

#[test]
fn header_patterns_block_matching_values() {
    let sandbox = sandbox();
    let plugin = load(
        &sandbox,
        r#"{"header_patterns":[{"name":"X-Forwarded-Host","contains":"Evil.Example"}]}"#,
    );
    assert_blocked(
        &plugin,
        &replace_header(get("/"), "x-forwarded-host", "www.EVIL.example"),
        "header",
    );
    // A bad value hidden behind a good one still counts.
    let mut repeated = replace_header(get("/"), "x-forwarded-host", "good.example");
    repeated
        .headers
        .push(("x-forwarded-host".to_owned(), "evil.example".to_owned()));
    assert_blocked(&plugin, &repeated, "header");
    assert_continues(
        &plugin,
        &replace_header(get("/"), "x-forwarded-host", "good.example"),
    );
    assert_continues(
        &plugin,
        &replace_header(get("/"), "referer", "evil.example"),
    );
}

#[test]
fn a_bad_configuration_refuses_to_load() {
    let sandbox = sandbox();
    for config in [
        r#"{"no_such_rule":true}"#,
        r#"{"header_patterns":[{"name":"x","contains":"y","regex":true}]}"#,
        r#"{"header_patterns":[{"name":"x"}]}"#,
        r#"{"blocked_user_agents":[""]}"#,
        r#"{"max_body_bytes":-1}"#,
        r#"{"sql_injection":"yes"}"#,
    ] {
        let error = try_load(&sandbox, config).expect_err(config);
        assert!(
            matches!(error, LoadError::Config { .. }),
            "{config}: {error}"
        );
    }
}
