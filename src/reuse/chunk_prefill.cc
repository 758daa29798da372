#include "reuse/chunk_prefill.h"

#include <algorithm>
#include <map>

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

std::vector<std::vector<size_t>> pack_rows(const std::vector<int64_t>& lengths, int64_t budget) {
  std::vector<std::vector<size_t>> groups;
  int64_t rows = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (groups.empty() || (budget > 0 && rows + lengths[i] > budget)) {
      groups.emplace_back();
      rows = 0;
    }
    groups.back().push_back(i);
    rows += lengths[i];
  }
  return groups;
}

std::vector<ChunkStore::Handle> prefill_pendings(Model& model, ChunkStore& store,
                                                 std::vector<ChunkStore::Pending> pendings,
                                                 int32_t chunk) {
  if (chunk <= 0) throw Error("chunk store prefill: chunk must be positive");
  std::vector<int64_t> lengths;
  for (const auto& p : pendings) lengths.push_back(static_cast<int64_t>(p.tokens().size()));
  std::vector<ChunkStore::Handle> out;
  for (const std::vector<size_t>& group : pack_rows(lengths, chunk)) {
    if (group.size() == 1) {
      out.push_back(prefill_pending(model, store, std::move(pendings[group[0]]), chunk));
      continue;
    }
    Batch b;
    for (size_t i : group)
      b.add_sequence(pendings[i].seq(), pendings[i].tokens(), 0, /*last_logits=*/false);
    model.forward(b, store.prefill_cache(), ForwardOptions{});
    for (size_t i : group) out.push_back(store.publish(std::move(pendings[i])));
  }
  return out;
}

std::vector<ChunkStore::Handle> acquire_or_prefill_all(
    Model& model, ChunkStore& store, const std::vector<std::vector<int32_t>>& segments,
    int32_t chunk) {
  std::vector<ChunkStore::Handle> out(segments.size());
  std::map<std::vector<int32_t>, size_t> first;  // a segment's first index
  std::vector<ChunkStore::Pending> misses;
  std::vector<size_t> miss_index;
  for (size_t i = 0; i < segments.size(); ++i) {
    const auto& seg = segments[i];
    if (seg.empty() || !first.emplace(seg, i).second) continue;
    out[i] = store.acquire(seg);
    if (out[i] || store.cached(seg)) continue;  // a hit, or cached with no room in the pool
    misses.push_back(store.reserve(seg));
    miss_index.push_back(i);
  }
  std::vector<ChunkStore::Handle> made = prefill_pendings(model, store, std::move(misses), chunk);
  for (size_t k = 0; k < made.size(); ++k) out[miss_index[k]] = std::move(made[k]);
  for (size_t i = 0; i < segments.size(); ++i)
    if (!segments[i].empty() && first.at(segments[i]) != i) out[i] = store.acquire(segments[i]);
  return out;
}

}  // namespace redknot
