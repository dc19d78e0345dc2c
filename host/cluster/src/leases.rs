//! Cluster-wide token buckets without a Redis round trip per request.
//!
//! Each bucket is a GCRA bucket in Redis: one number, its theoretical
//! arrival time (TAT), in microseconds of Redis's own clock (`TIME`), so
//! that nodes whose clocks disagree still agree on the bucket. A node never
//! takes one token at a time from it: it takes a *lease* (a few tokens, as
//! many as the bucket's rate refills in `window`) with one atomic Lua
//! script and spends the lease in memory. When a lease runs low the node
//! fetches the next one in the background; only a request that finds the
//! lease empty waits, and then at most the link's budget. Unspent tokens
//! of a lease left idle go back to Redis, and tokens spent beyond a lease
//! (a token budget settled above its reservation) are paid with the next.
//!
//! Every token admitted anywhere was first taken from the Redis bucket, so
//! the cluster never admits more than the bucket allows; what it may admit
//! less is what the nodes hold in leases at a moment, at most one window
//! of the rate per node.
//!
//! GCRA rather than a leaky bucket with a stored level: one value and no
//! refill bookkeeping, and the same arithmetic as the node-local buckets,
//! so a fallback to local counting behaves the same.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use redis::Script;

use crate::{Redis, Unavailable};

const SHARDS: usize = 16;

/// Takes a lease from a GCRA bucket, after first settling what the node
/// owes (`settle` > 0: tokens spent beyond a lease) or gives back
/// (`settle` < 0: a lease's unspent tokens).
///
/// KEYS[1]: the bucket. ARGV: microseconds per token, burst, tokens
/// wanted, the fewest worth having, tokens to settle. Returns the tokens
/// granted (0 or between the fewest and the wanted), those left in the
/// bucket, and when refused the milliseconds until the fewest fit.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local least = tonumber(ARGV[4])
local settle = tonumber(ARGV[5])
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if settle ~= 0 then
  -- A debt is paid at most one burst deep; a refund never fills past full.
  tat = math.min(math.max(tat + settle * interval, now), now + 2 * tolerance)
end
local available = math.max(math.floor((now + tolerance - tat) / interval + 1e-6), 0)
local granted = 0
local retry = 0
if want > 0 then
  if available >= least then
    granted = math.min(available, want)
    tat = tat + granted * interval
  else
    retry = math.max(math.ceil((tat - (now + tolerance - least * interval)) / 1000), 1)
  end
end
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
else
  redis.call('DEL', KEYS[1])
end
return {granted, available - granted, retry}
",
    )
});

/// One bucket: its key, refill rate and capacity.
#[derive(Debug, Clone, Copy)]
pub struct Bucket<'a> {
    pub key: &'a str,
    pub rate_per_second: f64,
    pub burst: u32,
}

/// How leases are sized and kept.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// A lease holds what the bucket's rate refills in this long (at least
    /// one token, at most a burst). Longer: fewer Redis calls; shorter:
    /// fewer tokens idle in a node's hands.
    pub window: Duration,
    /// A lease unused this long goes back to Redis.
    pub idle_return: Duration,
    /// Buckets a node keeps leases for.
    pub max_keys: usize,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            window: Duration::from_millis(50),
            idle_return: Duration::from_secs(1),
            max_keys: 1 << 20,
        }
    }
}

/// What [`LeasedBuckets::take`] or [`LeasedBuckets::reserve`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// Whether the tokens were taken; when false nothing was.
    pub allowed: bool,
    /// The variable part granted (a reservation's completion tokens).
    pub extra: u64,
    /// Tokens left in the emptiest bucket, this node's lease included.
    pub remaining: u64,
    /// When refused, the wait until the smallest request fits.
    pub retry_after_ms: u64,
}

/// A refill in flight, which requests short of tokens wait for.
#[derive(Debug, Default)]
struct Refill {
    done: Mutex<bool>,
    ready: Condvar,
}

impl Refill {
    fn finish(&self) {
        *self.done.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.ready.notify_all();
    }

    /// Whether the refill finished before `deadline`.
    fn wait_until(&self, deadline: Instant) -> bool {
        let done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        let timeout = deadline.saturating_duration_since(Instant::now());
        let (done, _) = self
            .ready
            .wait_timeout_while(done, timeout, |done| !*done)
            .unwrap_or_else(PoisonError::into_inner);
        *done
    }
}

