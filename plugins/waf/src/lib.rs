//! A small web application firewall.
//!
//! It answers 403 to requests that use a blocked method, ask for a blocked
//! path, come from a known scanner, carry a blocked header value, announce a
//! body over the size limit, or carry an obvious SQL injection in the query.
//! Everything else continues unchanged. Configuration (all optional; these
//! are the defaults except `header_patterns` and `max_body_bytes`, which
//! default to none):
//!
//! ```json
//! {
//!   "blocked_methods": ["TRACE", "TRACK"],
//!   "blocked_path_substrings": ["/.git", "/.env", "/wp-admin"],
//!   "blocked_user_agents": ["sqlmap", "nikto", "nmap", "…"],
//!   "header_patterns": [{ "name": "x-forwarded-host", "contains": "evil" }],
//!   "max_body_bytes": 1048576,
//!   "sql_injection": true
//! }
//! ```
//!
//! A blocked request gets `{"error":"forbidden","reason":"<rule>","request_id":"…"}`
//! where the rule is one of `method`, `path`, `user_agent`, `header`,
//! `body_size` or `sql_injection`.
//!
//! It imports no host capability, so it loads with none granted.

use breakwater_sdk::{
    Context, OnRequest, Plugin, Request, RequestDecision, Response, export_plugin,
};
use serde::{Deserialize, Serialize};

/// The waf's configuration. Every field is optional; unknown fields refuse
/// the load, so a misspelt rule is an error rather than a silent no-op.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// Methods answered 403, compared case-insensitively.
    /// Default: `TRACE` and `TRACK`, which only help cross-site tracing.
    blocked_methods: Vec<String>,
    /// Substrings of the path (without the query) answered 403, compared
    /// case-insensitively against the percent-decoded path, so `/%2Egit`
    /// is caught like `/.git`. Default: `/.git`, `/.env`, `/wp-admin`.
    blocked_path_substrings: Vec<String>,
    /// Substrings of `User-Agent` answered 403, compared case-insensitively.
    /// Default: common scanners (sqlmap, nikto, nmap, masscan, zgrab,
    /// acunetix, nessus, dirbuster, gobuster, wpscan). A request without a
    /// `User-Agent` is not blocked by this rule.
    blocked_user_agents: Vec<String>,
    /// Header values answered 403. Default: none.
    header_patterns: Vec<HeaderPattern>,
    /// The largest body allowed, in bytes, as announced by `Content-Length`
    /// (or the buffered body's length when the route buffers it).
    /// Default: no limit.
    max_body_bytes: Option<u64>,
    /// Whether to block obvious SQL injection in the query string.
    /// Default: true. See [`sql_injection`] for what counts as obvious.
    sql_injection: bool,
}

impl Default for Config {
    fn default() -> Self {
        let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        Config {
            blocked_methods: owned(&["TRACE", "TRACK"]),
            blocked_path_substrings: owned(&["/.git", "/.env", "/wp-admin"]),
            blocked_user_agents: owned(&[
                "sqlmap",
                "nikto",
                "nmap",
                "masscan",
                "zgrab",
                "acunetix",
                "nessus",
                "dirbuster",
                "gobuster",
                "wpscan",
            ]),
            header_patterns: Vec::new(),
            max_body_bytes: None,
            sql_injection: true,
        }
    }
}

/// A header rule: a request is blocked when any value of header `name`
/// contains `contains`, both compared case-insensitively.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderPattern {
    /// The header's name.
    name: String,
    /// The substring that blocks.
    contains: String,
}

/// The body of a 403 answer: which rule fired, and which request to look up
/// in logs. The matched pattern itself is not echoed, so a scanner learns as
/// little as possible about the rules.
#[derive(Serialize)]
struct Forbidden<'r> {
    error: &'static str,
    reason: &'static str,
    request_id: &'r str,
}

struct Waf {
    /// Every pattern is lower-cased once here, so that each check is a plain
    /// substring search on a lower-cased input.
    config: Config,
}

impl Plugin for Waf {
    type Config = Config;

    fn new(mut config: Config) -> Result<Self, String> {
        // An empty substring matches every request: surely a mistake, and one
        // that would take the route down, so it refuses the load instead.
        let lists = [
            ("blocked_methods", &mut config.blocked_methods),
            (
                "blocked_path_substrings",
                &mut config.blocked_path_substrings,
            ),
            ("blocked_user_agents", &mut config.blocked_user_agents),
        ];
        for (field, list) in lists {
            for item in list.iter_mut() {
                if item.is_empty() {
                    return Err(format!("`{field}` must not contain an empty string"));
                }
                item.make_ascii_lowercase();
            }
        }
        for pattern in &mut config.header_patterns {
            if pattern.name.is_empty() || pattern.contains.is_empty() {
                return Err(
                    "`header_patterns` entries need a non-empty `name` and `contains`".to_owned(),
                );
            }
            pattern.contains.make_ascii_lowercase();
        }
        Ok(Waf { config })
    }
}

impl OnRequest for Waf {
    fn on_request(&self, req: &Request, _ctx: &mut Context) -> RequestDecision {
        match self.blocked_by(req) {
            Some(reason) => {
                let body = Forbidden {
                    error: "forbidden",
                    reason,
                    request_id: &req.request_id,
                };
                RequestDecision::Respond(Response::json(403, &body))
            }
            None => RequestDecision::Continue,
        }
    }
}

