//! Rate limits by API key tier, and per client IP for anonymous traffic.
//!
//! Each request takes tokens from a token bucket held by the node's
//! `counters` capability (so the plugin must be granted `counters`); the
//! buckets are shared by every instance on the node. A request whose bucket
//! is empty is answered 429. Configuration:
//!
//! ```json
//! {
//!   "tiers": {
//!     "free": { "rate_per_second": 5, "burst": 20 },
//!     "pro":  { "rate_per_second": 100, "burst": 200 }
//!   },
//!   "keys": { "k-alice": "free", "k-bob": "pro" },
//!   "anonymous": { "rate_per_second": 5, "burst": 20 },
//!   "key_header": "x-api-key",
//!   "cost_header": "x-request-cost",
//!   "path_prefixes": ["/v1/"],
//!   "tier_header": "x-breakwater-tier"
//! }
//! ```
//!
//! - The API key is read from `Authorization: Bearer <key>` first, then from
//!   `key_header` (default `x-api-key`). A known key takes from the bucket
//!   `key:<key>` with its tier's limit.
//! - A request with no key, or with a key not in `keys`, is anonymous: it
//!   takes from the bucket `ip:<client ip>` with the `anonymous` limit (as
//!   Envoy and Fastly do), so an invented key buys nothing over none. Without
//!   `anonymous`, anonymous traffic is not limited.
//! - `cost_header` (optional): the request's cost in tokens, an integer; a
//!   missing, unparsable or zero value costs 1, and a cost above the
//!   bucket's burst is capped at the burst (so it can still be taken).
//! - `path_prefixes` (optional): only paths starting with one of these are
//!   limited; by default every path is.
//! - `tier_header` (optional): every request that goes on carries this
//!   header set to its tier (its key's, or `anonymous`), replacing whatever
//!   the client sent, on every path. The node's priority tiers in load
//!   shedding (`[pool.concurrency.priority] header`) read it, so a client
//!   cannot promote itself by sending the header.
//!
//! A refused request gets status 429, the body
//! `{"error":"rate_limited","retry_after_ms":…,"request_id":"…"}`, and the
//! headers `Retry-After` (whole seconds, rounded up, at least 1),
//! `RateLimit-Policy: "<tier>";q=<burst>;w=<seconds to refill the burst>`
//! and `RateLimit: "<tier>";r=<remaining>;t=<seconds until retry>`
//! (draft-ietf-httpapi-ratelimit-headers-08), plus the older
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`. The tier
//! of anonymous traffic is named `anonymous`.
//!
//! Allowed requests continue unchanged (but for `tier_header`), and their
//! answers carry `RateLimit-Policy` and `RateLimit: "<tier>";r=<remaining>;
//! t=<seconds until the bucket is full again>`, so a well-behaved client can
//! slow down before it is refused. The request phase passes the two values
//! to the response phase in the request's context. Requests that are not
//! limited (outside `path_prefixes`, or anonymous without `anonymous`) get
//! neither header.
//!
//! Should the node refuse a take (for instance when it holds too many
//! buckets), the request is let through: a limiter failure must not take
//! the route down.

use std::collections::BTreeMap;

use breakwater_sdk::counters::Bucket;
use breakwater_sdk::{
    Context, OnRequest, OnResponse, Plugin, Request, RequestChanges, RequestDecision, Response,
    ResponseChanges, ResponseDecision, ResponseHead, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The node refuses counter keys longer than this many bytes.
const MAX_COUNTER_KEY: usize = 256;

/// The tier name reported in headers for anonymous traffic.
const ANONYMOUS: &str = "anonymous";

/// The plugin's configuration; unknown fields refuse the load.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// Tier name → limit.
    tiers: BTreeMap<String, Limit>,
    /// API key → tier name; every tier named must be in `tiers`.
    keys: BTreeMap<String, String>,
    /// The limit per client IP for requests without a known key; none
    /// leaves them unlimited.
    anonymous: Option<Limit>,
    /// The header carrying the API key when there is no bearer token.
    key_header: String,
    /// The header carrying the request's cost in tokens; none: cost 1.
    cost_header: Option<String>,
    /// The path prefixes limited; none: every path.
    path_prefixes: Option<Vec<String>>,
    /// The header set to the request's tier on every request that goes
    /// on; none: requests go on unchanged.
    tier_header: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tiers: BTreeMap::new(),
            keys: BTreeMap::new(),
            anonymous: None,
            key_header: "x-api-key".to_owned(),
            cost_header: None,
            path_prefixes: None,
            tier_header: None,
        }
    }
}

