// Reuse as scheduled work: a request that brings new documents is prefilled in forwards of the
// step budget between the running streams' decodes (no stall), every answer under load equals
// its answer alone, and every path other than the one asked for is reported with its reason.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>

#include "backend/batch_invariant_backend.h"
#include "engine/kv_setup.h"
#include "engine/scheduler.h"
#include "eval/rag_dataset.h"
#include "eval/rag_eval.h"
#include "reuse/chunk_store.h"
#include "test_support.h"
#include "tokenizer/tokenizer.h"

namespace redknot::testing {
namespace {

// A scheduler over one model with the head-aware cache, the baseline cache and a chunk store in
// one pool, as `redknot serve` assembles them.
struct Engine {
  KvStore store;
  std::unique_ptr<ChunkStore> chunks;
  std::unique_ptr<Scheduler> sched;

  Engine(Model& model, const std::string& profile, int64_t pool_bytes, int64_t store_bytes,
         SchedulerOptions so, bool with_store = true, int64_t leave_free = -1) {
    KvOptions kvo;
    kvo.page_size = 16;
    kvo.budget_bytes = pool_bytes;
    kvo.head_profile_path = profile;
    store = make_kv_store(model, kvo);
    make_baseline_cache(model, store);
    if (with_store) {
      ChunkStoreOptions cso;
      cso.pool_budget_bytes = store_bytes;
      chunks = std::make_unique<ChunkStore>(model, *store.pool, cso);
      so.chunk_store = chunks.get();
    }
    // Pages taken before the engine starts (the pool is the engine thread's afterwards).
    while (leave_free >= 0 && store.pool->num_free() > leave_free)
      held.push_back(store.pool->allocate());
    so.baseline_cache = store.baseline.get();
    sched = std::make_unique<Scheduler>(model, *store.cache, so);
  }
  ~Engine() {
    sched.reset();
    for (int32_t p : held) store.pool->release(p);
    chunks.reset();
  }
  std::vector<int32_t> held;
};

RequestSpec greedy(const SegmentedPrompt& p, int max_tokens, std::optional<ReuseMode> mode) {
  RequestSpec s;
  s.segments = p.segments;
  s.query = p.query;
  s.max_tokens = max_tokens;
  s.reuse_mode = mode;
  return s;
}

// ---- the shipped RAG model: a new 8K-token prompt of documents beside running streams ----

class ServingReuse : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    register_builtin_backends();
    ckpt_ = std::make_unique<Checkpoint>(load_checkpoint(dir()));
    inner_ = create_backend("cpu");
    // As `serve` runs on the CPU: a request's output does not depend on its batch.
    backend_ = std::make_unique<BatchInvariantBackend>(*inner_);
    model_ = std::make_unique<Model>(*ckpt_, *backend_);
    tok_ = Tokenizer::from_hf_file(dir() + "/tokenizer.json");
    samples_ = load_rag_dataset(std::string(REDKNOT_SOURCE_DIR) + "/data/eval/rag-8k.jsonl.gz", 2);
  }
  static void TearDownTestSuite() {
    model_.reset();
    backend_.reset();
    inner_.reset();
    ckpt_.reset();
    tok_.reset();
  }
  static std::string dir() { return std::string(REDKNOT_SOURCE_DIR) + "/models/redknot-rag-8k"; }
  static std::string profile() { return dir() + "/head_profile.json"; }

  static SchedulerOptions options() {
    SchedulerOptions so;
    so.step_tokens = 512;
    so.reuse.mode = ReuseMode::RedKnot;
    so.reuse.chunk = 512;
    so.reuse.sparse_ffn.layer_mass = {1, 1, 0.4, 0.4, 0.7, 0.5, 0.5, 0.5};
    so.reuse.sparse_ffn.dilate = 1;
    return so;
  }
  Engine engine() const {
    return Engine(*model_, profile(), int64_t{256} << 20, int64_t{32} << 20, options());
  }

