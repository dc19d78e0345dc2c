//! Picks the upstream pool for a request.
//!
//! Rules are tried in order and the first whose matchers all hold decides;
//! a rule without matchers matches everything. When none matches, the
//! request goes to `default_pool`, or continues unchanged without one.
//! Configuration:
//!
//! ```json
//! {
//!   "rules": [
//!     { "host": "*.internal.example.com", "pool": "internal" },
//!     { "path_prefix": "/v2/", "rewrite_prefix": "/", "pool": "v2" },
//!     { "path_glob": "/users/*/avatar", "methods": ["GET", "HEAD"], "pool": "media" },
//!     { "headers": [{ "name": "x-beta", "present": true }], "pool": "beta" },
//!     {
//!       "path_prefix": "/v1/",
//!       "split": [{ "pool": "stable", "weight": 95 }, { "pool": "canary", "weight": 5 }],
//!       "sticky": { "header": "x-user-id" }
//!     }
//!   ],
//!   "default_pool": "main"
//! }
//! ```
//!
//! Matchers:
//! - `host`: the request's host (without port, trailing dot ignored),
//!   compared case-insensitively; `*.example.com` matches any subdomain of
//!   `example.com` at any depth, but not `example.com` itself.
//! - `path_prefix`: a plain string prefix of the path without its query
//!   (`/api` also matches `/apix`; write `/api/` to stop at a segment).
//! - `path_glob`: the whole path without its query; `*` matches within one
//!   segment (never a `/`), `**` across segments, and `/**/` also matches a
//!   single `/`. Every other character is literal.
//! - `methods`: one of these methods, case-insensitively.
//! - `headers`: every entry holds: `{"name", "equals"}` needs some value of
//!   the header to equal `equals` exactly; `{"name", "present": true|false}`
//!   needs the header to be present or absent.
//!
//! Actions (exactly one per rule): `pool`, or a weighted `split`, optionally
//! `sticky` by a header or a cookie value. A split picks by a stable hash
//! (see [`stable_hash`]) of the sticky value, so one user always lands in
//! the same pool while the weights hold over many users; without a sticky
//! value it hashes the request id, so the choice is still deterministic per
//! request. `rewrite_prefix` (only with `path_prefix`) replaces the matched
//! prefix in the path sent upstream, keeping the rest and the query.
//!
//! It imports no host capability, so it loads with none granted.

use breakwater_sdk::{
    Context, OnRequest, Plugin, Request, RequestChanges, RequestDecision, export_plugin,
};
use serde::Deserialize;

/// The router's configuration. Unknown fields refuse the load, so a
/// misspelt matcher is an error rather than a rule that matches everything.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// The rules, tried in order; the first match wins.
    rules: Vec<Rule>,
    /// The pool for requests no rule matches; without one they continue
    /// unchanged.
    default_pool: Option<String>,
}

/// One rule: matchers (all optional, all must hold) and one action.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    host: Option<String>,
    path_prefix: Option<String>,
    path_glob: Option<String>,
    methods: Option<Vec<String>>,
    #[serde(default)]
    headers: Vec<HeaderMatch>,
    pool: Option<String>,
    split: Option<Vec<Weighted>>,
    sticky: Option<Sticky>,
    rewrite_prefix: Option<String>,
}

/// A header condition: exactly one of `equals` and `present`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatch {
    name: String,
    equals: Option<String>,
    present: Option<bool>,
}

/// One arm of a weighted split.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Weighted {
    pool: String,
    weight: u32,
}

/// Where a split finds the value that keeps a user on one pool:
/// `{"header": "x-user-id"}` or `{"cookie": "session"}`.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum Sticky {
    Header(String),
    Cookie(String),
}

/// A rule checked and normalized at load.
struct Route {
    host: Option<HostPattern>,
    path_prefix: Option<String>,
    path_glob: Option<Vec<Token>>,
    methods: Option<Vec<String>>,
    headers: Vec<HeaderCondition>,
    action: Action,
    rewrite_prefix: Option<String>,
}