/// A token bucket's shape.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct Limit {
    /// Tokens refilled per second; must be positive.
    rate_per_second: f64,
    /// The most tokens held, i.e. the largest burst; at least 1.
    burst: u32,
}

impl Limit {
    fn validate(&self, what: &str) -> Result<(), String> {
        if !(self.rate_per_second.is_finite() && self.rate_per_second > 0.0) {
            return Err(format!(
                "{what}: `rate_per_second` must be a positive number, got {}",
                self.rate_per_second
            ));
        }
        if self.burst == 0 {
            return Err(format!("{what}: `burst` must be at least 1"));
        }
        Ok(())
    }

    /// Seconds for an empty bucket to refill completely, rounded up.
    fn window_secs(&self) -> u64 {
        ((f64::from(self.burst) / self.rate_per_second).ceil() as u64).max(1)
    }

    /// Seconds until a bucket holding `remaining` tokens is full again,
    /// rounded up; 0 when it is full.
    fn refill_secs(&self, remaining: u64) -> u64 {
        let missing = u64::from(self.burst).saturating_sub(remaining);
        (missing as f64 / self.rate_per_second).ceil() as u64
    }
}

/// The body of a 429 answer.
#[derive(Serialize)]
struct Limited<'r> {
    error: &'static str,
    retry_after_ms: u64,
    request_id: &'r str,
}

struct RateLimit {
    config: Config,
}

impl Plugin for RateLimit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        for (name, limit) in &config.tiers {
            // The name is sent as a quoted string in `RateLimit` headers.
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
            {
                return Err(format!(
                    "tier name {name:?} must be non-empty printable ASCII without `\"` or `\\`"
                ));
            }
            limit.validate(&format!("tier `{name}`"))?;
        }
        if let Some(anonymous) = &config.anonymous {
            anonymous.validate("`anonymous`")?;
        }
        for (key, tier) in &config.keys {
            if key.is_empty() {
                return Err("`keys` must not contain an empty key".to_owned());
            }
            if bucket_key("key:", key).len() > MAX_COUNTER_KEY {
                return Err(format!(
                    "API keys must be at most {} bytes",
                    MAX_COUNTER_KEY - "key:".len()
                ));
            }
            if !config.tiers.contains_key(tier) {
                return Err(format!(
                    "a key refers to tier `{tier}`, which `tiers` does not define"
                ));
            }
        }
        if config.key_header.is_empty() {
            return Err("`key_header` must not be empty".to_owned());
        }
        if config.cost_header.as_deref() == Some("") {
            return Err("`cost_header` must not be empty".to_owned());
        }
        let bad_tier_header = config.tier_header.as_deref().is_some_and(|name| {
            name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        });
        if bad_tier_header {
            return Err(
                "`tier_header` must be a header name (letters, digits and `-`), such as \
                 \"x-breakwater-tier\""
                    .to_owned(),
            );
        }
        // Written without let-chains: the workspace's MSRV is 1.85.
        let bad_prefixes = config
            .path_prefixes
            .as_ref()
            .is_some_and(|prefixes| prefixes.is_empty() || prefixes.iter().any(String::is_empty));
        if bad_prefixes {
            return Err(
                "`path_prefixes` must list non-empty prefixes (leave it out to limit every path)"
                    .to_owned(),
            );
        }
        Ok(RateLimit { config })
    }
}

