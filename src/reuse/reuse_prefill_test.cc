// Dead-row skipping of redknot mode (ReuseOptions::skip_dead_rows) on a random tiny Llama on the
// CPU backend (no files from ../shared): dead_row_split's edge cases; skipping is exact (the same
// last-token logits, the same greedy decode and the same KV that decoding reads as the one-pass
// redknot prefill) and does less work (FLOPs ledger, to the exact amount skipped); with a global
// head in the last layer it is a no-op; Model::forward refuses kv_only_from_layer when a deeper
// layer holds a global head. Query full attention (ReuseOptions::query_full_attention) against
// the dense + mask store with its head classes switched between passes.
#include "reuse/reuse_prefill.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/builtin.h"
#include "core/error.h"
#include "kv/contiguous_kv_cache.h"
#include "kv/head_profile.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "model/flops.h"
#include "model/random_checkpoint.h"
#include "reuse/chunk_prefill.h"
#include "reuse/chunk_store.h"

namespace redknot {
namespace {

constexpr int32_t kLayers = 5;
constexpr int32_t kPageSize = 16;

ModelConfig TinyConfig(int32_t layers = kLayers) {
  ModelConfig c = preset_config("tiny");  // 2 kv heads, head_dim 16, vocab 512
  c.num_layers = layers;
  return c;
}

// Every head local (window, sink), then the listed (layer, head) pairs global.
HeadProfile LocalProfile(int32_t layers, int32_t heads, int32_t window, int32_t sink,
                         const std::vector<std::pair<int, int>>& global = {}) {
  HeadProfile p(layers, heads);
  for (int32_t l = 0; l < layers; ++l)
    for (int32_t h = 0; h < heads; ++h) p.at(l, h) = {HeadClass::Local, window, sink};
  for (auto [l, h] : global) p.at(l, h).cls = HeadClass::Global;
  return p;
}

// ---- dead_row_split ----

TEST(DeadRowSplit, GlobalHeadInLastLayerMeansNoSplit) {
  const ModelConfig cfg = TinyConfig();
  const HeadProfile p = LocalProfile(kLayers, 2, 8, 4, {{1, 0}, {kLayers - 1, 1}});
  const DeadRowSplit s = dead_row_split(cfg, p, 100, 10000);
  EXPECT_EQ(s.tail, 0);
  // All global (no profile): no split either.
  EXPECT_EQ(dead_row_split(cfg, HeadProfile(kLayers, 2), 100, 10000).tail, 0);
}

TEST(DeadRowSplit, AllLocalSplitsFromLayerZero) {
  const ModelConfig cfg = TinyConfig();
  const HeadProfile p = LocalProfile(kLayers, 2, 8, 4);
  const DeadRowSplit s = dead_row_split(cfg, p, 100, 1000);
  EXPECT_EQ(s.kv_only_from_layer, 0);
  EXPECT_EQ(s.tail, int64_t{kLayers - 1} * (8 - 1) + 8 + 1);
}

TEST(DeadRowSplit, TailUsesWidestWindowPastTheLastGlobalLayer) {
  const ModelConfig cfg = TinyConfig();
  HeadProfile p = LocalProfile(kLayers, 2, 8, 2, {{0, 1}, {1, 0}});
  // Layers <= g = 1 do not count: a huge window and sink there change nothing.
  p.at(0, 0) = {HeadClass::Local, 500, 90};
  p.at(1, 1) = {HeadClass::Local, 400, 80};
  // Past g: windows 8, 12, 6, 10 (widest 12), sinks up to 3.
  p.at(2, 0).window = 12;
  p.at(3, 1).window = 6;
  p.at(4, 0) = {HeadClass::Local, 10, 3};
  const DeadRowSplit s = dead_row_split(cfg, p, 50, 1000);
  EXPECT_EQ(s.kv_only_from_layer, 1);
  EXPECT_EQ(s.tail, int64_t{kLayers - 1 - 1} * (12 - 1) + 12 + 1);  // 46
}

TEST(DeadRowSplit, TooFewRowsMeansNoSplit) {
  const ModelConfig cfg = TinyConfig();
  const HeadProfile p = LocalProfile(kLayers, 2, 8, 4, {{1, 0}});
  const int64_t tail = int64_t{kLayers - 1 - 1} * 7 + 9;  // 30
  EXPECT_EQ(dead_row_split(cfg, p, 100, tail - 1).tail, 0);
  EXPECT_EQ(dead_row_split(cfg, p, 100, tail).tail, 0);
  EXPECT_EQ(dead_row_split(cfg, p, 100, 0).tail, 0);
  const DeadRowSplit s = dead_row_split(cfg, p, 100, tail + 1);
  EXPECT_EQ(s.tail, tail);
  EXPECT_EQ(s.kv_only_from_layer, 1);
}

TEST(DeadRowSplit, SinkInsideTheRecomputedRowsMeansNoSplit) {
  const ModelConfig cfg = TinyConfig();
  HeadProfile p = LocalProfile(kLayers, 2, 8, 4, {{1, 0}});
  p.at(3, 1).sink = 6;  // the largest sink past g
  EXPECT_EQ(dead_row_split(cfg, p, 0, 1000).tail, 0);
  EXPECT_EQ(dead_row_split(cfg, p, 5, 1000).tail, 0);
  EXPECT_GT(dead_row_split(cfg, p, 6, 1000).tail, 0);
}

// ---- prefill_with_reuse: skipping against the one-pass redknot prefill ----

double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = double(a[i]) - b[i];
    num += d * d;
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<float> ToVec(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// One run: its cache, the prefill outcome, the greedy tokens and each step's logits.
struct RunResult {
  std::unique_ptr<PagedKvCache> kv;
  PrefillOutcome out;
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;
};

class DeadRowSkipping : public ::testing::Test {
 protected:
  static constexpr int kDecode = 6;
  static constexpr double kTol = 1e-5;  // relative L2 error

  void SetUp() override {
    register_builtin_backends();
    backend_ = create_backend("cpu");
  }

  void MakeModel(int32_t layers, uint64_t seed = 11) {
    chunks_.reset();  // before the pool it holds pages of
    cfg_ = TinyConfig(layers);
    ckpt_ = std::make_unique<Checkpoint>(random_checkpoint(cfg_, DType::F32, seed));
    model_ = std::make_unique<Model>(*ckpt_, *backend_);
    pool_ =
        std::make_unique<PagePool>(*backend_, 4096, kPageSize, static_cast<int32_t>(cfg_.head_dim));
    ChunkStoreOptions cso;
    cso.pool_budget_bytes = int64_t{1024} * pool_->bytes_per_page();
    chunks_ = std::make_unique<ChunkStore>(*model_, *pool_, cso);
  }

  // S0 of 40 tokens, then four segments of 50..65 and a 12-token query: 242 recomputed rows.
  SegmentedPrompt Prompt(int s0_len = 40, uint32_t seed = 5) const {
    std::mt19937 rng(seed);
    auto ids = [&](int n) {
      std::vector<int32_t> v(n);
      for (auto& t : v) t = static_cast<int32_t>(rng() % cfg_.vocab_size);
      return v;
    };
    SegmentedPrompt p;
    p.segments.push_back(ids(s0_len));
    p.segments[0][0] = static_cast<int32_t>(cfg_.bos_token_id);
    for (int i = 0; i < 4; ++i) p.segments.push_back(ids(50 + 5 * i));
    p.query = ids(12);
    return p;
  }

  RunResult Prefill(const HeadProfile& profile, const SegmentedPrompt& p, bool skip,
                    bool query_full = false) {
    RunResult r;
    r.kv = std::make_unique<PagedKvCache>(
        *pool_, profile, PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg_.head_dim))},
        model_->inv_freq());
    ReuseOptions ro;
    ro.mode = ReuseMode::RedKnot;
    ro.sparse_ffn_enabled = false;
    ro.skip_dead_rows = skip;
    ro.query_full_attention = query_full;
    r.out = prefill_with_reuse(*model_, *r.kv, 0, p, chunks_.get(), ro);
    Decode(r);  // with query_full, local heads read sink ∪ window again
    return r;
  }

