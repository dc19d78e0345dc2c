//! Upstream pools and the way a request reaches one: the pool a route or
//! plugin names and its failover pools in priority order, a healthy and
//! least loaded endpoint, retries on another endpoint within a budget, and
//! a deadline carried upstream.
//!
//! Deadlines travel upstream as `X-Request-Deadline: <Unix time in
//! milliseconds>`, the form the GPU host reads: the absolute time keeps its
//! meaning however long the request waits in queues on the way (clocks are
//! assumed NTP-synchronised; skew shortens or lengthens the time left by
//! the skew). A client's own `X-Request-Deadline` may only shorten it.
//!
//! Retries: a request is retried only before anything of its answer went
//! to the client (the answer is returned whole or not at all, so a stream
//! that started is never retried), only with a body the node still holds
//! (empty, or buffered up to `retry.buffer_bytes`), only on an endpoint it
//! has not tried, and only when its method is idempotent (`GET`, `HEAD`,
//! `OPTIONS`, `TRACE`, `PUT`, `DELETE`) or it carries `Idempotency-Key`.
//! A connection that was never established sent nothing: sending the
//! request elsewhere is a reroute, allowed for any method and outside the
//! retry budget, bounded by the endpoints there are. A retriable request
//! whose attempt got no answer (reset, timeout) while the retry budget is
//! spent is answered `503` + `Retry-After`: it was shed to protect the
//! pool, and the client may try again.
//!
//! Shedding at the pool's concurrency limit is by priority tier when the
//! pool configures tiers (see [`limit`]); the answer names the tier.
//!
//! A request body the client breaks (bad framing, cut off, too large, too
//! slow: [`ClientBodyError`]) ends the attempt it was streaming into; that
//! failure is the client's, so it is answered 400/408/413, counted in
//! `breakwater_edge_client_body_errors_total`, and neither counts against
//! the endpoint (outlier detection, health, concurrency limit, attempt
//! metrics) nor is retried.
//!
//! Panic routing (Envoy's panic threshold): while the healthy share of a
//! pool and of every failover pool behind it is below the pool's
//! `panic_threshold`, health is ignored and requests go to all endpoints,
//! ejected ones included, by priority: some answers beat a 503 for
//! everyone, and the load is not piled onto the few endpoints left.

mod balance;
mod budget;
mod endpoint;
mod limit;
mod pool;
mod resume;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use breakwater_wire::trace;
use bytes::Bytes;
use edge_config::EdgeConfig;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use metrics::Gauge;
use tokio::time::Sleep;
use tracing::Instrument;

use crate::error::error_response;
use crate::limits::{BodyLimitTrip, BoxError, ClientBodyError};
use crate::proxy::{
    ClientConnection, prepare_request_headers, prepare_response, unreachable, upstream_uri,
};
use balance::Rng;
use budget::RetryBudget;
use endpoint::{Endpoint, Failure, Outstanding, now_ms};
use limit::{ConcurrencyLimit, Permit};
use pool::PoolCore;
pub(crate) use resume::ResumePolicy;
use resume::{FirstAnswer, Resumable, Splice};

/// Sent upstream on every attempt after the first: `2`, `3`, …
pub(crate) use breakwater_wire::ATTEMPT_HEADER;
/// The deadline header, in Unix milliseconds.
pub(crate) use breakwater_wire::DEADLINE_HEADER;

/// The route's deadline for one request, set by the node when it arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestDeadline(pub(crate) Instant);

/// What a route or plugin names: a pool and, behind it, its failover
/// pools by priority.
pub(crate) struct UpstreamPool {
    name: String,
    chain: Vec<Arc<PoolCore>>,
    budget: Arc<RetryBudget>,
    /// The pool's adaptive concurrency limit, when configured.
    limit: Option<Arc<ConcurrencyLimit>>,
    rng: Rng,
    /// The pool's `panic_threshold`, applied to every pool in `chain`.
    panic_threshold: f64,
    /// In panic routing now (for the log line on each change).
    panicking: AtomicBool,
    panic_gauge: Gauge,
}

