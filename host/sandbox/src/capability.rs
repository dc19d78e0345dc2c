//! Host capabilities a plugin may import, and the load-time check that a
//! component imports only what its configuration grants.

use std::collections::BTreeSet;

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::LoadError;

/// One host interface of the `breakwater:plugin` package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// `log`: lines in the node's log.
    Log,
    /// `clock`: wall and monotonic time.
    Clock,
    /// `kv`: the per-plugin key-value store.
    Kv,
    /// `counters`: token buckets shared on the node, and the `tokens`
    /// interface's LLM token budgets, which are such buckets.
    Counters,
    /// `metrics`: plugin-defined counters and histograms.
    Metrics,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 5] = [
        Capability::Log,
        Capability::Clock,
        Capability::Kv,
        Capability::Counters,
        Capability::Metrics,
    ];

    /// The name used in configuration and in the WIT interface.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Clock => "clock",
            Capability::Kv => "kv",
            Capability::Counters => "counters",
            Capability::Metrics => "metrics",
        }
    }

    /// The capability that grants the WIT interface `name`: its own, but
    /// `tokens`, whose budgets are counter buckets, comes with `counters`.
    fn of_interface(name: &str) -> Option<Capability> {
        match name {
            "tokens" => Some(Capability::Counters),
            other => Capability::from_name(other),
        }
    }

    /// The capability called `name`, as in configuration.
    ///
    /// ```
    /// use breakwater_sandbox::Capability;
    /// assert_eq!(Capability::from_name("kv"), Some(Capability::Kv));
    /// assert_eq!(Capability::from_name("net"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// WASI interfaces a plugin may import without a grant. Rust's standard
/// library imports some of them (stderr for panic messages, the clocks,
/// random for hash maps); the sandbox gives each instance an empty WASI
/// context: no preopened directories, no environment, no network, output to
/// a small in-memory buffer.
const WASI_ALLOWED: &[&str] = &[
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-",
    "wasi:filesystem/",
];

const PACKAGE: &str = "breakwater:plugin/";

/// Refuses a component that imports an ungranted capability or anything
/// outside the plugin ABI and the inert WASI subset.
pub(crate) fn check_imports(
    plugin: &str,
    engine: &Engine,
    component: &Component,
    grants: &BTreeSet<Capability>,
) -> Result<(), LoadError> {
    for (import, _) in component.component_type().imports(engine) {
        if let Some(interface) = import.strip_prefix(PACKAGE) {
            let name = interface.split('@').next().unwrap_or(interface);
            match Capability::of_interface(name) {
                Some(capability) if grants.contains(&capability) => {}
                Some(capability) => {
                    return Err(LoadError::NotGranted {
                        plugin: plugin.to_owned(),
                        capability: capability.name(),
                        import: import.to_owned(),
                    });
                }
                None => {
                    return Err(LoadError::ForbiddenImport {
                        plugin: plugin.to_owned(),
                        import: import.to_owned(),
                    });
                }
            }
        } else if !WASI_ALLOWED.iter().any(|prefix| import.starts_with(prefix)) {
            return Err(LoadError::ForbiddenImport {
                plugin: plugin.to_owned(),
                import: import.to_owned(),
            });
        }
    }
    Ok(())
}
