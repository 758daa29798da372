#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kv/head_profile.h"
#include "model/flops.h"
#include "reuse/kv_handover.h"

namespace redknot {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "none";
}

std::vector<int32_t> RequestSpec::prompt() const {
  std::vector<int32_t> out;
  for (const auto& s : segments) out.insert(out.end(), s.begin(), s.end());
  out.insert(out.end(), query.begin(), query.end());
  return out;
}

// ---- RequestStream ----

RequestStream::Chunk RequestStream::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !pending_.empty() || finished_; });
  Chunk c;
  c.tokens.swap(pending_);
  c.logprobs.swap(pending_logprobs_);
  c.finished = finished_;
  c.reason = reason_;
  c.error = error_;
  return c;
}

RequestStream::Chunk RequestStream::wait_all() {
  Chunk all;
  while (!all.finished) {
    Chunk c = wait(std::chrono::milliseconds(100));
    all.tokens.insert(all.tokens.end(), c.tokens.begin(), c.tokens.end());
    all.logprobs.insert(all.logprobs.end(), c.logprobs.begin(), c.logprobs.end());
    all.finished = c.finished;
    all.reason = c.reason;
    all.error = c.error;
  }
  return all;
}

std::vector<double> RequestStream::token_gaps() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<double> gaps;
  auto prev = submitted_;
  for (auto t : token_times_) {
    gaps.push_back(std::chrono::duration<double>(t - prev).count());
    prev = t;
  }
  return gaps;
}

void RequestStream::push(int32_t token, const TokenLogprob* logprob) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back(token);
    if (logprob) pending_logprobs_.push_back(*logprob);
    token_times_.push_back(std::chrono::steady_clock::now());
  }
  cv_.notify_all();
}

void RequestStream::finish(FinishReason reason, std::string error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    finished_ = true;
    reason_ = reason;
    error_ = std::move(error);
  }
  cv_.notify_all();
}

ReusePath RequestStream::path() const {
  std::lock_guard<std::mutex> lock(mu_);
  return path_;
}

ReuseFallback parse_reuse_fallback(const std::string& name) {
  if (name == "wait") return ReuseFallback::kWait;
  if (name == "dense") return ReuseFallback::kDense;
  if (name == "reject") return ReuseFallback::kReject;
  throw Error("unknown reuse fallback '" + name + "' (available: wait, dense, reject)");
}

const char* reuse_fallback_name(ReuseFallback f) {
  switch (f) {
    case ReuseFallback::kWait:
      return "wait";
    case ReuseFallback::kDense:
      return "dense";
    case ReuseFallback::kReject:
      return "reject";
  }
  return "?";
}

// ---- Scheduler ----

