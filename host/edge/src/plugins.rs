//! The plugin phases of a request: each route's chain runs `on-request` in
//! order before the target is asked, and `on-response` in reverse order on
//! the answer. A failing plugin is handled by its own policy: skipped (open)
//! or a 500 for that request (closed); the node goes on serving.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use breakwater_sandbox::{
    CallError, Capability, LoadError, LoadedPlugin, OnFailure, PluginSpec, Request,
    RequestDecision, ResponseDecision, ResponseHead, Sandbox,
};
use edge_config::{FailurePolicy, PluginConfig};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use crate::error::error_response;

/// Loads a configured plugin into the node's sandbox.
pub(crate) fn load(sandbox: &Sandbox, config: &PluginConfig) -> Result<LoadedPlugin, LoadError> {
    let mut spec = PluginSpec::new(&config.name, &config.path, &config.sha256);
    spec.config = config.config_json();
    let mut grants = BTreeSet::new();
    for grant in &config.grants {
        let capability = Capability::from_name(grant).ok_or_else(|| LoadError::Config {
            plugin: config.name.clone(),
            message: format!(
                "unknown grant `{grant}`: grants are log, clock, kv, counters, metrics"
            ),
        })?;
        grants.insert(capability);
    }
    spec.grants = grants;
    spec.on_failure = match config.on_failure {
        FailurePolicy::Open => OnFailure::Open,
        FailurePolicy::Closed => OnFailure::Closed,
    };
    if config.cpu_deadline.is_some() || config.memory_bytes.is_some() {
        let defaults = sandbox.default_limits();
        spec.limits = Some(breakwater_sandbox::Limits {
            cpu_deadline: config.cpu_deadline.unwrap_or(defaults.cpu_deadline),
            memory_bytes: config.memory_bytes.unwrap_or(defaults.memory_bytes),
        });
    }
    sandbox.load(spec)
}

/// The plugins a site or route runs, in order.
#[derive(Default)]
pub(crate) struct PluginChain {
    plugins: Vec<Arc<LoadedPlugin>>,
}

/// Where a request goes after the request phase.
pub(crate) enum RequestOutcome {
    /// On to the target; a plugin may have chosen another pool.
    Continue {
        pool: Option<String>,
        /// The request as the plugins saw it last, for the response phase.
        view: Box<Request>,
    },
    /// A plugin (or a closed failure) answered.
    Respond(Response<Body>),
}

impl PluginChain {
    pub(crate) fn new(plugins: Vec<Arc<LoadedPlugin>>) -> Self {
        Self { plugins }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// [`PluginChain::on_request`] on the blocking pool. Plugin calls are
    /// synchronous Wasmtime calls, and WASI's synchronous host functions
    /// (a plugin writing to stderr, as a Rust panic does) block on the Tokio
    /// runtime, which a worker thread may not do. Async Wasmtime calls
    /// would remove this hop; until then it is one hop per phase, not per
    /// plugin.
    pub(crate) async fn run_request_phase(
        self: &Arc<Self>,
        mut parts: Parts,
        client: SocketAddr,
    ) -> (Parts, RequestOutcome) {
        let chain = Arc::clone(self);
        let joined = tokio::task::spawn_blocking(move || {
            let outcome = chain.on_request(&mut parts, client);
            (parts, outcome)
        })
        .await;
        match joined {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(%error, "plugin request phase task failed");
                let (parts, _) = http::Request::new(()).into_parts();
                (parts, RequestOutcome::Respond(phase_failed()))
            }
        }
    }

    /// [`PluginChain::on_response`] on the blocking pool, for the same
    /// reason as [`PluginChain::run_request_phase`].
    pub(crate) async fn run_response_phase(
        self: &Arc<Self>,
        view: Box<Request>,
        response: Response<Body>,
    ) -> Response<Body> {
        let chain = Arc::clone(self);
        tokio::task::spawn_blocking(move || chain.on_response(&view, response))
            .await
            .unwrap_or_else(|error| {
                tracing::error!(%error, "plugin response phase task failed");
                phase_failed()
            })
    }

