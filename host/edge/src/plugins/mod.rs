//! The plugin phases of a request: each route's chain runs `on-request` in
//! order before the target is asked, and `on-response` in reverse order on
//! the answer, each only for the plugins that implement that phase; a
//! chain where none does skips the phase (and its thread hop) entirely. A
//! plugin's `on-response` receives the context its `on-request` left. A
//! failing plugin is handled by its own policy: skipped (open) or a 500 for
//! that request (closed); the node goes on serving.

pub(crate) mod reload;
pub(crate) mod source;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use breakwater_sandbox::{
    CallError, Capability, Isolation, LoadError, LoadedPlugin, OnFailure, Phases, PluginSpec,
    Request, RequestChanges, RequestDecision, ResponseDecision, ResponseHead, Sandbox, TokenGrants,
    http_view,
};
use edge_config::{FailurePolicy, LimitsConfig, PluginConfig, PluginIsolation};
use http::request::Parts;
use http::{HeaderValue, Response, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::error_response;
use crate::limits::BufferedBody;

/// Loads a configured plugin into the node's sandbox.
pub(crate) fn load(sandbox: &Sandbox, config: &PluginConfig) -> Result<LoadedPlugin, LoadError> {
    let path = source::local_path(config)?;
    let mut spec = PluginSpec::new(&config.name, path, &config.sha256);
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
    spec.isolation = match config.isolation {
        PluginIsolation::PerRequest => Isolation::PerRequest,
        PluginIsolation::Reused => Isolation::Reused {
            recycle_after: config.recycle_after,
        },
    };
    sandbox.load(spec)
}

/// Loads every configured plugin, in order; the first failure names its
/// plugin and stops the load, so a node never runs a partial set.
pub(crate) fn load_all(
    sandbox: &Sandbox,
    configs: &[PluginConfig],
) -> Result<Vec<Arc<LoadedPlugin>>, (String, LoadError)> {
    configs
        .iter()
        .map(|config| {
            load(sandbox, config)
                .map(Arc::new)
                .map_err(|error| (config.name.clone(), error))
        })
        .collect()
}

/// One generation of the node's plugins: each route's chain. A reload
/// replaces the whole set at once, so a request never sees chains from two
/// generations.
pub(crate) struct PluginSet {
    pub(crate) generation: u64,
    /// One chain per route, indexed by the route's slot.
    pub(crate) chains: Vec<Arc<PluginChain>>,
}

impl PluginSet {
    /// The chain of the plugins called `names`. edge-config guarantees
    /// every name is defined.
    pub(crate) fn chain(plugins: &[Arc<LoadedPlugin>], names: &[String]) -> PluginChain {
        PluginChain::new(
            names
                .iter()
                .filter_map(|name| plugins.iter().find(|p| p.name() == name).cloned())
                .collect(),
        )
    }
}

/// Bounds the plugin phases running at once. Each phase is a task on
/// Tokio's blocking pool, whose queue has no bound: without this gate a
/// crowd would pile up there, each request holding its memory and waiting
/// however long the queue took.
pub(crate) struct PluginGate {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl PluginGate {
    pub(crate) fn new(limits: &LimitsConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limits.plugin_concurrency.max(1))),
            wait: limits.plugin_queue_timeout,
        }
    }

    /// A slot for one phase, or the 503 that sheds the request when none
    /// frees up within the queue timeout.
    async fn enter(&self, phase: &'static str) -> Result<OwnedSemaphorePermit, Response<Body>> {
        match tokio::time::timeout(self.wait, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed, so only the timeout lands here.
            Ok(Err(_)) | Err(_) => {
                metrics::counter!("breakwater_plugin_shed_total", "phase" => phase).increment(1);
                let mut response = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "plugins_busy",
                    "every plugin slot is busy; retry shortly",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(response)
            }
        }
    }
}

/// The plugins a site or route runs, in order.
#[derive(Default)]
pub(crate) struct PluginChain {
    plugins: Vec<Arc<LoadedPlugin>>,
    /// The phases at least one plugin of the chain implements.
    phases: Phases,
}

/// What the response phase needs from the request phase.
pub(crate) struct ResponseInputs {
    /// The request as the plugins saw it last.
    view: Request,
    /// What each plugin's `on-request` left for its `on-response`, by the
    /// plugin's place in the chain.
    contexts: Vec<Option<Vec<u8>>>,
}

