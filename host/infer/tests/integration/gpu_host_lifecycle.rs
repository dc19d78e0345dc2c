//! A GPU host started in-process through its lifecycle, as the CLI starts
//! it: listen before load, report how loading went, drain on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::server::lifecycle::{
    GpuHostError, GpuHostOptions, ModelChoice, RunningGpuHost,
};
use breakwater_infer::server::{BackendOptions, ServerConfig};
use breakwater_infer::test_model::tiny_llama;
use serde_json::json;

fn options(model: std::path::PathBuf) -> GpuHostOptions {
    GpuHostOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        server: ServerConfig::new("tiny"),
        model: ModelChoice::File(model),
        backend: BackendOptions::cpu(2),
        engine: EngineConfig::default(),
        drain: Duration::from_secs(60),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_is_served_and_a_stream_in_flight_is_drained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, tiny_llama(5)).expect("write the model");
    let mut host = RunningGpuHost::start(options(path)).await.expect("start");
    let base = format!("http://{}", host.local_addr());
    let ready = host.loaded().await.expect("the model loads");
    assert_eq!(ready.backend, "cpu");
    assert!(ready.kv_blocks > 0);
    let client = client();
    let status = client.get(format!("{base}/health/ready")).send().await;
    assert_eq!(status.expect("ready answers").status(), 200);

    let mut stream = client
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(
            json!({"model": "tiny", "prompt": "once upon", "max_tokens": 64,
                   "ignore_eos": true, "stream": true})
            .to_string(),
        )
        .send()
        .await
        .expect("the stream starts");
    assert_eq!(stream.status(), 200);
    let mut body = stream
        .chunk()
        .await
        .expect("a first event")
        .expect("not ended")
        .to_vec();
    // The head and a first event have left: the request is in flight.
    let stopping = tokio::spawn(host.shutdown());
    while let Some(chunk) = stream.chunk().await.expect("the stream is not cut") {
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8(body).expect("utf-8");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(body.contains("\"finish_reason\":\"length\""), "{body}");
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("shutdown ends once the stream is drained")
        .expect("the shutdown task");
    let refused = reqwest::Client::new()
        .get(format!("{base}/health/live"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(refused.is_err(), "a stopped host takes no connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_open_is_reported_while_liveness_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.gguf");
    let mut host = RunningGpuHost::start(options(path.clone()))
        .await
        .expect("start");
    let base = format!("http://{}", host.local_addr());
    let error = host
        .loaded()
        .await
        .expect_err("a missing file does not load");
    assert!(matches!(error, GpuHostError::Open { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "the error names the file: {error}"
    );
    let client = client();
    let live = client.get(format!("{base}/health/live")).send().await;
    assert_eq!(live.expect("live answers").status(), 200);
    let ready = client.get(format!("{base}/health/ready")).send().await;
    assert_eq!(ready.expect("ready answers").status(), 503);
    host.shutdown().await;
}
