// Prefill/decode handover (issue #22, the paper's PD transfer): one request's KV, prefilled on one
// instance, moved through the remote store (Redis) to another that decodes it. Head-major: each
// (layer, kv head) sends only the rows its sequence still holds -- a local head its sink and
// window, a global head every row -- where a token-major cache must move every head's row of every
// token. Keys `rk:pd:<model fp hex>:<handle>`: `:<layer>:<head>` (positions i32[n], K rows, V rows
// in act dtype) and `:m` (manifest: geometry, the head profile, the prompt's token ids and
// positions, the first token the exporter sampled, one XXH3 per head shard, its own XXH3), written
// shards first, manifest last, in one pipeline.
#include <span>
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "kv/paged_kv_cache.h"
#include "reuse/remote_tier.h"

namespace redknot {

struct HandoverBytes {
  int32_t tokens = 0;             // logical tokens of the sequence
  int64_t rows = 0;               // (layer, head) rows moved
  int64_t bytes = 0;              // bytes moved (manifest + shards)
  int64_t token_major_bytes = 0;  // every head's K and V of every token
  int32_t first_token = -1;       // sampled by the exporter from the prompt's last logits
};

// Writes `seq` of `kv` (holding `tokens`, the prompt) under `handle`, with the first token the
// exporter sampled. nullopt (and `error` set) when the remote fails.
std::optional<HandoverBytes> export_kv(PagedKvCache& kv, SeqId seq, std::span<const int32_t> tokens,
                                       int32_t first_token, RemoteKv& remote, uint64_t model_fp,
                                       const std::string& handle, std::string* error = nullptr);
// Fills the empty sequence `seq` of `kv` (same model, same head profile) from `handle`, whose
// prompt must be `tokens`; nullopt (and `error`: missing, corrupt, other model, profile or prompt,
// transport) when it cannot: the caller prefills instead, the sequence left empty. Never serves a
// value that fails its checksums.
std::optional<HandoverBytes> import_kv(PagedKvCache& kv, SeqId seq, std::span<const int32_t> tokens,
                                       RemoteKv& remote, uint64_t model_fp,
                                       const std::string& handle, std::string* error = nullptr);

}  // namespace redknot
