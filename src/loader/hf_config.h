// Hugging Face config.json -> ModelConfig for the llama, mistral, qwen2 and qwen3 families.
#pragma once
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "core/model_config.h"

namespace redknot {

// Parses and validates a config.json. If generation_config.json lies beside it, its eos_token_id
// values are added to eos_token_ids. Errors name `path`.
ModelConfig read_hf_config(const std::string& path);

// Same from an already parsed JSON object; `source` names it in errors.
ModelConfig parse_hf_config(const nlohmann::json& j, const std::string& source);

}  // namespace redknot
