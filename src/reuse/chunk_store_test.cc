// ChunkStore over a random tiny model on the CPU backend (no files from ../shared): hit/miss
// counting, cached KV equal to a fresh prefill of the segment alone, budgets of every tier, the
// frequency+recency policy and admission filter, bit-exact demotion/promotion, restarts,
// corrupted spill files (and their log lines), pins, hash collisions, pages returned on
// destruction, and write-through: entries on disk without a clean shutdown, a full write queue
// never blocks.
#include "reuse/chunk_store.h"
#include "reuse/chunk_prefill.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/builtin.h"
#include "core/error.h"
#include "kv/device_util.h"
#include "kv/head_profile.h"
#include "model/random_checkpoint.h"

namespace redknot {
namespace {
namespace fs = std::filesystem;

constexpr int32_t kPageSize = 16;
constexpr int32_t kLen = 40;  // 3 pages per (layer, head)

// Host f32 K and V of every (layer, kv head) of a segment: [layer * kv_heads + head].
struct SegKv {
  std::vector<std::vector<float>> k, v;
};

std::vector<float> to_vec(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

class ChunkStoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    register_builtin_backends();
    backend_ = create_backend("cpu").release();
    cfg_ = new ModelConfig(preset_config("tiny"));
    ckpt_ = new Checkpoint(random_checkpoint(*cfg_, DType::F32, 7));
    model_ = new Model(*ckpt_, *backend_);
  }
  static void TearDownTestSuite() {
    delete model_;
    delete ckpt_;
    delete cfg_;
    delete backend_;
  }

  void SetUp() override {
    pool_ = std::make_unique<PagePool>(*backend_, 1024, kPageSize,
                                       static_cast<int32_t>(cfg_->head_dim));
    dir_ = fs::path(::testing::TempDir()) /
           ("chunk_store_" +
            std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  int32_t layers() const { return static_cast<int32_t>(cfg_->num_layers); }
  int32_t heads() const { return static_cast<int32_t>(cfg_->num_kv_heads); }
  int64_t seg_pool_bytes(int32_t len = kLen) const {
    return int64_t{layers()} * heads() * ((len + kPageSize - 1) / kPageSize) *
           pool_->bytes_per_page();
  }
  int64_t seg_payload_bytes(int32_t len = kLen) const {
    return int64_t{layers()} * heads() * 2 * len * cfg_->head_dim * 4;
  }
  int64_t seg_file_bytes(int32_t len = kLen) const {
    return 48 + 4 * len + 8 * layers() * heads() + 8 + seg_payload_bytes(len);
  }

  ChunkStoreOptions Opts(int64_t pool_segs, int64_t host_segs = 0, int64_t disk_segs = 0) {
    ChunkStoreOptions o;
    o.pool_budget_bytes = pool_segs * seg_pool_bytes();
    o.host_budget_bytes = host_segs * seg_payload_bytes();
    o.disk_budget_bytes = disk_segs * seg_file_bytes();
    o.disk_dir = dir_.string();
    o.model_fp = model_fingerprint(*cfg_, *ckpt_);
    o.fsync_files = false;
    // The policy tests pin synchronous tier moves; write-through has its own tests below.
    o.write_through = false;
    return o;
  }

  // Files in a directory with the spill extension.
  static int SpillFiles(const fs::path& dir) {
    int n = 0;
    if (fs::exists(dir))
      for (const auto& de : fs::directory_iterator(dir)) n += de.path().extension() == ".rkv";
    return n;
  }

  static std::vector<int32_t> Seg(int id, int32_t len = kLen) {
    std::mt19937 rng(1000 + id);
    std::vector<int32_t> t(len);
    for (auto& x : t) x = static_cast<int32_t>(rng() % 512);
    return t;
  }

  // The segment prefilled alone in a fresh cache (own pool), one forward per `chunk` tokens.
  SegKv Fresh(const std::vector<int32_t>& tokens, int32_t chunk = 2048) {
    PagePool pool(*backend_, 256, kPageSize, static_cast<int32_t>(cfg_->head_dim));
    PagedKvCache kv(pool, HeadProfile(layers(), heads()),
                    PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg_->head_dim))},
                    model_->inv_freq());
    kv.add_sequence(0);
    for (size_t s = 0; s < tokens.size(); s += chunk) {
      Batch b;
      const size_t e = std::min(tokens.size(), s + chunk);
      b.add_sequence(0, std::vector<int32_t>(tokens.begin() + s, tokens.begin() + e),
                     static_cast<int32_t>(s), false);
      model_->forward(b, kv);
    }
    SegKv out;
    for (int l = 0; l < layers(); ++l)
      for (int h = 0; h < heads(); ++h) {
        Tensor k, v;
        std::vector<int32_t> pos;
        kv.read(0, l, h, k, v, pos);
        for (size_t i = 0; i < pos.size(); ++i) EXPECT_EQ(pos[i], static_cast<int32_t>(i));
        out.k.push_back(to_vec(k));
        out.v.push_back(to_vec(v));
      }
    return out;
  }

  // What a pool handle's rows hold.
  SegKv FromHandle(const ChunkStore::Handle& h) {
    EXPECT_EQ(h.tier(), ChunkTier::Pool);
    SegKv out;
    for (int l = 0; l < layers(); ++l)
      for (int hd = 0; hd < heads(); ++hd) {
        const auto& rows = h.rows(l, hd);
        EXPECT_EQ(static_cast<int32_t>(rows.size()), h.length());
        Tensor idx = upload_i32(*backend_, rows);
        const int64_t n = static_cast<int64_t>(rows.size());
        Tensor k = backend_->alloc(backend_->act_dtype(), {n, cfg_->head_dim});
        Tensor v = backend_->alloc(backend_->act_dtype(), {n, cfg_->head_dim});
        backend_->gather_rows(pool_->k(), idx, k);
        backend_->gather_rows(pool_->v(), idx, v);
        out.k.push_back(to_vec(backend_->to_host_f32(k)));
        out.v.push_back(to_vec(backend_->to_host_f32(v)));
        Tensor p = backend_->alloc(DType::I32, {n, 1});
        backend_->gather_rows(pool_->pos(), idx, p);
        for (int64_t i = 0; i < n; ++i) EXPECT_EQ(p.data<int32_t>()[i], i);
      }
    return out;
  }

  static void ExpectSame(const SegKv& a, const SegKv& b) {
    ASSERT_EQ(a.k.size(), b.k.size());
    for (size_t i = 0; i < a.k.size(); ++i) {
      ASSERT_EQ(a.k[i], b.k[i]) << "K of table " << i;
      ASSERT_EQ(a.v[i], b.v[i]) << "V of table " << i;
    }
  }

