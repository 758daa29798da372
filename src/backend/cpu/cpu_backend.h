// The optimised host backend: f32 activations, f32 or bf16 weights, SIMD kernels threaded over
// a ThreadPool, OpenBLAS sgemm for prefill-sized matmuls when built with REDKNOT_OPENBLAS.
// One backend instance is driven by one thread at a time (it owns scratch buffers).
#pragma once
#include <vector>

#include "backend/backend.h"
#include "core/thread_pool.h"

namespace redknot {

struct CpuBackendOptions {
  int n_threads = 0;                 // <= 0: one per hardware thread
  bool f32_weights_to_bf16 = false;  // halve weight memory traffic of f32 checkpoints
};

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(CpuBackendOptions options = {});

  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::Host; }
  DType act_dtype() const override { return DType::F32; }
  int num_threads() const { return pool_.size(); }
  // "avx512", "avx2" or "scalar": the vector width the kernels were compiled for.
  static const char* simd_name();

  Tensor alloc(DType dtype, std::vector<int64_t> shape) override;
  // F32/BF16/F8_E4M3: a view of `host` (no copy). F16/Q8_0: converted to F32 (BF16 with the
  // option).
  Tensor upload_weight(const Tensor& host) override;
  void copy_from_host(Tensor& dst, const Tensor& src) override;
  Tensor to_host_f32(const Tensor& src) override;

  void embedding(const Tensor& table, const Tensor& ids, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override;
  // x: [R, C] f32; q: [R, C] f8; scale: [R] f32
  void quantize_fp8_rows(const Tensor& x, Tensor& q, Tensor& scale) override;
  // q: [R, C] f8; scale: [R] f32; out: [R, C] f32
  void dequantize_fp8_rows(const Tensor& q, const Tensor& scale, Tensor& out) override;
  // Activations quantized per token and decoded to f32, weights dequantized per block of rows
  // (FP8 stays the storage format: half of bf16's memory), the f32 GEMM paths of matmul, then
  // the scales. x: [M, K] f32; w: [N, K] f8; w_scale: [N] or [N/128, K/128]; out: [M, N] f32
  void matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, const Tensor& bias,
                  Tensor& out) override;
  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  void add(Tensor& x, const Tensor& y) override;
  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void rope(Tensor& x, const Tensor& pos, const Tensor& inv_freq, float scaling) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kv_head_stride,
                 const Tensor& q_pos, const Tensor& k_pos, const AttentionMask& mask,
                 Tensor& out) override;
  // Per (sequence, kv head, query block) units over the pool's threads; see
  // paged_attention_kernel.h. q, out: [T, Hq, D] f32; pools f32, bf16 or FP8 KV rows.
  void paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                       const Tensor& pos_pool, const Tensor& q_pos, const PagedAttentionPlan& plan,
                       Tensor& out) override;
  void argmax(const Tensor& logits, Tensor& out) override;

 private:
  // FP8 KV rows: the plan's pages dequantized into an f32 pool, then paged_attention.
  // q, out: [T, Hq, D] f32; k_pool, v_pool: [slots, D + 4] f8; pos_pool: [slots]; q_pos: [T]
  void paged_attention_fp8(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                           const Tensor& pos_pool, const Tensor& q_pos,
                           const PagedAttentionPlan& plan, Tensor& out);
  // Splits [0, n) over the pool when there is at least `min_work` work per item in total.
  void parallel_rows(int64_t n, int64_t work_per_item,
                     const std::function<void(int64_t, int64_t)>& fn);
  void matmul_bf16_sgemm(const float* x, int64_t m_rows, const uint16_t* w, int64_t n_rows,
                         int64_t k_dim, const float* bias, float* out);

  CpuBackendOptions options_;
  ThreadPool pool_;
};

}  // namespace redknot
