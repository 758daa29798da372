// Token selection from one row of logits: greedy when temperature is 0, else temperature,
// top-k and top-p (nucleus) filtering and a seeded draw, so that runs are reproducible.
// Before selection the logits may be adjusted as in vLLM/OpenAI: logit_bias, the repetition
// penalty (over prompt and output), presence and frequency penalties (over the output), and
// stop tokens masked until min_tokens tokens were generated. Log-probabilities reported to
// clients are of the model's raw logits (vLLM's default, `raw_logprobs`), not the adjusted ones.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

namespace redknot {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  int32_t top_k = 0;         // 0: no limit
  uint64_t seed = 0;
  float presence_penalty = 0.0f;    // [-2, 2]: minus this for every token already generated
  float frequency_penalty = 0.0f;   // [-2, 2]: minus this times its count in the output
  float repetition_penalty = 1.0f;  // > 0: seen tokens' logits divided (> 0) or multiplied by it
  std::vector<std::pair<int32_t, float>> logit_bias;  // token id -> added to its logit
  int32_t min_tokens = 0;  // stop tokens (the sampler's `stop_ids`) masked before this many

  // Throws Error naming the bad field (negative temperature, top_p outside (0, 1], ...).
  void validate() const;
  // Whether anything but temperature/top-k/top-p changes the logits.
  bool adjusts_logits() const;
};

class Sampler {
 public:
  // `prompt`: the tokens the repetition penalty counts besides the output; `stop_ids`: the tokens
  // min_tokens holds back.
  explicit Sampler(SamplingParams params, std::span<const int32_t> prompt = {},
                   std::vector<int32_t> stop_ids = {});
  // logits: [vocab] f32. Does not record the choice (observe does).
  int32_t sample(const float* logits, int64_t vocab);
  // Records a generated token (penalties, min_tokens).
  void observe(int32_t token);
  // False when the argmax of the raw logits is the answer (device-side greedy suffices).
  bool needs_logits() const;
  const SamplingParams& params() const { return params_; }

 private:
  // logits [vocab] -> work_ [vocab], adjusted.
  const float* adjust(const float* logits, int64_t vocab);

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
  std::vector<float> work_;
  std::vector<int32_t> prompt_ids_;  // sorted, unique (repetition penalty only)
  std::vector<int32_t> stop_ids_;
  std::unordered_map<int32_t, int32_t> output_counts_;
  int32_t generated_ = 0;
};

// Index of the largest logit (lowest index on ties). logits: [vocab]
int32_t argmax(const float* logits, int64_t vocab);

// The log-probability of `token` under softmax(logits) and the `top` most likely tokens with
// theirs (descending; ties by lower id). logits: [vocab]
struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;
};
TokenLogprob token_logprob(const float* logits, int64_t vocab, int32_t token, int32_t top);

}  // namespace redknot