Scheduler::Scheduler(Model& model, PagedKvCache& cache, SchedulerOptions options)
    : model_(model), cache_(cache), opts_(options), vocab_(model.config().vocab_size) {
  if (opts_.max_batch <= 0) throw Error("scheduler: max_batch must be positive");
  if (opts_.step_tokens <= 0) throw Error("scheduler: step_tokens must be positive");
  if (opts_.max_queue < 0) throw Error("scheduler: max_queue must be >= 0");
  if (!(opts_.reserve_fraction >= 0.0 && opts_.reserve_fraction <= 1.0))
    throw Error("scheduler: reserve_fraction must be in [0, 1]");
  if (opts_.baseline_cache && &opts_.baseline_cache->pool() != &cache_.pool())
    throw Error("scheduler: the baseline cache must share the request cache's pool");
  if (opts_.reuse.chunk < 0) throw Error("scheduler: reuse chunk must be >= 0");
  if (opts_.ranks) {
    const RankGroup& g = *opts_.ranks;
    if (g.group == nullptr || g.ranks.empty() ||
        g.group->size() != static_cast<int>(g.ranks.size()))
      throw Error("scheduler: a rank group needs its communicator and one entry per rank");
    if (g.ranks[0].model != &model_ || g.ranks[0].cache != &cache_ ||
        g.ranks[0].baseline != opts_.baseline_cache)
      throw Error("scheduler: rank 0 must be the scheduler's own model and caches");
    for (const RankGroup::Rank& r : g.ranks)
      if (!r.model || !r.cache || (opts_.baseline_cache != nullptr) != (r.baseline != nullptr))
        throw Error("scheduler: every rank needs its model and the same caches as rank 0");
    // Kept per rank by generate's SPMD path, not yet by the scheduler's steps.
    for (const RankGroup::Rank& r : g.ranks)
      if (r.cache->pool().num_pages() != cache_.pool().num_pages())
        throw Error("scheduler: every rank's KV pool must have rank 0's page count");
    if (opts_.chunk_store || opts_.prefix_cache || opts_.handover)
      throw Error(
          "scheduler: tensor parallel serving runs without the chunk store, the prefix cache "
          "and the KV handover (not yet kept per rank)");
  }
  counters_.global_head_fraction = cache_.global_head_fraction();  // fixed with the cache
  publish_stats();
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int64_t Scheduler::estimate_pages(int64_t tokens, const PagedKvCache& cache) const {
  // Tensor parallel: the fullest rank's need (a rank holding more global heads needs more pages;
  // every rank's pool has the same size), so that admission fits every rank.
  int64_t pages = 0;
  for (PagedKvCache* c : rank_caches(const_cast<PagedKvCache&>(cache)))
    pages = std::max(pages, c->profile().peak_pages_for(tokens, cache_.pool().page_size()));
  return pages;
}

std::vector<PagedKvCache*> Scheduler::rank_caches(PagedKvCache& cache) const {
  if (!opts_.ranks) return {&cache};
  const bool baseline = &cache != &cache_;
  std::vector<PagedKvCache*> out;
  for (const RankGroup::Rank& r : opts_.ranks->ranks)
    out.push_back(baseline ? r.baseline : r.cache);
  return out;
}

void Scheduler::forward_ranks(const Batch& batch, PagedKvCache& cache, bool greedy, Tensor* logits,
                              std::vector<int32_t>* greedy_ids) {
  if (!opts_.ranks) {
    if (greedy)
      *greedy_ids = model_.forward_greedy(batch, cache);
    else
      *logits = model_.forward(batch, cache);
    return;
  }
  // One rank out of pages would leave the others waiting in a collective (and their caches
  // changed): every pool is checked first, and the step is refused on all ranks alike.
  const std::vector<PagedKvCache*> caches = rank_caches(cache);
  for (PagedKvCache* c : caches) {
    const int64_t need = c->pages_needed(batch);
    if (need > c->pool().num_free())
      throw OutOfKvMemory("KV pool: batch needs " + std::to_string(need) + " pages, " +
                          std::to_string(c->pool().num_free()) + " free on a rank");
  }
  try {
    run_ranks(*opts_.ranks->group, [&](int rank) {
      Model& m = *opts_.ranks->ranks[static_cast<size_t>(rank)].model;
      PagedKvCache& c = *caches[static_cast<size_t>(rank)];
      if (greedy) {
        std::vector<int32_t> ids = m.forward_greedy(batch, c);
        if (rank == 0) *greedy_ids = std::move(ids);
      } else {
        Tensor t = m.forward(batch, c);
        if (rank == 0) *logits = std::move(t);
      }
    });
  } catch (const OutOfKvMemory& e) {
    // Past the check the group is aborted and the ranks' caches may differ: not the "nothing
    // changed, preempt and retry" case, so the batch fails instead.
    throw Error(std::string("tensor parallel step: a rank ran out of KV pages mid-forward: ") +
                e.what());
  }
}

std::shared_ptr<RequestStream> Scheduler::submit(RequestSpec spec) {
  return submit_n(std::move(spec), 1).front();
}

int64_t Scheduler::fork_pages(int32_t max_tokens, const PagedKvCache& cache) const {
  // Its own tokens, and a private copy of each head's last shared page (copy on write).
  return estimate_pages(max_tokens + cache_.pool().page_size(), cache);
}

std::vector<std::shared_ptr<RequestStream>> Scheduler::submit_n(RequestSpec spec, int32_t n) {
  if (n < 1) throw Error("n must be >= 1");
  if (n > opts_.max_batch)
    throw Error("n = " + std::to_string(n) + " completions exceed the batch limit of " +
                std::to_string(opts_.max_batch) + " sequences");
  auto r = std::make_unique<Request>();
  r->tokens = spec.prompt();
  if (r->tokens.empty()) throw Error("the prompt is empty");
  for (int32_t t : r->tokens)
    if (t < 0 || t >= vocab_)
      throw Error("prompt token id " + std::to_string(t) + " outside the vocabulary [0, " +
                  std::to_string(vocab_) + ")");
  if (spec.max_tokens <= 0) throw Error("max_tokens must be positive");
  if (spec.logprobs < -1) throw Error("logprobs must be >= 0");
  if ((!spec.kv_export.empty() || !spec.kv_import.empty()) && opts_.handover == nullptr)
    throw Error("kv_export / kv_import need a remote store (serve --chunk-store-redis)");
  if (!spec.kv_export.empty() && !spec.kv_import.empty())
    throw Error("kv_export and kv_import are exclusive (a request prefills or imports)");
  if (!spec.kv_import.empty() && n > 1) throw Error("kv_import is not supported with n > 1");
  spec.sampling.validate();
  const int64_t ctx = model_.config().max_position_embeddings;
  const int64_t total = static_cast<int64_t>(r->tokens.size()) + spec.max_tokens;
  if (ctx > 0 && total > ctx)
    throw Error("prompt (" + std::to_string(r->tokens.size()) + " tokens) + max_tokens (" +
                std::to_string(spec.max_tokens) + ") exceeds the context length " +
                std::to_string(ctx));
  // The mode that will run: a reuse mode without a chunk store is served full and told so (or
  // refused, when the request insists).
  r->path.requested = spec.reuse_mode.value_or(opts_.reuse.mode);
  r->path.used = r->path.requested;
  const bool prefix = r->path.requested == ReuseMode::Prefix;
  if (r->path.requested == ReuseMode::RedKnot && !opts_.redknot_disabled.empty()) {
    if (spec.strict_reuse_mode)
      throw Error("reuse mode 'redknot' is disabled for this model: " + opts_.redknot_disabled);
    r->path.used = ReuseMode::Full;
    r->path.fallback = "redknot_disabled";
  } else if (r->path.requested != ReuseMode::Full &&
             (prefix ? opts_.prefix_cache == nullptr : opts_.chunk_store == nullptr)) {
    if (spec.strict_reuse_mode)
      throw Error(std::string("reuse mode '") + reuse_mode_name(r->path.requested) +
                  "' is not available: the server runs without a " +
                  (prefix ? "prefix cache" : "chunk store"));
    r->path.used = ReuseMode::Full;
    r->path.fallback = "reuse_disabled";
  }
  r->cache = &cache_for(r->path.used);
  r->path.global_head_fraction = r->cache->global_head_fraction();
  const int64_t need =
      estimate_pages(total, *r->cache) + (n - 1) * fork_pages(spec.max_tokens, *r->cache);
  if (need > cache_.pool().num_pages())
    throw Error("the request needs about " + std::to_string(need) + " KV pages; the pool has " +
                std::to_string(cache_.pool().num_pages()));
  r->prompt_len = static_cast<int32_t>(r->tokens.size());
  const auto now = std::chrono::steady_clock::now();
  auto make_stream = [&] {
    auto st = std::make_shared<RequestStream>();
    st->prompt_tokens_ = r->prompt_len;
    st->submitted_ = now;
    return st;
  };
  r->sampler = std::make_unique<Sampler>(spec.sampling, r->tokens, spec.stop_ids);
  r->stream = make_stream();
  std::vector<std::shared_ptr<RequestStream>> streams = {r->stream};
  for (int32_t i = 1; i < n; ++i) {
    auto f = std::make_unique<Request>();
    f->spec = spec;
    f->spec.sampling.seed = spec.sampling.seed + static_cast<uint64_t>(i);
    f->tokens = r->tokens;
    f->prompt_len = r->prompt_len;
    f->cache = r->cache;
    f->path = r->path;
    f->sampler = std::make_unique<Sampler>(f->spec.sampling, f->tokens, f->spec.stop_ids);
    f->stream = make_stream();
    f->is_fork = true;
    streams.push_back(f->stream);
    r->forks.push_back(std::move(f));
  }
  r->spec = std::move(spec);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int64_t>(queue_.size()) >= opts_.max_queue)
      throw QueueFull("request queue is full (" + std::to_string(queue_.size()) + " waiting)");
    queue_.push_back(std::move(r));
    submitted_ += n;
  }
  cv_.notify_all();
  return streams;
}

