// Head-aware placement for GQA tensor parallelism (issue #23). Each of R ranks owns a contiguous
// slice of H / R kv heads of every layer (with their query heads). A layer whose global heads
// fall on one rank makes that rank do most of the attention and hold most of the KV, so the
// planner permutes each layer's kv heads: every rank gets as equal a share of global heads as
// possible, and of KV bytes (per-head sizes by the profile's own rule, HeadSpec::kept_tokens).
// Applying a plan: permute_profile here, and loader/permute_heads.h for the weights; the model's
// output is unchanged. With H < R the heads are replicated, not split: placement is the identity.
#pragma once
#include <cstdint>
#include <vector>

#include "kv/head_profile.h"

namespace redknot {

struct PlacementOptions {
  int32_t ranks = 1;
  // Context length at which each head's KV is sized (kept_tokens): a local head holds
  // min(tokens, sink + window), a global head `tokens`.
  int64_t tokens = 32768;
};

// Per layer, new position -> old kv head ([num_layers][num_kv_heads]). Deterministic; the
// identity where every head of a layer is alike, and heads that may stay on their rank do.
// Throws Error when ranks < 1 or num_kv_heads >= ranks is not a multiple of ranks.
std::vector<std::vector<int32_t>> plan_head_placement(const HeadProfile& profile,
                                                      const PlacementOptions& opts);

// The profile of the permuted model: head i of layer l is `profile`'s head perm[l][i]. Records
// the placement (composed with one the profile already carries, so that it always maps to the
// original model's heads). perm: [num_layers][num_kv_heads]
HeadProfile permute_profile(const HeadProfile& profile,
                            const std::vector<std::vector<int32_t>>& perm, int32_t ranks);

// How unequal the ranks are: max / mean over ranks (1 = balanced; 1 when the mean is 0).
struct RankBalance {
  double globals = 1, kv = 1;
};
struct PlacementReport {
  int32_t ranks = 1;
  std::vector<RankBalance> layers;  // per layer
  RankBalance worst_layer;  // the largest per-layer ratio (a layer waits for its slowest rank)
  RankBalance total;        // per-rank sums over all layers (memory)
};
// Rank r owns heads [r * H / R, (r + 1) * H / R) of every layer (everything when H < R).
PlacementReport placement_report(const HeadProfile& profile, const PlacementOptions& opts);

}  // namespace redknot
