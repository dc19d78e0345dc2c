//! ggml tensor types and their block layouts, as GGUF files store them.
//!
//! Quantized types group 32 consecutive values of a row into a block with a
//! scale (and for Q4_1 a minimum). The layouts here follow ggml's
//! `block_q4_0`, `block_q4_1` and `block_q8_0`; all fields are little-endian
//! and blocks are packed without padding.
//!
//! Activations are quantized too, to Q8_0 or Q8_1 (Q8_0 plus the scaled sum
//! of its values), so that dot products against quantized weights run in
//! integers, the way ggml's CPU backend computes them.

use half::f16;

/// Values per block for every quantized type here.
pub const QK: usize = 32;

/// A tensor element type, numbered as in ggml's `ggml_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// 4-bit: `x = d * (q - 8)`, 18 bytes per 32 values.
    Q4_0,
    /// 4-bit with minimum: `x = d * q + m`, 20 bytes per 32 values.
    Q4_1,
    /// 8-bit: `x = d * q`, 34 bytes per 32 values.
    Q8_0,
}

impl GgmlType {
    /// The type for ggml's numeric id, or `None` for types this crate does
    /// not read.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            _ => return None,
        })
    }

    /// ggml's numeric id for this type.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    /// Values per block (1 for float types).
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
        }
    }

    /// Bytes taken by `n` values, or `None` when `n` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let block_len = self.block_len() as u64;
        if !n.is_multiple_of(block_len) {
            return None;
        }
        (n / block_len).checked_mul(self.block_bytes() as u64)
    }
}

#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Dequantizes one row stored as `ty` into `out`.
///
/// # Panics
///
/// If `src` does not hold exactly `out.len()` values of type `ty`; callers
/// size both from a validated tensor shape.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let expected = ty.bytes_for(out.len() as u64);
    assert_eq!(expected, Some(src.len() as u64), "row size mismatch");
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(src, 2 * i);
            }
        }
        GgmlType::Q4_0 => {
            for (block, o) in src
                .chunks_exact(ty.block_bytes())
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_at(block, 0);
                let qs = &block[2..];
                for j in 0..QK / 2 {
                    o[j] = d * (f32::from(qs[j] & 0x0f) - 8.0);
                    o[j + QK / 2] = d * (f32::from(qs[j] >> 4) - 8.0);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (block, o) in src
                .chunks_exact(ty.block_bytes())
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_at(block, 0);
                let m = f16_at(block, 2);
                let qs = &block[4..];
                for j in 0..QK / 2 {
                    o[j] = d * f32::from(qs[j] & 0x0f) + m;
                    o[j + QK / 2] = d * f32::from(qs[j] >> 4) + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (block, o) in src
                .chunks_exact(ty.block_bytes())
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_at(block, 0);
                for (o, &q) in o.iter_mut().zip(&block[2..]) {
                    *o = d * f32::from(q as i8);
                }
            }
        }
    }
}

