//! One request's way through the node, in phases: admission (limits),
//! routing by path prefix, then the static site or the upstream pool, and
//! finally the response phase (request id, metrics, access log).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::Body;
use edge_config::{EdgeConfig, LimitsConfig};
use http::request::Parts;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::error::error_response;
use crate::limits::{LimitedBody, request_head_bytes};
use crate::observe::{CountedBody, InFlight, REQUEST_ID, request_id};
use crate::plugins::{self, PluginChain, RequestOutcome};
use crate::proxy::{ClientConnection, UpstreamPool};
use crate::server::EdgeError;
use crate::static_files::StaticSite;
use breakwater_sandbox::{Sandbox, SandboxConfig};
use std::collections::HashMap;

/// What a path prefix leads to.
enum Target {
    Site(Box<StaticSite>),
    Pool(Arc<UpstreamPool>),
}

struct Route {
    prefix: String,
    /// Metrics label: the site's or the pool's name.
    name: String,
    target: Target,
    plugins: Arc<PluginChain>,
}

/// The node's request handling state, shared by every listener.
pub(crate) struct EdgeNode {
    /// Longest prefix first, so the first match is the most specific.
    routes: Vec<Route>,
    /// Every pool by name, for plugins that choose one.
    pools: HashMap<String, Arc<UpstreamPool>>,
    limits: LimitsConfig,
    draining: AtomicBool,
    /// Keeps the engine, its epoch ticker and the plugin kv store alive.
    _sandbox: Option<Sandbox>,
}

impl EdgeNode {
    pub(crate) fn new(config: &EdgeConfig) -> Result<Self, EdgeError> {
        let pools: HashMap<String, Arc<UpstreamPool>> = config
            .pools
            .iter()
            .map(|pool| (pool.name.clone(), Arc::new(UpstreamPool::new(pool))))
            .collect();
        let sandbox = if config.plugins.is_empty() {
            None
        } else {
            Some(Sandbox::new(SandboxConfig::default())?)
        };
        let mut loaded = HashMap::new();
        if let Some(sandbox) = &sandbox {
            for plugin in &config.plugins {
                loaded.insert(
                    plugin.name.clone(),
                    Arc::new(plugins::load(sandbox, plugin)?),
                );
            }
        }
        // edge-config guarantees every name in a chain is defined.
        let chain = |names: &[String]| {
            Arc::new(PluginChain::new(
                names
                    .iter()
                    .filter_map(|n| loaded.get(n).cloned())
                    .collect(),
            ))
        };
        let mut routes = Vec::new();
        for site in &config.sites {
            routes.push(Route {
                prefix: site.prefix.clone(),
                name: site.name.clone(),
                target: Target::Site(Box::new(StaticSite::new(site)?)),
                plugins: chain(&site.plugins),
            });
        }
        for route in &config.routes {
            // edge-config guarantees the pool exists.
            if let Some(pool) = pools.get(&route.pool) {
                routes.push(Route {
                    prefix: route.prefix.clone(),
                    name: route.pool.clone(),
                    target: Target::Pool(pool.clone()),
                    plugins: chain(&route.plugins),
                });
            }
        }
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        Ok(Self {
            routes,
            pools,
            limits: config.limits.clone(),
            draining: AtomicBool::new(false),
            _sandbox: sandbox,
        })
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }

