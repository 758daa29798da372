#include "eval/calibrate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "core/error.h"

namespace redknot {

namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::string mass_list(const std::vector<double>& m) {
  std::string s;
  for (size_t i = 0; i < m.size(); ++i) {
    if (i) s += ',';
    s += fmt("%g", m[i]);
  }
  return s;
}

bool any_sparse(const std::vector<double>& m) {
  return std::any_of(m.begin(), m.end(), [](double x) { return x < 1; });
}

}  // namespace

std::string CalibSetting::label() const {
  // Appended piece by piece: GCC 12 warns falsely (-Wrestrict) on "literal" + std::string&&.
  std::string s = "r";
  s += fmt("%g", ratio);
  s += " w" + std::to_string(window);
  s += " s" + std::to_string(sink);
  s += " ffn ";
  if (sparse_ffn && any_sparse(layer_mass)) {
    s += mass_list(layer_mass);
    s += " d" + std::to_string(dilate);
  } else {
    s += "dense";
  }
  return s;
}

nlohmann::json CalibGuard::to_json() const {
  return {{"target_top1", target_top1}, {"max_em_drop", max_em_drop}};
}

nlohmann::json CalibPoint::to_json() const {
  nlohmann::json j = {{"stage", stage},
                      {"ratio", setting.ratio},
                      {"window", setting.window},
                      {"sink", setting.sink},
                      {"sparse_ffn", setting.sparse_ffn},
                      {"em", measure.em},
                      {"f1", measure.f1},
                      {"top1", measure.top1},
                      {"logits_cos", measure.logits_cos},
                      {"flops_saved", measure.flops_saved},
                      {"pass", pass}};
  if (setting.sparse_ffn) {
    j["layer_mass"] = setting.layer_mass;
    j["ffn_dilate"] = setting.dilate;
  }
  if (!fails.empty()) j["fails"] = fails;
  return j;
}

nlohmann::json CalibGrid::to_json() const {
  return {{"ratios", ratios},           {"windows", windows}, {"sinks", sinks},
          {"mass_ladder", mass_ladder}, {"dilates", dilates}, {"max_evals", max_evals}};
}

bool meets_guard(const CalibGuard& g, const CalibMeasure& m, double full_em, std::string* why) {
  // Agreement and EM are means over samples: compare with a hair of slack so 0.99 of 100
  // samples (99 / 100 summed in floating point) is not a miss.
  constexpr double kEps = 1e-9;
  const double drop = 100.0 * (full_em - m.em);
  std::string w;
  if (m.top1 + kEps < g.target_top1)
    w = "top-1 " + fmt("%.3f", m.top1) + " < " + fmt("%g", g.target_top1);
  if (drop > g.max_em_drop + kEps)
    w += (w.empty() ? "" : "; ") + std::string("EM drop ") + fmt("%.1f", drop) + " > " +
         fmt("%g", g.max_em_drop);
  if (why) *why = w;
  return w.empty();
}

std::optional<size_t> pick_fastest(const std::vector<CalibPoint>& points, const CalibGuard& g,
                                   double full_em) {
  std::optional<size_t> best;
  for (size_t i = 0; i < points.size(); ++i) {
    const CalibMeasure& m = points[i].measure;
    if (!meets_guard(g, m, full_em)) continue;
    if (!best) {
      best = i;
      continue;
    }
    const CalibMeasure& b = points[*best].measure;
    const auto key = [](const CalibMeasure& x) { return std::tuple(x.flops_saved, x.em, x.top1); };
    if (key(m) > key(b)) best = i;  // strictly better: ties keep the earlier point
  }
  return best;
}

