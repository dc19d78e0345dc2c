//! Checks that need more than the types: addresses, files on disk,
//! references between tables, patterns. Each problem is located by its key
//! path in the source text.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;

use crate::diagnostic::{Diagnostic, SourceMap, nearest};
use crate::model::EdgeConfig;

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
    check_sites(config, &mut checker);
    check_pools(config, &mut checker);
    check_routes(config, &mut checker);
    check_plugins(config, &mut checker);
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
        if !plugin.path.is_file() {
            checker.report(
                &[Key("plugin"), Index(i), Key("path")],
                format!("plugin file {} does not exist", plugin.path.display()),
                "build the plugins (`cargo xtask up` does) or point `path` at a .wasm component",
            );
        }
    }
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
