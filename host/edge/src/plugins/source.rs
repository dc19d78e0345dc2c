//! Where a plugin's artifact comes from: a `path` on the node's disk, or a
//! `url` in object storage, fetched into the node's content-addressed cache
//! (`[plugin_store] cache_dir`) and verified against the plugin's sha256
//! before the sandbox ever sees it.
//!
//! Fetching is async and the sandbox loads synchronously, so the two are
//! separate steps: [`resolve`] (at start) or [`resolve_blocking`] (on a
//! reload's blocking thread) fetches every `url` plugin and points its
//! `path` at the verified cache entry; [`local_path`] then hands the sandbox
//! that file, which it hashes against the pin once more as it loads.

use std::path::{Path, PathBuf};

use breakwater_sandbox::LoadError;
use breakwater_store::{ObjectUrl, Sha256Digest, StoreError, StoreOptions};
use edge_config::{EdgeConfig, PluginConfig, PluginStoreConfig};

/// A plugin that could not be resolved: its name and why.
pub(crate) type ResolveError = (String, LoadError);

/// Fetches every `url` plugin of `config` not yet fetched into the cache
/// (a verified cache entry is used without the network) and sets its
/// `path` to the entry. A failure names the plugin and leaves the cache
/// without a partial or unverified file.
pub(crate) async fn resolve(config: &mut EdgeConfig) -> Result<(), ResolveError> {
    let options = store_options(&config.plugin_store);
    for plugin in &mut config.plugins {
        let Some(url) = plugin.url.clone().filter(|_| plugin.path.is_none()) else {
            continue;
        };
        let path = fetch(&config.plugin_store, &options, plugin, &url)
            .await
            .map_err(|error| (plugin.name.clone(), error))?;
        plugin.path = Some(path);
    }
    Ok(())
}

/// [`resolve`] for a thread that may block: a reload's `spawn_blocking`
/// task, or a thread outside any runtime. Not for an async task's thread.
pub(crate) fn resolve_blocking(config: &mut EdgeConfig) -> Result<(), ResolveError> {
    if config
        .plugins
        .iter()
        .all(|p| p.url.is_none() || p.path.is_some())
    {
        return Ok(());
    }
    match tokio::runtime::Handle::try_current() {
        // A blocking-pool thread may drive a future on its runtime.
        Ok(handle) => handle.block_on(resolve(config)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                let first = config.plugins.iter().find(|p| p.path.is_none());
                let name = first.map_or_else(String::new, |p| p.name.clone());
                (name.clone(), read_error(&name, "", e))
            })?
            .block_on(resolve(config)),
    }
}

/// The file the sandbox loads for `plugin`: its `path`, which for a `url`
/// plugin [`resolve`] set to the verified cache entry.
pub(crate) fn local_path(plugin: &PluginConfig) -> Result<&Path, LoadError> {
    match (&plugin.path, &plugin.url) {
        (Some(path), _) => Ok(path),
        (None, Some(url)) => Err(LoadError::Config {
            plugin: plugin.name.clone(),
            message: format!(
                "{url} was not fetched before loading (the node resolves `url` plugins first)"
            ),
        }),
        (None, None) => Err(LoadError::Config {
            plugin: plugin.name.clone(),
            message: "it has neither `path` nor `url`".to_owned(),
        }),
    }
}

async fn fetch(
    store: &PluginStoreConfig,
    options: &StoreOptions,
    plugin: &PluginConfig,
    url: &str,
) -> Result<PathBuf, LoadError> {
    // edge-config validated both; a programmatic config may not have been.
    let config_error = |message: String| LoadError::Config {
        plugin: plugin.name.clone(),
        message,
    };
    let object: ObjectUrl = url
        .parse()
        .map_err(|e: breakwater_store::UrlError| config_error(e.to_string()))?;
    let pin: Sha256Digest =
        plugin
            .sha256
            .parse()
            .map_err(|e: breakwater_store::DigestParseError| {
                config_error(format!("a `url` plugin needs its sha256 pin: {e}"))
            })?;
    tracing::info!(plugin = %plugin.name, %url, sha256 = %pin, "resolving plugin artifact");
    let fetched = tokio::time::timeout(
        store.fetch_timeout,
        breakwater_store::fetch_verified(&object, &pin, &store.cache_dir, store.max_bytes, options),
    )
    .await;
    match fetched {
        Ok(Ok(path)) => Ok(path),
        Ok(Err(StoreError::Mismatch {
            expected, actual, ..
        })) => Err(LoadError::Sha256Mismatch {
            plugin: plugin.name.clone(),
            path: PathBuf::from(url),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }),
        Ok(Err(error)) => Err(read_error(&plugin.name, url, error)),
        Err(_) => Err(read_error(
            &plugin.name,
            url,
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "not fetched within {:?} (`[plugin_store] fetch_timeout`)",
                    store.fetch_timeout
                ),
            ),
        )),
    }
}

fn read_error(
    plugin: &str,
    url: &str,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> LoadError {
    LoadError::Read {
        plugin: plugin.to_owned(),
        path: PathBuf::from(url),
        source: std::io::Error::other(error),
    }
}

fn store_options(store: &PluginStoreConfig) -> StoreOptions {
    StoreOptions {
        endpoint: store.endpoint.clone(),
        region: store.region.clone(),
        access_key_id: store.access_key_id.clone(),
        secret_access_key: store.secret_access_key.clone(),
        allow_http: store.allow_http,
        // One request may take the whole fetch budget; the overall
        // deadline above still bounds retries.
        request_timeout: store.fetch_timeout,
        ..StoreOptions::default()
    }
}