  void ExpectBudgets(const ChunkStore& store) {
    const ChunkStoreStats s = store.stats();
    const ChunkStoreOptions& o = store.options();
    EXPECT_LE(s.pool.bytes, o.pool_budget_bytes);
    EXPECT_LE(s.host.bytes, o.host_budget_bytes);
    EXPECT_LE(s.disk.bytes, o.disk_budget_bytes);
    EXPECT_EQ(s.pool.bytes, s.pool.entries * seg_pool_bytes());
    EXPECT_EQ(s.host.bytes, s.host.entries * seg_payload_bytes());
    EXPECT_EQ(pool_->num_pages() - pool_->num_free(), s.pool.bytes / pool_->bytes_per_page());
    int64_t on_disk = 0, files = 0;
    if (fs::exists(dir_))
      for (const auto& de : fs::directory_iterator(dir_))
        if (de.path().extension() == ".rkv") {
          on_disk += static_cast<int64_t>(de.file_size());
          ++files;
        }
    EXPECT_EQ(on_disk, s.disk.bytes);
    EXPECT_EQ(files, s.disk.entries);
  }

  std::string FileOf(const std::vector<int32_t>& tokens) {
    char buf[17];
    std::snprintf(
        buf, sizeof(buf), "%016llx",
        static_cast<unsigned long long>(segment_key(model_fingerprint(*cfg_, *ckpt_), tokens)));
    return (dir_ / (std::string(buf) + ".rkv")).string();
  }

  // A segment's entry as an engine gets it (prefilled here on a miss, in forwards of `chunk`
  // tokens); empty when the policy gives it no room in the pool (the engine would then use it
  // privately, see PrivateMissServesItsRequestOnly) or the pool has no free pages.
  ChunkStore::Handle Acquire(ChunkStore& store, const std::vector<int32_t>& tokens,
                             int32_t chunk = 2048) {
    ChunkStore::Handle h = store.acquire(tokens);
    if (h || tokens.empty() || store.cached(tokens)) return h;
    try {
      ChunkStore::Pending p = store.reserve(tokens);
      if (!p.admitted()) return {};
      return prefill_pending(*model_, store, std::move(p), chunk);
    } catch (const OutOfKvMemory&) {
      return {};
    }
  }

  static Backend* backend_;
  static ModelConfig* cfg_;
  static Checkpoint* ckpt_;
  static Model* model_;
  std::unique_ptr<PagePool> pool_;
  fs::path dir_;
};

Backend* ChunkStoreTest::backend_ = nullptr;
ModelConfig* ChunkStoreTest::cfg_ = nullptr;
Checkpoint* ChunkStoreTest::ckpt_ = nullptr;
Model* ChunkStoreTest::model_ = nullptr;

TEST_F(ChunkStoreTest, KeysAndFingerprint) {
  const uint64_t fp = model_fingerprint(*cfg_, *ckpt_);
  EXPECT_EQ(fp, model_fingerprint(*cfg_, *ckpt_));
  Checkpoint other = random_checkpoint(*cfg_, DType::F32, 8);  // same shapes, other weights
  EXPECT_NE(fp, model_fingerprint(*cfg_, other));
  ModelConfig cfg2 = *cfg_;
  cfg2.rope_theta = 500000.0;
  EXPECT_NE(fp, model_fingerprint(cfg2, *ckpt_));
  const auto a = Seg(1), b = Seg(2);
  EXPECT_EQ(segment_key(fp, a), segment_key(fp, a));
  EXPECT_NE(segment_key(fp, a), segment_key(fp, b));
  EXPECT_NE(segment_key(fp, a), segment_key(fp + 1, a));
}

TEST_F(ChunkStoreTest, HitMissCounting) {
  ChunkStore store(*model_, *pool_, Opts(4));
  const auto a = Seg(1), b = Seg(2);
  {
    ChunkStore::Handle h = Acquire(store, a);
    ASSERT_TRUE(h.ok());
    EXPECT_FALSE(h.hit());
    EXPECT_EQ(h.source(), ChunkTier::None);
    EXPECT_EQ(h.tier(), ChunkTier::Pool);
    EXPECT_EQ(h.tokens(), a);
    EXPECT_EQ(h.length(), kLen);
    EXPECT_EQ(h.all_rows().size(), static_cast<size_t>(layers() * heads()));
    EXPECT_EQ(h.positions().size(), static_cast<size_t>(kLen));
  }
  {
    ChunkStore::Handle h = Acquire(store, a);
    ASSERT_TRUE(h.ok());
    EXPECT_TRUE(h.hit());
    EXPECT_EQ(h.source(), ChunkTier::Pool);
  }
  EXPECT_FALSE(store.acquire(b).ok());
  EXPECT_FALSE(store.lookup(b).ok());
  EXPECT_TRUE(store.lookup(a).ok());
  EXPECT_FALSE(Acquire(store, std::vector<int32_t>{}).ok());
  const ChunkStoreStats s = store.stats();
  EXPECT_EQ(s.pool_hits, 2);
  EXPECT_EQ(s.misses, 3);
  EXPECT_EQ(s.prefills, 1);
  EXPECT_EQ(s.pool.entries, 1);
  EXPECT_EQ(s.pool.bytes, seg_pool_bytes());
  EXPECT_EQ(s.host_hits + s.disk_hits + s.corrupt_files + s.evictions, 0);
  // Bad token ids are the caller's error: thrown, nothing cached, no pages leaked.
  EXPECT_THROW(Acquire(store, std::vector<int32_t>{1, 2, 100000}), Error);
  ExpectBudgets(store);
}

TEST_F(ChunkStoreTest, CachedKvEqualsPrefillAlone) {
  ChunkStoreOptions o = Opts(8);
  ChunkStore store(*model_, *pool_, o);
  const auto a = Seg(3), b = Seg(4, 17);
  ChunkStore::Handle ha = Acquire(store, a, 16);  // chunked prefill
  ChunkStore::Handle hb = Acquire(store, b, 16);
  ASSERT_TRUE(ha.ok() && hb.ok());
  ExpectSame(FromHandle(ha), Fresh(a, 16));
  ExpectSame(FromHandle(hb), Fresh(b, 16));
  // And close to an unchunked prefill (same math, other accumulation order).
  const SegKv got = FromHandle(ha), one = Fresh(a);
  for (size_t i = 0; i < got.k.size(); ++i)
    for (size_t j = 0; j < got.k[i].size(); ++j) {
      ASSERT_NEAR(got.k[i][j], one.k[i][j], 1e-4);
      ASSERT_NEAR(got.v[i][j], one.v[i][j], 1e-4);
    }

  // The intended use: relocate the rows into a request's sequence of the same pool.
  PagedKvCache req(*pool_, HeadProfile(layers(), heads()), PagedKvOptions{0.25f},
                   model_->inv_freq());
  req.add_sequence(5);
  req.append_relocated(5, ha.all_rows(), ha.positions(), 0);
  const SegKv fresh = Fresh(a, 16);
  for (int l = 0, i = 0; l < layers(); ++l)
    for (int h = 0; h < heads(); ++h, ++i) {
      Tensor k, v;
      std::vector<int32_t> pos;
      req.read(5, l, h, k, v, pos);
      EXPECT_EQ(to_vec(k), fresh.k[i]);
      EXPECT_EQ(to_vec(v), fresh.v[i]);
    }
}