/// This node's lease on one bucket.
#[derive(Debug)]
struct Lease {
    /// Tokens this node may spend; below zero, tokens it owes the bucket.
    tokens: i64,
    rate_per_second: f64,
    burst: u32,
    /// What Redis said the bucket held after the last lease.
    remote_remaining: u64,
    /// Redis refused a lease: nothing to ask for before then.
    refused_until: Option<Instant>,
    refill: Option<Arc<Refill>>,
    last_used: Instant,
}

impl Lease {
    fn new(bucket: &Bucket<'_>, now: Instant) -> Self {
        Lease {
            tokens: 0,
            rate_per_second: bucket.rate_per_second,
            burst: bucket.burst,
            remote_remaining: 0,
            refused_until: None,
            refill: None,
            last_used: now,
        }
    }

    fn spendable(&self) -> u64 {
        u64::try_from(self.tokens).unwrap_or(0)
    }

    fn remaining(&self) -> u64 {
        self.spendable() + self.remote_remaining
    }

    fn refused_for(&self, now: Instant) -> Option<Duration> {
        self.refused_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|wait| !wait.is_zero())
    }
}

type Shard = HashMap<Box<str>, Lease>;

/// Leases on the cluster's buckets held by this node. Its calls block for
/// at most the link's budget: call them from a thread that may block (the
/// plugin host's), not from an async task.
pub struct LeasedBuckets {
    redis: Redis,
    settings: LeaseSettings,
    hasher: RandomState,
    max_keys_per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    this: Weak<LeasedBuckets>,
}

