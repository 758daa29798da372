// The calibration search and choice on synthetic measurements (no model): the guard, the fastest
// passing pick and its ties, refusal when nothing passes, the evaluation budget, and that the
// search's pick is the best of everything it measured.
#include "eval/calibrate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/error.h"

namespace redknot {
namespace {

CalibPoint point(double em, double top1, double saved) {
  CalibPoint p;
  p.measure.em = em, p.measure.top1 = top1, p.measure.flops_saved = saved;
  return p;
}

TEST(Calibrate, GuardNamesWhatMissed) {
  const CalibGuard g{0.99, 1.0};
  std::string why;
  EXPECT_TRUE(meets_guard(g, point(0.99, 0.99, 0.5).measure, 1.0, &why));  // drop 1.0: at the bar
  EXPECT_EQ(why, "");
  EXPECT_FALSE(meets_guard(g, point(0.985, 1.0, 0.5).measure, 1.0, &why));
  EXPECT_NE(why.find("EM drop 1.5 > 1"), std::string::npos) << why;
  EXPECT_FALSE(meets_guard(g, point(1.0, 0.98, 0.5).measure, 1.0, &why));
  EXPECT_NE(why.find("top-1 0.980 < 0.99"), std::string::npos) << why;
  // A negative allowance asks for a gain over full prefill.
  EXPECT_FALSE(meets_guard({0.9, -1.0}, point(0.5, 1.0, 0.5).measure, 0.5));
  EXPECT_TRUE(meets_guard({0.9, -1.0}, point(0.52, 1.0, 0.5).measure, 0.5));
}

TEST(Calibrate, PicksTheFastestPassingPoint) {
  const CalibGuard g{0.99, 1.0};
  std::vector<CalibPoint> pts = {point(1.0, 1.0, 0.60), point(0.95, 1.0, 0.80),  // fast, fails EM
                                 point(1.0, 0.9, 0.90),                          // fails top-1
                                 point(0.995, 0.99, 0.70), point(1.0, 1.0, 0.65)};
  EXPECT_EQ(pick_fastest(pts, g, 1.0), std::optional<size_t>(3));
  // Ties on FLOPs go to the higher EM, then the earlier point.
  pts.push_back(point(1.0, 1.0, 0.70));
  EXPECT_EQ(pick_fastest(pts, g, 1.0), std::optional<size_t>(5));
  pts.push_back(point(1.0, 1.0, 0.70));
  EXPECT_EQ(pick_fastest(pts, g, 1.0), std::optional<size_t>(5));
  // Nothing passes: nothing is picked.
  EXPECT_EQ(pick_fastest(pts, {1.0, -200.0}, 1.0), std::nullopt);
  EXPECT_EQ(pick_fastest({}, g, 1.0), std::nullopt);
}

// A synthetic model: heads below ratio 0.15 lose agreement; windows below 256 lose EM; layers 0
// and 1 cannot take Sparse FFN, the others can down to mass 0.5 (0.4 with dilation 1).
// FLOPs saved grow as ratio, window and masses fall.
CalibMeasure synthetic(const CalibSetting& s) {
  CalibMeasure m;
  m.em = 1.0, m.top1 = 1.0, m.f1 = 1.0, m.logits_cos = 0.99;
  if (s.ratio < 0.15) m.top1 = 0.9;
  if (s.window < 256) m.em -= 0.05;
  m.flops_saved = 0.7 - 0.2 * s.ratio - s.window / 10000.0;
  if (s.sparse_ffn)
    for (size_t l = 0; l < s.layer_mass.size(); ++l) {
      const double mass = std::min(1.0, s.layer_mass[l]);
      if (mass < 1 && l < 2) m.em -= 0.1;
      if (mass < (s.dilate >= 1 ? 0.4 : 0.5) - 1e-9) m.em -= 0.03;
      m.flops_saved += 0.01 * (1 - mass) - (mass < 1 ? 0.001 * s.dilate : 0);
    }
  return m;
}

TEST(Calibrate, SearchKeepsTheBestItMeasuredAndWalksEachLayer) {
  CalibGrid grid;
  grid.ratios = {0.125, 0.1875, 0.25};
  grid.windows = {128, 256, 512};
  grid.sinks = {4};
  grid.mass_ladder = {0.7, 0.5, 0.4, 0.3};
  grid.dilates = {1, 0};
  grid.max_evals = 100;
  const CalibGuard guard{0.99, 1.0};
  int seen = 0;
  const CalibResult r =
      search_reuse_settings(grid, guard, 1.0, 6, synthetic, [&](const CalibPoint&) { ++seen; });
  EXPECT_EQ(seen, static_cast<int>(r.points.size()));
  EXPECT_FALSE(r.budget_exhausted);
  EXPECT_TRUE(r.refusal.empty());
  ASSERT_TRUE(r.chosen.has_value());
  // The pick is the fastest passing point of all measured.
  for (const CalibPoint& p : r.points)
    if (p.pass) {
      EXPECT_LE(p.measure.flops_saved, r.points[*r.chosen].measure.flops_saved);
    }
  EXPECT_EQ(r.chosen, pick_fastest(r.points, guard, 1.0));
  // No setting was measured twice.
  std::set<std::string> labels;
  for (const CalibPoint& p : r.points) EXPECT_TRUE(labels.insert(p.setting.label()).second);
  // Every head cut was measured, Sparse FFN off.
  EXPECT_EQ(std::count_if(r.points.begin(), r.points.end(),
                          [](const CalibPoint& p) { return p.stage == "heads"; }),
            9);
  // What the synthetic model allows: the lowest passing ratio and window, layers 0-1 dense, the
  // others walked down to the last mass that keeps EM at dilation 1 (the ladder's 0.4).
  const CalibSetting& c = r.points[*r.chosen].setting;
  EXPECT_DOUBLE_EQ(c.ratio, 0.1875);
  EXPECT_EQ(c.window, 256);
  EXPECT_TRUE(c.sparse_ffn);
  EXPECT_EQ(c.dilate, 1);
  ASSERT_EQ(c.layer_mass.size(), 6u);
  EXPECT_EQ(c.layer_mass[0], 1.0);
  EXPECT_EQ(c.layer_mass[1], 1.0);
  for (size_t l = 2; l < 6; ++l) EXPECT_DOUBLE_EQ(c.layer_mass[l], 0.4) << l;
  // Each dense-only layer cost one measurement, each sparse layer its walk plus the failed step.
  EXPECT_EQ(std::count_if(r.points.begin(), r.points.end(),
                          [](const CalibPoint& p) { return p.stage == "ffn"; }),
            2 + 4 * 4);
  // Dilation 0 was tried on the result and failed there (0.4 needs dilation).
  const auto d0 = std::find_if(r.points.begin(), r.points.end(),
                               [](const CalibPoint& p) { return p.stage == "dilate"; });
  ASSERT_NE(d0, r.points.end());
  EXPECT_EQ(d0->setting.dilate, 0);
  EXPECT_FALSE(d0->pass);
  const std::string table = calibration_table(r, 1.0, 1.0);
  EXPECT_NE(table.find("**pass, chosen**"), std::string::npos);
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), static_cast<long>(r.points.size()) + 3);
}

