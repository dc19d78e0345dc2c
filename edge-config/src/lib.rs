//! Typed configuration for a Breakwater edge node.
//!
//! A configuration is TOML. [`load`] reads a file, checks every value that
//! can be checked without starting the node (addresses, files, references
//! between tables, glob patterns), and resolves relative paths against the
//! file's directory. Every problem comes back as a [`Diagnostic`] with the
//! file, line, column and a fix:
//!
//! ```
//! let text = "[[listener]]\nadress = \"127.0.0.1:8080\"\n";
//! let err = edge_config::parse(text, "edge.toml".as_ref(), ".".as_ref()).unwrap_err();
//! let d = &err.diagnostics()[0];
//! assert_eq!((d.line, d.column), (2, 1));
//! assert_eq!(d.fix, "replace `adress` with `address`");
//! ```

mod diagnostic;
mod model;
mod pool;
mod validate;

use std::path::Path;

pub use diagnostic::{ConfigError, Diagnostic};
pub use model::*;

/// The demo configuration `breakwater up` runs on, with its directory
/// (relative paths in it, such as the demo site, resolve against that).
pub const LOCAL_EXAMPLE: &str = include_str!("../examples/local.toml");

/// Directory of [`LOCAL_EXAMPLE`] in the source tree.
pub fn local_example_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
}

/// Reads, validates and resolves the configuration file at `path`.
pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    parse(&text, path, base_dir)
}

