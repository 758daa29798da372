#include "engine/engine_setup.h"

#include <algorithm>

#include "backend/batch_invariant_backend.h"
#include "backend/builtin.h"
#include "backend/nccl_communicator.h"
#include "core/error.h"
#include "kv/head_profile.h"
#include "loader/fp8_checkpoint.h"
#include "loader/permute_heads.h"
#include "loader/shard_checkpoint.h"

namespace redknot {

namespace {

// The ranks of a tensor-parallel model on a host-memory backend: threads of this process.
std::unique_ptr<TensorParallelRanks> open_ranks(const Checkpoint& ckpt, const EngineOptions& opts) {
  const int n = opts.tensor_parallel_size;
  auto tp = std::make_unique<TensorParallelRanks>();
  tp->group = std::make_unique<InProcessGroup>(n);
  for (int r = 0; r < n; ++r) {
    // Sliced one rank at a time: the host holds one rank's copies beside the mapped file.
    const Checkpoint shard = shard_checkpoint(ckpt, r, n);
    tp->backends.push_back(create_backend(opts.backend));
    Backend* b = tp->backends.back().get();
    if (opts.batch_invariant) {
      tp->batch_invariant.push_back(std::make_unique<BatchInvariantBackend>(*b));
      b = tp->batch_invariant.back().get();
    }
    tp->models.push_back(std::make_unique<Model>(shard, *b, &tp->group->rank(r)));
  }
  return tp;
}

}  // namespace

void run_on_ranks(LoadedEngineModel& m, const std::function<void(int rank, Model& model)>& fn) {
  if (!m.tp) {
    fn(0, *m.model);
    return;
  }
  run_ranks(*m.tp->group, [&](int r) { fn(r, *m.tp->models[static_cast<size_t>(r)]); });
}

LoadedEngineModel open_engine_model(const std::string& path, const EngineOptions& opts) {
  register_builtin_backends();
  const int tp = opts.tensor_parallel_size;
  if (tp < 1) throw Error("--tensor-parallel-size must be >= 1");
  if (tp > 1 && opts.backend != "cpu" && opts.backend != "reference") {
    // Device ranks need NCCL and one GPU each; running one rank's work alone would be TP=1.
    const std::string why = nccl_unavailable_reason();
    throw Error("--tensor-parallel-size " + std::to_string(tp) + " on the " + opts.backend +
                " backend needs NCCL and one GPU per rank: " +
                (why.empty() ? "NCCL loads, but the CUDA backend does not yet place one rank per "
                               "device (docs/tensor-parallel.md)"
                             : why));
  }
  LoadedEngineModel m;
  m.ckpt = load_checkpoint(path);
  // Head placement: the weights take the profile's kv head order here, before any upload.
  if (!opts.head_profile.empty()) {
    const HeadProfile p = HeadProfile::load(opts.head_profile);
    if (!p.placement.empty()) {
      p.check_matches(m.ckpt.config, opts.head_profile);
      permute_kv_heads(m.ckpt, p.placement);
    }
  }
  // After placement: permuting float rows first keeps every per-channel scale with its row.
  apply_quantization(m.ckpt, opts.quantization);
  if (tp > 1) {
    plan_tp_shard(m.ckpt.config, 0, tp);  // a shape that does not split fails before any upload
    m.tp = open_ranks(m.ckpt, opts);
    return m;
  }
  m.backend = create_backend(opts.backend);
  if (opts.batch_invariant) m.batch_invariant = std::make_unique<BatchInvariantBackend>(*m.backend);
  m.model = std::make_unique<Model>(m.ckpt, m.batch_invariant ? *m.batch_invariant : *m.backend);
  return m;
}

EngineStores build_engine_stores(Model& model, const Checkpoint& ckpt, const EngineOptions& opts) {
  KvOptions kvo;
  kvo.page_size = opts.page_size;
  kvo.head_profile_path = opts.head_profile;
  kvo.kv_cache_dtype = opts.kv_cache_dtype;
  int64_t chunk_bytes = opts.chunk_store_bytes;
  int64_t budget = opts.kv_budget_bytes;
  if (budget <= 0 && opts.gpu_memory_fraction > 0) {
    // Weights are on the device already: the pool takes this share of what is left.
    budget = static_cast<int64_t>(opts.gpu_memory_fraction *
                                  static_cast<double>(model.backend().free_memory_bytes()));
    if (budget <= 0) throw Error("--gpu-memory-fraction: no free device memory reported");
  }
  if (budget > 0) {
    if (chunk_bytes <= 0) chunk_bytes = static_cast<int64_t>(budget * kChunkStoreBudgetShare);
  } else {
    if (opts.request_tokens <= 0 || opts.concurrent_requests <= 0)
      throw Error("engine: the KV pool needs a byte budget or a request size");
    const int64_t request =
        kv_bytes_for(model, opts.page_size, opts.request_tokens, 1, opts.kv_cache_dtype);
    budget = opts.concurrent_requests * request;
    if (opts.chunk_store) {
      if (chunk_bytes <= 0)
        chunk_bytes =
            std::max<int64_t>(kChunkStoreMinRequests, opts.concurrent_requests / 2) * request;
      budget += request + chunk_bytes;
    }
  }
  kvo.budget_bytes = budget;
  EngineStores s;
  s.kv = make_kv_store(model, kvo);
  if (opts.chunk_store) {
    ChunkStoreOptions cso;
    cso.pool_budget_bytes = chunk_bytes;
    cso.host_budget_bytes = opts.chunk_store_host_bytes;
    cso.model_fp = model_fingerprint(model.config(), ckpt, s.kv.pool->kv_dtype());
    if (!opts.chunk_store_dir.empty()) {
      cso.disk_dir = opts.chunk_store_dir;
      cso.disk_budget_bytes = kChunkStoreDiskBytes;
    }
    if (!opts.chunk_store_redis.empty()) {
      make_redis_kv(opts.chunk_store_redis, opts.chunk_store_redis_options);  // throws if bad
      cso.remote = [url = opts.chunk_store_redis, ro = opts.chunk_store_redis_options] {
        return make_redis_kv(url, ro);
      };
      cso.remote_admit = opts.chunk_store_redis_admit;
    }
    s.chunks = std::make_unique<ChunkStore>(model, *s.kv.pool, cso);
  }
  return s;
}

std::string head_profile_for_mode(ReuseMode mode, const std::string& head_profile) {
  return reuse_mode_uses_head_profile(mode) ? head_profile : std::string();
}

}  // namespace redknot
