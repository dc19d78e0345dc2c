//! The CPU kernels: quantized matrix-vector products spread over a small
//! thread pool, plus the elementwise kernels of a transformer layer.
//!
//! Decode is memory-bound: every token streams every weight once. So weights
//! stay in their quantized form and activations are quantized to 8 bits,
//! which turns each block's dot product into integer multiply-adds (as
//! ggml's CPU backend does). The portable kernels are plain loops that
//! define the arithmetic; on x86-64 with AVX2 the same arithmetic runs in
//! the intrinsics of [`x86`], and a batch of inputs (decode steps of many
//! sequences, prompt chunks) in those of [`avx512`] where the CPU has
//! AVX-512 VNNI, picked at run time; a batch's result for each input is bit
//! for bit what the one-input kernel computes for it alone.

use rayon::prelude::*;

use crate::quant::{GgmlType, Q8Vector, QK, f16_at};
use crate::weights::Matrix;

#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod ggml;
#[cfg(target_arch = "x86_64")]
pub mod x86;

/// Rows handed to a worker at a time: enough to amortize scheduling, few
/// enough that two threads finish together on a 192-row matrix.
const ROWS_PER_TASK: usize = 16;

/// How far ahead of the row being multiplied to prefetch weights.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 2560;

/// Why the CPU backend could not start.
#[derive(Debug, thiserror::Error)]
#[error("starting the CPU thread pool: {0}")]
pub struct CpuBackendError(#[from] rayon::ThreadPoolBuildError);

/// The input of a matrix-vector product, in both forms the kernels use.
#[derive(Debug, Default)]
pub struct Input {
    /// The vector as f32, for float weights.
    pub f32: Vec<f32>,
    /// The same vector quantized, for quantized weights.
    pub q8: Q8Vector,
}

impl Input {
    /// Sets the input to `x`, quantizing it once for every product that
    /// reads it.
    pub fn set(&mut self, x: &[f32]) {
        self.f32.clear();
        self.f32.extend_from_slice(x);
        #[cfg(target_arch = "x86_64")]
        if avx512::available() && x.len().is_multiple_of(QK) {
            // SAFETY: the CPU's features were detected just above.
            unsafe { avx512::quantize(x, &mut self.q8) };
            return;
        }
        self.q8.quantize(x);
    }
}

/// Runs kernels on a dedicated pool of CPU threads.
#[derive(Debug)]
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    /// The batch of the product under way, laid out for the AVX-512
    /// kernels; kept to reuse its allocations. `None` where the CPU lacks
    /// them.
    #[cfg(target_arch = "x86_64")]
    packed: Option<std::sync::Mutex<avx512::PackedInputs>>,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (at least one).
    ///
    /// ```
    /// # use breakwater_infer::cpu::CpuBackend;
    /// let backend = CpuBackend::new(2).unwrap();
    /// assert_eq!(backend.threads(), 2);
    /// ```
    pub fn new(threads: usize) -> Result<Self, CpuBackendError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("infer-cpu-{i}"))
            .build()?;
        Ok(Self {
            pool,
            #[cfg(target_arch = "x86_64")]
            packed: avx512::available().then(Default::default),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// `out = w · x` for one matrix.
    ///
    /// # Panics
    ///
    /// If the shapes disagree: `x` must have `w.cols` values and `out`
    /// `w.rows`.
    pub fn matmul(&self, w: &Matrix, x: &Input, out: &mut [f32]) {
        self.matmul_many(std::slice::from_ref(x), &mut [(w, out)]);
    }

    /// Products of several matrices with a batch of inputs, as one parallel
    /// job: the threads meet once, not once per matrix, and each weight row
    /// is read from memory once for the whole batch.
    ///
    /// Each output is laid out token by token, `out[i * w.rows + r] = w_r ·
    /// x_i`: one vector per input, as the next step of a layer reads it.
    ///
    /// # Panics
    ///
    /// If any shape disagrees with the inputs or its output.
    pub fn matmul_many(&self, xs: &[Input], jobs: &mut [(&Matrix, &mut [f32])]) {
        let n = xs.len();
        for (w, out) in jobs.iter() {
            for x in xs {
                assert_eq!(w.cols, x.f32.len(), "input length");
                assert_eq!(w.cols, x.q8.len(), "quantized input length");
            }
            assert_eq!(w.rows * n, out.len(), "output length");
        }
        if n == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(packed) = &self.packed
            && n > 1
            && jobs
                .iter()
                .any(|(w, _)| matches!(w.ty, GgmlType::Q4_1 | GgmlType::Q8_0))
        {
            // A poisoned lock only means another product panicked; the
            // layout is rebuilt from scratch below.
            let mut packed = packed.lock().unwrap_or_else(|e| e.into_inner());
            let q8: Vec<&Q8Vector> = xs.iter().map(|x| &x.q8).collect();
            packed.pack(&q8);
            self.run(xs, Some(&packed), jobs);
            return;
        }
        self.run(xs, None, jobs);
    }

    /// Spreads `jobs` over the threads, `ROWS_PER_TASK` rows at a time.
    fn run(&self, xs: &[Input], packed: Option<&Packed>, jobs: &mut [(&Matrix, &mut [f32])]) {
        let n = xs.len();
        self.pool.install(|| {
            if n == 1 {
                // One input: its vector is the rows in order, and each
                // task's share one contiguous slice of it.
                jobs.par_iter_mut()
                    .flat_map(|(w, out)| {
                        let w: &Matrix = w;
                        out.par_chunks_mut(ROWS_PER_TASK)
                            .enumerate()
                            .map(move |(i, chunk)| (w, i * ROWS_PER_TASK, chunk))
                    })
                    .for_each(|(w, first_row, chunk)| rows(w, first_row, xs, packed, chunk));
                return;
            }
            // A batch: the kernels give a row's values for every input
            // together, so a task computes its rows into a block of its
            // own and scatters them into the inputs' vectors, while those
            // lines are in its cache (a separate transpose afterwards was
            // a pass over the whole output on one thread).
            jobs.par_iter_mut()
                .flat_map(|(w, out)| {
                    let w: &Matrix = w;
                    let out = TokenMajor::new(out, w.rows, n);
                    (0..w.rows.div_ceil(ROWS_PER_TASK))
                        .into_par_iter()
                        .map(move |task| (w, task * ROWS_PER_TASK, out))
                })
                .for_each(|(w, first_row, out)| {
                    let count = (w.rows - first_row).min(ROWS_PER_TASK);
                    TASK_ROWS.with_borrow_mut(|block| {
                        block.resize(count * n, 0.0);
                        rows(w, first_row, xs, packed, block);
                        // SAFETY: tasks take disjoint rows, all within the
                        // output TokenMajor::new checked.
                        unsafe { out.scatter(first_row, block) };
                    });
                });
        });
    }

    /// Runs `f` on the backend's threads (for work such as attention heads
    /// that the model parallelizes itself).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

thread_local! {
    /// A task's rows of a batch product (`[row][input]`), before they are
    /// scattered into the inputs' vectors; kept to reuse the allocation.
    static TASK_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A batch product's output, `[input][row]`, as the tasks filling it in
/// share it: each writes only the rows it computed.
#[derive(Clone, Copy)]
struct TokenMajor {
    out: *mut f32,
    rows: usize,
    inputs: usize,
}

// SAFETY: the tasks sharing a TokenMajor write disjoint rows (see scatter),
// and the product that made it waits for all of them.
unsafe impl Send for TokenMajor {}
// SAFETY: as for Send.
unsafe impl Sync for TokenMajor {}

impl TokenMajor {
    /// `out` as `inputs` vectors of `rows` values.
    ///
    /// # Panics
    ///
    /// If `out` is not that long.
    fn new(out: &mut [f32], rows: usize, inputs: usize) -> Self {
        assert_eq!(out.len(), rows * inputs, "output length");
        Self {
            out: out.as_mut_ptr(),
            rows,
            inputs,
        }
    }

    /// Writes `block`, rows `first_row..` with one value per input each,
    /// to their places in the inputs' vectors.
    ///
    /// # Panics
    ///
    /// If the rows run past the output.
    ///
    /// # Safety
    ///
    /// No other thread may access these rows of the output meanwhile, and
    /// the output must outlive the call.
    unsafe fn scatter(&self, first_row: usize, block: &[f32]) {
        let rows = block.len() / self.inputs;
        assert!(first_row + rows <= self.rows, "rows within the output");
        // Input by input: each input's rows here are consecutive values,
        // stored one after the other into the same cache lines, while the
        // block they are read from is in the L1 cache. (Row by row, every
        // store went to another input's line, and cost ten times more.)
        for i in 0..self.inputs {
            // SAFETY: i < inputs and first_row + rows <= self.rows, so the
            // range is within the output, and these rows are the caller's
            // alone.
            let column = unsafe {
                std::slice::from_raw_parts_mut(self.out.add(i * self.rows + first_row), rows)
            };
            for (o, values) in column.iter_mut().zip(block.chunks_exact(self.inputs)) {
                *o = values[i];
            }
        }
    }
}

/// The inputs laid out for the AVX-512 kernels, where the CPU has them.
#[cfg(target_arch = "x86_64")]
type Packed = avx512::PackedInputs;
#[cfg(not(target_arch = "x86_64"))]
type Packed = ();

/// Computes `out` (rows from `first_row` on, `xs.len()` values per row);
/// `packed` is `xs` laid out for the AVX-512 kernels.
fn rows(w: &Matrix, first_row: usize, xs: &[Input], packed: Option<&Packed>, out: &mut [f32]) {
    let dot = row_dot(w.ty);
    #[cfg(target_arch = "x86_64")]
    let ahead = PREFETCH_BYTES.div_ceil(w.row(0).len().max(1));
    for (i, row_out) in out.chunks_exact_mut(xs.len()).enumerate() {
        let r = first_row + i;
        // This machine's hardware prefetcher leaves a streaming core at about
        // half its bandwidth; asking for rows a few KiB ahead doubled it.
        #[cfg(target_arch = "x86_64")]
        if r + ahead < w.rows {
            x86::prefetch(w.row(r + ahead));
        }
        let row = w.row(r);
        #[cfg(target_arch = "x86_64")]
        if let Some(packed) = packed {
            // SAFETY: `packed` exists only where avx512::available() holds;
            // the kernels check the row's and the output's lengths.
            match w.ty {
                GgmlType::Q4_1 => {
                    unsafe { avx512::q4_1_row(row, packed, row_out) };
                    continue;
                }
                GgmlType::Q8_0 => {
                    unsafe { avx512::q8_0_row(row, packed, row_out) };
                    continue;
                }
                _ => {}
            }
        }
        #[cfg(target_arch = "x86_64")]
        if w.ty == GgmlType::Q4_1 && xs.len() > 1 && x86::available() {
            q4_1_many(row, xs, row_out);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if w.ty == GgmlType::Q8_0 && xs.len() > 1 && x86::available() {
            q8_0_many(row, xs, row_out);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if w.ty == GgmlType::F16 && xs.len() > 1 && x86::available() {
            f16_many(row, xs, row_out);
            continue;
        }
        for (o, x) in row_out.iter_mut().zip(xs) {
            *o = dot(row, x);
        }
    }
}

/// One Q4_1 row against a batch, four inputs at a time.
#[cfg(target_arch = "x86_64")]
fn q4_1_many(row: &[u8], xs: &[Input], out: &mut [f32]) {
    for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
        // SAFETY: the caller detected the CPU features, and matmul_many
        // checked that every input has as many blocks as the row.
        unsafe {
            match xs {
                [a, b, c, d] => {
                    out.copy_from_slice(&x86::dot_q4_1_many(row, [&a.q8, &b.q8, &c.q8, &d.q8]))
                }
                [a, b, c] => out.copy_from_slice(&x86::dot_q4_1_many(row, [&a.q8, &b.q8, &c.q8])),
                [a, b] => out.copy_from_slice(&x86::dot_q4_1_many(row, [&a.q8, &b.q8])),
                [a] => out.copy_from_slice(&x86::dot_q4_1_many(row, [&a.q8])),
                _ => {}
            }
        }
    }
}

/// One Q8_0 row against a batch, four inputs at a time.
#[cfg(target_arch = "x86_64")]
fn q8_0_many(row: &[u8], xs: &[Input], out: &mut [f32]) {
    for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
        // SAFETY: the caller detected the CPU features, and matmul_many
        // checked that every input has as many blocks as the row.
        unsafe {
            match xs {
                [a, b, c, d] => {
                    out.copy_from_slice(&x86::dot_q8_0_many(row, [&a.q8, &b.q8, &c.q8, &d.q8]))
                }
                [a, b, c] => out.copy_from_slice(&x86::dot_q8_0_many(row, [&a.q8, &b.q8, &c.q8])),
                [a, b] => out.copy_from_slice(&x86::dot_q8_0_many(row, [&a.q8, &b.q8])),
                [a] => out.copy_from_slice(&x86::dot_q8_0_many(row, [&a.q8])),
                _ => {}
            }
        }
    }
}

/// One F16 row against a batch, four inputs at a time.
#[cfg(target_arch = "x86_64")]
fn f16_many(row: &[u8], xs: &[Input], out: &mut [f32]) {
    for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
        // SAFETY: the caller detected the CPU features; the kernel checks
        // the lengths.
        unsafe {
            match xs {
                [a, b, c, d] => {
                    out.copy_from_slice(&x86::dot_f16_many(row, [&a.f32, &b.f32, &c.f32, &d.f32]))
                }
                [a, b, c] => out.copy_from_slice(&x86::dot_f16_many(row, [&a.f32, &b.f32, &c.f32])),
                [a, b] => out.copy_from_slice(&x86::dot_f16_many(row, [&a.f32, &b.f32])),
                [a] => out.copy_from_slice(&x86::dot_f16_many(row, [&a.f32])),
                _ => {}
            }
        }
    }
}

/// A row's dot product with an input.
type RowDot = fn(&[u8], &Input) -> f32;

/// The fastest kernel this CPU has for weights of type `ty`.
fn row_dot(ty: GgmlType) -> RowDot {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY (each closure): the CPU features were detected above, and
        // matmul_many checked that a row holds as many blocks as the input.
        match ty {
            GgmlType::Q4_1 => return |row, x| unsafe { x86::dot_q4_1(row, &x.q8) },
            GgmlType::Q4_0 => return |row, x| unsafe { x86::dot_q4_0(row, &x.q8) },
            GgmlType::Q8_0 => return |row, x| unsafe { x86::dot_q8_0(row, &x.q8) },
            GgmlType::F16 => return |row, x| unsafe { x86::dot_f16(row, &x.f32) },
            GgmlType::F32 => {}
        }
    }
    match ty {
        GgmlType::Q4_1 => |row, x| dot_q4_1(row, &x.q8),
        GgmlType::Q4_0 => |row, x| dot_q4_0(row, &x.q8),
        GgmlType::Q8_0 => |row, x| dot_q8_0(row, &x.q8),
        GgmlType::F16 => |row, x| dot_f16(row, &x.f32),
        GgmlType::F32 => |row, x| dot_f32(row, &x.f32),
    }
}

/// Q4_1 weights · Q8_1 input: `Σ_blocks d_w·d_x·Σ(q_w·q_x) + m_w·s_x`.
#[inline(always)]
pub fn dot_q4_1(row: &[u8], x: &Q8Vector) -> f32 {
    let mut acc = 0.0f32;
    for (b, (block, xq)) in row
        .chunks_exact(GgmlType::Q4_1.block_bytes())
        .zip(x.qs.chunks_exact(QK))
        .enumerate()
    {
        let isum = dot_nibbles(&block[4..], xq, 0);
        acc += f16_at(block, 0) * x.d[b] * isum as f32 + f16_at(block, 2) * x.s[b];
    }
    acc
}

/// Q4_0 weights · Q8_0 input: `Σ_blocks d_w·d_x·Σ((q_w - 8)·q_x)`.
#[inline(always)]
pub fn dot_q4_0(row: &[u8], x: &Q8Vector) -> f32 {
    let mut acc = 0.0f32;
    for (b, (block, xq)) in row
        .chunks_exact(GgmlType::Q4_0.block_bytes())
        .zip(x.qs.chunks_exact(QK))
        .enumerate()
    {
        let isum = dot_nibbles(&block[2..], xq, 8);
        acc += f16_at(block, 0) * x.d[b] * isum as f32;
    }
    acc
}

/// Q8_0 weights · Q8_0 input.
#[inline(always)]
pub fn dot_q8_0(row: &[u8], x: &Q8Vector) -> f32 {
    let mut acc = 0.0f32;
    for (b, (block, xq)) in row
        .chunks_exact(GgmlType::Q8_0.block_bytes())
        .zip(x.qs.chunks_exact(QK))
        .enumerate()
    {
        let mut isum = 0i32;
        for (&w, &v) in block[2..2 + QK].iter().zip(xq) {
            isum += i32::from(w as i8) * i32::from(v);
        }
        acc += f16_at(block, 0) * x.d[b] * isum as f32;
    }
    acc
}

/// `Σ (nibble - offset) · x` over one block: low nibbles pair with the first
/// 16 inputs, high nibbles with the last 16 (ggml's layout).
#[inline(always)]
fn dot_nibbles(qs: &[u8], xq: &[i8], offset: i32) -> i32 {
    let (lo, hi) = xq.split_at(QK / 2);
    let mut isum = 0i32;
    for ((&q, &a), &b) in qs[..QK / 2].iter().zip(lo).zip(hi) {
        isum += (i32::from(q & 0x0f) - offset) * i32::from(a)
            + (i32::from(q >> 4) - offset) * i32::from(b);
    }
    isum
}

#[inline(always)]
fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    x.iter()
        .enumerate()
        .map(|(i, v)| f16_at(row, 2 * i) * v)
        .sum()
}

