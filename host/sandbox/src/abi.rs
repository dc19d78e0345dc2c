//! The plugin ABIs the host speaks: the current one (`sdk/wit`, 0.2.1, which
//! also serves components built against 0.2.0: it only adds an interface) and,
//! through an adapter, 0.1.0 (`sdk/wit-0.1.0`), so a plugin built before
//! 0.2.0 keeps loading. The rest of the sandbox sees only the current ABI's
//! types: a 0.1.0 plugin implements both phases and keeps no context.

use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::{Engine, Store};

use crate::bindings::{self as current, Phases, Request, RequestOutcome, ResponseDecision};
use crate::capability::Capability;
use crate::host::HostState;

/// The ABI versions a plugin may target, newest first: the order loads try
/// them in.
/// A component built against 0.2.0 links against 0.2.1 (the linker
/// matches semver-compatible imports) and reports 0.2.1.
pub(crate) const VERSIONS: [&str; 2] = ["0.2.1", "0.1.0"];

/// A plugin's component, linked and type-checked against one ABI.
pub(crate) enum PluginPre {
    Current(current::PluginPre<HostState>),
    V0_1(v0_1::PluginPre<HostState>),
}

/// One instance of a plugin.
pub(crate) enum PluginInstance {
    Current(current::Plugin),
    V0_1(v0_1::Plugin),
}

/// Adds the granted host interfaces of every ABI version to `linker`: a
/// component links against the version it was built for.
pub(crate) fn add_capability(
    linker: &mut Linker<HostState>,
    capability: Capability,
) -> wasmtime::Result<()> {
    use current::breakwater::plugin as now;
    use v0_1::breakwater::plugin as old;
    type Data = HasSelf<HostState>;
    match capability {
        Capability::Log => {
            now::log::add_to_linker::<_, Data>(linker, |s| s)?;
            old::log::add_to_linker::<_, Data>(linker, |s| s)
        }
        Capability::Clock => {
            now::clock::add_to_linker::<_, Data>(linker, |s| s)?;
            old::clock::add_to_linker::<_, Data>(linker, |s| s)
        }
        Capability::Kv => {
            now::kv::add_to_linker::<_, Data>(linker, |s| s)?;
            old::kv::add_to_linker::<_, Data>(linker, |s| s)
        }
        Capability::Counters => {
            now::counters::add_to_linker::<_, Data>(linker, |s| s)?;
            // Token budgets are counter buckets counted in LLM tokens.
            now::tokens::add_to_linker::<_, Data>(linker, |s| s)?;
            old::counters::add_to_linker::<_, Data>(linker, |s| s)
        }
        Capability::Metrics => {
            now::metrics::add_to_linker::<_, Data>(linker, |s| s)?;
            old::metrics::add_to_linker::<_, Data>(linker, |s| s)
        }
    }
}

impl PluginPre {
    /// Type-checks the component's exports against the current ABI, then
    /// against 0.1.0; the error names what the current ABI expected.
    pub(crate) fn new(pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        match current::PluginPre::new(pre.clone()) {
            Ok(pre) => Ok(PluginPre::Current(pre)),
            Err(current_error) => match v0_1::PluginPre::new(pre) {
                Ok(pre) => Ok(PluginPre::V0_1(pre)),
                Err(_) => Err(current_error.context(format!(
                    "the component does not export the plugin ABI (versions {})",
                    VERSIONS.join(", ")
                ))),
            },
        }
    }

    /// The ABI version the component targets.
    pub(crate) fn version(&self) -> &'static str {
        match self {
            PluginPre::Current(_) => VERSIONS[0],
            PluginPre::V0_1(_) => VERSIONS[1],
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        match self {
            PluginPre::Current(pre) => pre.engine(),
            PluginPre::V0_1(pre) => pre.engine(),
        }
    }

    pub(crate) fn instantiate(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<PluginInstance> {
        Ok(match self {
            PluginPre::Current(pre) => PluginInstance::Current(pre.instantiate(store)?),
            PluginPre::V0_1(pre) => PluginInstance::V0_1(pre.instantiate(store)?),
        })
    }
}

impl PluginInstance {
    /// `init`: the phases the plugin implements, or its refusal.
    pub(crate) fn init(
        &self,
        store: &mut Store<HostState>,
        config: &str,
    ) -> wasmtime::Result<Result<Phases, String>> {
        match self {
            PluginInstance::Current(plugin) => plugin.call_init(store, config),
            PluginInstance::V0_1(plugin) => Ok(plugin
                .call_init(store, config)?
                .map(|()| Phases::REQUEST | Phases::RESPONSE)),
        }
    }

    pub(crate) fn on_request(
        &self,
        store: &mut Store<HostState>,
        req: &Request,
    ) -> wasmtime::Result<RequestOutcome> {
        match self {
            PluginInstance::Current(plugin) => plugin.call_on_request(store, req),
            PluginInstance::V0_1(plugin) => {
                let decision = plugin.call_on_request(store, &v0_1::request(req))?;
                Ok(RequestOutcome {
                    decision: v0_1::request_decision(decision),
                    context: None,
                })
            }
        }
    }

