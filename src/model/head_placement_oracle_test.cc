// Head placement leaves the model's function unchanged: on every refs model (Llama, Mistral with
// and without a sliding window, Qwen2 with q/k/v biases, Qwen3 with q/k norms, f32 and bf16), the
// model with its kv heads (and their query heads and o_proj columns) permuted and its head profile
// permuted the same way gives the logits of the original (relative 1e-5, CPU backend), with the
// model's own attention and with a mixed global/local profile, and still matches the Hugging Face
// reference. The engine loads a placed profile's weights in its order and refuses a placed
// profile on weights in another order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "backend/builtin.h"
#include "core/error.h"
#include "engine/engine_setup.h"
#include "engine/kv_setup.h"
#include "kv/contiguous_kv_cache.h"
#include "kv/head_placement.h"
#include "loader/permute_heads.h"
#include "loader/safetensors.h"
#include "model/model.h"

namespace redknot {
namespace {

std::string refs(const std::string& rel) {
  return std::string(REDKNOT_SHARED_DIR) + "/refs/" + rel;
}

const std::vector<std::string> kModels = {"llama3-tiny", "mistral-tiny", "mistral-swa-tiny",
                                          "qwen2-tiny",  "qwen3-tiny",   "qwen3-tiny-bf16"};

// The first reference sequence of at least 64 tokens with logits at every position, cut to 64
// (past the local window of 16); `index` is its number in reference.safetensors.
std::vector<int32_t> prompt_ids(const SafetensorsFile& ref, int& index) {
  for (index = 0;; ++index) {
    const std::string n = std::to_string(index);
    const auto it = ref.tensors.find("input_ids." + n);
    if (it == ref.tensors.end()) return {};
    if (it->second.numel() >= 64 && ref.tensors.count("logits." + n)) {
      const int32_t* p = it->second.data<int32_t>();
      return std::vector<int32_t>(p, p + 64);
    }
  }
}

// Logits of every position of ids, one prefill through a dense store masked by `profile`.
// Returns host f32 [ids, vocab].
Tensor logits(Model& model, const HeadProfile& profile, const std::vector<int32_t>& ids) {
  ContiguousKvCache kv(model.backend(), dense_kv_geometry(model.config(), &profile),
                       static_cast<int32_t>(ids.size()), model.inv_freq());
  kv.add_sequence(0);
  Batch b;
  b.add_sequence(0, ids, 0, true, true);
  return model.forward(b, kv);
}

double max_rel_diff(const Tensor& got, const Tensor& want) {
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    diff = std::max(diff, double(std::fabs(got.data<float>()[i] - want.data<float>()[i])));
    scale = std::max(scale, double(std::fabs(want.data<float>()[i])));
  }
  return diff / scale;
}

// Global on kv head 0 of every layer, the rest local (window 16, sink 4): every layer's global
// head starts on rank 0 of 2, so the planner rotates it.
HeadProfile mixed_profile(const ModelConfig& cfg) {
  HeadProfile p = HeadProfile::native(cfg);
  for (int32_t l = 0; l < p.num_layers(); ++l)
    for (int32_t h = 0; h < p.num_kv_heads(); ++h)
      p.at(l, h).classify(h == 0, cfg.sliding_window, 16, 4);
  return p;
}

std::vector<std::vector<int32_t>> reversed(const HeadProfile& p) {
  std::vector<std::vector<int32_t>> perm(p.num_layers());
  for (auto& row : perm)
    for (int32_t h = p.num_kv_heads() - 1; h >= 0; --h) row.push_back(h);
  return perm;
}

class PlacementOracle : public ::testing::TestWithParam<std::string> {};

TEST_P(PlacementOracle, PermutedModelGivesTheSameLogits) {
  const std::string name = GetParam();
  if (!std::filesystem::exists(refs(name))) GTEST_SKIP() << "no " << refs(name);
  register_builtin_backends();
  auto backend = create_backend("cpu");
  const Checkpoint ck = load_checkpoint(refs(name));
  const SafetensorsFile ref = read_safetensors(refs(name + "/reference.safetensors"));
  int seq = 0;
  const std::vector<int32_t> ids = prompt_ids(ref, seq);
  ASSERT_EQ(ids.size(), 64u);
  Model base(ck, *backend);

  const HeadProfile native = HeadProfile::native(ck.config), mixed = mixed_profile(ck.config);
  PlacementOptions po;
  po.ranks = 2;
  const auto planned = plan_head_placement(mixed, po);
  ASSERT_NE(planned, reversed(mixed)) << "the oracle needs a mix of moved and kept layers";
  ASSERT_NE(planned, plan_head_placement(native, po)) << "planned placement is the identity";

  struct Case {
    const char* what;
    const HeadProfile* profile;
    std::vector<std::vector<int32_t>> perm;
  };
  for (const Case& c : {Case{"native, reversed", &native, reversed(native)},
                        Case{"mixed, planned", &mixed, planned},
                        Case{"mixed, reversed", &mixed, reversed(mixed)}}) {
    SCOPED_TRACE(name + ": " + c.what);
    Checkpoint placed_ck = ck;
    permute_kv_heads(placed_ck, c.perm);
    EXPECT_EQ(placed_ck.kv_head_perm, c.perm);
    Model placed(placed_ck, *backend);
    const HeadProfile placed_profile = permute_profile(*c.profile, c.perm, po.ranks);
    const Tensor want = logits(base, *c.profile, ids);
    const Tensor got = logits(placed, placed_profile, ids);
    ASSERT_EQ(got.shape(), want.shape());
    EXPECT_LE(max_rel_diff(got, want), 1e-5);
    if (c.profile == &native) {  // the model's own attention: still the HF reference
      const Tensor& hf = ref.tensors.at("logits." + std::to_string(seq));
      ASSERT_GE(hf.dim(0), 64);
      const int64_t V = ck.config.vocab_size;
      double diff = 0;
      for (int64_t i = 0; i < 64 * V; ++i)
        diff = std::max(diff, double(std::fabs(got.data<float>()[i] - hf.data<float>()[i])));
      EXPECT_LE(diff, 1e-3);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Refs, PlacementOracle, ::testing::ValuesIn(kModels), [](const auto& info) {
  std::string n = info.param;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
});

TEST(PlacementEngine, LoadsWeightsInTheProfilesOrder) {
  const std::string dir = refs("llama3-tiny");
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "no " << dir;
  const Checkpoint ck = load_checkpoint(dir);
  const HeadProfile mixed = mixed_profile(ck.config);
  PlacementOptions po;
  po.ranks = 2;
  const auto perm = plan_head_placement(mixed, po);
  const std::string path = ::testing::TempDir() + "/placed_profile.json";
  permute_profile(mixed, perm, po.ranks).save(path);

  EngineOptions eo;
  eo.head_profile = path;
  LoadedEngineModel placed = open_engine_model(dir, eo);
  EXPECT_EQ(placed.model->kv_head_perm(), perm);
  EXPECT_EQ(load_head_profile(*placed.model, path).placement, perm);
  // The same profile on weights in file order would give the wrong heads the wrong classes.
  LoadedEngineModel plain = open_engine_model(dir, EngineOptions{});
  EXPECT_TRUE(plain.model->kv_head_perm().empty());
  EXPECT_THROW(load_head_profile(*plain.model, path), Error);
}

}  // namespace
}  // namespace redknot