void Scheduler::wait_idle() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [&] {
    return stop_ || (stats_.completed + stats_.cancelled + stats_.failed == submitted_ &&
                     stats_.running == 0 && stats_.queued == 0);
  });
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Scheduler::publish_stats() {
  SchedulerStats s = counters_;
  s.running = static_cast<int64_t>(running_.size());
  s.pool_pages = cache_.pool().num_pages();
  // Tensor parallel: the fullest rank's free pages, the ones that bound admission and steps.
  s.free_pages = cache_.pool().num_free();
  if (opts_.ranks)
    for (const RankGroup::Rank& r : opts_.ranks->ranks)
      s.free_pages = std::min<int64_t>(s.free_pages, r.cache->pool().num_free());
  s.page_bytes = cache_.pool().bytes_per_page();
  s.usage = cache_.usage();
  if (opts_.baseline_cache) {
    const KvUsage b = opts_.baseline_cache->usage();
    s.usage.global_pages += b.global_pages;
    s.usage.local_pages += b.local_pages;
    s.usage.global_tokens += b.global_tokens;
    s.usage.local_tokens += b.local_tokens;
  }
  if (opts_.prefix_cache) {
    const PrefixCacheStats p = opts_.prefix_cache->counters();
    s.prefix_evictions = p.evictions;
    s.prefix_entries = p.entries;
    s.prefix_pages = p.pages;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.queued = static_cast<int64_t>(queue_.size());
    stats_ = s;
  }
  idle_cv_.notify_all();
}

