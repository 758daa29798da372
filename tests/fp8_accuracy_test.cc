// Issue #21's accuracy check on the CPU: every refs model with its linear projections quantized
// to FP8 at load time (`--quantization fp8`: per-channel e4m3 weights, per-token e4m3
// activations), with the FP8 KV cache (`--kv-cache-dtype fp8`, paged store), and both, against
// the unquantized run of the same model (f32, dense cache): logits cosine over every stored
// sequence, and greedy tokens over 8 steps wherever the unquantized top-2 gap exceeds 1% of the
// logit range (teacher-forced on the unquantized continuation, so one flip does not hide the
// rest). Prints one line per model with the issue's criterion (cosine >= 0.999, greedy equal at
// gap > 1%) met or not; asserts the bounds e4m3 can hold on random weights (see the end).
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "engine/generate.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "loader/fp8_checkpoint.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

struct Cosines {
  double min_row = 1.0, sum_row = 0.0;
  int64_t rows = 0;
  void add(const float* a, const float* b, int64_t n) {
    double ab = 0, aa = 0, bb = 0;
    for (int64_t i = 0; i < n; ++i) {
      ab += double(a[i]) * b[i];
      aa += double(a[i]) * a[i];
      bb += double(b[i]) * b[i];
    }
    const double c = ab / std::sqrt(aa * bb);
    min_row = std::min(min_row, c);
    sum_row += c;
    ++rows;
  }
  double mean() const { return rows ? sum_row / rows : 0.0; }
};

// What is quantized: weights (per-channel) + activations (per token), the KV cache, or both.
struct Variant {
  std::string model;
  bool weights, kv;
};
void PrintTo(const Variant& v, std::ostream* os) {
  *os << v.model << (v.weights ? " w8a8" : "") << (v.kv ? " kv8" : "");
}

// A fresh cache for `tokens` tokens: the dense one, or the paged store with an FP8 pool (the
// model's own attention: every head, or its sliding window).
struct Cache {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<KvCache> kv;
  Cache(Model& model, Backend& backend, int64_t tokens, bool fp8) {
    const ModelConfig& c = model.config();
    if (!fp8) {
      kv = std::make_unique<ContiguousKvCache>(backend, dense_kv_geometry(c),
                                               static_cast<int32_t>(tokens), model.inv_freq());
      return;
    }
    constexpr int32_t kPage = 16;
    const int64_t pages = c.num_layers * c.num_kv_heads * (tokens / kPage + 2);
    pool = std::make_unique<PagePool>(backend, static_cast<int32_t>(pages), kPage,
                                      static_cast<int32_t>(c.head_dim), true, DType::F8_E4M3);
    PagedKvOptions po;
    po.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    kv = std::make_unique<PagedKvCache>(*pool, HeadProfile::native(c), po, model.inv_freq());
  }
};

// Logits [ids, vocab] of one sequence run whole through a fresh cache.
Tensor sequence_logits(Model& model, Backend& backend, const std::vector<int32_t>& ids,
                       bool fp8_kv) {
  Cache cache(model, backend, static_cast<int64_t>(ids.size()), fp8_kv);
  return run_logits(model, *cache.kv, 0, ids, 4096);
}

// The backend both sides run on: cpu, or REDKNOT_FP8_BACKEND (scripts/gpu-fp8-check.sh sets
// cuda, where the unquantized side is the backend's bf16, as the issue compares).
std::string test_backend() {
  const char* b = std::getenv("REDKNOT_FP8_BACKEND");
  return b != nullptr && *b != '\0' ? b : "cpu";
}

class Fp8Accuracy : public ::testing::TestWithParam<Variant> {};

