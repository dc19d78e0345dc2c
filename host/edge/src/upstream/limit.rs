//! The adaptive concurrency limit of a pool (AIMD, as Netflix's
//! concurrency-limits `AIMDLimit`) with a short bounded queue.
//!
//! Written here rather than taken from `tower::limit`: tower's limits are
//! fixed, and the limit must move with what the answers say (late, failed
//! or busy answers shrink it), hand queued requests a slot in order, and
//! shed with a reason the node turns into `503` + `Retry-After`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_config::ConcurrencyConfig;
use metrics::Gauge;
use tokio::sync::oneshot;

struct State {
    limit: f64,
    in_flight: usize,
    waiters: VecDeque<oneshot::Sender<()>>,
}

pub(crate) struct ConcurrencyLimit {
    pool: String,
    config: ConcurrencyConfig,
    state: Mutex<State>,
    gauge: Gauge,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    QueueFull,
    QueueTimeout,
}

impl Shed {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
        }
    }
}

impl ConcurrencyLimit {
    pub(crate) fn new(pool: &str, config: &ConcurrencyConfig) -> Self {
        let gauge =
            metrics::gauge!("breakwater_upstream_concurrency_limit", "pool" => pool.to_owned());
        gauge.set(f64::from(config.initial));
        Self {
            pool: pool.to_owned(),
            config: config.clone(),
            state: Mutex::new(State {
                limit: f64::from(config.initial),
                in_flight: 0,
                waiters: VecDeque::new(),
            }),
            gauge,
        }
    }

    /// A slot now, or after a wait in the queue, or a reason to shed.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Result<Permit, Shed> {
        let mut rx = {
            let Ok(mut state) = self.state.lock() else {
                return Err(Shed::QueueFull);
            };
            if (state.in_flight as f64) < state.limit.floor() {
                state.in_flight += 1;
                return Ok(Permit(self.clone()));
            }
            if state.waiters.len() >= self.config.queue as usize {
                drop(state);
                self.count_shed(Shed::QueueFull);
                return Err(Shed::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.push_back(tx);
            rx
        };
        match tokio::time::timeout(self.config.queue_timeout, &mut rx).await {
            Ok(Ok(())) => Ok(Permit(self.clone())),
            _ => {
                // A slot handed over just as the wait ended is still ours.
                rx.close();
                if rx.try_recv().is_ok() {
                    return Ok(Permit(self.clone()));
                }
                self.count_shed(Shed::QueueTimeout);
                Err(Shed::QueueTimeout)
            }
        }
    }

    fn count_shed(&self, shed: Shed) {
        metrics::counter!("breakwater_upstream_shed_total", "pool" => self.pool.clone(), "reason" => shed.label()).increment(1);
    }

    /// What an admitted request's answer said: in time and fine, or not.
    pub(crate) fn record(&self, latency: Duration, ok: bool) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (min, max) = (f64::from(self.config.min), f64::from(self.config.max));
        if !ok || latency > self.config.latency_target {
            state.limit = (state.limit * 0.9).max(min);
        } else if state.in_flight as f64 * 2.0 >= state.limit {
            // +1 per limit's worth of answers while the limit is in use.
            state.limit = (state.limit + 1.0 / state.limit.max(1.0)).min(max);
        }
        self.gauge.set(state.limit.floor());
    }

    fn release(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        // Hand free slots to the oldest waiters still waiting.
        while (state.in_flight as f64) < state.limit.floor() {
            let Some(waiter) = state.waiters.pop_front() else {
                break;
            };
            if waiter.send(()).is_ok() {
                state.in_flight += 1;
            }
        }
    }
}

/// A slot in the pool's limit, released on drop.
pub(crate) struct Permit(Arc<ConcurrencyLimit>);

impl Permit {
    pub(crate) fn limit(&self) -> &ConcurrencyLimit {
        &self.0
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(initial: u32, queue: u32) -> Arc<ConcurrencyLimit> {
        Arc::new(ConcurrencyLimit::new(
            "t",
            &ConcurrencyConfig {
                initial,
                min: 1,
                max: 8,
                latency_target: Duration::from_millis(100),
                queue,
                queue_timeout: Duration::from_millis(50),
            },
        ))
    }

    #[tokio::test]
    async fn over_the_limit_requests_queue_then_shed() {
        let l = limit(2, 1);
        let a = l.acquire().await.expect("first");
        let _b = l.acquire().await.expect("second");
        let queued = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(l.acquire().await.err(), Some(Shed::QueueFull));
        drop(a);
        let _queued = queued
            .await
            .expect("task")
            .expect("the queued one got the slot");
        assert_eq!(l.acquire().await.err(), Some(Shed::QueueTimeout));
    }

    #[tokio::test]
    async fn late_answers_shrink_the_limit_and_fast_ones_grow_it() {
        let l = limit(4, 0);
        l.record(Duration::from_millis(500), true);
        let after_late = l.state.lock().expect("lock").limit;
        assert!((after_late - 3.6).abs() < 1e-9);
        let _held: Vec<_> = futures_util::future::join_all((0..3).map(|_| l.acquire()))
            .await
            .into_iter()
            .collect();
        for _ in 0..20 {
            l.record(Duration::from_millis(5), true);
        }
        assert!(l.state.lock().expect("lock").limit > after_late);
    }
}
