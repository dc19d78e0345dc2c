//! `pull`: a version into the local cache, from the first store of a list
//! that can serve it, every byte verified before it lands.
//!
//! ```text
//! <cache>/models/<name>/<version>/…files, manifest.json   the serving path
//! <cache>/models/<name>/channels/<channel>                 last resolution
//! <cache>/.partial/<name>@<version>.<pid>.<n>/             a download
//! ```
//!
//! A download goes to its own directory under `.partial/`: the files are
//! fetched with parallel ranged GETs, each checked for size and sha256
//! against the manifest, synced, and only then is the directory renamed to
//! its serving path in one step. A version directory in the serving path is
//! therefore always complete and verified; a corrupt or partial object
//! refuses the version (with a log line and
//! `breakwater_model_pull_refused_total`) and leaves nothing there. A
//! download killed halfway leaves only its `.partial/` directory, which the
//! next pull removes once its process is gone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::{GetOptions, GetRange};
use sha2::{Digest, Sha256};

use crate::model::registry::{ChannelPointer, with_deadline};
use crate::model::{MANIFEST_FILE, Manifest, ModelError, ModelRef, ModelStore, Selector};
use crate::{Sha256Digest, StoreError};

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The local cache directory.
    pub cache_dir: PathBuf,
    /// Ranged GETs in flight at once.
    pub concurrency: usize,
    /// Bytes per ranged GET.
    pub range_size: u64,
    /// Deadline for one store's attempt (resolving, downloading,
    /// verifying); the next store gets a fresh one.
    pub deadline: Duration,
    /// Re-hash a cached version before using it (else its presence, which
    /// only a verified download creates, and its file sizes suffice).
    pub verify_cache: bool,
    /// Resolve a channel from the last resolution cached locally when there
    /// is one, without asking a store (a fast start; a watcher then follows
    /// the channel). Otherwise the stores are asked first and the cached
    /// resolution is used only when none answers.
    pub prefer_cache: bool,
}

impl PullOptions {
    /// 8 ranged GETs of 8 MiB in flight, a 1-hour deadline per store.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            concurrency: 8,
            range_size: 8 << 20,
            deadline: Duration::from_secs(3600),
            verify_cache: false,
            prefer_cache: false,
        }
    }
}

/// A version ready to load.
#[derive(Debug, Clone)]
pub struct PulledModel {
    /// The version's directory in the serving path: its files and
    /// `manifest.json`, complete and verified.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// `local cache`, or the store it was downloaded from.
    pub source: String,
    /// Bytes downloaded (0 from the cache).
    pub bytes_fetched: u64,
}

impl PulledModel {
    /// The path of one of its files.
    pub fn file(&self, path: &str) -> PathBuf {
        self.dir.join(path)
    }
}