enum HostPattern {
    /// Lower-cased, without a trailing dot.
    Exact(String),
    /// The lower-cased suffix with its leading dot, e.g. `.example.com`.
    Suffix(String),
}

enum HeaderCondition {
    Equals(String, String),
    Present(String, bool),
}

enum Action {
    Pool(String),
    Split {
        /// Arms with a zero weight are dropped at load.
        arms: Vec<Weighted>,
        /// The sum of the weights; never zero.
        total: u64,
        sticky: Option<Sticky>,
    },
}

struct Router {
    routes: Vec<Route>,
    default_pool: Option<String>,
}

impl Plugin for Router {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let routes = config
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| Route::new(rule).map_err(|e| format!("rules[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(pool) = &config.default_pool {
            check_pool(pool).map_err(|e| format!("`default_pool`: {e}"))?;
        }
        Ok(Router {
            routes,
            default_pool: config.default_pool,
        })
    }
}

impl OnRequest for Router {
    fn on_request(&self, req: &Request, _ctx: &mut Context) -> RequestDecision {
        let Some(route) = self.routes.iter().find(|route| route.matches(req)) else {
            return match &self.default_pool {
                Some(pool) => {
                    RequestDecision::ContinueWith(RequestChanges::default().upstream_pool(pool))
                }
                None => RequestDecision::Continue,
            };
        };
        let mut changes = RequestChanges::default().upstream_pool(route.pool_for(req));
        // `rewrite_prefix` is only accepted with `path_prefix`, which matched
        // the start of `req.path`, so slicing there keeps the rest and the
        // query.
        if let (Some(prefix), Some(replacement)) = (&route.path_prefix, &route.rewrite_prefix) {
            let path = format!("{replacement}{}", &req.path[prefix.len()..]);
            changes = changes.rewrite_path(&path);
        }
        RequestDecision::ContinueWith(changes)
    }
}

fn check_pool(pool: &str) -> Result<(), String> {
    if pool.is_empty() {
        Err("a pool name must not be empty".to_owned())
    } else {
        Ok(())
    }
}

impl Route {
    fn new(rule: Rule) -> Result<Route, String> {
        let host = rule.host.as_deref().map(HostPattern::parse).transpose()?;
        // Written without let-chains: the workspace's MSRV is 1.85.
        if rule
            .path_prefix
            .as_ref()
            .is_some_and(|prefix| !prefix.starts_with('/'))
        {
            return Err("`path_prefix` must start with `/`".to_owned());
        }
        let path_glob = match &rule.path_glob {
            Some(glob) if !glob.starts_with('/') => {
                return Err("`path_glob` must start with `/`".to_owned());
            }
            Some(glob) => Some(parse_glob(glob)),
            None => None,
        };
        let methods = match rule.methods {
            Some(methods) if methods.is_empty() || methods.iter().any(String::is_empty) => {
                return Err("`methods` must list at least one non-empty method".to_owned());
            }
            other => other,
        };
        let headers = rule
            .headers
            .into_iter()
            .map(HeaderCondition::new)
            .collect::<Result<Vec<_>, _>>()?;
        let action = match (rule.pool, rule.split) {
            (Some(_), Some(_)) => return Err("give either `pool` or `split`, not both".to_owned()),
            (None, None) => return Err("a rule needs an action: `pool` or `split`".to_owned()),
            (Some(pool), None) => {
                if rule.sticky.is_some() {
                    return Err("`sticky` only applies to a `split`".to_owned());
                }
                check_pool(&pool)?;
                Action::Pool(pool)
            }
            (None, Some(arms)) => {
                for arm in &arms {
                    check_pool(&arm.pool)?;
                }
                let total: u64 = arms.iter().map(|arm| u64::from(arm.weight)).sum();
                if total == 0 {
                    return Err("the `split` weights must sum to more than 0".to_owned());
                }
                let empty_sticky = matches!(
                    &rule.sticky,
                    Some(Sticky::Header(name) | Sticky::Cookie(name)) if name.is_empty()
                );
                if empty_sticky {
                    return Err("`sticky` needs a non-empty header or cookie name".to_owned());
                }
                Action::Split {
                    arms: arms.into_iter().filter(|arm| arm.weight > 0).collect(),
                    total,
                    sticky: rule.sticky,
                }
            }
        };
        if let Some(replacement) = &rule.rewrite_prefix {
            if rule.path_prefix.is_none() {
                return Err("`rewrite_prefix` needs a `path_prefix` to replace".to_owned());
            }
            if !replacement.starts_with('/') {
                return Err("`rewrite_prefix` must start with `/`".to_owned());
            }
        }
        Ok(Route {
            host,
            path_prefix: rule.path_prefix,
            path_glob,
            methods,
            headers,
            action,
            rewrite_prefix: rule.rewrite_prefix,
        })
    }

