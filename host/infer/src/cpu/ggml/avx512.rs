//! [`super::attend`] in AVX-512 registers, bit for bit the portable
//! version's values.
//!
//! Why a second version of the same arithmetic: once batching shares the
//! weights among the sequences of a decode step, attention is the work each
//! sequence does alone, and the portable loops (which the compiler keeps
//! scalar where they reduce across lanes or gather from 64 accumulators)
//! became the largest part of a 16-stream step. Here each of ggml's 16-lane
//! vectors is one register, so every product, sum and reduction is the
//! same operation on the same operands in the same order, only 16 at a time.
//!
//! Needs AVX-512 F with FMA and F16C, and a head size the registers divide
//! ([`fits`]).

use std::arch::x86_64::*;

use half::f16;

use super::{CachedHead, DotOrder, LANES, LN2_HI, LN2_LO, LOG2_E, POLY, SHIFT, VEC_DOT_VECTORS};

/// Whether this CPU and a head of `head_dim` values can take this path.
pub(super) fn fits(head_dim: usize) -> bool {
    // Keys and values are taken 64 dimensions at a time.
    head_dim > 0
        && head_dim.is_multiple_of(BLOCK)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `x` rounded to f16 and back, 16 lanes at a time (ties to even, as
/// [`super::round_f16`]).
#[inline(always)]
unsafe fn round_f16(x: __m512) -> __m512 {
    unsafe {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(x))
    }
}

/// The 16 lanes summed in [`super::reduce_lanes`]'s tree.
#[inline(always)]
unsafe fn reduce_lanes(v: __m512) -> f32 {
    unsafe {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let eight = _mm256_add_ps(hi, lo);
        let four = _mm_add_ps(
            _mm256_extractf128_ps::<1>(eight),
            _mm256_castps256_ps128(eight),
        );
        // (four[0] + four[2]) and (four[1] + four[3]), then those two.
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
    }
}

/// [`super::expf`] on 16 lanes: the same fused multiply-adds, and
/// `vscalefps` for the scaling the scalar version does in f64.
#[inline(always)]
unsafe fn expf(x: __m512) -> __m512 {
    unsafe {
        let k = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
        let shift = k(SHIFT);
        let z = _mm512_fmadd_ps(x, k(LOG2_E), shift);
        let n = _mm512_sub_ps(z, shift);
        let b = _mm512_fnmadd_ps(n, k(LN2_LO), _mm512_fnmadd_ps(n, k(LN2_HI), x));
        let u = _mm512_mul_ps(b, b);
        let [c0, c1, c2, c3, c4] = POLY.map(k);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(_mm512_fmadd_ps(c0, b, c1), u, _mm512_fmadd_ps(c2, b, c3)),
            u,
            _mm512_fmadd_ps(c4, b, _mm512_set1_ps(1.0)),
        );
        let scaled = _mm512_scalef_ps(j, n);
        // Past ±192 the scalar version saturates to 0 or infinity.
        let out_of_range =
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let at_most_zero = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
        let saturated = _mm512_mask_blend_ps(
            at_most_zero,
            _mm512_set1_ps(f32::INFINITY),
            _mm512_setzero_ps(),
        );
        _mm512_mask_blend_ps(out_of_range, scaled, saturated)
    }
}

/// 16 f16 values from `at`, as f32.
#[inline(always)]
unsafe fn load_f16(at: *const f16) -> __m512 {
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(at.cast())) }
}

/// In-place softmax in [`super::softmax`]'s order.
#[inline(always)]
unsafe fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    unsafe {
        let max_v = _mm512_set1_ps(max);
        for block in x.chunks_mut(LANES) {
            // A short last block's missing lanes are zeros, as the
            // portable version's are.
            let mask: __mmask16 = if block.len() == LANES {
                !0
            } else {
                (1 << block.len()) - 1
            };
            let v = _mm512_maskz_loadu_ps(mask, block.as_ptr());
            let e = _mm512_maskz_mov_ps(mask, expf(_mm512_sub_ps(v, max_v)));
            _mm512_mask_storeu_ps(block.as_mut_ptr(), mask, e);
            sum += f64::from(reduce_lanes(e));
        }
    }
    let scale = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= scale;
    }
}

/// The vector ggml reduces to one key's score: the key (already in f32 at
/// `key`) times the rounded query `q16`, in `order`'s lanes and, for
/// [`DotOrder::VecDot`], its four vectors added `(0 + 2) + (1 + 3)`.
#[inline(always)]
unsafe fn score_vector(order: DotOrder, key: *const f32, q16: *const f32, hd: usize) -> __m512 {
    unsafe {
        match order {
            DotOrder::Gemm => {
                let mut acc = _mm512_setzero_ps();
                for i in (0..hd).step_by(LANES) {
                    acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(key.add(i)),
                        _mm512_loadu_ps(q16.add(i)),
                        acc,
                    );
                }
                acc
            }
            DotOrder::VecDot => {
                let mut v = [_mm512_setzero_ps(); VEC_DOT_VECTORS];
                for i in (0..hd).step_by(LANES * VEC_DOT_VECTORS) {
                    for (j, v) in v.iter_mut().enumerate() {
                        let e = i + j * LANES;
                        *v = _mm512_fmadd_ps(
                            _mm512_loadu_ps(key.add(e)),
                            _mm512_loadu_ps(q16.add(e)),
                            *v,
                        );
                    }
                }
                _mm512_add_ps(_mm512_add_ps(v[0], v[2]), _mm512_add_ps(v[1], v[3]))
            }
        }
    }
}

