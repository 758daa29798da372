// The shipped RAG model through the eval harness on a slice of the committed 4K eval set: the
// engine must answer like the trained model does (EM floor), and every reuse mode must keep the
// ordering that docs/benchmarks.md's table shows on the 8K set.
#include <chrono>
#include <cstdio>

#include "engine/profiler.h"
#include "eval/rag_eval.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

class RagModel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    register_builtin_backends();
    ckpt_ = std::make_unique<Checkpoint>(load_checkpoint(dir()));
    backend_ = create_backend("cpu");
    model_ = std::make_unique<Model>(*ckpt_, *backend_);
    tok_ = Tokenizer::from_hf_file(dir() + "/tokenizer.json");
    samples_ = load_rag_dataset(std::string(REDKNOT_SOURCE_DIR) + "/data/eval/rag-4k.jsonl.gz", 8);
  }
  static void TearDownTestSuite() {
    model_.reset();
    backend_.reset();
    ckpt_.reset();
    tok_.reset();
  }
  static std::string dir() { return std::string(REDKNOT_SOURCE_DIR) + "/models/redknot-rag-8k"; }

  EvalReport run(ReuseMode mode, bool profile = false, bool sparse_ffn = false,
                 bool skip_dead_rows = true) {
    EvalOptions opts;
    opts.reuse.mode = mode;
    opts.reuse.sparse_ffn_enabled = sparse_ffn;
    opts.reuse.skip_dead_rows = skip_dead_rows;
    // The shipped model's Sparse FFN setting (README, model card; chosen on a held-out set).
    opts.reuse.sparse_ffn.layer_mass = {1, 1, 0.4, 0.4, 0.7, 0.5, 0.5, 0.5};
    opts.reuse.sparse_ffn.dilate = 1;
    if (profile) opts.kv.head_profile_path = dir() + "/head_profile.json";
    opts.full_logits = &full_logits_;
    return run_rag_eval(*model_, *ckpt_, *tok_, samples_, opts);
  }

  static inline std::unique_ptr<Checkpoint> ckpt_;
  static inline std::unique_ptr<Backend> backend_;
  static inline std::unique_ptr<Model> model_;
  static inline std::unique_ptr<Tokenizer> tok_;
  static inline std::vector<RagSample> samples_;
  std::vector<std::vector<float>> full_logits_;  // the full-prefill reference, shared by modes
};

// A deadline stops the run between samples and says so; what ran is scored as usual.
TEST_F(RagModel, DeadlineStopsBetweenSamplesAndReportsTruncation) {
  EvalOptions opts;
  opts.reuse.mode = ReuseMode::Full;
  opts.deadline = std::chrono::steady_clock::now();  // already passed: no sample starts
  const EvalReport none = run_rag_eval(*model_, *ckpt_, *tok_, samples_, opts);
  EXPECT_TRUE(none.truncated());
  EXPECT_EQ(none.n, 0);
  EXPECT_EQ(none.n_requested, 8);
  EXPECT_TRUE(none.samples.empty());
  EXPECT_EQ(none.to_json().at("truncated"), true);
  EXPECT_EQ(none.to_json().at("n_requested"), 8);

  // The deadline passes during the second sample (set from the progress callback, which the
  // run reads through its options): two are scored, the third never starts.
  opts.deadline.reset();
  const EvalReport two =
      run_rag_eval(*model_, *ckpt_, *tok_, samples_, opts, [&](int64_t done, int64_t) {
        if (done == 2) opts.deadline = std::chrono::steady_clock::now();
      });
  EXPECT_TRUE(two.truncated());
  EXPECT_EQ(two.n, 2);
  ASSERT_EQ(two.samples.size(), 2u);
  EXPECT_EQ(two.samples[1].id, samples_[1].id);
}

