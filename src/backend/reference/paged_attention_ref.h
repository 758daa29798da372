// The oracle of SegPaged attention: plain loops over every (sequence, query head, query row)
// and every slot of the kv head's pages, double accumulation. Host f32 tensors only, or FP8 KV
// rows (each element dequantized with its row's scale).
#pragma once
#include "backend/backend.h"

namespace redknot {

// Same contract as Backend::paged_attention.
// q: [T, Hq, D]; k_pool, v_pool: [pages * page_size, D] f32 or [pages * page_size, D + 4] f8;
// pos_pool: [pages * page_size];
// q_pos: [T]; out: [T, Hq, D]
void reference_paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                               const Tensor& pos_pool, const Tensor& q_pos,
                               const PagedAttentionPlan& plan, Tensor& out);

// Checks shapes and dtypes shared by every implementation; throws Error on mismatch.
void check_paged_attention_args(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                                const Tensor& pos_pool, const Tensor& q_pos,
                                const PagedAttentionPlan& plan, const Tensor& out);

}  // namespace redknot