/// Lane `p` of the result is [`reduce_lanes`]`(v[p])`: the same tree of
/// additions on the same pairs, done for 16 vectors at once by shuffling
/// halves, then quarters, then pairs and lanes of them side by side.
#[inline(always)]
unsafe fn reduce16(v: &[__m512; LANES]) -> __m512 {
    unsafe {
        // eight: lanes i + 8 and i of each vector, two vectors per register.
        let w: [__m512; 8] = std::array::from_fn(|k| {
            let (a, b) = (v[2 * k], v[2 * k + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xee>(a, b),
            )
        });
        // four: lanes i + 4 and i of each eight, four vectors per register.
        let z: [__m512; 4] = std::array::from_fn(|m| {
            let (a, b) = (w[2 * m], w[2 * m + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xdd>(a, b),
            )
        });
        // two: four[0] + four[2] and four[1] + four[3].
        let s: [__m512; 2] = std::array::from_fn(|n| {
            let (a, b) = (z[2 * n], z[2 * n + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xee>(a, b),
            )
        });
        // one: two[0] + two[1]. Lane 4c + i now holds vector c + 4i.
        let r = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(s[0], s[1]),
            _mm512_shuffle_ps::<0xdd>(s[0], s[1]),
        );
        let order: [i32; LANES] = std::array::from_fn(|p| (4 * (p % 4) + p / 4) as i32);
        _mm512_permutexvar_ps(_mm512_loadu_si512(order.as_ptr().cast()), r)
    }
}

/// Asks for the cache lines of `len` f16 values from `at` into the cache
/// level `HINT` names.
#[inline(always)]
unsafe fn prefetch<const HINT: i32>(at: *const f16, len: usize) {
    const LINE: usize = 64;
    let bytes = at.cast::<i8>();
    for offset in (0..len * 2).step_by(LINE) {
        // SAFETY: a prefetch reads nothing; the address is within the row.
        unsafe { _mm_prefetch::<HINT>(bytes.wrapping_add(offset)) };
    }
}

/// Dimensions of the values one pass of [`accumulate`] carries: four
/// registers per head.
const BLOCK: usize = 4 * LANES;

/// Accumulator `a` of each of the `H` heads over the 64 dimensions from
/// `block`, stored at `lanes[(g·stride + a)·hd + block..]`: it takes
/// `p_t·v_t` for `t = a, a + stride, …` in that order, `p_t` head `g`'s
/// weight (already rounded to f16), as the portable version does.
#[inline(always)]
unsafe fn accumulate<const H: usize>(
    kv: &CachedHead<'_>,
    weights: &[f32],
    positions: usize,
    block: usize,
    stride: usize,
    lanes: &mut [f32],
) {
    let hd = kv.head_dim();
    assert!(
        weights.len() >= H * positions,
        "a weight per head and position"
    );
    assert!(lanes.len() >= H * stride * hd, "an accumulator per head");
    for a in 0..stride.min(positions) {
        // SAFETY: the caller has AVX-512 F; every position below
        // `positions` was checked by the caller, the block is within the
        // head and the weights and lanes were checked above.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; H];
            let mut t = a;
            while t < positions {
                let value = kv.value_ptr(t).add(block);
                let v: [__m512; 4] = std::array::from_fn(|k| load_f16(value.add(k * LANES)));
                for (g, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*weights.get_unchecked(g * positions + t));
                    for (acc, v) in acc.iter_mut().zip(&v) {
                        *acc = _mm512_fmadd_ps(p, *v, *acc);
                    }
                }
                t += stride;
            }
            for (g, acc) in acc.iter().enumerate() {
                let at = lanes.as_mut_ptr().add((g * stride + a) * hd + block);
                for (k, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(at.add(k * LANES), *acc);
                }
            }
        }
    }
    // Accumulators with no position (fewer positions than the stride) are
    // zeros, as the portable version's are.
    for g in 0..H {
        for a in positions.min(stride)..stride {
            let at = (g * stride + a) * hd + block;
            lanes[at..at + BLOCK].fill(0.0);
        }
    }
}

