// The CUDA backend (sm_90a): bf16 activations and weights in device memory, f32 math, one stream
// per backend. Memory comes from a stream-ordered caching allocator (no cudaMalloc in steady
// state); matmul is cuBLASLt with the bias in the epilogue, or the skinny kernels of
// skinny_gemm.cuh for decode-sized products; paged_attention is the tensor-core kernel of
// paged_flash.cuh for bf16 and head_dim 32/64/128 (split-KV for decode), the scalar kernels of
// kernels.cuh otherwise. Environment knobs: REDKNOT_CUDA_SIMPLE=1 (cublasGemmEx and the scalar
// attention kernels), REDKNOT_GEMM_SKINNY_ROWS=n and REDKNOT_GEMM_FP8_OUTER=1 (CudaGemmTuning),
// REDKNOT_FLASH_SPLITS=n (force the split-KV count), REDKNOT_FLASH_ROWS=128 (128-row prefill
// tiles). Plain C++ header so that host code can
// create it without CUDA headers; the class lives in cuda_backend.cu.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "backend/backend.h"

namespace redknot {

// Creates the backend on CUDA device `device`; throws Error when no usable GPU is present.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// Paged attention kernel choices (benchmarks, layout probes). The backend reads them once, when
// it is made, from REDKNOT_FLASH_SM90 (wgmma keys x stages per prefill tile: 128x2, 64x4, 64x3;
// "0": the mma.sync kernel), REDKNOT_FLASH_ROWS=128 (128-row mma.sync prefill tiles) and
// REDKNOT_FLASH_SPLITS=n (forced split-KV count); benchmarks change them with the setter.
struct CudaFlashTuning {
  std::string sm90 = "128x2";
  bool wide_rows = false;
  int splits = 0;  // 0: chosen per batch
  static CudaFlashTuning from_env();
};
// Throws Error when `backend` is not a CUDA backend.
void set_cuda_flash_tuning(Backend& backend, const CudaFlashTuning& tuning);

// GEMM kernel choices: products of at most `skinny_max_rows` activation rows (decode steps) run on
// the skinny kernels (skinny_gemm.cuh; at most 8), larger ones on cuBLASLt; 0 sends every product
// to cuBLASLt. `fp8_outer_vec`: per-channel FP8 GEMMs let cuBLASLt apply both scale vectors and
// write the output dtype (OUTER_VEC_32F scale mode) instead of an f32 product and an epilogue
// kernel; off until measured on the GPU (op parity, TTFT). Read once, when the backend is made,
// from REDKNOT_GEMM_SKINNY_ROWS (default 8) and REDKNOT_GEMM_FP8_OUTER=1; benchmarks change them
// with the setter.
struct CudaGemmTuning {
  int64_t skinny_max_rows = 8;
  bool fp8_outer_vec = false;
  static CudaGemmTuning from_env();
};
// Throws Error when `backend` is not a CUDA backend.
void set_cuda_gemm_tuning(Backend& backend, const CudaGemmTuning& tuning);

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
