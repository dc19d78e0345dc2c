//! `[[plugin]]` by `path` or by `url`, its isolation, and `[plugin_store]`: what is
//! accepted, and where each mistake is reported with its fix.

use std::path::Path;

const PIN: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn config(plugin: &str, extra: &str) -> String {
    format!(
        r#"[[listener]]
address = "127.0.0.1:8080"

[[route]]
prefix = "/"
plugins = ["waf"]
pool = "origin"

[[pool]]
name = "origin"
endpoints = ["http://127.0.0.1:9000"]

[[plugin]]
name = "waf"
{plugin}
{extra}"#
    )
}

/// The single diagnostic of `text`: (line, column, message, fix).
fn problem(text: &str) -> (usize, usize, String, String) {
    let err = edge_config::parse(text, Path::new("edge.toml"), Path::new("/etc/bw"))
        .expect_err("the configuration must be refused");
    let d = err.diagnostics();
    assert_eq!(d.len(), 1, "want one diagnostic, got {err}");
    (
        d[0].line,
        d[0].column,
        d[0].message.clone(),
        d[0].fix.clone(),
    )
}

#[test]
fn a_url_plugin_with_a_pin_and_a_store_is_accepted() {
    let text = config(
        &format!("url = \"s3://plugins/waf/1.0.0.wasm\"\nsha256 = \"sha256:{PIN}\""),
        r#"
[plugin_store]
cache_dir = "cache/plugins"
endpoint = "http://127.0.0.1:8333"
region = "eu-central-1"
access_key_id = "id"
secret_access_key = "the-secret"
fetch_timeout = "30s"
"#,
    );
    let config = edge_config::parse(&text, Path::new("edge.toml"), Path::new("/etc/bw"))
        .unwrap_or_else(|e| panic!("{e}"));
    let plugin = &config.plugins[0];
    assert_eq!(plugin.url.as_deref(), Some("s3://plugins/waf/1.0.0.wasm"));
    assert_eq!(plugin.path, None);
    let store = &config.plugin_store;
    assert_eq!(store.cache_dir, Path::new("/etc/bw/cache/plugins"));
    assert_eq!(store.fetch_timeout, std::time::Duration::from_secs(30));
    assert!(
        !format!("{config:?}").contains("the-secret"),
        "the secret leaks into Debug: {store:?}"
    );
}

#[test]
fn the_default_cache_dir_is_absolute() {
    let text = config(
        &format!("url = \"s3://plugins/waf.wasm\"\nsha256 = \"{PIN}\""),
        "",
    );
    let config = edge_config::parse(&text, Path::new("edge.toml"), Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.plugin_store.cache_dir.is_absolute());
}

#[test]
fn a_plugin_needs_a_path_or_a_url() {
    let (line, _, message, fix) = problem(&config(&format!("sha256 = \"{PIN}\""), ""));
    assert_eq!(line, 13, "{message}");
    assert!(message.contains("neither `path` nor `url`"), "{message}");
    assert!(fix.contains("url = "), "{fix}");
}

#[test]
fn a_malformed_url_is_located() {
    let (line, column, message, fix) = problem(&config(
        &format!("url = \"s3://plugins\"\nsha256 = \"{PIN}\""),
        "",
    ));
    assert_eq!((line, column), (15, 7), "{message}");
    assert!(message.contains("names no object"), "{message}");
    assert!(fix.contains("s3://BUCKET/waf.wasm"), "{fix}");
}

#[test]
fn a_url_plugin_needs_a_well_formed_pin() {
    let (line, column, message, _) = problem(&config(
        "url = \"s3://plugins/waf.wasm\"\nsha256 = \"abc\"",
        "",
    ));
    assert_eq!((line, column), (16, 10), "{message}");
    assert!(message.contains("64 hex digits"), "{message}");
}

#[test]
fn store_credentials_come_in_pairs() {
    let (line, column, message, fix) = problem(&config(
        &format!("url = \"s3://plugins/waf.wasm\"\nsha256 = \"{PIN}\""),
        "\n[plugin_store]\naccess_key_id = \"id\"\n",
    ));
    assert_eq!((line, column), (19, 17), "{message}");
    assert!(message.contains("without `secret_access_key`"), "{message}");
    assert!(fix.contains("AWS_ACCESS_KEY_ID"), "{fix}");
}

#[test]
fn a_store_endpoint_must_be_a_url() {
    let (_, _, message, _) = problem(&config(
        &format!("url = \"s3://plugins/waf.wasm\"\nsha256 = \"{PIN}\""),
        "\n[plugin_store]\nendpoint = \"127.0.0.1:8333\"\n",
    ));
    assert!(message.contains("not an http(s) endpoint URL"), "{message}");
}

#[test]
fn isolation_is_per_request_unless_reuse_is_asked_for() {
    let parse = |extra: &str| {
        let text = config(
            &format!("url = \"s3://plugins/waf.wasm\"\nsha256 = \"{PIN}\"\n{extra}"),
            "",
        );
        edge_config::parse(&text, Path::new("edge.toml"), Path::new("/etc/bw"))
            .unwrap_or_else(|e| panic!("{e}"))
            .plugins
            .remove(0)
    };
    let plugin = parse("");
    assert_eq!(plugin.isolation, edge_config::PluginIsolation::PerRequest);
    let plugin = parse("isolation = \"reused\"\nrecycle_after = 500");
    assert_eq!(plugin.isolation, edge_config::PluginIsolation::Reused);
    assert_eq!(plugin.recycle_after, 500);
}

#[test]
fn recycling_before_the_first_call_is_refused() {
    let (line, column, message, fix) = problem(&config(
        &format!(
            "url = \"s3://plugins/waf.wasm\"\nsha256 = \"{PIN}\"\nisolation = \"reused\"\nrecycle_after = 0"
        ),
        "",
    ));
    assert_eq!((line, column), (18, 17), "{message}");
    assert!(message.contains("recycle_after = 0"), "{message}");
    assert!(fix.contains("recycle_after = 10000"), "{fix}");
}
