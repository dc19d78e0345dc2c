//! Observability: request ids, the Prometheus recorder, structured logs.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) use breakwater_wire::REQUEST_ID_HEADER as REQUEST_ID;

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

/// Lines the log writer holds for its thread before it drops new ones:
/// under a crowd a slow terminal or pipe must not stall request handling,
/// so the access log sheds lines (counted in
/// `breakwater_log_lines_dropped_total`) rather than wait.
const LOG_QUEUE_LINES: usize = 64 * 1024;

/// Bytes of log text gathered before one `write`: the log thread writes
/// whatever queued up since its last write in one go.
const LOG_WRITE_BUFFER_BYTES: usize = 64 * 1024;

static LOG_DROPS: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Keeps the log thread writing and the trace exporter sending; dropping
/// it flushes what is queued in both. Hold it until the process is done.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    // Dropped first: its last spans' export may log.
    _traces: Option<crate::traces::TraceExporter>,
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global `tracing` subscriber; `RUST_LOG` filters (default
/// `info`; `RUST_LOG=info,access=off` turns the access log off). Lines are
/// formatted on the thread that logs and written to stdout by a log thread
/// of their own, in batches, so a request never waits on a `write`.
///
/// `traces`, for a process that serves (`[tracing]` and the service name
/// used when none is configured): with an OTLP endpoint there or in the
/// `OTEL_*` variables, spans of [`breakwater_wire::trace::TARGET`] are
/// exported too. A broken trace setup is logged and leaves logging as it
/// is.
pub fn init_logging(
    format: LogFormat,
    traces: Option<(&edge_config::TracingConfig, &str)>,
) -> LogGuard {
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, Registry};
    type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file or a log
    // pipeline they are bytes to write and noise to read.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("breakwater-log")
        .finish(std::io::BufWriter::with_capacity(
            LOG_WRITE_BUFFER_BYTES,
            std::io::stdout(),
        ));
    let drops = writer.error_counter();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let fmt: Boxed = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    // Trace spans are the exporter's: in the log they would be noise, and
    // formatting their fields costs every request.
    let not_trace_spans = tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.target() != breakwater_wire::trace::TARGET
    });
    let mut layers: Vec<Boxed> = vec![fmt.with_filter(filter.and(not_trace_spans)).boxed()];
    let installed = traces.map_or(Ok(None), |(config, service)| {
        crate::traces::install(config, service)
    });
    let (traces, trace_error) = match installed {
        Ok(Some((exporter, tracer))) => {
            let only_trace_spans = tracing_subscriber::filter::Targets::new()
                .with_target(breakwater_wire::trace::TARGET, tracing::Level::TRACE);
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_tracked_inactivity(false)
                    .with_filter(only_trace_spans)
                    .boxed(),
            );
            (Some(exporter), None)
        }
        Ok(None) => (None, None),
        Err(error) => (None, Some(error)),
    };
    let result = tracing_subscriber::registry().with(layers).try_init();
    if let Some(error) = trace_error {
        tracing::error!(%error, "traces are not exported");
    }
    match result {
        Ok(()) => {
            let _ = LOG_DROPS.set(drops);
            LogGuard {
                _traces: traces,
                _worker: Some(guard),
            }
        }
        // Already installed (e.g. by a test harness): keep that one.
        Err(_) => LogGuard {
            _traces: traces,
            _worker: None,
        },
    }
}

/// Log lines dropped because the log thread fell behind, since start.
pub(crate) fn log_lines_dropped() -> u64 {
    LOG_DROPS
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// One route's request metrics, with handles registered once: a request
/// picks its handles instead of building label sets and looking them up in
/// the registry (three times per request, before this existed).
pub(crate) struct RouteMetrics {
    /// The `route` label: the site's or pool's name, `none` when unrouted.
    pub(crate) name: String,
    /// `breakwater_edge_requests_total{route, status}`, by status - 100,
    /// registered on a status's first use.
    requests: Box<[OnceLock<metrics::Counter>]>,
    duration: metrics::Histogram,
    response_bytes: metrics::Counter,
}

impl RouteMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let label = name.to_owned();
        Self {
            name: name.to_owned(),
            requests: (100..600).map(|_| OnceLock::new()).collect(),
            duration: metrics::histogram!(
                "breakwater_edge_request_duration_seconds",
                "route" => label.clone()
            ),
            response_bytes: metrics::counter!(
                "breakwater_edge_response_bytes_total",
                "route" => label
            ),
        }
    }

    /// Counts one answered request.
    pub(crate) fn record(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        let slot = usize::from(status.as_u16())
            .checked_sub(100)
            .and_then(|i| self.requests.get(i));
        let counter = || {
            metrics::counter!(
                "breakwater_edge_requests_total",
                "route" => self.name.clone(),
                "status" => status.as_str().to_owned()
            )
        };
        match slot {
            Some(slot) => slot.get_or_init(counter).increment(1),
            // StatusCode only holds 100..=999; 600 and up are not worth a slot.
            None => counter().increment(1),
        }
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// A response body that counts the bytes it sends and holds the in-flight
/// gauge up until it is finished or dropped (a client that goes away while a
/// stream is running is no longer in flight).
pub(crate) struct CountedBody {
    inner: axum::body::Body,
    route: std::sync::Arc<RouteMetrics>,
    sent: u64,
    _in_flight: InFlight,
    /// The request's trace span: it ends with the response's last byte
    /// (or the client's leaving), not when the head is sent.
    _span: breakwater_wire::trace::EndsOnDrop,
}

/// Holds `breakwater_edge_requests_in_flight` up from the moment a request
/// arrives until its response is finished or abandoned.
pub(crate) struct InFlight(());

impl InFlight {
    pub(crate) fn enter() -> Self {
        in_flight_gauge().increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight_gauge().decrement(1.0);
    }
}

/// Registered on the first request, after the node installed the recorder
/// ([`prometheus`]), and kept: not looked up twice per request.
fn in_flight_gauge() -> &'static metrics::Gauge {
    static GAUGE: OnceLock<metrics::Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| metrics::gauge!("breakwater_edge_requests_in_flight"))
}

impl CountedBody {
    pub(crate) fn new(
        inner: axum::body::Body,
        route: std::sync::Arc<RouteMetrics>,
        in_flight: InFlight,
        span: tracing::Span,
    ) -> Self {
        Self {
            inner,
            route,
            sent: 0,
            _in_flight: in_flight,
            _span: breakwater_wire::trace::EndsOnDrop(span),
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.route.response_bytes.increment(self.sent);
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

/// `response`, whose body keeps `span` open until its last byte is sent
/// or the client leaves: a streamed answer's span covers the stream.
pub(crate) fn held_to_the_end(
    response: http::Response<axum::body::Body>,
    span: tracing::Span,
) -> http::Response<axum::body::Body> {
    use http_body_util::BodyExt;
    if span.is_disabled() {
        return response;
    }
    let held = breakwater_wire::trace::EndsOnDrop(span);
    response.map(|body| {
        axum::body::Body::new(body.map_frame(move |frame| {
            // Owned by the closure, so dropped with the body.
            let _held = &held;
            frame
        }))
    })
}
