#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kv/head_profile.h"
#include "model/flops.h"

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

void RequestStream::push(int32_t token) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back(token);
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

// ---- Scheduler ----

Scheduler::Scheduler(Model& model, PagedKvCache& cache, SchedulerOptions options)
    : model_(model), cache_(cache), opts_(options), vocab_(model.config().vocab_size) {
  if (opts_.max_batch <= 0) throw Error("scheduler: max_batch must be positive");
  if (opts_.step_tokens <= 0) throw Error("scheduler: step_tokens must be positive");
  if (opts_.max_queue < 0) throw Error("scheduler: max_queue must be >= 0");
  if (!(opts_.reserve_fraction >= 0.0 && opts_.reserve_fraction <= 1.0))
    throw Error("scheduler: reserve_fraction must be in [0, 1]");
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

int64_t Scheduler::estimate_pages(int64_t tokens) const {
  return cache_.profile().peak_pages_for(tokens, cache_.pool().page_size());
}

std::shared_ptr<RequestStream> Scheduler::submit(RequestSpec spec) {
  auto r = std::make_unique<Request>();
  r->tokens = spec.prompt();
  if (r->tokens.empty()) throw Error("the prompt is empty");
  for (int32_t t : r->tokens)
    if (t < 0 || t >= vocab_)
      throw Error("prompt token id " + std::to_string(t) + " outside the vocabulary [0, " +
                  std::to_string(vocab_) + ")");
  if (spec.max_tokens <= 0) throw Error("max_tokens must be positive");
  spec.sampling.validate();
  const int64_t ctx = model_.config().max_position_embeddings;
  const int64_t total = static_cast<int64_t>(r->tokens.size()) + spec.max_tokens;
  if (ctx > 0 && total > ctx)
    throw Error("prompt (" + std::to_string(r->tokens.size()) + " tokens) + max_tokens (" +
                std::to_string(spec.max_tokens) + ") exceeds the context length " +
                std::to_string(ctx));
  const int64_t need = estimate_pages(total);
  if (need > cache_.pool().num_pages())
    throw Error("the request needs about " + std::to_string(need) + " KV pages; the pool has " +
                std::to_string(cache_.pool().num_pages()));
  r->prompt_len = static_cast<int32_t>(r->tokens.size());
  r->sampler = std::make_unique<Sampler>(spec.sampling);
  r->stream = std::make_shared<RequestStream>();
  r->stream->prompt_tokens_ = r->prompt_len;
  r->stream->submitted_ = std::chrono::steady_clock::now();
  r->spec = std::move(spec);
  auto stream = r->stream;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int64_t>(queue_.size()) >= opts_.max_queue)
      throw QueueFull("request queue is full (" + std::to_string(queue_.size()) + " waiting)");
    queue_.push_back(std::move(r));
    ++submitted_;
  }
  cv_.notify_all();
  return stream;
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
  s.free_pages = cache_.pool().num_free();
  s.page_bytes = cache_.pool().bytes_per_page();
  s.usage = cache_.usage();
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

void Scheduler::release(Request& r) {
  if (r.seq >= 0 && cache_.has_sequence(r.seq)) cache_.remove_sequence(r.seq);
  r.seq = -1;
  r.fed = 0;
  reserved_pages_ -= r.reserved_pages;
  r.reserved_pages = 0;
}

void Scheduler::finish(Request& r, FinishReason reason, const std::string& error) {
  release(r);
  hold_admission_ = false;
  counters_.prompt_tokens += r.prompt_len;
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
      const int64_t need = static_cast<int64_t>(
          std::ceil(static_cast<double>(estimate_pages(total)) * opts_.reserve_fraction));
      // FIFO: a request that does not fit blocks those behind it (no starvation of big ones).
      if (!running_.empty() && reserved_pages_ + need > pool_pages) return;
      r = std::move(queue_.front());
      queue_.pop_front();
      r->reserved_pages = need;
    }
    reserved_pages_ += r->reserved_pages;
    r->seq = next_seq_;
    next_seq_ = next_seq_ == INT32_MAX ? 1 : next_seq_ + 1;
    cache_.add_sequence(r->seq);
    r->fed = 0;
    r->stream->cached_tokens_.store(0);
    if (r->generated == 0) reuse_prefill(*r);
    running_.push_back(std::move(r));
  }
}

