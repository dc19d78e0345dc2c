//! The API on the demo model: the issue's exact request answers like
//! llama.cpp, and overload and cancellation free what they should.

use crate::support;

use std::time::Duration;

use crate::support::{TestServer, stream_text};
use breakwater_infer::demo_model;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::scheduler::EngineConfig;
use serde_json::json;

fn demo() -> Gguf {
    let path = demo_model::ensure(&demo_model::default_dir()).expect("fetch the demo model");
    Gguf::open(path).expect("parse the demo model")
}

async fn server(engine: EngineConfig) -> TestServer {
    support::start(&demo(), demo_model::MODEL_NAME, engine).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_capital_of_france() {
    let s = server(EngineConfig::default()).await;
    // The request of the issue's "done means", byte for byte.
    let body = r#"{"model":"smollm2-135m-instruct","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}],"stream":true,"temperature":0}"#;
    let r = s.post_raw("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (text, finish) = stream_text(&r.events());
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(finish, "stop");
}

/// A request that runs until cancelled (`ignore_eos`, thousands of tokens
/// at tens per second), read only up to its first content chunk.
async fn hold(s: &TestServer) -> reqwest::Response {
    let mut response = s
        .client
        .post(format!("{}/v1/chat/completions", s.base))
        .body(
            json!({
                "model": demo_model::MODEL_NAME,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 4000, "ignore_eos": true, "stream": true,
            })
            .to_string(),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    // The role chunk comes at once; the request then waits or runs.
    let first = response.chunk().await.expect("read").expect("a chunk");
    assert!(first.starts_with(b"data: "));
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_rejects_and_cancellation_frees_slot_and_blocks() {
    let s = server(EngineConfig {
        max_batch: 1,
        queue_capacity: 1,
        ..EngineConfig::default()
    })
    .await;
    let total = s.app.model().unwrap().engine().kv_blocks_total();
    let within = Duration::from_secs(10);

    let running = hold(&s).await;
    s.wait_until(within, |s| s.stats().running == 1).await;
    let blocks = s.stats().kv_blocks_used;
    assert!(blocks > 4000 / 16, "{blocks} blocks for 4000+ tokens");
    let waiting = hold(&s).await;
    s.wait_until(within, |s| s.stats().waiting == 1).await;

    // The batch and the queue are full: 503, Retry-After, OpenAI's shape.
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": demo_model::MODEL_NAME,
                    "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=120).contains(&retry), "{retry}");
    let e = &r.json()["error"];
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("server_error"), Some("server_overloaded"))
    );
    assert_eq!(
        s.metric("breakwater_infer_rejections_total{reason=\"queue_full\"}")
            .await,
        1.0
    );

    // The running client hangs up: within a step its slot and blocks go
    // to the waiting one.
    let steps = s.stats().steps;
    drop(running);
    s.wait_until(within, |s| s.stats().running == 1 && s.stats().waiting == 0)
        .await;
    assert!(
        s.stats().steps - steps < 50,
        "freed after {} steps",
        s.stats().steps - steps
    );
    assert_eq!(s.stats().kv_blocks_used, blocks);

    // And when that one hangs up too, everything is free.
    drop(waiting);
    s.wait_until(within, |s| s.stats().running == 0).await;
    let stats = s.stats();
    assert_eq!((stats.kv_blocks_used, stats.kv_blocks_free), (0, total));
    assert_eq!(
        s.metric("breakwater_infer_sequences_finished_total{reason=\"cancelled\"}")
            .await,
        2.0
    );
    assert_eq!(s.metric("breakwater_infer_kv_blocks_used").await, 0.0);
    assert_eq!(s.metric("breakwater_infer_running_sequences").await, 0.0);
}
