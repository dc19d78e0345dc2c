//! The Breakwater plugin sandbox: runs untrusted WebAssembly components
//! against the ABI in `sdk/wit`, safely and fast.
//!
//! - One [`Sandbox`] per node: one Wasmtime engine with the pooling
//!   allocator and epoch interruption, an epoch ticker thread, the node's
//!   shared key-value store and token buckets.
//! - [`Sandbox::load`] reads a plugin, checks its sha256 pin, compiles it
//!   once (optionally through a cache of precompiled `.cwasm` files), checks
//!   that it imports only the capabilities granted to it, pre-instantiates
//!   it and validates its configuration with one `init` call.
//! - [`LoadedPlugin::on_request`] and [`LoadedPlugin::on_response`] run
//!   each call in a fresh instance, or a reused one ([`Isolation`]), with a
//!   CPU deadline and a memory cap; a plugin's [`LoadedPlugin::phases`] say
//!   which of the two the node should call at all;
//!   a failure is a [`CallError`] with a [`FailureKind`], counted in
//!   `breakwater_plugin_failures_total{plugin,kind}`, for the node to handle
//!   by the plugin's [`OnFailure`] policy.
//!
//! ```no_run
//! use breakwater_sandbox::{Capability, PluginSpec, Request, Sandbox, SandboxConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sandbox = Sandbox::new(SandboxConfig::default())?;
//! let mut spec = PluginSpec::new("router", "plugins/router.wasm", "<sha256 of the file>");
//! spec.grants.insert(Capability::Log);
//! let router = sandbox.load(spec)?;
//! let outcome = router.on_request(&Request {
//!     method: "GET".into(),
//!     host: "example.com".into(),
//!     path: "/".into(),
//!     headers: vec![],
//!     client_ip: "192.0.2.1".into(),
//!     request_id: "r-1".into(),
//!     body: None,
//! })?;
//! # let _ = outcome.decision;
//! # Ok(())
//! # }
//! ```

mod abi;
mod artifact;
mod capability;
mod engine;
mod error;
mod host;
pub mod http_view;
mod time;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::Linker;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

pub use artifact::sha256_hex;
pub use capability::Capability;
pub use error::{CallError, FailureKind, LoadError, OnFailure, SandboxError};
pub use host::tokens::{TokenGrants, TokenUsage};
pub use time::{Clock, ManualClock};

use host::HostState;
use host::counters::Counters;
use host::kv::KvNamespace;
use host::metrics::SeriesLimit;

/// The host side of the current ABI, generated from `sdk/wit`.
#[allow(missing_docs, clippy::all)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "plugin",
    });
}

pub use bindings::{
    Phases, Request, RequestChanges, RequestDecision, RequestOutcome, Response, ResponseChanges,
    ResponseDecision, ResponseHead,
};

/// The largest body a plugin may answer with; bigger answers are refused
/// as an [`FailureKind::InvalidDecision`].
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// The largest context a plugin's `on-request` may leave for its
/// `on-response`; more is refused as an [`FailureKind::InvalidDecision`].
/// The node holds it for every request in flight, so it stays small.
pub const MAX_CONTEXT_BYTES: usize = 4 * 1024;

/// The least CPU deadline of the `init` call that validates a plugin's
/// configuration at load.
const LOAD_DEADLINE: Duration = Duration::from_secs(1);

/// A call that has not used its CPU budget is still stopped after this many
/// times the budget of wall-clock time, so a starved thread cannot hold a
/// request without end.
pub const WALL_BACKSTOP_FACTOR: u32 = 25;

/// Per-plugin resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time for one call (instantiation, `init` and the phase), counted
    /// on the calling thread: time the OS gave to other threads (a busy
    /// core) is not charged, except within the call's first epoch tick,
    /// which is charged by the wall clock. The call is stopped between this
    /// and this plus one epoch tick of CPU, or after
    /// [`WALL_BACKSTOP_FACTOR`] times this of wall-clock time, whichever
    /// comes first.
    pub cpu_deadline: Duration,
    /// All of an instance's linear memory together.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_deadline: Duration::from_millis(2),
            memory_bytes: 16 << 20,
        }
    }
}

