//! The configuration types, as written in TOML.
//!
//! Every table rejects unknown keys so that a typo is an error naming the
//! nearest valid key, never a silently ignored setting.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// A whole edge node: what it listens on, what it serves, where it proxies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    #[serde(default)]
    pub node: NodeConfig,
    /// Data-plane listeners (`[[listener]]`).
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// The admin listener: health, readiness, metrics.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Static sites served from the node's disk (`[[site]]`).
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteConfig>,
    /// Path prefixes proxied to upstream pools (`[[route]]`).
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Upstream pools (`[[pool]]`).
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// WebAssembly plugins (`[[plugin]]`), run by the sites and routes that
    /// list them.
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
}

/// Identity of this node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default = "default_node_name")]
    pub name: String,
    #[serde(default = "default_region")]
    pub region: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: default_node_name(),
            region: default_region(),
        }
    }
}

/// One data-plane socket. Plain listeners speak HTTP/1.1 and h2c (prior
/// knowledge); TLS listeners negotiate h2 or HTTP/1.1 by ALPN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port`; port 0 picks a free port.
    pub address: String,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// PEM files for a TLS listener; relative paths are relative to the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: String,
    /// Bearer token required by mutating admin endpoints.
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable holding the token (preferred over `token`).
    #[serde(default)]
    pub token_env: Option<String>,
}

/// Request limits: each one answered with its own status (431, 413, 408).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Request line plus headers, in bytes; beyond it: 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Request body, in bytes; beyond it: 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Time a client has to send the whole request head; beyond it the
    /// connection is closed (slowloris).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the whole request body; beyond it: 408.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// How long in-flight requests may run after SIGTERM.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

/// A directory served as static assets under a path prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Directory served; relative paths are relative to the config file.
    pub root: PathBuf,
    #[serde(default = "default_index")]
    pub index: String,
    /// `Cache-Control` by glob over the path inside the site; first match wins.
    #[serde(default)]
    pub cache_control: Vec<CacheControlRule>,
    /// Files up to this size are kept in memory once read.
    #[serde(default = "default_hot_file_max_bytes")]
    pub hot_file_max_bytes: u64,
    /// Memory budget for those files.
    #[serde(default = "default_hot_cache_bytes")]
    pub hot_cache_bytes: u64,
    /// Plugin chain, by `[[plugin]]` name, run in order on each request.
    #[serde(default)]
    pub plugins: Vec<String>,
}

/// `Cache-Control` for paths matching a glob such as `*.css` or `assets/**`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheControlRule {
    pub pattern: String,
    pub value: String,
}

/// Requests whose path starts with `prefix` go to `pool`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: String,
    pub pool: String,
    /// Plugin chain, by `[[plugin]]` name, run in order on each request.
    #[serde(default)]
    pub plugins: Vec<String>,
}

/// A WebAssembly plugin: its artifact, pin, capabilities and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique on the node: the metrics label and the kv namespace.
    pub name: String,
    /// The component file; relative paths start at the config file's directory.
    pub path: PathBuf,
    /// The artifact's sha256 in hex; any other content refuses to load.
    pub sha256: String,
    /// Host capabilities the plugin may import: `log`, `clock`, `kv`,
    /// `counters`, `metrics`.
    #[serde(default)]
    pub grants: Vec<String>,
    /// What a request gets when the plugin traps or overruns its limits.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// The plugin's own configuration, handed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// CPU time per call; default 2 ms.
    #[serde(default, with = "humantime_serde::option")]
    pub cpu_deadline: Option<Duration>,
    /// Linear memory cap; default 16 MiB.
    #[serde(default)]
    pub memory_bytes: Option<usize>,
}

impl PluginConfig {
    /// [`PluginConfig::config`] as the JSON document the plugin's `init` reads.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// What a request gets when its plugin fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Skip the plugin, as if it had said "continue".
    Open,
    /// Answer 500 with a JSON error.
    #[default]
    Closed,
}

/// A set of interchangeable upstream endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Base URLs such as `http://127.0.0.1:9000`.
    pub endpoints: Vec<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending the request to the upstream's response head; beyond it: 504.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Idle connections kept per endpoint.
    #[serde(default = "default_max_idle_per_endpoint")]
    pub max_idle_per_endpoint: usize,
}

fn default_node_name() -> String {
    "edge".to_owned()
}
fn default_region() -> String {
    "local".to_owned()
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_prefix() -> String {
    "/".to_owned()
}
fn default_index() -> String {
    "index.html".to_owned()
}
fn default_hot_file_max_bytes() -> u64 {
    64 * 1024
}
fn default_hot_cache_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_idle_per_endpoint() -> usize {
    64
}