    pub(crate) fn on_response(
        &self,
        store: &mut Store<HostState>,
        req: &Request,
        resp: &current::ResponseHead,
        context: Option<&[u8]>,
    ) -> wasmtime::Result<ResponseDecision> {
        match self {
            PluginInstance::Current(plugin) => plugin.call_on_response(store, req, resp, context),
            PluginInstance::V0_1(plugin) => {
                let resp = v0_1::ResponseHead {
                    status: resp.status,
                    headers: resp.headers.clone(),
                };
                let decision = plugin.call_on_response(store, &v0_1::request(req), &resp)?;
                Ok(v0_1::response_decision(decision))
            }
        }
    }
}

/// ABI 0.1.0: its bindings, its host interfaces served by the current ones,
/// and its records converted to and from the current ABI's.
mod v0_1 {
    #[allow(missing_docs, clippy::all)]
    mod generated {
        wasmtime::component::bindgen!({
            path: "../../sdk/wit-0.1.0",
            world: "plugin",
        });
    }

    pub(crate) use generated::*;

    use super::current;
    use crate::host::HostState;
    use breakwater::plugin::{clock, counters, kv, log, metrics};
    use current::breakwater::plugin as now;

    impl log::Host for HostState {
        fn log(&mut self, level: log::Level, message: String) {
            let level = match level {
                log::Level::Trace => now::log::Level::Trace,
                log::Level::Debug => now::log::Level::Debug,
                log::Level::Info => now::log::Level::Info,
                log::Level::Warn => now::log::Level::Warn,
                log::Level::Error => now::log::Level::Error,
            };
            now::log::Host::log(self, level, message);
        }
    }

    impl clock::Host for HostState {
        fn now_ms(&mut self) -> u64 {
            now::clock::Host::now_ms(self)
        }

        fn monotonic_ns(&mut self) -> u64 {
            now::clock::Host::monotonic_ns(self)
        }
    }

    fn kv_error(error: now::kv::KvError) -> kv::KvError {
        match error {
            now::kv::KvError::KeyTooLarge(limit) => kv::KvError::KeyTooLarge(limit),
            now::kv::KvError::ValueTooLarge(limit) => kv::KvError::ValueTooLarge(limit),
            now::kv::KvError::Storage(message) => kv::KvError::Storage(message),
        }
    }

    impl kv::Host for HostState {
        fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, kv::KvError> {
            now::kv::Host::get(self, key).map_err(kv_error)
        }

        fn set(
            &mut self,
            key: String,
            value: Vec<u8>,
            ttl_ms: Option<u64>,
        ) -> Result<(), kv::KvError> {
            now::kv::Host::set(self, key, value, ttl_ms).map_err(kv_error)
        }

        fn delete(&mut self, key: String) -> Result<(), kv::KvError> {
            now::kv::Host::delete(self, key).map_err(kv_error)
        }
    }

    impl counters::Host for HostState {
        fn take(
            &mut self,
            key: String,
            cost: u32,
            rate_per_second: f64,
            burst: u32,
        ) -> Result<counters::TakeResult, String> {
            now::counters::Host::take(self, key, cost, rate_per_second, burst).map(|taken| {
                counters::TakeResult {
                    allowed: taken.allowed,
                    remaining: taken.remaining,
                    retry_after_ms: taken.retry_after_ms,
                }
            })
        }
    }

    impl metrics::Host for HostState {
        fn counter_add(&mut self, name: String, value: u64, labels: Vec<(String, String)>) {
            now::metrics::Host::counter_add(self, name, value, labels);
        }

        fn histogram_observe(&mut self, name: String, value: f64, labels: Vec<(String, String)>) {
            now::metrics::Host::histogram_observe(self, name, value, labels);
        }
    }

    pub(crate) fn request(req: &current::Request) -> Request {
        Request {
            method: req.method.clone(),
            host: req.host.clone(),
            path: req.path.clone(),
            headers: req.headers.clone(),
            client_ip: req.client_ip.clone(),
            request_id: req.request_id.clone(),
            body: req.body.clone(),
        }
    }

    fn response(response: Response) -> current::Response {
        current::Response {
            status: response.status,
            headers: response.headers,
            body: response.body,
        }
    }

    pub(crate) fn request_decision(decision: RequestDecision) -> current::RequestDecision {
        match decision {
            RequestDecision::Continue => current::RequestDecision::Continue,
            RequestDecision::ContinueWith(changes) => {
                current::RequestDecision::ContinueWith(current::RequestChanges {
                    set_headers: changes.set_headers,
                    remove_headers: changes.remove_headers,
                    rewrite_path: changes.rewrite_path,
                    upstream_pool: changes.upstream_pool,
                    cache_key: changes.cache_key,
                    cache_ttl_ms: changes.cache_ttl_ms,
                    cache_bypass: changes.cache_bypass,
                })
            }
            RequestDecision::Respond(answer) => current::RequestDecision::Respond(response(answer)),
        }
    }

    pub(crate) fn response_decision(decision: ResponseDecision) -> current::ResponseDecision {
        match decision {
            ResponseDecision::Continue => current::ResponseDecision::Continue,
            ResponseDecision::ContinueWith(changes) => {
                current::ResponseDecision::ContinueWith(current::ResponseChanges {
                    set_headers: changes.set_headers,
                    remove_headers: changes.remove_headers,
                    cache_ttl_ms: changes.cache_ttl_ms,
                    cache_bypass: changes.cache_bypass,
                })
            }
            ResponseDecision::Respond(answer) => {
                current::ResponseDecision::Respond(response(answer))
            }
        }
    }
}
