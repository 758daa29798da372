#include "remote_bench.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <thread>

#include "backend/builtin.h"
#include "core/error.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "kv_bench.h"
#include "model/random_checkpoint.h"
#include "reuse/chunk_store.h"
#include "reuse/kv_handover.h"
#include "reuse/remote_tier.h"
#include "reuse/reuse_prefill.h"

namespace redknot::bench {
namespace {
namespace fs = std::filesystem;

// A redis-server for this run only (Unix socket, no persistence), killed at the end.
struct PrivateRedis {
  pid_t pid = -1;
  fs::path dir;
  std::string url;
  PrivateRedis() {
    const std::string bin = "/usr/bin/redis-server";
    if (access(bin.c_str(), X_OK) != 0)
      throw Error("redis-server not found (apt-get install redis-server) and no --redis given");
    dir = fs::temp_directory_path() / ("rk_remote_bench_" + std::to_string(getpid()));
    fs::create_directories(dir);
    const std::string sock = (dir / "redis.sock").string(), d = dir.string();
    url = "unix://" + sock;
    pid = fork();
    if (pid == 0) {
      execl(bin.c_str(), bin.c_str(), "--port", "0", "--unixsocket", sock.c_str(), "--save", "",
            "--appendonly", "no", "--dir", d.c_str(), "--logfile", (d + "/redis.log").c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
    auto kv = make_redis_kv(url);
    for (int i = 0; i < 500; ++i) {
      if (kv->exists("ping") != RemoteKv::Status::Error) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    throw Error("the private redis-server did not start");
  }
  ~PrivateRedis() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

std::string hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

struct Instance {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<ChunkStore> store;
};

}  // namespace

int run_remote_bench(const RemoteBenchArgs& a) {
  register_builtin_backends();
  ModelConfig cfg = preset_config(a.shape);
  if (a.layers > 0) cfg.num_layers = a.layers;
  const int64_t max_t = *std::max_element(a.tokens.begin(), a.tokens.end());
  cfg.max_position_embeddings = std::max<int64_t>(cfg.max_position_embeddings, max_t + 1024);
  Checkpoint ck = random_checkpoint(cfg, DType::F32, 1234);
  auto backend = create_backend("cpu");
  Model model(ck, *backend);
  std::unique_ptr<PrivateRedis> own;
  std::string url = a.redis;
  if (url.empty()) {
    own = std::make_unique<PrivateRedis>();
    url = own->url;
  }
  const int32_t L = static_cast<int32_t>(cfg.num_layers),
                H = static_cast<int32_t>(cfg.num_kv_heads);
  const HeadProfile prof = spread_profile(L, H, a.global_fraction, a.window, a.sink);
  int32_t globals = 0;
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) globals += prof.at(l, h).cls == HeadClass::Global;
  std::printf(
      "# redknot bench chunk-store-remote: shape %s (%d layers x %d kv heads, head_dim %lld), "
      "random f32 weights, CPU backend, %u hardware threads; profile %d/%d heads global "
      "(%.1f%%), W=%d, sink %d; shard blocks of %d rows; Redis %s\n",
      a.shape.c_str(), L, H, (long long)cfg.head_dim, std::thread::hardware_concurrency(), globals,
      L * H, 100.0 * globals / (L * H), a.window, a.sink, a.block_rows, url.c_str());
  std::printf(
      "| doc tokens | recompute TTFT ms | local hit TTFT ms | remote hit TTFT ms | "
      "remote hit bytes (head-major) | token-major bytes | ratio | full-fetch bytes | "
      "PD handover bytes (head-major) | PD token-major bytes | PD ratio | PD import ms |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  const uint64_t fp = model_fingerprint(cfg, ck);
  const int32_t page = 64;
  for (int64_t T : a.tokens) {
    // Pages: the cached segment and one request's copy of it, with room to spare.
    const int64_t seg_pages = int64_t{L} * H * ((T + a.query_tokens + page) / page + 1);
    auto make = [&] {
      Instance in;
      in.pool = std::make_unique<PagePool>(*backend, 2 * seg_pages + 64, page,
                                           static_cast<int32_t>(cfg.head_dim));
      ChunkStoreOptions o;
      o.pool_budget_bytes = (seg_pages + 32) * in.pool->bytes_per_page();
      o.model_fp = fp;
      o.remote_block_rows = a.block_rows;
      o.remote_queue_bytes = int64_t{8} << 30;
      o.remote = [url] { return make_redis_kv(url); };
      in.store = std::make_unique<ChunkStore>(model, *in.pool, o);
      return in;
    };
    double recompute = 0, local = 0, remote = 0, pd_import_ms = 0;
    int64_t rbytes = 0, full_bytes = 0, pd_bytes = 0, pd_token_major = 0;
    for (int r = 0; r < a.repeats; ++r) {
      std::mt19937 rng(static_cast<uint32_t>(1000 * T + r));
      SegmentedPrompt p;
      p.segments.emplace_back(T);
      for (auto& t : p.segments[0]) t = static_cast<int32_t>(rng() % cfg.vocab_size);
      p.query.resize(a.query_tokens);
      for (auto& t : p.query) t = static_cast<int32_t>(rng() % cfg.vocab_size);
      // The prompt's KV after the prefill, handed over to a decode instance (PD transfer).
      auto handover = [&](PagedKvCache& kv) {
        auto remote = make_redis_kv(url);
        const std::string handle = "bench-" + std::to_string(T) + "-" + std::to_string(r);
        const std::vector<int32_t> prompt = p.flatten();
        const auto sent = export_kv(kv, 0, prompt, 0, *remote, fp, handle);
        if (!sent) throw Error("bench: PD export failed");
        Instance D = make();
        PagedKvCache dk(*D.pool, prof,
                        PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg.head_dim))},
                        model.inv_freq());
        dk.add_sequence(0);
        const auto t0 = std::chrono::steady_clock::now();
        const auto got = import_kv(dk, 0, prompt, *remote, fp, handle);
        pd_import_ms +=
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count();
        if (!got) throw Error("bench: PD import failed");
        pd_bytes = sent->bytes;
        pd_token_major = sent->token_major_bytes;
        dk.remove_sequence(0);
        std::vector<std::string> keys{"rk:pd:" + hex(fp) + ":" + handle + ":m"};
        for (int l = 0; l < L; ++l)
          for (int h = 0; h < H; ++h)
            keys.push_back("rk:pd:" + hex(fp) + ":" + handle + ":" + std::to_string(l) + ":" +
                           std::to_string(h));
        remote->del(keys);
      };
      auto run = [&](Instance& in, const HeadProfile& hp, ReuseMode mode, bool pd = false) {
        PagedKvCache kv(*in.pool, hp,
                        PagedKvOptions{1.0f / std::sqrt(static_cast<float>(cfg.head_dim))},
                        model.inv_freq());
        ReuseOptions ro;
        ro.mode = mode;
        ro.sparse_ffn_enabled = false;
        const PrefillOutcome out = prefill_with_reuse(model, kv, 0, p, in.store.get(), ro);
        if (pd) handover(kv);
        kv.remove_sequence(0);
        return out.ms;
      };
      Instance A = make();
      recompute += run(A, prof, ReuseMode::RedKnot);  // miss: S0 prefilled, sent to Redis
      A.store->sync_writes();
      local += run(A, prof, ReuseMode::RedKnot, /*pd=*/true);
      Instance B = make();
      remote += run(B, prof, ReuseMode::RedKnot);  // remote hit: sink + window blocks only
      const ChunkStoreStats sb = B.store->stats();
      if (sb.remote_hits != 1) throw Error("bench: expected one remote hit on the second store");
      rbytes = sb.remote_bytes_read;
      Instance C = make();  // naive mode: an all-global destination fetches every row
      run(C, HeadProfile(L, H), ReuseMode::Naive);
      full_bytes = C.store->stats().remote_bytes_read;
      // Leave Redis empty for the next size.
      std::vector<std::string> keys;
      const std::string pre = "rk:" + hex(fp) + ":" + hex(segment_key(fp, p.segments[0]));
      keys.push_back(pre + ":m");
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < H; ++h)
          keys.push_back(pre + ":" + std::to_string(l) + ":" + std::to_string(h));
      make_redis_kv(url)->del(keys);
    }
    const int64_t token_major = int64_t{L} * H * 2 * T * cfg.head_dim * 4;
    std::printf(
        "| %lld | %.1f | %.1f | %.1f | %lld | %lld | %.3f | %lld | %lld | %lld | %.3f | "
        "%.1f |\n",
        (long long)T, recompute / a.repeats, local / a.repeats, remote / a.repeats,
        (long long)rbytes, (long long)token_major, double(rbytes) / double(token_major),
        (long long)full_bytes, (long long)pd_bytes, (long long)pd_token_major,
        double(pd_bytes) / double(pd_token_major), pd_import_ms / a.repeats);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace redknot::bench
