// The chunk store's remote tier (issue #22) against a real redis-server that each test starts on
// a Unix socket in a temp dir (skipped, saying so, when redis-server is not installed), over a
// random tiny Llama on the CPU backend: two stores ("instances", same model, own pools) share
// one Redis; a segment prefilled by A is a remote hit on B whose logits equal A's local hit,
// exactly, in redknot mode (only sink ∪ window blocks of local heads fetched, the bytes asserted
// against the format) and naive mode (every row; a partial entry is refetched); corrupted,
// truncated and broken values are counted, deleted, logged and recomputed, never served; Redis
// killed mid-run gives counted misses, no crash, and hits again once it is back. Plus the URL
// parser and the in-memory fake's "down" switch (no Redis needed).
#include "reuse/remote_tier.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend/builtin.h"
#include "core/error.h"
#include "kv/head_profile.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "model/random_checkpoint.h"
#include "reuse/chunk_prefill.h"
#include "reuse/chunk_store.h"
#include "reuse/kv_handover.h"
#include "reuse/reuse_prefill.h"

namespace redknot {
namespace {
namespace fs = std::filesystem;

constexpr int32_t kPageSize = 16;
constexpr int32_t kLayers = 5, kKvHeads = 4;  // 20 heads: 3 global = 15%
constexpr int32_t kWindow = 512, kSink = 4, kBlock = 64;

std::string find_redis_server() {
  for (const char* p : {"/usr/bin/redis-server", "/usr/local/bin/redis-server"})
    if (access(p, X_OK) == 0) return p;
  return "";
}

// A redis-server of this test only: Unix socket in a temp dir, no persistence.
class RedisProcess {
 public:
  explicit RedisProcess(fs::path dir) : dir_(std::move(dir)) {
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~RedisProcess() {
    stop();
    fs::remove_all(dir_);
  }
  std::string socket() const { return (dir_ / "redis.sock").string(); }
  std::string url() const { return "unix://" + socket(); }
  void start() {
    const std::string bin = find_redis_server(), sock = socket(), dir = dir_.string();
    pid_ = fork();
    if (pid_ == 0) {
      execl(bin.c_str(), bin.c_str(), "--port", "0", "--unixsocket", sock.c_str(),
            "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", dir.c_str(),
            "--logfile", (dir + "/redis.log").c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    ASSERT_GT(pid_, 0);
    RemoteKvOptions o;
    o.backoff_min_ms = 1;
    o.backoff_max_ms = 5;
    auto kv = make_redis_kv(url(), o);
    for (int i = 0; i < 500; ++i) {
      if (kv->exists("ping") != RemoteKv::Status::Error) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    FAIL() << "redis-server did not come up on " << sock;
  }
  void stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
    fs::remove(socket());
  }

 private:
  fs::path dir_;
  pid_t pid_ = -1;
};

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

class RemoteTierTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    register_builtin_backends();
    backend_ = create_backend("cpu").release();
    cfg_ = new ModelConfig(preset_config("tiny"));
    cfg_->num_layers = kLayers;
    cfg_->num_kv_heads = kKvHeads;
    cfg_->max_position_embeddings = 8192;
    ckpt_ = new Checkpoint(random_checkpoint(*cfg_, DType::F32, 21));
    model_ = new Model(*ckpt_, *backend_);
  }
  static void TearDownTestSuite() {
    delete model_;
    delete ckpt_;
    delete cfg_;
    delete backend_;
  }

  void SetUp() override {
    if (find_redis_server().empty())
      GTEST_SKIP() << "redis-server is not installed (apt-get install redis-server): the remote "
                      "tier's Redis tests did not run";
    if (!redis_kv_available())
      GTEST_SKIP() << "built without hiredis (REDKNOT_REDIS=OFF): the Redis tests did not run";
    redis_ = std::make_unique<RedisProcess>(
        fs::path(::testing::TempDir()) /
        ("rk_redis_" +
         std::string(::testing::UnitTest::GetInstance()->current_test_info()->name())));
    redis_->start();
  }

  // One "instance": its own pool and store over the shared model and Redis.
  struct Instance {
    std::unique_ptr<PagePool> pool;
    std::unique_ptr<ChunkStore> store;
  };
  Instance Make(int32_t admit = 1) {
    Instance in;
    in.pool = std::make_unique<PagePool>(*backend_, 16384, kPageSize,
                                         static_cast<int32_t>(cfg_->head_dim));
    ChunkStoreOptions o;
    o.pool_budget_bytes = int64_t{8192} * in.pool->bytes_per_page();
    o.model_fp = model_fingerprint(*cfg_, *ckpt_);
    o.remote_admit = admit;
    o.remote_block_rows = kBlock;
    o.log_lines_per_minute = 100;
    o.remote = [url = redis_->url()] {
      RemoteKvOptions ro;
      ro.backoff_min_ms = 5;  // reconnects within the test
      ro.backoff_max_ms = 20;
      return make_redis_kv(url, ro);
    };
    in.store = std::make_unique<ChunkStore>(*model_, *in.pool, o);
    return in;
  }

  // 15% of the heads global (3 of 20), the rest local with window W and sink.
  static HeadProfile Profile() {
    HeadProfile p(kLayers, kKvHeads);
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKvHeads; ++h) p.at(l, h) = {HeadClass::Local, kWindow, kSink};
    for (auto [l, h] : {std::pair{0, 1}, {2, 3}, {4, 0}}) p.at(l, h).cls = HeadClass::Global;
    return p;
  }

