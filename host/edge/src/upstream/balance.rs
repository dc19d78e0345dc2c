//! Picking an endpoint: power of two choices over peak-EWMA load, or
//! rendezvous (highest-random-weight) hashing for sticky requests.
//!
//! Written here rather than taken from `tower::balance`: the choice must
//! skip ejected, down and busy endpoints, exclude endpoints a request has
//! already tried, honour weights and fall back across regions' pools, and
//! tower's balancer owns its endpoints as services and knows none of that.
//! The algorithms themselves are small.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::endpoint::Endpoint;

/// A small, fast, thread-safe generator (splitmix64 over an atomic
/// counter); random enough for load balancing and jitter.
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn new() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self(AtomicU64::new(seed))
    }

    pub(crate) fn next_u64(&self) -> u64 {
        let z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(z)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, then mixed: stable across processes, nodes and releases, so a
/// sticky key lands on the same endpoint everywhere.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// Two random candidates, the one with the lower load wins.
pub(crate) fn power_of_two<'a>(
    rng: &Rng,
    candidates: &[&'a Arc<Endpoint>],
) -> Option<&'a Arc<Endpoint>> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let i = rng.below(n);
            let j = (i + 1 + rng.below(n - 1)) % n;
            let (a, b) = (candidates[i], candidates[j]);
            Some(if b.cost() < a.cost() { b } else { a })
        }
    }
}

/// Weighted rendezvous hashing: each endpoint scores `-weight / ln(u)`
/// with `u` a hash of (key, endpoint) in (0, 1); the highest wins. When an
/// endpoint leaves, only its keys move.
pub(crate) fn rendezvous<'a>(
    key: u64,
    candidates: &[&'a Arc<Endpoint>],
) -> Option<&'a Arc<Endpoint>> {
    candidates
        .iter()
        .map(|e| {
            let h = mix(key ^ stable_hash(e.label.as_bytes()));
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (-e.weight / u.ln(), *e)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    "t",
                    format!("http://10.0.0.{i}:80").parse().expect("uri"),
                    1,
                ))
            })
            .collect()
    }

    #[test]
    fn power_of_two_avoids_the_loaded_endpoint() {
        let all = endpoints(2);
        let _busy: Vec<_> = (0..5).map(|_| all[0].start()).collect();
        let rng = Rng::new();
        let refs: Vec<&Arc<Endpoint>> = all.iter().collect();
        for _ in 0..100 {
            let pick = power_of_two(&rng, &refs).expect("a pick");
            assert!(Arc::ptr_eq(pick, &all[1]));
        }
    }

    #[test]
    fn rendezvous_is_sticky_and_moves_only_the_lost_endpoints_keys() {
        let all = endpoints(5);
        let refs: Vec<&Arc<Endpoint>> = all.iter().collect();
        let without: Vec<&Arc<Endpoint>> = all.iter().skip(1).collect();
        let mut counts = [0usize; 5];
        for k in 0..2000u64 {
            let key = stable_hash(&k.to_le_bytes());
            let a = rendezvous(key, &refs).expect("pick");
            assert!(Arc::ptr_eq(a, rendezvous(key, &refs).expect("pick")));
            let idx = all.iter().position(|e| Arc::ptr_eq(e, a)).expect("member");
            counts[idx] += 1;
            let b = rendezvous(key, &without).expect("pick");
            if idx != 0 {
                assert!(
                    Arc::ptr_eq(a, b),
                    "key {k} moved although its endpoint stayed"
                );
            }
        }
        for c in counts {
            assert!((250..=550).contains(&c), "uneven spread: {counts:?}");
        }
    }
}
