// Logits and greedy parity of every refs model (HF transformers, float64) against the engine,
// on every backend that runs here, through the KV cache, whole-prompt and chunked.
#include <cmath>
#include <cstring>

#include "engine/generate.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

struct Case {
  std::string model;
  std::string backend;
  int64_t chunk;  // prefill chunk size
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  std::string n =
      info.param.model + "_" + info.param.backend + "_chunk" + std::to_string(info.param.chunk);
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return n;
}

class RefsParity : public ::testing::TestWithParam<Case> {};

TEST_P(RefsParity, LogitsMatchTransformers) {
  const Case& c = GetParam();
  RK_REQUIRE_SHARED("refs/" + c.model);
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("refs/" + c.model));
  auto backend = create_backend(c.backend);
  Model model(ck, *backend);
  SafetensorsFile ref = read_safetensors(shared_path("refs/" + c.model + "/reference.safetensors"));
  const int64_t V = ck.config.vocab_size;
  int checked = 0;
  for (int i = 0;; ++i) {
    std::string key = "input_ids." + std::to_string(i);
    if (!ref.tensors.count(key)) break;
    std::vector<int32_t> ids = to_ids(ref.tensors.at(key));
    ContiguousKvCache kv(*backend, dense_kv_geometry(ck.config), static_cast<int32_t>(ids.size()),
                         model.inv_freq());
    Tensor logits = run_logits(model, kv, 0, ids, c.chunk);
    const auto [positions, expected] = reference_logits(ref, i, static_cast<int64_t>(ids.size()));
    ASSERT_EQ(expected.dim(0), static_cast<int64_t>(positions.size()));
    double max_diff = 0;
    for (size_t r = 0; r < positions.size(); ++r) {
      const float* got = logits.data<float>() + positions[r] * V;
      const float* want = expected.data<float>() + r * V;
      for (int64_t v = 0; v < V; ++v)
        max_diff = std::max(max_diff, double(std::fabs(got[v] - want[v])));
    }
    EXPECT_LE(max_diff, 1e-3) << c.model << " sequence " << i << " (" << ids.size() << " tokens)";
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST_P(RefsParity, GreedyMatchesTransformers) {
  const Case& c = GetParam();
  RK_REQUIRE_SHARED("refs/" + c.model);
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("refs/" + c.model));
  auto backend = create_backend(c.backend);
  Model model(ck, *backend);
  SafetensorsFile ref = read_safetensors(shared_path("refs/" + c.model + "/reference.safetensors"));
  std::vector<int32_t> prompt = to_ids(ref.tensors.at("greedy.prompt"));
  std::vector<int32_t> want = to_ids(ref.tensors.at("greedy.output"));
  ContiguousKvCache kv(*backend, dense_kv_geometry(ck.config), 128, model.inv_freq());
  GenerateOptions opts;
  opts.max_tokens = static_cast<int32_t>(want.size());
  opts.stop_at_eos = false;
  opts.prefill_chunk = static_cast<int32_t>(c.chunk);
  GenerateResult r = generate(model, kv, 0, prompt, opts);
  EXPECT_EQ(r.ids, want);
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const std::string& m : refs_models()) {
    cases.push_back({m, "cpu", 4096});
    cases.push_back({m, "cpu", 37});
    cases.push_back({m, "reference", 4096});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllModels, RefsParity, ::testing::ValuesIn(all_cases()), case_name);

}  // namespace
}  // namespace redknot::testing
