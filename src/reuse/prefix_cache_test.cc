// PrefixCache on a random tiny Llama (CPU backend, no files from ../shared) over a PagedKvCache
// with the native (all-global) profile: a request attached to a cached prefix and given the rest
// computes the same logits as a dense prefill from scratch (block sizes equal to, a multiple of,
// and not a multiple of the page size); matching (block-aligned, at most n - 1 tokens, per model
// fingerprint, verified tokens under forced hash collisions); radix-leaf replacement; LRU
// eviction by make_room and by the page budget, with pinned entries skipped and attached
// sequences intact; the stats counters.
#include "reuse/prefix_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "backend/builtin.h"
#include "core/error.h"
#include "kv/head_profile.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "model/model.h"
#include "model/random_checkpoint.h"

namespace redknot {
namespace {

constexpr int32_t kPageSize = 16;
constexpr int32_t kLayers = 3;
constexpr SeqId kFirstEntry = SeqId{1} << 30;

std::vector<float> ToVec(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    d = std::max(d, std::abs(double(a[i]) - b[i]));
  return d;
}

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

class PrefixCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    register_builtin_backends();
    backend_ = create_backend("cpu");
    cfg_ = preset_config("tiny");  // 2 kv heads, head_dim 16, vocab 512
    cfg_.num_layers = kLayers;
    ckpt_ = std::make_unique<Checkpoint>(random_checkpoint(cfg_, DType::F32, 7));
    model_ = std::make_unique<Model>(*ckpt_, *backend_);
    MakeCache(4096);
  }

  void MakeCache(int32_t pages) {
    kv_.reset();
    pool_ = std::make_unique<PagePool>(*backend_, pages, kPageSize,
                                       static_cast<int32_t>(cfg_.head_dim));
    kv_ = std::make_unique<PagedKvCache>(
        *pool_, HeadProfile::native(cfg_),
        PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg_.head_dim))}, model_->inv_freq());
  }

  // Pages one (layer, kv head) table of `tokens` tokens takes, times the tables of a sequence.
  int64_t SeqPages(int64_t tokens) const {
    return (tokens + kPageSize - 1) / kPageSize * kLayers * cfg_.num_kv_heads;
  }

  std::vector<int32_t> Random(int n, uint32_t seed) const {
    std::mt19937 rng(seed);
    std::vector<int32_t> v(n);
    for (auto& t : v) t = static_cast<int32_t>(rng() % cfg_.vocab_size);
    return v;
  }

  // Appends `tokens` to `seq` (made when missing) in one forward; the last token's logits.
  std::vector<float> Append(SeqId seq, const std::vector<int32_t>& tokens) {
    if (!kv_->has_sequence(seq)) kv_->add_sequence(seq);
    Batch b;
    b.add_sequence(seq, tokens, kv_->next_position(seq));
    return ToVec(model_->forward(b, *kv_));
  }

  PrefixCacheOptions Options(int32_t block = 0, uint64_t fp = 42) const {
    PrefixCacheOptions o;
    o.block_tokens = block;
    o.model_fp = fp;
    o.first_seq_id = kFirstEntry;
    return o;
  }

  ModelConfig cfg_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<PagePool> pool_;
  std::unique_ptr<PagedKvCache> kv_;
};

// ---- exactness ----

class PrefixCacheExact : public PrefixCacheTest, public ::testing::WithParamInterface<int32_t> {};