TEST(Calibrate, RefusesWhenNoHeadCutPasses) {
  const CalibGrid grid = calibration_grid("quick");
  int evals = 0;
  const CalibResult r =
      search_reuse_settings(grid, {1.0, -100.0}, 0.8, 8, [&](const CalibSetting& s) {
        ++evals;
        return synthetic(s);
      });
  EXPECT_FALSE(r.chosen.has_value());
  // Only the head cuts ran: Sparse FFN never makes an approximation more accurate.
  EXPECT_EQ(evals, static_cast<int>(grid.ratios.size() * grid.windows.size() * grid.sinks.size()));
  EXPECT_NE(r.refusal.find("no setting met the guard"), std::string::npos) << r.refusal;
  EXPECT_NE(r.refusal.find("top-1 agreement >= 1"), std::string::npos) << r.refusal;
  EXPECT_NE(r.refusal.find("EM drop <= -100"), std::string::npos) << r.refusal;
}

TEST(Calibrate, StopsAtTheEvaluationBudget) {
  CalibGrid grid = calibration_grid("default");
  grid.max_evals = 5;
  const CalibResult r = search_reuse_settings(grid, {0.99, 1.0}, 1.0, 8, synthetic);
  EXPECT_EQ(r.points.size(), 5u);
  EXPECT_TRUE(r.budget_exhausted);
}

TEST(Calibrate, GridsAreBoundedAndChecked) {
  for (const std::string name : {"quick", "default", "wide"}) {
    const CalibGrid g = calibration_grid(name);
    EXPECT_NO_THROW(check_grid(g)) << name;
    EXPECT_TRUE(std::is_sorted(g.mass_ladder.rbegin(), g.mass_ladder.rend())) << name;
  }
  EXPECT_THROW(calibration_grid("huge"), Error);
  CalibGrid g = calibration_grid("quick");
  g.mass_ladder = {1.0};
  EXPECT_THROW(check_grid(g), Error);
  g = calibration_grid("quick");
  g.ratios = {};
  EXPECT_THROW(check_grid(g), Error);
}

}  // namespace
}  // namespace redknot