CalibGrid calibration_grid(const std::string& name) {
  CalibGrid g;
  if (name == "quick") {
    // CI: two head cuts, one mass step per layer, one dilation (at most 2 + L settings).
    g.ratios = {0.1875, 0.25};
    g.windows = {256};
    g.sinks = {4};
    g.mass_ladder = {0.5};
    g.dilates = {1};
    g.max_evals = 16;
  } else if (name == "default") {
    g.ratios = {0.125, 0.1875, 0.25, 0.375};
    g.windows = {128, 256, 512};
    g.sinks = {4};
    g.mass_ladder = {0.7, 0.5, 0.4};
    g.dilates = {1, 0};
    g.max_evals = 48;
  } else if (name == "wide") {
    g.ratios = {0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5};
    g.windows = {64, 128, 256, 512, 1024};
    g.sinks = {0, 4, 16};
    g.mass_ladder = {0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2};
    g.dilates = {1, 0, 2};
    g.max_evals = 256;
  } else {
    throw Error("unknown calibration grid '" + name + "' (available: quick, default, wide)");
  }
  return g;
}

void check_grid(const CalibGrid& g) {
  auto fail = [](const std::string& m) { throw Error("calibration grid: " + m); };
  if (g.ratios.empty() || g.windows.empty() || g.sinks.empty() || g.dilates.empty())
    fail("ratios, windows, sinks and dilations need at least one value each");
  for (double r : g.ratios)
    if (!(r >= 0 && r <= 1)) fail("ratio " + fmt("%g", r) + " outside [0, 1]");
  for (int32_t w : g.windows)
    if (w < 1) fail("window " + std::to_string(w) + " < 1");
  for (int32_t s : g.sinks)
    if (s < 0) fail("sink " + std::to_string(s) + " < 0");
  for (double m : g.mass_ladder)
    if (!(m > 0 && m < 1)) fail("mass " + fmt("%g", m) + " outside (0, 1)");
  for (int32_t d : g.dilates)
    if (d < 0) fail("dilation " + std::to_string(d) + " < 0");
  if (g.max_evals < 1) fail("max evals must be >= 1");
}