void Scheduler::loop() {
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) break;
    }
    drop_cancelled();
    admit();
    if (running_.empty()) {
      // Idle: entries whose disk write was deferred (queue full) go to the disk tier now.
      if (opts_.chunk_store) opts_.chunk_store->persist_new();
      publish_stats();
      std::unique_lock<std::mutex> lock(mu_);
      // Wake now and then to notice cancellations of queued requests.
      cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return stop_ || !queue_.empty(); });
      continue;
    }
    step();
    publish_stats();
  }
  // Shutdown: nothing is left hanging.
  for (auto& r : running_) finish(*r, FinishReason::kCancelled, "server shutting down");
  running_.clear();
  std::deque<RequestPtr> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    rest.swap(queue_);
  }
  for (auto& r : rest) finish(*r, FinishReason::kCancelled, "server shutting down");
  publish_stats();
}

SeqId Scheduler::take_seq_id() {
  const SeqId id = next_seq_;
  next_seq_ = next_seq_ == INT32_MAX ? 1 : next_seq_ + 1;
  return id;
}

PagedKvCache& Scheduler::cache_for(ReuseMode mode) {
  if (reuse_mode_uses_head_profile(mode) || opts_.baseline_cache == nullptr) return cache_;
  return *opts_.baseline_cache;
}

void Scheduler::release(Request& r) {
  r.job.reset();  // unpins its segments, abandons reserved misses
  if (r.seq >= 0 && r.cache->has_sequence(r.seq))
    for (PagedKvCache* c : rank_caches(*r.cache)) c->remove_sequence(r.seq);
  r.seq = -1;
  r.fed = 0;
  reserved_pages_ -= r.reserved_pages;
  r.reserved_pages = 0;
}

void Scheduler::finish(Request& r, FinishReason reason, const std::string& error) {
  // Completions waiting to share this prompt end with it.
  for (RequestPtr& f : r.forks) finish(*f, reason, error);
  r.forks.clear();
  report_path(r);
  release(r);
  hold_admission_ = false;
  if (!r.is_fork) counters_.prompt_tokens += r.prompt_len;
  switch (reason) {
    case FinishReason::kCancelled:
      ++counters_.cancelled;
      break;
    case FinishReason::kError:
      ++counters_.failed;
      break;
    default:
      ++counters_.completed;
      break;
  }
  r.stream->finish(reason, error);
}

