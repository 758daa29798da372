// Every refs model on the CUDA backend (bf16 activations, f32 accumulation) against the HF
// float64 logits: cosine >= 0.999 per position, argmax equal wherever the reference top-2 gap
// exceeds 1% of the logit range, greedy equal for the first 8 tokens on the f32 models.
// Skipped where no CUDA backend is built or no GPU answers.
#include <cmath>

#include "engine/generate.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

std::unique_ptr<Backend> try_cuda() {
  register_builtin_backends();
  auto names = backend_names();
  if (std::find(names.begin(), names.end(), "cuda") == names.end()) return nullptr;
  try {
    return create_backend("cuda");
  } catch (const std::exception&) {
    return nullptr;
  }
}

class CudaRefs : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaRefs, LogitsAndGreedy) {
  const std::string name = GetParam();
  RK_REQUIRE_SHARED("refs/" + name);
  auto backend = try_cuda();
  if (!backend) GTEST_SKIP() << "no CUDA backend/GPU";
  Checkpoint ck = load_checkpoint(shared_path("refs/" + name));
  Model model(ck, *backend);
  SafetensorsFile ref = read_safetensors(shared_path("refs/" + name + "/reference.safetensors"));
  const int64_t V = ck.config.vocab_size;
  double worst_cos = 1;
  int argmax_checked = 0, argmax_bad = 0;
  for (int i = 0; ref.tensors.count("input_ids." + std::to_string(i)); ++i) {
    std::vector<int32_t> ids = to_ids(ref.tensors.at("input_ids." + std::to_string(i)));
    ContiguousKvCache kv(*backend, dense_kv_geometry(ck.config), static_cast<int32_t>(ids.size()),
                         model.inv_freq());
    Tensor logits = run_logits(model, kv, 0, ids, 512);
    const auto [positions, expected] = reference_logits(ref, i, static_cast<int64_t>(ids.size()));
    for (size_t r = 0; r < positions.size(); ++r) {
      const float* got = logits.data<float>() + positions[r] * V;
      const float* want = expected.data<float>() + r * V;
      double dot = 0, na = 0, nb = 0, lo = want[0], hi = want[0];
      int64_t best = 0, second = -1;
      for (int64_t v = 0; v < V; ++v) {
        dot += double(got[v]) * want[v], na += double(got[v]) * got[v],
            nb += double(want[v]) * want[v];
        lo = std::min<double>(lo, want[v]), hi = std::max<double>(hi, want[v]);
        if (want[v] > want[best]) best = v;
      }
      for (int64_t v = 0; v < V; ++v)
        if (v != best && (second < 0 || want[v] > want[second])) second = v;
      const double cos = dot / std::sqrt(na * nb);
      worst_cos = std::min(worst_cos, cos);
      EXPECT_GE(cos, 0.999) << name << " seq " << i << " pos " << positions[r];
      if (want[best] - want[second] > 0.01 * (hi - lo)) {
        ++argmax_checked;
        int64_t g = 0;
        for (int64_t v = 1; v < V; ++v)
          if (got[v] > got[g]) g = v;
        if (g != best) ++argmax_bad;
      }
    }
  }
  EXPECT_EQ(argmax_bad, 0) << "of " << argmax_checked << " positions with a clear top-1";
  std::printf("[cuda] %s: worst cosine %.6f, argmax checked at %d positions, %d differ\n",
              name.c_str(), worst_cos, argmax_checked, argmax_bad);
  if (ck.tensors.begin()->second.dtype() == DType::F32) {
    std::vector<int32_t> prompt = to_ids(ref.tensors.at("greedy.prompt"));
    std::vector<int32_t> want = to_ids(ref.tensors.at("greedy.output"));
    ContiguousKvCache kv(*backend, dense_kv_geometry(ck.config), 128, model.inv_freq());
    GenerateOptions opts;
    opts.max_tokens = 8;
    opts.stop_at_eos = false;
    GenerateResult r = generate(model, kv, 0, prompt, opts);
    EXPECT_EQ(r.ids, std::vector<int32_t>(want.begin(), want.begin() + 8)) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(AllModels, CudaRefs, ::testing::ValuesIn(refs_models()),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

}  // namespace
}  // namespace redknot::testing
