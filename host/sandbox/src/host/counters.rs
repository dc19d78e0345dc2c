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

use crate::bindings::breakwater::plugin::counters::{Host, TakeResult};
use crate::host::HostState;
use crate::time::Clock;

const SHARDS: usize = 16;

/// Longer keys are refused: keys come from requests, and memory is bounded.
const MAX_KEY: usize = 256;

/// One shard of buckets: key → TAT in nanoseconds since the clock's start.
type Buckets = HashMap<Box<str>, u64>;

/// Token buckets for all plugins of a node, keyed by plugin and key.
#[derive(Debug)]
pub(crate) struct Counters {
    clock: Clock,
    hasher: RandomState,
    max_keys_per_shard: usize,
    shards: Box<[Mutex<Buckets>]>,
}

impl Counters {
    pub(crate) fn new(max_keys: usize, clock: Clock) -> Self {
        Counters {
            clock,
            hasher: RandomState::new(),
            max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
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
        if !(rate_per_second.is_finite() && rate_per_second > 0.0) {
            return Err(format!(
                "rate must be a positive number, got {rate_per_second}"
            ));
        }
        if burst == 0 {
            return Err("burst must be at least 1".to_owned());
        }
        if cost > burst {
            return Err(format!(
                "cost {cost} exceeds burst {burst}: it could never be taken"
            ));
        }
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
        let counters = Counters::new(1000, Clock::system());
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
        let counters = Counters::new(1000, Clock::system());
        let taken = counters.take_at(0, "k", 4, 1.0, 5).expect("valid");
        assert!(taken.allowed);
        assert_eq!(taken.remaining, 1);
        let refused = counters.take_at(0, "k", 2, 1.0, 5).expect("valid");
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 1000);
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let counters = Counters::new(1000, Clock::system());
        assert!(counters.take_at(0, "k", 1, 0.0, 1).is_err());
        assert!(counters.take_at(0, "k", 1, f64::NAN, 1).is_err());
        assert!(counters.take_at(0, "k", 1, 1.0, 0).is_err());
        assert!(counters.take_at(0, "k", 2, 1.0, 1).is_err());
    }

    #[test]
    fn full_buckets_are_evicted_when_the_table_is_full() {
        let counters = Counters::new(SHARDS, Clock::system());
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