  // Greedy decode, one token per forward.
  void Decode(RunResult& r) {
    std::vector<float> logits = r.out.last_logits;
    for (int i = 0; i < kDecode; ++i) {
      const int32_t next = Argmax(logits);
      r.tokens.push_back(next);
      Batch b;
      b.add_sequence(0, {next}, r.kv->next_position(0));
      logits = ToVec(model_->forward(b, *r.kv));
      r.logits.push_back(logits);
    }
  }

  // The KV every later query can read: for each (layer, kv head), the positions a query at the
  // next position sees (every one for global heads, sink ∪ window for local ones).
  void ExpectSameVisibleKv(const HeadProfile& profile, RunResult& a, RunResult& b) {
    const int32_t next = a.kv->next_position(0);
    ASSERT_EQ(next, b.kv->next_position(0));
    for (int l = 0; l < cfg_.num_layers; ++l)
      for (int h = 0; h < cfg_.num_kv_heads; ++h) {
        const HeadSpec& hs = profile.at(l, h);
        auto visible = [&](int32_t pos) {
          return hs.cls == HeadClass::Global || pos < hs.sink || pos > next - hs.window;
        };
        auto collect = [&](RunResult& r, std::vector<int32_t>& pos, std::vector<float>& k,
                           std::vector<float>& v) {
          Tensor kt, vt;
          std::vector<int32_t> all;
          r.kv->read(0, l, h, kt, vt, all);
          const int64_t D = cfg_.head_dim;
          for (size_t i = 0; i < all.size(); ++i) {
            if (!visible(all[i])) continue;
            pos.push_back(all[i]);
            k.insert(k.end(), kt.data<float>() + i * D, kt.data<float>() + (i + 1) * D);
            v.insert(v.end(), vt.data<float>() + i * D, vt.data<float>() + (i + 1) * D);
          }
        };
        std::vector<int32_t> pa, pb;
        std::vector<float> ka, kb, va, vb;
        collect(a, pa, ka, va);
        collect(b, pb, kb, vb);
        const int64_t expected =
            hs.cls == HeadClass::Global ? next : std::min<int64_t>(hs.sink, next) + hs.window - 1;
        EXPECT_EQ(static_cast<int64_t>(pa.size()), expected) << "layer " << l << " head " << h;
        EXPECT_EQ(pa, pb) << "layer " << l << " head " << h;
        EXPECT_LE(RelErr(ka, kb), kTol) << "layer " << l << " head " << h;
        EXPECT_LE(RelErr(va, vb), kTol) << "layer " << l << " head " << h;
      }
  }

