// Skinny GEMMs for decode steps: out[M, N] = x[M, K] · w[N, K]ᵀ (+ bias) with M <= kSkinnyMaxRows.
// Such a product only has to read w once, so it runs at memory bandwidth or not at all. A block
// owns 16 output channels; its kSkinnyWarps warps split K (window j of 64 bytes per row goes to
// warp j % kSkinnyWarps) and meet in shared memory at the end. Each window is two tensor-core
// MMAs, 16 channels x 8 activation rows (rows >= M are zeros): lane (g = lane / 4, q = lane % 4)
// loads 16 contiguous bytes of channels g and g + 8 and of activation row g at byte 16 q of the
// window (coalesced 16-byte loads straight into registers, kSkinnyUnroll windows in flight),
// and hands word i of them to the MMA as the fragment word the layout puts at lane q. That
// permutes K the same way in both operands, so each MMA still sums every product of its window
// once, in f32:
//   bf16: mma m16n8k16 (words 0-1, then 2-3: 4 + 4 elements per lane per MMA);
//   FP8:  mma m16n8k32 e4m3, activations quantized per row first as matmul_fp8 defines it
//         (sx = absmax / 448, codes), so the sum is Σ code_x · code_w as in the cuBLASLt FP8
//         GEMM, times sx · sw (per channel) or, per 64-code window, its 128x128 block scale (a
//         window never straddles a block, and 16 channels never straddle a block row).
// K must fill whole 16-byte chunks (bf16: K % 8 == 0; FP8: K % 16 == 0) with 16-byte aligned
// rows; other shapes, alignments and M > kSkinnyMaxRows take the tiled paths.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/kernels.cuh"
#include "backend/cuda/ptx.cuh"

namespace redknot::cuda {

inline constexpr int64_t kSkinnyMaxRows = 8;  // the MMA's n
inline constexpr int kSkinnyWarps = 8;        // warps splitting K in a block
inline constexpr int kSkinnyUnroll = 4;       // 64-byte windows in flight per warp
inline constexpr int kSkinnyChannels = 16;    // output channels per block (the MMA's m)

struct SkinnyGemmParams {
  int64_t m, n, k;
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

// One 64-byte window: channels g, g + 8 (w_lo, w_hi) and activation row g (xv) at byte 16 q.
template <bool kFp8>
__device__ __forceinline__ void skinny_window(float (&d)[4], const uint4& w_lo, const uint4& w_hi,
                                              const uint4& xv) {
  const uint32_t a0[4] = {w_lo.x, w_hi.x, w_lo.y, w_hi.y};
  const uint32_t a1[4] = {w_lo.z, w_hi.z, w_lo.w, w_hi.w};
  if constexpr (kFp8) {
    mma_e4m3(d, a0, xv.x, xv.y);
    mma_e4m3(d, a1, xv.z, xv.w);
  } else {
    mma_bf16(d, a0, xv.x, xv.y);
    mma_bf16(d, a1, xv.z, xv.w);
  }
}

// kFp8 false: x [M, K] bf16, w [N, K] bf16, no scales. kFp8 true: x [M, K] e4m3 codes with sx [M],
// w [N, K] e4m3 codes with w_scale [N] or [ceil(N/128), k_blocks]. bias: [N] f32 or nullptr;
// out: [M, N]. Grid: ceil(N / 16) blocks of 32 * kSkinnyWarps threads.
template <typename T, bool kFp8>
__global__ void __launch_bounds__(32 * kSkinnyWarps)
    skinny_gemm_kernel(const uint8_t* __restrict__ x, const float* __restrict__ sx,
                       const uint8_t* __restrict__ w, const float* __restrict__ w_scale,
                       const float* __restrict__ bias, SkinnyGemmParams p, T* __restrict__ out) {
  __shared__ float partial[kSkinnyWarps][32][4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q = lane % 4;
  const int64_t n0 = int64_t{blockIdx.x} * kSkinnyChannels;
  constexpr int64_t kElem = kFp8 ? 1 : 2;
  const int64_t row_bytes = p.k * kElem;
  // Rows past N / M read nothing and contribute zeros.
  const bool lo_ok = n0 + g < p.n, hi_ok = n0 + g + 8 < p.n, x_ok = g < p.m;
  const uint8_t* w_lo = w + (n0 + g) * row_bytes + q * 16;
  const uint8_t* w_hi = w + (n0 + g + 8) * row_bytes + q * 16;
  const uint8_t* x_row = x + g * row_bytes + q * 16;
  const bool blocked = kFp8 && p.k_blocks > 0;
  const float* block_scale = blocked ? w_scale + (n0 / 128) * p.k_blocks : nullptr;
  constexpr int64_t kStride = 64 * kSkinnyWarps;  // bytes between a warp's windows
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t kb0 = warp * 64; kb0 < row_bytes; kb0 += kStride * kSkinnyUnroll) {
    uint4 lo[kSkinnyUnroll], hi[kSkinnyUnroll], xv[kSkinnyUnroll];
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      const int64_t kb = kb0 + u * kStride;
      const bool in = kb + q * 16 < row_bytes;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      lo[u] = in && lo_ok ? load_stream16(w_lo + kb) : zero;
      hi[u] = in && hi_ok ? load_stream16(w_hi + kb) : zero;
      xv[u] = in && x_ok ? __ldg(reinterpret_cast<const uint4*>(x_row + kb)) : zero;
    }
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      const int64_t kb = kb0 + u * kStride;
      if (kb >= row_bytes) break;
      if (blocked) {
        float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        skinny_window<kFp8>(t, lo[u], hi[u], xv[u]);
        const float bs = block_scale[kb / 128];
#pragma unroll
        for (int i = 0; i < 4; ++i) d[i] = fmaf(t[i], bs, d[i]);
      } else {
        skinny_window<kFp8>(d, lo[u], hi[u], xv[u]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][lane][i] = d[i];
  __syncthreads();
  // Thread t < 128 sums element t % 4 of lane t / 4's fragment over the warps: channel
  // g (+8 for elements 2-3), activation row 2 q (+1 for odd elements).
  if (threadIdx.x >= 128) return;
  const int src = threadIdx.x / 4, e = threadIdx.x % 4;
  float v = 0.0f;
#pragma unroll
  for (int wi = 0; wi < kSkinnyWarps; ++wi) v += partial[wi][src][e];
  const int64_t n = n0 + src / 4 + (e >= 2 ? 8 : 0);
  const int64_t m = 2 * (src % 4) + (e & 1);
  if (n >= p.n || m >= p.m) return;
  if constexpr (kFp8) v *= sx[m] * (blocked ? 1.0f : w_scale[n]);
  out[m * p.n + n] = from_f32<T>(v + (bias != nullptr ? bias[n] : 0.0f));
}

}  // namespace redknot::cuda
