// Mixed global/local head profiles at model level: on the refs models, logits through the paged
// store (page sizes 16 and 64) equal the dense store with the same per-(layer, kv head) masks
// ("dense + mask", SPEC §3: cosine > 0.99998 per row) for whole and chunked prefill and for long
// decodes that slide local heads' windows (their pages recycle, their usage stays bounded while
// global heads grow), and fork + continue on both branches equals running each branch alone.
#include <cmath>
#include <map>
#include <memory>

#include "kv/paged_kv_cache.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

constexpr double kMinCosine = 0.99998;

struct LoadedModel {
  Checkpoint ckpt;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::vector<int32_t> ids;  // the 300-token input of reference.safetensors
};

// Loads each refs model once per process.
LoadedModel& Load(const std::string& name) {
  static std::map<std::string, std::unique_ptr<LoadedModel>> cache;
  auto& slot = cache[name];
  if (!slot) {
    register_builtin_backends();
    slot = std::make_unique<LoadedModel>();
    slot->ckpt = load_checkpoint(shared_path("refs/" + name));
    slot->backend = create_backend("cpu");
    slot->model = std::make_unique<Model>(slot->ckpt, *slot->backend);
    SafetensorsFile ref = read_safetensors(shared_path("refs/" + name + "/reference.safetensors"));
    slot->ids = to_ids(ref.tensors.at("input_ids.3"));
  }
  return *slot;
}

// "half": every other (layer, kv head) pair local with window 16 and sink 4, the rest global.
// "varied": a third global, the others local with different windows and sinks per head.
HeadProfile MakeProfile(const ModelConfig& cfg, const std::string& kind) {
  const int32_t L = static_cast<int32_t>(cfg.num_layers),
                H = static_cast<int32_t>(cfg.num_kv_heads);
  HeadProfile p(L, H);
  for (int32_t l = 0; l < L; ++l)
    for (int32_t h = 0; h < H; ++h) {
      const int32_t i = l * H + h;
      if (kind == "half") {
        if (i % 2 == 1) p.at(l, h) = {HeadClass::Local, 16, 4};
      } else {
        static constexpr int32_t kWindows[] = {8, 16, 24, 40, 5}, kSinks[] = {0, 4, 2, 1, 3};
        if (i % 3 != 0) p.at(l, h) = {HeadClass::Local, kWindows[i % 5], kSinks[i % 5]};
      }
    }
  return p;
}

struct PagedStore {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<PagedKvCache> cache;
};

// A pool for `seqs` sequences of `tokens` tokens if every head were global, plus slack.
PagedStore MakePaged(Model& model, const HeadProfile& profile, int32_t page, int64_t tokens,
                     int seqs = 1) {
  const ModelConfig& cfg = model.config();
  const int64_t pages = cfg.num_layers * cfg.num_kv_heads * seqs * ((tokens + page - 1) / page + 2);
  PagedStore s;
  s.pool = std::make_unique<PagePool>(model.backend(), static_cast<int32_t>(pages), page,
                                      static_cast<int32_t>(cfg.head_dim));
  PagedKvOptions opts;
  opts.scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  s.cache = std::make_unique<PagedKvCache>(*s.pool, profile, opts, model.inv_freq());
  return s;
}

std::unique_ptr<ContiguousKvCache> MakeDense(Model& model, const HeadProfile& profile,
                                             int32_t capacity) {
  return std::make_unique<ContiguousKvCache>(
      model.backend(), dense_kv_geometry(model.config(), &profile), capacity, model.inv_freq());
}