    /// Runs `on-request` through the chain, applying each plugin's changes
    /// to `parts` before the next plugin sees the request.
    pub(crate) fn on_request(&self, parts: &mut Parts, client: SocketAddr) -> RequestOutcome {
        let mut view = request_view(parts, client);
        let mut pool = None;
        for plugin in &self.plugins {
            let decision = match plugin.on_request(&view) {
                Ok(decision) => decision,
                Err(error) => match failure(plugin, &error) {
                    Some(response) => return RequestOutcome::Respond(response),
                    None => continue,
                },
            };
            match decision {
                RequestDecision::Continue => {}
                RequestDecision::ContinueWith(changes) => {
                    apply_headers(
                        &mut parts.headers,
                        &changes.set_headers,
                        &changes.remove_headers,
                    );
                    if let Some(path) = changes.rewrite_path
                        && let Ok(uri) = rewritten_uri(&parts.uri, &path)
                    {
                        parts.uri = uri;
                    }
                    if changes.upstream_pool.is_some() {
                        pool = changes.upstream_pool;
                    }
                    // cache-key, cache-ttl-ms and cache-bypass are read by
                    // the response cache, which does not exist yet.
                    view = request_view(parts, client);
                }
                RequestDecision::Respond(answer) => {
                    return RequestOutcome::Respond(plugin_response(
                        answer.status,
                        &answer.headers,
                        answer.body,
                    ));
                }
            }
        }
        RequestOutcome::Continue {
            pool,
            view: Box::new(view),
        }
    }

    /// Runs `on-response` through the chain in reverse order.
    pub(crate) fn on_response(
        &self,
        view: &Request,
        mut response: Response<Body>,
    ) -> Response<Body> {
        for plugin in self.plugins.iter().rev() {
            let head = ResponseHead {
                status: response.status().as_u16(),
                headers: header_pairs(response.headers()),
            };
            match plugin.on_response(view, &head) {
                Ok(ResponseDecision::Continue) => {}
                Ok(ResponseDecision::ContinueWith(changes)) => apply_headers(
                    response.headers_mut(),
                    &changes.set_headers,
                    &changes.remove_headers,
                ),
                Ok(ResponseDecision::Respond(answer)) => {
                    response = plugin_response(answer.status, &answer.headers, answer.body);
                }
                Err(error) => {
                    if let Some(failed) = failure(plugin, &error) {
                        return failed;
                    }
                }
            }
        }
        response
    }
}

fn phase_failed() -> Response<Body> {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "plugin_failed",
        "the plugin phase could not run",
    )
}

/// The plugin's policy applied to a failure: `None` skips it (open).
fn failure(plugin: &LoadedPlugin, error: &CallError) -> Option<Response<Body>> {
    tracing::warn!(plugin = plugin.name(), kind = %error.kind, error = %error, "plugin failed");
    match plugin.on_failure() {
        OnFailure::Open => None,
        OnFailure::Closed => Some(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_failed",
            &format!("plugin `{}` failed ({})", plugin.name(), error.kind),
        )),
    }
}

fn request_view(parts: &Parts, client: SocketAddr) -> Request {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    // Strip a port, but not the colons of a bracketed IPv6 literal.
    let host = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    Request {
        method: parts.method.as_str().to_owned(),
        host: host.to_ascii_lowercase(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
        headers: header_pairs(&parts.headers),
        client_ip: client.ip().to_string(),
        request_id: parts
            .headers
            .get(crate::observe::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        body: None,
    }
}

fn header_pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Header edits from a plugin; names or values that are not valid HTTP are
/// skipped rather than failing the request.
fn apply_headers(headers: &mut http::HeaderMap, set: &[(String, String)], remove: &[String]) {
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

fn plugin_response(status: u16, headers: &[(String, String)], body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    apply_headers(response.headers_mut(), headers, &[]);
    response
}