  static std::vector<int32_t> Ids(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> v(n);
    for (auto& t : v) t = static_cast<int32_t>(rng() % cfg_->vocab_size);
    return v;
  }
  static SegmentedPrompt Prompt(int s0_len, uint32_t seed) {
    SegmentedPrompt p;
    p.segments.push_back(Ids(s0_len, seed));
    p.segments[0][0] = static_cast<int32_t>(cfg_->bos_token_id);
    p.segments.push_back(Ids(48, seed + 1));
    p.segments.push_back(Ids(40, seed + 2));
    p.query = Ids(10, seed + 3);
    return p;
  }

  // A reuse prefill of `p` on `in`, then 3 greedy steps: every logit row it produced.
  std::vector<std::vector<float>> Run(Instance& in, const SegmentedPrompt& p, ReuseMode mode) {
    const bool redknot = mode == ReuseMode::RedKnot;
    PagedKvCache kv(*in.pool, redknot ? Profile() : HeadProfile(kLayers, kKvHeads),
                    PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg_->head_dim))},
                    model_->inv_freq());
    ReuseOptions ro;
    ro.mode = mode;
    ro.sparse_ffn_enabled = false;
    PrefillOutcome out = prefill_with_reuse(*model_, kv, 0, p, in.store.get(), ro);
    std::vector<std::vector<float>> rows{out.last_logits};
    for (int i = 0; i < 3; ++i) {
      Batch b;
      b.add_sequence(0, {Argmax(rows.back())}, kv.next_position(0));
      Tensor t = model_->forward(b, kv);
      rows.emplace_back(t.data<float>(), t.data<float>() + t.numel());
    }
    kv.remove_sequence(0);
    return rows;
  }

  std::string Prefix(const std::vector<int32_t>& tokens) const {
    char buf[64];
    const uint64_t fp = model_fingerprint(*cfg_, *ckpt_);
    std::snprintf(buf, sizeof(buf), "rk:%016llx:%016llx", static_cast<unsigned long long>(fp),
                  static_cast<unsigned long long>(segment_key(fp, tokens)));
    return buf;
  }
  std::unique_ptr<RemoteKv> Raw() const { return make_redis_kv(redis_->url()); }

  static Backend* backend_;
  static ModelConfig* cfg_;
  static Checkpoint* ckpt_;
  static Model* model_;
  std::unique_ptr<RedisProcess> redis_;
};

Backend* RemoteTierTest::backend_ = nullptr;
ModelConfig* RemoteTierTest::cfg_ = nullptr;
Checkpoint* RemoteTierTest::ckpt_ = nullptr;
Model* RemoteTierTest::model_ = nullptr;

