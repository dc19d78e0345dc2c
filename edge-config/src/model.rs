//! The configuration types, as written in TOML.
//!
//! Every table rejects unknown keys so that a typo is an error naming the
//! nearest valid key, never a silently ignored setting.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::pool::*;

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
    /// The response cache used by routes with `cache = true`.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Token accounting per API key on routes with `count_tokens = true`.
    #[serde(default)]
    pub usage: UsageConfig,
    /// Where plugins given by `url` are fetched from and cached.
    #[serde(default)]
    pub plugin_store: PluginStoreConfig,
    /// Nodes acting as one through Redis: shared limits and token budgets,
    /// and a shared cache tier. None: everything is per node.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// OpenTelemetry traces. Off unless an endpoint is given here or in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
    #[serde(default)]
    pub tracing: TracingConfig,
}

/// Identity of this node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default = "default_node_name")]
    pub name: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Peers whose forwarding headers (`Forwarded`, `X-Forwarded-*`,
    /// `X-Real-IP`, `X-Original-URL`, …) are believed and appended to: CIDR
    /// networks or single addresses. From any other peer those headers are
    /// removed before anything reads them.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: default_node_name(),
            region: default_region(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// `trusted_proxies` as networks (validated when the file was parsed).
    pub fn trusted_proxy_networks(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|entry| parse_network(entry).ok())
            .collect()
    }
}

/// A `trusted_proxies` entry: `10.0.0.0/8`, `2001:db8::/32`, or one address
/// (`192.0.2.7`, a /32 or /128). Host bits after the prefix are ignored, as
/// the network is what is meant.
pub fn parse_network(entry: &str) -> Result<ipnet::IpNet, ipnet::AddrParseError> {
    match entry.parse::<ipnet::IpNet>() {
        Ok(network) => Ok(network.trunc()),
        Err(not_a_network) => entry
            .parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| not_a_network),
    }
}

/// One data-plane socket. Plain listeners speak HTTP/1.1 and h2c (prior
/// knowledge); TLS listeners negotiate h2 or HTTP/1.1 by ALPN.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port`; port 0 picks a free port.
    pub address: String,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// PEM files for a TLS listener; relative paths are relative to the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Request line plus headers, in bytes; beyond it: 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Request body, in bytes; beyond it: 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Time a client has to send the whole request head (a new
    /// connection's first one from accept, a later one from its first
    /// byte); beyond it the connection is closed (slowloris).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the whole request body; beyond it: 408.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// How long in-flight requests may run after SIGTERM.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Plugin phases (one request's on-request or on-response chain) that
    /// may run at once; each occupies a blocking thread while it runs.
    /// Default: one per CPU. The CPU deadline is counted by the wall clock
    /// (epoch interruption), so more phases than cores would share a core
    /// and trip each other's deadlines under load.
    #[serde(default = "default_plugin_concurrency")]
    pub plugin_concurrency: usize,
    /// How long a request waits for a plugin slot; beyond it: 503 with
    /// `Retry-After`. Zero sheds at once when every slot is busy.
    #[serde(default = "default_plugin_queue_timeout", with = "humantime_serde")]
    pub plugin_queue_timeout: Duration,
    /// Bytes of request bodies the node holds at once for plugins to read
    /// (routes with `plugin_body_bytes`). A body that would go over it
    /// streams past the plugins as one too large, so a crowd of slow
    /// bodies cannot take the node's memory.
    #[serde(default = "default_plugin_body_budget")]
    pub plugin_body_budget: u64,
    /// Time a connection may stay open with no request in flight (HTTP/1.1
    /// keep-alive and h2 alike); then it is closed, h2 with a GOAWAY.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections each listener holds at once; beyond it a new connection
    /// is closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one client IP address holds at once on each listener;
    /// beyond it a new one from that address is closed at accept.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Request methods the node serves; any other (and always `CONNECT`,
    /// which the node does not tunnel) gets 405 with `Allow`.
    #[serde(default = "default_allowed_methods")]
    pub allowed_methods: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            shutdown_grace: default_shutdown_grace(),
            plugin_concurrency: default_plugin_concurrency(),
            plugin_queue_timeout: default_plugin_queue_timeout(),
            plugin_body_budget: default_plugin_body_budget(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            allowed_methods: default_allowed_methods(),
        }
    }
}