/// Makes `reference` available in `options.cache_dir` and returns where.
///
/// A version already in the cache is served from it without the network.
/// Otherwise the stores are tried in order (local region first): one that
/// is unreachable, lacks the version, or serves a corrupt object is
/// skipped for the next, and [`ModelError::NoStore`] lists every store's
/// reason when none succeeds.
pub async fn pull(
    stores: &[ModelStore],
    reference: &ModelRef,
    options: &PullOptions,
) -> Result<PulledModel, ModelError> {
    let cache = Cache::new(&options.cache_dir);
    cache.remove_stale_partials().await;
    let name = reference.name.as_str();

    // Resolve without the network when the reference allows it.
    let local_version = match &reference.selector {
        Selector::Version(v) => Some(v.clone()),
        Selector::Channel(c) if options.prefer_cache => cache.channel(name, c).await,
        Selector::Channel(_) => None,
    };
    if let Some(version) = &local_version
        && let Some(pulled) = cache.cached(name, version, options.verify_cache).await?
    {
        metrics::counter!("breakwater_model_pulls_total", "source" => "cache").increment(1);
        return Ok(pulled);
    }

    let mut failures = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        if i > 0 {
            metrics::counter!("breakwater_model_store_fallbacks_total").increment(1);
        }
        let what = format!("pulling {reference} from {}", store.label());
        let attempt = with_deadline(what, options.deadline, async {
            let (version, pointer) = match &reference.selector {
                Selector::Version(v) => (v.clone(), None),
                Selector::Channel(c) => {
                    let pointer = store.channel(name, c).await?;
                    (pointer.version.clone(), Some((c, pointer)))
                }
            };
            let pulled = match cache.cached(name, &version, options.verify_cache).await? {
                Some(pulled) => pulled,
                None => download(store, &cache, name, &version, options).await?,
            };
            // The channel's cached resolution moves only to a version that
            // is verified in the cache: a refused one never becomes what a
            // restart (which prefers the cache) serves.
            if let Some((channel, pointer)) = pointer {
                cache.set_channel(name, channel, &pointer).await?;
            }
            Ok(pulled)
        })
        .await;
        match attempt {
            Ok(pulled) => {
                let source = if pulled.bytes_fetched == 0 {
                    "cache"
                } else {
                    "store"
                };
                metrics::counter!("breakwater_model_pulls_total", "source" => source).increment(1);
                return Ok(pulled);
            }
            Err(e) => {
                tracing::warn!(store = %store.label(), "pulling {reference}: {e}");
                failures.push((store.label().to_owned(), e));
            }
        }
    }

    // No store answered: a channel resolved before still starts from the
    // cache ("serve something").
    if let Selector::Channel(channel) = &reference.selector
        && failures.iter().all(|(_, e)| e.is_unreachable())
        && let Some(version) = cache.channel(name, channel).await
        && let Some(pulled) = cache.cached(name, &version, options.verify_cache).await?
    {
        tracing::warn!("no store reachable; {reference} resolved from the cache to {version}");
        metrics::counter!("breakwater_model_pulls_total", "source" => "cache").increment(1);
        return Ok(pulled);
    }
    metrics::counter!("breakwater_model_pull_failures_total").increment(1);
    Err(ModelError::NoStore {
        reference: reference.to_string(),
        failures: failures
            .into_iter()
            .map(|(s, e)| (s, e.to_string()))
            .collect(),
    })
}

/// The version `reference` names, from the first store that answers (in
/// priority order): what a runtime polls to follow a channel before it
/// calls [`pull`] for a new version.
pub async fn resolve(stores: &[ModelStore], reference: &ModelRef) -> Result<String, ModelError> {
    if let Selector::Version(v) = &reference.selector {
        return Ok(v.clone());
    }
    let mut failures = Vec::new();
    for store in stores {
        match store.resolve(reference).await {
            Ok(version) => return Ok(version),
            Err(e) => failures.push((store.label().to_owned(), e.to_string())),
        }
    }
    Err(ModelError::NoStore {
        reference: reference.to_string(),
        failures,
    })
}

/// Counts a refused version by reason and logs it.
fn refuse(reason: &'static str, error: ModelError) -> ModelError {
    metrics::counter!("breakwater_model_pull_refused_total", "reason" => reason).increment(1);
    tracing::error!(reason, "refusing model version: {error}");
    error
}

