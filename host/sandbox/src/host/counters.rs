//! The `counters` capability: token buckets shared by every instance on the
//! node, as GCRA (the generic cell rate algorithm).
//!
//! Written here rather than taken from `governor`: a governor limiter has
//! one quota fixed at construction, while a plugin passes the rate and burst
//! on every `take` (tiers differ per key), and the ABI answers with the
//! tokens remaining, which governor's keyed API does not report. GCRA keeps
//! one number per key, the theoretical arrival time (TAT), so a take is one
//! short critical section.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};

use breakwater_cluster::leases::{Acquired, Bucket};
use breakwater_cluster::{Fallback, Redis};

use crate::SharedCounters;
use crate::bindings::breakwater::plugin::counters::{Host, TakeResult};
use crate::host::HostState;
use crate::time::Clock;

const SHARDS: usize = 16;

/// Longer keys are refused: keys come from requests, and memory is bounded.
pub(crate) const MAX_KEY: usize = 256;

/// One shard of buckets: key → TAT in nanoseconds since the clock's start.
type Buckets = HashMap<Box<str>, u64>;

/// Token buckets for all plugins of a node, keyed by plugin and key.
#[derive(Debug)]
pub(crate) struct Counters {
    clock: Clock,
    hasher: RandomState,
    max_keys_per_shard: usize,
    shards: Box<[Mutex<Buckets>]>,
    /// The cluster's buckets, when `[cluster]` shares them; the buckets
    /// above are then only the `local` fallback.
    shared: Option<SharedCounters>,
}

/// Where a reservation's tokens were taken, so that its settlement goes
/// back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ledger {
    /// This node's buckets.
    Local,
    /// The cluster's, through this node's leases.
    Shared,
    /// Nowhere: admitted by an `open` fallback while Redis was away.
    Unmetered,
}

