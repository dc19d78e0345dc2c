//! W3C trace context across the edge ↔ GPU host boundary.
//!
//! Spans meant for the trace exporter are `tracing` spans with target
//! [`TARGET`]: the log layer leaves them out, and with no exporter
//! installed no layer wants them, so their callsites stay disabled and a
//! request pays one cached check per span. The headers are carried by the
//! process-wide propagator the exporter installs (W3C `traceparent` and
//! `tracestate`); without it, extraction finds nothing and injection writes
//! nothing.

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span the trace exporter receives.
pub const TARGET: &str = "breakwater::trace";

/// W3C Trace Context: the caller's trace id, span id and flags.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// W3C Trace Context: vendor state that travels with `traceparent`.
pub const TRACESTATE_HEADER: &str = "tracestate";

struct Reader<'a>(&'a HeaderMap);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Writer<'a>(&'a mut HeaderMap);

impl Injector for Writer<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The remote span context `headers` carry, when they carry a valid one.
pub fn remote_context(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    if !headers.contains_key(TRACEPARENT_HEADER) {
        return None;
    }
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Reader(headers))
    });
    context.span().span_context().is_valid().then_some(context)
}

/// Makes `span` a child of the trace `headers` carry (a caller we trust:
/// the edge, seen from a GPU host; a load balancer, seen from an edge
/// configured to trust it). Does nothing when tracing is off.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() {
        return;
    }
    if let Some(parent) = remote_context(headers) {
        // Fails only for a span already started, which `span` is not.
        let _ = span.set_parent(parent);
    }
}

/// Records the trace `headers` carry as a link of `span`, not its parent:
/// an untrusted caller's trace is shown, but it cannot choose the trace
/// id or force sampling.
pub fn link_trace(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() {
        return;
    }
    if let Some(caller) = remote_context(headers) {
        span.add_link(caller.span().span_context().clone());
    }
}

/// Writes `span`'s context into `headers`, for the next hop to continue;
/// a caller's own `traceparent`, if any, is replaced. Does nothing when
/// tracing is off, so a client's header passes through unchanged.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let context = span.context();
    // A caller's vendor state belongs to the caller's trace, not ours.
    headers.remove(TRACESTATE_HEADER);
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut Writer(headers));
    });
}

/// Keeps a span open and ends it when dropped. A span's end, as exported,
/// is the last time it was exited, so a span kept by a response body would
/// end when the head was sent; entering it once more on drop moves its end
/// to the moment the body is done (sent, or abandoned by the client).
pub struct EndsOnDrop(pub tracing::Span);

impl Drop for EndsOnDrop {
    fn drop(&mut self) {
        let _last_entry = self.0.enter();
    }
}