void Scheduler::drop_cancelled() {
  std::vector<RequestPtr> gone;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if ((*it)->stream->cancelled()) {
        gone.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& r : gone) finish(*r, FinishReason::kCancelled);
  for (auto it = running_.begin(); it != running_.end();) {
    if ((*it)->stream->cancelled()) {
      finish(**it, FinishReason::kCancelled);
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
}

void Scheduler::admit() {
  const int64_t pool_pages = cache_.pool().num_pages();
  while (static_cast<int32_t>(running_.size()) < opts_.max_batch) {
    if (hold_admission_ && !running_.empty()) return;
    RequestPtr r;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (queue_.empty()) return;
      Request& head = *queue_.front();
      const int64_t total = head.prompt_len + head.spec.max_tokens;
      const int64_t forks = static_cast<int64_t>(head.forks.size());
      const int64_t need = static_cast<int64_t>(
          std::ceil(static_cast<double>(estimate_pages(total, *head.cache) +
                                        forks * fork_pages(head.spec.max_tokens, *head.cache)) *
                    opts_.reserve_fraction));
      // FIFO: a request that does not fit blocks those behind it (no starvation of big ones).
      if (!running_.empty() && reserved_pages_ + need > pool_pages) return;
      // Its completions join the batch together (n <= max_batch, checked at submit).
      if (!running_.empty() && static_cast<int64_t>(running_.size()) + 1 + forks > opts_.max_batch)
        return;
      r = std::move(queue_.front());
      queue_.pop_front();
      r->reserved_pages = need;
    }
    reserved_pages_ += r->reserved_pages;
    r->seq = take_seq_id();
    for (PagedKvCache* c : rank_caches(*r->cache)) c->add_sequence(r->seq);
    r->fed = 0;
    r->stream->cached_tokens_.store(0);
    // A handed-over prompt: its KV and first token come from the remote store, no prefill.
    if (!r->spec.kv_import.empty() && r->generated == 0 && import_handover(*r)) {
      running_.push_back(std::move(r));
      continue;
    }
    if (r->path.used != ReuseMode::Full) {
      const OomAction a = start_reuse(*r);
      if (a == OomAction::kRequeue) {
        requeue(std::move(r));
        return;
      }
      if (a == OomAction::kFailed) continue;
    }
    running_.push_back(std::move(r));
  }
}

Scheduler::OomAction Scheduler::start_reuse(Request& r) {
  SegmentedPrompt p;
  p.segments = r.spec.segments;
  p.query = r.spec.query;
  ReuseOptions ro = opts_.reuse;
  ro.mode = r.path.used;
  if (ro.mode == ReuseMode::Prefix) {
    // The longest cached prefix's pages are shared into the sequence; the rest is ordinary
    // prefill work, and the prompt is recorded once prefilled (emit).
    ++counters_.prefix_queries;
    counters_.prefix_query_tokens += r.prompt_len;
    const PrefixCache::Match m =
        opts_.prefix_cache->match(std::span<const int32_t>(r.tokens.data(), r.prompt_len));
    if (m.found()) {
      r.cache->remove_sequence(r.seq);
      opts_.prefix_cache->attach(m, r.seq);
      r.fed = m.tokens;
      r.path.reused_tokens = r.path.prefix_hit_tokens = m.tokens;
      r.stream->cached_tokens_.store(m.tokens);
      ++counters_.prefix_hits;
      counters_.prefix_hit_tokens += m.tokens;
      counters_.cached_tokens += m.tokens;
    }
    return OomAction::kRun;
  }
  if (p.segments.empty() && ro.mode == ReuseMode::RedKnot) {
    // Nothing to reuse: the prompt is prefilled densely in the head-aware cache, which is what
    // redknot recomputes when nothing is cached (no fallback: the path says 0 segments).
    return OomAction::kRun;
  }
  auto start = [&] {
    r.job = std::make_unique<ReuseJob>(model_, *r.cache, r.seq, p, opts_.chunk_store, ro);
    // A job with no documents or query plans a dense pass and says so; its mode is what ran.
    r.path.used = r.job->outcome().path.used;
    if (r.path.fallback.empty()) r.path.fallback = r.job->outcome().path.fallback;
  };
  try {
    start();
    return OomAction::kRun;
  } catch (const OutOfKvMemory& e) {
    // Cached KV makes way for the request first; then the fallback policy decides.
    if (reclaim_cached_pages(r.reserved_pages)) {
      try {
        start();
        return OomAction::kRun;
      } catch (const OutOfKvMemory&) {
      }
    }
    return reuse_out_of_pages(r, e.what());
  }
}

Scheduler::OomAction Scheduler::reuse_out_of_pages(Request& r, const std::string& what) {
  r.job.reset();
  switch (opts_.reuse_fallback) {
    case ReuseFallback::kDense:
      // Start over densely in the same cache; the normal steps may still preempt it.
      for (PagedKvCache* c : rank_caches(*r.cache)) {
        c->remove_sequence(r.seq);
        c->add_sequence(r.seq);
      }
      r.fed = 0;
      r.path.used = ReuseMode::Full;
      r.path.fallback = "out_of_kv_pages";
      return OomAction::kRun;
    case ReuseFallback::kReject:
      ++counters_.fallbacks["rejected_out_of_kv_pages"];
      finish(r, FinishReason::kError,
             "the KV cache has no room for this request's reuse prefill now (" + what +
                 "); --reuse-fallback reject");
      return OomAction::kFailed;
    case ReuseFallback::kWait:
      break;
  }
  // Back to the head of the queue, as a preemption: admission holds until pages come back.
  release(r);
  ++counters_.reuse_waits;
  hold_admission_ = true;
  return OomAction::kRequeue;
}

bool Scheduler::reclaim_cached_pages(int64_t pages) {
  if (opts_.chunk_store && opts_.chunk_store->yield_pages(pages)) return true;
  if (!opts_.prefix_cache) return false;
  // Counted only when entries went (the chunk store's demotions may have made the room).
  const int64_t evicted = opts_.prefix_cache->counters().evictions;
  const bool room = opts_.prefix_cache->make_room(pages);
  if (opts_.prefix_cache->counters().evictions > evicted) ++counters_.prefix_reclaims;
  return room;
}

void Scheduler::requeue(RequestPtr r) {
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_front(std::move(r));
}

void Scheduler::preempt(size_t index) {
  RequestPtr r = std::move(running_[index]);
  running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(index));
  release(*r);  // recomputed later from prompt ++ generated; its sampler state is kept
  ++counters_.preemptions;
  hold_admission_ = true;
  r->stream->preemptions_.fetch_add(1);
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_front(std::move(r));
}