CalibResult search_reuse_settings(const CalibGrid& grid, const CalibGuard& guard, double full_em,
                                  int32_t num_layers, const CalibEvaluate& evaluate,
                                  const std::function<void(const CalibPoint&)>& on_point) {
  check_grid(grid);
  CalibResult r;
  // Measures `s` (once: a repeat returns the earlier point); nullopt when the budget is spent.
  auto measure = [&](const std::string& stage, const CalibSetting& s) -> std::optional<CalibPoint> {
    for (const CalibPoint& p : r.points)
      if (p.setting == s) return p;
    if (static_cast<int32_t>(r.points.size()) >= grid.max_evals) {
      r.budget_exhausted = true;
      return std::nullopt;
    }
    CalibPoint p;
    p.stage = stage;
    p.setting = s;
    p.measure = evaluate(s);
    p.pass = meets_guard(guard, p.measure, full_em, &p.fails);
    r.points.push_back(p);
    if (on_point) on_point(p);
    return p;
  };

  // 1. Head cuts, every FFN dense.
  for (double ratio : grid.ratios)
    for (int32_t window : grid.windows)
      for (int32_t sink : grid.sinks) {
        CalibSetting s;
        s.ratio = ratio, s.window = window, s.sink = sink;
        if (!r.budget_exhausted) measure("heads", s);
      }
  const std::optional<size_t> base = pick_fastest(r.points, guard, full_em);
  if (!base) {
    // Closest misses, so the refusal says how far off the guard was.
    size_t best_top1 = 0, best_em = 0;
    for (size_t i = 1; i < r.points.size(); ++i) {
      if (r.points[i].measure.top1 > r.points[best_top1].measure.top1) best_top1 = i;
      if (r.points[i].measure.em > r.points[best_em].measure.em) best_em = i;
    }
    r.refusal = "no setting met the guard (top-1 agreement >= " + fmt("%g", guard.target_top1) +
                " and EM drop <= " + fmt("%g", guard.max_em_drop) +
                " points against full prefill's EM " + fmt("%.1f", 100 * full_em) + ") in " +
                std::to_string(r.points.size()) + " head cuts";
    if (!r.points.empty()) {
      const CalibPoint& t = r.points[best_top1];
      const CalibPoint& e = r.points[best_em];
      r.refusal += "; best top-1 " + fmt("%.3f", t.measure.top1) + " (" + t.setting.label() +
                   "), best EM " + fmt("%.1f", 100 * e.measure.em) + " (" + e.setting.label() + ")";
    }
    if (r.budget_exhausted) r.refusal += "; the search stopped at max_evals";
    return r;
  }

  // 2. Sparse FFN: per-layer coordinate walk down the mass ladder.
  CalibPoint cur = r.points[*base];
  if (!grid.mass_ladder.empty() && num_layers > 0) {
    CalibSetting s = cur.setting;
    s.sparse_ffn = true;
    s.layer_mass.assign(num_layers, 1.0);
    s.dilate = grid.dilates.front();
    cur.setting = s;  // all layers dense: measures as the head cut itself
    for (int32_t l = 0; l < num_layers && !r.budget_exhausted; ++l)
      for (double m : grid.mass_ladder) {
        if (m >= cur.setting.layer_mass[l]) continue;
        CalibSetting c = cur.setting;
        c.layer_mass[l] = m;
        const std::optional<CalibPoint> p = measure("ffn", c);
        if (!p) break;
        // A step must keep the guard and save FLOPs; lower masses only lose more.
        if (!p->pass || p->measure.flops_saved <= cur.measure.flops_saved) break;
        cur = *p;
      }
    // 3. The other dilations on the masses found.
    if (any_sparse(cur.setting.layer_mass))
      for (size_t i = 1; i < grid.dilates.size() && !r.budget_exhausted; ++i) {
        CalibSetting c = cur.setting;
        c.dilate = grid.dilates[i];
        const std::optional<CalibPoint> p = measure("dilate", c);
        if (p && p->pass && p->measure.flops_saved > cur.measure.flops_saved) cur = *p;
      }
  }
  r.chosen = pick_fastest(r.points, guard, full_em);
  return r;
}

std::string calibration_table(const CalibResult& r, double full_em, double full_f1) {
  std::string t =
      "| # | stage | ratio | window | sink | FFN masses | dilate | EM | ΔEM | F1 | top-1 | logits "
      "cos | FLOPs saved | guard |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  t += "| - | full prefill | - | - | - | dense | - | " + fmt("%.1f", 100 * full_em) + " | 0 | " +
       fmt("%.1f", 100 * full_f1) + " | 1.000 | 1.0000 | 0.0% | - |\n";
  for (size_t i = 0; i < r.points.size(); ++i) {
    const CalibPoint& p = r.points[i];
    const CalibSetting& s = p.setting;
    const bool sparse = s.sparse_ffn && any_sparse(s.layer_mass);
    const bool chosen = r.chosen && *r.chosen == i;
    t += "| " + std::to_string(i + 1) + " | " + p.stage + " | " + fmt("%g", s.ratio) + " | " +
         std::to_string(s.window) + " | " + std::to_string(s.sink) + " | " +
         (sparse ? mass_list(s.layer_mass) : std::string("dense")) + " | " +
         (sparse ? std::to_string(s.dilate) : std::string("-")) + " | " +
         fmt("%.1f", 100 * p.measure.em) + " | " + fmt("%+.1f", 100 * (p.measure.em - full_em)) +
         " | " + fmt("%.1f", 100 * p.measure.f1) + " | " + fmt("%.3f", p.measure.top1) + " | " +
         fmt("%.4f", p.measure.logits_cos) + " | " + fmt("%.1f%%", 100 * p.measure.flops_saved) +
         " | " +
         (chosen   ? "**pass, chosen**"
          : p.pass ? "pass"
                   : "fail: " + p.fails) +
         " |\n";
  }
  return t;
}

}  // namespace redknot
