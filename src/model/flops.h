// Analytic FLOPs of a forward pass (a multiply-add counts 2), split the way RedKnot saves work:
// projections, attention by head class, FFN dense vs sparse, and the lm_head.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>

#include "core/model_config.h"
#include "kv/head_profile.h"

namespace redknot {

struct FlopsLedger {
  double projections = 0;       // q, k, v, o
  double attention_global = 0;  // QKᵀ and PV of global heads
  double attention_local = 0;   // QKᵀ and PV of local heads (sink ∪ window only)
  double ffn_dense = 0;         // FFN rows in dense layers / modes
  double ffn_sparse = 0;        // FFN rows kept by Sparse FFN
  double lm_head = 0;

  double total() const {
    return projections + attention_global + attention_local + ffn_dense + ffn_sparse + lm_head;
  }
  FlopsLedger& operator+=(const FlopsLedger& o);
  nlohmann::json to_json() const;
};

// Keys a query at position `pos` reads under `spec` when every earlier position is cached.
int64_t visible_keys(const HeadSpec& spec, int64_t pos);

// Prefill of tokens at positions [start, start + n) over a cache holding [0, start), all
// layers dense FFN, `logit_rows` rows through the lm_head.
FlopsLedger prefill_flops(const ModelConfig& cfg, const HeadProfile& profile, int64_t start,
                          int64_t n, int64_t logit_rows);

// Per-token pieces, for modes that skip work (reuse, Sparse FFN).
double projection_flops_per_token(const ModelConfig& cfg);     // one layer
double kv_projection_flops_per_token(const ModelConfig& cfg);  // k and v alone, one layer
double ffn_flops_per_token(const ModelConfig& cfg);            // one layer
// QKᵀ + PV of one query token at `pos` for one layer, split by class.
void attention_flops_at(const ModelConfig& cfg, const HeadProfile& profile, int layer, int64_t pos,
                        FlopsLedger& ledger);
// The same for the n query tokens at positions [pos, pos + n), in closed form.
void attention_flops_span(const ModelConfig& cfg, const HeadProfile& profile, int layer,
                          int64_t pos, int64_t n, FlopsLedger& ledger);
// Σ visible_keys(spec, p) for p in [pos, pos + n).
int64_t visible_keys_sum(const HeadSpec& spec, int64_t pos, int64_t n);

}  // namespace redknot