TEST_P(PrefixCacheExact, AttachedPrefixPlusRestEqualsDensePrefill) {
  const int32_t block = GetParam();
  const int32_t B = block > 0 ? block : kPageSize;
  // 220 tokens: the entry ends mid-page for B = 24 (216), on a page boundary otherwise.
  const std::vector<int32_t> a = Random(220, 1);
  std::vector<int32_t> b(a.begin(), a.begin() + 130);
  for (int32_t t : Random(70, 2)) b.push_back(t);
  b[130] = (a[130] + 1) % static_cast<int32_t>(cfg_.vocab_size);  // differs right after 130

  PrefixCache pc(*kv_, Options(block));
  Append(1, a);
  ASSERT_TRUE(pc.insert(1, a));
  const int32_t cached = 220 / B * B;
  EXPECT_EQ(pc.stats().tokens, cached);
  // The source goes on decoding (copy-on-write of a shared last page) without touching the entry.
  Append(1, {5});

  const PrefixCache::Match m = pc.match(b);
  ASSERT_TRUE(m.found());
  EXPECT_EQ(m.tokens, 130 / B * B);
  pc.attach(m, 2);
  EXPECT_EQ(kv_->num_tokens(2), m.tokens);
  EXPECT_EQ(kv_->next_position(2), m.tokens);
  const std::vector<float> reused = Append(2, std::vector<int32_t>(b.begin() + m.tokens, b.end()));
  const std::vector<float> dense = Append(3, b);
  const double diff = MaxAbsDiff(reused, dense);
  EXPECT_LE(diff, 1e-6) << "block " << B;
  EXPECT_EQ(Argmax(reused), Argmax(dense));

  // A few greedy steps stay together.
  std::vector<float> lr = reused, ld = dense;
  for (int i = 0; i < 3; ++i) {
    const int32_t next = Argmax(ld);
    ASSERT_EQ(Argmax(lr), next);
    lr = Append(2, {next});
    ld = Append(3, {next});
    EXPECT_LE(MaxAbsDiff(lr, ld), 1e-6);
  }

  // Copy-on-write kept the entry intact: its KV is still the source's first `cached` tokens.
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < cfg_.num_kv_heads; ++h) {
      Tensor ke, ve, ks, vs;
      std::vector<int32_t> pe, ps;
      kv_->read(m.entry, l, h, ke, ve, pe);
      kv_->read(1, l, h, ks, vs, ps);
      ASSERT_EQ(static_cast<int32_t>(pe.size()), cached);
      for (int32_t i = 0; i < cached; ++i) ASSERT_EQ(pe[i], i);
      const int64_t n = int64_t{cached} * cfg_.head_dim;
      EXPECT_TRUE(std::equal(ke.data<float>(), ke.data<float>() + n, ks.data<float>()));
      EXPECT_TRUE(std::equal(ve.data<float>(), ve.data<float>() + n, vs.data<float>()));
    }
}

// Block = page size (default), a multiple of it, and one that cuts pages in the middle.
INSTANTIATE_TEST_SUITE_P(Blocks, PrefixCacheExact, ::testing::Values(0, 64, 24));

// ---- matching ----

TEST_F(PrefixCacheTest, MatchIsBlockAlignedAndLeavesOneToken) {
  PrefixCache pc(*kv_, Options());
  const std::vector<int32_t> a = Random(100, 1);
  EXPECT_FALSE(pc.match(a).found());  // empty cache
  Append(1, a);
  ASSERT_TRUE(pc.insert(1, a));  // 96 tokens
  EXPECT_EQ(pc.match(a).tokens, 96);
  // The prompt itself, 96 tokens: one must be left to compute, so 80.
  std::vector<int32_t> p96(a.begin(), a.begin() + 96);
  EXPECT_EQ(pc.match(p96).tokens, 80);
  std::vector<int32_t> p97(a.begin(), a.begin() + 97);
  EXPECT_EQ(pc.match(p97).tokens, 96);
  // At most one block: nothing.
  EXPECT_FALSE(pc.match(std::span(a).first(16)).found());
  EXPECT_EQ(pc.match(std::span(a).first(17)).tokens, 16);
  EXPECT_FALSE(pc.match(std::span<const int32_t>()).found());
  // A different first block matches nothing, even when the rest agrees.
  std::vector<int32_t> c = a;
  c[3] ^= 1;
  EXPECT_FALSE(pc.match(c).found());
  // A difference in block 3 keeps blocks 0..2.
  c = a;
  c[50] ^= 1;
  EXPECT_EQ(pc.match(c).tokens, 48);
}

