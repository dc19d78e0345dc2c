//! The retry budget: retries in flight may be at most `ratio` of the
//! requests in flight, or `min_concurrency`, whichever is more (Envoy's
//! retry budget). Retries then add at most that share of load on top of
//! the offered load, however many requests fail: no retry storm.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(crate) struct RetryBudget {
    active: AtomicUsize,
    retries: AtomicUsize,
    ratio: f64,
    min_concurrency: usize,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64, min_concurrency: u32) -> Self {
        Self {
            active: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            ratio,
            min_concurrency: min_concurrency as usize,
        }
    }

    /// Counts one request in flight until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(self.clone())
    }

    /// Takes a retry slot, if the budget has one.
    pub(crate) fn try_retry(self: &Arc<Self>) -> Option<RetrySlot> {
        let active = self.active.load(Ordering::Relaxed);
        let allowed = ((active as f64 * self.ratio) as usize).max(self.min_concurrency);
        self.retries
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |r| {
                (r < allowed).then_some(r + 1)
            })
            .ok()
            .map(|_| RetrySlot(self.clone()))
    }
}

pub(crate) struct Active(Arc<RetryBudget>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct RetrySlot(Arc<RetryBudget>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_share_or_the_minimum() {
        let budget = Arc::new(RetryBudget::new(0.2, 3));
        let active: Vec<_> = (0..50).map(|_| budget.enter()).collect();
        let slots: Vec<_> = (0..50).filter_map(|_| budget.try_retry()).collect();
        assert_eq!(slots.len(), 10, "20% of 50");
        drop(slots);
        drop(active);
        let _few: Vec<_> = (0..2).map(|_| budget.enter()).collect();
        let slots: Vec<_> = (0..10).filter_map(|_| budget.try_retry()).collect();
        assert_eq!(slots.len(), 3, "the minimum");
    }
}