TEST(PackRows, GroupsConsecutiveItemsUnderTheBudget) {
  using G = std::vector<std::vector<size_t>>;
  EXPECT_EQ(pack_rows({3, 4, 2, 6, 1}, 8), (G{{0, 1}, {2, 3}, {4}}));
  EXPECT_EQ(pack_rows({10, 2, 9}, 8), (G{{0}, {1}, {2}}));  // longer than the budget: alone
  EXPECT_EQ(pack_rows({3, 4, 2}, 0), (G{{0, 1, 2}}));       // no budget: one forward
  EXPECT_TRUE(pack_rows({}, 8).empty());
}

// A prompt's misses prefilled together (several segments per forward, each at [0, len) alone)
// hold the KV each gets prefilled alone; a segment given twice is prefilled once; hits are hits.
TEST_F(ChunkStoreTest, MissesPrefilledTogetherEqualPrefillAlone) {
  ChunkStore store(*model_, *pool_, Opts(8));
  const auto a = Seg(3), b = Seg(4, 17), c = Seg(5, 9), d = Seg(6, 20);
  ASSERT_TRUE(Acquire(store, d).ok());  // cached before
  const ChunkStoreStats before = store.stats();
  std::vector<ChunkStore::Handle> hs =
      acquire_or_prefill_all(*model_, store, {a, b, a, d, {}, c}, 2 * kLen);
  ASSERT_EQ(hs.size(), 6u);
  EXPECT_FALSE(hs[4].ok());                                // an empty segment has no entry
  EXPECT_EQ(store.stats().prefills - before.prefills, 3);  // a, b, c: a once
  for (size_t i : {0, 1, 2, 3, 5}) ASSERT_TRUE(hs[i].ok()) << i;
  ExpectSame(FromHandle(hs[0]), FromHandle(hs[2]));  // one entry
  ExpectSame(FromHandle(hs[3]), Fresh(d));
  // The same math as alone; a GEMM over more rows may round its last bit differently.
  auto expect_near = [](const SegKv& got, const SegKv& alone) {
    ASSERT_EQ(got.k.size(), alone.k.size());
    for (size_t i = 0; i < got.k.size(); ++i)
      for (size_t j = 0; j < got.k[i].size(); ++j) {
        ASSERT_NEAR(got.k[i][j], alone.k[i][j], 1e-5) << "K of table " << i;
        ASSERT_NEAR(got.v[i][j], alone.v[i][j], 1e-5) << "V of table " << i;
      }
  };
  expect_near(FromHandle(hs[0]), Fresh(a));
  expect_near(FromHandle(hs[1]), Fresh(b));
  expect_near(FromHandle(hs[5]), Fresh(c));
}

// Several misses reserved before any is prefilled (a prompt's documents, concurrent requests)
// each hold their room: the budget admits as many as it fits, and a pool that cannot hold the
// next one's pages beside the others' refuses it at reserve, not in the middle of a forward.
TEST_F(ChunkStoreTest, PendingReservationsHoldTheirRoom) {
  {
    ChunkStore store(*model_, *pool_, Opts(2));
    std::vector<ChunkStore::Pending> p;
    for (int i = 0; i < 3; ++i) p.push_back(store.reserve(Seg(40 + i)));
    EXPECT_TRUE(p[0].admitted());
    EXPECT_TRUE(p[1].admitted());
    EXPECT_FALSE(p[2].admitted()) << "the budget holds two segments";
    std::vector<ChunkStore::Handle> h = prefill_pendings(*model_, store, std::move(p));
    h.clear();  // the third served its request only and goes with it
    ExpectBudgets(store);
    EXPECT_EQ(store.stats().pool.entries, 2);
  }
  // A pool of room for two segments' pages (and a budget for more): the third is refused.
  PagePool small(*backend_, static_cast<int32_t>(2 * seg_pool_bytes() / pool_->bytes_per_page()),
                 kPageSize, static_cast<int32_t>(cfg_->head_dim));
  ChunkStore store(*model_, small, Opts(8));
  ChunkStore::Pending a = store.reserve(Seg(50)), b = store.reserve(Seg(51));
  EXPECT_THROW(store.reserve(Seg(52)), OutOfKvMemory);
  a.reset();  // an abandoned reservation gives its room back
  ChunkStore::Pending c = store.reserve(Seg(52));
  EXPECT_TRUE(c.admitted());
}

TEST_F(ChunkStoreTest, BudgetsRespectedInEveryTier) {
  ChunkStore store(*model_, *pool_, Opts(3, 4, 5));
  std::mt19937 rng(42);
  for (int i = 0; i < 60; ++i) {
    // A mix of new segments and repeats of a small hot set.
    const int id = (rng() % 3 == 0) ? static_cast<int>(rng() % 4) : 100 + i;
    ChunkStore::Handle h = Acquire(store, Seg(id));
    if (h.hit()) ExpectSame(FromHandle(h), Fresh(Seg(id)));  // served after tier moves
    ExpectBudgets(store);
  }
  const ChunkStoreStats s = store.stats();
  EXPECT_GT(s.demotions_to_host, 0);
  EXPECT_GT(s.demotions_to_disk, 0);
  EXPECT_GT(s.evictions, 0);
  EXPECT_GT(s.host_hits + s.disk_hits, 0);
  EXPECT_EQ(s.pool.entries, 3);
  EXPECT_GT(s.host.entries, 0);
}

TEST_F(ChunkStoreTest, FrequentSegmentOutlivesBurstOfOneOffs) {
  // Pool only (no lower tiers): what leaves the pool is gone. Room for 4 segments.
  ChunkStore store(*model_, *pool_, Opts(4));
  const auto hot = Seg(1);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(Acquire(store, hot).ok());
  // 12 one-off segments: plain LRU would have evicted `hot` after the 4th.
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(Acquire(store, Seg(100 + i)).ok());
  ChunkStoreStats s = store.stats();
  EXPECT_EQ(s.evictions, 9);
  EXPECT_EQ(s.pool.entries, 4);
  ChunkStore::Handle h = Acquire(store, hot);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h.source(), ChunkTier::Pool);
  // The oldest one-offs went first: the newest three are still there.
  for (int i = 9; i < 12; ++i) EXPECT_EQ(store.lookup(Seg(100 + i)).source(), ChunkTier::Pool) << i;
  EXPECT_FALSE(store.lookup(Seg(100)).ok());
  ExpectBudgets(store);
}

