#include "model/flops.h"

#include <gtest/gtest.h>

#include "kv/head_profile.h"

namespace redknot {
namespace {

// The closed form against the per-token definition, across the window and sink breakpoints.
TEST(Flops, VisibleKeysSumMatchesPerTokenSum) {
  HeadSpec global;
  HeadSpec local;
  local.cls = HeadClass::Local;
  local.window = 7;
  local.sink = 3;
  HeadSpec no_sink = local;
  no_sink.sink = 0;
  for (const HeadSpec& s : {global, local, no_sink})
    for (int64_t pos = 0; pos < 20; ++pos)
      for (int64_t n = 0; n < 25; ++n) {
        int64_t want = 0;
        for (int64_t p = pos; p < pos + n; ++p) want += visible_keys(s, p);
        EXPECT_EQ(visible_keys_sum(s, pos, n), want)
            << "cls " << int(s.cls) << " pos " << pos << " n " << n;
      }
}

TEST(Flops, SpanEqualsPerTokenLedger) {
  ModelConfig c;
  c.num_layers = 2;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  HeadProfile p(2, 2);
  p.at(1, 0).cls = HeadClass::Local;
  p.at(1, 0).window = 5;
  p.at(1, 0).sink = 2;
  for (int layer = 0; layer < 2; ++layer) {
    FlopsLedger span, each;
    attention_flops_span(c, p, layer, 3, 40, span);
    for (int64_t pos = 3; pos < 43; ++pos) attention_flops_at(c, p, layer, pos, each);
    EXPECT_DOUBLE_EQ(span.attention_global, each.attention_global);
    EXPECT_DOUBLE_EQ(span.attention_local, each.attention_local);
    EXPECT_GT(span.total(), 0);
  }
}

}  // namespace
}  // namespace redknot
