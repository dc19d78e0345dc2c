//! Checks that need more than the types: addresses, files on disk,
//! references between tables, patterns. Each problem is located by its key
//! path in the source text.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;

use crate::diagnostic::{Diagnostic, SourceMap, nearest};
use crate::model::{EdgeConfig, PluginConfig};

/// One step of a key path: a table key or an array index.
#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}
use Step::{Index, Key};

struct Checker<'a> {
    map: &'a SourceMap<'a>,
    document: Option<toml_edit::Document<&'a str>>,
    problems: Vec<Diagnostic>,
}

impl Checker<'_> {
    /// Span of the deepest item along `path` that exists in the source.
    fn span(&self, path: &[Step<'_>]) -> Option<Range<usize>> {
        let document = self.document.as_ref()?;
        let mut item = document.as_item();
        let mut span = None;
        for step in path {
            let next = match *step {
                Key(key) => item.get(key),
                Index(index) => item.get(index),
            };
            match next {
                Some(next) => {
                    item = next;
                    span = next.span().or(span);
                }
                None => break,
            }
        }
        span
    }

    fn report(&mut self, path: &[Step<'_>], message: impl Into<String>, fix: impl Into<String>) {
        let span = self.span(path);
        self.problems.push(self.map.diagnostic(span, message, fix));
    }
}

pub(crate) fn validate(config: &EdgeConfig, text: &str, map: &SourceMap<'_>) -> Vec<Diagnostic> {
    let mut checker = Checker {
        map,
        document: toml_edit::Document::parse(text).ok(),
        problems: Vec::new(),
    };
    check_node(config, &mut checker);
    check_listeners(config, &mut checker);
    check_limits(config, &mut checker);
    check_sites(config, &mut checker);
    check_pools(config, &mut checker);
    check_routes(config, &mut checker);
    check_plugins(config, &mut checker);
    check_cache(config, &mut checker);
    check_cluster(config, &mut checker);
    check_tracing(config, &mut checker);
    checker.problems
}

fn check_address(checker: &mut Checker<'_>, path: &[Step<'_>], address: &str) {
    if address.parse::<SocketAddr>().is_err() {
        checker.report(
            path,
            format!("`{address}` is not a socket address"),
            "write an IP address and port, e.g. \"127.0.0.1:8080\" or \"[::]:443\"",
        );
    }
}

fn check_node(config: &EdgeConfig, checker: &mut Checker<'_>) {
    for (i, entry) in config.node.trusted_proxies.iter().enumerate() {
        if crate::model::parse_network(entry).is_err() {
            checker.report(
                &[Key("node"), Key("trusted_proxies"), Index(i)],
                format!("trusted proxy `{entry}` is not an IP network or address"),
                "write a CIDR network such as \"10.0.0.0/8\" or \"2001:db8::/32\", or one address such as \"192.0.2.7\"",
            );
        }
    }
}

fn check_listeners(config: &EdgeConfig, checker: &mut Checker<'_>) {
    if config.listeners.is_empty() {
        checker.report(
            &[],
            "no listener is configured",
            "add a `[[listener]]` table with `address = \"127.0.0.1:8080\"`",
        );
    }
    for (i, listener) in config.listeners.iter().enumerate() {
        check_address(
            checker,
            &[Key("listener"), Index(i), Key("address")],
            &listener.address,
        );
        if let Some(tls) = &listener.tls {
            for (key, file) in [("cert", &tls.cert), ("key", &tls.key)] {
                if !file.is_file() {
                    checker.report(
                        &[Key("listener"), Index(i), Key("tls"), Key(key)],
                        format!("TLS {key} file {} does not exist", file.display()),
                        format!(
                            "point `{key}` at a PEM file (relative paths start at the config file's directory)"
                        ),
                    );
                }
            }
        }
    }
    if let Some(admin) = &config.admin {
        check_address(checker, &[Key("admin"), Key("address")], &admin.address);
    }
}

/// The sandbox's pooling allocator holds 256 instances, and a plugin phase
/// uses one at a time: more concurrent phases than that could only fail to
/// instantiate.
const MAX_PLUGIN_CONCURRENCY: usize = 256;

