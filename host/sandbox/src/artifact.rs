//! Plugin artifacts: reading, the sha256 pin, and compiling with a cache of
//! precompiled components.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::LoadError;

/// The lower-case hex sha256 of `bytes`.
///
/// ```
/// assert_eq!(
///     breakwater_sandbox::sha256_hex(b""),
///     "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
/// );
/// ```
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads the artifact and checks it against its pin.
pub(crate) fn read_pinned(plugin: &str, path: &Path, pin: &str) -> Result<Vec<u8>, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        plugin: plugin.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let actual = sha256_hex(&bytes);
    let expected = pin
        .trim()
        .trim_start_matches("sha256:")
        .to_ascii_lowercase();
    if actual != expected {
        return Err(LoadError::Sha256Mismatch {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
            expected,
            actual,
        });
    }
    Ok(bytes)
}

/// Compiles the component, or loads it from the precompiled cache.
///
/// Cache entries are named by the artifact's sha256 and a hash of the
/// engine's compatibility settings, so a different engine build or
/// configuration never picks up a stale entry; an entry that still fails to
/// load is recompiled and replaced.
pub(crate) fn compile(
    plugin: &str,
    engine: &Engine,
    path: &Path,
    sha256: &str,
    bytes: &[u8],
    cache_dir: Option<&Path>,
) -> Result<Component, LoadError> {
    let cached = cache_dir.map(|dir| cache_path(dir, engine, sha256));
    // Read into memory rather than `deserialize_file`, which maps the file:
    // a mapped entry rewritten in place under a running node would fault
    // (SIGBUS) in its code pages.
    let entry = cached
        .as_deref()
        .and_then(|c| Some((c, std::fs::read(c).ok()?)));
    if let Some((cached, entry)) = entry {
        // SAFETY: the cache directory belongs to the node: entries are
        // written only by `store` below, from components this engine
        // compiled, and land by rename so none is ever half-written; the
        // bytes are checked for this engine's compatibility on load.
        match unsafe { Component::deserialize(engine, &entry) } {
            Ok(component) => return Ok(component),
            Err(error) => tracing::warn!(
                plugin,
                cache = %cached.display(),
                "ignoring unusable precompiled component: {error:#}"
            ),
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| LoadError::Compile {
        plugin: plugin.to_owned(),
        path: path.to_owned(),
        message: format!("{e:#}"),
    })?;
    if let Some(cached) = cached {
        // The cache only saves time; failing to fill it is not fatal.
        if let Err(error) = store(&component, &cached) {
            tracing::warn!(plugin, cache = %cached.display(), "not caching the precompiled component: {error}");
        }
    }
    Ok(component)
}

fn cache_path(dir: &Path, engine: &Engine, sha256: &str) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()))
}

/// Writes then renames, so readers see a whole entry or none.
fn store(component: &Component, path: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    let partial = path.with_extension(format!("cwasm.{}.partial", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })
}
