#include "reuse/segment_lookup.h"

namespace redknot {

SegmentLookup chunk_store_lookup(ChunkStore& store) {
  return [&store](const std::vector<int32_t>& tokens, bool prefill_on_miss) {
    SegmentRef ref;
    auto handle = std::make_shared<ChunkStore::Handle>(store.acquire(tokens, prefill_on_miss));
    if (!*handle || handle->tier() != ChunkTier::Pool) return ref;
    ref.found = true;
    ref.rows = handle->all_rows();
    ref.was_cached = handle->hit();
    ref.pin = handle;
    return ref;
  };
}

}  // namespace redknot