/// How a plugin's instances serve its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// A fresh instance for every call, `init` included, as Fastly Compute
    /// does: nothing one request leaves in the plugin's memory reaches the
    /// next. The safe choice for a plugin that keeps request data in
    /// globals.
    #[default]
    PerRequest,
    /// Instances kept and reused across calls, as proxy-wasm keeps a VM per
    /// worker: `init` (and its configuration parse) runs once per instance.
    /// Globals persist between the calls one instance serves. An instance
    /// whose call fails (trap, deadline, memory) is discarded, and each is
    /// replaced after `recycle_after` calls, so a slow leak or a corrupted
    /// state lives a bounded time.
    Reused {
        /// Calls one instance serves before it is replaced (at least 1).
        recycle_after: u64,
    },
}

/// Idle instances one reused plugin keeps. Each holds a slot of the
/// pooling allocator ([`SandboxConfig::max_concurrent_instances`]), so the
/// pool must also leave room for this many per reused plugin.
pub const MAX_IDLE_INSTANCES: usize = 16;

/// Node-wide sandbox settings.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Instances that may exist at once, across all plugins: the size of
    /// the pooling allocator. A call beyond it fails with
    /// [`FailureKind::Instantiate`].
    pub max_concurrent_instances: u32,
    /// The most memory any plugin may be given (one pool slot).
    pub max_memory_bytes: usize,
    /// Limits for plugins that do not set their own.
    pub default_limits: Limits,
    /// How often the epoch advances: the granularity of CPU deadlines.
    pub epoch_tick: Duration,
    /// Where precompiled components are cached; none compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Where the plugin key-value store lives; none keeps it in a temporary
    /// directory removed with the sandbox.
    pub kv_path: Option<PathBuf>,
    /// The largest key a plugin may use in `kv`.
    pub kv_max_key_bytes: usize,
    /// The largest value a plugin may store in `kv`.
    pub kv_max_value_bytes: usize,
    /// Token buckets kept on the node, across plugins.
    pub max_counter_keys: usize,
    /// Metric series (name and label set) each plugin may create.
    pub max_metric_series: usize,
    /// The time plugins see (`clock`, `counters` refills, `kv` expiry): the
    /// system's, or a [`Clock::manual`] a test moves. CPU deadlines always
    /// count real time.
    pub clock: Clock,
    /// The cluster's buckets for `counters` and `tokens`; none counts on
    /// this node alone. Shared buckets keep Redis's time, not `clock`.
    pub shared_counters: Option<SharedCounters>,
}

/// `counters` and `tokens` buckets shared by a cluster of nodes.
#[derive(Debug, Clone)]
pub struct SharedCounters {
    /// This node's leases on the cluster's buckets.
    pub leases: Arc<breakwater_cluster::leases::LeasedBuckets>,
    /// What `counters` does while Redis cannot answer.
    pub counters: breakwater_cluster::Fallback,
    /// What `tokens` does while Redis cannot answer.
    pub tokens: breakwater_cluster::Fallback,
    /// The wait a `closed` fallback tells the client: about when Redis is
    /// tried again.
    pub closed_retry_after: Duration,
}

impl SharedCounters {
    pub(crate) fn closed_retry_after_ms(&self) -> u64 {
        u64::try_from(self.closed_retry_after.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            max_concurrent_instances: 256,
            max_memory_bytes: 64 << 20,
            default_limits: Limits::default(),
            epoch_tick: Duration::from_millis(1),
            cache_dir: None,
            kv_path: None,
            kv_max_key_bytes: 512,
            kv_max_value_bytes: 64 * 1024,
            max_counter_keys: 1 << 20,
            max_metric_series: 256,
            clock: Clock::system(),
            shared_counters: None,
        }
    }
}

/// One plugin as configured: where it is, its pin, what it may do.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// A name unique on the node: the metric label, the kv namespace.
    pub name: String,
    /// The component file.
    pub path: PathBuf,
    /// The sha256 of the file, in hex (an optional `sha256:` prefix is
    /// accepted).
    pub sha256: String,
    /// The configuration passed to the plugin's `init`, usually JSON.
    pub config: String,
    /// The host capabilities the plugin may import.
    pub grants: BTreeSet<Capability>,
    /// What the node does with a request when the plugin fails.
    pub on_failure: OnFailure,
    /// Limits; none takes the sandbox's defaults.
    pub limits: Option<Limits>,
    /// Fresh instance per call, or reused instances.
    pub isolation: Isolation,
}

