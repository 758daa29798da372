// Position-independent reuse: RoPE relocation against computing in place, for every refs family
// (llama3 rope scaling included); `full` through the segment path equals plain generation; and
// every mode yields a consistent cache on a real model.
#include <cmath>
#include <numeric>

#include "engine/generate.h"
#include "engine/kv_setup.h"
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

double rel_err(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    double d = double(a.data<float>()[i]) - b.data<float>()[i];
    num += d * d;
    den += double(b.data<float>()[i]) * b.data<float>()[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

class Relocation : public ::testing::TestWithParam<std::string> {};

// A key computed at p and relocated to p' equals the key computed at p' (layer 0, where keys
// depend on the token and position only), and a whole segment relocated then attended gives
// the logits of computing it there.
TEST_P(Relocation, MatchesComputingInPlace) {
  const std::string name = GetParam();
  RK_REQUIRE_SHARED("refs/" + name);
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("refs/" + name));
  if (ck.config.sliding_window > 0) ck.config.sliding_window = 0;  // relocation, not windowing
  auto backend = create_backend("cpu");
  Model model(ck, *backend);
  const int64_t V = ck.config.vocab_size;
  const std::vector<int32_t> seg = random_ids(40, V, 7), query = random_ids(9, V, 8);
  for (int32_t delta : {1, 333, 5000}) {
    KvOptions kvo;
    kvo.page_size = 16;
    kvo.tokens = 4 * (delta + 64);
    KvStore store = make_kv_store(model, kvo);
    PagedKvCache& kv = *store.cache;
    // A: the segment alone at [0, n); B: A's KV relocated by delta; C: computed at [delta, ...).
    kv.add_sequence(0);
    Batch a;
    a.add_sequence(0, seg, 0);
    model.forward(a, kv);
    kv.add_sequence(1);
    std::vector<std::vector<int32_t>> rows;
    for (int l = 0; l < ck.config.num_layers; ++l)
      for (int h = 0; h < ck.config.num_kv_heads; ++h) rows.push_back(kv.slot_rows(0, l, h));
    std::vector<int32_t> src(seg.size());
    std::iota(src.begin(), src.end(), 0);
    kv.append_relocated(1, rows, src, delta);
    kv.add_sequence(2);
    Batch c;
    c.add_sequence(2, seg, delta);
    model.forward(c, kv);
    for (int h = 0; h < ck.config.num_kv_heads; ++h) {
      Tensor kb, vb, kc, vc;
      std::vector<int32_t> pb, pc;
      kv.read(1, 0, h, kb, vb, pb);
      kv.read(2, 0, h, kc, vc, pc);
      EXPECT_EQ(pb, pc);
      EXPECT_LE(rel_err(kb, kc), 1e-4) << name << " delta " << delta << " head " << h;
      EXPECT_EQ(rel_err(vb, vc), 0.0);
    }
    Batch qb, qc;
    qb.add_sequence(1, query, kv.next_position(1));
    qc.add_sequence(2, query, kv.next_position(2));
    Tensor lb = model.forward(qb, kv), lc = model.forward(qc, kv);
    EXPECT_LE(rel_err(lb, lc), 1e-4) << name << " delta " << delta;
  }
}

INSTANTIATE_TEST_SUITE_P(AllFamilies, Relocation, ::testing::ValuesIn(refs_models()),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

SegmentedPrompt make_prompt(int64_t vocab, int segments, int seg_len, uint32_t seed) {
  SegmentedPrompt p;
  for (int i = 0; i < segments; ++i) p.segments.push_back(random_ids(seg_len + i, vocab, seed + i));
  p.query = random_ids(11, vocab, seed + 100);
  return p;
}

TEST(ReuseModes, FullThroughSegmentsIsBitIdenticalToGenerate) {
  RK_REQUIRE_SHARED("refs/qwen3-tiny");
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("refs/qwen3-tiny"));
  auto backend = create_backend("cpu");
  Model model(ck, *backend);
  SegmentedPrompt p = make_prompt(ck.config.vocab_size, 4, 50, 3);
  KvOptions kvo;
  kvo.tokens = 512;
  KvStore s1 = make_kv_store(model, kvo), s2 = make_kv_store(model, kvo);
  ReuseOptions ro;
  ro.mode = ReuseMode::Full;
  PrefillOutcome out = prefill_with_reuse(model, *s1.cache, 0, p, nullptr, ro);
  GenerateOptions go;
  go.max_tokens = 1;
  go.prefill_chunk = ro.chunk;
  GenerateResult g = generate(model, *s2.cache, 0, p.flatten(), go);
  ASSERT_EQ(out.last_logits.size(), g.first_logits.size());
  EXPECT_EQ(std::memcmp(out.last_logits.data(), g.first_logits.data(), g.first_logits.size() * 4),
            0);
  EXPECT_GT(out.flops.total(), 0);
}

// Every mode runs on a real model with the chunk store, reuses what it should, and agrees with
// full prefill where it must: prefix (after a request with the same chain) and redknot with an
// all-global profile and no Sparse FFN are exact up to float rounding.
TEST(ReuseModes, AllModesOnRefsModel) {
  RK_REQUIRE_SHARED("refs/llama3-tiny");
  register_builtin_backends();
  Checkpoint ck = load_checkpoint(shared_path("refs/llama3-tiny"));
  auto backend = create_backend("cpu");
  Model model(ck, *backend);
  SegmentedPrompt p = make_prompt(ck.config.vocab_size, 5, 60, 11);
  KvOptions kvo;
  kvo.page_size = 16;
  kvo.budget_bytes = 64 << 20;
  KvStore store = make_kv_store(model, kvo);
  ChunkStoreOptions cso;
  cso.pool_budget_bytes = 16 << 20;
  cso.model_fp = model_fingerprint(ck.config, ck);
  ChunkStore chunks(model, *store.pool, cso);
  PrefixIndex prefix;

  // Offline phase: every segment cached alone (the modes then hit).
  for (const auto& seg : p.segments) ASSERT_TRUE(acquire_or_prefill(model, chunks, seg).ok());
  ReuseOptions ro;
  ro.mode = ReuseMode::Full;
  PrefillOutcome full = prefill_with_reuse(model, *store.cache, 0, p, &chunks, ro);
  store.cache->remove_sequence(0);
  const double full_flops = full.flops.total();

  for (ReuseMode m : {ReuseMode::Prefix, ReuseMode::Naive, ReuseMode::CacheBlend, ReuseMode::Epic,
                      ReuseMode::RedKnot}) {
    ro.mode = m;
    ro.sparse_ffn_enabled = false;
    if (m == ReuseMode::Prefix) {
      std::vector<int32_t> chain;
      for (auto& s : p.segments) chain.insert(chain.end(), s.begin(), s.end());
      ASSERT_TRUE(acquire_or_prefill(model, chunks, chain).ok());
      prefix.record(p);
    }
    PrefillOutcome out = prefill_with_reuse(model, *store.cache, 0, p, &chunks, ro, &prefix);
    EXPECT_EQ(store.cache->num_tokens(0), p.total_tokens()) << reuse_mode_name(m);
    const double cos = [&] {
      double d = 0, a = 0, b = 0;
      for (size_t i = 0; i < out.last_logits.size(); ++i) {
        d += double(out.last_logits[i]) * full.last_logits[i];
        a += double(out.last_logits[i]) * out.last_logits[i];
        b += double(full.last_logits[i]) * full.last_logits[i];
      }
      return d / std::sqrt(a * b);
    }();
    if (m == ReuseMode::Prefix || m == ReuseMode::RedKnot) {
      EXPECT_GT(cos, 0.99999) << reuse_mode_name(m);
    } else {
      EXPECT_GT(cos, 0.5) << reuse_mode_name(m);  // approximate modes, random weights
    }
    if (m != ReuseMode::RedKnot) {
      EXPECT_LT(out.flops.total(), full_flops) << reuse_mode_name(m);
    }
    if (m == ReuseMode::Naive) {
      EXPECT_EQ(out.reused_tokens, p.total_tokens() - int64_t(p.query.size()));
    }
    store.cache->remove_sequence(0);
  }
  EXPECT_GT(chunks.stats().pool_hits, 0);
}

}  // namespace
}  // namespace redknot::testing