  // Skipping against one pass on the same prompt: same logits, decode and visible KV, and the
  // ledger smaller by exactly what the split rows skipped.
  void ExpectExact(const HeadProfile& profile) {
    const SegmentedPrompt p = Prompt();
    const int64_t start = static_cast<int64_t>(p.segments[0].size());
    const int64_t n = p.total_tokens() - start;
    const DeadRowSplit split = dead_row_split(cfg_, profile, start, n);
    ASSERT_GT(split.tail, 0);
    ASSERT_TRUE(
        acquire_or_prefill(*model_, *chunks_, p.segments[0]).ok());  // S0 cached: both runs hit
    ASSERT_LT(split.tail, n / 4);  // most rows are dead: the test exercises the split

    RunResult one = Prefill(profile, p, false);
    RunResult skip = Prefill(profile, p, true);
    ASSERT_EQ(skip.out.last_logits.size(), static_cast<size_t>(cfg_.vocab_size));
    // f32 reassociation (two GEMM shapes instead of one) is ~3e-7 here; one row of tail too
    // few already gives 1e-5 to 5e-4 on these profiles.
    EXPECT_LE(RelErr(skip.out.last_logits, one.out.last_logits), kTol);
    EXPECT_EQ(skip.out.reused_tokens, start);
    EXPECT_EQ(one.out.reused_tokens, start);
    EXPECT_EQ(skip.kv->num_tokens(0), one.kv->num_tokens(0));
    EXPECT_EQ(skip.tokens, one.tokens);
    for (int i = 0; i < kDecode; ++i)
      EXPECT_LE(RelErr(skip.logits[i], one.logits[i]), kTol) << "decode step " << i;
    ExpectSameVisibleKv(profile, skip, one);

    // The split rows skip everything from layer g on except K/V at g.
    const int g = split.kv_only_from_layer;
    FlopsLedger skipped;
    const int64_t dead = n - split.tail;
    for (int64_t t = 0; t < dead; ++t)
      for (int l = g; l < cfg_.num_layers; ++l)
        attention_flops_at(cfg_, profile, l, start + t, skipped);
    skipped.projections = double(dead) * ((cfg_.num_layers - g) * projection_flops_per_token(cfg_) -
                                          kv_projection_flops_per_token(cfg_));
    skipped.ffn_dense = double(dead) * (cfg_.num_layers - g) * ffn_flops_per_token(cfg_);
    const double one_total = one.out.flops.total(), skip_total = skip.out.flops.total();
    EXPECT_LT(skip_total, one_total);
    EXPECT_NEAR(one_total - skip_total, skipped.total(), 1e-9 * one_total);
    EXPECT_NEAR(one.out.flops.projections - skip.out.flops.projections, skipped.projections,
                1e-9 * one_total);
    EXPECT_EQ(skip.out.flops.lm_head, one.out.flops.lm_head);
  }

