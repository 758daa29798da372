// A backend that forwards every op to another one: the base of decorators that change a few ops
// (BatchInvariantBackend). Every Backend virtual must be forwarded here: an op left to its
// default body would bypass the inner backend (device memory, recording).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace redknot {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(Backend& inner) : inner_(inner) {}

  std::string name() const override { return inner_.name(); }
  Device device() const override { return inner_.device(); }
  DType act_dtype() const override { return inner_.act_dtype(); }
  Tensor alloc(DType dtype, std::vector<int64_t> shape) override {
    return inner_.alloc(dtype, std::move(shape));
  }
  Tensor alloc_uninit(DType dtype, std::vector<int64_t> shape) override {
    return inner_.alloc_uninit(dtype, std::move(shape));
  }
  Tensor upload_weight(const Tensor& host) override { return inner_.upload_weight(host); }
  void copy_from_host(Tensor& dst, const Tensor& src) override { inner_.copy_from_host(dst, src); }
  Tensor to_host_f32(const Tensor& src) override { return inner_.to_host_f32(src); }
  void synchronize() override { inner_.synchronize(); }
  int64_t free_memory_bytes() const override { return inner_.free_memory_bytes(); }
  void embedding(const Tensor& table, const Tensor& ids, Tensor& out) override {
    inner_.embedding(table, ids, out);
  }
  // x: [M, K]; w: [N, K]; bias: [N] or empty; out: [M, N]
  void matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override {
    inner_.matmul(x, w, bias, out);
  }
  // x: [R, C]; q: [R, C] f8; scale: [R] f32
  void quantize_fp8_rows(const Tensor& x, Tensor& q, Tensor& scale) override {
    inner_.quantize_fp8_rows(x, q, scale);
  }
  void dequantize_fp8_rows(const Tensor& q, const Tensor& scale, Tensor& out) override {
    inner_.dequantize_fp8_rows(q, scale, out);
  }
  // x: [M, K]; w: [N, K] f8; w_scale: [N] or [N/128, K/128]; bias: [N] or empty; out: [M, N]
  void matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, const Tensor& bias,
                  Tensor& out) override {
    inner_.matmul_fp8(x, w, w_scale, bias, out);
  }
  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    inner_.rmsnorm(x, weight, eps, out);
  }
  void add(Tensor& x, const Tensor& y) override { inner_.add(x, y); }
  void add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                   Tensor& out) override {
    inner_.add_rmsnorm(x, y, weight, eps, out);
  }
  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override {
    inner_.swiglu(gate, up, out);
  }
  void rope(Tensor& x, const Tensor& pos, const Tensor& inv_freq, float scaling) override {
    inner_.rope(x, pos, inv_freq, scaling);
  }
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kv_head_stride,
                 const Tensor& q_pos, const Tensor& k_pos, const AttentionMask& mask,
                 Tensor& out) override {
    inner_.attention(q, k, v, kv_head_stride, q_pos, k_pos, mask, out);
  }
  void paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                       const Tensor& pos_pool, const Tensor& q_pos, const PagedAttentionPlan& plan,
                       Tensor& out) override {
    inner_.paged_attention(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
  }
  // x: [R, C] -> rows: [R, C + 4] f8; rows -> out: [R, C]
  void pack_fp8_kv_rows(const Tensor& x, Tensor& rows) override {
    inner_.pack_fp8_kv_rows(x, rows);
  }
  void unpack_fp8_kv_rows(const Tensor& rows, Tensor& out) override {
    inner_.unpack_fp8_kv_rows(rows, out);
  }
  void copy(const Tensor& src, Tensor& dst) override { inner_.copy(src, dst); }
  void scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) override {
    inner_.scatter_rows(src, rows, dst);
  }
  void gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) override {
    inner_.gather_rows(src, rows, out);
  }
  void argmax(const Tensor& logits, Tensor& out) override { inner_.argmax(logits, out); }
  std::unique_ptr<RecordedWork> record(const std::function<void()>& body) override {
    return inner_.record(body);
  }
  // x: [R, C]; out: [R] f32
  void row_l2norm(const Tensor& x, Tensor& out) override { inner_.row_l2norm(x, out); }

 protected:
  Backend& inner_;
};

}  // namespace redknot
