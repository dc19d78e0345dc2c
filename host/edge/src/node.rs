//! One request's way through the node, in phases: admission (limits),
//! routing by path prefix, then the static site or the upstream pool, and
//! finally the response phase (request id, metrics, access log).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use breakwater_wire::trace;
use tracing::Instrument;

use axum::body::Body;
use breakwater_sandbox::SandboxConfig;
use edge_config::{EdgeConfig, LimitsConfig};
use http::request::Parts;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::cache::{Origin, Overrides, ResponseCache, RoutePolicy};
use crate::cluster::Cluster;
use crate::error::EdgeError;
use crate::error::error_response;
use crate::limits::{
    BodyBudget, BufferedBody, ClientBody, MethodAllowList, buffer_for_plugins, request_head_bytes,
};
use crate::observe::{CountedBody, InFlight, REQUEST_ID, RouteMetrics, request_id};
use crate::plugins::RequestOutcome;
use crate::plugins::reload::{ConfigSource, PluginRuntime, ReloadError, ReloadReport};
use crate::proxy::{ClientConnection, normalize_request};
use crate::static_files::StaticSite;
use crate::token_budget::Budget;
use crate::upstream::{RequestDeadline, ResumePolicy, UpstreamPool};
use crate::usage::{Meter, UsageLedger};
use std::collections::HashMap;

/// What a path prefix leads to.
enum Target {
    Site(Box<StaticSite>),
    Pool(Arc<UpstreamPool>),
}

struct Route {
    prefix: String,
    /// Labelled by the site's or the pool's name.
    metrics: Arc<RouteMetrics>,
    target: Target,
    /// Index of this route's chain in each plugin generation.
    slot: usize,
    /// Set on routes with `cache = true`.
    cache: Option<RoutePolicy>,
    /// The route's deadline; none: the pool's `total_timeout`.
    deadline: Option<std::time::Duration>,
    /// Bytes of a request body buffered for the plugins (0: none).
    plugin_body_bytes: u64,
    /// Answers' tokens are counted per key and tier.
    count_tokens: bool,
    /// Set on routes with `resume = true`.
    resume: Option<ResumePolicy>,
}

/// The node's request handling state, shared by every listener.
pub(crate) struct EdgeNode {
    /// Longest prefix first, so the first match is the most specific.
    routes: Vec<Route>,
    /// Every pool by name, for plugins that choose one.
    pools: HashMap<String, Arc<UpstreamPool>>,
    limits: LimitsConfig,
    methods: MethodAllowList,
    draining: AtomicBool,
    /// The plugin generations, their phase gate and reload.
    plugins: PluginRuntime,
    /// Bearer token of the mutating admin endpoints; none refuses them.
    admin_token: Option<String>,
    /// The response cache, when some route uses it.
    cache: Option<Arc<ResponseCache>>,
    /// Peers whose forwarding headers are believed (`node.trusted_proxies`).
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Metrics of requests refused before they had a route.
    unrouted: Arc<RouteMetrics>,
    /// Body bytes held for plugins at once, node-wide.
    plugin_body_budget: BodyBudget,
    /// Token totals per key, when some route counts tokens.
    usage: Option<Arc<UsageLedger>>,
    /// Continue a client's `traceparent` rather than only link it.
    trust_traceparent: bool,
}

