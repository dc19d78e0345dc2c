//! Attention and activation arithmetic in the exact order llama.cpp's CPU
//! backend (ggml, as built for an AVX-512 x86-64 CPU) evaluates it.
//!
//! Why copy an evaluation order rather than compute as accurately as we
//! can: llama.cpp is this runtime's reference, and small quantized models
//! such as the demo model turn a difference of one ulp into a different
//! greedy answer a few layers later, because every matrix product rounds
//! its input to 8 bits and one value rounded the other way moves the output
//! by half a quantization step. With the same order, our logits are bit
//! for bit llama.cpp's.
//!
//! What that order is, established by comparing every intermediate tensor
//! of a llama.cpp forward pass (read through its `cb_eval` callback) with
//! ours, operation by operation:
//! - keys, values, queries and attention weights are rounded to f16 before
//!   the two attention products (llama.cpp keeps an f16 KV cache and its
//!   matrix kernels convert the other operand to the cache's type);
//! - those dot products run in f32 lanes of fused multiply-adds, in one of
//!   two orders ([`DotOrder`]): a query row of a prompt chunk goes through
//!   llamafile's GEMM (16 lanes), a lone decoding token through ggml's dot
//!   product (4 × 16 lanes over strides of 64, then a tree);
//! - `exp` is ggml's polynomial (not the C library's), in softmax and SiLU;
//!   softmax sums each block of 16 as that tree, the blocks in f64.
//!
//! Every function here is plain scalar Rust; with FMA the compiler keeps the
//! fused multiply-adds in registers ([`attend`] and [`swiglu`] pick that
//! build at run time), without it `mul_add` computes the same values more
//! slowly.

use half::f16;
use half::slice::HalfFloatSliceExt;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Lanes of ggml's AVX-512 vectors of f32.
const LANES: usize = 16;

/// Vectors ggml's dot product keeps in flight, each of [`LANES`].
const VEC_DOT_VECTORS: usize = 4;

/// Which of ggml's kernels a row of attention goes through; they sum in
/// different orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotOrder {
    /// A batch of query rows (a prompt chunk): llamafile's tiled GEMM, lane
    /// `i` of 16 taking every element `≡ i (mod 16)` in order.
    Gemm,
    /// One query row (a decoding token): `ggml_vec_dot_f16`, element `e` in
    /// lane `e mod 16` of vector `(e / 16) mod 4`; the vectors are added
    /// `(0 + 2) + (1 + 3)`, then the lanes reduced, and elements past the
    /// last whole stride of 64 are added in f64.
    VecDot,
}

impl DotOrder {
    /// Accumulators per output value.
    fn accumulators(self) -> usize {
        match self {
            Self::Gemm => LANES,
            Self::VecDot => LANES * VEC_DOT_VECTORS,
        }
    }
}

/// `f32::from_bits` of ggml's exp constants, written in hex floats there:
/// the rounding shift `0x1.8p23`, `log2(e)`, `ln 2` split in a high and a
/// low part, and the polynomial's coefficients, highest degree first.
const SHIFT: u32 = 0x4b40_0000;
const LOG2_E: u32 = 0x3fb8_aa3b;
const LN2_HI: u32 = 0x3f31_7200;
const LN2_LO: u32 = 0x35bf_be8e;
const POLY: [u32; 5] = [
    0x3c07_2010,
    0x3d2b_9f17,
    0x3e2a_af33,
    0x3eff_fedb,
    0x3f7f_fff6,
];

/// `e^x` as ggml's vectorized exp computes it: `x = n·ln2 + b` with `n`
/// integral, a degree-5 polynomial in `b`, scaled by `2^n`. Within about 2 ulp
/// of the true value; 0 below about -104, infinite above about 88.4.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let k = |bits: u32| f32::from_bits(bits);
    let shift = k(SHIFT);
    let z = x.mul_add(k(LOG2_E), shift);
    let n = z - shift;
    let b = (-n).mul_add(k(LN2_LO), (-n).mul_add(k(LN2_HI), x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let [c0, c1, c2, c3, c4] = POLY.map(k);
    let j = c0
        .mul_add(b, c1)
        .mul_add(u, c2.mul_add(b, c3))
        .mul_add(u, c4.mul_add(b, 1.0));
    scale_by_power_of_two(j, n)
}

/// `j · 2^n` rounded once, as `vscalefps` does. `n` is integral and within
/// ±192, so `2^n` and the product are exact in f64 and only the conversion
/// rounds (to a subnormal, if it must).
#[inline(always)]
fn scale_by_power_of_two(j: f32, n: f32) -> f32 {
    let power = f64::from_bits(((1023 + n as i64) as u64) << 52);
    (f64::from(j) * power) as f32
}

/// `x / (1 + e^-x)`, ggml's SiLU.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + expf(-x))
}

