//! Pinned fetches into a local content-addressed cache.
//!
//! A cache entry is named by the pin, `<cache_dir>/<sha256>[.<ext>]`, and
//! lands by write-then-rename only after its bytes hashed to the pin while
//! they streamed in: an entry that exists is complete and verified. A
//! mismatch, a size overrun or a failed request leaves nothing behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{ObjectUrl, Sha256Digest, Store, StoreError, StoreOptions};

/// Makes sure the object at `url`, pinned to `expected`, is in `cache_dir`,
/// and returns its cache path.
///
/// A cache entry that is present and still hashes to the pin is returned
/// without touching the network; one that no longer does (disk corruption,
/// tampering) is removed and fetched again. Otherwise the object is
/// downloaded (at most `limit` bytes), hashed while it streams, and
/// refused with [`StoreError::Mismatch`] if its digest is not the pin.
pub async fn fetch_verified(
    url: &ObjectUrl,
    expected: &Sha256Digest,
    cache_dir: &Path,
    limit: u64,
    options: &StoreOptions,
) -> Result<PathBuf, StoreError> {
    let target = cache_path(cache_dir, expected, &url.key);
    if cached(&target, expected).await? {
        return Ok(target);
    }
    let store = Store::open(&url.store, options)?;
    store
        .download_verified(&url.key, expected, &target, limit)
        .await?;
    Ok(target)
}

impl Store {
    /// [`fetch_verified`] for `key` in this store.
    pub async fn fetch_verified(
        &self,
        key: &str,
        expected: &Sha256Digest,
        cache_dir: &Path,
        limit: u64,
    ) -> Result<PathBuf, StoreError> {
        let target = cache_path(cache_dir, expected, key);
        if cached(&target, expected).await? {
            return Ok(target);
        }
        self.download_verified(key, expected, &target, limit)
            .await?;
        Ok(target)
    }

    async fn download_verified(
        &self,
        key: &str,
        expected: &Sha256Digest,
        target: &Path,
        limit: u64,
    ) -> Result<(), StoreError> {
        let location = self.location(key)?;
        let url = self.object_url(key);
        let dir = target.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| StoreError::io("creating the cache directory", dir, e))?;

        let result = self
            .inner()
            .get(&location)
            .await
            .map_err(|e| StoreError::request("reading", url.clone(), e))?;
        if result.meta.size > limit {
            return Err(StoreError::TooLarge { url, limit });
        }
        let mut partial = PartialFile::create(dir, expected).await?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| StoreError::request("reading", url.clone(), e))?;
            written += chunk.len() as u64;
            // The declared size may lie; the limit holds for what arrives.
            if written > limit {
                return Err(StoreError::TooLarge { url, limit });
            }
            hasher.update(&chunk);
            partial.write(&chunk).await?;
        }
        let actual = Sha256Digest::from_hasher(hasher);
        if actual != *expected {
            return Err(StoreError::Mismatch {
                url,
                expected: *expected,
                actual,
            });
        }
        partial.commit(target).await?;
        tracing::info!(%url, sha256 = %expected, bytes = written, path = %target.display(), "fetched and verified");
        Ok(())
    }
}

/// `<cache_dir>/<sha256>` plus the key's extension when it has a short,
/// plain one (`.wasm`), so that tools recognise the file.
fn cache_path(cache_dir: &Path, digest: &Sha256Digest, key: &str) -> PathBuf {
    let name = key.rsplit('/').next().unwrap_or(key);
    let extension = name.rsplit_once('.').map(|(_, ext)| ext).filter(|ext| {
        !ext.is_empty() && ext.len() <= 16 && ext.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    match extension {
        Some(ext) => cache_dir.join(format!("{digest}.{ext}")),
        None => cache_dir.join(digest.to_string()),
    }
}

/// Whether `target` holds the pinned bytes. An entry that does not is
/// removed so that the caller fetches it again.
async fn cached(target: &Path, expected: &Sha256Digest) -> Result<bool, StoreError> {
    match tokio::fs::metadata(target).await {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StoreError::io("reading the cache entry", target, e)),
    }
    let path = target.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || Sha256Digest::of_file(&path))
        .await
        .map_err(|e| StoreError::io("hashing the cache entry", target, std::io::Error::other(e)))?
        .map_err(|e| StoreError::io("hashing the cache entry", target, e))?;
    if actual == *expected {
        return Ok(true);
    }
    tracing::warn!(path = %target.display(), expected = %expected, %actual, "cache entry does not match its name; fetching it again");
    tokio::fs::remove_file(target)
        .await
        .map_err(|e| StoreError::io("removing the corrupt cache entry", target, e))?;
    Ok(false)
}