TEST_P(Fp8Accuracy, LogitsAndGreedyMatchUnquantized) {
  const Variant& var = GetParam();
  const std::string& name = var.model;
  RK_REQUIRE_SHARED("refs/" + name);
  register_builtin_backends();
  const std::string dir = shared_path("refs/" + name);
  Checkpoint base_ck = load_checkpoint(dir);
  Checkpoint fp8_ck = load_checkpoint(dir);
  if (var.weights) {
    apply_quantization(fp8_ck, "fp8");
    ASSERT_EQ(fp8_ck.weight_quant, kQuantFp8Channel);
  }
  const std::vector<std::string> names = backend_names();
  if (std::find(names.begin(), names.end(), test_backend()) == names.end())
    GTEST_SKIP() << "backend " << test_backend() << " not built";
  auto backend = create_backend(test_backend());
  Model base(base_ck, *backend), fp8(fp8_ck, *backend);
  if (var.weights) {
    EXPECT_LT(fp8.weight_bytes(), base.weight_bytes());
  }
  const int64_t V = base_ck.config.vocab_size;
  SafetensorsFile ref = read_safetensors(dir + "/reference.safetensors");

  // ---- logits cosine over every stored sequence (1 to 2100 tokens) ----
  Cosines cos;
  for (int i = 0; ref.tensors.count("input_ids." + std::to_string(i)); ++i) {
    const std::vector<int32_t> ids = to_ids(ref.tensors.at("input_ids." + std::to_string(i)));
    Tensor a = sequence_logits(base, *backend, ids, false);
    Tensor b = sequence_logits(fp8, *backend, ids, var.kv);
    for (int64_t r = 0; r < a.dim(0); ++r)
      cos.add(a.data<float>() + r * V, b.data<float>() + r * V, V);
  }

  // ---- greedy: 8 unquantized tokens after each prompt, compared where the gap is clear ----
  std::vector<std::vector<int32_t>> prompts = {to_ids(ref.tensors.at("greedy.prompt"))};
  for (int i = 1; i <= 3 && ref.tensors.count("input_ids." + std::to_string(i)); ++i) {
    std::vector<int32_t> ids = to_ids(ref.tensors.at("input_ids." + std::to_string(i)));
    for (size_t start : {size_t{0}, ids.size() / 2})
      prompts.emplace_back(ids.begin() + start,
                           ids.begin() + start + std::min<size_t>(24, ids.size() - start));
  }
  // Steps compared at the issue's gap (> 1% of the range) and at the gap this format's noise
  // cannot flip (> 5%, asserted: see below).
  int checked = 0, equal = 0, skipped = 0, clear = 0, clear_equal = 0;
  // Steps where the unquantized model's own prefill picks another token than its decode did
  // (near-ties in bf16 on CUDA): the prefill argmax is the reference either way.
  int path_flips = 0;
  double worst_flip_gap = 0;  // largest gap (% of range) at which FP8 chose another token
  for (const std::vector<int32_t>& prompt : prompts) {
    ContiguousKvCache kv(*backend, dense_kv_geometry(base_ck.config), 64, base.inv_freq());
    GenerateOptions opts;
    opts.max_tokens = 8;
    opts.stop_at_eos = false;
    const std::vector<int32_t> cont = generate(base, kv, 0, prompt, opts).ids;
    ASSERT_EQ(cont.size(), 8u);
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), cont.begin(), cont.end() - 1);
    Tensor a = sequence_logits(base, *backend, all, false);
    Tensor b = sequence_logits(fp8, *backend, all, var.kv);
    for (int s = 0; s < 8; ++s) {
      const int64_t row = static_cast<int64_t>(prompt.size()) - 1 + s;
      const float* la = a.data<float>() + row * V;
      const float* lb = b.data<float>() + row * V;
      int64_t top = 0, second = -1, fp8_top = 0;
      float lo = la[0], hi = la[0];
      for (int64_t v = 1; v < V; ++v) {
        lo = std::min(lo, la[v]);
        hi = std::max(hi, la[v]);
        if (la[v] > la[top]) top = v;
        if (lb[v] > lb[fp8_top]) fp8_top = v;
      }
      for (int64_t v = 0; v < V; ++v)
        if (v != top && (second < 0 || la[v] > la[second])) second = v;
      path_flips += top != cont[s];
      const double gap = 100.0 * (la[top] - la[second]) / (hi - lo);
      if (fp8_top != top) worst_flip_gap = std::max(worst_flip_gap, gap);
      if (gap <= 1.0) {
        ++skipped;
        continue;
      }
      ++checked;
      equal += fp8_top == top;
      if (gap > 5.0) {
        ++clear;
        clear_equal += fp8_top == top;
        EXPECT_EQ(fp8_top, top) << name << " prompt of " << prompt.size() << " tokens, step " << s
                                << ": gap " << gap << "% of range";
      }
    }
  }
  const bool issue_met = cos.min_row >= 0.999 && equal == checked;
  const char* what = var.weights && var.kv ? "W8A8+KV8" : var.weights ? "W8A8" : "KV8";
  std::printf(
      "[ fp8 ] %s %-16s %-8s vs unquantized: logits cosine min %.6f mean %.6f (%lld rows); "
      "greedy equal %d/%d at gap > 1%% (%d skipped), %d/%d at gap > 5%%, largest gap "
      "flipped %.2f%% (decode/prefill flips %d); issue #21 criterion: %s\n",
      backend->name().c_str(), name.c_str(), what, cos.min_row, cos.mean(),
      static_cast<long long>(cos.rows), equal, checked, skipped, clear_equal, clear, worst_flip_gap,
      path_flips, issue_met ? "met" : "NOT met");
  EXPECT_GT(clear, 0);
  if (backend->act_dtype() == DType::F32) {
    EXPECT_EQ(path_flips, 0) << "f32 decode vs prefill";
  }
  // Asserted bounds, below the issue's (cosine 0.999, every step with gap > 1%), which these
  // random-weight models cannot meet in e4m3: per-channel weights alone give ~0.9984 (3 mantissa
  // bits: ~2.4% RMS relative rounding error per operand whatever the scale granularity), per-token
  // activations as much again (fp8_checkpoint_test), and logits noise of that size flips tokens
  // whose lead is a few percent of the range. A fault in a scale, layout or kernel lands far
  // below these bounds (and shows exactly in op parity and the loader test).
  EXPECT_GE(cos.mean(), 0.995) << name;
  // The worst of ~2500 rows is a tail statistic: 0.9898-0.9933 measured over the W8A8 variants.
  EXPECT_GE(cos.min_row, 0.985) << name;
}

std::vector<Variant> all_variants() {
  std::vector<Variant> v;
  for (const std::string& m : refs_models()) {
    v.push_back({m, true, false});
    v.push_back({m, true, true});
    v.push_back({m, false, true});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(AllModels, Fp8Accuracy, ::testing::ValuesIn(all_variants()),
                         [](const ::testing::TestParamInfo<Variant>& info) {
                           std::string n = info.param.model + (info.param.weights ? "_w8a8" : "") +
                                           (info.param.kv ? "_kv8" : "");
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

}  // namespace
}  // namespace redknot::testing