void Scheduler::report_path(Request& r) {
  if (r.reported) return;
  r.reported = true;
  ++counters_.modes_used[reuse_mode_name(r.path.used)];
  if (!r.path.fallback.empty()) ++counters_.fallbacks[r.path.fallback];
  std::lock_guard<std::mutex> lock(r.stream->mu_);
  r.stream->path_ = r.path;
}

bool Scheduler::wants_logits(const Request& r) const {
  if (r.sampler->needs_logits() || r.spec.logprobs >= 0) return true;
  if (r.generated == 0)
    for (const RequestPtr& f : r.forks)
      if (wants_logits(*f)) return true;
  return false;
}

void Scheduler::sample_and_emit(Request& r, const float* logits, int32_t greedy_id) {
  const int32_t tok = logits ? r.sampler->sample(logits, vocab_) : greedy_id;
  if (r.generated == 0 && !r.is_fork && !r.spec.kv_export.empty()) export_handover(r, tok);
  if (r.generated == 0 && !r.forks.empty()) start_forks(r, logits, greedy_id);
  emit(r, tok, logits);
}

void Scheduler::export_handover(Request& r, int32_t first_token) {
  // On the engine thread: the sequence must not change while it is read (blocking I/O, bounded
  // by the client's timeouts; a failure is reported, the request goes on).
  std::string err;
  const auto sent =
      export_kv(*r.cache, r.seq, std::span<const int32_t>(r.tokens.data(), r.prompt_len),
                first_token, *opts_.handover, opts_.handover_model_fp, r.spec.kv_export, &err);
  if (sent) {
    r.path.kv_export_bytes = sent->bytes;
    r.path.kv_token_major_bytes = sent->token_major_bytes;
    ++counters_.kv_exports;
  } else {
    r.path.kv_handover_error = "kv_export failed: " + err;
    ++counters_.kv_handover_errors;
  }
}

bool Scheduler::import_handover(Request& r) {
  std::string err;
  std::optional<HandoverBytes> got;
  try {
    got = import_kv(*r.cache, r.seq, std::span<const int32_t>(r.tokens.data(), r.prompt_len),
                    *opts_.handover, opts_.handover_model_fp, r.spec.kv_import, &err);
    if (got && (got->first_token < 0 || got->first_token >= vocab_)) {
      err = "bad first token in the handover";
      got.reset();
    }
  } catch (const OutOfKvMemory& e) {
    err = e.what();  // the sequence is unchanged: prefilled instead, like any request
  }
  if (!got) {
    // Prefilled instead, and said so.
    r.cache->remove_sequence(r.seq);
    r.cache->add_sequence(r.seq);
    r.path.kv_handover_error = "kv_import failed: " + err;
    r.path.fallback = "kv_import_failed";
    ++counters_.kv_handover_errors;
    return false;
  }
  r.fed = r.prompt_len;
  r.path.kv_import_bytes = got->bytes;
  r.path.kv_token_major_bytes = got->token_major_bytes;
  r.path.reused_tokens = r.prompt_len;
  r.stream->cached_tokens_.store(r.prompt_len);
  counters_.cached_tokens += r.prompt_len;
  ++counters_.kv_imports;
  emit(r, got->first_token, nullptr);
  return true;
}

