//! The OpenTelemetry trace exporter: OTLP over HTTP/protobuf or gRPC,
//! configured by `[tracing]` and the standard `OTEL_*` variables, for the
//! edge and the GPU host alike (both are this binary).
//!
//! Off unless an endpoint is configured: then no span of
//! [`breakwater_wire::trace::TARGET`] is enabled and nothing is installed.
//! On, finished spans queue in the SDK's batch processor (bounded: a full
//! queue drops spans, never blocks a request) and leave from its thread.

use std::time::Duration;

use edge_config::{TraceProtocol, TracingConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    /// `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` names a transport this build
    /// does not speak.
    #[error("OTLP protocol {0:?} is not supported: use \"http/protobuf\" or \"grpc\"")]
    Protocol(String),
    /// HTTPS to the collector needs a TLS client this build leaves out.
    #[error("OTLP endpoint {0:?}: only http:// is supported (run a collector beside the node)")]
    Scheme(String),
    /// The exporter's own runtime thread.
    #[error("starting the OTLP exporter's thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The exporter refused its settings.
    #[error("building the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// An installed exporter. Dropping it sends what is queued (bounded by the
/// exporter's timeout) and stops its thread.
pub struct TraceExporter {
    provider: SdkTracerProvider,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TraceExporter {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("traces: flushing the last spans failed: {error}");
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Where spans go, once `[tracing]` and the environment are merged.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    /// `None`: the exporter reads the `OTEL_EXPORTER_OTLP_*` variables.
    endpoint: Option<String>,
    protocol: TraceProtocol,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
}

/// `config` over the environment (read through `var`); `None` when traces
/// are off.
fn settings(
    config: &TracingConfig,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, TraceSetupError> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    let disabled = set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let from_env = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_some();
    if disabled || (config.endpoint.is_none() && !from_env) {
        return Ok(None);
    }
    let protocol = match config.protocol {
        Some(protocol) => protocol,
        None => match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/protobuf") => TraceProtocol::HttpProtobuf,
            Some("grpc") => TraceProtocol::Grpc,
            Some(other) => return Err(TraceSetupError::Protocol(other.to_owned())),
        },
    };
    let endpoint = config.endpoint.as_ref().map(|base| match protocol {
        // A base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is: the signal's path
        // goes after it.
        TraceProtocol::HttpProtobuf if !base.trim_end_matches('/').ends_with("/v1/traces") => {
            format!("{}/v1/traces", base.trim_end_matches('/'))
        }
        _ => base.clone(),
    });
    let checked = endpoint
        .clone()
        .or_else(|| set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .unwrap_or_default();
    // Neither transport is built with TLS: a collector beside the node (a
    // sidecar or a DaemonSet on the host network) forwards over TLS.
    if !checked.starts_with("http://") {
        return Err(TraceSetupError::Scheme(checked));
    }
    Ok(Some(Settings {
        endpoint,
        protocol,
        service_name: config.service_name.clone(),
        sample_ratio: config.sample_ratio,
    }))
}

/// Builds the exporter `config` and the environment ask for, or `None`
/// when traces are off. `default_service` names the spans' service when
/// neither `[tracing] service_name` nor `OTEL_SERVICE_NAME` does.
pub(crate) fn install(
    config: &TracingConfig,
    default_service: &str,
) -> Result<Option<(TraceExporter, opentelemetry_sdk::trace::Tracer)>, TraceSetupError> {
    let Some(settings) = settings(config, |name| std::env::var(name).ok())? else {
        return Ok(None);
    };
    // The exporter's I/O runs on a runtime of its own: the batch processor
    // calls it from its own thread, and a node's runtime may be gone by the
    // time the last spans are flushed at exit.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TraceSetupError::Thread)?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("breakwater-otlp".to_owned())
        .spawn(move || {
            let _ = runtime.block_on(stopped);
        })
        .map_err(TraceSetupError::Thread)?;
    let _entered = handle.enter();

    let exporter = match settings.protocol {
        TraceProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = &settings.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            builder.build()?
        }
        TraceProtocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(OtlpHttpClient::new(handle.clone()));
            if let Some(endpoint) = &settings.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            builder.build()?
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    let service = settings.service_name.clone().or_else(|| {
        std::env::var("OTEL_SERVICE_NAME")
            .is_err()
            .then(|| default_service.to_owned())
    });
    if let Some(service) = service {
        resource = resource.with_service_name(service);
    }
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if let Some(ratio) = settings.sample_ratio {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(ratio),
        )));
    }
    let provider = provider.build();
    let tracer = provider.tracer("breakwater");
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some((
        TraceExporter {
            provider,
            stop: Some(stop),
        },
        tracer,
    )))
}

/// Bytes of a collector's answer read at most: it is a status and, at
/// worst, a partial-success message.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How long one export may take, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// OTLP/HTTP over the hyper client this crate already has, run on the
/// exporter's runtime: the batch processor drives exports from a thread
/// with no Tokio context, and the exporter's stock async clients need one.
#[derive(Debug, Clone)]
struct OtlpHttpClient {
    runtime: tokio::runtime::Handle,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl OtlpHttpClient {
    fn new(runtime: tokio::runtime::Handle) -> Self {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http();
        Self { runtime, client }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::BodyExt;
        let client = self.client.clone();
        let exchange = async move {
            let (parts, body) = request.into_parts();
            let request = http::Request::from_parts(parts, http_body_util::Full::new(body));
            let response = client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        // The timer is made on the exporter's runtime: this thread has none.
        self.runtime
            .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, exchange).await })
            .await?
            .map_err(|_| format!("no answer from the collector within {EXPORT_TIMEOUT:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn off_without_an_endpoint_or_when_disabled() {
        let config = TracingConfig::default();
        assert_eq!(settings(&config, env(&[])).unwrap(), None);
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        assert!(settings(&config, env(&on)).unwrap().is_some());
        let off = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert_eq!(settings(&config, env(&off)).unwrap(), None);
        let none = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ];
        assert_eq!(settings(&config, env(&none)).unwrap(), None);
    }

    #[test]
    fn the_config_wins_and_a_base_url_gets_the_signal_path() {
        let config = TracingConfig {
            endpoint: Some("http://collector:4318/".to_owned()),
            ..TracingConfig::default()
        };
        let grpc = [("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
        let got = settings(&config, env(&grpc)).unwrap().unwrap();
        assert_eq!(got.protocol, TraceProtocol::Grpc);
        assert_eq!(got.endpoint.as_deref(), Some("http://collector:4318/"));
        let got = settings(&config, env(&[])).unwrap().unwrap();
        assert_eq!(got.protocol, TraceProtocol::HttpProtobuf);
        assert_eq!(
            got.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
    }

    #[test]
    fn unsupported_transports_are_named() {
        let json = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ];
        let config = TracingConfig::default();
        assert!(matches!(
            settings(&config, env(&json)),
            Err(TraceSetupError::Protocol(p)) if p == "http/json"
        ));
        let https = [("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")];
        assert!(matches!(
            settings(&config, env(&https)),
            Err(TraceSetupError::Scheme(_))
        ));
    }
}
