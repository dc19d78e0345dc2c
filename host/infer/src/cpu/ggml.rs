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

/// Where one kv head's cached keys and values are, in a paged cache:
/// position `t` lies in block `table[t / block_tokens]`, that block's first
/// position starts `block_stride` values per block number past `start` in
/// both `keys` and `values`, and the block's positions follow `row` values
/// apart.
#[derive(Debug, Clone, Copy)]
pub struct CachedHead<'c> {
    keys: &'c [f16],
    values: &'c [f16],
    table: &'c [u32],
    layout: KvLayout,
    start: usize,
    head_dim: usize,
}

/// How a paged cache lays its positions out ([`CachedHead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Positions per block.
    pub block_tokens: usize,
    /// Values from one block to the next.
    pub block_stride: usize,
    /// Values from one position to the next within a block.
    pub row: usize,
}

impl<'c> CachedHead<'c> {
    /// The head whose position 0 of block 0 starts at `start`.
    ///
    /// # Panics
    ///
    /// If `layout.block_tokens` is 0.
    pub fn new(
        keys: &'c [f16],
        values: &'c [f16],
        table: &'c [u32],
        layout: KvLayout,
        start: usize,
        head_dim: usize,
    ) -> Self {
        assert!(layout.block_tokens > 0, "blocks hold positions");
        Self {
            keys,
            values,
            table,
            layout,
            start,
            head_dim,
        }
    }

    /// Values per key and per value.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Where position `t`'s key (and value) starts.
    #[inline(always)]
    fn at(&self, t: usize) -> usize {
        // Attention asks this for every past position of every head; a
        // division here cost more than the rest of the lookup, and block
        // sizes are powers of two in practice.
        let bt = self.layout.block_tokens;
        let (block, slot) = if bt.is_power_of_two() {
            (t >> bt.trailing_zeros(), t & (bt - 1))
        } else {
            (t / bt, t % bt)
        };
        self.start + self.table[block] as usize * self.layout.block_stride + slot * self.layout.row
    }

    /// Position `t`'s key.
    #[inline(always)]
    pub fn key(&self, t: usize) -> &'c [f16] {
        let at = self.at(t);
        &self.keys[at..at + self.head_dim]
    }

    /// Position `t`'s value.
    #[inline(always)]
    pub fn value(&self, t: usize) -> &'c [f16] {
        let at = self.at(t);
        &self.values[at..at + self.head_dim]
    }

    /// Panics unless the keys and values of the first `positions` positions
    /// all lie within `keys` and `values`, which lets the SIMD loops read
    /// them through [`Self::key_ptr`] and [`Self::value_ptr`] unchecked.
    fn check(&self, positions: usize) {
        let bt = self.layout.block_tokens;
        let blocks = positions.div_ceil(bt);
        assert!(
            blocks <= self.table.len(),
            "cached position past the cache's block table"
        );
        for (b, &block) in self.table[..blocks].iter().enumerate() {
            let last_slot = (positions - b * bt).min(bt) - 1;
            let end = self.start
                + block as usize * self.layout.block_stride
                + last_slot * self.layout.row
                + self.head_dim;
            assert!(
                end <= self.keys.len() && end <= self.values.len(),
                "cached position past the cache"
            );
        }
    }

    /// Position `t`'s key, for `t` below what [`Self::check`] checked.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn key_ptr(&self, t: usize) -> *const f16 {
        // SAFETY: check() found every checked position within keys.
        unsafe { self.keys.as_ptr().add(self.at(t)) }
    }

    /// Position `t`'s value, for `t` below what [`Self::check`] checked.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn value_ptr(&self, t: usize) -> *const f16 {
        // SAFETY: check() found every checked position within values.
        unsafe { self.values.as_ptr().add(self.at(t)) }
    }
}

/// Scratch values [`attend`] needs for `group` query heads of `head_dim`
/// values.
pub fn attend_scratch_len(head_dim: usize, group: usize) -> usize {
    // Per head its rounded query and its accumulators, plus 16 keys in f32.
    (group * (DotOrder::VecDot.accumulators() + 1) + LANES) * head_dim
}

