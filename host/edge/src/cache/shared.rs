//! L3: the shared cache tier, in the cluster's Redis, so that an answer
//! one node fetched is a hit on every node.
//!
//! Writes never sit on a request's path: they go through a bounded queue
//! (full: the write is dropped and counted) to a few writer tasks, each
//! call within the link's background timeout. A lookup waits at most the
//! link's request budget in all, and not at all while the link is down;
//! either way a miss here is a miss, and the request goes upstream.
//!
//! Layout, after the cluster's `key_prefix`:
//! - `cache:e:<storage key>`: the entry, `SET … PX` its keep time (at most
//!   `l3_ttl_max`); the storage key is the primary key for its `Vary`
//!   record, `primary \0 vary-values` for a response, as in L1 and L2.
//! - `cache:v:<primary>`: a set of the `cache:e:` keys of the primary's
//!   responses, for purges by key.
//! - `cache:t:<tag>`: a set of the `cache:e:` keys tagged so, for purges
//!   by tag.
//! - `cache:purged`: the purge log, a sorted set of URL prefixes scored by
//!   the Redis-clock time of their last purge.
//!
//! A value is [`seal`]ed like an L2 record (magic `BWL3`, CRC-32): the
//! Redis-clock time it was written, its URL, then the fields of the stored
//! record. A value that does not unseal or decode is a miss and is deleted.
//!
//! Purges by URL prefix are generations rather than a key-space scan: a
//! purge records the prefix and the time in the purge log (one call,
//! whatever the size of the cache), and a lookup's script treats an entry
//! written no later than a purge of a prefix of its URL as gone, deleting
//! it. A `SCAN … MATCH` would walk every key in the Redis (the cluster's
//! counters included) on each purge, take seconds per million keys, and
//! when cut short by its bound leave entries that should be gone; the log
//! costs a lookup only the purges made since its entry was written (the
//! log forgets purges older than `l3_ttl_max`, when no entry they could
//! match is left). Both times come from Redis's clock, so the nodes'
//! clocks need not agree. The cost: purged entries stay in Redis until
//! read or expired, and a prefix purge cannot say how many it removed.
//!
//! The scripts touch keys they find in sets, so the tier needs one Redis
//! (or a primary with replicas), not Redis Cluster.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use breakwater_cluster::{Redis, Unavailable};
use bytes::{BufMut, BytesMut};
use edge_config::SharedCacheMode;
use futures_util::StreamExt;
use redis::Script;
use tokio::sync::mpsc;

use super::entry::{DecodeError, Entry, Reader, Stored, put_bytes, seal, unseal};
use super::policy::{millis, now_ms};
use super::store::{Selector, primary_of};
use crate::cluster::SharedCacheSettings;

/// Bumped with the value's layout: values of another layout read as
/// corrupt (a miss), so nodes of two versions never misread each other.
const SHARED_MAGIC: &[u8; 4] = b"BWL3";

/// Writes waiting for a writer; past this, writes are dropped. Enough to
/// ride out a Redis that answers within its timeout but slowly.
const WRITE_QUEUE: usize = 1024;
/// Writes in flight at once.
const WRITERS: usize = 8;
/// A purge by tag removes this many entries per call, so that one call
/// never holds Redis for long, and gives up after this many calls.
const TAG_PURGE_BATCH: usize = 512;
const TAG_PURGE_CALLS: usize = 1024;

/// Past this many prefix purges since an entry was written, a lookup
/// treats it as purged rather than test each: a miss is always safe, and
/// the script's work stays bounded.
const PURGES_CHECKED: usize = 1000;

/// Returns, per entry key, `false` or `{value, ms left}`; an entry a later
/// prefix purge matches is deleted and reads as `false`.
static LOOKUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"
local checked = {PURGES_CHECKED}
local out = {{}}
for i = 2, #KEYS do
  local value = redis.call('GET', KEYS[i])
  local found = false
  if value then
    local live = true
    if #value >= 20 and string.sub(value, 1, 4) == 'BWL3' then
      local high, low, length = struct.unpack('>I4I4I4', value, 9)
      local url = string.sub(value, 21, 20 + length)
      if #url > 0 then
        local written = string.format('%.0f', high * 4294967296 + low)
        local since = redis.call('ZRANGEBYSCORE', KEYS[1], written, '+inf', 'LIMIT', 0, checked + 1)
        live = #since <= checked
        for _, prefix in ipairs(since) do
          local target = url
          if string.sub(prefix, 1, 1) == '/' then
            local slash = string.find(url, '/', 1, true)
            target = slash and string.sub(url, slash) or ''
          end
          if string.sub(target, 1, #prefix) == prefix then
            live = false
            break
          end
        end
      end
    end
    if live then
      found = {{value, redis.call('PTTL', KEYS[i])}}
    else
      redis.call('DEL', KEYS[i])
    end
  end
  out[i - 1] = found
end
return out
"
    ))
});