TEST_F(ChunkStoreTest, AdmissionFilterProtectsHotSegments) {
  ChunkStore store(*model_, *pool_, Opts(2));
  const auto a = Seg(1), b = Seg(2), c = Seg(3);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(Acquire(store, a).ok());
    ASSERT_TRUE(Acquire(store, b).ok());
  }
  // A one-off may not push out segments hotter than itself: it is not cached.
  EXPECT_FALSE(Acquire(store, c).ok());
  EXPECT_EQ(store.stats().bypasses, 1);
  EXPECT_EQ(store.stats().evictions, 0);
  EXPECT_EQ(Acquire(store, a).source(), ChunkTier::Pool);
  EXPECT_EQ(Acquire(store, b).source(), ChunkTier::Pool);
  // Its accesses are remembered: used repeatedly, it gets in (displacing a cooled entry).
  bool admitted = false;
  for (int i = 0; i < 8 && !admitted; ++i) admitted = Acquire(store, c).ok();
  EXPECT_TRUE(admitted);
  EXPECT_EQ(store.stats().evictions, 1);
  ExpectBudgets(store);
}

TEST_F(ChunkStoreTest, DemotionAndPromotionAreBitExact) {
  ChunkStore store(*model_, *pool_, Opts(1, 1, 4));
  const auto a = Seg(1), b = Seg(2), c = Seg(3);
  SegKv kv_a, kv_b;
  {
    ChunkStore::Handle h = Acquire(store, a);
    kv_a = FromHandle(h);
  }
  {
    ChunkStore::Handle h = Acquire(store, b);  // a -> host
    kv_b = FromHandle(h);
  }
  EXPECT_EQ(store.stats().host.entries, 1);
  ASSERT_TRUE(Acquire(store, c).ok());  // b -> host, a (older, colder) -> disk
  EXPECT_EQ(store.lookup(b).tier(), ChunkTier::Host);
  {
    ChunkStore::Handle h = store.lookup(a);
    ASSERT_EQ(h.tier(), ChunkTier::Disk);
    // One head's rows straight from the file, and from host RAM for b.
    auto rows = store.read_head_rows(h, 1, 1, 5, 33);
    ASSERT_TRUE(rows.has_value());
    const size_t t = 1 * heads() + 1, d = cfg_->head_dim;
    EXPECT_EQ(to_vec(rows->k),
              std::vector<float>(kv_a.k[t].begin() + 5 * d, kv_a.k[t].begin() + 33 * d));
    EXPECT_EQ(to_vec(rows->v),
              std::vector<float>(kv_a.v[t].begin() + 5 * d, kv_a.v[t].begin() + 33 * d));
    ChunkStore::Handle hb = store.lookup(b);
    auto rb = store.read_head_rows(hb, 0, 1, 0, kLen);
    ASSERT_TRUE(rb.has_value());
    EXPECT_EQ(to_vec(rb->k), kv_b.k[1]);
    EXPECT_EQ(to_vec(rb->v), kv_b.v[1]);
    EXPECT_THROW(store.read_head_rows(hb, 0, 1, 0, kLen + 1), Error);
  }
  const ChunkStoreStats before = store.stats();
  EXPECT_EQ(before.demotions_to_host, 2);
  EXPECT_EQ(before.demotions_to_disk, 1);
  {
    ChunkStore::Handle h = Acquire(store, a);  // disk -> pool
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(h.source(), ChunkTier::Disk);
    ExpectSame(FromHandle(h), kv_a);
  }
  {
    ChunkStore::Handle h = Acquire(store, b);  // host -> pool
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(h.source(), ChunkTier::Host);
    ExpectSame(FromHandle(h), kv_b);
  }
  const ChunkStoreStats s = store.stats();
  EXPECT_EQ(s.disk_hits, before.disk_hits + 1);
  EXPECT_EQ(s.host_hits, before.host_hits + 1);
  EXPECT_EQ(s.promotions, 2);
  EXPECT_EQ(s.prefills, 3);
  ExpectBudgets(store);
}

// FP8 KV pools (--kv-cache-dtype fp8): a segment's rows (e4m3 codes + their f32 scales) go to
// host RAM and disk and come back byte for byte; files of an FP8 store are foreign to an f32
// store of the same model (KV dtype in the header and in the fingerprint), and the FP8 segment
// holds the f32 prefill's K/V to within e4m3 rounding.
TEST_F(ChunkStoreTest, Fp8RowsAndScalesSurviveEveryTier) {
  const int32_t hd = static_cast<int32_t>(cfg_->head_dim);
  PagePool fp8(*backend_, 1024, kPageSize, hd, true, DType::F8_E4M3);
  const int64_t row = hd + kFp8KvScaleBytes;
  const int64_t seg_pool =
      int64_t{layers()} * heads() * ((kLen + kPageSize - 1) / kPageSize) * fp8.bytes_per_page();
  const int64_t seg_payload = int64_t{layers()} * heads() * 2 * kLen * row;
  ChunkStoreOptions o = Opts(0);
  o.pool_budget_bytes = seg_pool;
  o.host_budget_bytes = seg_payload;
  o.disk_budget_bytes = 4 * (seg_payload + 4096);
  const uint64_t fp = model_fingerprint(*cfg_, *ckpt_, DType::F8_E4M3);
  EXPECT_NE(fp, model_fingerprint(*cfg_, *ckpt_));
  EXPECT_EQ(model_fingerprint(*cfg_, *ckpt_, DType::F32), model_fingerprint(*cfg_, *ckpt_));
  o.model_fp = fp;
  // Every (layer, head)'s K and V rows of a pool handle, as stored bytes.
  auto bytes_of = [&](const ChunkStore::Handle& h) {
    EXPECT_EQ(h.tier(), ChunkTier::Pool);
    std::vector<std::vector<uint8_t>> out;
    for (int l = 0; l < layers(); ++l)
      for (int hh = 0; hh < heads(); ++hh) {
        const auto& rows = h.rows(l, hh);
        const int64_t n = static_cast<int64_t>(rows.size());
        for (Tensor* src : {&fp8.k(), &fp8.v()}) {
          Tensor t = Tensor::host(DType::F8_E4M3, {n, row});
          backend_->gather_rows(*src, upload_i32(*backend_, rows), t);
          out.emplace_back(t.data<uint8_t>(), t.data<uint8_t>() + t.nbytes());
        }
      }
    return out;
  };
  const auto a = Seg(1), b = Seg(2), c = Seg(3);
  std::vector<std::vector<uint8_t>> kv_a, kv_b;
  {
    ChunkStore store(*model_, fp8, o);
    kv_a = bytes_of(Acquire(store, a));
    kv_b = bytes_of(Acquire(store, b));   // a -> host
    ASSERT_TRUE(Acquire(store, c).ok());  // b -> host, a -> disk
    ASSERT_EQ(store.lookup(a).tier(), ChunkTier::Disk);
    ASSERT_EQ(store.lookup(b).tier(), ChunkTier::Host);
    // One head's rows straight from the file: codes and scales.
    auto rows = store.read_head_rows(store.lookup(a), 1, 1, 5, 33);
    ASSERT_TRUE(rows.has_value());
    ASSERT_EQ(rows->k.dtype(), DType::F8_E4M3);
    ASSERT_EQ(rows->k.shape(), (std::vector<int64_t>{28, row}));
    const size_t t = 2 * (1 * heads() + 1);
    EXPECT_EQ(std::vector<uint8_t>(rows->k.data<uint8_t>(), rows->k.data<uint8_t>() + 28 * row),
              std::vector<uint8_t>(kv_a[t].begin() + 5 * row, kv_a[t].begin() + 33 * row));
    EXPECT_EQ(std::vector<uint8_t>(rows->v.data<uint8_t>(), rows->v.data<uint8_t>() + 28 * row),
              std::vector<uint8_t>(kv_a[t + 1].begin() + 5 * row, kv_a[t + 1].begin() + 33 * row));
    {
      ChunkStore::Handle h = Acquire(store, a);  // disk -> pool
      EXPECT_EQ(h.source(), ChunkTier::Disk);
      EXPECT_EQ(bytes_of(h), kv_a);
    }
    {
      ChunkStore::Handle h = Acquire(store, b);  // host -> pool
      EXPECT_EQ(h.source(), ChunkTier::Host);
      EXPECT_EQ(bytes_of(h), kv_b);
    }
    EXPECT_EQ(store.stats().prefills, 3);
    EXPECT_EQ(store.stats().corrupt_files, 0);
  }
  EXPECT_GE(SpillFiles(dir_), 2);
  {  // An f32 store of the same model over the same directory: none of these files are its own.
    ChunkStore other(*model_, *pool_, Opts(1, 0, 64));
    EXPECT_EQ(other.stats().disk.entries, 0);
    EXPECT_EQ(other.stats().corrupt_files, 0);
  }
  EXPECT_GE(SpillFiles(dir_), 2) << "foreign files are left alone";
  {  // The FP8 store finds them again after a restart.
    ChunkStore again(*model_, fp8, o);
    ChunkStore::Handle h = Acquire(again, a);
    EXPECT_EQ(h.source(), ChunkTier::Disk);
    EXPECT_EQ(bytes_of(h), kv_a);
  }
  // The FP8 segment against the f32 prefill of the same tokens: e4m3 rounding of every row, plus
  // what FP8 attention in the lower layers changed in the higher layers' K/V.
  const SegKv f32 = Fresh(a);
  double worst = 0;
  for (size_t tb = 0; tb < f32.k.size(); ++tb)
    for (int kind = 0; kind < 2; ++kind) {
      const std::vector<float>& want = kind == 0 ? f32.k[tb] : f32.v[tb];
      Tensor packed = Tensor::host(DType::F8_E4M3, {kLen, row});
      std::memcpy(packed.raw(), kv_a[2 * tb + kind].data(), packed.nbytes());
      Tensor got = Tensor::host(DType::F32, {kLen, hd});
      backend_->unpack_fp8_kv_rows(packed, got);
      double num = 0, den = 0;
      for (int64_t i = 0; i < got.numel(); ++i) {
        num += std::pow(double(got.data<float>()[i]) - want[i], 2);
        den += std::pow(double(want[i]), 2);
      }
      worst = std::max(worst, std::sqrt(num / den));
    }
  std::printf("[ fp8 ] cached segment K/V vs f32 prefill: worst table rel err %.4f\n", worst);
  EXPECT_LE(worst, 0.1);
}

