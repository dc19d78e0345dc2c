//! A hot swap in process, from a `file://` model store: a stream that
//! started on the old version runs to its end on the old engine while new
//! requests already go to the new version; a stream an edge can continue
//! elsewhere (it asked for token ids) is handed over at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_infer::demo_model;
use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::server::swap::{ModelSource, ReloadAuth, SwapOptions, Swapper};
use breakwater_infer::server::{self, AppState, BackendOptions, ServerConfig};
use breakwater_infer::telemetry::Telemetry;
use breakwater_infer::test_model::hf::{self, HfDtype};
use breakwater_store::model::{ModelStore, PullOptions, PushOptions, StoreSpec};
use breakwater_store::{StoreOptions, StoreUrl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_started_before_a_swap_finishes_on_the_old_version() {
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("store");
    std::fs::create_dir(&root).expect("mkdir");
    let store = ModelStore::open(&StoreSpec {
        url: StoreUrl::File { root },
        options: StoreOptions::default(),
    })
    .expect("open the store");

    // v1: the demo model, slow enough on the CPU that a long answer spans
    // the swap; v2: a tiny test model.
    let demo = demo_model::ensure(&demo_model::default_dir()).expect("fetch the demo model");
    let v1 = work.path().join("v1");
    std::fs::create_dir(&v1).expect("mkdir");
    std::os::unix::fs::symlink(&demo, v1.join("model.gguf")).expect("link");
    let first = PushOptions {
        channel: Some("stable".into()),
        ..PushOptions::new("m", "1")
    };
    store.push(&v1, &first, &()).await.expect("push v1");
    let v2 = work.path().join("v2");
    hf::generate(&v2, "tiny", 5, HfDtype::F16).expect("a tiny model");
    store
        .push(&v2, &PushOptions::new("m", "2"), &())
        .await
        .expect("push v2");

    let app = AppState::new(ServerConfig::new("m"), Telemetry::new());
    let swapper = Swapper::new(
        ModelSource {
            reference: "m:stable".parse().expect("reference"),
            stores: vec![store.clone()],
            pull: PullOptions::new(work.path().join("cache")),
        },
        SwapOptions {
            backend: BackendOptions::cpu(1),
            engine: EngineConfig::default(),
            drain: Duration::from_secs(60),
            load_deadline: Duration::from_secs(60),
            auth: ReloadAuth::LoopbackOnly,
        },
    );
    app.set_swapper(Arc::clone(&swapper))
        .expect("first swapper");
    let serving = swapper.start(&app).await.expect("serve v1");
    assert_eq!(serving.version, "1");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(listener, Arc::clone(&app), async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");

    // A long stream on v1, read up to its first chunk; and the same from
    // an edge, which can continue it on another host.
    let start_long = |headers: &[(&str, &str)]| {
        let mut request = client
            .post(format!("{base}/v1/completions"))
            .body(
                r#"{"model":"m","prompt":"Once upon a time","max_tokens":160,"temperature":0,"ignore_eos":true,"stream":true}"#,
            );
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move {
            let mut response = request.send().await.expect("a long request");
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["x-model-version"], "1");
            let first = response
                .chunk()
                .await
                .expect("read")
                .expect("a first chunk")
                .to_vec();
            (response, first)
        }
    };
    let (mut long, mut body) = start_long(&[]).await;
    let (mut handed, mut handed_body) =
        start_long(&[(breakwater_wire::TOKEN_IDS_HEADER, "1")]).await;

    store.promote("m", "2", "stable").await.expect("promote");
    let reload = client
        .post(format!("{base}/admin/models/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status(), 200);
    let answer: serde_json::Value =
        serde_json::from_str(&reload.text().await.expect("answer")).expect("JSON");
    assert_eq!(answer["result"], "swapped", "{answer}");
    assert_eq!(answer["to"], "2", "{answer}");
    let swapped_at = Instant::now();

    // New requests go to v2 while the v1 stream still runs.
    let short = client
        .post(format!("{base}/v1/completions"))
        .body(r#"{"model":"m","prompt":"hello","max_tokens":4,"temperature":0}"#)
        .send()
        .await
        .expect("a request after the swap");
    assert_eq!(short.status(), 200);
    assert_eq!(short.headers()["x-model-version"], "2");

    // The edge's stream ends with the handoff, and without `[DONE]`: the
    // edge continues it on another host.
    while let Some(chunk) = handed.chunk().await.expect("read the edge's stream") {
        handed_body.extend_from_slice(&chunk);
    }
    let handed_text = String::from_utf8_lossy(&handed_body);
    let last = handed_text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .unwrap_or_default();
    assert!(
        last.contains(breakwater_wire::HANDOFF_FIELD),
        "{handed_text}"
    );
    assert!(!handed_text.contains("[DONE]"), "{handed_text}");
    assert!(
        !handed_text.contains("\"finish_reason\":\"length\""),
        "handed over after the answer was whole: nothing was checked"
    );

    let mut last_chunk_at = None;
    while let Some(chunk) = long.chunk().await.expect("read the stream") {
        body.extend_from_slice(&chunk);
        last_chunk_at = Some(Instant::now());
    }
    let text = String::from_utf8_lossy(&body);
    assert!(
        last_chunk_at.is_some_and(|t| t > swapped_at),
        "the stream ended before the swap: nothing was checked"
    );
    assert!(!text.contains("\"error\""), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let metrics = app.render_metrics();
    assert!(
        metrics.contains("breakwater_model_swaps_total{outcome=\"swapped\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("breakwater_model_serving_info{model=\"m\",version=\"2\""),
        "{metrics}"
    );
    let _ = stop.send(());
    app.shutdown();
}