/// A download in progress, beside its final name: removed on drop unless
/// committed, so a failure leaves no file behind.
struct PartialFile {
    path: PathBuf,
    file: tokio::fs::File,
    committed: bool,
}

impl PartialFile {
    async fn create(dir: &Path, digest: &Sha256Digest) -> Result<Self, StoreError> {
        // Unique per process and call: concurrent fetches of one pin each
        // write their own file, and whichever renames last wins with the
        // same verified bytes.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{digest}.{}.{n}.partial", std::process::id()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| StoreError::io("creating", &path, e))?;
        Ok(Self {
            path,
            file,
            committed: false,
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(bytes)
            .await
            .map_err(|e| StoreError::io("writing", &self.path, e))
    }

    /// Flushes the bytes to disk, then renames them to `target`.
    async fn commit(mut self, target: &Path) -> Result<(), StoreError> {
        self.file
            .flush()
            .await
            .map_err(|e| StoreError::io("writing", &self.path, e))?;
        self.file
            .sync_all()
            .await
            .map_err(|e| StoreError::io("syncing", &self.path, e))?;
        tokio::fs::rename(&self.path, target)
            .await
            .map_err(|e| StoreError::io("renaming into place", target, e))?;
        self.committed = true;
        // The rename itself is durable once the directory is synced; a
        // failure here only risks a re-fetch after a crash.
        if let Some(dir) = target.parent()
            && let Ok(dir) = tokio::fs::File::open(dir).await
        {
            let _ = dir.sync_all().await;
        }
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreUrl;

    #[test]
    fn cache_names_keep_plain_extensions_only() {
        let digest = Sha256Digest::of(b"x");
        let dir = Path::new("/c");
        assert_eq!(
            cache_path(dir, &digest, "a/waf.wasm"),
            dir.join(format!("{digest}.wasm"))
        );
        assert_eq!(
            cache_path(dir, &digest, "a/waf"),
            dir.join(digest.to_string())
        );
        assert_eq!(
            cache_path(dir, &digest, "a/w.x-y"),
            dir.join(digest.to_string())
        );
    }

    #[tokio::test]
    async fn file_store_fetch_verifies_and_caches() {
        let source = tempfile::tempdir().expect("tempdir");
        let cache = tempfile::tempdir().expect("tempdir");
        std::fs::write(source.path().join("p.wasm"), b"plugin bytes").expect("write");
        let url: ObjectUrl = format!("file://{}/p.wasm", source.path().display())
            .parse()
            .expect("url");
        let pin = Sha256Digest::of(b"plugin bytes");
        let options = StoreOptions::default();

        let wrong = Sha256Digest::of(b"other bytes");
        let refused = fetch_verified(&url, &wrong, cache.path(), 1 << 20, &options).await;
        assert!(
            matches!(refused, Err(StoreError::Mismatch { .. })),
            "{refused:?}"
        );
        assert_eq!(std::fs::read_dir(cache.path()).expect("ls").count(), 0);

        let path = fetch_verified(&url, &pin, cache.path(), 1 << 20, &options)
            .await
            .expect("fetch");
        assert_eq!(std::fs::read(&path).expect("read"), b"plugin bytes");
        // Gone at the source: the cache answers.
        std::fs::remove_file(source.path().join("p.wasm")).expect("rm");
        let again = fetch_verified(&url, &pin, cache.path(), 1 << 20, &options)
            .await
            .expect("cached");
        assert_eq!(again, path);

        // A corrupted entry is not served: it is dropped and re-fetched,
        // which here fails because the source is gone.
        std::fs::write(&path, b"tampered").expect("tamper");
        let store = Store::open(
            &StoreUrl::File {
                root: source.path().to_path_buf(),
            },
            &options,
        )
        .expect("open");
        let refetched = store
            .fetch_verified("p.wasm", &pin, cache.path(), 1 << 20)
            .await;
        assert!(
            matches!(refetched, Err(StoreError::NotFound { .. })),
            "{refetched:?}"
        );
        assert!(!path.exists());
    }
}
