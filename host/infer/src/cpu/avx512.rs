//! AVX-512 VNNI kernels for one quantized row against a batch of inputs,
//! the hot loop of batched decode and of prefill.
//!
//! Why they exist beside [`super::x86`]: with a batch, each weight block is
//! unpacked once, and what is left per input is integer multiply-adds and
//! the block's scaling. Here two inputs share one 512-bit register: the
//! unpacked block is broadcast to both halves, the pair's quantized values
//! sit side by side, and one `vpdpbusd` sums, in each 32-bit lane, the same
//! four byte products AVX2's `maddubs` + `madd` sum. Integer sums are exact,
//! so they agree; each half's eight float lanes are then scaled,
//! accumulated and reduced in the order of the single-input kernels. Every
//! output is therefore bit for bit what [`super::x86::dot_q4_1`] or
//! [`super::x86::dot_q8_0`] computes for that input alone, and a sequence's
//! tokens do not depend on what it was batched with.
//!
//! Signed weights (Q8_0) go through `vpdpbusd`'s unsigned operand as
//! `w + 128`; the input's pre-summed `-128·Σx` per lane starts the sum and
//! takes the offset back out.
//!
//! Every kernel requires AVX-512 F, BW and VNNI, FMA and F16C;
//! [`available`] says whether the running CPU has them.

use std::arch::x86_64::*;

use super::x86::{f16, hsum, nibbles};
use crate::quant::{GgmlType, Q8Vector, QK};

/// Inputs a kernel pass carries at once: one accumulator register per pair
/// of them, eight registers in all, leaves room for the block's operands.
const GROUP: usize = 16;

/// Pairs of inputs in a full group.
const GROUP_PAIRS: usize = GROUP / 2;

/// Bytes of one pair's quantized values for one block.
const PAIR_BYTES: usize = 2 * QK;

/// Integer lanes per input and block: four byte products each.
const LANES: usize = QK / 4;

/// Rounding to nearest, ties to even, without raising exceptions.
const ROUND_TO_NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// Whether this CPU can run the kernels in this module.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// A batch of quantized inputs laid out for the kernels: interleaved by
/// pairs, block by block, so that a kernel reads one block of every input
/// from one place. Reused from product to product to keep its allocations.
#[derive(Debug, Default)]
pub struct PackedInputs {
    inputs: usize,
    blocks: usize,
    pairs: usize,
    groups: usize,
    /// `[block][pair][input of the pair][32]` quantized values; a lone last
    /// input's partner is zeros.
    qs: Vec<i8>,
    /// `[block][pair][input of the pair][8]`: `-128 ×` the sum of each
    /// lane's four values, for signed weights.
    offsets: Vec<i32>,
    /// `[block][group][16]` input scales.
    d: Vec<f32>,
    /// `[block][group][16]` `d·Σq`, Q8_1's second scale.
    s: Vec<f32>,
}

impl PackedInputs {
    /// Lays out `xs` (all of one length) for the kernels.
    ///
    /// # Panics
    ///
    /// If the inputs differ in length.
    pub fn pack(&mut self, xs: &[&Q8Vector]) {
        let blocks = xs.first().map_or(0, |x| x.len() / QK);
        assert!(
            xs.iter().all(|x| x.len() == blocks * QK),
            "inputs of one length"
        );
        self.inputs = xs.len();
        self.blocks = blocks;
        self.pairs = xs.len().div_ceil(2);
        self.groups = self.pairs.div_ceil(GROUP_PAIRS);
        refill(&mut self.qs, blocks * self.pairs * PAIR_BYTES, 0);
        refill(&mut self.offsets, blocks * self.pairs * 2 * LANES, 0);
        refill(&mut self.d, blocks * self.groups * GROUP, 0.0);
        refill(&mut self.s, blocks * self.groups * GROUP, 0.0);
        for (i, x) in xs.iter().enumerate() {
            let (pair, half) = (i / 2, i % 2);
            let (group, slot) = (i / GROUP, i % GROUP);
            for (b, q) in x.qs.chunks_exact(QK).enumerate() {
                let at = (b * self.pairs + pair) * PAIR_BYTES + half * QK;
                self.qs[at..at + QK].copy_from_slice(q);
                let at = (b * self.pairs + pair) * 2 * LANES + half * LANES;
                for (o, four) in self.offsets[at..at + LANES]
                    .iter_mut()
                    .zip(q.chunks_exact(4))
                {
                    *o = -128 * four.iter().map(|&v| i32::from(v)).sum::<i32>();
                }
                let at = (b * self.groups + group) * GROUP + slot;
                self.d[at] = x.d[b];
                self.s[at] = x.s[b];
            }
        }
    }
}