void Scheduler::start_forks(Request& r, const float* logits, int32_t greedy_id) {
  report_path(r);
  const int64_t share = fork_pages(r.spec.max_tokens, *r.cache);
  for (RequestPtr& f : r.forks) {
    // The prompt's KV (and nothing else yet) is in r's sequence: share it page by page.
    f->seq = take_seq_id();
    for (PagedKvCache* c : rank_caches(*r.cache)) c->fork(r.seq, f->seq);
    f->fed = r.prompt_len;
    f->path = r.path;
    f->stream->cached_tokens_.store(r.stream->cached_tokens());
    // Its share of r's admission reservation goes with it.
    const int64_t moved = std::min(share, r.reserved_pages);
    f->reserved_pages = moved;
    r.reserved_pages -= moved;
    emit(*f, logits ? f->sampler->sample(logits, vocab_) : greedy_id, logits);
    if (f->seq >= 0) started_forks_.push_back(std::move(f));  // else it ended at once
  }
  r.forks.clear();
}

void Scheduler::emit(Request& r, int32_t tok, const float* logits) {
  report_path(r);
  if (r.generated == 0 && !r.is_fork && r.path.used == ReuseMode::Prefix && r.fed == r.prompt_len) {
    // The prompt is in the KV (the first token is not yet): later requests may share it.
    opts_.prefix_cache->insert(r.seq, std::span<const int32_t>(r.tokens.data(), r.prompt_len));
    opts_.prefix_cache->enforce_budget();
  }
  r.tokens.push_back(tok);
  ++r.generated;
  ++counters_.generated_tokens;
  r.sampler->observe(tok);
  if (r.spec.logprobs >= 0 && logits) {
    const TokenLogprob lp = token_logprob(logits, vocab_, tok, r.spec.logprobs);
    r.stream->push(tok, &lp);
  } else {
    r.stream->push(tok);
  }
  const int64_t ctx = model_.config().max_position_embeddings;
  if (std::find(r.spec.stop_ids.begin(), r.spec.stop_ids.end(), tok) != r.spec.stop_ids.end()) {
    finish(r, FinishReason::kStop);
  } else if (r.generated >= r.spec.max_tokens ||
             (ctx > 0 && static_cast<int64_t>(r.tokens.size()) >= ctx)) {
    finish(r, FinishReason::kLength);
  }
}

bool Scheduler::run_reuse_forward() {
  for (size_t i = 0; i < running_.size(); ++i) {
    Request& r = *running_[i];
    if (!r.job) continue;
    try {
      r.job->run_next();
    } catch (const OutOfKvMemory& e) {
      // Cached KV makes way first (the job retries next step); then the policy decides.
      if (reclaim_cached_pages(r.reserved_pages)) return true;
      const OomAction a = reuse_out_of_pages(r, e.what());
      if (a == OomAction::kRequeue) {
        RequestPtr self = std::move(running_[i]);
        running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
        requeue(std::move(self));
      }
      return true;
    } catch (const std::exception& e) {
      finish(r, FinishReason::kError, std::string("reuse prefill failed: ") + e.what());
      return true;
    }
    ++counters_.reuse_steps;
    if (!r.job->done()) return true;
    // The whole prompt is in the KV cache; its last row's logits give the first token.
    PrefillOutcome& out = r.job->outcome();
    r.fed = r.prompt_len;
    r.path.segments = out.path.segments;
    r.path.segments_hit = out.path.segments_hit;
    r.path.segments_remote = out.path.segments_remote;
    r.path.segments_prefilled = out.path.segments_prefilled;
    r.path.segments_private = out.path.segments_private;
    r.path.reused_tokens = out.reused_tokens;
    r.path.prefix_hit_tokens = out.path.prefix_hit_tokens;
    r.stream->cached_tokens_.store(static_cast<int32_t>(out.reused_tokens));
    ++counters_.reuse_prefills;
    counters_.cached_tokens += out.reused_tokens;
    counters_.recomputed_tokens += r.prompt_len - out.reused_tokens;
    counters_.segments_hit += out.path.segments_hit;
    counters_.segments_remote += out.path.segments_remote;
    counters_.segments_prefilled += out.path.segments_prefilled;
    counters_.segments_private += out.path.segments_private;
    counters_.flops_done += out.flops.total();
    counters_.flops_full +=
        prefill_flops(model_.config(), HeadProfile::native(model_.config()), 0, r.prompt_len, 1)
            .total();
    const std::vector<float> logits = std::move(out.last_logits);
    r.job.reset();
    // A request recomputed after a preemption has its tokens already: they are fed next.
    if (r.generated == 0) sample_and_emit(r, logits.data(), -1);
    return true;
  }
  return false;
}

