//! The plugin phases through a real node and real compiled components: a
//! plugin's changes reach the upstream and the client, its answers replace
//! the upstream's, and a failing plugin follows its open/closed policy while
//! the node keeps serving.

use crate::common;

use crate::common::{assert_json_error, client, component, start_node, start_upstream, url};

/// A node proxying `/` to `upstream` through the plugin chain `chain`, with
/// `plugins` holding the `[[plugin]]` tables.
fn config(upstream: std::net::SocketAddr, chain: &str, plugins: &str) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[[route]]
prefix = "/"
pool = "upstream"
plugins = [{chain}]

[[pool]]
name = "upstream"
endpoints = ["http://{upstream}"]

{plugins}
"#
    )
}

fn plugin_table(name: &str, component_name: &str, on_failure: &str, config: &str) -> String {
    let (path, sha256) = component(component_name);
    let deadline = if config.contains("spin") {
        "2ms"
    } else {
        "500ms"
    };
    format!(
        r#"
[[plugin]]
name = "{name}"
path = "{}"
sha256 = "{sha256}"
on_failure = "{on_failure}"
config = {config}
# Epochs count wall time: honest plugins get room on a loaded test machine;
# the endless one is stopped at the real 2 ms default.
cpu_deadline = "{deadline}"
"#,
        path.display()
    )
}