    /// Whether every matcher of the rule holds, cheapest first.
    fn matches(&self, req: &Request) -> bool {
        if self
            .methods
            .as_ref()
            .is_some_and(|methods| !methods.iter().any(|m| m.eq_ignore_ascii_case(&req.method)))
        {
            return false;
        }
        if self
            .host
            .as_ref()
            .is_some_and(|host| !host.matches(&req.host))
        {
            return false;
        }
        let path = req.path_only();
        if self
            .path_prefix
            .as_ref()
            .is_some_and(|prefix| !path.starts_with(prefix.as_str()))
        {
            return false;
        }
        if self
            .path_glob
            .as_ref()
            .is_some_and(|glob| !glob_matches(glob, path))
        {
            return false;
        }
        self.headers.iter().all(|condition| condition.holds(req))
    }

    fn pool_for<'r>(&'r self, req: &Request) -> &'r str {
        match &self.action {
            Action::Pool(pool) => pool,
            Action::Split {
                arms,
                total,
                sticky,
            } => {
                let key = sticky
                    .as_ref()
                    .and_then(|sticky| sticky_value(sticky, req))
                    .unwrap_or(&req.request_id);
                // Multiply-high maps the hash onto [0, total) without the
                // bias of `%` toward low values.
                let point =
                    ((u128::from(stable_hash(key.as_bytes())) * u128::from(*total)) >> 64) as u64;
                let mut start = 0;
                for arm in arms {
                    start += u64::from(arm.weight);
                    if point < start {
                        return &arm.pool;
                    }
                }
                // Unreachable: the weights sum to `total` and `point` is
                // below it. The last arm is the harmless answer regardless.
                arms.last().map_or("", |arm| &arm.pool)
            }
        }
    }
}

impl HostPattern {
    fn parse(pattern: &str) -> Result<HostPattern, String> {
        let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix('*') {
            Some(suffix)
                if suffix.starts_with('.') && suffix.len() > 1 && !suffix.contains('*') =>
            {
                Ok(HostPattern::Suffix(suffix.to_owned()))
            }
            None if !pattern.is_empty() && !pattern.contains('*') => {
                Ok(HostPattern::Exact(pattern))
            }
            _ => Err(format!(
                "`host` must be a name or `*.` and a domain, not `{pattern}`"
            )),
        }
    }

    fn matches(&self, host: &str) -> bool {
        let host = strip_port(host);
        let host = host.strip_suffix('.').unwrap_or(host);
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
            }
        }
    }
}

/// The host without a `:port`; an IPv6 literal keeps its brackets.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

impl HeaderCondition {
    fn new(header: HeaderMatch) -> Result<HeaderCondition, String> {
        if header.name.is_empty() {
            return Err("`headers` entries need a non-empty `name`".to_owned());
        }
        match (header.equals, header.present) {
            (Some(value), None) => Ok(HeaderCondition::Equals(header.name, value)),
            (None, Some(present)) => Ok(HeaderCondition::Present(header.name, present)),
            _ => Err(format!(
                "header `{}` needs exactly one of `equals` and `present`",
                header.name
            )),
        }
    }

    fn holds(&self, req: &Request) -> bool {
        let named = |name: &str, (n, _): &&(String, String)| n.eq_ignore_ascii_case(name);
        match self {
            // Any value counts: a repeated header is several values.
            HeaderCondition::Equals(name, value) => req
                .headers
                .iter()
                .any(|header| named(name, &header) && header.1 == *value),
            HeaderCondition::Present(name, present) => {
                req.headers.iter().any(|header| named(name, &header)) == *present
            }
        }
    }
}

