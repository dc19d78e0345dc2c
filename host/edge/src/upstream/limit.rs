//! The adaptive concurrency limit of a pool (AIMD, as Netflix's
//! concurrency-limits `AIMDLimit`) with a short bounded queue ordered by
//! priority tier.
//!
//! Written here rather than taken from `tower::limit`: tower's limits are
//! fixed, and the limit must move with what the answers say (late, failed
//! or busy answers shrink it), hand queued requests a slot by tier and in
//! order, and shed with a reason the node turns into `503` + `Retry-After`.
//!
//! Tiers (see [`edge_config::PriorityConfig`]): tier 0 is the highest. A
//! free slot goes to the oldest waiter of the highest tier waiting; a
//! request that finds the queue full takes the place of the newest waiter
//! of the lowest tier below its own (that one is shed as `evicted`), or is
//! shed itself when there is none; tiers below the first may hold only
//! `floor(limit × (1 − reserved))` slots. In-flight requests are never
//! preempted: priority decides who gets the next slot, not who loses one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_config::ConcurrencyConfig;
use http::{HeaderMap, HeaderName};
use metrics::{Counter, Gauge};
use tokio::sync::oneshot;

/// The tier of requests when a pool configures no priority.
const NO_TIER: &str = "default";

struct State {
    limit: f64,
    in_flight: usize,
    /// Waiters per tier, highest tier first, oldest first within a tier.
    /// A waiter whose receiver is gone (it timed out) is skipped and
    /// pruned. Dropping a sender unsent tells its waiter it was evicted.
    queues: Vec<VecDeque<oneshot::Sender<()>>>,
}

impl State {
    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }
}

/// How requests are sorted into tiers.
struct Tiers {
    header: Option<HeaderName>,
    names: Vec<String>,
    config: Option<edge_config::PriorityConfig>,
    default: usize,
    /// Share of the limit the tiers below the first may not use.
    reserved: f64,
}

pub(crate) struct ConcurrencyLimit {
    config: ConcurrencyConfig,
    tiers: Tiers,
    state: Mutex<State>,
    gauge: Gauge,
    /// `breakwater_upstream_shed_total` per tier, by [`Shed::ALL`] order.
    shed: Vec<[Counter; 3]>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// The queue was full of requests of its tier or higher.
    QueueFull,
    /// It waited `queue_timeout` without a slot.
    QueueTimeout,
    /// It waited, and a higher tier's request took its place in the queue.
    Evicted,
}

impl Shed {
    const ALL: [Shed; 3] = [Shed::QueueFull, Shed::QueueTimeout, Shed::Evicted];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
            Shed::Evicted => "evicted",
        }
    }

    fn index(self) -> usize {
        match self {
            Shed::QueueFull => 0,
            Shed::QueueTimeout => 1,
            Shed::Evicted => 2,
        }
    }
}

impl ConcurrencyLimit {
    pub(crate) fn new(pool: &str, config: &ConcurrencyConfig) -> Self {
        let gauge =
            metrics::gauge!("breakwater_upstream_concurrency_limit", "pool" => pool.to_owned());
        gauge.set(f64::from(config.initial));
        let tiers = match &config.priority {
            // edge-config validated the header, the names and the share.
            Some(priority) if !priority.tiers.is_empty() => Tiers {
                header: HeaderName::from_bytes(priority.header.as_bytes()).ok(),
                names: priority.tiers.clone(),
                config: Some(priority.clone()),
                default: priority.default_index(),
                reserved: priority.reserved.clamp(0.0, 1.0),
            },
            _ => Tiers {
                header: None,
                names: vec![NO_TIER.to_owned()],
                config: None,
                default: 0,
                reserved: 0.0,
            },
        };
        let shed = tiers
            .names
            .iter()
            .map(|tier| {
                Shed::ALL.map(|reason| {
                    metrics::counter!(
                        "breakwater_upstream_shed_total",
                        "pool" => pool.to_owned(),
                        "reason" => reason.label(),
                        "tier" => tier.clone()
                    )
                })
            })
            .collect();
        Self {
            config: config.clone(),
            state: Mutex::new(State {
                limit: f64::from(config.initial),
                in_flight: 0,
                queues: tiers.names.iter().map(|_| VecDeque::new()).collect(),
            }),
            tiers,
            gauge,
            shed,
        }
    }

