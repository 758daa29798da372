// CUDA kernels of the CUDA backend, templated on the element type (float or __nv_bfloat16)
// so that one body serves bf16 activations and f32 logits. Math is always f32. Launchers live
// in cuda_backend.cu. These are simple, correct kernels; fused/tuned versions come later.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>

namespace redknot::cuda {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// e4m3 (torch.float8_e4m3fn) decode: exact; 0x7F / 0xFF give NaN.
__device__ __forceinline__ float e4m3_to_f32(uint8_t v) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3)));
}
// e4m3 encode: round-to-nearest-even, saturating to ±448 (core/dtype.h's f32_to_fp8_e4m3).
__device__ __forceinline__ uint8_t f32_to_e4m3(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// Rows of a K/V page pool as the kernels read them: TKV elements, D per row (float, bf16), or
// FP8 KV rows (uint8_t): D e4m3 codes, then the row's f32 scale in bytes [D, D + 4).
template <typename TKV>
struct PoolRows {
  static __device__ __forceinline__ const TKV* row(const TKV* pool, int64_t r, int64_t d) {
    return pool + r * d;
  }
  static __device__ __forceinline__ float scale(const TKV*, int64_t) { return 1.0f; }
  static __device__ __forceinline__ float at(const TKV* row, int64_t c) { return to_f32(row[c]); }
};
template <>
struct PoolRows<uint8_t> {
  static __device__ __forceinline__ const uint8_t* row(const uint8_t* pool, int64_t r, int64_t d) {
    return pool + r * (d + 4);
  }
  static __device__ __forceinline__ float scale(const uint8_t* row, int64_t d) {
    float s;
    memcpy(&s, row + d, sizeof(s));
    return s;
  }
  static __device__ __forceinline__ float at(const uint8_t* row, int64_t c) {
    return e4m3_to_f32(row[c]);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) / 32;
  v = lane < n_warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// out[t, :] = table[ids[t], :]; one block per token. Out-of-range ids give a zero row.
// table: [vocab, hidden]; ids: [T]; out: [T, hidden]
template <typename TOut, typename TTable>
__global__ void embedding_kernel(const TTable* table, const int32_t* ids, int64_t vocab,
                                 int64_t hidden, TOut* out) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  const bool valid = id >= 0 && id < vocab;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x)
    out[t * hidden + c] = from_f32<TOut>(valid ? to_f32(table[id * hidden + c]) : 0.0f);
}

// out[m, n] += bias[n]. out: [M, N]; bias: [N] f32
template <typename T>
__global__ void add_bias_kernel(T* out, const float* bias, int64_t m_rows, int64_t n_cols) {
  const int64_t total = m_rows * n_cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = from_f32<T>(to_f32(out[i]) + bias[i % n_cols]);
}

// One block per row: out = x * rsqrt(mean(x^2) + eps) * w. out may alias x.
// x, out: [R, C]; w: [C]
template <typename T, typename TW>
__global__ void rmsnorm_kernel(const T* x, const TW* w, float eps, int64_t cols, T* out) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * cols;
  T* yr = out + blockIdx.x * cols;
  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_f32(xr[c]);
    sum_sq += v * v;
  }
  sum_sq = block_sum(sum_sq, scratch);
  const float inv_rms = rsqrtf(sum_sq / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    yr[c] = from_f32<T>(to_f32(xr[c]) * inv_rms * to_f32(w[c]));
}

// One block per row: x += y (stored as T), then out = x * rsqrt(mean(x^2) + eps) * w from the
// stored values: bit-identical to add_kernel then rmsnorm_kernel (same rounding, same per-thread
// summation order), one pass fewer over x. Each thread re-reads only the elements it wrote.
// x, y, out: [R, C]; w: [C]
template <typename T, typename TW>
__global__ void add_rmsnorm_kernel(T* x, const T* y, const TW* w, float eps, int64_t cols, T* out) {
  __shared__ float scratch[32];
  T* xr = x + blockIdx.x * cols;
  const T* yr = y + blockIdx.x * cols;
  T* orow = out + blockIdx.x * cols;
  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const T s = from_f32<T>(to_f32(xr[c]) + to_f32(yr[c]));
    xr[c] = s;
    const float v = to_f32(s);
    sum_sq += v * v;
  }
  sum_sq = block_sum(sum_sq, scratch);
  const float inv_rms = rsqrtf(sum_sq / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    orow[c] = from_f32<T>(to_f32(xr[c]) * inv_rms * to_f32(w[c]));
}

