//! Edge nodes acting as one through Redis.
//!
//! [`Redis`] is a node's link to the shared Redis: every call runs within a
//! deadline (the *budget*, 5 ms by default) so that a slow or absent Redis
//! costs a request at most that, and a link known to be down fails at once
//! without waiting. A health task pings Redis and marks the link up again
//! by itself when it answers. What a caller does when Redis cannot answer
//! is its own [`Fallback`], counted as `breakwater_cluster_fallback_total`.
//!
//! The client is the `redis` crate's tokio [`ConnectionManager`]: one
//! multiplexed connection that reconnects by itself, with scripts sent by
//! EVALSHA (loaded again after a Redis restart). `fred` does as much, with
//! pools built in; `redis` is the smaller dependency and the one most of
//! the ecosystem (deadpool, bb8, axum examples) is written for.
//!
//! Health is `ROLE`, not `PING`: a Redis that answers but is a replica (an
//! old primary back after a failover) takes no writes, so the link is down
//! until it reaches the primary again. With Sentinel, a link that is down
//! asks the sentinels where the primary is now and connects there.
//!
//! [`leases`] is the shared half of cluster-wide token buckets: a GCRA
//! bucket per key held in Redis, from which each node takes a lease of
//! tokens and spends it in memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, FromRedisValue, IntoConnectionInfo, TlsCertificates};

pub mod leases;
#[cfg(feature = "test-server")]
pub mod testing;

/// What a node does when Redis cannot answer within the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// The node's own state, as if there were no cluster: a limit holds per
    /// node rather than across the cluster.
    #[default]
    Local,
    /// Let the request through.
    Open,
    /// Refuse the request.
    Closed,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Local => "local",
            Fallback::Open => "open",
            Fallback::Closed => "closed",
        }
    }
}

/// How a node reaches the cluster's Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, `rediss://…` (TLS), or
    /// `unix:///path`. With `sentinel`, unused.
    pub url: String,
    /// Find the primary through Sentinel rather than at `url`.
    pub sentinel: Option<SentinelSettings>,
    /// PEM certificates a `rediss://` server's chain must lead to, instead
    /// of the system's roots.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// Put before every key, so that several clusters (or a cluster and
    /// other users) can share one Redis.
    pub key_prefix: String,
    /// The longest a request waits for Redis, per call.
    pub budget: Duration,
    /// The deadline for calls off the request path (cache writes, lease
    /// returns, health pings).
    pub background_timeout: Duration,
    /// How often the health task pings Redis.
    pub health_interval: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379".to_owned(),
            sentinel: None,
            tls_ca_pem: None,
            key_prefix: "bw:".to_owned(),
            budget: Duration::from_millis(5),
            background_timeout: Duration::from_millis(250),
            health_interval: Duration::from_millis(250),
        }
    }
}

