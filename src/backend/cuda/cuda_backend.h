// The CUDA backend (sm_90a): bf16 activations and weights in device memory, f32 math, cuBLAS
// GEMMs, one stream per backend. Plain C++ header so that host code can create it without CUDA
// headers; the class lives in cuda_backend.cu.
#pragma once
#include <memory>

#include "backend/backend.h"

namespace redknot {

// Creates the backend on CUDA device `device`; throws Error when no usable GPU is present.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

}  // namespace redknot
