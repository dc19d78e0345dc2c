//! The tiers: L1 in memory (moka: W-TinyLFU admission, weighed in bytes,
//! a TTL per entry), L2 on disk (sled, checksummed records, a byte budget
//! enforced by evicting the entries that expire soonest), and L3 shared by
//! the cluster in Redis (see [`super::shared`]), when `[cluster]` has one.
//! A lookup tries them in that order; a hit in a lower tier is copied into
//! the ones above it.
//!
//! Keys: a response lives under `primary \0 vary-values`; the primary key
//! alone holds the `Vary` field names of the response last stored for it,
//! so a lookup is two reads and a purge by key is a prefix removal.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use edge_config::{CacheConfig, SharedCacheMode};
use http::HeaderMap;
use moka::notification::RemovalCause;
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use super::entry::{Entry, Stored};
use super::policy::{millis, now_ms, vary_key, vary_names};
use super::shared::{Found, SharedTier, WriteQueue};
use crate::cluster::SharedCacheSettings;

/// Where a lookup found its entry: the `tier` metrics label and the
/// `X-Cache-Tier` header. Ordered from the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tier {
    Memory,
    Disk,
    Shared,
}

impl Tier {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Shared => "shared",
        }
    }
}

/// What a purge removed: responses per tier. `shared` is `None` without a
/// shared tier, `Some(Err(_))` when Redis could not be reached.
#[derive(Debug, Default)]
pub(crate) struct Purged {
    pub(crate) memory: usize,
    pub(crate) disk: usize,
    pub(crate) shared: Option<Result<usize, breakwater_cluster::Unavailable>>,
}