/// [`super::attend`] for a CPU and head size that [`fits`].
///
/// # Safety
///
/// Requires what [`fits`] checks.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn attend(
    order: DotOrder,
    q: &[f32],
    kv: &CachedHead<'_>,
    scale: f32,
    scores: &mut [f32],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    let hd = kv.head_dim();
    let heads = q.len() / hd;
    let positions = scores.len() / heads.max(1);
    if positions == 0 {
        return;
    }
    kv.check(positions);
    let accumulators = order.accumulators();
    let scratch = &mut scratch[..super::attend_scratch_len(hd, heads)];
    let (q16, rest) = scratch.split_at_mut(heads * hd);
    let (keys, lanes) = rest.split_at_mut(LANES * hd);
    // SAFETY: the CPU features are the caller's; every position below
    // `positions` was found within the cache by `check`; the scratch holds
    // `heads` rounded queries, 16 keys and `heads · accumulators` rows of
    // accumulators, and `scores` a row of `positions` per head, as every
    // offset below assumes.
    unsafe {
        for (r, q) in q16.chunks_exact_mut(LANES).zip(q.chunks_exact(LANES)) {
            _mm512_storeu_ps(r.as_mut_ptr(), round_f16(_mm512_loadu_ps(q.as_ptr())));
        }
        // Scores 16 positions at a time: their keys widened once for all
        // the heads, each head's 16 vectors reduced together.
        for first in (0..positions).step_by(LANES) {
            let count = (positions - first).min(LANES);
            // The cache streams from memory: ask for the next keys, and for
            // these positions' values (read once every score is known),
            // while these keys are worked on.
            for t in first + LANES..(first + 2 * LANES).min(positions) {
                prefetch::<_MM_HINT_T0>(kv.key_ptr(t), hd);
            }
            for t in first..first + count {
                prefetch::<_MM_HINT_T1>(kv.value_ptr(t), hd);
            }
            for p in 0..count {
                let key = kv.key_ptr(first + p);
                for i in (0..hd).step_by(LANES) {
                    _mm512_storeu_ps(keys.as_mut_ptr().add(p * hd + i), load_f16(key.add(i)));
                }
            }
            let mask: __mmask16 = if count == LANES { !0 } else { (1 << count) - 1 };
            for g in 0..heads {
                let q16 = q16.as_ptr().add(g * hd);
                // A loop, not a closure: the closure was not inlined.
                let mut vectors = [_mm512_setzero_ps(); LANES];
                for (p, v) in vectors.iter_mut().enumerate().take(count) {
                    *v = score_vector(order, keys.as_ptr().add(p * hd), q16, hd);
                }
                let s = _mm512_mul_ps(reduce16(&vectors), _mm512_set1_ps(scale));
                let at = scores.as_mut_ptr().add(g * positions + first);
                _mm512_mask_storeu_ps(at, mask, s);
            }
        }
        for scores in scores.chunks_exact_mut(positions.max(1)) {
            softmax(scores);
            // The weights enter the product with the values in f16.
            for block in scores.chunks_mut(LANES) {
                let mask: __mmask16 = if block.len() == LANES {
                    !0
                } else {
                    (1 << block.len()) - 1
                };
                let p = _mm512_maskz_loadu_ps(mask, block.as_ptr());
                _mm512_mask_storeu_ps(block.as_mut_ptr(), mask, round_f16(p));
            }
        }
        // The weighted values, BLOCK dimensions at a time, up to four heads
        // at a time: each accumulator's positions (every 16th or 64th) are
        // added in order in registers, then stored.
        for block in (0..hd).step_by(BLOCK) {
            for first in (0..heads).step_by(4) {
                let group = (heads - first).min(4);
                let weights = &scores[first * positions..];
                let lanes = &mut lanes[first * accumulators * hd..];
                match group {
                    1 => accumulate::<1>(kv, weights, positions, block, accumulators, lanes),
                    2 => accumulate::<2>(kv, weights, positions, block, accumulators, lanes),
                    3 => accumulate::<3>(kv, weights, positions, block, accumulators, lanes),
                    _ => accumulate::<4>(kv, weights, positions, block, accumulators, lanes),
                }
            }
        }
        // Output values 16 at a time: the accumulators of each lane
        // combined as the portable version combines them, then the lanes
        // through its tree: eight[l] = s[8 + l] + s[l], four[l] =
        // eight[4 + l] + eight[l], then (four[0] + four[2]) + (four[1] +
        // four[3]).
        for (g, out) in out.chunks_exact_mut(hd).enumerate() {
            let lanes = lanes.as_ptr().add(g * accumulators * hd);
            let at = |a: usize, i: usize| _mm512_loadu_ps(lanes.add(a * hd + i));
            for i in (0..hd).step_by(LANES) {
                let mut s: [__m512; LANES] = std::array::from_fn(|l| match order {
                    DotOrder::Gemm => at(l, i),
                    DotOrder::VecDot => _mm512_add_ps(
                        _mm512_add_ps(at(l, i), at(2 * LANES + l, i)),
                        _mm512_add_ps(at(LANES + l, i), at(3 * LANES + l, i)),
                    ),
                });
                for half in [8, 4] {
                    for l in 0..half {
                        s[l] = _mm512_add_ps(s[half + l], s[l]);
                    }
                }
                let sum = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
                _mm512_storeu_ps(out.as_mut_ptr().add(i), sum);
            }
        }
    }
}