impl PluginSpec {
    /// A spec with an empty configuration, no grants, fail-closed and the
    /// default limits.
    pub fn new(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        sha256: impl Into<String>,
    ) -> Self {
        PluginSpec {
            name: name.into(),
            path: path.into(),
            sha256: sha256.into(),
            config: String::new(),
            grants: BTreeSet::new(),
            on_failure: OnFailure::default(),
            limits: None,
            isolation: Isolation::default(),
        }
    }
}

/// The sandbox of one node. Cheap to share behind an `Arc`; loading and
/// calling take `&self`.
pub struct Sandbox {
    engine: Engine,
    config: SandboxConfig,
    counters: Arc<Counters>,
    kv: OnceLock<sled::Db>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Builds the engine and starts its epoch ticker.
    pub fn new(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|source| SandboxError::Cache {
                path: dir.clone(),
                source,
            })?;
        }
        let engine = engine::build(&config)?;
        engine::start_ticker(&engine, config.epoch_tick)?;
        Ok(Sandbox {
            engine,
            counters: Arc::new(Counters::new(
                config.max_counter_keys,
                config.clock.clone(),
                config.shared_counters.clone(),
            )),
            config,
            kv: OnceLock::new(),
        })
    }

    /// The limits a plugin gets when its spec sets none.
    pub fn default_limits(&self) -> Limits {
        self.config.default_limits
    }

    /// Loads a plugin: pin check, compile (or cache), import check,
    /// pre-instantiation, and one `init` call to validate its configuration.
    pub fn load(&self, spec: PluginSpec) -> Result<LoadedPlugin, LoadError> {
        let name = spec.name.as_str();
        if !valid_plugin_name(name) {
            return Err(LoadError::Config {
                plugin: name.to_owned(),
                message: "a plugin name is 1 to 64 characters from a-z, 0-9, `-` and `_`"
                    .to_owned(),
            });
        }
        let limits = spec.limits.unwrap_or(self.config.default_limits);
        if limits.memory_bytes > self.config.max_memory_bytes {
            return Err(LoadError::Config {
                plugin: name.to_owned(),
                message: format!(
                    "memory limit {} bytes is above the sandbox's maximum of {}",
                    limits.memory_bytes, self.config.max_memory_bytes
                ),
            });
        }
        let bytes = artifact::read_pinned(name, &spec.path, &spec.sha256)?;
        let sha256 = sha256_hex(&bytes);
        let component = artifact::compile(
            name,
            &self.engine,
            &spec.path,
            &sha256,
            &bytes,
            self.config.cache_dir.as_deref(),
        )?;
        capability::check_imports(name, &self.engine, &component, &spec.grants)?;

        let link_error = |e: wasmtime::Error| LoadError::Link {
            plugin: name.to_owned(),
            message: format!("{e:#}"),
        };
        let linker = self.linker(&spec.grants).map_err(link_error)?;
        let pre = linker.instantiate_pre(&component).map_err(link_error)?;
        let pre = abi::PluginPre::new(pre).map_err(link_error)?;

        let kv = if spec.grants.contains(&Capability::Kv) {
            let namespace = KvNamespace::open(
                self.kv()?,
                name,
                self.config.kv_max_key_bytes,
                self.config.kv_max_value_bytes,
                self.config.clock.clone(),
            );
            Some(namespace.map_err(|e| LoadError::Kv(e.to_string()))?)
        } else {
            None
        };
        let mut plugin = LoadedPlugin {
            shared: Arc::new(PluginShared {
                name: spec.name.clone(),
                kv,
                counters: Arc::clone(&self.counters),
                series: SeriesLimit::new(self.config.max_metric_series),
                clock: self.config.clock.clone(),
                call_seconds: metrics::histogram!(
                    "breakwater_plugin_call_seconds",
                    "plugin" => spec.name.clone()
                ),
            }),
            pre,
            config: spec.config,
            on_failure: spec.on_failure,
            limits,
            sha256,
            isolation: spec.isolation,
            epoch_tick: self.config.epoch_tick,
            idle: std::sync::Mutex::new(Vec::new()),
            phases: Phases::empty(),
        };
        // The first instance of a plugin is slower than the rest (fresh pool
        // slots fault their pages in), and a node loads plugins while it is
        // busy: the load-time check runs under a generous deadline.
        match plugin.check_init(limits.cpu_deadline.max(LOAD_DEADLINE)) {
            Ok(phases) => {
                plugin.phases = phases;
                Ok(plugin)
            }
            Err(error) if error.kind == FailureKind::Init => Err(LoadError::Config {
                plugin: spec.name,
                message: error.message,
            }),
            Err(source) => Err(LoadError::Init {
                plugin: spec.name,
                source,
            }),
        }
    }

    /// A linker with WASI (inert, see [`capability`]) and exactly the
    /// granted host interfaces: even a component that slipped past the
    /// import check could not link an ungranted one.
    fn linker(&self, grants: &BTreeSet<Capability>) -> wasmtime::Result<Linker<HostState>> {
        let mut linker = Linker::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        for grant in grants {
            abi::add_capability(&mut linker, *grant)?;
        }
        Ok(linker)
    }

    fn kv(&self) -> Result<&sled::Db, LoadError> {
        if let Some(db) = self.kv.get() {
            return Ok(db);
        }
        let config = match &self.config.kv_path {
            Some(path) => sled::Config::new().path(path),
            None => sled::Config::new().temporary(true),
        };
        let db = config.open().map_err(|e| LoadError::Kv(e.to_string()))?;
        // Two loads racing here both opened a handle; the loser's is dropped.
        Ok(self.kv.get_or_init(|| db))
    }
}

