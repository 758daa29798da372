// Register-tiled dot-product kernels for x · wᵀ when M is small (decode) or when no BLAS is
// available: each weight row is streamed once per tile of MT activation rows, with MT*NT
// vector accumulators in flight to hide FMA latency. Weights are f32 or bf16 (uint16_t).
#pragma once
#include <algorithm>
#include <cstdint>

#include "backend/cpu/simd.h"

namespace redknot::cpu {

// out[m, n] = dot(x[m, :], w[n, :]) + bias[n] for m < MT, n in [n0, n0 + NT).
// x: [MT rows, K] with row stride ldx; w: [N, K]; bias: [N] or null; out row stride ldo.
template <int MT, int NT, typename WT>
inline void dot_tile(const float* x, int64_t ldx, const WT* w, int64_t k_dim, int64_t n0,
                     const float* bias, float* out, int64_t ldo) {
  using V = Simd::V;
  constexpr int kW = Simd::kWidth;
  V acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = Simd::zero();
  const WT* wr[NT];
  for (int n = 0; n < NT; ++n) wr[n] = w + (n0 + n) * k_dim;
  int64_t k = 0;
  for (; k + kW <= k_dim; k += kW) {
    V wv[NT];
    for (int n = 0; n < NT; ++n) wv[n] = Simd::load(wr[n] + k);
    for (int m = 0; m < MT; ++m) {
      const V xv = Simd::load(x + m * ldx + k);
      for (int n = 0; n < NT; ++n) acc[m][n] = Simd::fma(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int n = 0; n < NT; ++n) {
      float s = Simd::sum(acc[m][n]);
      for (int64_t kk = k; kk < k_dim; ++kk) s += x[m * ldx + kk] * load_scalar(wr[n] + kk);
      out[m * ldo + n0 + n] = s + (bias ? bias[n0 + n] : 0.0f);
    }
  }
}

// Rows [n_begin, n_end) of out for MT activation rows; NT weight rows per step, then singles.
template <int MT, int NT, typename WT>
inline void dot_rows(const float* x, int64_t ldx, const WT* w, int64_t k_dim, int64_t n_begin,
                     int64_t n_end, const float* bias, float* out, int64_t ldo) {
  int64_t n = n_begin;
  for (; n + NT <= n_end; n += NT) dot_tile<MT, NT>(x, ldx, w, k_dim, n, bias, out, ldo);
  for (; n < n_end; ++n) dot_tile<MT, 1>(x, ldx, w, k_dim, n, bias, out, ldo);
}

// All M rows of x against weight rows [n_begin, n_end): tiles of 4 activation rows, then the
// 1-3 leftover rows. Tile sizes keep MT*NT + MT + NT vector registers below the file size.
template <typename WT>
inline void gemm_rows(const float* x, int64_t m_rows, const WT* w, int64_t k_dim, int64_t n_begin,
                      int64_t n_end, const float* bias, float* out, int64_t ldo) {
  constexpr bool kWide = Simd::kWidth >= 16;  // 32 registers on AVX-512, 16 on AVX2
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) {
    if constexpr (kWide)
      dot_rows<4, 4>(x + m * k_dim, k_dim, w, k_dim, n_begin, n_end, bias, out + m * ldo, ldo);
    else
      dot_rows<4, 2>(x + m * k_dim, k_dim, w, k_dim, n_begin, n_end, bias, out + m * ldo, ldo);
  }
  const float* xm = x + m * k_dim;
  float* om = out + m * ldo;
  switch (m_rows - m) {
    case 3:
      dot_rows<3, 2>(xm, k_dim, w, k_dim, n_begin, n_end, bias, om, ldo);
      break;
    case 2:
      dot_rows<2, 4>(xm, k_dim, w, k_dim, n_begin, n_end, bias, om, ldo);
      break;
    case 1:
      dot_rows<1, 4>(xm, k_dim, w, k_dim, n_begin, n_end, bias, om, ldo);
      break;
    default:
      break;
  }
}

}  // namespace redknot::cpu
