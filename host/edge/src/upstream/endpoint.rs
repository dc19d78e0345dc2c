//! One upstream endpoint's state: requests outstanding, a peak-EWMA of its
//! latency, passive outlier ejection, active health-check verdicts and busy
//! marks from `503` + `Retry-After`.
//!
//! The flags read on every pick (ejected, down, busy) are atomics so that
//! a pick never waits on a lock; the latency estimate and the failure count
//! sit behind a short mutex.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use breakwater_wire::MODEL_VERSION_HEADER;
use edge_config::{HealthCheckConfig, OutlierConfig};
use http::{HeaderMap, Uri};
use metrics::Gauge;

/// Milliseconds on a process-wide monotonic clock, never 0 (0 means "none").
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// Latency assumed for an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast the latency estimate forgets (Linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Why an attempt failed, for outlier detection and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Connection refused or not established in time: nothing was sent.
    Connect,
    /// The connection broke before or during the answer.
    Reset,
    /// No response head within the first-byte timeout.
    Timeout,
    /// A 5xx answer (other than a busy 503).
    Status,
}

impl Failure {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Status => "5xx",
        }
    }
}

struct Latency {
    /// Seconds.
    ewma: f64,
    at: Instant,
}

pub(crate) struct Endpoint {
    pub(crate) uri: Uri,
    /// `host:port`, the metrics label.
    pub(crate) label: String,
    pub(crate) weight: f64,
    pool: String,
    outstanding: AtomicUsize,
    /// [`now_ms`] until which the endpoint is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    /// [`now_ms`] until which the endpoint said it is busy; 0: not busy.
    busy_until: AtomicU64,
    /// Failing its active health checks (or refusing connections).
    down: AtomicBool,
    /// An out-of-band health probe is in flight.
    probing: AtomicBool,
    consecutive_failures: AtomicU32,
    check_passes: AtomicU32,
    check_failures: AtomicU32,
    /// Ejections so far, for the growing ejection time; reset after a
    /// long enough quiet spell.
    ejections: AtomicU32,
    last_ejected: AtomicU64,
    latency: Mutex<Latency>,
    outstanding_gauge: Gauge,
    healthy_gauge: Gauge,
    /// The model version the endpoint last named (`X-Model-Version` on an
    /// answer or a readiness check); none until it names one.
    model_version: ArcSwapOption<String>,
}

impl Endpoint {
    pub(crate) fn new(pool: &str, uri: Uri, weight: u32) -> Self {
        let label = uri
            .authority()
            .map_or_else(|| uri.to_string(), |a| a.as_str().to_owned());
        let labels = [("pool", pool.to_owned()), ("endpoint", label.clone())];
        let healthy_gauge = metrics::gauge!("breakwater_upstream_endpoint_healthy", &labels);
        healthy_gauge.set(1.0);
        Self {
            outstanding_gauge: metrics::gauge!("breakwater_upstream_outstanding_requests", &labels),
            healthy_gauge,
            uri,
            label,
            weight: f64::from(weight.max(1)),
            pool: pool.to_owned(),
            outstanding: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
            busy_until: AtomicU64::new(0),
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            check_passes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            last_ejected: AtomicU64::new(0),
            latency: Mutex::new(Latency {
                ewma: DEFAULT_RTT.as_secs_f64(),
                at: Instant::now(),
            }),
            model_version: ArcSwapOption::empty(),
        }
    }

