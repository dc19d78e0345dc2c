//! Plugin hot reload. The node keeps its plugins as one generation (a
//! [`PluginSet`]) behind an atomic pointer; a reload re-reads the
//! configuration from where the node got it, loads every plugin anew into
//! the node's sandbox, and only when all of them loaded swaps the new
//! generation in. A request takes its route's chain once, at its start, and
//! keeps it for both phases, so in-flight requests finish on the chain they
//! began with and nothing ever runs half of a generation.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use breakwater_sandbox::{
    LoadError, LoadedPlugin, Sandbox, SandboxConfig, SandboxError, SharedCounters,
};
use edge_config::EdgeConfig;
use serde::Serialize;

use crate::error::EdgeError;
use crate::plugins::{self, PluginChain, PluginGate, PluginSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a node's configuration comes from, so that a reload can read it
/// again the same way the node first did (a file, or anything that builds
/// an [`EdgeConfig`], such as `breakwater up`'s embedded demo with its
/// local pins).
#[derive(Clone)]
pub struct ConfigSource(Arc<dyn Fn() -> Result<EdgeConfig, BoxError> + Send + Sync>);

impl ConfigSource {
    /// A source that calls `read` on every reload.
    pub fn new<F, E>(read: F) -> Self
    where
        F: Fn() -> Result<EdgeConfig, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        Self(Arc::new(move || read().map_err(Into::into)))
    }

    /// The configuration file at `path`, loaded and validated with
    /// [`edge_config::load`].
    pub fn file(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self::new(move || edge_config::load(&path))
    }

    fn read(&self) -> Result<EdgeConfig, BoxError> {
        (self.0)()
    }
}

impl fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigSource(..)")
    }
}

/// Why a reload was refused. The node keeps serving the generation it had.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "this node was started without a configuration source, so there is nothing to reload from"
    )]
    NoSource,
    #[error("re-reading the configuration: {0}")]
    Config(String),
    #[error("{source}")]
    Plugin {
        /// The `[[plugin]]` that failed to load.
        plugin: String,
        #[source]
        source: LoadError,
    },
    #[error("starting the plugin sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("the reload task failed: {0}")]
    Task(String),
}

impl ReloadError {
    /// The plugin that failed to load, if a plugin is the cause.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            ReloadError::Plugin { plugin, .. } => Some(plugin),
            _ => None,
        }
    }

    /// A stable machine-readable name for the admin API.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ReloadError::NoSource => "reload_unavailable",
            ReloadError::Config(_) => "config_invalid",
            ReloadError::Plugin { .. } => "plugin_load_failed",
            ReloadError::Sandbox(_) | ReloadError::Task(_) => "reload_failed",
        }
    }
}

/// What a successful reload put in place.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Counts successful loads: 1 at start, one more per reload.
    pub generation: u64,
    /// The plugins now loaded, in configuration order.
    pub plugins: Vec<PluginInfo>,
    /// Sections of the configuration that changed but that only a restart
    /// applies (listeners, pools, sites' roots, limits, …).
    pub not_applied: Vec<String>,
}

/// A loaded plugin, as a reload reports it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub sha256: String,
}

/// The node's plugins: the current generation, the gate that bounds their
/// phases, and what a reload needs.
pub(crate) struct PluginRuntime {
    current: ArcSwap<PluginSet>,
    gate: PluginGate,
    /// Route prefixes by slot: how a route is found again in a new
    /// configuration (the prefix is what the route serves).
    slots: Vec<String>,
    /// One reload at a time: a SIGHUP and an admin call must not interleave
    /// their loads and generations.
    reload: tokio::sync::Mutex<ReloadState>,
}

struct ReloadState {
    /// Created with the first plugin, kept for the node's life: it holds the
    /// engine, its epoch ticker and the plugins' kv store, which plugins of
    /// every generation share.
    sandbox: Option<Arc<Sandbox>>,
    /// The configuration the node started with, to name the changes a
    /// reload does not apply.
    running: EdgeConfig,
    source: Option<ConfigSource>,
    /// The cluster's buckets, for a sandbox made by a reload.
    shared_counters: Option<SharedCounters>,
}

fn sandbox_config(shared_counters: Option<SharedCounters>) -> SandboxConfig {
    SandboxConfig {
        shared_counters,
        ..SandboxConfig::default()
    }
}