impl Counters {
    pub(crate) fn new(max_keys: usize, clock: Clock, shared: Option<SharedCounters>) -> Self {
        Counters {
            clock,
            hasher: RandomState::new(),
            max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shared,
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes `cost` tokens from bucket `key` (already namespaced and
    /// length-checked).
    pub(crate) fn take(
        &self,
        key: &str,
        cost: u32,
        rate_per_second: f64,
        burst: u32,
    ) -> Result<TakeResult, String> {
        if let Some(shared) = &self.shared {
            check_take(cost, rate_per_second, burst)?;
            let bucket = Bucket {
                key,
                rate_per_second,
                burst,
            };
            match shared.leases.take(bucket, cost) {
                Ok(taken) => {
                    return Ok(TakeResult {
                        allowed: taken.allowed,
                        remaining: taken.remaining,
                        retry_after_ms: taken.retry_after_ms,
                    });
                }
                Err(_) => {
                    Redis::count_fallback("counters");
                    match shared.counters {
                        Fallback::Local => {}
                        Fallback::Open => {
                            return Ok(TakeResult {
                                allowed: true,
                                remaining: u64::from(burst - cost),
                                retry_after_ms: 0,
                            });
                        }
                        Fallback::Closed => {
                            return Ok(TakeResult {
                                allowed: false,
                                remaining: 0,
                                retry_after_ms: shared.closed_retry_after_ms(),
                            });
                        }
                    }
                }
            }
        }
        self.take_at(self.now_ns(), key, cost, rate_per_second, burst)
    }

    fn take_at(
        &self,
        now: u64,
        key: &str,
        cost: u32,
        rate_per_second: f64,
        burst: u32,
    ) -> Result<TakeResult, String> {
        check_take(cost, rate_per_second, burst)?;
        // One token every `interval` ns; a full bucket is `burst` intervals
        // ahead of now.
        let interval = 1e9 / rate_per_second;
        let tolerance = interval * f64::from(burst);
        let increment = interval * f64::from(cost);

        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut buckets = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = buckets.get(key).copied().unwrap_or(now).max(now) as f64;
        let now_f = now as f64;
        let new_tat = tat + increment;
        let allow_at = new_tat - tolerance;
        let tokens = |tat: f64| ((now_f + tolerance - tat) / interval).floor().max(0.0) as u64;
        if allow_at > now_f {
            return Ok(TakeResult {
                allowed: false,
                remaining: tokens(tat),
                retry_after_ms: ((allow_at - now_f) / 1e6).ceil() as u64,
            });
        }
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys_per_shard {
            // A bucket whose TAT has passed is full, the same as absent:
            // dropping those loses nothing.
            buckets.retain(|_, tat| *tat > now);
            if buckets.len() >= self.max_keys_per_shard {
                return Err("too many counter keys on this node".to_owned());
            }
        }
        buckets.insert(key.into(), new_tat.round() as u64);
        Ok(TakeResult {
            allowed: true,
            remaining: tokens(new_tat),
            retry_after_ms: 0,
        })
    }
}

/// A `take` that could be served, or why not.
fn check_take(cost: u32, rate_per_second: f64, burst: u32) -> Result<(), String> {
    Shape::new(rate_per_second, burst)?;
    if cost > burst {
        return Err(format!(
            "cost {cost} exceeds burst {burst}: it could never be taken"
        ));
    }
    Ok(())
}

/// The shapes of a reservation's buckets, or why it could never be served.
fn check_reserve(
    buckets: &[BucketSpec],
    prompt: u32,
    min_completion: u32,
) -> Result<Vec<Shape>, String> {
    let smallest = u64::from(prompt) + u64::from(min_completion.max(1));
    let mut shapes = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        if smallest > u64::from(bucket.burst) {
            return Err(format!(
                "the smallest reservation ({prompt} prompt + {} completion tokens) exceeds \
                 the burst of {} tokens: it could never be taken",
                min_completion.max(1),
                bucket.burst
            ));
        }
        shapes.push(Shape::new(bucket.rate_per_second, bucket.burst)?);
    }
    Ok(shapes)
}

/// A bucket's shape in the clock's nanoseconds: one token every
/// `interval`, and a full bucket `tolerance` ahead of its TAT.
#[derive(Debug, Clone, Copy)]
struct Shape {
    interval: f64,
    tolerance: f64,
}

impl Shape {
    fn new(rate_per_second: f64, burst: u32) -> Result<Self, String> {
        if !(rate_per_second.is_finite() && rate_per_second > 0.0) {
            return Err(format!(
                "rate must be a positive number, got {rate_per_second}"
            ));
        }
        if burst == 0 {
            return Err("burst must be at least 1".to_owned());
        }
        let interval = 1e9 / rate_per_second;
        Ok(Shape {
            interval,
            tolerance: interval * f64::from(burst),
        })
    }

    /// Whole tokens in a bucket whose TAT is `tat` at `now`. TATs are
    /// stored in whole nanoseconds: a millionth of a token of rounding
    /// must not cost a whole one.
    fn tokens(self, now: f64, tat: f64) -> u64 {
        ((now + self.tolerance - tat) / self.interval + 1e-6)
            .floor()
            .max(0.0) as u64
    }
}

/// One bucket of a multi-bucket reservation: its key (namespaced), rate
/// and burst.
#[derive(Debug, Clone)]
pub(crate) struct BucketSpec {
    pub(crate) key: Box<str>,
    pub(crate) rate_per_second: f64,
    pub(crate) burst: u32,
}

/// What [`Counters::reserve`] granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reserved {
    /// Whether the tokens were taken; when false nothing was.
    pub(crate) allowed: bool,
    /// Completion tokens granted; 0 when refused.
    pub(crate) completion: u32,
    /// Tokens left in the emptiest bucket afterwards.
    pub(crate) remaining: u64,
    /// When refused, the wait until the smallest reservation fits.
    pub(crate) retry_after_ms: u64,
    /// Where a settlement goes.
    pub(crate) ledger: Ledger,
}

impl Counters {
    /// Takes `prompt + c` tokens from every bucket of `buckets`, all or
    /// none, with `c` the most completion tokens up to `max_completion`
    /// that the emptiest bucket holds, refused when that is below
    /// `min_completion`. The shards involved are locked together (in
    /// index order), so concurrent reservations never overdraw a bucket.
    pub(crate) fn reserve(
        &self,
        buckets: &[BucketSpec],
        prompt: u32,
        max_completion: u32,
        min_completion: u32,
    ) -> Result<Reserved, String> {
        if let Some(shared) = &self.shared {
            check_reserve(buckets, prompt, min_completion)?;
            let specs: Vec<Bucket<'_>> = buckets
                .iter()
                .map(|b| Bucket {
                    key: &b.key,
                    rate_per_second: b.rate_per_second,
                    burst: b.burst,
                })
                .collect();
            match shared
                .leases
                .reserve(&specs, prompt, max_completion, min_completion)
            {
                Ok(Acquired {
                    allowed,
                    extra,
                    remaining,
                    retry_after_ms,
                }) => {
                    return Ok(Reserved {
                        allowed,
                        completion: u32::try_from(extra).unwrap_or(u32::MAX),
                        remaining,
                        retry_after_ms,
                        ledger: Ledger::Shared,
                    });
                }
                Err(_) => {
                    Redis::count_fallback("tokens");
                    match shared.tokens {
                        Fallback::Local => {}
                        Fallback::Open => {
                            return Ok(Reserved {
                                allowed: true,
                                completion: max_completion,
                                remaining: 0,
                                retry_after_ms: 0,
                                ledger: Ledger::Unmetered,
                            });
                        }
                        Fallback::Closed => {
                            return Ok(Reserved {
                                allowed: false,
                                completion: 0,
                                remaining: 0,
                                retry_after_ms: shared.closed_retry_after_ms(),
                                ledger: Ledger::Unmetered,
                            });
                        }
                    }
                }
            }
        }
        self.reserve_at(
            self.now_ns(),
            buckets,
            prompt,
            max_completion,
            min_completion,
        )
    }

