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
  void observe(double v);
  // Appends the _bucket/_sum/_count lines of `name`.
  void render(const std::string& name, const std::string& help, std::string& out) const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();
  void count_request(const std::string& endpoint, int status);
  // gaps[0]: submit to first token; the rest: between tokens (seconds).
  void observe_token_gaps(const std::vector<double>& gaps);
  // chunks: the chunk store's counters, or null when the server has none.
  std::string render(const SchedulerStats& s, const ChunkStoreStats* chunks = nullptr) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  Histogram ttft_, itl_;
};

}  // namespace redknot::server
