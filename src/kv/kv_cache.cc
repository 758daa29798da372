#include "kv/kv_cache.h"

#include "core/error.h"

namespace redknot {

void KvCache::begin_forward(const Batch&, const Tensor&, PlanStorage&) {
  throw Error("KV cache: this store cannot plan into storage");
}

}  // namespace redknot