impl Purged {
    /// Both purges' removals; a shared tier that missed either missed.
    pub(crate) fn and(self, other: Purged) -> Purged {
        Purged {
            memory: self.memory + other.memory,
            disk: self.disk + other.disk,
            shared: match (self.shared, other.shared) {
                (Some(Ok(a)), Some(Ok(b))) => Some(Ok(a + b)),
                (Some(Err(error)), _) | (_, Some(Err(error))) => Some(Err(error)),
                (one, other) => one.or(other),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("opening the disk cache at {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: sled::Error,
    },
}

#[derive(Clone)]
struct L1Value {
    stored: Arc<Stored>,
    ttl: Duration,
    weight: u32,
    /// Until when (ms) the entry is worth keeping, which may be past `ttl`:
    /// what `evicted` hands L3 when memory lets it go.
    keep_until_ms: u64,
    /// Read from L3: it need not be written there again.
    from_shared: bool,
}

struct L1Expiry;

impl moka::Expiry<String, L1Value> for L1Expiry {
    fn expire_after_create(&self, _: &String, value: &L1Value, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
    fn expire_after_update(
        &self,
        _: &String,
        value: &L1Value,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

pub(crate) struct Tiers {
    memory: moka::future::Cache<String, L1Value>,
    disk: Option<Arc<DiskTier>>,
    shared: Option<SharedTier>,
    memory_ttl_max: Duration,
    disk_ttl_max: Duration,
    keep_stale: Duration,
}

/// What a purge matches.
pub(crate) enum Selector<'a> {
    Key(&'a str),
    UrlPrefix(&'a str),
    Tag(&'a str),
}

impl Selector<'_> {
    fn matches(&self, key: &str, url: &str, tags: &[String]) -> bool {
        match self {
            Selector::Key(primary) => primary_of(key) == *primary,
            Selector::UrlPrefix(prefix) => {
                // `/path…` matches on any host.
                let target = if prefix.starts_with('/') {
                    url.find('/').map_or("", |i| &url[i..])
                } else {
                    url
                };
                target.starts_with(prefix)
            }
            Selector::Tag(tag) => tags.iter().any(|t| t == tag),
        }
    }
}

pub(crate) fn primary_of(storage_key: &str) -> &str {
    storage_key.split('\0').next().unwrap_or(storage_key)
}

pub(crate) fn storage_key(primary: &str, vary: &str) -> String {
    format!("{primary}\0{vary}")
}

/// An entry whose memory TTL ends with less than this left to keep is
/// not worth a write to L3.
const WORTH_SHARING: u64 = 1000;

/// Under `evicted`, a response leaving memory goes to L3 when it was
/// pushed out for room, or reached the memory tier's ceiling with at
/// least [`WORTH_SHARING`] of its keep time left; not when it was replaced
/// or purged, its time was spent, or it came from L3 in the first place.
fn share_evicted(queue: &WriteQueue, key: &str, value: L1Value, cause: RemovalCause) {
    let Stored::Response(entry) = &*value.stored else {
        return;
    };
    let leaving = match cause {
        RemovalCause::Size => true,
        RemovalCause::Expired => value.keep_until_ms > now_ms().saturating_add(WORTH_SHARING),
        RemovalCause::Explicit | RemovalCause::Replaced => false,
    };
    if leaving && !value.from_shared {
        let names = vary_names(&entry.headers).unwrap_or_default();
        queue.offer(key, names, entry.clone(), value.keep_until_ms);
    }
}

impl Tiers {
    pub(crate) fn open(
        config: &CacheConfig,
        shared: Option<SharedCacheSettings>,
    ) -> Result<Self, CacheError> {
        let shared = shared.map(SharedTier::start);
        let share_on_eviction = shared
            .as_ref()
            .filter(|shared| shared.mode() == SharedCacheMode::Evicted)
            .map(|shared| shared.queue().clone());
        let memory = moka::future::Cache::builder()
            .max_capacity(config.memory_bytes)
            .weigher(|_: &String, value: &L1Value| value.weight)
            .expire_after(L1Expiry)
            .support_invalidation_closures()
            .eviction_listener(move |key, value, cause| {
                if cause == RemovalCause::Size {
                    metrics::counter!("breakwater_cache_evictions_total", "tier" => "memory")
                        .increment(1);
                }
                if let Some(queue) = &share_on_eviction {
                    share_evicted(queue, &key, value, cause);
                }
            })
            .build();
        let disk = match &config.disk_path {
            Some(path) => Some(Arc::new(DiskTier::open(path, config.disk_bytes)?)),
            None => None,
        };
        Ok(Self {
            memory,
            disk,
            shared,
            memory_ttl_max: config.memory_ttl_max,
            disk_ttl_max: config.disk_ttl_max,
            keep_stale: config.keep_stale,
        })
    }

    /// From L1, else L2 (copied into L1).
    async fn get_local(&self, key: &str) -> Option<(Arc<Stored>, Tier)> {
        if let Some(value) = self.memory.get(key).await {
            return Some((value.stored, Tier::Memory));
        }
        let disk = self.disk.clone()?;
        let owned = key.to_owned();
        let found = tokio::task::spawn_blocking(move || disk.get(&owned))
            .await
            .ok()
            .flatten()?;
        let (stored, expires_ms) = found;
        let stored = Arc::new(stored);
        let left = Duration::from_millis(expires_ms.saturating_sub(now_ms()));
        self.put_memory(key, stored.clone(), left, false).await;
        Some((stored, Tier::Disk))
    }

    /// An L3 hit, copied into L1 and (behind the answer) into L2.
    async fn promote(&self, key: &str, found: Found) -> Arc<Stored> {
        let stored = Arc::new(found.stored);
        self.put_memory(key, stored.clone(), found.left, true).await;
        let keep = found.left.min(self.disk_ttl_max);
        if let Some(disk) = self.disk.clone()
            && !keep.is_zero()
        {
            let expires_ms = now_ms().saturating_add(millis(keep));
            let key = key.to_owned();
            let stored = stored.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(error) = disk.insert(&key, &stored, expires_ms) {
                    tracing::warn!(%error, "copying a shared cache entry to disk failed");
                }
            });
        }
        stored
    }

    /// Keeps `stored` in memory for `keep` (within the memory ceiling).
    async fn put_memory(&self, key: &str, stored: Arc<Stored>, keep: Duration, from_shared: bool) {
        let ttl = keep.min(self.memory_ttl_max);
        if ttl.is_zero() {
            return;
        }
        let weight = u32::try_from(stored.weight(key)).unwrap_or(u32::MAX);
        self.memory
            .insert(
                key.to_owned(),
                L1Value {
                    stored,
                    ttl,
                    weight,
                    keep_until_ms: now_ms().saturating_add(millis(keep)),
                    from_shared,
                },
            )
            .await;
    }

    /// The stored response for `primary` that matches the request's
    /// `Vary` values, and the tier it came from (the slower of the two
    /// reads). L3's reads share one request budget; when L1 and L2 know
    /// nothing of `primary`, the first L3 read also fetches the response a
    /// `Vary`-less answer would have, so that the common case is one trip.
    pub(crate) async fn lookup(
        &self,
        primary: &str,
        request_headers: &HeaderMap,
    ) -> Option<(Arc<Entry>, Tier)> {
        let deadline = self
            .shared
            .as_ref()
            .map(|shared| tokio::time::Instant::now() + shared.budget());
        let mut prefetched = None;
        let (variants, first) = match self.get_local(primary).await {
            Some(found) => found,
            None => {
                let (shared, deadline) = self.shared.as_ref().zip(deadline)?;
                let plain = storage_key(primary, "");
                let [variants, response] =
                    <[_; 2]>::try_from(shared.get(&[primary, &plain], deadline).await).ok()?;
                prefetched = Some((plain, response));
                (self.promote(primary, variants?).await, Tier::Shared)
            }
        };
        let Stored::Variants(names) = &*variants else {
            return None;
        };
        let secondary = storage_key(primary, &vary_key(names, request_headers));
        let (stored, second) = match self.get_local(&secondary).await {
            Some(found) => found,
            None => {
                let (shared, deadline) = self.shared.as_ref().zip(deadline)?;
                let found = match prefetched {
                    Some((plain, found)) if plain == secondary => found,
                    _ => shared.get(&[&secondary], deadline).await.pop().flatten(),
                };
                (self.promote(&secondary, found?).await, Tier::Shared)
            }
        };
        match &*stored {
            Stored::Response(entry) => Some((entry.clone(), first.max(second))),
            Stored::Variants(_) => None,
        }
    }

    /// Stores `entry` in every tier (in L3 under `all`; behind the answer),
    /// each for as long as it is of use and its ceiling allows.
    pub(crate) async fn insert(
        &self,
        primary: &str,
        vary_names: Vec<String>,
        vary: &str,
        entry: Entry,
    ) {
        let useful =
            Duration::from_millis(entry.useful_for_ms(now_ms())).saturating_add(self.keep_stale);
        let secondary = storage_key(primary, vary);
        let entry = Arc::new(entry);
        if let Some(shared) = &self.shared
            && shared.mode() == SharedCacheMode::All
        {
            let keep_until_ms = now_ms().saturating_add(millis(useful));
            shared
                .queue()
                .offer(&secondary, vary_names.clone(), entry.clone(), keep_until_ms);
        }
        let response = Arc::new(Stored::Response(entry));
        let variants = Arc::new(Stored::Variants(vary_names));
        self.put_memory(primary, variants.clone(), useful, false)
            .await;
        self.put_memory(&secondary, response.clone(), useful, false)
            .await;
        metrics::gauge!("breakwater_cache_bytes", "tier" => "memory")
            .set(self.memory.weighted_size() as f64);
        let Some(disk) = self.disk.clone() else {
            return;
        };
        let keep = useful.min(self.disk_ttl_max);
        if keep.is_zero() {
            return;
        }
        let expires_ms = now_ms().saturating_add(millis(keep));
        let primary = primary.to_owned();
        let written = tokio::task::spawn_blocking(move || {
            disk.insert(&primary, &variants, expires_ms)?;
            disk.insert(&secondary, &response, expires_ms)?;
            disk.evict(now_ms());
            Ok::<_, sled::Error>(())
        })
        .await;
        let result = match written {
            Ok(Ok(())) => "ok",
            Ok(Err(error)) => {
                tracing::warn!(%error, "disk cache write failed");
                "failed"
            }
            Err(error) => {
                tracing::warn!(%error, "disk cache write did not finish");
                "failed"
            }
        };
        metrics::counter!("breakwater_cache_disk_writes_total", "result" => result).increment(1);
    }

    /// Removes what `selector` matches from every tier: L3 first, so that
    /// a lookup meanwhile cannot copy back into L1 what L1 just lost.
    pub(crate) async fn purge(&self, selector: Selector<'_>) -> Purged {
        let shared = match &self.shared {
            Some(shared) => {
                let result = shared.purge(&selector, shared.background_timeout()).await;
                if let Err(error) = &result {
                    tracing::warn!(%error, "a purge did not reach the shared cache tier; send it again");
                }
                Some(result)
            }
            None => None,
        };
        let (memory, disk) = self.purge_local(selector).await;
        Purged {
            memory,
            disk,
            shared,
        }
    }

    /// Removes the answers stored under `primary` from every tier, for a
    /// request that is waiting: L3 gets the request budget.
    pub(crate) async fn invalidate(&self, primary: &str) {
        if let Some(shared) = &self.shared {
            let _ = shared.purge(&Selector::Key(primary), shared.budget()).await;
        }
        self.purge_local(Selector::Key(primary)).await;
    }

    /// Runs moka's pending work now: evictions, and their listener.
    #[cfg(test)]
    pub(crate) async fn settle_memory(&self) {
        self.memory.run_pending_tasks().await;
    }

    #[cfg(test)]
    pub(crate) fn in_memory(&self, key: &str) -> bool {
        self.memory.contains_key(key)
    }

    /// Removes what `selector` matches from L1 and L2; the responses
    /// removed from each.
    async fn purge_local(&self, selector: Selector<'_>) -> (usize, usize) {
        let mut memory = 0;
        let doomed: Vec<(Arc<String>, bool)> = self
            .memory
            .iter()
            .filter_map(|(key, value)| {
                let hit = match &*value.stored {
                    Stored::Response(e) => selector.matches(&key, &e.url, &e.tags),
                    // Variant records go with a purge by key only; others
                    // leave them to point at nothing, which is a miss.
                    Stored::Variants(_) => matches!(selector, Selector::Key(p) if *key == p),
                };
                hit.then(|| (key, matches!(&*value.stored, Stored::Response(_))))
            })
            .collect();
        for (key, is_response) in doomed {
            self.memory.invalidate(key.as_str()).await;
            memory += usize::from(is_response);
        }
        let disk = match self.disk.clone() {
            Some(disk) => {
                let owned = match selector {
                    Selector::Key(k) => OwnedSelector::Key(k.to_owned()),
                    Selector::UrlPrefix(p) => OwnedSelector::UrlPrefix(p.to_owned()),
                    Selector::Tag(t) => OwnedSelector::Tag(t.to_owned()),
                };
                tokio::task::spawn_blocking(move || disk.purge(&owned.borrow()))
                    .await
                    .unwrap_or(0)
            }
            None => 0,
        };
        (memory, disk)
    }
}

enum OwnedSelector {
    Key(String),
    UrlPrefix(String),
    Tag(String),
}

impl OwnedSelector {
    fn borrow(&self) -> Selector<'_> {
        match self {
            OwnedSelector::Key(k) => Selector::Key(k),
            OwnedSelector::UrlPrefix(p) => Selector::UrlPrefix(p),
            OwnedSelector::Tag(t) => Selector::Tag(t),
        }
    }
}

/// L2. Three trees: `entries` (key → checksummed record), `meta` (key →
/// expiry, size, url, tags: what eviction and purges read without decoding
/// bodies) and `expiry` (expiry ‖ key → nothing: eviction order).
struct DiskTier {
    db: sled::Db,
    entries: sled::Tree,
    meta: sled::Tree,
    expiry: sled::Tree,
    bytes: AtomicU64,
    budget: u64,
}

struct Meta {
    expires_ms: u64,
    size: u64,
    url: String,
    tags: Vec<String>,
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u64(self.expires_ms);
        out.put_u64(self.size);
        for text in std::iter::once(&self.url).chain(&self.tags) {
            out.put_u32(u32::try_from(text.len()).unwrap_or(u32::MAX));
            out.put_slice(text.as_bytes());
        }
        out.to_vec()
    }

    fn decode(mut bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 16 {
            return None;
        }
        let expires_ms = bytes.get_u64();
        let size = bytes.get_u64();
        let mut texts = Vec::new();
        while bytes.len() >= 4 {
            let len = bytes.get_u32() as usize;
            if bytes.len() < len {
                return None;
            }
            texts.push(String::from_utf8(bytes[..len].to_vec()).ok()?);
            bytes.advance(len);
        }
        let mut texts = texts.into_iter();
        Some(Self {
            expires_ms,
            size,
            url: texts.next()?,
            tags: texts.collect(),
        })
    }
}

fn expiry_key(expires_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut out = expires_ms.to_be_bytes().to_vec();
    out.extend_from_slice(key);
    out
}

/// Eviction removes at most this many entries per write, so one write
/// never stalls for long; the next write goes on.
const EVICT_BATCH: usize = 1024;

impl DiskTier {
    fn open(path: &Path, budget: u64) -> Result<Self, CacheError> {
        let fail = |source| CacheError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = sled::Config::new()
            .path(path)
            // sled's page cache defaults to 1 GiB; the memory budget
            // belongs to L1.
            .cache_capacity(32 * 1024 * 1024)
            .flush_every_ms(Some(500))
            .open()
            .map_err(fail)?;
        let entries = db.open_tree("entries").map_err(fail)?;
        let meta = db.open_tree("meta").map_err(fail)?;
        let expiry = db.open_tree("expiry").map_err(fail)?;
        let bytes = meta
            .iter()
            .values()
            .filter_map(|v| v.ok().and_then(|v| Meta::decode(&v)))
            .map(|m| m.size)
            .sum();
        metrics::gauge!("breakwater_cache_bytes", "tier" => "disk").set(bytes as f64);
        Ok(Self {
            db,
            entries,
            meta,
            expiry,
            bytes: AtomicU64::new(bytes),
            budget,
        })
    }

    fn get(&self, key: &str) -> Option<(Stored, u64)> {
        let meta = self.meta.get(key).ok().flatten();
        let meta = meta.as_deref().and_then(Meta::decode);
        let record = self.entries.get(key).ok().flatten();
        let (Some(meta), Some(record)) = (meta, record) else {
            // Half an entry (a crash between trees is not possible with
            // transactions, but a purge race is): drop what is left.
            self.remove(key.as_bytes());
            return None;
        };
        if meta.expires_ms <= now_ms() {
            self.remove(key.as_bytes());
            return None;
        }
        match Stored::decode(&record) {
            Ok(stored) => Some((stored, meta.expires_ms)),
            Err(error) => {
                metrics::counter!("breakwater_cache_corrupt_entries_total", "tier" => "disk")
                    .increment(1);
                tracing::warn!(key, %error, "corrupt disk cache entry dropped");
                self.remove(key.as_bytes());
                None
            }
        }
    }

    fn insert(&self, key: &str, stored: &Stored, expires_ms: u64) -> Result<(), sled::Error> {
        let record = stored.encode();
        let (url, tags) = match stored {
            Stored::Response(e) => (e.url.clone(), e.tags.clone()),
            Stored::Variants(_) => (String::new(), Vec::new()),
        };
        let size = (record.len() + key.len() * 3 + 64) as u64;
        let meta = Meta {
            expires_ms,
            size,
            url,
            tags,
        }
        .encode();
        let replaced = (&self.entries, &self.meta, &self.expiry)
            .transaction(|(entries, metas, expiry)| {
                let old = metas.insert(key.as_bytes(), meta.as_slice())?;
                let old = old.as_deref().and_then(Meta::decode);
                if let Some(old) = &old {
                    expiry.remove(expiry_key(old.expires_ms, key.as_bytes()))?;
                }
                entries.insert(key.as_bytes(), record.as_slice())?;
                expiry.insert(expiry_key(expires_ms, key.as_bytes()), &[])?;
                Ok::<_, ConflictableTransactionError<()>>(old.map_or(0, |m| m.size))
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => e,
                sled::transaction::TransactionError::Abort(()) => {
                    sled::Error::Unsupported("aborted".into())
                }
            })?;
        self.account(size as i64 - replaced as i64);
        Ok(())
    }

    fn account(&self, delta: i64) {
        let now = if delta >= 0 {
            self.bytes.fetch_add(delta as u64, Ordering::Relaxed) + delta as u64
        } else {
            let d = delta.unsigned_abs();
            self.bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some(b.saturating_sub(d))
                })
                .map_or(0, |b| b.saturating_sub(d))
        };
        metrics::gauge!("breakwater_cache_bytes", "tier" => "disk").set(now as f64);
    }

    /// Removes `key` from the three trees; whether it was there.
    fn remove(&self, key: &[u8]) -> bool {
        let removed =
            (&self.entries, &self.meta, &self.expiry).transaction(|(entries, metas, expiry)| {
                let old = metas.remove(key)?;
                let old = old.as_deref().and_then(Meta::decode);
                if let Some(old) = &old {
                    expiry.remove(expiry_key(old.expires_ms, key))?;
                }
                let had = entries.remove(key)?.is_some();
                Ok::<_, ConflictableTransactionError<()>>((had, old.map_or(0, |m| m.size)))
            });
        match removed {
            Ok((had, size)) => {
                self.account(-(size as i64));
                had
            }
            Err(error) => {
                tracing::warn!(?error, "disk cache removal failed");
                false
            }
        }
    }

    /// Drops expired entries, then the soonest to expire while over budget.
    fn evict(&self, now: u64) {
        for _ in 0..EVICT_BATCH {
            let Some(Ok((first, _))) = self.expiry.iter().next() else {
                return;
            };
            let expires = first
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            let over = self.bytes.load(Ordering::Relaxed) > self.budget;
            if expires > now && !over {
                return;
            }
            let key = first.get(8..).unwrap_or_default().to_vec();
            if !self.remove(&key) {
                // An index entry without its record: drop the index alone.
                let _ = self.expiry.remove(&first);
            }
            if over {
                metrics::counter!("breakwater_cache_evictions_total", "tier" => "disk")
                    .increment(1);
            }
        }
    }

    fn purge(&self, selector: &Selector<'_>) -> usize {
        let doomed: Vec<(sled::IVec, bool)> = self
            .meta
            .iter()
            .filter_map(|item| {
                let (key, meta) = item.ok()?;
                let text = std::str::from_utf8(&key).ok()?;
                let meta = Meta::decode(&meta)?;
                let is_variants = !text.contains('\0');
                let hit = if is_variants {
                    matches!(selector, Selector::Key(p) if text == *p)
                } else {
                    selector.matches(text, &meta.url, &meta.tags)
                };
                hit.then_some((key, !is_variants))
            })
            .collect();
        doomed
            .into_iter()
            .filter(|(key, is_response)| self.remove(key) && *is_response)
            .count()
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        // sled flushes on a timer; what a clean stop wrote must be on disk.
        if let Err(error) = self.db.flush() {
            tracing::warn!(%error, "flushing the disk cache failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::StatusCode;

    use super::*;

    fn leaving(stored: Stored, keep_left_ms: i64, from_shared: bool) -> L1Value {
        L1Value {
            stored: Arc::new(stored),
            ttl: Duration::from_secs(1),
            weight: 1,
            keep_until_ms: now_ms().saturating_add_signed(keep_left_ms),
            from_shared,
        }
    }

    fn response() -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::VARY, http::HeaderValue::from_static("Accept"));
        Stored::Response(Arc::new(Entry {
            status: StatusCode::OK,
            headers,
            chunks: vec![Bytes::from_static(b"body")],
            request_time_ms: 0,
            response_time_ms: 0,
            initial_age_ms: 0,
            freshness_ms: 0,
            swr_ms: 0,
            sie_ms: 0,
            url: "shop.test/a".into(),
            tags: Vec::new(),
            ttl_by_plugin: false,
            tokens: (0, 0),
        }))
    }

    #[test]
    fn evicted_mode_shares_only_responses_memory_lets_go_while_worth_keeping() {
        let (queue, mut written) = WriteQueue::unattended(1024);
        let hour = 3_600_000;
        let cases = [
            (
                "pushed out for room",
                leaving(response(), hour, false),
                RemovalCause::Size,
                true,
            ),
            (
                "past the memory ceiling",
                leaving(response(), hour, false),
                RemovalCause::Expired,
                true,
            ),
            (
                "spent",
                leaving(response(), 0, false),
                RemovalCause::Expired,
                false,
            ),
            (
                "purged",
                leaving(response(), hour, false),
                RemovalCause::Explicit,
                false,
            ),
            (
                "replaced",
                leaving(response(), hour, false),
                RemovalCause::Replaced,
                false,
            ),
            (
                "read from L3",
                leaving(response(), hour, true),
                RemovalCause::Size,
                false,
            ),
            (
                "a Vary record",
                leaving(Stored::Variants(Vec::new()), hour, false),
                RemovalCause::Size,
                false,
            ),
        ];
        for (case, value, cause, shared) in cases {
            share_evicted(&queue, "shop.test/a\0accept", value, cause);
            match written.try_recv() {
                Ok(write) => {
                    assert!(shared, "{case}: shared, should not be");
                    assert_eq!(write.key(), "shop.test/a\0accept", "{case}");
                }
                Err(_) => assert!(!shared, "{case}: not shared, should be"),
            }
        }
    }
}
