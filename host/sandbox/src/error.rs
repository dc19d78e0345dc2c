//! What can go wrong loading a plugin or calling one.

use std::path::PathBuf;

/// Why a plugin did not load. The node keeps whatever it was running.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The artifact could not be read.
    #[error("plugin `{plugin}`: reading {path}: {source}")]
    Read {
        /// The plugin's name.
        plugin: String,
        /// The artifact's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The artifact is not the one the configuration pinned.
    #[error(
        "plugin `{plugin}`: {path} has sha256 {actual} but the configuration pins {expected}; \
         refusing to load it (rebuild the plugin or update the pin)"
    )]
    Sha256Mismatch {
        /// The plugin's name.
        plugin: String,
        /// The artifact's path.
        path: PathBuf,
        /// The pinned digest.
        expected: String,
        /// The artifact's digest.
        actual: String,
    },
    /// The artifact is not a valid component for this engine.
    #[error("plugin `{plugin}`: compiling {path}: {message}")]
    Compile {
        /// The plugin's name.
        plugin: String,
        /// The artifact's path.
        path: PathBuf,
        /// What the compiler said.
        message: String,
    },
    /// The component imports a host capability its configuration does not grant.
    #[error(
        "plugin `{plugin}` imports `{import}`, the `{capability}` capability, which its \
         configuration does not grant; add \"{capability}\" to its grants or remove the import"
    )]
    NotGranted {
        /// The plugin's name.
        plugin: String,
        /// The capability's name, as written in configuration.
        capability: &'static str,
        /// The import as the component names it.
        import: String,
    },
    /// The component imports something no plugin may use.
    #[error("plugin `{plugin}` imports `{import}`, which the sandbox never provides to plugins")]
    ForbiddenImport {
        /// The plugin's name.
        plugin: String,
        /// The import as the component names it.
        import: String,
    },
    /// The plugin rejected its configuration, or the configuration asks for
    /// something the sandbox cannot give.
    #[error("plugin `{plugin}`: invalid configuration: {message}")]
    Config {
        /// The plugin's name.
        plugin: String,
        /// Why.
        message: String,
    },
    /// The plugin failed while validating its configuration at load.
    #[error("plugin `{plugin}`: failed during its load-time init: {source}")]
    Init {
        /// The plugin's name.
        plugin: String,
        /// The failure.
        #[source]
        source: CallError,
    },
    /// The key-value store could not be opened.
    #[error("opening the plugin key-value store: {0}")]
    Kv(String),
    /// Linking the component against the host failed.
    #[error("plugin `{plugin}`: linking: {message}")]
    Link {
        /// The plugin's name.
        plugin: String,
        /// What the linker said.
        message: String,
    },
}

/// Why a sandbox could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The engine rejected its configuration.
    #[error("configuring the Wasm engine: {0}")]
    Engine(String),
    /// The epoch ticker thread could not start.
    #[error("starting the epoch ticker thread: {0}")]
    Ticker(#[source] std::io::Error),
    /// The precompiled-component cache directory could not be created.
    #[error("creating the component cache directory {path}: {source}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// How a plugin call failed; the label value of
/// `breakwater_plugin_failures_total{plugin,kind}`, which is also its
/// serialized name (`plugin test` expectations name failures this way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The plugin trapped (a panic, an `unreachable`, a bad host call).
    Trap,
    /// The plugin ran past its CPU deadline.
    Deadline,
    /// The plugin tried to grow its memory past the cap.
    Memory,
    /// The plugin's `init` rejected its configuration.
    Init,
    /// No instance could be created (e.g. the pool is exhausted).
    Instantiate,
    /// The plugin returned a decision the host refuses (e.g. a body too big).
    InvalidDecision,
}

impl FailureKind {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
            FailureKind::Init => "init",
            FailureKind::Instantiate => "instantiate",
            FailureKind::InvalidDecision => "invalid_decision",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A failed plugin call. The node applies the plugin's [`OnFailure`] policy.
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin `{plugin}` failed ({kind}): {message}")]
pub struct CallError {
    /// The plugin's name.
    pub plugin: String,
    /// How it failed.
    pub kind: FailureKind,
    /// Details for logs: the trap, and what the plugin wrote to stderr
    /// (a panic message, for Rust plugins).
    pub message: String,
}

/// What the node does with a request when a plugin fails on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Skip the plugin and go on as if it had said `continue`.
    Open,
    /// Fail the request with a 500 and a JSON error.
    #[default]
    Closed,
}
