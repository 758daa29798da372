#include "model/sparse_ffn.h"

#include <algorithm>
#include <cstring>

namespace redknot {

std::vector<int32_t> select_ffn_rows(const SparseFfnConfig& cfg, int layer,
                                     const std::vector<float>& importance, const Batch& batch,
                                     int64_t rows_after) {
  const int64_t T = static_cast<int64_t>(importance.size());
  std::vector<char> keep(T, 0);
  // Top-p by importance: sort descending, take rows until `mass` of the total is covered.
  // Importances are L2 norms (>= 0), whose float bits order like the values: one 64-bit key
  // per row, (inverted bits, row), sorts descending with ties to the lower row, and sorts
  // several times faster than an index sort with a comparator (this runs per layer, on the
  // host, while the GPU waits).
  std::vector<uint64_t> order(T);
  for (int64_t r = 0; r < T; ++r) {
    const float v = importance[r] > 0 ? importance[r] : 0.0f;  // also maps NaN and -0 to 0
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    order[r] = (uint64_t{~bits} << 32) | static_cast<uint32_t>(r);
  }
  auto value = [&](uint64_t key) {
    const float v = importance[static_cast<size_t>(key & 0xffffffffu)];
    return v > 0 ? v : 0.0f;
  };
  double total = 0;
  for (float v : importance) total += v > 0 ? v : 0.0f;
  const double target = cfg.mass_for(layer) * total;
  // Only the sorted prefix that covers the target is needed (at mass 0.2 about an eighth of the
  // rows): partition the k most important first, doubling k until they hold the target, and
  // sort just those. Should rounding leave the walk short at k, the rest is sorted after them.
  size_t k = std::min(order.size(), std::max<size_t>(64, order.size() / 8));
  for (;;) {
    if (k < order.size()) std::nth_element(order.begin(), order.begin() + (k - 1), order.end());
    double covered = 0;
    for (size_t i = 0; i < k; ++i) covered += value(order[i]);
    if (covered >= target || k == order.size()) break;
    k = std::min(order.size(), 2 * k);
  }
  std::sort(order.begin(), order.begin() + k);
  double acc = 0;
  for (size_t i = 0; i < order.size() && acc < target; ++i) {
    if (i == k) std::sort(order.begin() + k, order.end());
    keep[static_cast<size_t>(order[i] & 0xffffffffu)] = 1;
    acc += value(order[i]);
  }
  if (cfg.dilate > 0) {
    // Neighbours of a kept row within its sequence (a word split into several tokens).
    std::vector<char> top = keep;
    for (const SeqSpan& sp : batch.spans)
      for (int64_t i = 0; i < sp.count; ++i) {
        if (!top[sp.begin + i]) continue;
        const int64_t lo = std::max<int64_t>(0, i - cfg.dilate);
        const int64_t hi = std::min<int64_t>(sp.count - 1, i + cfg.dilate);
        for (int64_t j = lo; j <= hi; ++j) keep[sp.begin + j] = 1;
      }
  }
  for (const SeqSpan& sp : batch.spans)
    for (int64_t i = std::max<int64_t>(0, sp.count + rows_after - cfg.recent_n); i < sp.count; ++i)
      keep[sp.begin + i] = 1;
  for (int64_t r : batch.logit_rows) keep[r] = 1;  // rows whose logits are wanted stay exact
  std::vector<int32_t> rows;
  for (int64_t r = 0; r < T; ++r)
    if (keep[r]) rows.push_back(static_cast<int32_t>(r));
  return rows;
}

}  // namespace redknot