fn check_limits(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let concurrency = config.limits.plugin_concurrency;
    if !(1..=MAX_PLUGIN_CONCURRENCY).contains(&concurrency) {
        checker.report(
            &[Key("limits"), Key("plugin_concurrency")],
            format!(
                "plugin_concurrency = {concurrency} is outside 1..={MAX_PLUGIN_CONCURRENCY}"
            ),
            format!(
                "set it between 1 and {MAX_PLUGIN_CONCURRENCY} (default 64): the plugin phases allowed to run at once"
            ),
        );
    }
    let limits = &config.limits;
    let defaults = crate::model::LimitsConfig::default();
    for (key, value, default) in [
        (
            "max_connections",
            limits.max_connections,
            defaults.max_connections,
        ),
        (
            "max_connections_per_ip",
            limits.max_connections_per_ip,
            defaults.max_connections_per_ip,
        ),
    ] {
        if value == 0 {
            checker.report(
                &[Key("limits"), Key(key)],
                format!("{key} = 0 would refuse every connection"),
                format!("set `{key}` to at least 1 (default {default})"),
            );
        }
    }
    if limits.idle_timeout.is_zero() {
        checker.report(
            &[Key("limits"), Key("idle_timeout")],
            "idle_timeout = 0 would close every connection between requests",
            "set a duration such as \"60s\" (the default)",
        );
    }
    for (i, method) in limits.allowed_methods.iter().enumerate() {
        let at = [Key("limits"), Key("allowed_methods"), Index(i)];
        if method == "CONNECT" {
            checker.report(
                &at,
                "CONNECT cannot be allowed: the node does not tunnel connections",
                "remove \"CONNECT\" from `allowed_methods`",
            );
        } else if http::Method::from_bytes(method.as_bytes()).is_err() {
            checker.report(
                &at,
                format!("`{method}` is not an HTTP method"),
                "write a method token such as \"GET\" or \"PROPFIND\"",
            );
        } else if method.bytes().any(|b| b.is_ascii_lowercase()) {
            checker.report(
                &at,
                format!("`{method}` is not upper case: methods are case-sensitive"),
                format!("write \"{}\"", method.to_ascii_uppercase()),
            );
        }
    }
}

fn check_prefix(checker: &mut Checker<'_>, path: &[Step<'_>], prefix: &str) {
    if !prefix.starts_with('/') {
        checker.report(
            path,
            format!("prefix `{prefix}` does not start with `/`"),
            format!("write \"/{prefix}\""),
        );
    }
}

fn check_sites(config: &EdgeConfig, checker: &mut Checker<'_>) {
    for (i, site) in config.sites.iter().enumerate() {
        check_prefix(
            checker,
            &[Key("site"), Index(i), Key("prefix")],
            &site.prefix,
        );
        if !site.root.is_dir() {
            checker.report(
                &[Key("site"), Index(i), Key("root")],
                format!("site root {} is not a directory", site.root.display()),
                "point `root` at an existing directory (relative paths start at the config file's directory)",
            );
        }
        for (j, rule) in site.cache_control.iter().enumerate() {
            if let Err(e) = globset::Glob::new(&rule.pattern) {
                checker.report(
                    &[
                        Key("site"),
                        Index(i),
                        Key("cache_control"),
                        Index(j),
                        Key("pattern"),
                    ],
                    format!("`{}` is not a glob pattern: {}", rule.pattern, e.kind()),
                    "write a glob such as \"*.css\" or \"assets/**\"",
                );
            }
            if http::HeaderValue::from_str(&rule.value).is_err() {
                checker.report(
                    &[
                        Key("site"),
                        Index(i),
                        Key("cache_control"),
                        Index(j),
                        Key("value"),
                    ],
                    "this Cache-Control value cannot be sent as a header",
                    "use visible ASCII only, e.g. \"public, max-age=3600\"",
                );
            }
        }
    }
}

fn check_pools(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let mut names = HashSet::new();
    let pool_names: Vec<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
    for (i, pool) in config.pools.iter().enumerate() {
        if !names.insert(pool.name.as_str()) {
            checker.report(
                &[Key("pool"), Index(i), Key("name")],
                format!("pool `{}` is defined twice", pool.name),
                "give each `[[pool]]` a distinct name",
            );
        }
        if pool.endpoints.is_empty() {
            checker.report(
                &[Key("pool"), Index(i), Key("endpoints")],
                format!("pool `{}` has no endpoints", pool.name),
                "list at least one endpoint, e.g. endpoints = [\"http://127.0.0.1:9000\"]",
            );
        }
        for (j, endpoint) in pool.endpoints.iter().enumerate() {
            let at = [
                Key("pool"),
                Index(i),
                Key("endpoints"),
                Index(j),
                Key("address"),
            ];
            let valid = endpoint
                .address
                .parse::<http::Uri>()
                .ok()
                .filter(|uri| uri.scheme_str() == Some("http") && uri.authority().is_some());
            if valid.is_none() {
                checker.report(
                    &at,
                    format!("`{}` is not an http:// endpoint URL", endpoint.address),
                    "write the endpoint's base URL, e.g. \"http://127.0.0.1:9000\"",
                );
            }
            if !(1..=10_000).contains(&endpoint.weight) {
                checker.report(
                    &[
                        Key("pool"),
                        Index(i),
                        Key("endpoints"),
                        Index(j),
                        Key("weight"),
                    ],
                    format!("weight = {} is outside 1..=10000", endpoint.weight),
                    "give the endpoint a weight between 1 and 10000 (default 1)",
                );
            }
        }
        check_pool_failover(checker, i, pool, &pool_names);
        check_pool_limits(checker, i, pool);
    }
}