TEST_F(PrefixCacheTest, ModelFingerprintSeedsTheChain) {
  const std::vector<int32_t> a = Random(64, 1);
  const auto h1 = PrefixCache::chain_hashes(1, a, 16), h1b = PrefixCache::chain_hashes(1, a, 16);
  const auto h2 = PrefixCache::chain_hashes(2, a, 16);
  ASSERT_EQ(h1.size(), 4u);
  EXPECT_EQ(h1, h1b);
  for (size_t k = 0; k < 4; ++k) EXPECT_NE(h1[k], h2[k]);
  // A token of block 2 changes h_2, h_3 (the chain) but not h_0, h_1.
  std::vector<int32_t> c = a;
  c[40] ^= 1;
  const auto hc = PrefixCache::chain_hashes(1, c, 16);
  EXPECT_EQ(hc[0], h1[0]);
  EXPECT_EQ(hc[1], h1[1]);
  EXPECT_NE(hc[2], h1[2]);
  EXPECT_NE(hc[3], h1[3]);
  // Same block contents at another depth hash differently.
  std::vector<int32_t> twice(a.begin(), a.begin() + 16);
  twice.insert(twice.end(), a.begin(), a.begin() + 16);
  const auto ht = PrefixCache::chain_hashes(1, twice, 16);
  EXPECT_NE(ht[0], ht[1]);

  // Two caches over one store: entries of model 1 never serve model 2.
  PrefixCache pc1(*kv_, Options(0, 1));
  PrefixCacheOptions o2 = Options(0, 2);
  o2.first_seq_id = kFirstEntry + 1000;
  PrefixCache pc2(*kv_, o2);
  Append(1, a);
  pc1.insert(1, a);
  EXPECT_EQ(pc1.match(a).tokens, 48);
  EXPECT_FALSE(pc2.match(a).found());
}

TEST_F(PrefixCacheTest, HashCollisionsNeverServeWrongTokens) {
  // One key bit: nearly every lookup collides; only the token comparison tells entries apart.
  PrefixCacheOptions o = Options();
  o.key_bits = 1;
  PrefixCache pc(*kv_, o);
  // Prompts over two distinct blocks X, Y: many share prefixes, every key collides with others.
  const std::vector<int32_t> x = Random(16, 10), y = Random(16, 11);
  std::mt19937 rng(3);
  std::vector<std::vector<int32_t>> inserted;
  for (SeqId s = 1; s <= 12; ++s) {
    std::vector<int32_t> p;
    const int blocks = 1 + static_cast<int>(rng() % 5);
    for (int k = 0; k < blocks; ++k) {
      const auto& blk = rng() % 2 ? x : y;
      p.insert(p.end(), blk.begin(), blk.end());
    }
    p.push_back(static_cast<int32_t>(rng() % 512));  // a partial block, never cached
    Append(s, p);
    pc.insert(s, p);
    inserted.push_back(p);
  }
  // Oracle: the longest block-aligned common prefix with anything inserted, capped at n - 1.
  for (int q = 0; q < 40; ++q) {
    std::vector<int32_t> p;
    const int blocks = 1 + static_cast<int>(rng() % 6);
    for (int k = 0; k < blocks; ++k) {
      const auto& blk = rng() % 2 ? x : y;
      p.insert(p.end(), blk.begin(), blk.end());
    }
    if (rng() % 2) p.push_back(1);
    const int64_t cap = (static_cast<int64_t>(p.size()) - 1) / 16 * 16;
    int64_t best = 0;
    for (const auto& e : inserted) {
      const int64_t whole = static_cast<int64_t>(e.size()) / 16 * 16;
      int64_t common = 0;
      while (common < std::min<int64_t>(whole, static_cast<int64_t>(p.size())) &&
             e[common] == p[common])
        ++common;
      best = std::max(best, std::min(common / 16 * 16, cap));
    }
    const PrefixCache::Match m = pc.match(p);
    EXPECT_EQ(m.tokens, best) << "query " << q;
    EXPECT_EQ(m.found(), best > 0);
  }
}

