// Skinny GEMMs for decode steps: out[M, N] = x[M, K] · w[N, K]ᵀ (+ bias) with M <= kSkinnyMaxRows.
// Such a product only has to read w once, so it runs at memory bandwidth or not at all; cuBLASLt's
// tile kernels reach ~60% of it at M = 1 (issue #19's decode profile). Here one warp owns one
// output channel: its lanes stream the channel's weight row in 16-byte chunks (consecutive lanes,
// consecutive chunks: coalesced; kSkinnyUnroll chunks in flight per lane, loaded past L1 so that
// the activations stay there), multiply each chunk with the same chunk of every activation row
// (L1/L2-resident: M rows of K), and reduce the M sums by shuffles. f32 accumulation.
//   bf16 weights: K % 8 == 0 (16-byte chunks of 8), rows 16-byte aligned.
//   FP8 weights (e4m3 codes): K % 16 == 0; the activations come quantized per row as matmul_fp8
//     defines it (scale sx = absmax / 448, codes), here decoded to f32 code values, so the sum is
//     Σ code_x · code_w as in the cuBLASLt FP8 GEMM, then × sx · sw (per channel) or each
//     16-code chunk × its 128x128 block scale (a chunk never straddles a block).
// Other shapes, alignments and M > kSkinnyMaxRows take the tiled paths.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/fp8_kernels.cuh"
#include "backend/cuda/kernels.cuh"

namespace redknot::cuda {

inline constexpr int64_t kSkinnyMaxRows = 8;
inline constexpr int kSkinnyWarps = 8;   // warps (output channels) per block
inline constexpr int kSkinnyUnroll = 4;  // 16-byte weight chunks in flight per lane

struct SkinnyGemmParams {
  int64_t n, k;
  int64_t k_blocks;  // FP8: columns of the 128x128 block-scale matrix; 0: per-channel scales
};

// Streaming 16-byte load: read once, not kept in L1.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The two bf16 of a 32-bit word as f32 (low half first).
__device__ __forceinline__ float2 bf16x2_to_f32(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}

// x: [M, K] bf16; w: [N, K] bf16; bias: [N] f32 or nullptr; out: [M, N]. Grid: N / kSkinnyWarps
// blocks (rounded up) of 32 * kSkinnyWarps threads.
template <typename T, int M>
__global__ void __launch_bounds__(32 * kSkinnyWarps)
    skinny_gemm_bf16_kernel(const __nv_bfloat16* __restrict__ x,
                            const __nv_bfloat16* __restrict__ w, const float* __restrict__ bias,
                            SkinnyGemmParams p, T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t{blockIdx.x} * kSkinnyWarps + threadIdx.x / 32;
  if (n >= p.n) return;
  const __nv_bfloat16* w_row = w + n * p.k;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  constexpr int64_t kStep = 32 * 8;  // elements a warp covers per chunk
  for (int64_t k0 = lane * 8; k0 < p.k; k0 += kStep * kSkinnyUnroll) {
    uint4 wv[kSkinnyUnroll];
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u)
      wv[u] = k0 + u * kStep < p.k ? load_stream16(w_row + k0 + u * kStep) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      const int64_t k = k0 + u * kStep;
      if (k >= p.k) break;
      const float2 w0 = bf16x2_to_f32(wv[u].x), w1 = bf16x2_to_f32(wv[u].y),
                   w2 = bf16x2_to_f32(wv[u].z), w3 = bf16x2_to_f32(wv[u].w);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * p.k + k));
        const float2 x0 = bf16x2_to_f32(xv.x), x1 = bf16x2_to_f32(xv.y), x2 = bf16x2_to_f32(xv.z),
                     x3 = bf16x2_to_f32(xv.w);
        float s = acc[m];
        s = fmaf(w0.x, x0.x, s);
        s = fmaf(w0.y, x0.y, s);
        s = fmaf(w1.x, x1.x, s);
        s = fmaf(w1.y, x1.y, s);
        s = fmaf(w2.x, x2.x, s);
        s = fmaf(w2.y, x2.y, s);
        s = fmaf(w3.x, x3.x, s);
        s = fmaf(w3.y, x3.y, s);
        acc[m] = s;
      }
    }
  }
  const float b = bias != nullptr ? bias[n] : 0.0f;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == m % 32) out[m * p.n + n] = from_f32<T>(s + b);
  }
}

