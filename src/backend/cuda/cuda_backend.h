// The CUDA backend (sm_90a): bf16 activations and weights in device memory, f32 math, cuBLAS
// GEMMs, one stream per backend. Plain C++ header so that host code can create it without CUDA
// headers; the class lives in cuda_backend.cu.
#pragma once
#include <cstdint>
#include <memory>

#include "backend/backend.h"

namespace redknot {

// Creates the backend on CUDA device `device`; throws Error when no usable GPU is present.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// Counters of the backend's caching device allocator: cudaMalloc calls, allocations served from
// the cache, blocks returned to the driver, and bytes held (live + cached).
struct CudaAllocStats {
  int64_t mallocs = 0;
  int64_t hits = 0;
  int64_t frees = 0;
  int64_t reserved = 0;
};
// Throws Error when `backend` is not a CUDA backend.
CudaAllocStats cuda_alloc_stats(Backend& backend);
// The backend's cudaStream_t (as void*, so that this header needs no CUDA headers): every op
// runs on it; record events there to time ops.
void* cuda_stream(Backend& backend);

}  // namespace redknot