    /// Records the model version `headers` name, if any: the endpoint
    /// serves it from now on.
    pub(crate) fn note_model_version(&self, headers: &HeaderMap) {
        let Some(version) = headers
            .get(MODEL_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if self
            .model_version
            .load()
            .as_deref()
            .is_some_and(|known| known == version)
        {
            return;
        }
        let before = self.model_version.swap(Some(Arc::new(version.to_owned())));
        tracing::info!(pool = %self.pool, endpoint = %self.label, version, before = before.as_deref().map(String::as_str), "endpoint serves a model version");
        metrics::counter!("breakwater_upstream_model_version_changes_total", "pool" => self.pool.clone(), "endpoint" => self.label.clone()).increment(1);
    }

    /// The model version the endpoint last named.
    pub(crate) fn model_version(&self) -> Option<Arc<String>> {
        self.model_version.load_full()
    }

    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Neither ejected nor failing its health checks.
    pub(crate) fn is_healthy(&self, now: u64) -> bool {
        !self.is_ejected(now) && !self.down.load(Ordering::Relaxed)
    }

    /// Time left on a busy mark.
    pub(crate) fn busy_for(&self, now: u64) -> Option<Duration> {
        let until = self.busy_until.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Healthy, not busy, and below its limit of outstanding requests.
    pub(crate) fn is_available(&self, now: u64, max_outstanding: usize) -> bool {
        self.is_healthy(now) && self.has_room(now, max_outstanding)
    }

    /// Not busy and below its limit of outstanding requests, healthy or
    /// not (panic routing).
    pub(crate) fn has_room(&self, now: u64, max_outstanding: usize) -> bool {
        self.busy_for(now).is_none() && self.outstanding.load(Ordering::Relaxed) < max_outstanding
    }

    /// The load a new request would see: the latency estimate times the
    /// requests it would queue behind, per unit of weight (Linkerd's
    /// peak-EWMA load).
    pub(crate) fn cost(&self) -> f64 {
        // An estimate nobody refreshed fades toward zero, so that an endpoint
        // left idle is tried again now and then rather than never.
        let ewma = self.latency.lock().map_or(DEFAULT_RTT.as_secs_f64(), |l| {
            decayed(l.ewma, l.at.elapsed(), 0.0)
        });
        let outstanding = self.outstanding.load(Ordering::Relaxed) as f64;
        ewma * (outstanding + 1.0) / self.weight
    }

    /// Requests outstanding now.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a request as outstanding until the guard drops (with the
    /// answer's body, so a long stream is load).
    pub(crate) fn start(self: &Arc<Self>) -> Outstanding {
        let n = self.outstanding.fetch_add(1, Ordering::Relaxed) + 1;
        self.outstanding_gauge.set(n as f64);
        Outstanding(self.clone())
    }

    /// An answer came back (its head), `latency` after the request went out.
    pub(crate) fn record_success(&self, latency: Duration) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if let Ok(mut l) = self.latency.lock() {
            let rtt = latency.as_secs_f64();
            let now = Instant::now();
            // Peak-EWMA: a slower answer is believed at once, a faster one
            // pulls the estimate down gradually.
            l.ewma = if rtt > l.ewma {
                rtt
            } else {
                decayed(l.ewma, now.duration_since(l.at), rtt)
            };
            l.at = now;
        }
    }

    /// An attempt failed. Returns whether this failure ejected the endpoint;
    /// `may_eject` says whether the pool's ejection share allows another.
    pub(crate) fn record_failure(
        &self,
        failure: Failure,
        outlier: &OutlierConfig,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        if failure == Failure::Timeout
            && let Ok(mut l) = self.latency.lock()
        {
            // A timed-out endpoint is at least as slow as the timeout.
            l.ewma = l.ewma.max(1.0);
            l.at = Instant::now();
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if outlier.consecutive_failures == 0 || failures < outlier.consecutive_failures {
            return false;
        }
        let now = now_ms();
        if self.is_ejected(now) || !may_eject() {
            return false;
        }
        // Ejection time doubles with each repeat; a spell of twice the
        // longest ejection without one starts the count over.
        let quiet = u64::try_from(outlier.max_ejection.as_millis() * 2).unwrap_or(u64::MAX);
        let last = self.last_ejected.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) > quiet {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let repeats = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let length = outlier
            .base_ejection
            .saturating_mul(1u32 << repeats)
            .min(outlier.max_ejection);
        let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2);
        self.ejected_until.store(now + length_ms, Ordering::Relaxed);
        self.last_ejected.store(now, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.healthy_gauge.set(0.0);
        metrics::counter!(
            "breakwater_upstream_ejections_total",
            "pool" => self.pool.clone(),
            "endpoint" => self.label.clone(),
            "reason" => failure.label()
        )
        .increment(1);
        tracing::warn!(
            pool = %self.pool,
            endpoint = %self.label,
            reason = failure.label(),
            ejected_for = ?length,
            "upstream endpoint ejected"
        );
        true
    }

    /// The endpoint answered `503` with `Retry-After`: busy, not dead.
    pub(crate) fn mark_busy(&self, for_: Duration) {
        let ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX / 2);
        self.busy_until.store(now_ms() + ms, Ordering::Relaxed);
        metrics::counter!(
            "breakwater_upstream_busy_total",
            "pool" => self.pool.clone(),
            "endpoint" => self.label.clone()
        )
        .increment(1);
    }

    /// A refused connection is a fact, not a statistic: with active health
    /// checks the endpoint is down at once and the checks bring it back.
    pub(crate) fn mark_down(&self, reason: &'static str) {
        if !self.down.swap(true, Ordering::Relaxed) {
            self.check_passes.store(0, Ordering::Relaxed);
            self.healthy_gauge.set(0.0);
            metrics::counter!(
                "breakwater_upstream_ejections_total",
                "pool" => self.pool.clone(),
                "endpoint" => self.label.clone(),
                "reason" => reason
            )
            .increment(1);
            tracing::warn!(pool = %self.pool, endpoint = %self.label, reason, "upstream endpoint down");
        }
    }

    /// One active health check's verdict.
    pub(crate) fn record_check(&self, passed: bool, health: &HealthCheckConfig) {
        if passed {
            self.check_failures.store(0, Ordering::Relaxed);
            let passes = self.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
            if passes >= health.healthy_threshold && self.down.swap(false, Ordering::Relaxed) {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                tracing::info!(pool = %self.pool, endpoint = %self.label, "upstream endpoint healthy again");
                self.refresh_gauge(now_ms());
            }
        } else {
            self.check_passes.store(0, Ordering::Relaxed);
            let failures = self.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures >= health.unhealthy_threshold {
                self.mark_down("health_check");
            }
        }
    }

    /// Claims the one out-of-band health probe this endpoint may have in
    /// flight; false while one runs.
    pub(crate) fn claim_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Brings the health gauge up to date (ejections end by the clock).
    pub(crate) fn refresh_gauge(&self, now: u64) {
        self.healthy_gauge
            .set(if self.is_healthy(now) { 1.0 } else { 0.0 });
    }
}

/// `old` decayed toward `new` over `elapsed`.
fn decayed(old: f64, elapsed: Duration, new: f64) -> f64 {
    let w = (-elapsed.as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp();
    old * w + new * (1.0 - w)
}

/// One outstanding request on an endpoint.
pub(crate) struct Outstanding(Arc<Endpoint>);

impl Outstanding {
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let n = self.0.outstanding.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.outstanding_gauge.set(n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            "t",
            "http://127.0.0.1:1".parse().expect("uri"),
            1,
        ))
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_time() {
        let e = endpoint();
        let outlier = OutlierConfig {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
            max_ejected_share: 1.0,
            count_5xx: true,
        };
        assert!(!e.record_failure(Failure::Status, &outlier, || true));
        assert!(e.record_failure(Failure::Status, &outlier, || true));
        let now = now_ms();
        let first = e.ejected_until.load(Ordering::Relaxed) - now;
        assert!((900..=1000).contains(&first), "{first}");
        // Pretend the ejection ended; the second one doubles.
        e.ejected_until.store(0, Ordering::Relaxed);
        e.record_failure(Failure::Status, &outlier, || true);
        assert!(e.record_failure(Failure::Status, &outlier, || true));
        let second = e.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!((1900..=2000).contains(&second), "{second}");
        e.ejected_until.store(0, Ordering::Relaxed);
        e.record_failure(Failure::Status, &outlier, || true);
        e.record_failure(Failure::Status, &outlier, || true);
        let third = e.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!(third <= 3000, "capped at max_ejection: {third}");
    }

    #[test]
    fn a_success_resets_the_count_and_the_share_can_forbid_ejection() {
        let e = endpoint();
        let outlier = OutlierConfig {
            consecutive_failures: 2,
            ..OutlierConfig::default()
        };
        e.record_failure(Failure::Connect, &outlier, || true);
        e.record_success(Duration::from_millis(5));
        assert!(!e.record_failure(Failure::Connect, &outlier, || true));
        assert!(!e.record_failure(Failure::Connect, &outlier, || false));
        assert!(e.is_healthy(now_ms()));
    }

    #[test]
    fn busy_is_available_later_but_healthy_now() {
        let e = endpoint();
        e.mark_busy(Duration::from_secs(2));
        let now = now_ms();
        assert!(e.is_healthy(now));
        assert!(!e.is_available(now, 10));
        assert!(e.is_available(now + 2001, 10));
    }

    #[test]
    fn cost_grows_with_outstanding_requests_and_latency() {
        let a = endpoint();
        let b = endpoint();
        let _held = a.start();
        assert!(a.cost() > b.cost());
        b.record_success(Duration::from_millis(500));
        assert!(b.cost() > a.cost(), "a 500 ms answer outweighs one request");
    }
}
