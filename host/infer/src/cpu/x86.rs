//! AVX2 block dot products, the same arithmetic as the portable kernels
//! with ggml's instruction choices: unpack 32 nibbles into one register,
//! `maddubs` unsigned×signed bytes into 16-bit pairs, `madd` those into
//! 32-bit lanes, convert and fuse-multiply-add with the block's scales.
//! F16 rows convert 8 weights at a time with F16C and fuse-multiply-add
//! them with the f32 input.
//!
//! Every function requires AVX2, FMA and F16C; [`available`] says whether
//! the running CPU has them.

use std::arch::x86_64::*;

use crate::quant::{GgmlType, Q8Vector, QK};

/// Whether this CPU can run the kernels in this module.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Asks the CPU to start loading `bytes` into cache.
#[inline]
pub fn prefetch(bytes: &[u8]) {
    for line in bytes.chunks(64) {
        // SAFETY: prefetching has no architectural effect, and the pointer
        // is in bounds.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
}

#[inline(always)]
pub(super) unsafe fn f16(bytes: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))) }
}

/// 16 bytes of nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline(always)]
pub(super) unsafe fn nibbles(qs: &[u8]) -> __m256i {
    debug_assert!(qs.len() >= 16);
    unsafe {
        let packed = _mm_loadu_si128(qs.as_ptr().cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }
}

/// Σ over 32 pairs of unsigned × signed bytes, as 8 float lanes.
#[inline(always)]
unsafe fn sum_u8_i8(x: __m256i, y: __m256i) -> __m256 {
    unsafe {
        let pairs = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// Σ over 32 pairs of signed × signed bytes, as 8 float lanes.
#[inline(always)]
unsafe fn sum_i8_i8(x: __m256i, y: __m256i) -> __m256 {
    unsafe {
        // maddubs wants its first operand unsigned: move x's sign onto y.
        sum_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }
}

#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Q4_1 row · Q8_1 input.
///
/// # Safety
///
/// Requires AVX2, FMA and F16C; `row` must hold `x.len() / 32` Q4_1 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1(row: &[u8], x: &Q8Vector) -> f32 {
    let bb = GgmlType::Q4_1.block_bytes();
    debug_assert_eq!(row.len() / bb * QK, x.len());
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0.0f32;
        for (b, (block, xq)) in row.chunks_exact(bb).zip(x.qs.chunks_exact(QK)).enumerate() {
            let d = _mm256_set1_ps(f16(block, 0) * x.d[b]);
            mins += f16(block, 2) * x.s[b];
            let y = _mm256_loadu_si256(xq.as_ptr().cast());
            acc = _mm256_fmadd_ps(d, sum_u8_i8(nibbles(&block[4..]), y), acc);
        }
        hsum(acc) + mins
    }
}

/// One Q4_1 row against `N` Q8_1 inputs at once: each block is unpacked
/// once for all of them. Each result is computed exactly as [`dot_q4_1`]
/// computes it, so batching does not change a sequence's numbers.
///
/// # Safety
///
/// Requires AVX2, FMA and F16C; `row` must hold `x.len() / 32` Q4_1 blocks
/// for every input `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1_many<const N: usize>(row: &[u8], xs: [&Q8Vector; N]) -> [f32; N] {
    let bb = GgmlType::Q4_1.block_bytes();
    unsafe {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut mins = [0.0f32; N];
        for (b, block) in row.chunks_exact(bb).enumerate() {
            let dw = f16(block, 0);
            let mw = f16(block, 2);
            let w = nibbles(&block[4..]);
            for ((acc, mins), x) in acc.iter_mut().zip(mins.iter_mut()).zip(xs) {
                debug_assert_eq!(row.len() / bb * QK, x.len());
                let d = _mm256_set1_ps(dw * x.d[b]);
                *mins += mw * x.s[b];
                let y = _mm256_loadu_si256(x.qs[b * QK..(b + 1) * QK].as_ptr().cast());
                *acc = _mm256_fmadd_ps(d, sum_u8_i8(w, y), *acc);
            }
        }
        let mut out = [0.0; N];
        for ((o, acc), mins) in out.iter_mut().zip(acc).zip(mins) {
            *o = hsum(acc) + mins;
        }
        out
    }
}

/// Q4_0 row · Q8_0 input.
///
/// # Safety
///
/// Requires AVX2, FMA and F16C; `row` must hold `x.len() / 32` Q4_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0(row: &[u8], x: &Q8Vector) -> f32 {
    let bb = GgmlType::Q4_0.block_bytes();
    debug_assert_eq!(row.len() / bb * QK, x.len());
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (b, (block, xq)) in row.chunks_exact(bb).zip(x.qs.chunks_exact(QK)).enumerate() {
            let d = _mm256_set1_ps(f16(block, 0) * x.d[b]);
            let w = _mm256_sub_epi8(nibbles(&block[2..]), _mm256_set1_epi8(8));
            let y = _mm256_loadu_si256(xq.as_ptr().cast());
            acc = _mm256_fmadd_ps(d, sum_i8_i8(w, y), acc);
        }
        hsum(acc)
    }
}