  ModelConfig cfg_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<PagePool> pool_;
  std::unique_ptr<ChunkStore> chunks_;
};

TEST_F(DeadRowSkipping, ExactWithOneGlobalHeadInLayerOne) {
  MakeModel(kLayers);
  ExpectExact(LocalProfile(kLayers, 2, 8, 4, {{1, 0}}));
}

// Narrow windows: a placeholder one row too far back is diluted least, so this is the profile
// most sensitive to a tail that is too short.
TEST_F(DeadRowSkipping, ExactWithNarrowWindows) {
  MakeModel(kLayers);
  ExpectExact(LocalProfile(kLayers, 2, 4, 2, {{1, 0}}));
}

TEST_F(DeadRowSkipping, ExactWithMixedWindowsAndSinks) {
  MakeModel(6);
  HeadProfile p = LocalProfile(6, 2, 12, 2, {{0, 0}, {2, 1}});
  p.at(3, 0) = {HeadClass::Local, 5, 3};
  p.at(4, 1) = {HeadClass::Local, 9, 1};
  p.at(5, 0) = {HeadClass::Local, 3, 4};
  ExpectExact(p);
}

TEST_F(DeadRowSkipping, ExactWithEveryHeadLocal) {
  MakeModel(kLayers);
  ExpectExact(LocalProfile(kLayers, 2, 10, 4));
}

