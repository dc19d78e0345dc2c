//! Observability: request ids, the Prometheus recorder, structured logs.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) const REQUEST_ID: &str = "x-request-id";

/// The request id a client or an upstream hop sent, if it is sane, else a
/// fresh one. Ids are echoed on responses and passed upstream.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(next_request_id)
}

/// 32 hex digits: a random per-process prefix and a counter. Ids must be
/// unique, not unpredictable, and a random id per request cost a
/// `getrandom` syscall on the hot path.
fn next_request_id() -> HeaderValue {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Hex digits only: always a valid header value.
    HeaderValue::from_str(&format!("{prefix:016x}{n:016x}"))
        .unwrap_or(HeaderValue::from_static("invalid"))
}

/// Latency buckets from 100 µs to 60 s: static hits sit at the low end,
/// inference streams at the high end.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The process-wide Prometheus recorder. The `metrics` facade has one global
/// recorder, so every node in the process shares it.
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

/// Log output format for [`init_logging`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global `tracing` subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file or a log
    // pipeline they are bytes to write and noise to read.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already installed (e.g. by a test harness): keep that one.
    let _ = result;
}

/// A response body that counts the bytes it sends and holds the in-flight
/// gauge up until it is finished or dropped (a client that goes away while a
/// stream is running is no longer in flight).
pub(crate) struct CountedBody {
    inner: axum::body::Body,
    route: String,
    sent: u64,
    _in_flight: InFlight,
}

/// Holds `breakwater_edge_requests_in_flight` up from the moment a request
/// arrives until its response is finished or abandoned.
pub(crate) struct InFlight(());

impl InFlight {
    pub(crate) fn enter() -> Self {
        metrics::gauge!("breakwater_edge_requests_in_flight").increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("breakwater_edge_requests_in_flight").decrement(1.0);
    }
}

impl CountedBody {
    pub(crate) fn new(inner: axum::body::Body, route: String, in_flight: InFlight) -> Self {
        Self {
            inner,
            route,
            sent: 0,
            _in_flight: in_flight,
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        metrics::counter!("breakwater_edge_response_bytes_total", "route" => std::mem::take(&mut self.route))
            .increment(self.sent);
    }
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.sent += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