fn check_pool_failover(
    checker: &mut Checker<'_>,
    i: usize,
    pool: &crate::model::PoolConfig,
    pool_names: &[&str],
) {
    let mut seen = HashSet::new();
    for (j, name) in pool.failover.iter().enumerate() {
        let at = [Key("pool"), Index(i), Key("failover"), Index(j)];
        if *name == pool.name {
            checker.report(
                &at,
                format!("pool `{name}` lists itself in `failover`"),
                "list other regions' pools only",
            );
        } else if !pool_names.contains(&name.as_str()) {
            let fix = match nearest(name, pool_names.iter().copied()) {
                Some(near) => format!("replace `{name}` with `{near}`"),
                None => format!(
                    "define it: add `[[pool]]` with `name = \"{name}\"`, its region and endpoints"
                ),
            };
            checker.report(&at, format!("failover pool `{name}` is not defined"), fix);
        } else if !seen.insert(name.as_str()) {
            checker.report(
                &at,
                format!("failover pool `{name}` is listed twice"),
                "list each failover pool once",
            );
        }
    }
    for (key, share) in [
        ("failover_below", pool.failover_below),
        ("failback_above", pool.failback_above),
        ("panic_threshold", pool.panic_threshold),
    ] {
        if !(0.0..=1.0).contains(&share) {
            checker.report(
                &[Key("pool"), Index(i), Key(key)],
                format!("{key} = {share} is not a share between 0 and 1"),
                format!("write a share such as 0.5 for `{key}`"),
            );
        }
    }
    if pool.failback_above < pool.failover_below {
        checker.report(
            &[Key("pool"), Index(i), Key("failback_above")],
            format!(
                "failback_above = {} is below failover_below = {}: traffic would flap",
                pool.failback_above, pool.failover_below
            ),
            "make failback_above at least failover_below (default 0.75 vs 0.5)",
        );
    }
}