TEST_F(RemoteTierTest, RemoteHitEqualsLocalHitAndFetchesOnlyKeptBlocks) {
  constexpr int32_t kLen = 4096;
  Instance a = Make(), b = Make();
  const SegmentedPrompt p = Prompt(kLen, 7);
  Run(a, p, ReuseMode::RedKnot);  // A prefills S0 and writes it to Redis
  a.store->sync_writes();
  ASSERT_EQ(a.store->stats().remote_writes, 1);
  const auto local = Run(a, p, ReuseMode::RedKnot);  // A: local hit
  EXPECT_EQ(a.store->stats().pool_hits, 1);

  const auto remote = Run(b, p, ReuseMode::RedKnot);  // B: remote hit, partial
  const ChunkStoreStats s = b.store->stats();
  EXPECT_EQ(s.remote_hits, 1);
  EXPECT_EQ(s.remote_partial_hits, 1);
  EXPECT_EQ(s.misses, 0);
  EXPECT_EQ(s.prefills, 0);
  ASSERT_EQ(remote.size(), local.size());
  for (size_t i = 0; i < local.size(); ++i) EXPECT_EQ(remote[i], local[i]) << "logits row " << i;

  // Bytes: global heads whole, local heads block 0 (sink) and the blocks of the last W - 1 rows.
  const int64_t rb = int64_t{cfg_->head_dim} * 4, nb = kLen / kBlock;
  const int64_t local_blocks = 1 + (nb - (kLen - kWindow + 1) / kBlock);
  const int64_t manifest = 56 + 4 * kLen + 8 * kLayers * kKvHeads * nb + 8;
  const int64_t want = 3 * 2 * kLen * rb + 17 * local_blocks * 2 * kBlock * rb + manifest;
  const int64_t token_major = int64_t{kLayers} * kKvHeads * 2 * kLen * rb;
  EXPECT_EQ(s.remote_bytes_read, want);
  const double ratio = double(s.remote_bytes_read) / double(token_major);
  EXPECT_LT(ratio, 0.28);  // 0.15 + 0.85 * 9/64 blocks, plus the manifest
  std::printf("remote fetch at %d tokens: %lld bytes, token-major %lld: %.3f\n", kLen,
              static_cast<long long>(s.remote_bytes_read), static_cast<long long>(token_major),
              ratio);
  EXPECT_EQ(b.store->stats().remote_bytes_written, 0);  // a remote entry is not sent back

  // Naive mode needs every row: the partial entry is fetched again, whole.
  const auto naive_local = Run(a, p, ReuseMode::Naive);
  a.store->sync_writes();
  const auto naive_remote = Run(b, p, ReuseMode::Naive);
  const ChunkStoreStats s2 = b.store->stats();
  EXPECT_EQ(s2.remote_hits, 4);  // S0 again (whole), S1 and S2 (A wrote them in naive mode)
  EXPECT_EQ(s2.remote_partial_hits, 1);
  EXPECT_EQ(s2.prefills, 0);
  for (size_t i = 0; i < naive_local.size(); ++i)
    EXPECT_EQ(naive_remote[i], naive_local[i]) << "naive logits row " << i;
  // A pool hit now serves redknot too (a whole entry covers every need).
  const auto again = Run(b, p, ReuseMode::RedKnot);
  EXPECT_EQ(b.store->stats().remote_hits, 4);
  for (size_t i = 0; i < local.size(); ++i) EXPECT_EQ(again[i], local[i]);
}

TEST_F(RemoteTierTest, AdmissionWaitsForTheThresholdOfAccesses) {
  Instance a = Make(/*admit=*/2);
  const SegmentedPrompt p = Prompt(200, 9);
  Run(a, p, ReuseMode::RedKnot);
  a.store->sync_writes();
  EXPECT_EQ(a.store->stats().remote_writes, 0);  // one access: not shared yet
  EXPECT_EQ(Raw()->exists(Prefix(p.segments[0]) + ":m"), RemoteKv::Status::Missing);
  Run(a, p, ReuseMode::RedKnot);  // second access: a pool hit, now written
  a.store->sync_writes();
  EXPECT_EQ(a.store->stats().remote_writes, 1);
  EXPECT_EQ(Raw()->exists(Prefix(p.segments[0]) + ":m"), RemoteKv::Status::Ok);
}