double Cosine(const float* a, const float* b, int64_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t i = 0; i < n; ++i) {
    ab += double{a[i]} * b[i];
    aa += double{a[i]} * a[i];
    bb += double{b[i]} * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

// Row r of `got` against row r of `want` (both [rows, V]); an empty string when all match.
std::string CompareRows(const Tensor& got, const Tensor& want, const std::string& what) {
  if (got.shape() != want.shape()) return what + ": shapes differ";
  const int64_t V = got.dim(1);
  for (int64_t r = 0; r < got.dim(0); ++r) {
    const double c = Cosine(got.data<float>() + r * V, want.data<float>() + r * V, V);
    if (!(c >= kMinCosine))
      return what + ": row " + std::to_string(r) + " cosine " + std::to_string(c);
  }
  return "";
}

// Logits of every token of `ids` appended to `seq` (from its next position), `chunk` at a time.
Tensor Append(Model& model, KvCache& kv, SeqId seq, const std::vector<int32_t>& ids,
              int64_t chunk) {
  return run_logits(model, kv, seq, ids, chunk);
}

std::vector<int32_t> Slice(const std::vector<int32_t>& v, size_t b, size_t e) {
  return std::vector<int32_t>(v.begin() + b, v.begin() + e);
}

struct MixedCase {
  std::string model, profile;
  int32_t page;
};

void PrintTo(const MixedCase& c, std::ostream* os) {
  *os << c.model << ", profile " << c.profile << ", page " << c.page;
}

class MixedProfile : public ::testing::TestWithParam<MixedCase> {
 protected:
  void SetUp() override {
    RK_REQUIRE_SHARED("refs/" + GetParam().model);
    m_ = &Load(GetParam().model);
    profile_ = MakeProfile(m_->model->config(), GetParam().profile);
  }
  Model& model() { return *m_->model; }
  const std::vector<int32_t>& ids() { return m_->ids; }

  LoadedModel* m_ = nullptr;
  HeadProfile profile_;
};

TEST_P(MixedProfile, PrefillMatchesDenseWithMasks) {
  const int32_t page = GetParam().page;
  const int64_t T = static_cast<int64_t>(ids().size());
  ASSERT_EQ(T, 300);
  auto dense = MakeDense(model(), profile_, static_cast<int32_t>(T));
  const Tensor want = Append(model(), *dense, 0, ids(), T);

  // The profile matters: all-global attention gives visibly different logits late in the text.
  auto global = MakeDense(model(), HeadProfile(profile_.num_layers(), profile_.num_kv_heads()),
                          static_cast<int32_t>(T));
  const Tensor all_global = Append(model(), *global, 0, ids(), T);
  const int64_t V = want.dim(1);
  double min_cos = 1;
  for (int64_t r = 100; r < T; ++r)
    min_cos =
        std::min(min_cos, Cosine(want.data<float>() + r * V, all_global.data<float>() + r * V, V));
  EXPECT_LT(min_cos, 0.9999) << "local heads had no effect: the comparison would prove nothing";

  for (int64_t chunk : {T, int64_t{7}, int64_t{50}}) {
    PagedStore paged = MakePaged(model(), profile_, page, T);
    const Tensor got = Append(model(), *paged.cache, 0, ids(), chunk);
    const std::string e = CompareRows(got, want, "chunk " + std::to_string(chunk));
    EXPECT_TRUE(e.empty()) << e;
    paged.cache->remove_sequence(0);
    EXPECT_EQ(paged.pool->num_free(), paged.pool->num_pages()) << "pages leaked";
  }
}

TEST_P(MixedProfile, DecodeSlidesWindowsWithBoundedLocalPages) {
  const int32_t page = GetParam().page;
  // Long enough for windows to slide past whole pages at either page size.
  const int64_t prefill = 40, steps = page == 16 ? 100 : 160, T = prefill + steps;
  int64_t local_heads = 0, global_heads = 0, local_bound = 0;
  for (int32_t l = 0; l < profile_.num_layers(); ++l)
    for (int32_t h = 0; h < profile_.num_kv_heads(); ++h) {
      const HeadSpec& s = profile_.at(l, h);
      if (s.cls == HeadClass::Global) {
        ++global_heads;
      } else {
        ++local_heads;
        // sink pages + the window's pages + the partial pages at the edges
        local_bound += (s.sink + page - 1) / page + (s.window + page - 1) / page + 1;
      }
    }
  ASSERT_GT(local_heads, 0);
  ASSERT_GT(global_heads, 0);

  auto dense = MakeDense(model(), profile_, static_cast<int32_t>(T));
  PagedStore paged = MakePaged(model(), profile_, page, T);
  const std::vector<int32_t> first = Slice(ids(), 0, prefill);
  const Tensor want0 = Append(model(), *dense, 0, first, prefill);
  const Tensor got0 = Append(model(), *paged.cache, 0, first, prefill);
  std::string e = CompareRows(got0, want0, "prefill");
  ASSERT_TRUE(e.empty()) << e;

  for (int64_t i = prefill; i < T; ++i) {
    const std::vector<int32_t> tok = {ids()[i]};
    const Tensor want = Append(model(), *dense, 0, tok, 1);
    const Tensor got = Append(model(), *paged.cache, 0, tok, 1);
    e = CompareRows(got, want, "decode step at position " + std::to_string(i));
    ASSERT_TRUE(e.empty()) << e;
    const KvUsage u = paged.cache->usage(0);
    const int64_t n = i + 1;
    EXPECT_EQ(u.global_tokens, global_heads * n);
    EXPECT_EQ(u.global_pages, global_heads * ((n + page - 1) / page));
    ASSERT_LE(u.local_pages, local_bound) << "local heads grew past sink + window at " << n;
    // The pool holds exactly the tables' pages (no fork: nothing shared, nothing leaked).
    EXPECT_EQ(paged.pool->num_pages() - paged.pool->num_free(), u.global_pages + u.local_pages);
  }
  const KvUsage u = paged.cache->usage(0);
  EXPECT_LT(u.local_pages, local_heads * ((T + page - 1) / page)) << "no local page was recycled";
  paged.cache->remove_sequence(0);
  EXPECT_EQ(paged.pool->num_free(), paged.pool->num_pages()) << "pages leaked";
}

TEST_P(MixedProfile, ForkedBranchesMatchRunningEachAlone) {
  const int32_t page = GetParam().page;
  const size_t prefix = 60, branch = 40;
  const std::vector<int32_t> shared = Slice(ids(), 0, prefix);
  const std::vector<int32_t> a = Slice(ids(), prefix, prefix + branch);
  const std::vector<int32_t> b = Slice(ids(), 200, 200 + branch);
  const int64_t T = prefix + branch;

  // Each branch alone, from scratch, in its own paged store.
  auto alone = [&](const std::vector<int32_t>& tail) {
    PagedStore s = MakePaged(model(), profile_, page, T);
    Append(model(), *s.cache, 0, shared, 23);
    return Append(model(), *s.cache, 0, tail, 1);
  };
  const Tensor want_a = alone(a), want_b = alone(b);
  // And through the dense oracle, to tie both to the masks.
  auto dense = MakeDense(model(), profile_, static_cast<int32_t>(T));
  Append(model(), *dense, 0, shared, 23);
  std::string e = CompareRows(Append(model(), *dense, 0, a, 1), want_a, "dense branch a");
  EXPECT_TRUE(e.empty()) << e;

  // Shared prefix once, fork, then both branches advance together in the same batches.
  PagedStore s = MakePaged(model(), profile_, page, T, 2);
  Append(model(), *s.cache, 0, shared, 23);
  const int32_t used = s.pool->num_pages() - s.pool->num_free();
  s.cache->fork(0, 1);
  EXPECT_EQ(s.pool->num_pages() - s.pool->num_free(), used) << "fork must share pages";
  const int64_t V = model().config().vocab_size;
  Tensor got_a = Tensor::host(DType::F32, {static_cast<int64_t>(branch), V});
  Tensor got_b = Tensor::host(DType::F32, {static_cast<int64_t>(branch), V});
  for (size_t i = 0; i < branch;) {
    const size_t n = i < 10 ? 5 : 1;  // a few chunks, then decode steps
    Batch batch;
    batch.add_sequence(0, Slice(a, i, i + n), s.cache->next_position(0), true, true);
    batch.add_sequence(1, Slice(b, i, i + n), s.cache->next_position(1), true, true);
    const Tensor l = model().forward(batch, *s.cache);
    std::memcpy(got_a.data<float>() + i * V, l.data<float>(), n * V * sizeof(float));
    std::memcpy(got_b.data<float>() + i * V, l.data<float>() + n * V, n * V * sizeof(float));
    i += n;
  }
  e = CompareRows(got_a, want_a, "branch a after fork");
  EXPECT_TRUE(e.empty()) << e;
  e = CompareRows(got_b, want_b, "branch b after fork");
  EXPECT_TRUE(e.empty()) << e;
  s.cache->remove_sequence(0);
  s.cache->remove_sequence(1);
  EXPECT_EQ(s.pool->num_free(), s.pool->num_pages()) << "pages leaked";
}

std::vector<MixedCase> Cases() {
  std::vector<MixedCase> v;
  for (const char* m : {"llama3-tiny", "qwen3-tiny"})
    for (const char* p : {"half", "varied"})
      for (int32_t page : {16, 64}) v.push_back({m, p, page});
  return v;
}

INSTANTIATE_TEST_SUITE_P(RefsModels, MixedProfile, ::testing::ValuesIn(Cases()),
                         [](const auto& info) {
                           std::string n = info.param.model + "_" + info.param.profile + "_page" +
                                           std::to_string(info.param.page);
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

}  // namespace
}  // namespace redknot::testing