  // Streams of `stream_prompts` decode; once each has 3 tokens, `extra` is submitted. Returns the
  // largest gap between two tokens of any stream after that point (seconds) and every output.
  struct LoadRun {
    double max_gap = 0;
    std::vector<std::vector<int32_t>> streams;
    std::vector<int32_t> extra;
    ReusePath extra_path;
  };
  LoadRun run_load(const std::vector<SegmentedPrompt>& stream_prompts, const RequestSpec& extra) {
    Engine e = engine();
    std::vector<std::shared_ptr<RequestStream>> rs;
    for (const auto& p : stream_prompts) rs.push_back(e.sched->submit(greedy(p, 40, std::nullopt)));
    std::vector<std::vector<int32_t>> got(rs.size());
    for (size_t i = 0; i < rs.size(); ++i)
      while (got[i].size() < 3) {
        auto c = rs[i]->wait(std::chrono::milliseconds(100));
        got[i].insert(got[i].end(), c.tokens.begin(), c.tokens.end());
        if (c.finished) break;
      }
    auto x = e.sched->submit(extra);
    LoadRun r;
    r.extra = x->wait_all().tokens;
    r.extra_path = x->path();
    for (size_t i = 0; i < rs.size(); ++i) {
      auto rest = rs[i]->wait_all();
      got[i].insert(got[i].end(), rest.tokens.begin(), rest.tokens.end());
      // Gaps after each stream's first three tokens (the extra request came then).
      const std::vector<double> gaps = rs[i]->token_gaps();
      for (size_t k = 3; k < gaps.size(); ++k) r.max_gap = std::max(r.max_gap, gaps[k]);
    }
    r.streams = got;
    return r;
  }

  std::vector<int32_t> alone(const RequestSpec& s) {
    Engine e = engine();
    return e.sched->submit(s)->wait_all().tokens;
  }

  static inline std::unique_ptr<Checkpoint> ckpt_;
  static inline std::unique_ptr<Backend> inner_, backend_;
  static inline std::unique_ptr<Model> model_;
  static inline std::unique_ptr<Tokenizer> tok_;
  static inline std::vector<RagSample> samples_;
};

TEST_F(ServingReuse, NewDocumentsDoNotStallRunningStreams) {
  ASSERT_EQ(samples_.size(), 2u);
  const SegmentedPrompt big = build_rag_prompt(*tok_, samples_[0]);
  ASSERT_GT(big.total_tokens(), 6000) << "an 8K eval prompt: ~7K tokens of new documents";
  // The streams: the other sample's question alone, three times over (different lengths).
  SegmentedPrompt q = build_rag_prompt(*tok_, samples_[1]);
  std::vector<SegmentedPrompt> streams;
  for (int i = 0; i < 3; ++i) {
    SegmentedPrompt s;
    s.segments.push_back(q.segments[0]);
    s.query.assign(q.query.begin(), q.query.end() - i);
    streams.push_back(s);
  }
  // The same load without new documents: a request with a prompt of a normal prefill's size
  // (two step budgets) and no documents.
  SegmentedPrompt plain;
  plain.segments.push_back(big.segments[0]);
  for (size_t i = 1; plain.total_tokens() < 1100 && i < big.segments.size(); ++i)
    plain.query.insert(plain.query.end(), big.segments[i].begin(), big.segments[i].end());
  plain.query.insert(plain.query.end(), big.query.begin(), big.query.end());
  const RequestSpec with_docs = greedy(big, 8, std::nullopt);
  const RequestSpec without = greedy(plain, 8, std::nullopt);

  // Wall-clock gaps on a shared 2-core machine are noisy: up to three trials, each a baseline
  // and a loaded run back to back; a stall (the whole 7K prefill in one step) fails them all.
  double best_ratio = 1e9;
  LoadRun loaded;
  for (int trial = 0; trial < 3 && best_ratio >= 2.0; ++trial) {
    const LoadRun base = run_load(streams, without);
    loaded = run_load(streams, with_docs);
    const double ratio = loaded.max_gap / std::max(base.max_gap, 1e-4);
    std::printf(
        "trial %d: largest stream gap %.1f ms with the new documents, %.1f ms without "
        "(x%.2f)\n",
        trial, 1e3 * loaded.max_gap, 1e3 * base.max_gap, ratio);
    best_ratio = std::min(best_ratio, ratio);
    // Every answer equals its answer alone.
    for (size_t i = 0; i < streams.size(); ++i)
      EXPECT_EQ(base.streams[i], loaded.streams[i]) << "stream " << i;
  }
  EXPECT_LT(best_ratio, 2.0);
  EXPECT_EQ(loaded.extra_path.used, ReuseMode::RedKnot);
  EXPECT_TRUE(loaded.extra_path.fallback.empty()) << loaded.extra_path.fallback;
  EXPECT_EQ(loaded.extra_path.segments, 1);  // redknot looks up S0 only
  EXPECT_EQ(loaded.extra, alone(with_docs));
  for (size_t i = 0; i < streams.size(); ++i)
    EXPECT_EQ(loaded.streams[i], alone(greedy(streams[i], 40, std::nullopt))) << "stream " << i;
}