TEST_F(RemoteTierTest, CorruptTruncatedAndBrokenValuesAreRecomputedNeverServed) {
  Instance a = Make();
  const SegmentedPrompt p = Prompt(600, 11);
  Run(a, p, ReuseMode::Naive);  // every segment written, whole
  a.store->sync_writes();
  const auto fresh = Run(a, p, ReuseMode::Naive);  // local hits: the answer to match
  const std::string pre = Prefix(p.segments[0]);
  auto raw = Raw();
  // Every key of S0, to restore between the cases (a corrupt value's keys are all deleted).
  std::vector<std::pair<std::string, std::string>> good;
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h)
      good.emplace_back(pre + ":" + std::to_string(l) + ":" + std::to_string(h), "");
  good.emplace_back(pre + ":m", "");
  for (auto& [k, v] : good) ASSERT_EQ(raw->get(k, &v), RemoteKv::Status::Ok) << k;
  const std::string good_shard = good[2 * kKvHeads + 3].second, good_manifest = good.back().second;

  struct Case {
    const char* what;
    std::string key, value;
  };
  std::string flipped = good_shard, truncated = good_shard.substr(0, good_shard.size() / 2),
              broken = good_manifest;
  flipped[good_shard.size() - 5] ^= 0x40;
  broken[70] ^= 0x01;  // a token id: the manifest's own checksum catches it
  for (const Case& c : {Case{"flipped byte in a shard", pre + ":2:3", flipped},
                        Case{"truncated shard", pre + ":2:3", truncated},
                        Case{"broken manifest", pre + ":m", broken}}) {
    SCOPED_TRACE(c.what);
    // Restore the good values, then damage one key.
    ASSERT_EQ(raw->put_many(good), RemoteKv::Status::Ok);
    std::vector<std::pair<std::string, std::string>> bad{{c.key, c.value}};
    ASSERT_EQ(raw->put_many(bad), RemoteKv::Status::Ok);
    Instance b = Make(/*admit=*/2);  // B does not write its recomputed S0 back
    testing::internal::CaptureStderr();
    const auto got = Run(b, p, ReuseMode::Naive);
    const std::string log = testing::internal::GetCapturedStderr();
    const ChunkStoreStats s = b.store->stats();
    EXPECT_EQ(s.remote_corrupt, 1);
    EXPECT_EQ(s.remote_hits, 2);  // S1, S2
    EXPECT_EQ(s.prefills, 1);     // S0 recomputed
    EXPECT_NE(log.find("corrupt remote value, deleted"), std::string::npos) << log;
    EXPECT_EQ(raw->exists(pre + ":m"), RemoteKv::Status::Missing);  // its keys deleted
    EXPECT_EQ(raw->exists(pre + ":2:3"), RemoteKv::Status::Missing);
    for (size_t i = 0; i < fresh.size(); ++i) EXPECT_EQ(got[i], fresh[i]) << "logits row " << i;
  }
  // A shard Redis dropped (maxmemory): a counted miss, not corruption.
  ASSERT_EQ(raw->put_many(good), RemoteKv::Status::Ok);
  std::vector<std::string> gone{pre + ":1:1"};
  ASSERT_EQ(raw->del(gone), RemoteKv::Status::Ok);
  Instance c = Make();
  const auto got = Run(c, p, ReuseMode::Naive);
  EXPECT_EQ(c.store->stats().remote_missing_shards, 1);
  EXPECT_EQ(c.store->stats().remote_corrupt, 0);
  for (size_t i = 0; i < fresh.size(); ++i) EXPECT_EQ(got[i], fresh[i]);
}

