//! The CUDA C source of every kernel the CUDA runner launches, compiled at
//! start-up by NVRTC for the device found (so no CUDA toolkit is needed to
//! build, and one binary serves every GPU generation).
//!
//! Storage is f16 (weights, activations fed to cuBLAS, the KV cache) and
//! arithmetic is f32. f16 values travel as `unsigned short` and convert
//! with PTX `cvt`, so the source needs no header (NVRTC finds none without
//! a toolkit).

use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use super::CudaError;

/// Kernel entry points, as the source names them.
pub const KERNELS: [&str; 6] = [
    "embed",
    "rmsnorm",
    "rope_store_kv",
    "attention",
    "swiglu",
    "argmax",
];

/// Threads per block of the argmax kernel (one block per sequence).
pub const ARGMAX_THREADS: u32 = 1024;

/// Threads per block of the attention kernel: its warps split a
/// sequence's positions and merge their partial softmaxes at the end.
pub const ATTENTION_THREADS: u32 = 128;

/// Largest head the attention kernel holds in registers (8 values a lane).
pub const MAX_HEAD_DIM: usize = 256;

/// The source.
pub const SOURCE: &str = r#"
typedef unsigned short half_t;

// No <math.h> without a toolkit: the bit pattern of -inf.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_t f2h(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over the block; blockDim.x is a multiple of 32, at most 1024.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    const float total = partial[0];
    __syncthreads();
    return total;
}

// x[row] = table[tokens[row]], widened to f32. One block per row.
extern "C" __global__ void embed(float* x, const half_t* table, const unsigned int* tokens, int dim) {
    const int row = blockIdx.x;
    const half_t* src = table + (size_t)tokens[row] * dim;
    float* dst = x + (size_t)row * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = h2f(src[i]);
}

// out[r] = x[src] / rms(x[src]) * weight, in f16, where src is rows[r] when
// use_rows is set (the last token of each sequence), else r. One block per
// output row.
extern "C" __global__ void rmsnorm(half_t* out, const float* x, const float* weight,
                                   const int* rows, int use_rows, int dim, float eps) {
    const int r = blockIdx.x;
    const int src = use_rows ? rows[r] : r;
    const float* xr = x + (size_t)src * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    half_t* o = out + (size_t)r * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = f2h(xr[i] * scale * weight[i]);
}

// Each token row of qkv holds [q (n_heads heads) | k (n_kv_heads) | v]. Rotates
// the first rope_dim values of every q and k head by the row's position
// (ggml's "normal" RoPE: consecutive pairs), then writes k and v into the
// paged cache: block tables[seq * max_blocks + pos / block_tokens], slot
// pos % block_tokens, layer at layer_offset. One block per row.
extern "C" __global__ void rope_store_kv(float* qkv, half_t* k_cache, half_t* v_cache,
                                         const int* row_seq, const int* row_pos,
                                         const int* tables, int max_blocks,
                                         const float* inv_freq, const float* freq_div, int use_div,
                                         int n_heads, int n_kv_heads, int head_dim, int rope_dim,
                                         float pos_scale, int block_tokens,
                                         unsigned long long layer_offset) {
    const int row = blockIdx.x;
    const int pos = row_pos[row];
    const int seq = row_seq[row];
    const int dim = n_heads * head_dim;
    const int kv_dim = n_kv_heads * head_dim;
    float* q = qkv + (size_t)row * (dim + 2 * kv_dim);
    float* k = q + dim;
    const float* v = k + kv_dim;
    const float position = (float)pos * pos_scale;
    const int pairs = rope_dim / 2;
    for (int p = threadIdx.x; p < (n_heads + n_kv_heads) * pairs; p += blockDim.x) {
        const int head = p / pairs;
        const int i = p % pairs;
        float* base = head < n_heads ? q + head * head_dim : k + (head - n_heads) * head_dim;
        float angle = position * inv_freq[i];
        if (use_div) angle = angle / freq_div[i];
        float s, c;
        sincosf(angle, &s, &c);
        const float x0 = base[2 * i];
        const float x1 = base[2 * i + 1];
        base[2 * i] = x0 * c - x1 * s;
        base[2 * i + 1] = x0 * s + x1 * c;
    }
    __syncthreads();
    const int block = tables[seq * max_blocks + pos / block_tokens];
    const size_t at = layer_offset + ((size_t)block * block_tokens + pos % block_tokens) * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[at + i] = f2h(k[i]);
        v_cache[at + i] = f2h(v[i]);
    }
}

