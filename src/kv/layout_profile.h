// Head profiles at fixed layouts, without calibration (SPEC §7), for models with random weights
// at real shapes, where a measured profile means nothing but the layout decides the speed:
//   spread  global heads distributed evenly over every layer;
//   deep    all global heads in the last quarter of the layers (the released maps: Qwen3-32B
//           layers 48-63, Llama-3.3-70B layers 60-79);
//   front   all global heads in the first quarter (flatters reuse: shown only beside the others).
// round(ratio * layers * kv_heads) heads are global, spread as evenly as possible over the
// layout's layers (Bresenham: per-layer counts differ by at most one); which heads of a layer is
// drawn from the seed. Output is an ordinary HeadProfile (the format `redknot profile` writes),
// with params.method = "layout" and params.layout naming the layout.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/model_config.h"
#include "kv/head_profile.h"

namespace redknot {

struct LayoutProfileOptions {
  std::string layout = "deep";  // spread | deep | front
  double ratio = 0.15;          // fraction of (layer, kv head) pairs made global
  int32_t window = 512;         // local heads' window W (counts the query itself)
  int32_t sink = 4;             // local heads' sink tokens
  uint64_t seed = 0;            // picks the heads within a layer
};

// The layers a layout may put global heads in, for `layers` layers and `globals` global heads of
// `kv_heads` per layer: spread all; deep the last ceil(layers / 4) (front the first), widened
// when the globals do not fit there.
std::vector<int32_t> layout_layers(const std::string& layout, int32_t layers, int32_t kv_heads,
                                   int64_t globals);

// Throws Error on an unknown layout, a ratio outside [0, 1], window < 1 or sink < 0. For a model
// with its own sliding window the classes follow `redknot profile`: every head is local, global
// ones with the model's window and no sink.
HeadProfile make_layout_profile(const ModelConfig& cfg, const LayoutProfileOptions& opts);

}  // namespace redknot