/// Sentinels watching the cluster's primary.
#[derive(Debug, Clone)]
pub struct SentinelSettings {
    /// The sentinels, `redis://host:26379` (or `rediss://`).
    pub sentinels: Vec<String>,
    /// The name they know the primary by (`sentinel monitor <name> …`).
    pub master: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the Redis URL {url:?} is not valid: {message}")]
    Url { url: String, message: String },
    #[error("starting the Redis link needs a Tokio runtime")]
    NoRuntime,
    #[error("reading tls_ca_file {path}: {message}")]
    TlsCa {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Why a Redis call gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The link is known to be down; nothing was sent.
    #[error("Redis is unavailable")]
    Down,
    /// No answer within the deadline.
    #[error("Redis did not answer in time")]
    Timeout,
    /// Redis or the connection returned an error.
    #[error("Redis returned an error")]
    Failed,
}

/// A node's link to the cluster's Redis. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

/// Where the link finds its Redis.
enum Source {
    Direct,
    /// Asked again whenever the link is down.
    Sentinel(Box<tokio::sync::Mutex<SentinelClient>>),
}

struct Inner {
    /// None until the primary is known (Sentinel) .
    connection: ArcSwapOption<ConnectionManager>,
    source: Source,
    settings: RedisSettings,
    up: AtomicBool,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("settings", &self.inner.settings)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Opens the link (connecting lazily) and starts its health task on the
    /// current Tokio runtime. Redis need not be there yet: the link starts
    /// down and comes up when the first ping is answered.
    pub fn start(settings: RedisSettings) -> Result<Redis, ClusterError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ClusterError::NoRuntime)?;
        // rustls needs a process-wide provider for the client's config;
        // the one this build has. Installed already is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certificates = || TlsCertificates {
            client_tls: None,
            root_cert: settings.tls_ca_pem.clone(),
        };
        let (source, connection) = match &settings.sentinel {
            None => {
                let url_error = |e: redis::RedisError| ClusterError::Url {
                    url: redact(&settings.url),
                    message: e.to_string(),
                };
                let client = match &settings.tls_ca_pem {
                    None => Client::open(settings.url.as_str()),
                    Some(_) => Client::build_with_tls(settings.url.as_str(), certificates()),
                }
                .map_err(url_error)?;
                let manager =
                    ConnectionManager::new_lazy_with_config(client, manager_config(&settings))
                        .map_err(url_error)?;
                (Source::Direct, Some(Arc::new(manager)))
            }
            Some(sentinel) => {
                let url_error = |e: redis::RedisError| ClusterError::Url {
                    url: sentinel
                        .sentinels
                        .iter()
                        .map(|s| redact(s))
                        .collect::<Vec<_>>()
                        .join(", "),
                    message: e.to_string(),
                };
                let mut addresses = Vec::with_capacity(sentinel.sentinels.len());
                for url in &sentinel.sentinels {
                    addresses.push(url.as_str().into_connection_info().map_err(url_error)?);
                }
                let client = SentinelClient::build(
                    addresses,
                    sentinel.master.clone(),
                    Some(SentinelNodeConnectionInfo::default()),
                    SentinelServerType::Master,
                )
                .map_err(url_error)?;
                (
                    Source::Sentinel(Box::new(tokio::sync::Mutex::new(client))),
                    None,
                )
            }
        };
        let redis = Redis {
            inner: Arc::new(Inner {
                connection: ArcSwapOption::new(connection),
                source,
                settings,
                up: AtomicBool::new(false),
                runtime,
            }),
        };
        metrics::gauge!("breakwater_cluster_redis_up").set(0.0);
        redis
            .inner
            .runtime
            .spawn(health(Arc::downgrade(&redis.inner)));
        Ok(redis)
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.inner.settings
    }

    /// The runtime the link's calls run on; callers on blocking threads
    /// spawn their calls there.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.inner.runtime
    }

    /// Whether the last call or ping was answered.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// `key_prefix` then `parts`, as one binary-safe key.
    pub fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let prefix = self.inner.settings.key_prefix.as_bytes();
        let mut key =
            Vec::with_capacity(prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        key.extend_from_slice(prefix);
        for part in parts {
            key.extend_from_slice(part);
        }
        key
    }

    /// Runs one command within the request budget.
    pub async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        command: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        self.query_within(op, self.inner.settings.budget, command)
            .await
    }

    /// Runs one command within `deadline`. Fails at once when the link is
    /// down; a failure or a timeout marks it down until the next ping.
    pub async fn query_within<T: FromRedisValue>(
        &self,
        op: &'static str,
        deadline: Duration,
        command: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        let mut connection = self.connection()?;
        let answer = tokio::time::timeout(deadline, command.query_async(&mut connection)).await;
        self.settle(op, answer)
    }

    /// Runs a script (EVALSHA, loading it after a Redis restart) within
    /// `deadline`, as [`Redis::query_within`].
    pub async fn invoke<T: FromRedisValue>(
        &self,
        op: &'static str,
        deadline: Duration,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let mut connection = self.connection()?;
        let answer = tokio::time::timeout(deadline, script.invoke_async(&mut connection)).await;
        self.settle(op, answer)
    }

    fn connection(&self) -> Result<ConnectionManager, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable::Down);
        }
        self.inner
            .connection
            .load()
            .as_deref()
            .cloned()
            .ok_or(Unavailable::Down)
    }

    fn settle<T>(
        &self,
        op: &'static str,
        answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, Unavailable> {
        let failure = match answer {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => {
                tracing::debug!(op, %error, "Redis call failed");
                Unavailable::Failed
            }
            Err(_) => Unavailable::Timeout,
        };
        metrics::counter!("breakwater_cluster_redis_errors_total", "op" => op).increment(1);
        self.inner.mark(false, op);
        Err(failure)
    }

    /// A caller waited its budget for a call still in flight: counted as
    /// an error of `op`, and the link is down until the next ping, so that
    /// the requests behind it fall back at once rather than wait too.
    pub fn report_timeout(&self, op: &'static str) {
        metrics::counter!("breakwater_cluster_redis_errors_total", "op" => op).increment(1);
        self.inner.mark(false, op);
    }

    /// Counts a request served by `feature`'s fallback.
    pub fn count_fallback(feature: &'static str) {
        metrics::counter!("breakwater_cluster_fallback_total", "feature" => feature).increment(1);
    }
}

