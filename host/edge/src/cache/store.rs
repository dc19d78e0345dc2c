//! The two tiers: L1 in memory (moka: W-TinyLFU admission, weighed in
//! bytes, a TTL per entry) and L2 on disk (sled, checksummed records, a
//! byte budget enforced by evicting the entries that expire soonest).
//!
//! Keys: a response lives under `primary \0 vary-values`; the primary key
//! alone holds the `Vary` field names of the response last stored for it,
//! so a lookup is two reads and a purge by key is a prefix removal.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use edge_config::CacheConfig;
use http::HeaderMap;
use moka::notification::RemovalCause;
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use super::entry::{Entry, Stored};
use super::policy::{now_ms, vary_key};

/// Where a lookup found its entry; the `tier` metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Memory,
    Disk,
}

impl Tier {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
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

fn primary_of(storage_key: &str) -> &str {
    storage_key.split('\0').next().unwrap_or(storage_key)
}

pub(crate) fn storage_key(primary: &str, vary: &str) -> String {
    format!("{primary}\0{vary}")
}

impl Tiers {
    pub(crate) fn open(config: &CacheConfig) -> Result<Self, CacheError> {
        let memory = moka::future::Cache::builder()
            .max_capacity(config.memory_bytes)
            .weigher(|_: &String, value: &L1Value| value.weight)
            .expire_after(L1Expiry)
            .support_invalidation_closures()
            .eviction_listener(|_, _, cause| {
                if cause == RemovalCause::Size {
                    metrics::counter!("breakwater_cache_evictions_total", "tier" => "memory")
                        .increment(1);
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
            memory_ttl_max: config.memory_ttl_max,
            disk_ttl_max: config.disk_ttl_max,
            keep_stale: config.keep_stale,
        })
    }

    async fn get(&self, key: &str) -> Option<(Arc<Stored>, Tier)> {
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
        self.put_memory(key, stored.clone(), left).await;
        Some((stored, Tier::Disk))
    }

    async fn put_memory(&self, key: &str, stored: Arc<Stored>, ttl: Duration) {
        let ttl = ttl.min(self.memory_ttl_max);
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
                },
            )
            .await;
    }

    /// The stored response for `primary` that matches the request's
    /// `Vary` values, and the tier it came from (the slower of the two
    /// reads).
    pub(crate) async fn lookup(
        &self,
        primary: &str,
        request_headers: &HeaderMap,
    ) -> Option<(Arc<Entry>, Tier)> {
        let (variants, first) = self.get(primary).await?;
        let Stored::Variants(names) = &*variants else {
            return None;
        };
        let secondary = storage_key(primary, &vary_key(names, request_headers));
        let (stored, second) = self.get(&secondary).await?;
        match &*stored {
            Stored::Response(entry) => {
                let tier = if first == Tier::Disk || second == Tier::Disk {
                    Tier::Disk
                } else {
                    Tier::Memory
                };
                Some((entry.clone(), tier))
            }
            Stored::Variants(_) => None,
        }
    }

    /// Stores `entry` in both tiers, each for as long as it is of use and
    /// its ceiling allows.
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
        let response = Arc::new(Stored::Response(Arc::new(entry)));
        let variants = Arc::new(Stored::Variants(vary_names));
        self.put_memory(primary, variants.clone(), useful).await;
        self.put_memory(&secondary, response.clone(), useful).await;
        metrics::gauge!("breakwater_cache_bytes", "tier" => "memory")
            .set(self.memory.weighted_size() as f64);
        let Some(disk) = self.disk.clone() else {
            return;
        };
        let keep = useful.min(self.disk_ttl_max);
        if keep.is_zero() {
            return;
        }
        let expires_ms =
            now_ms().saturating_add(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
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

    /// Removes what `selector` matches from both tiers; the count of
    /// responses removed per tier.
    pub(crate) async fn purge(&self, selector: Selector<'_>) -> (usize, usize) {
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
