#include "engine/kv_setup.h"

#include <cmath>

#include "core/error.h"

namespace redknot {

HeadProfile load_head_profile(const Model& model, const std::string& path) {
  if (path.empty()) return HeadProfile::native(model.config());
  HeadProfile p = HeadProfile::load(path);
  // A file describes the whole model; a tensor-parallel rank keeps its own heads' classes.
  p.check_matches(model.global_config(), path);
  // A placed profile describes permuted heads: on weights in another order it would give the
  // wrong heads the wrong classes.
  auto is_identity = [](const std::vector<std::vector<int32_t>>& perm) {
    for (const auto& row : perm)
      for (size_t i = 0; i < row.size(); ++i)
        if (row[i] != static_cast<int32_t>(i)) return false;
    return true;
  };
  if (!(is_identity(p.placement) && is_identity(model.kv_head_perm())) &&
      p.placement != model.kv_head_perm())
    throw Error(path +
                ": the head profile's placement (kv head order) is not the model's; load "
                "the model with this profile (EngineOptions::head_profile) to permute it");
  if (model.tp().size > 1)
    return p.slice_heads(static_cast<int32_t>(model.tp().kv_head0),
                         static_cast<int32_t>(model.config().num_kv_heads));
  return p;
}

DType parse_kv_cache_dtype(const std::string& value, const Backend& backend) {
  if (value.empty() || value == "auto") return backend.act_dtype();
  if (value == "fp8" || value == "fp8_e4m3") return DType::F8_E4M3;
  throw Error("--kv-cache-dtype '" + value + "' is not supported (auto, fp8)");
}

int64_t kv_bytes_for(const Model& model, int32_t page_size, int64_t tokens, int64_t sequences,
                     const std::string& kv_cache_dtype) {
  const ModelConfig& cfg = model.config();
  const HeadProfile all_global(static_cast<int32_t>(cfg.num_layers),
                               static_cast<int32_t>(cfg.num_kv_heads));
  return sequences * all_global.pages_for(tokens, page_size, /*slack_pages_per_head=*/2) *
         PagePool::page_bytes(page_size, static_cast<int32_t>(cfg.head_dim),
                              parse_kv_cache_dtype(kv_cache_dtype, model.backend()));
}

KvStore make_kv_store(Model& model, const KvOptions& opts) {
  const ModelConfig& cfg = model.config();
  if (opts.page_size <= 0 || opts.page_size > 4096) throw Error("page size must be in [1, 4096]");
  KvStore s;
  s.profile = load_head_profile(model, opts.head_profile_path);
  const int32_t hd = static_cast<int32_t>(cfg.head_dim);
  const DType kv_dtype = parse_kv_cache_dtype(opts.kv_cache_dtype, model.backend());
  int64_t pages = 0;
  if (opts.budget_bytes > 0) {
    pages = PagePool::pages_for_bytes(opts.budget_bytes, opts.page_size, hd, kv_dtype);
  } else {
    if (opts.tokens <= 0) throw Error("KV store needs a byte budget or a token count");
    // Every head global, one page of slack per head for copy-on-write and partly used pages.
    pages =
        HeadProfile(static_cast<int32_t>(cfg.num_layers), static_cast<int32_t>(cfg.num_kv_heads))
            .pages_for(opts.tokens, opts.page_size, /*slack_pages_per_head=*/1);
  }
  if (pages <= 0) throw Error("KV budget is smaller than one page");
  if (pages > INT32_MAX) throw Error("KV budget too large");
  s.pool =
      std::make_unique<PagePool>(model.backend(), static_cast<int32_t>(pages), opts.page_size, hd,
                                 /*with_storage=*/true, kv_dtype);
  PagedKvOptions po;
  po.scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  s.cache = std::make_unique<PagedKvCache>(*s.pool, s.profile, po, model.inv_freq());
  return s;
}

void make_baseline_cache(Model& model, KvStore& store) {
  PagedKvOptions po;
  po.scale = 1.0f / std::sqrt(static_cast<float>(model.config().head_dim));
  store.baseline = std::make_unique<PagedKvCache>(*store.pool, HeadProfile::native(model.config()),
                                                  po, model.inv_freq());
}

}  // namespace redknot
