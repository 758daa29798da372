// Tensor parallelism on the CPU (issue #23): every refs model sharded over 2 and 4 in-process
// ranks gives the logits of the unsharded model (<= 1e-4 relative) and of transformers, with
// and without a mixed global/local head profile, with head placement on and off, through reuse
// modes and the serving scheduler; each rank's KV holds its own kv heads (split at 2 ranks,
// replicated at 4).
#include <cmath>
#include <numeric>

#include "backend/communicator.h"
#include "engine/engine_setup.h"
#include "engine/generate.h"
#include "engine/kv_setup.h"
#include "engine/scheduler.h"
#include "kv/head_placement.h"
#include "loader/permute_heads.h"
#include "loader/shard_checkpoint.h"
#include "reuse/chunk_prefill.h"
#include "reuse/chunk_store.h"
#include "reuse/reuse_prefill.h"
#include "test_support.h"

namespace redknot::testing {
namespace {

std::vector<int32_t> random_ids(int64_t n, int64_t vocab, uint32_t seed) {
  std::vector<int32_t> ids(n);
  uint64_t s = seed * 2654435761u + 1;
  for (auto& t : ids) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>((s >> 33) % vocab);
  }
  return ids;
}

// max |a - b| / max |b|: the "<= 1e-4 relative". a, b: host f32, same shape
double rel_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double num = 0, den = 0;
  for (int64_t i = 0; i < std::min(a.numel(), b.numel()); ++i) {
    num = std::max(num, std::fabs(double(a.data<float>()[i]) - b.data<float>()[i]));
    den = std::max(den, std::fabs(double(b.data<float>()[i])));
  }
  return num / std::max(den, 1e-30);
}

Tensor to_tensor(const std::vector<float>& v) {
  return Tensor::from_f32(v, {static_cast<int64_t>(v.size())});
}

// One model sharded over R in-process ranks: each rank its checkpoint slice, backend and model.
struct TpModel {
  std::unique_ptr<InProcessGroup> group;
  std::vector<Checkpoint> ckpts;
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Model>> models;
  int size() const { return group->size(); }

  // fn(rank, model) on every rank at once (the model's collectives need all of them); returns
  // each rank's result.
  template <typename Fn>
  auto run(Fn fn) -> std::vector<decltype(fn(0, std::declval<Model&>()))> {
    std::vector<decltype(fn(0, std::declval<Model&>()))> out(static_cast<size_t>(size()));
    run_ranks(*group, [&](int r) { out[static_cast<size_t>(r)] = fn(r, *models[r]); });
    return out;
  }
};

TpModel make_tp(const Checkpoint& full, int R) {
  register_builtin_backends();
  TpModel m;
  m.group = std::make_unique<InProcessGroup>(R);
  for (int r = 0; r < R; ++r) m.ckpts.push_back(shard_checkpoint(full, r, R));
  for (int r = 0; r < R; ++r) {
    m.backends.push_back(create_backend("cpu"));
    m.models.push_back(std::make_unique<Model>(m.ckpts[r], *m.backends[r], &m.group->rank(r)));
  }
  return m;
}

// Logits of every position of `ids` on every rank, prefilled in chunks of `chunk` through each
// rank's own paged store (its own heads; `profile` sliced to them).
std::vector<Tensor> tp_logits(TpModel& m, const std::vector<int32_t>& ids, int64_t chunk,
                              const std::string& profile = "") {
  return m.run([&](int, Model& model) {
    KvOptions kvo;
    kvo.page_size = 16;
    kvo.tokens = static_cast<int64_t>(ids.size()) + 64;
    kvo.head_profile_path = profile;
    KvStore store = make_kv_store(model, kvo);
    return run_logits(model, *store.cache, 0, ids, chunk);
  });
}

// Every rank ends a forward with the same gathered logits, bit for bit.
void expect_ranks_agree(const std::vector<Tensor>& per_rank) {
  for (size_t r = 1; r < per_rank.size(); ++r)
    EXPECT_EQ(std::memcmp(per_rank[r].raw(), per_rank[0].raw(), per_rank[0].nbytes()), 0)
        << "rank " << r << " disagrees with rank 0";
}

std::string param_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param;
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return n;
}

class TensorParallel : public ::testing::TestWithParam<std::string> {};

