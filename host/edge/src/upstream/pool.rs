//! One configured pool (one region's endpoints): its connection pool, the
//! endpoints' state, failover state with hysteresis, and the active health
//! checks that run while the pool exists.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::body::Body;
use edge_config::{BalanceMode, PoolConfig, UpstreamProtocol};
use http::{HeaderName, HeaderValue, Request, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics::Gauge;

use super::balance::{Rng, bounded_rendezvous, power_of_two, prefix_key, rendezvous, stable_hash};
use super::endpoint::{Endpoint, Failure, now_ms};

pub(crate) type HttpClient = Client<HttpConnector, Body>;

pub(crate) struct PoolCore {
    pub(crate) name: String,
    pub(crate) config: PoolConfig,
    pub(crate) priority: u32,
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    pub(crate) client: HttpClient,
    hash_header: Option<HeaderName>,
    total_weight: f64,
    /// Traffic spills to the failover pools while set.
    spilled: AtomicBool,
    /// `breakwater_upstream_failover_active`: `spilled`, for alerts.
    failover_gauge: metrics::Gauge,
    /// [`now_ms`] since which the healthy share has been back above
    /// `failback_above`; 0: it has not.
    recovered_since: AtomicU64,
    share_gauge: Gauge,
    /// `breakwater_upstream_prefix_routed_total{pool,outcome}`, by
    /// [`PREFIX_OUTCOMES`].
    prefix_routed: [metrics::Counter; 3],
}

/// How `balance = "prefix"` placed a request: on its prefix's endpoint,
/// spilled past it (over the load bound), or by load (no prefix known).
const PREFIX_OUTCOMES: [&str; 3] = ["affine", "spilled", "no_prefix"];

fn outcome_index(outcome: &str) -> usize {
    PREFIX_OUTCOMES
        .iter()
        .position(|o| *o == outcome)
        .unwrap_or(PREFIX_OUTCOMES.len() - 1)
}

impl PoolCore {
    pub(crate) fn new(config: &PoolConfig, node_region: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_max_idle_per_host(config.max_idle_per_endpoint)
            .pool_idle_timeout(Duration::from_secs(90));
        if config.protocol == UpstreamProtocol::H2 {
            builder.http2_only(true);
        }
        let client = builder.build(connector);
        // Validated by edge-config: every endpoint is an http:// URL.
        let endpoints: Vec<Arc<Endpoint>> = config
            .endpoints
            .iter()
            .filter_map(|e| {
                let uri = e.address.parse().ok()?;
                Some(Arc::new(Endpoint::new(&config.name, uri, e.weight)))
            })
            .collect();
        let total_weight = endpoints.iter().map(|e| e.weight).sum();
        let share_gauge =
            metrics::gauge!("breakwater_upstream_healthy_share", "pool" => config.name.clone());
        share_gauge.set(1.0);
        // The threshold as a series, so an alert on "below its failover
        // threshold" follows each pool's configuration.
        metrics::gauge!("breakwater_upstream_failover_below", "pool" => config.name.clone())
            .set(config.failover_below);
        let failover_gauge =
            metrics::gauge!("breakwater_upstream_failover_active", "pool" => config.name.clone());
        failover_gauge.set(0.0);
        Self {
            name: config.name.clone(),
            priority: config.effective_priority(node_region),
            hash_header: match config.balance {
                BalanceMode::ConsistentHash => config
                    .hash_header
                    .as_deref()
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                BalanceMode::LeastLoaded | BalanceMode::Prefix => None,
            },
            config: config.clone(),
            endpoints,
            client,
            total_weight,
            spilled: AtomicBool::new(false),
            recovered_since: AtomicU64::new(0),
            share_gauge,
            failover_gauge,
            prefix_routed: PREFIX_OUTCOMES.map(|outcome| {
                metrics::counter!("breakwater_upstream_prefix_routed_total", "pool" => config.name.clone(), "outcome" => outcome)
            }),
        }
    }

    /// Healthy share of the pool's endpoint weight.
    pub(crate) fn healthy_share(&self, now: u64) -> f64 {
        if self.total_weight <= 0.0 {
            return 0.0;
        }
        let healthy: f64 = self
            .endpoints
            .iter()
            .filter(|e| e.is_healthy(now))
            .map(|e| e.weight)
            .sum();
        healthy / self.total_weight
    }

    /// Whether this pool's traffic goes to its failover pools now. Spills
    /// below `failover_below`; comes back once the share has stayed at or
    /// above `failback_above` for `failback_after`.
    pub(crate) fn is_spilled(&self, now: u64) -> bool {
        // A pool with nowhere to spill to keeps its traffic (a request that
        // finds no endpoint in it still tries the pools behind it).
        if self.config.failover.is_empty() {
            return false;
        }
        let share = self.healthy_share(now);
        let spilled = self.spilled.load(Ordering::Relaxed);
        if !spilled {
            if share < self.config.failover_below && !self.spilled.swap(true, Ordering::Relaxed) {
                self.recovered_since.store(0, Ordering::Relaxed);
                metrics::counter!("breakwater_upstream_failover_events_total", "pool" => self.name.clone(), "event" => "spill").increment(1);
                self.failover_gauge.set(1.0);
                tracing::warn!(pool = %self.name, healthy_share = share, "pool unhealthy: spilling to failover pools");
                return true;
            }
            return spilled;
        }
        if share < self.config.failback_above {
            self.recovered_since.store(0, Ordering::Relaxed);
            return true;
        }
        let since = self.recovered_since.load(Ordering::Relaxed);
        if since == 0 {
            self.recovered_since.store(now, Ordering::Relaxed);
            return true;
        }
        let hold = u64::try_from(self.config.failback_after.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(since) >= hold && self.spilled.swap(false, Ordering::Relaxed) {
            metrics::counter!("breakwater_upstream_failover_events_total", "pool" => self.name.clone(), "event" => "return").increment(1);
            self.failover_gauge.set(0.0);
            tracing::info!(pool = %self.name, healthy_share = share, "pool healthy again: taking its traffic back");
            return false;
        }
        self.spilled.load(Ordering::Relaxed)
    }

    /// The sticky key of a request, when this pool hashes: its
    /// `hash_header`, or under `balance = "prefix"` its prompt's leading
    /// bytes (from the request's JSON `body`, when the node holds it).
    pub(crate) fn hash_key(
        &self,
        headers: &http::HeaderMap,
        body: Option<&serde_json::Value>,
    ) -> Option<u64> {
        if self.config.balance == BalanceMode::Prefix {
            return prefix_key(body?, self.config.prefix_bytes);
        }
        let name = self.hash_header.as_ref()?;
        let value = headers.get(name)?;
        (!value.is_empty()).then(|| stable_hash(value.as_bytes()))
    }

    /// Whether the healthy share of this pool's endpoint weight is below
    /// `threshold` (a panic threshold; 0 is never reached).
    pub(crate) fn is_below(&self, now: u64, threshold: f64) -> bool {
        self.healthy_share(now) < threshold
    }

    /// An endpoint for the next attempt, not among `tried`; in `panic`,
    /// health is ignored (ejected and failing endpoints are candidates).
    pub(crate) fn choose(
        &self,
        rng: &Rng,
        now: u64,
        key: Option<u64>,
        tried: &[Arc<Endpoint>],
        panic: bool,
    ) -> Option<Arc<Endpoint>> {
        let max = self.config.max_requests_per_endpoint;
        let candidates: Vec<&Arc<Endpoint>> = self
            .endpoints
            .iter()
            .filter(|e| {
                let usable = if panic {
                    e.has_room(now, max)
                } else {
                    e.is_available(now, max)
                };
                usable && !tried.iter().any(|t| Arc::ptr_eq(t, e))
            })
            .collect();
        if self.config.balance == BalanceMode::Prefix {
            let (pick, outcome) = match key {
                Some(key) => match bounded_rendezvous(
                    key,
                    &candidates,
                    self.config.load_factor,
                    self.config.load_slack,
                ) {
                    Some((pick, true)) => (Some(pick), "affine"),
                    Some((pick, false)) => (Some(pick), "spilled"),
                    None => (None, "no_prefix"),
                },
                None => (power_of_two(rng, &candidates), "no_prefix"),
            };
            if pick.is_some() {
                self.prefix_routed[outcome_index(outcome)].increment(1);
            }
            return pick.cloned();
        }
        match key {
            Some(key) => rendezvous(key, &candidates),
            None => power_of_two(rng, &candidates),
        }
        .cloned()
    }

    /// The shortest busy mark among the pool's endpoints.
    pub(crate) fn shortest_busy(&self, now: u64) -> Option<Duration> {
        self.endpoints.iter().filter_map(|e| e.busy_for(now)).min()
    }

    /// Records a failed attempt on `endpoint`; ejection respects the pool's
    /// largest ejected share (at least one endpoint may always go). An
    /// origin's own 5xx answer counts only with `outlier.count_5xx`, and
    /// never ejects the pool's last healthy endpoint.
    pub(crate) fn record_failure(&self, endpoint: &Arc<Endpoint>, failure: Failure) {
        let outlier = &self.config.outlier;
        if failure == Failure::Status && !outlier.count_5xx {
            return;
        }
        if let Some(health) = &self.config.health {
            match failure {
                Failure::Connect => endpoint.mark_down("connect_refused"),
                // A broken connection may be a dead process: look now
                // rather than at the next interval.
                Failure::Reset if endpoint.claim_probe() => {
                    let client = self.client.clone();
                    let endpoint = endpoint.clone();
                    let health = health.clone();
                    tokio::spawn(async move {
                        let verdict = check(&client, &endpoint, &health.path, health.timeout).await;
                        record_verdict(&endpoint, verdict, &health);
                        endpoint.release_probe();
                    });
                }
                _ => {}
            }
        }
        endpoint.record_failure(failure, outlier, || {
            let now = now_ms();
            // An endpoint that answers is alive: ejecting the last healthy
            // one for its answers would turn an origin's errors into a
            // total outage.
            if failure == Failure::Status
                && !self
                    .endpoints
                    .iter()
                    .any(|e| !Arc::ptr_eq(e, endpoint) && e.is_healthy(now))
            {
                return false;
            }
            let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
            let cap = ((self.endpoints.len() as f64 * outlier.max_ejected_share) as usize).max(1);
            ejected < cap
        });
    }

    fn refresh_gauges(&self) {
        let now = now_ms();
        for endpoint in &self.endpoints {
            endpoint.refresh_gauge(now);
        }
        self.share_gauge.set(self.healthy_share(now));
    }
}

/// Keeps the pool's gauges current and, when configured, runs its active
/// health checks; ends when the pool is dropped.
pub(crate) fn spawn_maintenance(core: &Arc<PoolCore>) {
    let weak = Arc::downgrade(core);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(core) = weak.upgrade() else { return };
            core.refresh_gauges();
            // Evaluates failback while no request walks by.
            core.is_spilled(now_ms());
        }
    });
    if let Some(health) = core.config.health.clone() {
        let weak: Weak<PoolCore> = Arc::downgrade(core);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(health.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(core) = weak.upgrade() else { return };
                let checks = core.endpoints.iter().map(|endpoint| {
                    let core = core.clone();
                    let endpoint = endpoint.clone();
                    let health = health.clone();
                    async move {
                        let verdict =
                            check(&core.client, &endpoint, &health.path, health.timeout).await;
                        record_verdict(&endpoint, verdict, &health);
                    }
                });
                futures_util::future::join_all(checks).await;
            }
        });
    }
}

