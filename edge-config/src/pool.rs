//! Upstream pools: endpoints with weights, region and priority, timeouts,
//! connection limits, health checks, outlier detection, retries and
//! failover to other regions' pools.
//!
//! A `[[pool]]` written the old way (`endpoints = ["http://…"]` and the
//! timeouts) means what it meant; every other key has a default.

use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::model::default_region;

/// A set of interchangeable upstream endpoints in one region.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Order among this pool and its `failover` pools, lowest first. Default:
    /// 0 for a pool in the node's region, 1 elsewhere (local region first).
    #[serde(default)]
    pub priority: Option<u32>,
    /// Base URLs such as `"http://127.0.0.1:9000"`, or tables
    /// `{ address = "http://…", weight = 2 }`.
    pub endpoints: Vec<EndpointConfig>,
    /// Pools (other regions) that take this pool's traffic while its
    /// healthy share is below `failover_below`, tried by priority then in
    /// the order listed. Not transitive: their own `failover` lists apply
    /// only to requests routed to them.
    #[serde(default)]
    pub failover: Vec<String>,
    /// Healthy share of the pool's endpoint weight (0..=1) below which its
    /// traffic spills to the `failover` pools.
    #[serde(default = "default_failover_below")]
    pub failover_below: f64,
    /// Healthy share at or above which spilled traffic comes back…
    #[serde(default = "default_failback_above")]
    pub failback_above: f64,
    /// …once it has held that long (hysteresis).
    #[serde(default = "default_failback_after", with = "humantime_serde")]
    pub failback_after: Duration,
    /// Healthy share of endpoint weight (0..=1) below which, when every
    /// `failover` pool is below its own threshold too, requests go to all
    /// of the pool's endpoints, ejected and failing ones included, rather
    /// than none (Envoy's panic routing). 0 turns panic routing off.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: f64,
    /// How the node speaks to the endpoints: `"http1"` or `"h2"` (prior knowledge).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time to establish a connection; beyond it the attempt failed (502
    /// when no retry saves it).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from the request having been sent whole (its body included:
    /// a client's slow upload is not the endpoint's) to the upstream's
    /// response head; beyond it: 504.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Time the whole exchange may take, the answer's body included, when
    /// the route sets no `deadline`.
    #[serde(default = "default_total_timeout", with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Idle connections kept per endpoint.
    #[serde(default = "default_max_idle_per_endpoint")]
    pub max_idle_per_endpoint: usize,
    /// Requests outstanding at once per endpoint (each holds a
    /// connection); a full endpoint is skipped.
    #[serde(default = "default_max_requests_per_endpoint")]
    pub max_requests_per_endpoint: usize,
    /// `"least-loaded"` (power of two choices over outstanding requests
    /// weighted by latency), `"consistent-hash"` (by `hash_header`) or
    /// `"prefix"` (by the prompt's leading `prefix_bytes`, so that requests
    /// sharing a system prompt or a conversation meet the GPU host whose
    /// KV cache holds it; no endpoint above `load_factor` × the average).
    #[serde(default)]
    pub balance: BalanceMode,
    /// Under `balance = "prefix"`: how much of the prompt (its first
    /// message's role and text, or `prompt`) picks the endpoint.
    #[serde(default = "default_prefix_bytes")]
    pub prefix_bytes: usize,
    /// Under `balance = "prefix"`: no endpoint takes more than this times
    /// the average outstanding requests (bounded-load consistent hashing);
    /// a prefix whose endpoint is full goes to the next in its order.
    #[serde(default = "default_load_factor")]
    pub load_factor: f64,
    /// Under `balance = "prefix"`: an endpoint also keeps a prefix while,
    /// with the request, it holds at most this many requests more than the
    /// least loaded endpoint, whatever `load_factor` says. A spilled
    /// request computes its whole prompt again elsewhere; where each host
    /// holds a few requests, one of imbalance costs less than that.
    #[serde(default)]
    pub load_slack: usize,
    /// Request header whose value picks the endpoint under
    /// `balance = "consistent-hash"`; requests without it are balanced by load.
    #[serde(default)]
    pub hash_header: Option<String>,
    /// Active health checks; none: endpoints are judged by their answers only.
    #[serde(default)]
    pub health: Option<HealthCheckConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// An adaptive limit on this pool's requests in flight, with a short
    /// queue; beyond them: 503 with `Retry-After`. None: no limit.
    #[serde(default)]
    pub concurrency: Option<ConcurrencyConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
}

impl PoolConfig {
    /// The pool's priority on a node in `node_region`.
    pub fn effective_priority(&self, node_region: &str) -> u32 {
        self.priority
            .unwrap_or(if self.region == node_region { 0 } else { 1 })
    }
}

/// One endpoint of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// Base URL, `http://host:port` with an optional path prefix.
    pub address: String,
    /// Relative share of the pool's traffic (1..=10000).
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointTable {
    address: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EndpointVisitor;
        impl<'de> Visitor<'de> for EndpointVisitor {
            type Value = EndpointConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an endpoint URL string or a table { address = \"http://…\", weight = N }",
                )
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(EndpointConfig {
                    address: value.to_owned(),
                    weight: default_weight(),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let table = EndpointTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(EndpointConfig {
                    address: table.address,
                    weight: table.weight,
                })
            }
        }
        deserializer.deserialize_any(EndpointVisitor)
    }
}

