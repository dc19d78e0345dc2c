//! The reverse proxy against a real upstream: streaming in both directions,
//! request ids, forwarding headers, hop-by-hop headers, and the JSON errors
//! for an upstream that is down, slow or breaks the connection.

use crate::common;

use crate::common::{
    PATIENCE, assert_json_error, client, closed_port, json, proxy_config, raw_connect_and_send,
    read_raw_response, start_node, start_upstream, url,
};
use futures_util::StreamExt;

#[tokio::test]
async fn sse_events_stream_through_one_by_one() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    // The upstream sends each event after the first only once the client
    // has had the one before: a proxy that buffered would never deliver it.
    let response = client()
        .get(url(&node, "/v1/sse?n=5&step=1"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut stream = response.bytes_stream();
    let mut body = String::new();
    for i in 0..5 {
        let event = format!("id: {i}\ndata: event {i}\n\n");
        while !body.ends_with(&event) {
            let chunk = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .unwrap_or_else(|_| panic!("event {i} held back: the proxy buffers"))
                .expect("the stream goes on")
                .expect("body chunk");
            body.push_str(&String::from_utf8_lossy(&chunk));
        }
        upstream.step();
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after 5 events"
    );
    let expected: String = (0..5)
        .map(|i| format!("id: {i}\ndata: event {i}\n\n"))
        .collect();
    assert_eq!(body, expected);
}

#[tokio::test]
async fn request_id_is_generated_when_absent_and_sent_both_ways() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    let response = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id on the response")
        .to_owned();
    assert!(!id.is_empty() && id.len() <= 128, "odd request id {id:?}");
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(echo["headers"]["x-request-id"], id.as_str(), "{echo}");

    // A second request gets a different id.
    let other = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    let other_id = other
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id on the response");
    assert_ne!(other_id, id);
}

#[tokio::test]
async fn request_id_from_the_client_is_passed_through() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    let response = client()
        .get(url(&node, "/echo"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("client-chosen-42")
    );
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(
        echo["headers"]["x-request-id"], "client-chosen-42",
        "{echo}"
    );
}

#[tokio::test]
async fn headers_only_the_edge_may_send_upstream_are_dropped_from_clients() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    let response = client()
        .get(url(&node, "/echo"))
        .header(breakwater_wire::ATTEMPT_HEADER, "7")
        .header(breakwater_wire::TOKEN_IDS_HEADER, "1")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let echo = json(&response.bytes().await.expect("body"));
    let headers = &echo["headers"];
    assert!(headers[breakwater_wire::ATTEMPT_HEADER].is_null(), "{echo}");
    assert!(
        headers[breakwater_wire::TOKEN_IDS_HEADER].is_null(),
        "{echo}"
    );
}

#[tokio::test]
async fn via_and_forwarded_headers_are_set_upstream() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    let response = client()
        .get(url(&node, "/api/echo?x=1"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let via = response
        .headers()
        .get("via")
        .and_then(|v| v.to_str().ok())
        .expect("Via on the response")
        .to_owned();
    assert!(via.contains("breakwater"), "response Via: {via}");
    let echo = json(&response.bytes().await.expect("body"));
    let headers = &echo["headers"];
    assert_eq!(echo["path"], "/api/echo", "{echo}");
    assert_eq!(echo["query"], "x=1", "{echo}");
    assert_eq!(headers["via"], "1.1 breakwater", "{echo}");
    let forwarded = headers["forwarded"].as_str().expect("Forwarded upstream");
    assert!(
        forwarded.contains("for=127.0.0.1") && forwarded.contains("proto=http"),
        "Forwarded: {forwarded}"
    );
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{echo}");
    assert_eq!(headers["x-forwarded-proto"], "http", "{echo}");

    // From a peer that is not a trusted proxy, a client's chain is not
    // believed; from a trusted one it is extended, not replaced.
    let spoofed_chain = |node: &breakwater_edge::RunningNode| {
        client()
            .get(url(node, "/echo"))
            .header("x-forwarded-for", "203.0.113.7")
    };
    let response = spoofed_chain(&node).send().await.expect("request");
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1", "{echo}");
    let trusting = format!(
        "[node]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
        proxy_config(upstream.addr, "", "")
    );
    let trusting_node = start_node(&trusting).await;
    let response = spoofed_chain(&trusting_node).send().await.expect("request");
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(
        echo["headers"]["x-forwarded-for"], "203.0.113.7, 127.0.0.1",
        "{echo}"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    let request = "GET /echo HTTP/1.1\r\n\
        Host: localhost\r\n\
        Connection: close, x-secret\r\n\
        X-Secret: listed-in-connection\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Upgrade: websocket\r\n\
        Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
        Proxy-Connection: keep-alive\r\n\
        X-Kept: yes\r\n\
        \r\n";
    let mut stream = raw_connect_and_send(common::listener(&node), request.as_bytes()).await;
    let response = read_raw_response(&mut stream)
        .await
        .expect("a response from the node");
    assert_eq!(response.status, 200, "{response:?}");
    let echo = json(&response.body);
    let headers = echo["headers"].as_object().expect("headers object");
    for name in [
        "x-secret",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !headers.contains_key(name),
            "hop-by-hop header `{name}` reached the upstream: {echo}"
        );
    }
    if let Some(connection) = headers.get("connection").and_then(|v| v.as_str()) {
        assert!(
            !connection.contains("x-secret"),
            "the client's Connection header reached the upstream: {echo}"
        );
    }
    assert_eq!(headers.get("x-kept").and_then(|v| v.as_str()), Some("yes"));
}

#[tokio::test]
async fn request_body_streams_upstream_whole() {
    const TOTAL: usize = 5 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "max_body_bytes = 8388608", "")).await;

    let chunks = futures_util::stream::iter(
        (0..TOTAL / CHUNK).map(|i| Ok::<_, std::io::Error>(vec![(i % 251) as u8; CHUNK])),
    );
    let response = client()
        .post(url(&node, "/upload/size"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(echo["bytes"], TOTAL as u64, "{echo}");
    assert_eq!(echo["complete"], true, "{echo}");
}

#[tokio::test]
async fn closed_upstream_port_is_a_json_502() {
    let dead = closed_port().await;
    let node = start_node(&proxy_config(dead, "", "connect_timeout = \"2s\"")).await;

    let response = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 502);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert!(response.headers().contains_key("x-request-id"));
    assert_json_error(
        &response.bytes().await.expect("body"),
        502,
        "upstream_unavailable",
    );
}

