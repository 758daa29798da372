// Offline use of the passive chunk store (warming it before a run, benches, tests): a segment's
// entry, prefilled right here on a miss. Serving never calls this: the scheduler runs a miss's
// prefill as ordinary work of its steps (see engine/scheduler.h).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

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

// Groups of consecutive items whose lengths sum to at most `budget` rows, an item longer than
// that alone (budget <= 0: one group): the forwards that prefill a prompt's misses together.
std::vector<std::vector<size_t>> pack_rows(const std::vector<int64_t>& lengths, int64_t budget);

// Prefills reserved misses, several per forward (pack_rows of `chunk` rows: a prompt's short
// documents in one batch instead of one launch-bound forward each; a longer one alone, in
// forwards of `chunk`), and publishes them in order.
std::vector<ChunkStore::Handle> prefill_pendings(Model& model, ChunkStore& store,
                                                 std::vector<ChunkStore::Pending> pendings,
                                                 int32_t chunk = 2048);

// acquire_or_prefill of every segment, the misses prefilled together (prefill_pendings); a
// segment given twice is prefilled once. Handles in the segments' order (empty as there).
std::vector<ChunkStore::Handle> acquire_or_prefill_all(
    Model& model, ChunkStore& store, const std::vector<std::vector<int32_t>>& segments,
    int32_t chunk = 2048);

}  // namespace redknot