/// The upstream protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2,
}

/// How a pool picks an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceMode {
    #[default]
    LeastLoaded,
    ConsistentHash,
    Prefix,
}

fn default_prefix_bytes() -> usize {
    4096
}

fn default_load_factor() -> f64 {
    1.25
}

/// The most `prefix_bytes` may be: a prompt's leading part, not the body.
pub const MAX_PREFIX_BYTES: usize = 1 << 20;

/// Active health checks: `GET path` on every endpoint each `interval`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path checked, e.g. `"/health/ready"`; a 2xx answer is a pass.
    pub path: String,
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// A check without an answer by then fails; at most `interval`.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes that bring a failing endpoint back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take an endpoint out.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// Passive outlier detection from the answers of real requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive failures (5xx answers, refused or broken connections,
    /// timeouts) that eject an endpoint; 0 turns detection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection's length; each further ejection doubles it…
    #[serde(default = "default_base_ejection", with = "humantime_serde")]
    pub base_ejection: Duration,
    /// …up to this.
    #[serde(default = "default_max_ejection", with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Largest share of the pool's endpoints ejected at once (at least one
    /// endpoint may always be ejected).
    #[serde(default = "default_max_ejected_share")]
    pub max_ejected_share: f64,
    /// Whether an origin's own 5xx answers (complete responses from a live
    /// endpoint) count toward `consecutive_failures`. Even then the last
    /// healthy endpoint of a pool is never ejected for them.
    #[serde(default = "default_count_5xx")]
    pub count_5xx: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejected_share: default_max_ejected_share(),
            count_5xx: default_count_5xx(),
        }
    }
}

/// The adaptive concurrency limit (AIMD): each answer that comes back
/// within `latency_target` raises the limit by one per limit's worth of
/// answers while it is in use; a failure, a busy answer or a later one
/// lowers it by 10%. Requests over the limit wait in a queue of `queue`
/// for up to `queue_timeout`; the rest are shed with 503 + `Retry-After`
/// (or a stale cached answer).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    #[serde(default = "default_concurrency_initial")]
    pub initial: u32,
    #[serde(default = "default_concurrency_min")]
    pub min: u32,
    #[serde(default = "default_concurrency_max")]
    pub max: u32,
    /// Time to the answer's head beyond which the pool counts as overloaded.
    #[serde(default = "default_latency_target", with = "humantime_serde")]
    pub latency_target: Duration,
    /// Requests waiting for a slot, at most.
    #[serde(default = "default_concurrency_queue")]
    pub queue: u32,
    /// How long one may wait.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Priority tiers: which requests are admitted first when the limit
    /// is reached. None: one tier, first come first served.
    #[serde(default)]
    pub priority: Option<PriorityConfig>,
}

/// Priority tiers in load shedding (as the partitions of Netflix's
/// concurrency-limits, or Google's request criticality): the tier is read
/// from a request header, the queue hands free slots to the highest tier
/// first (first come first served within a tier), a full queue makes room
/// for a higher tier's request by shedding the newest waiter of the lowest
/// tier queued, and `reserved` keeps a share of the limit for the first
/// tier alone.
///
/// The header is believed as it arrives here: in front of untrusted
/// clients, a plugin in the route's chain should set it (overwriting
/// whatever the client sent), e.g. from the API key's tier.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityConfig {
    /// The request header naming the request's tier.
    #[serde(default = "default_priority_header")]
    pub header: String,
    /// Tier names, highest priority first, e.g. `["paid", "free"]`;
    /// header values match them ignoring ASCII case.
    pub tiers: Vec<String>,
    /// The tier of a request whose header is absent or names no tier.
    /// Default: the last (lowest) tier, so that an unknown value never
    /// buys priority.
    #[serde(default)]
    pub default: Option<String>,
    /// Share of the limit (0 ≤ share < 1) that only the first tier may
    /// use: the other tiers together hold at most
    /// `floor(limit × (1 − reserved))` slots. Default 0.
    #[serde(default)]
    pub reserved: f64,
}

impl PriorityConfig {
    /// Most tiers a pool may define.
    pub const MAX_TIERS: usize = 16;

    /// The index (0 = highest) of the default tier.
    pub fn default_index(&self) -> usize {
        self.default
            .as_deref()
            .and_then(|name| self.index_of(name))
            .unwrap_or(self.tiers.len().saturating_sub(1))
    }

    /// The index of the tier named `value` (ASCII case ignored, spaces
    /// around it too), if any.
    pub fn index_of(&self, value: &str) -> Option<usize> {
        let value = value.trim();
        self.tiers
            .iter()
            .position(|t| t.eq_ignore_ascii_case(value))
    }
}

