//! `[cluster]`: the node's link to the cluster's Redis, and what each
//! feature takes from it (shared counters for the plugin sandbox, the
//! shared cache tier for the response cache).

use std::time::Duration;

use breakwater_cluster::leases::{LeaseSettings, LeasedBuckets};
use breakwater_cluster::{Fallback, Redis, RedisSettings, SentinelSettings};
use breakwater_sandbox::SharedCounters;
use edge_config::{ClusterConfig, SharedCacheMode, UnavailableMode};

/// The node's part in a cluster.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    redis: Redis,
    config: ClusterConfig,
    /// Made once, on first use, so that a reload's new sandbox keeps the
    /// leases the node already holds.
    counters: Option<SharedCounters>,
}

/// What the response cache needs for its shared tier (L3).
#[derive(Debug, Clone)]
pub(crate) struct SharedCacheSettings {
    pub(crate) redis: Redis,
    pub(crate) mode: SharedCacheMode,
    pub(crate) max_object_bytes: u64,
    pub(crate) ttl_max: Duration,
}

impl Cluster {
    /// Opens the link (Redis need not be up yet). Needs the Tokio runtime.
    pub(crate) fn start(
        config: &ClusterConfig,
        max_counter_keys: usize,
    ) -> Result<Self, breakwater_cluster::ClusterError> {
        let tls_ca_pem = match &config.tls_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|error| {
                breakwater_cluster::ClusterError::TlsCa {
                    path: path.clone(),
                    message: error.to_string(),
                }
            })?),
            None => None,
        };
        let redis = Redis::start(RedisSettings {
            url: config.redis_url.clone().unwrap_or_default(),
            sentinel: (!config.sentinels.is_empty()).then(|| SentinelSettings {
                sentinels: config.sentinels.clone(),
                master: config.sentinel_master.clone().unwrap_or_default(),
            }),
            tls_ca_pem,
            key_prefix: config.key_prefix.clone(),
            budget: config.budget,
            background_timeout: config.background_timeout,
            health_interval: config.health_interval,
        })?;
        let counters = config.shared_counters.then(|| SharedCounters {
            leases: LeasedBuckets::new(
                redis.clone(),
                LeaseSettings {
                    window: config.lease_window,
                    idle_return: config.lease_idle_return,
                    max_keys: max_counter_keys,
                },
            ),
            counters: fallback(config.on_unavailable.counters),
            tokens: fallback(config.on_unavailable.tokens),
            closed_retry_after: config.health_interval,
        });
        Ok(Cluster {
            redis,
            config: config.clone(),
            counters,
        })
    }

    /// The sandbox's shared counters, when `shared_counters` is on.
    pub(crate) fn counters(&self) -> Option<SharedCounters> {
        self.counters.clone()
    }

    /// The response cache's shared tier, unless `cache = "off"`.
    pub(crate) fn cache(&self) -> Option<SharedCacheSettings> {
        (self.config.cache != SharedCacheMode::Off).then(|| SharedCacheSettings {
            redis: self.redis.clone(),
            mode: self.config.cache,
            max_object_bytes: self.config.l3_max_object_bytes,
            ttl_max: self.config.l3_ttl_max,
        })
    }
}

fn fallback(mode: UnavailableMode) -> Fallback {
    match mode {
        UnavailableMode::Local => Fallback::Local,
        UnavailableMode::Open => Fallback::Open,
        UnavailableMode::Closed => Fallback::Closed,
    }
}
