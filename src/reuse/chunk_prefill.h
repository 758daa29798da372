// Offline use of the passive chunk store (warming it before a run, benches, tests): a segment's
// entry, prefilled right here on a miss. Serving never calls this: the scheduler runs a miss's
// prefill as ordinary work of its steps (see engine/scheduler.h).
#pragma once
#include <cstdint>
#include <span>

#include "model/model.h"
#include "reuse/chunk_store.h"

namespace redknot {

// The segment pinned in the store's pool: a hit, or prefilled alone at [0, len) in forwards of
// `chunk` tokens and published. Empty for an empty span or when a host/disk hit finds no room.
// Throws OutOfKvMemory when the pool cannot hold the prefill.
ChunkStore::Handle acquire_or_prefill(Model& model, ChunkStore& store,
                                      std::span<const int32_t> tokens, int32_t chunk = 2048);

// Runs a reserved miss's prefill to the end (forwards of `chunk` tokens) and publishes it.
ChunkStore::Handle prefill_pending(Model& model, ChunkStore& store, ChunkStore::Pending pending,
                                   int32_t chunk = 2048);

}  // namespace redknot