/// Retries on another endpoint, within a budget.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request, the first included; 1 turns retries off.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Retries in flight may be this share of the requests in flight…
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    /// …or this many, whichever is more.
    #[serde(default = "default_min_concurrency")]
    pub min_concurrency: u32,
    /// Backoff before a retry: a random wait up to `backoff_base` doubled
    /// per retry, at most `backoff_max` (full jitter).
    #[serde(default = "default_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Request bodies up to this size are kept so that the request can be
    /// sent again; larger ones stream through and are never retried.
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            budget_ratio: default_budget_ratio(),
            min_concurrency: default_min_concurrency(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
            buffer_bytes: default_buffer_bytes(),
        }
    }
}

fn default_weight() -> u32 {
    1
}
fn default_failover_below() -> f64 {
    0.5
}
fn default_failback_above() -> f64 {
    0.75
}
fn default_failback_after() -> Duration {
    Duration::from_secs(2)
}
fn default_panic_threshold() -> f64 {
    0.5
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_total_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_max_idle_per_endpoint() -> usize {
    64
}
fn default_max_requests_per_endpoint() -> usize {
    1024
}
fn default_health_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    2
}
fn default_consecutive_failures() -> u32 {
    3
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(5)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(120)
}
fn default_max_ejected_share() -> f64 {
    0.5
}
fn default_count_5xx() -> bool {
    true
}
fn default_attempts() -> u32 {
    2
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_min_concurrency() -> u32 {
    3
}
fn default_backoff_base() -> Duration {
    Duration::from_millis(10)
}
fn default_backoff_max() -> Duration {
    Duration::from_millis(200)
}
fn default_buffer_bytes() -> u64 {
    64 * 1024
}
fn default_concurrency_initial() -> u32 {
    64
}
fn default_concurrency_min() -> u32 {
    4
}
fn default_concurrency_max() -> u32 {
    1024
}
fn default_latency_target() -> Duration {
    Duration::from_secs(2)
}
fn default_concurrency_queue() -> u32 {
    32
}
fn default_queue_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_priority_header() -> String {
    "x-breakwater-tier".to_owned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    const HEAD: &str = "[[listener]]\naddress = \"127.0.0.1:8080\"\n[[pool]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:1\"]\n";

    #[test]
    fn priority_tiers_take_defaults_and_match_ignoring_case() {
        let text = format!("{HEAD}[pool.concurrency.priority]\ntiers = [\"paid\", \"free\"]\n");
        let config = crate::parse(&text, Path::new("t.toml"), Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"));
        let limit = config.pools[0].concurrency.as_ref().expect("concurrency");
        assert_eq!(limit.initial, 64, "the limit keeps its defaults");
        let priority = limit.priority.as_ref().expect("priority");
        assert_eq!(priority.header, "x-breakwater-tier");
        assert_eq!(priority.default_index(), 1, "absent: the last tier");
        assert_eq!(priority.index_of(" PAID"), Some(0));
        assert_eq!(priority.index_of("gold"), None);
        assert_eq!(priority.reserved, 0.0);
    }

    #[test]
    fn panic_routing_and_5xx_counting_have_defaults_and_validated_values() {
        let config = crate::parse(HEAD, Path::new("t.toml"), Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"));
        let pool = &config.pools[0];
        assert_eq!(pool.panic_threshold, 0.5);
        assert!(pool.outlier.count_5xx);

        let text = format!("{HEAD}panic_threshold = 0\noutlier = {{ count_5xx = false }}\n");
        let config = crate::parse(&text, Path::new("t.toml"), Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.pools[0].panic_threshold, 0.0);
        assert!(!config.pools[0].outlier.count_5xx);

        let text = format!("{HEAD}panic_threshold = 1.5\n");
        let err =
            crate::parse(&text, Path::new("t.toml"), Path::new(".")).expect_err("a share above 1");
        let d = &err.diagnostics()[0];
        assert_eq!((d.line, d.column), (6, 19), "{d}");
        assert!(d.fix.contains("panic_threshold"), "{d}");
    }

    #[test]
    fn bad_priority_tiers_are_located_and_fixed() {
        let cases = [
            // (the priority table's lines, line and column of the error, fix says)
            ("tiers = []\n", (7, 9), "highest first"),
            ("tiers = [\"paid\", \"Paid\"]\n", (7, 18), "once"),
            (
                "tiers = [\"paid\", \"free\"]\nreserved = 1.0\n",
                (8, 12),
                "e.g. 0.2",
            ),
            (
                "header = \"x tier\"\ntiers = [\"paid\"]\n",
                (7, 10),
                "header name",
            ),
            (
                "tiers = [\"paid\", \"free\"]\ndefault = \"frea\"\n",
                (8, 11),
                "replace `frea` with `free`",
            ),
        ];
        for (table, (line, column), fix) in cases {
            let text = format!("{HEAD}[pool.concurrency.priority]\n{table}");
            let err = crate::parse(&text, Path::new("t.toml"), Path::new("."))
                .expect_err("a bad priority table");
            let d = &err.diagnostics()[0];
            assert_eq!((d.line, d.column), (line, column), "{table}: {d}");
            assert!(d.fix.contains(fix), "{table}: {d}");
        }
    }
}