async fn download(
    store: &ModelStore,
    cache: &Cache,
    name: &str,
    version: &str,
    options: &PullOptions,
) -> Result<PulledModel, ModelError> {
    let started = Instant::now();
    let (manifest_bytes, manifest) = store.manifest_bytes(name, version).await?;
    let reference = manifest.reference();
    let staging = cache.staging(name, version).await?;

    // Every file at its final size, then the ranges in parallel.
    for file in &manifest.files {
        let path = staging.path.join(&file.path);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| ModelError::io("creating", parent, e))?;
        }
        let f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| ModelError::io("creating", &path, e))?;
        f.set_len(file.size)
            .await
            .map_err(|e| ModelError::io("sizing", &path, e))?;
    }
    let range_size = options.range_size.max(1 << 20);
    let mut ranges = Vec::new();
    for (index, file) in manifest.files.iter().enumerate() {
        let mut start = 0;
        while start < file.size {
            let end = (start + range_size).min(file.size);
            ranges.push((index, start..end));
            start = end;
        }
    }

    // Ranged GETs run `concurrency` at a time but come out in order
    // (`buffered`), so one blocking writer writes each file sequentially
    // and hashes it as it goes: no second read to verify. At most about
    // `concurrency + 2` ranges are in memory.
    let paths: Vec<PathBuf> = manifest
        .files
        .iter()
        .map(|f| staging.path.join(&f.path))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<(usize, Bytes)>(2);
    let writer = {
        let paths = paths.clone();
        tokio::task::spawn_blocking(move || write_in_order(&paths, rx))
    };
    let mut fetched = 0u64;
    let mut ranges = futures_util::stream::iter(ranges)
        .map(|(index, range)| {
            let file = &manifest.files[index];
            let key = super::keys::file(name, version, &file.path);
            let reference = reference.clone();
            async move {
                let bytes = fetch_range(store, &key, file.size, range, &reference).await?;
                Ok::<_, ModelError>((index, bytes))
            }
        })
        .buffered(options.concurrency.max(1));
    let mut failed = None;
    while let Some(result) = ranges.next().await {
        match result {
            Ok((index, bytes)) => {
                fetched += bytes.len() as u64;
                if tx.send((index, bytes)).await.is_err() {
                    // The writer stopped: its error says why.
                    break;
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(ranges);
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ModelError::io("writing", &staging.path, std::io::Error::other(e)))?;
    if let Some(error) = failed {
        return Err(match error {
            e @ ModelError::Corrupt { .. } => refuse("size", e),
            e => e,
        });
    }
    let digests = written.map_err(|(index, e)| ModelError::io("writing", &paths[index], e))?;
    let downloaded = started.elapsed().as_secs_f64();
    for (file, actual) in manifest.files.iter().zip(digests) {
        if actual != file.sha256 {
            let url = store
                .store()
                .object_url(&super::keys::file(name, version, &file.path));
            return Err(refuse(
                "sha256",
                ModelError::Corrupt {
                    reference,
                    url,
                    detail: format!("sha256 {actual}, the manifest says {}", file.sha256),
                },
            ));
        }
    }

    let manifest_path = staging.path.join(MANIFEST_FILE);
    tokio::fs::write(&manifest_path, &manifest_bytes)
        .await
        .map_err(|e| ModelError::io("writing", &manifest_path, e))?;
    let bytes = fetched;
    let dir = staging.commit(&cache.version_dir(name, version)).await?;
    metrics::counter!("breakwater_model_pull_bytes_total").increment(bytes);
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        store = %store.label(),
        bytes,
        seconds,
        download_seconds = downloaded,
        mb_per_s = bytes as f64 / 1e6 / seconds.max(1e-9),
        dir = %dir.display(),
        "pulled and verified {reference}"
    );
    Ok(PulledModel {
        dir,
        manifest,
        source: store.label().to_owned(),
        bytes_fetched: bytes,
    })
}

/// One range of an object, whole in memory, checked against the size the
/// manifest gives.
async fn fetch_range(
    store: &ModelStore,
    key: &str,
    size: u64,
    range: std::ops::Range<u64>,
    reference: &str,
) -> Result<Bytes, ModelError> {
    let url = store.store().object_url(key);
    let location = store.store().location(key)?;
    let corrupt = |detail: String| ModelError::Corrupt {
        reference: reference.to_owned(),
        url: url.clone(),
        detail,
    };
    let options = GetOptions {
        range: Some(GetRange::Bounded(range.clone())),
        ..GetOptions::default()
    };
    let result = store
        .store()
        .inner()
        .get_opts(&location, options)
        .await
        .map_err(|e| StoreError::request("reading", url.clone(), e))?;
    if result.meta.size != size {
        return Err(corrupt(format!(
            "{} bytes, the manifest says {size}",
            result.meta.size
        )));
    }
    if result.range != range {
        return Err(corrupt(format!(
            "asked for bytes {range:?}, got {:?}",
            result.range
        )));
    }
    let want = range.end - range.start;
    let mut buf = BytesMut::with_capacity(usize::try_from(want).unwrap_or(0));
    let mut stream = result.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| StoreError::request("reading", url.clone(), e))?;
        if (buf.len() + chunk.len()) as u64 > want {
            return Err(corrupt(format!("more than the {want} bytes asked for")));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.len() as u64 != want {
        return Err(corrupt(format!(
            "the object ended after {} of {want} bytes at {}",
            buf.len(),
            range.start
        )));
    }
    Ok(buf.freeze())
}

/// Writes the ranges, which arrive in file order and offset order, each
/// file from its start, hashing as it goes; syncs each file. Returns every
/// file's digest (files with no range are empty), or the failing file's
/// index and error.
fn write_in_order(
    paths: &[PathBuf],
    mut rx: tokio::sync::mpsc::Receiver<(usize, Bytes)>,
) -> Result<Vec<Sha256Digest>, (usize, std::io::Error)> {
    use std::io::Write;
    let mut digests = vec![Sha256Digest::of(b""); paths.len()];
    let mut current: Option<(usize, std::fs::File, Sha256)> = None;
    let finish = |(index, file, hasher): (usize, std::fs::File, Sha256),
                  digests: &mut Vec<Sha256Digest>| {
        file.sync_all().map_err(|e| (index, e))?;
        digests[index] = Sha256Digest::from_hasher(hasher);
        Ok::<_, (usize, std::io::Error)>(())
    };
    while let Some((index, bytes)) = rx.blocking_recv() {
        if current.as_ref().is_none_or(|(i, _, _)| *i != index) {
            if let Some(done) = current.take() {
                finish(done, &mut digests)?;
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&paths[index])
                .map_err(|e| (index, e))?;
            current = Some((index, file, Sha256::new()));
        }
        if let Some((_, file, hasher)) = current.as_mut() {
            file.write_all(&bytes).map_err(|e| (index, e))?;
            hasher.update(&bytes);
        }
    }
    if let Some(done) = current.take() {
        finish(done, &mut digests)?;
    }
    Ok(digests)
}

/// The local cache directory.
struct Cache {
    root: PathBuf,
}

/// A download directory under `.partial/`, removed unless committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    /// Renames the directory to `target` (which a concurrent pull may have
    /// filled meanwhile: then that one is kept).
    async fn commit(mut self, target: &Path) -> Result<PathBuf, ModelError> {
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| ModelError::io("creating", parent, e))?;
        }
        match tokio::fs::rename(&self.path, target).await {
            Ok(()) => {
                self.committed = true;
                if let Some(parent) = target.parent()
                    && let Ok(dir) = tokio::fs::File::open(parent).await
                {
                    let _ = dir.sync_all().await;
                }
                Ok(target.to_path_buf())
            }
            Err(_) if target.join(MANIFEST_FILE).is_file() => Ok(target.to_path_buf()),
            Err(e) => Err(ModelError::io("renaming into place", target, e)),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl Cache {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    fn version_dir(&self, name: &str, version: &str) -> PathBuf {
        self.root.join("models").join(name).join(version)
    }

    fn channel_path(&self, name: &str, channel: &str) -> PathBuf {
        self.root
            .join("models")
            .join(name)
            .join("channels")
            .join(channel)
    }

    fn partial_root(&self) -> PathBuf {
        self.root.join(".partial")
    }

    async fn staging(&self, name: &str, version: &str) -> Result<Staging, ModelError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = self
            .partial_root()
            .join(format!("{name}@{version}.{}.{n}", std::process::id()));
        tokio::fs::create_dir_all(&path)
            .await
            .map_err(|e| ModelError::io("creating", &path, e))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Removes downloads left by processes that are gone (killed mid-pull).
    async fn remove_stale_partials(&self) {
        let Ok(mut entries) = tokio::fs::read_dir(self.partial_root()).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
            if !alive {
                tracing::info!(path = %entry.path().display(), "removing a download left by a stopped process");
                let _ = tokio::fs::remove_dir_all(entry.path()).await;
            }
        }
    }

    /// The cached version, if it is there and whole. One that is not (disk
    /// trouble, a hand edit) is removed so that it is fetched again.
    async fn cached(
        &self,
        name: &str,
        version: &str,
        rehash: bool,
    ) -> Result<Option<PulledModel>, ModelError> {
        let dir = self.version_dir(name, version);
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = match tokio::fs::read(&manifest_path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ModelError::io("reading", &manifest_path, e)),
        };
        let problem = match Manifest::parse(
            &bytes,
            &manifest_path.display().to_string(),
            Some((name, version)),
        ) {
            Ok(manifest) => match check_local(&dir, &manifest, rehash).await {
                None => {
                    return Ok(Some(PulledModel {
                        dir,
                        manifest,
                        source: "local cache".to_owned(),
                        bytes_fetched: 0,
                    }));
                }
                Some(problem) => problem,
            },
            Err(e) => e.to_string(),
        };
        metrics::counter!("breakwater_model_cache_corrupt_total").increment(1);
        tracing::warn!(dir = %dir.display(), "cached {name}@{version} is damaged ({problem}); fetching it again");
        // Out of the serving path in one step, then removed.
        let trash = self
            .partial_root()
            .join(format!("{name}@{version}.{}.trash", std::process::id()));
        let _ = tokio::fs::create_dir_all(self.partial_root()).await;
        let _ = tokio::fs::remove_dir_all(&trash).await;
        tokio::fs::rename(&dir, &trash)
            .await
            .map_err(|e| ModelError::io("removing the damaged cache entry", &dir, e))?;
        let _ = tokio::fs::remove_dir_all(&trash).await;
        Ok(None)
    }

    /// The version `name:channel` last resolved to, if recorded.
    async fn channel(&self, name: &str, channel: &str) -> Option<String> {
        let bytes = tokio::fs::read(self.channel_path(name, channel))
            .await
            .ok()?;
        let pointer: ChannelPointer = serde_json::from_slice(&bytes).ok()?;
        crate::model::check_name("version", &pointer.version).ok()?;
        Some(pointer.version)
    }

    async fn set_channel(
        &self,
        name: &str,
        channel: &str,
        pointer: &ChannelPointer,
    ) -> Result<(), ModelError> {
        let path = self.channel_path(name, channel);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| ModelError::io("creating", parent, e))?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let bytes = serde_json::to_vec(pointer).unwrap_or_default();
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| ModelError::io("writing", &tmp, e))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| ModelError::io("renaming into place", &path, e))
    }
}

/// What is wrong with a cached version directory, if anything.
async fn check_local(dir: &Path, manifest: &Manifest, rehash: bool) -> Option<String> {
    for file in &manifest.files {
        let path = dir.join(&file.path);
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() && meta.len() == file.size => {}
            Ok(meta) => {
                return Some(format!(
                    "{} has {} bytes, expected {}",
                    file.path,
                    meta.len(),
                    file.size
                ));
            }
            Err(e) => return Some(format!("{}: {e}", file.path)),
        }
        if rehash {
            let hashed = path.clone();
            let actual = tokio::task::spawn_blocking(move || Sha256Digest::of_file(&hashed)).await;
            match actual {
                Ok(Ok(actual)) if actual == file.sha256 => {}
                Ok(Ok(actual)) => return Some(format!("{} hashes to {actual}", file.path)),
                Ok(Err(e)) => return Some(format!("{}: {e}", file.path)),
                Err(e) => return Some(format!("{}: {e}", file.path)),
            }
        }
    }
    None
}