    fn reserve_at(
        &self,
        now: u64,
        buckets: &[BucketSpec],
        prompt: u32,
        max_completion: u32,
        min_completion: u32,
    ) -> Result<Reserved, String> {
        let smallest = u64::from(prompt) + u64::from(min_completion.max(1));
        let shapes = check_reserve(buckets, prompt, min_completion)?;
        let mut shard_of: Vec<usize> = buckets
            .iter()
            .map(|b| self.hasher.hash_one(&*b.key) as usize % SHARDS)
            .collect();
        let mut order = shard_of.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, std::sync::MutexGuard<'_, Buckets>)> = order
            .iter()
            .map(|&i| {
                (
                    i,
                    self.shards[i]
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                )
            })
            .collect();
        for index in &mut shard_of {
            *index = order.binary_search(index).unwrap_or_default();
        }
        let now_f = now as f64;
        let tats: Vec<f64> = buckets
            .iter()
            .zip(&shard_of)
            .map(|(b, &g)| guards[g].1.get(&*b.key).copied().unwrap_or(now).max(now) as f64)
            .collect();
        let available = shapes
            .iter()
            .zip(&tats)
            .map(|(shape, &tat)| shape.tokens(now_f, tat))
            .min()
            .unwrap_or(u64::MAX);
        if available < smallest {
            let wait_ns = shapes
                .iter()
                .zip(&tats)
                .map(|(shape, &tat)| {
                    tat - (now_f + shape.tolerance - smallest as f64 * shape.interval)
                })
                .fold(0.0_f64, f64::max);
            return Ok(Reserved {
                allowed: false,
                completion: 0,
                remaining: available,
                // Less a nanosecond of rounding, as in `Shape::tokens`.
                retry_after_ms: ((wait_ns - 1.0) / 1e6).ceil().max(1.0) as u64,
                ledger: Ledger::Local,
            });
        }
        let completion = (available - u64::from(prompt)).min(u64::from(max_completion));
        let taken = u64::from(prompt) + completion;
        // Room for every new bucket first, so that a refusal takes nothing.
        for (bucket, &g) in buckets.iter().zip(&shard_of) {
            let shard = &mut guards[g].1;
            if !shard.contains_key(&*bucket.key) && shard.len() >= self.max_keys_per_shard {
                shard.retain(|_, tat| *tat > now);
                if shard.len() >= self.max_keys_per_shard {
                    return Err("too many counter keys on this node".to_owned());
                }
            }
        }
        let mut remaining = u64::MAX;
        for ((bucket, shape), (&g, &tat)) in
            buckets.iter().zip(&shapes).zip(shard_of.iter().zip(&tats))
        {
            let new_tat = tat + taken as f64 * shape.interval;
            guards[g]
                .1
                .insert(bucket.key.clone(), new_tat.round() as u64);
            remaining = remaining.min(shape.tokens(now_f, new_tat));
        }
        Ok(Reserved {
            allowed: true,
            completion: u32::try_from(completion).unwrap_or(u32::MAX),
            remaining,
            retry_after_ms: 0,
            ledger: Ledger::Local,
        })
    }