TEST_F(ChunkStoreTest, DiskTierSurvivesRestart) {
  const auto a = Seg(1), b = Seg(2);
  SegKv kv_a, kv_b;
  {
    ChunkStore store(*model_, *pool_, Opts(1, 0, 4));
    kv_a = FromHandle(Acquire(store, a));
    kv_b = FromHandle(Acquire(store, b));  // a -> disk; b stays in the pool
    EXPECT_EQ(store.stats().disk.entries, 1);
  }  // the destructor writes b too
  EXPECT_EQ(pool_->num_free(), pool_->num_pages());
  ChunkStore store(*model_, *pool_, Opts(1, 0, 4));
  ChunkStoreStats s = store.stats();
  EXPECT_EQ(s.disk.entries, 2);
  EXPECT_EQ(s.corrupt_files, 0);
  {
    ChunkStore::Handle h = Acquire(store, b);
    EXPECT_EQ(h.source(), ChunkTier::Disk);
    ExpectSame(FromHandle(h), kv_b);
  }
  {
    ChunkStore::Handle h = Acquire(store, a);
    EXPECT_EQ(h.source(), ChunkTier::Disk);
    ExpectSame(FromHandle(h), kv_a);
  }
  EXPECT_EQ(store.stats().prefills, 0);
  ExpectBudgets(store);
}

TEST_F(ChunkStoreTest, OtherModelsFilesAreLeftAlone) {
  {
    ChunkStoreOptions o = Opts(1, 0, 4);
    o.model_fp ^= 1;
    ChunkStore store(*model_, *pool_, o);
    ASSERT_TRUE(Acquire(store, Seg(1)).ok());
  }
  // Junk with the extension is removed and counted; a dead writer's old temp file is removed,
  // a recent one (a live writer's) is not.
  std::ofstream(dir_ / "junk.rkv") << "not a chunk file";
  const fs::path old_tmp = dir_ / "0123.rkv.tmp.1.0", new_tmp = dir_ / "0123.rkv.tmp.1.1";
  std::ofstream(old_tmp) << "x";
  std::ofstream(new_tmp) << "x";
  fs::last_write_time(old_tmp, fs::file_time_type::clock::now() - std::chrono::hours(1));
  ChunkStore store(*model_, *pool_, Opts(1, 0, 4));
  EXPECT_EQ(store.stats().disk.entries, 0);
  EXPECT_EQ(store.stats().corrupt_files, 1);
  EXPECT_FALSE(fs::exists(dir_ / "junk.rkv"));
  EXPECT_FALSE(fs::exists(old_tmp));
  EXPECT_TRUE(fs::exists(new_tmp));
  int files = 0;
  for (const auto& de : fs::directory_iterator(dir_)) files += de.path().extension() == ".rkv";
  EXPECT_EQ(files, 1);
  EXPECT_FALSE(Acquire(store, Seg(1)).hit());
}

