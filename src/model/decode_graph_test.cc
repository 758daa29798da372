// Decode steps as recorded work (Model::set_decode_graphs), checked on the CPU with a backend
// whose "recording" keeps the body and whose replay re-runs it with host<->device copies
// forbidden, the contract CUDA stream capture imposes: a replay must compute the step from the
// buffers the model refilled (token ids, positions, the KV plan storage), never from host state
// of the step that was recorded. Logits must equal the eager path's at every step.
#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <vector>

#include "backend/batch_invariant_backend.h"
#include "backend/builtin.h"
#include "core/error.h"
#include "kv/head_profile.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "model/model.h"
#include "model/random_checkpoint.h"

namespace redknot {
namespace {

class RerunBackend : public BatchInvariantBackend {
 public:
  explicit RerunBackend(Backend& inner) : BatchInvariantBackend(inner) {}

  std::unique_ptr<RecordedWork> record(const std::function<void()>& body) override {
    ++records;
    return std::make_unique<Rerun>(this, body);
  }
  void copy_from_host(Tensor& dst, const Tensor& src) override {
    if (replaying_) throw Error("copy_from_host inside recorded work");
    BatchInvariantBackend::copy_from_host(dst, src);
  }
  Tensor to_host_f32(const Tensor& src) override {
    if (replaying_) throw Error("to_host_f32 inside recorded work");
    return BatchInvariantBackend::to_host_f32(src);
  }
  int records = 0;

 private:
  struct Rerun : RecordedWork {
    Rerun(RerunBackend* b, std::function<void()> f) : backend(b), body(std::move(f)) {}
    void replay() override {
      backend->replaying_ = true;
      try {
        body();
      } catch (...) {
        backend->replaying_ = false;
        throw;
      }
      backend->replaying_ = false;
    }
    RerunBackend* backend;
    std::function<void()> body;
  };
  bool replaying_ = false;
};

class DecodeGraphs : public ::testing::Test {
 protected:
  void SetUp() override {
    register_builtin_backends();
    cpu_ = create_backend("cpu");
    backend_ = std::make_unique<RerunBackend>(*cpu_);
    cfg_ = preset_config("tiny");
    ckpt_ = std::make_unique<Checkpoint>(random_checkpoint(cfg_, DType::F32, 3));
  }

  HeadProfile AllGlobal() const {
    return HeadProfile(static_cast<int32_t>(cfg_.num_layers),
                       static_cast<int32_t>(cfg_.num_kv_heads));
  }

  // A 64-page pool and an all-global cache holding sequence 0, for `model`.
  struct OneSequence {
    OneSequence(const DecodeGraphs& t, const Model& model)
        : pool(*t.backend_, 64, 8, static_cast<int32_t>(t.cfg_.head_dim)),
          kv(pool, t.AllGlobal(), {0.25f}, model.inv_freq()) {
      kv.add_sequence(0);
    }
    PagePool pool;
    PagedKvCache kv;
  };

  // A head-aware profile: layer 0 head 1 and layer 1 head 0 local (window 24, sink 2).
  HeadProfile Profile() const {
    HeadProfile p(static_cast<int32_t>(cfg_.num_layers), static_cast<int32_t>(cfg_.num_kv_heads));
    for (auto [l, h] : {std::pair{0, 1}, std::pair{1, 0}}) {
      p.at(l, h).cls = HeadClass::Local;
      p.at(l, h).window = 24;
      p.at(l, h).sink = 2;
    }
    return p;
  }

  // Prefills `prompts` (one sequence each), then `steps` batched greedy decode steps of every
  // sequence still running (sequence i stops after stop[i] steps). Returns every step's logits.
  std::vector<std::vector<float>> Run(Model& model, PagedKvCache& kv,
                                      const std::vector<int>& prompts, const std::vector<int>& stop,
                                      int steps) {
    std::vector<std::vector<float>> out;
    std::vector<int32_t> next(prompts.size());
    std::mt19937 rng(9);
    for (size_t s = 0; s < prompts.size(); ++s) {
      std::vector<int32_t> ids(prompts[s]);
      for (auto& t : ids) t = static_cast<int32_t>(rng() % cfg_.vocab_size);
      kv.add_sequence(static_cast<SeqId>(s));
      Batch b;
      b.add_sequence(static_cast<SeqId>(s), ids, 0);
      Tensor l = model.forward(b, kv);
      next[s] = Argmax(l, 0);
    }
    for (int step = 0; step < steps; ++step) {
      Batch b;
      std::vector<size_t> live;
      for (size_t s = 0; s < prompts.size(); ++s)
        if (step < stop[s]) {
          b.add_sequence(static_cast<SeqId>(s), {next[s]}, kv.next_position(static_cast<SeqId>(s)));
          live.push_back(s);
        }
      if (live.empty()) break;
      Tensor l = model.forward(b, kv);
      for (size_t i = 0; i < live.size(); ++i) {
        next[live[i]] = Argmax(l, static_cast<int64_t>(i));
        out.emplace_back(l.data<float>() + i * cfg_.vocab_size,
                         l.data<float>() + (i + 1) * cfg_.vocab_size);
      }
    }
    return out;
  }