impl PluginRuntime {
    /// Loads `config`'s plugins as generation 1. `slots` are the node's
    /// route prefixes, by slot.
    pub(crate) fn new(
        config: &EdgeConfig,
        slots: Vec<String>,
        source: Option<ConfigSource>,
        shared_counters: Option<SharedCounters>,
    ) -> Result<Self, EdgeError> {
        let sandbox = if config.plugins.is_empty() {
            None
        } else {
            Some(Arc::new(Sandbox::new(sandbox_config(
                shared_counters.clone(),
            ))?))
        };
        let loaded = match &sandbox {
            Some(sandbox) => {
                plugins::load_all(sandbox, &config.plugins).map_err(|(_, error)| error)?
            }
            None => Vec::new(),
        };
        let chains = slots
            .iter()
            .map(|prefix| {
                let names = chain_names(config, prefix).unwrap_or_default();
                Arc::new(PluginSet::chain(&loaded, names))
            })
            .collect();
        let set = PluginSet {
            generation: 1,
            chains,
        };
        metrics::gauge!("breakwater_plugin_generation").set(1.0);
        Ok(Self {
            current: ArcSwap::from_pointee(set),
            gate: PluginGate::new(&config.limits),
            slots,
            reload: tokio::sync::Mutex::new(ReloadState {
                sandbox,
                running: config.clone(),
                source,
                shared_counters,
            }),
        })
    }

    /// The current chain of the route in `slot`. The caller keeps this
    /// `Arc` for the whole request.
    pub(crate) fn chain(&self, slot: usize) -> Arc<PluginChain> {
        self.current
            .load()
            .chains
            .get(slot)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn gate(&self) -> &PluginGate {
        &self.gate
    }

    /// Re-reads the configuration and swaps in its plugins and chains; on
    /// any failure the current generation keeps serving.
    pub(crate) async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let outcome = self.try_reload().await;
        match &outcome {
            Ok(report) => {
                metrics::counter!("breakwater_plugin_reloads_total", "result" => "ok").increment(1);
                metrics::gauge!("breakwater_plugin_generation").set(report.generation as f64);
                let names: Vec<&str> = report.plugins.iter().map(|p| p.name.as_str()).collect();
                tracing::info!(
                    generation = report.generation,
                    plugins = ?names,
                    "plugins reloaded"
                );
                if !report.not_applied.is_empty() {
                    tracing::warn!(
                        sections = ?report.not_applied,
                        "configuration changes outside the plugins are not applied by a reload; restart to apply them"
                    );
                }
            }
            Err(error) => {
                metrics::counter!("breakwater_plugin_reloads_total", "result" => "failed")
                    .increment(1);
                tracing::error!(
                    plugin = error.plugin().unwrap_or(""),
                    error = %error,
                    "plugin reload failed; the current plugins keep serving"
                );
            }
        }
        outcome
    }

    async fn try_reload(&self) -> Result<ReloadReport, ReloadError> {
        let mut state = self.reload.lock().await;
        let source = state.source.clone().ok_or(ReloadError::NoSource)?;
        let sandbox = state.sandbox.clone();
        let shared_counters = state.shared_counters.clone();
        // Reading files, hashing and compiling components all block.
        let (config, sandbox, loaded) = tokio::task::spawn_blocking(move || {
            let mut config = source
                .read()
                .map_err(|error| ReloadError::Config(error_chain(error.as_ref())))?;
            super::source::resolve_blocking(&mut config)
                .map_err(|(plugin, source)| ReloadError::Plugin { plugin, source })?;
            let sandbox = match sandbox {
                Some(sandbox) => Some(sandbox),
                None if config.plugins.is_empty() => None,
                None => Some(Arc::new(Sandbox::new(sandbox_config(shared_counters))?)),
            };
            let loaded = match &sandbox {
                Some(sandbox) => plugins::load_all(sandbox, &config.plugins)
                    .map_err(|(plugin, source)| ReloadError::Plugin { plugin, source })?,
                None => Vec::new(),
            };
            Ok::<_, ReloadError>((config, sandbox, loaded))
        })
        .await
        .map_err(|error| ReloadError::Task(error.to_string()))??;
        state.sandbox = sandbox;

        let previous = self.current.load_full();
        let chains = self
            .slots
            .iter()
            .enumerate()
            .map(|(slot, prefix)| match chain_names(&config, prefix) {
                Some(names) => Arc::new(PluginSet::chain(&loaded, names)),
                // The route is gone from the new configuration, which only
                // a restart applies: until then it keeps its chain.
                None => previous.chains.get(slot).cloned().unwrap_or_default(),
            })
            .collect();
        let generation = previous.generation + 1;
        let report = ReloadReport {
            generation,
            plugins: loaded.iter().map(|p| info(p)).collect(),
            not_applied: not_applied(&state.running, &config),
        };
        self.current
            .store(Arc::new(PluginSet { generation, chains }));
        Ok(report)
    }
}

