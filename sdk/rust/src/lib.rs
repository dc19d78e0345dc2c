//! Write a Breakwater edge plugin in Rust.
//!
//! A plugin is a type implementing [`Plugin`] and one or both phase traits,
//! [`OnRequest`] and [`OnResponse`], exported with [`export_plugin!`],
//! built for `wasm32-wasip2`:
//!
//! ```no_run
//! use breakwater_sdk::{
//!     Context, OnRequest, Plugin, Request, RequestChanges, RequestDecision, export_plugin,
//! };
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
//! }
//!
//! impl OnRequest for Router {
//!     fn on_request(&self, _req: &Request, _ctx: &mut Context) -> RequestDecision {
//!         RequestDecision::ContinueWith(RequestChanges::default().upstream_pool(&self.pool))
//!     }
//! }
//!
//! export_plugin!(Router);
//! ```
//!
//! The node calls only the phases a plugin implements: [`export_plugin!`]
//! tells it which phase traits the type implements, so a plugin without
//! [`OnResponse`] costs nothing on the way back. What the response phase
//! needs from the request phase travels in the request's [`Context`].
//!
//! By default the host gives every call a fresh instance: it calls
//! [`Plugin::new`] with the configuration, then one phase method. A node
//! may run a plugin with `isolation = "reused"` instead: [`Plugin::new`]
//! once per instance, then many phase calls on the same value. Keep state
//! that must outlive a request in [`kv`] or [`counters`], pass what one
//! request's phases share through [`Context`], and never keep request data
//! in a `static` or a `Cell`: it may be reset, or seen by the next request.
//!
//! Each host capability module ([`log`], [`clock`], [`kv`], [`counters`],
//! [`tokens`], [`metrics`]) becomes an import of the plugin only when the
//! plugin calls it, and the node refuses to load a plugin importing a
//! capability its configuration does not grant. [`tokens`] needs no grant of
//! its own: it draws from the same buckets as [`counters`], whose grant
//! covers both.

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
pub mod tokens;

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
    Headers, Phases, Request, RequestChanges, RequestDecision, Response, ResponseChanges,
    ResponseDecision, ResponseHead,
};
pub use config::NoConfig;
pub use export::Context;

/// A plugin: its configuration and how it is built from it. The phases it
/// takes part in are the phase traits it implements, [`OnRequest`] and
/// [`OnResponse`].
pub trait Plugin: Sized + 'static {
    /// The plugin's configuration, deserialized from the JSON the node
    /// passes in; an empty configuration is read as `{}`. Use
    /// [`NoConfig`] for a plugin without one.
    type Config: serde::de::DeserializeOwned;

    /// Builds the plugin from its configuration. An error refuses the load
    /// (at load time) or fails the request (later), with this message.
    fn new(config: Self::Config) -> Result<Self, String>;
}

/// The request phase, called for every request on the plugin's routes.
pub trait OnRequest: Plugin {
    /// Continue, continue with changes, or respond now. What is put in
    /// `ctx` reaches this plugin's [`OnResponse::on_response`] for the same
    /// request.
    fn on_request(&self, req: &Request, ctx: &mut Context) -> RequestDecision;
}

/// The response phase, called for every answer that comes back through the
/// plugin (not for requests a plugin answered in the request phase).
pub trait OnResponse: Plugin {
    /// Continue, continue with changes, or replace the response. `req` is
    /// the request as the whole chain left it; `ctx` holds what this
    /// plugin's request phase left (empty when it has no request phase, left
    /// nothing, or failed).
    fn on_response(&self, req: &Request, resp: &ResponseHead, ctx: &Context) -> ResponseDecision;
}

/// Exports a [`Plugin`] type as the plugin's implementation of the ABI,
/// with the phases it implements. Call it once, in the plugin crate's
/// `lib.rs`.
///
/// ```no_run
/// # use breakwater_sdk::{Context, NoConfig, OnResponse, Plugin, Request, ResponseChanges};
/// # use breakwater_sdk::{ResponseDecision, ResponseHead, export_plugin};
/// struct PoweredBy;
/// impl Plugin for PoweredBy {
///     type Config = NoConfig;
///     fn new(_: NoConfig) -> Result<Self, String> { Ok(PoweredBy) }
/// }
/// impl OnResponse for PoweredBy {
///     fn on_response(&self, _: &Request, _: &ResponseHead, _: &Context) -> ResponseDecision {
///         ResponseDecision::ContinueWith(ResponseChanges::default().set_header("x-powered-by", "breakwater"))
///     }
/// }
/// export_plugin!(PoweredBy);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            // Which phase traits the type implements, found by method
            // resolution on the concrete type (autoref specialization): a
            // missing trait falls through to a stub the host never calls.
            #[allow(unused_imports)]
            use $crate::__private::{HasRequest, HasResponse, NoRequest, NoResponse};

            struct __BreakwaterExport;

            impl $crate::bindings::Guest for __BreakwaterExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<$crate::Phases, ::std::string::String> {
                    let probe = $crate::__private::Probe::<$plugin>::NEW;
                    let mut phases = $crate::Phases::empty();
                    if (&&probe).has_request() {
                        phases |= $crate::Phases::REQUEST;
                    }
                    if (&&probe).has_response() {
                        phases |= $crate::Phases::RESPONSE;
                    }
                    $crate::__private::init::<$plugin>(&config).map(|()| phases)
                }

                fn on_request(req: $crate::Request) -> $crate::bindings::RequestOutcome {
                    let probe = $crate::__private::Probe::<$plugin>::NEW;
                    (&&probe).on_request(&req)
                }

                fn on_response(
                    req: $crate::Request,
                    resp: $crate::ResponseHead,
                    context: ::std::option::Option<::std::vec::Vec<u8>>,
                ) -> $crate::ResponseDecision {
                    let probe = $crate::__private::Probe::<$plugin>::NEW;
                    (&&probe).on_response(&req, &resp, context)
                }
            }

            $crate::bindings::__export_plugin_world!(__BreakwaterExport with_types_in $crate::bindings);
        };
    };
}

/// Used by [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::export::{HasRequest, HasResponse, NoRequest, NoResponse, Probe, init};
    pub use wit_bindgen;
}
