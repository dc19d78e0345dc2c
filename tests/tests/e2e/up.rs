//! `breakwater up` smoke test: the demo site on :8080 with ETags, the demo
//! model answering a streamed chat through the edge, and the demo plugin
//! chain (waf, rate limit). Needs ports 8080, 9000 and 9901 free.

use std::net::SocketAddr;
use std::time::Duration;

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, port_is_free};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_demo_site_with_etags() {
    // `up` runs the embedded demo on its fixed ports: a busy port fails the
    // test with the reason rather than passing without checking anything.
    for port in [8080, 9000, 9901] {
        assert!(
            port_is_free(port),
            "127.0.0.1:{port} is in use: stop whatever listens there (a running `breakwater up`?)"
        );
    }
    let addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut node = ChildGuard::spawn(breakwater(&["up"]));
    tokio::task::block_in_place(|| node.wait_until_accepts(addr));

    let client = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client");
    let response = client
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /: {e}\n{}", node.stderr()));
    assert_eq!(response.status(), 200, "{}", node.stderr());
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("an ETag on the demo page")
        .to_owned();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/html"),
        "content-type {content_type}"
    );
    let page = response.text().await.expect("body");
    assert!(
        page.to_ascii_lowercase().contains("<html"),
        "not a page: {page}"
    );

    let revalidated = client
        .get(format!("http://{addr}/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("conditional GET /");
    assert_eq!(revalidated.status(), 304);
    assert!(
        revalidated.bytes().await.expect("body").is_empty(),
        "a 304 has no body"
    );

    // The demo's plugin chain: the waf refuses scanners and obvious SQL
    // injection, and anonymous /v1/ traffic is limited to bursts of 20.
    let scanner = client
        .get(format!("http://{addr}/"))
        .header("user-agent", "sqlmap/1.7.2")
        .send()
        .await
        .expect("GET / as a scanner");
    assert_eq!(scanner.status(), 403, "{}", node.stderr());
    let injection = client
        .get(format!("http://{addr}/?id=1%27%20OR%20%271%27=%271"))
        .send()
        .await
        .expect("GET / with SQL injection");
    assert_eq!(injection.status(), 403);

    // The issue's own request: the demo model's greedy answer, streamed from
    // the GPU host through the plugin chain.
    let chat = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(
            r#"{"model":"smollm2-135m-instruct","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}],"stream":true,"temperature":0}"#,
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /v1/chat/completions: {e}\n{}", node.stderr()));
    assert_eq!(chat.status(), 200, "{}", node.stderr());
    let stream = chat.text().await.expect("the event stream");
    assert!(stream.trim_end().ends_with("data: [DONE]"), "{stream}");
    let answer: String = stream
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| {
            let chunk: serde_json::Value = serde_json::from_str(data).expect("a JSON chunk");
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(answer, "The capital of France is Paris.");

    let mut limited = None;
    for _ in 0..60 {
        let response = client
            .get(format!("http://{addr}/v1/models"))
            .send()
            .await
            .expect("GET /v1/models");
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("anonymous /v1/ traffic is rate limited within 60 requests");
    assert!(
        limited.headers().contains_key("retry-after"),
        "a 429 says when to retry"
    );

    node.sigterm();
    let status = tokio::task::block_in_place(|| node.wait_timeout(Duration::from_secs(15)))
        .unwrap_or_else(|| panic!("breakwater up still runs after SIGTERM:\n{}", node.stderr()));
    assert!(status.success(), "exited with {status}:\n{}", node.stderr());
}
