// Thin launchers around kernels.cuh plus device memory management and cuBLAS GEMMs.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/fp8_kernels.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/paged_flash.cuh"
#include "backend/cuda/paged_flash_sm90.cuh"
#include "backend/cuda/skinny_gemm.cuh"
#include "backend/op_checks.h"
#include "backend/reference/paged_attention_ref.h"
#include "core/error.h"

namespace redknot {
namespace {

using namespace op_checks;
using bf16 = __nv_bfloat16;

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
}

void cublas_check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("cuBLAS error in ") + what + ": " + cublasGetStatusString(status));
}

// After every launch: configuration errors surface here, not at the next sync.
void launch_check(const char* kernel) { cuda_check(cudaGetLastError(), kernel); }

// A tuning switch from the environment (benchmarks and layout probes), or its default.
std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string(fallback);
}

// Grid for grid-stride elementwise kernels.
unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + 255) / 256, 1, 8192));
}

// Calls f(T{}) with T the device element type of an activation dtype.
template <typename F>
void dispatch_act(const char* op, DType dtype, F&& f) {
  if (dtype == DType::BF16)
    f(bf16{});
  else if (dtype == DType::F32)
    f(float{});
  else
    throw Error(std::string(op) + ": cuda supports bf16 or f32 activations, got " +
                dtype_name(dtype));
}

void expect_cuda(const char* op, const char* arg, const Tensor& t) {
  expect_device(op, arg, t, Device::Cuda);
}

// Caching device allocator: freed blocks go to size-bucketed free lists and are reused by later
// allocations. All work of a backend runs on its one stream, so a block released by a tensor
// holder (even while kernels that use it are still queued) is only touched again by work queued
// after it: stream-ordered reuse, as in PyTorch's caching allocator. After warm-up a forward
// pass of the same shape does no cudaMalloc/cudaFree. Holders keep the cache alive, so tensors
// may outlive the backend.
class DeviceCache {
 public:
  ~DeviceCache() {
    for (auto& [size, ptr] : free_) cudaFree(ptr);
  }

  // Sizes < 1 MiB round up to 512 B; larger ones to 1/8 of their power of two (<= 12.5% slack);
  // blocks of 1 GiB and more (the KV page pool, sized from free memory) only to 2 MiB: a 1/8
  // bucket would waste GiBs there and can push a pool sized at 90% of free memory past 100%.
  static size_t round_size(size_t bytes) {
    bytes = std::max<size_t>(bytes, 512);
    if (bytes < (size_t{1} << 20)) return (bytes + 511) / 512 * 512;
    constexpr size_t kHuge = size_t{1} << 30, kGranule = size_t{2} << 20;
    if (bytes >= kHuge) return (bytes + kGranule - 1) / kGranule * kGranule;
    size_t pow2 = size_t{1} << 20;
    while (pow2 * 2 <= bytes) pow2 *= 2;
    const size_t step = pow2 / 8;
    return (bytes + step - 1) / step * step;
  }

  void* get(size_t bytes, cudaStream_t stream) {
    const size_t size = round_size(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit among cached blocks no more than 25% larger.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        void* p = it->second;
        live_[p] = it->first;
        free_.erase(it);
        ++stats_.hits;
        return p;
      }
    }
    void* p = nullptr;
    cudaError_t st = cudaMalloc(&p, size);
    if (st != cudaSuccess) {  // out of memory: give the cached blocks back and retry once
      cudaGetLastError();
      cudaStreamSynchronize(stream);
      release_cached();
      st = cudaMalloc(&p, size);
    }
    cuda_check(st, ("cudaMalloc of " + std::to_string(size) + " bytes").c_str());
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = size;
    ++stats_.mallocs;
    stats_.reserved += size;
    return p;
  }

  void put(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;
    free_.emplace(it->second, p);
    live_.erase(it);
  }

  void release_cached() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [size, ptr] : free_) {
      cudaFree(ptr);
      stats_.reserved -= size;
      ++stats_.frees;
    }
    free_.clear();
  }

  CudaAllocStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> live_;
  CudaAllocStats stats_;
};

// A holder that returns its block to the cache.
std::shared_ptr<void> cached_block(const std::shared_ptr<DeviceCache>& cache, size_t bytes,
                                   cudaStream_t stream) {
  void* p = cache->get(bytes, stream);
  return std::shared_ptr<void>(p, [cache](void* q) { cache->put(q); });
}

// Largest power of two (<= 256) dividing the address: cuBLASLt's alignment preference.
uint32_t ptr_alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// What a cuBLASLt plan multiplies: bf16 operands; e4m3 operands into an f32 accumulator (the
// scaling epilogue kernel finishes it); e4m3 operands with per-channel (A) and per-token (B) f32
// scale vectors applied by cuBLASLt itself (OUTER_VEC_32F), out dtype straight from the GEMM.
enum class LtKind { kBf16, kFp8, kFp8OuterVec };

