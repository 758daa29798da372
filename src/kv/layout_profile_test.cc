// Head profiles at fixed layouts: per-layer counts for spread / deep / front at the real shapes,
// the ratio honoured, deep keeps every layer before 3L/4 local, and the file loads back.
#include "kv/layout_profile.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "loader/hf_config.h"
#include "loader/model_shapes.h"

namespace redknot {
namespace {

ModelConfig shape(const std::string& name) {
  return parse_hf_config(model_shape_config(name), name);
}

std::vector<int> per_layer(const HeadProfile& p) {
  std::vector<int> n(p.num_layers(), 0);
  for (int32_t l = 0; l < p.num_layers(); ++l)
    for (int32_t h = 0; h < p.num_kv_heads(); ++h) n[l] += p.at(l, h).cls == HeadClass::Global;
  return n;
}

int total(const std::vector<int>& n) {
  int t = 0;
  for (int x : n) t += x;
  return t;
}

HeadProfile make(const ModelConfig& c, const std::string& layout, double ratio, uint64_t seed = 0) {
  LayoutProfileOptions o;
  o.layout = layout, o.ratio = ratio, o.window = 512, o.sink = 4, o.seed = seed;
  return make_layout_profile(c, o);
}

void expect_local_heads_have_window(const HeadProfile& p) {
  for (int32_t l = 0; l < p.num_layers(); ++l)
    for (int32_t h = 0; h < p.num_kv_heads(); ++h) {
      const HeadSpec& s = p.at(l, h);
      if (s.cls == HeadClass::Local) {
        EXPECT_EQ(s.window, 512);
        EXPECT_EQ(s.sink, 4);
      } else {
        EXPECT_EQ(s.window, 0);
        EXPECT_EQ(s.sink, 0);
      }
    }
}

TEST(LayoutProfile, SpreadPutsGlobalsInEveryLayerEvenly) {
  const ModelConfig c = shape("llama3-8b");  // 32 layers x 8 kv heads
  HeadProfile p = make(c, "spread", 0.15);
  std::vector<int> n = per_layer(p);
  EXPECT_EQ(total(n), 38);  // round(0.15 * 256)
  for (int x : n) EXPECT_TRUE(x == 1 || x == 2) << x;
  // The 6 layers with an extra head are spaced out, not bunched at one end.
  int first_half = 0;
  for (int l = 0; l < 16; ++l) first_half += n[l];
  EXPECT_EQ(first_half, 19);
  expect_local_heads_have_window(p);
  EXPECT_EQ(p.params["layout"], "spread");
  EXPECT_EQ(p.params["method"], "layout");
  EXPECT_EQ(p.params["global_heads"], 38);

  // 12.5%: exactly one global head in every layer.
  for (int x : per_layer(make(c, "spread", 0.125))) EXPECT_EQ(x, 1);
}

TEST(LayoutProfile, DeepKeepsTheFirstThreeQuartersLocal) {
  const ModelConfig c = shape("qwen3-32b");  // 64 x 8: SPEC §7, globals in layers 48-63
  HeadProfile p = make(c, "deep", 0.15);
  std::vector<int> n = per_layer(p);
  EXPECT_EQ(total(n), 77);  // round(0.15 * 512)
  for (int l = 0; l < 48; ++l) EXPECT_EQ(n[l], 0) << "layer " << l;
  for (int l = 48; l < 64; ++l) EXPECT_TRUE(n[l] == 4 || n[l] == 5) << "layer " << l;
  EXPECT_EQ(p.last_global_layer(), 63);
  EXPECT_NEAR(p.global_fraction(), 77.0 / 512, 1e-12);
  EXPECT_EQ(p.params["global_layers"], nlohmann::json::array({48, 63}));
  expect_local_heads_have_window(p);

  const ModelConfig l70 = shape("llama3.3-70b");  // 80 x 8: globals in 60-79
  std::vector<int> m = per_layer(make(l70, "deep", 0.125));
  EXPECT_EQ(total(m), 80);
  for (int l = 0; l < 60; ++l) EXPECT_EQ(m[l], 0);
  for (int l = 60; l < 80; ++l) EXPECT_EQ(m[l], 4);
}

TEST(LayoutProfile, FrontPutsGlobalsInTheFirstQuarter) {
  const ModelConfig c = shape("llama3.3-70b");
  std::vector<int> n = per_layer(make(c, "front", 0.15));
  EXPECT_EQ(total(n), 96);  // 0.15 * 640
  for (int l = 0; l < 20; ++l) EXPECT_TRUE(n[l] == 4 || n[l] == 5);
  for (int l = 20; l < 80; ++l) EXPECT_EQ(n[l], 0);
}

TEST(LayoutProfile, RatioHonouredAtEveryShape) {
  for (const ModelShape& m : model_shapes()) {
    const ModelConfig c = shape(m.name);
    const int64_t pairs = c.num_layers * c.num_kv_heads;
    for (const char* layout : {"spread", "deep", "front"})
      for (double r : {0.0, 0.125, 0.15, 0.3, 1.0}) {
        SCOPED_TRACE(std::string(m.name) + " " + layout + " " + std::to_string(r));
        HeadProfile p = make(c, layout, r);
        std::vector<int> n = per_layer(p);
        EXPECT_EQ(total(n), std::llround(r * pairs));
        const std::vector<int32_t> span =
            layout_layers(layout, static_cast<int32_t>(c.num_layers),
                          static_cast<int32_t>(c.num_kv_heads), std::llround(r * pairs));
        int lo = 1 << 30, hi = 0;
        for (int32_t l : span) lo = std::min(lo, n[l]), hi = std::max(hi, n[l]);
        EXPECT_LE(hi - lo, 1);  // as even as possible over the layout's layers
        if (std::string(layout) == "deep" && r <= 0.25) {
          for (int64_t l = 0; l < c.num_layers - (c.num_layers + 3) / 4; ++l) EXPECT_EQ(n[l], 0);
        }
      }
  }
}

TEST(LayoutProfile, TooManyGlobalsForTheQuarterWidenTheSpan) {
  ModelConfig c = shape("test-llama3");  // 4 layers x 2 kv heads
  c.num_layers = 8;
  std::vector<int> n = per_layer(make(c, "deep", 0.5));  // 8 globals: 4 full layers
  EXPECT_EQ(n, (std::vector<int>{0, 0, 0, 0, 2, 2, 2, 2}));
  n = per_layer(make(c, "front", 0.25));  // 4 globals fit the first quarter (2 layers)
  EXPECT_EQ(n, (std::vector<int>{2, 2, 0, 0, 0, 0, 0, 0}));
  c.num_layers = 2;  // deep: the last ceil(2/4) = 1 layer
  n = per_layer(make(c, "deep", 0.25));
  EXPECT_EQ(n, (std::vector<int>{0, 1}));
}

TEST(LayoutProfile, SeedPicksTheHeadsWithinALayer) {
  const ModelConfig c = shape("llama3-8b");
  HeadProfile a = make(c, "spread", 0.15, 1), b = make(c, "spread", 0.15, 1),
              d = make(c, "spread", 0.15, 2);
  EXPECT_EQ(a.to_json(), b.to_json());
  EXPECT_EQ(per_layer(a), per_layer(d));  // counts depend on the layout only
  bool differ = false;
  for (int32_t l = 0; l < a.num_layers(); ++l)
    for (int32_t h = 0; h < a.num_kv_heads(); ++h) differ |= a.at(l, h).cls != d.at(l, h).cls;
  EXPECT_TRUE(differ);
  // Not always head 0: the seed spreads the choice over the heads.
  std::vector<int> by_head(8, 0);
  for (int32_t l = 0; l < a.num_layers(); ++l)
    for (int32_t h = 0; h < 8; ++h) by_head[h] += a.at(l, h).cls == HeadClass::Global;
  int used = 0;
  for (int x : by_head) used += x > 0;
  EXPECT_GE(used, 6);
}

TEST(LayoutProfile, SavesInTheProfileFormatAndLoadsBack) {
  const ModelConfig c = shape("qwen3-8b");
  HeadProfile p = make(c, "deep", 0.15, 3);
  const std::string path = ::testing::TempDir() + "/layout_profile_test.json";
  p.save(path);
  HeadProfile q = HeadProfile::load(path);
  EXPECT_NO_THROW(q.check_matches(c, path));
  EXPECT_EQ(q.num_layers(), 36);
  EXPECT_EQ(q.num_kv_heads(), 8);
  EXPECT_EQ(per_layer(q), per_layer(p));
  EXPECT_EQ(q.params["layout"], "deep");
  EXPECT_EQ(q.params["window"], 512);
  for (int32_t l = 0; l < 27; ++l) EXPECT_EQ(per_layer(q)[l], 0);  // 3 * 36 / 4
  std::remove(path.c_str());
  ModelConfig other = shape("llama3-8b");
  EXPECT_THROW(q.check_matches(other, path), Error);
}

TEST(LayoutProfile, ModelWithItsOwnSlidingWindow) {
  ModelConfig c = shape("mistral-7b");
  c.sliding_window = 4096;  // as Mistral-7B-v0.1
  HeadProfile p = make(c, "spread", 0.15);
  int globals = 0;
  for (int32_t l = 0; l < p.num_layers(); ++l)
    for (int32_t h = 0; h < p.num_kv_heads(); ++h) {
      const HeadSpec& s = p.at(l, h);
      EXPECT_EQ(s.cls, HeadClass::Local);
      if (s.window == 4096) {
        EXPECT_EQ(s.sink, 0);
        ++globals;
      } else {
        EXPECT_EQ(s.window, 512);
        EXPECT_EQ(s.sink, 4);
      }
    }
  EXPECT_EQ(globals, 38);
}

TEST(LayoutProfile, BadOptionsAreErrors) {
  const ModelConfig c = shape("llama3-8b");
  EXPECT_THROW(make(c, "middle", 0.15), Error);
  EXPECT_THROW(make(c, "deep", 1.5), Error);
  EXPECT_THROW(make(c, "deep", -0.1), Error);
  LayoutProfileOptions o;
  o.window = 0;
  EXPECT_THROW(make_layout_profile(c, o), Error);
}

}  // namespace
}  // namespace redknot
