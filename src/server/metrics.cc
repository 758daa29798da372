#include "server/metrics.h"

#include <cstdio>

namespace redknot::server {

namespace {
std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}
void gauge(std::string& out, const std::string& name, const std::string& help, double v,
           const std::string& type = "gauge") {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  out += name + " " + num(v) + "\n";
}
// One counter family with a label: name{label="key"} value per entry.
void family(std::string& out, const std::string& name, const std::string& help,
            const std::string& label, const std::map<std::string, int64_t>& values) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " counter\n";
  for (const auto& [key, v] : values)
    out += name + "{" + label + "=\"" + key + "\"} " + num(static_cast<double>(v)) + "\n";
}
}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::render(const std::string& name, const std::string& help, std::string& out,
                       const std::string& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  const std::string pre = labels.empty() ? "" : labels + ",";
  const std::string own = labels.empty() ? "" : "{" + labels + "}";
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    out +=
        name + "_bucket{" + pre + "le=\"" + num(bounds_[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  cum += counts_.back();
  out += name + "_bucket{" + pre + "le=\"+Inf\"} " + std::to_string(cum) + "\n";
  out += name + "_sum" + own + " " + num(sum_) + "\n" + name + "_count" + own + " " +
         std::to_string(count_) + "\n";
}

Metrics::Metrics(std::string model_name)
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}),
      e2e_({0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300}) {
  std::string esc;
  for (char c : model_name) {
    if (c == '\\' || c == '"') esc += '\\';
    if (c == '\n') {
      esc += "\\n";
      continue;
    }
    esc += c;
  }
  model_label_ = "model_name=\"" + esc + "\"";
}

void Metrics::count_request(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{endpoint, status}];
}

void Metrics::observe_token_gaps(const std::vector<double>& gaps) {
  double total = 0;
  for (size_t i = 0; i < gaps.size(); ++i) {
    (i == 0 ? ttft_ : itl_).observe(gaps[i]);
    total += gaps[i];
  }
  if (!gaps.empty()) e2e_.observe(total);
}