  int32_t Argmax(const Tensor& l, int64_t row) const {
    const float* p = l.data<float>() + row * cfg_.vocab_size;
    return static_cast<int32_t>(std::max_element(p, p + cfg_.vocab_size) - p);
  }

  std::unique_ptr<Backend> cpu_;
  std::unique_ptr<RerunBackend> backend_;
  ModelConfig cfg_;
  std::unique_ptr<Checkpoint> ckpt_;
};

TEST_F(DecodeGraphs, ReplayedStepsEqualEagerSteps) {
  for (const bool head_aware : {false, true}) {
    const HeadProfile profile = head_aware ? Profile() : AllGlobal();
    // Three sequences; the second stops early, so the batch shrinks from 3 to 2 sequences.
    const std::vector<int> prompts = {37, 5, 70}, stop = {40, 9, 40};
    Model eager(*ckpt_, *backend_);
    eager.set_decode_graphs(false);
    PagePool pool_a(*backend_, 256, 8, static_cast<int32_t>(cfg_.head_dim));
    PagedKvCache kv_a(pool_a, profile, {0.25f}, eager.inv_freq());
    const auto want = Run(eager, kv_a, prompts, stop, 40);
    EXPECT_EQ(backend_->records, 0);

    Model graphs(*ckpt_, *backend_);
    graphs.set_decode_graphs(true);
    PagePool pool_b(*backend_, 256, 8, static_cast<int32_t>(cfg_.head_dim));
    PagedKvCache kv_b(pool_b, profile, {0.25f}, graphs.inv_freq());
    const auto got = Run(graphs, kv_b, prompts, stop, 40);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << "logits row " << i;
    // Every decode step was replayed; recordings only per (sequences, capacity doubling).
    const Model::DecodeGraphStats st = graphs.decode_graph_stats();
    EXPECT_EQ(st.replayed, 40);
    EXPECT_GE(st.recorded, 2);  // 3 sequences, then 2
    EXPECT_LE(st.recorded, 8);
    EXPECT_EQ(st.recorded, backend_->records);
    backend_->records = 0;
  }
}

// Timing the host plan (ForwardOptions::host_plan_ms) leaves a decode step recorded, unlike the
// synchronising stage profile, and charges time on the eager path too.
TEST_F(DecodeGraphs, HostPlanTimingKeepsStepsRecorded) {
  Model model(*ckpt_, *backend_);
  OneSequence one(*this, model);
  PagedKvCache& kv = one.kv;
  Batch prompt;
  prompt.add_sequence(0, std::vector<int32_t>(12, 7), 0);
  double eager_ms = 0;
  ForwardOptions timed;
  timed.host_plan_ms = &eager_ms;
  Tensor l = model.forward(prompt, kv, timed);  // a prefill: not recordable, planned eagerly
  EXPECT_GT(eager_ms, 0.0);
  EXPECT_EQ(model.decode_graph_stats().replayed, 0);
  for (int step = 0; step < 3; ++step) {
    double ms = 0;
    timed.host_plan_ms = &ms;
    Batch b;
    b.add_sequence(0, {Argmax(l, 0)}, kv.next_position(0));
    l = model.forward(b, kv, timed);
    EXPECT_GT(ms, 0.0) << "step " << step;
    EXPECT_EQ(model.decode_graph_stats().replayed, step + 1) << "the timed step ran recorded";
  }
}

// A recording is tied to the cache's pool and parameters: another cache re-records.
TEST_F(DecodeGraphs, AnotherCacheRecordsAgain) {
  Model model(*ckpt_, *backend_);
  const HeadProfile profile = AllGlobal();
  PagePool pool_a(*backend_, 64, 8, static_cast<int32_t>(cfg_.head_dim));
  PagePool pool_b(*backend_, 64, 8, static_cast<int32_t>(cfg_.head_dim));
  PagedKvCache kv_a(pool_a, profile, {0.25f}, model.inv_freq());
  PagedKvCache kv_b(pool_b, profile, {0.25f}, model.inv_freq());
  const auto a = Run(model, kv_a, {10}, {3}, 3);
  const int64_t after_a = model.decode_graph_stats().recorded;
  EXPECT_EQ(after_a, 1);
  const auto b = Run(model, kv_b, {10}, {3}, 3);
  EXPECT_EQ(model.decode_graph_stats().recorded, after_a + 1);
  EXPECT_EQ(a, b);  // same prompt, same weights, separate pools
}

// Plan storage refuses batches it was not made for, before the cache changes.
TEST_F(DecodeGraphs, PlanStorageRefusesOtherShapes) {
  Model model(*ckpt_, *backend_);
  OneSequence one(*this, model);
  PagedKvCache& kv = one.kv;
  Batch prompt;
  prompt.add_sequence(0, std::vector<int32_t>(20, 3), 0);
  EXPECT_EQ(kv.plan_capacity(prompt), -1);  // not one token per sequence
  model.forward(prompt, kv);
  Batch step;
  step.add_sequence(0, {5}, kv.next_position(0));
  Batch dead_rows = step;
  dead_rows.last_stored_layer = 0;
  EXPECT_EQ(kv.plan_capacity(dead_rows), -1);  // stores fewer layers: not a decode step
  const int64_t need = kv.plan_capacity(step);
  EXPECT_EQ(need, int64_t{3} * cfg_.num_kv_heads);  // 21 tokens in pages of 8, per head
  auto small = kv.make_plan_storage(1, need - 1);
  Tensor pos = backend_->alloc(DType::I32, {1});
  EXPECT_THROW(kv.begin_forward(step, pos, *small), Error);
  EXPECT_EQ(kv.num_tokens(0), 20);  // unchanged
}

}  // namespace
}  // namespace redknot

