#include "model/flops.h"

#include <algorithm>

namespace redknot {

FlopsLedger& FlopsLedger::operator+=(const FlopsLedger& o) {
  projections += o.projections;
  attention_global += o.attention_global;
  attention_local += o.attention_local;
  ffn_dense += o.ffn_dense;
  ffn_sparse += o.ffn_sparse;
  lm_head += o.lm_head;
  return *this;
}

nlohmann::json FlopsLedger::to_json() const {
  return {{"projections", projections},
          {"attention_global", attention_global},
          {"attention_local", attention_local},
          {"ffn_dense", ffn_dense},
          {"ffn_sparse", ffn_sparse},
          {"lm_head", lm_head},
          {"total", total()}};
}

int64_t visible_keys(const HeadSpec& spec, int64_t pos) { return spec.kept_tokens(pos + 1); }

double projection_flops_per_token(const ModelConfig& c) {
  const double q = double(c.num_heads) * c.head_dim, kv = double(c.num_kv_heads) * c.head_dim;
  return 2.0 * c.hidden_size * (q + 2 * kv) + 2.0 * q * c.hidden_size;
}

double kv_projection_flops_per_token(const ModelConfig& c) {
  return 2.0 * c.hidden_size * 2.0 * double(c.num_kv_heads) * c.head_dim;
}

double ffn_flops_per_token(const ModelConfig& c) {
  return 2.0 * 3.0 * c.hidden_size * c.intermediate_size;
}

void attention_flops_at(const ModelConfig& c, const HeadProfile& p, int layer, int64_t pos,
                        FlopsLedger& l) {
  const int64_t group = c.num_heads / c.num_kv_heads;
  for (int32_t h = 0; h < p.num_kv_heads(); ++h) {
    const HeadSpec& s = p.at(layer, h);
    const double f = 4.0 * visible_keys(s, pos) * c.head_dim * group;  // QKᵀ and PV
    (s.cls == HeadClass::Global ? l.attention_global : l.attention_local) += f;
  }
}

namespace {
// Σ_{c=1..n} min(c, cap): the prefix sums behind visible_keys_sum.
int64_t sum_capped(int64_t n, int64_t cap) {
  if (n <= 0) return 0;
  if (n <= cap) return n * (n + 1) / 2;
  return cap * (cap + 1) / 2 + (n - cap) * cap;
}
// Σ visible_keys(spec, pos) for pos in [0, n): kept_tokens(c) = min(c, cap) is capped at
// kept_tokens(n) for every c <= n.
int64_t visible_keys_prefix(const HeadSpec& spec, int64_t n) {
  return sum_capped(n, spec.kept_tokens(n));
}
}  // namespace

int64_t visible_keys_sum(const HeadSpec& spec, int64_t pos, int64_t n) {
  return visible_keys_prefix(spec, pos + n) - visible_keys_prefix(spec, pos);
}

void attention_flops_span(const ModelConfig& c, const HeadProfile& p, int layer, int64_t pos,
                          int64_t n, FlopsLedger& l) {
  const int64_t group = c.num_heads / c.num_kv_heads;
  for (int32_t h = 0; h < p.num_kv_heads(); ++h) {
    const HeadSpec& s = p.at(layer, h);
    const double f = 4.0 * double(visible_keys_sum(s, pos, n)) * c.head_dim * group;
    (s.cls == HeadClass::Global ? l.attention_global : l.attention_local) += f;
  }
}

FlopsLedger prefill_flops(const ModelConfig& c, const HeadProfile& p, int64_t start, int64_t n,
                          int64_t logit_rows) {
  FlopsLedger l;
  l.projections = projection_flops_per_token(c) * c.num_layers * n;
  l.ffn_dense = ffn_flops_per_token(c) * c.num_layers * n;
  l.lm_head = 2.0 * c.hidden_size * c.vocab_size * logit_rows;
  for (int layer = 0; layer < c.num_layers; ++layer) attention_flops_span(c, p, layer, start, n, l);
  return l;
}

}  // namespace redknot
