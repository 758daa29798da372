// Helpers shared by the end-to-end tests: paths to ../shared and running a model over ids.
#pragma once
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/builtin.h"
#include "kv/contiguous_kv_cache.h"
#include "loader/checkpoint.h"
#include "loader/safetensors.h"
#include "model/model.h"

namespace redknot::testing {

inline std::string shared_path(const std::string& rel) {
  return std::string(REDKNOT_SHARED_DIR) + "/" + rel;
}

#define RK_REQUIRE_SHARED(rel)                                        \
  if (!std::filesystem::exists(::redknot::testing::shared_path(rel))) \
  GTEST_SKIP() << "shared test data not found: " << ::redknot::testing::shared_path(rel)

inline const std::vector<std::string>& refs_models() {
  static const std::vector<std::string> names = {"llama3-tiny", "mistral-tiny", "mistral-swa-tiny",
                                                 "qwen2-tiny",  "qwen3-tiny",   "qwen3-tiny-bf16"};
  return names;
}

inline std::vector<int32_t> to_ids(const Tensor& t) {
  return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel());
}

// Logits of every position of `ids` as one sequence, prefilled in chunks of `chunk` tokens.
// Returns host f32 [ids, vocab].
inline Tensor run_logits(Model& model, KvCache& kv, SeqId seq, const std::vector<int32_t>& ids,
                         int64_t chunk) {
  const int64_t V = model.config().vocab_size, T = static_cast<int64_t>(ids.size());
  Tensor out = Tensor::host(DType::F32, {T, V});
  if (!kv.has_sequence(seq)) kv.add_sequence(seq);
  for (int64_t s = 0; s < T; s += chunk) {
    int64_t e = std::min(T, s + chunk);
    Batch b;
    b.add_sequence(seq, std::vector<int32_t>(ids.begin() + s, ids.begin() + e),
                   kv.next_position(seq), true, true);
    Tensor l = model.forward(b, kv);
    std::memcpy(out.data<float>() + s * V, l.data<float>(), l.nbytes());
  }
  return out;
}

}  // namespace redknot::testing
