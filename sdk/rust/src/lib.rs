//! Write a Breakwater edge plugin in Rust.
//!
//! A plugin is a type implementing [`Plugin`], exported with
//! [`export_plugin!`], built for `wasm32-wasip2`:
//!
//! ```no_run
//! use breakwater_sdk::{Plugin, Request, RequestChanges, RequestDecision, export_plugin};
//!
//! #[derive(serde::Deserialize)]
//! struct Config {
//!     pool: String,
//! }
//!
//! struct Router {
//!     pool: String,
//! }
//!
//! impl Plugin for Router {
//!     type Config = Config;
//!
//!     fn new(config: Config) -> Result<Self, String> {
//!         Ok(Router { pool: config.pool })
//!     }
//!
//!     fn on_request(&self, _req: &Request) -> RequestDecision {
//!         RequestDecision::ContinueWith(RequestChanges::default().upstream_pool(&self.pool))
//!     }
//! }
//!
//! export_plugin!(Router);
//! ```
//!
//! By default the host gives every call a fresh instance: it calls
//! [`Plugin::new`] with the configuration, then one phase method. A node
//! may run a plugin with `isolation = "reused"` instead: [`Plugin::new`]
//! once per instance, then many phase calls on the same value. Keep state
//! that must outlive a request in [`kv`] or [`counters`], and never keep
//! request data in a `static` or a `Cell`: it may be reset, or seen by the
//! next request.
//!
//! Each host capability module ([`log`], [`clock`], [`kv`], [`counters`],
//! [`metrics`]) becomes an import of the plugin only when the plugin calls
//! it, and the node refuses to load a plugin importing a capability its
//! configuration does not grant.

// The generated bindings name the runtime through this crate so that plugin
// crates need no direct dependency on wit-bindgen.
extern crate self as breakwater_sdk;

mod config;
mod export;
mod http;

pub mod clock;
pub mod counters;
pub mod kv;
pub mod log;
pub mod metrics;

/// The bindings generated from `sdk/wit`, the plugin ABI. Plugins normally
/// use the re-exports at the crate root instead.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "::breakwater_sdk::bindings",
        runtime_path: "::breakwater_sdk::__private::wit_bindgen::rt",
    });
}

pub use bindings::{
    Headers, Request, RequestChanges, RequestDecision, Response, ResponseChanges, ResponseDecision,
    ResponseHead,
};
pub use config::NoConfig;

/// A plugin: a filter over the request phases of the edge node.
///
/// Both phases default to letting the request or response through
/// unchanged, so a plugin implements only the phases it cares about.
pub trait Plugin: Sized + 'static {
    /// The plugin's configuration, deserialized from the JSON the node
    /// passes in; an empty configuration is read as `{}`. Use
    /// [`NoConfig`] for a plugin without one.
    type Config: serde::de::DeserializeOwned;

    /// Builds the plugin from its configuration. An error refuses the load
    /// (at load time) or fails the request (later), with this message.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The request phase: continue, continue with changes, or respond now.
    fn on_request(&self, req: &Request) -> RequestDecision {
        let _ = req;
        RequestDecision::Continue
    }

    /// The response phase: continue, continue with changes, or replace the
    /// response.
    fn on_response(&self, req: &Request, resp: &ResponseHead) -> ResponseDecision {
        let _ = (req, resp);
        ResponseDecision::Continue
    }
}

/// Exports a [`Plugin`] type as the plugin's implementation of the ABI.
/// Call it once, in the plugin crate's `lib.rs`.
///
/// ```no_run
/// # use breakwater_sdk::{NoConfig, Plugin, export_plugin};
/// struct Noop;
/// impl Plugin for Noop {
///     type Config = NoConfig;
///     fn new(_: NoConfig) -> Result<Self, String> { Ok(Noop) }
/// }
/// export_plugin!(Noop);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            struct __BreakwaterExport;

            impl $crate::bindings::Guest for __BreakwaterExport {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$plugin>(&config)
                }

                fn on_request(req: $crate::Request) -> $crate::RequestDecision {
                    $crate::__private::on_request::<$plugin>(&req)
                }

                fn on_response(
                    req: $crate::Request,
                    resp: $crate::ResponseHead,
                ) -> $crate::ResponseDecision {
                    $crate::__private::on_response::<$plugin>(&req, &resp)
                }
            }

            $crate::bindings::__export_plugin_world!(__BreakwaterExport with_types_in $crate::bindings);
        };
    };
}

/// Used by [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::export::{init, on_request, on_response};
    pub use wit_bindgen;
}