/// KEYS: the variants record, the response, the primary's set of
/// responses, its tags' sets. ARGV: the two values, the TTL in ms.
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[2])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
",
    )
});

/// KEYS: the primary's set of responses, its variants record. Returns the
/// responses deleted.
static PURGE_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local removed = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  removed = removed + redis.call('DEL', key)
end
redis.call('DEL', KEYS[1], KEYS[2])
return removed
",
    )
});

/// KEYS: a tag's set. ARGV: how many to take. Returns the responses
/// deleted and how many the set still holds.
static PURGE_TAG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local removed = 0
for _, key in ipairs(redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))) do
  removed = removed + redis.call('DEL', key)
end
return {removed, redis.call('SCARD', KEYS[1])}
",
    )
});

/// KEYS: the purge log. ARGV: the prefix, how long the log remembers (ms).
static PURGE_PREFIX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local remember = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.0f', ms), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', ms - remember))
redis.call('PEXPIRE', KEYS[1], remember)
return 1
",
    )
});

/// One response on its way to L3.
pub(crate) struct Write {
    /// Its storage key, `primary \0 vary-values`.
    key: String,
    vary_names: Vec<String>,
    entry: Arc<Entry>,
    /// Until when (node clock, ms) it is worth keeping.
    keep_until_ms: u64,
}

/// Hands responses to the writer tasks without waiting; cheap to clone.
#[derive(Clone)]
pub(crate) struct WriteQueue {
    sender: mpsc::Sender<Write>,
    max_object_bytes: u64,
}

impl WriteQueue {
    /// Queues `entry` (stored under `key`) for L3 unless it is too big or
    /// the queue is full.
    pub(crate) fn offer(
        &self,
        key: &str,
        vary_names: Vec<String>,
        entry: Arc<Entry>,
        keep_until_ms: u64,
    ) {
        if entry.body_len() as u64 > self.max_object_bytes {
            count_write("too_big");
            return;
        }
        let write = Write {
            key: key.to_owned(),
            vary_names,
            entry,
            keep_until_ms,
        };
        if self.sender.try_send(write).is_err() {
            count_write("queue_full");
        }
    }
}

#[cfg(test)]
impl WriteQueue {
    /// A queue no writer drains: what is offered stays in the receiver.
    pub(crate) fn unattended(max_object_bytes: u64) -> (Self, mpsc::Receiver<Write>) {
        let (sender, receiver) = mpsc::channel(WRITE_QUEUE);
        let queue = WriteQueue {
            sender,
            max_object_bytes,
        };
        (queue, receiver)
    }
}

#[cfg(test)]
impl Write {
    pub(crate) fn key(&self) -> &str {
        &self.key
    }
}

/// What L3 held under a key.
pub(crate) struct Found {
    pub(crate) stored: Stored,
    /// How long Redis keeps it still.
    pub(crate) left: Duration,
}

pub(crate) struct SharedTier {
    redis: Redis,
    mode: SharedCacheMode,
    ttl_max: Duration,
    queue: WriteQueue,
}

impl SharedTier {
    /// Starts the writer tasks on the link's runtime; they end when the
    /// tier is dropped.
    pub(crate) fn start(settings: SharedCacheSettings) -> Self {
        let (sender, receiver) = mpsc::channel(WRITE_QUEUE);
        let writer = Writer {
            redis: settings.redis.clone(),
            ttl_max: settings.ttl_max,
        };
        settings.redis.runtime().spawn(writer.run(receiver));
        Self {
            redis: settings.redis,
            mode: settings.mode,
            ttl_max: settings.ttl_max,
            queue: WriteQueue {
                sender,
                max_object_bytes: settings.max_object_bytes,
            },
        }
    }

    pub(crate) fn mode(&self) -> SharedCacheMode {
        self.mode
    }

