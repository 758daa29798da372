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
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kv/paged_kv_cache.h"
#include "model/flops.h"
#include "model/model.h"
#include "model/sparse_ffn.h"
#include "reuse/chunk_store.h"

namespace redknot {

enum class ReuseMode { Full, Prefix, Naive, CacheBlend, Epic, RedKnot };
ReuseMode parse_reuse_mode(const std::string& name);  // throws Error listing the modes
const char* reuse_mode_name(ReuseMode m);
const std::vector<std::string>& reuse_mode_names();
// Whether a mode's requests keep KV by the head profile (redknot) or every head keeps every token
// (full and the baselines, which run the model's own attention: SPEC §4). The same mode name means
// the same KV in every entry point.
bool reuse_mode_uses_head_profile(ReuseMode mode);

// A prompt as reuse units: segments[0] starts with BOS; each segment is tokenized alone.
struct SegmentedPrompt {
  std::vector<std::vector<int32_t>> segments;
  std::vector<int32_t> query;

  int64_t total_tokens() const;
  std::vector<int32_t> flatten() const;
};

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
  // Rows per forward of every pass (store prefills of misses, recomputation, the query): the
  // scheduler runs one such forward per step, so this bounds how long a reuse prefill holds a
  // step. Sparse FFN ranks rows per forward, so it is part of what a mode's answer depends on:
  // eval, generate and serve use the same value for the same answer. 0: each pass whole.
  int32_t chunk = 4096;
  StageTimes* stage_times = nullptr;  // profiling: wall time per stage (see model/stage_times.h)
};

// How a request's prompt was prefilled, reported with its response and in /metrics: no reuse
// path changes silently.
struct ReusePath {
  ReuseMode requested = ReuseMode::Full;  // what the request (or the server default) asked
  ReuseMode used = ReuseMode::Full;       // what ran
  std::string fallback;                   // why used != requested (empty when it did not)
  int32_t segments = 0;                   // segments looked up in the chunk store
  int32_t segments_hit = 0;               // found cached (pool, host, disk or remote)
  int32_t segments_remote = 0;            // of those, fetched from the remote tier (Redis)
  int32_t segments_prefilled = 0;         // misses prefilled for this request
  int32_t segments_private = 0;           // of those, not kept by the store (no room)
  int64_t reused_tokens = 0;              // prompt tokens whose KV came from a cache
  int64_t prefix_hit_tokens = 0;          // of those, from the prefix cache (prefix mode)
  // Prefill/decode handover (RequestSpec::kv_export / kv_import): bytes moved head-major, what a
  // token-major cache would move, and why a handover failed (empty: it did not).
  int64_t kv_export_bytes = 0, kv_import_bytes = 0, kv_token_major_bytes = 0;
  std::string kv_handover_error;
  // Share of (layer, kv head) pairs whose KV keeps every token in the cache this request ran on:
  // below 1 only where a head profile makes heads local (redknot mode on a profiled model); 1 in
  // redknot mode means the model has no head profile, so every head stayed global.
  double global_head_fraction = 1.0;
};

// What a prefill produced: the sequence holds the prompt's KV, ready to decode.
struct PrefillOutcome {
  std::vector<float> last_logits;  // [vocab]
  FlopsLedger flops;               // work done online (cached segments cost nothing here)
  double ms = 0;                   // wall time to the first token's logits
  int64_t reused_tokens = 0;       // prompt tokens whose KV came from the cache
  ReusePath path;
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

// A reuse prefill as a queue of forwards, each of at most opts.chunk rows of one sequence (the
// request's, or the chunk store's for a miss) with its own forward options. run_next() runs the
// actions due (attaching cached segments, publishing a prefilled miss, choosing CacheBlend's
// rows) and then one forward. The scheduler runs one forward per step, between other requests'
// decodes; prefill_with_reuse() runs them back to back: the same forwards, the same answer.
// Each mode is one planning function over this queue (the trait table in reuse_prefill.cc).
struct ModePlanner;

class ReuseJob {
 public:
  // Admission: pins the prompt's cached segments and reserves the misses' prefills in the store
  // (relocation happens once they are ready). Throws OutOfKvMemory, holding nothing, when the
  // pool cannot take a miss's prefill. `kv` must hold `seq` (empty). `store` may be null for
  // modes that read none (full, and prefix with no index).
  ReuseJob(Model& model, PagedKvCache& kv, SeqId seq, SegmentedPrompt prompt, ChunkStore* store,
           const ReuseOptions& opts, const PrefixIndex* prefix_index = nullptr);
  ~ReuseJob();
  ReuseJob(const ReuseJob&) = delete;
  ReuseJob& operator=(const ReuseJob&) = delete;

  bool done() const { return queue_.empty(); }
  // Rows of the next forward (0 when done).
  int64_t next_rows() const;
  // Runs the actions due and the next forward. Throws OutOfKvMemory (that forward or
  // relocation changed nothing; the job can be dropped or retried) and Error.
  void run_next();
  // Valid once done(): last_logits, flops, reused_tokens, path (ms is the caller's).
  PrefillOutcome& outcome() { return out_; }
  SeqId seq() const { return seq_; }

 private:
  struct Step;
  friend struct ModePlanner;
  void push(Step step);
  void finish();  // releases the pins and resets the attention switches
  // Runs the host actions at the queue's head, in order; the steps one returns go first.
  void run_actions();

  Model& model_;
  PagedKvCache& kv_;
  SeqId seq_;
  SegmentedPrompt prompt_;
  ChunkStore* store_;
  ReuseOptions opts_;
  std::deque<Step> queue_;
  std::vector<ChunkStore::Handle> pins_;  // cached segments, held until the job ends
  PrefillOutcome out_;
  const PrefixIndex* prefix_index_;
  std::unique_ptr<ModePlanner> planner_;  // captured by the queue's actions
  bool full_attention_set_ = false;       // query_full_attention: reset when the job ends
};

// Runs `prompt` into sequence `seq` of `kv` in opts.mode (a ReuseJob run to the end). `store`
// serves cached segments (unused by full); `prefix_index` is used by prefix mode (may be null
// otherwise).
PrefillOutcome prefill_with_reuse(Model& model, PagedKvCache& kv, SeqId seq,
                                  const SegmentedPrompt& prompt, ChunkStore* store,
                                  const ReuseOptions& opts,
                                  const PrefixIndex* prefix_index = nullptr);

}  // namespace redknot
