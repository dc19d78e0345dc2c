//! `breakwater up` smoke test: the demo site on :8080 with ETags, the demo
//! model answering a streamed chat through the edge, deterministic
//! completions answered from the edge's cache, and the demo plugin chain
//! (waf, rate limit). Needs ports 8080, 9000 and 9901 free.

use std::net::SocketAddr;
use std::time::Duration;

use breakwater_e2e::{
    ChildGuard, PATIENCE, breakwater, gpu_generations, identity_and_rest, port_is_free, post_json,
    wait_for,
};

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

    completions_are_cached_when_deterministic(&client, addr).await;

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

/// Generations the demo's GPU host has finished, whatever their outcome.
async fn generations() -> f64 {
    gpu_generations("http://127.0.0.1:9000/metrics").await
}

/// A short chat about `topic`, as a JSON body with `extra` fields. The
/// run's own nonce keeps the disk tier's entries of earlier runs out.
fn chat_body(nonce: u128, topic: &str, extra: serde_json::Value) -> String {
    let mut body = serde_json::json!({
        "model": "smollm2-135m-instruct",
        "messages": [
            {"role": "system", "content": format!("You are a helpful assistant. Session {nonce}.")},
            {"role": "user", "content": topic},
        ],
        "max_tokens": 8,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

/// Sends `body` and returns its `X-Cache` and body.
async fn ask(client: &reqwest::Client, addr: SocketAddr, body: &str) -> (String, Vec<u8>) {
    let answered = post_json(client, &format!("http://{addr}/v1/chat/completions"), body).await;
    assert_eq!(answered.status, 200, "{body}");
    (answered.x_cache, answered.body)
}

/// Sends `body` and checks how the edge answered it and how many
/// generations that cost the GPU host.
async fn expect(
    client: &reqwest::Client,
    addr: SocketAddr,
    body: &str,
    cache: &str,
    new_generations: f64,
) -> Vec<u8> {
    let before = generations().await;
    let (marked, answer) = ask(client, addr, body).await;
    assert_eq!(marked, cache, "X-Cache of {body}");
    let after = before + new_generations;
    wait_for(
        &format!("{new_generations} generation(s) for {body}"),
        PATIENCE,
        async || generations().await >= after,
    )
    .await;
    assert_eq!(generations().await, after, "generations for {body}");
    answer
}

/// The demo route caches deterministic completions (temperature 0, or a
/// seed) by their canonical body: the repeat is a hit with the same
/// content byte for byte (under an id of its own),
/// without a generation; any change to what decides the answer misses;
/// a sampled completion always reaches the GPU host.
async fn completions_are_cached_when_deterministic(client: &reqwest::Client, addr: SocketAddr) {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    let greedy = chat_body(
        nonce,
        "Name a colour.",
        serde_json::json!({"temperature": 0}),
    );
    let first = expect(client, addr, &greedy, "MISS", 1.0).await;
    // Written otherwise (spacing, field order), the same request.
    let value: serde_json::Value = serde_json::from_str(&greedy).expect("JSON");
    let pretty = serde_json::to_string_pretty(&value).expect("JSON text");
    let again = expect(client, addr, &pretty, "HIT", 0.0).await;
    assert_same_answer(&first, &again);

    let streamed = chat_body(
        nonce,
        "Name a colour.",
        serde_json::json!({"temperature": 0, "stream": true}),
    );
    let first = expect(client, addr, &streamed, "MISS", 1.0).await;
    let text = String::from_utf8_lossy(&first);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let again = expect(client, addr, &streamed, "HIT", 0.0).await;
    assert_same_answer(&first, &again);

    for (what, changed) in [
        (
            "temperature",
            chat_body(
                nonce,
                "Name a colour.",
                serde_json::json!({"temperature": 0, "seed": 1}),
            ),
        ),
        (
            "seed",
            chat_body(
                nonce,
                "Name a colour.",
                serde_json::json!({"temperature": 0.7, "seed": 2}),
            ),
        ),
        (
            "message",
            chat_body(
                nonce,
                "Name a fruit.",
                serde_json::json!({"temperature": 0}),
            ),
        ),
    ] {
        let before = generations().await;
        let (marked, _) = ask(client, addr, &changed).await;
        assert_eq!(marked, "MISS", "a changed {what} misses: {changed}");
        wait_for(
            &format!("the generation of a changed {what}"),
            PATIENCE,
            async || generations().await > before,
        )
        .await;
    }
    // A seeded answer is deterministic: cached like a greedy one.
    let seeded = chat_body(
        nonce,
        "Name a colour.",
        serde_json::json!({"temperature": 0.7, "seed": 2}),
    );
    expect(client, addr, &seeded, "HIT", 0.0).await;

    let sampled = chat_body(
        nonce,
        "Name a colour.",
        serde_json::json!({"temperature": 0.7}),
    );
    for _ in 0..2 {
        expect(client, addr, &sampled, "BYPASS", 1.0).await;
    }
}

/// A hit is the stored answer, its content byte for byte, under an id of
/// its own and of the same length (Content-Length holds).
fn assert_same_answer(first: &[u8], again: &[u8]) {
    assert_eq!(first.len(), again.len());
    let (first_id, first_rest) = identity_and_rest(first);
    let (again_id, again_rest) = identity_and_rest(again);
    assert_eq!(again_rest, first_rest, "the same content");
    assert_ne!(again_id, first_id, "each answer has its own id");
    assert_eq!(again_id.len(), first_id.len());
}
