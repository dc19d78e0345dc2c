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
    check_listeners(config, &mut checker);
    check_limits(config, &mut checker);
    check_sites(config, &mut checker);
    check_pools(config, &mut checker);
    check_routes(config, &mut checker);
    check_plugins(config, &mut checker);
    check_cache(config, &mut checker);
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
            let valid = endpoint
                .parse::<http::Uri>()
                .ok()
                .filter(|uri| uri.scheme_str() == Some("http") && uri.authority().is_some());
            if valid.is_none() {
                checker.report(
                    &[Key("pool"), Index(i), Key("endpoints"), Index(j)],
                    format!("`{endpoint}` is not an http:// endpoint URL"),
                    "write the endpoint's base URL, e.g. \"http://127.0.0.1:9000\"",
                );
            }
        }
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
