//! Rate limits by API key tier, and per client IP for anonymous traffic:
//! in requests, and for LLM routes also in tokens.
//!
//! Each request takes tokens from a token bucket held by the node's
//! `counters` capability (so the plugin must be granted `counters`); the
//! buckets are shared by every instance on the node. A request whose bucket
//! is empty is answered 429. Configuration:
//!
//! ```json
//! {
//!   "tiers": {
//!     "free": { "rate_per_second": 5, "burst": 20,
//!               "tokens": { "per_minute": 1000, "per_day": 100000 } },
//!     "pro":  { "rate_per_second": 100, "burst": 200 }
//!   },
//!   "keys": { "k-alice": "free", "k-bob": "pro" },
//!   "anonymous": { "rate_per_second": 5, "burst": 20 },
//!   "key_header": "x-api-key",
//!   "cost_header": "x-request-cost",
//!   "path_prefixes": ["/v1/"],
//!   "tier_header": "x-breakwater-tier",
//!   "token_estimate": { "default_max_tokens": 256, "min_completion_tokens": 1,
//!                       "cached_cost": 0, "bytes_per_token": 4 }
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
//!
//! # Token budgets
//!
//! An LLM request costs what it generates, which a request count cannot
//! see, so a limit (a tier's or `anonymous`) may also budget LLM tokens:
//! `tokens` holds `per_minute` and `per_day`, positive integers, at least
//! one of them. Each is a bucket of the node's `tokens` capability (granted
//! with `counters`), keyed by the request bucket's key: `tok-m:key:<key>`
//! (or `tok-m:ip:<client ip>`) refills `per_minute` tokens a minute and
//! holds `per_minute`; `tok-d:…` does the same with `per_day` over a day.
//!
//! A limited POST request whose limit has `tokens`, once its request rate
//! admitted it, reserves its worst case from every one of those buckets,
//! all or none:
//!
//! - its prompt, estimated as the body's bytes divided by `bytes_per_token`,
//!   rounded up (the `content-length` header's value when the route shows
//!   no body or the body was too large to show; 0 without either);
//! - its completion: the JSON body's `max_completion_tokens`, else its
//!   `max_tokens`, else `default_max_tokens`;
//! - fewer than `min_completion_tokens` completion tokens are not worth
//!   admitting: with less left than the prompt and that many, it is refused.
//!
//! The estimate only has to be a fair guess: when the answer has ended the
//! node settles the reservation to the real prompt and completion tokens,
//! giving back what was not used; a cached answer costs `cached_cost`, and a
//! request that gets no answer from upstream costs nothing. When a budget
//! holds less than the completion asked for, the node grants what it holds
//! and caps the upstream request's `max_tokens` there. `token_estimate` and
//! each of its fields are optional, with the defaults shown above.
//!
//! A request the budget cannot take now is answered as a request-rate
//! refusal is, with the body `{"error":"token_budget_exhausted",
//! "retry_after_ms":…,"request_id":"…"}` and the token policy
//! `"<tier>-tokens";q=<per_minute>;w=60` (`q=<per_day>;w=86400` without
//! `per_minute`). A request that can never fit (its prompt estimate and
//! `min_completion_tokens` exceed a bucket) gets 429 with
//! `{"error":"request_too_large_for_token_budget","message":"…",
//! "request_id":"…"}`, `RateLimit-Policy` and `RateLimit-Limit`, and no
//! `Retry-After`: waiting does not help. An admitted request's answer
//! carries the token policy as a second member of each list:
//! `RateLimit-Policy: "free";q=20;w=4, "free-tokens";q=1000;w=60` and
//! `RateLimit: "free";r=19;t=1, "free-tokens";r=<tokens left in the
//! emptiest bucket after the reservation>;t=<seconds until the policy's
//! bucket is full again>`. Should the node fail a reservation for any other
//! reason, the request goes on, as with a failed take.

use std::collections::BTreeMap;