fn check_pool_limits(checker: &mut Checker<'_>, i: usize, pool: &crate::model::PoolConfig) {
    let at = |key| vec![Key("pool"), Index(i), Key(key)];
    for (key, value) in [
        ("connect_timeout", pool.connect_timeout),
        ("first_byte_timeout", pool.first_byte_timeout),
        ("total_timeout", pool.total_timeout),
    ] {
        if value.is_zero() {
            checker.report(
                &at(key),
                format!("{key} = 0 gives an upstream no time"),
                format!("write a duration such as \"2s\", or leave `{key}` out for the default"),
            );
        }
    }
    if pool.max_requests_per_endpoint == 0 {
        checker.report(
            &at("max_requests_per_endpoint"),
            "max_requests_per_endpoint = 0 sends nothing",
            "allow at least 1 (default 1024)",
        );
    }
    match (pool.balance, &pool.hash_header) {
        (crate::model::BalanceMode::ConsistentHash, None) => checker.report(
            &at("balance"),
            "balance = \"consistent-hash\" needs `hash_header`",
            "add `hash_header = \"x-session-id\"` (the header whose value keeps a client on one endpoint)",
        ),
        (_, Some(header)) if http::HeaderName::from_bytes(header.as_bytes()).is_err() => {
            checker.report(
                &at("hash_header"),
                format!("`{header}` is not a header name"),
                "write a header name such as \"x-session-id\"",
            );
        }
        _ => {}
    }
    if pool.balance == crate::model::BalanceMode::Prefix {
        if !(1..=crate::pool::MAX_PREFIX_BYTES).contains(&pool.prefix_bytes) {
            checker.report(
                &at("prefix_bytes"),
                format!(
                    "prefix_bytes = {} is outside 1..={}",
                    pool.prefix_bytes,
                    crate::pool::MAX_PREFIX_BYTES
                ),
                "cover the shared part of the prompts, such as 4096 (the default) for a 1,000-token system prompt",
            );
        }
        if !(pool.load_factor.is_finite() && pool.load_factor >= 1.0) {
            checker.report(
                &at("load_factor"),
                format!("load_factor = {} is below 1", pool.load_factor),
                "write 1.0 or more: 1.25 (the default) lets an endpoint take a quarter more than the average",
            );
        }
    }
    if let Some(health) = &pool.health {
        let at = |key| [Key("pool"), Index(i), Key("health"), Key(key)];
        if !health.path.starts_with('/') {
            checker.report(
                &at("path"),
                format!(
                    "health check path `{}` does not start with `/`",
                    health.path
                ),
                format!("write \"/{}\"", health.path),
            );
        }
        if health.interval.is_zero() {
            checker.report(
                &at("interval"),
                "interval = 0 would check without pause",
                "write a duration such as \"1s\"",
            );
        }
        if health.timeout.is_zero() || health.timeout > health.interval {
            checker.report(
                &at("timeout"),
                format!(
                    "timeout = {:?} must be above 0 and at most interval ({:?})",
                    health.timeout, health.interval
                ),
                "give a check less time than the interval between checks, e.g. \"500ms\" for \"1s\"",
            );
        }
        for (key, value) in [
            ("healthy_threshold", health.healthy_threshold),
            ("unhealthy_threshold", health.unhealthy_threshold),
        ] {
            if value == 0 {
                checker.report(
                    &at(key),
                    format!("{key} = 0 is not a count of checks"),
                    format!("set `{key}` to 1 or more (default 2)"),
                );
            }
        }
    }
    let outlier = &pool.outlier;
    let at_outlier = |key| [Key("pool"), Index(i), Key("outlier"), Key(key)];
    if !(0.0..=1.0).contains(&outlier.max_ejected_share) {
        checker.report(
            &at_outlier("max_ejected_share"),
            format!(
                "max_ejected_share = {} is not a share between 0 and 1",
                outlier.max_ejected_share
            ),
            "write a share such as 0.5",
        );
    }
    if outlier.base_ejection.is_zero() || outlier.base_ejection > outlier.max_ejection {
        checker.report(
            &at_outlier("base_ejection"),
            format!(
                "base_ejection = {:?} must be above 0 and at most max_ejection ({:?})",
                outlier.base_ejection, outlier.max_ejection
            ),
            "write durations such as base_ejection = \"5s\", max_ejection = \"2m\"",
        );
    }
    if let Some(limit) = &pool.concurrency {
        let at = |key| [Key("pool"), Index(i), Key("concurrency"), Key(key)];
        if limit.min == 0 || limit.min > limit.initial || limit.initial > limit.max {
            checker.report(
                &at("initial"),
                format!(
                    "the limits must satisfy 1 <= min ({}) <= initial ({}) <= max ({})",
                    limit.min, limit.initial, limit.max
                ),
                "e.g. concurrency = { min = 4, initial = 64, max = 1024 }",
            );
        }
        if limit.latency_target.is_zero() {
            checker.report(
                &at("latency_target"),
                "latency_target = 0 counts every answer as late",
                "write the time to first byte a healthy pool keeps, e.g. \"2s\"",
            );
        }
        if let Some(priority) = &limit.priority {
            check_priority(checker, i, priority);
        }
    }
    let retry = &pool.retry;
    let at_retry = |key| [Key("pool"), Index(i), Key("retry"), Key(key)];
    if !(1..=5).contains(&retry.attempts) {
        checker.report(
            &at_retry("attempts"),
            format!("attempts = {} is outside 1..=5", retry.attempts),
            "set attempts between 1 (no retries) and 5 (default 2)",
        );
    }
    if !(0.0..=1.0).contains(&retry.budget_ratio) {
        checker.report(
            &at_retry("budget_ratio"),
            format!(
                "budget_ratio = {} is not a share between 0 and 1",
                retry.budget_ratio
            ),
            "write a share such as 0.2 (retries at most 20% of requests)",
        );
    }
    if retry.backoff_base > retry.backoff_max {
        checker.report(
            &at_retry("backoff_base"),
            format!(
                "backoff_base = {:?} exceeds backoff_max = {:?}",
                retry.backoff_base, retry.backoff_max
            ),
            "make backoff_base at most backoff_max (defaults \"10ms\" and \"200ms\")",
        );
    }
}