    /// Settles a reservation on one bucket: gives back `-delta` tokens
    /// (never past a full bucket) or takes `delta` more, at most one burst
    /// into debt. Returns the tokens left.
    pub(crate) fn adjust(&self, ledger: Ledger, bucket: &BucketSpec, delta: i64) -> u64 {
        match (ledger, &self.shared) {
            (Ledger::Shared, Some(shared)) => shared.leases.adjust(
                Bucket {
                    key: &bucket.key,
                    rate_per_second: bucket.rate_per_second,
                    burst: bucket.burst,
                },
                delta,
            ),
            (Ledger::Unmetered, _) => u64::from(bucket.burst),
            _ => self.adjust_at(self.now_ns(), bucket, delta),
        }
    }

    fn adjust_at(&self, now: u64, bucket: &BucketSpec, delta: i64) -> u64 {
        let Ok(shape) = Shape::new(bucket.rate_per_second, bucket.burst) else {
            return 0;
        };
        let shard = &self.shards[self.hasher.hash_one(&*bucket.key) as usize % SHARDS];
        let mut buckets = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let now_f = now as f64;
        // An absent bucket is a full one (full buckets are what eviction
        // drops): nothing to give back to it.
        let Some(tat) = buckets.get(&*bucket.key).map(|&t| t.max(now) as f64) else {
            if delta <= 0 {
                return shape.tokens(now_f, now_f);
            }
            let new_tat = now_f + delta as f64 * shape.interval;
            if buckets.len() < self.max_keys_per_shard {
                buckets.insert(bucket.key.clone(), new_tat.round() as u64);
            }
            return shape.tokens(now_f, new_tat);
        };
        let new_tat =
            (tat + delta as f64 * shape.interval).clamp(now_f, now_f + 2.0 * shape.tolerance);
        buckets.insert(bucket.key.clone(), new_tat.round() as u64);
        shape.tokens(now_f, new_tat)
    }
}

impl Host for HostState {
    fn take(
        &mut self,
        key: String,
        cost: u32,
        rate_per_second: f64,
        burst: u32,
    ) -> Result<TakeResult, String> {
        if key.len() > MAX_KEY {
            return Err(format!("key longer than {MAX_KEY} bytes"));
        }
        // Namespaced so that two plugins never drain each other's buckets.
        let key = format!("{}\0{key}", self.plugin.name);
        self.plugin
            .counters
            .take(&key, cost, rate_per_second, burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_rate() {
        let counters = Counters::new(1000, Clock::system(), None);
        // 10/s, burst 3: three at once, the fourth waits 100 ms.
        for remaining in [2, 1, 0] {
            let taken = counters.take_at(0, "k", 1, 10.0, 3).expect("valid");
            assert!(taken.allowed);
            assert_eq!(taken.remaining, remaining);
        }
        let refused = counters.take_at(0, "k", 1, 10.0, 3).expect("valid");
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 100);
        assert!(
            !counters
                .take_at(99 * MS, "k", 1, 10.0, 3)
                .expect("valid")
                .allowed
        );
        assert!(
            counters
                .take_at(100 * MS, "k", 1, 10.0, 3)
                .expect("valid")
                .allowed
        );
        // Other keys have their own bucket.
        assert!(
            counters
                .take_at(100 * MS, "other", 3, 10.0, 3)
                .expect("valid")
                .allowed
        );
    }

    #[test]
    fn cost_takes_several_tokens() {
        let counters = Counters::new(1000, Clock::system(), None);
        let taken = counters.take_at(0, "k", 4, 1.0, 5).expect("valid");
        assert!(taken.allowed);
        assert_eq!(taken.remaining, 1);
        let refused = counters.take_at(0, "k", 2, 1.0, 5).expect("valid");
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 1000);
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let counters = Counters::new(1000, Clock::system(), None);
        assert!(counters.take_at(0, "k", 1, 0.0, 1).is_err());
        assert!(counters.take_at(0, "k", 1, f64::NAN, 1).is_err());
        assert!(counters.take_at(0, "k", 1, 1.0, 0).is_err());
        assert!(counters.take_at(0, "k", 2, 1.0, 1).is_err());
    }