// TP = 1, 2, 4 against each other and against transformers' logits and greedy output.
TEST_P(TensorParallel, LogitsMatchOneRankAndTransformers) {
  const std::string name = GetParam();
  RK_REQUIRE_SHARED("refs/" + name);
  const Checkpoint full = load_checkpoint(shared_path("refs/" + name));
  SafetensorsFile ref = read_safetensors(shared_path("refs/" + name + "/reference.safetensors"));
  const int64_t V = full.config.vocab_size;
  TpModel one = make_tp(full, 1);
  std::vector<TpModel> sharded;
  for (int R : {2, 4}) sharded.push_back(make_tp(full, R));
  int checked = 0;
  for (int i = 0;; ++i) {
    const std::string key = "input_ids." + std::to_string(i);
    if (!ref.tensors.count(key)) break;
    const std::vector<int32_t> ids = to_ids(ref.tensors.at(key));
    if (ids.size() > 320) continue;  // the long sequences cost time and add no sharding case
    const Tensor base = tp_logits(one, ids, 64)[0];
    const auto [positions, want] = reference_logits(ref, i, static_cast<int64_t>(ids.size()));
    for (TpModel& m : sharded) {
      SCOPED_TRACE(name + " TP=" + std::to_string(m.size()) + " sequence " + std::to_string(i));
      const std::vector<Tensor> got = tp_logits(m, ids, 64);
      expect_ranks_agree(got);
      EXPECT_LE(rel_diff(got[0], base), 1e-4);
      double max_diff = 0;  // against transformers, as refs_parity_test
      for (size_t r = 0; r < positions.size(); ++r)
        for (int64_t v = 0; v < V; ++v)
          max_diff =
              std::max(max_diff, std::fabs(double(got[0].data<float>()[positions[r] * V + v]) -
                                           want.data<float>()[r * V + v]));
      EXPECT_LE(max_diff, 1e-3);
      ++checked;
    }
  }
  EXPECT_GE(checked, 2 * 2);
  // Decode steps (one token per forward) too: greedy output equals transformers'.
  const std::vector<int32_t> prompt = to_ids(ref.tensors.at("greedy.prompt"));
  const std::vector<int32_t> expected = to_ids(ref.tensors.at("greedy.output"));
  for (TpModel& m : sharded) {
    const auto outs = m.run([&](int, Model& model) {
      KvOptions kvo;
      kvo.page_size = 16;
      kvo.tokens = 128;
      KvStore store = make_kv_store(model, kvo);
      GenerateOptions go;
      go.max_tokens = static_cast<int32_t>(expected.size());
      go.stop_at_eos = false;
      return generate(model, *store.cache, 0, prompt, go).ids;
    });
    for (const auto& ids : outs) EXPECT_EQ(ids, expected) << name << " TP=" << m.size();
  }
}

// A profile with a global and a local kv head in every layer (locals: sink 4 + window 24), so that
// the planner for 2 ranks moves heads in some layers.
HeadProfile mixed_profile(const ModelConfig& cfg) {
  HeadProfile p(static_cast<int32_t>(cfg.num_layers), static_cast<int32_t>(cfg.num_kv_heads));
  for (int32_t l = 0; l < p.num_layers(); ++l)
    for (int32_t h = 0; h < p.num_kv_heads(); ++h)
      p.at(l, h).classify(/*global=*/h == 0, cfg.sliding_window, 24, 4);
  return p;
}