#[inline(always)]
fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    row.chunks_exact(4)
        .zip(x)
        .map(|(c, v)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v)
        .sum()
}

/// `out = x / rms(x) * weight`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    // Squares in f32, summed in f64 in order, as ggml does: this model
    // amplifies one-ulp differences here into different greedy tokens.
    let sum_squares: f64 = x.iter().map(|v| f64::from(v * v)).sum();
    let mean_square = (sum_squares / x.len() as f64) as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// SwiGLU: `gate = silu(gate) * up`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `Σ a·b`.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += a · x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Gguf, writer::GgufWriter};
    use crate::quant::dequantize_row;

    /// A deterministic pseudo-random stream, so tests need no extra crate.
    fn noise(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn random_blocks(ty: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
        let mut rand = noise(seed);
        let mut out = Vec::new();
        for _ in 0..blocks {
            let scale = half::f16::from_f32(rand().abs() * 0.1 + 0.01).to_bits();
            out.extend(scale.to_le_bytes());
            if ty == GgmlType::Q4_1 {
                out.extend(half::f16::from_f32(rand() * 0.5).to_bits().to_le_bytes());
            }
            let payload = match ty {
                GgmlType::Q8_0 => QK,
                _ => QK / 2,
            };
            out.extend((0..payload).map(|_| (rand() * 127.0) as i8 as u8));
        }
        out
    }

    /// The product computed the slow way: dequantize, then f64 dot.
    fn reference(ty: GgmlType, rows: usize, cols: usize, data: &[u8], x: &[f32]) -> Vec<f32> {
        let row_bytes = data.len() / rows;
        (0..rows)
            .map(|r| {
                let mut w = vec![0.0; cols];
                dequantize_row(ty, &data[r * row_bytes..(r + 1) * row_bytes], &mut w);
                w.iter()
                    .zip(x)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn quantized_matmul_matches_dequantized_reference() {
        let (rows, cols) = (40, 128);
        let backend = CpuBackend::new(2).unwrap();
        let mut rand = noise(7);
        let x: Vec<f32> = (0..cols).map(|_| rand()).collect();
        let mut input = Input::default();
        input.set(&x);
        for (i, ty) in [GgmlType::Q4_1, GgmlType::Q4_0, GgmlType::Q8_0]
            .into_iter()
            .enumerate()
        {
            let data = random_blocks(ty, rows * cols / QK, i as u64);
            let mut w = GgufWriter::default();
            w.tensor("w", &[cols as u64, rows as u64], ty, data.clone());
            let gguf = Gguf::from_bytes(w.finish()).unwrap();
            let m = Matrix::load(&gguf, "w", cols, Some(rows)).unwrap();
            let mut out = vec![0.0; rows];
            backend.matmul(&m, &input, &mut out);
            let want = reference(ty, rows, cols, &data, &x);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (got, want) in out.iter().zip(&want) {
                // Quantizing the input to 8 bits costs about 1% of the range.
                assert!(
                    (got - want).abs() <= 0.02 * scale,
                    "{ty:?}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn a_batch_product_gives_each_input_its_own_vector() {
        let cols = 64;
        let backend = CpuBackend::new(2).unwrap();
        let mut rand = noise(13);
        let inputs: Vec<Input> = (0..5)
            .map(|_| {
                let mut input = Input::default();
                input.set(&(0..cols).map(|_| rand()).collect::<Vec<_>>());
                input
            })
            .collect();
        // Row counts that leave a short last task, two matrices in one call.
        let matrices: Vec<Matrix> = [(GgmlType::Q4_1, 37), (GgmlType::Q8_0, 19)]
            .into_iter()
            .enumerate()
            .map(|(i, (ty, rows))| {
                let mut w = GgufWriter::default();
                let data = random_blocks(ty, rows * cols / QK, 20 + i as u64);
                w.tensor("w", &[cols as u64, rows as u64], ty, data);
                let gguf = Gguf::from_bytes(w.finish()).unwrap();
                Matrix::load(&gguf, "w", cols, Some(rows)).unwrap()
            })
            .collect();
        for n in [2, 5] {
            let xs = &inputs[..n];
            let (mut a, mut b) = (
                vec![f32::NAN; n * matrices[0].rows],
                vec![f32::NAN; n * matrices[1].rows],
            );
            backend.matmul_many(xs, &mut [(&matrices[0], &mut a), (&matrices[1], &mut b)]);
            for (m, out) in matrices.iter().zip([&a, &b]) {
                for (i, (x, got)) in xs.iter().zip(out.chunks_exact(m.rows)).enumerate() {
                    let mut want = vec![0.0; m.rows];
                    backend.matmul(m, x, &mut want);
                    assert_eq!(got, want, "{:?}, {n} inputs, input {i}", m.ty);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_agree_with_portable_ones() {
        if !x86::available() {
            return;
        }
        let cols = 256;
        let mut rand = noise(11);
        let x: Vec<f32> = (0..cols).map(|_| rand() * 3.0).collect();
        let mut q = Q8Vector::default();
        q.quantize(&x);
        for seed in 0..20 {
            let row = random_blocks(GgmlType::Q4_1, cols / QK, seed);
            // SAFETY: detected above; the row holds cols / 32 blocks.
            let fast = unsafe { x86::dot_q4_1(&row, &q) };
            assert!((fast - dot_q4_1(&row, &q)).abs() < 1e-3, "q4_1 seed {seed}");
            let q2 = {
                let mut q2 = Q8Vector::default();
                q2.quantize(&x.iter().map(|v| v * -0.5).collect::<Vec<_>>());
                q2
            };
            // SAFETY: as above.
            let many = unsafe { x86::dot_q4_1_many(&row, [&q, &q2]) };
            assert_eq!(many[0], fast, "batched q4_1 is bit-identical");
            assert_eq!(many[1], unsafe { x86::dot_q4_1(&row, &q2) });
            let row = random_blocks(GgmlType::Q4_0, cols / QK, seed);
            let fast = unsafe { x86::dot_q4_0(&row, &q) };
            assert!((fast - dot_q4_0(&row, &q)).abs() < 1e-3, "q4_0 seed {seed}");
            let row = random_blocks(GgmlType::Q8_0, cols / QK, seed);
            let fast = unsafe { x86::dot_q8_0(&row, &q) };
            assert!((fast - dot_q8_0(&row, &q)).abs() < 1e-3, "q8_0 seed {seed}");
            // SAFETY: as above.
            let many = unsafe { x86::dot_q8_0_many(&row, [&q2, &q]) };
            assert_eq!(many[1], fast, "batched q8_0 is bit-identical");
            assert_eq!(many[0], unsafe { x86::dot_q8_0(&row, &q2) });
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_batch_kernels_are_bit_identical_to_one_input_kernels() {
        if !avx512::available() || !x86::available() {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VNNI");
            return;
        }
        let cols = 192;
        let mut rand = noise(5);
        // Batches of one, odd sizes (a lone last input in its pair), one
        // whole group of 16 and more than one group.
        let inputs: Vec<Q8Vector> = (0..37)
            .map(|i| {
                let x: Vec<f32> = (0..cols).map(|_| rand() * (i % 5 + 1) as f32).collect();
                let mut q = Q8Vector::default();
                q.quantize(&x);
                q
            })
            .collect();
        let mut packed = avx512::PackedInputs::default();
        for n in [1, 2, 3, 15, 16, 17, 37] {
            let xs: Vec<&Q8Vector> = inputs.iter().take(n).collect();
            packed.pack(&xs);
            for seed in 0..8 {
                let mut out = vec![f32::NAN; n];
                let row = random_blocks(GgmlType::Q4_1, cols / QK, seed);
                // SAFETY: detected above; the kernels check the lengths.
                unsafe { avx512::q4_1_row(&row, &packed, &mut out) };
                for (i, (got, x)) in out.iter().zip(&xs).enumerate() {
                    let want = unsafe { x86::dot_q4_1(&row, x) };
                    assert_eq!(got.to_bits(), want.to_bits(), "q4_1 n {n} input {i}");
                }
                let row = random_blocks(GgmlType::Q8_0, cols / QK, seed);
                // SAFETY: as above.
                unsafe { avx512::q8_0_row(&row, &packed, &mut out) };
                for (i, (got, x)) in out.iter().zip(&xs).enumerate() {
                    let want = unsafe { x86::dot_q8_0(&row, x) };
                    assert_eq!(got.to_bits(), want.to_bits(), "q8_0 n {n} input {i}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_quantization_is_bit_identical_to_the_portable_one() {
        if !avx512::available() {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VNNI");
            return;
        }
        let mut rand = noise(9);
        // Ordinary values, ties at half a step, a zero block, and blocks
        // whose largest value is negative.
        let mut x: Vec<f32> = (0..32 * 40).map(|_| rand() * 7.0).collect();
        x[32..64].fill(0.0);
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        for v in &mut x[96..128] {
            *v = -v.abs();
        }
        let (mut want, mut got) = (Q8Vector::default(), Q8Vector::default());
        want.quantize(&x);
        // SAFETY: detected above.
        unsafe { avx512::quantize(&x, &mut got) };
        assert_eq!(got.qs, want.qs);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.d), bits(&want.d));
        assert_eq!(bits(&got.s), bits(&want.s));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16c_kernel_agrees_with_portable_one() {
        if !x86::available() {
            return;
        }
        // Lengths with and without a tail past the 16-wide steps.
        for (seed, cols) in [
            (1u64, 576usize),
            (2, 1536),
            (3, 7),
            (4, 35),
            (5, 16),
            (6, 0),
        ] {
            let mut rand = noise(seed);
            let w: Vec<f32> = (0..cols).map(|_| rand()).collect();
            let row: Vec<u8> = w
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let x: Vec<f32> = (0..cols).map(|_| rand() * 4.0).collect();
            let y: Vec<f32> = x.iter().map(|v| v * -0.25 + 0.5).collect();
            let portable = dot_f16(&row, &x);
            // SAFETY: detected above.
            let fast = unsafe { x86::dot_f16(&row, &x) };
            let magnitude: f32 = x.iter().map(|v| v.abs()).sum::<f32>().max(1.0);
            assert!(
                (fast - portable).abs() <= 1e-5 * magnitude,
                "cols {cols}: {fast} vs {portable}"
            );
            // SAFETY: as above.
            let many = unsafe { x86::dot_f16_many(&row, [&x, &y, &x]) };
            assert_eq!(many[0], fast, "batched f16 is bit-identical");
            assert_eq!(many[2], fast);
            assert_eq!(many[1], unsafe { x86::dot_f16(&row, &y) });
        }
    }

    #[test]
    fn float_matmul_is_exact_enough() {
        let (rows, cols) = (3, 64);
        let mut rand = noise(3);
        let w: Vec<f32> = (0..rows * cols).map(|_| rand()).collect();
        let x: Vec<f32> = (0..cols).map(|_| rand()).collect();
        let mut input = Input::default();
        input.set(&x);
        let backend = CpuBackend::new(1).unwrap();
        for ty in [GgmlType::F32, GgmlType::F16] {
            let data: Vec<u8> = match ty {
                GgmlType::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => w
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                    .collect(),
            };
            let mut gw = GgufWriter::default();
            gw.tensor("w", &[cols as u64, rows as u64], ty, data.clone());
            let gguf = Gguf::from_bytes(gw.finish()).unwrap();
            let m = Matrix::load(&gguf, "w", cols, Some(rows)).unwrap();
            let mut out = vec![0.0; rows];
            backend.matmul(&m, &input, &mut out);
            for (got, want) in out.iter().zip(reference(ty, rows, cols, &data, &x)) {
                assert!((got - want).abs() < 1e-4, "{ty:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_and_rmsnorm() {
        let mut x = [1.0f32, 2.0, 3.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0]);
        let mut out = [0.0f32; 2];
        rmsnorm(&mut out, &[3.0, 4.0], &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 8.0 / rms).abs() < 1e-6);
    }
}