/// `x` quantized into `q` exactly as [`Q8Vector::quantize`] does it, a
/// block of 32 values in two registers: every step there (the maximum, the
/// reciprocal, rounding to nearest with ties to even, the sums and the f16
/// scales) is exact or the same single rounding here.
///
/// # Panics
///
/// If `x.len()` is not a multiple of 32.
///
/// # Safety
///
/// Requires the CPU features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn quantize(x: &[f32], q: &mut Q8Vector) {
    assert!(x.len().is_multiple_of(QK), "length must be whole blocks");
    let blocks = x.len() / QK;
    q.qs.resize(x.len(), 0);
    q.d.resize(blocks, 0.0);
    q.s.resize(blocks, 0.0);
    for (b, (xs, qs)) in x
        .chunks_exact(QK)
        .zip(q.qs.chunks_exact_mut(QK))
        .enumerate()
    {
        // SAFETY: each block is 32 values (two registers) and 32 bytes.
        unsafe {
            let lo = _mm512_loadu_ps(xs.as_ptr());
            let hi = _mm512_loadu_ps(xs.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let qlo = _mm512_cvt_roundps_epi32::<ROUND_TO_NEAREST>(_mm512_mul_ps(lo, id));
            let qhi = _mm512_cvt_roundps_epi32::<ROUND_TO_NEAREST>(_mm512_mul_ps(hi, id));
            _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qlo));
            _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qhi));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
            q.d[b] = half::f16::from_f32(d).to_f32();
            q.s[b] = half::f16::from_f32(sum as f32 * d).to_f32();
        }
    }
}

/// `v` cleared and resized to `len` copies of `value`.
fn refill<T: Copy>(v: &mut Vec<T>, len: usize, value: T) {
    v.clear();
    v.resize(len, value);
}

/// Calls `$f::<P>` for the number of pairs `$pairs` (1 to 8), so that each
/// group's accumulators are a fixed set of registers.
macro_rules! by_pairs {
    ($pairs:expr, $f:ident($($arg:expr),*)) => {
        match $pairs {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<8>($($arg),*),
        }
    };
}

/// `out[i]` = a Q4_1 row · input `i` of `x`, each exactly as
/// [`super::x86::dot_q4_1`] computes it.
///
/// # Panics
///
/// If `row` is not `x`'s length in Q4_1 blocks or `out` not one value per
/// input.
///
/// # Safety
///
/// Requires the CPU features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4_1_row(row: &[u8], x: &PackedInputs, out: &mut [f32]) {
    assert_eq!(
        row.len(),
        x.blocks * GgmlType::Q4_1.block_bytes(),
        "row length"
    );
    assert_eq!(out.len(), x.inputs, "one output per input");
    for (g, out) in out.chunks_mut(GROUP).enumerate() {
        // SAFETY: the CPU features are the caller's; the lengths were
        // checked above.
        unsafe { by_pairs!(out.len().div_ceil(2), q4_1_group(row, x, g, out)) }
    }
}

/// `out[i]` = a Q8_0 row · input `i` of `x`, each exactly as
/// [`super::x86::dot_q8_0`] computes it.
///
/// # Panics
///
/// If `row` is not `x`'s length in Q8_0 blocks or `out` not one value per
/// input.
///
/// # Safety
///
/// Requires the CPU features [`available`] checks.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q8_0_row(row: &[u8], x: &PackedInputs, out: &mut [f32]) {
    assert_eq!(
        row.len(),
        x.blocks * GgmlType::Q8_0.block_bytes(),
        "row length"
    );
    assert_eq!(out.len(), x.inputs, "one output per input");
    for (g, out) in out.chunks_mut(GROUP).enumerate() {
        // SAFETY: as in q4_1_row.
        unsafe { by_pairs!(out.len().div_ceil(2), q8_0_group(row, x, g, out)) }
    }
}

/// For pair `p` of a group: lanes 0–7 pick the first input's value of a
/// group's 16, lanes 8–15 the second's.
#[inline(always)]
unsafe fn pair_lanes(p: usize) -> __m512i {
    let lanes: [i32; 16] = std::array::from_fn(|l| (2 * p + l / 8) as i32);
    // SAFETY: reads 64 bytes of a 64-byte array.
    unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
}

