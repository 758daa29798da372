#include "loader/hf_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace redknot {
namespace {

using json = nlohmann::json;

constexpr const char* kSupported = "llama, mistral, qwen2, qwen3";

bool arch_from_name(const std::string& s, Arch* out) {
  if (s == "llama" || s == "LlamaForCausalLM")
    *out = Arch::Llama;
  else if (s == "mistral" || s == "MistralForCausalLM")
    *out = Arch::Mistral;
  else if (s == "qwen2" || s == "Qwen2ForCausalLM")
    *out = Arch::Qwen2;
  else if (s == "qwen3" || s == "Qwen3ForCausalLM")
    *out = Arch::Qwen3;
  else
    return false;
  return true;
}

// Field readers: absent or null -> fallback; wrong type -> Error naming the field.
int64_t get_int(const json& j, const char* key, int64_t fallback, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15)
      return static_cast<int64_t>(d);
  }
  throw Error(src + ": field '" + key + "' must be an integer, got " + v.dump());
}

double get_num(const json& j, const char* key, double fallback, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  if (v.is_number()) return v.get<double>();
  throw Error(src + ": field '" + key + "' must be a number, got " + v.dump());
}

bool get_bool(const json& j, const char* key, bool fallback, const std::string& src) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  if (v.is_boolean()) return v.get<bool>();
  throw Error(src + ": field '" + key + "' must be true or false, got " + v.dump());
}

int64_t require_int(const json& j, const char* key, const std::string& src) {
  if (!j.contains(key) || j[key].is_null())
    throw Error(src + ": missing required field '" + std::string(key) + "'");
  return get_int(j, key, 0, src);
}

int32_t to_token_id(int64_t v, const char* key, const std::string& src) {
  if (v < 0 || v > std::numeric_limits<int32_t>::max())
    throw Error(src + ": " + key + " " + std::to_string(v) + " is not a valid token id");
  return static_cast<int32_t>(v);
}

// eos_token_id: int, list of ints, or null.
void add_eos_ids(const json& j, const std::string& src, std::vector<int32_t>* ids) {
  if (!j.contains("eos_token_id") || j["eos_token_id"].is_null()) return;
  const json& v = j["eos_token_id"];
  auto add = [&](const json& x) {
    if (!x.is_number_integer())
      throw Error(src + ": eos_token_id must be an integer or a list of integers");
    int32_t id = to_token_id(x.get<int64_t>(), "eos_token_id", src);
    if (std::find(ids->begin(), ids->end(), id) == ids->end()) ids->push_back(id);
  };
  if (v.is_array()) {
    for (const json& x : v) add(x);
  } else {
    add(v);
  }
}

json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(path + ": cannot open");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw Error(path + ": invalid JSON: " + e.what());
  }
}

}  // namespace