impl Inner {
    fn mark(&self, up: bool, why: &str) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!("breakwater_cluster_redis_up").set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!(url = %redact(&self.settings.url), "Redis is reachable: shared limits and the shared cache tier are on");
            } else {
                tracing::warn!(url = %redact(&self.settings.url), op = why, "Redis is unavailable: limits fall back as configured, the shared cache tier is skipped");
            }
        }
    }
}

/// A health check slower than this (or than the budget, if longer) leaves
/// the link down: a Redis that slow would make every lease wait out the
/// budget. It is well above the budget so that a busy machine does not
/// flap the link.
const HEALTHY_PING: Duration = Duration::from_millis(50);

fn manager_config(settings: &RedisSettings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.background_timeout))
        .set_response_timeout(Some(settings.background_timeout))
        // Reconnection is the health task's job, paced by its interval;
        // the manager's own retries would hold calls in the meantime.
        .set_number_of_retries(1)
        .set_max_delay(settings.health_interval)
}

/// Checks the link every `health_interval`: up when Redis answers `ROLE`
/// as a primary within [`HEALTHY_PING`], down otherwise; while down with
/// Sentinel, the primary is looked up again. Ends with the link.
async fn health(inner: std::sync::Weak<Inner>) {
    let mut ticks = {
        let Some(inner) = inner.upgrade() else { return };
        tokio::time::interval(inner.settings.health_interval)
    };
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let deadline = HEALTHY_PING.max(inner.settings.budget);
        let mut answered = match inner.connection.load_full() {
            Some(connection) => is_primary(&connection, deadline).await,
            None => false,
        };
        if !answered && let Source::Sentinel(sentinel) = &inner.source {
            answered = find_primary(&inner, sentinel, deadline).await;
        }
        if !answered && inner.up.load(Ordering::Relaxed) {
            metrics::counter!("breakwater_cluster_redis_errors_total", "op" => "ping").increment(1);
        }
        inner.mark(answered, "ping");
    }
}

/// Whether the Redis behind `connection` answers, as a primary, in time.
async fn is_primary(connection: &ConnectionManager, deadline: Duration) -> bool {
    let mut connection = connection.clone();
    let role = tokio::time::timeout(
        deadline,
        redis::cmd("ROLE").query_async::<Vec<redis::Value>>(&mut connection),
    )
    .await;
    match role {
        Ok(Ok(role)) => {
            matches!(
                role.first(),
                Some(redis::Value::BulkString(kind)) if kind == b"master"
            ) || matches!(
                role.first(),
                Some(redis::Value::SimpleString(kind)) if kind == "master"
            )
        }
        _ => false,
    }
}

/// Asks the sentinels where the primary is; connects there when it moved.
/// Whether the primary answers.
async fn find_primary(
    inner: &Inner,
    sentinel: &tokio::sync::Mutex<SentinelClient>,
    deadline: Duration,
) -> bool {
    let lookup = async {
        let mut sentinel = sentinel.lock().await;
        sentinel.async_get_client().await
    };
    let client = match tokio::time::timeout(inner.settings.background_timeout, lookup).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            tracing::debug!(%error, "no primary from the sentinels");
            return false;
        }
        Err(_) => return false,
    };
    let address = client.get_connection_info().addr().to_string();
    let Ok(manager) =
        ConnectionManager::new_lazy_with_config(client, manager_config(&inner.settings))
    else {
        return false;
    };
    if !is_primary(&manager, deadline).await {
        return false;
    }
    tracing::info!(primary = %address, "the sentinels name a primary; connected");
    inner.connection.store(Some(Arc::new(manager)));
    true
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact("redis://app:s3cret@cache:6379/0"),
            "redis://app:***@cache:6379/0"
        );
        assert_eq!(redact("redis://cache:6379"), "redis://cache:6379");
    }
}
