#include "loader/model_shapes.h"

#include <cmath>

#include "core/error.h"

namespace redknot {

namespace {

// The public config.json files, as released on the Hugging Face hub (fields the loader ignores,
// such as hidden_act or initializer_range, are kept so that the files are the real ones).
const std::vector<ModelShape> kShapes = {
    {"llama3-8b", "meta-llama/Meta-Llama-3-8B", "llama3", false, R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})"},
    {"llama3.1-8b", "meta-llama/Llama-3.1-8B", "llama3", false, R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})"},
    {"mistral-7b", "mistralai/Mistral-7B-v0.3", "", false, R"({
  "architectures": ["MistralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.0.dev0",
  "use_cache": true,
  "vocab_size": 32768
})"},
    {"qwen3-8b", "Qwen/Qwen3-8B", "qwen3", false, R"({
  "architectures": ["Qwen3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 12288,
  "max_position_embeddings": 40960,
  "max_window_layers": 36,
  "model_type": "qwen3",
  "num_attention_heads": 32,
  "num_hidden_layers": 36,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})"},
    {"qwen3-32b", "Qwen/Qwen3-32B", "qwen3", false, R"({
  "architectures": ["Qwen3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 5120,
  "initializer_range": 0.02,
  "intermediate_size": 25600,
  "max_position_embeddings": 40960,
  "max_window_layers": 64,
  "model_type": "qwen3",
  "num_attention_heads": 64,
  "num_hidden_layers": 64,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})"},
    {"llama3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", "llama3", false, R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 8192,
  "initializer_range": 0.02,
  "intermediate_size": 28672,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 64,
  "num_hidden_layers": 80,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.47.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})"},
    // Test-only: real vocabularies (so the real tokenizers load), everything else tiny, so that a
    // 2-layer directory is ~20 MB. test-qwen3 has head_dim * heads != hidden_size, as Qwen3 does.
    {"test-llama3", "(test) Llama-3 vocabulary, tiny layers", "llama3", true, R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 32,
  "intermediate_size": 96,
  "max_position_embeddings": 8192,
  "model_type": "llama",
  "num_attention_heads": 2,
  "num_hidden_layers": 4,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "vocab_size": 128256
})"},
    {"test-qwen3", "(test) Qwen3 vocabulary, tiny layers", "qwen3", true, R"({
  "architectures": ["Qwen3ForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "head_dim": 16,
  "hidden_act": "silu",
  "hidden_size": 32,
  "intermediate_size": 96,
  "max_position_embeddings": 40960,
  "max_window_layers": 4,
  "model_type": "qwen3",
  "num_attention_heads": 4,
  "num_hidden_layers": 4,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "use_sliding_window": false,
  "vocab_size": 151936
})"},
};

}  // namespace

const std::vector<ModelShape>& model_shapes() { return kShapes; }

std::string model_shape_names(bool include_test_only) {
  std::string s;
  for (const ModelShape& m : kShapes)
    if (include_test_only || !m.test_only) s += (s.empty() ? "" : ", ") + std::string(m.name);
  return s;
}

const ModelShape& model_shape(const std::string& name) {
  for (const ModelShape& m : kShapes)
    if (name == m.name) return m;
  throw Error("unknown model config '" + name + "' (known: " + model_shape_names(true) + ")");
}

nlohmann::json model_shape_config(const std::string& name, int64_t layers,
                                  const std::string& torch_dtype) {
  const ModelShape& m = model_shape(name);
  nlohmann::json j = nlohmann::json::parse(m.config_json);
  if (layers < 0) throw Error("--layers must be positive");
  if (layers > 0) {
    j["num_hidden_layers"] = layers;
    if (j.contains("max_window_layers") && j["max_window_layers"].is_number_integer() &&
        j["max_window_layers"].get<int64_t>() > layers)
      j["max_window_layers"] = layers;
  }
  if (!torch_dtype.empty()) j["torch_dtype"] = torch_dtype;
  return j;
}

int64_t WeightSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<WeightSpec> weight_specs(const ModelConfig& cfg) {
  const int64_t H = cfg.hidden_size, F = cfg.intermediate_size, hd = cfg.head_dim;
  const int64_t q = cfg.num_heads * hd, kv = cfg.num_kv_heads * hd;
  auto amp = [](int64_t fan_in) { return 1.0f / std::sqrt(static_cast<float>(fan_in)); };
  using I = WeightSpec::Init;
  std::vector<WeightSpec> w;
  w.push_back({"model.embed_tokens.weight", {cfg.vocab_size, H}, I::Uniform, 1.0f, false});
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w.push_back({p + "input_layernorm.weight", {H}, I::Ones, 0, false});
    w.push_back({p + "self_attn.q_proj.weight", {q, H}, I::Uniform, amp(H), false});
    w.push_back({p + "self_attn.k_proj.weight", {kv, H}, I::Uniform, amp(H), false});
    w.push_back({p + "self_attn.v_proj.weight", {kv, H}, I::Uniform, amp(H), false});
    if (cfg.attention_bias) {
      w.push_back({p + "self_attn.q_proj.bias", {q}, I::Uniform, 0.1f, true});
      w.push_back({p + "self_attn.k_proj.bias", {kv}, I::Uniform, 0.1f, true});
      w.push_back({p + "self_attn.v_proj.bias", {kv}, I::Uniform, 0.1f, true});
    }
    if (cfg.qk_norm) {
      w.push_back({p + "self_attn.q_norm.weight", {hd}, I::Ones, 0, false});
      w.push_back({p + "self_attn.k_norm.weight", {hd}, I::Ones, 0, false});
    }
    w.push_back({p + "self_attn.o_proj.weight", {H, q}, I::Uniform, amp(q), false});
    w.push_back({p + "post_attention_layernorm.weight", {H}, I::Ones, 0, false});
    w.push_back({p + "mlp.gate_proj.weight", {F, H}, I::Uniform, amp(H), false});
    w.push_back({p + "mlp.up_proj.weight", {F, H}, I::Uniform, amp(H), false});
    w.push_back({p + "mlp.down_proj.weight", {H, F}, I::Uniform, amp(F), false});
  }
  w.push_back({"model.norm.weight", {H}, I::Ones, 0, false});
  if (!cfg.tie_word_embeddings)
    w.push_back({"lm_head.weight", {cfg.vocab_size, H}, I::Uniform, amp(H), false});
  return w;
}

int64_t count_parameters(const ModelConfig& cfg) {
  int64_t n = 0;
  for (const WeightSpec& w : weight_specs(cfg)) n += w.numel();
  return n;
}

}  // namespace redknot
