//! Choosing the next token from logits: greedy at temperature 0, otherwise
//! a draw from the temperature-scaled softmax restricted by top-k and top-p,
//! from a per-sequence random generator that a request may seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::generate::argmax;

/// Candidates sorted first when top-p needs an order: the head of a
/// language model's distribution usually holds the mass top-p keeps, and
/// sorting 64 logits instead of the whole vocabulary is what keeps sampling
/// cheap next to a batched decode step.
const TOP_P_HEAD: usize = 64;

/// How a sequence picks its tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or anything below [`GREEDY_BELOW`]) is greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add
    /// up to at least this (1 keeps all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Seed for a reproducible draw; `None` seeds from the OS.
    pub seed: Option<u64>,
}

/// Temperatures below this are treated as greedy, as llama.cpp does: the
/// scaled logits would overflow and the draw is argmax anyway.
pub const GREEDY_BELOW: f32 = 1e-5;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether these parameters always pick the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW || self.top_k == 1
    }
}

/// A sequence's sampler; it owns its scratch space so that sampling
/// allocates nothing after the first token.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// `(probability or logit, token)` candidates.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Moves the random sequence past the draws of `tokens` tokens sampled
    /// before (by another engine, with the same seed), so that the next
    /// token is drawn as the `tokens + 1`-th would have been.
    ///
    /// ```
    /// # use breakwater_infer::sampling::{Sampler, SamplingParams};
    /// let logits = [0.5, 0.4, 0.3, 0.2];
    /// let seeded = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
    /// let mut whole = Sampler::new(seeded);
    /// let all: Vec<u32> = (0..20).map(|_| whole.sample(&logits)).collect();
    /// let mut resumed = Sampler::new(seeded);
    /// resumed.skip(12);
    /// let rest: Vec<u32> = (0..8).map(|_| resumed.sample(&logits)).collect();
    /// assert_eq!(rest, all[12..]);
    /// ```
    pub fn skip(&mut self, tokens: usize) {
        if self.params.is_greedy() {
            return;
        }
        for _ in 0..tokens {
            let _ = self.rng.random::<f32>();
        }
    }

    /// The parameters it samples with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token.
    ///
    /// ```
    /// # use breakwater_infer::sampling::{Sampler, SamplingParams};
    /// let logits = [0.0, 5.0, 1.0];
    /// assert_eq!(Sampler::new(SamplingParams::greedy()).sample(&logits), 1);
    /// let seeded = |seed| SamplingParams { temperature: 1.0, top_k: 2, seed: Some(seed), ..Default::default() };
    /// let mut a = Sampler::new(seeded(7));
    /// let mut b = Sampler::new(seeded(7));
    /// let draws: Vec<u32> = (0..32).map(|_| a.sample(&logits)).collect();
    /// assert_eq!(draws, (0..32).map(|_| b.sample(&logits)).collect::<Vec<_>>());
    /// assert!(draws.iter().all(|&t| t == 1 || t == 2), "top-k 2 never draws token 0");
    /// ```
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.is_greedy() {
            return argmax(logits);
        }
        // Exactly one draw per sampled token, whatever the logits: a
        // generation resumed elsewhere after n tokens skips n draws and
        // continues the same random sequence.
        let draw = self.rng.random::<f32>();
        if logits.len() <= 1 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        // NaN logits (a broken model) sort last and never win.
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);

        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        let max = c.iter().map(|x| x.0).fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let mut sum = 0.0f32;
        for x in c.iter_mut() {
            x.0 = ((x.0 - max) / p.temperature).exp();
            sum += x.0;
        }
        if p.top_p < 1.0 {
            // Sort the head alone first; only when it holds too little mass
            // does the rest get sorted as well.
            let want = p.top_p * sum;
            let head = TOP_P_HEAD.min(c.len());
            if head < c.len() {
                c.select_nth_unstable_by(head - 1, by_logit_desc);
            }
            c[..head].sort_unstable_by(by_logit_desc);
            let mut kept = None;
            let mut acc = 0.0;
            for (i, x) in c[..head].iter().enumerate() {
                acc += x.0;
                if acc >= want {
                    kept = Some((i + 1, acc));
                    break;
                }
            }
            let (keep, mass) = kept.unwrap_or_else(|| {
                c.sort_unstable_by(by_logit_desc);
                let mut acc = 0.0;
                for (i, x) in c.iter().enumerate() {
                    acc += x.0;
                    if acc >= want {
                        return (i + 1, acc);
                    }
                }
                (c.len(), acc)
            });
            c.truncate(keep);
            sum = mass;
        }
        let mut r = draw * sum;
        for &(prob, token) in c.iter() {
            r -= prob;
            if r < 0.0 {
                return token;
            }
        }
        // Rounding left a sliver of mass: the last candidate takes it.
        c.last().map_or_else(|| argmax(logits), |x| x.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(42),
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03: top-p 0.8 keeps two.
        let logits = [3.0, 2.0, 1.0, -0.2];
        let mut s = Sampler::new(params(1.0, 0.8, 0));
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert!(seen[0] > seen[1] && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
    }

    #[test]
    fn top_p_beyond_the_sorted_head_still_works() {
        // A flat distribution over 1000 tokens: the head of 64 holds too
        // little, so the whole list is sorted.
        let logits = vec![0.0; 1000];
        let mut s = Sampler::new(params(1.0, 0.5, 0));
        for _ in 0..100 {
            assert!((s.sample(&logits) as usize) < 1000);
        }
    }

    #[test]
    fn high_temperature_spreads_and_seeds_differ() {
        let logits = [1.0, 0.9, 0.8, 0.7];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..params(2.0, 1.0, 0)
            });
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        for t in 0..4 {
            assert!(a.contains(&t), "{a:?}");
        }
    }

    #[test]
    fn greedy_ignores_the_rng() {
        let logits = [0.0, 1.0, 7.0, 7.0];
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&logits), 2);
        assert_eq!(Sampler::new(params(0.7, 1.0, 1)).sample(&logits), 2);
    }
}
