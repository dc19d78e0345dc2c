//! The `tokens` capability (granted with `counters`): LLM token budgets
//! reserved by a plugin during `on-request` and settled by the node once the
//! answer's real usage is known.
//!
//! The reservation lives in the host, not the plugin: the answer ends long
//! after the plugin's call returned (a stream may run for minutes), and a
//! settlement must happen exactly once whatever becomes of the request, so
//! it is owned by a value the node holds for the request ([`TokenGrants`]),
//! which gives everything back when dropped unsettled.

use std::sync::Arc;

use crate::bindings::breakwater::plugin::tokens::{Ask, Budget, Grant, Host};
use crate::host::HostState;
use crate::host::counters::{BucketSpec, Counters, Ledger, MAX_KEY};

/// What a request's answer cost, for [`TokenGrants::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUsage {
    /// Generated upstream: the answer's real prompt and completion tokens.
    Generated { prompt: u64, completion: u64 },
    /// Served from the node's cache: each reservation's `cached-cost`.
    Cached,
    /// No answer was generated (upstream failure, refusal): free.
    Nothing,
}

/// One plugin's reservation.
#[derive(Debug)]
struct Reservation {
    counters: Arc<Counters>,
    ledger: Ledger,
    buckets: Vec<BucketSpec>,
    prompt_estimate: u32,
    asked_completion: u32,
    completion_cap: u32,
    cached_cost: u32,
}

impl Reservation {
    /// The tokens taken from each bucket.
    fn taken(&self) -> u32 {
        self.prompt_estimate.saturating_add(self.completion_cap)
    }

    /// Gives back or takes the difference to `used` on every bucket;
    /// the tokens left in the emptiest one.
    fn settle(&self, used: u64) -> u64 {
        let delta = i64::try_from(used)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::from(self.taken()));
        self.buckets
            .iter()
            .map(|bucket| self.counters.adjust(self.ledger, bucket, delta))
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// The token reservations made for one request by its plugins, settled
/// once when the answer has ended. Dropped unsettled, everything reserved
/// is given back (the request got no answer).
#[derive(Debug, Default)]
pub struct TokenGrants {
    reservations: Vec<Reservation>,
}

impl TokenGrants {
    /// Whether no plugin reserved anything.
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// The completion tokens the request may generate: the smallest cap
    /// of its reservations.
    pub fn completion_cap(&self) -> Option<u32> {
        self.reservations.iter().map(|r| r.completion_cap).min()
    }

    /// Whether a budget granted fewer completion tokens than the request
    /// asked for: the cap, not the client, would end its answer.
    pub fn is_reduced(&self) -> bool {
        self.reservations
            .iter()
            .any(|r| r.completion_cap < r.asked_completion)
    }

    /// The most tokens one reservation took (prompt estimate and cap).
    pub fn reserved(&self) -> u64 {
        self.reservations
            .iter()
            .map(|r| u64::from(r.taken()))
            .max()
            .unwrap_or(0)
    }

    /// What a cached answer costs (the largest `cached-cost`).
    pub fn cached_cost(&self) -> u64 {
        self.reservations
            .iter()
            .map(|r| u64::from(r.cached_cost))
            .max()
            .unwrap_or(0)
    }

    /// The prompt tokens the reservations estimated (the largest).
    pub fn prompt_estimate(&self) -> u32 {
        self.reservations
            .iter()
            .map(|r| r.prompt_estimate)
            .max()
            .unwrap_or(0)
    }

    /// Adds `other`'s reservations (a later plugin's) to these.
    pub fn extend(&mut self, mut other: TokenGrants) {
        self.reservations.append(&mut other.reservations);
    }

    /// Settles every reservation to `usage`: what was not used goes back
    /// to the buckets, a prompt longer than estimated takes the rest.
    /// Returns the tokens left in the emptiest bucket, when any.
    pub fn settle(mut self, usage: TokenUsage) -> Option<u64> {
        self.settle_all(usage)
    }

    fn settle_all(&mut self, usage: TokenUsage) -> Option<u64> {
        std::mem::take(&mut self.reservations)
            .iter()
            .map(|reservation| {
                let used = match usage {
                    TokenUsage::Generated { prompt, completion } => prompt + completion,
                    TokenUsage::Cached => u64::from(reservation.cached_cost),
                    TokenUsage::Nothing => 0,
                };
                reservation.settle(used)
            })
            .min()
    }
}

impl Drop for TokenGrants {
    fn drop(&mut self) {
        self.settle_all(TokenUsage::Nothing);
    }
}

impl Host for HostState {
    fn reserve(&mut self, budgets: Vec<Budget>, ask: Ask) -> Result<Grant, String> {
        let Some(grants) = self.token_grants.as_mut() else {
            return Err("tokens can be reserved only during on-request".to_owned());
        };
        if budgets.is_empty() {
            return Err("no budget to reserve from".to_owned());
        }
        let mut buckets = Vec::with_capacity(budgets.len());
        for budget in budgets {
            if budget.key.len() > MAX_KEY {
                return Err(format!("key longer than {MAX_KEY} bytes"));
            }
            buckets.push(BucketSpec {
                // The namespace of `counters`: a plugin's token buckets are
                // its counter buckets.
                key: format!("{}\0{}", self.plugin.name, budget.key).into(),
                rate_per_second: budget.rate_per_second,
                burst: budget.burst,
            });
        }
        let max_completion = ask.max_completion.max(1);
        let min_completion = ask.min_completion.clamp(1, max_completion);
        let counters = Arc::clone(&self.plugin.counters);
        let reserved = counters.reserve(
            &buckets,
            ask.prompt_estimate,
            max_completion,
            min_completion,
        )?;
        let allowed = reserved.allowed;
        if allowed {
            grants.reservations.push(Reservation {
                counters,
                ledger: reserved.ledger,
                buckets,
                prompt_estimate: ask.prompt_estimate,
                asked_completion: max_completion,
                completion_cap: reserved.completion,
                cached_cost: ask.cached_cost,
            });
        }
        Ok(Grant {
            allowed,
            completion_cap: reserved.completion,
            remaining: reserved.remaining,
            retry_after_ms: reserved.retry_after_ms,
        })
    }
}