// With a mixed profile (each rank keeps its heads' classes), and with the heads placed for 2
// ranks (the weights permuted before sharding), TP = 2 and 4 give TP = 1's logits.
TEST_P(TensorParallel, MixedProfileWithAndWithoutPlacement) {
  const std::string name = GetParam();
  RK_REQUIRE_SHARED("refs/" + name);
  const Checkpoint full = load_checkpoint(shared_path("refs/" + name));
  const ModelConfig& cfg = full.config;
  const std::string dir = ::testing::TempDir();
  const std::string plain_path = dir + "/tp_mixed_" + param_name({name, 0}) + ".json";
  const std::string placed_path = dir + "/tp_placed_" + param_name({name, 0}) + ".json";
  const HeadProfile profile = mixed_profile(cfg);
  profile.save(plain_path);
  PlacementOptions po;
  po.ranks = 2;
  const auto perm = plan_head_placement(profile, po);
  const HeadProfile placed = permute_profile(profile, perm, 2);
  placed.save(placed_path);
  bool moved = false;
  for (const auto& row : perm)
    for (size_t i = 0; i < row.size(); ++i) moved |= row[i] != static_cast<int32_t>(i);
  ASSERT_TRUE(moved) << "the placement should move heads in some layer";
  Checkpoint permuted = load_checkpoint(shared_path("refs/" + name));
  permute_kv_heads(permuted, placed.placement);

  const std::vector<int32_t> ids = random_ids(150, cfg.vocab_size, 5);
  TpModel one = make_tp(full, 1);
  const Tensor base = tp_logits(one, ids, 48, plain_path)[0];
  // The profile is not a no-op here: 150 tokens outrun the local heads' sink + window.
  EXPECT_GT(rel_diff(tp_logits(one, ids, 48)[0], base), 1e-3);
  for (int R : {1, 2, 4}) {
    if (R > 1) {
      TpModel m = make_tp(full, R);
      const auto got = tp_logits(m, ids, 48, plain_path);
      expect_ranks_agree(got);
      EXPECT_LE(rel_diff(got[0], base), 1e-4) << name << " TP=" << R << " placement off";
    }
    TpModel mp = make_tp(permuted, R);
    const auto got = tp_logits(mp, ids, 48, placed_path);
    expect_ranks_agree(got);
    EXPECT_LE(rel_diff(got[0], base), 1e-4) << name << " TP=" << R << " placement on";
  }
}

INSTANTIATE_TEST_SUITE_P(AllRefsModels, TensorParallel, ::testing::ValuesIn(refs_models()),
                         param_name);

// Rank r's cache holds the kv heads of its slice: at 2 ranks (2 kv heads) one each, at 4 ranks
// replicated (ranks 0, 1 hold head 0; ranks 2, 3 head 1), equal to the unsharded model's.
TEST(TensorParallelKv, EachRankHoldsItsKvHeads) {
  RK_REQUIRE_SHARED("refs/qwen2-tiny");
  const Checkpoint full = load_checkpoint(shared_path("refs/qwen2-tiny"));  // k/v biases
  const std::vector<int32_t> ids = random_ids(40, full.config.vocab_size, 9);
  const int layer = 2;
  struct Kv {
    int64_t heads = 0;
    Tensor k, v;  // of the rank's local head 0 (the only one here)
  };
  auto read_kv = [&](TpModel& m) {
    return m.run([&](int, Model& model) {
      KvOptions kvo;
      kvo.page_size = 16;
      kvo.tokens = 128;
      KvStore store = make_kv_store(model, kvo);
      run_logits(model, *store.cache, 0, ids, 64);
      std::vector<Kv> heads;
      for (int h = 0; h < model.config().num_kv_heads; ++h) {
        Kv kv;
        kv.heads = model.config().num_kv_heads;
        std::vector<int32_t> pos;
        store.cache->read(0, layer, h, kv.k, kv.v, pos);
        heads.push_back(kv);
      }
      return heads;
    });
  };
  TpModel one = make_tp(full, 1);
  const std::vector<Kv> base = read_kv(one)[0];
  ASSERT_EQ(base.size(), 2u);
  for (int R : {2, 4}) {
    TpModel m = make_tp(full, R);
    const auto ranks = read_kv(m);
    for (int r = 0; r < R; ++r) {
      ASSERT_EQ(ranks[r].size(), 1u) << "R=" << R << " rank " << r << " holds one kv head";
      const int global_head = r * 2 / R;  // 2 ranks: head r; 4 ranks: head r / 2
      EXPECT_LE(rel_diff(ranks[r][0].k, base[global_head].k), 1e-5) << "R=" << R << " rank " << r;
      EXPECT_LE(rel_diff(ranks[r][0].v, base[global_head].v), 1e-5) << "R=" << R << " rank " << r;
    }
  }
}