/// A directory served as static assets under a path prefix.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheControlRule {
    pub pattern: String,
    pub value: String,
}

/// Requests whose path starts with `prefix` go to `pool`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: String,
    pub pool: String,
    /// Plugin chain, by `[[plugin]]` name, run in order on each request.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Time the whole exchange may take, from the request's arrival to the
    /// end of the answer's body; the time left is passed upstream in
    /// `X-Request-Deadline` (Unix time in milliseconds). None: the pool's
    /// `total_timeout`.
    #[serde(default, with = "humantime_serde::option")]
    pub deadline: Option<Duration>,
    /// Whether answers on this route go through the response cache.
    #[serde(default)]
    pub cache: bool,
    /// How long a stale answer may be served while one refresh runs behind
    /// it, when the upstream's `Cache-Control` does not say.
    #[serde(default, with = "humantime_serde::option")]
    pub stale_while_revalidate: Option<Duration>,
    /// How long a stale answer may stand in for an upstream error, when the
    /// upstream's `Cache-Control` does not say.
    #[serde(default, with = "humantime_serde::option")]
    pub stale_if_error: Option<Duration>,
    /// How much of a request body this route buffers for its plugins'
    /// `on-request`, in bytes: `true` for [`DEFAULT_PLUGIN_BODY_BYTES`], or
    /// a byte count. A larger body streams past the plugins, who are told
    /// it was too large. Absent (or 0): plugins never see bodies.
    #[serde(default, deserialize_with = "plugin_body_bytes")]
    pub plugin_body_bytes: u64,
    /// Whether the LLM tokens of this route's answers are counted per API
    /// key and tier (`[usage]`).
    #[serde(default)]
    pub count_tokens: bool,
    /// Whether a streamed completion whose upstream breaks mid-answer
    /// (reset, end before `[DONE]`, or a stall) continues on another
    /// endpoint of the pool, which must be Breakwater GPU hosts: the edge
    /// asks them for token ids and sends the tokens the client already has
    /// with the continuation, and the client sees one unbroken stream. On
    /// such a route a completion is also retried before its answer's head
    /// came, POST or not: its generation has no side effect.
    #[serde(default)]
    pub resume: bool,
    /// On a `resume` route: how long a stream may go without an event once
    /// its first token came before its upstream counts as stalled and the
    /// answer moves to another endpoint.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(2)
}

/// Token accounting: `breakwater_tokens_total{tier,kind}` and per-key
/// totals on the admin listener (`GET /admin/usage`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// The request header naming the request's tier, as a plugin left it
    /// (the rate-limit plugin's `tier_header`); none: every key's tier is
    /// `all`.
    #[serde(default)]
    pub tier_header: Option<String>,
    /// How many keys' totals are kept; beyond it the least recently used
    /// are forgotten.
    #[serde(default = "default_usage_max_keys")]
    pub max_keys: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            tier_header: None,
            max_keys: default_usage_max_keys(),
        }
    }
}

fn default_usage_max_keys() -> u64 {
    100_000
}

/// `plugin_body_bytes = true`: enough for chat completions with long
/// system prompts, small next to a plugin's memory.
pub const DEFAULT_PLUGIN_BODY_BYTES: u64 = 64 * 1024;

/// The most a route may buffer for plugins: each plugin on the route gets
/// its own copy in its memory.
pub const MAX_PLUGIN_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// `true`, `false` or a byte count.
fn plugin_body_bytes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Bytes;
    impl serde::de::Visitor<'_> for Bytes {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("true, false, or a byte count such as 65536")
        }
        fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<u64, E> {
            Ok(if on { DEFAULT_PLUGIN_BODY_BYTES } else { 0 })
        }
        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<u64, E> {
            Ok(bytes)
        }
        fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<u64, E> {
            u64::try_from(bytes).map_err(|_| E::custom("a byte count cannot be negative"))
        }
    }
    deserializer.deserialize_any(Bytes)
}