// ---- insert ----

TEST_F(PrefixCacheTest, LongerInsertReplacesAShorterEntryAndCoveredInsertOnlyTouches) {
  PrefixCache pc(*kv_, Options());
  const std::vector<int32_t> a = Random(200, 1);
  std::vector<int32_t> a64(a.begin(), a.begin() + 64);
  Append(1, a64);
  ASSERT_TRUE(pc.insert(1, a64));
  Append(2, a);
  ASSERT_TRUE(pc.insert(2, a));  // 192 tokens: the 64-token entry is a strict prefix
  PrefixCacheStats s = pc.stats();
  EXPECT_EQ(s.entries, 1);
  EXPECT_EQ(s.replaced, 1);
  EXPECT_EQ(s.tokens, 192);
  // Shorter prompts are covered: no new entry.
  EXPECT_FALSE(pc.insert(1, a64));
  Append(3, std::vector<int32_t>(a.begin(), a.begin() + 100));
  EXPECT_FALSE(pc.insert(3, std::span(a).first(100)));
  // A sibling branch is its own leaf.
  std::vector<int32_t> sib(a.begin(), a.begin() + 80);
  for (int32_t t : Random(40, 5)) sib.push_back(t);
  Append(4, sib);
  EXPECT_TRUE(pc.insert(4, sib));
  s = pc.stats();
  EXPECT_EQ(s.entries, 2);
  EXPECT_EQ(s.inserts, 3);
  EXPECT_EQ(pc.match(sib).tokens, 112);
  EXPECT_EQ(pc.match(a).tokens, 192);
  // Below one block: nothing to cache.
  EXPECT_FALSE(pc.insert(1, std::span(a).first(15)));
  // Entries are the cache's sequences.
  EXPECT_TRUE(pc.is_entry(pc.match(a).entry));
  EXPECT_GE(pc.match(a).entry, kFirstEntry);
}

TEST_F(PrefixCacheTest, InsertRefusesASourceThatDoesNotHoldThePrompt) {
  PrefixCache pc(*kv_, Options());
  const std::vector<int32_t> a = Random(100, 1);
  Append(1, std::vector<int32_t>(a.begin(), a.begin() + 40));
  const int32_t free = pool_->num_free();
  EXPECT_THROW(pc.insert(1, a), Error);  // 96 tokens asked, 40 held
  EXPECT_EQ(pool_->num_free(), free);
  EXPECT_EQ(pc.stats().entries, 0);
  EXPECT_THROW(pc.insert(99, a), Error);                                   // no such sequence
  EXPECT_THROW(pc.attach(PrefixCache::Match{kFirstEntry, 16}, 5), Error);  // not a live match
}

TEST_F(PrefixCacheTest, RefusesALocalHeadProfile) {
  HeadProfile p = HeadProfile::native(cfg_);
  p.at(1, 0) = {HeadClass::Local, 64, 4};
  PagedKvCache local(*pool_, p, PagedKvOptions{0.25f}, model_->inv_freq());
  EXPECT_THROW({ PrefixCache pc(local, Options()); }, Error);
}

// ---- eviction ----