impl OnRequest for RateLimit {
    fn on_request(&self, req: &Request, ctx: &mut Context) -> RequestDecision {
        let config = &self.config;
        let known = self
            .api_key(req)
            .and_then(|key| Some((key, config.keys.get(key)?)))
            .and_then(|(key, tier)| Some((key, tier, config.tiers.get(tier)?)));
        let tier = known.map_or(ANONYMOUS, |(_, tier, _)| tier.as_str());
        let go_on = || match &config.tier_header {
            Some(header) => {
                RequestDecision::ContinueWith(RequestChanges::default().set_header(header, tier))
            }
            None => RequestDecision::Continue,
        };
        if let Some(prefixes) = &config.path_prefixes {
            let path = req.path_only();
            if !prefixes.iter().any(|p| path.starts_with(p.as_str())) {
                return go_on();
            }
        }

        let (bucket, limit) = match known {
            Some((key, _, limit)) => (bucket_key("key:", key), *limit),
            None => match config.anonymous {
                Some(limit) => (bucket_key("ip:", &req.client_ip), limit),
                None => return go_on(),
            },
        };

        let cost = self.cost(req).min(limit.burst);
        let taken = match Bucket::new(limit.rate_per_second, limit.burst).take(&bucket, cost) {
            Ok(taken) => taken,
            // Fail open: see the module documentation.
            Err(_) => return go_on(),
        };
        let policy = format!("\"{tier}\";q={};w={}", limit.burst, limit.window_secs());
        if taken.allowed {
            let refill_secs = limit.refill_secs(taken.remaining);
            ctx.set(format!(
                "{policy}\n\"{tier}\";r={};t={refill_secs}",
                taken.remaining
            ));
            return go_on();
        }

        let reset_secs = taken.retry_after_ms.div_ceil(1000).max(1);
        let body = Limited {
            error: "rate_limited",
            retry_after_ms: taken.retry_after_ms,
            request_id: &req.request_id,
        };
        let response = Response::json(429, &body)
            .header("retry-after", &reset_secs.to_string())
            .header("ratelimit-policy", &policy)
            .header(
                "ratelimit",
                &format!("\"{tier}\";r={};t={reset_secs}", taken.remaining),
            )
            .header("ratelimit-limit", &limit.burst.to_string())
            .header("ratelimit-remaining", &taken.remaining.to_string())
            .header("ratelimit-reset", &reset_secs.to_string());
        RequestDecision::Respond(response)
    }
}

impl RateLimit {
    /// The API key: the bearer token, else the key header's value.
    fn api_key<'r>(&self, req: &'r Request) -> Option<&'r str> {
        let bearer = req.header("authorization").and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim())
                .filter(|token| !token.is_empty())
        });
        bearer.or_else(|| {
            req.header(&self.config.key_header)
                .map(str::trim)
                .filter(|key| !key.is_empty())
        })
    }

    /// The request's cost in tokens, at least 1.
    fn cost(&self, req: &Request) -> u32 {
        self.config
            .cost_header
            .as_deref()
            .and_then(|name| req.header(name))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map_or(1, |cost| u32::try_from(cost).unwrap_or(u32::MAX).max(1))
    }
}

/// The counter key for `id` under `prefix`.
fn bucket_key(prefix: &str, id: &str) -> String {
    format!("{prefix}{id}")
}

impl OnResponse for RateLimit {
    /// Adds the headers the request phase left for an allowed request.
    fn on_response(&self, _req: &Request, _resp: &ResponseHead, ctx: &Context) -> ResponseDecision {
        let Some((policy, limit)) = ctx.text().and_then(|text| text.split_once('\n')) else {
            return ResponseDecision::Continue;
        };
        ResponseDecision::ContinueWith(
            ResponseChanges::default()
                .set_header("ratelimit-policy", policy)
                .set_header("ratelimit", limit),
        )
    }
}

export_plugin!(RateLimit);
