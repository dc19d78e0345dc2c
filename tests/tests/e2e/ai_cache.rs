//! Completions answered at the edge, against a real GPU host process (CPU
//! backend, a random tiny model from `breakwater model gen-test`) behind a
//! `breakwater edge` whose `/v1/` route caches deterministic completions
//! (cache-policy, bodies shown to it).
//!
//! - The launch crowd: 200 identical deterministic streaming requests at
//!   once make one generation; every client gets the whole stream, the
//!   same content, under an id of its own; the tokens the others were
//!   spared are counted.

use std::collections::HashSet;

use breakwater_e2e::{
    EdgeProcess, GpuHostProcess, PATIENCE, completion_caching_edge, gen_test_model,
    gpu_generations, identity_and_rest, metric_sum, post_json,
};

/// An edge caching `host`'s deterministic completions. Plugin phases and
/// followers may wait as long as a crowd needs here: this is about what
/// reaches the GPU host, not about shedding.
fn caching_edge(host: &GpuHostProcess) -> EdgeProcess {
    completion_caching_edge(
        &format!("http://{}", host.addr),
        "[limits]\nplugin_queue_timeout = \"30s\"\n\n[cache]\ncoalesce_wait = \"60s\"",
        "first_byte_timeout = \"60s\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crowd_asking_the_same_thing_at_once_makes_one_generation() {
    let model = tempfile::tempdir().expect("tempdir");
    gen_test_model(model.path(), "tiny", 5);
    let path = model.path().to_str().expect("UTF-8 path");
    let host =
        GpuHostProcess::start(&["--model", path, "--model-name", "m"], |_| {}, PATIENCE).await;
    let edge = caching_edge(&host);
    let before = gpu_generations(&host.url("/metrics")).await;

    const CROWD: usize = 200;
    let body = r#"{"model":"m","prompt":"launch day","max_tokens":48,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CROWD)
        .build()
        .expect("client");
    let url = edge.url("/v1/completions");
    let answers =
        futures_util::future::join_all((0..CROWD).map(|_| post_json(&client, &url, body))).await;

    let mut ids = HashSet::new();
    let mut contents = HashSet::new();
    let mut outcomes = std::collections::BTreeMap::new();
    for answer in &answers {
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let text = String::from_utf8_lossy(&answer.body);
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "a whole stream: {text}"
        );
        let (id, rest) = identity_and_rest(&answer.body);
        ids.insert(id);
        contents.insert(serde_json::to_string(&rest).expect("JSON"));
        *outcomes.entry(answer.x_cache.clone()).or_insert(0) += 1;
    }
    assert_eq!(contents.len(), 1, "every client got the same content");
    assert_eq!(ids.len(), CROWD, "each client its own id");
    assert_eq!(outcomes.get("MISS"), Some(&1), "one leader: {outcomes:?}");
    assert_eq!(
        gpu_generations(&host.url("/metrics")).await - before,
        1.0,
        "one generation for the whole crowd ({outcomes:?})"
    );
    // Tokens saved: each of the 199 others was spared the whole stream,
    // one token per content event (no usage was asked for).
    let events = String::from_utf8_lossy(&answers[0].body)
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter(|event| {
            event["choices"][0]["text"]
                .as_str()
                .is_some_and(|text| !text.is_empty())
        })
        .count();
    let text = edge.metrics().await;
    assert_eq!(
        metric_sum(
            &text,
            "breakwater_cache_tokens_saved_total",
            &[("kind", "completion")]
        ),
        ((CROWD - 1) * events) as f64,
        "{text}"
    );
    eprintln!(
        "crowd of {CROWD}: {outcomes:?}, waiters fed live: {}",
        metric_sum(
            &text,
            "breakwater_cache_coalesced_waits_total",
            &[("outcome", "shared")]
        )
    );
}