// The activations of an FP8 skinny GEMM: one block per row, sx = absmax / 448 and the row's e4m3
// codes (quantize_fp8_rows_kernel's rule) decoded to f32 code values.
// x: [M, K]; xc: [M, K] f32; sx: [M]
template <typename T>
__global__ void quantize_fp8_rows_decoded_kernel(const T* x, int64_t cols, float* xc, float* sx) {
  __shared__ float scratch[32];
  const T* xr = x + blockIdx.x * cols;
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) amax = fmaxf(amax, fabsf(to_f32(xr[c])));
  amax = block_max(amax, scratch);
  const float s = __fdiv_rn(amax, 448.0f);
  float* qr = xc + blockIdx.x * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    qr[c] = s > 0.0f ? e4m3_to_f32(f32_to_e4m3(__fdiv_rn(to_f32(xr[c]), s))) : 0.0f;
  if (threadIdx.x == 0) sx[blockIdx.x] = s;
}

// Four e4m3 codes (one 32-bit word, lowest byte first) as f32.
__device__ __forceinline__ void e4m3x4_to_f32(uint32_t v, float* f) {
  const __half2_raw lo =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v & 0xFFFFu), __NV_E4M3);
  const __half2_raw hi =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v >> 16), __NV_E4M3);
  const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
  f[0] = a.x;
  f[1] = a.y;
  f[2] = b.x;
  f[3] = b.y;
}

// xc: [M, K] f32 code values; sx: [M]; w: [N, K] e4m3 codes; w_scale: [N] or
// [ceil(N/128), k_blocks]; bias: [N] f32 or nullptr; out: [M, N]. Grid as the bf16 kernel.
template <typename T, int M>
__global__ void __launch_bounds__(32 * kSkinnyWarps)
    skinny_gemm_fp8_kernel(const float* __restrict__ xc, const float* __restrict__ sx,
                           const uint8_t* __restrict__ w, const float* __restrict__ w_scale,
                           const float* __restrict__ bias, SkinnyGemmParams p,
                           T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t{blockIdx.x} * kSkinnyWarps + threadIdx.x / 32;
  if (n >= p.n) return;
  const uint8_t* w_row = w + n * p.k;
  const bool blocked = p.k_blocks > 0;
  const float* block_scale = blocked ? w_scale + (n / 128) * p.k_blocks : nullptr;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  constexpr int64_t kStep = 32 * 16;  // codes a warp covers per chunk
  for (int64_t k0 = lane * 16; k0 < p.k; k0 += kStep * kSkinnyUnroll) {
    uint4 wv[kSkinnyUnroll];
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u)
      wv[u] = k0 + u * kStep < p.k ? load_stream16(w_row + k0 + u * kStep) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      const int64_t k = k0 + u * kStep;
      if (k >= p.k) break;
      float wf[16];
      e4m3x4_to_f32(wv[u].x, wf);
      e4m3x4_to_f32(wv[u].y, wf + 4);
      e4m3x4_to_f32(wv[u].z, wf + 8);
      e4m3x4_to_f32(wv[u].w, wf + 12);
      const float bs = blocked ? block_scale[k / 128] : 1.0f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4* xr = reinterpret_cast<const float4*>(xc + m * p.k + k);
        float s = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 xv = __ldg(xr + q);
          s = fmaf(wf[4 * q], xv.x, s);
          s = fmaf(wf[4 * q + 1], xv.y, s);
          s = fmaf(wf[4 * q + 2], xv.z, s);
          s = fmaf(wf[4 * q + 3], xv.w, s);
        }
        acc[m] = fmaf(s, bs, acc[m]);
      }
    }
  }
  const float b = bias != nullptr ? bias[n] : 0.0f;
  const float sw = blocked ? 1.0f : w_scale[n];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == m % 32) out[m * p.n + n] = from_f32<T>(s * sx[m] * sw + b);
  }
}

}  // namespace redknot::cuda
