// A model's tuned reuse settings: `reuse_settings.json` in the model directory, beside its head
// profile, so that every entry point (serve, generate, eval) runs the model as it was tuned
// without repeating flags. Each field is optional; flags given on the command line replace the
// file's fields one by one (overlay).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/sparse_ffn.h"

namespace redknot {

struct ReuseOptions;
enum class ReuseMode;

inline constexpr const char* kReuseSettingsFile = "reuse_settings.json";

struct ReuseSettings {
  std::optional<std::string> head_profile;  // path; a file's relative name is resolved beside it
  std::optional<bool> sparse_ffn;           // redknot mode's Sparse FFN on/off
  std::optional<int32_t> dense_until, deep_start, recent_n, ffn_dilate;
  std::optional<double> mass, mass_deep;
  std::optional<std::vector<double>> layer_mass;
  std::optional<bool> skip_dead_rows, query_full_attention;
  // Rows per forward of every reuse pass (ReuseOptions::chunk; 0: each pass whole). Sparse FFN
  // ranks rows per forward, so this is part of a tuned setting.
  std::optional<int32_t> reuse_chunk;
  // Set when the settings refuse redknot mode (`"redknot": "disabled"`, written by `redknot
  // calibrate` when no setting met its accuracy guard): the reason. Requests for redknot are then
  // served another way and told so (serve), or refused (generate, eval); never run silently.
  std::optional<std::string> redknot_disabled;
  // What `redknot calibrate` measured and guarded (kept as written; shown by --print-config).
  std::optional<nlohmann::json> calibration;
  std::string source;  // where the fields came from, for startup lines ("" when none)

  // The fields `over` sets replace these; `source` joins both. Tiers in `over` without
  // layer_mass drop this layer_mass (it would hide them).
  ReuseSettings overlay(const ReuseSettings& over) const;
  // Writes the fields set into the options; unset fields keep what `opts` has.
  void apply(ReuseOptions& opts) const;
  void apply(SparseFfnConfig& cfg) const;
  bool empty() const;
  // Why `mode` may not run under these settings ("" when it may): redknot on a model whose
  // calibration refused it.
  std::string refusal(ReuseMode mode) const;
};

// Parses a settings file strictly: unknown keys, wrong types and out-of-range values are an Error
// naming the file. A relative head_profile is resolved against the file's directory.
ReuseSettings load_reuse_settings(const std::string& path);
// The settings file of a model directory, or empty settings when it has none (or `model_path` is
// a file such as a GGUF).
ReuseSettings model_reuse_settings(const std::string& model_path);
// The fields set, as the file holds them (head_profile as given: write a name relative to the
// file's directory for a settings file that moves with its model).
nlohmann::json reuse_settings_to_json(const ReuseSettings& s);
// Writes reuse_settings_to_json(s) to `path` through a temporary file renamed into place.
void save_reuse_settings(const std::string& path, const ReuseSettings& s);

}  // namespace redknot
