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

use super::{DotOrder, LANES, LN2_HI, LN2_LO, LOG2_E, POLY, SHIFT, VEC_DOT_VECTORS};

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

/// One value rounded to f16 and back.
#[inline(always)]
unsafe fn round_f16_one(x: f32) -> f32 {
    unsafe {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
        _mm_cvtss_f32(_mm_cvtph_ps(h))
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

/// The query's dot product with one key, times `scale`, in `order`.
#[inline(always)]
unsafe fn score(order: DotOrder, key: &[f16], q16: &[f32], scale: f32) -> f32 {
    debug_assert_eq!(key.len(), q16.len());
    let (k, q) = (key.as_ptr(), q16.as_ptr());
    unsafe {
        let sum = match order {
            DotOrder::Gemm => {
                let mut acc = _mm512_setzero_ps();
                for i in (0..key.len()).step_by(LANES) {
                    acc = _mm512_fmadd_ps(load_f16(k.add(i)), _mm512_loadu_ps(q.add(i)), acc);
                }
                reduce_lanes(acc)
            }
            DotOrder::VecDot => {
                let mut v = [_mm512_setzero_ps(); VEC_DOT_VECTORS];
                for i in (0..key.len()).step_by(LANES * VEC_DOT_VECTORS) {
                    for (j, v) in v.iter_mut().enumerate() {
                        let e = i + j * LANES;
                        *v = _mm512_fmadd_ps(load_f16(k.add(e)), _mm512_loadu_ps(q.add(e)), *v);
                    }
                }
                reduce_lanes(_mm512_add_ps(
                    _mm512_add_ps(v[0], v[2]),
                    _mm512_add_ps(v[1], v[3]),
                ))
            }
        };
        sum * scale
    }
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

/// Dimensions of the values one pass of [`accumulate`] carries: four
/// registers per accumulator.
const BLOCK: usize = 4 * LANES;

/// Accumulators `j·16 + lane` for `j < R` over dimensions `block..block +
/// 64`: accumulator `a` takes `p_t·v_t` for `t = a, a + stride, …` in that
/// order, `p_t` the weight rounded to f16, as the portable version does.
#[inline(always)]
unsafe fn accumulate<'c, const R: usize>(
    cached: &impl Fn(usize) -> (&'c [f16], &'c [f16]),
    weights: &[f32],
    block: usize,
    lane: usize,
    stride: usize,
) -> [[__m512; 4]; R] {
    // SAFETY: the caller has AVX-512 F.
    let mut acc = [[unsafe { _mm512_setzero_ps() }; 4]; R];
    for (j, acc) in acc.iter_mut().enumerate() {
        for t in (j * LANES + lane..weights.len()).step_by(stride) {
            let value = cached(t).1;
            assert!(value.len() >= block + BLOCK, "value length");
            // SAFETY: the block is within the value, checked above.
            unsafe {
                let p = _mm512_set1_ps(round_f16_one(weights[t]));
                for (k, acc) in acc.iter_mut().enumerate() {
                    let v = load_f16(value.as_ptr().add(block + k * LANES));
                    *acc = _mm512_fmadd_ps(p, v, *acc);
                }
            }
        }
    }
    acc
}

/// [`super::attend_portable`] with the same preconditions, plus [`fits`].
///
/// # Safety
///
/// Requires what [`fits`] checks.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn attend<'c>(
    order: DotOrder,
    q: &[f32],
    cached: impl Fn(usize) -> (&'c [f16], &'c [f16]),
    scale: f32,
    scores: &mut [f32],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let accumulators = order.accumulators();
    let (q16, lanes) = scratch[..(accumulators + 1) * hd].split_at_mut(hd);
    assert_eq!(out.len(), hd, "one output per query value");
    unsafe {
        for (r, q) in q16.chunks_exact_mut(LANES).zip(q.chunks_exact(LANES)) {
            _mm512_storeu_ps(r.as_mut_ptr(), round_f16(_mm512_loadu_ps(q.as_ptr())));
        }
        for (t, s) in scores.iter_mut().enumerate() {
            let key = cached(t).0;
            assert_eq!(key.len(), hd, "key length");
            *s = score(order, key, q16, scale);
        }
        softmax(scores);
        // The weighted values, BLOCK dimensions at a time: the portable
        // version's accumulators `j·16 + l` for one lane `l` live in
        // registers while their positions (every 16th or 64th) are added in
        // order, and leave them as that lane's partial sum, combined as the
        // portable version combines them; the 16 lanes' sums then go
        // through its tree.
        let lane_sums = lanes;
        for block in (0..hd).step_by(BLOCK) {
            for l in 0..LANES {
                let sum = match order {
                    DotOrder::Gemm => {
                        let [a] = accumulate::<1>(&cached, scores, block, l, LANES);
                        a
                    }
                    DotOrder::VecDot => {
                        let [a0, a1, a2, a3] = accumulate::<VEC_DOT_VECTORS>(
                            &cached,
                            scores,
                            block,
                            l,
                            LANES * VEC_DOT_VECTORS,
                        );
                        std::array::from_fn(|k| {
                            _mm512_add_ps(_mm512_add_ps(a0[k], a2[k]), _mm512_add_ps(a1[k], a3[k]))
                        })
                    }
                };
                for (k, v) in sum.iter().enumerate() {
                    _mm512_storeu_ps(lane_sums.as_mut_ptr().add(l * hd + block + k * LANES), *v);
                }
            }
        }
        // Output values 16 at a time, through the lane tree:
        // eight[l] = s[8 + l] + s[l], four[l] = eight[4 + l] + eight[l],
        // then (four[0] + four[2]) + (four[1] + four[3]).
        for i in (0..hd).step_by(LANES) {
            let mut s: [__m512; LANES] =
                std::array::from_fn(|l| _mm512_loadu_ps(lane_sums.as_ptr().add(l * hd + i)));
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
