// Token selection from one row of logits: greedy when temperature is 0, else temperature,
// top-k and top-p (nucleus) filtering and a seeded draw, so that runs are reproducible.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace redknot {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int32_t top_k = 0;         // 0: no limit
  uint64_t seed = 0;

  // Throws Error naming the bad field (negative temperature, top_p outside (0, 1], ...).
  void validate() const;
};

class Sampler {
 public:
  explicit Sampler(SamplingParams params);
  // logits: [vocab] f32
  int32_t sample(const float* logits, int64_t vocab);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

// Index of the largest logit (lowest index on ties). logits: [vocab]
int32_t argmax(const float* logits, int64_t vocab);

}  // namespace redknot