#[tokio::test]
async fn template_stamps_both_ways_and_denies_configured_prefixes() {
    let upstream = start_upstream().await;
    let plugins = plugin_table(
        "template",
        "template",
        "closed",
        r#"{ header = "x-stamp", value = "edge", deny_prefixes = ["/admin"] }"#,
    );
    let node = start_node(&config(upstream.addr, r#""template""#, &plugins)).await;

    let response = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-stamp")
            .and_then(|v| v.to_str().ok()),
        Some("edge"),
        "on-response stamps the response"
    );
    let echo = common::json(&response.bytes().await.expect("body"));
    assert_eq!(
        echo["headers"]["x-stamp"], "edge",
        "on-request stamps the upstream request: {echo}"
    );

    let before = upstream.requests();
    let denied = client()
        .get(url(&node, "/admin/users"))
        .send()
        .await
        .expect("request");
    assert_eq!(denied.status(), 403);
    let body = common::json(&denied.bytes().await.expect("body"));
    assert_eq!(body["error"], "forbidden", "{body}");
    assert_eq!(
        upstream.requests(),
        before,
        "a plugin answer never reaches the upstream"
    );
}

#[tokio::test]
async fn a_trapping_plugin_fails_open_or_closed_by_policy_and_the_node_keeps_serving() {
    let upstream = start_upstream().await;
    let plugins = format!(
        "{}{}",
        plugin_table(
            "trap-open",
            "fixture_misbehave",
            "open",
            r#"{ mode = "trap" }"#
        ),
        plugin_table(
            "trap-closed",
            "fixture_misbehave",
            "closed",
            r#"{ mode = "trap" }"#
        )
    );
    let open = start_node(&config(upstream.addr, r#""trap-open""#, &plugins)).await;
    let closed = start_node(&config(upstream.addr, r#""trap-closed""#, &plugins)).await;

    for _ in 0..3 {
        let response = client()
            .get(url(&open, "/echo"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "fail-open skips the plugin");

        let response = client()
            .get(url(&closed, "/echo"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 500, "fail-closed answers 500");
        assert_json_error(&response.bytes().await.expect("body"), 500, "plugin_failed");
    }
}

#[tokio::test]
async fn a_reused_plugin_keeps_its_instance_across_requests_until_it_fails() {
    let upstream = start_upstream().await;
    let plugins = format!(
        "{}isolation = \"reused\"\n",
        plugin_table(
            "count",
            "fixture_misbehave",
            "open",
            r#"{ mode = "count" }"#
        )
    );
    let node = start_node(&config(upstream.addr, r#""count""#, &plugins)).await;
    let count = |path: &'static str| {
        let request = client().get(url(&node, path)).send();
        async move {
            let response = request.await.expect("request");
            assert_eq!(response.status(), 200);
            let echo = common::json(&response.bytes().await.expect("body"));
            echo["headers"]["x-count"].as_str().map(str::to_owned)
        }
    };
    // One call at a time: the same instance answers, its global counting.
    let mut counts = Vec::new();
    for _ in 0..3 {
        counts.push(count("/echo").await);
    }
    assert_eq!(
        counts,
        [Some("1".into()), Some("2".into()), Some("3".into())]
    );
    // It traps (fail-open: the request goes on without its change); the
    // next request gets a new instance.
    let response = client()
        .get(url(&node, "/trap/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "fail-open skips the trapped plugin");
    assert_eq!(count("/echo").await.as_deref(), Some("1"));
}

#[tokio::test]
async fn an_endless_plugin_is_stopped_at_its_deadline() {
    let upstream = start_upstream().await;
    let plugins = plugin_table(
        "spin",
        "fixture_misbehave",
        "closed",
        r#"{ mode = "spin" }"#,
    );
    let node = start_node(&config(upstream.addr, r#""spin""#, &plugins)).await;

    // An endless loop answers at all only if it was stopped (the client's
    // timeout bounds the wait); how soon, in CPU time, the sandbox's own
    // tests check, since wall time here depends on the machine's load.
    let response = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 500);
}

#[tokio::test]
async fn a_plugin_whose_bytes_do_not_match_its_pin_refuses_to_start() {
    let upstream = start_upstream().await;
    let (path, _) = component("template");
    let plugins = format!(
        r#"
[[plugin]]
name = "template"
path = "{}"
sha256 = "{}"
"#,
        path.display(),
        "0".repeat(64)
    );
    let text = config(upstream.addr, r#""template""#, &plugins);
    let config = edge_config::parse(
        &text,
        std::path::Path::new("test.toml"),
        std::path::Path::new("."),
    )
    .expect("valid configuration");
    let error = match breakwater_edge::start(config).await {
        Ok(_) => panic!("a node with a mismatched plugin pin started"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("sha256"), "{error}");
}

#[tokio::test]
async fn a_chain_mixes_abi_versions_and_allowed_answers_carry_ratelimit_headers() {
    let upstream = start_upstream().await;
    let plugins = format!(
        "{}grants = [\"log\"]\n{}grants = [\"counters\"]\n",
        plugin_table("old", "fixture_abi_v0_1", "closed", "{}"),
        // So slow that no token comes back while the test runs.
        plugin_table(
            "rate-limit",
            "rate_limit",
            "closed",
            r#"{ anonymous = { rate_per_second = 0.01, burst = 2 } }"#
        ),
    );
    let node = start_node(&config(upstream.addr, r#""old", "rate-limit""#, &plugins)).await;
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    for remaining in [1, 0] {
        let response = client()
            .get(url(&node, "/echo"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "ratelimit-policy").as_deref(),
            Some(r#""anonymous";q=2;w=200"#)
        );
        // t: the spent tokens come back at one per 100 s.
        let refill = (2 - remaining) * 100;
        assert_eq!(
            header(&response, "ratelimit"),
            Some(format!(r#""anonymous";r={remaining};t={refill}"#))
        );
        // The 0.1.0 plugin's response phase runs through the adapter.
        assert_eq!(
            header(&response, "x-abi-response").as_deref(),
            Some("/echo")
        );
        let echo = common::json(&response.bytes().await.expect("body"));
        assert_eq!(echo["headers"]["x-abi"], "0.1.0", "{echo}");
    }

    // Refused in rate-limit's request phase: no response phase runs.
    let refused = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 429);
    assert_eq!(
        header(&refused, "ratelimit").as_deref(),
        Some(r#""anonymous";r=0;t=100"#)
    );
    assert_eq!(header(&refused, "x-abi-response"), None);
}

#[tokio::test]
async fn a_chain_without_a_response_phase_makes_no_response_call() {
    let upstream = start_upstream().await;
    let plugins = format!(
        "{}isolation = \"reused\"\n\n[admin]\naddress = \"127.0.0.1:0\"\n",
        plugin_table(
            "count",
            "fixture_misbehave",
            "closed",
            r#"{ mode = "count" }"#
        )
    );
    let node = start_node(&config(upstream.addr, r#""count""#, &plugins)).await;
    for _ in 0..3 {
        let response = client()
            .get(url(&node, "/echo"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
    }
    // Every call is timed: three requests, three calls, all `on-request`.
    assert_eq!(
        common::metric(
            &node,
            "breakwater_plugin_call_seconds_count",
            &[r#"plugin="count""#]
        )
        .await,
        Some(3.0)
    );
}
