// The chunk store's model fingerprint covers every ModelConfig field: changing any one of them
// gives another fingerprint, so cached KV of another configuration is never taken as valid.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "reuse/chunk_store.h"

namespace redknot {
namespace {

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 32, c.hidden_size = 16, c.intermediate_size = 48, c.num_layers = 2;
  c.num_heads = 4, c.num_kv_heads = 2, c.head_dim = 4, c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

TEST(ModelFingerprint, EveryConfigFieldChangesIt) {
  const std::vector<std::pair<std::string, std::function<void(ModelConfig&)>>> changes = {
      {"arch", [](ModelConfig& c) { c.arch = Arch::Mistral; }},
      {"vocab_size", [](ModelConfig& c) { ++c.vocab_size; }},
      {"hidden_size", [](ModelConfig& c) { ++c.hidden_size; }},
      {"intermediate_size", [](ModelConfig& c) { ++c.intermediate_size; }},
      {"num_layers", [](ModelConfig& c) { ++c.num_layers; }},
      {"num_heads", [](ModelConfig& c) { ++c.num_heads; }},
      {"num_kv_heads", [](ModelConfig& c) { ++c.num_kv_heads; }},
      {"head_dim", [](ModelConfig& c) { ++c.head_dim; }},
      {"rms_norm_eps", [](ModelConfig& c) { c.rms_norm_eps *= 1.0000001; }},
      {"rope_theta", [](ModelConfig& c) { c.rope_theta += 1e-9; }},
      {"rope_scaling.type", [](ModelConfig& c) { c.rope_scaling.type = "linear"; }},
      {"rope_scaling.factor", [](ModelConfig& c) { c.rope_scaling.factor = 2; }},
      {"rope_scaling.low_freq_factor", [](ModelConfig& c) { c.rope_scaling.low_freq_factor = 2; }},
      {"rope_scaling.high_freq_factor",
       [](ModelConfig& c) { c.rope_scaling.high_freq_factor = 8; }},
      {"rope_scaling.original_max_position",
       [](ModelConfig& c) { c.rope_scaling.original_max_position = 8192; }},
      {"max_position_embeddings", [](ModelConfig& c) { ++c.max_position_embeddings; }},
      {"sliding_window", [](ModelConfig& c) { c.sliding_window = 64; }},
      {"tie_word_embeddings", [](ModelConfig& c) { c.tie_word_embeddings = true; }},
      {"attention_bias", [](ModelConfig& c) { c.attention_bias = true; }},
      {"qk_norm", [](ModelConfig& c) { c.qk_norm = true; }},
      {"bos_token_id", [](ModelConfig& c) { c.bos_token_id = 0; }},
      {"eos_token_ids", [](ModelConfig& c) { c.eos_token_ids.push_back(3); }},
  };
  const ModelConfig base = small_config();
  const Checkpoint ckpt;
  const uint64_t fp = model_fingerprint(base, ckpt);
  EXPECT_EQ(fp, model_fingerprint(base, ckpt));
  // One change per field of the canonical form: a field added there needs a line here.
  const std::string canon = base.canonical_string();
  EXPECT_EQ(static_cast<size_t>(std::count(canon.begin(), canon.end(), ';')), changes.size())
      << canon;
  std::set<uint64_t> seen{fp};
  for (const auto& [field, change] : changes) {
    ModelConfig c = base;
    change(c);
    EXPECT_NE(canon, c.canonical_string()) << field;
    EXPECT_NE(canon.find(field + "="), std::string::npos) << field;
    EXPECT_TRUE(seen.insert(model_fingerprint(c, ckpt)).second) << field;
  }
}

}  // namespace
}  // namespace redknot
