//! The reverse proxy's HTTP side: what a request and an answer look like
//! on their way through (forwarding headers, hop-by-hop headers, the
//! upstream URI). Choosing the endpoint and retrying is `upstream`'s.

use std::net::SocketAddr;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Response, StatusCode, Uri, Version};

use crate::error::error_response;

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

/// End-to-end headers a client may not make hop-by-hop by naming them in
/// `Connection`. Any other name is simply removed before routing, plugins
/// and the cache look at the request, which is no more than the client
/// leaving the header out. These two it cannot leave out: without `Host`
/// the upstream would answer for its default host (stored under no host the
/// client chose), and without `Content-Length` the body it announced would
/// be framed differently upstream than it was here.
const MAY_NOT_BE_HOP_BY_HOP: [HeaderName; 2] = [header::HOST, header::CONTENT_LENGTH];

/// Headers in which a client speaks for earlier hops or asks for another
/// URL than the one it sent. Believed only from a trusted proxy; from any
/// other peer they are removed, and the node's own `Forwarded`,
/// `X-Forwarded-For` and `X-Forwarded-Proto` describe the hop it saw.
const FORWARDING_CLAIMS: [&str; 11] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
];

/// Why a request was refused before anything looked at it: a 400 with the
/// JSON error body, `code` being its reason.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: &'static str,
    message: String,
}

impl Refusal {
    fn bad_host(message: impl Into<String>) -> Self {
        Self {
            code: "bad_host",
            message: message.into(),
        }
    }

    pub(crate) fn response(&self) -> Response<Body> {
        error_response(StatusCode::BAD_REQUEST, self.code, &self.message)
    }
}

/// Makes `request` the request this node forwards, before routing, plugins
/// and the cache see it, so that the cache key and `Vary` values are taken
/// from what the upstream will receive: one host, from the target when it
/// names one; no hop-by-hop headers, nor those named in `Connection`; no
/// forwarding claims unless `trusted_peer`. The hop's own forwarding headers
/// are added later, per upstream request, by [`prepare_request_headers`].
pub(crate) fn normalize_request(request: &mut Parts, trusted_peer: bool) -> Result<(), Refusal> {
    resolve_host(request)?;
    let listed = connection_listed(&request.headers);
    if let Some(name) = listed
        .iter()
        .find(|name| MAY_NOT_BE_HOP_BY_HOP.contains(name))
    {
        return Err(Refusal {
            code: "bad_connection_header",
            message: format!(
                "`Connection` names `{name}`, an end-to-end header this node must forward"
            ),
        });
    }
    remove_hop_by_hop(&mut request.headers, &listed);
    if !trusted_peer {
        for name in FORWARDING_CLAIMS {
            request.headers.remove(name);
        }
    }
    Ok(())
}

/// One valid `Host` (RFC 9112 §3.2: none on HTTP/1.1, two, or a malformed
/// one is a 400), replaced by the target's authority when the request names
/// one (absolute-form, h2 `:authority`): that is the host the request is
/// for (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
fn resolve_host(request: &mut Parts) -> Result<(), Refusal> {
    let mut hosts = request.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::bad_host(
            "the request has more than one `Host` header",
        ));
    }
    if let Some(host) = host
        && !is_valid_host(host.as_bytes())
    {
        return Err(Refusal::bad_host(format!(
            "`Host: {}` is not a host with an optional port",
            String::from_utf8_lossy(host.as_bytes())
        )));
    }
    let needs_host = request.version >= Version::HTTP_11;
    let from_target = request.uri.authority().map(host_and_port);
    match (from_target, host.is_some()) {
        // HTTP/1.1 requires `Host` even beside an absolute-form target;
        // h2 carries the host in `:authority` instead.
        (_, false) if request.version == Version::HTTP_11 => Err(Refusal::bad_host(
            "an HTTP/1.1 request must carry a `Host` header",
        )),
        (Some(target_host), _) => {
            let value = HeaderValue::from_str(target_host).map_err(|_| {
                Refusal::bad_host("the request target's host is not a valid header")
            })?;
            request.headers.insert(header::HOST, value);
            Ok(())
        }
        (None, false) if needs_host => Err(Refusal::bad_host(
            "the request names no host: send `:authority` or `Host`",
        )),
        (None, _) => Ok(()),
    }
}