TEST_F(RemoteTierTest, RedisGoneIsMissesThenHitsAgainOnceBack) {
  Instance a = Make(), b = Make();
  const SegmentedPrompt p1 = Prompt(300, 21), p2 = Prompt(300, 31), p3 = Prompt(300, 41);
  Run(a, p1, ReuseMode::Naive);
  a.store->sync_writes();
  redis_->stop();                                    // mid-run
  const auto fresh2 = Run(a, p2, ReuseMode::Naive);  // A's writes fail: counted, no crash
  a.store->sync_writes();
  EXPECT_GT(a.store->stats().remote_errors, 0);
  const auto got2 = Run(b, p2, ReuseMode::Naive);  // B: misses, recomputed
  ChunkStoreStats s = b.store->stats();
  EXPECT_GT(s.remote_errors, 0);
  EXPECT_EQ(s.remote_hits, 0);
  EXPECT_EQ(s.prefills, 3);
  EXPECT_EQ(got2, fresh2);

  redis_->start();  // empty (no persistence): A shares p3 again
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // past the client's backoff
  const auto fresh3 = Run(a, p3, ReuseMode::Naive);
  a.store->sync_writes();
  EXPECT_EQ(a.store->stats().remote_writes, 3 + 3);
  const auto got3 = Run(b, p3, ReuseMode::Naive);
  EXPECT_EQ(b.store->stats().remote_hits, 3);
  EXPECT_EQ(got3, fresh3);
}

TEST_F(RemoteTierTest, PrefillDecodeHandoverMovesOnlyKeptRows) {
  Instance a = Make(), b = Make();
  const uint64_t fp = model_fingerprint(*cfg_, *ckpt_);
  const PagedKvOptions po{1.0f / std::sqrt(static_cast<float>(cfg_->head_dim))};
  constexpr int32_t kTokens = 2048;
  const std::vector<int32_t> prompt = Ids(kTokens, 77);
  PagedKvCache ka(*a.pool, Profile(), po, model_->inv_freq());
  ka.add_sequence(0);
  std::vector<float> logits;
  for (int32_t s = 0; s < kTokens; s += 512) {  // A: the prefill, in chunks
    Batch batch;
    batch.add_sequence(0, std::vector<int32_t>(prompt.begin() + s, prompt.begin() + s + 512), s,
                       s + 512 == kTokens);
    Tensor t = model_->forward(batch, ka);
    logits.assign(t.data<float>(), t.data<float>() + t.numel());
  }
  auto remote = Raw();
  std::string err;
  const auto sent = export_kv(ka, 0, prompt, Argmax(logits), *remote, fp, "req-1", &err);
  ASSERT_TRUE(sent) << err;
  const KvUsage u = ka.usage(0);
  EXPECT_EQ(sent->rows, u.global_tokens + u.local_tokens);  // what A holds, no more
  EXPECT_EQ(sent->token_major_bytes,
            int64_t{kTokens} * kLayers * kKvHeads * 2 * cfg_->head_dim * 4);
  // Per held row: its position and K, V; plus the manifest. Local heads hold sink + window of the
  // 2048 rows: about 0.15 + 0.85 * 516 / 2048 of the rows (0.36), and 4 bytes more per row.
  const int64_t rb = int64_t{cfg_->head_dim} * 4;
  EXPECT_EQ(sent->bytes,
            sent->rows * (4 + 2 * rb) + 48 + 8 * kTokens + 24 * kLayers * kKvHeads + 8);
  // (Local heads are trimmed a page at a time: up to a page more on each side of the window.)
  EXPECT_LE(sent->rows, 3 * kTokens + 17 * (kSink + kWindow + 2 * kPageSize));
  std::printf("PD handover at %d tokens: %lld bytes head-major, %lld token-major (%.3f)\n", kTokens,
              static_cast<long long>(sent->bytes), static_cast<long long>(sent->token_major_bytes),
              double(sent->bytes) / double(sent->token_major_bytes));

  PagedKvCache kb(*b.pool, Profile(), po, model_->inv_freq());  // B: imports, then decodes
  kb.add_sequence(0);
  std::vector<int32_t> other = prompt;
  other[5] ^= 1;
  EXPECT_FALSE(import_kv(kb, 0, other, *remote, fp, "req-1", &err));  // another prompt
  EXPECT_NE(err.find("another prompt"), std::string::npos) << err;
  const auto got = import_kv(kb, 0, prompt, *remote, fp, "req-1", &err);
  ASSERT_TRUE(got) << err;
  EXPECT_EQ(got->bytes, sent->bytes);
  EXPECT_EQ(got->first_token, Argmax(logits));
  EXPECT_EQ(kb.next_position(0), kTokens);
  std::vector<float> la = logits, lb = logits;
  for (int i = 0; i < 4; ++i) {
    const int32_t next = Argmax(la);
    for (auto [kv, out] : {std::pair{&ka, &la}, std::pair{&kb, &lb}}) {
      Batch batch;
      batch.add_sequence(0, {next}, kv->next_position(0));
      Tensor t = model_->forward(batch, *kv);
      out->assign(t.data<float>(), t.data<float>() + t.numel());
    }
    ASSERT_EQ(lb, la) << "decode step " << i;
  }

  // A damaged shard is refused (the importer would prefill instead), the sequence left empty.
  std::string shard;
  const std::string key = "rk:pd:" + Prefix(prompt).substr(3, 16) + ":req-1:1:2";
  ASSERT_EQ(remote->get(key, &shard), RemoteKv::Status::Ok) << key;
  shard[shard.size() / 2] ^= 0x10;
  std::vector<std::pair<std::string, std::string>> bad{{key, shard}};
  ASSERT_EQ(remote->put_many(bad), RemoteKv::Status::Ok);
  PagedKvCache kc(*b.pool, Profile(), po, model_->inv_freq());
  kc.add_sequence(0);
  EXPECT_FALSE(import_kv(kc, 0, prompt, *remote, fp, "req-1", &err));
  EXPECT_NE(err.find("corrupt"), std::string::npos) << err;
  EXPECT_EQ(kc.next_position(0), 0);
  EXPECT_FALSE(import_kv(kc, 0, prompt, *remote, fp, "no-such-handle", &err));
}

