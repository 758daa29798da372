#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/error.h"

namespace redknot {

void SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature))
    throw Error("temperature must be a finite number >= 0, got " + std::to_string(temperature));
  if (!(top_p > 0.0f && top_p <= 1.0f))
    throw Error("top_p must be in (0, 1], got " + std::to_string(top_p));
  if (top_k < 0) throw Error("top_k must be >= 0, got " + std::to_string(top_k));
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f))
    throw Error("presence_penalty must be in [-2, 2], got " + std::to_string(presence_penalty));
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f))
    throw Error("frequency_penalty must be in [-2, 2], got " + std::to_string(frequency_penalty));
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty))
    throw Error("repetition_penalty must be a finite number > 0, got " +
                std::to_string(repetition_penalty));
  for (const auto& [id, bias] : logit_bias)
    if (!std::isfinite(bias)) throw Error("logit_bias values must be finite");
  if (min_tokens < 0) throw Error("min_tokens must be >= 0, got " + std::to_string(min_tokens));
}

bool SamplingParams::adjusts_logits() const {
  return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f ||
         !logit_bias.empty() || min_tokens > 0;
}

int32_t argmax(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

TokenLogprob token_logprob(const float* logits, int64_t vocab, int32_t token, int32_t top) {
  if (token < 0 || token >= vocab) throw Error("token_logprob: token outside the vocabulary");
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) max_logit = std::max(max_logit, logits[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  const double log_z = max_logit + std::log(sum);
  TokenLogprob out;
  out.token = token;
  out.logprob = static_cast<float>(logits[token] - log_z);
  if (top > 0) {
    // The k best in one pass over the vocabulary, kept as a heap whose top is the worst of them
    // (no [vocab] scratch per token).
    const size_t k = static_cast<size_t>(std::min<int64_t>(top, vocab));
    auto better = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    std::vector<int32_t> best;
    best.reserve(k + 1);
    for (int64_t i = 0; i < vocab; ++i) {
      const int32_t id = static_cast<int32_t>(i);
      if (best.size() == k && !better(id, best.front())) continue;
      best.push_back(id);
      std::push_heap(best.begin(), best.end(), better);
      if (best.size() > k) {
        std::pop_heap(best.begin(), best.end(), better);
        best.pop_back();
      }
    }
    std::sort(best.begin(), best.end(), better);
    for (int32_t id : best) out.top.emplace_back(id, static_cast<float>(logits[id] - log_z));
  }
  return out;
}

Sampler::Sampler(SamplingParams params, std::span<const int32_t> prompt,
                 std::vector<int32_t> stop_ids)
    : params_(std::move(params)), rng_(params_.seed), stop_ids_(std::move(stop_ids)) {
  params_.validate();
  if (params_.repetition_penalty != 1.0f) {
    prompt_ids_.assign(prompt.begin(), prompt.end());
    std::sort(prompt_ids_.begin(), prompt_ids_.end());
    prompt_ids_.erase(std::unique(prompt_ids_.begin(), prompt_ids_.end()), prompt_ids_.end());
  }
}

bool Sampler::needs_logits() const {
  return params_.temperature != 0.0f || params_.adjusts_logits();
}

void Sampler::observe(int32_t token) {
  ++generated_;
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f ||
      params_.repetition_penalty != 1.0f)
    ++output_counts_[token];
}

const float* Sampler::adjust(const float* logits, int64_t vocab) {
  if (!params_.adjusts_logits()) return logits;
  work_.assign(logits, logits + vocab);
  auto in_vocab = [&](int32_t id) { return id >= 0 && id < vocab; };
  for (const auto& [id, bias] : params_.logit_bias)
    if (in_vocab(id)) work_[static_cast<size_t>(id)] += bias;
  if (params_.repetition_penalty != 1.0f) {
    // As vLLM/HF: each token seen in the prompt or the output once, whatever its count.
    const float p = params_.repetition_penalty;
    auto penalise = [&](int32_t id) {
      if (!in_vocab(id)) return;
      float& l = work_[static_cast<size_t>(id)];
      l = l > 0.0f ? l / p : l * p;
    };
    for (int32_t id : prompt_ids_) penalise(id);
    for (const auto& [id, n] : output_counts_)
      if (!std::binary_search(prompt_ids_.begin(), prompt_ids_.end(), id)) penalise(id);
  }
  for (const auto& [id, n] : output_counts_)
    if (in_vocab(id))
      work_[static_cast<size_t>(id)] -=
          params_.frequency_penalty * static_cast<float>(n) + params_.presence_penalty;
  if (generated_ < params_.min_tokens)
    for (int32_t id : stop_ids_)
      if (in_vocab(id)) work_[static_cast<size_t>(id)] = -std::numeric_limits<float>::infinity();
  return work_.data();
}

int32_t Sampler::sample(const float* raw_logits, int64_t vocab) {
  const float* logits = adjust(raw_logits, vocab);
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