/// What one health check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    /// The connection was refused: down at once, whatever the threshold.
    Refused,
}

fn record_verdict(endpoint: &Endpoint, verdict: Verdict, health: &edge_config::HealthCheckConfig) {
    match verdict {
        Verdict::Refused => {
            endpoint.mark_down("connect_refused");
            endpoint.record_check(false, health);
        }
        Verdict::Pass => endpoint.record_check(true, health),
        Verdict::Fail => endpoint.record_check(false, health),
    }
}

/// `GET path` on `endpoint`: a 2xx within `timeout` passes.
async fn check(client: &HttpClient, endpoint: &Endpoint, path: &str, timeout: Duration) -> Verdict {
    let base = endpoint.uri.path().trim_end_matches('/');
    let mut parts = endpoint.uri.clone().into_parts();
    let Ok(path_and_query) = format!("{base}{path}").parse() else {
        return Verdict::Fail;
    };
    parts.path_and_query = Some(path_and_query);
    let Ok(uri) = http::Uri::from_parts(parts) else {
        return Verdict::Fail;
    };
    let mut request = Request::new(Body::empty());
    *request.uri_mut() = uri;
    if let Ok(host) = HeaderValue::from_str(&endpoint.label) {
        request.headers_mut().insert(header::HOST, host);
    }
    request.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("breakwater-health-check"),
    );
    match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => {
            endpoint.note_model_version(response.headers());
            Verdict::Pass
        }
        Ok(Err(e)) if e.is_connect() => Verdict::Refused,
        _ => Verdict::Fail,
    }
}