/// Names label metrics and key the kv store, so they stay plain.
fn valid_plugin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// CPU time the calling thread has used so far; `None` where the clock
/// cannot be read (then deadlines fall back to the wall clock). Hosts use
/// it to report what a plugin call cost.
pub fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (rc == 0).then(|| {
        Duration::new(
            u64::try_from(now.tv_sec).unwrap_or(0),
            u32::try_from(now.tv_nsec).unwrap_or(0),
        )
    })
}

/// The deadline of one call, checked at every epoch tick on the thread
/// that runs the plugin. Epoch interruption alone counts wall-clock ticks,
/// which on a busy core charge a plugin for time it spent preempted and
/// trap well-behaved calls under load; this counts the thread's own CPU
/// time instead.
///
/// The thread's CPU clock is first read at the first tick, not when the
/// call starts: reading it is a system call that cost a fifth of a reused
/// call, and most calls end before any tick. The time before that first
/// check is charged as its wall-clock length, at most one tick.
struct CallBudget {
    /// The thread's CPU time at the first check, and what the call is
    /// charged for the time before it; `None` until then.
    first_check: Option<(Option<Duration>, Duration)>,
    cpu_budget: Duration,
    tick: Duration,
    wall_limit: Instant,
}

impl CallBudget {
    fn start(cpu_budget: Duration, tick: Duration, now: Instant) -> Self {
        Self {
            first_check: None,
            cpu_budget,
            tick,
            wall_limit: now + cpu_budget.saturating_mul(WALL_BACKSTOP_FACTOR),
        }
    }

    /// Whether the call has used its budget (or its wall-clock backstop).
    fn spent(&mut self, started: Instant) -> bool {
        let now = Instant::now();
        if now >= self.wall_limit {
            return true;
        }
        let cpu_now = thread_cpu_time();
        let (cpu_first, before) = *self
            .first_check
            .get_or_insert_with(|| (cpu_now, now.duration_since(started).min(self.tick)));
        match (cpu_first, cpu_now) {
            (Some(from), Some(to)) => before + to.saturating_sub(from) >= self.cpu_budget,
            _ => now.duration_since(started) >= self.cpu_budget,
        }
    }
}