// Reuse through the chunk store on every rank (each rank caches and relocates its own heads'
// pages): naive, CacheBlend (each rank's key deviations summed over the ranks, so all pick the
// same rows), EPIC and redknot (mixed profile, Sparse FFN on and off) give TP = 1's logits.
TEST(TensorParallelReuse, ReuseModesMatchOneRank) {
  RK_REQUIRE_SHARED("refs/llama3-tiny");
  const Checkpoint full = load_checkpoint(shared_path("refs/llama3-tiny"));
  const ModelConfig& cfg = full.config;
  const std::string profile_path = ::testing::TempDir() + "/tp_reuse_profile.json";
  mixed_profile(cfg).save(profile_path);
  SegmentedPrompt p;
  for (int i = 0; i < 3; ++i) p.segments.push_back(random_ids(50 + 7 * i, cfg.vocab_size, 20 + i));
  p.query = random_ids(9, cfg.vocab_size, 99);
  SparseFfnConfig sparse;  // layers 1 and 2 sparse: ranks must agree on the rows they run
  sparse.dense_until = 1;
  sparse.mass = 0.5;
  sparse.recent_n = 2;

  struct Run {
    std::vector<float> logits;
    int64_t reused = 0;
  };
  auto run_mode = [&](TpModel& m, ReuseMode mode, bool sparse_ffn) {
    return m.run([&](int, Model& model) {
      KvOptions kvo;
      kvo.page_size = 16;
      kvo.budget_bytes = 16 << 20;
      kvo.head_profile_path = mode == ReuseMode::RedKnot ? profile_path : "";
      KvStore store = make_kv_store(model, kvo);
      ChunkStoreOptions cso;
      cso.pool_budget_bytes = 4 << 20;
      cso.model_fp = model_fingerprint(model.config(), full);
      ChunkStore chunks(model, *store.pool, cso);
      for (const auto& seg : p.segments) EXPECT_TRUE(acquire_or_prefill(model, chunks, seg).ok());
      ReuseOptions ro;
      ro.mode = mode;
      ro.sparse_ffn_enabled = sparse_ffn;
      ro.sparse_ffn = sparse;
      PrefillOutcome out = prefill_with_reuse(model, *store.cache, 0, p, &chunks, ro);
      return Run{out.last_logits, out.reused_tokens};
    });
  };
  TpModel one = make_tp(full, 1);
  for (auto [mode, sparse_ffn] :
       std::vector<std::pair<ReuseMode, bool>>{{ReuseMode::Naive, false},
                                               {ReuseMode::CacheBlend, false},
                                               {ReuseMode::Epic, false},
                                               {ReuseMode::RedKnot, false},
                                               {ReuseMode::RedKnot, true}}) {
    const Run base = run_mode(one, mode, sparse_ffn)[0];
    EXPECT_GT(base.reused, 0) << reuse_mode_name(mode);
    for (int R : {2, 4}) {
      TpModel m = make_tp(full, R);
      const auto got = run_mode(m, mode, sparse_ffn);
      for (const Run& r : got) {
        EXPECT_EQ(r.reused, base.reused);
        EXPECT_LE(rel_diff(to_tensor(r.logits), to_tensor(base.logits)), 1e-4)
            << reuse_mode_name(mode) << (sparse_ffn ? " sparse FFN" : "") << " TP=" << R;
      }
    }
  }
}