#[tokio::test]
async fn upstream_slower_than_first_byte_timeout_is_a_json_504() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(
        upstream.addr,
        "",
        "first_byte_timeout = \"300ms\"",
    ))
    .await;

    // The upstream would answer after a minute, beyond the client's
    // timeout: an answer at all is the edge's own 504, with no clock read.
    let response = client()
        .get(url(&node, "/sleep?ms=60000"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 504);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_json_error(
        &response.bytes().await.expect("body"),
        504,
        "upstream_timeout",
    );
}

#[tokio::test]
async fn upstream_that_drops_the_connection_is_a_json_502() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    let response = client()
        .get(url(&node, "/close"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 502);
    assert_json_error(
        &response.bytes().await.expect("body"),
        502,
        "upstream_unavailable",
    );
    assert!(
        upstream.requests() >= 1,
        "the upstream never saw the request"
    );

    // The node keeps serving through the same pool afterwards.
    let response = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
}

/// `balance = "prefix"`: requests whose prompts begin alike (one tenant's
/// system prompt) meet one endpoint, other tenants spread over the rest,
/// and a request without a prompt is balanced by load.
#[tokio::test]
async fn chats_sharing_a_system_prompt_meet_one_endpoint() {
    let upstreams = [
        common::start_upstream().await,
        common::start_upstream().await,
        common::start_upstream().await,
    ];
    let endpoints: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"http://{}\"", u.addr))
        .collect();
    let toml = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[[route]]
prefix = "/"
pool = "gpu"

[[pool]]
name = "gpu"
endpoints = [{}]
balance = "prefix"
prefix_bytes = 1024
"#,
        endpoints.join(", ")
    );
    let node = common::start_node(&toml).await;
    let http = client();
    let counts = || upstreams.iter().map(|u| u.requests()).collect::<Vec<_>>();
    let mut homes = Vec::new();
    for tenant in 0..12 {
        let system = format!("You are the assistant of tenant {tenant}. ").repeat(40);
        let before = counts();
        for question in 0..3 {
            let body = serde_json::json!({
                "model": "m",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": format!("question {question}")},
                ],
            });
            let response = http
                .post(url(&node, "/v1/chat/completions/echo"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), 200);
        }
        let after = counts();
        let served: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(
            served.iter().filter(|n| **n > 0).count(),
            1,
            "tenant {tenant}: {served:?}"
        );
        homes.push(served.iter().position(|n| *n == 3));
    }
    let distinct: std::collections::HashSet<_> = homes.iter().collect();
    // Twelve tenants on one of three endpoints: a chance of 3 in 3^12.
    assert!(
        distinct.len() > 1,
        "every tenant on one endpoint: {homes:?}"
    );
    let affine = common::metric(
        &node,
        "breakwater_upstream_prefix_routed_total",
        &["pool=\"gpu\"", "outcome=\"affine\""],
    )
    .await;
    assert_eq!(affine, Some(36.0));
    // No prompt: by load.
    let response = http.get(url(&node, "/echo")).send().await.expect("send");
    assert_eq!(response.status(), 200);
    let by_load = common::metric(
        &node,
        "breakwater_upstream_prefix_routed_total",
        &["pool=\"gpu\"", "outcome=\"no_prefix\""],
    )
    .await;
    assert_eq!(by_load, Some(1.0));
}
