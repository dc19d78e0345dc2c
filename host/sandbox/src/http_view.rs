//! How an HTTP request is shown to a plugin and how its decisions are
//! applied back, in one place: the edge node and `breakwater plugin test`
//! both call these, so a plugin tested offline sees and changes exactly
//! what it would on a node.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::{Request, RequestChanges, ResponseChanges};

/// A header only plugins see, on a route that buffers bodies for them, when
/// the body was larger than the route buffers: its value is the limit in
/// bytes. A client's own field of this name is never shown.
pub const BODY_TOO_LARGE_HEADER: &str = "breakwater-body-too-large";

/// The request as a plugin sees it: method as sent, host lower-case
/// without a port (from `Host`, else the URI's authority), path with its
/// query, header names lower-case in the map's order. The body is not
/// part of the view; a caller that has one sets it.
pub fn request_view(parts: &Parts, client_ip: IpAddr, request_id: &str) -> Request {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    Request {
        method: parts.method.as_str().to_owned(),
        host: host_without_port(host).to_ascii_lowercase(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts
            .headers
            .iter()
            .filter(|(name, _)| name.as_str() != BODY_TOO_LARGE_HEADER)
            .map(header_pair)
            .collect(),
        client_ip: client_ip.to_string(),
        request_id: request_id.to_owned(),
        body: None,
    }
}

/// Tells the plugins that the body was not buffered because it is larger
/// than `limit` bytes: the body stays absent from the view and
/// [`BODY_TOO_LARGE_HEADER`] carries the limit.
pub fn mark_body_too_large(view: &mut Request, limit: u64) {
    view.body = None;
    view.headers
        .push((BODY_TOO_LARGE_HEADER.to_owned(), limit.to_string()));
}

/// `host` without a `:port`, but with the colons of a bracketed IPv6
/// literal.
fn host_without_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// Header fields as (lower-case name, value) pairs; a value that is not
/// UTF-8 is shown lossily.
pub fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers.iter().map(header_pair).collect()
}

fn header_pair((name, value): (&HeaderName, &HeaderValue)) -> (String, String) {
    (
        name.as_str().to_owned(),
        String::from_utf8_lossy(value.as_bytes()).into_owned(),
    )
}

/// A `continue-with`'s header edits and path rewrite applied to the
/// request: removals first, then each header set (replacing every field of
/// that name), then the new path and query. Names, values or paths that
/// are not valid HTTP are skipped rather than failing the request. The
/// pool and cache choices are the caller's to apply.
pub fn apply_request_changes(parts: &mut Parts, changes: &RequestChanges) {
    edit_headers(
        &mut parts.headers,
        &changes.set_headers,
        &changes.remove_headers,
    );
    if let Some(path) = &changes.rewrite_path
        && let Ok(uri) = rewritten_uri(&parts.uri, path)
    {
        parts.uri = uri;
    }
}

/// A response-phase `continue-with` applied to the answer's headers.
pub fn apply_response_changes(headers: &mut HeaderMap, changes: &ResponseChanges) {
    edit_headers(headers, &changes.set_headers, &changes.remove_headers);
}

/// Header edits: every field named in `remove` goes, then each of `set`
/// replaces the fields of its name. Names or values that are not valid
/// HTTP are skipped.
pub fn edit_headers(headers: &mut HeaderMap, set: &[(String, String)], remove: &[String]) {
    for name in remove {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
    for (name, value) in set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
}

fn rewritten_uri(uri: &http::Uri, path_and_query: &str) -> Result<http::Uri, http::Error> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("a request").into_parts().0
    }

    #[test]
    fn the_view_normalizes_the_host_and_keeps_the_query() {
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let view = request_view(
            &parts("/a?b=1", &[("Host", "API.Example.com:8443"), ("X-A", "1")]),
            ip,
            "r1",
        );
        assert_eq!(view.host, "api.example.com");
        assert_eq!(view.path, "/a?b=1");
        assert_eq!(
            view.headers,
            [
                ("host".to_owned(), "API.Example.com:8443".to_owned()),
                ("x-a".to_owned(), "1".to_owned())
            ]
        );
        assert_eq!(
            (view.client_ip.as_str(), view.request_id.as_str()),
            ("192.0.2.7", "r1")
        );
        let view = request_view(&parts("/", &[("host", "[::1]")]), ip, "");
        assert_eq!(view.host, "[::1]");
        let view = request_view(&parts("http://Origin.test:81/x", &[]), ip, "");
        assert_eq!(view.host, "origin.test");
    }

    #[test]
    fn changes_remove_then_set_then_rewrite_and_skip_what_is_not_http() {
        let mut p = parts("/old?q", &[("x-a", "1"), ("x-a", "2"), ("x-b", "3")]);
        let changes = RequestChanges {
            set_headers: vec![
                ("X-A".into(), "9".into()),
                ("bad name".into(), "v".into()),
                ("x-c".into(), "line\nbreak".into()),
            ],
            remove_headers: vec!["x-b".into(), "also bad".into()],
            rewrite_path: Some("/new?r=1".into()),
            upstream_pool: None,
            cache_key: None,
            cache_ttl_ms: None,
            cache_bypass: false,
        };
        apply_request_changes(&mut p, &changes);
        assert_eq!(
            header_pairs(&p.headers),
            [("x-a".to_owned(), "9".to_owned())]
        );
        assert_eq!(p.uri, "/new?r=1");
        let mut p2 = parts("/keep", &[]);
        let bad_path = RequestChanges {
            rewrite_path: Some("no spaces allowed".into()),
            ..changes
        };
        apply_request_changes(&mut p2, &bad_path);
        assert_eq!(p2.uri, "/keep");
    }
}