// The one engine assembly: open_engine_model with a placed profile and 2 ranks permutes, shards
// and builds each rank's store with its slice of the placed profile; logits equal the unplaced
// unsharded model's.
TEST(TensorParallelEngine, AssemblyPlacesShardsAndMatchesOneRank) {
  RK_REQUIRE_SHARED("refs/qwen3-tiny");
  const std::string dir = shared_path("refs/qwen3-tiny");
  const Checkpoint full = load_checkpoint(dir);
  const std::string plain_path = ::testing::TempDir() + "/tp_engine_plain.json";
  const std::string placed_path = ::testing::TempDir() + "/tp_engine_placed.json";
  const HeadProfile profile = mixed_profile(full.config);
  profile.save(plain_path);
  PlacementOptions po;
  po.ranks = 2;
  permute_profile(profile, plan_head_placement(profile, po), 2).save(placed_path);
  const std::vector<int32_t> ids = random_ids(120, full.config.vocab_size, 31);
  auto logits = [&](const std::string& profile_path, int tp) {
    EngineOptions eo;
    eo.head_profile = profile_path;
    eo.tensor_parallel_size = tp;
    eo.request_tokens = 256;
    LoadedEngineModel m = open_engine_model(dir, eo);
    EXPECT_EQ(m.tp_size(), tp);
    EXPECT_EQ(m.model == nullptr, tp > 1);  // no single model to call by mistake
    EXPECT_EQ(m.ckpt.kv_head_perm.empty(), profile_path != placed_path);  // placement applied
    std::vector<Tensor> out(static_cast<size_t>(tp));
    run_on_ranks(m, [&](int rank, Model& model) {
      EngineStores stores = build_engine_stores(model, m.ckpt, eo);
      EXPECT_EQ(stores.kv.profile.num_kv_heads(), model.config().num_kv_heads);
      out[static_cast<size_t>(rank)] = run_logits(model, *stores.kv.cache, 0, ids, 50);
    });
    expect_ranks_agree(out);
    return out[0];
  };
  const Tensor base = logits(plain_path, 1);
  EXPECT_LE(rel_diff(logits(placed_path, 2), base), 1e-4);
  EXPECT_LE(rel_diff(logits(plain_path, 2), base), 1e-4);
}

