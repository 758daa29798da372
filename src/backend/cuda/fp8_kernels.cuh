// FP8 (e4m3, torch.float8_e4m3fn) kernels of the CUDA backend: per-row quantization of GEMM
// activations and KV rows, dequantization, the scaling epilogue of the cuBLASLt FP8 GEMM, and a
// plain tiled FP8 GEMM for 128x128 block scales (cuBLASLt has no block scaling on sm_90) and for
// shapes cuBLASLt's FP8 kernels cannot take. Every rule matches the host one (core/dtype.h):
// scale = absmax / 448 and x / scale as IEEE f32 divisions, round-to-nearest-even, saturation.
#pragma once
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/kernels.cuh"

namespace redknot::cuda {

// Max over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) / 32;
  v = lane < n_warps ? scratch[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Rows of e4m3 codes `stride` bytes apart. The row's f32 scale lives in scale[r], or, for FP8
// KV rows (scale == nullptr), in the row's bytes [cols, cols + 4).
struct Fp8RowsParams {
  int64_t cols;    // C
  int64_t stride;  // C (activations) or C + 4 (FP8 KV rows)
};

// One block per row: scale = absmax / 448, codes = e4m3(x / scale) (0 when scale == 0).
// x: [R, C]; q: [R, stride] bytes; scale: [R] f32 or nullptr (KV rows)
template <typename T>
__global__ void quantize_fp8_rows_kernel(const T* x, Fp8RowsParams p, uint8_t* q, float* scale) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * p.cols;
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x)
    amax = fmaxf(amax, fabsf(to_f32(xr[c])));
  amax = block_max(amax, scratch);
  const float s = __fdiv_rn(amax, 448.0f);
  uint8_t* qr = q + blockIdx.x * p.stride;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x)
    qr[c] = s > 0.0f ? f32_to_e4m3(__fdiv_rn(to_f32(xr[c]), s)) : uint8_t{0};
  if (threadIdx.x == 0) {
    if (scale != nullptr)
      scale[blockIdx.x] = s;
    else
      memcpy(qr + p.cols, &s, sizeof(s));
  }
}

// out[r, c] = e4m3(q[r, c]) * scale_r. q: [R, stride] bytes; scale: [R] or nullptr; out: [R, C]
template <typename T>
__global__ void dequantize_fp8_rows_kernel(const uint8_t* q, const float* scale, Fp8RowsParams p,
                                           T* out) {
  const uint8_t* qr = q + blockIdx.x * p.stride;
  float s;
  if (scale != nullptr)
    s = scale[blockIdx.x];
  else
    memcpy(&s, qr + p.cols, sizeof(s));
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x)
    out[blockIdx.x * p.cols + c] = from_f32<T>(e4m3_to_f32(qr[c]) * s);
}

// The FP8 GEMM family: out[m, n] = sx[m] * Σ_k xq[m, k] · w[n, k] · ws(n, k) + bias[n], with
// ws(n, k) = w_scale[n] (per channel) or w_scale[n / 128, k / 128] (blocks).
struct Fp8GemmParams {
  int64_t m, n, k;
  int64_t k_blocks;  // columns of a block-scale matrix; 0: per-channel scales
};

// Epilogue of the cuBLASLt FP8 GEMM (per-channel weights): out = acc * sx[m] * sw[n] + bias[n].
// acc: [M, N] f32 (the unscaled e4m3 products); sx: [M]; sw: [N]; bias: [N] or nullptr
template <typename T>
__global__ void fp8_scale_epilogue_kernel(const float* acc, const float* sx, const float* sw,
                                          const float* bias, Fp8GemmParams p, T* out) {
  const int64_t total = p.m * p.n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / p.n, c = i % p.n;
    out[i] = from_f32<T>(acc[i] * sx[r] * sw[c] + (bias != nullptr ? bias[c] : 0.0f));
  }
}

inline constexpr int kFp8GemmTile = 16;  // output tile edge; 256 threads
inline constexpr int kFp8GemmK = 32;     // K step through shared memory

// The plain FP8 GEMM: 16x16 output tiles, operands dequantized into shared memory (block scales
// inside the sum, per-channel scales after it), f32 accumulation. Correct for every layout and
// shape; not tuned (block-scaled checkpoints on Hopper want a DeepGEMM-style wgmma kernel).
// xq: [M, K] codes; sx: [M]; w: [N, K] codes; w_scale: [N] or [ceil(N/128), k_blocks];
// bias: [N] or nullptr; out: [M, N]
template <typename T>
__global__ void fp8_gemm_simple_kernel(const uint8_t* xq, const float* sx, const uint8_t* w,
                                       const float* w_scale, const float* bias, Fp8GemmParams p,
                                       T* out) {
  __shared__ float xs[kFp8GemmTile][kFp8GemmK + 1];
  __shared__ float wt[kFp8GemmTile][kFp8GemmK + 1];
  const int tx = threadIdx.x % kFp8GemmTile, ty = threadIdx.x / kFp8GemmTile;
  const int64_t m0 = int64_t{blockIdx.y} * kFp8GemmTile, n0 = int64_t{blockIdx.x} * kFp8GemmTile;
  const bool blocked = p.k_blocks > 0;
  float acc = 0.0f;
  for (int64_t k0 = 0; k0 < p.k; k0 += kFp8GemmK) {
    for (int i = threadIdx.x; i < kFp8GemmTile * kFp8GemmK; i += blockDim.x) {
      const int r = i / kFp8GemmK, c = i % kFp8GemmK;
      const int64_t gk = k0 + c, gm = m0 + r, gn = n0 + r;
      xs[r][c] = gm < p.m && gk < p.k ? e4m3_to_f32(xq[gm * p.k + gk]) : 0.0f;
      float wv = 0.0f;
      if (gn < p.n && gk < p.k) {
        wv = e4m3_to_f32(w[gn * p.k + gk]);
        if (blocked) wv *= w_scale[(gn / 128) * p.k_blocks + gk / 128];
      }
      wt[r][c] = wv;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kFp8GemmK; ++c) acc += xs[ty][c] * wt[tx][c];
    __syncthreads();
  }
  const int64_t r = m0 + ty, c = n0 + tx;
  if (r < p.m && c < p.n)
    out[r * p.n + c] = from_f32<T>(acc * sx[r] * (blocked ? 1.0f : w_scale[c]) +
                                   (bias != nullptr ? bias[c] : 0.0f));
}

}  // namespace redknot::cuda
