// Head placement: on deep / spread / front layouts at real shapes (8 kv heads) and at 32 kv heads,
// for 2, 4 and 8 ranks, every layer's plan is a permutation that gives each rank floor or ceil of
// the layer's global heads and no worse KV balance than before; uniform layers, one rank and
// replicated heads keep the identity; the plan is deterministic; the permuted profile reads the
// old heads through the permutation and its placement survives the JSON round trip.
#include "kv/head_placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "core/error.h"
#include "kv/layout_profile.h"
#include "loader/hf_config.h"
#include "loader/model_shapes.h"

namespace redknot {
namespace {

ModelConfig shape(const std::string& name, int64_t kv_heads = 0) {
  ModelConfig c = parse_hf_config(model_shape_config(name), name);
  if (kv_heads > 0) c.num_kv_heads = c.num_heads = kv_heads;
  return c;
}

HeadProfile layout(const ModelConfig& cfg, const std::string& name, double ratio = 0.15) {
  LayoutProfileOptions o;
  o.layout = name;
  o.ratio = ratio;
  o.seed = 7;
  return make_layout_profile(cfg, o);
}

bool is_identity(const std::vector<int32_t>& p) {
  for (size_t i = 0; i < p.size(); ++i)
    if (p[i] != static_cast<int32_t>(i)) return false;
  return true;
}

void ExpectBalanced(const HeadProfile& prof, int32_t R) {
  PlacementOptions o;
  o.ranks = R;
  const auto perm = plan_head_placement(prof, o);
  ASSERT_EQ(perm.size(), static_cast<size_t>(prof.num_layers()));
  const int32_t H = prof.num_kv_heads(), per = H / R;
  for (int32_t l = 0; l < prof.num_layers(); ++l) {
    std::vector<int32_t> sorted = perm[l];
    std::sort(sorted.begin(), sorted.end());
    ASSERT_TRUE(is_identity(sorted)) << "layer " << l << " is not a permutation";
    int32_t globals = 0;
    for (int32_t h = 0; h < H; ++h) globals += !prof.at(l, h).is_local();
    for (int32_t r = 0; r < R; ++r) {
      int32_t g = 0;
      for (int32_t i = r * per; i < (r + 1) * per; ++i) g += !prof.at(l, perm[l][i]).is_local();
      EXPECT_GE(g, globals / R) << "layer " << l << " rank " << r;
      EXPECT_LE(g, (globals + R - 1) / R) << "layer " << l << " rank " << r;
    }
  }
  const HeadProfile placed = permute_profile(prof, perm, R);
  const PlacementReport before = placement_report(prof, o), after = placement_report(placed, o);
  EXPECT_LE(after.worst_layer.globals, before.worst_layer.globals + 1e-12);
  EXPECT_LE(after.worst_layer.kv, before.worst_layer.kv + 1e-12);
  // Over all layers each rank holds floor or ceil of the global heads (the extras rotate).
  int64_t total = 0;
  std::vector<int64_t> per_rank(R, 0);
  for (int32_t l = 0; l < prof.num_layers(); ++l)
    for (int32_t i = 0; i < H; ++i)
      if (!placed.at(l, i).is_local()) ++total, ++per_rank[i / per];
  for (int32_t r = 0; r < R; ++r) EXPECT_LE(per_rank[r], (total + R - 1) / R) << "rank " << r;
  EXPECT_EQ(perm, plan_head_placement(prof, o)) << "not deterministic";
}

TEST(HeadPlacement, BalancesGlobalHeadsOnEveryLayout) {
  for (const int64_t kv : {int64_t{0}, int64_t{32}})
    for (const char* name : {"deep", "spread", "front"})
      for (const int32_t R : {2, 4, 8}) {
        SCOPED_TRACE(std::string(name) + " kv_heads " + std::to_string(kv) + " R " +
                     std::to_string(R));
        ExpectBalanced(layout(shape("llama3-8b", kv), name), R);
        ExpectBalanced(layout(shape("qwen3-32b", kv), name, 0.3), R);
      }
}

TEST(HeadPlacement, FixesAConcentratedLayer) {
  // Layer 0: heads 0-3 global (all on rank 0 of 2); layer 1: heads 0-3 global of 16 (rank 0 of 4).
  HeadProfile p(2, 16);
  for (int32_t h = 0; h < 16; ++h) {
    if (h >= 4) p.at(0, h) = {HeadClass::Local, 64, 4};
    if (h >= 4) p.at(1, h) = {HeadClass::Local, 64, 4};
  }
  PlacementOptions o;
  o.ranks = 4;
  const PlacementReport before = placement_report(p, o);
  EXPECT_DOUBLE_EQ(before.worst_layer.globals, 4.0);
  const HeadProfile placed = permute_profile(p, plan_head_placement(p, o), o.ranks);
  const PlacementReport after = placement_report(placed, o);
  EXPECT_DOUBLE_EQ(after.worst_layer.globals, 1.0);
  EXPECT_DOUBLE_EQ(after.worst_layer.kv, 1.0);
  EXPECT_DOUBLE_EQ(after.total.kv, 1.0);
  // Heads that may stay on their rank do: rank 0 keeps global head 0.
  EXPECT_EQ(placed.placement[0][0], 0);
}

TEST(HeadPlacement, BalancesBytesAcrossLocalWindows) {
  // No global heads; windows 8 sizes apart, the large ones all on rank 0.
  HeadProfile p(1, 8);
  const int32_t windows[] = {4096, 4096, 2048, 2048, 64, 64, 32, 32};
  for (int32_t h = 0; h < 8; ++h) p.at(0, h) = {HeadClass::Local, windows[h], 0};
  PlacementOptions o;
  o.ranks = 2;
  const HeadProfile placed = permute_profile(p, plan_head_placement(p, o), o.ranks);
  EXPECT_GT(placement_report(p, o).total.kv, 1.8);
  EXPECT_DOUBLE_EQ(placement_report(placed, o).total.kv, 1.0);
}

TEST(HeadPlacement, IdentityWhenNothingToBalance) {
  const ModelConfig cfg = shape("llama3-8b");
  HeadProfile all_global(static_cast<int32_t>(cfg.num_layers), 8);
  HeadProfile all_local = layout(cfg, "spread", 0.0);
  HeadProfile mixed = layout(cfg, "deep");
  for (const int32_t R : {1, 2, 4, 8}) {
    PlacementOptions o;
    o.ranks = R;
    for (const auto& row : plan_head_placement(all_global, o)) EXPECT_TRUE(is_identity(row));
    for (const auto& row : plan_head_placement(all_local, o)) EXPECT_TRUE(is_identity(row));
  }
  // One rank, or fewer kv heads than ranks (replicated): identity whatever the classes.
  for (const int32_t R : {1, 16}) {
    PlacementOptions o;
    o.ranks = R;
    for (const auto& row : plan_head_placement(mixed, o)) EXPECT_TRUE(is_identity(row));
    EXPECT_DOUBLE_EQ(placement_report(mixed, o).total.kv, 1.0);
  }
}

TEST(HeadPlacement, RejectsUnevenSplits) {
  HeadProfile p(2, 8);
  PlacementOptions o;
  o.ranks = 3;
  EXPECT_THROW(plan_head_placement(p, o), Error);
  o.ranks = 0;
  EXPECT_THROW(plan_head_placement(p, o), Error);
  EXPECT_THROW(permute_profile(p, {{0, 1, 2, 3, 4, 5, 6, 6}, {0, 1, 2, 3, 4, 5, 6, 7}}, 2), Error);
}

TEST(HeadPlacement, PermutedProfileComposesAndRoundTrips) {
  HeadProfile p = layout(shape("test-llama3"), "spread", 0.5);
  const int32_t L = p.num_layers(), H = p.num_kv_heads();
  std::vector<std::vector<int32_t>> a(L), b(L);
  for (int32_t l = 0; l < L; ++l)
    for (int32_t i = 0; i < H; ++i) a[l].push_back((i + 1) % H), b[l].push_back(H - 1 - i);
  const HeadProfile pa = permute_profile(p, a, 2);
  const HeadProfile pab = permute_profile(pa, b, 2);
  for (int32_t l = 0; l < L; ++l)
    for (int32_t i = 0; i < H; ++i) {
      EXPECT_EQ(pa.at(l, i).cls, p.at(l, a[l][i]).cls);
      EXPECT_EQ(pab.placement[l][i], a[l][b[l][i]]);  // always relative to the original heads
      EXPECT_EQ(pab.at(l, i).window, p.at(l, pab.placement[l][i]).window);
    }
  const HeadProfile back = HeadProfile::from_json(pab.to_json(), "test");
  EXPECT_EQ(back.placement, pab.placement);
  EXPECT_EQ(back.placement_ranks, 2);
  // Files without a placement load with none; a broken one is refused.
  EXPECT_TRUE(HeadProfile::from_json(p.to_json(), "test").placement.empty());
  nlohmann::json bad = pab.to_json();
  bad["placement"]["perm"][0][0] = bad["placement"]["perm"][0][1];
  EXPECT_THROW(HeadProfile::from_json(bad, "test"), Error);
}

// Not an assertion: the table the placement work reports (deep layout, Llama-3-8B shape).
TEST(HeadPlacement, PrintsImbalanceTable) {
  for (const int64_t kv : {int64_t{0}, int64_t{32}})
    for (const char* name : {"deep", "spread", "front"})
      for (const int32_t R : {2, 4, 8}) {
        const HeadProfile prof = layout(shape("llama3-8b", kv), name);
        PlacementOptions o;
        o.ranks = R;
        const PlacementReport b = placement_report(prof, o);
        const PlacementReport a =
            placement_report(permute_profile(prof, plan_head_placement(prof, o), R), o);
        std::printf(
            "llama3-8b kv=%2lld %-6s R=%d  worst-layer globals %.2f -> %.2f  kv %.2f -> %.2f  "
            "total globals %.2f -> %.2f  kv %.2f -> %.2f\n",
            static_cast<long long>(kv > 0 ? kv : 8), name, R, b.worst_layer.globals,
            a.worst_layer.globals, b.worst_layer.kv, a.worst_layer.kv, b.total.globals,
            a.total.globals, b.total.kv, a.total.kv);
        EXPECT_LE(a.worst_layer.globals, b.worst_layer.globals + 1e-12);
      }
}

}  // namespace
}  // namespace redknot
