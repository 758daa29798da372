// One engine assembly for every entry point (serve, generate, eval, bench): the backend (wrapped
// to be batch-invariant when asked), the model, the KV store (page pool + per-head paged cache)
// sized by one rule, and the chunk store when reuse is on. Budgets a command does not set come
// from the named defaults below, so the four entry points size memory the same way.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "backend/communicator.h"
#include "engine/kv_setup.h"
#include "engine/reuse_settings.h"
#include "loader/checkpoint.h"
#include "model/model.h"
#include "reuse/chunk_store.h"
#include "reuse/reuse_prefill.h"

namespace redknot {

// A chunk store sized by default holds at least this many full-length requests' segments: a
// prompt's own documents even when each rounds up to whole pages (eval warms every segment of a
// sample before its prefill), plus the next requests' new ones.
inline constexpr int64_t kChunkStoreMinRequests = 4;
// Under a given --kv-budget the chunk store takes this share of the pool by default: requests
// keep two thirds, enough that reuse never starves running requests of pages.
inline constexpr double kChunkStoreBudgetShare = 1.0 / 3.0;
// Host RAM tier of the chunk store: segments demoted from the pool stay a copy away (1 GiB).
inline constexpr int64_t kChunkStoreHostBytes = int64_t{1} << 30;
// Disk tier, when a directory is given: large enough for a working set of long documents across
// restarts (16 GiB), small against a data disk.
inline constexpr int64_t kChunkStoreDiskBytes = int64_t{16} << 30;
// KV page size in tokens: the paper's, and a multiple of every kernel's tile.
inline constexpr int32_t kDefaultPageSize = 64;

struct EngineOptions {
  std::string backend = "cpu";
  // --tensor-parallel-size: ranks the model is sharded over (docs/tensor-parallel.md). On the
  // CPU backend they run as threads of this process (in-process communicator); on CUDA they
  // need NCCL and one GPU each, and without them opening the model fails (never a silent TP=1).
  int32_t tensor_parallel_size = 1;
  // Row-at-a-time matmuls so that a request's output does not depend on its batch (serve).
  bool batch_invariant = false;
  // --quantization: "" / "none" (weights as stored; FP8 checkpoints load as FP8) or "fp8"
  // (linear projections quantized at load time, per output channel: loader/fp8_checkpoint.h).
  std::string quantization;
  std::string kv_cache_dtype = "auto";  // --kv-cache-dtype: auto | fp8 (KvOptions)
  int32_t page_size = kDefaultPageSize;
  std::string head_profile;  // the store's head classes; empty: the model's own attention
  // KV pool: kv_budget_bytes when > 0, else gpu_memory_fraction of the free device memory when
  // > 0, else room for `concurrent_requests` requests of `request_tokens` tokens with every
  // head global (reuse may keep local pages: query_full_attention, segment prefill), plus one
  // more for a chunk-store miss prefilled beside them, plus the chunk store.
  int64_t kv_budget_bytes = 0;
  double gpu_memory_fraction = 0;
  int64_t request_tokens = 0;
  int32_t concurrent_requests = 1;
  // Chunk store (cached segments in the same pool): on when `chunk_store` is set. Its pool share
  // is chunk_store_bytes when > 0, else the defaults above.
  bool chunk_store = false;
  int64_t chunk_store_bytes = 0;
  std::string chunk_store_dir;  // disk tier (kChunkStoreDiskBytes); empty: none
  // Remote tier shared with other instances: redis://host:port or unix:///path.sock; empty: none.
  std::string chunk_store_redis;
  int32_t chunk_store_redis_admit = 1;  // accesses before a segment is written there
  RemoteKvOptions chunk_store_redis_options;
  int64_t chunk_store_host_bytes = kChunkStoreHostBytes;
};

// A model sharded over ranks (EngineOptions::tensor_parallel_size > 1): per rank a backend and
// the model holding that rank's shard, and the communicator group joining them.
struct TensorParallelRanks {
  std::unique_ptr<InProcessGroup> group;
  std::vector<std::unique_ptr<Backend>> backends, batch_invariant;
  std::vector<std::unique_ptr<Model>> models;
};

// The backend and model of one checkpoint.
struct LoadedEngineModel {
  Checkpoint ckpt;  // the whole checkpoint (placed when the head profile says so)
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Backend> batch_invariant;  // wraps `backend` when EngineOptions asks
  // Null when tensor-parallel: one rank's shard alone would wait forever for the others, so a
  // path not written for ranks fails here rather than hangs. Ranks run through run_on_ranks.
  std::unique_ptr<Model> model;
  std::unique_ptr<TensorParallelRanks> tp;
  bool is_batch_invariant() const {
    return batch_invariant != nullptr || (tp && !tp->batch_invariant.empty());
  }
  int tp_size() const { return tp ? tp->group->size() : 1; }
};

// Runs fn(rank, that rank's model) on every rank at once, one thread each (SPMD: each rank runs
// the same host code on the same inputs, so its decisions match rank 0's; the models' collectives
// keep them in step). One rank: fn(0, *m.model) on this thread. Rethrows the first rank's error.
void run_on_ranks(LoadedEngineModel& m, const std::function<void(int rank, Model& model)>& fn);

// Opens `path` (HF dir or GGUF) on opts.backend, wrapped when opts.batch_invariant.
LoadedEngineModel open_engine_model(const std::string& path, const EngineOptions& opts);

// The KV store and the chunk store of one model.
struct EngineStores {
  KvStore kv;
  std::unique_ptr<ChunkStore> chunks;  // null unless opts.chunk_store
};
EngineStores build_engine_stores(Model& model, const Checkpoint& ckpt, const EngineOptions& opts);

// Which heads a reuse mode's KV uses, the same in every entry point: redknot runs on the head
// profile (SPEC §2-§4: local heads store and read sink ∪ window). naive, cacheblend, epic,
// prefix and full are the published methods and the reference, defined on the model as trained
// (SPEC §4's baselines; the eval tables of docs/benchmarks.md compare them with redknot under
// one flag), so they take the model's own attention whatever profile is given. Returns the
// profile path to build the store with ("" = HeadProfile::native).
std::string head_profile_for_mode(ReuseMode mode, const std::string& head_profile);

}  // namespace redknot
