// Checks that a checkpoint holds every tensor its architecture needs, with the right shapes.
#pragma once
#include <map>
#include <string>

#include "core/model_config.h"
#include "core/tensor.h"

namespace redknot {

// Throws Error "<source>: missing tensor 'name'" or "<source>: tensor 'name' has shape [a, b],
// expected [c, d]" (or an unusable dtype). Extra tensors are allowed.
void check_checkpoint_tensors(const ModelConfig& cfg, const std::map<std::string, Tensor>& tensors,
                              const std::string& source);

}  // namespace redknot
