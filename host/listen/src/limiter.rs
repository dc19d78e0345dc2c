//! Counting a listener's open connections, in all and per client IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// A listener's connection counts. One lock, held for a map update: accept
/// is not a hot enough path for anything finer to pay off.
pub(crate) struct ConnectionLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    max_connections: usize,
    max_connections_per_ip: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    open: usize,
    /// Only addresses with an open connection: at most `max_connections` entries.
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it gives its place back.
pub(crate) struct ConnectionPermit {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub(crate) fn new(name: &str, max_connections: usize, max_connections_per_ip: usize) -> Self {
        metrics::gauge!("breakwater_listener_connections_open", "listener" => name.to_owned())
            .set(0.0);
        Self {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                max_connections,
                max_connections_per_ip,
                counts: Mutex::default(),
            }),
        }
    }

    /// A permit for a connection from `ip`, or none (counted) when the
    /// listener or that address is at its limit.
    pub(crate) fn admit(&self, ip: IpAddr) -> Option<ConnectionPermit> {
        // An IPv4 client reaching a dual-stack socket counts as itself.
        let ip = ip.to_canonical();
        let shared = &self.shared;
        let mut counts = shared.lock();
        let refused = if counts.open >= shared.max_connections {
            Some("max_connections")
        } else if counts.per_ip.get(&ip).copied().unwrap_or(0) >= shared.max_connections_per_ip {
            Some("max_connections_per_ip")
        } else {
            None
        };
        if let Some(reason) = refused {
            drop(counts);
            metrics::counter!(
                "breakwater_listener_connections_refused_total",
                "listener" => shared.name.clone(),
                "reason" => reason
            )
            .increment(1);
            tracing::debug!(listener = %shared.name, %ip, reason, "connection refused");
            return None;
        }
        counts.open += 1;
        *counts.per_ip.entry(ip).or_insert(0) += 1;
        shared.publish(counts.open);
        Some(ConnectionPermit {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called under the lock, so the gauge never goes back in time.
    fn publish(&self, open: usize) {
        metrics::gauge!("breakwater_listener_connections_open", "listener" => self.name.clone())
            .set(open as f64);
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = self.shared.lock();
        counts.open = counts.open.saturating_sub(1);
        if let Some(count) = counts.per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
        self.shared.publish(counts.open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_per_listener_and_per_address_and_free_on_drop() {
        let limiter = ConnectionLimiter::new("test", 3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = limiter.admit(a).expect("first from a");
        let _second = limiter.admit(a).expect("second from a");
        assert!(limiter.admit(a).is_none(), "a third from a");
        let _from_b = limiter.admit(b).expect("first from b");
        assert!(limiter.admit(b).is_none(), "the listener is full");
        drop(first);
        let _again = limiter.admit(a).expect("a has a place again");
    }

    #[test]
    fn a_mapped_ipv4_address_counts_as_itself() {
        let limiter = ConnectionLimiter::new("test", 10, 1);
        let _v4 = limiter.admit("192.0.2.1".parse().expect("ip")).expect("v4");
        assert!(
            limiter
                .admit("::ffff:192.0.2.1".parse().expect("ip"))
                .is_none()
        );
    }
}