// One cached cuBLASLt matmul setup per (M, N, K, out dtype, bias, alignment, kind).
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    int count = 0;
    cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (device < 0 || device >= count)
      throw Error("cuda backend: device " + std::to_string(device) + " not present (" +
                  std::to_string(count) + " devices)");
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cublas_check(cublasCreate(&cublas_), "cublasCreate");
    cublas_check(cublasSetStream(cublas_, stream_), "cublasSetStream");
    cublas_check(cublasLtCreate(&lt_), "cublasLtCreate");
    cuda_check(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    cache_ = std::make_shared<DeviceCache>();
    lt_workspace_ = cached_block(cache_, kLtWorkspace, stream_);
    // Tuning switches (benchmarks, layout probes): read once here, not on every call.
    simple_ = env_or("REDKNOT_CUDA_SIMPLE", "0") == "1";
    flash_ = CudaFlashTuning::from_env();
    gemm_ = CudaGemmTuning::from_env();
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (Stage& st : stages_) {
      if (st.ptr) cudaFreeHost(st.ptr);
      if (st.done) cudaEventDestroy(st.done);
    }
    for (auto& [key, plan] : lt_plans_) {
      if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
      if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
      if (plan.c) cublasLtMatrixLayoutDestroy(plan.c);
      if (plan.op) cublasLtMatmulDescDestroy(plan.op);
    }
    cublasLtDestroy(lt_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  CudaAllocStats alloc_stats() { return cache_->stats(); }
  void set_flash_tuning(const CudaFlashTuning& t) { flash_ = t; }
  void set_gemm_tuning(const CudaGemmTuning& t) { gemm_ = t; }
  cudaStream_t stream() const { return stream_; }

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::Cuda; }
  DType act_dtype() const override { return DType::BF16; }

  Tensor alloc(DType dtype, std::vector<int64_t> shape) override {
    return allocate(dtype, std::move(shape), 0);
  }

  // No memset: a cached block holds whatever its last owner left (at 8K tokens the per-layer
  // activations of an 8B model are ~0.6 GB, so zeroing them all cost ~20 GB of writes).
  Tensor alloc_uninit(DType dtype, std::vector<int64_t> shape) override {
    return allocate(dtype, std::move(shape), poison_uninit_allocs() ? 0xFF : -1);
  }

  // Matrices become bf16 (the GEMM dtype); vectors (norm weights, biases) stay f32.
  Tensor upload_weight(const Tensor& host) override {
    expect_device("upload_weight", "host", host, Device::Host);
    // copy_from_host writes every byte: no zero fill needed.
    if (host.dtype() == DType::I32) {
      Tensor t = alloc_uninit(DType::I32, host.shape());
      copy_from_host(t, host);
      return t;
    }
    // FP8 weights stay codes (matmul_fp8 reads them with their scales).
    const DType target = host.dtype() == DType::F8_E4M3 ? DType::F8_E4M3
                         : host.rank() >= 2             ? DType::BF16
                                                        : DType::F32;
    Tensor t = alloc_uninit(target, host.shape());
    copy_from_host(t, host);
    return t;
  }

  void copy_from_host(Tensor& dst, const Tensor& src) override {
    refuse_while_recording("copy_from_host");
    expect_cuda("copy_from_host", "dst", dst);
    expect_device("copy_from_host", "src", src, Device::Host);
    if (dst.numel() != src.numel())
      throw Error("copy_from_host: element count differs: " + dst.describe() + " <- " +
                  src.describe());
    const bool convert = dst.dtype() != src.dtype();  // e.g. f32 host values into bf16
    if (convert &&
        (dst.dtype() == DType::Q8_0 || dst.dtype() == DType::I32 || src.dtype() == DType::I32))
      throw Error("copy_from_host: cannot convert " + src.describe() + " to " + dst.describe());
    const size_t bytes = static_cast<size_t>(dst.nbytes());
    if (bytes == 0) return;
    // Writes dst's bytes (converted when the dtypes differ) to `buf`.
    auto fill = [&](void* buf) {
      if (!convert) {
        std::memcpy(buf, src.raw(), bytes);
        return;
      }
      std::vector<float> f32(src.numel());
      convert_to_f32(src.dtype(), src.raw(), f32.data(), src.numel());
      convert_from_f32(f32.data(), dst.dtype(), buf, dst.numel());
    };
    if (bytes <= kStageMax) {
      // Small uploads (token ids, positions, the paged plans: several per layer per forward) go
      // through a pinned staging block: the copy is a true async DMA, ordered on the stream, and
      // the host neither waits for the stream nor needs `src` after we return.
      Stage st = take_stage(bytes);
      stages_.push_back(st);  // owned by the pool from here on, also if a call below throws
      fill(st.ptr);
      cuda_check(cudaMemcpyAsync(dst.raw(), st.ptr, bytes, cudaMemcpyHostToDevice, stream_),
                 "copy_from_host");
      cuda_check(cudaEventRecord(st.done, stream_), "copy_from_host event");
      return;
    }
    // Large uploads (weights): straight from `src` (DMA speed when the caller pinned it), then
    // wait, as the host buffer may die after we return.
    const void* data = src.raw();
    std::vector<uint8_t> converted;
    if (convert) {
      converted.resize(bytes);
      fill(converted.data());
      data = converted.data();
    }
    cuda_check(cudaMemcpyAsync(dst.raw(), data, bytes, cudaMemcpyHostToDevice, stream_),
               "copy_from_host");
    cuda_check(cudaStreamSynchronize(stream_), "copy_from_host sync");
  }

  Tensor to_host_f32(const Tensor& src) override {
    refuse_while_recording("to_host_f32");
    Tensor out = Tensor::host(DType::F32, src.shape());
    if (src.device() == Device::Host) {
      convert_to_f32(src.dtype(), src.raw(), out.data<float>(), src.numel());
      return out;
    }
    std::vector<uint8_t> staging(src.nbytes());
    cuda_check(
        cudaMemcpyAsync(staging.data(), src.raw(), src.nbytes(), cudaMemcpyDeviceToHost, stream_),
        "to_host_f32");
    cuda_check(cudaStreamSynchronize(stream_), "to_host_f32 sync");
    convert_to_f32(src.dtype(), staging.data(), out.data<float>(), src.numel());
    return out;
  }

  void synchronize() override {
    refuse_while_recording("synchronize");
    cuda_check(cudaStreamSynchronize(stream_), "synchronize");
  }

  // Stream capture into a CUDA graph. Buffers allocated while capturing come from a private
  // cache that the graph keeps: its replays write them, so nothing else may ever get them (as
  // PyTorch's graph memory pools). Relaxed mode: a first-time cudaMalloc may happen inside.
  std::unique_ptr<RecordedWork> record(const std::function<void()>& body) override {
    if (recording_) throw Error("cuda record: already recording");
    auto graph_cache = std::make_shared<DeviceCache>();
    std::shared_ptr<DeviceCache> main_cache = cache_;
    cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "begin capture");
    cache_ = graph_cache;
    recording_ = true;
    cudaGraph_t graph = nullptr;
    try {
      body();
    } catch (...) {
      recording_ = false;
      cache_ = main_cache;
      cudaStreamEndCapture(stream_, &graph);
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      throw;
    }
    recording_ = false;
    cache_ = main_cache;
    cuda_check(cudaStreamEndCapture(stream_, &graph), "end capture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t st = cudaGraphInstantiate(&exec, graph, 0);
    if (st != cudaSuccess) {
      cudaGraphDestroy(graph);
      cuda_check(st, "cudaGraphInstantiate");
    }
    return std::make_unique<CudaGraphWork>(graph, exec, stream_, std::move(graph_cache));
  }
  int64_t free_memory_bytes() const override {
    size_t free_b = 0, total_b = 0;
    cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    return static_cast<int64_t>(free_b);
  }

  void embedding(const Tensor& table, const Tensor& ids, Tensor& out) override {
    expect_rank("embedding", "table", table, 2);
    expect_dtype("embedding", "ids", ids, DType::I32);
    expect_cuda("embedding", "table", table);
    expect_cuda("embedding", "ids", ids);
    expect_shape("embedding", "out", out, {ids.numel(), table.dim(1)});
    if (ids.numel() == 0) return;
    dispatch_act("embedding", out.dtype(), [&](auto out_tag) {
      using TOut = decltype(out_tag);
      dispatch_act("embedding", table.dtype(), [&](auto table_tag) {
        using TTable = decltype(table_tag);
        cuda::embedding_kernel<TOut, TTable>
            <<<ids.numel(), 256, 0, stream_>>>(table.data<TTable>(), ids.data<int32_t>(),
                                               table.dim(0), table.dim(1), out.data<TOut>());
        launch_check("embedding_kernel");
      });
    });
  }

  // bf16 x and w, f32 accumulation, bf16 or f32 out. cuBLASLt with the f32 bias in the
  // epilogue and a cached descriptor/heuristic per shape; cublasGemmEx + a bias kernel when
  // cuBLASLt offers no algorithm (or REDKNOT_CUDA_SIMPLE=1).
  void matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override {
    check_matmul(x, w, bias, out);
    expect_cuda("matmul", "x", x);
    expect_cuda("matmul", "w", w);
    expect_cuda("matmul", "out", out);
    expect_dtype("matmul", "x", x, DType::BF16);
    expect_dtype("matmul", "w", w, DType::BF16);
    if (bias.numel()) {
      expect_cuda("matmul", "bias", bias);
      expect_dtype("matmul", "bias", bias, DType::F32);
    }
    const int64_t m_rows = x.rows(), n_rows = w.dim(0), k_dim = w.dim(1);
    if (m_rows == 0 || n_rows == 0) return;
    const cudaDataType out_type = out.dtype() == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
    if (out.dtype() != DType::F32 && out.dtype() != DType::BF16)
      throw Error("matmul: out must be bf16 or f32, got " + out.describe());
    if (skinny(m_rows, k_dim, 8, x.raw(), w)) {
      skinny_gemm<false>(x.data<uint8_t>(), nullptr, w, nullptr, bias, out, m_rows, 0);
      return;
    }
    // Row-major out[M,N] = x[M,K]·w[N,K]ᵀ is column-major outᵀ[N,M] = wᵀ(op T)[N,K]·xᵀ[K,M].
    const float alpha = 1.0f, beta = 0.0f;
    if (!simple_) {
      const LtPlan& plan = lt_plan(
          m_rows, n_rows, k_dim, out.dtype(), bias.numel() > 0,
          std::min({ptr_alignment(x.raw()), ptr_alignment(w.raw()), ptr_alignment(out.raw())}));
      if (plan.ok) {
        if (bias.numel()) {
          const void* bias_ptr = bias.raw();
          cublas_check(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                      &bias_ptr, sizeof(bias_ptr)),
                       "cublasLt bias pointer");
        }
        cublas_check(cublasLtMatmul(lt_, plan.op, &alpha, w.raw(), plan.a, x.raw(), plan.b, &beta,
                                    out.raw(), plan.c, out.raw(), plan.c, &plan.algo,
                                    lt_workspace_.get(), kLtWorkspace, stream_),
                     "cublasLtMatmul");
        return;
      }
    }
    cublas_check(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_rows),
                              static_cast<int>(m_rows), static_cast<int>(k_dim), &alpha, w.raw(),
                              CUDA_R_16BF, static_cast<int>(k_dim), x.raw(), CUDA_R_16BF,
                              static_cast<int>(k_dim), &beta, out.raw(), out_type,
                              static_cast<int>(n_rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
    if (bias.numel()) add_bias(out, bias.data<float>(), m_rows, n_rows);
  }

  // out: [M, N] bf16 or f32 += bias: [N] f32
  void add_bias(Tensor& out, const float* bias, int64_t m_rows, int64_t n_rows) {
    dispatch_act("matmul", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::add_bias_kernel<T><<<elementwise_blocks(m_rows * n_rows), 256, 0, stream_>>>(
          out.data<T>(), bias, m_rows, n_rows);
      launch_check("add_bias_kernel");
    });
  }

  // x: [R, C] act; q: [R, C] f8; scale: [R] f32 (one block per row)
  void quantize_fp8_rows(const Tensor& x, Tensor& q, Tensor& scale) override {
    check_fp8_rows("quantize_fp8_rows", x, q, scale);
    for (const Tensor* t : std::initializer_list<const Tensor*>{&x, &q, &scale})
      expect_cuda("quantize_fp8_rows", "argument", *t);
    fp8_rows(x, q, &scale, q.cols());
  }

  // q: [R, C] f8; scale: [R] f32; out: [R, C] act
  void dequantize_fp8_rows(const Tensor& q, const Tensor& scale, Tensor& out) override {
    check_fp8_rows("dequantize_fp8_rows", out, q, scale);
    for (const Tensor* t : std::initializer_list<const Tensor*>{&out, &q, &scale})
      expect_cuda("dequantize_fp8_rows", "argument", *t);
    fp8_unrows(q, &scale, out, q.cols());
  }

  // x: [R, C] act -> rows: [R, C + 4] f8 (codes, then the row's f32 scale)
  void pack_fp8_kv_rows(const Tensor& x, Tensor& rows) override {
    expect_cuda("pack_fp8_kv_rows", "x", x);
    expect_cuda("pack_fp8_kv_rows", "rows", rows);
    if (rows.dtype() != DType::F8_E4M3 || rows.rows() != x.rows() ||
        rows.cols() != x.cols() + kFp8KvScaleBytes)
      throw Error("pack_fp8_kv_rows: rows " + rows.describe() + " must be f8_e4m3 [R, C + 4] for " +
                  x.describe());
    fp8_rows(x, rows, nullptr, rows.cols());
  }

  // rows: [R, C + 4] f8 -> out: [R, C] act
  void unpack_fp8_kv_rows(const Tensor& rows, Tensor& out) override {
    expect_cuda("unpack_fp8_kv_rows", "rows", rows);
    expect_cuda("unpack_fp8_kv_rows", "out", out);
    if (rows.dtype() != DType::F8_E4M3 || rows.rows() != out.rows() ||
        rows.cols() != out.cols() + kFp8KvScaleBytes)
      throw Error("unpack_fp8_kv_rows: rows " + rows.describe() +
                  " must be f8_e4m3 [R, C + 4] for " + out.describe());
    fp8_unrows(rows, nullptr, out, rows.cols());
  }

  // FP8 GEMM: activations quantized per row (quantize_fp8_rows_kernel), then per-channel
  // weights through cuBLASLt (e4m3 x e4m3 -> f32, TN) and the scaling epilogue kernel; 128x128
  // block scales (no sm_90 cuBLASLt mode), shapes cuBLASLt refuses and REDKNOT_CUDA_SIMPLE=1 go
  // to the plain tiled kernel. x: [M, K] act; w: [N, K] f8; w_scale: [N] or [N/128, K/128] f32;
  // bias: [N] f32 or empty; out: [M, N] bf16 or f32
  void matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, const Tensor& bias,
                  Tensor& out) override {
    check_matmul_fp8(x, w, w_scale, bias, out);
    for (const Tensor* t : std::initializer_list<const Tensor*>{&x, &w, &w_scale, &out})
      expect_cuda("matmul_fp8", "argument", *t);
    if (bias.numel()) {
      expect_cuda("matmul_fp8", "bias", bias);
      expect_dtype("matmul_fp8", "bias", bias, DType::F32);
    }
    const int64_t m_rows = x.rows(), n_rows = w.dim(0), k_dim = w.dim(1);
    if (m_rows == 0 || n_rows == 0) return;
    const bool blocked = w_scale.rank() == 2;
    const float* bias_ptr = bias.numel() ? bias.data<float>() : nullptr;
    Tensor xq = alloc_uninit(DType::F8_E4M3, {m_rows, k_dim});
    Tensor sx = alloc_uninit(DType::F32, {m_rows});
    fp8_rows(x.reshape({m_rows, k_dim}), xq, &sx, k_dim);
    if (skinny(m_rows, k_dim, 16, xq.raw(), w)) {
      skinny_gemm<true>(xq.data<uint8_t>(), sx.data<float>(), w, &w_scale, bias, out, m_rows,
                        blocked ? w_scale.dim(1) : 0);
      return;
    }
    cuda::Fp8GemmParams p{m_rows, n_rows, k_dim, blocked ? w_scale.dim(1) : 0};
    if (!blocked && !simple_ && gemm_.fp8_outer_vec) {
      const LtPlan& plan = lt_plan(
          m_rows, n_rows, k_dim, out.dtype(), false,
          std::min({ptr_alignment(xq.raw()), ptr_alignment(w.raw()), ptr_alignment(out.raw())}),
          LtKind::kFp8OuterVec);
      if (plan.ok) {
        const void* a_scale = w_scale.raw();
        const void* b_scale = sx.raw();
        cublas_check(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                    &a_scale, sizeof(a_scale)),
                     "cublasLt A scale pointer");
        cublas_check(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                    &b_scale, sizeof(b_scale)),
                     "cublasLt B scale pointer");
        const float alpha = 1.0f, beta = 0.0f;
        cublas_check(cublasLtMatmul(lt_, plan.op, &alpha, w.raw(), plan.a, xq.raw(), plan.b, &beta,
                                    out.raw(), plan.c, out.raw(), plan.c, &plan.algo,
                                    lt_workspace_.get(), kLtWorkspace, stream_),
                     "cublasLtMatmul fp8 outer-vector scales");
        if (bias_ptr != nullptr) add_bias(out, bias_ptr, m_rows, n_rows);
        return;
      }
    }
    if (!blocked && !simple_) {
      Tensor acc = alloc_uninit(DType::F32, {m_rows, n_rows});
      const LtPlan& plan = lt_plan(
          m_rows, n_rows, k_dim, DType::F32, false,
          std::min({ptr_alignment(xq.raw()), ptr_alignment(w.raw()), ptr_alignment(acc.raw())}),
          LtKind::kFp8);
      if (plan.ok) {
        const float alpha = 1.0f, beta = 0.0f;
        cublas_check(cublasLtMatmul(lt_, plan.op, &alpha, w.raw(), plan.a, xq.raw(), plan.b, &beta,
                                    acc.raw(), plan.c, acc.raw(), plan.c, &plan.algo,
                                    lt_workspace_.get(), kLtWorkspace, stream_),
                     "cublasLtMatmul fp8");
        dispatch_act("matmul_fp8", out.dtype(), [&](auto tag) {
          using T = decltype(tag);
          cuda::fp8_scale_epilogue_kernel<T>
              <<<elementwise_blocks(m_rows * n_rows), 256, 0, stream_>>>(
                  acc.data<float>(), sx.data<float>(), w_scale.data<float>(), bias_ptr, p,
                  out.data<T>());
          launch_check("fp8_scale_epilogue_kernel");
        });
        return;
      }
    }
    const dim3 grid(static_cast<unsigned>((n_rows + cuda::kFp8GemmTile - 1) / cuda::kFp8GemmTile),
                    static_cast<unsigned>((m_rows + cuda::kFp8GemmTile - 1) / cuda::kFp8GemmTile));
    dispatch_act("matmul_fp8", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::fp8_gemm_simple_kernel<T>
          <<<grid, cuda::kFp8GemmTile * cuda::kFp8GemmTile, 0, stream_>>>(
              xq.data<uint8_t>(), sx.data<float>(), w.data<uint8_t>(), w_scale.data<float>(),
              bias_ptr, p, out.data<T>());
      launch_check("fp8_gemm_simple_kernel");
    });
  }

  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    expect_cuda("rmsnorm", "x", x);
    expect_cuda("rmsnorm", "weight", weight);
    expect_shape("rmsnorm", "out", out, x.shape());
    expect_dtype("rmsnorm", "out", out, x.dtype());
    if (weight.numel() != x.cols())
      throw Error("rmsnorm: weight " + weight.describe() + " does not match x " + x.describe());
    if (x.rows() == 0) return;
    dispatch_act("rmsnorm", x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      dispatch_act("rmsnorm", weight.dtype(), [&](auto w_tag) {
        using TW = decltype(w_tag);
        cuda::rmsnorm_kernel<T, TW><<<x.rows(), 256, 0, stream_>>>(x.data<T>(), weight.data<TW>(),
                                                                   eps, x.cols(), out.data<T>());
        launch_check("rmsnorm_kernel");
      });
    });
  }

  // x, y, out: [R, C] (act dtype); weight: [C]
  void add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                   Tensor& out) override {
    expect_cuda("add_rmsnorm", "x", x);
    expect_cuda("add_rmsnorm", "y", y);
    expect_cuda("add_rmsnorm", "weight", weight);
    expect_shape("add_rmsnorm", "y", y, x.shape());
    expect_dtype("add_rmsnorm", "y", y, x.dtype());
    expect_shape("add_rmsnorm", "out", out, x.shape());
    expect_dtype("add_rmsnorm", "out", out, x.dtype());
    if (weight.numel() != x.cols())
      throw Error("add_rmsnorm: weight " + weight.describe() + " does not match x " + x.describe());
    if (out.raw() == x.raw() || out.raw() == y.raw())
      throw Error("add_rmsnorm: out must not alias x or y (" + out.describe() + ")");
    if (x.rows() == 0) return;
    dispatch_act("add_rmsnorm", x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      dispatch_act("add_rmsnorm", weight.dtype(), [&](auto w_tag) {
        using TW = decltype(w_tag);
        cuda::add_rmsnorm_kernel<T, TW><<<x.rows(), 256, 0, stream_>>>(
            x.data<T>(), y.data<T>(), weight.data<TW>(), eps, x.cols(), out.data<T>());
        launch_check("add_rmsnorm_kernel");
      });
    });
  }

  // x: [rows, cols] (act dtype); out: [rows] f32
  void row_l2norm(const Tensor& x, Tensor& out) override {
    expect_cuda("row_l2norm", "x", x);
    expect_cuda("row_l2norm", "out", out);
    if (out.numel() != x.rows() || out.dtype() != DType::F32)
      throw Error("row_l2norm: " + x.describe() + " -> " + out.describe());
    if (x.rows() == 0) return;
    dispatch_act("row_l2norm", x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::row_l2norm_kernel<T>
          <<<x.rows(), 256, 0, stream_>>>(x.data<T>(), x.cols(), out.data<float>());
      launch_check("row_l2norm_kernel");
    });
  }

  void add(Tensor& x, const Tensor& y) override {
    expect_cuda("add", "x", x);
    expect_cuda("add", "y", y);
    expect_shape("add", "y", y, x.shape());
    expect_dtype("add", "y", y, x.dtype());
    if (x.numel() == 0) return;
    dispatch_act("add", x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::add_kernel<T>
          <<<elementwise_blocks(x.numel()), 256, 0, stream_>>>(x.data<T>(), y.data<T>(), x.numel());
      launch_check("add_kernel");
    });
  }

  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override {
    expect_cuda("swiglu", "gate", gate);
    expect_shape("swiglu", "up", up, gate.shape());
    expect_shape("swiglu", "out", out, gate.shape());
    expect_dtype("swiglu", "up", up, gate.dtype());
    expect_dtype("swiglu", "out", out, gate.dtype());
    if (gate.numel() == 0) return;
    dispatch_act("swiglu", gate.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::swiglu_kernel<T><<<elementwise_blocks(gate.numel()), 256, 0, stream_>>>(
          gate.data<T>(), up.data<T>(), out.data<T>(), gate.numel());
      launch_check("swiglu_kernel");
    });
  }

  void rope(Tensor& x, const Tensor& pos, const Tensor& inv_freq, float scaling) override {
    expect_cuda("rope", "x", x);
    expect_rank("rope", "x", x, 3);
    const int64_t tokens = x.dim(0), heads = x.dim(1), d = x.dim(2);
    if (d % 2 != 0) throw Error("rope: head_dim must be even, got " + x.describe());
    expect_shape("rope", "pos", pos, {tokens});
    expect_dtype("rope", "pos", pos, DType::I32);
    expect_shape("rope", "inv_freq", inv_freq, {d / 2});
    expect_dtype("rope", "inv_freq", inv_freq, DType::F32);
    expect_cuda("rope", "pos", pos);
    expect_cuda("rope", "inv_freq", inv_freq);
    if (tokens == 0) return;
    dispatch_act("rope", x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::rope_kernel<T><<<tokens, 256, 0, stream_>>>(x.data<T>(), pos.data<int32_t>(),
                                                        inv_freq.data<float>(), heads, d, scaling);
      launch_check("rope_kernel");
    });
  }

  void attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kv_head_stride,
                 const Tensor& q_pos, const Tensor& k_pos, const AttentionMask& mask,
                 Tensor& out) override {
    check_attention(q, k, v, kv_head_stride, q_pos, k_pos, out);
    expect_cuda("attention", "q", q);
    expect_cuda("attention", "k", k);
    expect_cuda("attention", "q_pos", q_pos);
    expect_cuda("attention", "k_pos", k_pos);
    const int64_t d = q.dim(2);
    if (d > 32 * cuda::kAttnMaxDimsPerLane)
      throw Error("attention: cuda kernel supports head_dim <= " +
                  std::to_string(32 * cuda::kAttnMaxDimsPerLane) + ", got " + q.describe());
    if (q.dim(0) == 0 || q.dim(1) == 0) return;
    cuda::AttentionParams p{q.dim(1),       k.dim(0),   d,           k.dim(1),
                            kv_head_stride, mask.scale, mask.window, mask.sink};
    const dim3 grid(static_cast<unsigned>(q.dim(0)), static_cast<unsigned>(q.dim(1)));
    dispatch_act("attention", q.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::attention_kernel<T><<<grid, 32 * cuda::kAttnWarps, 0, stream_>>>(
          q.data<T>(), k.data<T>(), v.data<T>(), q_pos.data<int32_t>(), k_pos.data<int32_t>(), p,
          out.data<T>());
      launch_check("attention_kernel");
    });
  }

  void paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                       const Tensor& pos_pool, const Tensor& q_pos, const PagedAttentionPlan& plan,
                       Tensor& out) override {
    check_paged_attention_args(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
    const Tensor* on_device[] = {&q,
                                 &k_pool,
                                 &v_pool,
                                 &pos_pool,
                                 &q_pos,
                                 &out,
                                 &plan.qo_indptr,
                                 &plan.kv_indptr,
                                 &plan.page_indices,
                                 &plan.page_lengths,
                                 &plan.head_window,
                                 &plan.head_sink};
    for (const Tensor* t : on_device)
      if (t->numel() > 0) expect_cuda("paged_attention", "argument", *t);
    const bool fp8_kv = k_pool.dtype() == DType::F8_E4M3;  // FP8 KV rows: the scalar kernel
    if ((!fp8_kv && (k_pool.dtype() != q.dtype() || v_pool.dtype() != q.dtype())) ||
        out.dtype() != q.dtype())
      throw Error("paged_attention: q, pools and out must share one dtype (or FP8 KV pools), got " +
                  q.describe() + ", " + k_pool.describe() + ", " + out.describe());
    const int64_t d = q.dim(2), group = q.dim(1) / plan.num_kv_heads;
    if (d > 32 * cuda::kAttnMaxDimsPerLane)
      throw Error("paged_attention: cuda kernel supports head_dim <= " +
                  std::to_string(32 * cuda::kAttnMaxDimsPerLane) + ", got " + q.describe());
    if (q.dim(0) == 0 || plan.num_seqs == 0) return;
    if (!simple_ && !fp8_kv && q.dtype() == DType::BF16 && (d == 32 || d == 64 || d == 128) &&
        flash_aligned({&q, &k_pool, &v_pool, &out})) {
      if (d == 32)
        paged_flash<32>(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
      else if (d == 64)
        paged_flash<64>(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
      else
        paged_flash<128>(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
      return;
    }
    cuda::PagedParams p{q.dim(1), plan.num_kv_heads, d, plan.page_size, plan.num_seqs, plan.scale};
    const dim3 grid(static_cast<unsigned>(q.dim(0)), static_cast<unsigned>(plan.num_kv_heads));
    const int warps = static_cast<int>(std::clamp<int64_t>(group, 1, cuda::kPagedMaxWarps));
    dispatch_act("paged_attention", q.dtype(), [&](auto tag) {
      using T = decltype(tag);
      if (fp8_kv) {
        cuda::paged_attention_kernel<T, uint8_t><<<grid, 32 * warps, 0, stream_>>>(
            q.data<T>(), k_pool.data<uint8_t>(), v_pool.data<uint8_t>(), pos_pool.data<int32_t>(),
            q_pos.data<int32_t>(), plan.qo_indptr.data<int32_t>(), plan.kv_indptr.data<int32_t>(),
            plan.page_indices.data<int32_t>(), plan.page_lengths.data<int32_t>(),
            plan.head_window.data<int32_t>(), plan.head_sink.data<int32_t>(), p, out.data<T>());
        launch_check("paged_attention_kernel fp8");
        return;
      }
      cuda::paged_attention_kernel<T><<<grid, 32 * warps, 0, stream_>>>(
          q.data<T>(), k_pool.data<T>(), v_pool.data<T>(), pos_pool.data<int32_t>(),
          q_pos.data<int32_t>(), plan.qo_indptr.data<int32_t>(), plan.kv_indptr.data<int32_t>(),
          plan.page_indices.data<int32_t>(), plan.page_lengths.data<int32_t>(),
          plan.head_window.data<int32_t>(), plan.head_sink.data<int32_t>(), p, out.data<T>());
      launch_check("paged_attention_kernel");
    });
  }

  void copy(const Tensor& src, Tensor& dst) override {
    expect_cuda("copy", "src", src);
    expect_cuda("copy", "dst", dst);
    if (src.dtype() != dst.dtype() || src.numel() != dst.numel())
      throw Error("copy: " + src.describe() + " -> " + dst.describe() + " mismatch");
    cuda_check(
        cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, stream_),
        "copy");
  }

  void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) override {
    if (src.dtype() != dst.dtype() || src.cols() != dst.cols() || rows.numel() != src.rows() ||
        rows.dtype() != DType::I32)
      throw Error("scatter_rows: " + src.describe() + " into " + dst.describe() + " with rows " +
                  rows.describe());
    move_rows<true>("scatter_rows", src, rows, dst, dst.rows());
  }

  void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) override {
    if (src.dtype() != out.dtype() || src.cols() != out.cols() || rows.numel() != out.rows() ||
        rows.dtype() != DType::I32)
      throw Error("gather_rows: " + src.describe() + " to " + out.describe() + " with rows " +
                  rows.describe());
    move_rows<false>("gather_rows", src, rows, out, src.rows());
  }

  void argmax(const Tensor& logits, Tensor& out) override {
    expect_cuda("argmax", "logits", logits);
    expect_cuda("argmax", "out", out);
    expect_dtype("argmax", "out", out, DType::I32);
    if (out.numel() != logits.rows())
      throw Error("argmax: out " + out.describe() + " must have one entry per row of " +
                  logits.describe());
    if (logits.rows() == 0) return;
    dispatch_act("argmax", logits.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::argmax_kernel<T><<<logits.rows(), 1024, 0, stream_>>>(logits.data<T>(), logits.cols(),
                                                                  out.data<int32_t>());
      launch_check("argmax_kernel");
    });
  }

 private:
  // Whether an [M, K] x [N, K] product takes the skinny kernels: few rows, K in whole 16-byte
  // chunks (`per_chunk` elements), 16-byte aligned operands as the kernel reads them (x: the
  // activations or their FP8 codes), not REDKNOT_CUDA_SIMPLE.
  bool skinny(int64_t m_rows, int64_t k_dim, int64_t per_chunk, const void* x,
              const Tensor& w) const {
    return !simple_ && m_rows <= std::min(gemm_.skinny_max_rows, cuda::kSkinnyMaxRows) &&
           k_dim % per_chunk == 0 && ptr_alignment(x) >= 16 && ptr_alignment(w.raw()) >= 16;
  }
  // x: [M, K] bf16 or e4m3 codes (bytes); sx: [M] or null; w: [N, K]; w_scale: FP8 scales or
  // null; bias: [N] or empty; out: [M, N] bf16 or f32
  template <bool kFp8>
  void skinny_gemm(const uint8_t* x, const float* sx, const Tensor& w, const Tensor* w_scale,
                   const Tensor& bias, Tensor& out, int64_t m_rows, int64_t k_blocks) {
    const int64_t n_rows = w.dim(0);
    const cuda::SkinnyGemmParams p{m_rows, n_rows, w.dim(1), k_blocks};
    const unsigned blocks =
        static_cast<unsigned>((n_rows + cuda::kSkinnyChannels - 1) / cuda::kSkinnyChannels);
    dispatch_act("matmul", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::skinny_gemm_kernel<T, kFp8><<<blocks, 32 * cuda::kSkinnyWarps, 0, stream_>>>(
          x, sx, w.data<uint8_t>(), w_scale ? w_scale->data<float>() : nullptr,
          bias.numel() ? bias.data<float>() : nullptr, p, out.data<T>());
      launch_check("skinny_gemm_kernel");
    });
  }

  // quantize_fp8_rows_kernel over x's rows into codes `stride` bytes apart; scale == nullptr:
  // FP8 KV rows (the scale after the codes). x: [R, C] act or f32
  void fp8_rows(const Tensor& x, Tensor& q, Tensor* scale, int64_t stride) {
    if (x.rows() == 0) return;
    const cuda::Fp8RowsParams p{x.cols(), stride};
    dispatch_act("quantize_fp8_rows", x.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::quantize_fp8_rows_kernel<T><<<x.rows(), 256, 0, stream_>>>(
          x.data<T>(), p, q.data<uint8_t>(), scale ? scale->data<float>() : nullptr);
      launch_check("quantize_fp8_rows_kernel");
    });
  }
  // The inverse: out[r] = codes of row r times its scale. out: [R, C] act or f32
  void fp8_unrows(const Tensor& q, const Tensor* scale, Tensor& out, int64_t stride) {
    if (out.rows() == 0) return;
    const cuda::Fp8RowsParams p{out.cols(), stride};
    dispatch_act("dequantize_fp8_rows", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::dequantize_fp8_rows_kernel<T><<<out.rows(), 256, 0, stream_>>>(
          q.data<uint8_t>(), scale ? scale->data<float>() : nullptr, p, out.data<T>());
      launch_check("dequantize_fp8_rows_kernel");
    });
  }

  // Device storage of `shape`; fill >= 0: every byte set to it (alloc: 0), < 0: left as is.
  Tensor allocate(DType dtype, std::vector<int64_t> shape, int fill) {
    int64_t n = 1;
    for (int64_t d : shape) {
      if (d < 0) throw Error("alloc: negative dimension in " + shape_str(shape));
      n *= d;
    }
    const size_t bytes = static_cast<size_t>(dtype_bytes(dtype, n));
    std::shared_ptr<void> holder = cached_block(cache_, bytes, stream_);
    void* ptr = holder.get();
    if (bytes && fill >= 0)
      cuda_check(cudaMemsetAsync(ptr, fill, bytes, stream_), "cudaMemsetAsync");
    return Tensor::view(ptr, dtype, std::move(shape), std::move(holder), Device::Cuda);
  }

  // Pinned host staging block of copy_from_host; `done` fires when its last copy has run.
  struct Stage {
    void* ptr = nullptr;
    size_t cap = 0;
    cudaEvent_t done = nullptr;
  };

  // A staging block of at least `bytes` (<= kStageMax), taken out of the pool. Blocks are used
  // in FIFO order: the oldest is reused once its copy has run. While it is still queued (the
  // stream busy with earlier kernels, e.g. the previous prefill chunk) the pool grows instead,
  // so the host keeps queueing work; past kStagePinnedMax pinned bytes it waits for the oldest.
  Stage take_stage(size_t bytes) {
    size_t cap = kStageMin;
    while (cap < bytes) cap *= 2;
    if (!stages_.empty()) {
      Stage st = stages_.front();
      cudaError_t q = cudaEventQuery(st.done);
      if (q == cudaErrorNotReady) {
        cudaGetLastError();  // not an error; clear it as PyTorch's allocator does
        if (staged_bytes_ + cap > kStagePinnedMax) {
          cuda_check(cudaEventSynchronize(st.done), "staging block wait");
          q = cudaSuccess;
        }
      } else {
        cuda_check(q, "staging block query");
      }
      if (q == cudaSuccess) {
        stages_.pop_front();
        if (st.cap >= bytes) return st;
        // Too small (only while upload sizes still rise): replaced by a new block below.
        cudaFreeHost(st.ptr);
        cudaEventDestroy(st.done);
        staged_bytes_ -= st.cap;
      }
    }
    Stage st;
    cuda_check(cudaEventCreateWithFlags(&st.done, cudaEventDisableTiming), "cudaEventCreate");
    if (cudaMallocHost(&st.ptr, cap) != cudaSuccess) {
      cudaGetLastError();
      cudaEventDestroy(st.done);
      throw Error("cudaMallocHost of " + std::to_string(cap) + " staging bytes failed");
    }
    st.cap = cap;
    staged_bytes_ += cap;
    return st;
  }

  // Shared body of scatter_rows/gather_rows; host row indices are uploaded first.
  template <bool kScatter>
  void move_rows(const char* op, const Tensor& src, const Tensor& rows, Tensor& dst,
                 int64_t limit_rows) {
    expect_cuda(op, "src", src);
    expect_cuda(op, "dst", dst);
    if (rows.numel() == 0) return;
    const int64_t row_bytes = dtype_bytes(src.dtype(), src.cols());
    if (row_bytes % 2 != 0) throw Error(std::string(op) + ": odd row size in " + src.describe());
    Tensor device_rows = rows;
    if (rows.device() == Device::Host) {
      device_rows = alloc_uninit(DType::I32, {rows.numel()});
      copy_from_host(device_rows, rows);
    }
    cuda::move_rows_kernel<kScatter><<<rows.numel(), 256, 0, stream_>>>(
        static_cast<const uint16_t*>(src.raw()), device_rows.data<int32_t>(), row_bytes / 2,
        limit_rows, static_cast<uint16_t*>(dst.raw()));
    launch_check("move_rows_kernel");
    // The uploaded index buffer goes back to the stream-ordered cache on return: safe.
  }

  static bool flash_aligned(std::initializer_list<const Tensor*> ts) {
    for (const Tensor* t : ts)
      if (reinterpret_cast<uintptr_t>(t->raw()) % 16 != 0) return false;
    return true;
  }

  // Tensor-core SegPaged attention. Decode-like batches: paged_flash.cuh with kWarps = 1 (16-row
  // tiles, split-KV). Prefill: the warp-specialised Hopper wgmma kernel (paged_flash_sm90.cuh),
  // 128-row tiles; REDKNOT_FLASH_SM90 = 128x2 (default) | 64x4 | 64x3 picks keys per tile x
  // stages, 0 the mma.sync kernel (kWarps = 4: 64-row tiles, or 8 with REDKNOT_FLASH_ROWS=128).
  // D = 32 always prefills on the mma.sync kernel: wgmma's swizzled rows are 64 wide.
  // Splits are chosen to fill the GPU.
  template <int D>
  void paged_flash(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                   const Tensor& pos_pool, const Tensor& q_pos, const PagedAttentionPlan& plan,
                   Tensor& out) {
    const int64_t T = q.dim(0), hq = q.dim(1), hkv = plan.num_kv_heads, group = hq / hkv;
    const int64_t seqs = plan.num_seqs;
    const bool decode = T * group <= 16 * seqs;
    const std::string& sm90 = flash_.sm90;
    constexpr bool kHasSm90 = D % 64 == 0;
    const bool use_sm90 = kHasSm90 && !decode && sm90 != "0";
    const bool wide = flash_.wide_rows;
    const int rows_per_tile = decode ? 16 : use_sm90 || wide ? 128 : 64;
    const int64_t tiles_bound = (T * group + rows_per_tile - 1) / rows_per_tile + seqs;
    const int64_t tiles_est =
        std::max<int64_t>(seqs, (T * group + rows_per_tile - 1) / rows_per_tile);
    const int64_t items = tiles_est * hkv;
    const int64_t nnz = plan.page_indices.numel();
    const int64_t avg_pages = nnz / std::max<int64_t>(1, seqs * hkv);
    const int64_t target = int64_t{decode ? 8 : 2} * num_sms_;
    int64_t splits = 1;
    if (decode) {
      // Balance by the longest table, estimated as one sequence's pages over all its heads
      // (exact for a lone global head among trimmed local ones): ~2048 keys per block.
      const int64_t max_pages = nnz / std::max<int64_t>(1, seqs);
      const int64_t chunk = std::max<int64_t>(1, 2048 / std::max(1, plan.page_size));
      splits = std::clamp<int64_t>((max_pages + chunk - 1) / chunk, 1, 32);
    } else if (items < target) {
      splits = (target + items - 1) / items;
      splits = std::clamp<int64_t>(splits, 1,
                                   std::min<int64_t>(64, std::max<int64_t>(1, avg_pages / 2)));
    }
    if (flash_.splits > 0) splits = flash_.splits;
    cuda::FlashParams p{static_cast<int32_t>(hq),
                        static_cast<int32_t>(hkv),
                        static_cast<int32_t>(group),
                        plan.page_size,
                        plan.num_seqs,
                        static_cast<int32_t>(splits),
                        T,
                        plan.scale * 1.4426950408889634f};
    std::shared_ptr<void> part_o, part_ml;
    if (splits > 1) {
      part_o = cached_block(cache_, sizeof(float) * splits * T * hq * D, stream_);
      part_ml = cached_block(cache_, sizeof(float) * splits * T * hq * 2, stream_);
    }
    const dim3 grid(static_cast<unsigned>(tiles_bound), static_cast<unsigned>(hkv),
                    static_cast<unsigned>(splits));
    // Both kernels take the same arguments; threads and shared memory are the instance's.
    auto launch = [&](auto kernel, int threads, size_t smem, const char* name) {
      // Host-side and cheap; per call so that every device and instantiation is covered.
      cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)),
                 name);
      kernel<<<grid, threads, smem, stream_>>>(
          q.data<bf16>(), k_pool.data<bf16>(), v_pool.data<bf16>(), pos_pool.data<int32_t>(),
          q_pos.data<int32_t>(), plan.qo_indptr.data<int32_t>(), plan.kv_indptr.data<int32_t>(),
          plan.page_indices.data<int32_t>(), plan.page_lengths.data<int32_t>(),
          plan.head_window.data<int32_t>(), plan.head_sink.data<int32_t>(), p, out.data<bf16>(),
          static_cast<float*>(part_o.get()), static_cast<float*>(part_ml.get()));
      launch_check(name);
    };
    constexpr int kWs = cuda::kSm90FlashThreads;
    constexpr const char* kMma = "paged_flash_kernel";
    constexpr const char* kWgmma = "paged_flash_sm90_kernel";
    if (decode) {
      launch(cuda::paged_flash_kernel<D, 1>, 32, cuda::FlashSmem<D, 1>::kBytes, kMma);
    } else if (use_sm90) {
      if constexpr (kHasSm90) {  // not instantiated for D = 32
        if (sm90 == "64x4")
          launch(cuda::paged_flash_sm90_kernel<D, 64, 4>, kWs,
                 cuda::Sm90FlashSmem<D, 64, 4>::kBytes, kWgmma);
        else if (sm90 == "64x3")
          launch(cuda::paged_flash_sm90_kernel<D, 64, 3>, kWs,
                 cuda::Sm90FlashSmem<D, 64, 3>::kBytes, kWgmma);
        else
          launch(cuda::paged_flash_sm90_kernel<D, 128, 2>, kWs,
                 cuda::Sm90FlashSmem<D, 128, 2>::kBytes, kWgmma);
      }
    } else if (wide) {
      launch(cuda::paged_flash_kernel<D, 8>, 32 * 8, cuda::FlashSmem<D, 8>::kBytes, kMma);
    } else {
      launch(cuda::paged_flash_kernel<D, 4>, 32 * 4, cuda::FlashSmem<D, 4>::kBytes, kMma);
    }
    if (splits > 1) {
      const int64_t rows = T * hq;
      cuda::paged_flash_merge_kernel<D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream_>>>(
          static_cast<const float*>(part_o.get()), static_cast<const float*>(part_ml.get()),
          static_cast<int>(splits), rows, out.data<bf16>());
      launch_check("paged_flash_merge_kernel");
    }
  }

  // FP8 kinds: e4m3 A and B (TN, as cuBLASLt's FP8 kernels require), no bias; kFp8 has f32 C/D.
  const LtPlan& lt_plan(int64_t m, int64_t n, int64_t k, DType out_dtype, bool has_bias,
                        uint32_t align, LtKind kind = LtKind::kBf16) {
    const auto key = std::make_tuple(m, n, k, static_cast<int>(out_dtype), has_bias, align,
                                     static_cast<int>(kind));
    auto it = lt_plans_.find(key);
    if (it != lt_plans_.end()) return it->second;
    LtPlan plan;
    const cudaDataType out_type = out_dtype == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
    bool ok =
        cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    ok = ok && cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta,
                                              sizeof(ta)) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb,
                                              sizeof(tb)) == CUBLAS_STATUS_SUCCESS;
    if (has_bias) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      const cudaDataType bias_type = CUDA_R_32F;
      ok = ok && cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi,
                                                sizeof(epi)) == CUBLAS_STATUS_SUCCESS;
      ok = ok &&
           cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                          sizeof(bias_type)) == CUBLAS_STATUS_SUCCESS;
    }
    if (kind == LtKind::kFp8OuterVec) {
      const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      for (auto attr : {CUBLASLT_MATMUL_DESC_A_SCALE_MODE, CUBLASLT_MATMUL_DESC_B_SCALE_MODE})
        ok = ok && cublasLtMatmulDescSetAttribute(plan.op, attr, &mode, sizeof(mode)) ==
                       CUBLAS_STATUS_SUCCESS;
    }
    const cudaDataType in_type = kind == LtKind::kBf16 ? CUDA_R_16BF : CUDA_R_8F_E4M3;
    ok = ok && cublasLtMatrixLayoutCreate(&plan.a, in_type, k, n, k) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cublasLtMatrixLayoutCreate(&plan.b, in_type, k, m, k) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cublasLtMatrixLayoutCreate(&plan.c, out_type, n, m, n) == CUBLAS_STATUS_SUCCESS;
    if (ok) {
      cublasLtMatmulPreference_t pref = nullptr;
      ok = cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS;
      const size_t ws = kLtWorkspace;
      ok =
          ok && cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                     &ws, sizeof(ws)) == CUBLAS_STATUS_SUCCESS;
      for (auto attr :
           {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
        ok = ok && cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align)) ==
                       CUBLAS_STATUS_SUCCESS;
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      ok = ok &&
           cublasLtMatmulAlgoGetHeuristic(lt_, plan.op, plan.a, plan.b, plan.c, plan.c, pref, 1,
                                          &result, &found) == CUBLAS_STATUS_SUCCESS &&
           found > 0;
      if (ok) plan.algo = result.algo;
      if (pref) cublasLtMatmulPreferenceDestroy(pref);
    }
    plan.ok = ok;
    return lt_plans_.emplace(key, plan).first->second;
  }

  static constexpr size_t kLtWorkspace = size_t{32} << 20;
  // copy_from_host staging: uploads up to kStageMax bytes go through pinned blocks (powers of
  // two from kStageMin), kStagePinnedMax bytes of them at most.
  static constexpr size_t kStageMax = size_t{4} << 20, kStageMin = size_t{64} << 10;
  static constexpr size_t kStagePinnedMax = size_t{256} << 20;

  // A captured graph and the private cache holding the buffers its kernels use.
  class CudaGraphWork : public RecordedWork {
   public:
    CudaGraphWork(cudaGraph_t graph, cudaGraphExec_t exec, cudaStream_t stream,
                  std::shared_ptr<DeviceCache> cache)
        : graph_(graph), exec_(exec), stream_(stream), cache_(std::move(cache)) {}
    ~CudaGraphWork() override {
      cudaStreamSynchronize(stream_);  // a queued replay may still use the buffers
      cudaGraphExecDestroy(exec_);
      cudaGraphDestroy(graph_);
    }
    void replay() override { cuda_check(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch"); }

   private:
    cudaGraph_t graph_;
    cudaGraphExec_t exec_;
    cudaStream_t stream_;
    std::shared_ptr<DeviceCache> cache_;
  };

  void refuse_while_recording(const char* op) const {
    if (recording_)
      throw Error(std::string("cuda: ") + op + " while recording a graph (recorded work must " +
                  "stay on the device)");
  }

  int device_;
  bool recording_ = false;
  int num_sms_ = 132;
  bool simple_ = false;    // REDKNOT_CUDA_SIMPLE=1: cublasGemmEx and the scalar attention kernels
  CudaFlashTuning flash_;  // paged attention kernel choices, read once (see cuda_backend.h)
  CudaGemmTuning gemm_;    // skinny GEMM rows, FP8 scale mode; read once (see cuda_backend.h)
  std::shared_ptr<DeviceCache> cache_;
  std::deque<Stage> stages_;  // FIFO: front = the block whose copy was queued first
  size_t staged_bytes_ = 0;   // pinned bytes held by stages_
  std::shared_ptr<void> lt_workspace_;
  cublasLtHandle_t lt_ = nullptr;
  std::map<std::tuple<int64_t, int64_t, int64_t, int, bool, uint32_t, bool>, LtPlan> lt_plans_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return std::make_unique<CudaBackend>(device);
}

CudaFlashTuning CudaFlashTuning::from_env() {
  CudaFlashTuning t;
  t.sm90 = env_or("REDKNOT_FLASH_SM90", "128x2");
  t.wide_rows = env_or("REDKNOT_FLASH_ROWS", "64") == "128";
  t.splits = std::max(0, std::atoi(env_or("REDKNOT_FLASH_SPLITS", "0").c_str()));
  return t;
}

CudaGemmTuning CudaGemmTuning::from_env() {
  CudaGemmTuning t;
  t.skinny_max_rows = std::max(0, std::atoi(env_or("REDKNOT_GEMM_SKINNY_ROWS", "8").c_str()));
  t.fp8_outer_vec = env_or("REDKNOT_GEMM_FP8_OUTER", "0") == "1";
  return t;
}

void set_cuda_gemm_tuning(Backend& backend, const CudaGemmTuning& tuning) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr)
    throw Error("set_cuda_gemm_tuning: backend " + backend.name() + " is not cuda");
  cuda->set_gemm_tuning(tuning);
}

void set_cuda_flash_tuning(Backend& backend, const CudaFlashTuning& tuning) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr)
    throw Error("set_cuda_flash_tuning: backend " + backend.name() + " is not cuda");
  cuda->set_flash_tuning(tuning);
}

CudaAllocStats cuda_alloc_stats(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) throw Error("cuda_alloc_stats: backend " + backend.name() + " is not cuda");
  return cuda->alloc_stats();
}

void* cuda_stream(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) throw Error("cuda_stream: backend " + backend.name() + " is not cuda");
  return cuda->stream();
}

}  // namespace redknot
