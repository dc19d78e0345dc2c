//! The `tokens` capability: LLM token budgets. A completion's size is known
//! only once it has been generated, so a request reserves its worst case at
//! admission and the node settles the reservation with the answer's real
//! usage. The budgets are [`counters`](crate::counters) buckets (same keys,
//! same per-plugin namespace) counted in LLM tokens, so the `counters`
//! grant covers this module too.
//!
//! ```no_run
//! use breakwater_sdk::tokens::{self, Ask, Budget};
//! use std::time::Duration;
//!
//! let budgets = [
//!     Budget::per_window("tok-m:key:k-alice", 1_000, Duration::from_secs(60)),
//!     Budget::per_window("tok-d:key:k-alice", 100_000, Duration::from_secs(86_400)),
//! ];
//! let ask = Ask { prompt_estimate: 120, max_completion: 256, min_completion: 1, cached_cost: 0 };
//! match tokens::reserve(&budgets, ask) {
//!     Ok(grant) if grant.allowed => { /* continue; the node caps max_tokens */ }
//!     Ok(grant) => { /* 429, retry after grant.retry_after_ms */ }
//!     Err(_too_large) => { /* this request can never fit these budgets */ }
//! }
//! ```

use std::time::Duration;

use crate::bindings::breakwater::plugin::tokens as abi;

pub use abi::{Ask, Budget, Grant};

impl Budget {
    /// The bucket `key` refilling at `rate_per_second` tokens per second up
    /// to `burst` tokens.
    pub fn new(key: impl Into<String>, rate_per_second: f64, burst: u32) -> Self {
        Budget {
            key: key.into(),
            rate_per_second,
            burst,
        }
    }

    /// `tokens` per `window` under `key`, e.g. 1,000 a minute: the bucket
    /// holds a whole window's tokens and refills them evenly over it, so a
    /// client may spend the window's budget at once but not twice. Zero
    /// `tokens` or a zero `window` makes no bucket: `reserve` fails.
    pub fn per_window(key: impl Into<String>, tokens: u32, window: Duration) -> Self {
        Budget::new(key, f64::from(tokens) / window.as_secs_f64(), tokens)
    }
}

/// Reserves `ask.prompt_estimate` plus the granted completion tokens from
/// every one of `budgets`, all or none, for the request in the current
/// `on_request` call; the node settles it when the answer has ended and
/// caps the upstream request's `max_tokens` at [`Grant::completion_cap`].
///
/// `Ok` with `allowed: false` means "not now": nothing was taken and
/// [`Grant::retry_after_ms`] says when the smallest admissible reservation
/// would fit. `Err` means "never" (the smallest admissible reservation
/// exceeds a bucket's burst) or arguments that make no bucket; the message
/// says which.
pub fn reserve(budgets: &[Budget], ask: Ask) -> Result<Grant, String> {
    abi::reserve(budgets, ask)
}
