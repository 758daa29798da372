// Hyper-parameters of a decoder-only transformer of the Llama family, independent of file format.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace redknot {

enum class Arch { Llama, Mistral, Qwen2, Qwen3 };
const char* arch_name(Arch a);

struct RopeScaling {
  std::string type = "none";  // none | linear | dynamic | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;       // llama3
  double high_freq_factor = 4.0;      // llama3
  int64_t original_max_position = 0;  // llama3 / dynamic
};

struct ModelConfig {
  Arch arch = Arch::Llama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // may differ from hidden / heads (Qwen3)
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 2048;
  int64_t sliding_window = 0;  // 0: none (Mistral sets it)
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2)
  bool qk_norm = false;         // per-head RMSNorm on q and k (Qwen3)
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;

  // Throws Error when a field is missing or inconsistent (e.g. heads not divisible by kv heads).
  void validate(const std::string& source) const;
  // Every field, as "name=value;" in declaration order (doubles exact): what identifies the
  // model's computation, hashed into chunk-store keys. model_config.cc counts the fields at
  // compile time, so a new one cannot be left out.
  std::string canonical_string() const;
};

// Inverse rotary frequencies [head_dim / 2] after rope scaling, plus the magnitude factor that
// some scalings apply to cos/sin (1 for llama3, linear and dynamic). `seq_len` matters only for
// dynamic NTK scaling.
struct RopeFreqs {
  std::vector<float> inv_freq;
  float attention_scaling = 1.0f;
};
RopeFreqs rope_frequencies(const ModelConfig& cfg, int64_t seq_len = 0);

}  // namespace redknot
