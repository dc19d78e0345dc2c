//! One trace across the edge and a GPU host, received by a real OTLP/HTTP
//! endpoint in the test and decoded with the collector's protobuf types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater_e2e::{GpuHostProcess, PATIENCE, completion_caching_edge, gen_test_model};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// A received span, with the service that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
    }

    fn text(&self, key: &str) -> Option<String> {
        match self.attribute(key)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    fn number(&self, key: &str) -> Option<i64> {
        match self.attribute(key)? {
            Value::IntValue(n) => Some(n),
            _ => None,
        }
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on loopback.
async fn start_receiver() -> (String, Spans) {
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::StatusCode;
    let spans: Spans = Arc::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(spans): State<Spans>, body: Bytes| async move {
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return (StatusCode::BAD_REQUEST, Vec::new());
                };
                let mut spans = spans.lock().expect("spans");
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            spans.push(Received {
                                service: service.clone(),
                                span,
                            });
                        }
                    }
                }
                (
                    StatusCode::OK,
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }),
        )
        .with_state(Arc::clone(&spans));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The span tree under `root`, indented, with offsets and durations.
fn render(spans: &[Received], root: &Received) -> String {
    fn walk(spans: &[Received], at: &Received, start: u64, depth: usize, out: &mut String) {
        let s = &at.span;
        out.push_str(&format!(
            "{:indent$}{} [{}] +{:.1} ms, {:.1} ms\n",
            "",
            s.name,
            at.service,
            (s.start_time_unix_nano.saturating_sub(start)) as f64 / 1e6,
            (s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano)) as f64 / 1e6,
            indent = depth * 2
        ));
        let mut children: Vec<&Received> = spans
            .iter()
            .filter(|c| c.span.parent_span_id == s.span_id)
            .collect();
        children.sort_by_key(|c| c.span.start_time_unix_nano);
        for child in children {
            walk(spans, child, start, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(spans, root, root.span.start_time_unix_nano, 0, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_client_through_the_edge_to_the_gpu_hosts_decode() {
    let (receiver, spans) = start_receiver().await;
    let model = tempfile::tempdir().expect("tempdir");
    gen_test_model(model.path(), "tiny", 5);
    let path = model.path().to_str().expect("UTF-8 path");
    // The GPU host by the standard variables, the edge by its `[tracing]`.
    let host = GpuHostProcess::start(
        &["--model", path, "--model-name", "m"],
        |command| {
            command
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver)
                .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        },
        PATIENCE,
    )
    .await;
    let tracing = format!("[tracing]\nendpoint = \"{receiver}\"\ntrust_incoming = true\n");
    let edge = completion_caching_edge(&host.url(""), &tracing, "");

    let body = r#"{"model":"m","messages":[{"role":"user","content":"trace me"}],"max_tokens":12,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let answer = reqwest::Client::new()
        .post(edge.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .body(body)
        .timeout(PATIENCE)
        .send()
        .await
        .expect("the completion");
    assert_eq!(answer.status(), 200);
    let text = answer.text().await.expect("the stream");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // The batch processors send within 100 ms on the GPU host and the SDK's
    // default 5 s on the edge; wait for the spans, bounded.
    let wanted = [
        "edge.request",
        "on-request",
        "cache",
        "cache.lookup",
        "upstream attempt",
        "/v1/chat/completions",
        "gen_ai.queue",
        "gen_ai.prefill",
        "gen_ai.decode",
    ];
    let deadline = std::time::Instant::now() + PATIENCE;
    let trace: Vec<Received> = loop {
        let trace: Vec<Received> = spans
            .lock()
            .expect("spans")
            .iter()
            .filter(|r| hex(&r.span.trace_id) == TRACE_ID)
            .cloned()
            .collect();
        let names: Vec<&str> = trace.iter().map(|r| r.span.name.as_str()).collect();
        let edge_request = trace.iter().any(|r| r.span.name.starts_with("POST "));
        if edge_request && wanted[1..].iter().all(|w| names.contains(w)) {
            break trace;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "spans of trace {TRACE_ID} so far: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let by_name: HashMap<&str, &Received> =
        trace.iter().map(|r| (r.span.name.as_str(), r)).collect();
    let one = |name: &str| -> &Received {
        by_name
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no span {name}"))
    };
    let request = trace
        .iter()
        .find(|r| r.span.name.starts_with("POST "))
        .expect("the edge's request span");
    println!("{}", render(&trace, request));

    // The edge continued the client's trace (trust_incoming = true).
    assert_eq!(hex(&request.span.parent_span_id), CLIENT_SPAN);
    assert_eq!(request.service, "breakwater-edge");
    assert_eq!(request.number("http.response.status_code"), Some(200));
    assert_eq!(request.text("breakwater.route").as_deref(), Some("gpu"));

    let plugin = one("on-request");
    assert_eq!(plugin.span.parent_span_id, request.span.span_id);
    assert_eq!(
        plugin.text("breakwater.plugin").as_deref(),
        Some("cache-policy")
    );
    assert!(plugin.text("breakwater.decision").is_some());
    assert!(plugin.number("breakwater.cpu_us").is_some());

    let cache = one("cache");
    assert_eq!(cache.span.parent_span_id, request.span.span_id);
    assert_eq!(
        cache.text("breakwater.cache.result").as_deref(),
        Some("MISS")
    );
    let lookup = one("cache.lookup");
    assert_eq!(lookup.span.parent_span_id, cache.span.span_id);

    let attempt = one("upstream attempt");
    assert_eq!(attempt.span.parent_span_id, cache.span.span_id);
    assert_eq!(attempt.text("breakwater.pool").as_deref(), Some("gpu"));
    assert_eq!(
        attempt.text("breakwater.outcome").as_deref(),
        Some("answer")
    );
    assert_eq!(attempt.number("breakwater.retry"), Some(0));
    assert!(attempt.text("server.address").is_some());

    // Across the process boundary: the GPU host's span is the attempt's child.
    let served = one("/v1/chat/completions");
    assert_eq!(served.service, "breakwater-gpu-host");
    assert_eq!(served.span.parent_span_id, attempt.span.span_id);
    assert_eq!(served.text("gen_ai.request.model").as_deref(), Some("m"));
    assert_eq!(
        served.text("gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert!(served.number("gen_ai.usage.input_tokens").unwrap_or(0) > 0);
    assert_eq!(served.number("gen_ai.usage.output_tokens"), Some(12));
    for phase in ["gen_ai.queue", "gen_ai.prefill", "gen_ai.decode"] {
        let phase = one(phase);
        assert_eq!(phase.span.parent_span_id, served.span.span_id, "{phase:?}");
        assert!(phase.span.end_time_unix_nano >= phase.span.start_time_unix_nano);
    }
    let decode = one("gen_ai.decode");
    assert!(decode.number("gen_ai.usage.output_tokens") == Some(12));

    // Spans end with the stream, not with the head: the edge's request,
    // cache and attempt spans outlast the GPU host's decode (one machine,
    // one clock).
    assert!(attempt.span.end_time_unix_nano >= decode.span.end_time_unix_nano);
    assert!(cache.span.end_time_unix_nano >= decode.span.end_time_unix_nano);
    assert!(request.span.end_time_unix_nano >= decode.span.end_time_unix_nano);
    drop(edge);
}
