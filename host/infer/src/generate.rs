//! Greedy decoding of one sequence, the reference the batched engine's
//! temperature-0 output is checked against; [`crate::sampling`] has the
//! rest of the samplers.

use crate::cpu::CpuBackend;
use crate::model::ModelError;
use crate::model::llama::{Llama, State};

/// The index of the largest logit (the first one on ties, as llama.cpp's
/// greedy sampler picks).
///
/// ```
/// assert_eq!(breakwater_infer::generate::argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
/// ```
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
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