/// Builds every configured pool once, with its failover chain, and starts
/// their health checks.
pub(crate) fn build_pools(config: &EdgeConfig) -> HashMap<String, Arc<UpstreamPool>> {
    let region = &config.node.region;
    let cores: HashMap<&str, Arc<PoolCore>> = config
        .pools
        .iter()
        .map(|pool| (pool.name.as_str(), Arc::new(PoolCore::new(pool, region))))
        .collect();
    for core in cores.values() {
        pool::spawn_maintenance(core);
    }
    config
        .pools
        .iter()
        .filter_map(|pool| {
            let own = cores.get(pool.name.as_str())?.clone();
            let mut chain = vec![own];
            // edge-config guarantees the failover pools exist.
            chain.extend(
                pool.failover
                    .iter()
                    .filter_map(|name| cores.get(name.as_str()).cloned()),
            );
            // Stable: equal priorities keep the pool first, then list order.
            chain.sort_by_key(|core| core.priority);
            let upstream = UpstreamPool {
                name: pool.name.clone(),
                chain,
                budget: Arc::new(RetryBudget::new(
                    pool.retry.budget_ratio,
                    pool.retry.min_concurrency,
                )),
                limit: pool
                    .concurrency
                    .as_ref()
                    .map(|c| Arc::new(ConcurrencyLimit::new(&pool.name, c))),
                rng: Rng::new(),
                panic_threshold: pool.panic_threshold,
                panicking: AtomicBool::new(false),
                panic_gauge: metrics::gauge!("breakwater_upstream_panic", "pool" => pool.name.clone()),
            };
            upstream.panic_gauge.set(0.0);
            let upstream = Arc::new(upstream);
            spawn_panic_watch(&upstream);
            Some((pool.name.clone(), upstream))
        })
        .collect()
}

/// Re-evaluates panic routing while no request walks by, so that the gauge
/// and the log say when it ends; stops when the pool is dropped.
fn spawn_panic_watch(pool: &Arc<UpstreamPool>) {
    let weak = Arc::downgrade(pool);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = weak.upgrade() else { return };
            pool.in_panic(now_ms());
        }
    });
}

/// The request body, kept for another attempt or streamed once.
enum AttemptBody {
    Kept(Bytes),
    Streaming(Option<Body>),
}

impl AttemptBody {
    fn take(&mut self) -> Body {
        match self {
            AttemptBody::Kept(bytes) => Body::from(bytes.clone()),
            AttemptBody::Streaming(body) => body.take().unwrap_or_else(Body::empty),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, AttemptBody::Kept(_))
    }
}

struct LastFailure {
    failure: Option<Failure>,
    response: Option<Response<hyper::body::Incoming>>,
    detail: String,
    core: Arc<PoolCore>,
}