fn check_priority(checker: &mut Checker<'_>, i: usize, priority: &crate::model::PriorityConfig) {
    let at = |key| {
        [
            Key("pool"),
            Index(i),
            Key("concurrency"),
            Key("priority"),
            Key(key),
        ]
    };
    if http::HeaderName::from_bytes(priority.header.as_bytes()).is_err() {
        checker.report(
            &at("header"),
            format!("`{}` is not a header name", priority.header),
            "write a header name such as \"x-breakwater-tier\"",
        );
    }
    if priority.tiers.is_empty() || priority.tiers.len() > crate::model::PriorityConfig::MAX_TIERS {
        checker.report(
            &at("tiers"),
            format!(
                "{} tiers; a pool takes 1 to {}",
                priority.tiers.len(),
                crate::model::PriorityConfig::MAX_TIERS
            ),
            "list the tier names highest first, e.g. tiers = [\"paid\", \"free\"]",
        );
    }
    for (j, tier) in priority.tiers.iter().enumerate() {
        let at = [
            Key("pool"),
            Index(i),
            Key("concurrency"),
            Key("priority"),
            Key("tiers"),
            Index(j),
        ];
        let printable = !tier.is_empty()
            && tier.trim() == tier
            && tier.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if !printable {
            checker.report(
                &at,
                format!("tier name {tier:?} is not a header value a request can carry"),
                "use printable ASCII without spaces around it, e.g. \"paid\"",
            );
        } else if priority.tiers[..j]
            .iter()
            .any(|earlier| earlier.eq_ignore_ascii_case(tier))
        {
            checker.report(
                &at,
                format!("tier `{tier}` is listed twice (tier names ignore case)"),
                "list each tier once, highest priority first",
            );
        }
    }
    if let Some(default) = &priority.default
        && priority.index_of(default).is_none()
    {
        let fix = match nearest(default, priority.tiers.iter().map(String::as_str)) {
            Some(near) => format!("replace `{default}` with `{near}`"),
            None => "name one of `tiers`, or leave `default` out for the last tier".to_owned(),
        };
        checker.report(
            &at("default"),
            format!("default tier `{default}` is not in `tiers`"),
            fix,
        );
    }
    if !(0.0..1.0).contains(&priority.reserved) {
        checker.report(
            &at("reserved"),
            format!(
                "reserved = {} is not a share from 0 up to (not including) 1",
                priority.reserved
            ),
            "write the share of the limit kept for the first tier, e.g. 0.2",
        );
    }
}

fn check_routes(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let pool_names: Vec<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
    let site_prefixes: HashSet<&str> = config.sites.iter().map(|s| s.prefix.as_str()).collect();
    for (i, route) in config.routes.iter().enumerate() {
        check_prefix(
            checker,
            &[Key("route"), Index(i), Key("prefix")],
            &route.prefix,
        );
        if site_prefixes.contains(route.prefix.as_str()) {
            checker.report(
                &[Key("route"), Index(i), Key("prefix")],
                format!("prefix `{}` is claimed by a site and a route", route.prefix),
                "give the route or the site a different prefix",
            );
        }
        if route.deadline.is_some_and(|d| d.is_zero()) {
            checker.report(
                &[Key("route"), Index(i), Key("deadline")],
                "deadline = 0 gives every request no time",
                "write a duration such as \"30s\", or leave `deadline` out for the pool's total_timeout",
            );
        }
        if route.stall_timeout.is_zero() {
            checker.report(
                &[Key("route"), Index(i), Key("stall_timeout")],
                "stall_timeout = 0 would call every stream stalled between two tokens",
                "write a duration longer than the slowest gap between two tokens, such as \"2s\" (the default)",
            );
        }
        if route.plugin_body_bytes > 0 {
            let at = [Key("route"), Index(i), Key("plugin_body_bytes")];
            if route.plugins.is_empty() {
                checker.report(
                    &at,
                    "`plugin_body_bytes` has no effect on a route without plugins",
                    "add the plugins that read bodies to this route's `plugins`, or remove `plugin_body_bytes`",
                );
            } else if route.plugin_body_bytes > crate::model::MAX_PLUGIN_BODY_BYTES {
                checker.report(
                    &at,
                    format!(
                        "plugin_body_bytes = {} is more than a route may buffer for plugins ({})",
                        route.plugin_body_bytes,
                        crate::model::MAX_PLUGIN_BODY_BYTES
                    ),
                    "write `true` (64 KiB) or a smaller byte count; larger bodies stream past the plugins",
                );
            }
        }
        if config.pool(&route.pool).is_none() {
            let fix = match nearest(&route.pool, pool_names.iter().copied()) {
                Some(near) => format!("replace `{}` with `{near}`", route.pool),
                None => format!(
                    "define it: add `[[pool]]` with `name = \"{}\"` and its endpoints",
                    route.pool
                ),
            };
            checker.report(
                &[Key("route"), Index(i), Key("pool")],
                format!(
                    "route refers to pool `{}`, which is not defined",
                    route.pool
                ),
                fix,
            );
        }
    }
}

