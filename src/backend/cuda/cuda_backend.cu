// Thin launchers around kernels.cuh plus device memory management and cuBLAS GEMMs.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/kernels.cuh"
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
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::Cuda; }
  DType act_dtype() const override { return DType::BF16; }

  Tensor alloc(DType dtype, std::vector<int64_t> shape) override {
    int64_t n = 1;
    for (int64_t d : shape) {
      if (d < 0) throw Error("alloc: negative dimension in " + shape_str(shape));
      n *= d;
    }
    const size_t bytes = static_cast<size_t>(dtype_bytes(dtype, n));
    void* ptr = nullptr;
    cuda_check(cudaMalloc(&ptr, std::max<size_t>(bytes, 256)),
               ("cudaMalloc of " + std::to_string(bytes) + " bytes").c_str());
    std::shared_ptr<void> holder(ptr, [](void* p) { cudaFree(p); });
    cuda_check(cudaMemsetAsync(ptr, 0, bytes, stream_), "cudaMemsetAsync");
    return Tensor::view(ptr, dtype, std::move(shape), std::move(holder), Device::Cuda);
  }

  // Matrices become bf16 (the GEMM dtype); vectors (norm weights, biases) stay f32.
  Tensor upload_weight(const Tensor& host) override {
    expect_device("upload_weight", "host", host, Device::Host);
    if (host.dtype() == DType::I32) {
      Tensor t = alloc(DType::I32, host.shape());
      copy_from_host(t, host);
      return t;
    }
    const DType target = host.rank() >= 2 ? DType::BF16 : DType::F32;
    Tensor t = alloc(target, host.shape());
    copy_from_host(t, host);
    return t;
  }

  void copy_from_host(Tensor& dst, const Tensor& src) override {
    expect_cuda("copy_from_host", "dst", dst);
    expect_device("copy_from_host", "src", src, Device::Host);
    if (dst.numel() != src.numel())
      throw Error("copy_from_host: element count differs: " + dst.describe() + " <- " +
                  src.describe());
    const void* data = src.raw();
    std::vector<uint8_t> converted;
    if (dst.dtype() != src.dtype()) {  // e.g. f32 host values into a bf16 device tensor
      if (dst.dtype() == DType::Q8_0 || dst.dtype() == DType::I32 || src.dtype() == DType::I32)
        throw Error("copy_from_host: cannot convert " + src.describe() + " to " + dst.describe());
      std::vector<float> f32(src.numel());
      convert_to_f32(src.dtype(), src.raw(), f32.data(), src.numel());
      converted.resize(dst.nbytes());
      convert_from_f32(f32.data(), dst.dtype(), converted.data(), dst.numel());
      data = converted.data();
    }
    cuda_check(cudaMemcpyAsync(dst.raw(), data, dst.nbytes(), cudaMemcpyHostToDevice, stream_),
               "copy_from_host");
    // The host buffer may die after we return.
    cuda_check(cudaStreamSynchronize(stream_), "copy_from_host sync");
  }

  Tensor to_host_f32(const Tensor& src) override {
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

  void synchronize() override { cuda_check(cudaStreamSynchronize(stream_), "synchronize"); }

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

  // bf16 x and w, f32 accumulation, bf16 or f32 out; bias (f32) added by a second kernel.
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
    // Row-major out[M,N] = x[M,K]·w[N,K]ᵀ is column-major outᵀ[N,M] = wᵀ(op T)[N,K]·xᵀ[K,M].
    const float alpha = 1.0f, beta = 0.0f;
    cublas_check(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_rows),
                              static_cast<int>(m_rows), static_cast<int>(k_dim), &alpha, w.raw(),
                              CUDA_R_16BF, static_cast<int>(k_dim), x.raw(), CUDA_R_16BF,
                              static_cast<int>(k_dim), &beta, out.raw(), out_type,
                              static_cast<int>(n_rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
    if (bias.numel() == 0) return;
    dispatch_act("matmul", out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      cuda::add_bias_kernel<T><<<elementwise_blocks(m_rows * n_rows), 256, 0, stream_>>>(
          out.data<T>(), bias.data<float>(), m_rows, n_rows);
      launch_check("add_bias_kernel");
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
    if (k_pool.dtype() != q.dtype() || v_pool.dtype() != q.dtype() || out.dtype() != q.dtype())
      throw Error("paged_attention: q, pools and out must share one dtype, got " + q.describe() +
                  ", " + k_pool.describe() + ", " + out.describe());
    const int64_t d = q.dim(2), group = q.dim(1) / plan.num_kv_heads;
    if (d > 32 * cuda::kAttnMaxDimsPerLane)
      throw Error("paged_attention: cuda kernel supports head_dim <= " +
                  std::to_string(32 * cuda::kAttnMaxDimsPerLane) + ", got " + q.describe());
    if (q.dim(0) == 0 || plan.num_seqs == 0) return;
    cuda::PagedParams p{q.dim(1), plan.num_kv_heads, d, plan.page_size, plan.num_seqs, plan.scale};
    const dim3 grid(static_cast<unsigned>(q.dim(0)), static_cast<unsigned>(plan.num_kv_heads));
    const int warps = static_cast<int>(std::clamp<int64_t>(group, 1, cuda::kPagedMaxWarps));
    dispatch_act("paged_attention", q.dtype(), [&](auto tag) {
      using T = decltype(tag);
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
      device_rows = alloc(DType::I32, {rows.numel()});
      copy_from_host(device_rows, rows);
    }
    cuda::move_rows_kernel<kScatter><<<rows.numel(), 256, 0, stream_>>>(
        static_cast<const uint16_t*>(src.raw()), device_rows.data<int32_t>(), row_bytes / 2,
        limit_rows, static_cast<uint16_t*>(dst.raw()));
    launch_check("move_rows_kernel");
    // The uploaded index buffer is freed on return; let the kernel finish with it first.
    if (rows.device() == Device::Host) synchronize();
  }

  int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return std::make_unique<CudaBackend>(device);
}

}  // namespace redknot