TEST_F(ChunkStoreTest, CorruptFilesAreDetectedAndRecomputed) {
  const auto a = Seg(1), b = Seg(2), c = Seg(3), d = Seg(4);
  {
    ChunkStore store(*model_, *pool_, Opts(4, 0, 8));
    for (const auto& s : {a, b, c, d}) ASSERT_TRUE(Acquire(store, s).ok());
  }
  auto flip = [](const std::string& path, int64_t off) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(off);
    char ch;
    f.read(&ch, 1);
    ch ^= 0x10;
    f.seekp(off);
    f.write(&ch, 1);
  };
  flip(FileOf(a), seg_file_bytes() - 100);                      // payload byte
  fs::resize_file(FileOf(b), seg_file_bytes() - 7);             // truncated
  flip(FileOf(c), 60);                                          // a token id in the header
  flip(FileOf(d), seg_file_bytes() - seg_payload_bytes() + 3);  // first K block byte

  ChunkStore store(*model_, *pool_, Opts(4, 0, 8));
  // b and c fail at the startup scan (size, header checksum) and are deleted.
  EXPECT_EQ(store.stats().corrupt_files, 2);
  EXPECT_FALSE(fs::exists(FileOf(b)));
  EXPECT_FALSE(fs::exists(FileOf(c)));
  EXPECT_EQ(store.stats().disk.entries, 2);
  // a passes the header checks; its payload checksum fails at load: never served.
  for (const auto& s : {a, b, c}) {
    ChunkStore::Handle h = Acquire(store, s);
    ASSERT_TRUE(h.ok());
    EXPECT_FALSE(h.hit());
    ExpectSame(FromHandle(h), Fresh(s));
  }
  EXPECT_EQ(store.stats().corrupt_files, 3);
  EXPECT_EQ(store.stats().prefills, 3);
  EXPECT_EQ(store.stats().misses, 3);
  // d's first head block is bad: a one-head read says so, then the entry is gone.
  {
    ChunkStore::Handle h = store.lookup(d);
    ASSERT_EQ(h.tier(), ChunkTier::Disk);
    EXPECT_TRUE(store.read_head_rows(h, 1, 0, 0, 8).has_value());  // another block is fine
    EXPECT_FALSE(store.read_head_rows(h, 0, 0, 0, 8).has_value());
    EXPECT_EQ(store.stats().corrupt_files, 4);
  }
  EXPECT_FALSE(fs::exists(FileOf(d)));
  ChunkStore::Handle h = Acquire(store, d);
  ASSERT_TRUE(h.ok());
  EXPECT_FALSE(h.hit());
  ExpectSame(FromHandle(h), Fresh(d));
  ExpectBudgets(store);
}

// A miss the policy keeps out of the pool is still computed for the request that needs it (the
// engine attaches it like any entry), and dropped when the request lets go.
TEST_F(ChunkStoreTest, PrivateMissServesItsRequestOnly) {
  ChunkStore store(*model_, *pool_, Opts(2));
  const auto a = Seg(1), b = Seg(2), c = Seg(3);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(Acquire(store, a).ok());
    ASSERT_TRUE(Acquire(store, b).ok());
  }
  const int64_t free_before = pool_->num_free();
  EXPECT_FALSE(store.acquire(c).ok());
  ChunkStore::Pending p = store.reserve(c);
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE(p.admitted());
  ChunkStore::Handle h = prefill_pending(*model_, store, std::move(p));
  ASSERT_TRUE(h.ok());
  EXPECT_FALSE(h.hit());
  ExpectSame(FromHandle(h), Fresh(c));
  EXPECT_FALSE(store.cached(c));  // never indexed: nobody else finds it
  EXPECT_EQ(store.stats().private_prefills, 1);
  EXPECT_EQ(store.stats().evictions, 0);
  h.reset();
  EXPECT_EQ(pool_->num_free(), free_before);
  EXPECT_EQ(Acquire(store, a).source(), ChunkTier::Pool);
  ExpectBudgets(store);
}

// Two requests missing the same segment at once both prefill it; the store keeps one entry.
TEST_F(ChunkStoreTest, ConcurrentMissesOfOneSegmentKeepOneEntry) {
  ChunkStore store(*model_, *pool_, Opts(4));
  const auto a = Seg(5);
  EXPECT_FALSE(store.acquire(a).ok());
  EXPECT_FALSE(store.acquire(a).ok());
  ChunkStore::Pending p1 = store.reserve(a), p2 = store.reserve(a);
  ASSERT_TRUE(p1.admitted() && p2.admitted());
  ChunkStore::Handle h1 = prefill_pending(*model_, store, std::move(p1));
  ChunkStore::Handle h2 = prefill_pending(*model_, store, std::move(p2));
  ASSERT_TRUE(h1.ok() && h2.ok());
  ExpectSame(FromHandle(h2), FromHandle(h1));
  EXPECT_EQ(store.stats().prefills, 1);
  EXPECT_EQ(store.stats().private_prefills, 1);
  h2.reset();
  EXPECT_EQ(store.stats().pool.entries, 1);
  EXPECT_EQ(Acquire(store, a).source(), ChunkTier::Pool);
  h1.reset();
  ExpectBudgets(store);
}

// An abandoned reservation (the request was cancelled mid-prefill) frees its pages.
TEST_F(ChunkStoreTest, AbandonedReservationFreesItsPages) {
  ChunkStore store(*model_, *pool_, Opts(4));
  const int64_t free_before = pool_->num_free();
  {
    ChunkStore::Pending p = store.reserve(Seg(7));
    ASSERT_TRUE(p.admitted());
    Batch b;
    b.add_sequence(p.seq(), std::vector<int32_t>(p.tokens().begin(), p.tokens().begin() + 5), 0,
                   false);
    model_->forward(b, store.prefill_cache(), ForwardOptions{});
    EXPECT_LT(pool_->num_free(), free_before);
  }
  EXPECT_EQ(pool_->num_free(), free_before);
  EXPECT_FALSE(store.cached(Seg(7)));
  ExpectBudgets(store);
}

TEST_F(ChunkStoreTest, PinnedEntriesAreNeverEvicted) {
  ChunkStore store(*model_, *pool_, Opts(2));
  const auto a = Seg(1);
  ChunkStore::Handle ha = Acquire(store, a);
  const SegKv kv_a = FromHandle(ha);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(Acquire(store, Seg(100 + i)).ok());
  EXPECT_EQ(ha.tier(), ChunkTier::Pool);
  ExpectSame(FromHandle(ha), kv_a);
  // Everything pinned: no room, an empty handle (not an exception).
  ChunkStore::Handle hb = Acquire(store, Seg(200));
  ASSERT_TRUE(hb.ok());
  EXPECT_FALSE(Acquire(store, Seg(201)).ok());
  ha.reset();
  hb.reset();
  // The pool shared with requests is full: also no exception.
  std::vector<int32_t> taken;
  while (pool_->num_free() > 0) taken.push_back(pool_->allocate());
  ChunkStoreOptions o = Opts(4);
  ChunkStore other(*model_, *pool_, o);
  EXPECT_FALSE(Acquire(other, Seg(300)).ok());
  EXPECT_EQ(other.stats().bypasses, 1);
  for (int32_t p : taken) pool_->release(p);
  ExpectBudgets(store);
}

TEST_F(ChunkStoreTest, HashCollisionsNeverServeWrongKv) {
  for (bool write_through : {false, true}) {
    SCOPED_TRACE(write_through ? "write-through" : "spill on demotion");
    fs::remove_all(dir_);
    ChunkStoreOptions o = Opts(2, 1, 4);
    o.key_bits = 1;  // two keys: most segments collide
    o.write_through = write_through;
    ChunkStore store(*model_, *pool_, o);
    std::vector<std::vector<int32_t>> segs;
    for (int i = 0; i < 6; ++i) segs.push_back(Seg(i));
    for (int round = 0; round < 3; ++round)
      for (const auto& s : segs) {
        ChunkStore::Handle h = Acquire(store, s);
        if (!h.ok()) continue;
        EXPECT_EQ(h.tokens(), s);
        ExpectSame(FromHandle(h), Fresh(s));
      }
    store.sync_writes();
    EXPECT_GT(store.stats().collisions, 0);
    EXPECT_LE(store.stats().disk.entries, 2);  // one file name per key
    EXPECT_LE(SpillFiles(dir_), 2);
  }
}

