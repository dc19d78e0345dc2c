//! The `Cache-Control`, `Surrogate-Control`, `Vary`, `Pragma`, `Age` and
//! date fields of an upstream response and of a client request, through
//! every decision the response cache makes from them.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// The fields the cache reads; any other name is taken from the input.
const NAMES: [&str; 14] = [
    "cache-control",
    "surrogate-control",
    "vary",
    "pragma",
    "age",
    "date",
    "expires",
    "last-modified",
    "etag",
    "if-none-match",
    "if-modified-since",
    "authorization",
    "set-cookie",
    "accept-language",
];

#[derive(Debug, Arbitrary)]
struct Field<'a> {
    name: u8,
    other_name: &'a str,
    value: &'a [u8],
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    status: u16,
    response: Vec<Field<'a>>,
    request: Vec<Field<'a>>,
    plugin_ttl_ms: Option<u64>,
    now_ms: u64,
}

fn headers(fields: &[Field<'_>]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for field in fields {
        let name = match NAMES.get(usize::from(field.name) % (NAMES.len() + 1)) {
            Some(known) => HeaderName::from_static(known),
            None => match HeaderName::from_bytes(field.other_name.as_bytes()) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        if let Ok(value) = HeaderValue::from_bytes(field.value) {
            map.append(name, value);
        }
    }
    map
}

fuzz_target!(|input: Input<'_>| {
    breakwater_edge::fuzzing::cache_headers(
        input.status,
        &headers(&input.response),
        &headers(&input.request),
        input.plugin_ttl_ms,
        input.now_ms,
    );
});
