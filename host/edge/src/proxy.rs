//! The reverse proxy's HTTP side: what a request and an answer look like
//! on their way through (forwarding headers, hop-by-hop headers, the
//! upstream URI). Choosing the endpoint and retrying is `upstream`'s.

use std::net::SocketAddr;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Response, Uri};

/// The `Via` pseudonym this node adds (RFC 9110 §7.6.3).
const VIA: &str = "breakwater";

/// How the client reached this node, for `Forwarded` and `X-Forwarded-*`.
#[derive(Clone)]
pub(crate) struct ClientConnection {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
}

/// Marks a response the node made because no upstream answered (no
/// endpoint, connection refused or broken, no first byte in time), as
/// opposed to an upstream's own error: RFC 9111 §4.2.4 lets a cache that is
/// disconnected from the origin serve what it has stored.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UpstreamUnreachable;

pub(crate) fn unreachable(mut response: Response<Body>) -> Response<Body> {
    response.extensions_mut().insert(UpstreamUnreachable);
    response
}

pub(crate) fn upstream_uri(endpoint: &Uri, original: &Uri) -> Option<Uri> {
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

pub(crate) fn prepare_request_headers(request: &mut Parts, client: &ClientConnection) {
    let version = request.version;
    // h2 carries the host in :authority; HTTP/1.1 upstreams need `Host`.
    let authority = request.uri.authority().map(|a| a.as_str().to_owned());
    let headers = &mut request.headers;
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
    // The upstream hears the pool's protocol from us; the client's version
    // was recorded in `Via`.
}

pub(crate) fn prepare_response(response: Response<hyper::body::Incoming>) -> Response<Body> {
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
