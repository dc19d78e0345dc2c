//! What a plugin returns across the WIT boundary (`request-decision`,
//! `response-decision`), any value the ABI's types can hold, through the
//! sandbox's checks and the node's application of it to a request or a
//! response.
#![no_main]

use arbitrary::Arbitrary;
use breakwater_sandbox::{
    RequestChanges, RequestDecision, Response, ResponseChanges, ResponseDecision,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct AnyResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum AnyRequestDecision {
    Continue,
    ContinueWith {
        set_headers: Vec<(String, String)>,
        remove_headers: Vec<String>,
        rewrite_path: Option<String>,
        upstream_pool: Option<String>,
        cache_key: Option<String>,
        cache_ttl_ms: Option<u64>,
        cache_bypass: bool,
    },
    Respond(AnyResponse),
}

#[derive(Debug, Arbitrary)]
enum AnyResponseDecision {
    Continue,
    ContinueWith {
        set_headers: Vec<(String, String)>,
        remove_headers: Vec<String>,
        cache_ttl_ms: Option<u64>,
        cache_bypass: bool,
    },
    Respond(AnyResponse),
}

#[derive(Debug, Arbitrary)]
struct Input {
    request_headers: Vec<(String, String)>,
    on_request: AnyRequestDecision,
    on_response: AnyResponseDecision,
}

impl From<AnyResponse> for Response {
    fn from(r: AnyResponse) -> Self {
        Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }
    }
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

fuzz_target!(|input: Input| {
    let on_request = match input.on_request {
        AnyRequestDecision::Continue => RequestDecision::Continue,
        AnyRequestDecision::ContinueWith {
            set_headers,
            remove_headers,
            rewrite_path,
            upstream_pool,
            cache_key,
            cache_ttl_ms,
            cache_bypass,
        } => RequestDecision::ContinueWith(RequestChanges {
            set_headers,
            remove_headers,
            rewrite_path,
            upstream_pool,
            cache_key,
            cache_ttl_ms,
            cache_bypass,
        }),
        AnyRequestDecision::Respond(r) => RequestDecision::Respond(r.into()),
    };
    let on_response = match input.on_response {
        AnyResponseDecision::Continue => ResponseDecision::Continue,
        AnyResponseDecision::ContinueWith {
            set_headers,
            remove_headers,
            cache_ttl_ms,
            cache_bypass,
        } => ResponseDecision::ContinueWith(ResponseChanges {
            set_headers,
            remove_headers,
            cache_ttl_ms,
            cache_bypass,
        }),
        AnyResponseDecision::Respond(r) => ResponseDecision::Respond(r.into()),
    };
    breakwater_edge::fuzzing::request_decision(on_request, header_map(&input.request_headers));
    breakwater_edge::fuzzing::response_decision(on_response);
});
