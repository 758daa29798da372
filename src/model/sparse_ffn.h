// Sparse FFN (SPEC §4): in deep layers only the tokens that matter run the FFN; the others get
// FFN output 0, so their residual stream passes through. Importance of a token = L2 norm of its
// attention output (before o_proj). Tiers by depth: dense below `dense_until`, then `mass`, and
// `mass_deep` from `deep_start` on; or one mass per layer (`layer_mass`), where a model has a
// layer that must stay dense between sparse ones.
#pragma once
#include <cstdint>
#include <vector>

#include "core/batch.h"

namespace redknot {

struct SparseFfnConfig {
  int32_t dense_until = 4;  // layers [0, dense_until) run the FFN on every token
  double mass = 0.2;        // keep the fewest tokens holding this share of total importance
  int32_t deep_start = -1;  // layers >= deep_start use mass_deep (-1: never)
  double mass_deep = 0.1;
  int32_t recent_n = 128;  // the last recent_n tokens of each sequence always run the FFN
  // Per-layer masses: entry l is layer l's mass, >= 1 runs it dense. Layers past the list use
  // the tiers above. Empty: tiers only.
  std::vector<double> layer_mass;
  int32_t dilate = 0;  // also keep the rows within this distance of a top-mass row

  double mass_for(int layer) const {
    if (layer >= 0 && layer < static_cast<int>(layer_mass.size())) return layer_mass[layer];
    return deep_start >= 0 && layer >= deep_start ? mass_deep : mass;
  }
  bool dense(int layer) const {
    if (layer >= 0 && layer < static_cast<int>(layer_mass.size())) return layer_mass[layer] >= 1;
    return layer < dense_until;
  }
};

// Batch rows (ascending) whose FFN runs in a sparse layer. importance: [T]. rows_after: rows of
// the same pass that follow this batch in later forwards (a pass run in chunks), so that the
// recent_n rule counts from the end of the pass rather than of each chunk.
std::vector<int32_t> select_ffn_rows(const SparseFfnConfig& cfg, int layer,
                                     const std::vector<float>& importance, const Batch& batch,
                                     int64_t rows_after = 0);

}  // namespace redknot
