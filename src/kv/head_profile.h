// Per-(layer, kv head) attention classes: `global` heads keep and read every token, `local` heads
// only the first `sink` tokens and the last `window` (counting the query itself). Profiles come
// from `redknot profile` and are loaded with --head-profile; without one every head is global
// (or, for models trained with a sliding window, local with that window: the model's own rule).
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
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

  // The keep rule, the one place it is written: whether a query at `next_pos` or later can
  // still see the key at `pos` (global: always; local: pos < sink or pos > next_pos - window).
  // A store may drop a key this returns false for.
  bool keeps(int64_t pos, int64_t next_pos) const {
    return !is_local() || pos < sink || pos > next_pos - window;
  }
  // Whether any key of the increasing positions first..last is kept (a page's tokens).
  bool keeps_any(int64_t first, int64_t last, int64_t next_pos) const {
    return keeps(first, next_pos) || keeps(last, next_pos);
  }
  // Keys the newest of `tokens` tokens (positions 0 .. tokens - 1) attends to: what the head
  // holds while that token runs, min(tokens, sink + window) for a local head.
  int64_t kept_tokens(int64_t tokens) const {
    return is_local() ? std::min<int64_t>(tokens, int64_t{sink} + window) : tokens;
  }
  bool is_local() const { return cls == HeadClass::Local && window > 0; }
  // Sets class, window and sink for a head chosen global or local (window W, sink S). A
  // sliding-window model (native_window > 0) never sees past its own window: "global" means that
  // window, and a local head keeps its sink only when W is the narrower one.
  void classify(bool global, int64_t native_window, int32_t W, int32_t S) {
    if (native_window > 0) {
      const bool narrower = !global && W < native_window;
      cls = HeadClass::Local;
      window = static_cast<int32_t>(narrower ? W : native_window);
      sink = narrower ? S : 0;
    } else if (global) {
      cls = HeadClass::Global, window = 0, sink = 0;
    } else {
      cls = HeadClass::Local, window = W, sink = S;
    }
  }
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
  // The classes of kv heads [head0, head0 + n) of every layer: a tensor-parallel rank's share
  // (loader/shard_checkpoint.h). params and the placement record (the whole model's) are kept.
  HeadProfile slice_heads(int32_t head0, int32_t n) const;
  // The whole model's profile (this one unless sliced). Plans that every rank must make alike
  // (reuse's dead-row split) read it, not the rank's own heads.
  const HeadProfile& whole() const { return whole_ ? *whole_ : *this; }

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

  // The keep rule and KV sizing of every store, scheduler and benchmark (HeadSpec's, per head).
  bool keeps(int32_t layer, int32_t head, int64_t pos, int64_t next_pos) const {
    return at(layer, head).keeps(pos, next_pos);
  }
  int64_t kept_tokens(int32_t layer, int32_t head, int64_t tokens) const {
    return at(layer, head).kept_tokens(tokens);
  }
  // Pages a session of `tokens` tokens holds: every head's kept tokens rounded up to whole pages
  // (SPEC §3's per-session memory), plus `slack_pages_per_head` (pool sizing: copy-on-write and
  // partly used pages).
  int64_t pages_for(int64_t tokens, int32_t page_size, int32_t slack_pages_per_head = 0) const;
  // The most pages a sequence holds at any point while it grows to `tokens` tokens (admission
  // control): a local head's sink ∪ window may straddle one page more than it fills, plus the
  // page being written before the oldest is trimmed, but never more than all its tokens' pages.
  int64_t peak_pages_for(int64_t tokens, int32_t page_size) const;

  nlohmann::json params;  // the profiling parameters that produced it
  // Head placement (kv/head_placement.h): [layer][new position] -> the original model's kv head,
  // for `placement_ranks` tensor-parallel ranks. Empty: the original order. The heads above are
  // already in the new order, so the model's weights must be permuted the same way at load.
  std::vector<std::vector<int32_t>> placement;
  int32_t placement_ranks = 0;

 private:
  int32_t num_layers_ = 0, num_kv_heads_ = 0;
  std::vector<HeadSpec> heads_;
  std::shared_ptr<const HeadProfile> whole_;  // set by slice_heads
};

}  // namespace redknot