/// Validates configuration `text` that came from `origin` (used in
/// diagnostics), resolving relative paths against `base_dir`.
pub fn parse(text: &str, origin: &Path, base_dir: &Path) -> Result<EdgeConfig, ConfigError> {
    let map = diagnostic::SourceMap::new(origin, text);
    let mut config: EdgeConfig = toml::from_str(text).map_err(|e| {
        ConfigError::Invalid(vec![map.diagnostic(
            e.span(),
            e.message().trim(),
            diagnostic::fix_for_parse_error(e.message()),
        )])
    })?;
    config.resolve_paths(base_dir);
    let problems = validate::validate(&config, text, &map);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

impl EdgeConfig {
    fn resolve_paths(&mut self, base_dir: &Path) {
        for listener in &mut self.listeners {
            if let Some(tls) = &mut listener.tls {
                tls.cert = base_dir.join(&tls.cert);
                tls.key = base_dir.join(&tls.key);
            }
        }
        for site in &mut self.sites {
            site.root = base_dir.join(&site.root);
        }
        for plugin in &mut self.plugins {
            if let Some(path) = &mut plugin.path {
                *path = base_dir.join(&*path);
            }
        }
        self.plugin_store.cache_dir = base_dir.join(&self.plugin_store.cache_dir);
        if let Some(disk) = &mut self.cache.disk_path {
            *disk = base_dir.join(&*disk);
        }
        if let Some(ca) = self.cluster.as_mut().and_then(|c| c.tls_ca_file.as_mut()) {
            *ca = base_dir.join(&*ca);
        }
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

impl AdminConfig {
    /// The admin token, from `token_env` if set, else `token`.
    pub fn resolved_token(&self) -> Option<String> {
        self.token_env
            .as_deref()
            .and_then(|var| std::env::var(var).ok())
            .or_else(|| self.token.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_example_is_valid() {
        let config = parse(LOCAL_EXAMPLE, Path::new("local.toml"), local_example_dir())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.listeners.is_empty());
        assert!(config.sites[0].root.join("index.html").is_file());
    }

    #[test]
    fn every_example_is_valid() {
        let mut seen = 0;
        for entry in std::fs::read_dir(local_example_dir()).expect("examples/ exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                // Plugin artifacts may not be built here: only other problems count.
                if let Err(e) = load(&path) {
                    let others: Vec<_> = e
                        .diagnostics()
                        .iter()
                        .filter(|d| !d.message.starts_with("plugin file"))
                        .collect();
                    assert!(others.is_empty(), "{}: {e}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 2, "found {seen} examples");
    }

    #[test]
    fn pools_take_plain_and_weighted_endpoints_with_defaults() {
        let text = r#"
[node]
region = "eu"
[[listener]]
address = "127.0.0.1:8080"
[[pool]]
name = "a"
region = "eu"
endpoints = ["http://127.0.0.1:1", { address = "http://127.0.0.1:2", weight = 3 }]
failover = ["b"]
[[pool]]
name = "b"
region = "us"
endpoints = ["http://127.0.0.1:3"]
"#;
        let config =
            parse(text, Path::new("t.toml"), Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let a = config.pool("a").expect("pool a");
        assert_eq!(a.endpoints[0].weight, 1);
        assert_eq!(a.endpoints[1].weight, 3);
        assert_eq!(a.effective_priority("eu"), 0);
        assert_eq!(config.pool("b").expect("b").effective_priority("eu"), 1);
        assert_eq!(a.retry.attempts, 2);
        assert!(a.health.is_none());
    }

    #[test]
    fn prefix_balancing_and_resume_are_checked_where_written() {
        let text = r#"
[[listener]]
address = "127.0.0.1:8080"
[[route]]
prefix = "/v1/"
pool = "a"
resume = true
stall_timeout = "0s"
[[pool]]
name = "a"
endpoints = ["http://127.0.0.1:1"]
balance = "prefix"
prefix_bytes = 0
load_factor = 0.5
"#;
        let error = parse(text, Path::new("t.toml"), Path::new("."))
            .expect_err("three mistakes")
            .to_string();
        for (line, key) in [
            (8, "stall_timeout"),
            (13, "prefix_bytes"),
            (14, "load_factor"),
        ] {
            assert!(
                error.contains(&format!("t.toml:{line}")) && error.contains(key),
                "{key} at line {line}: {error}"
            );
        }
        let good = text
            .replace("stall_timeout = \"0s\"", "")
            .replace("prefix_bytes = 0", "")
            .replace("load_factor = 0.5", "");
        let config =
            parse(&good, Path::new("t.toml"), Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let a = config.pool("a").expect("pool a");
        assert_eq!((a.prefix_bytes, a.load_factor), (4096, 1.25));
        assert!(config.routes[0].resume);
        assert_eq!(
            config.routes[0].stall_timeout,
            std::time::Duration::from_secs(2)
        );
    }

    #[test]
    fn trusted_proxies_take_networks_and_single_addresses() {
        let text = r#"
[node]
trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1", "172.16.5.4/12"]
[[listener]]
address = "127.0.0.1:8080"
"#;
        let config =
            parse(text, Path::new("t.toml"), Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let networks: Vec<String> = config
            .node
            .trusted_proxy_networks()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            networks,
            [
                "10.0.0.0/8",
                "192.0.2.7/32",
                "2001:db8::/32",
                "::1/128",
                "172.16.0.0/12"
            ]
        );
    }

    #[test]
    fn tracing_takes_its_keys_and_names_bad_values() {
        let base = "[[listener]]\naddress = \"127.0.0.1:8080\"\n";
        let off =
            parse(base, Path::new("t.toml"), Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off.tracing, TracingConfig::default());
        let on = format!(
            "{base}[tracing]\nendpoint = \"http://collector:4317\"\nprotocol = \"grpc\"\nservice_name = \"edge-eu\"\nsample_ratio = 0.05\ntrust_incoming = true\n"
        );
        let config =
            parse(&on, Path::new("t.toml"), Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.tracing,
            TracingConfig {
                endpoint: Some("http://collector:4317".to_owned()),
                protocol: Some(TraceProtocol::Grpc),
                service_name: Some("edge-eu".to_owned()),
                sample_ratio: Some(0.05),
                trust_incoming: true,
            }
        );
        let bad = format!(
            "{base}[tracing]\nendpoint = \"https://collector:4318\"\nsample_ratio = 1.5\nservice_name = \"\"\n"
        );
        let err = parse(&bad, Path::new("t.toml"), Path::new(".")).expect_err("three problems");
        let lines: Vec<usize> = err.diagnostics().iter().map(|d| d.line).collect();
        assert_eq!(lines, [4, 5, 6], "{err}");
        let grpc_json = format!("{base}[tracing]\nprotocol = \"http/json\"\n");
        let err =
            parse(&grpc_json, Path::new("t.toml"), Path::new(".")).expect_err("unknown protocol");
        assert_eq!(err.diagnostics()[0].line, 4, "{err}");
    }

    #[test]
    fn an_unknown_endpoint_key_is_located_and_fixed() {
        let text = "[[listener]]\naddress = \"127.0.0.1:8080\"\n[[pool]]\nname = \"a\"\nendpoints = [{ adress = \"http://127.0.0.1:1\" }]\n";
        let err = parse(text, Path::new("t.toml"), Path::new(".")).expect_err("unknown key");
        let d = &err.diagnostics()[0];
        assert_eq!(d.line, 5, "{d}");
        assert_eq!(d.fix, "replace `adress` with `address`", "{d}");
    }

    #[test]
    fn every_broken_example_is_located_and_fixed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/broken");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/broken exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable example");
            let expected = expected_location(&text)
                .unwrap_or_else(|| panic!("{}: no `# expect: LINE:COL` header", path.display()));
            let err = load(&path).expect_err("a broken example must not load");
            let d = err
                .diagnostics()
                .first()
                .unwrap_or_else(|| panic!("{}: no diagnostic", path.display()));
            assert_eq!((d.line, d.column), expected, "{}: {d}", path.display());
            assert!(!d.fix.is_empty(), "{}: empty fix", path.display());
            seen += 1;
        }
        assert!(seen >= 5, "want at least 5 broken examples, found {seen}");
    }

    /// Broken examples declare where their error is: `# expect: 7:11`.
    fn expected_location(text: &str) -> Option<(usize, usize)> {
        let rest = text.lines().next()?.strip_prefix("# expect: ")?;
        let (line, column) = rest.split_once(':')?;
        Some((line.trim().parse().ok()?, column.trim().parse().ok()?))
    }
}
