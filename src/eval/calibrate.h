// Calibration of a model's reuse settings (`redknot calibrate`): a bounded search over the head
// profile's cut (global ratio, local window, sink) and Sparse FFN (per-layer masses, dilation),
// each setting measured against full prefill on calibration samples, keeping the one that saves
// the most prefill FLOPs among those meeting an accuracy guard, or refusing when none does.
// The search and the choice are pure (they see settings and measurements only); the caller's
// evaluate function runs the model (the eval harness).
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace redknot {

// One point of the search space.
struct CalibSetting {
  double ratio = 0;                // share of (layer, kv head) pairs kept global
  int32_t window = 0, sink = 0;    // every local head's window and sink
  bool sparse_ffn = false;         // off: every layer's FFN dense
  std::vector<double> layer_mass;  // per layer, >= 1 dense (with sparse_ffn)
  int32_t dilate = 0;              // Sparse FFN row dilation (with sparse_ffn)
  std::string label() const;       // e.g. "r0.1875 w256 s4 ffn 1,1,0.5,... d1"
  bool operator==(const CalibSetting&) const = default;
};

// What one setting scored on the calibration samples (EM, F1, agreement in [0, 1]).
struct CalibMeasure {
  double em = 0, f1 = 0;
  double top1 = 0;         // first-token agreement with full prefill
  double logits_cos = 0;   // cosine of the last-token logits with full prefill's
  double flops_saved = 0;  // 1 - FLOPs / full prefill's FLOPs (the eval ledger)
};

// The accuracy a setting must keep to be enabled.
struct CalibGuard {
  double target_top1 = 0.99;  // top-1 agreement with full prefill at least this
  double max_em_drop = 1.0;   // EM points below full prefill's at most this (< 0: must gain)
  nlohmann::json to_json() const;
};

struct CalibPoint {
  std::string stage;  // "heads", "ffn", "dilate"
  CalibSetting setting;
  CalibMeasure measure;
  bool pass = false;
  std::string fails;  // what missed the guard ("" when it passed)
  nlohmann::json to_json() const;
};

// Whether `m` meets `g` against full prefill's EM (in [0, 1]); `why` gets what missed.
bool meets_guard(const CalibGuard& g, const CalibMeasure& m, double full_em,
                 std::string* why = nullptr);

// The point to keep: the most FLOPs saved among those meeting the guard (ties: higher EM, then
// higher top-1, then the earlier point). nullopt when none meets it.
std::optional<size_t> pick_fastest(const std::vector<CalibPoint>& points, const CalibGuard& g,
                                   double full_em);

// The bounded search space. Named grids: "quick" (CI: 2 head cuts, one mass step, 1 dilation),
// "default", "wide".
struct CalibGrid {
  std::vector<double> ratios;
  std::vector<int32_t> windows, sinks;
  std::vector<double> mass_ladder;  // Sparse FFN masses tried per layer, descending, each < 1
  std::vector<int32_t> dilates;     // the first: the masses' search; the rest tried on its result
  int32_t max_evals = 48;           // settings measured at most (the search stops there)
  nlohmann::json to_json() const;
};
CalibGrid calibration_grid(const std::string& name);  // throws Error on an unknown name
// Throws Error naming what is out of range (empty lists, ratios outside [0, 1], masses outside
// (0, 1), windows < 1, negative sinks or dilations, max_evals < 1).
void check_grid(const CalibGrid& g);

struct CalibResult {
  std::vector<CalibPoint> points;  // every setting measured, in order
  std::optional<size_t> chosen;    // pick_fastest over them
  bool budget_exhausted = false;   // max_evals stopped the search early
  std::string refusal;             // why nothing is enabled ("" when a point was chosen)
};

using CalibEvaluate = std::function<CalibMeasure(const CalibSetting&)>;

// The search (docs/calibrate.md):
//  1. heads: every (ratio, window, sink) of the grid, Sparse FFN off;
//  2. ffn: from the fastest passing head cut, one layer at a time (layer 0 up), walk its mass
//     down the ladder at dilation dilates[0], keeping each step that meets the guard and saves
//     FLOPs; the first step that does not ends that layer's walk;
//  3. dilate: the other dilations on the result, kept when they pass and save more.
// No head cut passing ends the search with a refusal (Sparse FFN only adds approximation). Each
// setting is measured once (repeats are skipped); on_point sees each measured point.
CalibResult search_reuse_settings(const CalibGrid& grid, const CalibGuard& guard, double full_em,
                                  int32_t num_layers, const CalibEvaluate& evaluate,
                                  const std::function<void(const CalibPoint&)>& on_point = {});

// The table of every setting tried (markdown): setting, EM, ΔEM, top-1, logits cos, FLOPs saved,
// pass/fail; the chosen row marked.
std::string calibration_table(const CalibResult& r, double full_em, double full_f1);

}  // namespace redknot