    pub(crate) fn queue(&self) -> &WriteQueue {
        &self.queue
    }

    /// The longest a request's lookups may wait for Redis, in all.
    pub(crate) fn budget(&self) -> Duration {
        self.redis.settings().budget
    }

    /// The entries under `keys`, in order, waiting until `deadline` at
    /// most: every one a miss when Redis cannot answer by then.
    pub(crate) async fn get(
        &self,
        keys: &[&str],
        deadline: tokio::time::Instant,
    ) -> Vec<Option<Found>> {
        let misses = || keys.iter().map(|_| None).collect();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            Redis::count_fallback("cache");
            return misses();
        }
        let mut invocation = LOOKUP.prepare_invoke();
        invocation.key(self.purge_log_key());
        for key in keys {
            invocation.key(entry_key(&self.redis, key));
        }
        let budget = self.budget();
        let call = self.redis.invoke("cache_get", budget, &invocation);
        // A call cut short by what an earlier one spent gives up quietly:
        // only a call that had the whole budget may say Redis is slow
        // (and take the link down).
        let answer = if left < budget {
            tokio::time::timeout(left, call)
                .await
                .unwrap_or(Err(Unavailable::Timeout))
        } else {
            call.await
        };
        let values: Vec<Option<(Vec<u8>, i64)>> = match answer {
            Ok(values) => values,
            Err(_) => {
                Redis::count_fallback("cache");
                return misses();
            }
        };
        let mut values = values.into_iter();
        keys.iter()
            .map(|key| {
                let (value, left_ms) = values.next().flatten()?;
                match decode(&value) {
                    Ok(stored) => Some(Found {
                        stored,
                        // No expiry (-1) is not one of ours; a race with
                        // expiry (-2) is gone.
                        left: match u64::try_from(left_ms) {
                            Ok(ms) => Duration::from_millis(ms),
                            Err(_) if left_ms == -1 => self.ttl_max,
                            Err(_) => return None,
                        },
                    }),
                    Err(error) => {
                        metrics::counter!("breakwater_cache_corrupt_entries_total", "tier" => "shared")
                            .increment(1);
                        tracing::warn!(key, %error, "corrupt shared cache entry dropped");
                        self.delete_behind(key);
                        None
                    }
                }
            })
            .collect()
    }

    fn delete_behind(&self, key: &str) {
        let redis = self.redis.clone();
        let mut command = redis::cmd("DEL");
        command.arg(entry_key(&redis, key));
        self.redis.runtime().spawn(async move {
            let timeout = redis.settings().background_timeout;
            let _ = redis
                .query_within::<i64>("cache_purge", timeout, &command)
                .await;
        });
    }

    /// The deadline of calls no request waits for.
    pub(crate) fn background_timeout(&self) -> Duration {
        self.redis.settings().background_timeout
    }

    /// Removes what `selector` matches, each call within `timeout`: the
    /// responses deleted (a prefix purge retires its entries by
    /// generation and counts none).
    pub(crate) async fn purge(
        &self,
        selector: &Selector<'_>,
        timeout: Duration,
    ) -> Result<usize, Unavailable> {
        let result = match selector {
            Selector::Key(primary) => {
                let mut invocation = PURGE_KEY.prepare_invoke();
                invocation
                    .key(responses_key(&self.redis, primary))
                    .key(entry_key(&self.redis, primary));
                self.redis
                    .invoke::<usize>("cache_purge", timeout, &invocation)
                    .await
            }
            Selector::Tag(tag) => self.purge_tag(tag, timeout).await,
            Selector::UrlPrefix(prefix) => {
                let mut invocation = PURGE_PREFIX.prepare_invoke();
                invocation
                    .key(self.purge_log_key())
                    .arg(*prefix)
                    .arg(millis(self.ttl_max).max(1));
                self.redis
                    .invoke::<i64>("cache_purge", timeout, &invocation)
                    .await
                    .map(|_| 0)
            }
        };
        if result.is_err() {
            Redis::count_fallback("cache");
        }
        result
    }

    async fn purge_tag(&self, tag: &str, timeout: Duration) -> Result<usize, Unavailable> {
        let set = tag_key(&self.redis, tag);
        let mut removed = 0;
        for _ in 0..TAG_PURGE_CALLS {
            let mut invocation = PURGE_TAG.prepare_invoke();
            invocation.key(&set).arg(TAG_PURGE_BATCH);
            let (batch, left): (usize, usize) = self
                .redis
                .invoke("cache_purge", timeout, &invocation)
                .await?;
            removed += batch;
            if left == 0 {
                return Ok(removed);
            }
        }
        tracing::warn!(
            tag,
            removed,
            "a purge by tag stopped at its bound; purge the tag again for the rest"
        );
        Ok(removed)
    }

    fn purge_log_key(&self) -> Vec<u8> {
        self.redis.key(&[b"cache:purged"])
    }
}

