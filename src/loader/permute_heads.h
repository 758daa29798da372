// Reorders the kv heads of each layer of a checkpoint (head-aware placement, kv/head_placement.h),
// host-side and before any backend upload, so that the model computes the same function: each kv
// head moves with its group of n_heads / n_kv_heads query heads. Moves q_proj rows (head_dim per
// query head), k_proj and v_proj rows (head_dim per kv head), the q/k/v biases where present, and
// o_proj columns (head_dim per query head). q_norm / k_norm act on one head_dim vector shared by
// every head, so they do not move; nor does anything outside attention.
#pragma once
#include <cstdint>
#include <vector>

#include "loader/checkpoint.h"

namespace redknot {

// perm: [num_layers][num_kv_heads], new position -> old kv head. The moved tensors become
// host copies (the originals may be read-only file mappings); ckpt.kv_head_perm records perm
// (composed with an earlier one). Throws Error when perm is not a permutation per layer, a
// tensor's shape does not match the config, or a block-quantized o_proj cannot be cut at
// head_dim columns.
void permute_kv_heads(Checkpoint& ckpt, const std::vector<std::vector<int32_t>>& perm);

}  // namespace redknot
