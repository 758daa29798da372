// SegPaged attention on the CPU: one work unit is (sequence, kv head, block of query rows,
// range of the head's page list). All query heads of the GQA group and all rows of the block
// are processed together, so each K/V page is streamed from memory once per unit and then
// served from L1/L2. Pages a block cannot see (causal future, outside sink ∪ window) are skipped
// from their first/last slot positions; only boundary pages test keys one by one. Softmax is
// online in f32. Long page lists (decode over long contexts) are split into several units whose
// partial (max, sum, acc) results are merged afterwards (flash-decoding), so a few global heads
// still keep every thread busy.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend/cpu/simd.h"

namespace redknot::cpu {

// Raw views of Backend::paged_attention's arguments. TKV: float, or uint16_t for bf16 pools.
template <typename TKV>
struct PagedArgs {
  const float* q;               // [T, Hq, D]
  const TKV* k_pool;            // [slots, D]
  const TKV* v_pool;            // [slots, D]
  const int32_t* pos_pool;      // [slots]
  const int32_t* q_pos;         // [T]
  float* out;                   // [T, Hq, D]
  const int32_t* qo_indptr;     // [num_seqs + 1]
  const int32_t* kv_indptr;     // [num_seqs * Hkv + 1]
  const int32_t* page_indices;  // [nnz]
  const int32_t* page_lengths;  // [nnz]
  const int32_t* head_window;   // [Hkv]
  const int32_t* head_sink;     // [Hkv]
  int64_t hq, hkv, d, page_size;
  float scale;
};

// One unit of work. partial < 0: the unit owns its rows' output; otherwise it writes a partial
// result into slot `partial` and merge_partials() combines the slots of the same rows.
struct PagedUnit {
  int32_t seq, head, row0, row1;  // rows [row0, row1) of the batch
  int32_t entry0, entry1;         // page-list entries [entry0, entry1) of this (seq, head)
  int32_t partial;
  int64_t cost;  // scheduling estimate: rows * entries
};

// Floats of one partial slot: per query vector (row, group head) its max, sum and acc[D].
// Every slot is sized for a full row block.
inline int64_t partial_slot_floats(int64_t rows, int64_t group, int64_t d) {
  return rows * group * (d + 2);
}

inline bool key_visible(int32_t qp, int32_t kp, int32_t window, int32_t sink) {
  return kp <= qp && (window == 0 || int64_t{qp} - kp < window || kp < sink);
}

// Per-thread scratch for units of up to `max_q` query vectors.
struct PagedScratch {
  std::vector<float> scores, acc, row_max, row_sum;
  void reserve(int64_t max_q, int64_t page_size, int64_t d) {
    scores.resize(max_q * page_size);
    acc.resize(max_q * d);
    row_max.resize(max_q);
    row_sum.resize(max_q);
  }
};

// Four dot products of q with keys k0..k3 (f32 or bf16), sharing each load of q.
// q: [d]; k0..k3: [d]
template <typename TKV>
inline void dot4(const float* q, const TKV* k0, const TKV* k1, const TKV* k2, const TKV* k3,
                 int64_t d, float* out) {
  constexpr int kW = Simd::kWidth;
  Simd::V a0 = Simd::zero(), a1 = Simd::zero(), a2 = Simd::zero(), a3 = Simd::zero();
  int64_t c = 0;
  for (; c + kW <= d; c += kW) {
    const Simd::V qv = Simd::load(q + c);
    a0 = Simd::fma(qv, Simd::load(k0 + c), a0);
    a1 = Simd::fma(qv, Simd::load(k1 + c), a1);
    a2 = Simd::fma(qv, Simd::load(k2 + c), a2);
    a3 = Simd::fma(qv, Simd::load(k3 + c), a3);
  }
  float s0 = Simd::sum(a0), s1 = Simd::sum(a1), s2 = Simd::sum(a2), s3 = Simd::sum(a3);
  for (; c < d; ++c) {
    s0 += q[c] * load_scalar(k0 + c);
    s1 += q[c] * load_scalar(k1 + c);
    s2 += q[c] * load_scalar(k2 + c);
    s3 += q[c] * load_scalar(k3 + c);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <typename TKV>
inline float dot1(const float* q, const TKV* k, int64_t d) {
  constexpr int kW = Simd::kWidth;
  Simd::V a = Simd::zero();
  int64_t c = 0;
  for (; c + kW <= d; c += kW) a = Simd::fma(Simd::load(q + c), Simd::load(k + c), a);
  float s = Simd::sum(a);
  for (; c < d; ++c) s += q[c] * load_scalar(k + c);
  return s;
}

// acc[c] += sum_j p[j] * v[j, c]; each acc vector stays in a register across the keys, with
// four independent FMA chains. p: [nb]; v: [nb, d]; acc: [d]
template <typename TKV>
inline void accumulate_pv_kv(const float* p, const TKV* v, int64_t nb, int64_t d, float* acc) {
  constexpr int kW = Simd::kWidth;
  int64_t c = 0;
  for (; c + kW <= d; c += kW) {
    Simd::V a0 = Simd::load(acc + c), a1 = Simd::zero(), a2 = Simd::zero(), a3 = Simd::zero();
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
      a0 = Simd::fma(Simd::set1(p[j]), Simd::load(v + j * d + c), a0);
      a1 = Simd::fma(Simd::set1(p[j + 1]), Simd::load(v + (j + 1) * d + c), a1);
      a2 = Simd::fma(Simd::set1(p[j + 2]), Simd::load(v + (j + 2) * d + c), a2);
      a3 = Simd::fma(Simd::set1(p[j + 3]), Simd::load(v + (j + 3) * d + c), a3);
    }
    for (; j < nb; ++j) a0 = Simd::fma(Simd::set1(p[j]), Simd::load(v + j * d + c), a0);
    Simd::store(acc + c, Simd::add(Simd::add(a0, a1), Simd::add(a2, a3)));
  }
  for (; c < d; ++c) {
    float a = acc[c];
    for (int64_t j = 0; j < nb; ++j) a += p[j] * load_scalar(v + j * d + c);
    acc[c] = a;
  }
}

// Online-softmax step of one query vector over one page's scores (already scaled, -inf for
// hidden keys): rescales its running state and adds the page's p·V.
// sc: [len] (overwritten by probabilities); v: [len, d]; acc: [d]
template <typename TKV>
inline void softmax_step(float* sc, int64_t len, const TKV* v, int64_t d, float& run_max,
                         float& run_sum, float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float block_max = neg_inf;
  for (int64_t j = 0; j < len; ++j) block_max = std::max(block_max, sc[j]);
  if (block_max == neg_inf) return;  // every key of the page hidden from this query
  const float new_max = std::max(run_max, block_max);
  const float correction = std::exp(run_max - new_max);  // 0 on the first visible page
  run_max = new_max;
  if (correction != 1.0f) {
    const Simd::V cv = Simd::set1(correction);
    int64_t c = 0;
    for (; c + Simd::kWidth <= d; c += Simd::kWidth)
      Simd::store(acc + c, Simd::mul(Simd::load(acc + c), cv));
    for (; c < d; ++c) acc[c] *= correction;
  }
  const Simd::V neg_max = Simd::set1(-new_max);
  Simd::V sum_v = Simd::zero();
  int64_t j = 0;
  for (; j + Simd::kWidth <= len; j += Simd::kWidth) {
    const Simd::V p = Simd::exp(Simd::add(Simd::load(sc + j), neg_max));
    Simd::store(sc + j, p);
    sum_v = Simd::add(sum_v, p);
  }
  float sum = Simd::sum(sum_v);
  for (; j < len; ++j) {
    sc[j] = std::exp(sc[j] - new_max);
    sum += sc[j];
  }
  run_sum = run_sum * correction + sum;
  accumulate_pv_kv(sc, v, len, d, acc);
}

// Runs one unit. partials: slots of `slot_floats` floats (used when u.partial >= 0).
template <typename TKV>
void paged_attention_unit(const PagedArgs<TKV>& a, const PagedUnit& u, PagedScratch& s,
                          float* partials, int64_t slot_floats) {
  const int64_t group = a.hq / a.hkv, d = a.d, ps = a.page_size;
  const int64_t n_rows = u.row1 - u.row0, nq = n_rows * group;
  const int32_t window = a.head_window[u.head], sink = a.head_sink[u.head];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(s.acc.begin(), s.acc.begin() + nq * d, 0.0f);
  std::fill(s.row_max.begin(), s.row_max.begin() + nq, neg_inf);
  std::fill(s.row_sum.begin(), s.row_sum.begin() + nq, 0.0f);
  int32_t q_min = std::numeric_limits<int32_t>::max(), q_max = std::numeric_limits<int32_t>::min();
  for (int64_t t = u.row0; t < u.row1; ++t) {
    q_min = std::min(q_min, a.q_pos[t]);
    q_max = std::max(q_max, a.q_pos[t]);
  }

  for (int32_t e = u.entry0; e < u.entry1; ++e) {
    const int64_t len = a.page_lengths[e];
    if (len <= 0) continue;
    const int64_t base = int64_t{a.page_indices[e]} * ps;
    const int32_t first = a.pos_pool[base], last = a.pos_pool[base + len - 1];
    // Positions increase along the list: once a page starts in the block's future, all do.
    if (first > q_max) break;
    // Window: the page ends before the earliest query's window and holds no sink token.
    if (window > 0 && first >= sink && int64_t{last} < int64_t{q_min} - window + 1) continue;
    const TKV* kp = a.k_pool + base * d;
    const TKV* vp = a.v_pool + base * d;
    for (int64_t r = 0; r < n_rows; ++r) {
      const int32_t qp = a.q_pos[u.row0 + r];
      if (first > qp) continue;
      const int64_t lo = int64_t{qp} - window + 1;
      if (window > 0 && first >= sink && last < lo) continue;
      const bool whole = last <= qp && (window == 0 || first >= lo || last < sink);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t qi = r * group + g;
        const float* qv = a.q + ((u.row0 + r) * a.hq + u.head * group + g) * d;
        float* sc = s.scores.data() + qi * ps;
        int64_t j = 0;
        for (; j + 4 <= len; j += 4)
          dot4(qv, kp + j * d, kp + (j + 1) * d, kp + (j + 2) * d, kp + (j + 3) * d, d, sc + j);
        for (; j < len; ++j) sc[j] = dot1(qv, kp + j * d, d);
        const Simd::V sv = Simd::set1(a.scale);
        j = 0;
        for (; j + Simd::kWidth <= len; j += Simd::kWidth)
          Simd::store(sc + j, Simd::mul(Simd::load(sc + j), sv));
        for (; j < len; ++j) sc[j] *= a.scale;
        if (!whole)  // boundary page: hide keys one by one
          for (j = 0; j < len; ++j)
            if (!key_visible(qp, a.pos_pool[base + j], window, sink)) sc[j] = neg_inf;
        softmax_step(sc, len, vp, d, s.row_max[qi], s.row_sum[qi], s.acc.data() + qi * d);
      }
    }
  }

  if (u.partial >= 0) {
    float* slot = partials + u.partial * slot_floats;
    for (int64_t qi = 0; qi < nq; ++qi) {
      float* dst = slot + qi * (d + 2);
      dst[0] = s.row_max[qi];
      dst[1] = s.row_sum[qi];
      std::copy_n(s.acc.data() + qi * d, d, dst + 2);
    }
    return;
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t r = qi / group, g = qi % group;
    float* o = a.out + ((u.row0 + r) * a.hq + u.head * group + g) * d;
    const float* acc = s.acc.data() + qi * d;
    // A query that sees no key outputs zeros.
    const float inv = s.row_sum[qi] > 0.0f ? 1.0f / s.row_sum[qi] : 0.0f;
    for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * inv;
  }
}

// Combines the partial slots [slot0, slot0 + n_slots) of one (seq, head, row block) into out.
template <typename TKV>
void merge_partials(const PagedArgs<TKV>& a, const PagedUnit& u, int32_t slot0, int32_t n_slots,
                    const float* partials, int64_t slot_floats) {
  const int64_t group = a.hq / a.hkv, d = a.d, n_rows = u.row1 - u.row0;
  for (int64_t qi = 0; qi < n_rows * group; ++qi) {
    float m = -std::numeric_limits<float>::infinity();
    for (int32_t k = 0; k < n_slots; ++k)
      m = std::max(m, partials[(slot0 + k) * slot_floats + qi * (d + 2)]);
    const int64_t r = qi / group, g = qi % group;
    float* o = a.out + ((u.row0 + r) * a.hq + u.head * group + g) * d;
    std::fill(o, o + d, 0.0f);
    float sum = 0.0f;
    if (m == -std::numeric_limits<float>::infinity()) continue;  // no visible key: zeros
    for (int32_t k = 0; k < n_slots; ++k) {
      const float* src = partials + (slot0 + k) * slot_floats + qi * (d + 2);
      if (src[1] <= 0.0f) continue;
      const float w = std::exp(src[0] - m);
      sum += src[1] * w;
      for (int64_t c = 0; c < d; ++c) o[c] += src[2 + c] * w;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t c = 0; c < d; ++c) o[c] *= inv;
  }
}

// Builds the unit list: each (seq, head) is cut into blocks of `block_rows` query rows; a block's
// page list is clipped to pages that start at or before its last query, and cut into several
// units when it is much longer than a fair share of the total (threads * 4 shares).
// Returns the number of partial slots; `merges` gets (first unit, unit count) per split block.
template <typename TKV>
int32_t plan_units(const PagedArgs<TKV>& a, int32_t num_seqs, int64_t block_rows, int threads,
                   std::vector<PagedUnit>& units,
                   std::vector<std::pair<int32_t, int32_t>>& merges) {
  constexpr int64_t kMinSplitEntries = 8;  // a split unit streams at least this many pages
  units.clear();
  merges.clear();
  std::vector<PagedUnit> blocks;
  int64_t total = 0;
  for (int32_t s = 0; s < num_seqs; ++s)
    for (int64_t h = 0; h < a.hkv; ++h) {
      const int64_t item = int64_t{s} * a.hkv + h;
      const int32_t e0 = a.kv_indptr[item], e1 = a.kv_indptr[item + 1];
      for (int32_t r0 = a.qo_indptr[s]; r0 < a.qo_indptr[s + 1];
           r0 += static_cast<int32_t>(block_rows)) {
        const int32_t r1 = std::min<int32_t>(a.qo_indptr[s + 1], r0 + block_rows);
        int32_t q_max = std::numeric_limits<int32_t>::min();
        for (int32_t t = r0; t < r1; ++t) q_max = std::max(q_max, a.q_pos[t]);
        // First entry whose page starts after q_max (pages are in position order).
        int32_t lo = e0, hi = e1;
        while (lo < hi) {
          const int32_t mid = lo + (hi - lo) / 2;
          const int64_t first_slot = int64_t{a.page_indices[mid]} * a.page_size;
          if (a.page_lengths[mid] > 0 && a.pos_pool[first_slot] > q_max)
            hi = mid;
          else
            lo = mid + 1;
        }
        PagedUnit u{s, static_cast<int32_t>(h), r0, r1, e0, lo, -1, 0};
        u.cost = int64_t{r1 - r0} * std::max<int64_t>(1, lo - e0);
        total += u.cost;
        blocks.push_back(u);
      }
    }
  const int64_t share = std::max<int64_t>(1, total / (int64_t{threads} * 4));
  int32_t slots = 0;
  for (const PagedUnit& b : blocks) {
    const int64_t entries = b.entry1 - b.entry0;
    int64_t parts = threads > 1 ? (b.cost + share - 1) / share : 1;
    parts = std::min(parts, entries / kMinSplitEntries);
    if (parts <= 1) {
      units.push_back(b);
      continue;
    }
    merges.emplace_back(static_cast<int32_t>(units.size()), static_cast<int32_t>(parts));
    for (int64_t k = 0; k < parts; ++k) {
      PagedUnit u = b;
      u.entry0 = b.entry0 + static_cast<int32_t>(entries * k / parts);
      u.entry1 = b.entry0 + static_cast<int32_t>(entries * (k + 1) / parts);
      u.partial = slots++;
      u.cost = b.cost / parts;
      units.push_back(u);
    }
  }
  return slots;
}

}  // namespace redknot::cpu