TEST_F(PrefixCacheTest, MakeRoomEvictsLeastRecentlyUsedFirst) {
  MakeCache(static_cast<int32_t>(SeqPages(200) * 4 + 10));
  PrefixCache pc(*kv_, Options());
  const std::vector<int32_t> a = Random(200, 1), c = Random(200, 2), d = Random(200, 3);
  const std::vector<const std::vector<int32_t>*> prompts = {&a, &c, &d};
  for (SeqId seq = 1; seq <= 3; ++seq) {
    Append(seq, *prompts[seq - 1]);
    ASSERT_TRUE(pc.insert(seq, *prompts[seq - 1]));
    kv_->remove_sequence(seq);  // the request finishes: the entry alone holds 192 tokens
  }
  const int64_t entry_pages = SeqPages(192);
  EXPECT_EQ(pc.stats().exclusive_pages, 3 * entry_pages);
  EXPECT_EQ(pc.stats().pages, 3 * entry_pages);
  EXPECT_EQ(pool_->num_free(), pool_->num_pages() - 3 * entry_pages);
  // Touch a (a covered insert): c is now the least recently used, then d.
  Append(4, a);
  EXPECT_FALSE(pc.insert(4, a));
  kv_->remove_sequence(4);

  EXPECT_TRUE(pc.make_room(pool_->num_free()));  // already there: nothing evicted
  EXPECT_EQ(pc.stats().evictions, 0);
  const int32_t free0 = pool_->num_free();
  EXPECT_TRUE(pc.make_room(free0 + 1));
  EXPECT_EQ(pool_->num_free(), free0 + entry_pages);
  EXPECT_FALSE(pc.match(c).found());
  EXPECT_TRUE(pc.match(a).found());
  EXPECT_TRUE(pc.match(d).found());
  EXPECT_TRUE(pc.make_room(pool_->num_free() + 1));
  EXPECT_FALSE(pc.match(d).found());
  EXPECT_TRUE(pc.match(a).found());
  EXPECT_EQ(pc.stats().evictions, 2);
  // More than evicting everything frees: fails, with the cache empty.
  EXPECT_FALSE(pc.make_room(pool_->num_pages() + 1));
  EXPECT_EQ(pc.stats().entries, 0);
  EXPECT_EQ(pool_->num_free(), pool_->num_pages());
}

TEST_F(PrefixCacheTest, PinnedEntriesAreSkippedAndAttachedSequencesSurviveEviction) {
  PrefixCache pc(*kv_, Options());
  const std::vector<int32_t> a = Random(192, 1);
  Append(1, a);
  ASSERT_TRUE(pc.insert(1, a));
  // The entry shares every page with the running request: evicting it frees nothing.
  EXPECT_EQ(pc.stats().exclusive_pages, 0);
  const int32_t free0 = pool_->num_free();
  EXPECT_FALSE(pc.make_room(free0 + 1));
  EXPECT_EQ(pc.stats().entries, 1);
  kv_->remove_sequence(1);
  EXPECT_EQ(pc.stats().exclusive_pages, SeqPages(192));

  // A request attaches 128 tokens and appends its own rest.
  std::vector<int32_t> b(a.begin(), a.begin() + 130);
  for (int32_t t : Random(30, 2)) b.push_back(t);
  const PrefixCache::Match m = pc.match(b);
  ASSERT_EQ(m.tokens, 128);
  pc.attach(m, 2);
  std::vector<float> reused = Append(2, std::vector<int32_t>(b.begin() + 128, b.end()));
  EXPECT_EQ(pc.stats().exclusive_pages, SeqPages(192) - SeqPages(128));

  // Evicting the entry frees only the pages the request does not share.
  const int32_t free1 = pool_->num_free();
  EXPECT_TRUE(pc.make_room(free1 + 1));
  EXPECT_EQ(pool_->num_free(), free1 + SeqPages(192) - SeqPages(128));
  EXPECT_EQ(pc.stats().entries, 0);
  EXPECT_EQ(kv_->num_tokens(2), 160);

  // The request goes on exactly as a dense one.
  const std::vector<float> dense = Append(3, b);
  EXPECT_LE(MaxAbsDiff(reused, dense), 1e-6);
  const int32_t next = Argmax(dense);
  EXPECT_LE(MaxAbsDiff(Append(2, {next}), Append(3, {next})), 1e-6);
  const int32_t free2 = pool_->num_free();
  kv_->remove_sequence(2);  // now its shared prefix pages go back too
  EXPECT_EQ(pool_->num_free(), free2 + SeqPages(161));
}

