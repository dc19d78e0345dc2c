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
        .map(|e| (rendezvous_score(key, e), *e))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, e)| e)
}

/// Bounded-load rendezvous hashing (consistent hashing with bounded
/// loads, Mirrokni, Thorup and Zadimoghaddam): the candidates in the
/// key's rendezvous order, the first whose outstanding requests stay
/// within `load_factor` × the average (this request counted), or within
/// `load_slack` of the least loaded endpoint's, wins. A key keeps its
/// endpoint while that endpoint is not overloaded, and an overloaded one's
/// keys spill in a fixed order, so they still meet each other there. Also
/// says whether the key's first choice took it.
pub(crate) fn bounded_rendezvous<'a>(
    key: u64,
    candidates: &[&'a Arc<Endpoint>],
    load_factor: f64,
    load_slack: usize,
) -> Option<(&'a Arc<Endpoint>, bool)> {
    let mut ranked: Vec<(f64, &'a Arc<Endpoint>)> = candidates
        .iter()
        .map(|e| (rendezvous_score(key, e), *e))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: usize = candidates.iter().map(|e| e.outstanding()).sum::<usize>() + 1;
    let total_weight: f64 = candidates.iter().map(|e| e.weight).sum();
    let least = candidates
        .iter()
        .map(|e| e.outstanding())
        .min()
        .unwrap_or(0);
    let within = |e: &Arc<Endpoint>| {
        let share = e.weight / total_weight;
        let cap = (load_factor * total as f64 * share).ceil().max(1.0);
        ((e.outstanding() + 1) as f64) <= cap || e.outstanding() < least + load_slack
    };
    let first = ranked.first().map(|(_, e)| *e)?;
    match ranked.iter().map(|(_, e)| *e).find(|e| within(e)) {
        Some(e) => Some((e, Arc::ptr_eq(e, first))),
        // Everyone at the bound (rounding): the least loaded.
        None => ranked
            .iter()
            .map(|(_, e)| *e)
            .min_by_key(|e| e.outstanding())
            .map(|e| (e, Arc::ptr_eq(e, first))),
    }
}

fn rendezvous_score(key: u64, endpoint: &Endpoint) -> f64 {
    let h = mix(key ^ stable_hash(endpoint.label.as_bytes()));
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -endpoint.weight / u.ln()
}

/// The routing key of a completion request body under `balance =
/// "prefix"`: a hash of its model and the leading `bytes` of its first
/// message's role and text (or of `prompt`), so that requests whose prompts
/// begin alike get one key. Only the first message: every request of an
/// app begins with its system prompt, and every turn of a conversation
/// with its first message, but the leading bytes of a longer stretch would
/// reach into the turns that differ from one request to the next when the
/// system prompt is shorter than `bytes`. None when the body is not such a
/// request.
pub(crate) fn prefix_key(request: &serde_json::Value, bytes: usize) -> Option<u64> {
    let mut leading: Vec<u8> = Vec::with_capacity(bytes.min(64 * 1024) + 64);
    if let Some(model) = request.get("model").and_then(serde_json::Value::as_str) {
        leading.extend_from_slice(model.as_bytes());
        leading.push(0);
    }
    let start = leading.len();
    let mut push = |text: &str| {
        let room = (start + bytes).saturating_sub(leading.len());
        leading.extend_from_slice(&text.as_bytes()[..text.len().min(room)]);
    };
    if let Some(messages) = request
        .get("messages")
        .and_then(serde_json::Value::as_array)
    {
        if let Some(message) = messages.first() {
            push(
                message
                    .get("role")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or(""),
            );
            push("\n");
            match message.get("content") {
                Some(serde_json::Value::String(text)) => push(text),
                Some(serde_json::Value::Array(parts)) => {
                    for part in parts {
                        if let Some(text) = part.get("text").and_then(serde_json::Value::as_str) {
                            push(text);
                        }
                    }
                }
                _ => {}
            }
            push("\n");
        }
    } else if let Some(prompt) = request.get("prompt").and_then(serde_json::Value::as_str) {
        push(prompt);
    } else {
        return None;
    }
    (leading.len() > start).then(|| stable_hash(&leading))
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
    fn bounded_rendezvous_keeps_a_key_home_until_its_endpoint_is_over_the_bound() {
        let all = endpoints(4);
        let refs: Vec<&Arc<Endpoint>> = all.iter().collect();
        let key = stable_hash(b"tenant-7 system prompt");
        let home = rendezvous(key, &refs).expect("home");
        let (pick, first) = bounded_rendezvous(key, &refs, 1.25, 0).expect("pick");
        assert!(Arc::ptr_eq(pick, home) && first);
        // One key's crowd: the home endpoint fills to its bound, then the
        // rest spill, always to the same next endpoint in the key's order.
        let mut held = Vec::new();
        let mut spilled = 0;
        for _ in 0..40 {
            let (pick, first) = bounded_rendezvous(key, &refs, 1.25, 0).expect("pick");
            assert_eq!(first, Arc::ptr_eq(pick, home));
            spilled += usize::from(!first);
            held.push(pick.start());
            let total: usize = all.iter().map(|e| e.outstanding()).sum();
            for e in &all {
                let cap = (1.25 * total as f64 / 4.0).ceil().max(1.0) as usize;
                assert!(
                    e.outstanding() <= cap,
                    "{} holds {} of {total}",
                    e.label,
                    e.outstanding()
                );
            }
        }
        assert!(spilled > 0, "the crowd never spilled");
        assert!(
            home.outstanding() >= 10,
            "home took its share: {}",
            home.outstanding()
        );
        // Load gone: the key is home again.
        drop(held);
        let (pick, first) = bounded_rendezvous(key, &refs, 1.25, 0).expect("pick");
        assert!(Arc::ptr_eq(pick, home) && first);
    }

    #[test]
    fn load_slack_keeps_a_key_home_through_a_small_imbalance() {
        let all = endpoints(3);
        let refs: Vec<&Arc<Endpoint>> = all.iter().collect();
        let key = stable_hash(b"tenant-3 system prompt");
        let home = rendezvous(key, &refs).expect("home");
        let mut held = Vec::new();
        // With nothing elsewhere, the bound alone lets the home hold one
        // request (1.25 × 2 / 3 rounds up to 1); a slack of 3 lets it hold
        // three before the fourth spills.
        for n in 1..=4 {
            let (pick, first) = bounded_rendezvous(key, &refs, 1.25, 3).expect("pick");
            assert_eq!(first, n <= 3, "request {n}");
            assert_eq!(Arc::ptr_eq(pick, home), n <= 3, "request {n}");
            held.push(pick.start());
        }
        drop(held);
        let (_, first) = bounded_rendezvous(key, &refs, 1.25, 0).expect("pick");
        assert!(first);
        let _one = home.start();
        let (_, first) = bounded_rendezvous(key, &refs, 1.25, 0).expect("pick");
        assert!(!first, "without slack the second request spills");
    }

    #[test]
    fn a_prompts_leading_bytes_are_its_key() {
        let key = |body: &[u8]| prefix_key(&serde_json::from_slice(body).ok()?, 4096);
        let system = "You are the support bot of Acme. ".repeat(200);
        let chat = |user: &str| {
            serde_json::json!({
                "model": "m",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
            })
            .to_string()
        };
        let a = key(chat("hello").as_bytes()).expect("a key");
        assert_eq!(Some(a), key(chat("bye").as_bytes()));
        // A short system prompt: the turns after it still share its key,
        // as do a conversation's later turns.
        let turn = |system: &str, rest: &[&str]| {
            let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
            messages.extend(
                rest.iter()
                    .map(|m| serde_json::json!({"role": "user", "content": m})),
            );
            serde_json::json!({"model": "m", "messages": messages}).to_string()
        };
        let first = key(turn("Be brief.", &["hello"]).as_bytes());
        assert_eq!(
            first,
            key(turn("Be brief.", &["hello", "and then?"]).as_bytes())
        );
        assert_eq!(first, key(turn("Be brief.", &["bye"]).as_bytes()));
        assert_ne!(first, key(turn("Be long.", &["hello"]).as_bytes()));
        // Within the first 4 KiB, the user's words count.
        let short = |user: &str| {
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": user}]})
                .to_string()
        };
        assert_ne!(key(short("hello").as_bytes()), key(short("bye").as_bytes()));
        // Content parts read as their text; another model is another key.
        let parts = serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        });
        assert_eq!(
            key(parts.to_string().as_bytes()),
            key(short("hello").as_bytes())
        );
        let other =
            serde_json::json!({"model": "n", "messages": [{"role": "user", "content": "hello"}]});
        assert_ne!(
            key(other.to_string().as_bytes()),
            key(short("hello").as_bytes())
        );
        assert!(key(br#"{"prompt":"once upon"}"#).is_some());
        assert!(key(b"not json").is_none());
        assert!(key(br#"{"input":"x"}"#).is_none());
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