// The same prompt, mode and settings give the same answer through the eval harness (which
// `generate` shares: prefill_with_reuse, then greedy decoding) and through the serving scheduler.
TEST_F(ServingReuse, EvalAndServeAnswerAlike) {
  const std::vector<RagSample> samples =
      load_rag_dataset(std::string(REDKNOT_SOURCE_DIR) + "/data/eval/rag-4k.jsonl.gz", 2);
  std::vector<int32_t> stops;
  for (int32_t id : tok_->eos_ids()) stops.push_back(id);
  for (int32_t id = 0; id < tok_->vocab_size(); ++id)
    if (tok_->decode(std::vector<int32_t>{id}).find('\n') != std::string::npos) stops.push_back(id);
  // redknot (Sparse FFN, dead rows), a baseline cache, and CacheBlend's plan made mid-job.
  for (ReuseMode mode : {ReuseMode::RedKnot, ReuseMode::Full, ReuseMode::CacheBlend}) {
    EvalOptions eo;
    eo.reuse = options().reuse;
    eo.reuse.mode = mode;
    eo.max_answer_tokens = 12;
    eo.kv.page_size = 16;
    eo.kv.head_profile_path = profile();
    const EvalReport rep = run_rag_eval(*model_, *ckpt_, *tok_, samples, eo);
    Engine e = engine();
    for (size_t i = 0; i < samples.size(); ++i) {
      RequestSpec s = greedy(build_rag_prompt(*tok_, samples[i]), 12, mode);
      s.stop_ids = stops;
      std::vector<int32_t> got = e.sched->submit(s)->wait_all().tokens;
      if (!got.empty() && std::find(stops.begin(), stops.end(), got.back()) != stops.end())
        got.pop_back();  // eval's answers stop before the stop token
      EXPECT_EQ(tok_->decode(got, true), rep.samples[i].prediction)
          << reuse_mode_name(mode) << " sample " << i;
    }
  }
}

// ---- fallbacks, on a tiny refs model ----

class ReuseFallbacks : public ::testing::Test {
 protected:
  void SetUp() override {
    RK_REQUIRE_SHARED("refs/llama3-tiny");
    register_builtin_backends();
    ckpt_ = std::make_unique<Checkpoint>(load_checkpoint(shared_path("refs/llama3-tiny")));
    inner_ = create_backend("cpu");
    backend_ = std::make_unique<BatchInvariantBackend>(*inner_);
    model_ = std::make_unique<Model>(*ckpt_, *backend_);
  }
  SegmentedPrompt prompt(int segments, int len, uint32_t seed) const {
    std::mt19937 rng(seed);
    SegmentedPrompt p;
    for (int s = 0; s < segments; ++s) {
      std::vector<int32_t> seg(len);
      for (auto& t : seg) t = static_cast<int32_t>(3 + rng() % 500);
      p.segments.push_back(seg);
    }
    p.segments[0][0] = 1;
    p.query = {5, 6, 7, 8, 9};
    return p;
  }
  int64_t page_bytes() const {
    return int64_t{2} * 16 * model_->config().head_dim * 4;  // K + V of a 16-token f32 page
  }
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<Backend> inner_, backend_;
  std::unique_ptr<Model> model_;
};

TEST_F(ReuseFallbacks, ReuseWithoutAChunkStoreIsReportedOrRefused) {
  Engine e(*model_, "", int64_t{8} << 20, 0, SchedulerOptions{}, /*with_store=*/false);
  RequestSpec s = greedy(prompt(2, 40, 1), 4, ReuseMode::Naive);
  auto r = e.sched->submit(s);
  const auto out = r->wait_all();
  EXPECT_EQ(out.reason, FinishReason::kLength);
  EXPECT_EQ(r->path().requested, ReuseMode::Naive);
  EXPECT_EQ(r->path().used, ReuseMode::Full);
  EXPECT_EQ(r->path().fallback, "reuse_disabled");
  s.strict_reuse_mode = true;
  EXPECT_THROW(e.sched->submit(s), Error);
  e.sched->wait_idle();
  EXPECT_EQ(e.sched->stats().fallbacks.at("reuse_disabled"), 1);
}

