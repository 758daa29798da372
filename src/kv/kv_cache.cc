#include "kv/kv_cache.h"

#include "core/error.h"
#include "kv/head_profile.h"

namespace redknot {

void KvCache::begin_forward(const Batch&, const Tensor&, PlanStorage&) {
  throw Error("KV cache: this store cannot plan into storage");
}

double KvCache::global_head_fraction() const {
  const HeadProfile* p = head_profile();
  return p ? p->whole().global_fraction() : 1.0;
}

}  // namespace redknot