ModelConfig parse_hf_config(const json& j, const std::string& src) {
  if (!j.is_object()) throw Error(src + ": config is not a JSON object");
  ModelConfig c;
  std::string type;
  if (j.contains("model_type") && j["model_type"].is_string()) {
    type = j["model_type"].get<std::string>();
  } else if (j.contains("architectures") && j["architectures"].is_array() &&
             !j["architectures"].empty() && j["architectures"][0].is_string()) {
    type = j["architectures"][0].get<std::string>();
  } else {
    throw Error(src + ": no 'model_type' or 'architectures' field (supported: " + kSupported + ")");
  }
  if (!arch_from_name(type, &c.arch))
    throw Error(src + ": unsupported architecture '" + type + "' (supported: " + kSupported + ")");

  c.vocab_size = require_int(j, "vocab_size", src);
  c.hidden_size = require_int(j, "hidden_size", src);
  c.intermediate_size = require_int(j, "intermediate_size", src);
  c.num_layers = require_int(j, "num_hidden_layers", src);
  c.num_heads = require_int(j, "num_attention_heads", src);
  c.num_kv_heads = get_int(j, "num_key_value_heads", c.num_heads, src);
  c.head_dim = get_int(j, "head_dim", c.num_heads > 0 ? c.hidden_size / c.num_heads : 0, src);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", 1e-6, src);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", 2048, src);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", false, src);
  c.attention_bias = c.arch == Arch::Qwen2 ? true : get_bool(j, "attention_bias", false, src);
  c.qk_norm = c.arch == Arch::Qwen3;

  // Rope: newer configs put theta and scaling into rope_parameters; older ones use rope_theta
  // plus an optional rope_scaling dict (which may repeat rope_theta).
  const json* scaling = nullptr;
  for (const char* key : {"rope_scaling", "rope_parameters"})
    if (j.contains(key) && !j[key].is_null()) {
      if (!j[key].is_object()) throw Error(src + ": '" + key + "' must be an object");
      if (!scaling) scaling = &j[key];
    }
  c.rope_theta = get_num(j, "rope_theta", 10000.0, src);
  if (!j.contains("rope_theta") || j["rope_theta"].is_null()) {
    for (const char* key : {"rope_scaling", "rope_parameters"})
      if (j.contains(key) && j[key].is_object() && j[key].contains("rope_theta")) {
        c.rope_theta = get_num(j[key], "rope_theta", 10000.0, src);
        break;
      }
  }
  if (scaling) {
    const json& s = *scaling;
    std::string rt = "default";
    for (const char* key : {"rope_type", "type"})
      if (s.contains(key) && s[key].is_string()) {
        rt = s[key].get<std::string>();
        break;
      }
    if (rt == "default" || rt == "none") {
      c.rope_scaling.type = "none";
    } else if (rt == "linear" || rt == "dynamic" || rt == "llama3") {
      c.rope_scaling.type = rt;
      c.rope_scaling.factor = get_num(s, "factor", 1.0, src);
      c.rope_scaling.low_freq_factor = get_num(s, "low_freq_factor", 1.0, src);
      c.rope_scaling.high_freq_factor = get_num(s, "high_freq_factor", 4.0, src);
      c.rope_scaling.original_max_position =
          get_int(s, "original_max_position_embeddings",
                  rt == "llama3" ? 0 : c.max_position_embeddings, src);
    } else {
      throw Error(src + ": unsupported rope_scaling type '" + rt +
                  "' (supported: linear, dynamic, llama3)");
    }
  }

  // Sliding window: Mistral states it (or null); Qwen2/3 apply it only with use_sliding_window,
  // and then only from layer max_window_layers on; one window for all layers is supported.
  if (c.arch == Arch::Mistral) {
    c.sliding_window = get_int(j, "sliding_window", 0, src);
  } else if ((c.arch == Arch::Qwen2 || c.arch == Arch::Qwen3) &&
             get_bool(j, "use_sliding_window", false, src)) {
    int64_t window = get_int(j, "sliding_window", 0, src);
    int64_t first = get_int(j, "max_window_layers", 0, src);
    if (window > 0 && first < c.num_layers) {
      if (first > 0)
        throw Error(src + ": sliding window on layers " + std::to_string(first) +
                    ".. only "
                    "(max_window_layers) is not supported; all layers or none");
      c.sliding_window = window;
    }
  }
  if (j.contains("layer_types") && j["layer_types"].is_array()) {
    size_t sliding = 0;
    for (const json& t : j["layer_types"])
      if (t.is_string() && t.get<std::string>() == "sliding_attention") ++sliding;
    if (sliding != 0 && sliding != j["layer_types"].size())
      throw Error(src + ": mixed sliding/full attention layer_types are not supported");
    if (sliding == 0 && c.arch != Arch::Mistral) c.sliding_window = 0;
  }

  int64_t bos = get_int(j, "bos_token_id", -1, src);
  c.bos_token_id = bos < 0 ? -1 : to_token_id(bos, "bos_token_id", src);
  add_eos_ids(j, src, &c.eos_token_ids);
  return c;
}

ModelConfig read_hf_config(const std::string& path) {
  ModelConfig c = parse_hf_config(read_json_file(path), path);
  const std::filesystem::path gen =
      std::filesystem::path(path).parent_path() / "generation_config.json";
  std::error_code ec;
  if (std::filesystem::exists(gen, ec)) {
    const std::string gpath = gen.string();
    json g = read_json_file(gpath);
    if (g.is_object()) add_eos_ids(g, gpath, &c.eos_token_ids);
  }
  c.validate(path);
  return c;
}

}  // namespace redknot