TEST_F(PrefixCacheTest, PageBudgetEvictsLeastRecentlyUsed) {
  PrefixCacheOptions o = Options();
  o.max_pages = SeqPages(192) + SeqPages(64);  // one 192-token entry and a bit
  PrefixCache pc(*kv_, o);
  const std::vector<int32_t> a = Random(200, 1), c = Random(200, 2);
  Append(1, a);
  ASSERT_TRUE(pc.insert(1, a));
  kv_->remove_sequence(1);
  Append(2, c);
  ASSERT_TRUE(pc.insert(2, c));  // shared with request 2: not over budget yet
  EXPECT_EQ(pc.stats().entries, 2);
  kv_->remove_sequence(2);
  pc.enforce_budget();  // now both are entry-only: a (least recent) goes
  PrefixCacheStats s = pc.stats();
  EXPECT_EQ(s.entries, 1);
  EXPECT_EQ(s.evictions, 1);
  EXPECT_LE(s.exclusive_pages, o.max_pages);
  EXPECT_FALSE(pc.match(a).found());
  EXPECT_TRUE(pc.match(c).found());
}

TEST_F(PrefixCacheTest, ClearAndDestructorReleaseEveryPage) {
  const int32_t all = pool_->num_free();
  {
    PrefixCache pc(*kv_, Options());
    const std::vector<int32_t> a = Random(100, 1);
    Append(1, a);
    pc.insert(1, a);
    kv_->remove_sequence(1);
    EXPECT_LT(pool_->num_free(), all);
    pc.clear();
    EXPECT_EQ(pool_->num_free(), all);
    Append(1, a);
    pc.insert(1, a);
    kv_->remove_sequence(1);
  }
  EXPECT_EQ(pool_->num_free(), all);
}

// ---- stats ----

TEST_F(PrefixCacheTest, StatsCounters) {
  PrefixCache pc(*kv_, Options(32));
  const std::vector<int32_t> a = Random(100, 1);
  Append(1, a);
  pc.insert(1, a);  // 96 tokens
  std::vector<int32_t> b(a.begin(), a.begin() + 70);
  b.push_back(3);
  const std::vector<int32_t> miss = Random(50, 9);
  pc.match(miss);
  const PrefixCache::Match m = pc.match(b);
  ASSERT_EQ(m.tokens, 64);
  pc.attach(m, 2);
  PrefixCacheStats s = pc.stats();
  EXPECT_EQ(s.queries, 2);
  EXPECT_EQ(s.query_tokens, 50 + 71);
  EXPECT_EQ(s.hits, 1);
  EXPECT_EQ(s.hit_tokens, 64);
  EXPECT_EQ(s.inserts, 1);
  EXPECT_EQ(s.evictions, 0);
  EXPECT_EQ(s.replaced, 0);
  EXPECT_EQ(s.entries, 1);
  EXPECT_EQ(s.tokens, 96);
  EXPECT_EQ(s.pages, SeqPages(96));
  EXPECT_EQ(s.exclusive_pages, 0);  // shared with requests 1 and 2
  kv_->remove_sequence(1);
  kv_->remove_sequence(2);
  s = pc.stats();
  EXPECT_EQ(s.exclusive_pages, SeqPages(96));
  EXPECT_TRUE(pc.make_room(pool_->num_pages()));
  s = pc.stats();
  EXPECT_EQ(s.evictions, 1);
  EXPECT_EQ(s.entries, 0);
  EXPECT_EQ(s.pages, 0);
  EXPECT_EQ(s.tokens, 0);
}

}  // namespace
}  // namespace redknot