/// `host[:port]`, without the userinfo an absolute URI may carry.
fn host_and_port(authority: &Authority) -> &str {
    let text = authority.as_str();
    text.rsplit_once('@').map_or(text, |(_, host)| host)
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2), or empty (a target without an
/// authority).
fn is_valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    let Ok(authority) = Authority::try_from(value) else {
        return false;
    };
    let text = authority.as_str();
    if text.contains('@') {
        return false;
    }
    let port = &text[authority.host().len()..];
    port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The header names listed in `Connection`.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

fn remove_hop_by_hop(headers: &mut HeaderMap, listed: &[HeaderName]) {
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
    let listed = connection_listed(headers);
    remove_hop_by_hop(headers, &listed);
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
    // A trusted proxy's value (the scheme the client used with it) stands;
    // anyone else's was removed by `normalize_request`.
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    }
    // The upstream hears the pool's protocol from us; the client's version
    // was recorded in `Via`.
}

pub(crate) fn prepare_response(response: Response<hyper::body::Incoming>) -> Response<Body> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The node never forwards `Upgrade` (it is hop-by-hop), so this is a
        // switch nobody asked for; passed on, it would turn the client's
        // connection over to whatever the upstream speaks next.
        tracing::warn!(
            "an upstream answered 101 Switching Protocols to a request without an upgrade"
        );
        return error_response(
            StatusCode::BAD_GATEWAY,
            "unexpected_upgrade",
            "the upstream switched protocols (101) although no upgrade was asked for",
        );
    }
    let (mut parts, body) = response.into_parts();
    let listed = connection_listed(&parts.headers);
    remove_hop_by_hop(&mut parts.headers, &listed);
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

    fn parts(target: &str, version: Version, hosts: &[&str]) -> Parts {
        let mut builder = http::Request::get(target).version(version);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).expect("valid request").into_parts().0
    }

    fn resolved(target: &str, version: Version, hosts: &[&str]) -> Result<String, &'static str> {
        let mut request = parts(target, version, hosts);
        resolve_host(&mut request).map_err(|refusal| refusal.code)?;
        Ok(request
            .headers
            .get(header::HOST)
            .map(|h| h.to_str().expect("ascii").to_owned())
            .unwrap_or_default())
    }

    #[test]
    fn hosts_are_host_and_optional_port() {
        for valid in [
            "a.example",
            "a.example:8080",
            "127.0.0.1:80",
            "[::1]:80",
            "[::1]",
            "",
        ] {
            assert!(is_valid_host(valid.as_bytes()), "{valid:?}");
        }
        for invalid in [
            "a.example, b.example",
            "u@a.example",
            "a.example:x",
            "a b",
            "[::1",
        ] {
            assert!(!is_valid_host(invalid.as_bytes()), "{invalid:?}");
        }
    }

    #[test]
    fn the_target_authority_wins_and_http_1_1_needs_one_host() {
        let v11 = Version::HTTP_11;
        assert_eq!(resolved("/p", v11, &["a.example"]), Ok("a.example".into()));
        assert_eq!(
            resolved("http://user:pw@b.example:81/p", v11, &["a.example"]),
            Ok("b.example:81".into())
        );
        assert_eq!(resolved("/p", v11, &[]), Err("bad_host"));
        assert_eq!(resolved("http://b.example/p", v11, &[]), Err("bad_host"));
        assert_eq!(
            resolved("/p", v11, &["a.example", "a.example"]),
            Err("bad_host")
        );
        assert_eq!(resolved("/p", Version::HTTP_10, &[]), Ok(String::new()));
        assert_eq!(
            resolved("http://b.example/p", Version::HTTP_2, &[]),
            Ok("b.example".into())
        );
        assert_eq!(resolved("/p", Version::HTTP_2, &[]), Err("bad_host"));
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
        let listed = connection_listed(&headers);
        remove_hop_by_hop(&mut headers, &listed);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