/// The response cache: a memory tier and an optional disk tier, each with
/// a byte budget and a ceiling on how long it keeps an entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory tier budget: stored bodies and headers, in bytes.
    #[serde(default = "default_cache_memory_bytes")]
    pub memory_bytes: u64,
    /// Longest time the memory tier keeps an entry, fresh or not.
    #[serde(default = "default_cache_memory_ttl_max", with = "humantime_serde")]
    pub memory_ttl_max: Duration,
    /// Directory of the disk tier; none keeps the cache in memory only.
    /// Relative paths start at the config file's directory.
    #[serde(default)]
    pub disk_path: Option<PathBuf>,
    /// Disk tier budget, in bytes of stored entries.
    #[serde(default = "default_cache_disk_bytes")]
    pub disk_bytes: u64,
    /// Longest time the disk tier keeps an entry, fresh or not.
    #[serde(default = "default_cache_disk_ttl_max", with = "humantime_serde")]
    pub disk_ttl_max: Duration,
    /// How long concurrent misses for one key wait for the first one's
    /// answer before going upstream themselves.
    #[serde(default = "default_cache_coalesce_wait", with = "humantime_serde")]
    pub coalesce_wait: Duration,
    /// Largest body the cache records; larger answers pass through.
    #[serde(default = "default_cache_max_object_bytes")]
    pub max_object_bytes: u64,
    /// How long an entry is kept past its last use (fresh, within a stale
    /// window, or revalidatable), to be served should the origin become
    /// unreachable (RFC 9111 §4.2.4; like Varnish's grace and nginx's
    /// `inactive`). Within the tiers' ceilings and byte budgets.
    #[serde(default = "default_cache_keep_stale", with = "humantime_serde")]
    pub keep_stale: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            memory_bytes: default_cache_memory_bytes(),
            memory_ttl_max: default_cache_memory_ttl_max(),
            disk_path: None,
            disk_bytes: default_cache_disk_bytes(),
            disk_ttl_max: default_cache_disk_ttl_max(),
            coalesce_wait: default_cache_coalesce_wait(),
            max_object_bytes: default_cache_max_object_bytes(),
            keep_stale: default_cache_keep_stale(),
        }
    }
}

/// A WebAssembly plugin: its artifact, pin, capabilities and limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique on the node: the metrics label and the kv namespace.
    pub name: String,
    /// The component file; relative paths start at the config file's
    /// directory. Exactly one of `path` and `url` is set; once the node has
    /// fetched a `url` plugin, `path` names its verified cache entry.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The component in object storage: `s3://bucket/key.wasm` (see
    /// [`PluginStoreConfig`]) or `file:///absolute/path.wasm`.
    #[serde(default)]
    pub url: Option<String>,
    /// The artifact's sha256 in hex; any other content refuses to load.
    /// Required for `url` plugins; only `breakwater up` fills an empty pin
    /// of a `path` plugin from the local build.
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
    /// A fresh instance per call (the default) or instances reused.
    #[serde(default)]
    pub isolation: PluginIsolation,
    /// With `isolation = "reused"`: calls one instance serves before it is
    /// replaced; default 10,000.
    #[serde(default = "default_recycle_after")]
    pub recycle_after: u64,
}

/// How a plugin's instances serve its calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginIsolation {
    /// A fresh instance, `init` included, for every call: nothing one
    /// request leaves in the plugin's globals reaches the next.
    #[default]
    PerRequest,
    /// Instances kept and reused: `init` once per instance; one that fails
    /// is discarded; each is replaced after `recycle_after` calls.
    Reused,
}

fn default_recycle_after() -> u64 {
    10_000
}