use breakwater_sdk::counters::Bucket;
use breakwater_sdk::tokens::{self, Ask, Budget};
use breakwater_sdk::{
    Context, OnRequest, OnResponse, Plugin, Request, RequestChanges, RequestDecision, Response,
    ResponseChanges, ResponseDecision, ResponseHead, export_plugin,
};
use serde::de::{Deserializer, IgnoredAny};
use serde::{Deserialize, Serialize};

/// The node refuses counter keys longer than this many bytes.
const MAX_COUNTER_KEY: usize = 256;

/// The node fails a call that leaves a larger context than this.
const MAX_CONTEXT: usize = 4096;

/// The tier name reported in headers for anonymous traffic.
const ANONYMOUS: &str = "anonymous";

/// The key prefixes of the token buckets, before the request bucket's key.
const TOKENS_PER_MINUTE: &str = "tok-m:";
const TOKENS_PER_DAY: &str = "tok-d:";

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
    /// How a request's LLM tokens are estimated for the token budgets.
    token_estimate: TokenEstimate,
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
            token_estimate: TokenEstimate::default(),
        }
    }
}

/// A limit: its request bucket's shape, and optionally token budgets.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct Limit {
    /// Tokens refilled per second; must be positive.
    rate_per_second: f64,
    /// The most tokens held, i.e. the largest burst; at least 1.
    burst: u32,
    /// The LLM token budgets beside the request rate; none: no budget.
    tokens: Option<TokenBudgets>,
}