/// The sum of 16 lanes in the order of `_mm512_reduce_add_ps`.
#[inline(always)]
fn reduce_lanes(v: &[f32; LANES]) -> f32 {
    let mut eight = [0.0f32; 8];
    for (i, e) in eight.iter_mut().enumerate() {
        *e = v[8 + i] + v[i];
    }
    let four = [
        eight[4] + eight[0],
        eight[5] + eight[1],
        eight[6] + eight[2],
        eight[7] + eight[3],
    ];
    (four[0] + four[2]) + (four[1] + four[3])
}

/// ggml's four dot-product vectors added `(0 + 2) + (1 + 3)`, then reduced.
#[inline(always)]
fn reduce_vec_dot(v: &[[f32; LANES]; VEC_DOT_VECTORS]) -> f32 {
    let sum: [f32; LANES] = std::array::from_fn(|i| (v[0][i] + v[2][i]) + (v[1][i] + v[3][i]));
    reduce_lanes(&sum)
}

/// `Σ a·b` in `order`. (The widths here are head sizes, multiples of 16;
/// elements past the last whole 16 are added one by one after.)
#[inline(always)]
fn dot(order: DotOrder, a: &[f32], b: &[f32]) -> f32 {
    match order {
        DotOrder::Gemm => {
            let mut lanes = [0.0f32; LANES];
            let whole = a.len() / LANES * LANES;
            for (a, b) in a[..whole]
                .chunks_exact(LANES)
                .zip(b[..whole].chunks_exact(LANES))
            {
                for i in 0..LANES {
                    lanes[i] = a[i].mul_add(b[i], lanes[i]);
                }
            }
            let mut sum = reduce_lanes(&lanes);
            for (a, b) in a[whole..].iter().zip(&b[whole..]) {
                sum = a.mul_add(*b, sum);
            }
            sum
        }
        DotOrder::VecDot => {
            let stride = LANES * VEC_DOT_VECTORS;
            let mut vectors = [[0.0f32; LANES]; VEC_DOT_VECTORS];
            let whole = a.len() / stride * stride;
            for (a, b) in a[..whole]
                .chunks_exact(stride)
                .zip(b[..whole].chunks_exact(stride))
            {
                for (j, vector) in vectors.iter_mut().enumerate() {
                    for (i, lane) in vector.iter_mut().enumerate() {
                        let e = j * LANES + i;
                        *lane = a[e].mul_add(b[e], *lane);
                    }
                }
            }
            let mut sum = f64::from(reduce_vec_dot(&vectors));
            for (a, b) in a[whole..].iter().zip(&b[whole..]) {
                sum += f64::from(a * b);
            }
            sum as f32
        }
    }
}

/// `x` rounded to the nearest f16 (ties to even, as F16C rounds).
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// In-place softmax of `x`: ggml's exp, each block of 16 summed as a tree,
/// the blocks in f64, then one multiplication by the f32 reciprocal.
#[inline(always)]
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for block in x.chunks_mut(LANES) {
        let mut lanes = [0.0f32; LANES];
        for (lane, v) in lanes.iter_mut().zip(block.iter_mut()) {
            *v = expf(*v - max);
            *lane = *v;
        }
        sum += f64::from(reduce_lanes(&lanes));
    }
    let scale = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= scale;
    }
}

/// Scratch values [`attend`] needs for a head of `head_dim` values.
pub fn attend_scratch_len(head_dim: usize) -> usize {
    (DotOrder::VecDot.accumulators() + 2) * head_dim
}