impl PluginConfig {
    /// [`PluginConfig::config`] as the JSON document the plugin's `init` reads.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// Where `[[plugin]]` tables with a `url` come from and where their
/// artifacts are kept. Unset S3 settings fall back to the standard AWS
/// environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginStoreConfig {
    /// Content-addressed cache of fetched artifacts (`<sha256>.wasm`); an
    /// artifact there is used without the network. Relative paths start at
    /// the config file's directory.
    #[serde(default = "default_plugin_cache_dir")]
    pub cache_dir: PathBuf,
    /// Base URL of the S3-compatible service, e.g. `https://s3.example.com`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region requests are signed for.
    #[serde(default)]
    pub region: Option<String>,
    /// Access key id; give it with `secret_access_key`, or neither.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key (prefer `AWS_SECRET_ACCESS_KEY` in the environment).
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Allow a plain-http endpoint that is not on loopback.
    #[serde(default)]
    pub allow_http: bool,
    /// Deadline for fetching one artifact.
    #[serde(default = "default_plugin_fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Largest artifact the node fetches.
    #[serde(default = "default_plugin_max_bytes")]
    pub max_bytes: u64,
}

impl Default for PluginStoreConfig {
    fn default() -> Self {
        Self {
            cache_dir: default_plugin_cache_dir(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            fetch_timeout: default_plugin_fetch_timeout(),
            max_bytes: default_plugin_max_bytes(),
        }
    }
}

impl std::fmt::Debug for PluginStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Configurations are logged and compared by their Debug text; the
        // secret must not show.
        f.debug_struct("PluginStoreConfig")
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("allow_http", &self.allow_http)
            .field("fetch_timeout", &self.fetch_timeout)
            .field("max_bytes", &self.max_bytes)
            .finish()
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

fn default_node_name() -> String {
    "edge".to_owned()
}
pub(crate) fn default_region() -> String {
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
fn default_plugin_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}
fn default_plugin_body_budget() -> u64 {
    64 * 1024 * 1024
}
fn default_plugin_queue_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_ip() -> usize {
    256
}
/// The standard methods but `CONNECT` (the node does not tunnel) and
/// `TRACE` (it echoes the request as received, cookies and credentials
/// included, and would show clients what the node adds upstream).
fn default_allowed_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
        .map(str::to_owned)
        .to_vec()
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
fn default_cache_memory_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_cache_keep_stale() -> Duration {
    Duration::from_secs(600)
}
fn default_cache_memory_ttl_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_cache_disk_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_cache_disk_ttl_max() -> Duration {
    Duration::from_secs(4 * 3600)
}
fn default_cache_coalesce_wait() -> Duration {
    Duration::from_secs(5)
}
fn default_cache_max_object_bytes() -> u64 {
    16 * 1024 * 1024
}
/// Shared by every node on the machine: entries are named by their digest
/// and verified on use, so sharing is safe.
fn default_plugin_cache_dir() -> PathBuf {
    std::env::temp_dir().join("breakwater-plugin-cache")
}
fn default_plugin_fetch_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_plugin_max_bytes() -> u64 {
    64 * 1024 * 1024
}

/// `[tracing]`: spans exported over OTLP. Each key left out falls back to
/// the standard `OTEL_*` environment variable, then to its default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector, e.g. `http://otel-collector:4318` (HTTP) or
    /// `http://otel-collector:4317` (gRPC). Over HTTP, `/v1/traces` is
    /// appended. Falls back to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used
    /// as is), then `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`. Falls back to `OTEL_EXPORTER_OTLP_PROTOCOL`,
    /// then `http/protobuf`.
    #[serde(default)]
    pub protocol: Option<TraceProtocol>,
    /// `service.name` of the spans. Falls back to `OTEL_SERVICE_NAME`, then
    /// `breakwater-edge`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Share of new traces kept, 0.0 to 1.0; a continued trace follows its
    /// caller's decision. Falls back to `OTEL_TRACES_SAMPLER` /
    /// `OTEL_TRACES_SAMPLER_ARG`, then 1.0.
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// Continue a client's `traceparent` (an edge behind a load balancer
    /// that starts traces). Off by default: an internet client's trace is
    /// only linked, so it can neither pick trace ids nor force sampling.
    #[serde(default)]
    pub trust_incoming: bool,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TraceProtocol {
    /// Protobuf over HTTP POST (port 4318 by convention).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// gRPC (port 4317 by convention).
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[cluster]`: several nodes sharing one Redis.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://…` for TLS, or
    /// `unix:///path/to/redis.sock`. Exactly one of `redis_url` and
    /// `sentinels` is set.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Sentinels (`redis://host:26379`) that know where the primary is;
    /// the node follows it through failovers.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The primary's name at the sentinels (`sentinel monitor <name> …`).
    #[serde(default)]
    pub sentinel_master: Option<String>,
    /// PEM certificates a `rediss://` server's chain must lead to, instead
    /// of the system's roots. Relative paths start at the config file's
    /// directory.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Put before every key this cluster writes.
    #[serde(default = "default_cluster_key_prefix")]
    pub key_prefix: String,
    /// The longest a request waits for Redis, per call.
    #[serde(default = "default_cluster_budget", with = "humantime_serde")]
    pub budget: Duration,
    /// The deadline of calls off the request path: cache writes, lease
    /// returns.
    #[serde(
        default = "default_cluster_background_timeout",
        with = "humantime_serde"
    )]
    pub background_timeout: Duration,
    /// How often an unreachable Redis is tried again.
    #[serde(default = "default_cluster_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    /// Whether the plugins' `counters` buckets and `tokens` budgets are
    /// shared by the cluster.
    #[serde(default = "default_true")]
    pub shared_counters: bool,
    /// A node's lease on a shared bucket holds what the bucket refills in
    /// this long.
    #[serde(default = "default_cluster_lease_window", with = "humantime_serde")]
    pub lease_window: Duration,
    /// A lease unused this long goes back to the cluster.
    #[serde(
        default = "default_cluster_lease_idle_return",
        with = "humantime_serde"
    )]
    pub lease_idle_return: Duration,
    /// What limits do while Redis cannot answer: `"local"` (each node
    /// counts alone), `"open"` (admit) or `"closed"` (refuse); one for
    /// both features or a table `{ counters = …, tokens = … }`.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// The shared cache tier (L3): `"off"`, `"evicted"` (entries leaving
    /// the memory tier) or `"all"` (every entry stored).
    #[serde(default)]
    pub cache: SharedCacheMode,
    /// Largest body the shared cache tier keeps.
    #[serde(default = "default_cluster_l3_max_object_bytes")]
    pub l3_max_object_bytes: u64,
    /// Longest time the shared cache tier keeps an entry.
    #[serde(default = "default_cluster_l3_ttl_max", with = "humantime_serde")]
    pub l3_ttl_max: Duration,
}