bool Scheduler::reuse_prefill(Request& r) {
  const ReuseMode mode = r.spec.reuse_mode.value_or(opts_.reuse.mode);
  // Prefix needs a cache of whole chains (the eval harness has one); here it is dense prefill.
  if (!opts_.lookup || mode == ReuseMode::Full || mode == ReuseMode::Prefix ||
      r.spec.segments.empty() || r.spec.query.empty())
    return false;
  SegmentedPrompt p;
  p.segments = r.spec.segments;
  p.query.assign(r.spec.query.begin(), r.spec.query.end() - 1);
  ReuseOptions ro = opts_.reuse;
  ro.mode = mode;
  try {
    PrefillOutcome out = prefill_with_reuse(model_, cache_, r.seq, p, opts_.lookup, ro);
    r.fed = p.total_tokens();
    r.stream->cached_tokens_.store(static_cast<int32_t>(out.reused_tokens));
    ++counters_.reuse_prefills;
    counters_.cached_tokens += out.reused_tokens;
    counters_.recomputed_tokens += p.total_tokens() - out.reused_tokens;
    counters_.flops_done += out.flops.total();
    counters_.flops_full +=
        prefill_flops(model_.config(), HeadProfile::native(model_.config()), 0, p.total_tokens(), 1)
            .total();
    return true;
  } catch (const std::exception&) {
    // Out of pages (or a cache problem): start over densely; the normal steps may preempt.
    cache_.remove_sequence(r.seq);
    cache_.add_sequence(r.seq);
    r.fed = 0;
    return false;
  }
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

bool Scheduler::step() {
  Batch batch;
  struct Row {
    Request* r;
    int64_t count;
    bool logits;
  };
  std::vector<Row> rows;
  int64_t budget = opts_.step_tokens;
  // Decode rows first (one token each) so that running requests never stall behind prefills.
  for (auto& rp : running_) {
    Request& r = *rp;
    const int64_t left = static_cast<int64_t>(r.tokens.size()) - r.fed;
    if (left != 1 || budget <= 0) continue;
    batch.add_sequence(r.seq, {r.tokens.back()}, static_cast<int32_t>(r.fed), true);
    rows.push_back({&r, 1, true});
    --budget;
  }
  for (auto& rp : running_) {
    Request& r = *rp;
    const int64_t left = static_cast<int64_t>(r.tokens.size()) - r.fed;
    if (left <= 1 || budget <= 0) continue;
    const int64_t n = std::min(left, budget);
    const bool last = n == left;
    std::vector<int32_t> chunk(r.tokens.begin() + r.fed, r.tokens.begin() + r.fed + n);
    batch.add_sequence(r.seq, chunk, static_cast<int32_t>(r.fed), last);
    rows.push_back({&r, n, last});
    budget -= n;
  }
  if (rows.empty()) return false;

  // When every row that samples is greedy, the argmax runs on the device and only the ids come
  // back ([rows, vocab] logits stay there).
  bool all_greedy = true;
  for (const Row& row : rows)
    if (row.logits && row.r->spec.sampling.temperature != 0.0f) all_greedy = false;
  Tensor logits;
  std::vector<int32_t> greedy_ids;
  try {
    if (all_greedy)
      greedy_ids = model_.forward_greedy(batch, cache_);
    else
      logits = model_.forward(batch, cache_);
  } catch (const OutOfKvMemory& e) {
    // The cache is unchanged: drop the newest request and let the next step retry without it.
    if (running_.size() == 1) {
      finish(*running_[0], FinishReason::kError, std::string("KV cache too small: ") + e.what());
      running_.clear();
    } else {
      preempt(running_.size() - 1);
    }
    return true;
  } catch (const std::exception& e) {
    // Not expected (inputs are validated at submit): fail this batch's requests, keep serving.
    for (const Row& row : rows) row.r->stream->cancel();
    for (auto it = running_.begin(); it != running_.end();) {
      if ((*it)->stream->cancelled()) {
        finish(**it, FinishReason::kError, e.what());
        it = running_.erase(it);
      } else {
        ++it;
      }
    }
    return true;
  }
  ++counters_.steps;

  const int64_t ctx = model_.config().max_position_embeddings;
  int64_t logit_row = 0;
  for (const Row& row : rows) {
    Request& r = *row.r;
    r.fed += row.count;
    if (!row.logits) continue;
    const int32_t tok = all_greedy
                            ? greedy_ids.at(static_cast<size_t>(logit_row))
                            : r.sampler->sample(logits.data<float>() + logit_row * vocab_, vocab_);
    ++logit_row;
    r.tokens.push_back(tok);
    ++r.generated;
    ++counters_.generated_tokens;
    r.stream->push(tok);
    if (std::find(r.spec.stop_ids.begin(), r.spec.stop_ids.end(), tok) != r.spec.stop_ids.end()) {
      finish(r, FinishReason::kStop);
    } else if (r.generated >= r.spec.max_tokens ||
               (ctx > 0 && static_cast<int64_t>(r.tokens.size()) >= ctx)) {
      finish(r, FinishReason::kLength);
    }
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [](const RequestPtr& r) { return r->seq < 0; }),
                 running_.end());
  return true;
}

}  // namespace redknot