    /// The tier of a request with `headers`: 0 is the highest.
    pub(crate) fn tier_of(&self, headers: &HeaderMap) -> usize {
        let (Some(header), Some(priority)) = (&self.tiers.header, &self.tiers.config) else {
            return 0;
        };
        headers
            .get(header)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| priority.index_of(value))
            .unwrap_or(self.tiers.default)
    }

    /// The name of tier `tier`, for metrics and answers.
    pub(crate) fn tier_name(&self, tier: usize) -> &str {
        self.tiers.names.get(tier).map_or(NO_TIER, String::as_str)
    }

    /// Slots requests of `tier` may hold under `limit`.
    fn cap(&self, limit: f64, tier: usize) -> usize {
        let limit = limit.floor().max(0.0);
        let share = if tier == 0 {
            limit
        } else {
            (limit * (1.0 - self.tiers.reserved)).floor()
        };
        share as usize
    }

    /// Hands free slots to waiters, highest tier first, oldest first.
    fn dispatch(&self, state: &mut State) {
        for tier in 0..state.queues.len() {
            let cap = self.cap(state.limit, tier);
            while state.in_flight < cap {
                let Some(waiter) = state.queues[tier].pop_front() else {
                    break;
                };
                if waiter.send(()).is_ok() {
                    state.in_flight += 1;
                }
            }
        }
    }

    /// A slot for a request of `tier` now, or after a wait in the queue,
    /// or a reason to shed.
    pub(crate) async fn acquire(self: &Arc<Self>, tier: usize) -> Result<Permit, Shed> {
        let tier = tier.min(self.tiers.names.len() - 1);
        let mut rx = {
            let Ok(mut state) = self.state.lock() else {
                return Err(self.count_shed(Shed::QueueFull, tier));
            };
            for queue in &mut state.queues {
                queue.retain(|waiter| !waiter.is_closed());
            }
            // Waiters of this tier or above who fit were handed slots by
            // `dispatch`, so a free slot here jumps no one's turn.
            if state.in_flight < self.cap(state.limit, tier) {
                state.in_flight += 1;
                return Ok(Permit(self.clone()));
            }
            if state.queued() >= self.config.queue as usize {
                // Room for a higher tier: the newest waiter of the lowest
                // tier below this one gives up its place.
                let lower = (tier + 1..state.queues.len())
                    .rev()
                    .find(|&t| !state.queues[t].is_empty());
                match lower {
                    // Dropped unsent: its waiter wakes as `Evicted`.
                    Some(lower) => drop(state.queues[lower].pop_back()),
                    None => {
                        drop(state);
                        return Err(self.count_shed(Shed::QueueFull, tier));
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            state.queues[tier].push_back(tx);
            rx
        };
        match tokio::time::timeout(self.config.queue_timeout, &mut rx).await {
            Ok(Ok(())) => Ok(Permit(self.clone())),
            Ok(Err(_)) => Err(self.count_shed(Shed::Evicted, tier)),
            Err(_) => {
                // A slot handed over just as the wait ended is still ours.
                rx.close();
                if rx.try_recv().is_ok() {
                    return Ok(Permit(self.clone()));
                }
                Err(self.count_shed(Shed::QueueTimeout, tier))
            }
        }
    }

    fn count_shed(&self, shed: Shed, tier: usize) -> Shed {
        if let Some(counters) = self.shed.get(tier) {
            counters[shed.index()].increment(1);
        }
        shed
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
            // A grown limit may have room for waiters.
            self.dispatch(&mut state);
        }
        self.gauge.set(state.limit.floor());
    }

    fn release(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        self.dispatch(&mut state);
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
    use edge_config::PriorityConfig;

    fn config(initial: u32, queue: u32) -> ConcurrencyConfig {
        ConcurrencyConfig {
            initial,
            min: 1,
            max: 8,
            latency_target: Duration::from_millis(100),
            queue,
            queue_timeout: Duration::from_millis(50),
            priority: None,
        }
    }

    fn limit(initial: u32, queue: u32) -> Arc<ConcurrencyLimit> {
        Arc::new(ConcurrencyLimit::new("t", &config(initial, queue)))
    }

    /// A limit with tiers `tiers` (highest first), a long queue timeout so
    /// that only hand-overs and evictions end a wait.
    fn tiered(initial: u32, queue: u32, tiers: &[&str], reserved: f64) -> Arc<ConcurrencyLimit> {
        let mut config = config(initial, queue);
        config.min = initial;
        config.max = initial;
        config.queue_timeout = Duration::from_secs(60);
        config.priority = Some(PriorityConfig {
            header: "x-tier".to_owned(),
            tiers: tiers.iter().map(|t| (*t).to_owned()).collect(),
            default: None,
            reserved,
        });
        Arc::new(ConcurrencyLimit::new("t", &config))
    }

    fn queued(l: &ConcurrencyLimit, tier: usize) -> usize {
        l.state.lock().expect("lock").queues[tier].len()
    }

    /// Starts a request of `tier` that records `name` once admitted and
    /// then gives its slot back at once; waits until it is queued.
    async fn queue_up(
        l: &Arc<ConcurrencyLimit>,
        tier: usize,
        name: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Result<(), Shed>> {
        let before = queued(l, tier);
        let task = tokio::spawn({
            let l = l.clone();
            let order = order.clone();
            async move {
                let permit = l.acquire(tier).await?;
                order.lock().expect("lock").push(name);
                drop(permit);
                Ok(())
            }
        });
        // Bounded: the task only has to run to its first await.
        for _ in 0..1000 {
            if queued(l, tier) > before {
                return task;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{name} did not queue");
    }

    #[tokio::test]
    async fn over_the_limit_requests_queue_then_shed() {
        let l = limit(2, 1);
        let a = l.acquire(0).await.expect("first");
        let _b = l.acquire(0).await.expect("second");
        let queued = tokio::spawn({
            let l = l.clone();
            async move { l.acquire(0).await }
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(l.acquire(0).await.err(), Some(Shed::QueueFull));
        drop(a);
        let _queued = queued
            .await
            .expect("task")
            .expect("the queued one got the slot");
        assert_eq!(l.acquire(0).await.err(), Some(Shed::QueueTimeout));
    }

    #[tokio::test]
    async fn late_answers_shrink_the_limit_and_fast_ones_grow_it() {
        let l = limit(4, 0);
        l.record(Duration::from_millis(500), true);
        let after_late = l.state.lock().expect("lock").limit;
        assert!((after_late - 3.6).abs() < 1e-9);
        let _held: Vec<_> = futures_util::future::join_all((0..3).map(|_| l.acquire(0)))
            .await
            .into_iter()
            .collect();
        for _ in 0..20 {
            l.record(Duration::from_millis(5), true);
        }
        assert!(l.state.lock().expect("lock").limit > after_late);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_highest_tier_waiting_in_arrival_order() {
        let l = tiered(1, 8, &["paid", "free"], 0.0);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = l.acquire(1).await.expect("the one slot");
        let tasks = vec![
            queue_up(&l, 1, "free-1", &order).await,
            queue_up(&l, 0, "paid-1", &order).await,
            queue_up(&l, 1, "free-2", &order).await,
            queue_up(&l, 0, "paid-2", &order).await,
        ];
        drop(held);
        for task in tasks {
            task.await.expect("task").expect("admitted");
        }
        assert_eq!(
            *order.lock().expect("lock"),
            ["paid-1", "paid-2", "free-1", "free-2"]
        );
    }

    #[tokio::test]
    async fn a_full_queue_sheds_the_newest_lowest_tier_waiter_for_a_higher_tier() {
        let l = tiered(1, 2, &["gold", "silver", "bronze"], 0.0);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = l.acquire(0).await.expect("the one slot");
        let silver = queue_up(&l, 1, "silver", &order).await;
        let bronze_1 = queue_up(&l, 2, "bronze-1", &order).await;
        // Full: gold takes bronze-1's place, not silver's.
        let gold_1 = queue_up(&l, 0, "gold-1", &order).await;
        assert_eq!(bronze_1.await.expect("task"), Err(Shed::Evicted));
        // Full of higher tiers: a bronze arrival is shed at once.
        assert_eq!(l.acquire(2).await.err(), Some(Shed::QueueFull));
        // Full with silver the lowest: gold takes silver's place.
        let gold_2 = queue_up(&l, 0, "gold-2", &order).await;
        assert_eq!(silver.await.expect("task"), Err(Shed::Evicted));
        // Full of gold: gold waits its turn or is shed, never evicts gold.
        assert_eq!(l.acquire(0).await.err(), Some(Shed::QueueFull));
        drop(held);
        gold_1.await.expect("task").expect("admitted");
        gold_2.await.expect("task").expect("admitted");
        assert_eq!(*order.lock().expect("lock"), ["gold-1", "gold-2"]);
    }

    #[tokio::test]
    async fn a_reserved_share_of_the_limit_is_kept_for_the_first_tier() {
        // Limit 4 with half reserved: free traffic holds 2 slots at most.
        let l = tiered(4, 0, &["paid", "free"], 0.5);
        let _free: Vec<Permit> = futures_util::future::join_all((0..2).map(|_| l.acquire(1)))
            .await
            .into_iter()
            .map(|p| p.expect("free within its share"))
            .collect();
        assert_eq!(l.acquire(1).await.err(), Some(Shed::QueueFull));
        let _paid: Vec<Permit> = futures_util::future::join_all((0..2).map(|_| l.acquire(0)))
            .await
            .into_iter()
            .map(|p| p.expect("paid in the reserve"))
            .collect();
        assert_eq!(l.acquire(0).await.err(), Some(Shed::QueueFull));
    }

    #[tokio::test]
    async fn a_queued_lower_tier_waits_while_only_reserved_slots_are_free() {
        let l = tiered(2, 4, &["paid", "free"], 0.5);
        let order = Arc::new(Mutex::new(Vec::new()));
        let free = l.acquire(1).await.expect("free's one slot");
        let waiting = queue_up(&l, 1, "free-2", &order).await;
        // The reserved slot stays open for paid traffic.
        let paid = l.acquire(0).await.expect("the reserved slot");
        drop(paid);
        assert_eq!(queued(&l, 1), 1, "free-2 still waits");
        drop(free);
        waiting.await.expect("task").expect("admitted");
        assert_eq!(*order.lock().expect("lock"), ["free-2"]);
    }

    #[test]
    fn the_tier_comes_from_the_header_and_unknown_or_absent_means_the_default() {
        let l = tiered(1, 0, &["paid", "free"], 0.0);
        let mut headers = HeaderMap::new();
        assert_eq!(l.tier_of(&headers), 1, "absent: the last tier");
        headers.insert("x-tier", http::HeaderValue::from_static(" Paid "));
        assert_eq!(l.tier_of(&headers), 0);
        headers.insert("x-tier", http::HeaderValue::from_static("platinum"));
        assert_eq!(l.tier_of(&headers), 1, "unknown: the default");
        assert_eq!(l.tier_name(0), "paid");
        let untiered = limit(1, 0);
        headers.insert("x-tier", http::HeaderValue::from_static("paid"));
        assert_eq!(untiered.tier_of(&headers), 0);
        assert_eq!(untiered.tier_name(0), "default");
    }
}
