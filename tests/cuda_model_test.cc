// Every refs model on the CUDA backend (bf16 activations, f32 accumulation) against the HF
// float64 logits: cosine >= 0.999 per position, argmax equal wherever the reference top-2 gap
// exceeds 1% of the logit range, greedy equal for the first 8 tokens on the f32 models.
// Skipped where no CUDA backend is built or no GPU answers.
#include <cmath>

#include "engine/generate.h"
#include "engine/kv_setup.h"
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

// Decode steps as CUDA graphs (the default on CUDA) on the paged store: two sequences decoded
// together, greedy, each step's logits against the same steps run eagerly on a second store;
// on the f32 refs the greedy tokens of sequence 0 equal the reference's.
TEST_P(CudaRefs, DecodeGraphsEqualEagerSteps) {
  const std::string name = GetParam();
  RK_REQUIRE_SHARED("refs/" + name);
  auto backend = try_cuda();
  if (!backend) GTEST_SKIP() << "no CUDA backend/GPU";
  Checkpoint ck = load_checkpoint(shared_path("refs/" + name));
  SafetensorsFile ref = read_safetensors(shared_path("refs/" + name + "/reference.safetensors"));
  const std::vector<int32_t> prompt = to_ids(ref.tensors.at("greedy.prompt"));
  const std::vector<int32_t> want = to_ids(ref.tensors.at("greedy.output"));
  const int64_t V = ck.config.vocab_size;
  constexpr int kSteps = 8;
  // steps[mode][step]: logits of both sequences; tokens[mode]: sequence 0's greedy tokens.
  // Mode 2: graphs again, with the argmax taken on the device (forward_greedy).
  std::vector<std::vector<float>> steps[3];
  std::vector<int32_t> tokens[3];
  Model::DecodeGraphStats graph_stats;
  for (int mode = 0; mode < 3; ++mode) {
    Model model(ck, *backend);
    model.set_decode_graphs(mode >= 1);
    KvOptions ko;
    ko.page_size = 16;
    ko.tokens = static_cast<int64_t>(prompt.size()) + 64;
    ko.budget_bytes = kv_bytes_for(model, ko.page_size, ko.tokens, 2);
    KvStore store = make_kv_store(model, ko);
    PagedKvCache& kv = *store.cache;
    std::vector<int32_t> next(2);
    for (int s = 0; s < 2; ++s) {  // sequence 1: the prompt without its first 3 tokens
      const std::vector<int32_t> ids(prompt.begin() + 3 * s, prompt.end());
      kv.add_sequence(s);
      Batch b;
      b.add_sequence(s, ids, 0);
      Tensor l = model.forward(b, kv);
      next[s] = static_cast<int32_t>(std::max_element(l.data<float>(), l.data<float>() + V) -
                                     l.data<float>());
    }
    for (int i = 0; i < kSteps; ++i) {
      tokens[mode].push_back(next[0]);
      Batch b;
      for (int s = 0; s < 2; ++s) b.add_sequence(s, {next[s]}, kv.next_position(s));
      if (mode == 2) {
        const std::vector<int32_t> ids = model.forward_greedy(b, kv);
        next.assign(ids.begin(), ids.end());
        continue;
      }
      Tensor l = model.forward(b, kv);
      steps[mode].emplace_back(l.data<float>(), l.data<float>() + 2 * V);
      for (int s = 0; s < 2; ++s) {
        const float* row = l.data<float>() + s * V;
        next[s] = static_cast<int32_t>(std::max_element(row, row + V) - row);
      }
    }
    if (mode == 1) graph_stats = model.decode_graph_stats();
    if (mode == 2) EXPECT_EQ(model.decode_graph_stats().replayed, kSteps) << name;
  }
  EXPECT_EQ(tokens[2], tokens[0]) << name << ": device argmax differs from the host's";
  EXPECT_EQ(graph_stats.replayed, kSteps) << "decode steps did not run as graphs";
  EXPECT_GE(graph_stats.recorded, 1);
  double worst = 0;
  for (int i = 0; i < kSteps; ++i)
    for (int64_t v = 0; v < 2 * V; ++v)
      worst = std::max(worst, std::fabs(double(steps[0][i][v]) - steps[1][i][v]));
  // The same kernels on the same inputs, except that the recorded step's plan arrays have a
  // fixed capacity, which may change the split-KV count: a few bf16 ulps of the logits at most.
  EXPECT_LE(worst, 0.05) << name;
  EXPECT_EQ(tokens[0], tokens[1]) << name;
  if (ck.tensors.begin()->second.dtype() == DType::F32)
    EXPECT_EQ(tokens[1], std::vector<int32_t>(want.begin(), want.begin() + kSteps)) << name;
  std::printf("[cuda] %s: decode graphs %lld recorded, %lld replayed, max |logit diff| %.3g\n",
              name.c_str(), static_cast<long long>(graph_stats.recorded),
              static_cast<long long>(graph_stats.replayed), worst);
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
