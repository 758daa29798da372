// Streaming (flash-style) attention for one query token and one kv head on the CPU: the keys
// the mask lets through are walked in blocks with an online softmax in f32, so memory stays
// O(block) for any context length. The query heads sharing the kv head (GQA) are processed
// together so every K/V row is read once per group. Keys outside the window are skipped by
// loop bounds when k_pos is ascending; otherwise each key is tested.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/paged_attention_kernel.h"  // accumulate_pv_kv
#include "backend/cpu/simd.h"

namespace redknot::cpu {

struct AttentionArgs {
  const float* q;        // [Tq, Hq, D]
  const float* k;        // [Hkv, Tk, D] with head stride kv_head_stride
  const float* v;        // same layout as k
  float* out;            // [Tq, Hq, D]
  const int32_t* q_pos;  // [Tq]
  const int32_t* k_pos;  // [Tk]
  int64_t hq, hkv, d, tk, kv_head_stride;
  bool k_pos_ascending;  // enables binary-searched key ranges
  AttentionMask mask;
};

// Per-thread scratch, reused across the tasks of one chunk.
struct AttentionScratch {
  static constexpr int64_t kBlock = 32;  // keys per online-softmax step (K/V block fits L1)
  std::vector<float> scores, acc, row_max, row_sum;
  void reserve(int64_t group, int64_t d) {
    scores.resize(group * kBlock);
    acc.resize(group * d);
    row_max.resize(group);
    row_sum.resize(group);
  }
};

// Half-open key index ranges visible to a query at position qp (at most two: sinks, window).
inline int visible_ranges(const AttentionArgs& a, int32_t qp, int64_t begin[2], int64_t end[2]) {
  const int32_t* kp = a.k_pos;
  const int64_t hi = std::upper_bound(kp, kp + a.tk, qp) - kp;  // keys with kpos <= qp
  if (a.mask.window <= 0) {
    begin[0] = 0;
    end[0] = hi;
    return 1;
  }
  const int64_t first_in_window = static_cast<int64_t>(qp) - a.mask.window + 1;
  const int32_t lo_pos = static_cast<int32_t>(std::max<int64_t>(first_in_window, INT32_MIN));
  const int64_t lo = std::min(hi, std::lower_bound(kp, kp + a.tk, lo_pos) - kp);
  const int64_t sink_end = std::lower_bound(kp, kp + a.tk, a.mask.sink) - kp;  // kpos < sink
  begin[0] = 0;
  end[0] = std::min({sink_end, lo, hi});
  begin[1] = lo;
  end[1] = hi;
  return 2;
}

inline bool visible(const AttentionArgs& a, int32_t qp, int32_t kp) {
  if (kp > qp) return false;
  return a.mask.window <= 0 || static_cast<int64_t>(qp) - kp < a.mask.window || kp < a.mask.sink;
}

// Output of query token i for the query heads of kv head g.
inline void attention_task(const AttentionArgs& a, int64_t i, int64_t g, AttentionScratch& s) {
  constexpr int64_t kBlock = AttentionScratch::kBlock;
  const int64_t group = a.hq / a.hkv, d = a.d;
  const int32_t qp = a.q_pos[i];
  const float* q0 = a.q + (i * a.hq + g * group) * d;
  const float* kh = a.k + g * a.kv_head_stride;
  const float* vh = a.v + g * a.kv_head_stride;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(s.acc.begin(), s.acc.end(), 0.0f);
  std::fill(s.row_max.begin(), s.row_max.end(), neg_inf);
  std::fill(s.row_sum.begin(), s.row_sum.end(), 0.0f);

  int64_t begin[2] = {0, 0}, end[2] = {a.tk, a.tk};
  int n_ranges = 1;
  if (a.k_pos_ascending) n_ranges = visible_ranges(a, qp, begin, end);
  const bool test_each_key = !a.k_pos_ascending;

  for (int r = 0; r < n_ranges; ++r) {
    for (int64_t j0 = begin[r]; j0 < end[r]; j0 += kBlock) {
      const int64_t nb = std::min(kBlock, end[r] - j0);
      for (int64_t h = 0; h < group; ++h) {
        const float* qh = q0 + h * d;
        float* sc = s.scores.data() + h * kBlock;
        float block_max = neg_inf;
        for (int64_t j = 0; j < nb; ++j) {
          float score = dot(qh, kh + (j0 + j) * d, d) * a.mask.scale;
          if (test_each_key && !visible(a, qp, a.k_pos[j0 + j])) score = neg_inf;
          sc[j] = score;
          block_max = std::max(block_max, score);
        }
        if (block_max == neg_inf) continue;  // every key of the block masked for this head
        const float new_max = std::max(s.row_max[h], block_max);
        const float correction = std::exp(s.row_max[h] - new_max);  // 0 on the first block
        s.row_max[h] = new_max;
        float sum = s.row_sum[h] * correction;
        float* acc = s.acc.data() + h * d;
        if (correction != 1.0f)
          for (int64_t c = 0; c < d; ++c) acc[c] *= correction;
        // Probabilities of the block, vectorised (masked keys give exactly 0).
        int64_t j = 0;
        const Simd::V neg_max = Simd::set1(-new_max);
        Simd::V sum_v = Simd::zero();
        for (; j + Simd::kWidth <= nb; j += Simd::kWidth) {
          const Simd::V p = Simd::exp(Simd::add(Simd::load(sc + j), neg_max));
          Simd::store(sc + j, p);
          sum_v = Simd::add(sum_v, p);
        }
        sum += Simd::sum(sum_v);
        for (; j < nb; ++j) {
          sc[j] = std::exp(sc[j] - new_max);
          sum += sc[j];
        }
        accumulate_pv_kv(sc, vh + j0 * d, nb, d, acc);
        s.row_sum[h] = sum;
      }
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* o = a.out + (i * a.hq + g * group + h) * d;
    const float* acc = s.acc.data() + h * d;
    // A query that sees no key outputs zeros.
    const float inv = s.row_sum[h] > 0.0f ? 1.0f / s.row_sum[h] : 0.0f;
    for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * inv;
  }
}

}  // namespace redknot::cpu