/// A plugin's artifact: exactly one of a file that exists or a well-formed
/// object URL, and for a URL a well-formed pin (a local file may leave its
/// pin empty for `breakwater up` to fill).
fn check_plugin_source(checker: &mut Checker<'_>, i: usize, plugin: &PluginConfig) {
    let at = |key| [Key("plugin"), Index(i), Key(key)];
    let name = &plugin.name;
    match (&plugin.path, &plugin.url) {
        (None, None) => checker.report(
            &[Key("plugin"), Index(i)],
            format!("plugin `{name}` has neither `path` nor `url`"),
            format!(
                "add `path = \"{name}.wasm\"` for a local component, or `url = \"s3://BUCKET/{name}.wasm\"` with its sha256"
            ),
        ),
        (Some(_), Some(_)) => checker.report(
            &at("url"),
            format!("plugin `{name}` has both `path` and `url`"),
            "keep one: `path` for a local file, `url` for object storage",
        ),
        (Some(path), None) => {
            if !path.is_file() {
                checker.report(
                    &at("path"),
                    format!("plugin file {} does not exist", path.display()),
                    "build the plugins (`cargo xtask up` does) or point `path` at a .wasm component",
                );
            }
        }
        (None, Some(url)) => {
            if let Err(e) = url.parse::<breakwater_store::ObjectUrl>() {
                checker.report(
                    &at("url"),
                    format!("plugin `{name}`: {}", e.reason),
                    format!("write `url = \"s3://BUCKET/{name}.wasm\"` or `url = \"file:///ABSOLUTE/PATH/{name}.wasm\"`"),
                );
            }
            if plugin.sha256.trim().is_empty() {
                checker.report(
                    &at("sha256"),
                    format!("plugin `{name}` comes from a URL but its sha256 is empty"),
                    "pin it: `sha256 = \"<64 hex digits>\"`, the output of `sha256sum` on the artifact you published",
                );
            } else if let Err(e) = plugin.sha256.parse::<breakwater_store::Sha256Digest>() {
                checker.report(
                    &at("sha256"),
                    format!("plugin `{name}`: {e}"),
                    "write the artifact's sha256 as 64 hex digits, e.g. the output of `sha256sum`",
                );
            }
        }
    }
}

/// `recycle_after = 0` would replace an instance before it served a call.
fn check_plugin_isolation(checker: &mut Checker<'_>, i: usize, plugin: &PluginConfig) {
    if plugin.recycle_after == 0 {
        checker.report(
            &[Key("plugin"), Index(i), Key("recycle_after")],
            format!(
                "plugin `{}`: recycle_after = 0 would replace each instance before its first call",
                plugin.name
            ),
            "give it at least 1, e.g. recycle_after = 10000 (the default)",
        );
    }
}

fn check_plugin_store(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let store = &config.plugin_store;
    let at = |key| [Key("plugin_store"), Key(key)];
    if store.access_key_id.is_some() != store.secret_access_key.is_some() {
        let (set, missing) = if store.access_key_id.is_some() {
            ("access_key_id", "secret_access_key")
        } else {
            ("secret_access_key", "access_key_id")
        };
        checker.report(
            &at(set),
            format!("`{set}` is set without `{missing}`"),
            format!(
                "add `{missing}`, or remove both to use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ),
        );
    }
    if let Some(endpoint) = &store.endpoint {
        let valid = endpoint.parse::<http::Uri>().ok().filter(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
        });
        if valid.is_none() {
            checker.report(
                &at("endpoint"),
                format!("`{endpoint}` is not an http(s) endpoint URL"),
                "write the service's base URL, e.g. \"https://s3.eu-central-1.amazonaws.com\" or \"http://127.0.0.1:8333\"",
            );
        }
    }
    if store.max_bytes == 0 {
        checker.report(
            &at("max_bytes"),
            "max_bytes = 0 refuses every artifact",
            "give it a byte limit, e.g. max_bytes = 67108864 (64 MiB, the default)",
        );
    }
    if store.fetch_timeout.is_zero() {
        checker.report(
            &at("fetch_timeout"),
            "fetch_timeout = 0 gives no time to fetch",
            "write a duration such as \"60s\" (the default)",
        );
    }
}

