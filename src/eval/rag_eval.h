// The accuracy harness: runs a RAG dataset through one prefill mode, answers greedily, and
// scores EM/F1 per task family, first-token agreement with full prefill (top-1, logits
// cosine), TTFT percentiles and the FLOPs ledger against full prefill.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/kv_setup.h"
#include "eval/rag_dataset.h"
#include "loader/checkpoint.h"
#include "model/flops.h"
#include "model/model.h"
#include "reuse/chunk_store.h"
#include "reuse/reuse_prefill.h"
#include "tokenizer/tokenizer.h"

namespace redknot {

struct EvalOptions {
  ReuseOptions reuse;  // mode and its parameters
  int32_t max_answer_tokens = 16;
  KvOptions kv;                   // page size, head profile (redknot mode's: head_profile_for_mode)
  int64_t chunk_store_bytes = 0;  // pool share of the chunk store; 0: the engine's default
  // Full prefill's last-token logits per sample ([samples][vocab]), shared between the runs of
  // several modes over the same samples so the reference is computed once; filled on first use.
  std::vector<std::vector<float>>* full_logits = nullptr;
  // No sample starts after this instant: the report then holds the samples done before it
  // (truncated, n < n_requested) instead of a run cut from outside with nothing to show.
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

struct TaskStats {
  int64_t n = 0;
  double em = 0, f1 = 0, top1_match = 0, logits_cos = 0;
};

// One sample's outcome, for per-sample reports (`redknot eval --predictions`).
struct SampleResult {
  std::string id, task, prediction;
  double em = 0, f1 = 0, top1_match = 0, logits_cos = 0, ttft_ms = 0;
  nlohmann::json to_json() const;
};

struct EvalReport {
  std::string mode;
  int64_t n = 0;            // samples scored
  int64_t n_requested = 0;  // samples asked for (more than n when the deadline stopped it)
  bool truncated() const { return n < n_requested; }
  double em = 0, f1 = 0, top1_match = 0, logits_cos = 0;
  double ttft_ms_p50 = 0, ttft_ms_p90 = 0;
  double flops = 0, flops_full = 0;
  FlopsLedger ledger;
  int64_t reused_tokens = 0, prompt_tokens = 0;
  // The request cache's share of global (layer, kv head) pairs (ReusePath::global_head_fraction):
  // 1 in redknot mode means the model had no head profile.
  double global_head_fraction = 1.0;
  ChunkStoreStats chunk_store;
  std::map<std::string, TaskStats> per_task;
  std::vector<SampleResult> samples;  // in dataset order
  nlohmann::json to_json() const;     // the aggregates (not the per-sample rows)
};

// Runs every sample through opts.reuse.mode. Segments are cached offline first (prefilled alone,
// untimed, as SPEC §4's offline phase); prefix mode caches each finished request's chain for
// the next ones. Full prefill runs too (unless the mode is full) for the agreement metrics.
// progress(done, total) is called after each sample; opts.deadline stops it early (truncated).
EvalReport run_rag_eval(Model& model, const Checkpoint& ckpt, const Tokenizer& tok,
                        const std::vector<RagSample>& samples, const EvalOptions& opts,
                        const std::function<void(int64_t, int64_t)>& progress = nullptr);

double cosine(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace redknot