std::string Metrics::render(const SchedulerStats& s, const ChunkStoreStats* chunks) const {
  std::string out;
  out += "# HELP redknot_requests_total HTTP requests by endpoint and status.\n";
  out += "# TYPE redknot_requests_total counter\n";
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, n] : requests_)
      out += "redknot_requests_total{endpoint=\"" + key.first + "\",status=\"" +
             std::to_string(key.second) + "\"} " + std::to_string(n) + "\n";
  }
  ttft_.render("redknot_time_to_first_token_seconds", "Submit to first token.", out);
  itl_.render("redknot_inter_token_latency_seconds", "Time between streamed tokens.", out);
  gauge(out, "redknot_queue_depth", "Requests waiting for admission.", s.queued);
  gauge(out, "redknot_running_requests", "Requests holding a KV sequence.", s.running);
  out += "# HELP redknot_kv_pages_in_use KV pages in use by head class.\n";
  out += "# TYPE redknot_kv_pages_in_use gauge\n";
  out += "redknot_kv_pages_in_use{head_class=\"global\"} " + num(s.usage.global_pages) + "\n";
  out += "redknot_kv_pages_in_use{head_class=\"local\"} " + num(s.usage.local_pages) + "\n";
  out += "# HELP redknot_kv_tokens_held KV token slots in use by head class.\n";
  out += "# TYPE redknot_kv_tokens_held gauge\n";
  out += "redknot_kv_tokens_held{head_class=\"global\"} " + num(s.usage.global_tokens) + "\n";
  out += "redknot_kv_tokens_held{head_class=\"local\"} " + num(s.usage.local_tokens) + "\n";
  gauge(out, "redknot_kv_global_head_fraction",
        "Share of (layer, kv head) pairs kept global by the head profile (1: no profile, redknot "
        "mode keeps every head).",
        s.global_head_fraction);
  gauge(out, "redknot_kv_pool_pages_total", "Pages in the KV pool.", s.pool_pages);
  gauge(out, "redknot_kv_pool_pages_free", "Free pages in the KV pool.", s.free_pages);
  gauge(out, "redknot_engine_steps_total", "Engine forward steps.", s.steps, "counter");
  gauge(out, "redknot_preemptions_total", "Requests preempted for recompute.", s.preemptions,
        "counter");
  gauge(out, "redknot_requests_completed_total", "Requests finished normally.", s.completed,
        "counter");
  gauge(out, "redknot_requests_cancelled_total", "Requests cancelled (client gone, stop).",
        s.cancelled, "counter");
  gauge(out, "redknot_requests_failed_total", "Requests failed in the engine.", s.failed,
        "counter");
  gauge(out, "redknot_prompt_tokens_total", "Prompt tokens of finished requests.", s.prompt_tokens,
        "counter");
  gauge(out, "redknot_generated_tokens_total", "Generated tokens.", s.generated_tokens, "counter");
  gauge(out, "redknot_cached_prompt_tokens_total", "Prompt tokens served from the chunk store.",
        s.cached_tokens, "counter");
  const ChunkStoreStats cs = chunks ? *chunks : ChunkStoreStats{};
  out += "# HELP redknot_chunk_store_hits_total Chunk store hits by tier.\n";
  out += "# TYPE redknot_chunk_store_hits_total counter\n";
  out += "redknot_chunk_store_hits_total{tier=\"pool\"} " + num(cs.pool_hits) + "\n";
  out += "redknot_chunk_store_hits_total{tier=\"host\"} " + num(cs.host_hits) + "\n";
  out += "redknot_chunk_store_hits_total{tier=\"disk\"} " + num(cs.disk_hits) + "\n";
  out += "redknot_chunk_store_hits_total{tier=\"remote\"} " + num(cs.remote_hits) + "\n";
  gauge(out, "redknot_chunk_store_misses_total", "Chunk store misses (segment not cached).",
        cs.misses, "counter");
  out += "# HELP redknot_chunk_store_bytes Bytes held by the chunk store by tier.\n";
  out += "# TYPE redknot_chunk_store_bytes gauge\n";
  out += "redknot_chunk_store_bytes{tier=\"pool\"} " + num(cs.pool.bytes) + "\n";
  out += "redknot_chunk_store_bytes{tier=\"host\"} " + num(cs.host.bytes) + "\n";
  out += "redknot_chunk_store_bytes{tier=\"disk\"} " + num(cs.disk.bytes) + "\n";
  gauge(out, "redknot_chunk_store_pool_pages", "KV pool pages held by cached segments.",
        s.page_bytes > 0 ? cs.pool.bytes / s.page_bytes : 0);
  gauge(out, "redknot_chunk_store_entries", "Segments cached (all tiers).",
        cs.pool.entries + cs.host.entries + cs.disk.entries);
  gauge(out, "redknot_chunk_store_evictions_total", "Segments dropped from every tier.",
        cs.evictions, "counter");
  gauge(out, "redknot_chunk_store_corrupt_files_total", "Spill files found corrupt.",
        cs.corrupt_files, "counter");
  gauge(out, "redknot_chunk_store_disk_writes_total", "Segments written through to the disk tier.",
        cs.disk_writes, "counter");
  gauge(out, "redknot_chunk_store_write_errors_total", "Spill files that could not be written.",
        cs.write_errors, "counter");
  // The remote tier (--chunk-store-redis); all zero without one.
  gauge(out, "redknot_chunk_store_remote_partial_hits_total",
        "Remote hits that fetched only the rows the request keeps (local heads: sink + window).",
        cs.remote_partial_hits, "counter");
  gauge(out, "redknot_chunk_store_remote_misses_total",
        "Local misses not served by the remote tier.", cs.remote_misses, "counter");
  gauge(out, "redknot_chunk_store_remote_missing_shards_total",
        "Remote segments whose shards the remote store had dropped.", cs.remote_missing_shards,
        "counter");
  gauge(out, "redknot_chunk_store_remote_corrupt_total",
        "Remote values found corrupt or truncated (deleted, recomputed).", cs.remote_corrupt,
        "counter");
  gauge(out, "redknot_chunk_store_remote_errors_total",
        "Remote tier transport failures (each a miss).", cs.remote_errors, "counter");
  gauge(out, "redknot_chunk_store_remote_bytes_read_total", "Bytes fetched from the remote tier.",
        cs.remote_bytes_read, "counter");
  gauge(out, "redknot_chunk_store_remote_bytes_written_total", "Bytes sent to the remote tier.",
        cs.remote_bytes_written, "counter");
  gauge(out, "redknot_chunk_store_remote_writes_total", "Segments written to the remote tier.",
        cs.remote_writes, "counter");
  gauge(out, "redknot_chunk_store_remote_write_drops_total",
        "Remote writes dropped because the queue was full.", cs.remote_write_drops, "counter");
  gauge(out, "redknot_reuse_prefills_total", "Requests prefilled through chunk reuse.",
        s.reuse_prefills, "counter");
  const double prompt_reused = double(s.cached_tokens + s.recomputed_tokens);
  gauge(out, "redknot_reuse_recompute_ratio", "Recomputed / total prompt tokens under reuse.",
        prompt_reused > 0 ? s.recomputed_tokens / prompt_reused : 0.0);
  gauge(out, "redknot_reuse_flops_saved_total", "Prefill FLOPs saved by chunk reuse.",
        s.flops_full - s.flops_done, "counter");
  gauge(out, "redknot_reuse_steps_total", "Engine steps that ran a reuse prefill's forward.",
        s.reuse_steps, "counter");
  gauge(out, "redknot_reuse_waits_total",
        "Reuse prefills requeued for KV pages (--reuse-fallback wait).", s.reuse_waits, "counter");
  family(out, "redknot_reuse_segments_total", "Segments of reuse prefills by outcome.", "outcome",
         {{"hit", s.segments_hit},
          {"remote_hit", s.segments_remote},
          {"prefilled", s.segments_prefilled},
          {"private", s.segments_private}});
  family(
      out, "redknot_kv_handovers_total",
      "Prefill/decode handovers through the remote store (kv_export / kv_import).", "outcome",
      {{"exported", s.kv_exports}, {"imported", s.kv_imports}, {"failed", s.kv_handover_errors}});
  family(out, "redknot_requests_by_mode_total", "Requests by the reuse mode that ran.", "mode",
         s.modes_used);
  family(out, "redknot_reuse_fallbacks_total", "Requests not served in the mode asked, by reason.",
         "reason", s.fallbacks);
  gauge(out, "redknot_prefix_cache_queries_total", "Prefix-mode requests looked up.",
        s.prefix_queries, "counter");
  gauge(out, "redknot_prefix_cache_hits_total", "Prefix-mode requests that shared cached pages.",
        s.prefix_hits, "counter");
  gauge(out, "redknot_prefix_cache_hit_tokens_total", "Prompt tokens shared from the prefix cache.",
        s.prefix_hit_tokens, "counter");
  gauge(out, "redknot_prefix_cache_evictions_total",
        "Prefix cache entries dropped to make room for live requests or by the page budget.",
        s.prefix_evictions, "counter");
  gauge(out, "redknot_prefix_cache_reclaims_total",
        "Times a live request that ran out of KV pages took them back from prefix cache entries.",
        s.prefix_reclaims, "counter");
  gauge(out, "redknot_prefix_cache_entries", "Prefix cache entries held.", s.prefix_entries,
        "gauge");
  gauge(out, "redknot_prefix_cache_pages", "KV pool pages the prefix cache entries reference.",
        s.prefix_pages, "gauge");

  // The same quantities under the names vLLM's dashboards and autoscalers read.
  auto vllm = [&](const std::string& name, const std::string& help, double v,
                  const std::string& type) {
    out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    out += name + "{" + model_label_ + "} " + num(v) + "\n";
  };
  vllm("vllm:num_requests_running", "Requests in model execution batches.", s.running, "gauge");
  vllm("vllm:num_requests_waiting", "Requests waiting to be processed.", s.queued, "gauge");
  vllm("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
       s.pool_pages > 0 ? 1.0 - double(s.free_pages) / double(s.pool_pages) : 0.0, "gauge");
  vllm("vllm:num_preemptions_total", "Cumulative number of preemptions.", s.preemptions, "counter");
  vllm("vllm:prompt_tokens_total", "Number of prefill tokens processed.", s.prompt_tokens,
       "counter");
  vllm("vllm:generation_tokens_total", "Number of generation tokens processed.", s.generated_tokens,
       "counter");
  vllm("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of tokens.",
       s.prefix_query_tokens, "counter");
  vllm("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of tokens.",
       s.prefix_hit_tokens, "counter");
  ttft_.render("vllm:time_to_first_token_seconds", "Histogram of time to first token.", out,
               model_label_);
  itl_.render("vllm:time_per_output_token_seconds", "Histogram of time per output token.", out,
              model_label_);
  e2e_.render("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency.", out,
              model_label_);
  return out;
}

}  // namespace redknot::server
