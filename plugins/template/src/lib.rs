//! The plugin to copy when writing a new one.
//!
//! It stamps a header on requests and responses and answers 403 for
//! configured path prefixes. Configuration (all optional):
//!
//! ```json
//! { "header": "x-breakwater", "value": "template", "deny_prefixes": ["/admin"] }
//! ```
//!
//! It imports no host capability, so it loads with none granted. Calling
//! `breakwater_sdk::log::info(…)` (or `kv`, `counters`, …) adds that import,
//! and the plugin's configuration must then grant it.

use breakwater_sdk::{
    Context, OnRequest, OnResponse, Plugin, Request, RequestChanges, RequestDecision, Response,
    ResponseChanges, ResponseDecision, ResponseHead, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The template's configuration.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// The header stamped on requests and responses.
    header: String,
    /// Its value.
    value: String,
    /// Paths starting with any of these are answered 403.
    deny_prefixes: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: "x-breakwater-plugin".to_owned(),
            value: "template".to_owned(),
            deny_prefixes: Vec::new(),
        }
    }
}

/// The body of a 403 answer: says why, and which request to look up in logs.
#[derive(Serialize)]
struct Forbidden<'r> {
    error: &'static str,
    request_id: &'r str,
}

struct Template {
    config: Config,
}

impl Plugin for Template {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.header.is_empty() {
            return Err("`header` must not be empty".to_owned());
        }
        Ok(Template { config })
    }
}

impl OnRequest for Template {
    fn on_request(&self, req: &Request, _ctx: &mut Context) -> RequestDecision {
        let path = req.path_only();
        if self
            .config
            .deny_prefixes
            .iter()
            .any(|prefix| path.starts_with(prefix.as_str()))
        {
            let body = Forbidden {
                error: "forbidden",
                request_id: &req.request_id,
            };
            return RequestDecision::Respond(Response::json(403, &body));
        }
        RequestDecision::ContinueWith(
            RequestChanges::default().set_header(&self.config.header, &self.config.value),
        )
    }
}

/// Implementing the response phase is optional: a plugin without it costs
/// nothing on the way back. What it needs from the request phase arrives in
/// `ctx` (the rate-limit plugin passes its counts that way).
impl OnResponse for Template {
    fn on_response(
        &self,
        _req: &Request,
        _resp: &ResponseHead,
        _ctx: &Context,
    ) -> ResponseDecision {
        ResponseDecision::ContinueWith(
            ResponseChanges::default().set_header(&self.config.header, &self.config.value),
        )
    }
}

export_plugin!(Template);
