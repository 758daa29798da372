#include "engine/reuse_settings.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "reuse/reuse_prefill.h"

namespace redknot {

namespace fs = std::filesystem;

ReuseSettings ReuseSettings::overlay(const ReuseSettings& over) const {
  ReuseSettings r = *this;
  auto take = [](auto& dst, const auto& src) {
    if (src) dst = src;
  };
  take(r.head_profile, over.head_profile);
  take(r.sparse_ffn, over.sparse_ffn);
  take(r.dense_until, over.dense_until);
  take(r.deep_start, over.deep_start);
  take(r.recent_n, over.recent_n);
  take(r.ffn_dilate, over.ffn_dilate);
  take(r.mass, over.mass);
  take(r.mass_deep, over.mass_deep);
  // Per-layer masses override the tiers for every layer they name: tiers given without them
  // replace the base's per-layer masses, or the tiers would silently do nothing.
  if ((over.dense_until || over.mass || over.deep_start || over.mass_deep) && !over.layer_mass)
    r.layer_mass.reset();
  take(r.layer_mass, over.layer_mass);
  take(r.skip_dead_rows, over.skip_dead_rows);
  take(r.query_full_attention, over.query_full_attention);
  take(r.reuse_chunk, over.reuse_chunk);
  take(r.redknot_disabled, over.redknot_disabled);
  take(r.calibration, over.calibration);
  if (!over.empty()) r.source = source.empty() ? over.source : source + " + " + over.source;
  return r;
}

bool ReuseSettings::empty() const {
  return !head_profile && !sparse_ffn && !dense_until && !deep_start && !recent_n && !ffn_dilate &&
         !mass && !mass_deep && !layer_mass && !skip_dead_rows && !query_full_attention &&
         !reuse_chunk && !redknot_disabled && !calibration;
}

std::string ReuseSettings::refusal(ReuseMode mode) const {
  if (mode != ReuseMode::RedKnot || !redknot_disabled) return "";
  return "redknot mode is disabled for this model by " +
         (source.empty() ? std::string(kReuseSettingsFile) : source) + ": " + *redknot_disabled;
}

void ReuseSettings::apply(SparseFfnConfig& c) const {
  if (dense_until) c.dense_until = *dense_until;
  if (deep_start) c.deep_start = *deep_start;
  if (recent_n) c.recent_n = *recent_n;
  if (ffn_dilate) c.dilate = *ffn_dilate;
  if (mass) c.mass = *mass;
  if (mass_deep) c.mass_deep = *mass_deep;
  if (layer_mass) c.layer_mass = *layer_mass;
}

void ReuseSettings::apply(ReuseOptions& o) const {
  apply(o.sparse_ffn);
  if (sparse_ffn) o.sparse_ffn_enabled = *sparse_ffn;
  if (skip_dead_rows) o.skip_dead_rows = *skip_dead_rows;
  if (query_full_attention) o.query_full_attention = *query_full_attention;
  if (reuse_chunk) o.chunk = *reuse_chunk;
}

ReuseSettings load_reuse_settings(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw Error(path + ": cannot open reuse settings");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    throw Error(path + ": reuse settings are not valid JSON: " + e.what());
  }
  auto fail = [&](const std::string& what) { throw Error(path + ": reuse settings: " + what); };
  if (!j.is_object()) fail("top level must be an object");
  ReuseSettings s;
  s.source = path;
  auto integer = [&](const std::string& k, int64_t lo, int64_t hi) -> int32_t {
    const auto& v = j[k];
    if (!v.is_number_integer()) fail("\"" + k + "\" must be an integer");
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) fail("\"" + k + "\" out of range");
    return static_cast<int32_t>(x);
  };
  auto number = [&](const nlohmann::json& v, const std::string& k, double hi) {
    if (!v.is_number()) fail("\"" + k + "\" must be a number");
    const double x = v.get<double>();
    if (!(x >= 0 && x <= hi)) fail("\"" + k + "\" out of range");
    return x;
  };
  auto boolean = [&](const std::string& k) {
    if (!j[k].is_boolean()) fail("\"" + k + "\" must be true or false");
    return j[k].get<bool>();
  };
  if (j.contains("redknot_disabled_reason") &&
      (!j.contains("redknot") || j["redknot"] != "disabled"))
    fail("\"redknot_disabled_reason\" needs \"redknot\": \"disabled\"");
  for (const auto& [key, value] : j.items()) {
    if (key == "redknot") {
      if (value != "enabled" && value != "disabled")
        fail("\"redknot\" must be \"enabled\" or \"disabled\"");
      if (value == "disabled") {
        const auto r = j.find("redknot_disabled_reason");
        if (r != j.end() && (!r->is_string() || r->get<std::string>().empty()))
          fail("\"redknot_disabled_reason\" must be a non-empty string");
        s.redknot_disabled =
            r != j.end() ? r->get<std::string>() : std::string("disabled in the settings file");
      }
    } else if (key == "redknot_disabled_reason") {
      // read with "redknot"
    } else if (key == "calibration") {
      if (!value.is_object()) fail("\"calibration\" must be an object");
      s.calibration = value;
    } else if (key == "head_profile") {
      if (!value.is_string() || value.get<std::string>().empty())
        fail("\"head_profile\" must be a file name");
      const fs::path p = value.get<std::string>();
      s.head_profile = (p.is_relative() ? fs::path(path).parent_path() / p : p).string();
    } else if (key == "sparse_ffn") {
      s.sparse_ffn = boolean(key);
    } else if (key == "skip_dead_rows") {
      s.skip_dead_rows = boolean(key);
    } else if (key == "query_full_attention") {
      s.query_full_attention = boolean(key);
    } else if (key == "dense_until") {
      s.dense_until = integer(key, 0, 1 << 16);
    } else if (key == "deep_start") {
      s.deep_start = integer(key, -1, 1 << 16);
    } else if (key == "recent_n") {
      s.recent_n = integer(key, 0, 1 << 20);
    } else if (key == "reuse_chunk") {
      s.reuse_chunk = integer(key, 0, 1 << 20);
    } else if (key == "ffn_dilate") {
      s.ffn_dilate = integer(key, 0, 1 << 16);
    } else if (key == "mass") {
      s.mass = number(value, key, 1.0);
    } else if (key == "mass_deep") {
      s.mass_deep = number(value, key, 1.0);
    } else if (key == "layer_mass") {
      if (!value.is_array() || value.empty()) fail("\"layer_mass\" must be a list of numbers");
      std::vector<double> m;
      for (const auto& x : value) m.push_back(number(x, key, 1e9));
      s.layer_mass = std::move(m);
    } else {
      fail("unknown key \"" + key + "\"");
    }
  }
  return s;
}