// ---- write-through ----

// A crash (no destructor, no flush) after the writer caught up: a new store over what is on disk
// finds every published entry as a disk hit with the same K/V.
TEST_F(ChunkStoreTest, WriteThroughSurvivesACrash) {
  const fs::path crash_dir = dir_.string() + "_crash";
  fs::remove_all(crash_dir);
  std::vector<std::vector<int32_t>> segs = {Seg(1), Seg(2), Seg(3)};
  std::vector<SegKv> kv;
  for (bool write_through : {false, true}) {
    fs::remove_all(dir_);
    fs::remove_all(crash_dir);
    ChunkStoreOptions o = Opts(4, 0, 8);
    o.write_through = write_through;
    o.flush_on_destroy = false;
    ChunkStore store(*model_, *pool_, o);
    kv.clear();
    for (const auto& t : segs) kv.push_back(FromHandle(Acquire(store, t)));
    store.sync_writes();
    // What a kill -9 now would leave behind.
    fs::copy(dir_, crash_dir);
    const ChunkStoreStats s = store.stats();
    if (!write_through) {
      EXPECT_EQ(SpillFiles(crash_dir), 0);  // the old behaviour: all lost
      EXPECT_EQ(s.disk_writes, 0);
      continue;
    }
    EXPECT_EQ(SpillFiles(crash_dir), 3);
    EXPECT_EQ(s.disk_writes, 3);
    EXPECT_EQ(s.disk.entries, 3);
    EXPECT_EQ(s.pool.entries, 3);
    EXPECT_EQ(s.write_queue_bytes, 0);
    ExpectBudgets(store);
  }
  ChunkStoreOptions o = Opts(4, 0, 8);
  o.disk_dir = crash_dir.string();
  ChunkStore store(*model_, *pool_, o);
  EXPECT_EQ(store.stats().disk.entries, 3);
  EXPECT_EQ(store.stats().corrupt_files, 0);
  for (size_t i = 0; i < segs.size(); ++i) {
    ChunkStore::Handle h = Acquire(store, segs[i]);
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(h.source(), ChunkTier::Disk);
    ExpectSame(FromHandle(h), kv[i]);
  }
  EXPECT_EQ(store.stats().prefills, 0);
  fs::remove_all(crash_dir);
}

// The destructor drains the queue even without flush_on_destroy: queued writes are not dropped.
TEST_F(ChunkStoreTest, DestructorDrainsTheWriteQueue) {
  {
    ChunkStoreOptions o = Opts(8, 0, 8);
    o.write_through = true;
    o.flush_on_destroy = false;
    ChunkStore store(*model_, *pool_, o);
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(Acquire(store, Seg(i)).ok());
  }
  EXPECT_EQ(SpillFiles(dir_), 6);
  ChunkStore store(*model_, *pool_, Opts(8, 0, 8));
  EXPECT_EQ(store.stats().disk.entries, 6);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(Acquire(store, Seg(i)).source(), ChunkTier::Disk);
}

// A writer stuck on a slow disk: publish() neither blocks nor waits; the entries it could not
// queue are written later (persist_new(), or the next publish/acquire), hottest first.
TEST_F(ChunkStoreTest, FullWriteQueueDoesNotBlockPublish) {
  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> first{true};
  ChunkStoreOptions o = Opts(8, 0, 8);
  o.write_through = true;
  o.write_queue_bytes = 1;  // one entry at a time
  o.before_write = [&] {
    if (first.exchange(false)) entered.set_value();
    released.wait_for(std::chrono::seconds(30));  // a safety net, not the test's timing
  };
  ChunkStore store(*model_, *pool_, o);
  ASSERT_TRUE(Acquire(store, Seg(0)).ok());
  ASSERT_EQ(entered.get_future().wait_for(std::chrono::seconds(30)), std::future_status::ready);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 1; i < 5; ++i) ASSERT_TRUE(Acquire(store, Seg(i)).ok());
  EXPECT_EQ(store.persist_new(), 0);  // still full
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(secs, 10.0);
  ChunkStoreStats s = store.stats();
  EXPECT_EQ(s.write_deferrals, 4);
  EXPECT_EQ(s.disk_writes, 0);
  EXPECT_GT(s.write_queue_bytes, 0);
  EXPECT_EQ(s.pool.entries, 5);
  release.set_value();
  store.sync_writes();
  EXPECT_EQ(store.stats().disk_writes, 1);
  // Retries: one entry per call under this queue bound.
  for (int i = 0; i < 10 && store.stats().disk_writes < 5; ++i) {
    store.persist_new();
    store.sync_writes();
  }
  s = store.stats();
  EXPECT_EQ(s.disk_writes, 5);
  EXPECT_EQ(s.disk.entries, 5);
  EXPECT_EQ(s.write_queue_bytes, 0);
  ExpectBudgets(store);
}

// Entries the full queue skipped and that moved on to the host tier are written from there, and
// a host entry promoted back to the pool hands its serialization to the writer.
TEST_F(ChunkStoreTest, SkippedEntriesAreWrittenFromTheHostTier) {
  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> first{true};
  const auto x = Seg(1), a = Seg(2), b = Seg(3);
  std::vector<SegKv> kv(3);
  {
    ChunkStoreOptions o = Opts(1, 2, 8);
    o.write_through = true;
    o.write_queue_bytes = 1;
    o.flush_on_destroy = false;
    o.before_write = [&] {
      if (first.exchange(false)) {
        entered.set_value();
        released.wait_for(std::chrono::seconds(30));
      }
    };
    ChunkStore store(*model_, *pool_, o);
    kv[0] = FromHandle(Acquire(store, x));
    ASSERT_EQ(entered.get_future().wait_for(std::chrono::seconds(30)), std::future_status::ready);
    kv[1] = FromHandle(Acquire(store, a));  // x -> host; a's write is deferred
    kv[2] = FromHandle(Acquire(store, b));  // a -> host; b's write is deferred
    EXPECT_EQ(store.stats().write_deferrals, 2);
    EXPECT_EQ(store.stats().host.entries, 2);
    release.set_value();
    store.sync_writes();
    EXPECT_EQ(store.stats().disk_writes, 1);
    {
      ChunkStore::Handle h = Acquire(store, a);  // host -> pool, its blob goes to the writer
      ASSERT_TRUE(h.ok());
      EXPECT_EQ(h.source(), ChunkTier::Host);
    }
    store.sync_writes();
    EXPECT_TRUE(fs::exists(FileOf(a)));
    EXPECT_GE(store.stats().disk_writes, 2);  // b too, if the writer was quick enough
    for (int i = 0; i < 5 && store.stats().disk_writes < 3; ++i) {
      store.persist_new();
      store.sync_writes();
    }
    EXPECT_EQ(store.stats().disk_writes, 3);
    ExpectBudgets(store);
  }
  ChunkStore store(*model_, *pool_, Opts(4, 0, 8));
  EXPECT_EQ(store.stats().disk.entries, 3);
  int i = 0;
  for (const auto& t : {x, a, b}) {
    ChunkStore::Handle h = Acquire(store, t);
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(h.source(), ChunkTier::Disk);
    ExpectSame(FromHandle(h), kv[i++]);
  }
}