// A global head in the last layer: nothing is dead, skipping changes nothing.
TEST_F(DeadRowSkipping, NoOpWhenTheLastLayerHasAGlobalHead) {
  MakeModel(kLayers);
  const HeadProfile profile = LocalProfile(kLayers, 2, 8, 4, {{1, 0}, {kLayers - 1, 1}});
  const SegmentedPrompt p = Prompt();
  RunResult one = Prefill(profile, p, false);
  RunResult skip = Prefill(profile, p, true);
  ASSERT_EQ(skip.out.last_logits.size(), one.out.last_logits.size());
  EXPECT_EQ(std::memcmp(skip.out.last_logits.data(), one.out.last_logits.data(),
                        one.out.last_logits.size() * sizeof(float)),
            0);
  EXPECT_EQ(skip.tokens, one.tokens);
  for (int i = 0; i < kDecode; ++i) EXPECT_EQ(skip.logits[i], one.logits[i]) << "step " << i;
  EXPECT_EQ(skip.out.flops.total(), one.out.flops.total());
  EXPECT_EQ(skip.out.flops.projections, one.out.flops.projections);
}

// S0 shorter than a local head's sink: sink positions are recomputed rows, which every later
// query reads in every layer, so nothing may be split.
TEST_F(DeadRowSkipping, NoSplitWhenTheSinkReachesIntoRecomputedRows) {
  MakeModel(kLayers);
  const HeadProfile profile = LocalProfile(kLayers, 2, 8, 4, {{1, 0}});
  const SegmentedPrompt p = Prompt(2);
  EXPECT_EQ(dead_row_split(cfg_, profile, 2, p.total_tokens() - 2).tail, 0);
  RunResult one = Prefill(profile, p, false);
  RunResult skip = Prefill(profile, p, true);
  EXPECT_EQ(skip.out.last_logits, one.out.last_logits);
  EXPECT_EQ(skip.tokens, one.tokens);
  for (int i = 0; i < kDecode; ++i) EXPECT_EQ(skip.logits[i], one.logits[i]) << "step " << i;
  EXPECT_EQ(skip.out.flops.total(), one.out.flops.total());
}

// ---- Model::forward with kv_only_from_layer ----

TEST_F(DeadRowSkipping, KvOnlyRefusesAGlobalHeadInADeeperLayer) {
  MakeModel(kLayers);
  const HeadProfile profile = LocalProfile(kLayers, 2, 8, 4, {{3, 1}});
  PagedKvCache kv(*pool_, profile,
                  PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg_.head_dim))},
                  model_->inv_freq());
  kv.add_sequence(0);
  const std::vector<int32_t> ids = {1, 7, 9, 300, 42, 5};
  auto forward_kv_only = [&](int from) {
    Batch b;
    b.add_sequence(0, ids, kv.next_position(0));
    ForwardOptions fo;
    fo.kv_only_from_layer = from;
    return model_->forward(b, kv, fo);
  };
  for (int from : {0, 1, 2}) {
    try {
      forward_kv_only(from);
      ADD_FAILURE() << "kv_only_from_layer " << from << " did not throw";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("kv_only_from_layer " + std::to_string(from)), std::string::npos) << msg;
      EXPECT_NE(msg.find("layer 3 has a global head"), std::string::npos) << msg;
    }
  }
  try {
    forward_kv_only(kLayers);
    ADD_FAILURE() << "kv_only_from_layer past the last layer did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("past the last layer"), std::string::npos) << e.what();
  }
  // From the last global layer on, only local heads remain: allowed, and no logits.
  kv.remove_sequence(0);
  kv.add_sequence(0);
  Tensor logits = forward_kv_only(3);
  EXPECT_EQ(logits.numel(), 0);
  EXPECT_EQ(kv.num_tokens(0), static_cast<int32_t>(ids.size()));
}

// ---- query_full_attention: the query's rows attend with every head global ----