/// What a limit does while Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnavailableMode {
    #[default]
    Local,
    Open,
    Closed,
}

/// `on_unavailable`, per feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnUnavailable {
    /// The plugins' `counters` (request rate limits).
    pub counters: UnavailableMode,
    /// The plugins' `tokens` (LLM token budgets).
    pub tokens: UnavailableMode,
}

impl<'de> Deserialize<'de> for OnUnavailable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Both(UnavailableMode),
            Each(PerFeature),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct PerFeature {
            #[serde(default)]
            counters: UnavailableMode,
            #[serde(default)]
            tokens: UnavailableMode,
        }
        match Written::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "expected \"local\", \"open\", \"closed\", or a table such as \
                 { counters = \"local\", tokens = \"closed\" }",
            )
        })? {
            Written::Both(mode) => Ok(OnUnavailable {
                counters: mode,
                tokens: mode,
            }),
            Written::Each(each) => Ok(OnUnavailable {
                counters: each.counters,
                tokens: each.tokens,
            }),
        }
    }
}

/// Which entries the shared cache tier stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedCacheMode {
    Off,
    /// Entries as they leave the memory tier (evicted for room, or past
    /// the memory tier's ceiling while still worth keeping).
    Evicted,
    /// Every entry, when stored.
    #[default]
    All,
}

fn default_true() -> bool {
    true
}

fn default_cluster_key_prefix() -> String {
    "bw:".to_owned()
}

fn default_cluster_budget() -> Duration {
    Duration::from_millis(5)
}

fn default_cluster_background_timeout() -> Duration {
    Duration::from_millis(250)
}

fn default_cluster_health_interval() -> Duration {
    Duration::from_millis(250)
}

