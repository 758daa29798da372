// Prefill of a segmented prompt (S0..Sn + query) in one of the reuse modes that RedKnot
// compares, all on the same kernels and KV store:
//   full       dense prefill of everything (the reference)
//   prefix     exact-prefix cache: the longest chain S0..Sj cached before, then the rest dense
//   naive      every segment's cached KV relocated into place, only the query computed
//   cacheblend naive + recompute the tokens whose layer-1 keys deviate most (ratio, 0.15)
//   epic       naive + recompute the first k tokens of every reused segment (k = 32)
//   redknot    S0 reused as is; S1..Sn + query recomputed in one causal pass with the store's
//              head classes (local heads see sink ∪ window) and Sparse FFN (SPEC §4)
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kv/paged_kv_cache.h"
#include "model/flops.h"
#include "model/model.h"
#include "model/sparse_ffn.h"

namespace redknot {

enum class ReuseMode { Full, Prefix, Naive, CacheBlend, Epic, RedKnot };
ReuseMode parse_reuse_mode(const std::string& name);  // throws Error listing the modes
const char* reuse_mode_name(ReuseMode m);
const std::vector<std::string>& reuse_mode_names();

// A prompt as reuse units: segments[0] starts with BOS; each segment is tokenized alone.
struct SegmentedPrompt {
  std::vector<std::vector<int32_t>> segments;
  std::vector<int32_t> query;

  int64_t total_tokens() const;
  std::vector<int32_t> flatten() const;
};

// A cached segment's KV, prefilled alone at positions [0, len): pool rows per (layer, kv head).
struct SegmentRef {
  bool found = false;
  std::vector<std::vector<int32_t>> rows;  // [layer * kv_heads + head][token]
  std::shared_ptr<void> pin;               // keeps the entry resident while held
  bool was_cached = false;                 // true when it was a hit (not prefilled just now)
};
// Finds a segment's KV (prefilling it alone on a miss when `prefill_on_miss`).
using SegmentLookup =
    std::function<SegmentRef(const std::vector<int32_t>& tokens, bool prefill_on_miss)>;

struct ReuseOptions {
  ReuseMode mode = ReuseMode::Full;
  double cacheblend_ratio = 0.15;
  int32_t cacheblend_layer = 1;  // layer whose key deviation picks the tokens
  int32_t epic_k = 32;
  SparseFfnConfig sparse_ffn;
  bool sparse_ffn_enabled = true;  // redknot mode only
  // redknot mode, beyond the paper: rows whose outputs no later token reads are not computed
  // past the last layer with a global head (see dead_row_split). Exact without Sparse FFN; with
  // it, the two passes rank FFN rows separately, so the kept rows differ a little (measured in
  // docs/benchmarks.md).
  bool skip_dead_rows = true;
  // redknot mode, beyond the paper: the query's rows attend with every head global (local heads
  // too, over every token of the prompt) in the layers where every row's K/V exists (all, or up
  // to the last global layer with dead-row skipping), with a dense FFN; the document rows keep
  // the head classes (and Sparse FFN); local heads keep their pages until the query has run.
  bool query_full_attention = false;
  int32_t chunk = 4096;               // tokens per forward pass
  StageTimes* stage_times = nullptr;  // profiling: wall time per stage (see model/stage_times.h)
};

// What a prefill produced: the sequence holds the prompt's KV, ready to decode.
struct PrefillOutcome {
  std::vector<float> last_logits;  // [vocab]
  FlopsLedger flops;               // work done online (cached segments cost nothing here)
  double ms = 0;                   // wall time to the first token's logits
  int64_t reused_tokens = 0;       // prompt tokens whose KV came from the cache
};

// Exact-prefix index over chains of segments: after a request, its chain S0..Sn is cached as
// one entry and every chain prefix S0..Sj is recorded, so later requests find their longest
// cached prefix.
class PrefixIndex {
 public:
  // Longest j such that S0..Sj is recorded; returns -1 when none. tokens/len: the entry holding
  // it and the prefix length in tokens.
  int longest(const SegmentedPrompt& p, std::vector<int32_t>* entry_tokens, int64_t* len) const;
  void record(const SegmentedPrompt& p);

 private:
  std::map<std::vector<int32_t>, std::pair<std::vector<int32_t>, int64_t>> chains_;
};

// Dead rows of a recomputation pass (redknot mode). Past the last layer g holding a global head,
// only local heads remain: a row's output there matters only if a later row's local window (or
// the logits) reaches it, and each such layer widens that reach by one window. So of N rows
// appended at position `start`, the first N - tail need layers <= g only (and at layer g only
// their K/V, which global heads read from every later token); the last `tail` rows need every
// layer. tail = (L - 1 - g) * (W - 1) + W + 1 with W the widest window past g. Returns 0 (no
// split) when a global head sits in the last layer, when the rows are too few, or when a sink
// position falls inside the split rows.
struct DeadRowSplit {
  int64_t tail = 0;             // rows that run every layer (0: no split)
  int kv_only_from_layer = -1;  // g (or 0 when no head is global)
};
DeadRowSplit dead_row_split(const ModelConfig& cfg, const HeadProfile& profile, int64_t start,
                            int64_t rows);

// Dense prefill through `kv` (any store), logits of the last token.
PrefillOutcome prefill_full(Model& model, KvCache& kv, SeqId seq, const SegmentedPrompt& prompt,
                            int32_t chunk = 4096, StageTimes* stage_times = nullptr);

// Runs `prompt` into sequence `seq` of `kv` in opts.mode. `lookup` serves cached segments
// (unused by full); `prefix_index` is used by prefix mode (may be null otherwise).
PrefillOutcome prefill_with_reuse(Model& model, PagedKvCache& kv, SeqId seq,
                                  const SegmentedPrompt& prompt, const SegmentLookup& lookup,
                                  const ReuseOptions& opts,
                                  const PrefixIndex* prefix_index = nullptr);

}  // namespace redknot