// Against the dense + mask oracle with its head classes switched between passes: S0 prefilled
// alone with every head global (what the chunk store caches), S1..Sn under the profile, the
// query with every head global in layers <= full_until (the profile above). Paged store, page
// retention, relocation and the paged kernel against the dense store and its masks.
class QueryFullAttention : public DeadRowSkipping {
 protected:
  std::vector<float> DenseOracle(const HeadProfile& profile, const SegmentedPrompt& p,
                                 int full_until) {
    const HeadProfile all_global(cfg_.num_layers, cfg_.num_kv_heads);
    HeadProfile query_profile = profile;
    for (int l = 0; l <= full_until; ++l)
      for (int h = 0; h < cfg_.num_kv_heads; ++h) query_profile.at(l, h).cls = HeadClass::Global;
    ContiguousKvCache dense(*backend_, dense_kv_geometry(cfg_, &all_global),
                            static_cast<int32_t>(p.total_tokens()) + 8, model_->inv_freq());
    dense.add_sequence(0);
    auto pass = [&](const std::vector<int32_t>& ids) {
      Batch b;
      b.add_sequence(0, ids, dense.next_position(0));
      return ToVec(model_->forward(b, dense));
    };
    pass(p.segments[0]);
    dense.set_head_profile(profile);
    std::vector<int32_t> docs;
    for (size_t i = 1; i < p.segments.size(); ++i)
      docs.insert(docs.end(), p.segments[i].begin(), p.segments[i].end());
    pass(docs);
    dense.set_head_profile(query_profile);
    return pass(p.query);
  }
};

TEST_F(QueryFullAttention, MatchesTheDenseOracleInEveryLayer) {
  MakeModel(kLayers);
  const HeadProfile profile = LocalProfile(kLayers, 2, 10, 4, {{1, 0}});
  const SegmentedPrompt p = Prompt();
  ASSERT_TRUE(acquire_or_prefill(*model_, *chunks_, p.segments[0])
                  .ok());  // S0 cached, as the paged run sees it
  RunResult r = Prefill(profile, p, /*skip=*/false, /*query_full=*/true);
  const std::vector<float> oracle = DenseOracle(profile, p, kLayers - 1);
  EXPECT_LE(RelErr(r.out.last_logits, oracle), kTol);
  // The flag matters here: without it the query's local heads see only sink ∪ window.
  RunResult plain = Prefill(profile, p, /*skip=*/false);
  EXPECT_GT(RelErr(plain.out.last_logits, oracle), 100 * kTol);
  // Afterwards (and after decoding) the local heads hold what a later query can see, as without
  // the flag, and the pages kept for the query pass went back to the pool: at most the sink's
  // pages, the window's and one partly used page per local head. (Which dead tokens share a page
  // with live ones may differ: without the flag, relocation never copies the dead tokens.)
  const int32_t next = r.kv->next_position(0), window = 10, sink = 4;
  ASSERT_EQ(next, plain.kv->next_position(0));
  auto visible = [&](std::vector<int32_t> held) {
    std::erase_if(held, [&](int32_t pos) { return pos >= sink && pos < next - window + 1; });
    return held;
  };
  int local_heads = 0;
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < 2; ++h) {
      Tensor k, v;
      std::vector<int32_t> held, held_plain;
      r.kv->read(0, l, h, k, v, held);
      plain.kv->read(0, l, h, k, v, held_plain);
      EXPECT_EQ(visible(held), visible(held_plain)) << "layer " << l << " head " << h;
      local_heads += profile.at(l, h).cls == HeadClass::Local;
    }
  const int64_t per_head = (sink + kPageSize - 1) / kPageSize + (window - 1) / kPageSize + 2;
  EXPECT_LE(r.kv->usage(0).local_pages, local_heads * per_head);
  EXPECT_LE(plain.kv->usage(0).local_pages, local_heads * per_head);
}

