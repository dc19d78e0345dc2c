//! The glue between the generated `Guest` trait and [`Plugin`] with its
//! phase traits.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::RequestOutcome;
use crate::{
    OnRequest, OnResponse, Plugin, Request, RequestDecision, ResponseDecision, ResponseHead, config,
};

thread_local! {
    // The plugin built by `init` for this instance: one request's phase
    // with a fresh instance, many calls with a reused one.
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// What a plugin's request phase leaves for its response phase, for one
/// request: a few bytes the node holds until the answer is on its way (at
/// most 4 KiB; more fails the call). Only this plugin sees it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Context {
    value: Option<Vec<u8>>,
}

impl Context {
    /// Leaves `value` for the response phase, replacing what was left.
    pub fn set(&mut self, value: impl Into<Vec<u8>>) {
        self.value = Some(value.into());
    }

    /// What the request phase left, if anything.
    pub fn get(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// What the request phase left, as text; none when it left nothing or
    /// bytes that are not UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(self.get()?).ok()
    }
}

/// Parses the configuration, builds the plugin and keeps it for the phase
/// calls that follow.
pub fn init<P: Plugin>(config: &str) -> Result<(), String> {
    let config = config::parse::<P::Config>(config)?;
    let plugin = P::new(config)?;
    INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

fn with_plugin<P: Plugin, R>(phase: impl FnOnce(&P) -> R) -> R {
    INSTANCE.with(|slot| {
        let slot = slot.borrow();
        match slot.as_ref().and_then(|plugin| plugin.downcast_ref::<P>()) {
            Some(plugin) => phase(plugin),
            // The host always calls `init` first; reaching this is a host
            // bug, and a trap is the only honest answer from here.
            None => panic!("breakwater-sdk: a phase was called before init"),
        }
    })
}

/// Stands for the plugin type `P` in [`crate::export_plugin!`]. The
/// `Has*` traits are implemented for `&&Probe<P>` when `P` implements the
/// phase, the `No*` ones for `&Probe<P>`, so a call on `&&probe` picks the
/// phase where it exists and the stub where it does not. Both are resolved
/// at compile time for the concrete type.
pub struct Probe<P>(PhantomData<P>);

impl<P> Probe<P> {
    /// The probe for `P`.
    pub const NEW: Self = Probe(PhantomData);
}

/// The request phase of a plugin that implements it.
pub trait HasRequest {
    /// Whether the plugin implements the request phase.
    fn has_request(self) -> bool;
    /// Runs the request phase.
    fn on_request(self, req: &Request) -> RequestOutcome;
}

impl<P: OnRequest> HasRequest for &&Probe<P> {
    fn has_request(self) -> bool {
        true
    }

    fn on_request(self, req: &Request) -> RequestOutcome {
        let mut ctx = Context::default();
        let decision = with_plugin::<P, _>(|plugin| plugin.on_request(req, &mut ctx));
        RequestOutcome {
            decision,
            context: ctx.value,
        }
    }
}

/// The stub request phase of a plugin without one; the host does not call
/// it, and it lets the request through should one call it anyway.
pub trait NoRequest {
    /// Whether the plugin implements the request phase.
    fn has_request(self) -> bool;
    /// Lets the request through.
    fn on_request(self, req: &Request) -> RequestOutcome;
}

impl<P> NoRequest for &Probe<P> {
    fn has_request(self) -> bool {
        false
    }

    fn on_request(self, _req: &Request) -> RequestOutcome {
        RequestOutcome {
            decision: RequestDecision::Continue,
            context: None,
        }
    }
}

/// The response phase of a plugin that implements it.
pub trait HasResponse {
    /// Whether the plugin implements the response phase.
    fn has_response(self) -> bool;
    /// Runs the response phase.
    fn on_response(
        self,
        req: &Request,
        resp: &ResponseHead,
        context: Option<Vec<u8>>,
    ) -> ResponseDecision;
}

impl<P: OnResponse> HasResponse for &&Probe<P> {
    fn has_response(self) -> bool {
        true
    }

    fn on_response(
        self,
        req: &Request,
        resp: &ResponseHead,
        context: Option<Vec<u8>>,
    ) -> ResponseDecision {
        let ctx = Context { value: context };
        with_plugin::<P, _>(|plugin| plugin.on_response(req, resp, &ctx))
    }
}

/// The stub response phase of a plugin without one.
pub trait NoResponse {
    /// Whether the plugin implements the response phase.
    fn has_response(self) -> bool;
    /// Lets the response through.
    fn on_response(
        self,
        req: &Request,
        resp: &ResponseHead,
        context: Option<Vec<u8>>,
    ) -> ResponseDecision;
}

impl<P> NoResponse for &Probe<P> {
    fn has_response(self) -> bool {
        false
    }

    fn on_response(
        self,
        _req: &Request,
        _resp: &ResponseHead,
        _context: Option<Vec<u8>>,
    ) -> ResponseDecision {
        ResponseDecision::Continue
    }
}