fn check_plugins(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let mut names = HashSet::new();
    for (i, plugin) in config.plugins.iter().enumerate() {
        if !names.insert(plugin.name.as_str()) {
            checker.report(
                &[Key("plugin"), Index(i), Key("name")],
                format!("plugin `{}` is defined twice", plugin.name),
                "give each `[[plugin]]` a distinct name",
            );
        }
        check_plugin_source(checker, i, plugin);
        check_plugin_isolation(checker, i, plugin);
    }
    check_plugin_store(config, checker);
    let defined: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
    let chains = config
        .sites
        .iter()
        .enumerate()
        .map(|(i, site)| ("site", i, &site.plugins))
        .chain(
            config
                .routes
                .iter()
                .enumerate()
                .map(|(i, route)| ("route", i, &route.plugins)),
        );
    for (table, i, chain) in chains {
        for (j, name) in chain.iter().enumerate() {
            if defined.contains(&name.as_str()) {
                continue;
            }
            let fix = match nearest(name, defined.iter().copied()) {
                Some(near) => format!("replace `{name}` with `{near}`"),
                None => format!(
                    "define it: add `[[plugin]]` with `name = \"{name}\"`, its path and sha256"
                ),
            };
            checker.report(
                &[Key(table), Index(i), Key("plugins"), Index(j)],
                format!("plugin `{name}` is not defined"),
                fix,
            );
        }
    }
}

