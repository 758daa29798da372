// Megatron-style sharding of a checkpoint for tensor parallelism (issue #23), host-side and
// before any upload, so each rank's model holds only its shard. Rank r of R holds:
//   q_proj rows / q bias of query heads [r*nh/R, (r+1)*nh/R) and o_proj's matching columns
//     (column-parallel in, row-parallel out: the o_proj partial sums are all-reduced);
//   k/v rows and biases of its kv heads: nkv/R of them when nkv >= R; when nkv < R (R a multiple
//     of nkv) the one kv head its query heads read, replicated on R/nkv ranks;
//   gate/up rows and down_proj columns of FFN columns [r*F/R, (r+1)*F/R) (down is all-reduced);
//   a vocab slice of ceil(V/R) rows of the embedding and the lm_head (vocab-parallel: the
//     embedding's partial rows are all-reduced, the logits all-gathered), zero-padded, and one
//     more zero embedding row that ids outside the slice map to;
//   the norms whole (q_norm / k_norm are one head_dim vector shared by every head).
// The head placement (loader/permute_heads.h) is applied to the full checkpoint first, so ranks
// take contiguous slices of the permuted heads.
#pragma once
#include "loader/checkpoint.h"

namespace redknot {

// Rank `rank` of `size`'s geometry for `cfg`. Throws Error naming the constraint that fails
// (query heads not divisible by size, kv heads neither a multiple nor a divisor of size, ...).
TpShard plan_tp_shard(const ModelConfig& cfg, int rank, int size);

// The rank's checkpoint: its slices as host copies, `config` counting its own heads and FFN
// columns (vocab_size stays the model's), `tp` its geometry. size 1 returns a shallow copy.
// Throws Error for FP8 checkpoints (their scales are not sliced yet) and blocks that a slice
// would cut (Q8_0 columns).
Checkpoint shard_checkpoint(const Checkpoint& full, int rank, int size);

}  // namespace redknot