namespace redknot {
namespace {

// forward_greedy (argmax on the device, recorded or eager) picks what the argmax of forward's
// host logits picks, for every sequence of every step.
TEST_F(DecodeGraphs, GreedyIdsEqualArgmaxOfLogits) {
  for (const bool graphs : {true, false}) {
    Model with_ids(*ckpt_, *backend_), with_logits(*ckpt_, *backend_);
    with_ids.set_decode_graphs(graphs);
    with_logits.set_decode_graphs(false);
    const HeadProfile profile = Profile();
    PagePool pool_a(*backend_, 128, 8, static_cast<int32_t>(cfg_.head_dim));
    PagePool pool_b(*backend_, 128, 8, static_cast<int32_t>(cfg_.head_dim));
    PagedKvCache kv_a(pool_a, profile, {0.25f}, with_ids.inv_freq());
    PagedKvCache kv_b(pool_b, profile, {0.25f}, with_logits.inv_freq());
    std::vector<int32_t> next = {7, 300};
    for (SeqId s = 0; s < 2; ++s) {
      kv_a.add_sequence(s);
      kv_b.add_sequence(s);
      Batch b;
      b.add_sequence(s, std::vector<int32_t>(20 + 13 * s, 5 + s), 0);
      EXPECT_EQ(with_ids.forward_greedy(b, kv_a).at(0), Argmax(with_logits.forward(b, kv_b), 0));
    }
    for (int step = 0; step < 12; ++step) {
      Batch b;
      for (SeqId s = 0; s < 2; ++s) b.add_sequence(s, {next[s]}, kv_a.next_position(s));
      const std::vector<int32_t> ids = with_ids.forward_greedy(b, kv_a);
      const Tensor logits = with_logits.forward(b, kv_b);
      ASSERT_EQ(ids.size(), 2u);
      for (int s = 0; s < 2; ++s) {
        EXPECT_EQ(ids[s], Argmax(logits, s)) << "step " << step << " seq " << s;
        next[s] = ids[s];
      }
    }
    EXPECT_EQ(with_ids.decode_graph_stats().replayed, graphs ? 12 : 0);
  }
}

}  // namespace
}  // namespace redknot