// A model whose calibration refused redknot (reuse_settings.json "redknot": "disabled"): redknot
// requests, asked or by default, run full prefill and say so; a strict request is refused.
TEST_F(ReuseFallbacks, DisabledRedknotIsServedFullAndReported) {
  SchedulerOptions so;
  so.reuse.mode = ReuseMode::RedKnot;
  so.redknot_disabled = "no setting met the guard";
  Engine e(*model_, "", int64_t{8} << 20, int64_t{2} << 20, so);
  for (std::optional<ReuseMode> asked :
       {std::optional<ReuseMode>(), std::optional(ReuseMode::RedKnot)}) {
    auto r = e.sched->submit(greedy(prompt(2, 40, 4), 3, asked));
    r->wait_all();
    EXPECT_EQ(r->path().requested, ReuseMode::RedKnot);
    EXPECT_EQ(r->path().used, ReuseMode::Full);
    EXPECT_EQ(r->path().fallback, "redknot_disabled");
  }
  // Other modes are not calibrated and still run as asked.
  auto n = e.sched->submit(greedy(prompt(2, 40, 5), 3, ReuseMode::Naive));
  n->wait_all();
  EXPECT_EQ(n->path().used, ReuseMode::Naive);
  EXPECT_EQ(n->path().fallback, "");
  RequestSpec strict = greedy(prompt(2, 40, 6), 3, ReuseMode::RedKnot);
  strict.strict_reuse_mode = true;
  try {
    e.sched->submit(strict);
    FAIL() << "a strict redknot request ran on a model that disables it";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("no setting met the guard"), std::string::npos);
  }
  e.sched->wait_idle();
  EXPECT_EQ(e.sched->stats().fallbacks.at("redknot_disabled"), 2);
  EXPECT_EQ(e.sched->stats().modes_used.at("full"), 2);
}

TEST_F(ReuseFallbacks, PromptsWithoutDocumentsOrQuerySayWhichPathRan) {
  SchedulerOptions so;
  so.reuse.mode = ReuseMode::Naive;
  Engine e(*model_, "", int64_t{8} << 20, int64_t{2} << 20, so);
  SegmentedPrompt no_docs = prompt(1, 30, 2);
  no_docs.query = no_docs.segments[0];
  no_docs.segments.clear();
  auto a = e.sched->submit(greedy(no_docs, 3, std::nullopt));
  a->wait_all();
  EXPECT_EQ(a->path().used, ReuseMode::Full);
  EXPECT_EQ(a->path().fallback, "no_documents");
  SegmentedPrompt no_query = prompt(2, 30, 3);
  no_query.query.clear();
  auto b = e.sched->submit(greedy(no_query, 3, std::nullopt));
  b->wait_all();
  EXPECT_EQ(b->path().fallback, "no_query");
  e.sched->wait_idle();
  EXPECT_EQ(e.sched->stats().fallbacks.at("no_documents"), 1);
  EXPECT_EQ(e.sched->stats().fallbacks.at("no_query"), 1);
}

