// Where a forward pass spends its wall time, by stage (profiling; off unless asked for).
// Each mark() waits for the backend's queued work, so the times are exact per stage but the
// whole pass runs slower than without it: use it to find the bottleneck, not to report TTFT.
#pragma once
#include <chrono>
#include <map>
#include <string>

#include "backend/backend.h"

namespace redknot {

struct StageTimes {
  std::map<std::string, double> ms;  // stage name -> accumulated milliseconds
  std::map<std::string, int64_t> calls;
  double total() const {
    double t = 0;
    for (const auto& [name, v] : ms) t += v;
    return t;
  }
};

// Charges the wall time since the previous mark (or construction) to a stage; no-op when
// `times` is null.
class StageClock {
 public:
  StageClock(Backend& backend, StageTimes* times) : backend_(backend), times_(times) {
    if (times_) {
      backend_.synchronize();
      last_ = Clock::now();
    }
  }
  void mark(const char* stage) {
    if (!times_) return;
    backend_.synchronize();
    const auto now = Clock::now();
    times_->ms[stage] += std::chrono::duration<double, std::milli>(now - last_).count();
    ++times_->calls[stage];
    last_ = now;
  }

 private:
  using Clock = std::chrono::steady_clock;
  Backend& backend_;
  StageTimes* times_;
  Clock::time_point last_{};
};

}  // namespace redknot