/// A group of query heads sharing one kv head attend over the first
/// `scores.len() / heads` positions of `kv`: for each head `g`,
/// `out[g] = softmax(scale · q[g]·K) · V`, keys and values in f16 as ggml's
/// cache keeps them. `q` and `out` hold the heads' vectors one after the
/// other; on return `scores[g·n..(g + 1)·n]` holds head `g`'s attention
/// weights rounded to f16.
///
/// Why a group at a time: the heads read the same keys and values, so
/// each position's key and value is loaded and widened once for all of
/// them.
///
/// `scratch` holds at least [`attend_scratch_len`] values.
///
/// # Panics
///
/// If `scratch` is too short, `q`, `out` and `scores` are not whole heads,
/// or a position lies outside the cache.
pub fn attend(
    order: DotOrder,
    q: &[f32],
    kv: &CachedHead<'_>,
    scale: f32,
    scores: &mut [f32],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    let hd = kv.head_dim();
    assert!(hd > 0 && q.len().is_multiple_of(hd), "whole query heads");
    assert_eq!(out.len(), q.len(), "one output per query value");
    let heads = q.len() / hd;
    assert!(
        scores.len().is_multiple_of(heads.max(1)),
        "whole score rows"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512::fits(hd) {
        // SAFETY: fits checked the CPU's features.
        unsafe { avx512::attend(order, q, kv, scale, scores, scratch, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA, detected just above.
        unsafe { attend_fma(order, q, kv, scale, scores, scratch, out) };
        return;
    }
    attend_portable(order, q, kv, scale, scores, scratch, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn attend_fma(
    order: DotOrder,
    q: &[f32],
    kv: &CachedHead<'_>,
    scale: f32,
    scores: &mut [f32],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    attend_portable(order, q, kv, scale, scores, scratch, out);
}

/// [`attend`], one head after the other.
#[inline(always)]
fn attend_portable(
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
    let accumulators = order.accumulators();
    let heads = q
        .chunks_exact(hd)
        .zip(out.chunks_exact_mut(hd))
        .zip(scores.chunks_exact_mut(positions));
    for ((q, out), scores) in heads {
        let (q16, rest) = scratch[..(accumulators + 2) * hd].split_at_mut(hd);
        let (row, lanes) = rest.split_at_mut(hd);
        for (r, &v) in q16.iter_mut().zip(q) {
            *r = round_f16(v);
        }
        for (t, s) in scores.iter_mut().enumerate() {
            kv.key(t).convert_to_f32_slice(row);
            *s = dot(order, row, q16) * scale;
        }
        softmax(scores);
        // The weights enter the product with the values in f16.
        for p in scores.iter_mut() {
            *p = round_f16(*p);
        }
        // Position t's weighted value joins accumulator t mod (16 or 64) of
        // every output: llama.cpp pads the positions to a multiple of 256 with
        // zero weights, so no position is ever a leftover past the strides.
        lanes.fill(0.0);
        for (t, &p) in scores.iter().enumerate() {
            let a = t % accumulators;
            kv.value(t).convert_to_f32_slice(row);
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
        let keys = per_position(positions, hd, |t, d| value_at(t + 3, d));
        let values = per_position(positions, hd, |t, d| value_at(t, d + 5));
        let q: Vec<f32> = (0..hd).map(|d| (d as f32 / 20.0).sin()).collect();
        let mut scores = vec![0.0; positions];
        let mut scratch = vec![0.0; attend_scratch_len(hd, 1)];
        let mut out = vec![0.0; hd];
        let scale = 0.125;
        let cache = PagedCache::new(&keys, &values, 16, 0);
        attend(
            DotOrder::Gemm,
            &q,
            &cache.head(hd),
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

    /// `[position][dim]` vectors of `value(t, d)`.
    fn per_position(
        positions: usize,
        hd: usize,
        value: impl Fn(usize, usize) -> f16,
    ) -> Vec<Vec<f16>> {
        (0..positions)
            .map(|t| (0..hd).map(|d| value(t, d)).collect())
            .collect()
    }

    /// Keys and values (`[position][dim]`) laid out as a paged cache would
    /// hold them: blocks of `block_tokens` positions, numbered in reverse,
    /// each position's row `pad` values wider than the head.
    struct PagedCache {
        keys: Vec<f16>,
        values: Vec<f16>,
        table: Vec<u32>,
        layout: KvLayout,
    }

    impl PagedCache {
        fn new(keys: &[Vec<f16>], values: &[Vec<f16>], block_tokens: usize, pad: usize) -> Self {
            let hd = keys.first().map_or(0, Vec::len);
            let blocks = keys.len().div_ceil(block_tokens).max(1);
            let row = hd + pad;
            let layout = KvLayout {
                block_tokens,
                block_stride: block_tokens * row,
                row,
            };
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let len = blocks * layout.block_stride;
            let (mut k, mut v) = (vec![f16::NAN; len], vec![f16::NAN; len]);
            for (t, (key, value)) in keys.iter().zip(values).enumerate() {
                let at =
                    table[t / block_tokens] as usize * layout.block_stride + t % block_tokens * row;
                k[at..at + hd].copy_from_slice(key);
                v[at..at + hd].copy_from_slice(value);
            }
            Self {
                keys: k,
                values: v,
                table,
                layout,
            }
        }

        fn head(&self, hd: usize) -> CachedHead<'_> {
            CachedHead::new(&self.keys, &self.values, &self.table, self.layout, 0, hd)
        }
    }

    #[test]
    fn a_group_of_heads_attends_as_each_head_alone() {
        let hd = 32;
        let positions = 21;
        let value_at =
            |t: usize, d: usize| f16::from_f32(((t * 13 + d * 5) % 11) as f32 / 5.0 - 1.0);
        let keys = per_position(positions, hd, value_at);
        let values = per_position(positions, hd, |t, d| value_at(t + 7, d));
        let cache = PagedCache::new(&keys, &values, 4, 3);
        let heads = 3;
        let q: Vec<f32> = (0..heads * hd).map(|i| (i as f32 / 7.0).cos()).collect();
        let mut scratch = vec![0.0; attend_scratch_len(hd, heads)];
        let mut scores = vec![0.0; heads * positions];
        let mut out = vec![0.0; heads * hd];
        attend(
            DotOrder::VecDot,
            &q,
            &cache.head(hd),
            0.25,
            &mut scores,
            &mut scratch,
            &mut out,
        );
        for g in 0..heads {
            let (mut one_scores, mut one_out) = (vec![0.0; positions], vec![0.0; hd]);
            attend(
                DotOrder::VecDot,
                &q[g * hd..(g + 1) * hd],
                &cache.head(hd),
                0.25,
                &mut one_scores,
                &mut scratch,
                &mut one_out,
            );
            assert_eq!(one_out, out[g * hd..(g + 1) * hd], "head {g}");
            assert_eq!(
                one_scores,
                scores[g * positions..(g + 1) * positions],
                "head {g}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "cached position past the cache")]
    fn a_position_outside_the_cache_is_refused() {
        let key = vec![vec![f16::ONE; 64]; 3];
        let cache = PagedCache::new(&key, &key, 4, 0);
        let mut scratch = vec![0.0; attend_scratch_len(64, 1)];
        // Five positions, but the cache holds one block of four.
        let (mut scores, mut out) = (vec![0.0; 5], vec![0.0; 64]);
        attend(
            DotOrder::Gemm,
            &[1.0; 64],
            &cache.head(64),
            1.0,
            &mut scores,
            &mut scratch,
            &mut out,
        );
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
            // Paged in blocks of 16 (and 5: not a power of two), rows
            // wider than a head as a cache of several kv heads has them.
            let (block_tokens, pad) = if positions % 2 == 0 { (16, 64) } else { (5, 0) };
            let cache = PagedCache::new(&keys, &values, block_tokens, pad);
            let heads = 1 + positions % 5;
            let q: Vec<f32> = (0..heads * hd).map(|_| rand() * q_scale).collect();
            for order in [DotOrder::Gemm, DotOrder::VecDot] {
                if !avx512::fits(hd) {
                    continue;
                }
                ran = true;
                let run = |simd: bool| {
                    let mut scores = vec![0.0; heads * positions];
                    let mut scratch = vec![f32::NAN; attend_scratch_len(hd, heads)];
                    let mut out = vec![0.0; heads * hd];
                    let cached = cache.head(hd);
                    if simd {
                        // SAFETY: fits checked the CPU above.
                        unsafe {
                            avx512::attend(
                                order,
                                &q,
                                &cached,
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
                            &cached,
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
                let case = format!(
                    "{order:?} head {hd}, {heads} heads, {positions} positions, q x{q_scale}"
                );
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