// With dead-row skipping the query's rows see every head globally up to the last global layer
// (the dead rows' K/V exist up to it) and keep the profile above.
TEST_F(QueryFullAttention, WithDeadRowSkippingFullUpToTheLastGlobalLayer) {
  MakeModel(kLayers);
  const HeadProfile profile = LocalProfile(kLayers, 2, 10, 4, {{1, 0}});
  const SegmentedPrompt p = Prompt();
  ASSERT_TRUE(acquire_or_prefill(*model_, *chunks_, p.segments[0]).ok());
  const int64_t start = static_cast<int64_t>(p.segments[0].size());
  const DeadRowSplit split = dead_row_split(cfg_, profile, start, p.total_tokens() - start);
  ASSERT_GT(split.tail, 0);
  ASSERT_EQ(split.kv_only_from_layer, 1);
  RunResult r = Prefill(profile, p, /*skip=*/true, /*query_full=*/true);
  EXPECT_LE(RelErr(r.out.last_logits, DenseOracle(profile, p, split.kv_only_from_layer)), kTol);
}

// Every head global: the flag changes nothing.
TEST_F(QueryFullAttention, NoOpWhenEveryHeadIsGlobal) {
  MakeModel(kLayers);
  const HeadProfile profile(kLayers, 2);
  const SegmentedPrompt p = Prompt();
  ASSERT_TRUE(acquire_or_prefill(*model_, *chunks_, p.segments[0]).ok());
  RunResult with = Prefill(profile, p, true, /*query_full=*/true);
  RunResult without = Prefill(profile, p, true);
  EXPECT_LE(RelErr(with.out.last_logits, without.out.last_logits), kTol);
}

// A reuse job's cold segments: prefilled several per forward (at most the job's chunk rows
// each, in order), then all attached at once; the answer is the one of segments prefilled one
// by one beforehand.
class ColdSegments : public DeadRowSkipping {
 protected:
  // The rows of each forward the job ran, and its outcome.
  std::vector<int64_t> Run(const SegmentedPrompt& p, int32_t chunk, PrefillOutcome* out) {
    PagedKvCache kv(*pool_, HeadProfile(static_cast<int32_t>(cfg_.num_layers), 2),
                    PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg_.head_dim))},
                    model_->inv_freq());
    kv.add_sequence(0);
    ReuseOptions ro;
    ro.mode = ReuseMode::Naive;
    ro.chunk = chunk;
    ReuseJob job(*model_, kv, 0, p, chunks_.get(), ro);
    std::vector<int64_t> rows;
    while (!job.done()) {
      rows.push_back(job.next_rows());
      job.run_next();
    }
    *out = job.outcome();
    return rows;
  }
};

TEST_F(ColdSegments, PrefillSeveralPerForwardAndMatchOneByOne) {
  MakeModel(3);
  const SegmentedPrompt p = Prompt();  // segments of 40, 50, 55, 60, 65 tokens; query 12
  PrefillOutcome cold;
  EXPECT_EQ(Run(p, 512, &cold), (std::vector<int64_t>{270, 12}));
  EXPECT_EQ(cold.path.segments_prefilled, 5);
  EXPECT_EQ(cold.path.segments_hit, 0);
  PrefillOutcome warm;  // now every segment is a hit: the query alone
  EXPECT_EQ(Run(p, 512, &warm), (std::vector<int64_t>{12}));
  EXPECT_EQ(warm.path.segments_hit, 5);
  EXPECT_EQ(warm.last_logits, cold.last_logits);  // the entries the cold run published
  // The oracle: a fresh store whose segments were prefilled one per forward.
  MakeModel(3);
  for (const auto& seg : p.segments) ASSERT_TRUE(acquire_or_prefill(*model_, *chunks_, seg).ok());
  PrefillOutcome alone;
  EXPECT_EQ(Run(p, 512, &alone), (std::vector<int64_t>{12}));
  EXPECT_LE(RelErr(cold.last_logits, alone.last_logits), kTol);
  // A smaller chunk bounds each forward: 40 + 50, then one segment each.
  MakeModel(3);
  PrefillOutcome small;
  EXPECT_EQ(Run(p, 100, &small), (std::vector<int64_t>{90, 55, 60, 65, 12}));
  EXPECT_LE(RelErr(small.last_logits, alone.last_logits), kTol);
}

}  // namespace
}  // namespace redknot
