// The serving engine loop: continuous batching with chunked prefill over one model and its paged
// KV caches. One engine thread owns the model and the caches; other threads only submit requests
// and read their token streams. Each step runs the decode token of every running sequence, at
// most one forward of a reuse prefill (a ReuseJob: a chunk-store miss's prefill, recomputed rows,
// the query), and prefill chunks of admitted requests, under a per-step token budget. The
// scheduler decides what runs; the caches and the chunk store are passive (they never run the
// model), and admission never runs a forward: a request with documents gets its cached segments
// pinned and its misses reserved, and everything computed for it is work of later steps.
//
// A redknot-mode request keeps its KV by the head profile (`cache`); the baselines (full,
// prefix, naive, cacheblend, epic) keep every token of every head (`baseline_cache` over the same
// pool), so a mode name means the same KV here as in eval and generate.
//
// Admission is by head-aware KV size (prompt + max_tokens, global heads keep every token, local
// heads sink ∪ window). When a forward still runs out of pages (admission may over-commit), the
// most recently admitted running request is preempted: its sequence is dropped and it is
// requeued to be recomputed from prompt + generated tokens, so no other request is disturbed.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "backend/communicator.h"
#include "core/error.h"
#include "engine/sampler.h"
#include "kv/paged_kv_cache.h"
#include "model/model.h"
#include "reuse/prefix_cache.h"
#include "reuse/remote_tier.h"
#include "reuse/reuse_prefill.h"

namespace redknot {

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
const char* finish_reason_name(FinishReason r);

struct RequestSpec {
  // Prompt as reuse units: segments (system prompt, documents, earlier turns) then the query.
  // The model sees their concatenation.
  std::vector<std::vector<int32_t>> segments;
  std::vector<int32_t> query;
  SamplingParams sampling;
  int32_t max_tokens = 16;
  std::vector<int32_t> stop_ids;  // generation ends after emitting one of these (kept in output)
  // Log-probabilities of each generated token (of the raw logits) and of this many most likely
  // alternatives; -1: none.
  int32_t logprobs = -1;
  // Chunk reuse mode of this request (unset: the scheduler's default).
  std::optional<ReuseMode> reuse_mode;
  // Requests whose reuse mode is unavailable (no chunk store) are refused instead of served in
  // another mode (the fallback is still reported when this is off).
  bool strict_reuse_mode = false;
  // Prefill/decode handover through the remote store (reuse/kv_handover.h; needs
  // SchedulerOptions::handover): kv_export writes the prompt's KV and first token under this
  // handle once prefilled (the request then goes on as usual); kv_import takes the prompt's KV and
  // first token from there instead of prefilling (a failed import is prefilled, and reported).
  std::string kv_export, kv_import;

  std::vector<int32_t> prompt() const;
};

// Thread-safe handoff from the engine thread to a reader (an HTTP thread, a test). The engine
// appends tokens and finally marks the stream finished; the reader drains with wait().
class RequestStream {
 public:
  struct Chunk {
    std::vector<int32_t> tokens;         // new tokens since the previous wait()
    std::vector<TokenLogprob> logprobs;  // one per token when the request asked for them
    bool finished = false;
    FinishReason reason = FinishReason::kNone;
    std::string error;
  };

  // Blocks up to `timeout` for news (tokens or the end); returns what arrived.
  Chunk wait(std::chrono::milliseconds timeout);
  // Drains until finished; returns every token (tests, non-streaming requests).
  Chunk wait_all();

  // Asks the engine to stop this request; its sequence and pages are freed at the next step.
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  int32_t prompt_tokens() const { return prompt_tokens_; }
  // Prompt tokens whose KV came from the chunk store instead of being computed (0 until
  // chunk reuse lands; set by the engine before the first token).
  int32_t cached_tokens() const { return cached_tokens_.load(); }
  int32_t preemptions() const { return preemptions_.load(); }
  // How the prompt was prefilled (set by the engine before the first token).
  ReusePath path() const;
  // Time from submit to the first token and between tokens, in seconds (for metrics).
  std::vector<double> token_gaps() const;

  // ---- engine side ----
  void push(int32_t token, const TokenLogprob* logprob = nullptr);
  void finish(FinishReason reason, std::string error = {});

