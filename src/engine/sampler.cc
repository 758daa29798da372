#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"

namespace redknot {

void SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature))
    throw Error("temperature must be a finite number >= 0, got " + std::to_string(temperature));
  if (!(top_p > 0.0f && top_p <= 1.0f))
    throw Error("top_p must be in (0, 1], got " + std::to_string(top_p));
  if (top_k < 0) throw Error("top_k must be >= 0, got " + std::to_string(top_k));
}

int32_t argmax(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

Sampler::Sampler(SamplingParams params) : params_(params), rng_(params.seed) { params_.validate(); }

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  if (params_.temperature == 0.0f) return argmax(logits, vocab);
  scratch_.clear();
  for (int64_t i = 0; i < vocab; ++i)
    scratch_.emplace_back(logits[i] / params_.temperature, static_cast<int32_t>(i));
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t keep = scratch_.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = static_cast<size_t>(params_.top_k);
    std::partial_sort(scratch_.begin(), scratch_.begin() + keep, scratch_.end(), by_logit);
    scratch_.resize(keep);
  } else {
    std::sort(scratch_.begin(), scratch_.end(), by_logit);
  }
  // Softmax over the survivors (max-subtracted), then the smallest prefix holding top_p mass.
  const float max_logit = scratch_.front().first;
  double total = 0.0;
  std::vector<double> probs(scratch_.size());
  for (size_t i = 0; i < scratch_.size(); ++i)
    total += probs[i] = std::exp(scratch_[i].first - max_logit);
  size_t n = scratch_.size();
  if (params_.top_p < 1.0f) {
    double cum = 0.0;
    for (size_t i = 0; i < scratch_.size(); ++i) {
      cum += probs[i] / total;
      if (cum >= params_.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double mass = 0.0;
  for (size_t i = 0; i < n; ++i) mass += probs[i];
  double r = std::uniform_real_distribution<double>(0.0, mass)(rng_);
  for (size_t i = 0; i < n; ++i) {
    r -= probs[i];
    if (r <= 0.0) return scratch_[i].second;
  }
  return scratch_[n - 1].second;
}

}  // namespace redknot