impl Limit {
    fn validate(&self, what: &str, estimate: &TokenEstimate) -> Result<(), String> {
        if !(self.rate_per_second.is_finite() && self.rate_per_second > 0.0) {
            return Err(format!(
                "{what}: `rate_per_second` must be a positive number, got {}",
                self.rate_per_second
            ));
        }
        if self.burst == 0 {
            return Err(format!("{what}: `burst` must be at least 1"));
        }
        match &self.tokens {
            Some(tokens) => tokens.validate(what, estimate),
            None => Ok(()),
        }
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

/// A limit's LLM token budgets: tokens per minute and per day.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct TokenBudgets {
    per_minute: Option<u32>,
    per_day: Option<u32>,
}

impl TokenBudgets {
    fn validate(&self, what: &str, estimate: &TokenEstimate) -> Result<(), String> {
        if self.per_minute.is_none() && self.per_day.is_none() {
            return Err(format!(
                "{what}: `tokens` needs `per_minute`, `per_day` or both"
            ));
        }
        for (name, budget) in [("per_minute", self.per_minute), ("per_day", self.per_day)] {
            match budget {
                Some(0) => {
                    return Err(format!(
                        "{what}: `tokens.{name}` must be a positive integer"
                    ));
                }
                // Even an empty prompt reserves `min_completion_tokens`.
                Some(budget) if budget < estimate.min_completion_tokens => {
                    return Err(format!(
                        "{what}: `tokens.{name}` ({budget}) is below \
                         `token_estimate.min_completion_tokens` ({}): no request would fit",
                        estimate.min_completion_tokens
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The buckets: key prefix, tokens per window, window in seconds.
    fn buckets(&self) -> impl Iterator<Item = (&'static str, u32, u32)> {
        let per_minute = self.per_minute.map(|q| (TOKENS_PER_MINUTE, q, 60));
        let per_day = self.per_day.map(|q| (TOKENS_PER_DAY, q, 86_400));
        per_minute.into_iter().chain(per_day)
    }

    /// The budgets a request with the request bucket `identity` draws from.
    fn budgets(&self, identity: &str) -> Vec<Budget> {
        self.buckets()
            .map(|(prefix, quota, window)| {
                Budget::new(
                    bucket_key(prefix, identity),
                    f64::from(quota) / f64::from(window),
                    quota,
                )
            })
            .collect()
    }

    /// The policy the `RateLimit` headers show for the tier's tokens: the
    /// shortest window's bucket.
    fn policy(&self, tier: &str) -> Policy {
        // `validate` ensures at least one bucket; the fallback is unreachable.
        let (_, quota, window) = self.buckets().next().unwrap_or(("", 1, 60));
        Policy {
            name: format!("{tier}-tokens"),
            quota,
            window_secs: u64::from(window),
        }
    }
}

/// How a request's tokens are estimated at admission; see the module
/// documentation.
#[derive(Deserialize, Clone, Copy)]
#[serde(default, deny_unknown_fields)]
struct TokenEstimate {
    /// The completion reserved for a request that sets no `max_tokens`.
    default_max_tokens: u32,
    /// The fewest completion tokens worth admitting a request for.
    min_completion_tokens: u32,
    /// What an answer from the node's cache costs.
    cached_cost: u32,
    /// Body bytes per prompt token in the prompt estimate.
    bytes_per_token: u32,
}

impl Default for TokenEstimate {
    fn default() -> Self {
        TokenEstimate {
            default_max_tokens: 256,
            min_completion_tokens: 1,
            cached_cost: 0,
            bytes_per_token: 4,
        }
    }
}

impl TokenEstimate {
    fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("default_max_tokens", self.default_max_tokens),
            ("min_completion_tokens", self.min_completion_tokens),
            ("bytes_per_token", self.bytes_per_token),
        ] {
            if value == 0 {
                return Err(format!("`token_estimate.{name}` must be at least 1"));
            }
        }
        if self.min_completion_tokens > self.default_max_tokens {
            return Err(
                "`token_estimate.min_completion_tokens` must not exceed `default_max_tokens`"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// What `req` may cost: its prompt estimate and completion bounds.
    fn ask(&self, req: &Request) -> Ask {
        let body_bytes = match &req.body {
            Some(body) => body.len() as u64,
            None => req
                .header("content-length")
                .and_then(|length| length.trim().parse::<u64>().ok())
                .unwrap_or(0),
        };
        let prompt = body_bytes.div_ceil(u64::from(self.bytes_per_token));
        let asked = req
            .json_body::<Completion>()
            .and_then(|body| body.max_completion_tokens.or(body.max_tokens));
        Ask {
            prompt_estimate: saturate(prompt),
            max_completion: asked.map_or(self.default_max_tokens, saturate),
            min_completion: self.min_completion_tokens,
            cached_cost: self.cached_cost,
        }
    }
}

/// The completion bounds of an LLM request body; other fields are ignored.
#[derive(Deserialize)]
struct Completion {
    #[serde(default, deserialize_with = "count")]
    max_completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    max_tokens: Option<u64>,
}

/// A non-negative integer, or none for anything else (`null`, a string, a
/// negative number): one odd field leaves the default, not a failed parse.
fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Count {
        Whole(u64),
        Other(IgnoredAny),
    }
    Ok(match Option::<Count>::deserialize(deserializer)? {
        Some(Count::Whole(count)) => Some(count),
        Some(Count::Other(_)) | None => None,
    })
}

fn saturate(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// Whether `ask` could never fit `budgets`: its prompt and smallest
/// completion exceed a bucket even when full.
fn never_fits(budgets: &[Budget], ask: &Ask) -> bool {
    let smallest = u64::from(ask.prompt_estimate) + u64::from(ask.min_completion);
    budgets
        .iter()
        .any(|budget| smallest > u64::from(budget.burst))
}

/// A policy as the `RateLimit` headers show it.
struct Policy {
    /// The policy's name: the tier, or `<tier>-tokens`.
    name: String,
    /// The most the bucket holds.
    quota: u32,
    /// Seconds for the empty bucket to refill.
    window_secs: u64,
}

impl Policy {
    /// The request-rate policy of `tier`.
    fn requests(tier: &str, limit: &Limit) -> Self {
        Policy {
            name: tier.to_owned(),
            quota: limit.burst,
            window_secs: limit.window_secs(),
        }
    }

    /// The `RateLimit-Policy` list member.
    fn field(&self) -> String {
        format!("\"{}\";q={};w={}", self.name, self.quota, self.window_secs)
    }

    /// The `RateLimit` list member.
    fn state(&self, remaining: u64, secs: u64) -> String {
        format!("\"{}\";r={remaining};t={secs}", self.name)
    }

    /// Seconds until the bucket holding `remaining` is full again, rounded
    /// up; in whole numbers, so a full window reads exactly `window_secs`.
    fn refill_secs(&self, remaining: u64) -> u64 {
        let quota = u64::from(self.quota);
        let missing = quota.saturating_sub(remaining);
        (missing * self.window_secs).div_ceil(quota.max(1))
    }

    /// The 429 answer of a request this policy refuses, with `body`. A
    /// refusal that waiting lifts (`wait`: tokens remaining and the wait in
    /// milliseconds) says how long; one that waiting cannot lift says only
    /// the policy.
    fn refuse(&self, body: &impl Serialize, wait: Option<(u64, u64)>) -> RequestDecision {
        let response = Response::json(429, body);
        let response = match wait {
            Some((remaining, retry_after_ms)) => {
                let reset_secs = retry_after_ms.div_ceil(1000).max(1);
                response
                    .header("retry-after", &reset_secs.to_string())
                    .header("ratelimit-policy", &self.field())
                    .header("ratelimit", &self.state(remaining, reset_secs))
                    .header("ratelimit-limit", &self.quota.to_string())
                    .header("ratelimit-remaining", &remaining.to_string())
                    .header("ratelimit-reset", &reset_secs.to_string())
            }
            None => response
                .header("ratelimit-policy", &self.field())
                .header("ratelimit-limit", &self.quota.to_string()),
        };
        RequestDecision::Respond(response)
    }
}

/// The body of a 429 answer that a wait lifts.
#[derive(Serialize)]
struct Limited<'r> {
    error: &'static str,
    retry_after_ms: u64,
    request_id: &'r str,
}

/// The body of a 429 answer to a request too large for its token budget.
#[derive(Serialize)]
struct TooLarge<'r> {
    error: &'static str,
    message: &'r str,
    request_id: &'r str,
}

struct RateLimit {
    config: Config,
}

impl Plugin for RateLimit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        config.token_estimate.validate()?;
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
            limit.validate(&format!("tier `{name}`"), &config.token_estimate)?;
        }
        if let Some(anonymous) = &config.anonymous {
            anonymous.validate("`anonymous`", &config.token_estimate)?;
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
            let Some(limit) = config.tiers.get(tier) else {
                return Err(format!(
                    "a key refers to tier `{tier}`, which `tiers` does not define"
                ));
            };
            // The token buckets' keys are longer by their prefix (both
            // prefixes have the same length).
            let token_key = bucket_key(TOKENS_PER_MINUTE, &bucket_key("key:", key));
            if limit.tokens.is_some() && token_key.len() > MAX_COUNTER_KEY {
                return Err(format!(
                    "API keys of tier `{tier}`, which has `tokens`, must be at most {} bytes",
                    MAX_COUNTER_KEY - (token_key.len() - key.len())
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
        let policy = Policy::requests(tier, &limit);
        if !taken.allowed {
            let body = Limited {
                error: "rate_limited",
                retry_after_ms: taken.retry_after_ms,
                request_id: &req.request_id,
            };
            return policy.refuse(&body, Some((taken.remaining, taken.retry_after_ms)));
        }
        // The `RateLimit-Policy` and `RateLimit` lists of the answer.
        let mut policies = policy.field();
        let mut states = policy.state(taken.remaining, limit.refill_secs(taken.remaining));

        let token_limit = limit
            .tokens
            .filter(|_| req.method.eq_ignore_ascii_case("POST"));
        if let Some(token_limit) = token_limit {
            let policy = token_limit.policy(tier);
            let budgets = token_limit.budgets(&bucket);
            let ask = config.token_estimate.ask(req);
            match tokens::reserve(&budgets, ask) {
                Ok(grant) if grant.allowed => {
                    let refill_secs = policy.refill_secs(grant.remaining);
                    policies = format!("{policies}, {}", policy.field());
                    states = format!("{states}, {}", policy.state(grant.remaining, refill_secs));
                }
                Ok(grant) => {
                    let body = Limited {
                        error: "token_budget_exhausted",
                        retry_after_ms: grant.retry_after_ms,
                        request_id: &req.request_id,
                    };
                    return policy.refuse(&body, Some((grant.remaining, grant.retry_after_ms)));
                }
                Err(message) if never_fits(&budgets, &ask) => {
                    let body = TooLarge {
                        error: "request_too_large_for_token_budget",
                        message: &message,
                        request_id: &req.request_id,
                    };
                    return policy.refuse(&body, None);
                }
                // Fail open, as for a take: see the module documentation.
                Err(_) => {}
            }
        }

        let context = format!("{policies}\n{states}");
        // Only absurdly long tier names get here; the answer then goes
        // without the headers rather than failing the call.
        if context.len() <= MAX_CONTEXT {
            ctx.set(context);
        }
        go_on()
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
    /// Adds the headers the request phase left for an allowed request: the
    /// context is the `RateLimit-Policy` list, a newline, and the
    /// `RateLimit` list.
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

// The host calls cannot run off the node, so these cover what is plain Rust:
// the configuration, the estimate and the headers.
#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(config: &str) -> Result<RateLimit, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| e.to_string())?;
        RateLimit::new(config)
    }

    fn request(method: &str, headers: &[(&str, &str)], body: Option<&str>) -> Request {
        Request {
            method: method.to_owned(),
            host: "localhost".to_owned(),
            path: "/v1/chat/completions".to_owned(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            client_ip: "192.0.2.1".to_owned(),
            request_id: "r-1".to_owned(),
            body: body.map(|b| b.as_bytes().to_vec()),
        }
    }

    #[test]
    fn token_budgets_are_validated() {
        let tier = |tokens: &str| {
            plugin(&format!(
                r#"{{"tiers": {{"free": {{"rate_per_second": 5, "burst": 20, "tokens": {tokens}}}}}}}"#
            ))
        };
        assert!(tier(r#"{"per_minute": 1000, "per_day": 100000}"#).is_ok());
        assert!(tier(r#"{"per_day": 100000}"#).is_ok());
        let err = |result: Result<RateLimit, String>| result.err().unwrap_or_default();
        assert!(err(tier("{}")).contains("`per_minute`, `per_day` or both"));
        assert!(err(tier(r#"{"per_minute": 0}"#)).contains("positive"));
        assert!(err(tier(r#"{"per_minute": -1}"#)).contains("invalid value"));
        assert!(err(tier(r#"{"per_minute": 10, "per_hour": 1}"#)).contains("unknown field"));
        let anonymous = plugin(
            r#"{"anonymous": {"rate_per_second": 1, "burst": 1, "tokens": {"per_day": 8}},
                "token_estimate": {"min_completion_tokens": 16}}"#,
        );
        assert!(err(anonymous).contains("below `token_estimate.min_completion_tokens`"));
    }

    #[test]
    fn token_estimate_is_validated() {
        assert!(plugin(r#"{"token_estimate": {}}"#).is_ok());
        for field in [
            "default_max_tokens",
            "min_completion_tokens",
            "bytes_per_token",
        ] {
            let result = plugin(&format!(r#"{{"token_estimate": {{"{field}": 0}}}}"#));
            assert!(result.err().unwrap_or_default().contains(field), "{field}");
        }
        let result =
            plugin(r#"{"token_estimate": {"default_max_tokens": 8, "min_completion_tokens": 9}}"#);
        assert!(result.is_err());
    }

    #[test]
    fn keys_leave_room_for_the_token_prefix() {
        let config = |tokens: &str, key: &str| {
            plugin(&format!(
                r#"{{"tiers": {{"t": {{"rate_per_second": 1, "burst": 1{tokens}}}}},
                    "keys": {{"{key}": "t"}}}}"#
            ))
        };
        let tokens = r#", "tokens": {"per_minute": 10}"#;
        let longest = "k".repeat(MAX_COUNTER_KEY - "tok-m:key:".len());
        assert!(config(tokens, &longest).is_ok());
        let longer = format!("{longest}k");
        assert!(config("", &longer).is_ok());
        let err = config(tokens, &longer).err().unwrap_or_default();
        assert!(err.contains("at most 246 bytes"), "{err}");
    }

    #[test]
    fn the_ask_estimates_the_prompt_and_reads_max_tokens() {
        let estimate = TokenEstimate::default();
        let ask = estimate.ask(&request("POST", &[], Some(r#"{"max_tokens": 50}"#)));
        // 18 bytes at 4 a token, rounded up.
        assert_eq!(ask.prompt_estimate, 5);
        assert_eq!(ask.max_completion, 50);
        assert_eq!(ask.min_completion, 1);
        assert_eq!(ask.cached_cost, 0);

        let both = r#"{"max_completion_tokens": 7, "max_tokens": 50}"#;
        assert_eq!(
            estimate
                .ask(&request("POST", &[], Some(both)))
                .max_completion,
            7
        );
        // An odd field falls through to the next, then to the default.
        let odd = r#"{"max_completion_tokens": "7", "max_tokens": null}"#;
        assert_eq!(
            estimate
                .ask(&request("POST", &[], Some(odd)))
                .max_completion,
            256
        );
        let odd = r#"{"max_completion_tokens": -1, "max_tokens": 9}"#;
        assert_eq!(
            estimate
                .ask(&request("POST", &[], Some(odd)))
                .max_completion,
            9
        );
        let huge = r#"{"max_tokens": 99999999999}"#;
        assert_eq!(
            estimate
                .ask(&request("POST", &[], Some(huge)))
                .max_completion,
            u32::MAX
        );
        let not_json = estimate.ask(&request("POST", &[], Some("hello")));
        assert_eq!(
            (not_json.prompt_estimate, not_json.max_completion),
            (2, 256)
        );
        let empty = estimate.ask(&request("POST", &[("content-length", "400")], Some("")));
        assert_eq!(empty.prompt_estimate, 0);
    }

    #[test]
    fn an_unseen_body_is_estimated_from_its_length() {
        let estimate = TokenEstimate {
            bytes_per_token: 3,
            ..TokenEstimate::default()
        };
        let too_large = request(
            "POST",
            &[
                ("breakwater-body-too-large", "1024"),
                ("content-length", " 4000 "),
            ],
            None,
        );
        let ask = estimate.ask(&too_large);
        assert_eq!((ask.prompt_estimate, ask.max_completion), (1334, 256));
        assert_eq!(estimate.ask(&request("POST", &[], None)).prompt_estimate, 0);
        let bogus = request("POST", &[("content-length", "lots")], None);
        assert_eq!(estimate.ask(&bogus).prompt_estimate, 0);
    }

    #[test]
    fn token_budgets_name_their_buckets_and_policy() {
        let both = TokenBudgets {
            per_minute: Some(1000),
            per_day: Some(100_000),
        };
        let budgets = both.budgets("key:k-alice");
        let keys: Vec<&str> = budgets.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(keys, ["tok-m:key:k-alice", "tok-d:key:k-alice"]);
        assert_eq!((budgets[0].burst, budgets[1].burst), (1000, 100_000));
        assert!((budgets[0].rate_per_second - 1000.0 / 60.0).abs() < 1e-9);
        assert!((budgets[1].rate_per_second - 100_000.0 / 86_400.0).abs() < 1e-9);

        let policy = both.policy("free");
        assert_eq!(policy.field(), r#""free-tokens";q=1000;w=60"#);
        assert_eq!(policy.refill_secs(1000), 0);
        assert_eq!(policy.refill_secs(744), 16);
        assert_eq!(policy.refill_secs(0), 60);
        assert_eq!(policy.state(744, 16), r#""free-tokens";r=744;t=16"#);

        let daily = TokenBudgets {
            per_minute: None,
            per_day: Some(86_400),
        };
        assert_eq!(
            daily.policy("anonymous").field(),
            r#""anonymous-tokens";q=86400;w=86400"#
        );
        assert_eq!(daily.budgets("ip:192.0.2.1")[0].key, "tok-d:ip:192.0.2.1");
    }

    #[test]
    fn a_request_never_fits_when_its_smallest_reservation_exceeds_a_burst() {
        let budgets = TokenBudgets {
            per_minute: Some(100),
            per_day: Some(1000),
        }
        .budgets("ip:192.0.2.1");
        let ask = |prompt_estimate, min_completion| Ask {
            prompt_estimate,
            max_completion: 500,
            min_completion,
            cached_cost: 0,
        };
        assert!(!never_fits(&budgets, &ask(99, 1)));
        assert!(never_fits(&budgets, &ask(100, 1)));
        assert!(never_fits(&budgets, &ask(50, 51)));
        assert!(never_fits(&budgets, &ask(u32::MAX, u32::MAX)));
    }

    #[test]
    fn refusals_carry_their_policy() {
        let policy = TokenBudgets {
            per_minute: Some(1000),
            per_day: None,
        }
        .policy("free");
        let headers = |decision: RequestDecision| match decision {
            RequestDecision::Respond(response) => {
                assert_eq!(response.status, 429);
                response.headers
            }
            _ => panic!("not an answer"),
        };
        let body = Limited {
            error: "token_budget_exhausted",
            retry_after_ms: 1500,
            request_id: "r-1",
        };
        let waited = headers(policy.refuse(&body, Some((3, 1500))));
        let find = |headers: &[(String, String)], name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(find(&waited, "retry-after").as_deref(), Some("2"));
        assert_eq!(
            find(&waited, "ratelimit").as_deref(),
            Some(r#""free-tokens";r=3;t=2"#)
        );
        assert_eq!(find(&waited, "ratelimit-limit").as_deref(), Some("1000"));

        let body = TooLarge {
            error: "request_too_large_for_token_budget",
            message: "never",
            request_id: "r-1",
        };
        let never = headers(policy.refuse(&body, None));
        assert_eq!(find(&never, "retry-after"), None);
        assert_eq!(find(&never, "ratelimit"), None);
        assert_eq!(
            find(&never, "ratelimit-policy").as_deref(),
            Some(r#""free-tokens";q=1000;w=60"#)
        );
    }

    #[test]
    fn answers_carry_every_policy_left_in_the_context() {
        let Ok(plugin) = plugin("{}") else {
            panic!("the empty configuration is refused");
        };
        let mut ctx = Context::default();
        ctx.set("\"free\";q=20;w=4, \"free-tokens\";q=1000;w=60\n\"free\";r=19;t=1, \"free-tokens\";r=744;t=16");
        let head = ResponseHead {
            status: 200,
            headers: Vec::new(),
        };
        let ResponseDecision::ContinueWith(changes) =
            plugin.on_response(&request("POST", &[], None), &head, &ctx)
        else {
            panic!("no headers");
        };
        assert_eq!(
            changes.set_headers,
            [
                (
                    "ratelimit-policy".to_owned(),
                    r#""free";q=20;w=4, "free-tokens";q=1000;w=60"#.to_owned()
                ),
                (
                    "ratelimit".to_owned(),
                    r#""free";r=19;t=1, "free-tokens";r=744;t=16"#.to_owned()
                ),
            ]
        );
    }
}
