// The oracle backend: plain scalar loops with double accumulation, no threads, no tricks.
// Every other backend is checked against it by op_parity_test.
#pragma once
#include "backend/backend.h"

namespace redknot {

class ReferenceBackend : public Backend {
 public:
  std::string name() const override { return "reference"; }
  Device device() const override { return Device::Host; }
  DType act_dtype() const override { return DType::F32; }

  Tensor alloc(DType dtype, std::vector<int64_t> shape) override;
  // An owned f32 copy, whatever the source dtype, except F8_E4M3: an owned copy of the codes.
  Tensor upload_weight(const Tensor& host) override;
  void copy_from_host(Tensor& dst, const Tensor& src) override;
  Tensor to_host_f32(const Tensor& src) override;

  void embedding(const Tensor& table, const Tensor& ids, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override;
  // Per row: fp8_quantize_row (core/dtype.h). x: [R, C] f32; q: [R, C] f8; scale: [R] f32
  void quantize_fp8_rows(const Tensor& x, Tensor& q, Tensor& scale) override;
  // q: [R, C] f8; scale: [R] f32; out: [R, C] f32
  void dequantize_fp8_rows(const Tensor& q, const Tensor& scale, Tensor& out) override;
  // Quantizes x per row, then double-accumulates xq · w · ws and scales by sx.
  // x: [M, K] f32; w: [N, K] f8; w_scale: [N] or [N/128, K/128] f32; bias: [N]; out: [M, N]
  void matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, const Tensor& bias,
                  Tensor& out) override;
  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override;
  void add(Tensor& x, const Tensor& y) override;
  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void rope(Tensor& x, const Tensor& pos, const Tensor& inv_freq, float scaling) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kv_head_stride,
                 const Tensor& q_pos, const Tensor& k_pos, const AttentionMask& mask,
                 Tensor& out) override;
  // Calls reference_paged_attention (double accumulation, every slot tested).
  // q, out: [T, Hq, D]; k_pool, v_pool: [slots, D]; pos_pool: [slots]; q_pos: [T]
  void paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                       const Tensor& pos_pool, const Tensor& q_pos, const PagedAttentionPlan& plan,
                       Tensor& out) override;
  void argmax(const Tensor& logits, Tensor& out) override;
};

}  // namespace redknot