// out[row, head] = softmax(q · K / sqrt(d)) · V over positions 0..=pos of
// the row's sequence, read through its block table. Grid (n_heads, rows),
// 128 threads: each warp takes every fourth position with an online
// softmax, lanes split the head's values; the four partial results merge
// at the end.
extern "C" __global__ void attention(half_t* out, const float* qkv,
                                     const half_t* k_cache, const half_t* v_cache,
                                     const int* row_seq, const int* row_pos,
                                     const int* tables, int max_blocks,
                                     int n_heads, int n_kv_heads, int head_dim, int block_tokens,
                                     unsigned long long layer_offset, float scale) {
    const int h = blockIdx.x;
    const int row = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int dim = n_heads * head_dim;
    const int kv_dim = n_kv_heads * head_dim;
    const int kv_head = h / (n_heads / n_kv_heads);
    const float* q = qkv + (size_t)row * (dim + 2 * kv_dim) + h * head_dim;

    float qr[8];
    float acc[8];
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        const int d = lane + 32 * j;
        qr[j] = d < head_dim ? q[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = NEG_INF;
    float l = 0.0f;
    const int pos = row_pos[row];
    const int* table = tables + row_seq[row] * max_blocks;
    for (int t = warp; t <= pos; t += warps) {
        const size_t at = layer_offset
            + ((size_t)table[t / block_tokens] * block_tokens + t % block_tokens) * kv_dim
            + kv_head * head_dim;
        float s = 0.0f;
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            const int d = lane + 32 * j;
            if (d < head_dim) s += qr[j] * h2f(k_cache[at + d]);
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * correction + p;
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            const int d = lane + 32 * j;
            if (d < head_dim) acc[j] = acc[j] * correction + p * h2f(v_cache[at + d]);
        }
        m = m_new;
    }

    __shared__ float warp_max[4];
    __shared__ float warp_sum_exp[4];
    __shared__ float warp_acc[4][256];
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum_exp[warp] = l;
    }
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        const int d = lane + 32 * j;
        if (d < head_dim) warp_acc[warp][d] = acc[j];
    }
    __syncthreads();
    if (warp == 0) {
        float top = NEG_INF;
        for (int w = 0; w < warps; w++) top = fmaxf(top, warp_max[w]);
        float total = 0.0f;
        float weight[4];
        for (int w = 0; w < warps; w++) {
            weight[w] = warp_max[w] == NEG_INF ? 0.0f : expf(warp_max[w] - top);
            total += warp_sum_exp[w] * weight[w];
        }
        half_t* o = out + (size_t)row * dim + h * head_dim;
        for (int d = lane; d < head_dim; d += 32) {
            float v = 0.0f;
            for (int w = 0; w < warps; w++) v += warp_acc[w][d] * weight[w];
            o[d] = f2h(v / total);
        }
    }
}

// h[row] = silu(gate) * up, where each row of gate_up is [gate | up], each
// `hidden` wide. Grid-stride over rows * hidden.
extern "C" __global__ void swiglu(half_t* h, const float* gate_up, int rows, int hidden) {
    const size_t n = (size_t)rows * hidden;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / hidden;
        const size_t col = i % hidden;
        const float g = gate_up[row * 2 * hidden + col];
        const float u = gate_up[row * 2 * hidden + hidden + col];
        h[i] = f2h(g / (1.0f + expf(-g)) * u);
    }
}

// out[r] = the index of the largest of logits[r * n .. (r + 1) * n], the
// first one on a tie (as the CPU's argmax); NaNs never win. One block of
// 1024 threads per row.
extern "C" __global__ void argmax(int* out, const float* logits, int n) {
    __shared__ float best_value[1024];
    __shared__ int best_index[1024];
    const float* row = logits + (size_t)blockIdx.x * n;
    float value = NEG_INF;
    int index = n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = row[i];
        if (v > value) {  // strided ascending: the first of equals stays
            value = v;
            index = i;
        }
    }
    best_value[threadIdx.x] = value;
    best_index[threadIdx.x] = index;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            const float v = best_value[threadIdx.x + stride];
            const int i = best_index[threadIdx.x + stride];
            if (v > best_value[threadIdx.x] || (v == best_value[threadIdx.x] && i < best_index[threadIdx.x])) {
                best_value[threadIdx.x] = v;
                best_index[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_index[0] < n ? best_index[0] : 0;
}
"#;

/// Compiles [`SOURCE`] to PTX for `arch` (`"compute_90"` and the like).
/// Needs only NVRTC, not a GPU.
pub fn compile(arch: &'static str) -> Result<Ptx, CudaError> {
    super::require_library(super::Library::Nvrtc)?;
    let options = CompileOptions {
        arch: Some(arch),
        name: Some("breakwater_kernels.cu".into()),
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(SOURCE, options).map_err(|e| CudaError::Compile(compile_error(e)))
}

/// NVRTC's log, which names the line, rather than its status code alone.
fn compile_error(e: cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => format!("{other:?}"),
    }
}
