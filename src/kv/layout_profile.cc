#include "kv/layout_profile.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"

namespace redknot {

std::vector<int32_t> layout_layers(const std::string& layout, int32_t layers, int32_t kv_heads,
                                   int64_t globals) {
  std::vector<int32_t> out;
  if (layout == "spread") {
    for (int32_t l = 0; l < layers; ++l) out.push_back(l);
    return out;
  }
  if (layout != "deep" && layout != "front")
    throw Error("unknown head layout '" + layout + "' (known: spread, deep, front)");
  int64_t span = (layers + 3) / 4;
  if (kv_heads > 0) span = std::max<int64_t>(span, (globals + kv_heads - 1) / kv_heads);
  span = std::min<int64_t>(span, layers);
  const int32_t first = layout == "deep" ? static_cast<int32_t>(layers - span) : 0;
  for (int32_t l = first; l < first + span; ++l) out.push_back(l);
  return out;
}

HeadProfile make_layout_profile(const ModelConfig& cfg, const LayoutProfileOptions& o) {
  if (!(o.ratio >= 0.0 && o.ratio <= 1.0))
    throw Error("head layout: ratio " + std::to_string(o.ratio) + " is outside [0, 1]");
  if (o.window < 1) throw Error("head layout: window must be >= 1");
  if (o.sink < 0) throw Error("head layout: sink must be >= 0");
  if (cfg.num_layers <= 0 || cfg.num_kv_heads <= 0)
    throw Error("head layout: the model has no layers or kv heads");
  const int32_t L = static_cast<int32_t>(cfg.num_layers);
  const int32_t H = static_cast<int32_t>(cfg.num_kv_heads);
  const int64_t total = int64_t{L} * H;
  const int64_t G = std::llround(o.ratio * static_cast<double>(total));
  const std::vector<int32_t> span = layout_layers(o.layout, L, H, G);
  const int64_t n = static_cast<int64_t>(span.size());

  // Per-layer counts: layer i of the span gets floor((i+1)G/n) - floor(iG/n) (Bresenham), so
  // counts differ by at most one and the extra heads are spaced evenly.
  std::vector<int32_t> count(L, 0);
  for (int64_t i = 0; i < n; ++i)
    count[span[i]] = static_cast<int32_t>((i + 1) * G / n - i * G / n);

  const int64_t native = cfg.sliding_window;
  HeadProfile p(L, H);
  std::mt19937_64 rng(o.seed);
  std::vector<int32_t> order(H);
  for (int32_t l = 0; l < L; ++l) {
    // Fisher-Yates with rng() % k: portable (std::shuffle's draws differ between libraries).
    for (int32_t h = 0; h < H; ++h) order[h] = h;
    for (int32_t k = H; k > 1; --k)
      std::swap(order[k - 1], order[rng() % static_cast<uint64_t>(k)]);
    for (int32_t r = 0; r < H; ++r) {
      HeadSpec& s = p.at(l, order[r]);
      const bool global = r < count[l];
      s.classify(global, native, o.window, o.sink);  // as profile_heads
      s.score = global ? 1.0 : 0.0;                  // no measurement: the layout's choice
    }
  }

  nlohmann::json& pj = p.params;
  pj["method"] = "layout";
  pj["layout"] = o.layout;
  pj["ratio"] = o.ratio;
  pj["window"] = o.window;
  pj["sink"] = o.sink;
  pj["seed"] = o.seed;
  pj["global_heads"] = G;
  pj["global_layers"] =
      n > 0 ? nlohmann::json::array({span.front(), span.back()}) : nlohmann::json::array();
  pj["heads_per_layer"] = count;
  if (native > 0) pj["native_sliding_window"] = native;
  return p;
}

}  // namespace redknot