/// Group `g` of `x` (`P` pairs, `out.len()` inputs) against a Q4_1 row.
#[inline(always)]
unsafe fn q4_1_group<const P: usize>(row: &[u8], x: &PackedInputs, g: usize, out: &mut [f32]) {
    let bb = GgmlType::Q4_1.block_bytes();
    unsafe {
        let lanes: [__m512i; P] = std::array::from_fn(|p| pair_lanes(p));
        let mut acc = [_mm512_setzero_ps(); P];
        let mut mins = _mm512_setzero_ps();
        for (b, block) in row.chunks_exact(bb).enumerate() {
            let w = _mm512_broadcast_i64x4(nibbles(&block[4..]));
            let scales = (b * x.groups + g) * GROUP;
            let d = _mm512_mul_ps(
                _mm512_set1_ps(f16(block, 0)),
                _mm512_loadu_ps(x.d.as_ptr().add(scales)),
            );
            let m = _mm512_mul_ps(
                _mm512_set1_ps(f16(block, 2)),
                _mm512_loadu_ps(x.s.as_ptr().add(scales)),
            );
            mins = _mm512_add_ps(mins, m);
            let qs =
                x.qs.as_ptr()
                    .add((b * x.pairs + g * GROUP_PAIRS) * PAIR_BYTES);
            for (p, (acc, lanes)) in acc.iter_mut().zip(&lanes).enumerate() {
                let y = _mm512_loadu_si512(qs.add(p * PAIR_BYTES).cast());
                let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, y);
                let d = _mm512_permutexvar_ps(*lanes, d);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), *acc);
            }
        }
        let mut m = [0.0f32; GROUP];
        _mm512_storeu_ps(m.as_mut_ptr(), mins);
        reduce_pairs(&acc, &m, out);
    }
}

/// Group `g` of `x` (`P` pairs, `out.len()` inputs) against a Q8_0 row.
#[inline(always)]
unsafe fn q8_0_group<const P: usize>(row: &[u8], x: &PackedInputs, g: usize, out: &mut [f32]) {
    let bb = GgmlType::Q8_0.block_bytes();
    unsafe {
        let lanes: [__m512i; P] = std::array::from_fn(|p| pair_lanes(p));
        let mut acc = [_mm512_setzero_ps(); P];
        for (b, block) in row.chunks_exact(bb).enumerate() {
            let signed = _mm256_loadu_si256(block[2..2 + QK].as_ptr().cast());
            let unsigned = _mm256_xor_si256(signed, _mm256_set1_epi8(i8::MIN));
            let w = _mm512_broadcast_i64x4(unsigned);
            let scales = (b * x.groups + g) * GROUP;
            let d = _mm512_mul_ps(
                _mm512_set1_ps(f16(block, 0)),
                _mm512_loadu_ps(x.d.as_ptr().add(scales)),
            );
            let pair0 = b * x.pairs + g * GROUP_PAIRS;
            let qs = x.qs.as_ptr().add(pair0 * PAIR_BYTES);
            let offsets = x.offsets.as_ptr().add(pair0 * 2 * LANES);
            for (p, (acc, lanes)) in acc.iter_mut().zip(&lanes).enumerate() {
                let y = _mm512_loadu_si512(qs.add(p * PAIR_BYTES).cast());
                let start = _mm512_loadu_si512(offsets.add(p * 2 * LANES).cast());
                let sum = _mm512_dpbusd_epi32(start, w, y);
                let d = _mm512_permutexvar_ps(*lanes, d);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), *acc);
            }
        }
        reduce_pairs(&acc, &[0.0; GROUP], out);
    }
}

/// Each half of each pair's accumulator reduced as the single-input
/// kernels reduce theirs, plus that input's `tail` (Q4_1's minimums).
#[inline(always)]
unsafe fn reduce_pairs<const P: usize>(acc: &[__m512; P], tail: &[f32; GROUP], out: &mut [f32]) {
    for (p, acc) in acc.iter().enumerate() {
        unsafe {
            let first = _mm512_castps512_ps256(*acc);
            let second = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*acc)));
            out[2 * p] = hsum(first) + tail[2 * p];
            if let Some(o) = out.get_mut(2 * p + 1) {
                *o = hsum(second) + tail[2 * p + 1];
            }
        }
    }
}
