// The logit adjustments of SamplingParams, each against the published formula on a tiny
// vocabulary (vLLM/HF: repetition penalty over prompt and output, frequency and presence over the
// output, logit_bias added, stop tokens masked before min_tokens), and token_logprob.
#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"

namespace redknot {
namespace {

int32_t greedy(SamplingParams p, const std::vector<float>& logits,
               const std::vector<int32_t>& prompt = {}, const std::vector<int32_t>& seen = {},
               const std::vector<int32_t>& stops = {}) {
  Sampler s(p, prompt, stops);
  for (int32_t t : seen) s.observe(t);
  return s.sample(logits.data(), static_cast<int64_t>(logits.size()));
}

TEST(Sampler, LogitBiasIsAdded) {
  const std::vector<float> l = {1.0f, 3.0f, 2.0f};
  SamplingParams p;
  EXPECT_EQ(greedy(p, l), 1);
  p.logit_bias = {{2, 1.5f}};  // 2 + 1.5 > 3
  EXPECT_EQ(greedy(p, l), 2);
  p.logit_bias = {{1, -100.0f}};
  EXPECT_EQ(greedy(p, l), 2);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  // Token 0 (3.0, in the prompt) becomes 1.5 < 2.0: token 1 wins.
  EXPECT_EQ(greedy(p, {3.0f, 2.0f, -1.0f}, {0}), 1);
  // Without it in the prompt or output nothing changes.
  EXPECT_EQ(greedy(p, {3.0f, 2.0f, -1.0f}, {2}), 0);
  // Negative logits are multiplied: -0.4 seen -> -0.8 < -0.5.
  EXPECT_EQ(greedy(p, {-0.4f, -0.5f, -3.0f}, {}, {0}), 1);
  // Counted once whatever the count (HF/vLLM): 3.0 seen twice is still 1.5 > 1.4.
  EXPECT_EQ(greedy(p, {3.0f, 1.4f}, {}, {0, 0}), 0);
}

TEST(Sampler, FrequencyAndPresencePenaltiesCountTheOutputOnly) {
  SamplingParams p;
  p.frequency_penalty = 0.5f;
  // Token 0 seen twice: 3.0 - 2 x 0.5 = 2.0 < 2.5.
  EXPECT_EQ(greedy(p, {3.0f, 2.5f}, {}, {0, 0}), 1);
  EXPECT_EQ(greedy(p, {3.0f, 2.5f}, {}, {0}), 0);  // 2.5 vs 2.5: lower id on ties
  // The prompt does not count for them.
  EXPECT_EQ(greedy(p, {3.0f, 2.5f}, {0, 0, 0}), 0);
  SamplingParams q;
  q.presence_penalty = 0.6f;  // once, whatever the count
  EXPECT_EQ(greedy(q, {3.0f, 2.5f}, {}, {0}), 1);
  q.presence_penalty = -1.0f;  // negative: encourages repeats
  EXPECT_EQ(greedy(q, {2.0f, 2.5f}, {}, {0}), 0);
}

TEST(Sampler, MinTokensMasksStopTokensUntilReached) {
  SamplingParams p;
  p.min_tokens = 2;
  const std::vector<float> l = {0.0f, 5.0f, 1.0f};  // token 1 (a stop token) is the argmax
  EXPECT_EQ(greedy(p, l, {}, {}, {1}), 2);
  EXPECT_EQ(greedy(p, l, {}, {7}, {1}), 2);
  EXPECT_EQ(greedy(p, l, {}, {7, 8}, {1}), 1);  // two generated: stop tokens allowed again
  // Sampled too: the masked token is never drawn.
  p.temperature = 1.0f;
  Sampler s(p, {}, {1});
  for (int i = 0; i < 200; ++i) EXPECT_NE(s.sample(l.data(), 3), 1);
}

TEST(Sampler, NeedsLogitsOnlyWhenTheArgmaxIsNotTheAnswer) {
  SamplingParams p;
  EXPECT_FALSE(Sampler(p).needs_logits());
  p.presence_penalty = 0.1f;
  EXPECT_TRUE(Sampler(p).needs_logits());
  SamplingParams t;
  t.temperature = 0.5f;
  EXPECT_TRUE(Sampler(t).needs_logits());
}

TEST(Sampler, ValidatesPenalties) {
  SamplingParams p;
  p.presence_penalty = 2.5f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.repetition_penalty = 0.0f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.min_tokens = -1;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.logit_bias = {{0, NAN}};
  EXPECT_THROW(p.validate(), Error);
}

TEST(TokenLogprob, IsLogSoftmaxWithOrderedAlternatives) {
  const std::vector<float> l = {1.0f, 3.0f, 2.0f, 3.0f};
  double z = 0;
  for (float v : l) z += std::exp(v);
  TokenLogprob lp = token_logprob(l.data(), 4, 2, 3);
  EXPECT_EQ(lp.token, 2);
  EXPECT_NEAR(lp.logprob, 2.0 - std::log(z), 1e-6);
  ASSERT_EQ(lp.top.size(), 3u);
  EXPECT_EQ(lp.top[0].first, 1);  // ties: lower id first
  EXPECT_EQ(lp.top[1].first, 3);
  EXPECT_EQ(lp.top[2].first, 2);
  EXPECT_NEAR(lp.top[0].second, 3.0 - std::log(z), 1e-6);
  EXPECT_TRUE(token_logprob(l.data(), 4, 0, 0).top.empty());
  EXPECT_THROW(token_logprob(l.data(), 4, 4, 0), Error);
}

}  // namespace
}  // namespace redknot