fn info(plugin: &LoadedPlugin) -> PluginInfo {
    PluginInfo {
        name: plugin.name().to_owned(),
        sha256: plugin.sha256().to_owned(),
    }
}

/// The chain of the site or route serving `prefix`; sites first, as the
/// node's routing prefers them for equal prefixes.
fn chain_names<'a>(config: &'a EdgeConfig, prefix: &str) -> Option<&'a [String]> {
    config
        .sites
        .iter()
        .find(|site| site.prefix == prefix)
        .map(|site| site.plugins.as_slice())
        .or_else(|| {
            config
                .routes
                .iter()
                .find(|route| route.prefix == prefix)
                .map(|route| route.plugins.as_slice())
        })
}

/// The sections of `new` that differ from `running` in anything but the
/// plugins and the chains: what a reload leaves for a restart.
fn not_applied(running: &EdgeConfig, new: &EdgeConfig) -> Vec<String> {
    let (running, new) = (without_plugins(running), without_plugins(new));
    let mut changed = Vec::new();
    let mut check = |section: &str, differs: bool| {
        if differs {
            changed.push(section.to_owned());
        }
    };
    check("node", running.node != new.node);
    check("listener", running.listeners != new.listeners);
    check("admin", running.admin != new.admin);
    check("limits", running.limits != new.limits);
    check("site", running.sites != new.sites);
    check("route", running.routes != new.routes);
    check("pool", running.pools != new.pools);
    check("cache", running.cache != new.cache);
    // A section added to the configuration later and not named above.
    if changed.is_empty() && format!("{running:?}") != format!("{new:?}") {
        changed.push("other settings".to_owned());
    }
    changed
}

fn without_plugins(config: &EdgeConfig) -> EdgeConfig {
    let mut config = config.clone();
    config.plugins.clear();
    // A reload fetches `url` plugins with the new store settings: they are
    // applied, not left for a restart.
    config.plugin_store = Default::default();
    for site in &mut config.sites {
        site.plugins.clear();
    }
    for route in &mut config.routes {
        route.plugins.clear();
    }
    config
}

/// `error` and its sources, joined the way `anyhow`'s `{:#}` does.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> EdgeConfig {
        // Plugin paths must exist: `Cargo.toml` does, beside this crate.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        edge_config::parse(text, "test.toml".as_ref(), dir).unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = r#"
[[listener]]
address = "127.0.0.1:8080"

[[route]]
prefix = "/"
pool = "p"
plugins = []

[[pool]]
name = "p"
endpoints = ["http://127.0.0.1:9000"]
"#;

    #[test]
    fn chain_changes_are_applied_and_other_changes_are_named() {
        let running = parse(BASE);
        let chain_only = parse(
            &BASE.replace("plugins = []", "plugins = [\"x\"]\n").replace(
                "[[pool]]",
                "[[plugin]]\nname = \"x\"\npath = \"Cargo.toml\"\nsha256 = \"\"\n\n[[pool]]",
            ),
        );
        assert_eq!(not_applied(&running, &chain_only), Vec::<String>::new());

        let moved = parse(
            &BASE
                .replace("127.0.0.1:8080", "127.0.0.1:8081")
                .replace("9000", "9001"),
        );
        assert_eq!(not_applied(&running, &moved), ["listener", "pool"]);

        let limited = parse(&format!("{BASE}\n[limits]\nplugin_concurrency = 255\n"));
        assert_eq!(not_applied(&running, &limited), ["limits"]);
    }

    #[test]
    fn a_route_keeps_its_chain_by_prefix() {
        let config = parse(BASE);
        assert_eq!(chain_names(&config, "/"), Some(&[][..]));
        assert_eq!(chain_names(&config, "/v1/"), None);
    }
}
