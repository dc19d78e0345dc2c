//! Decides how the edge cache treats a request: its cache key, its TTL, or
//! a bypass.
//!
//! Configuration (every field optional; the defaults are shown):
//!
//! ```json
//! {
//!   "drop_query_params": ["utm_*", "fbclid", "gclid"],
//!   "vary_headers": [],
//!   "routes": [],
//!   "default_ttl": null,
//!   "bypass_cookies": [],
//!   "ai_paths": ["/v1/chat/completions", "/v1/completions"],
//!   "tenant": "api_key"
//! }
//! ```
//!
//! A fuller example:
//!
//! ```json
//! {
//!   "vary_headers": ["Accept-Language"],
//!   "routes": [
//!     { "path_prefix": "/static/", "ttl": 86400 },
//!     { "path_prefix": "/v1/", "ttl": 300, "shareable": true },
//!     { "path_prefix": "/", "ttl": 60 }
//!   ],
//!   "bypass_cookies": ["session"]
//! }
//! ```
//!
//! - `drop_query_params`: query parameter names left out of the key,
//!   compared exactly (case-sensitively); a trailing `*` matches any name
//!   with that prefix (`utm_*`).
//! - `vary_headers`: request headers whose values are part of the key.
//! - `routes`: tried in order on the path without its query; the first whose
//!   `path_prefix` (a plain string prefix) matches gives the TTL in seconds
//!   (`ttl`, a non-negative integer) and whether requests carrying
//!   `Authorization` may share the cache (`shareable`, default false).
//!   Without a match, `default_ttl` applies, and without that no TTL is set
//!   (the cache's own rules decide).
//! - `bypass_cookies`: cookie names whose presence bypasses the cache.
//! - `ai_paths`: paths (without query, exact) of OpenAI-style completion
//!   endpoints whose `POST` bodies may be cached.
//! - `tenant`: whose cached completions a request may read. `"api_key"`
//!   (the default): each API key (`Authorization`, else `X-Api-Key`) has its
//!   own entries, and requests without one share theirs. `{"header":
//!   "x-tier"}`: requests with the same value of that header share (a tier,
//!   an organisation set by an earlier plugin or a trusted proxy).
//!   `"shared"`: every caller shares, for public answers only.
//!
//! Decisions, in this order:
//! 1. A method other than `GET` and `HEAD` bypasses, except `POST` to an
//!    `ai_paths` entry (step 4).
//! 2. `Authorization` present bypasses unless the matched route is
//!    `shareable` or the request is a completion (its key names the tenant).
//! 3. A cookie named in `bypass_cookies` bypasses.
//! 4. `POST` to an AI path: the JSON body (only when the host buffered it;
//!    absent, too large, malformed or not an object bypasses) is cacheable
//!    when the answer is deterministic: its `temperature` is the number 0
//!    (absent means the API default of 1), or it carries an integer `seed`.
//!    A client's `Cache-Control: max-age=N` makes any completion cacheable
//!    for N seconds. `Cache-Control: no-store` or `no-cache` always
//!    bypasses. The key hashes the canonical JSON of the whole body but the
//!    fields that never change the answer ([`UNKEYED_FIELDS`]): unknown
//!    fields are keyed, so a new API parameter never shares an answer it
//!    would change. `stream` is keyed too: a streamed answer and a whole
//!    one are stored apart.
//! 5. Otherwise the request continues with its key and TTL.
//!
//! Key formats, fields joined by `|`:
//! - `GET|host|/path?a=1&b=2|accept-language=en` — the method; the host
//!   lower-cased; the path with the query's dropped parameters removed and
//!   the rest sorted by name then value (each kept as sent, not decoded;
//!   no `?` when none remains); and, only when `vary_headers` is set, each
//!   header as `name=value` in the configured order, joined by `&`, with the
//!   name lower-cased, every value of the header joined by `,` as sent, and
//!   `%`, `&`, `=` and `|` in values percent-encoded; a header that is absent
//!   is written as its bare name.
//! - `POST|host|/v1/chat/completions|<tenant>|<sha256 hex>` — the same
//!   normalized host and path; the tenant: `-` (shared, or no API key),
//!   `key:` and the first 32 hex digits of the API key's SHA-256, or `hdr:`
//!   and the header's value escaped as vary values are; then the hex
//!   SHA-256 of the canonical body: an object of the keyed fields present
//!   in the body, object keys sorted at every depth,
//!   no whitespace, numbers with an integral value written as integers
//!   (`0.0` and `0` are the same). The vary headers follow as for `GET`.
//!
//! It imports no host capability, so it loads with none granted.

use std::time::Duration;

use breakwater_sdk::{
    Context, OnRequest, Plugin, Request, RequestChanges, RequestDecision, export_plugin,
};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Body fields that never change a completion's answer: who asks
/// (`user`), bookkeeping (`metadata`, `store`) and the queue it waits in
/// (`service_tier`). Every other field, known or not, is part of the key.
const UNKEYED_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier"];

