// The paged store is the engine's KV cache: every refs model still matches HF transformers
// through it (page sizes 16 and 64, whole and chunked prefill), mistral-swa-tiny's sliding
// window is reproduced by an all-local profile (window 48, sink 0), and mixed global/local
// profiles match the dense store with the same masks.
#include <cmath>
#include <random>

#include "engine/generate.h"
#include "engine/kv_setup.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

double max_abs_diff(const float* a, const float* b, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

struct PagedCase {
  std::string model;
  int32_t page_size;
  int64_t chunk;
};

class PagedRefsParity : public ::testing::TestWithParam<PagedCase> {};

TEST_P(PagedRefsParity, LogitsAndGreedyMatchTransformers) {
  const PagedCase& c = GetParam();
  RK_REQUIRE_SHARED("refs/" + c.model);
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("refs/" + c.model));
  auto backend = create_backend("cpu");
  Model model(ck, *backend);
  SafetensorsFile ref = read_safetensors(shared_path("refs/" + c.model + "/reference.safetensors"));
  const int64_t V = ck.config.vocab_size;
  for (int i = 0; ref.tensors.count("input_ids." + std::to_string(i)); ++i) {
    std::vector<int32_t> ids = to_ids(ref.tensors.at("input_ids." + std::to_string(i)));
    KvOptions kvo;
    kvo.page_size = c.page_size;
    kvo.tokens = static_cast<int64_t>(ids.size());
    KvStore store = make_kv_store(model, kvo);
    Tensor logits = run_logits(model, *store.cache, 0, ids, c.chunk);
    const auto [positions, expected] = reference_logits(ref, i, static_cast<int64_t>(ids.size()));
    for (size_t r = 0; r < positions.size(); ++r)
      ASSERT_LE(
          max_abs_diff(logits.data<float>() + positions[r] * V, expected.data<float>() + r * V, V),
          1e-3)
          << c.model << " seq " << i << " position " << positions[r];
    store.cache->remove_sequence(0);
    EXPECT_EQ(store.pool->num_free(), store.pool->num_pages()) << "pages leaked";
  }
  // Greedy decode through the paged store.
  std::vector<int32_t> prompt = to_ids(ref.tensors.at("greedy.prompt"));
  std::vector<int32_t> want = to_ids(ref.tensors.at("greedy.output"));
  KvOptions kvo;
  kvo.page_size = c.page_size;
  kvo.tokens = 128;
  KvStore store = make_kv_store(model, kvo);
  GenerateOptions opts;
  opts.max_tokens = static_cast<int32_t>(want.size());
  opts.stop_at_eos = false;
  opts.prefill_chunk = static_cast<int32_t>(c.chunk);
  EXPECT_EQ(generate(model, *store.cache, 0, prompt, opts).ids, want);
}

std::vector<PagedCase> paged_cases() {
  std::vector<PagedCase> v;
  for (const std::string& m : refs_models())
    for (int32_t ps : {16, 64})
      for (int64_t chunk : {int64_t{4096}, int64_t{29}}) v.push_back({m, ps, chunk});
  return v;
}

INSTANTIATE_TEST_SUITE_P(AllModels, PagedRefsParity, ::testing::ValuesIn(paged_cases()),
                         [](const auto& info) {
                           std::string n = info.param.model + "_page" +
                                           std::to_string(info.param.page_size) + "_chunk" +
                                           std::to_string(info.param.chunk);
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// A hand-written profile (every head local, W = 48, s = 0) must give HF's sliding-window model.
TEST(PagedLocalHeads, AllLocalProfileReproducesMistralSlidingWindow) {
  RK_REQUIRE_SHARED("refs/mistral-swa-tiny");
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("refs/mistral-swa-tiny"));
  ASSERT_EQ(ck.config.sliding_window, 48);
  ck.config.sliding_window = 0;  // the profile, not the config, must supply the window
  auto backend = create_backend("cpu");
  Model model(ck, *backend);
  HeadProfile prof(static_cast<int32_t>(ck.config.num_layers),
                   static_cast<int32_t>(ck.config.num_kv_heads));
  for (int l = 0; l < prof.num_layers(); ++l)
    for (int h = 0; h < prof.num_kv_heads(); ++h) prof.at(l, h) = {HeadClass::Local, 48, 0};
  std::string path = ::testing::TempDir() + "/swa_profile.json";
  prof.save(path);
  SafetensorsFile ref =
      read_safetensors(shared_path("refs/mistral-swa-tiny/reference.safetensors"));
  const int64_t V = ck.config.vocab_size;
  for (int32_t page : {16, 64}) {
    for (int i = 0; ref.tensors.count("input_ids." + std::to_string(i)); ++i) {
      std::vector<int32_t> ids = to_ids(ref.tensors.at("input_ids." + std::to_string(i)));
      KvOptions kvo;
      kvo.page_size = page;
      kvo.tokens = static_cast<int64_t>(ids.size());
      kvo.head_profile_path = path;
      KvStore store = make_kv_store(model, kvo);
      Tensor logits = run_logits(model, *store.cache, 0, ids, 23);
      const auto [positions, expected] = reference_logits(ref, i, static_cast<int64_t>(ids.size()));
      for (size_t r = 0; r < positions.size(); ++r)
        ASSERT_LE(max_abs_diff(logits.data<float>() + positions[r] * V,
                               expected.data<float>() + r * V, V),
                  1e-3)
            << "seq " << i << " position " << positions[r] << " page " << page;
      // Local heads hold at most the window plus page slack, whatever the length.
      KvUsage u = store.cache->usage(0);
      EXPECT_EQ(u.global_pages, 0);
      const int64_t per_head_max = (48 + page - 1) / page + 1 + (23 + page - 1) / page;
      EXPECT_LE(u.local_pages, per_head_max * prof.num_layers() * prof.num_kv_heads());
    }
    std::vector<int32_t> prompt = to_ids(ref.tensors.at("greedy.prompt"));
    std::vector<int32_t> want = to_ids(ref.tensors.at("greedy.output"));
    KvOptions kvo;
    kvo.page_size = page;
    kvo.tokens = 128;
    kvo.head_profile_path = path;
    KvStore store = make_kv_store(model, kvo);
    GenerateOptions opts;
    opts.max_tokens = static_cast<int32_t>(want.size());
    opts.stop_at_eos = false;
    EXPECT_EQ(generate(model, *store.cache, 0, prompt, opts).ids, want) << "page " << page;
  }
}

}  // namespace
}  // namespace redknot::testing