// out[r] = ||x[r, :]||_2 in f32 (Sparse FFN token importance); one block per row.
template <typename T>
__global__ void row_l2norm_kernel(const T* x, int64_t cols, float* out) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * cols;
  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_f32(xr[c]);
    sum_sq += v * v;
  }
  sum_sq = block_sum(sum_sq, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = sqrtf(sum_sq);
}

// x += y over n elements.
template <typename T>
__global__ void add_kernel(T* x, const T* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    x[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i]));
}

// out = silu(gate) * up over n elements.
template <typename T>
__global__ void swiglu_kernel(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = to_f32(gate[i]);
    out[i] = from_f32<T>(g / (1.0f + expf(-g)) * to_f32(up[i]));
  }
}

// In-place rotate-half RoPE; one block per token, threads over (head, pair).
// x: [T, H, D]; pos: [T]; inv_freq: [D/2]
template <typename T>
__global__ void rope_kernel(T* x, const int32_t* pos, const float* inv_freq, int64_t heads,
                            int64_t d, float scaling) {
  const int64_t t = blockIdx.x, half = d / 2;
  const float p = static_cast<float>(pos[t]);
  for (int64_t idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int64_t h = idx / half, i = idx % half;
    // Angle, cos and sin in f32 (precise cosf/sinf) as HF computes them.
    const float angle = p * inv_freq[i];
    const float c = cosf(angle), s = sinf(angle);
    T* xh = x + (t * heads + h) * d;
    const float x0 = to_f32(xh[i]), x1 = to_f32(xh[i + half]);
    xh[i] = from_f32<T>((x0 * c - x1 * s) * scaling);
    xh[i + half] = from_f32<T>((x1 * c + x0 * s) * scaling);
  }
}

struct AttentionParams {
  int64_t hq, hkv, d, tk, kv_head_stride;
  float scale;
  int32_t window, sink;
};

inline constexpr int kAttnWarps = 4;
inline constexpr int kAttnMaxDimsPerLane = 8;  // head_dim <= 256

// One block per (query token, query head); each warp streams a quarter of the keys with an
// online softmax (lane l owns dims l, l+32, ...), then the warps' partial results are merged.
// q, out: [Tq, Hq, D]; k, v: [Hkv, Tk, D] at head stride; q_pos: [Tq]; k_pos: [Tk]
template <typename T>
__global__ void attention_kernel(const T* q, const T* k, const T* v, const int32_t* q_pos,
                                 const int32_t* k_pos, AttentionParams p, T* out) {
  __shared__ float warp_max[kAttnWarps], warp_sum_s[kAttnWarps];
  __shared__ float warp_acc[kAttnWarps][32 * kAttnMaxDimsPerLane];
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t kv_h = h / (p.hq / p.hkv);
  const T* qv = q + (i * p.hq + h) * p.d;
  const T* kh = k + kv_h * p.kv_head_stride;
  const T* vh = v + kv_h * p.kv_head_stride;
  const int32_t qp = q_pos[i];

  float qr[kAttnMaxDimsPerLane], acc[kAttnMaxDimsPerLane];
#pragma unroll
  for (int t = 0; t < kAttnMaxDimsPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    qr[t] = c < p.d ? to_f32(qv[c]) : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -FLT_MAX, l = 0.0f;
  for (int64_t j = warp; j < p.tk; j += kAttnWarps) {
    const int32_t kp = k_pos[j];
    const bool visible =
        kp <= qp && (p.window == 0 || static_cast<int64_t>(qp) - kp < p.window || kp < p.sink);
    if (!visible) continue;  // uniform across the warp
    const T* kj = kh + j * p.d;
    float s = 0.0f;
#pragma unroll
    for (int t = 0; t < kAttnMaxDimsPerLane; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < p.d) s += qr[t] * to_f32(kj[c]);
    }
    s = warp_sum(s) * p.scale;
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new), pj = expf(s - m_new);
    l = l * correction + pj;
    const T* vj = vh + j * p.d;
#pragma unroll
    for (int t = 0; t < kAttnMaxDimsPerLane; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < p.d) acc[t] = acc[t] * correction + pj * to_f32(vj[c]);
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum_s[warp] = l;
  }