/// Where a request goes after the request phase.
pub(crate) enum RequestOutcome {
    /// On to the target; a plugin may have chosen another pool.
    Continue {
        pool: Option<String>,
        /// For the response phase; none when no plugin of the chain has one.
        response: Option<Box<ResponseInputs>>,
        /// The plugins' cache key, TTL and bypass for the response cache.
        cache: crate::cache::Overrides,
        /// The LLM tokens the plugins reserved, settled with the answer.
        grants: TokenGrants,
    },
    /// A plugin (or a closed failure) answered.
    Respond(Response<Body>),
}

impl PluginChain {
    pub(crate) fn new(plugins: Vec<Arc<LoadedPlugin>>) -> Self {
        let phases = plugins
            .iter()
            .fold(Phases::empty(), |all, plugin| all | plugin.phases());
        Self { plugins, phases }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Whether some plugin of the chain has a request phase.
    pub(crate) fn reads_requests(&self) -> bool {
        self.phases.contains(Phases::REQUEST)
    }

    /// [`PluginChain::on_request`] on the blocking pool. Plugin calls are
    /// synchronous Wasmtime calls, and WASI's synchronous host functions
    /// (a plugin writing to stderr, as a Rust panic does) block on the Tokio
    /// runtime, which a worker thread may not do. Async Wasmtime calls
    /// would remove this hop; until then it is one hop per phase, not per
    /// plugin. `gate` bounds how many phases run at once.
    pub(crate) async fn run_request_phase(
        self: &Arc<Self>,
        gate: &PluginGate,
        mut parts: Parts,
        body: BufferedBody,
        client: SocketAddr,
    ) -> (Parts, RequestOutcome) {
        if !self.phases.contains(Phases::REQUEST) {
            // Nothing to call: no hop, no slot.
            let outcome = self.on_request(&mut parts, &body, client);
            return (parts, outcome);
        }
        let permit = match gate.enter("request").await {
            Ok(permit) => permit,
            Err(shed) => return (parts, RequestOutcome::Respond(shed)),
        };
        let chain = Arc::clone(self);
        let request_span = tracing::Span::current();
        let joined = tokio::task::spawn_blocking(move || {
            // Held by the task, not the request: a client that goes away
            // does not free the slot while its plugins still run.
            let _permit = permit;
            let _in_request = request_span.enter();
            let outcome = chain.on_request(&mut parts, &body, client);
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
        gate: &PluginGate,
        inputs: Option<Box<ResponseInputs>>,
        response: Response<Body>,
    ) -> Response<Body> {
        let Some(inputs) = inputs else {
            return response;
        };
        // Shedding here drops the target's answer, but skipping the
        // response plugins would let through what they exist to change.
        let permit = match gate.enter("response").await {
            Ok(permit) => permit,
            Err(shed) => return shed,
        };
        let chain = Arc::clone(self);
        let request_span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _in_request = request_span.enter();
            chain.on_response(&inputs, response)
        })
        .await
        .unwrap_or_else(|error| {
            tracing::error!(%error, "plugin response phase task failed");
            phase_failed()
        })
    }

    /// Runs `on-request` through the chain's plugins that have it,
    /// applying each plugin's changes to `parts` before the next plugin sees
    /// the request. `body` is what the route buffered of the body.
    pub(crate) fn on_request(
        &self,
        parts: &mut Parts,
        body: &BufferedBody,
        client: SocketAddr,
    ) -> RequestOutcome {
        let mut view = request_view(parts, client);
        show_body(&mut view, body);
        let mut pool = None;
        let mut cache = crate::cache::Overrides::default();
        let mut contexts = Vec::new();
        // Dropped with a refusal below: a request answered here gives its
        // reservations back.
        let mut grants = TokenGrants::default();
        for (place, plugin) in self.plugins.iter().enumerate() {
            if !plugin.phases().contains(Phases::REQUEST) {
                continue;
            }
            let call = PluginSpan::start(plugin, "on-request");
            let outcome = match plugin.on_request_granting(&view) {
                Ok((outcome, granted)) => {
                    grants.extend(granted);
                    call.end(match &outcome.decision {
                        RequestDecision::Continue => "continue",
                        RequestDecision::ContinueWith(_) => "continue-with",
                        RequestDecision::Respond(_) => "respond",
                    });
                    outcome
                }
                Err(error) => {
                    call.end("failed");
                    match failure(plugin, &error) {
                        Some(response) => return RequestOutcome::Respond(response),
                        None => continue,
                    }
                }
            };
            if let Some(context) = outcome.context {
                contexts.resize(place + 1, None);
                contexts[place] = Some(context);
            }
            match outcome.decision {
                RequestDecision::Continue => {}
                RequestDecision::ContinueWith(changes) => {
                    apply_request_changes(parts, changes, &mut pool, &mut cache);
                    let shown = view.body.take();
                    view = request_view(parts, client);
                    view.body = shown;
                    if matches!(body, BufferedBody::TooLarge { .. }) {
                        show_body(&mut view, body);
                    }
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
        let response = self
            .phases
            .contains(Phases::RESPONSE)
            .then(|| Box::new(ResponseInputs { view, contexts }));
        RequestOutcome::Continue {
            pool,
            response,
            cache,
            grants,
        }
    }

    /// Runs `on-response` through the chain's plugins that have it, in
    /// reverse order.
    pub(crate) fn on_response(
        &self,
        inputs: &ResponseInputs,
        mut response: Response<Body>,
    ) -> Response<Body> {
        for (place, plugin) in self.plugins.iter().enumerate().rev() {
            if !plugin.phases().contains(Phases::RESPONSE) {
                continue;
            }
            let head = ResponseHead {
                status: response.status().as_u16(),
                headers: http_view::header_pairs(response.headers()),
            };
            let context = inputs.contexts.get(place).and_then(Option::as_deref);
            let call = PluginSpan::start(plugin, "on-response");
            let decided = plugin.on_response(&inputs.view, &head, context);
            call.end(match &decided {
                Ok(ResponseDecision::Continue) => "continue",
                Ok(ResponseDecision::ContinueWith(_)) => "continue-with",
                Ok(ResponseDecision::Respond(_)) => "respond",
                Err(_) => "failed",
            });
            match decided {
                Ok(ResponseDecision::Continue) => {}
                Ok(ResponseDecision::ContinueWith(changes)) => {
                    http_view::apply_response_changes(response.headers_mut(), &changes)
                }
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

/// One plugin's `continue-with` applied: its header edits and path
/// rewrite to `parts` (as `breakwater plugin test` applies them), its pool
/// and cache choices over earlier plugins'.
pub(crate) fn apply_request_changes(
    parts: &mut Parts,
    changes: RequestChanges,
    pool: &mut Option<String>,
    cache: &mut crate::cache::Overrides,
) {
    http_view::apply_request_changes(parts, &changes);
    if changes.upstream_pool.is_some() {
        *pool = changes.upstream_pool;
    }
    // A later plugin's cache key and TTL replace an earlier one's; any
    // plugin may bypass.
    if changes.cache_key.is_some() {
        cache.key = changes.cache_key;
    }
    if let Some(ms) = changes.cache_ttl_ms {
        cache.ttl = Some(Duration::from_millis(ms));
    }
    cache.bypass |= changes.cache_bypass;
}

/// One plugin call on the request's trace: the plugin, the phase, what it
/// decided and the CPU time it took on this thread.
struct PluginSpan {
    span: tracing::Span,
    cpu_at_start: Option<Duration>,
}

impl PluginSpan {
    fn start(plugin: &LoadedPlugin, phase: &'static str) -> Self {
        let span = tracing::info_span!(
            target: breakwater_wire::trace::TARGET,
            "plugin",
            otel.name = phase,
            breakwater.plugin = plugin.name(),
            breakwater.phase = phase,
            breakwater.decision = tracing::field::Empty,
            breakwater.cpu_us = tracing::field::Empty,
        );
        let cpu_at_start = if span.is_disabled() {
            None
        } else {
            breakwater_sandbox::thread_cpu_time()
        };
        Self { span, cpu_at_start }
    }

    fn end(self, decision: &'static str) {
        if self.span.is_disabled() {
            return;
        }
        self.span.record("breakwater.decision", decision);
        if let (Some(from), Some(to)) = (self.cpu_at_start, breakwater_sandbox::thread_cpu_time()) {
            let micros = i64::try_from(to.saturating_sub(from).as_micros()).unwrap_or(i64::MAX);
            self.span.record("breakwater.cpu_us", micros);
        }
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

/// `body` as the view shows it: the bytes of a whole body, or the mark of
/// one too large to buffer.
fn show_body(view: &mut Request, body: &BufferedBody) {
    match body {
        BufferedBody::NotBuffered => {}
        BufferedBody::Whole(bytes) => view.body = Some(bytes.to_vec()),
        BufferedBody::TooLarge { limit } => http_view::mark_body_too_large(view, *limit),
    }
}

/// The request as the chain's plugins see it.
pub(crate) fn request_view(parts: &Parts, client: SocketAddr) -> Request {
    let request_id = parts
        .headers
        .get(crate::observe::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    http_view::request_view(parts, client.ip(), request_id)
}

pub(crate) fn plugin_response(
    status: u16,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    http_view::edit_headers(response.headers_mut(), headers, &[]);
    response
}
