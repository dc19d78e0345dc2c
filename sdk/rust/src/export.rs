//! The glue between the generated `Guest` trait and [`Plugin`].

use std::any::Any;
use std::cell::RefCell;

use crate::{Plugin, Request, RequestDecision, ResponseDecision, ResponseHead, config};

thread_local! {
    // The plugin built by `init` for this instance. Instances are fresh per
    // call, so this lives exactly as long as one request's phase.
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Parses the configuration, builds the plugin and keeps it for the phase
/// call that follows.
pub fn init<P: Plugin>(config: &str) -> Result<(), String> {
    let config = config::parse::<P::Config>(config)?;
    let plugin = P::new(config)?;
    INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

/// Runs [`Plugin::on_request`] on the instance's plugin.
pub fn on_request<P: Plugin>(req: &Request) -> RequestDecision {
    with_plugin::<P, _>(|plugin| plugin.on_request(req))
}

/// Runs [`Plugin::on_response`] on the instance's plugin.
pub fn on_response<P: Plugin>(req: &Request, resp: &ResponseHead) -> ResponseDecision {
    with_plugin::<P, _>(|plugin| plugin.on_response(req, resp))
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