/// Q8_0 row · Q8_0 input.
///
/// # Safety
///
/// Requires AVX2, FMA and F16C; `row` must hold `x.len() / 32` Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0(row: &[u8], x: &Q8Vector) -> f32 {
    let bb = GgmlType::Q8_0.block_bytes();
    debug_assert_eq!(row.len() / bb * QK, x.len());
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (b, (block, xq)) in row.chunks_exact(bb).zip(x.qs.chunks_exact(QK)).enumerate() {
            let d = _mm256_set1_ps(f16(block, 0) * x.d[b]);
            let w = _mm256_loadu_si256(block[2..2 + QK].as_ptr().cast());
            let y = _mm256_loadu_si256(xq.as_ptr().cast());
            acc = _mm256_fmadd_ps(d, sum_i8_i8(w, y), acc);
        }
        hsum(acc)
    }
}

/// One Q8_0 row against up to four Q8_0 inputs: the row is loaded (and its
/// sign split off) once per block for all of them. Each result is
/// bit-identical to [`dot_q8_0`]'s.
///
/// # Safety
///
/// Requires AVX2, FMA and F16C; `row` must hold `x.len() / 32` Q8_0 blocks
/// for every input `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0_many<const N: usize>(row: &[u8], xs: [&Q8Vector; N]) -> [f32; N] {
    let bb = GgmlType::Q8_0.block_bytes();
    unsafe {
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, block) in row.chunks_exact(bb).enumerate() {
            let dw = f16(block, 0);
            let w = _mm256_loadu_si256(block[2..2 + QK].as_ptr().cast());
            let w_abs = _mm256_sign_epi8(w, w);
            for (acc, x) in acc.iter_mut().zip(xs) {
                debug_assert_eq!(row.len() / bb * QK, x.len());
                let d = _mm256_set1_ps(dw * x.d[b]);
                let y = _mm256_loadu_si256(x.qs[b * QK..(b + 1) * QK].as_ptr().cast());
                *acc = _mm256_fmadd_ps(d, sum_u8_i8(w_abs, _mm256_sign_epi8(y, w)), *acc);
            }
        }
        acc.map(|a| hsum(a))
    }
}

/// Elements of an F16 row taken per step: two registers of 8.
const F16_STEP: usize = 16;

/// Eight f16 weights from `row` at element `i`, as floats.
#[inline(always)]
unsafe fn f16x8(row: &[u8], i: usize) -> __m256 {
    debug_assert!(2 * (i + 8) <= row.len());
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * i).cast())) }
}

/// F16 row · f32 input: F16C converts 8 weights at a time, and two FMA
/// accumulators take alternate groups of 8; the tail past a multiple of 16
/// is summed in order after them.
///
/// # Panics
///
/// If `row` does not hold `x.len()` f16 values.
///
/// # Safety
///
/// Requires AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_f16_many(row, [x])[0] }
}

/// One F16 row against `N` f32 inputs at once: each group of weights is
/// converted once for all of them. Each result is computed exactly as
/// [`dot_f16`] computes it, so batching does not change a sequence's
/// numbers.
///
/// # Panics
///
/// If `row` does not hold `x.len()` f16 values for every input `x`.
///
/// # Safety
///
/// Requires AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_many<const N: usize>(row: &[u8], xs: [&[f32]; N]) -> [f32; N] {
    let n = row.len() / 2;
    for x in xs {
        assert!(row.len() == 2 * x.len(), "f16 row length");
    }
    let main = n / F16_STEP * F16_STEP;
    unsafe {
        let mut acc0 = [_mm256_setzero_ps(); N];
        let mut acc1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i < main {
            let w0 = f16x8(row, i);
            let w1 = f16x8(row, i + 8);
            for ((a0, a1), x) in acc0.iter_mut().zip(acc1.iter_mut()).zip(xs) {
                let p = x.as_ptr().add(i);
                *a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p), *a0);
                *a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.add(8)), *a1);
            }
            i += F16_STEP;
        }
        let mut out = [0.0; N];
        for (((o, a0), a1), x) in out.iter_mut().zip(acc0).zip(acc1).zip(xs) {
            let mut sum = hsum(_mm256_add_ps(a0, a1));
            for (j, &v) in x.iter().enumerate().skip(main) {
                sum += f16(row, 2 * j) * v;
            }
            *o = sum;
        }
        out
    }
}
