#include "core/model_config.h"

#include <cmath>
#include <cstdio>
#include <numbers>

#include "core/error.h"

namespace redknot {

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::Llama:
      return "llama";
    case Arch::Mistral:
      return "mistral";
    case Arch::Qwen2:
      return "qwen2";
    case Arch::Qwen3:
      return "qwen3";
  }
  return "?";
}

namespace {
// Members of an aggregate, counted by how many initializers it accepts (each converts to any type).
struct AnyField {
  template <typename T>
  operator T() const;
};
template <typename T, typename... Fields>
constexpr size_t field_count() {
  if constexpr (requires { T{Fields{}..., AnyField{}}; })
    return field_count<T, Fields..., AnyField>();
  else
    return sizeof...(Fields);
}
// A field added to either struct fails here until canonical_string() lists it (and the count).
static_assert(field_count<RopeScaling>() == 5, "RopeScaling changed: update canonical_string()");
static_assert(field_count<ModelConfig>() == 18, "ModelConfig changed: update canonical_string()");

std::string exact(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}
}  // namespace

std::string ModelConfig::canonical_string() const {
  std::string s;
  auto put = [&](const char* name, const std::string& v) { s += name, s += '=', s += v, s += ';'; };
  auto i = [](int64_t v) { return std::to_string(v); };
  put("arch", arch_name(arch));
  put("vocab_size", i(vocab_size));
  put("hidden_size", i(hidden_size));
  put("intermediate_size", i(intermediate_size));
  put("num_layers", i(num_layers));
  put("num_heads", i(num_heads));
  put("num_kv_heads", i(num_kv_heads));
  put("head_dim", i(head_dim));
  put("rms_norm_eps", exact(rms_norm_eps));
  put("rope_theta", exact(rope_theta));
  put("rope_scaling.type", rope_scaling.type);
  put("rope_scaling.factor", exact(rope_scaling.factor));
  put("rope_scaling.low_freq_factor", exact(rope_scaling.low_freq_factor));
  put("rope_scaling.high_freq_factor", exact(rope_scaling.high_freq_factor));
  put("rope_scaling.original_max_position", i(rope_scaling.original_max_position));
  put("max_position_embeddings", i(max_position_embeddings));
  put("sliding_window", i(sliding_window));
  put("tie_word_embeddings", i(tie_word_embeddings));
  put("attention_bias", i(attention_bias));
  put("qk_norm", i(qk_norm));
  put("bos_token_id", i(bos_token_id));
  std::string eos;
  for (int32_t id : eos_token_ids) {
    if (!eos.empty()) eos += ',';
    eos += std::to_string(id);
  }
  put("eos_token_ids", eos);
  return s;
}

void ModelConfig::validate(const std::string& source) const {
  auto fail = [&](const std::string& what) {
    throw Error(source + ": invalid model config: " + what);
  };
  auto positive = [&](int64_t v, const char* name) {
    if (v <= 0) fail(std::string(name) + " must be positive (got " + std::to_string(v) + ")");
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_layers, "num_hidden_layers");
  positive(num_heads, "num_attention_heads");
  positive(num_kv_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  if (num_heads % num_kv_heads != 0)
    fail("num_attention_heads (" + std::to_string(num_heads) +
         ") is not a multiple of num_key_value_heads (" + std::to_string(num_kv_heads) + ")");
  if (head_dim % 2 != 0)
    fail("head_dim must be even for rotary embeddings (got " + std::to_string(head_dim) + ")");
  // Guards later size arithmetic (rows = heads * head_dim) against overflow on lying configs.
  constexpr int64_t kMaxDim = int64_t{1} << 24;
  if (vocab_size > (int64_t{1} << 31) || hidden_size > kMaxDim || intermediate_size > kMaxDim ||
      num_layers > 65536 || num_heads > 65536 || head_dim > 65536)
    fail("dimensions are implausibly large");
  if (!(rms_norm_eps > 0.0) || !std::isfinite(rms_norm_eps)) fail("rms_norm_eps must be positive");
  if (!(rope_theta > 0.0) || !std::isfinite(rope_theta)) fail("rope_theta must be positive");
  if (max_position_embeddings <= 0) fail("max_position_embeddings must be positive");
  if (sliding_window < 0) fail("sliding_window must be >= 0");
  const RopeScaling& rs = rope_scaling;
  if (rs.type == "none") {
  } else if (rs.type == "linear" || rs.type == "dynamic" || rs.type == "llama3") {
    if (!(rs.factor > 0.0) || !std::isfinite(rs.factor))
      fail("rope_scaling.factor must be positive for type '" + rs.type + "'");
    if (rs.type == "llama3") {
      if (rs.original_max_position <= 0)
        fail("llama3 rope_scaling needs original_max_position_embeddings");
      if (!(rs.low_freq_factor > 0.0) || !(rs.high_freq_factor > rs.low_freq_factor))
        fail("llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor");
    }
  } else {
    fail("unsupported rope_scaling type '" + rs.type + "' (supported: linear, dynamic, llama3)");
  }
  for (int32_t id : eos_token_ids)
    if (id < 0 || id >= vocab_size) fail("eos_token_id " + std::to_string(id) + " outside vocab");
  if (bos_token_id >= vocab_size) fail("bos_token_id outside vocab");
}

RopeFreqs rope_frequencies(const ModelConfig& cfg, int64_t seq_len) {
  const int64_t dim = cfg.head_dim;
  if (dim <= 0 || dim % 2 != 0)
    throw Error("rope_frequencies: head_dim must be positive and even (got " + std::to_string(dim) +
                ")");
  const RopeScaling& rs = cfg.rope_scaling;
  double base = cfg.rope_theta;
  if (rs.type == "dynamic") {
    // NTK-aware: grow the base once the sequence exceeds the trained length.
    int64_t orig =
        rs.original_max_position > 0 ? rs.original_max_position : cfg.max_position_embeddings;
    if (seq_len > orig && dim > 2) {
      double d = static_cast<double>(dim);
      base *= std::pow(
          rs.factor * static_cast<double>(seq_len) / static_cast<double>(orig) - (rs.factor - 1.0),
          d / (d - 2.0));
    }
  }
  RopeFreqs out;
  out.inv_freq.resize(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) {
    double inv = 1.0 / std::pow(base, static_cast<double>(2 * i) / static_cast<double>(dim));
    if (rs.type == "linear") {
      inv /= rs.factor;
    } else if (rs.type == "llama3") {
      // Long wavelengths are divided by factor, short ones kept, the band between interpolated.
      const double orig = static_cast<double>(rs.original_max_position);
      const double low_freq_wavelen = orig / rs.low_freq_factor;
      const double high_freq_wavelen = orig / rs.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / inv;
      if (wavelen > low_freq_wavelen) {
        inv /= rs.factor;
      } else if (wavelen >= high_freq_wavelen) {
        double smooth =
            (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        inv = (1.0 - smooth) * inv / rs.factor + smooth * inv;
      }
    } else if (rs.type != "none" && rs.type != "dynamic") {
      throw Error("rope_frequencies: unsupported rope scaling '" + rs.type + "'");
    }
    out.inv_freq[i] = static_cast<float>(inv);
  }
  out.attention_scaling = 1.0f;
  return out;
}

}  // namespace redknot
