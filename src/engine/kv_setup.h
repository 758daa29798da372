// Building the engine's KV store for a model: the head profile (file or the model's own
// attention), a page pool sized from a byte budget or a token count, and the paged cache.
#pragma once
#include <memory>
#include <string>

#include "kv/head_profile.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "model/model.h"

namespace redknot {

struct KvOptions {
  int32_t page_size = 64;
  int64_t budget_bytes = 0;       // pool size; 0: enough for `tokens` tokens all-global
  int64_t tokens = 0;             // used when budget_bytes == 0
  std::string head_profile_path;  // empty: the model's own attention (dense or its window)
  // --kv-cache-dtype: "auto" (the backend's act dtype) or "fp8" (e4m3 rows with one f32 scale
  // per (token, layer, kv head): Backend::pack_fp8_kv_rows).
  std::string kv_cache_dtype = "auto";
};

// The pool dtype of a --kv-cache-dtype value on `backend`; Error for a value not implemented.
DType parse_kv_cache_dtype(const std::string& value, const Backend& backend);

struct KvStore {
  HeadProfile profile;
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<PagedKvCache> cache;
  // Every head keeping every token (the model's own attention), over the same pool: the cache of
  // the baseline reuse modes when `cache` follows a head profile (make_baseline_cache).
  std::unique_ptr<PagedKvCache> baseline;
};

// Loads/validates the profile against the model; throws Error with a clear message.
HeadProfile load_head_profile(const Model& model, const std::string& path);
KvStore make_kv_store(Model& model, const KvOptions& opts);
// Adds store.baseline (the model's own attention over store.pool).
void make_baseline_cache(Model& model, KvStore& store);

// Pool bytes that hold `sequences` sequences of `tokens` tokens with every head global,
// including two pages of slack per (layer, kv head) for copy-on-write and partial pages.
int64_t kv_bytes_for(const Model& model, int32_t page_size, int64_t tokens, int64_t sequences = 1,
                     const std::string& kv_cache_dtype = "auto");

}  // namespace redknot