/// What every instance of one plugin shares: its name and its handles on
/// the node's capabilities.
pub(crate) struct PluginShared {
    pub(crate) name: String,
    pub(crate) kv: Option<KvNamespace>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) series: SeriesLimit,
    pub(crate) clock: Clock,
    /// `breakwater_plugin_call_seconds{plugin}`, registered at load: a call
    /// records into it without building a label set.
    call_seconds: metrics::Histogram,
}

/// A loaded plugin, ready to be called from any thread: each call gets a
/// fresh instance or, for [`Isolation::Reused`], an idle one.
pub struct LoadedPlugin {
    shared: Arc<PluginShared>,
    pre: abi::PluginPre,
    config: String,
    on_failure: OnFailure,
    limits: Limits,
    sha256: String,
    isolation: Isolation,
    /// The sandbox's epoch tick: how often a running call's budget is
    /// checked.
    epoch_tick: Duration,
    /// Idle instances of a reused plugin, at most [`MAX_IDLE_INSTANCES`].
    idle: std::sync::Mutex<Vec<WarmInstance>>,
    /// The phases the plugin's `init` named at load.
    phases: Phases,
}

/// An instance past its `init`, kept between calls.
struct WarmInstance {
    store: Store<HostState>,
    plugin: abi::PluginInstance,
    calls: u64,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.shared.name)
            .field("sha256", &self.sha256)
            .field("on_failure", &self.on_failure)
            .field("limits", &self.limits)
            .field("isolation", &self.isolation)
            .field("abi", &self.pre.version())
            .field("phases", &self.phases)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The sha256 of the loaded artifact.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// What the node does with a request when this plugin fails.
    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// The limits each call runs under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Fresh instance per call, or reused instances.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The phases the plugin implements, as its `init` named them at load
    /// (both for a plugin built against ABI 0.1.0). A node calls only
    /// these; calling another is allowed and answers `continue`.
    pub fn phases(&self) -> Phases {
        self.phases
    }

    /// The version of the plugin ABI the component was built against.
    pub fn abi_version(&self) -> &'static str {
        self.pre.version()
    }

    /// Runs the request phase: the decision, and the context the plugin
    /// leaves for its own response phase. Token reservations the plugin
    /// makes are given back at once; a node that settles them calls
    /// [`LoadedPlugin::on_request_granting`].
    pub fn on_request(&self, req: &Request) -> Result<RequestOutcome, CallError> {
        self.on_request_granting(req).map(|(outcome, _)| outcome)
    }

    /// [`LoadedPlugin::on_request`], and the token reservations the plugin
    /// made (`tokens.reserve`), for the node to settle when the answer has
    /// ended. A call that fails keeps none.
    pub fn on_request_granting(
        &self,
        req: &Request,
    ) -> Result<(RequestOutcome, TokenGrants), CallError> {
        let (outcome, grants) = self.call(self.limits.cpu_deadline, |plugin, store| {
            store.data_mut().token_grants = Some(TokenGrants::default());
            let outcome = plugin.on_request(store, req);
            let grants = store.data_mut().token_grants.take().unwrap_or_default();
            outcome.map(|outcome| (outcome, grants))
        })?;
        match &outcome.decision {
            RequestDecision::Respond(response) => self.check_response(response)?,
            RequestDecision::Continue | RequestDecision::ContinueWith(_) => {}
        }
        let context_len = outcome.context.as_ref().map_or(0, Vec::len);
        if context_len > MAX_CONTEXT_BYTES {
            return Err(self.failure(
                FailureKind::InvalidDecision,
                format!(
                    "context of {context_len} bytes is over the {MAX_CONTEXT_BYTES} byte limit"
                ),
            ));
        }
        Ok((outcome, grants))
    }

    /// Runs the response phase with the context this plugin's request
    /// phase left for the same request.
    pub fn on_response(
        &self,
        req: &Request,
        resp: &ResponseHead,
        context: Option<&[u8]>,
    ) -> Result<ResponseDecision, CallError> {
        let decision = self.call(self.limits.cpu_deadline, |plugin, store| {
            plugin.on_response(store, req, resp, context)
        })?;
        match &decision {
            ResponseDecision::Respond(response) => self.check_response(response)?,
            ResponseDecision::Continue | ResponseDecision::ContinueWith(_) => {}
        }
        Ok(decision)
    }

    fn check_response(&self, response: &Response) -> Result<(), CallError> {
        match invalid_response(response) {
            Some(problem) => Err(self.failure(FailureKind::InvalidDecision, problem)),
            None => Ok(()),
        }
    }

    /// One call under the deadline and the memory cap: in a fresh store
    /// and instance (`init` with the configuration, then `phase`), or in an
    /// idle instance of a reused plugin.
    fn call<R>(
        &self,
        cpu_budget: Duration,
        phase: impl FnOnce(&abi::PluginInstance, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let started = Instant::now();
        let outcome = match self.isolation {
            Isolation::PerRequest => {
                let mut store = self.new_store();
                arm_deadline(&mut store, cpu_budget, self.epoch_tick, started);
                self.instantiate(&mut store).and_then(|plugin| {
                    phase(&plugin, &mut store)
                        .map_err(|error| self.classify(&store, &error, FailureKind::Trap))
                })
            }
            Isolation::Reused { recycle_after } => {
                self.call_reused(cpu_budget, started, recycle_after, phase)
            }
        };
        self.shared
            .call_seconds
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    /// A call in an idle instance, or in a new one that then stays; an
    /// instance goes back to the idle list only after a call that succeeded.
    fn call_reused<R>(
        &self,
        cpu_budget: Duration,
        started: Instant,
        recycle_after: u64,
        phase: impl FnOnce(&abi::PluginInstance, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let idle = self.idle_instances().pop();
        let mut warm = match idle {
            Some(mut warm) => {
                arm_deadline(&mut warm.store, cpu_budget, self.epoch_tick, started);
                warm
            }
            None => {
                let mut store = self.new_store();
                // A new instance's `init` counts against this call, as it
                // does for a fresh instance.
                arm_deadline(&mut store, cpu_budget, self.epoch_tick, started);
                let plugin = self.instantiate(&mut store)?;
                WarmInstance {
                    store,
                    plugin,
                    calls: 0,
                }
            }
        };
        // A failed call drops the instance: whatever state the trap or the
        // interrupted code left behind is never seen again.
        let value = phase(&warm.plugin, &mut warm.store)
            .map_err(|error| self.classify(&warm.store, &error, FailureKind::Trap))?;
        warm.calls += 1;
        if warm.calls < recycle_after && !warm.store.data().stderr_nearly_full() {
            let mut idle = self.idle_instances();
            if idle.len() < MAX_IDLE_INSTANCES {
                idle.push(warm);
            }
        }
        Ok(value)
    }

    /// The load-time check: one instance made and its `init` run under
    /// `budget`, which names the plugin's phases. A reused plugin keeps that
    /// instance for its first call.
    fn check_init(&self, budget: Duration) -> Result<Phases, CallError> {
        let mut store = self.new_store();
        arm_deadline(&mut store, budget, self.epoch_tick, Instant::now());
        let (plugin, phases) = self.start_instance(&mut store)?;
        if let Isolation::Reused { .. } = self.isolation {
            self.idle_instances().push(WarmInstance {
                store,
                plugin,
                calls: 0,
            });
        }
        Ok(phases)
    }

    fn idle_instances(&self) -> std::sync::MutexGuard<'_, Vec<WarmInstance>> {
        // The list is valid whatever a panicking holder was doing with it.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn new_store(&self) -> Store<HostState> {
        let state = HostState::new(Arc::clone(&self.shared), self.limits.memory_bytes);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| state);
        store
    }

    /// A new instance, `init` run with the configuration.
    fn instantiate(&self, store: &mut Store<HostState>) -> Result<abi::PluginInstance, CallError> {
        self.start_instance(store).map(|(instance, _)| instance)
    }

    /// A new instance and the phases its `init` named.
    fn start_instance(
        &self,
        store: &mut Store<HostState>,
    ) -> Result<(abi::PluginInstance, Phases), CallError> {
        let instance = self
            .pre
            .instantiate(&mut *store)
            .map_err(|error| self.classify(store, &error, FailureKind::Instantiate))?;
        match instance.init(&mut *store, &self.config) {
            Ok(Ok(phases)) => Ok((instance, phases)),
            Ok(Err(message)) => Err(self.failure(FailureKind::Init, message)),
            Err(error) => Err(self.classify(store, &error, FailureKind::Trap)),
        }
    }

    /// Names a failure: a deadline, a refused memory grow, or `otherwise`.
    fn classify(
        &self,
        store: &Store<HostState>,
        error: &wasmtime::Error,
        otherwise: FailureKind,
    ) -> CallError {
        let kind = if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            FailureKind::Deadline
        } else if store.data().memory_refused {
            FailureKind::Memory
        } else {
            otherwise
        };
        let stderr = store.data().stderr();
        let mut message = format!("{error:#}");
        if !stderr.is_empty() {
            message.push_str("; stderr: ");
            message.push_str(&stderr);
        }
        self.failure(kind, message)
    }

    fn failure(&self, kind: FailureKind, message: String) -> CallError {
        metrics::counter!(
            "breakwater_plugin_failures_total",
            "plugin" => self.shared.name.clone(),
            "kind" => kind.label(),
        )
        .increment(1);
        CallError {
            plugin: self.shared.name.clone(),
            kind,
            message,
        }
    }
}