nlohmann::json reuse_settings_to_json(const ReuseSettings& s) {
  nlohmann::json j = nlohmann::json::object();
  auto put = [&j](const char* key, const auto& field) {
    if (field) j[key] = *field;
  };
  put("head_profile", s.head_profile);
  put("sparse_ffn", s.sparse_ffn);
  put("dense_until", s.dense_until);
  put("mass", s.mass);
  put("deep_start", s.deep_start);
  put("mass_deep", s.mass_deep);
  put("recent_n", s.recent_n);
  put("layer_mass", s.layer_mass);
  put("ffn_dilate", s.ffn_dilate);
  put("skip_dead_rows", s.skip_dead_rows);
  put("query_full_attention", s.query_full_attention);
  put("reuse_chunk", s.reuse_chunk);
  if (s.redknot_disabled) {
    j["redknot"] = "disabled";
    j["redknot_disabled_reason"] = *s.redknot_disabled;
  }
  put("calibration", s.calibration);
  return j;
}

void save_reuse_settings(const std::string& path, const ReuseSettings& s) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << reuse_settings_to_json(s).dump(2) << "\n";
    if (!f) throw Error(path + ": cannot write reuse settings");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw Error(path + ": cannot write reuse settings");
}

ReuseSettings model_reuse_settings(const std::string& model_path) {
  if (!fs::is_directory(model_path)) return {};
  const fs::path p = fs::path(model_path) / kReuseSettingsFile;
  if (!fs::exists(p)) return {};
  return load_reuse_settings(p.string());
}

}  // namespace redknot