fn entry_key(redis: &Redis, storage_key: &str) -> Vec<u8> {
    redis.key(&[b"cache:e:", storage_key.as_bytes()])
}

fn responses_key(redis: &Redis, primary: &str) -> Vec<u8> {
    redis.key(&[b"cache:v:", primary.as_bytes()])
}

fn tag_key(redis: &Redis, tag: &str) -> Vec<u8> {
    redis.key(&[b"cache:t:", tag.as_bytes()])
}

fn count_write(result: &'static str) {
    metrics::counter!("breakwater_cache_shared_writes_total", "result" => result).increment(1);
}

/// The value stored in Redis for `stored`, written at `written_ms` (Redis
/// clock). The time and URL lead, where the lookup script reads them.
fn encode(written_ms: u64, stored: &Stored) -> Vec<u8> {
    let url = match stored {
        Stored::Response(entry) => entry.url.as_bytes(),
        Stored::Variants(_) => b"",
    };
    let fields = stored.encode_body();
    let mut body = BytesMut::with_capacity(fields.len() + url.len() + 12);
    body.put_u64(written_ms);
    put_bytes(&mut body, url);
    body.extend_from_slice(&fields);
    seal(SHARED_MAGIC, &body)
}

fn decode(value: &[u8]) -> Result<Stored, DecodeError> {
    let mut reader = Reader(unseal(SHARED_MAGIC, value)?);
    reader.u64()?;
    reader.string()?;
    Stored::decode_body(reader.0)
}

#[cfg(test)]
mod tests;

struct Writer {
    redis: Redis,
    ttl_max: Duration,
}

impl Writer {
    async fn run(self, mut receiver: mpsc::Receiver<Write>) {
        let writer = &self;
        futures_util::stream::poll_fn(|cx| receiver.poll_recv(cx))
            .for_each_concurrent(WRITERS, move |write| async move {
                let result = match writer.write(write).await {
                    Ok(true) => "ok",
                    Ok(false) => "expired",
                    Err(Unavailable::Down) => {
                        Redis::count_fallback("cache");
                        "unavailable"
                    }
                    Err(Unavailable::Timeout | Unavailable::Failed) => {
                        Redis::count_fallback("cache");
                        "failed"
                    }
                };
                count_write(result);
            })
            .await;
    }

    /// Writes one response and its primary's `Vary` record; false when it
    /// was no longer worth keeping.
    async fn write(&self, write: Write) -> Result<bool, Unavailable> {
        let ttl_ms = write
            .keep_until_ms
            .saturating_sub(now_ms())
            .min(millis(self.ttl_max));
        if ttl_ms == 0 {
            return Ok(false);
        }
        let timeout = self.redis.settings().background_timeout;
        // Redis's clock, not the node's: the purge log is stamped by it.
        let (seconds, micros): (u64, u64) = self
            .redis
            .query_within("cache_write", timeout, &redis::cmd("TIME"))
            .await?;
        let written_ms = seconds.saturating_mul(1000).saturating_add(micros / 1000);
        let primary = primary_of(&write.key);
        let variants = encode(written_ms, &Stored::Variants(write.vary_names));
        let tags = write.entry.tags.clone();
        let response = encode(written_ms, &Stored::Response(write.entry));
        let mut invocation = WRITE.prepare_invoke();
        invocation
            .key(entry_key(&self.redis, primary))
            .key(entry_key(&self.redis, &write.key))
            .key(responses_key(&self.redis, primary));
        for tag in &tags {
            invocation.key(tag_key(&self.redis, tag));
        }
        invocation.arg(variants).arg(response).arg(ttl_ms);
        self.redis
            .invoke::<i64>("cache_write", timeout, &invocation)
            .await?;
        Ok(true)
    }
}