fn default_cluster_lease_window() -> Duration {
    Duration::from_millis(50)
}

fn default_cluster_lease_idle_return() -> Duration {
    Duration::from_secs(1)
}

fn default_cluster_l3_max_object_bytes() -> u64 {
    1024 * 1024
}

fn default_cluster_l3_ttl_max() -> Duration {
    Duration::from_secs(12 * 3600)
}

#[cfg(test)]
mod cluster_tests {
    use std::path::Path;

    use super::*;

    fn parse(cluster: &str) -> Result<EdgeConfig, crate::ConfigError> {
        let text = format!("[[listener]]\naddress = \"127.0.0.1:8080\"\n\n[cluster]\n{cluster}\n");
        crate::parse(&text, Path::new("edge.toml"), Path::new("/etc/bw"))
    }

    #[test]
    fn a_url_alone_takes_the_defaults() {
        let config =
            parse("redis_url = \"redis://10.0.0.9:6379\"").unwrap_or_else(|e| panic!("{e}"));
        let cluster = config.cluster.expect("a cluster");
        assert_eq!(cluster.budget, Duration::from_millis(5));
        assert_eq!(cluster.cache, SharedCacheMode::All);
        assert!(cluster.shared_counters);
        assert_eq!(
            cluster.on_unavailable,
            OnUnavailable {
                counters: UnavailableMode::Local,
                tokens: UnavailableMode::Local
            }
        );
    }

    #[test]
    fn on_unavailable_is_one_mode_or_one_per_feature() {
        let both = parse("redis_url = \"redis://r:6379\"\non_unavailable = \"closed\"")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            both.cluster.expect("a cluster").on_unavailable.tokens,
            UnavailableMode::Closed
        );
        let each = parse("redis_url = \"redis://r:6379\"\non_unavailable = { tokens = \"open\" }")
            .unwrap_or_else(|e| panic!("{e}"));
        let each = each.cluster.expect("a cluster").on_unavailable;
        assert_eq!(
            (each.counters, each.tokens),
            (UnavailableMode::Local, UnavailableMode::Open)
        );
        let wrong = parse("redis_url = \"redis://r:6379\"\non_unavailable = \"ajar\"")
            .expect_err("not a mode");
        assert!(wrong.to_string().contains("\"closed\""), "{wrong}");
    }

    #[test]
    fn mistakes_are_located_with_their_fix() {
        let error =
            parse("redis_url = \"http://r:6379\"\nbudget = \"0s\"").expect_err("two mistakes");
        let problems = error.diagnostics();
        assert_eq!(problems.len(), 2, "{error}");
        assert_eq!(problems[0].line, 5);
        assert!(problems[0].fix.contains("redis://"), "{error}");
        assert_eq!(problems[1].line, 6);
        let unknown = parse("redis_url = \"redis://r\"\nbugdet = \"5ms\"").expect_err("a typo");
        assert!(unknown.to_string().contains("budget"), "{unknown}");
    }

    #[test]
    fn sentinels_replace_the_url_and_need_the_primary_s_name() {
        let config = parse(
            "sentinels = [\"redis://10.0.0.1:26379\", \"redis://10.0.0.2:26379\"]\n\
             sentinel_master = \"bw\"\ntls_ca_file = \"ca.pem\"",
        );
        // The CA file does not exist under /etc/bw: the one mistake.
        let error = config.expect_err("a missing CA file");
        assert_eq!(error.diagnostics().len(), 1, "{error}");
        assert!(error.to_string().contains("/etc/bw/ca.pem"), "{error}");
        let nameless = parse("sentinels = [\"redis://10.0.0.1:26379\"]").expect_err("no name");
        assert!(
            nameless.to_string().contains("sentinel_master"),
            "{nameless}"
        );
        let both = parse("redis_url = \"redis://r\"\nsentinels = [\"redis://s:26379\"]\nsentinel_master = \"bw\"")
            .expect_err("both");
        assert!(both.to_string().contains("both"), "{both}");
        let neither = parse("budget = \"5ms\"").expect_err("no Redis");
        assert!(neither.to_string().contains("names no Redis"), "{neither}");
    }
}