impl EdgeNode {
    /// `source` is where a plugin reload reads the configuration again;
    /// without one the node cannot reload.
    pub(crate) fn new(
        config: &EdgeConfig,
        source: Option<ConfigSource>,
    ) -> Result<Self, EdgeError> {
        let pools = crate::upstream::build_pools(config);
        let mut routes = Vec::new();
        for site in &config.sites {
            routes.push(Route {
                prefix: site.prefix.clone(),
                metrics: Arc::new(RouteMetrics::new(&site.name)),
                target: Target::Site(Box::new(StaticSite::new(site)?)),
                slot: 0,
                cache: None,
                deadline: None,
                plugin_body_bytes: 0,
                count_tokens: false,
                resume: None,
            });
        }
        for route in &config.routes {
            // edge-config guarantees the pool exists.
            if let Some(pool) = pools.get(&route.pool) {
                routes.push(Route {
                    prefix: route.prefix.clone(),
                    metrics: Arc::new(RouteMetrics::new(&route.pool)),
                    target: Target::Pool(pool.clone()),
                    slot: 0,
                    cache: route.cache.then(|| RoutePolicy {
                        name: Arc::from(route.pool.as_str()),
                        stale_while_revalidate: route.stale_while_revalidate.unwrap_or_default(),
                        stale_if_error: route.stale_if_error.unwrap_or_default(),
                    }),
                    deadline: route.deadline,
                    plugin_body_bytes: route.plugin_body_bytes,
                    count_tokens: route.count_tokens,
                    resume: route.resume.then_some(ResumePolicy {
                        stall_timeout: route.stall_timeout,
                    }),
                });
            }
        }
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        for (slot, route) in routes.iter_mut().enumerate() {
            route.slot = slot;
        }
        let slots = routes.iter().map(|route| route.prefix.clone()).collect();
        let cluster = match &config.cluster {
            Some(cluster) => Some(Cluster::start(
                cluster,
                SandboxConfig::default().max_counter_keys,
            )?),
            None => None,
        };
        let plugins = PluginRuntime::new(
            config,
            slots,
            source,
            cluster.as_ref().and_then(Cluster::counters),
        )?;
        let admin_token = config
            .admin
            .as_ref()
            .and_then(|admin| admin.resolved_token())
            .filter(|token| !token.is_empty());
        let cache = if config.routes.iter().any(|route| route.cache) {
            Some(Arc::new(ResponseCache::open(
                &config.cache,
                cluster.as_ref().and_then(Cluster::cache),
            )?))
        } else {
            None
        };
        Ok(Self {
            routes,
            pools,
            limits: config.limits.clone(),
            methods: MethodAllowList::new(&config.limits.allowed_methods),
            draining: AtomicBool::new(false),
            plugins,
            admin_token,
            cache,
            trusted_proxies: config.node.trusted_proxy_networks(),
            unrouted: Arc::new(RouteMetrics::new("none")),
            plugin_body_budget: BodyBudget::new(config.limits.plugin_body_budget),
            usage: config
                .routes
                .iter()
                .any(|route| route.count_tokens)
                .then(|| Arc::new(UsageLedger::new(&config.usage))),
            trust_traceparent: config.tracing.trust_incoming,
        })
    }

    fn is_trusted_proxy(&self, peer: std::net::IpAddr) -> bool {
        // A v4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let peer = peer.to_canonical();
        self.trusted_proxies
            .iter()
            .any(|network| network.contains(&peer))
    }

    pub(crate) fn cache(&self) -> Option<&ResponseCache> {
        self.cache.as_deref()
    }

    pub(crate) fn usage(&self) -> Option<&UsageLedger> {
        self.usage.as_deref()
    }

    /// The meter of a request on `route`, when it counts tokens.
    fn meter(&self, route: &Route, request: &http::HeaderMap) -> Option<Meter> {
        let ledger = self.usage.as_ref().filter(|_| route.count_tokens)?;
        Some(ledger.meter(request))
    }

