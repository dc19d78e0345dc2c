//! The reverse proxy: forwards a request to one endpoint of an upstream pool
//! and streams both bodies through without buffering them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use edge_config::PoolConfig;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::error_response;
use crate::limits::{BodyLimitError, BodyLimitTrip};

/// The `Via` pseudonym this node adds (RFC 9110 §7.6.3).
const VIA: &str = "breakwater";

/// One upstream pool: its endpoints, timeouts and connection pool.
pub(crate) struct UpstreamPool {
    name: String,
    endpoints: Vec<Uri>,
    next: AtomicUsize,
    first_byte_timeout: Duration,
    client: Client<HttpConnector, Body>,
}

/// How the client reached this node, for `Forwarded` and `X-Forwarded-*`.
#[derive(Clone)]
pub(crate) struct ClientConnection {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
}

impl UpstreamPool {
    pub(crate) fn new(config: &PoolConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.max_idle_per_endpoint)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            name: config.name.clone(),
            // Validated by edge-config: every endpoint is an http:// URL.
            endpoints: config
                .endpoints
                .iter()
                .filter_map(|e| e.parse().ok())
                .collect(),
            next: AtomicUsize::new(0),
            first_byte_timeout: config.first_byte_timeout,
            client,
        }
    }

    /// Round robin; health and load awareness come with the resilience work.
    fn pick(&self) -> Option<&Uri> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    /// Sends `request` upstream and returns the upstream's response with its
    /// body still streaming. Failures become 502/504 (or 413/408 when the
    /// client's own body broke a limit) with a JSON body; when no upstream
    /// answered at all, the response carries [`UpstreamUnreachable`].
    pub(crate) async fn forward(
        &self,
        mut request: Request<Body>,
        client: &ClientConnection,
        body_trip: &BodyLimitTrip,
    ) -> Response<Body> {
        let Some(endpoint) = self.pick() else {
            return unreachable(error_response(
                StatusCode::BAD_GATEWAY,
                "no_upstream",
                "the upstream pool has no endpoints",
            ));
        };
        let endpoint = endpoint.clone();
        match upstream_uri(&endpoint, request.uri()) {
            Some(uri) => *request.uri_mut() = uri,
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_uri",
                    "the request URI cannot be forwarded",
                );
            }
        }
        prepare_request_headers(&mut request, client);

        let sent =
            tokio::time::timeout(self.first_byte_timeout, self.client.request(request)).await;
        let failure = match sent {
            Ok(Ok(response)) => return prepare_response(response),
            Ok(Err(e)) => e,
            Err(_) => {
                metrics::counter!("breakwater_edge_upstream_errors_total", "pool" => self.name.clone(), "kind" => "timeout").increment(1);
                return unreachable(error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    &format!(
                        "the upstream did not answer within {:?}",
                        self.first_byte_timeout
                    ),
                ));
            }
        };
        match body_trip.get() {
            Some(BodyLimitError::TooLarge(max)) => error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("the request body exceeds {max} bytes"),
            ),
            Some(BodyLimitError::TimedOut(t)) => error_response(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                &format!("the request body was not received within {t:?}"),
            ),
            None => {
                let kind = if failure.is_connect() {
                    "connect"
                } else {
                    "protocol"
                };
                metrics::counter!("breakwater_edge_upstream_errors_total", "pool" => self.name.clone(), "kind" => kind).increment(1);
                tracing::warn!(pool = %self.name, endpoint = %endpoint, error = %failure, "upstream request failed");
                unreachable(error_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "the upstream could not be reached or broke the connection",
                ))
            }
        }
    }
}

/// Marks a response the node made because no upstream answered (no
/// endpoint, connection refused or broken, no first byte in time), as
/// opposed to an upstream's own error: RFC 9111 §4.2.4 lets a cache that is
/// disconnected from the origin serve what it has stored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UpstreamUnreachable;

fn unreachable(mut response: Response<Body>) -> Response<Body> {
    response.extensions_mut().insert(UpstreamUnreachable);
    response
}

fn upstream_uri(endpoint: &Uri, original: &Uri) -> Option<Uri> {
    let path_and_query = original.path_and_query().map_or("/", |pq| pq.as_str());
    let base = endpoint.path().trim_end_matches('/');
    let mut parts = endpoint.clone().into_parts();
    parts.path_and_query = Some(format!("{base}{path_and_query}").parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(listed.iter()) {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
}

fn append_via(headers: &mut HeaderMap, version: http::Version) {
    let protocol = match version {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{protocol} {VIA}")) {
        headers.append(header::VIA, value);
    }
}

fn prepare_request_headers(request: &mut Request<Body>, client: &ClientConnection) {
    let version = request.version();
    // h2 carries the host in :authority; HTTP/1.1 upstreams need `Host`.
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let headers = request.headers_mut();
    remove_hop_by_hop(headers);
    if !headers.contains_key(header::HOST)
        && let Some(value) = authority.and_then(|a| HeaderValue::from_str(&a).ok())
    {
        headers.insert(header::HOST, value);
    }
    append_via(headers, version);

    let proto = if client.tls { "https" } else { "http" };
    let ip = client.peer.ip();
    let node = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut forwarded = format!("for={node};proto={proto}");
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && host.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
    {
        forwarded.push_str(&format!(";host=\"{host}\""));
    }
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.append(header::FORWARDED, value);
    }
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    // The upstream always hears HTTP/1.1 from us; the client's version was
    // recorded in `Via`.
    *request.version_mut() = http::Version::HTTP_11;
}

fn prepare_response(response: Response<hyper::body::Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    append_via(&mut parts.headers, parts.version);
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let endpoint: Uri = "http://127.0.0.1:9000".parse().unwrap();
        let original: Uri = "/v1/models?x=1".parse().unwrap();
        assert_eq!(
            upstream_uri(&endpoint, &original).unwrap().to_string(),
            "http://127.0.0.1:9000/v1/models?x=1"
        );
        let with_base: Uri = "http://10.0.0.1:80/api/".parse().unwrap();
        assert_eq!(
            upstream_uri(&with_base, &original).unwrap().to_string(),
            "http://10.0.0.1:80/api/v1/models?x=1"
        );
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