// An entry demoted to disk while its write-through is still queued is written once, right there
// (the engine runs that queued job itself rather than waiting for the writer's backlog).
TEST_F(ChunkStoreTest, DemotionOfAQueuedEntryWritesItOnce) {
  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> first{true};
  ChunkStoreOptions o = Opts(2, 0, 8);
  o.write_through = true;
  o.before_write = [&] {
    if (first.exchange(false)) {
      entered.set_value();
      released.wait_for(std::chrono::seconds(30));
    }
  };
  ChunkStore store(*model_, *pool_, o);
  const auto x = Seg(1), a = Seg(2), b = Seg(3);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(Acquire(store, x).ok());  // hot: not the victim
  ASSERT_EQ(entered.get_future().wait_for(std::chrono::seconds(30)), std::future_status::ready);
  SegKv kv_a = FromHandle(Acquire(store, a));  // queued behind x's stuck write
  ASSERT_TRUE(Acquire(store, b).ok());         // a -> disk
  {
    ChunkStore::Handle h = store.lookup(a);
    ASSERT_EQ(h.tier(), ChunkTier::Disk);
  }
  EXPECT_EQ(store.stats().demotions_to_disk, 1);
  EXPECT_TRUE(fs::exists(FileOf(a)));
  release.set_value();
  store.sync_writes();
  const ChunkStoreStats s = store.stats();
  EXPECT_EQ(s.disk.entries, 3);
  EXPECT_EQ(s.write_errors, 0);
  ExpectBudgets(store);
  ChunkStore::Handle h = Acquire(store, a);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h.source(), ChunkTier::Disk);
  ExpectSame(FromHandle(h), kv_a);
}

// The randomized tier mix of BudgetsRespectedInEveryTier with write-through: the books (disk
// bytes, files, budgets) agree once the writer caught up, and every hit is exact.
TEST_F(ChunkStoreTest, BudgetsRespectedWithWriteThrough) {
  ChunkStoreOptions o = Opts(3, 4, 5);
  o.write_through = true;
  ChunkStore store(*model_, *pool_, o);
  std::mt19937 rng(42);
  for (int i = 0; i < 60; ++i) {
    const int id = (rng() % 3 == 0) ? static_cast<int>(rng() % 4) : 100 + i;
    ChunkStore::Handle h = Acquire(store, Seg(id));
    if (h.hit()) ExpectSame(FromHandle(h), Fresh(Seg(id)));
    if (i % 7 == 0) {
      store.sync_writes();
      ExpectBudgets(store);
    }
  }
  store.sync_writes();
  ExpectBudgets(store);
  const ChunkStoreStats s = store.stats();
  EXPECT_GT(s.disk_writes, 0);
  EXPECT_GT(s.evictions, 0);
  EXPECT_EQ(s.write_errors, 0);
  EXPECT_EQ(s.corrupt_files, 0);
}

// Every disk-tier problem is one line on stderr naming the file and what was wrong; a flood is
// cut at log_lines_per_minute and summed up.
TEST_F(ChunkStoreTest, CorruptFilesAreLogged) {
  const auto a = Seg(1);
  {
    ChunkStore store(*model_, *pool_, Opts(4, 0, 8));
    ASSERT_TRUE(Acquire(store, a).ok());
  }
  {
    std::fstream f(FileOf(a), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(seg_file_bytes() - 100);
    f.put('\x7f');
  }
  std::ofstream(dir_ / "junk.rkv") << "not a chunk file";
  ::testing::internal::CaptureStderr();
  {
    ChunkStore store(*model_, *pool_, Opts(4, 0, 8));
    EXPECT_EQ(store.stats().corrupt_files, 1);
    EXPECT_FALSE(Acquire(store, a).hit());  // the payload checksum fails at load
    EXPECT_EQ(store.stats().corrupt_files, 2);
  }
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find((dir_ / "junk.rkv").string() + ": corrupt spill file, deleted: bad header"),
            std::string::npos)
      << err;
  EXPECT_NE(err.find(FileOf(a) + ": corrupt spill file, deleted: checksum mismatch in block"),
            std::string::npos)
      << err;

  for (int i = 0; i < 15; ++i) std::ofstream(dir_ / ("junk" + std::to_string(i) + ".rkv")) << "x";
  ChunkStoreOptions o = Opts(4, 0, 8);
  o.log_lines_per_minute = 3;
  ::testing::internal::CaptureStderr();
  {
    ChunkStore store(*model_, *pool_, o);
    EXPECT_EQ(store.stats().corrupt_files, 15);
  }
  err = ::testing::internal::GetCapturedStderr();
  int lines = 0;
  for (size_t p = 0; (p = err.find("corrupt spill file", p)) != std::string::npos; ++p) ++lines;
  EXPECT_EQ(lines, 3) << err;
  EXPECT_NE(err.find("12 more disk-tier problems"), std::string::npos) << err;
}

// A write that fails (here: the directory vanished) is logged and counted; the entry keeps
// serving from memory and publish() is unaffected.
TEST_F(ChunkStoreTest, FailedWritesAreLoggedAndCounted) {
  ChunkStoreOptions o = Opts(4, 0, 8);
  o.write_through = true;
  o.flush_on_destroy = false;
  ChunkStore store(*model_, *pool_, o);
  fs::remove_all(dir_);
  ::testing::internal::CaptureStderr();
  ChunkStore::Handle h = Acquire(store, Seg(1));
  ASSERT_TRUE(h.ok());
  store.sync_writes();
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find(FileOf(Seg(1)) + ": cannot create "), std::string::npos) << err;
  const ChunkStoreStats s = store.stats();
  EXPECT_EQ(s.write_errors, 1);
  EXPECT_EQ(s.disk_writes, 0);
  EXPECT_EQ(s.disk.entries, 0);
  EXPECT_EQ(s.disk.bytes, 0);
  EXPECT_EQ(h.tier(), ChunkTier::Pool);
  ExpectSame(FromHandle(h), Fresh(Seg(1)));
}

TEST_F(ChunkStoreTest, PagesReturnedOnDestruction) {
  {
    ChunkStore store(*model_, *pool_, Opts(3, 2));
    for (int i = 0; i < 6; ++i) ASSERT_TRUE(Acquire(store, Seg(i)).ok());
    EXPECT_EQ(pool_->num_pages() - pool_->num_free(),
              3 * seg_pool_bytes() / pool_->bytes_per_page());
  }
  EXPECT_EQ(pool_->num_free(), pool_->num_pages());
}

}  // namespace
}  // namespace redknot