impl Waf {
    /// The first rule the request breaks, cheapest checks first.
    fn blocked_by(&self, req: &Request) -> Option<&'static str> {
        let config = &self.config;
        if config
            .blocked_methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&req.method))
        {
            return Some("method");
        }

        if !config.blocked_path_substrings.is_empty() {
            let path = percent_decode(req.path_only(), false).to_ascii_lowercase();
            if config
                .blocked_path_substrings
                .iter()
                .any(|s| path.contains(s.as_str()))
            {
                return Some("path");
            }
        }

        if let Some(agent) = req.header("user-agent") {
            let agent = agent.to_ascii_lowercase();
            if config
                .blocked_user_agents
                .iter()
                .any(|s| agent.contains(s.as_str()))
            {
                return Some("user_agent");
            }
        }

        // Every value counts, not only the first: a client can repeat a
        // header to hide the bad value behind a harmless one.
        let header_blocked = config.header_patterns.iter().any(|pattern| {
            req.headers.iter().any(|(name, value)| {
                name.eq_ignore_ascii_case(&pattern.name)
                    && value.to_ascii_lowercase().contains(&pattern.contains)
            })
        });
        if header_blocked {
            return Some("header");
        }

        if let Some(max) = config.max_body_bytes {
            // An unparsable Content-Length is left to the HTTP layer, which
            // rejects it before plugins run.
            let announced = req
                .header("content-length")
                .and_then(|v| v.trim().parse::<u64>().ok());
            let buffered = req.body.as_ref().map(|b| b.len() as u64);
            if announced.max(buffered).is_some_and(|len| len > max) {
                return Some("body_size");
            }
        }

        if config.sql_injection && req.query().is_some_and(sql_injection) {
            return Some("sql_injection");
        }
        None
    }
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as in
/// form-encoded queries). A malformed escape is kept as written, since the
/// upstream will see it that way too; invalid UTF-8 is replaced, which
/// cannot hide an ASCII pattern.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the query string carries an obvious SQL injection.
///
/// Deliberately conservative: it looks for the shapes automated tools and
/// copy-pasted attacks use, never for single SQL words, so ordinary text
/// such as "select a plan", "union station" or "how to sleep (better)"
/// passes. It is a tripwire for noisy attacks, not a substitute for
/// parameterized queries upstream.
///
/// The query is percent-decoded (with `+` as a space), lower-cased, and
/// whitespace is dropped except between two word characters, so
/// `1' OR  '1' = '1` and `1'or'1'='1` read alike. Then it matches:
/// `union [all|distinct] select`; a quoted tautology such as `' or 1=1` or
/// `' or 'a'='a`; `or 1=1--` / `or 1=1#`; stacked `; drop table` and
/// friends; `sleep(N` / `benchmark(N` / `waitfor delay '`; the schema and
/// command tables `information_schema` and `xp_cmdshell`; and a `/* … */`
/// comment, which attacks use to split keywords.
fn sql_injection(query: &str) -> bool {
    let text = compact(&percent_decode(query, true).to_ascii_lowercase());
    const LITERALS: &[&str] = &[
        "union select",
        "union all select",
        "union distinct select",
        "or 1=1--",
        "or 1=1#",
        ";drop table",
        ";drop database",
        ";delete from",
        ";insert into",
        "waitfor delay'",
        "information_schema",
        "xp_cmdshell",
    ];
    if LITERALS.iter().any(|l| text.contains(l)) {
        return true;
    }
    // Time-based blind injection: the function called with a number, so
    // prose like "sleep(well)" stays allowed.
    for function in ["sleep(", "benchmark("] {
        if text.match_indices(function).any(|(at, _)| {
            text[at + function.len()..]
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_digit())
        }) {
            return true;
        }
    }
    if text
        .find("/*")
        .is_some_and(|open| text[open + 2..].contains("*/"))
    {
        return true;
    }
    quoted_tautology(&text)
}

/// Drops whitespace except a single space between two word characters, so
/// that spacing tricks around quotes, operators and parentheses vanish.
fn compact(text: &str) -> String {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = true;
            continue;
        }
        if pending_space && out.chars().next_back().is_some_and(word) && word(c) {
            out.push(' ');
        }
        pending_space = false;
        out.push(c);
    }
    out
}

/// A quote closing a string, then `or`, then `X=X` with the same operand on
/// both sides, optionally quoted: `' or 1=1`, `' or '1'='1`, `" or "a"="a`.
/// Requiring the closing quote and the identical operands keeps prose such
/// as `it's 'orange'` or `a or b=c` from matching.
fn quoted_tautology(text: &str) -> bool {
    for quote in ['\'', '"'] {
        let opener = format!("{quote}or");
        for (at, _) in text.match_indices(&opener) {
            let rest = &text[at + opener.len()..];
            // `or` must end there: `'order` is not `' or`.
            let rest = match rest.strip_prefix(' ') {
                Some(rest) => rest,
                None if rest.starts_with(['\'', '"']) => rest,
                None => continue,
            };
            // Written without let-chains: the workspace's MSRV is 1.85.
            let tautology = operand(rest).is_some_and(|(left, rest)| {
                rest.strip_prefix('=')
                    .and_then(operand)
                    .is_some_and(|(right, _)| left == right)
            });
            if tautology {
                return true;
            }
        }
    }
    false
}

/// A word, optionally quoted, at the start of `text`; and what follows it.
fn operand(text: &str) -> Option<(&str, &str)> {
    let quote = text.chars().next().filter(|c| *c == '\'' || *c == '"');
    let inner = quote.map_or(text, |q| &text[q.len_utf8()..]);
    let end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    if end == 0 {
        return None;
    }
    let (word, rest) = inner.split_at(end);
    let rest = match quote {
        Some(q) => rest.strip_prefix(q).unwrap_or(rest),
        None => rest,
    };
    Some((word, rest))
}

export_plugin!(Waf);