/// Whose cached completions a request may read.
#[derive(Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Tenant {
    /// One tenant per API key; requests without one share.
    #[default]
    ApiKey,
    /// One tenant per value of this request header.
    Header(String),
    /// Everyone shares.
    Shared,
}

/// The plugin's configuration; unknown fields refuse the load.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    drop_query_params: Vec<String>,
    vary_headers: Vec<String>,
    routes: Vec<Route>,
    default_ttl: Option<u64>,
    bypass_cookies: Vec<String>,
    ai_paths: Vec<String>,
    tenant: Tenant,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            drop_query_params: ["utm_*", "fbclid", "gclid"].map(String::from).to_vec(),
            vary_headers: Vec::new(),
            routes: Vec::new(),
            default_ttl: None,
            bypass_cookies: Vec::new(),
            ai_paths: ["/v1/chat/completions", "/v1/completions"]
                .map(String::from)
                .to_vec(),
            tenant: Tenant::ApiKey,
        }
    }
}

/// A route: its TTL in seconds and whether authorized requests may share.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    path_prefix: String,
    ttl: u64,
    #[serde(default)]
    shareable: bool,
}

/// A query parameter name to drop.
enum ParamPattern {
    Exact(String),
    Prefix(String),
}

impl ParamPattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            ParamPattern::Exact(exact) => name == exact,
            ParamPattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

struct CachePolicy {
    drop: Vec<ParamPattern>,
    /// Lower-cased.
    vary_headers: Vec<String>,
    routes: Vec<Route>,
    default_ttl: Option<u64>,
    bypass_cookies: Vec<String>,
    ai_paths: Vec<String>,
    tenant: Tenant,
}

impl Plugin for CachePolicy {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let drop = config
            .drop_query_params
            .into_iter()
            .map(|name| match name.strip_suffix('*') {
                Some(prefix) => ParamPattern::Prefix(prefix.to_owned()),
                None => ParamPattern::Exact(name),
            })
            .collect();
        for route in &config.routes {
            if route.path_prefix.is_empty() {
                return Err(
                    "a route's `path_prefix` is empty; use \"/\" to match every path".into(),
                );
            }
        }
        Ok(CachePolicy {
            drop,
            vary_headers: config
                .vary_headers
                .iter()
                .map(|name| name.to_ascii_lowercase())
                .collect(),
            routes: config.routes,
            default_ttl: config.default_ttl,
            bypass_cookies: config.bypass_cookies,
            ai_paths: config.ai_paths,
            tenant: match config.tenant {
                Tenant::Header(name) => Tenant::Header(name.to_ascii_lowercase()),
                other => other,
            },
        })
    }
}

impl OnRequest for CachePolicy {
    fn on_request(&self, req: &Request, _ctx: &mut Context) -> RequestDecision {
        match self.decide(req) {
            Some((key, ttl)) => {
                let mut changes = RequestChanges::default().cache_key(&key);
                if let Some(seconds) = ttl {
                    changes = changes.cache_ttl(Duration::from_secs(seconds));
                }
                RequestDecision::ContinueWith(changes)
            }
            None => RequestDecision::ContinueWith(RequestChanges::default().bypass_cache()),
        }
    }
}

impl CachePolicy {
    /// The key and TTL in seconds, or none to bypass.
    fn decide(&self, req: &Request) -> Option<(String, Option<u64>)> {
        let method = req.method.to_ascii_uppercase();
        let path = req.path_only();
        let ai = method == "POST" && self.ai_paths.iter().any(|p| p == path);
        if !(ai || method == "GET" || method == "HEAD") {
            return None;
        }
        let route = self
            .routes
            .iter()
            .find(|r| path.starts_with(&r.path_prefix));
        if req.header("authorization").is_some() && !ai && !route.is_some_and(|r| r.shareable) {
            return None;
        }
        if self.has_bypass_cookie(req) {
            return None;
        }
        let route_ttl = route.map(|r| r.ttl).or(self.default_ttl);
        let mut key = format!(
            "{method}|{}|{}",
            req.host.to_ascii_lowercase(),
            self.target(req)
        );
        let ttl = if ai {
            let (digest, ttl) = ai_digest(req, route_ttl)?;
            key.push('|');
            key.push_str(&self.tenant_part(req));
            key.push('|');
            key.push_str(&digest);
            ttl
        } else {
            route_ttl
        };
        if !self.vary_headers.is_empty() {
            key.push('|');
            key.push_str(&self.vary_part(req));
        }
        Some((key, ttl))
    }