 private:
  friend class Scheduler;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> pending_;
  std::vector<TokenLogprob> pending_logprobs_;
  bool finished_ = false, reported_finish_ = false;
  FinishReason reason_ = FinishReason::kNone;
  std::string error_;
  std::atomic<bool> cancelled_{false};
  std::atomic<int32_t> cached_tokens_{0}, preemptions_{0};
  int32_t prompt_tokens_ = 0;
  ReusePath path_;
  std::chrono::steady_clock::time_point submitted_;
  std::vector<std::chrono::steady_clock::time_point> token_times_;
};

// Tensor-parallel serving (docs/tensor-parallel.md): the ranks that execute the scheduler's steps.
// The scheduler plans once, on rank 0's model and caches (the ones given to its constructor);
// every sequence change and forward it decides is then done by every rank in lockstep (one thread
// per rank, each on its shard and its own caches holding its heads), and rank 0's logits, equal
// on every rank after the lm_head all-gather, drive sampling.
struct RankGroup {
  struct Rank {
    Model* model = nullptr;
    PagedKvCache* cache = nullptr;     // head-aware
    PagedKvCache* baseline = nullptr;  // all-global over the same pool, or null
  };
  InProcessGroup* group = nullptr;
  std::vector<Rank> ranks;  // [0]: the scheduler's own model and caches
};

// What the scheduler does when a reuse prefill runs out of KV pages (a miss's prefill, the
// relocation or a recomputation forward). Errors other than out-of-memory fail the request.
enum class ReuseFallback {
  kWait,    // requeue it (pages come back as requests finish): the answer equals its answer alone
  kDense,   // prefill it densely in its mode's cache now: the answer may differ; reported
  kReject,  // fail it with an error
};
ReuseFallback parse_reuse_fallback(const std::string& name);  // wait | dense | reject
const char* reuse_fallback_name(ReuseFallback f);

struct SchedulerOptions {
  int32_t max_batch = 32;     // running sequences at most
  int32_t step_tokens = 512;  // batch tokens per step (decode rows + prefill chunks)
  int32_t max_queue = 256;    // waiting requests at most; past it submit() is refused
  // Fraction of a request's head-aware KV estimate reserved at admission: 1 never over-commits,
  // lower values admit more and rely on preemption when pages run out.
  double reserve_fraction = 1.0;
  // Chunk reuse: with a chunk store, a request of segments is prefilled in its reuse mode
  // (cached segments relocated, SPEC §4) by a ReuseJob whose forwards (reuse.chunk rows each)
  // run one per step.
  ReuseOptions reuse;                 // reuse.mode is the default mode
  ChunkStore* chunk_store = nullptr;  // null: no reuse (requests are served full, and told so)
  // All-global cache over the same pool for the baseline modes; null: they use `cache`.
  PagedKvCache* baseline_cache = nullptr;
  ReuseFallback reuse_fallback = ReuseFallback::kWait;
  // Automatic prefix caching of the prefix mode (over baseline_cache, or `cache` when that is
  // all-global): a request's longest cached block-aligned prefix is attached (shared pages) and
  // its prompt recorded once prefilled. Null: prefix requests are served full, and told so.
  PrefixCache* prefix_cache = nullptr;
  // Set when the model's reuse settings refuse redknot mode (calibration found no setting meeting
  // its guard): the reason. redknot requests are then served with full prefill and told so
  // (fallback "redknot_disabled"), or refused when strict.
  std::string redknot_disabled;
  // The remote store of kv_export / kv_import (null: such requests are refused at submit), used
  // on the engine thread, and the fingerprint its keys carry.
  RemoteKv* handover = nullptr;
  uint64_t handover_model_fp = 0;
  // Tensor parallel: the ranks every step runs on (null: the one model). The chunk store, the
  // prefix cache and the handover are refused with ranks (not yet kept per rank here).
  RankGroup* ranks = nullptr;
};

// A consistent view of the engine for /metrics and tests.
struct SchedulerStats {
  int64_t queued = 0, running = 0;
  int64_t pool_pages = 0, free_pages = 0, page_bytes = 0;
  KvUsage usage;
  // The head-aware cache's share of global (layer, kv head) pairs: 1 when the model has no head
  // profile, so redknot requests keep every head (SchedulerOptions' cache, ReusePath's field).
  double global_head_fraction = 1.0;
  int64_t steps = 0, preemptions = 0, completed = 0, cancelled = 0, failed = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0, cached_tokens = 0;
  int64_t reuse_prefills = 0;             // requests prefilled through chunk reuse
  int64_t recomputed_tokens = 0;          // prompt tokens those prefills computed
  double flops_done = 0, flops_full = 0;  // their FLOPs, and a dense prefill's
  int64_t segments_hit = 0, segments_prefilled = 0, segments_private = 0;
  int64_t segments_remote = 0;  // of segments_hit, from the chunk store's remote tier
  // Prefill/decode handovers: prompts exported, imported, and failures (either side).
  int64_t kv_exports = 0, kv_imports = 0, kv_handover_errors = 0;
  int64_t reuse_steps = 0;  // steps that ran a reuse prefill's forward
  int64_t reuse_waits = 0;  // reuse prefills requeued for pages (fallback policy wait)
  int64_t prefix_queries = 0, prefix_hits = 0, prefix_hit_tokens = 0;  // prefix mode
  int64_t prefix_query_tokens = 0;
  int64_t prefix_reclaims = 0;   // times live requests took pages back from prefix entries
  int64_t prefix_evictions = 0;  // prefix entries dropped (room for requests, or the page budget)
  int64_t prefix_entries = 0, prefix_pages = 0;  // entries now and the pool pages they reference
  std::map<std::string, int64_t> fallbacks;      // requests served in another mode, by reason
  std::map<std::string, int64_t> modes_used;     // requests by the mode that ran
};

class QueueFull : public Error {
 public:
  using Error::Error;
};

class Scheduler {
 public:
  // `model` and `cache` must outlive the scheduler and are used only by its engine thread.
  Scheduler(Model& model, PagedKvCache& cache, SchedulerOptions options);
  ~Scheduler();  // stops the engine; unfinished requests end as cancelled
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request. Throws Error on an invalid request (empty prompt, token outside the
  // vocabulary, bad sampling values, a request the whole pool cannot hold) and QueueFull when
  // the queue is at its bound.
  std::shared_ptr<RequestStream> submit(RequestSpec spec);
  // Queues `n` completions of one prompt (OpenAI's `n`): the prompt is prefilled once and its KV
  // shared (fork, copy on write) by the others when the first token is due; completion i draws
  // with seed + i. One stream per completion, in order.
  std::vector<std::shared_ptr<RequestStream>> submit_n(RequestSpec spec, int32_t n);

  // Blocks until no request is queued or running and the stats reflect it.
  void wait_idle();
  SchedulerStats stats() const;
  // Head-aware pages a session of `tokens` tokens may need (admission estimate).
  int64_t estimate_pages(int64_t tokens) const { return estimate_pages(tokens, cache_); }
  int64_t estimate_pages(int64_t tokens, const PagedKvCache& cache) const;
  const SchedulerOptions& options() const { return opts_; }

 private:
  struct Request {
    RequestSpec spec;
    std::shared_ptr<RequestStream> stream;
    std::vector<int32_t> tokens;  // prompt ++ generated: what the sequence must hold
    int32_t prompt_len = 0;
    int32_t generated = 0;
    int64_t fed = 0;  // tokens of `tokens` already in the KV cache
    int64_t reserved_pages = 0;
    SeqId seq = -1;
    std::unique_ptr<Sampler> sampler;
    PagedKvCache* cache = nullptr;  // by its mode: head-aware or all-global
    ReusePath path;                 // mode asked and used, fallback reason
    std::unique_ptr<ReuseJob> job;  // the reuse prefill in progress (null: dense or done)
    bool reported = false;          // path published to the stream and the counters
    // The other completions of an n > 1 request, until the prompt's KV is there to share.
    std::vector<std::unique_ptr<Request>> forks;
    bool is_fork = false;  // shares another request's prompt (its tokens counted there)
  };
  using RequestPtr = std::unique_ptr<Request>;
  // A request's rows in a step's batch: `count` tokens, logits of the last one when `logits`.
  struct Row {
    Request* r;
    int64_t count;
    bool logits;
  };

  void loop();
  // One engine step; false when there was nothing to do.
  bool step();
  // Runs one cache's batch of decode rows and prefill chunks and emits their tokens; false when
  // it failed (out of pages: the newest request was preempted) and the step should end.
  bool run_group(const Batch& batch, PagedKvCache& cache, const std::vector<Row>& rows);
  void drop_cancelled();
  void admit();
  // What becomes of a request whose reuse prefill ran out of pages (the fallback policy): it runs
  // on (dense), goes back to the queue's head (wait; released) or has failed (reject).
  enum class OomAction { kRun, kRequeue, kFailed };
  // Starts a just-admitted request's reuse prefill (pins, reservations; no forward).
  OomAction start_reuse(Request& r);
  OomAction reuse_out_of_pages(Request& r, const std::string& what);
  void requeue(RequestPtr r);
  // Live requests come before cached KV: cached segments (chunk store) are demoted, then prefix
  // cache entries evicted (LRU), until the pool has `pages` free pages. Whether it has them.
  bool reclaim_cached_pages(int64_t pages);
  // Runs one forward of the oldest reuse prefill in progress; false when none is.
  bool run_reuse_forward();
  // Whether `r`'s next token needs host logits (sampling, penalties, logprobs; its forks').
  bool wants_logits(const Request& r) const;
  // Chooses `r`'s next token from host logits [vocab] (null: `greedy_id`, the device's argmax),
  // first starting its forks on the same row when they are due, and emits it.
  void sample_and_emit(Request& r, const float* logits, int32_t greedy_id);
  // Prefill/decode handover (RequestSpec::kv_export / kv_import). import_handover: false when
  // the request must be prefilled instead (the reason is in its path).
  void export_handover(Request& r, int32_t first_token);
  bool import_handover(Request& r);
  // Shares `r`'s prompt KV with its forks and emits their first tokens.
  void start_forks(Request& r, const float* logits, int32_t greedy_id);
  // Appends `token` to `r`, streams it (with its logprob from `logits`) and ends `r` when due.
  void emit(Request& r, int32_t token, const float* logits);
  // Pages a fork may need beyond the prompt it shares (admission estimate).
  int64_t fork_pages(int32_t max_tokens, const PagedKvCache& cache) const;
  void report_path(Request& r);
  PagedKvCache& cache_for(ReuseMode mode);
  SeqId take_seq_id();  // the next sequence id (wraps before INT32_MAX)
  void finish(Request& r, FinishReason reason, const std::string& error = {});
  void release(Request& r);
  void preempt(size_t running_index);
  void publish_stats();
  // Every rank's counterpart of rank 0's `cache` (one entry without ranks): sequence changes are
  // made on all of them so that the ranks' caches stay alike.
  std::vector<PagedKvCache*> rank_caches(PagedKvCache& cache) const;
  // The step's forward over `batch` on every rank (rank 0's result); throws OutOfKvMemory,
  // changing nothing on any rank, when one rank's pool cannot hold the batch (any failure once
  // the ranks run is an Error: the group is aborted).
  void forward_ranks(const Batch& batch, PagedKvCache& cache, bool greedy, Tensor* logits,
                     std::vector<int32_t>* greedy_ids);

  Model& model_;
  PagedKvCache& cache_;  // head-aware
  SchedulerOptions opts_;
  int64_t vocab_ = 0;

  mutable std::mutex mu_;  // guards queue_, stats_, stop_
  std::condition_variable cv_, idle_cv_;
  std::deque<RequestPtr> queue_;
  SchedulerStats stats_;
  int64_t submitted_ = 0;  // accepted by submit()
  bool stop_ = false;

  // Engine-thread state.
  std::vector<RequestPtr> running_;        // admission order
  std::vector<RequestPtr> started_forks_;  // joined to running_ at the end of the step
  int64_t reserved_pages_ = 0;
  // Set by a preemption, cleared when a request finishes: re-admitting at once would hit the
  // same wall again (livelock), so admission waits for pages to come back.
  bool hold_admission_ = false;
  SeqId next_seq_ = 1;
  SchedulerStats counters_;

  std::thread thread_;
};

}  // namespace redknot