/// The sticky value in the request; none when missing or empty, so that the
/// split falls back to the request id.
fn sticky_value<'r>(sticky: &Sticky, req: &'r Request) -> Option<&'r str> {
    let value = match sticky {
        Sticky::Header(name) => req.header(name).map(str::trim),
        Sticky::Cookie(name) => cookie(req, name),
    };
    value.filter(|v| !v.is_empty())
}

/// The value of cookie `name` from any `Cookie` header, quotes removed.
fn cookie<'r>(req: &'r Request, name: &str) -> Option<&'r str> {
    req.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
}

/// A stable 64-bit hash: FNV-1a (64-bit offset basis and prime) over the
/// bytes, then the MurmurHash3 `fmix64` finalizer.
///
/// FNV-1a is simple and fixed forever, which is what stickiness needs: the
/// same value lands on the same pool across instances, nodes and releases
/// (std's `DefaultHasher` promises none of that). On its own, though, its
/// high bits barely move for inputs differing in a last character, such as
/// `req-1`, `req-2`; the finalizer spreads every input bit over the whole
/// word so the weights hold for sequential ids too.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// A piece of a path glob.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    /// A byte matched literally.
    Byte(u8),
    /// `*`: any run of bytes without `/`.
    Star,
    /// `**`: any run of bytes.
    AnyStar,
    /// `**/` after a `/` or at the start: nothing, or any run ending in `/`,
    /// so `/a/**/b` matches `/a/b` as well as `/a/x/y/b`.
    AnyDirs,
}

/// Splits a glob into tokens.
///
/// The matcher is written here rather than taken from a crate: it needs only
/// `*` and `**`, path globs are short, and the crates that do full globbing
/// bring filesystem or regex machinery that would grow a component
/// instantiated afresh for every request.
fn parse_glob(glob: &str) -> Vec<Token> {
    let bytes = glob.as_bytes();
    let mut tokens = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'*' {
            tokens.push(Token::Byte(bytes[i]));
            i += 1;
            continue;
        }
        let mut run = 0;
        while i < bytes.len() && bytes[i] == b'*' {
            run += 1;
            i += 1;
        }
        if run == 1 {
            tokens.push(Token::Star);
            continue;
        }
        let after_slash = matches!(tokens.last(), None | Some(Token::Byte(b'/')));
        if after_slash && bytes.get(i) == Some(&b'/') {
            tokens.push(Token::AnyDirs);
            i += 1;
        } else {
            tokens.push(Token::AnyStar);
        }
    }
    tokens
}

/// Whether `path` matches the whole glob.
///
/// It tracks the set of path positions reachable after each token, so it
/// runs in O(tokens × path) time whatever the stars: no backtracking that a
/// crafted path could make exponential.
fn glob_matches(tokens: &[Token], path: &str) -> bool {
    let text = path.as_bytes();
    let mut reachable = vec![false; text.len() + 1];
    reachable[0] = true;
    let mut next = vec![false; text.len() + 1];
    for token in tokens {
        match token {
            Token::Byte(b) => {
                next[0] = false;
                for j in 0..text.len() {
                    next[j + 1] = reachable[j] && text[j] == *b;
                }
            }
            Token::Star | Token::AnyStar => {
                let mut open = false;
                for j in 0..=text.len() {
                    open |= reachable[j];
                    next[j] = open;
                    if *token == Token::Star && text.get(j) == Some(&b'/') {
                        open = false;
                    }
                }
            }
            Token::AnyDirs => {
                let mut seen = false;
                for j in 0..=text.len() {
                    next[j] = reachable[j] || (seen && j > 0 && text[j - 1] == b'/');
                    seen |= reachable[j];
                }
            }
        }
        std::mem::swap(&mut reachable, &mut next);
        if !reachable.contains(&true) {
            return false;
        }
    }
    reachable[text.len()]
}

export_plugin!(Router);
