#include "model/sparse_ffn.h"

#include <algorithm>
#include <numeric>

namespace redknot {

std::vector<int32_t> select_ffn_rows(const SparseFfnConfig& cfg, int layer,
                                     const std::vector<float>& importance, const Batch& batch) {
  const int64_t T = static_cast<int64_t>(importance.size());
  std::vector<char> keep(T, 0);
  // Top-p by importance: sort descending, take rows until `mass` of the total is covered.
  std::vector<int32_t> order(T);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return importance[a] > importance[b] || (importance[a] == importance[b] && a < b);
  });
  double total = 0;
  for (float v : importance) total += v;
  const double target = cfg.mass_for(layer) * total;
  double acc = 0;
  for (int32_t r : order) {
    if (acc >= target) break;
    keep[r] = 1;
    acc += importance[r];
  }
  for (const SeqSpan& sp : batch.spans)
    for (int64_t i = std::max<int64_t>(0, sp.count - cfg.recent_n); i < sp.count; ++i)
      keep[sp.begin + i] = 1;
  for (int64_t r : batch.logit_rows) keep[r] = 1;  // rows whose logits are wanted stay exact
  std::vector<int32_t> rows;
  for (int64_t r = 0; r < T; ++r)
    if (keep[r]) rows.push_back(static_cast<int32_t>(r));
  return rows;
}

}  // namespace redknot