/// How one attempt ended.
enum Outcome {
    Answer(Response<hyper::body::Incoming>, Outstanding),
    /// A `503` with `Retry-After`: the endpoint is busy, not failing.
    Busy(Response<hyper::body::Incoming>),
    Failed(Failure, Option<Response<hyper::body::Incoming>>, String),
    /// The client broke its request body while it was being sent: says
    /// nothing about the endpoint.
    ClientBroke(ClientBodyError),
    /// The request's deadline passed while its body was still being sent.
    DeadlinePassed,
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// `Retry-After` as a duration: delay seconds or an HTTP date.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

fn unix_ms(at: Instant) -> u64 {
    let left = at.saturating_duration_since(Instant::now());
    let when = SystemTime::now() + left;
    when.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A client's `X-Request-Deadline` (Unix ms) as an instant.
fn client_deadline(headers: &http::HeaderMap) -> Option<Instant> {
    let ms: u64 = headers
        .get(DEADLINE_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    let left = Duration::from_millis(ms).saturating_sub(now_unix);
    Some(Instant::now() + left)
}

impl UpstreamPool {
    fn primary(&self) -> &PoolCore {
        // The chain always holds the pool itself.
        &self.chain[0]
    }

    /// Whether an answer made by model `version` is current: some healthy
    /// endpoint of this pool or of its failover pools last named that
    /// version (during a rolling swap both versions are). A dead host's
    /// version dies with it, except while no endpoint is healthy: an
    /// outage retires nothing. None while no endpoint has named any
    /// version.
    pub(crate) fn serves_model_version(&self, version: &str) -> Option<bool> {
        let now = now_ms();
        let endpoints = || self.chain.iter().flat_map(|core| core.endpoints.iter());
        let any_healthy = endpoints().any(|endpoint| endpoint.is_healthy(now));
        let mut named_any = false;
        for endpoint in endpoints().filter(|e| !any_healthy || e.is_healthy(now)) {
            if let Some(named) = endpoint.model_version() {
                if named.as_str() == version {
                    return Some(true);
                }
                named_any = true;
            }
        }
        named_any.then_some(false)
    }

    /// Whether requests are panic routed now: every pool that could take
    /// this pool's traffic is below its `panic_threshold`. Logs and sets
    /// the gauge when that changes.
    fn in_panic(&self, now: u64) -> bool {
        let panic = self
            .chain
            .iter()
            .all(|core| core.is_below(now, self.panic_threshold));
        if self.panicking.swap(panic, Ordering::Relaxed) != panic {
            self.panic_gauge.set(if panic { 1.0 } else { 0.0 });
            let healthy_share = self.primary().healthy_share(now);
            if panic {
                tracing::warn!(pool = %self.name, healthy_share, threshold = self.panic_threshold, "panic routing: too few healthy endpoints, sending to all of them, unhealthy ones included");
            } else {
                tracing::info!(pool = %self.name, healthy_share, "panic routing ended: healthy endpoints only");
            }
        }
        panic
    }

    /// The endpoint for the next attempt: the first pool by priority that
    /// is not spilled and has an available endpoint; when every pool is
    /// spilled, any pool that has one. In panic, the first pool by
    /// priority with an endpoint that has room, healthy or not.
    fn choose(&self, key: Option<u64>, tried: &[Arc<Endpoint>]) -> Option<(usize, Arc<Endpoint>)> {
        let now = now_ms();
        let any = |panic: bool| {
            self.chain.iter().enumerate().find_map(|(i, core)| {
                core.choose(&self.rng, now, key, tried, panic)
                    .map(|e| (i, e))
            })
        };
        if self.in_panic(now) {
            return any(true);
        }
        let last = self.chain.len() - 1;
        for (i, core) in self.chain.iter().enumerate() {
            if i < last && core.is_spilled(now) {
                continue;
            }
            if let Some(endpoint) = core.choose(&self.rng, now, key, tried, false) {
                return Some((i, endpoint));
            }
        }
        any(false)
    }

    /// Sends `request` upstream and returns the upstream's response with its
    /// body still streaming. Failures become 502/503/504 (or 413/408 when
    /// the client's own body broke a limit) with a JSON body; when no
    /// upstream answered at all, the response carries
    /// [`crate::proxy::UpstreamUnreachable`].
    pub(crate) async fn forward(
        self: &Arc<Self>,
        request: Request<Body>,
        client: &ClientConnection,
        body_trip: &BodyLimitTrip,
    ) -> Response<Body> {
        let _active = self.budget.enter();
        let primary = self.primary();
        let retry = &primary.config.retry;
        let (mut parts, body) = request.into_parts();
        let now = Instant::now();
        let mut deadline = parts
            .extensions
            .get::<RequestDeadline>()
            .map_or(now + primary.config.total_timeout, |d| d.0);
        if let Some(theirs) = client_deadline(&parts.headers) {
            deadline = deadline.min(theirs);
        }
        let permit = match &self.limit {
            None => None,
            Some(limit) => {
                let tier = limit.tier_of(&parts.headers);
                match limit.acquire(tier).await {
                    Ok(permit) => Some(permit),
                    Err(shed) => return self.shed(shed.label(), limit.tier_name(tier)),
                }
            }
        };
        prepare_request_headers(&mut parts, client);
        let resume = parts.extensions.get::<ResumePolicy>().copied();
        let prefix_balanced = self
            .chain
            .iter()
            .any(|core| core.config.balance == edge_config::BalanceMode::Prefix);
        let reads_body = resume.is_some() || prefix_balanced;
        let mut body = match keep_body(
            body,
            &parts.headers,
            // A body read for its content is kept even where retries are
            // off: a continuation is built from it, a prefix is routed by it.
            if reads_body {
                retry.attempts.max(2)
            } else {
                retry.attempts
            },
            retry.buffer_bytes,
            deadline,
        )
        .await
        {
            Ok(body) => body,
            Err(()) => return self.body_error(body_trip),
        };
        // Parsed once, for both readers.
        let json: Option<serde_json::Value> = match &body {
            AttemptBody::Kept(kept) if reads_body => serde_json::from_slice(kept).ok(),
            _ => None,
        };
        let key = self
            .chain
            .iter()
            .find_map(|core| core.hash_key(&parts.headers, json.as_ref()));
        let resumable = match (&resume, json) {
            (Some(_), Some(json)) => Resumable::of(&parts.method, json),
            _ => None,
        };
        let retriable = idempotent(&parts.method)
            || parts.headers.contains_key("idempotency-key")
            || resumable.is_some();
        // A stream that may be spliced: its request, and the route's say.
        let mut splice_with = match (resume, resumable) {
            (Some(policy), Some(Resumable::Stream(request))) => Some((policy, request)),
            _ => None,
        };
        let token_ids = splice_with.is_some();
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut retries = 0u32;
        let mut _slot = None;
        // The previous attempt's failure, answered if no endpoint is left.
        let mut last: Option<LastFailure> = None;
        loop {
            if Instant::now() >= deadline {
                return deadline_exceeded();
            }
            let Some((index, endpoint)) = self.choose(key, &tried) else {
                return match last {
                    Some(last) => give_up(last.failure, last.response, &last.detail, &last.core),
                    None => self.no_endpoint(),
                };
            };
            let core = &self.chain[index];
            tried.push(endpoint.clone());
            let attempt = tried.len();
            let sent = Instant::now();
            let span = attempt_span(core, &endpoint, attempt);
            let outcome = self
                .attempt(
                    core,
                    &endpoint,
                    &parts,
                    body.take(),
                    attempt,
                    deadline,
                    body_trip,
                    token_ids,
                )
                .instrument(span.clone())
                .await;
            record_outcome(&span, &outcome);
            if let Some(permit) = &permit
                && !matches!(outcome, Outcome::ClientBroke(_) | Outcome::DeadlinePassed)
            {
                let ok = matches!(outcome, Outcome::Answer(..));
                permit.limit().record(sent.elapsed(), ok);
            }
            let (failure, response, detail) = match outcome {
                Outcome::Answer(response, outstanding) => {
                    if resume::is_spliceable(&response)
                        && let Some((policy, request)) = splice_with.take()
                    {
                        let splice = Splice::new(
                            self.clone(),
                            &parts,
                            request,
                            key,
                            std::mem::take(&mut tried),
                            deadline,
                            policy,
                            permit,
                        );
                        let first = FirstAnswer {
                            response,
                            outstanding,
                            endpoint,
                            core: core.clone(),
                        };
                        return crate::observe::held_to_the_end(splice.answer(first), span);
                    }
                    let response = finish(
                        response,
                        outstanding,
                        permit,
                        core.clone(),
                        deadline,
                        body_trip.clone(),
                    );
                    return crate::observe::held_to_the_end(response, span);
                }
                Outcome::Busy(response) => (None, Some(response), "busy".to_owned()),
                Outcome::Failed(failure, response, detail) => (Some(failure), response, detail),
                Outcome::ClientBroke(error) => return self.client_body_error(error),
                Outcome::DeadlinePassed => return deadline_exceeded(),
            };
            if let Some(error) = body_trip.get() {
                return self.client_body_error(error);
            }
            let label = failure.map_or("busy", Failure::label);
            metrics::counter!(
                "breakwater_edge_upstream_errors_total",
                "pool" => core.name.clone(),
                "kind" => label
            )
            .increment(1);
            // Where the request goes next, if anywhere.
            let unsent = failure == Some(Failure::Connect);
            let may_retry = body.replayable()
                && self.choose(key, &tried).is_some()
                && if unsent {
                    true
                } else {
                    retriable && retries + 1 < retry.attempts
                };
            if may_retry && !unsent {
                match self.budget.try_retry() {
                    Some(slot) => _slot = Some(slot),
                    None => {
                        metrics::counter!("breakwater_upstream_retry_budget_exhausted_total", "pool" => self.name.clone()).increment(1);
                        // No answer to pass on, and a retry that would have
                        // saved the request was refused to protect the
                        // pool: that is shedding, answered as such (503 +
                        // Retry-After), not a broken upstream (502).
                        if response.is_none() {
                            return self.shed_retry(&detail);
                        }
                        return give_up(failure, response, &detail, core);
                    }
                }
            }
            if !may_retry || deadline <= Instant::now() {
                return give_up(failure, response, &detail, core);
            }
            last = Some(LastFailure {
                failure,
                response,
                detail,
                core: core.clone(),
            });
            if !unsent {
                retries += 1;
                let ceiling = retry
                    .backoff_base
                    .saturating_mul(1u32 << (retries - 1).min(16))
                    .min(retry.backoff_max);
                let wait = ceiling.mul_f64(self.rng.unit());
                tokio::time::sleep_until((Instant::now() + wait).min(deadline).into()).await;
            }
            metrics::counter!(
                "breakwater_upstream_retries_total",
                "pool" => self.name.clone(),
                "reason" => label
            )
            .increment(1);
            tracing::debug!(pool = %self.name, endpoint = %endpoint.label, reason = label, attempt, "trying another endpoint");
        }
    }

    /// One attempt on `endpoint`; records its outcome on the endpoint,
    /// unless the client broke the request body meanwhile (`body_trip`).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        core: &PoolCore,
        endpoint: &Arc<Endpoint>,
        parts: &http::request::Parts,
        body: Body,
        attempt: usize,
        deadline: Instant,
        body_trip: &BodyLimitTrip,
        token_ids: bool,
    ) -> Outcome {
        let Some(uri) = upstream_uri(&endpoint.uri, &parts.uri) else {
            return Outcome::Failed(Failure::Status, None, "bad uri".to_owned());
        };
        let (body, sent_whole) = SentWhole::wrap(body);
        let mut request = Request::new(Body::new(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = match core.config.protocol {
            edge_config::UpstreamProtocol::H2 => http::Version::HTTP_2,
            edge_config::UpstreamProtocol::Http1 => http::Version::HTTP_11,
        };
        *request.headers_mut() = parts.headers.clone();
        let headers = request.headers_mut();
        // Only the edge speaks for itself to a GPU host: a client's claim
        // to be a retry, or its ask for token ids (which a cached answer
        // would then carry to every client), is dropped.
        headers.remove(ATTEMPT_HEADER);
        headers.remove(breakwater_wire::TOKEN_IDS_HEADER);
        if token_ids {
            headers.insert(
                breakwater_wire::TOKEN_IDS_HEADER,
                HeaderValue::from_static("1"),
            );
        }
        if let Ok(value) = HeaderValue::from_str(&unix_ms(deadline).to_string()) {
            headers.insert(DEADLINE_HEADER, value);
        }
        if attempt > 1
            && let Ok(value) = HeaderValue::from_str(&attempt.to_string())
        {
            headers.insert(ATTEMPT_HEADER, value);
        }
        trace::inject(&tracing::Span::current(), headers);
        let outstanding = endpoint.start();
        let started = Instant::now();
        let first_byte_timeout = core.config.first_byte_timeout;
        // The endpoint is judged from the moment it has the whole request:
        // the time a client takes to send its body is the client's (bounded
        // by `body_read_timeout`), not the endpoint's.
        let mut whole_sent = sent_whole.clone();
        let first_byte = async move {
            if whole_sent.wait_for(Option::is_some).await.is_err() {
                // The body ended short: the request itself fails.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(first_byte_timeout).await;
        };
        let sent = tokio::select! {
            sent = core.client.request(request) => Ok(sent),
            () = first_byte => Err(first_byte_timeout),
            () = tokio::time::sleep_until(deadline.into()) => {
                if sent_whole.borrow().is_none() {
                    // Whose slowness ran the clock out is unknown: a
                    // client's slow body, or an endpoint not reading it.
                    return Outcome::DeadlinePassed;
                }
                Err(deadline.saturating_duration_since(started))
            }
        };
        // A failure while the client's body was breaking is the body's:
        // the upstream saw a request cut short, or none at all.
        let answered = matches!(&sent, Ok(Ok(r)) if !r.status().is_server_error());
        if !answered && let Some(error) = body_trip.get() {
            return Outcome::ClientBroke(error);
        }
        let outcome = match sent {
            Ok(Ok(response)) => {
                let status = response.status();
                endpoint.note_model_version(response.headers());
                if status == StatusCode::SERVICE_UNAVAILABLE
                    && let Some(wait) = retry_after(response.headers())
                {
                    endpoint.mark_busy(
                        wait.clamp(Duration::from_millis(100), Duration::from_secs(300)),
                    );
                    Outcome::Busy(response)
                } else if status.is_server_error() {
                    core.record_failure(endpoint, Failure::Status);
                    Outcome::Failed(Failure::Status, Some(response), status.to_string())
                } else {
                    let whole_at = sent_whole.borrow().unwrap_or(started);
                    endpoint.record_success(whole_at.elapsed());
                    return Outcome::Answer(response, outstanding);
                }
            }
            Ok(Err(e)) => {
                let failure = if e.is_connect() {
                    Failure::Connect
                } else {
                    Failure::Reset
                };
                core.record_failure(endpoint, failure);
                Outcome::Failed(failure, None, e.to_string())
            }
            Err(waited) => {
                core.record_failure(endpoint, Failure::Timeout);
                Outcome::Failed(
                    Failure::Timeout,
                    None,
                    format!("no answer within {waited:?} of the request"),
                )
            }
        };
        metrics::counter!(
            "breakwater_upstream_attempt_failures_total",
            "pool" => core.name.clone(),
            "endpoint" => endpoint.label.clone()
        )
        .increment(1);
        outcome
    }

    /// Over the concurrency limit and its queue: 503 now, a stale answer
    /// from the cache when it has one.
    fn shed(&self, reason: &str, tier: &str) -> Response<Body> {
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            &format!(
                "pool `{}` is at its concurrency limit ({reason}, tier `{tier}`)",
                self.name
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        unreachable(response)
    }

    /// A retriable request whose attempt failed without an answer, when
    /// the retry budget is spent.
    fn shed_retry(&self, detail: &str) -> Response<Body> {
        tracing::warn!(pool = %self.name, error = %detail, "upstream attempt failed; retry budget spent");
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "retry_budget_exhausted",
            &format!(
                "an upstream of pool `{}` failed and the pool's retry budget is spent",
                self.name
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        unreachable(response)
    }

    /// The client broke its request body: its own error, counted apart
    /// from upstream errors.
    fn client_body_error(&self, error: ClientBodyError) -> Response<Body> {
        error.response(&self.name)
    }

    /// The body could not be kept for another attempt.
    fn body_error(&self, trip: &BodyLimitTrip) -> Response<Body> {
        match trip.get() {
            Some(error) => self.client_body_error(error),
            None => error_response(
                StatusCode::BAD_REQUEST,
                "bad_request_body",
                "the request body could not be read",
            ),
        }
    }

    fn no_endpoint(&self) -> Response<Body> {
        let now = now_ms();
        let busy = self.chain.iter().filter_map(|c| c.shortest_busy(now)).min();
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            if busy.is_some() {
                "upstream_busy"
            } else {
                "no_healthy_upstream"
            },
            "no upstream endpoint is available",
        );
        let seconds = busy.map_or(1, |b| b.as_secs_f64().ceil().max(1.0) as u64);
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        unreachable(response)
    }
}

/// Keeps the body for another attempt when it is empty or small enough
/// (by its declared length); otherwise it streams, once.
async fn keep_body(
    body: Body,
    headers: &http::HeaderMap,
    attempts: u32,
    buffer_bytes: u64,
    deadline: Instant,
) -> Result<AttemptBody, ()> {
    use http_body::Body as _;
    if body.is_end_stream() || body.size_hint().exact() == Some(0) {
        return Ok(AttemptBody::Kept(Bytes::new()));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if attempts > 1 && declared.is_some_and(|len| len <= buffer_bytes) {
        // The body's own read timeout bounds this too.
        return match tokio::time::timeout_at(deadline.into(), body.collect()).await {
            Ok(Ok(collected)) => Ok(AttemptBody::Kept(collected.to_bytes())),
            _ => Err(()),
        };
    }
    Ok(AttemptBody::Streaming(Some(body)))
}

fn deadline_exceeded() -> Response<Body> {
    unreachable(error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
        "the request's deadline passed before an upstream answered",
    ))
}

/// A request body on its way upstream that says when it has been sent
/// whole: the instant its end was reached.
struct SentWhole {
    inner: Body,
    whole: Option<tokio::sync::watch::Sender<Option<Instant>>>,
}

impl SentWhole {
    fn wrap(inner: Body) -> (Self, tokio::sync::watch::Receiver<Option<Instant>>) {
        use http_body::Body as _;
        let (tx, rx) = tokio::sync::watch::channel(None);
        let mut body = Self {
            inner,
            whole: Some(tx),
        };
        if body.inner.is_end_stream() {
            body.mark();
        }
        (body, rx)
    }

    fn mark(&mut self) {
        if let Some(whole) = self.whole.take() {
            whole.send_replace(Some(Instant::now()));
        }
    }
}

impl http_body::Body for SentWhole {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.mark(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.mark(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The last attempt's answer when there was one (an upstream's own 5xx
/// goes to the client as it is), else the node's error.
fn give_up(
    failure: Option<Failure>,
    response: Option<Response<hyper::body::Incoming>>,
    detail: &str,
    core: &PoolCore,
) -> Response<Body> {
    if let Some(response) = response {
        return prepare_response(response);
    }
    tracing::warn!(pool = %core.name, error = %detail, "upstream request failed");
    match failure {
        Some(Failure::Timeout) => unreachable(error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            &format!("the upstream did not answer: {detail}"),
        )),
        _ => unreachable(error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            "the upstream could not be reached or broke the connection",
        )),
    }
}

/// One attempt's trace span.
fn attempt_span(core: &PoolCore, endpoint: &Endpoint, attempt: usize) -> tracing::Span {
    tracing::info_span!(
        target: trace::TARGET,
        "upstream.attempt",
        otel.name = "upstream attempt",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        breakwater.pool = %core.name,
        server.address = %endpoint.label,
        breakwater.retry = i64::try_from(attempt - 1).unwrap_or(i64::MAX),
        breakwater.outcome = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    )
}

/// What became of an attempt, on its trace span.
fn record_outcome(span: &tracing::Span, outcome: &Outcome) {
    if span.is_disabled() {
        return;
    }
    let (label, status) = match outcome {
        Outcome::Answer(response, _) => ("answer", Some(response.status())),
        Outcome::Busy(response) => ("busy", Some(response.status())),
        Outcome::Failed(failure, response, _) => {
            (failure.label(), response.as_ref().map(Response::status))
        }
        Outcome::ClientBroke(_) => ("client_broke", None),
        Outcome::DeadlinePassed => ("deadline", None),
    };
    span.record("breakwater.outcome", label);
    if let Some(status) = status {
        // As i64: the exporter writes unsigned fields as text.
        span.record("http.response.status_code", i64::from(status.as_u16()));
    }
    if !matches!(outcome, Outcome::Answer(..)) {
        span.record("otel.status_code", "error");
    }
}

/// The answer, streaming, with the endpoint counted as busy with it until
/// its body ends and the deadline enforced on the body.
fn finish(
    response: Response<hyper::body::Incoming>,
    outstanding: Outstanding,
    permit: Option<Permit>,
    core: Arc<PoolCore>,
    deadline: Instant,
    body_trip: BodyLimitTrip,
) -> Response<Body> {
    prepare_response(response).map(|body| {
        Body::new(GuardedBody {
            inner: body,
            outstanding: Some((outstanding, permit)),
            core,
            deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
            body_trip,
        })
    })
}

/// An answer's body while it streams: holds the endpoint's outstanding
/// count and the pool's concurrency slot, cuts the stream at the deadline,
/// and counts a broken stream against the endpoint (unless the client's
/// own request body broke it).
struct GuardedBody {
    inner: Body,
    outstanding: Option<(Outstanding, Option<Permit>)>,
    core: Arc<PoolCore>,
    deadline: Pin<Box<Sleep>>,
    body_trip: BodyLimitTrip,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.outstanding.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.outstanding = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                if let Some((outstanding, _)) = self.outstanding.take()
                    && self.body_trip.get().is_none()
                {
                    self.core
                        .record_failure(outstanding.endpoint(), Failure::Reset);
                }
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.outstanding = None;
                    return Poll::Ready(Some(Err("the request's deadline passed".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&later).expect("date"),
        );
        let got = retry_after(&headers).expect("a date");
        assert!(
            got > Duration::from_secs(27) && got <= Duration::from_secs(30),
            "{got:?}"
        );
    }

    #[test]
    fn only_idempotent_methods_are_retriable() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }

    /// The pools of a node whose pool `a` has `a_endpoints` endpoints and
    /// `extra` lines, and fails over to `b` with one endpoint.
    fn node_pools(a_endpoints: usize, extra: &str) -> HashMap<String, Arc<UpstreamPool>> {
        let endpoints: Vec<String> = (0..a_endpoints)
            .map(|i| format!("\"http://127.0.0.1:{}\"", 1 + i))
            .collect();
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:8080\"\n\
             [[pool]]\nname = \"a\"\nendpoints = [{}]\nfailover = [\"b\"]\n{extra}\n\
             [[pool]]\nname = \"b\"\nendpoints = [\"http://127.0.0.1:100\"]\n",
            endpoints.join(", ")
        );
        let config = edge_config::parse(
            &text,
            std::path::Path::new("t.toml"),
            std::path::Path::new("."),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        build_pools(&config)
    }

    /// Ejects `endpoint` of `core` by connection failures.
    fn eject(core: &PoolCore, endpoint: &Arc<Endpoint>) {
        for _ in 0..core.config.outlier.consecutive_failures {
            core.record_failure(endpoint, Failure::Reset);
        }
        assert!(endpoint.is_ejected(now_ms()), "{}", endpoint.label);
    }

    #[tokio::test]
    async fn below_the_panic_threshold_everywhere_requests_go_to_ejected_endpoints() {
        let pools = node_pools(2, "outlier = { max_ejected_share = 1.0 }");
        let a = &pools["a"];
        let b = &pools["b"];
        let (a_core, b_core) = (a.chain[0].clone(), a.chain[1].clone());
        eject(&a_core, &a_core.endpoints[0]);
        eject(&a_core, &a_core.endpoints[1]);
        // `b` is healthy: a's traffic spills there, no panic.
        let (pool, _) = a.choose(None, &[]).expect("b takes the traffic");
        assert_eq!(pool, 1);
        assert!(!a.in_panic(now_ms()));
        // With `b` down too, every pool is below 50%: all of a's endpoints,
        // by priority, rather than none.
        eject(&b_core, &b_core.endpoints[0]);
        let (pool, first) = a.choose(None, &[]).expect("panic routing");
        assert_eq!(pool, 0, "the pool's own endpoints first");
        let (_, second) = a
            .choose(None, std::slice::from_ref(&first))
            .expect("the other one");
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(a.in_panic(now_ms()));
        // `b` alone is one pool of one ejected endpoint: its own.
        assert!(b.choose(None, &[]).is_some());
    }

    #[tokio::test]
    async fn a_model_version_is_current_while_a_healthy_endpoint_names_it() {
        let pools = node_pools(2, "outlier = { max_ejected_share = 1.0 }");
        let a = &pools["a"];
        let named = |version: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                breakwater_wire::MODEL_VERSION_HEADER,
                HeaderValue::from_str(version).expect("a header value"),
            );
            headers
        };
        assert_eq!(a.serves_model_version("1"), None, "nobody named one yet");
        let (first, second) = (&a.chain[0].endpoints[0], &a.chain[0].endpoints[1]);
        first.note_model_version(&named("1"));
        second.note_model_version(&named("1"));
        assert_eq!(a.serves_model_version("1"), Some(true));
        // A rolling swap: both versions are served.
        second.note_model_version(&named("2"));
        assert_eq!(a.serves_model_version("1"), Some(true));
        assert_eq!(a.serves_model_version("2"), Some(true));
        // The failover pool's endpoint counts too.
        a.chain[1].endpoints[0].note_model_version(&named("3"));
        assert_eq!(a.serves_model_version("3"), Some(true));
        // The last host of version 1 is ejected: 1 is retired…
        eject(&a.chain[0], first);
        assert_eq!(a.serves_model_version("1"), Some(false));
        // …but an outage retires nothing.
        eject(&a.chain[0], second);
        eject(&a.chain[1], &a.chain[1].endpoints[0]);
        assert_eq!(a.serves_model_version("1"), Some(true));
    }

    #[tokio::test]
    async fn a_panic_threshold_of_zero_keeps_ejected_endpoints_out() {
        let pools = node_pools(1, "panic_threshold = 0.0");
        let a = &pools["a"];
        for core in &a.chain {
            eject(core, &core.endpoints[0]);
        }
        assert!(a.choose(None, &[]).is_none());
        assert!(!a.in_panic(now_ms()));
    }

    #[tokio::test]
    async fn an_origins_5xx_never_ejects_the_last_healthy_endpoint_and_counts_only_when_configured()
    {
        let pools = node_pools(2, "outlier = { max_ejected_share = 1.0 }");
        let a = pools["a"].chain[0].clone();
        let (first, last) = (&a.endpoints[0], &a.endpoints[1]);
        for _ in 0..3 {
            a.record_failure(first, Failure::Status);
        }
        assert!(first.is_ejected(now_ms()), "5xx counts by default");
        for _ in 0..10 {
            a.record_failure(last, Failure::Status);
        }
        assert!(last.is_healthy(now_ms()), "the last healthy endpoint stays");
        // Other failures still eject it.
        eject(&a, last);

        let pools = node_pools(2, "outlier = { count_5xx = false }");
        let a = pools["a"].chain[0].clone();
        for _ in 0..10 {
            a.record_failure(&a.endpoints[0], Failure::Status);
        }
        assert!(a.endpoints[0].is_healthy(now_ms()));
    }

    #[test]
    fn deadlines_round_trip_through_unix_milliseconds() {
        let at = Instant::now() + Duration::from_secs(5);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            DEADLINE_HEADER,
            HeaderValue::from_str(&unix_ms(at).to_string()).expect("ms"),
        );
        let back = client_deadline(&headers).expect("parsed");
        let diff = if back > at { back - at } else { at - back };
        // Off only by the time between the two clock reads in each
        // conversion and ms rounding, which a busy machine can stretch; a
        // unit or sign error would be seconds off.
        assert!(diff < Duration::from_millis(1000), "{diff:?}");
    }
}