    /// Who may read this completion's entry (see the key formats).
    fn tenant_part(&self, req: &Request) -> String {
        let named = match &self.tenant {
            Tenant::Shared => None,
            Tenant::ApiKey => req
                .header("authorization")
                .or_else(|| req.header("x-api-key"))
                .map(|key| format!("key:{}", &hex(&Sha256::digest(key.as_bytes()))[..32])),
            Tenant::Header(name) => {
                let vals: Vec<&str> = values(req, name).collect();
                (!vals.is_empty()).then(|| format!("hdr:{}", escape(&vals.join(","))))
            }
        };
        named.unwrap_or_else(|| "-".to_owned())
    }

    fn has_bypass_cookie(&self, req: &Request) -> bool {
        if self.bypass_cookies.is_empty() {
            return false;
        }
        values(req, "cookie")
            .flat_map(|value| value.split(';'))
            .map(|pair| pair.split_once('=').map_or(pair, |(name, _)| name).trim())
            .any(|name| self.bypass_cookies.iter().any(|c| c == name))
    }

    /// The path with the query normalized: dropped parameters removed, the
    /// rest sorted by name then value.
    fn target(&self, req: &Request) -> String {
        let path = req.path_only();
        let mut params: Vec<(&str, Option<&str>)> = req
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|piece| !piece.is_empty())
            .map(|piece| match piece.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (piece, None),
            })
            .filter(|(name, _)| !self.drop.iter().any(|p| p.matches(name)))
            .collect();
        if params.is_empty() {
            return path.to_owned();
        }
        params.sort();
        let query: Vec<String> = params
            .iter()
            .map(|(name, value)| match value {
                Some(value) => format!("{name}={value}"),
                None => (*name).to_owned(),
            })
            .collect();
        format!("{path}?{}", query.join("&"))
    }

    fn vary_part(&self, req: &Request) -> String {
        let parts: Vec<String> = self
            .vary_headers
            .iter()
            .map(|name| {
                let vals: Vec<&str> = values(req, name).collect();
                if vals.is_empty() {
                    name.clone()
                } else {
                    format!("{name}={}", escape(&vals.join(",")))
                }
            })
            .collect();
        parts.join("&")
    }
}

/// Every value of header `name`, in the order sent.
fn values<'r>(req: &'r Request, name: &'r str) -> impl Iterator<Item = &'r str> + 'r {
    req.headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Percent-encodes the characters that separate the key's parts.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '%' => out.push_str("%25"),
            '&' => out.push_str("%26"),
            '=' => out.push_str("%3D"),
            '|' => out.push_str("%7C"),
            c => out.push(c),
        }
    }
    out
}

/// The client's `Cache-Control` request: `Err` to bypass, `Ok(Some(n))`
/// for `max-age=n`.
fn client_cache_control(req: &Request) -> Result<Option<u64>, ()> {
    let mut max_age = None;
    for directive in values(req, "cache-control").flat_map(|v| v.split(',')) {
        let directive = directive.trim();
        let (name, value) = directive.split_once('=').unwrap_or((directive, ""));
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "no-store" | "no-cache" => return Err(()),
            "max-age" => {
                max_age = Some(
                    value
                        .trim()
                        .trim_matches('"')
                        .parse::<u64>()
                        .map_err(|_| ())?,
                );
            }
            _ => {}
        }
    }
    Ok(max_age)
}

/// The hex digest of the canonical body and the TTL, or none to bypass.
fn ai_digest(req: &Request, route_ttl: Option<u64>) -> Option<(String, Option<u64>)> {
    let max_age = client_cache_control(req).ok()?;
    let Value::Object(body) = serde_json::from_slice::<Value>(req.body.as_deref()?).ok()? else {
        return None;
    };
    let greedy = body
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let seeded = body
        .get("seed")
        .is_some_and(|seed| seed.is_i64() || seed.is_u64());
    let deterministic = greedy || seeded;
    let ttl = match max_age {
        Some(seconds) => Some(seconds),
        None if deterministic => route_ttl,
        None => return None,
    };
    let mut canonical = String::new();
    canonical.push('{');
    let mut fields: Vec<(&str, &Value)> = body
        .iter()
        .filter(|(name, _)| !UNKEYED_FIELDS.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str(), value))
        .collect();
    fields.sort_by_key(|(name, _)| *name);
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            canonical.push(',');
        }
        write_string(&mut canonical, name);
        canonical.push(':');
        write_canonical(&mut canonical, value);
    }
    canonical.push('}');
    Some((hex(&Sha256::digest(canonical.as_bytes())), ttl))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_string(out: &mut String, text: &str) {
    // Serializing a string cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}

/// Canonical JSON: object keys sorted, no whitespace, integral numbers as
/// integers.
fn write_canonical(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    // Exact: the value is an integer below 2^53.
                    #[allow(clippy::cast_possible_truncation)]
                    out.push_str(&(f as i64).to_string());
                } else {
                    out.push_str(&f.to_string());
                }
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by_key(|(k, _)| k.as_str());
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_canonical(out, v);
            }
            out.push('}');
        }
    }
}

export_plugin!(CachePolicy);
