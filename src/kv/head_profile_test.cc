// The keep rule and KV sizing of head classes (HeadSpec / HeadProfile), against brute-force
// counts over positions.
#include "kv/head_profile.h"

#include <gtest/gtest.h>

#include "core/error.h"

namespace redknot {
namespace {

HeadSpec local(int32_t window, int32_t sink) { return {HeadClass::Local, window, sink}; }

TEST(HeadSpec, KeepRuleIsSinkUnionWindow) {
  const HeadSpec g;  // global
  const HeadSpec l = local(4, 2);
  for (int64_t pos = 0; pos < 20; ++pos) EXPECT_TRUE(g.keeps(pos, 20));
  // Next query at 10 sees keys 7, 8, 9 (and itself): window counts the query.
  for (int64_t pos = 0; pos < 10; ++pos) EXPECT_EQ(l.keeps(pos, 10), pos < 2 || pos >= 7) << pos;
  // A page holds a kept token when either end is kept (positions increase inside it).
  EXPECT_TRUE(l.keeps_any(0, 5, 10));
  EXPECT_TRUE(l.keeps_any(4, 8, 10));
  EXPECT_FALSE(l.keeps_any(2, 6, 10));
  EXPECT_TRUE(g.keeps_any(2, 6, 10));
}

TEST(HeadSpec, KeptTokensCountsWhatTheNewestTokenSees) {
  for (const HeadSpec& s : {HeadSpec{}, local(4, 2), local(1, 0), local(5, 0), local(3, 7)})
    for (int64_t tokens = 0; tokens < 30; ++tokens) {
      int64_t want = 0;
      for (int64_t pos = 0; pos < tokens; ++pos) want += s.keeps(pos, tokens - 1) ? 1 : 0;
      EXPECT_EQ(s.kept_tokens(tokens), want) << tokens;
    }
}

TEST(HeadProfile, PerHeadRuleAndPages) {
  HeadProfile p(2, 2);
  p.at(0, 1) = local(4, 2);
  p.at(1, 0) = local(64, 4);
  EXPECT_TRUE(p.keeps(0, 0, 3, 100));
  EXPECT_FALSE(p.keeps(0, 1, 3, 100));
  EXPECT_EQ(p.kept_tokens(0, 1, 100), 6);
  EXPECT_EQ(p.kept_tokens(1, 0, 100), 68);
  // page 16, 100 tokens: globals 7 pages each; locals ceil(6/16) = 1, ceil(68/16) = 5.
  EXPECT_EQ(p.pages_for(100, 16), 7 + 1 + 5 + 7);
  EXPECT_EQ(p.pages_for(100, 16, 2), 7 + 1 + 5 + 7 + 4 * 2);
  EXPECT_EQ(p.pages_for(0, 16), 0);
  // Peak while growing: locals get the straddled page and the one written before a trim,
  // never more than every token's page.
  EXPECT_EQ(p.peak_pages_for(100, 16), 7 + (1 + 2) + std::min<int64_t>(7, 5 + 2) + 7);
  EXPECT_EQ(p.peak_pages_for(10, 16), 4);
  EXPECT_EQ(HeadProfile(3, 2).peak_pages_for(100, 16), 6 * 7);
}

// A tensor-parallel rank's slice keeps its heads' classes in order, and whole() still answers
// for the whole model (plans every rank must make alike), also after a second slice.
TEST(HeadProfile, SliceKeepsTheRankHeadsAndTheWholeModel) {
  HeadProfile p(3, 4);
  for (int32_t l = 0; l < 3; ++l)
    for (int32_t h = 0; h < 4; ++h) p.at(l, h) = local(10 * l + h + 1, h);
  p.at(2, 0) = HeadSpec{};  // the only global head: layer 2, head 0
  p.placement = {{1, 0, 2, 3}, {0, 1, 2, 3}, {0, 1, 3, 2}};
  const HeadProfile s = p.slice_heads(2, 2);
  ASSERT_EQ(s.num_kv_heads(), 2);
  for (int32_t l = 0; l < 3; ++l)
    for (int32_t h = 0; h < 2; ++h) EXPECT_EQ(s.at(l, h).window, p.at(l, h + 2).window) << l << h;
  EXPECT_EQ(s.last_global_layer(), -1);         // its own heads are all local
  EXPECT_EQ(s.whole().last_global_layer(), 2);  // the model's are not
  EXPECT_EQ(s.whole().num_kv_heads(), 4);
  EXPECT_EQ(s.placement, p.placement);
  EXPECT_EQ(s.slice_heads(1, 1).whole().num_kv_heads(), 4);
  EXPECT_EQ(&p.whole(), &p);
  EXPECT_THROW(p.slice_heads(3, 2), Error);
}

}  // namespace
}  // namespace redknot