    /// The route for `path`: a prefix ending in `/` matches anything under
    /// it; any other prefix matches itself and what follows a `/` after it.
    fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| {
            path.strip_prefix(route.prefix.as_str())
                .is_some_and(|rest| {
                    route.prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/')
                })
        })
    }

    pub(crate) async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        client: Arc<ClientConnection>,
    ) -> Response<Body> {
        let started = Instant::now();
        let in_flight = InFlight::enter();
        let (mut parts, body) = request.into_parts();
        let id = request_id(&parts.headers);
        parts.headers.insert(REQUEST_ID, id.clone());
        let method = parts.method.clone();
        let path = parts.uri.path().to_owned();

        let (route_name, mut response) = self.dispatch(parts, body, &client).await;

        response.headers_mut().insert(REQUEST_ID, id.clone());
        let status = response.status();
        let elapsed = started.elapsed();
        metrics::counter!(
            "breakwater_edge_requests_total",
            "route" => route_name.clone(),
            "status" => status.as_str().to_owned()
        )
        .increment(1);
        metrics::histogram!("breakwater_edge_request_duration_seconds", "route" => route_name.clone())
            .record(elapsed.as_secs_f64());
        tracing::info!(
            target: "access",
            request_id = id.to_str().unwrap_or(""),
            client = %client.peer,
            method = %method,
            path = %path,
            route = %route_name,
            status = status.as_u16(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        response.map(|body| Body::new(CountedBody::new(body, route_name, in_flight)))
    }

    async fn dispatch(
        &self,
        parts: Parts,
        body: Incoming,
        client: &ClientConnection,
    ) -> (String, Response<Body>) {
        let unrouted = || "none".to_owned();
        if request_head_bytes(&parts) > self.limits.max_header_bytes {
            return (
                unrouted(),
                error_response(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers_too_large",
                    &format!(
                        "the request line and headers exceed {} bytes",
                        self.limits.max_header_bytes
                    ),
                ),
            );
        }
        let declared_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|len| len > self.limits.max_body_bytes) {
            return (
                unrouted(),
                error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    &format!(
                        "the request body exceeds {} bytes",
                        self.limits.max_body_bytes
                    ),
                ),
            );
        }
        let Some(route) = self.route_for(parts.uri.path()) else {
            return (
                unrouted(),
                error_response(
                    StatusCode::NOT_FOUND,
                    "no_route",
                    "no site or route serves this path",
                ),
            );
        };
        if route.plugins.is_empty() {
            let response = self
                .serve_target(&route.target, &route.prefix, parts, body, client)
                .await;
            return (route.name.clone(), response);
        }

        let (parts, outcome) = route.plugins.run_request_phase(parts, client.peer).await;
        let (pool, view) = match outcome {
            RequestOutcome::Respond(response) => return (route.name.clone(), response),
            RequestOutcome::Continue { pool, view } => (pool, view),
        };
        let chosen;
        let target = match pool {
            None => &route.target,
            Some(name) => match self.pools.get(&name) {
                Some(pool) => {
                    chosen = Target::Pool(pool.clone());
                    &chosen
                }
                None => {
                    return (
                        route.name.clone(),
                        error_response(
                            StatusCode::BAD_GATEWAY,
                            "unknown_pool",
                            &format!("a plugin chose pool `{name}`, which is not configured"),
                        ),
                    );
                }
            },
        };
        // A plugin may have rewritten the path: the site sees the new one.
        let response = self
            .serve_target(target, &route.prefix, parts, body, client)
            .await;
        let response = route.plugins.run_response_phase(view, response).await;
        (route.name.clone(), response)
    }

    async fn serve_target(
        &self,
        target: &Target,
        route_prefix: &str,
        parts: Parts,
        body: Incoming,
        client: &ClientConnection,
    ) -> Response<Body> {
        match target {
            Target::Site(site) => {
                let path = parts.uri.path();
                // A plugin's rewrite may have left the prefix: then the
                // whole path is the path in the site.
                let in_site = path.strip_prefix(route_prefix).unwrap_or(path);
                site.serve(
                    &parts.method,
                    &parts.headers,
                    in_site.trim_start_matches('/'),
                )
                .await
            }
            Target::Pool(pool) => {
                let (limited, trip) = LimitedBody::new(
                    body,
                    self.limits.max_body_bytes,
                    self.limits.body_read_timeout,
                );
                let request = Request::from_parts(parts, Body::new(limited));
                pool.forward(request, client, &trip).await
            }
        }
    }
}
