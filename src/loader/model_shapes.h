// Real model shapes as data: the public config.json of the models RedKnot is measured on
// (Llama-3/3.1/3.3, Mistral-7B-v0.3, Qwen3-8B/32B), plus two tiny test-only shapes with real
// vocabularies. `redknot init-model` writes them out with seeded random weights; the table is
// also what the shape tests check parameter counts against.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/model_config.h"

namespace redknot {

struct ModelShape {
  const char* name;   // e.g. "llama3-8b"
  const char* hf_id;  // the checkpoint whose config.json this is, e.g. "meta-llama/Meta-Llama-3-8B"
  const char* tokenizer;    // the ../shared/tokenizers entry that fits it ("" when none does)
  bool test_only;           // tiny shapes for tests (not a real model)
  const char* config_json;  // the config.json text
};

// Every shape, real ones first.
const std::vector<ModelShape>& model_shapes();

// "llama3-8b, llama3.1-8b, ..." (real shapes, or all with test_only).
std::string model_shape_names(bool include_test_only = false);

// The named shape; throws Error listing the names when unknown.
const ModelShape& model_shape(const std::string& name);

// The config.json of `name`, parsed. `layers` > 0 overrides num_hidden_layers (and clamps
// max_window_layers, for Qwen); the dtype field (torch_dtype) is set from `torch_dtype` when given.
nlohmann::json model_shape_config(const std::string& name, int64_t layers = 0,
                                  const std::string& torch_dtype = "");

// One stored tensor of a HF Llama-family checkpoint and how init-model fills it.
struct WeightSpec {
  enum class Init { Uniform, Ones };
  std::string name;
  std::vector<int64_t> shape;
  Init init = Init::Uniform;
  float amplitude = 0;    // Uniform: U(-amplitude, amplitude)
  bool keep_f32 = false;  // biases stay f32 (as random_checkpoint stores them)
  int64_t numel() const;
};

// The tensors of a checkpoint of `cfg`, in HF order (embedding, layers 0.., final norm, lm_head),
// with random_checkpoint()'s init rule: matrices U(-a, a), a = 1/sqrt(fan_in) (activations stay
// O(1) through any depth of pre-norm layers), the embedding a = 1, biases a = 0.1, norms 1.
std::vector<WeightSpec> weight_specs(const ModelConfig& cfg);

// Parameters a HF checkpoint of `cfg` stores (lm_head counted when not tied).
int64_t count_parameters(const ModelConfig& cfg);

}  // namespace redknot