// serve's split (docs/tensor-parallel.md) on the Scheduler itself: it plans on rank 0 and every
// rank runs its steps. kv head 1 is the global one, so rank 1 (at 2 ranks; ranks 2, 3 at 4) needs
// more pages than rank 0: admission must count the fullest rank (no preemption while it
// reserves), and a step that only rank 1's pool cannot hold must preempt on every rank instead of
// failing inside a collective. Greedy tokens, logprobs (the host-logits path) and n = 2 (forks on
// every rank) equal TP = 1's.
TEST(TensorParallelServe, SchedulerStepsRunOnEveryRank) {
  RK_REQUIRE_SHARED("refs/llama3-tiny");
  const std::string dir = shared_path("refs/llama3-tiny");
  const ModelConfig cfg = load_checkpoint(dir).config;
  HeadProfile profile(static_cast<int32_t>(cfg.num_layers), static_cast<int32_t>(cfg.num_kv_heads));
  for (int32_t l = 0; l < profile.num_layers(); ++l)
    for (int32_t h = 0; h < profile.num_kv_heads(); ++h)
      profile.at(l, h).classify(/*global=*/h == 1, cfg.sliding_window, 24, 4);
  const std::string profile_path = ::testing::TempDir() + "/tp_serve_profile.json";
  profile.save(profile_path);
  constexpr int32_t kPage = 16;
  std::vector<RequestSpec> specs;
  for (int i = 0; i < 6; ++i) {
    RequestSpec s;
    s.query = random_ids(90 + 13 * i, cfg.vocab_size, 70 + i);
    s.max_tokens = 20;
    if (i == 2) s.logprobs = 2;
    specs.push_back(s);
  }
  const int fork_request = 4;  // n = 2

  struct Served {
    std::vector<RequestStream::Chunk> out;
    SchedulerStats stats;
  };
  // As run_serve: open_engine_model, every rank's stores at the same budget, the rank group.
  auto serve = [&](int tp, int64_t pool_pages, double reserve, bool chunk_store = false,
                   int64_t rank1_pages = 0) {
    EngineOptions eo;
    eo.head_profile = profile_path;
    eo.tensor_parallel_size = tp;
    eo.batch_invariant = true;  // as serve on the CPU: a recomputed request gets the same bits
    eo.page_size = kPage;
    LoadedEngineModel m = open_engine_model(dir, eo);
    std::vector<Model*> models;
    if (m.tp)
      for (auto& rank : m.tp->models) models.push_back(rank.get());
    else
      models.push_back(m.model.get());
    const int64_t page_bytes = [&] {
      EngineOptions probe = eo;
      probe.request_tokens = kPage;
      return build_engine_stores(*models[0], m.ckpt, probe).kv.pool->bytes_per_page();
    }();
    std::vector<EngineStores> stores;
    for (size_t r = 0; r < models.size(); ++r) {
      eo.kv_budget_bytes = (r == 1 && rank1_pages > 0 ? rank1_pages : pool_pages) * page_bytes;
      stores.push_back(build_engine_stores(*models[r], m.ckpt, eo));
    }
    EXPECT_EQ(stores[0].kv.pool->num_pages(), pool_pages);
    std::unique_ptr<ChunkStore> chunks;
    SchedulerOptions so;
    so.reserve_fraction = reserve;
    so.step_tokens = 64;
    if (chunk_store) {
      ChunkStoreOptions cso;
      cso.pool_budget_bytes = 8 * page_bytes;
      chunks = std::make_unique<ChunkStore>(*models[0], *stores[0].kv.pool, cso);
      so.chunk_store = chunks.get();
    }
    RankGroup ranks;
    if (m.tp) {
      ranks.group = m.tp->group.get();
      for (size_t r = 0; r < models.size(); ++r)
        ranks.ranks.push_back({models[r], stores[r].kv.cache.get(), nullptr});
      so.ranks = &ranks;
    }
    Served s;
    Scheduler sched(*models[0], *stores[0].kv.cache, so);
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (size_t i = 0; i < specs.size(); ++i)
      for (auto& st : sched.submit_n(specs[i], i == fork_request ? 2 : 1)) streams.push_back(st);
    for (auto& st : streams) s.out.push_back(st->wait_all());
    sched.wait_idle();
    s.stats = sched.stats();
    for (size_t r = 0; r < stores.size(); ++r)
      EXPECT_EQ(stores[r].kv.pool->num_free(), stores[r].kv.pool->num_pages())
          << "TP=" << tp << " rank " << r << " holds pages after every request ended";
    return s;
  };

  const Served base = serve(1, 2000, 1.0);
  ASSERT_EQ(base.out.size(), specs.size() + 1);
  EXPECT_EQ(base.stats.preemptions, 0);
  EXPECT_EQ(base.out[fork_request].tokens, base.out[fork_request + 1].tokens);  // greedy
  auto expect_base = [&](const Served& got, const std::string& what) {
    ASSERT_EQ(got.out.size(), base.out.size()) << what;
    EXPECT_EQ(got.stats.failed, 0) << what;
    for (size_t i = 0; i < got.out.size(); ++i) {
      const RequestStream::Chunk &g = got.out[i], &b = base.out[i];
      EXPECT_EQ(g.reason, FinishReason::kLength) << what << " request " << i << ": " << g.error;
      EXPECT_EQ(g.tokens, b.tokens) << what << " request " << i;
      ASSERT_EQ(g.logprobs.size(), b.logprobs.size()) << what << " request " << i;
      for (size_t t = 0; t < g.logprobs.size(); ++t) {
        EXPECT_NEAR(g.logprobs[t].logprob, b.logprobs[t].logprob, 1e-3) << what;
        ASSERT_EQ(g.logprobs[t].top.size(), 2u);
        EXPECT_EQ(g.logprobs[t].top[0].first, b.logprobs[t].top[0].first) << what;
      }
    }
  };
  EXPECT_EQ(base.out[2].logprobs.size(), 20u);
  // 80 pages per rank: about three requests at rank 1's need (33 pages for the longest), five or
  // six at rank 0's (12): admission by rank 0 alone would over-commit rank 1.
  const Served reserved = serve(2, 80, 1.0);
  expect_base(reserved, "TP=2 reserving");
  EXPECT_EQ(reserved.stats.preemptions, 0);
  for (int tp : {2, 4}) {
    // Admission over-commits: rank 1's pool runs out mid-decode while rank 0's has room.
    const Served tight = serve(tp, 80, 0.0);
    expect_base(tight, "TP=" + std::to_string(tp) + " over-committing");
    EXPECT_GT(tight.stats.preemptions, 0) << "TP=" << tp;
  }

  // Not kept per rank: refused, not served with rank 0's store alone.
  try {
    serve(2, 80, 1.0, /*chunk_store=*/true);
    ADD_FAILURE() << "a chunk store with ranks was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chunk store"), std::string::npos) << e.what();
  }
  try {
    serve(2, 80, 1.0, false, /*rank1_pages=*/60);
    ADD_FAILURE() << "ranks with different pool sizes were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("page count"), std::string::npos) << e.what();
  }
}

