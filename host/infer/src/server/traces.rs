//! The GPU host's part of a trace: the request continues the edge's
//! `traceparent`, and a finished generation adds its queue wait, prefill
//! and decode as child spans with the OpenTelemetry GenAI attributes.
//!
//! The phases are timed by the engine thread (see
//! [`crate::scheduler::Timings`]), which knows nothing of traces; their
//! spans are built afterwards, from those instants, when the generation
//! ends. With tracing off the request span is disabled and none of this
//! runs.

use std::time::{Instant, SystemTime};

use axum::response::Response;
use breakwater_wire::trace;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Tracer as _};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::REQUEST_ID_HEADER;
use crate::scheduler::Finish;

/// The longest request id continued; a longer one is neither echoed nor
/// logged (the edge never sends one).
const MAX_REQUEST_ID: usize = 128;

/// Continues the edge's request id and trace here. The id is the field
/// `request_id` of every log line the request makes and is echoed on the
/// answer, so the edge's access log and the GPU host's logs name the same
/// request. The trace span is a child of the edge's upstream attempt, and
/// it ends when the answer's last byte is sent.
pub(super) async fn continue_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|id| id.len() <= MAX_REQUEST_ID)
        .cloned();
    let id_text = id.as_ref().and_then(|id| id.to_str().ok()).unwrap_or("");
    let log = tracing::info_span!("request", request_id = id_text);
    let span = tracing::info_span!(
        target: trace::TARGET,
        "gpu_host.request",
        otel.name = %request.uri().path(),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        breakwater.request_id = id_text,
        gen_ai.operation.name = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
    );
    trace::continue_trace(&span, request.headers());
    // The trace span innermost: handlers find it as the current span.
    let mut response = next
        .run(request)
        .instrument(span.clone())
        .instrument(log)
        .await;
    if let Some(id) = id {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    if span.is_disabled() {
        return response;
    }
    let status = response.status();
    // As i64: the exporter writes unsigned fields as text.
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    let held = trace::EndsOnDrop(span);
    response.map(|body| {
        use http_body_util::BodyExt;
        axum::body::Body::new(body.map_frame(move |frame| {
            // Owned by the closure, so the span ends with the body.
            let _held = &held;
            frame
        }))
    })
}

/// The request's trace span, when tracing is on and the caller runs
/// inside [`continue_request`].
pub(super) fn request_span() -> Option<tracing::Span> {
    let span = tracing::Span::current();
    let ours = span
        .metadata()
        .is_some_and(|metadata| metadata.target() == trace::TARGET);
    ours.then_some(span)
}

/// A generation's outcome on the request span, and its phases as
/// children: `gen_ai.queue` (waiting for a slot), `gen_ai.prefill` (the
/// prompt, up to the first token) and `gen_ai.decode` (the rest).
pub(super) fn record_generation(
    span: &tracing::Span,
    model: &str,
    operation: &'static str,
    finish: &Finish,
) {
    let input = i64::try_from(finish.prompt_tokens).unwrap_or(i64::MAX);
    let output = i64::try_from(finish.completion_tokens).unwrap_or(i64::MAX);
    span.record("gen_ai.operation.name", operation);
    span.record("gen_ai.request.model", model);
    span.record("gen_ai.usage.input_tokens", input);
    span.record("gen_ai.usage.output_tokens", output);
    span.record("gen_ai.response.finish_reasons", finish.reason.as_str());

    let parent = span.context();
    let tracer = opentelemetry::global::tracer("breakwater-gpu-host");
    let now = Instant::now();
    let wall_now = SystemTime::now();
    let wall = |at: Instant| {
        wall_now
            .checked_sub(now.saturating_duration_since(at))
            .unwrap_or(wall_now)
    };
    let timings = finish.timings;
    let model_attribute = || KeyValue::new("gen_ai.request.model", model.to_owned());
    let phase = |name: &'static str, from: Instant, to: Instant, mut attributes: Vec<KeyValue>| {
        attributes.push(model_attribute());
        let mut child = tracer
            .span_builder(name)
            .with_start_time(wall(from))
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        child.end_with_timestamp(wall(to));
    };
    phase(
        "gen_ai.queue",
        timings.arrived,
        timings.admitted,
        Vec::new(),
    );
    let first = timings.first_token.unwrap_or(now);
    phase(
        "gen_ai.prefill",
        timings.admitted,
        first,
        vec![KeyValue::new("gen_ai.usage.input_tokens", input)],
    );
    if timings.first_token.is_some() {
        let to_first = first.saturating_duration_since(timings.arrived);
        phase(
            "gen_ai.decode",
            first,
            now,
            vec![
                KeyValue::new("gen_ai.usage.output_tokens", output),
                KeyValue::new("gen_ai.server.time_to_first_token", to_first.as_secs_f64()),
            ],
        );
    }
}
