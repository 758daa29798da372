// The offline head profiler (SPEC §2): runs calibration text through the model, reads every
// layer's attention maps on the host, scores each (layer, kv head) by how much it depends on
// distant or prefix context, and classifies the top-scoring heads as global, the rest as local.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "kv/head_profile.h"
#include "model/model.h"

namespace redknot {

// Where the profiler is, reported after every forward run.
struct ProfileProgress {
  int32_t run = 0, total_runs = 0;       // runs finished / planned
  int32_t chunk = 0, num_chunks = 0;     // calibration chunk being profiled (1-based)
  int32_t prefix = 0, num_prefixes = 0;  // 0: the chunk alone; else which prefix (1-based)
  int32_t tokens = 0;                    // tokens of the run just finished
};

struct ProfileOptions {
  double ratio = 0.15;        // fraction of (layer, kv head) pairs made global (rounded up)
  int32_t window = 512;       // local heads: window W (counts the query itself)
  int32_t sink = 4;           // local heads: positions < sink stay visible
  int32_t dense_layers = 0;   // the first N layers are forced global
  int32_t max_tokens = 2048;  // longest run (prefix + chunk, BOS included)
  int32_t num_prefixes = 2;   // unrelated prefixes each chunk is run behind
  int32_t max_chunks = 8;     // chunks profiled, spread over the text (0: all); bounds the time
  int32_t bos_id = -1;        // >= 0: every run starts with this token (as the model sees text)
  // A head whose measure reaches a threshold is global whatever the ratio says.
  std::optional<double> score_threshold, prefix_shift_threshold, edge_mass_threshold;
  int32_t num_threads = 0;  // host attention maps; <= 0: one per hardware thread
  // Stored under params["calibration"] (e.g. files and their token counts).
  nlohmann::json calibration_info;
  std::function<void(const ProfileProgress&)> progress;
  std::function<void(const std::string&)> warn;  // default: printed to stderr
};

// Profiles `model` on `calibration` (token id lists: documents or pre-cut chunks, concatenated
// and re-cut into chunks of about max_tokens / 2). Throws Error on invalid options, ids outside
// the vocabulary, or too little text (fewer than 8 tokens per chunk).
HeadProfile profile_heads(Model& model, const std::vector<std::vector<int32_t>>& calibration,
                          const ProfileOptions& opts);

// Sets every head's class from the scores it holds (measured by profile_heads): the top
// ceil(ratio * pairs) by score (and ties) are global, so are the first dense_layers layers and
// heads past a threshold; the rest local with opts.window and opts.sink (HeadSpec::classify under
// the model's own sliding window `native_window`). Records ratio, window, sink, dense layers and
// thresholds in prof.params. profile_heads ends with it; calibration re-cuts one measured profile
// at several ratios with it instead of measuring again.
void classify_heads(HeadProfile& prof, const ProfileOptions& opts, int64_t native_window);

// The classes as one line per layer, e.g. "L0: GLLG" (G global, L local).
std::vector<std::string> profile_class_map(const HeadProfile& p);

}  // namespace redknot
