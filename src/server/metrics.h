// Prometheus text metrics of the server: request counts by endpoint and status, TTFT and
// inter-token latency histograms, and the engine's queue/KV state (rendered from a snapshot).
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>
#include "reuse/chunk_store.h"

#include "engine/scheduler.h"

namespace redknot::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  // A histogram with labels: `labels` goes inside {} on every line (e.g. model_name="m").
  void observe(double v);
  // Appends the _bucket/_sum/_count lines of `name`.
  void render(const std::string& name, const std::string& help, std::string& out,
              const std::string& labels = "") const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  // model_name labels the vLLM-named series (dashboards built for vLLM filter on it).
  explicit Metrics(std::string model_name = "");
  void count_request(const std::string& endpoint, int status);
  // gaps[0]: submit to first token; the rest: between tokens (seconds).
  void observe_token_gaps(const std::vector<double>& gaps);
  // chunks: the chunk store's counters, or null when the server has none.
  std::string render(const SchedulerStats& s, const ChunkStoreStats* chunks = nullptr) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::string model_label_;  // model_name="..." (escaped)
  Histogram ttft_, itl_, e2e_;
};

}  // namespace redknot::server