/// One attention head over `scores.len()` positions:
/// `out = softmax(scale · q·K) · V`, where `cached(t)` gives the key and the
/// value of position `t` (in f16, as ggml's cache keeps them).
///
/// `scratch` holds at least [`attend_scratch_len`] values.
///
/// # Panics
///
/// If `scratch` is too short or a key or value is not `q.len()` long.
pub fn attend<'c>(
    order: DotOrder,
    q: &[f32],
    cached: impl Fn(usize) -> (&'c [f16], &'c [f16]),
    scale: f32,
    scores: &mut [f32],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx512::fits(q.len()) {
        // SAFETY: fits checked the CPU's features.
        unsafe { avx512::attend(order, q, cached, scale, scores, scratch, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA, detected just above.
        unsafe { attend_fma(order, q, cached, scale, scores, scratch, out) };
        return;
    }
    attend_portable(order, q, cached, scale, scores, scratch, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn attend_fma<'c>(
    order: DotOrder,
    q: &[f32],
    cached: impl Fn(usize) -> (&'c [f16], &'c [f16]),
    scale: f32,
    scores: &mut [f32],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    attend_portable(order, q, cached, scale, scores, scratch, out);
}

#[inline(always)]
fn attend_portable<'c>(
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
    let (q16, rest) = scratch[..(accumulators + 2) * hd].split_at_mut(hd);
    let (row, lanes) = rest.split_at_mut(hd);
    for (r, &v) in q16.iter_mut().zip(q) {
        *r = round_f16(v);
    }
    for (t, s) in scores.iter_mut().enumerate() {
        cached(t).0.convert_to_f32_slice(row);
        *s = dot(order, row, q16) * scale;
    }
    softmax(scores);
    // Position t's weighted value joins accumulator t mod (16 or 64) of
    // every output: llama.cpp pads the positions to a multiple of 256 with
    // zero weights, so no position is ever a leftover past the strides.
    lanes.fill(0.0);
    for (t, &p) in scores.iter().enumerate() {
        let p = round_f16(p);
        let a = t % accumulators;
        cached(t).1.convert_to_f32_slice(row);
        for (acc, &v) in lanes[a * hd..(a + 1) * hd].iter_mut().zip(&*row) {
            *acc = p.mul_add(v, *acc);
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        *o = match order {
            DotOrder::Gemm => reduce_lanes(&std::array::from_fn(|l| lanes[l * hd + d])),
            DotOrder::VecDot => reduce_vec_dot(&std::array::from_fn(|j| {
                std::array::from_fn(|l| lanes[(j * LANES + l) * hd + d])
            })),
        };
    }
}

/// SwiGLU, `gate = silu(gate) · up`, with ggml's SiLU.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA, detected just above.
        unsafe { swiglu_fma(gate, up) };
        return;
    }
    swiglu_portable(gate, up);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu_portable(gate, up);
}