TEST_F(RagModel, EveryModeKeepsTheTableOrdering) {
  const EvalReport full = run(ReuseMode::Full);
  // The shipped run (10) scores 93.0 EM on the whole 4K set in the training script and 99.6 on the
  // 8K set through this engine; these 8 samples hold 3 multi-hop answers ("bridge, answer").
  EXPECT_GE(full.em, 0.5) << full.to_json().dump();
  EXPECT_EQ(full.n, 8);
  EXPECT_EQ(full.n_requested, 8);
  EXPECT_FALSE(full.truncated());
  EXPECT_GT(full.flops, 0);
  // The per-sample rows (`redknot eval --predictions`) add up to the aggregate.
  ASSERT_EQ(full.samples.size(), 8u);
  double em_sum = 0;
  for (size_t i = 0; i < full.samples.size(); ++i) {
    const SampleResult& s = full.samples[i];
    EXPECT_EQ(s.id, samples_[i].id);
    EXPECT_FALSE(s.id.empty());
    EXPECT_EQ(s.em, exact_match(s.prediction, samples_[i].answers)) << s.prediction;
    em_sum += s.em;
  }
  EXPECT_DOUBLE_EQ(em_sum / 8, full.em);

  // prefix: exact-prefix reuse only, so it answers exactly like full prefill.
  const EvalReport prefix = run(ReuseMode::Prefix);
  EXPECT_EQ(prefix.top1_match, 1.0);
  EXPECT_EQ(prefix.em, full.em);

  const EvalReport naive = run(ReuseMode::Naive);
  EXPECT_LT(naive.flops, 0.1 * full.flops) << "naive recomputes only the question";
  EXPECT_GT(naive.reused_tokens, 0);
  ASSERT_TRUE(full.per_task.count("dependent"));
  EXPECT_LT(naive.per_task.at("dependent").em, full.per_task.at("dependent").em)
      << "naive reuse cannot link a document to the one before it";

  const EvalReport cacheblend = run(ReuseMode::CacheBlend);
  const EvalReport epic = run(ReuseMode::Epic);
  for (const EvalReport* r : {&cacheblend, &epic}) {
    EXPECT_LT(r->flops, 0.5 * full.flops) << r->mode;
    EXPECT_GT(r->reused_tokens, 0) << r->mode;
  }

  // redknot with the profiled head classes: as accurate as full prefill, much closer to it than
  // naive reuse, at a fraction of the FLOPs.
  const EvalReport redknot = run(ReuseMode::RedKnot, /*profile=*/true);
  EXPECT_GE(redknot.em, naive.em) << redknot.to_json().dump();
  EXPECT_GE(redknot.em, full.em - 0.125) << "at most one answer of eight lost";
  EXPECT_GE(redknot.top1_match, naive.top1_match);
  EXPECT_GT(redknot.logits_cos, naive.logits_cos);
  EXPECT_GT(redknot.logits_cos, 0.95);
  EXPECT_LT(redknot.flops, 0.65 * full.flops);
  EXPECT_GT(redknot.ledger.attention_local, 0) << "local heads ran windowed";

  // The paper's redknot (every recomputed row through every layer) answers exactly the same:
  // dead-row skipping only drops work whose results nothing reads.
  const EvalReport paper = run(ReuseMode::RedKnot, /*profile=*/true, false, /*skip=*/false);
  EXPECT_EQ(paper.em, redknot.em);
  EXPECT_EQ(paper.top1_match, redknot.top1_match);
  EXPECT_NEAR(paper.logits_cos, redknot.logits_cos, 1e-4);
  EXPECT_LT(redknot.flops, 0.85 * paper.flops) << "dead rows skipped past layer 6";

  // Sparse FFN on top: fewer FLOPs still, answers kept.
  const EvalReport sparse = run(ReuseMode::RedKnot, /*profile=*/true, /*sparse_ffn=*/true);
  std::fprintf(stderr, "FLOPs of full: redknot %.3f, + Sparse FFN %.3f\n",
               redknot.flops / full.flops, sparse.flops / full.flops);
  EXPECT_LT(sparse.flops, 0.9 * redknot.flops);
  EXPECT_LT(sparse.flops, 0.4 * full.flops);
  EXPECT_GT(sparse.ledger.ffn_sparse, 0);
  EXPECT_GE(sparse.em, redknot.em - 0.125) << sparse.to_json().dump();
  EXPECT_GE(sparse.em, naive.em);
}

// `redknot profile` on the shipped model (short runs to stay fast in CI): the retrieval heads the
// model was trained with come out global, and the trained-local heads score low. Layer 0's local
// heads scored 0.2 prefix shift before the shift was measured only where a query's window lies
// inside the chunk (every row of a chunk near its start sees the prefix's tail in its window).
TEST_F(RagModel, ProfilerFindsTheTrainedRetrievalHeads) {
  std::vector<std::vector<int32_t>> calib;
  for (size_t i = 0; i < 4; ++i) {
    std::vector<int32_t> ids = build_rag_prompt(*tok_, samples_[i]).flatten();
    ids.erase(ids.begin());  // the profiler starts every run with BOS itself
    const auto answer = tok_->encode(" " + samples_[i].answers.at(0), false);
    ids.insert(ids.end(), answer.begin(), answer.end());
    calib.push_back(std::move(ids));
  }
  ProfileOptions o;
  o.window = 256, o.sink = 4, o.max_tokens = 2048, o.max_chunks = 4;
  o.bos_id = tok_->bos_id();
  o.warn = [](const std::string&) {};
  const HeadProfile p = profile_heads(*model_, calib, o);
  EXPECT_EQ(p.at(2, 0).cls, HeadClass::Global);
  EXPECT_EQ(p.at(4, 0).cls, HeadClass::Global);
  for (int g = 0; g < p.num_kv_heads(); ++g) EXPECT_LT(p.at(0, g).prefix_shift, 0.05) << g;
  for (int l = 0; l < p.num_layers(); ++l) {
    for (int g = 0; g < p.num_kv_heads(); ++g) {
      // The third retrieval head, (6,0), shows its far attention only in 8K-token runs.
      const bool retrieval_at_8k = l == 6 && g == 0;
      if (!retrieval_at_8k && p.at(l, g).cls == HeadClass::Local) {
        EXPECT_LT(p.at(l, g).edge_mass, 0.02) << l << "," << g;
      }
    }
  }
}

}  // namespace
}  // namespace redknot::testing
