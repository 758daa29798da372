// Checkpoints with random weights of a given shape, made in memory: for benchmarks on real
// model shapes (Llama-3-8B, Mistral-7B, 1B-class) and for tests that need no files.
#pragma once
#include <cstdint>
#include <string>

#include "core/model_config.h"
#include "loader/checkpoint.h"

namespace redknot {

// Named shapes: "llama3-8b", "mistral-7b", "1b" (Llama-3.2-1B-like, 32K vocab), "rag-7m" (the
// shipped test model's shape), "tiny".
// Throws Error listing the names when unknown.
ModelConfig preset_config(const std::string& name);

// Weights ~ U(-a, a) with a = 1/sqrt(fan_in) (so activations stay O(1)), norms = 1, stored as
// `dtype` (F32 or BF16). Deterministic in `seed`.
Checkpoint random_checkpoint(const ModelConfig& cfg, DType dtype, uint64_t seed);

}  // namespace redknot
