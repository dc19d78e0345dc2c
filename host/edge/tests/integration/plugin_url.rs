//! Plugins referenced by object-store URL with a sha256 pin, against a real
//! S3-compatible server (SeaweedFS on loopback): the right pin serves, from
//! the cache once fetched even with the server gone; a wrong pin refuses to
//! start and caches nothing; a reload fetches a new URL plugin.

use crate::common;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use crate::common::{client, component, start_upstream, url};
use breakwater_edge::ConfigSource;
use breakwater_store::testing::S3Server;

/// A node proxying `/` to `upstream` through the plugin `name`, fetched
/// from `s3://<test bucket>/<key>` on `server`, cached in `cache`.
fn config(
    upstream: std::net::SocketAddr,
    server: &S3Server,
    cache: &Path,
    key: &str,
    sha256: &str,
    plugin_config: &str,
) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[[route]]
prefix = "/"
pool = "upstream"
plugins = ["edge-plugin"]

[[pool]]
name = "upstream"
endpoints = ["http://{upstream}"]

[[plugin]]
name = "edge-plugin"
url = "s3://{bucket}/{key}"
sha256 = "{sha256}"
config = {plugin_config}
# Epochs count wall time: room for a loaded test machine.
cpu_deadline = "500ms"

[plugin_store]
cache_dir = "{cache}"
endpoint = "{endpoint}"
region = "{region}"
access_key_id = "{key_id}"
secret_access_key = "{secret}"
fetch_timeout = "20s"
"#,
        bucket = S3Server::BUCKET,
        cache = cache.display(),
        endpoint = server.endpoint(),
        region = S3Server::REGION,
        key_id = S3Server::ACCESS_KEY_ID,
        secret = S3Server::SECRET_ACCESS_KEY,
    )
}

const STAMP: &str = r#"{ header = "x-stamp", value = "from-s3" }"#;

/// Uploads the built component `name` to `key` and returns its sha256.
async fn publish(server: &S3Server, name: &str, key: &str) -> String {
    let (path, sha256) = component(name);
    let bytes = std::fs::read(&path).expect("read the component");
    server
        .store(S3Server::BUCKET)
        .put(key, bytes)
        .await
        .unwrap_or_else(|e| panic!("upload {key}: {e}\n{}", server.log_tail()));
    sha256
}

fn cache_entries(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn stamp_of_get(node: &breakwater_edge::RunningNode) -> Option<String> {
    let response = client()
        .get(url(node, "/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    response
        .headers()
        .get("x-stamp")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test]
async fn a_url_plugin_with_its_pin_serves_then_starts_from_the_cache_offline() {
    let mut server = S3Server::start().await;
    let upstream = start_upstream().await;
    let cache = tempfile::tempdir().expect("tempdir");
    let sha256 = publish(&server, "template", "plugins/template.wasm").await;
    let text = config(
        upstream.addr,
        &server,
        cache.path(),
        "plugins/template.wasm",
        &sha256,
        STAMP,
    );

    let node = common::start_node(&text).await;
    assert_eq!(stamp_of_get(&node).await.as_deref(), Some("from-s3"));
    assert_eq!(cache_entries(cache.path()), vec![format!("{sha256}.wasm")]);
    node.shutdown().await;

    // The object store is gone: the verified cache entry is enough.
    server.stop();
    let node = common::start_node(&text).await;
    assert_eq!(stamp_of_get(&node).await.as_deref(), Some("from-s3"));
    node.shutdown().await;
}

#[tokio::test]
async fn a_wrong_pin_refuses_to_start_and_caches_nothing() {
    let server = S3Server::start().await;
    let upstream = start_upstream().await;
    let cache = tempfile::tempdir().expect("tempdir");
    let published = publish(&server, "template", "plugins/template.wasm").await;
    // The pin of another build: what an operator who forgot to update the
    // pin after publishing would have.
    let (_, wrong) = component("waf");
    let text = config(
        upstream.addr,
        &server,
        cache.path(),
        "plugins/template.wasm",
        &wrong,
        STAMP,
    );
    let parsed = edge_config::parse(&text, Path::new("test.toml"), Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"));
    let error = match breakwater_edge::start(parsed).await {
        Ok(node) => {
            node.shutdown().await;
            panic!("a node started with a plugin whose bytes do not match its pin");
        }
        Err(error) => error.to_string(),
    };
    let object = format!("s3://{}/plugins/template.wasm", S3Server::BUCKET);
    for part in [
        "edge-plugin",
        object.as_str(),
        published.as_str(),
        wrong.as_str(),
        "refusing",
    ] {
        assert!(error.contains(part), "`{part}` missing from: {error}");
    }
    assert_eq!(cache_entries(cache.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_reload_fetches_the_new_url_plugin() {
    let server = S3Server::start().await;
    let upstream = start_upstream().await;
    let cache = tempfile::tempdir().expect("tempdir");
    let template = publish(&server, "template", "plugins/template.wasm").await;
    let waf = publish(&server, "waf", "plugins/waf.wasm").await;
    let first = config(
        upstream.addr,
        &server,
        cache.path(),
        "plugins/template.wasm",
        &template,
        STAMP,
    );
    let text = Arc::new(Mutex::new(first.clone()));
    let source = ConfigSource::new({
        let text = Arc::clone(&text);
        move || {
            let text = text.lock().unwrap_or_else(PoisonError::into_inner).clone();
            edge_config::parse(&text, Path::new("test.toml"), Path::new("."))
        }
    });
    let parsed = edge_config::parse(&first, Path::new("test.toml"), Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"));
    let node = breakwater_edge::start_with_source(parsed, source)
        .await
        .unwrap_or_else(|e| panic!("the node did not start: {e}"));
    assert_eq!(stamp_of_get(&node).await.as_deref(), Some("from-s3"));

    *text.lock().unwrap_or_else(PoisonError::into_inner) = config(
        upstream.addr,
        &server,
        cache.path(),
        "plugins/waf.wasm",
        &waf,
        "{}",
    );
    let report = node
        .reload()
        .await
        .unwrap_or_else(|e| panic!("reload: {e}"));
    assert_eq!(report.plugins.len(), 1);
    assert_eq!(report.plugins[0].sha256, waf);
    assert_eq!(cache_entries(cache.path()), {
        let mut both = vec![format!("{template}.wasm"), format!("{waf}.wasm")];
        both.sort();
        both
    });
    // The waf runs now: no stamp, and a scanner is refused.
    assert_eq!(stamp_of_get(&node).await, None);
    let scanner = client()
        .get(url(&node, "/echo"))
        .header("user-agent", "sqlmap/1.7")
        .send()
        .await
        .expect("request");
    assert_eq!(scanner.status(), 403);
    node.shutdown().await;
}