#pragma unroll
  for (int t = 0; t < kAttnMaxDimsPerLane; ++t) warp_acc[warp][lane + 32 * t] = acc[t];
  __syncthreads();
  float m_all = -FLT_MAX;
  for (int w = 0; w < kAttnWarps; ++w) m_all = fmaxf(m_all, warp_max[w]);
  float weight[kAttnWarps], l_all = 0.0f;
  for (int w = 0; w < kAttnWarps; ++w) {
    weight[w] = warp_sum_s[w] > 0.0f ? expf(warp_max[w] - m_all) : 0.0f;
    l_all += warp_sum_s[w] * weight[w];
  }
  // A query that sees no key outputs zeros.
  const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
  for (int64_t c = threadIdx.x; c < p.d; c += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) o += warp_acc[w][c] * weight[w];
    out[(i * p.hq + h) * p.d + c] = from_f32<T>(o * inv_l);
  }
}

struct PagedParams {
  int64_t hq, hkv, d, page_size;
  int32_t num_seqs;
  float scale;
};

inline constexpr int kPagedMaxWarps = 8;

// SegPaged attention, simple version: one block per (query row, kv head); warp g serves query
// heads g, g + warps, ... of the GQA group (the group's warps read the same K/V rows, so the
// repeats hit L1/L2). Each warp walks the (sequence, kv head)'s page list from the CSR plan
// with an online softmax; lane l owns dims l, l + 32, ...; pages the query cannot see (causal
// future, outside sink ∪ window) are skipped from their first/last positions.
// q, out: [T, Hq, D]; k_pool, v_pool: [slots, D] (TKV = T) or FP8 KV rows [slots, D + 4]
// (TKV = uint8_t: each row's dot product and value scaled by its own scale); pos_pool: [slots];
// q_pos: [T]; qo_indptr: [num_seqs + 1]; kv_indptr: [num_seqs * Hkv + 1]; page_indices,
// page_lengths: [nnz]; head_window, head_sink: [Hkv]
template <typename T, typename TKV = T>
__global__ void paged_attention_kernel(const T* q, const TKV* k_pool, const TKV* v_pool,
                                       const int32_t* pos_pool, const int32_t* q_pos,
                                       const int32_t* qo_indptr, const int32_t* kv_indptr,
                                       const int32_t* page_indices, const int32_t* page_lengths,
                                       const int32_t* head_window, const int32_t* head_sink,
                                       PagedParams p, T* out) {
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  const int64_t group = p.hq / p.hkv;
  // Sequence of row t: the last s with qo_indptr[s] <= t (sequences may have no rows).
  int32_t lo = 0, hi = p.num_seqs;
  while (hi - lo > 1) {
    const int32_t mid = (lo + hi) / 2;
    if (qo_indptr[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  const int64_t item = int64_t{lo} * p.hkv + h;
  const int32_t e0 = kv_indptr[item], e1 = kv_indptr[item + 1];
  const int32_t qp = q_pos[t], window = head_window[h], sink = head_sink[h];
  const int64_t window_lo = static_cast<int64_t>(qp) - window + 1;

  for (int64_t g = warp; g < group; g += n_warps) {
    const int64_t hq = h * group + g;
    const T* qv = q + (t * p.hq + hq) * p.d;
    float qr[kAttnMaxDimsPerLane], acc[kAttnMaxDimsPerLane];
#pragma unroll
    for (int i = 0; i < kAttnMaxDimsPerLane; ++i) {
      const int64_t c = lane + 32 * i;
      qr[i] = c < p.d ? to_f32(qv[c]) : 0.0f;
      acc[i] = 0.0f;
    }
    float m = -FLT_MAX, l = 0.0f;
    for (int32_t e = e0; e < e1; ++e) {
      const int32_t len = page_lengths[e];
      if (len <= 0) continue;
      const int64_t base = static_cast<int64_t>(page_indices[e]) * p.page_size;
      const int32_t first = pos_pool[base], last = pos_pool[base + len - 1];
      if (first > qp) break;  // positions increase along the list
      if (window > 0 && first >= sink && last < window_lo) continue;
      for (int32_t j = 0; j < len; ++j) {
        const int32_t kp = pos_pool[base + j];
        const bool visible = kp <= qp && (window == 0 || kp >= window_lo || kp < sink);
        if (!visible) continue;  // uniform across the warp
        using Rows = PoolRows<TKV>;
        const TKV* kj = Rows::row(k_pool, base + j, p.d);
        float sc = 0.0f;
#pragma unroll
        for (int i = 0; i < kAttnMaxDimsPerLane; ++i) {
          const int64_t c = lane + 32 * i;
          if (c < p.d) sc += qr[i] * Rows::at(kj, c);
        }
        sc = warp_sum(sc) * Rows::scale(kj, p.d) * p.scale;
        const float m_new = fmaxf(m, sc);
        const float correction = expf(m - m_new), pj = expf(sc - m_new);
        l = l * correction + pj;
        const TKV* vj = Rows::row(v_pool, base + j, p.d);
        const float pv = pj * Rows::scale(vj, p.d);
#pragma unroll
        for (int i = 0; i < kAttnMaxDimsPerLane; ++i) {
          const int64_t c = lane + 32 * i;
          if (c < p.d) acc[i] = acc[i] * correction + pv * Rows::at(vj, c);
        }
        m = m_new;
      }
    }
    // A query that sees no key outputs zeros.
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < kAttnMaxDimsPerLane; ++i) {
      const int64_t c = lane + 32 * i;
      if (c < p.d) out[(t * p.hq + hq) * p.d + c] = from_f32<T>(acc[i] * inv_l);
    }
  }
}

// Index of the row maximum (ties: lowest index); one block per row.
// logits: [R, V]; out: [R]
template <typename T>
__global__ void argmax_kernel(const T* logits, int64_t cols, int32_t* out) {
  __shared__ float best_val_s[32];
  __shared__ long long best_idx_s[32];
  const T* row = logits + blockIdx.x * cols;
  float best = -INFINITY;
  long long best_idx = cols;  // sentinel larger than any index
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_f32(row[c]);
    if (v > best || best_idx == cols) {
      best = v;
      best_idx = c;
    }
  }
  auto better = [](float v, long long i, float bv, long long bi) {
    return v > bv || (v == bv && i < bi);
  };
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, offset);
    const long long idx = __shfl_xor_sync(0xffffffffu, best_idx, offset);
    if (better(v, idx, best, best_idx)) {
      best = v;
      best_idx = idx;
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    best_val_s[warp] = best;
    best_idx_s[warp] = best_idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (blockDim.x + 31) / 32; ++w)
      if (better(best_val_s[w], best_idx_s[w], best, best_idx)) {
        best = best_val_s[w];
        best_idx = best_idx_s[w];
      }
    out[blockIdx.x] = static_cast<int32_t>(best_idx < cols ? best_idx : 0);
  }
}

// Row copies in 16-bit units (every row size here is even in bytes); one block per moved row.
// kScatter: dst[rows[i]] = src[i]; else dst[i] = src[rows[i]]. Out-of-range rows are skipped.
template <bool kScatter>
__global__ void move_rows_kernel(const uint16_t* src, const int32_t* rows, int64_t row_units,
                                 int64_t limit_rows, uint16_t* dst) {
  const int64_t i = blockIdx.x;
  const int32_t r = rows[i];
  if (r < 0 || r >= limit_rows) return;
  const uint16_t* s = src + (kScatter ? i : r) * row_units;
  uint16_t* d = dst + (kScatter ? r : i) * row_units;
  for (int64_t u = threadIdx.x; u < row_units; u += blockDim.x) d[u] = s[u];
}

}  // namespace redknot::cuda
