// Serves the reuse modes' segment lookups from the ChunkStore.
#pragma once
#include "reuse/chunk_store.h"
#include "reuse/reuse_prefill.h"

namespace redknot {

// The returned function pins each entry it hands out (SegmentRef::pin) until the ref is gone.
SegmentLookup chunk_store_lookup(ChunkStore& store);

}  // namespace redknot