impl std::fmt::Debug for LeasedBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedBuckets")
            .field("redis", &self.redis)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LeasedBuckets {
    /// Starts the table and its sweeper (which hands idle leases back) on
    /// the link's runtime.
    pub fn new(redis: Redis, settings: LeaseSettings) -> Arc<Self> {
        let buckets = Arc::new_cyclic(|this| LeasedBuckets {
            max_keys_per_shard: settings.max_keys.div_ceil(SHARDS).max(1),
            redis,
            settings,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            this: this.clone(),
        });
        buckets
            .redis
            .runtime()
            .spawn(sweep(Arc::downgrade(&buckets)));
        buckets
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Takes `cost` tokens from `bucket`. `Err` when Redis could not say
    /// within the budget and the lease holds too few: the caller falls back.
    pub fn take(&self, bucket: Bucket<'_>, cost: u32) -> Result<Acquired, Unavailable> {
        self.acquire(&[bucket], u64::from(cost), 0, 0)
    }

    /// Takes `prompt + c` tokens from every bucket, all or none, with `c`
    /// the most up to `max_completion` that the emptiest bucket's lease
    /// holds, refused when it holds less than `min_completion` (at least 1).
    pub fn reserve(
        &self,
        buckets: &[Bucket<'_>],
        prompt: u32,
        max_completion: u32,
        min_completion: u32,
    ) -> Result<Acquired, Unavailable> {
        self.acquire(
            buckets,
            u64::from(prompt),
            u64::from(max_completion),
            u64::from(min_completion.max(1)),
        )
    }

    /// Settles a reservation on one bucket: gives back `-delta` tokens or
    /// takes `delta` more, in this node's lease (at most one burst either
    /// way); Redis hears of it with the next lease or the idle return.
    /// Memory only. Returns the tokens left.
    pub fn adjust(&self, bucket: Bucket<'_>, delta: i64) -> u64 {
        let now = Instant::now();
        let mut shard = self.shard(bucket.key);
        let burst = i64::from(bucket.burst);
        if !shard.contains_key(bucket.key) && shard.len() >= self.max_keys_per_shard {
            // No room to record it: a settlement of a bucket nobody asks
            // for now is lost.
            return 0;
        }
        let lease = shard
            .entry(bucket.key.into())
            .or_insert_with(|| Lease::new(&bucket, now));
        lease.tokens = lease.tokens.saturating_sub(delta).clamp(-burst, burst);
        lease.last_used = now;
        lease.remaining()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        self.shards[self.shard_index(key)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn shard_index(&self, key: &str) -> usize {
        self.hasher.hash_one(key) as usize % SHARDS
    }

    fn acquire(
        &self,
        buckets: &[Bucket<'_>],
        fixed: u64,
        max_extra: u64,
        min_extra: u64,
    ) -> Result<Acquired, Unavailable> {
        // A key named twice is one bucket, taken from once.
        let mut unique: Vec<Bucket<'_>> = Vec::with_capacity(buckets.len());
        for bucket in buckets {
            if !unique.iter().any(|b| b.key == bucket.key) {
                unique.push(*bucket);
            }
        }
        let buckets = &unique[..];
        let smallest = fixed + min_extra;
        let deadline = Instant::now() + self.redis.settings().budget;
        let indices: Vec<usize> = buckets.iter().map(|b| self.shard_index(b.key)).collect();
        let mut order = indices.clone();
        order.sort_unstable();
        order.dedup();
        loop {
            let now = Instant::now();
            let mut waits = Vec::new();
            {
                // Shards locked in index order, so concurrent reservations
                // never deadlock, and all buckets are seen at one moment.
                let mut guards: Vec<MutexGuard<'_, Shard>> = order
                    .iter()
                    .map(|&i| {
                        self.shards[i]
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                    })
                    .collect();
                let slot: Vec<usize> = indices
                    .iter()
                    .map(|index| order.binary_search(index).unwrap_or_default())
                    .collect();
                for (bucket, &at) in buckets.iter().zip(&slot) {
                    let shard = &mut guards[at];
                    if !shard.contains_key(bucket.key) && shard.len() >= self.max_keys_per_shard {
                        shard.retain(|_, lease| lease.tokens != 0 || lease.refill.is_some());
                        if shard.len() >= self.max_keys_per_shard {
                            return Err(Unavailable::Failed);
                        }
                    }
                }
                for (position, bucket) in buckets.iter().enumerate() {
                    let lease = lease_in(&mut guards, slot[position], bucket, now);
                    lease.rate_per_second = bucket.rate_per_second;
                    lease.burst = bucket.burst;
                    lease.last_used = now;
                }
                let available = (0..buckets.len())
                    .map(|p| lease_in(&mut guards, slot[p], &buckets[p], now).spendable())
                    .min()
                    .unwrap_or(0);
                if available >= smallest {
                    let extra = (available - fixed).min(max_extra);
                    let taken = i64::try_from(fixed + extra).unwrap_or(i64::MAX);
                    let mut remaining = u64::MAX;
                    for (position, bucket) in buckets.iter().enumerate() {
                        let lease = lease_in(&mut guards, slot[position], bucket, now);
                        lease.tokens -= taken;
                        remaining = remaining.min(lease.remaining());
                        // Fetch the next lease before this one runs out.
                        let chunk = self.chunk(lease);
                        if lease.tokens < i64::try_from(chunk.div_ceil(2)).unwrap_or(i64::MAX)
                            && lease.refill.is_none()
                            && lease.refused_for(now).is_none()
                            && self.redis.is_up()
                        {
                            self.start_refill(bucket, lease, chunk, 1);
                        }
                    }
                    return Ok(Acquired {
                        allowed: true,
                        extra,
                        remaining,
                        retry_after_ms: 0,
                    });
                }
                let refused = (0..buckets.len())
                    .filter_map(|p| {
                        let lease = lease_in(&mut guards, slot[p], &buckets[p], now);
                        (lease.spendable() < smallest)
                            .then(|| lease.refused_for(now))
                            .flatten()
                    })
                    .max();
                if let Some(wait) = refused {
                    return Ok(Acquired {
                        allowed: false,
                        extra: 0,
                        remaining: available,
                        retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
                    });
                }
                if !self.redis.is_up() {
                    return Err(Unavailable::Down);
                }
                for (position, bucket) in buckets.iter().enumerate() {
                    let lease = lease_in(&mut guards, slot[position], bucket, now);
                    let held = lease.spendable();
                    if held >= smallest {
                        continue;
                    }
                    let refill = match &lease.refill {
                        Some(refill) => Arc::clone(refill),
                        None => {
                            let want = self
                                .chunk(lease)
                                .max(fixed + max_extra.max(min_extra) - held);
                            self.start_refill(bucket, lease, want, smallest - held)
                        }
                    };
                    waits.push(refill);
                }
            }
            for refill in waits {
                if !refill.wait_until(deadline) {
                    self.redis.report_timeout("lease");
                    return Err(Unavailable::Timeout);
                }
            }
        }
    }

    /// A lease's size: the bucket's refill over the window, within 1 and
    /// the burst.
    fn chunk(&self, lease: &Lease) -> u64 {
        let refilled = (lease.rate_per_second * self.settings.window.as_secs_f64()).ceil();
        (refilled as u64).clamp(1, u64::from(lease.burst.max(1)))
    }

    /// Asks Redis for a lease of `want` tokens (none if fewer than
    /// `least`), paying the lease's debt on the way, on the link's runtime.
    fn start_refill(
        &self,
        bucket: &Bucket<'_>,
        lease: &mut Lease,
        want: u64,
        least: u64,
    ) -> Arc<Refill> {
        let refill = Arc::new(Refill::default());
        lease.refill = Some(Arc::clone(&refill));
        let debt = (-lease.tokens).max(0);
        lease.tokens += debt;
        let key: Box<str> = bucket.key.into();
        let (rate, burst) = (lease.rate_per_second, lease.burst);
        let this = self.this.clone();
        let done = Arc::clone(&refill);
        self.redis.runtime().spawn(async move {
            let Some(this) = this.upgrade() else {
                done.finish();
                return;
            };
            let answer = this
                .call(
                    Bucket {
                        key: &key,
                        rate_per_second: rate,
                        burst,
                    },
                    want,
                    least,
                    debt,
                    "lease",
                )
                .await;
            let now = Instant::now();
            {
                let mut shard = this.shard(&key);
                if let Some(lease) = shard.get_mut(&key) {
                    lease.refill = None;
                    match answer {
                        Ok(answer) => {
                            lease.tokens += i64::try_from(answer.granted).unwrap_or(i64::MAX);
                            lease.remote_remaining = answer.remaining;
                            lease.refused_until = (answer.granted == 0)
                                .then(|| now + Duration::from_millis(answer.retry_after_ms));
                        }
                        Err(_) => lease.tokens -= debt,
                    }
                }
            }
            done.finish();
        });
        refill
    }

    /// One run of the lease script within the background deadline: a
    /// request waits for it at most the budget, but a late answer still
    /// lands in the lease rather than being lost.
    async fn call(
        &self,
        bucket: Bucket<'_>,
        want: u64,
        least: u64,
        settle: i64,
        op: &'static str,
    ) -> Result<LeaseAnswer, Unavailable> {
        let redis_key = self.redis.key(&[b"ctr:", bucket.key.as_bytes()]);
        let micros_per_token = 1e6 / bucket.rate_per_second;
        let mut invocation = LEASE.key(redis_key);
        invocation
            .arg(micros_per_token)
            .arg(bucket.burst)
            .arg(want)
            .arg(least)
            .arg(settle);
        let (granted, remaining, retry_after_ms): (i64, i64, i64) = self
            .redis
            .invoke(op, self.redis.settings().background_timeout, &invocation)
            .await?;
        Ok(LeaseAnswer {
            granted: u64::try_from(granted).unwrap_or(0),
            remaining: u64::try_from(remaining).unwrap_or(0),
            retry_after_ms: u64::try_from(retry_after_ms).unwrap_or(0),
        })
    }

    /// Hands idle leases back (and pays idle debts), and forgets empty
    /// ones. Returns how many were handed back.
    async fn sweep_once(&self) -> usize {
        let now = Instant::now();
        let mut settle: Vec<(Box<str>, f64, u32, i64)> = Vec::new();
        let up = self.redis.is_up();
        for shard in &*self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|key, lease| {
                let idle = now.duration_since(lease.last_used) >= self.settings.idle_return;
                if !idle || lease.refill.is_some() {
                    return true;
                }
                if lease.tokens == 0 {
                    return false;
                }
                if up {
                    settle.push((
                        key.clone(),
                        lease.rate_per_second,
                        lease.burst,
                        -lease.tokens,
                    ));
                    return false;
                }
                true
            });
        }
        let returned = settle.len();
        for (key, rate, burst, tokens) in settle {
            // Lost if Redis fails now: the bucket refills by itself.
            let _ = self
                .call(
                    Bucket {
                        key: &key,
                        rate_per_second: rate,
                        burst,
                    },
                    0,
                    0,
                    tokens,
                    "lease_return",
                )
                .await;
        }
        returned
    }
}

/// The lease of `bucket` in `guards[at]`, a new one if it has none.
fn lease_in<'g>(
    guards: &'g mut [MutexGuard<'_, Shard>],
    at: usize,
    bucket: &Bucket<'_>,
    now: Instant,
) -> &'g mut Lease {
    guards[at]
        .entry(bucket.key.into())
        .or_insert_with(|| Lease::new(bucket, now))
}

struct LeaseAnswer {
    granted: u64,
    remaining: u64,
    retry_after_ms: u64,
}

async fn sweep(buckets: Weak<LeasedBuckets>) {
    let every = match buckets.upgrade() {
        Some(b) => (b.settings.idle_return / 4).max(Duration::from_millis(50)),
        None => return,
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(buckets) = buckets.upgrade() else {
            return;
        };
        buckets.sweep_once().await;
    }
}
