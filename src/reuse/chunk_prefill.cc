#include "reuse/chunk_prefill.h"

#include <algorithm>

#include "core/error.h"

namespace redknot {

ChunkStore::Handle prefill_pending(Model& model, ChunkStore& store, ChunkStore::Pending pending,
                                   int32_t chunk) {
  if (chunk <= 0) throw Error("chunk store prefill: chunk must be positive");
  const std::vector<int32_t>& tokens = pending.tokens();
  const int32_t len = static_cast<int32_t>(tokens.size());
  for (int32_t s = 0; s < len; s += chunk) {
    const int32_t e = std::min(len, s + chunk);
    Batch b;
    b.add_sequence(pending.seq(), std::vector<int32_t>(tokens.begin() + s, tokens.begin() + e), s,
                   /*last_logits=*/false);
    model.forward(b, store.prefill_cache(), ForwardOptions{});
  }
  return store.publish(std::move(pending));
}

ChunkStore::Handle acquire_or_prefill(Model& model, ChunkStore& store,
                                      std::span<const int32_t> tokens, int32_t chunk) {
  if (tokens.empty()) return {};
  ChunkStore::Handle h = store.acquire(tokens);
  if (h) return h;
  if (store.cached(tokens)) return {};  // cached in host/disk but no room in the pool
  return prefill_pending(model, store, store.reserve(tokens), chunk);
}

}  // namespace redknot
