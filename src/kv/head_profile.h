// Per-(layer, kv head) attention classes: `global` heads keep and read every token, `local` heads
// only the first `sink` tokens and the last `window` (counting the query itself). Profiles come
// from `redknot profile` and are loaded with --head-profile; without one every head is global
// (or, for models trained with a sliding window, local with that window: the model's own rule).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/model_config.h"

namespace redknot {

enum class HeadClass { Global, Local };

struct HeadSpec {
  HeadClass cls = HeadClass::Global;
  int32_t window = 0;  // local heads: keys i - window + 1 .. i
  int32_t sink = 0;    // local heads: positions < sink stay visible
  // What the profiler measured (absent in hand-written profiles).
  double score = 0, prefix_shift = 0, edge_mass = 0;
};

class HeadProfile {
 public:
  HeadProfile() = default;
  HeadProfile(int32_t num_layers, int32_t num_kv_heads);  // all global

  // The attention the model was trained with: global, or local (sink 0) with its sliding window.
  static HeadProfile native(const ModelConfig& cfg);
  // Parses and validates a profile file; every problem is an Error naming the file.
  static HeadProfile load(const std::string& path);
  static HeadProfile from_json(const nlohmann::json& j, const std::string& source);
  nlohmann::json to_json() const;
  void save(const std::string& path) const;

  // Throws Error when the profile's shape does not match the model.
  void check_matches(const ModelConfig& cfg, const std::string& source) const;

  int32_t num_layers() const { return num_layers_; }
  int32_t num_kv_heads() const { return num_kv_heads_; }
  HeadSpec& at(int32_t layer, int32_t head) { return heads_[layer * num_kv_heads_ + head]; }
  const HeadSpec& at(int32_t layer, int32_t head) const {
    return heads_[layer * num_kv_heads_ + head];
  }
  double global_fraction() const;
  bool all_global() const;
  // The deepest layer holding a global head; -1 when every head is local.
  int32_t last_global_layer() const;

  nlohmann::json params;  // the profiling parameters that produced it

 private:
  int32_t num_layers_ = 0, num_kv_heads_ = 0;
  std::vector<HeadSpec> heads_;
};

// Tokens a head keeps for a sequence of `tokens` tokens (the ideal, before page rounding).
int64_t head_tokens_kept(const HeadSpec& h, int64_t tokens);

}  // namespace redknot