    pub(crate) fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    pub(crate) async fn reload_plugins(&self) -> Result<ReloadReport, ReloadError> {
        self.plugins.reload().await
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
        // First, so that everything after sees the request as forwarded.
        let refusal = normalize_request(&mut parts, self.is_trusted_proxy(client.peer.ip())).err();
        let id = request_id(&parts.headers);
        parts.headers.insert(REQUEST_ID, id.clone());
        let method = parts.method.clone();
        let path = parts.uri.path().to_owned();
        let span = tracing::info_span!(
            target: trace::TARGET,
            "edge.request",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            url.path = %path,
            breakwater.route = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            client.address = %client.peer.ip(),
            breakwater.request_id = id.to_str().unwrap_or(""),
        );
        if self.trust_traceparent {
            trace::continue_trace(&span, &parts.headers);
        } else {
            trace::link_trace(&span, &parts.headers);
        }

        let (route_metrics, mut response) = match refusal {
            Some(refusal) => {
                metrics::counter!("breakwater_edge_requests_refused_total", "reason" => refusal.code)
                    .increment(1);
                (self.unrouted.clone(), refusal.response())
            }
            None => {
                self.dispatch(parts, body, &client)
                    .instrument(span.clone())
                    .await
            }
        };

        response.headers_mut().insert(REQUEST_ID, id.clone());
        let status = response.status();
        let elapsed = started.elapsed();
        route_metrics.record(status, elapsed);
        if !span.is_disabled() {
            // Started by now: its name is changed on the OpenTelemetry span.
            {
                use opentelemetry::trace::TraceContextExt;
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                span.context()
                    .span()
                    .update_name(format!("{method} {}", route_metrics.name));
            }
            span.record("breakwater.route", route_metrics.name.as_str());
            // As i64: the exporter writes unsigned fields as text.
            span.record("http.response.status_code", i64::from(status.as_u16()));
            if status.is_server_error() {
                span.record("otel.status_code", "error");
            }
        }
        tracing::info!(
            target: "access",
            request_id = id.to_str().unwrap_or(""),
            client = %client.peer,
            method = %method,
            path = %path,
            route = %route_metrics.name,
            status = status.as_u16(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        response.map(|body| Body::new(CountedBody::new(body, route_metrics, in_flight, span)))
    }

    async fn dispatch(
        &self,
        parts: Parts,
        body: Incoming,
        client: &ClientConnection,
    ) -> (Arc<RouteMetrics>, Response<Body>) {
        let unrouted = || self.unrouted.clone();
        if let Some(refusal) = self.methods.refusal(&parts.method) {
            return (unrouted(), refusal);
        }
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
        let mut parts = parts;
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
        if let Some(deadline) = route.deadline {
            parts
                .extensions
                .insert(RequestDeadline(Instant::now() + deadline));
        }
        if let Some(resume) = route.resume {
            parts.extensions.insert(resume);
        }
        // Taken once: both phases run the chain the request started with,
        // whatever a reload swaps in meanwhile.
        let chain = self.plugins.chain(route.slot);
        if chain.is_empty() {
            let cache = route
                .cache
                .clone()
                .map(|policy| (policy, Overrides::default()));
            let body = ClientBody::Streaming(body);
            let meter = self.meter(route, &parts.headers);
            let response = self
                .serve_target(&route.target, &route.prefix, parts, body, client, cache)
                .await;
            return (route.metrics.clone(), metered(meter, response));
        }

        let (shown, body, held) = if route.plugin_body_bytes > 0 && chain.reads_requests() {
            match buffer_for_plugins(
                body,
                declared_length,
                route.plugin_body_bytes,
                &self.plugin_body_budget,
                self.limits.max_body_bytes,
                self.limits.body_read_timeout,
            )
            .await
            {
                Ok(buffered) => buffered,
                Err(error) => {
                    return (route.metrics.clone(), error.response(&route.metrics.name));
                }
            }
        } else {
            (BufferedBody::NotBuffered, ClientBody::Streaming(body), None)
        };
        // What the plugins saw, for a token budget's rewrite of it.
        let whole = match &shown {
            BufferedBody::Whole(bytes) => Some(bytes.clone()),
            _ => None,
        };
        let gate = self.plugins.gate();
        let (mut parts, outcome) = chain
            .run_request_phase(gate, parts, shown, client.peer)
            .await;
        // The plugins are done with it; the forwarded copy is the pool's.
        drop(held);
        // After the plugins: the tier is the one they left.
        let meter = self.meter(route, &parts.headers);
        let (pool, response_inputs, mut overrides, grants) = match outcome {
            RequestOutcome::Respond(response) => return (route.metrics.clone(), response),
            RequestOutcome::Continue {
                pool,
                response,
                cache,
                grants,
            } => (pool, response, cache, grants),
        };
        let mut body = body;
        let budget =
            Budget::admit(grants, &mut parts, whole.as_ref()).map(|(budget, rewritten)| {
                if let Some(rewritten) = rewritten {
                    body = ClientBody::whole(rewritten.body);
                    if let Some(key) = &mut overrides.key {
                        key.push_str(&rewritten.key_suffix);
                    }
                }
                budget
            });
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
                        route.metrics.clone(),
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
        let cache = route.cache.clone().map(|policy| (policy, overrides));
        let response = self
            .serve_target(target, &route.prefix, parts, body, client, cache)
            .await;
        let response = chain
            .run_response_phase(gate, response_inputs, response)
            .await;
        // Metered first: the ledger reads the upstream's usage chunk, which
        // the budget may then remove.
        let response = metered(meter, response);
        let response = match budget {
            Some(budget) => budget.answer(response).await,
            None => response,
        };
        (route.metrics.clone(), response)
    }

    async fn serve_target(
        &self,
        target: &Target,
        route_prefix: &str,
        parts: Parts,
        body: ClientBody,
        client: &ClientConnection,
        cache: Option<(RoutePolicy, Overrides)>,
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
                let (limited, trip) =
                    body.limited(self.limits.max_body_bytes, self.limits.body_read_timeout);
                let request = Request::from_parts(parts, limited);
                match (cache, &self.cache) {
                    (Some((policy, overrides)), Some(store)) => {
                        let origin = Arc::new(Origin {
                            pool: pool.clone(),
                            client: client.clone(),
                        });
                        store.serve(policy, overrides, request, origin, trip).await
                    }
                    _ => pool.forward(request, client, &trip).await,
                }
            }
        }
    }
}

fn metered(meter: Option<Meter>, response: Response<Body>) -> Response<Body> {
    match meter {
        Some(meter) => meter.wrap(response),
        None => response,
    }
}