// A naive request whose misses cannot be prefilled (the pool's free pages are taken) under each
// policy: dense runs it as full prefill and says so; reject fails it; wait requeues it until
// pages come back (here: never while the pages are held, so it is cancelled).
TEST_F(ReuseFallbacks, OutOfPagesFollowsThePolicy) {
  const SegmentedPrompt p = prompt(3, 64, 4);
  const int64_t pool_bytes = 600 * page_bytes();
  // Full prefill alone, for the dense policy's answer.
  std::vector<int32_t> full_answer;
  {
    Engine e(*model_, "", pool_bytes, page_bytes() * 100, SchedulerOptions{});
    full_answer = e.sched->submit(greedy(p, 6, ReuseMode::Full))->wait_all().tokens;
  }
  {
    // Room for the request itself but not for the chunk store's prefill of its misses.
    const int64_t pages = 600;
    SchedulerOptions so;
    so.reuse.mode = ReuseMode::Naive;
    so.reuse_fallback = ReuseFallback::kDense;
    Engine e(*model_, "", pages * page_bytes(), page_bytes() * 100, so, true, 80);
    auto r = e.sched->submit(greedy(p, 6, std::nullopt));
    const auto out = r->wait_all();
    EXPECT_EQ(out.reason, FinishReason::kLength) << out.error;
    EXPECT_EQ(r->path().used, ReuseMode::Full);
    EXPECT_EQ(r->path().fallback, "out_of_kv_pages");
    EXPECT_EQ(out.tokens, full_answer);
    e.sched->wait_idle();
    EXPECT_EQ(e.sched->stats().fallbacks.at("out_of_kv_pages"), 1);
  }
  {
    SchedulerOptions so;
    so.reuse.mode = ReuseMode::Naive;
    so.reuse_fallback = ReuseFallback::kReject;
    Engine e(*model_, "", 600 * page_bytes(), page_bytes() * 100, so, true, 80);
    const auto out = e.sched->submit(greedy(p, 6, std::nullopt))->wait_all();
    EXPECT_EQ(out.reason, FinishReason::kError);
    EXPECT_NE(out.error.find("reuse-fallback reject"), std::string::npos) << out.error;
  }
  {
    SchedulerOptions so;
    so.reuse.mode = ReuseMode::Naive;
    so.reuse_fallback = ReuseFallback::kWait;
    Engine e(*model_, "", 600 * page_bytes(), page_bytes() * 100, so, true, 80);
    auto r = e.sched->submit(greedy(p, 6, std::nullopt));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_FALSE(r->wait(std::chrono::milliseconds(1)).finished);
    EXPECT_GE(e.sched->stats().reuse_waits, 1);
    r->cancel();
    EXPECT_EQ(r->wait_all().reason, FinishReason::kCancelled);
  }
}

// Under the wait policy a request that ran out of pages for its misses is served once pages come
// back, with the answer it gets alone.
TEST_F(ReuseFallbacks, WaitServesTheSameAnswerOncePagesReturn) {
  const SegmentedPrompt p = prompt(3, 64, 9);
  SchedulerOptions so;
  so.reuse.mode = ReuseMode::Naive;
  std::vector<int32_t> want;
  {
    Engine e(*model_, "", 2000 * page_bytes(), page_bytes() * 400, so);
    want = e.sched->submit(greedy(p, 6, std::nullopt))->wait_all().tokens;
  }
  // A long full-mode request holds most of the pool while the naive one arrives.
  const int64_t pages = 400;
  Engine e(*model_, "", pages * page_bytes(), page_bytes() * 200, so);
  SegmentedPrompt hog = prompt(1, 700, 10);
  auto h = e.sched->submit(greedy(hog, 60, ReuseMode::Full));
  while (h->wait(std::chrono::milliseconds(50)).tokens.empty()) {
  }
  auto r = e.sched->submit(greedy(p, 6, std::nullopt));
  const auto out = r->wait_all();
  EXPECT_EQ(out.reason, FinishReason::kLength) << out.error;
  EXPECT_EQ(out.tokens, want);
  EXPECT_TRUE(r->path().fallback.empty()) << r->path().fallback;
  EXPECT_EQ(r->path().used, ReuseMode::Naive);
  h->wait_all();
  e.sched->wait_idle();
  std::printf("reuse waits: %lld\n", static_cast<long long>(e.sched->stats().reuse_waits));
}

}  // namespace
}  // namespace redknot::testing