/// Starts a call's budget on `store`: every epoch tick, the thread running
/// the plugin checks its own CPU time (a call runs on one thread from start
/// to end).
fn arm_deadline(
    store: &mut Store<HostState>,
    cpu_budget: Duration,
    tick: Duration,
    started: Instant,
) {
    store.data_mut().begin_call();
    let mut budget = CallBudget::start(cpu_budget, tick, started);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        Ok(if budget.spent(started) {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Continue(1)
        })
    });
}

/// Why a plugin's own answer cannot be sent, if it cannot.
fn invalid_response(response: &Response) -> Option<String> {
    if !(100..=999).contains(&response.status) {
        Some(format!("status {} is not an HTTP status", response.status))
    } else if response.body.len() > MAX_RESPONSE_BODY {
        Some(format!(
            "body of {} bytes is over the {MAX_RESPONSE_BODY} byte limit",
            response.body.len()
        ))
    } else {
        None
    }
}

/// The checks a decision passes on its way out of the sandbox, for the
/// fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use crate::{RequestDecision, ResponseDecision};

    /// The reason [`crate::LoadedPlugin::on_request`] would refuse
    /// `decision`, if it would.
    pub fn invalid_request_decision(decision: &RequestDecision) -> Option<String> {
        match decision {
            RequestDecision::Respond(response) => crate::invalid_response(response),
            RequestDecision::Continue | RequestDecision::ContinueWith(_) => None,
        }
    }

    /// The reason [`crate::LoadedPlugin::on_response`] would refuse
    /// `decision`, if it would.
    pub fn invalid_response_decision(decision: &ResponseDecision) -> Option<String> {
        match decision {
            ResponseDecision::Respond(response) => crate::invalid_response(response),
            ResponseDecision::Continue | ResponseDecision::ContinueWith(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_are_plain() {
        assert!(valid_plugin_name("rate-limit_2"));
        assert!(!valid_plugin_name(""));
        assert!(!valid_plugin_name("Router"));
        assert!(!valid_plugin_name("a/b"));
        assert!(!valid_plugin_name(&"a".repeat(65)));
    }

    #[test]
    fn the_budget_counts_this_threads_cpu_time_not_waiting() {
        let started = Instant::now();
        let tick = Duration::from_millis(1);
        let mut budget = CallBudget::start(Duration::from_millis(20), tick, started);
        // Sleeping uses no CPU: not spent, though the wall clock moved on.
        std::thread::sleep(Duration::from_millis(30));
        assert!(!budget.spent(started));
        // Spinning does.
        while !budget.spent(started) {
            std::hint::black_box(0u64);
        }
        assert!(started.elapsed() >= Duration::from_millis(20));
        // The backstop: 25 × 1 ms of wall clock, with no CPU used.
        let started = Instant::now();
        let mut budget = CallBudget::start(Duration::from_millis(1), tick, started);
        std::thread::sleep(Duration::from_millis(30));
        assert!(budget.spent(started));
    }
}
