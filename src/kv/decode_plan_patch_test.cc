// Decode plans patched in plan storage (PagedKvOptions::patch_decode_plans) against the same
// cache rebuilding every plan: two caches over two pools take the same random operations
// (decode steps of the live sequences into per-batch storages as Model's decode graphs keep them,
// prefill chunks, forks, removals, shifts, relocated appends, full-attention switches); after
// every decode step each layer's plan arrays and each layer's attention output must be equal.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/builtin.h"
#include "core/batch.h"
#include "core/error.h"
#include "kv/device_util.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"

namespace redknot {
namespace {

constexpr int kLayers = 3, kKvHeads = 2, kDim = 4, kPageSize = 4, kPages = 6000;

// Global heads in every layer, locals with unlike windows and sinks (one with none).
HeadProfile Profile() {
  HeadProfile p(kLayers, kKvHeads);
  p.at(0, 1) = {HeadClass::Local, 6, 2};
  p.at(1, 0) = {HeadClass::Local, 9, 0};
  p.at(2, 1) = {HeadClass::Local, 5, 1};
  return p;
}

// One cache with its own pool; `patch` selects patching or rebuilding decode plans.
struct Side {
  Side(Backend& backend, bool patch) : pool(backend, kPages, kPageSize, kDim) {
    PagedKvOptions o;
    o.scale = 0.5f;
    o.patch_decode_plans = patch;
    inv_freq = backend.alloc(DType::F32, {kDim / 2});
    backend.copy_from_host(inv_freq, Tensor::from_f32({1.0f, 0.1f}, {kDim / 2}));
    cache = std::make_unique<PagedKvCache>(pool, Profile(), o, inv_freq);
  }
  PagePool pool;
  Tensor inv_freq;
  std::unique_ptr<PagedKvCache> cache;
  // Plan storages by batch (the live sequences in order), as Model keeps one per graph.
  std::map<std::vector<SeqId>, std::shared_ptr<PlanStorage>> storages;
};

std::vector<int32_t> Words(const Tensor& t, int64_t n) {
  return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + n);
}

class Twin {
 public:
  explicit Twin(uint32_t seed) : rng_(seed) {
    register_builtin_backends();
    backend_ = create_backend("cpu");
    patched_ = std::make_unique<Side>(*backend_, true);
    rebuilt_ = std::make_unique<Side>(*backend_, false);
  }

  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  PagedKvCache& patched() { return *patched_->cache; }

  // Applies `op` to both caches; both must throw or neither.
  template <typename Op>
  void Both(Op op) {
    bool threw_a = false, threw_b = false;
    try {
      op(*patched_);
    } catch (const Error&) {
      threw_a = true;
    }
    try {
      op(*rebuilt_);
    } catch (const Error&) {
      threw_b = true;
    }
    ASSERT_EQ(threw_a, threw_b);
  }

  // A forward of `count` tokens of each of `seqs` (count 1: a decode step, planned into the
  // batch's storage when the cache allows). K/V written are the same random rows for both;
  // every layer attends with the same random queries and the outputs are compared.
  void Forward(const std::vector<SeqId>& seqs, int32_t count) {
    Batch batch;
    std::vector<int32_t> pos;
    for (SeqId s : seqs) {
      const int32_t start = patched().next_position(s);
      batch.add_sequence(s, std::vector<int32_t>(count, 0), start);
      for (int32_t i = 0; i < count; ++i) pos.push_back(start + i);
    }
    const int64_t T = batch.size();
    std::uniform_real_distribution<float> value(-1.0f, 1.0f);
    auto random = [&](int64_t n) {
      std::vector<float> v(n);
      for (float& x : v) x = value(rng_);
      return Tensor::from_f32(v, {n});
    };
    const Tensor k = random(T * kKvHeads * kDim), v = random(T * kKvHeads * kDim);
    const Tensor q = random(T * kKvHeads * kDim);
    std::vector<std::vector<float>> outputs[2];
    std::vector<std::vector<int32_t>> plans[2];
    int side_index = 0;
    for (Side* side : {patched_.get(), rebuilt_.get()}) {
      PagedKvCache& c = *side->cache;
      const Tensor positions = upload_i32(*backend_, pos);
      const int64_t need = c.plan_capacity(batch);
      if (need >= 0) {
        std::shared_ptr<PlanStorage>& st = side->storages[seqs];
        // Slack for a few steps of growth, re-made when outgrown (as Model re-records).
        if (!st || !c.plan_storage_fits(*st)) st.reset();
        bool fits = st != nullptr;
        if (fits) {
          try {
            c.begin_forward(batch, positions, *st);
          } catch (const Error&) {
            fits = false;
          }
        }
        if (!fits) {
          st = c.make_plan_storage(static_cast<int32_t>(T), need + 2 * kKvHeads);
          c.begin_forward(batch, positions, *st);
        }
      } else {
        c.begin_forward(batch, positions);
      }
      for (int l = 0; l < kLayers; ++l) {
        Tensor kl = k.reshape({T, kKvHeads, kDim}), vl = v.reshape({T, kKvHeads, kDim});
        c.write(l, kl, vl);
      }
      for (int l = 0; l < kLayers; ++l) {
        Tensor out = backend_->alloc(DType::F32, {T, kKvHeads, kDim});
        c.attend(l, q.reshape({T, kKvHeads, kDim}), out);
        outputs[side_index].emplace_back(out.data<float>(), out.data<float>() + out.numel());
        const PagedAttentionPlan& p = c.plan(l);
        const std::vector<int32_t> indptr = Words(p.kv_indptr, p.kv_indptr.numel());
        const int64_t nnz = indptr.back();
        plans[side_index].push_back(indptr);
        plans[side_index].push_back(Words(p.page_indices, nnz));
        plans[side_index].push_back(Words(p.page_lengths, nnz));
        plans[side_index].push_back(Words(p.qo_indptr, p.qo_indptr.numel()));
        plans[side_index].push_back(Words(p.head_window, kKvHeads));
        plans[side_index].push_back(Words(p.head_sink, kKvHeads));
      }
      c.end_forward();
      ++side_index;
    }
    ASSERT_EQ(plans[0], plans[1]) << "plan arrays differ after step " << steps_;
    ASSERT_EQ(outputs[0], outputs[1]) << "attention differs after step " << steps_;
    ++steps_;
  }