fn check_cache(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let cache = &config.cache;
    let at = |key| [Key("cache"), Key(key)];
    if cache.memory_bytes == 0 {
        checker.report(
            &at("memory_bytes"),
            "memory_bytes = 0 leaves the memory tier no room",
            "give it a byte budget, e.g. memory_bytes = 268435456 (256 MiB, the default)",
        );
    }
    if cache.max_object_bytes == 0 || cache.max_object_bytes > cache.memory_bytes {
        checker.report(
            &at("max_object_bytes"),
            format!(
                "max_object_bytes = {} must be at least 1 and at most memory_bytes ({})",
                cache.max_object_bytes, cache.memory_bytes
            ),
            "an object larger than the memory tier could never be kept; lower it (default 16777216)",
        );
    }
    for (key, ttl) in [
        ("memory_ttl_max", cache.memory_ttl_max),
        ("disk_ttl_max", cache.disk_ttl_max),
    ] {
        if ttl.is_zero() {
            checker.report(
                &at(key),
                format!("{key} = 0 keeps nothing"),
                format!("write a duration such as \"1h\", or leave `{key}` out for the default"),
            );
        }
    }
    if let Some(disk) = &cache.disk_path {
        if disk.exists() && !disk.is_dir() {
            checker.report(
                &at("disk_path"),
                format!("disk_path {} exists and is not a directory", disk.display()),
                "point `disk_path` at a directory the node may create and own (relative paths start at the config file's directory)",
            );
        }
        if cache.disk_bytes == 0 {
            checker.report(
                &at("disk_bytes"),
                "disk_bytes = 0 leaves the disk tier no room",
                "give it a byte budget, e.g. disk_bytes = 1073741824 (1 GiB, the default), or remove `disk_path`",
            );
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        if route.cache {
            continue;
        }
        for (key, set) in [
            (
                "stale_while_revalidate",
                route.stale_while_revalidate.is_some(),
            ),
            ("stale_if_error", route.stale_if_error.is_some()),
        ] {
            if set {
                checker.report(
                    &[Key("route"), Index(i), Key(key)],
                    format!("`{key}` has no effect on a route without the cache"),
                    format!("add `cache = true` to this route, or remove `{key}`"),
                );
            }
        }
    }
}

/// Redis refuses strings above 512 MiB; an answer that large is no
/// shared-cache material anyway.
const REDIS_MAX_STRING: u64 = 512 * 1024 * 1024;

fn check_tracing(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let tracing = &config.tracing;
    if let Some(endpoint) = &tracing.endpoint
        && !endpoint.starts_with("http://")
    {
        checker.report(
            &[Key("tracing"), Key("endpoint")],
            format!("endpoint {endpoint:?} is not an http:// URL (TLS to the collector is not built in)"),
            "write http://collector:4318 (http/protobuf) or http://collector:4317 (grpc), with a collector beside the node forwarding over TLS",
        );
    }
    if let Some(ratio) = tracing.sample_ratio
        && !(0.0..=1.0).contains(&ratio)
    {
        checker.report(
            &[Key("tracing"), Key("sample_ratio")],
            format!("sample_ratio = {ratio} is outside 0.0 to 1.0"),
            "write the share of new traces to keep, e.g. 0.05 for one in twenty",
        );
    }
    if tracing.service_name.as_deref() == Some("") {
        checker.report(
            &[Key("tracing"), Key("service_name")],
            "service_name is empty",
            "name the service, e.g. \"breakwater-edge\", or leave the key out",
        );
    }
}

fn check_cluster(config: &EdgeConfig, checker: &mut Checker<'_>) {
    let Some(cluster) = &config.cluster else {
        return;
    };
    let at = |key| [Key("cluster"), Key(key)];
    let is_redis_url = |url: &str| {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix"))
    };
    match (&cluster.redis_url, cluster.sentinels.is_empty()) {
        (Some(_), false) => checker.report(
            &at("sentinels"),
            "both `redis_url` and `sentinels` are set",
            "keep `redis_url` for one Redis, or `sentinels` and `sentinel_master` to follow a primary through failovers",
        ),
        (None, true) => checker.report(
            &[Key("cluster")],
            "`[cluster]` names no Redis",
            "add redis_url = \"redis://host:6379\", or sentinels = [\"redis://host:26379\"] with sentinel_master",
        ),
        (Some(url), true) if !is_redis_url(url) => checker.report(
            &at("redis_url"),
            format!("redis_url {url:?} is not a Redis URL"),
            "write redis://host:6379, rediss://host:6380 (TLS) or unix:///run/redis.sock",
        ),
        _ => {}
    }
    for (i, sentinel) in cluster.sentinels.iter().enumerate() {
        if !sentinel.starts_with("redis://") && !sentinel.starts_with("rediss://") {
            checker.report(
                &[Key("cluster"), Key("sentinels"), Index(i)],
                format!("{sentinel:?} is not a sentinel's URL"),
                "write redis://host:26379 (or rediss:// for TLS)",
            );
        }
    }
    if !cluster.sentinels.is_empty() && cluster.sentinel_master.as_deref().unwrap_or("").is_empty()
    {
        checker.report(
            &at("sentinels"),
            "`sentinels` without `sentinel_master`",
            "add sentinel_master = \"<name>\", the name in the sentinels' `sentinel monitor <name> …`",
        );
    }
    if let Some(ca) = &cluster.tls_ca_file
        && !ca.is_file()
    {
        checker.report(
            &at("tls_ca_file"),
            format!("tls_ca_file {} is not a readable file", ca.display()),
            "point it at the PEM file of the CA that signed Redis's certificate, or remove it to trust the system's roots",
        );
    }
    if cluster.budget.is_zero() || cluster.budget > std::time::Duration::from_secs(1) {
        checker.report(
            &at("budget"),
            format!("budget = {:?} must be above 0 and at most 1s", cluster.budget),
            "it is how long a request may wait for Redis: a few milliseconds, e.g. \"5ms\" (the default)",
        );
    }
    for (key, value) in [
        ("background_timeout", cluster.background_timeout),
        ("health_interval", cluster.health_interval),
        ("lease_window", cluster.lease_window),
        ("lease_idle_return", cluster.lease_idle_return),
        ("l3_ttl_max", cluster.l3_ttl_max),
    ] {
        if value.is_zero() {
            checker.report(
                &at(key),
                format!("{key} = 0 is not a usable duration"),
                format!("write a duration such as \"250ms\", or leave `{key}` out for the default"),
            );
        }
    }
    if cluster.l3_max_object_bytes == 0 || cluster.l3_max_object_bytes > REDIS_MAX_STRING {
        checker.report(
            &at("l3_max_object_bytes"),
            format!(
                "l3_max_object_bytes = {} must be at least 1 and at most {REDIS_MAX_STRING} (Redis's largest string)",
                cluster.l3_max_object_bytes
            ),
            "keep the shared tier for small answers, e.g. 1048576 (1 MiB, the default)",
        );
    }
    if cluster.key_prefix.len() > 64 {
        checker.report(
            &at("key_prefix"),
            "key_prefix is longer than 64 bytes",
            "use a short prefix such as \"bw:\" (the default) or \"bw:eu-1:\"",
        );
    }
}