/// Encodes `x` as `ty` with ggml's reference quantizers (used to write test
/// models; real models arrive quantized).
///
/// # Panics
///
/// If `x.len()` is not a whole number of `ty` blocks.
pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(ty.block_len()),
        "length must be whole blocks"
    );
    let f16_bytes = |v: f32| f16::from_f32(v).to_bits().to_le_bytes();
    let mut out = Vec::with_capacity(x.len() / ty.block_len() * ty.block_bytes());
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|&v| out.extend(f16_bytes(v))),
        GgmlType::Q4_0 => {
            for xs in x.chunks_exact(QK) {
                // The value of largest magnitude maps to -8 exactly.
                let max = xs
                    .iter()
                    .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                let q = |v: f32| ((v * id + 8.5) as u8).min(15);
                out.extend((0..QK / 2).map(|j| q(xs[j]) | (q(xs[j + QK / 2]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for xs in x.chunks_exact(QK) {
                let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
                let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(f16_bytes(min));
                let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
                out.extend((0..QK / 2).map(|j| q(xs[j]) | (q(xs[j + QK / 2]) << 4)));
            }
        }
        GgmlType::Q8_0 => {
            for xs in x.chunks_exact(QK) {
                let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(xs.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
    }
    out
}

/// `x` rounded to the nearest integer, ties to even, for |x| < 2^22: adding
/// and taking away 1.5·2^23 leaves no fraction bits, so the addition rounds
/// (in the default rounding mode, to nearest even). It is
/// `f32::round_ties_even`, which without SSE4.1 in the build is a call to
/// the C library's `rintf`; here it is two additions.
#[inline(always)]
fn round_ties_even(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (x + SHIFT) - SHIFT
}

/// A vector quantized to 8 bits in blocks of 32, for integer dot products.
///
/// Holds both ggml's Q8_0 (`d`) and Q8_1 (`d` and `s = d * Σq`) views, so one
/// quantization serves every weight type. Scales are rounded through f16 as
/// ggml stores them, which keeps our results bit-close to llama.cpp's.
#[derive(Debug, Default, Clone)]
pub struct Q8Vector {
    /// Quantized values, `len` of them.
    pub qs: Vec<i8>,
    /// One scale per block.
    pub d: Vec<f32>,
    /// One `d * Σq` per block.
    pub s: Vec<f32>,
}

impl Q8Vector {
    /// Quantizes `x` (whose length must be a multiple of 32) into `self`,
    /// reusing its allocations.
    ///
    /// # Panics
    ///
    /// If `x.len()` is not a multiple of 32.
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(x.len().is_multiple_of(QK), "length must be whole blocks");
        let blocks = x.len() / QK;
        self.qs.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        for (b, (xs, qs)) in x
            .chunks_exact(QK)
            .zip(self.qs.chunks_exact_mut(QK))
            .enumerate()
        {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            // ggml's reciprocal and its rounding (to nearest, ties to even,
            // as its SIMD quantizer does): the demo model turns a single
            // value rounded the other way into a different greedy answer.
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                // `as` saturates, and |v * id| <= 127 by construction.
                *q = round_ties_even(v * id) as i8;
                sum += i32::from(*q);
            }
            self.d[b] = f16::from_f32(d).to_f32();
            self.s[b] = f16::from_f32(sum as f32 * d).to_f32();
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// Whether the vector holds no values.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_1_dequantizes_low_nibbles_first() {
        // Block: d = 0.5, m = -1, nibbles low = j % 16, high = 15 - j % 16.
        let mut block = Vec::new();
        block.extend(f16_bytes(0.5));
        block.extend(f16_bytes(-1.0));
        for j in 0..16u8 {
            block.push(j | ((15 - j) << 4));
        }
        let mut out = [0.0f32; 32];
        dequantize_row(GgmlType::Q4_1, &block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q4_0_and_q8_0_dequantize_like_ggml() {
        let mut q4 = Vec::new();
        q4.extend(f16_bytes(2.0));
        q4.extend((0..16u8).map(|j| j | (j << 4)));
        let mut out = [0.0f32; 32];
        dequantize_row(GgmlType::Q4_0, &q4, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], out[j]);
        }

        let mut q8 = Vec::new();
        q8.extend(f16_bytes(0.25));
        q8.extend((0..32i8).map(|j| (j * 4 - 64) as u8));
        dequantize_row(GgmlType::Q8_0, &q8, &mut out);
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.25 * (j as f32 * 4.0 - 64.0));
        }
    }

    #[test]
    fn quantize_then_dequantize_is_within_half_a_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 53) % 41) as f32 / 9.0 - 2.0)
            .collect();
        for (ty, steps) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 0.0),
            (GgmlType::Q8_0, 127.0),
            (GgmlType::Q4_1, 15.0),
            (GgmlType::Q4_0, 8.0),
        ] {
            let bytes = quantize_row(ty, &x);
            assert_eq!(Some(bytes.len() as u64), ty.bytes_for(x.len() as u64));
            let mut back = vec![0.0; x.len()];
            dequantize_row(ty, &bytes, &mut back);
            for (xs, bs) in x.chunks(QK).zip(back.chunks(QK)) {
                let (lo, hi) = xs
                    .iter()
                    .fold((0.0f32, 0.0f32), |(l, h), &v| (l.min(v), h.max(v)));
                let range = if ty == GgmlType::Q4_1 {
                    hi - lo
                } else {
                    lo.abs().max(hi)
                };
                // Half a quantization step, plus f16 rounding of the scale.
                let tolerance = if steps == 0.0 {
                    2e-3
                } else {
                    range / steps * 0.51 + range / 512.0
                };
                for (a, b) in xs.iter().zip(bs) {
                    assert!((a - b).abs() <= tolerance, "{ty:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        for x in [
            -127.5f32, -2.5, -1.5, -0.5, -0.49, 0.0, 0.5, 1.5, 2.5, 2.51, 126.5, 127.0,
        ] {
            assert_eq!(round_ties_even(x), x.round_ties_even(), "{x}");
        }
        for i in -2540..=2540 {
            let x = i as f32 / 20.0;
            assert_eq!(round_ties_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn q8_vector_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let mut q = Q8Vector::default();
        q.quantize(&x);
        for (b, xs) in x.chunks(QK).enumerate() {
            let d = q.d[b];
            let mut sum = 0i32;
            for (j, &v) in xs.iter().enumerate() {
                let qv = q.qs[b * QK + j];
                sum += i32::from(qv);
                // The f16 rounding of d adds a relative error of 2^-11 at most.
                assert!((f32::from(qv) * d - v).abs() <= d * 0.5 + v.abs() / 1024.0);
            }
            assert!((q.s[b] - sum as f32 * d).abs() <= (sum as f32 * d).abs() / 1024.0 + 1e-6);
        }
    }
}