  std::vector<SeqId> live;
  SeqId next_id = 0;

 private:
  std::mt19937 rng_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Side> patched_, rebuilt_;
  int steps_ = 0;
};

class DecodePlanPatch : public ::testing::TestWithParam<uint32_t> {};

TEST_P(DecodePlanPatch, EqualsRebuiltPlanUnderRandomOperations) {
  Twin tw(GetParam());
  for (int i = 0; i < 3; ++i) {
    const SeqId s = tw.next_id++;
    tw.Both([&](Side& side) { side.cache->add_sequence(s); });
    tw.live.push_back(s);
    tw.Forward({s}, tw.Uniform(1, 11));
  }
  for (int op = 0; op < 500; ++op) {
    const int r = tw.Uniform(0, 99);
    const SeqId any = tw.live[tw.Uniform(0, static_cast<int>(tw.live.size()) - 1)];
    if (r < 70) {  // decode steps of every live sequence: the patched path
      tw.Forward(tw.live, 1);
    } else if (r < 76) {  // a decode step of a subset (another storage)
      std::vector<SeqId> some(tw.live.begin(), tw.live.begin() + (tw.live.size() + 1) / 2);
      tw.Forward(some, 1);
    } else if (r < 80) {  // a prefill chunk
      tw.Forward({any}, tw.Uniform(2, 9));
    } else if (r < 83 && tw.live.size() < 6) {  // a new sequence
      const SeqId s = tw.next_id++;
      tw.Both([&](Side& side) { side.cache->add_sequence(s); });
      tw.live.push_back(s);
      tw.Forward({s}, tw.Uniform(1, 9));
    } else if (r < 86 && tw.live.size() > 1) {  // a sequence finishes
      tw.Both([&](Side& side) { side.cache->remove_sequence(any); });
      tw.live.erase(std::find(tw.live.begin(), tw.live.end(), any));
    } else if (r < 89 && tw.live.size() < 6) {  // fork: shared pages, copied on the next write
      const SeqId s = tw.next_id++;
      tw.Both([&](Side& side) { side.cache->fork(any, s); });
      tw.live.push_back(s);
    } else if (r < 92) {  // drop a middle range
      const int32_t n = tw.patched().next_position(any);
      const int32_t p0 = tw.Uniform(0, std::max(0, n - 1)), len = tw.Uniform(1, 4);
      tw.Both([&](Side& side) { side.cache->remove(any, p0, p0 + len); });
    } else if (r < 95) {  // move the tail later
      const int32_t n = tw.patched().next_position(any);
      const int32_t p0 = tw.Uniform(0, std::max(0, n - 1)), delta = tw.Uniform(1, 3);
      tw.Both([&](Side& side) { side.cache->shift(any, p0, -1, delta); });
    } else if (r < 98) {  // a cached segment appended at a later position (chunk reuse)
      const SeqId src = tw.live[0];
      std::vector<int32_t> src_pos = tw.patched().head_positions(src, 0, 0);  // a global head
      if (src_pos.size() > 6) src_pos.resize(6);
      if (src_pos.empty()) continue;
      const int32_t delta = tw.patched().next_position(any) + 2 - src_pos.front();
      tw.Both([&](Side& side) {
        std::vector<std::vector<int32_t>> rows;
        for (int l = 0; l < kLayers; ++l)
          for (int h = 0; h < kKvHeads; ++h) {
            // The source rows of each table: its slots at src_pos (a local head may lack some:
            // it takes the global head's row then, any row of the pool does).
            std::vector<int32_t> all = side.cache->slot_rows(src, 0, 0);
            all.resize(src_pos.size());
            rows.push_back(all);
          }
        side.cache->append_relocated(any, rows, src_pos, delta);
      });
    } else {  // the reuse query pass: all heads global up to a layer, alone, then back
      tw.Both([&](Side& side) { side.cache->set_full_attention(any, 1, true); });
      tw.Forward({any}, 1);
      tw.Both([&](Side& side) { side.cache->set_full_attention(any, -1, false); });
    }
    if (::testing::Test::HasFatalFailure()) return;
  }
  // Most decode steps were patched, and rebuilt ones happened too (epochs, new storages).
  const PlanStats& st = tw.patched().plan_stats();
  EXPECT_GT(st.patched, 200);
  EXPECT_GT(st.rebuilt, 10);
}

INSTANTIATE_TEST_SUITE_P(Seeds, DecodePlanPatch, ::testing::Values(1u, 2u, 3u, 4u));

}  // namespace
}  // namespace redknot