    fn spec(key: &str, rate_per_second: f64, burst: u32) -> BucketSpec {
        BucketSpec {
            key: key.into(),
            rate_per_second,
            burst,
        }
    }

    #[test]
    fn a_reservation_takes_what_the_emptiest_bucket_holds_from_all_or_nothing() {
        let counters = Counters::new(1000, Clock::system(), None);
        // 1000 a minute and 1500 a day.
        let minute = spec("m", 1000.0 / 60.0, 1000);
        let day = spec("d", 1500.0 / 86400.0, 1500);
        let both = [minute.clone(), day.clone()];
        let first = counters.reserve_at(0, &both, 100, 600, 1).expect("valid");
        assert!(first.allowed);
        assert_eq!((first.completion, first.remaining), (600, 300));
        // The minute bucket holds 300: 100 prompt and 200 of the 600 asked.
        let second = counters.reserve_at(0, &both, 100, 600, 1).expect("valid");
        assert_eq!((second.completion, second.remaining), (200, 0));
        // Empty: refused, nothing taken, and the wait is for 101 tokens
        // of the minute bucket (6.06 s).
        let refused = counters.reserve_at(0, &both, 100, 600, 1).expect("valid");
        assert!(!refused.allowed);
        assert_eq!(refused.completion, 0);
        assert_eq!(refused.retry_after_ms, 6060);
        // Settled to 150 used of the 700 taken by the first: 550 back.
        assert_eq!(counters.adjust_at(0, &minute, 150 - 700), 550);
        assert_eq!(counters.adjust_at(0, &day, 150 - 700), 1050);
        // A refund never fills past the burst; a charge stops one burst
        // into debt.
        assert_eq!(counters.adjust_at(0, &minute, -5000), 1000);
        assert_eq!(counters.adjust_at(0, &minute, 5000), 0);
        let in_debt = counters.reserve_at(0, &[minute], 1, 1, 1).expect("valid");
        // A burst of debt is a minute to empty, then 2 tokens.
        assert_eq!(in_debt.retry_after_ms, 60_120);
    }

    #[test]
    fn a_reservation_that_could_never_fit_is_an_error() {
        let counters = Counters::new(1000, Clock::system(), None);
        let small = [spec("s", 1.0, 100)];
        assert!(counters.reserve_at(0, &small, 100, 10, 1).is_err());
        assert!(counters.reserve_at(0, &small, 99, 10, 1).is_ok());
        assert!(
            counters
                .reserve_at(0, &[spec("z", 0.0, 100)], 1, 1, 1)
                .is_err()
        );
    }

    #[test]
    fn full_buckets_are_evicted_when_the_table_is_full() {
        let counters = Counters::new(SHARDS, Clock::system(), None);
        for i in 0..100 {
            counters.take_at(0, &format!("k{i}"), 1, 1000.0, 1).ok();
        }
        // A second later every bucket is full again, so new keys fit.
        assert!(
            counters
                .take_at(1_000 * MS, "fresh", 1, 1000.0, 1)
                .expect("fits")
                .allowed
        );
    }
}
