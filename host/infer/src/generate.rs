//! Greedy decoding of one sequence, the reference the batched engine's
//! temperature-0 output is checked against; [`crate::sampling`] has the
//! rest of the samplers.

use crate::cpu::CpuBackend;
use crate::model::ModelError;
use crate::model::llama::{Llama, State};

/// The index of the largest logit (the first one on ties, as llama.cpp's
/// greedy sampler picks); NaNs never win, and 0 when nothing does.
///
/// ```
/// assert_eq!(breakwater_infer::generate::argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
/// ```
pub fn argmax(logits: &[f32]) -> u32 {
    // Two passes the compiler vectorizes: the maximum, 16 lanes at a time,
    // then its first index. Comparing each value with the best so far was
    // one long dependent chain, and over a 49,152-token vocabulary a
    // batch's picks held the decode step's threads up measurably.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Feeds `prompt` into `state`, then greedily generates until a token in
/// `stop` (not included in the result), `max_new_tokens`, or the end of the
/// state's capacity.
pub fn greedy(
    model: &Llama,
    backend: &CpuBackend,
    state: &mut State,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Ok(Vec::new());
    }
    let mut next = argmax(model.forward_tokens(backend, prompt, state)?);
    let mut out = Vec::new();
    while out.len() < max_new_tokens && !stop.contains(&next) {
        out.push(next);
        if state.len() == state.capacity() || out.len() == max_new_tokens {
            break;
        }
        next = argmax(model.forward(backend, next, state)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nans() {
        let mut logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32).collect();
        let first = logits.iter().position(|&v| v == 100.0).unwrap();
        assert_eq!(argmax(&logits) as usize, first);
        logits[3] = f32::NAN;
        logits[999] = f32::NAN;
        assert_eq!(argmax(&logits) as usize, first);
        logits[997] = 1e9;
        assert_eq!(argmax(&logits), 997, "past the last whole 16");
        assert_eq!(argmax(&[f32::NAN, 2.0, 5.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[f32::NAN; 20]), 0);
        assert_eq!(argmax(&[]), 0);
    }
}