bool Scheduler::step() {
  // One forward per cache in use: decode rows first (one token each, so that running requests
  // never stall behind prefills), then dense prefill chunks; one reuse forward runs between.
  struct Group {
    PagedKvCache* cache = nullptr;
    Batch batch;
    std::vector<Row> rows;
  };
  std::vector<Group> groups;
  auto group_for = [&](PagedKvCache* c) -> Group& {
    for (Group& g : groups)
      if (g.cache == c) return g;
    groups.push_back(Group{c, {}, {}});
    return groups.back();
  };
  int64_t budget = opts_.step_tokens;
  for (auto& rp : running_) {
    Request& r = *rp;
    const int64_t left = static_cast<int64_t>(r.tokens.size()) - r.fed;
    if (r.job || left != 1 || budget <= 0) continue;
    Group& g = group_for(r.cache);
    g.batch.add_sequence(r.seq, {r.tokens.back()}, static_cast<int32_t>(r.fed), true);
    g.rows.push_back({&r, 1, true});
    --budget;
  }
  // The oldest reuse prefill's next forward (its own options; at most reuse.chunk rows).
  bool worked = false;
  for (auto& rp : running_)
    if (rp->job) {
      budget -= rp->job->next_rows();
      worked = run_reuse_forward();
      break;
    }
  for (auto& rp : running_) {
    Request& r = *rp;
    const int64_t left = static_cast<int64_t>(r.tokens.size()) - r.fed;
    if (r.job || r.seq < 0 || left <= 1 || budget <= 0) continue;
    const int64_t n = std::min(left, budget);
    const bool last = n == left;
    std::vector<int32_t> chunk(r.tokens.begin() + r.fed, r.tokens.begin() + r.fed + n);
    Group& g = group_for(r.cache);
    g.batch.add_sequence(r.seq, chunk, static_cast<int32_t>(r.fed), last);
    g.rows.push_back({&r, n, last});
    budget -= n;
  }
  for (Group& g : groups) {
    if (g.rows.empty()) continue;
    worked = true;
    if (!run_group(g.batch, *g.cache, g.rows)) break;
  }
  for (RequestPtr& f : started_forks_) running_.push_back(std::move(f));
  started_forks_.clear();
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [](const RequestPtr& r) { return r->seq < 0; }),
                 running_.end());
  return worked;
}

bool Scheduler::run_group(const Batch& batch, PagedKvCache& cache, const std::vector<Row>& rows) {
  // When every row that samples is greedy, the argmax runs on the device and only the ids come
  // back ([rows, vocab] logits stay there).
  bool all_greedy = true;
  for (const Row& row : rows)
    if (row.logits && wants_logits(*row.r)) all_greedy = false;
  Tensor logits;
  std::vector<int32_t> greedy_ids;
  try {
    forward_ranks(batch, cache, all_greedy, &logits, &greedy_ids);
  } catch (const OutOfKvMemory& e) {
    // The cache is unchanged. Cached KV makes way for live requests first; else drop the newest
    // request and let the next step retry without it.
    if (reclaim_cached_pages(cache.pages_needed(batch))) return false;
    if (running_.size() == 1) {
      finish(*running_[0], FinishReason::kError, std::string("KV cache too small: ") + e.what());
    } else {
      preempt(running_.size() - 1);
    }
    return false;
  } catch (const std::exception& e) {
    // Not expected (inputs are validated at submit): fail this batch's requests, keep serving.
    for (const Row& row : rows) finish(*row.r, FinishReason::kError, e.what());
    return false;
  }
  ++counters_.steps;
  int64_t logit_row = 0;
  for (const Row& row : rows) {
    Request& r = *row.r;
    r.fed += row.count;
    if (!row.logits) continue;
    if (all_greedy)
      sample_and_emit(r, nullptr, greedy_ids.at(static_cast<size_t>(logit_row)));
    else
      sample_and_emit(r, logits.data<float>() + logit_row * vocab_, -1);
    ++logit_row;
  }
  return true;
}

}  // namespace redknot
