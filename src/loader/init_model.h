// Writing a loadable Hugging Face model directory with seeded random weights: config.json,
// sharded safetensors (model-0000X-of-0000N.safetensors + model.safetensors.index.json) and the
// tokenizer files. Weights are generated and written tensor by tensor, chunk by chunk, so memory
// stays bounded (a few chunks) whatever the model size. Values depend only on the seed, the
// tensor's name and the element index: the same seed gives the same bytes whatever the thread
// count or shard size, and a --layers 2 copy has the first two layers of the full model.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "loader/model_shapes.h"

namespace redknot {

struct InitModelProgress {
  int64_t tensors_done = 0, tensors_total = 0;
  uint64_t bytes_done = 0, bytes_total = 0;
  int shard = 0, num_shards = 0;  // 1-based shard being written
};

struct InitModelOptions {
  nlohmann::json config;      // the config.json to write (parsed and validated first)
  std::string out_dir;        // created if missing; must hold no model yet unless `force`
  std::string tokenizer_dir;  // tokenizer.json (+ tokenizer_config.json ...) copied; "" none
  DType dtype = DType::BF16;  // BF16 or F32 (biases stay F32)
  uint64_t seed = 0;
  uint64_t max_shard_bytes = 5000000000ull;  // HF's default "5GB"
  int threads = 0;                           // <= 0: one per hardware thread
  int64_t chunk_elems = int64_t{1} << 22;    // elements generated per write
  bool force = false;                        // overwrite an existing model in out_dir
  nlohmann::json provenance;  // extra fields for redknot_init.json (e.g. the config name)
  std::function<void(const InitModelProgress&)> progress;  // after every tensor
};

struct InitModelResult {
  int64_t parameters = 0;
  uint64_t bytes = 0;  // tensor data written (headers excluded)
  std::vector<std::string> shards;
};

// The shard plan: tensors in order, a new shard when the next tensor would push the current one
// past `max_shard_bytes` (a tensor larger than that gets a shard of its own).
std::vector<std::vector<size_t>> plan_shards(const std::vector<WeightSpec>& specs, DType dtype,
                                             uint64_t max_shard_bytes);

// Element i of the tensor `name` under `seed`, in [-1, 1) (multiply by the spec's amplitude).
float init_uniform(uint64_t seed, const std::string& name, int64_t i);

// Writes the directory. Every failure is an Error naming the file; nothing is written when the
// config is invalid, the tokenizer is missing or does not fit the vocabulary, or the disk lacks
// space. config.json and the index are written last, so an interrupted run leaves a directory
// that does not load (rather than one that loads with missing shards).
InitModelResult init_model_dir(const InitModelOptions& opts);

// Highest token id + 1 of a HF tokenizer.json (model vocab and added tokens).
int64_t tokenizer_json_vocab(const std::string& tokenizer_json_path);

}  // namespace redknot