namespace redknot::testing {
namespace {

// Automatic prefix caching: 20 requests share a long system prompt; all but the first attach its
// cached pages, and every answer equals full prefill's bit for bit.
TEST_F(ReuseFallbacks, PrefixModeSharesASystemPromptAcrossRequests) {
  SchedulerOptions so;
  so.reuse.mode = ReuseMode::Prefix;
  Engine e(*model_, "", int64_t{16} << 20, 0, so, /*with_store=*/false);
  PrefixCacheOptions po;
  po.model_fp = 1;
  PrefixCache prefix(*e.store.baseline, po);
  // Rebuilt with the prefix cache (the engine's scheduler had none).
  e.sched.reset();
  so.baseline_cache = e.store.baseline.get();
  so.prefix_cache = &prefix;
  e.sched = std::make_unique<Scheduler>(*model_, *e.store.cache, so);

  const SegmentedPrompt system = prompt(1, 300, 21);
  std::vector<RequestSpec> specs;
  for (int i = 0; i < 20; ++i) {
    SegmentedPrompt p = system;
    p.query = prompt(1, 12 + i, 100 + i).segments[0];
    specs.push_back(greedy(p, 5, std::nullopt));
  }
  std::vector<std::vector<int32_t>> want;
  {
    Engine full(*model_, "", int64_t{16} << 20, 0, SchedulerOptions{}, false);
    for (const auto& s : specs) want.push_back(full.sched->submit(s)->wait_all().tokens);
  }
  // The first alone (it fills the cache), then the rest at once.
  auto first = e.sched->submit(specs[0]);
  EXPECT_EQ(first->wait_all().tokens, want[0]);
  EXPECT_EQ(first->path().prefix_hit_tokens, 0);
  std::vector<std::shared_ptr<RequestStream>> rs;
  for (size_t i = 1; i < specs.size(); ++i) rs.push_back(e.sched->submit(specs[i]));
  for (size_t i = 1; i < specs.size(); ++i) {
    EXPECT_EQ(rs[i - 1]->wait_all().tokens, want[i]) << i;
    const ReusePath path = rs[i - 1]->path();
    EXPECT_EQ(path.used, ReuseMode::Prefix);
    EXPECT_EQ(path.prefix_hit_tokens, 288) << i;  // 300 tokens in blocks of 16
    EXPECT_EQ(rs[i - 1]->cached_tokens(), 288);
  }
  e.sched->wait_idle();
  const SchedulerStats st = e.sched->stats();
  EXPECT_EQ(st.prefix_queries, 20);
  EXPECT_EQ(st.prefix_hits, 19);
  EXPECT_EQ(st.prefix_hit_tokens, 19 * 288);
  EXPECT_EQ(prefix.stats().hits, 19);
  e.sched.reset();  // before the prefix cache
}

// Prefix entries pin pages, but live requests come first: when the pool is full of entries, a
// request's forward takes pages back (LRU entries evicted) instead of failing "KV cache too
// small". Distinct prompts, one at a time, in a pool that holds about three of them.
TEST_F(ReuseFallbacks, PrefixEntriesGivePagesBackToLiveRequests) {
  const auto& cfg = model_->config();
  const int64_t tables = cfg.num_layers * cfg.num_kv_heads;
  const int64_t pages_per_request = tables * ((300 + 5 + 15) / 16);
  SchedulerOptions so;
  so.reuse.mode = ReuseMode::Prefix;
  Engine e(*model_, "", page_bytes() * pages_per_request * 3, 0, so, /*with_store=*/false);
  PrefixCache prefix(*e.store.baseline, PrefixCacheOptions{.model_fp = 1});
  e.sched.reset();
  so.baseline_cache = e.store.baseline.get();
  so.prefix_cache = &prefix;
  e.sched = std::make_unique<Scheduler>(*model_, *e.store.cache, so);

  std::vector<RequestSpec> specs;
  for (int i = 0; i < 8; ++i) specs.push_back(greedy(prompt(1, 300, 300 + i), 5, std::nullopt));
  specs.push_back(greedy(prompt(2, 300, 400), 5, ReuseMode::Full));  // twice as long, full mode
  std::vector<std::vector<int32_t>> want;
  {
    Engine full(*model_, "", int64_t{16} << 20, 0, SchedulerOptions{}, false);
    for (const auto& s : specs) want.push_back(full.sched->submit(s)->wait_all().tokens);
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const RequestStream::Chunk c = e.sched->submit(specs[i])->wait_all();
    EXPECT_EQ(c.reason, FinishReason::kLength) << i << ": " << c.error;
    EXPECT_EQ(c.tokens, want[i]) << i;
  }
  e.sched->wait_idle();
  const SchedulerStats st = e.sched->stats();
  EXPECT_GT(st.prefix_reclaims, 0);
  EXPECT_GE(st.prefix_evictions, 5);  // 8 entries made, at most 3 fit
  EXPECT_EQ(st.prefix_evictions, prefix.stats().evictions);
  EXPECT_LE(st.prefix_entries, 3);
  EXPECT_EQ(st.prefix_pages, prefix.stats().pages);
  e.sched.reset();
}

}  // namespace
}  // namespace redknot::testing
