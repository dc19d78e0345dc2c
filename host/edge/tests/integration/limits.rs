//! Limits the node enforces itself: header size (431), body size (413),
//! body read time (408) and request-head read time (slowloris).

use crate::common;

use std::time::Duration;

use crate::common::{
    assert_json_error, client, closed_within, proxy_config, raw_connect_and_send,
    read_raw_response, start_node, start_upstream, url,
};
use tokio::io::AsyncWriteExt;

const LIMITS: &str = r#"
max_header_bytes = 8192
max_body_bytes = 65536
header_read_timeout = "500ms"
body_read_timeout = "1s"
"#;

#[tokio::test]
async fn header_just_under_the_limit_is_served() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    let response = client()
        .get(url(&node, "/echo"))
        .header("x-big", "a".repeat(7000))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn header_just_over_the_limit_is_a_json_431() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    // Over our 8192 bytes, under hyper's buffer (8192 + 1024): our check answers.
    let response = client()
        .get(url(&node, "/echo"))
        .header("x-big", "a".repeat(8400))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 431);
    assert!(response.headers().contains_key("x-request-id"));
    assert_json_error(
        &response.bytes().await.expect("body"),
        431,
        "headers_too_large",
    );
    assert_eq!(upstream.connections(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn h2_header_over_the_limit_is_a_json_431() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(common::PATIENCE)
        .build()
        .expect("client");
    let response = h2
        .get(url(&node, "/echo"))
        .header("x-big", "a".repeat(8400))
        .send()
        .await
        .expect("request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 431);
    assert_json_error(
        &response.bytes().await.expect("body"),
        431,
        "headers_too_large",
    );
    assert_eq!(upstream.connections(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn huge_header_is_a_431() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    let request = format!(
        "GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Huge: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let mut stream = raw_connect_and_send(common::listener(&node), request.as_bytes()).await;
    let response = read_raw_response(&mut stream)
        .await
        .expect("a 431 response, not a dropped connection");
    assert_eq!(response.status, 431, "{response:?}");
    // Past hyper's own buffer: hyper answers, with our JSON body.
    assert_json_error(&response.body, 431, "headers_too_large");
    assert_eq!(upstream.connections(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn unparsable_request_heads_are_json_400s() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    for head in [
        "GET /a b HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET / HTTP/1.1\r\nHost localhost\r\n\r\n",
        "G@T / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ] {
        let mut stream = raw_connect_and_send(common::listener(&node), head.as_bytes()).await;
        let response = read_raw_response(&mut stream)
            .await
            .unwrap_or_else(|| panic!("no answer to {head:?}"));
        assert_eq!(response.status, 400, "{head:?}: {response:?}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_json_error(&response.body, 400, "bad_request");
    }
    // The node still serves.
    let response = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn declared_body_over_the_limit_is_a_413_before_the_upstream_is_contacted() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    // Only the head is sent: the answer must not wait for the body.
    let request = "POST /size HTTP/1.1\r\nHost: localhost\r\n\
        Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n";
    let mut stream = raw_connect_and_send(common::listener(&node), request.as_bytes()).await;
    let response = read_raw_response(&mut stream)
        .await
        .expect("a response from the node");
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_json_error(&response.body, 413, "payload_too_large");
    assert_eq!(upstream.connections(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn chunked_body_growing_past_the_limit_is_a_413() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    let mut stream = raw_connect_and_send(
        common::listener(&node),
        b"POST /size HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    // 5 × 16 KiB = 80 KiB > 64 KiB, and no terminating chunk: the node must
    // cut the body off by its size, not wait for its end.
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..5 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .expect("chunk size");
        stream.write_all(&chunk).await.expect("chunk data");
        stream.write_all(b"\r\n").await.expect("chunk end");
    }
    let response = read_raw_response(&mut stream)
        .await
        .expect("a response from the node");
    assert_eq!(response.status, 413, "{response:?}");
    assert_json_error(&response.body, 413, "payload_too_large");
}

#[tokio::test]
async fn body_trickling_slower_than_body_read_timeout_is_a_408() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    let mut stream = raw_connect_and_send(
        common::listener(&node),
        b"POST /size HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await;
    // Then nothing: the body stalls at 10 of 1000 bytes.
    let response = read_raw_response(&mut stream)
        .await
        .expect("a 408 response, not a dropped connection");
    assert_eq!(response.status, 408, "{response:?}");
    assert_json_error(&response.body, 408, "request_timeout");
}

#[tokio::test]
async fn slowloris_head_is_cut_off_while_others_are_served() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    // Half a request head, then nothing.
    let mut slow = raw_connect_and_send(
        common::listener(&node),
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
    )
    .await;

    // Meanwhile another client is served.
    let response = client()
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);

    // header_read_timeout is 500 ms; allow for a loaded machine.
    assert!(
        closed_within(&mut slow, Duration::from_secs(4)).await,
        "a connection with a half-sent head is still open after 4 s"
    );
}

#[tokio::test]
async fn connection_that_never_sends_a_byte_is_closed() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    // Nothing at all, and a partial h2 preface: both before hyper knows
    // which protocol it speaks.
    let mut silent = raw_connect_and_send(common::listener(&node), b"").await;
    let mut preface = raw_connect_and_send(common::listener(&node), b"PRI * HTTP").await;
    assert!(
        closed_within(&mut silent, Duration::from_secs(4)).await,
        "a connection that sent nothing is still open after 4 s (header_read_timeout 500 ms)"
    );
    assert!(
        closed_within(&mut preface, Duration::from_secs(4)).await,
        "a connection that sent half an h2 preface is still open after 4 s"
    );
}

/// A raw request on a fresh connection to `node`, and its response.
async fn raw_request(node: &breakwater_edge::RunningNode, request: &str) -> common::RawResponse {
    let mut stream = raw_connect_and_send(common::listener(node), request.as_bytes()).await;
    read_raw_response(&mut stream)
        .await
        .expect("a response, not a dropped connection")
}

#[tokio::test]
async fn connect_is_a_json_405_with_allow() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    let response = raw_request(
        &node,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 405, "{response:?}");
    assert_eq!(
        response.header("allow"),
        Some("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"),
        "{response:?}"
    );
    assert_json_error(&response.body, 405, "method_not_allowed");
    assert_eq!(upstream.connections(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn trace_is_refused_by_default() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, LIMITS, "")).await;

    let response = raw_request(
        &node,
        "TRACE /echo HTTP/1.1\r\nHost: localhost\r\nCookie: secret=1\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 405, "{response:?}");
    assert_json_error(&response.body, 405, "method_not_allowed");
    assert_eq!(upstream.connections(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn methods_outside_the_configured_list_are_405() {
    let upstream = start_upstream().await;
    let limits = format!("{LIMITS}\nallowed_methods = [\"GET\", \"HEAD\"]\n");
    let node = start_node(&proxy_config(upstream.addr, &limits, "")).await;
    let http = client();

    let refused = http
        .post(url(&node, "/echo"))
        .body("x")
        .send()
        .await
        .expect("POST");
    assert_eq!(refused.status(), 405);
    assert_eq!(
        refused.headers().get("allow").map(|v| v.as_bytes()),
        Some(&b"GET, HEAD"[..])
    );
    assert!(refused.headers().contains_key("x-request-id"));
    assert_json_error(
        &refused.bytes().await.expect("body"),
        405,
        "method_not_allowed",
    );
    assert_eq!(upstream.connections(), 0, "the upstream was contacted");

    let served = http.get(url(&node, "/echo")).send().await.expect("GET");
    assert_eq!(served.status(), 200);
}