TEST(RemoteKvUrl, FormsAcceptedAndRefused) {
  EXPECT_EQ(check_redis_url("redis://127.0.0.1:6379"), "");
  EXPECT_EQ(check_redis_url("redis://localhost"), "");
  EXPECT_EQ(check_redis_url("unix:///tmp/r.sock"), "");
  EXPECT_NE(check_redis_url("http://x:1"), "");
  EXPECT_NE(check_redis_url("redis://:6379"), "");
  EXPECT_NE(check_redis_url("redis://h:99999"), "");
  EXPECT_NE(check_redis_url("redis://h:abc"), "");
  EXPECT_NE(check_redis_url("redis://user:pw@h:1"), "");
  EXPECT_NE(check_redis_url("unix://relative.sock"), "");
  EXPECT_THROW(make_redis_kv("nope://"), Error);
}

TEST(RemoteKvMemory, DownIsAnErrorNeverAThrow) {
  auto shared = std::make_shared<MemoryRemoteKv::Shared>();
  MemoryRemoteKv kv(shared);
  std::vector<std::pair<std::string, std::string>> put{{"k", "0123456789"}};
  ASSERT_EQ(kv.put_many(put), RemoteKv::Status::Ok);
  std::vector<RemoteKv::Range> r{{"k", 2, 3}, {"k", 8, 5}, {"missing", 0, 4}};
  std::vector<std::string> out;
  ASSERT_EQ(kv.get_ranges(r, &out), RemoteKv::Status::Ok);
  EXPECT_EQ(out, (std::vector<std::string>{"234", "89", ""}));
  shared->down = true;
  std::string v;
  EXPECT_EQ(kv.get("k", &v), RemoteKv::Status::Error);
  EXPECT_EQ(kv.get_ranges(r, &out), RemoteKv::Status::Error);
}

}  // namespace
}  // namespace redknot