#[inline(always)]
fn swiglu_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_about_two_ulp_and_saturates() {
        for i in -2000..=880 {
            let x = i as f32 / 10.0;
            let (got, want) = (expf(x), f64::from(x).exp());
            if want > f64::from(f32::MAX) {
                assert_eq!(got, f32::INFINITY, "{x}");
                continue;
            }
            if want < 1e-38 {
                assert!(f64::from(got) <= 2e-38, "{x}: {got}");
                continue;
            }
            let w = want as f32;
            let ulp = f64::from(f32::from_bits(w.to_bits() + 1)) - f64::from(w);
            assert!(
                (f64::from(got) - want).abs() <= 2.5 * ulp,
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(0.0), 1.0);
    }

    #[test]
    fn lanes_reduce_in_the_tree_order() {
        // Values whose sum depends on the order: a large value cancels
        // against its negative only when they meet before the small ones.
        let mut v = [1e-8f32; LANES];
        v[0] = 1e8;
        v[8] = -1e8;
        assert!((reduce_lanes(&v) - 14e-8).abs() < 1e-14);
        let in_order: f32 = v.iter().sum();
        assert!((in_order - 7e-8).abs() < 1e-14);
    }

    #[test]
    fn attention_matches_a_plain_f64_computation() {
        let hd = 64;
        let positions = 37;
        let value_at =
            |t: usize, d: usize| f16::from_f32(((t * 31 + d * 7) % 19) as f32 / 9.0 - 1.0);
        let keys: Vec<Vec<f16>> = (0..positions)
            .map(|t| (0..hd).map(|d| value_at(t + 3, d)).collect())
            .collect();
        let values: Vec<Vec<f16>> = (0..positions)
            .map(|t| (0..hd).map(|d| value_at(t, d + 5)).collect())
            .collect();
        let q: Vec<f32> = (0..hd).map(|d| (d as f32 / 20.0).sin()).collect();
        let mut scores = vec![0.0; positions];
        let mut scratch = vec![0.0; attend_scratch_len(hd)];
        let mut out = vec![0.0; hd];
        let scale = 0.125;
        attend(
            DotOrder::Gemm,
            &q,
            |t| (&keys[t], &values[t]),
            scale,
            &mut scores,
            &mut scratch,
            &mut out,
        );
        let logits: Vec<f64> = keys
            .iter()
            .map(|k| {
                k.iter()
                    .zip(&q)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    * 0.125
            })
            .collect();
        let max = logits.iter().copied().fold(f64::MIN, f64::max);
        let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        for d in 0..hd {
            let want: f64 = logits
                .iter()
                .zip(&values)
                .map(|(l, v)| (l - max).exp() / total * f64::from(v[d]))
                .sum();
            // f16 rounding of q and of the weights: about 1e-3 relative.
            assert!(
                (f64::from(out[d]) - want).abs() < 2e-3,
                "{d}: {} vs {want}",
                out[d]
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_attention_is_bit_identical_to_the_portable_one() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut ran = false;
        for (hd, positions, q_scale) in [
            (64, 1, 1.0),
            (64, 15, 3.0),
            (64, 17, 1.0),
            (64, 64, 0.5),
            (64, 65, 2.0),
            (64, 200, 1.0),
            (128, 77, 1.0),
            // Scores hundreds apart: exp underflows and saturates to 0.
            (64, 40, 400.0),
        ] {
            let keys: Vec<Vec<f16>> = (0..positions)
                .map(|_| (0..hd).map(|_| f16::from_f32(rand())).collect())
                .collect();
            let values: Vec<Vec<f16>> = (0..positions)
                .map(|_| (0..hd).map(|_| f16::from_f32(rand() * 4.0)).collect())
                .collect();
            let q: Vec<f32> = (0..hd).map(|_| rand() * q_scale).collect();
            for order in [DotOrder::Gemm, DotOrder::VecDot] {
                if !avx512::fits(hd) {
                    continue;
                }
                ran = true;
                let run = |simd: bool| {
                    let mut scores = vec![0.0; positions];
                    let mut scratch = vec![f32::NAN; attend_scratch_len(hd)];
                    let mut out = vec![0.0; hd];
                    let cached = |t: usize| (&keys[t][..], &values[t][..]);
                    if simd {
                        // SAFETY: fits checked the CPU above.
                        unsafe {
                            avx512::attend(
                                order,
                                &q,
                                cached,
                                0.125,
                                &mut scores,
                                &mut scratch,
                                &mut out,
                            )
                        };
                    } else {
                        attend_portable(
                            order,
                            &q,
                            cached,
                            0.125,
                            &mut scores,
                            &mut scratch,
                            &mut out,
                        );
                    }
                    (scores, out)
                };
                let (simd, portable) = (run(true), run(false));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let case = format!("{order:?} head {hd}, {positions} positions, q x{q_scale}");
                assert_eq!(bits(&simd.0), bits(&portable.0), "scores: {case}");
                assert_eq!(bits(&simd.1), bits(&portable.1), "output: {case}");
            }
        }
        if !ran {
            eprintln!("SKIPPED: this CPU lacks AVX-512");
        }
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        let mut gate = [-3.0f32, -0.5, 0.0, 0.7, 4.0, 30.0, -120.0];
        let up = [2.0f32; 7];
        let want: Vec<f64> = gate
            .iter()
            .map(|&g| f64::from(g) / (1.0 + (-f64::from(g)).exp()) * 2.0)
            .collect();
        swiglu(&mut gate, &up);
        for (g, w) in gate.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1e-30),
                "{g} vs {w}"
            );
        }
    }
}
