//! Entry points for the fuzz targets in `fuzz/` (not a stable API): each
//! runs one parser the way the node runs it on untrusted input, and returns
//! nothing, since all a fuzzer asks is that it does not panic, hang or
//! allocate without bound.

use std::net::SocketAddr;

use axum::body::Body;
use breakwater_sandbox::{RequestDecision, ResponseDecision};
use http::{HeaderMap, Method, Request, Response, StatusCode};

use crate::cache::Overrides;
use crate::cache::entry::Entry;
use crate::cache::policy::{self, Directives, StoreContext};
use crate::plugins;

/// A response's `Cache-Control`/`Surrogate-Control`/`Vary`/`Age`/dates
/// and a request's `Cache-Control`/`Pragma`/conditionals, through every
/// decision the cache makes from them.
pub fn cache_headers(
    status: u16,
    response: &HeaderMap,
    request: &HeaderMap,
    plugin_ttl_ms: Option<u64>,
    now_ms: u64,
) {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let response_cc = Directives::response(response);
    let request_cc = Directives::request(request);
    let _ = (response_cc.forbids_stale(), request_cc.forbids_stale());
    let plugin_ttl = plugin_ttl_ms.map(std::time::Duration::from_millis);
    for method in [Method::GET, Method::POST] {
        for plugin_keyed in [false, true] {
            let ctx = StoreContext {
                method: &method,
                request_headers: request,
                plugin_keyed,
                plugin_ttl,
            };
            let _ = policy::storable(&ctx, status, response, &response_cc);
        }
    }
    let vary_names = policy::vary_names(response).unwrap_or_default();
    let _ = policy::vary_key(&vary_names, request);
    let request_time_ms = now_ms.saturating_sub(1000);
    let entry = Entry {
        status,
        headers: response.clone(),
        chunks: Vec::new(),
        request_time_ms,
        response_time_ms: now_ms,
        initial_age_ms: policy::corrected_initial_age_ms(response, request_time_ms, now_ms),
        freshness_ms: policy::freshness_ms(status, response, &response_cc, plugin_ttl, now_ms),
        swr_ms: response_cc.stale_while_revalidate.unwrap_or(0) * 1000,
        sie_ms: response_cc.stale_if_error.unwrap_or(0) * 1000,
        url: String::new(),
        tags: Vec::new(),
        ttl_by_plugin: plugin_ttl.is_some(),
        tokens: (0, 0),
    };
    let _ = entry.current_age_ms(now_ms);
    let _ = entry.useful_for_ms(now_ms);
    let _ = policy::not_modified(request, response);
}

/// A plugin's request-phase decision, as it comes out of the sandbox,
/// checked and applied to a request the way the node applies it.
pub fn request_decision(decision: RequestDecision, request_headers: HeaderMap) {
    if breakwater_sandbox::fuzzing::invalid_request_decision(&decision).is_some() {
        return;
    }
    let mut request = Request::new(());
    *request.headers_mut() = request_headers;
    let (mut parts, ()) = request.into_parts();
    let client = SocketAddr::from(([192, 0, 2, 1], 40000));
    match decision {
        RequestDecision::Continue => {}
        RequestDecision::ContinueWith(changes) => {
            let mut pool = None;
            let mut cache = Overrides::default();
            plugins::apply_request_changes(&mut parts, changes, &mut pool, &mut cache);
            let _ = plugins::request_view(&parts, client);
            // What the cache then does with the plugin's TTL.
            cache_headers(
                200,
                &HeaderMap::new(),
                &parts.headers,
                None,
                policy::now_ms(),
            );
            if let Some(ttl) = cache.ttl {
                let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                cache_headers(200, &parts.headers, &HeaderMap::new(), Some(ttl_ms), 0);
            }
        }
        RequestDecision::Respond(answer) => {
            let _ = plugins::plugin_response(answer.status, &answer.headers, answer.body);
        }
    }
}

/// A plugin's response-phase decision, checked and applied to a response.
pub fn response_decision(decision: ResponseDecision) {
    if breakwater_sandbox::fuzzing::invalid_response_decision(&decision).is_some() {
        return;
    }
    match decision {
        ResponseDecision::Continue => {}
        ResponseDecision::ContinueWith(changes) => {
            let mut response = Response::new(Body::empty());
            breakwater_sandbox::http_view::apply_response_changes(response.headers_mut(), &changes);
        }
        ResponseDecision::Respond(answer) => {
            let _ = plugins::plugin_response(answer.status, &answer.headers, answer.body);
        }
    }
}
