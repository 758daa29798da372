// Argument checks shared by every backend, so that all of them reject the same misuse with the
// same message (shape and dtype mismatches name the op and the offending tensor).
#pragma once
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"

namespace redknot::op_checks {

inline void fail(const char* op, const std::string& what) {
  throw Error(std::string(op) + ": " + what);
}

inline void expect_rank(const char* op, const char* arg, const Tensor& t, int rank) {
  if (t.rank() != rank)
    fail(op,
         std::string(arg) + " must have rank " + std::to_string(rank) + ", got " + t.describe());
}

inline void expect_shape(const char* op, const char* arg, const Tensor& t,
                         const std::vector<int64_t>& shape) {
  if (t.shape() != shape)
    fail(op, std::string(arg) + " must have shape " + shape_str(shape) + ", got " + t.describe());
}

inline void expect_dtype(const char* op, const char* arg, const Tensor& t, DType dtype) {
  if (t.dtype() != dtype)
    fail(op, std::string(arg) + " must be " + dtype_name(dtype) + ", got " + t.describe());
}

inline void expect_device(const char* op, const char* arg, const Tensor& t, Device device) {
  if (t.device() != device)
    fail(op, std::string(arg) + " lives on the wrong device (" + t.describe() + ")");
}

// Validates the attention arguments against backend.h and returns nothing; the caller reads
// the dimensions from the tensors.
inline void check_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                            int64_t kv_head_stride, const Tensor& q_pos, const Tensor& k_pos,
                            const Tensor& out) {
  const char* op = "attention";
  expect_rank(op, "q", q, 3);
  expect_rank(op, "k", k, 3);
  expect_shape(op, "v", v, k.shape());
  expect_shape(op, "out", out, q.shape());
  const int64_t tq = q.dim(0), hq = q.dim(1), d = q.dim(2);
  const int64_t hkv = k.dim(0), tk = k.dim(1);
  if (k.dim(2) != d) fail(op, "k head_dim differs from q: " + k.describe() + " vs " + q.describe());
  if (hkv <= 0 || hq % hkv != 0)
    fail(op, "query heads (" + std::to_string(hq) + ") not a multiple of kv heads (" +
                 std::to_string(hkv) + ")");
  if (kv_head_stride < tk * d)
    fail(op, "kv_head_stride " + std::to_string(kv_head_stride) +
                 " is smaller than Tk*D = " + std::to_string(tk * d));
  expect_shape(op, "q_pos", q_pos, {tq});
  expect_shape(op, "k_pos", k_pos, {tk});
  expect_dtype(op, "q_pos", q_pos, DType::I32);
  expect_dtype(op, "k_pos", k_pos, DType::I32);
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype() || out.dtype() != q.dtype())
    fail(op, "q, k, v and out must share one dtype, got " + q.describe() + ", " + k.describe() +
                 ", " + v.describe() + ", " + out.describe());
}

inline void check_matmul(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& out) {
  const char* op = "matmul";
  expect_rank(op, "w", w, 2);
  if (x.rank() < 1 || x.cols() != w.dim(1))
    fail(op, "x " + x.describe() + " does not match w " + w.describe() + " (K differs)");
  if (out.rows() != x.rows() || out.cols() != w.dim(0))
    fail(op, "out " + out.describe() + " must be [" + std::to_string(x.rows()) + ", " +
                 std::to_string(w.dim(0)) + "]");
  if (bias.numel() != 0 && (bias.rank() != 1 || bias.dim(0) != w.dim(0)))
    fail(op, "bias " + bias.describe() + " must be [" + std::to_string(w.dim(0)) + "]");
}

// matmul_fp8: w f8_e4m3 [N, K]; w_scale f32 [N] (per channel) or [ceil(N/128), ceil(K/128)].
inline void check_matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                             const Tensor& bias, const Tensor& out) {
  const char* op = "matmul_fp8";
  check_matmul(x, w, bias, out);
  expect_dtype(op, "w", w, DType::F8_E4M3);
  expect_dtype(op, "w_scale", w_scale, DType::F32);
  const int64_t n = w.dim(0), k = w.dim(1);
  const int64_t nb = (n + kFp8Block - 1) / kFp8Block, kb = (k + kFp8Block - 1) / kFp8Block;
  if (w_scale.shape() != std::vector<int64_t>{n} && w_scale.shape() != std::vector<int64_t>{nb, kb})
    fail(op, "w_scale " + w_scale.describe() + " must be [" + std::to_string(n) +
                 "] (per channel) or [" + std::to_string(nb) + ", " + std::to_string(kb) +
                 "] (128x128 blocks) for w " + w.describe());
}

// quantize_fp8_rows / dequantize_fp8_rows: q f8_e4m3 [R, C], scale f32 [R], x/out same shape as q.
inline void check_fp8_rows(const char* op, const Tensor& x, const Tensor& q, const Tensor& scale) {
  expect_dtype(op, "q", q, DType::F8_E4M3);
  expect_dtype(op, "scale", scale, DType::F32);
  if (x.rows() != q.rows() || x.cols() != q.cols())
    fail(op, "q " + q.describe() + " does not match " + x.describe());
  if (scale.numel() != q.rows())
    fail(op, "scale " + scale.describe() + " must have one entry per row of " + q.describe());
}

// The 128x128-block or per-channel scale of weight element (n, k) (see check_matmul_fp8).
inline float fp8_weight_scale(const float* w_scale, bool blocked, int64_t k_blocks, int64_t n,
                              int64_t k) {
  return blocked ? w_scale[(n / kFp8Block) * k_blocks + k / kFp8Block] : w_scale[n];
}

// True when masking by positions lets key kpos be seen by query qpos (backend.h AttentionMask).
inline bool key_visible(int32_t qpos, int32_t kpos, int32_t window, int32_t sink) {
  if (kpos > qpos) return false;
  return window == 0 || static_cast<int64_t>(qpos) - kpos < window || kpos < sink;
}

}  // namespace redknot::op_checks