// The CLI on transformers' greedy case: TP = 2 and 4 print the tokens TP = 1 and transformers
// produce; shapes that do not split and CUDA ranks are refused (never a silent TP = 1).
TEST(TensorParallelCli, GenerateMatchesOneRankAndRefusesWhatItCannotRun) {
  RK_REQUIRE_SHARED("refs/llama3-tiny");
  const std::string model = shared_path("refs/llama3-tiny");
  SafetensorsFile ref = read_safetensors(model + "/reference.safetensors");
  const std::vector<int32_t> prompt = to_ids(ref.tensors.at("greedy.prompt"));
  const std::vector<int32_t> expected = to_ids(ref.tensors.at("greedy.output"));
  std::string ids_arg;
  for (int32_t id : prompt) {
    if (!ids_arg.empty()) ids_arg += ',';
    ids_arg += std::to_string(id);
  }
  const std::string args = "generate --model " + model + " --prompt-ids " + ids_arg +
                           " --max-tokens " + std::to_string(expected.size()) +
                           " --ignore-eos --json";
  const auto ids = [](const CliResult& r) {
    return nlohmann::json::parse(r.out.substr(r.out.find('{')))
        .at("ids")
        .get<std::vector<int32_t>>();
  };
  const CliResult one = run_cli(args);
  ASSERT_EQ(one.status, 0) << one.out;
  EXPECT_EQ(ids(one), expected);
  for (int R : {2, 4}) {
    const CliResult tp = run_cli(args + " --tensor-parallel-size " + std::to_string(R));
    ASSERT_EQ(tp.status, 0) << tp.out;
    EXPECT_EQ(ids(tp), expected) << "TP=" << R;
  }
  const CliResult bad = run_cli(args + " --tensor-parallel-size 3");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.out.find("does not divide"), std::string::npos) << bad.out;
  const CliResult cuda = run_cli(args + " --backend cuda --tensor-parallel-size 2");
  EXPECT_NE(cuda.status, 0);
  EXPECT_NE(cuda.out.find("NCCL"), std::string::npos) << cuda.out;
  // serve runs ranks without the chunk store only (tests/server/tensor_parallel.test.mjs);
  // eval's loop drives one model.
  const CliResult serve = run_cli("serve --model " + model + " --tensor-parallel-size 2");
  EXPECT_NE(serve.status, 0);
  EXPECT_NE(serve.out.find("needs --reuse-mode off"), std::string::npos) << serve.out;
  const CliResult serve_cuda = run_cli("serve --model " + model +
                                       " --backend cuda --reuse-mode off --tensor-parallel-size 2");
  EXPECT_NE(serve_cuda.status, 0);
  EXPECT_NE(serve_cuda.out.find("NCCL"), std::string::npos) << serve_cuda.out;
}

// Segmented prompts through the CLI on the shipped model (its head profile and Sparse FFN
// settings from reuse_settings.json): every rank runs the reuse plan on its chunk store, and the
// answer is TP = 1's, token for token.
TEST(TensorParallelCli, SegmentedGenerateMatchesOneRank) {
  const std::string model = std::string(REDKNOT_SOURCE_DIR) + "/models/redknot-rag-8k";
  if (!std::filesystem::exists(model + "/model.safetensors")) GTEST_SKIP() << "no " << model;
  const std::string base =
      "generate --model " + model +
      " --segment 'Zorbin Kell was born in Quoshtrathia in 1961. These days Zorbin Kell works for "
      "Traibu Energy.' --segment 'Annual report of Traibu Energy. The headquarters of Traibu "
      "Energy are in Vornheim.' --prompt 'Question: In which city is the company that Zorbin "
      "Kell works for headquartered?\nAnswer:' --max-tokens 6 --json";
  const auto ids = [](const CliResult& r) {
    return nlohmann::json::parse(r.out.substr(r.out.find('{')))
        .at("ids")
        .get<std::vector<int32_t>>();
  };
  for (const char* mode : {"redknot", "naive"}) {
    const CliResult one = run_cli(base + " --mode " + mode);
    ASSERT_EQ(one.status, 0) << one.out;
    const CliResult two = run_cli(base + " --mode " + mode + " --tensor-parallel-size 2");
    ASSERT_EQ(two.status, 0) << two.out;
    EXPECT_EQ(ids(two), ids(one)) << mode;
    EXPECT_FALSE(ids(one).empty());
  }
}

}  // namespace
}  // namespace redknot::testing
