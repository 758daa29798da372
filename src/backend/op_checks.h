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

// True when masking by positions lets key kpos be seen by query qpos (backend.h AttentionMask).
inline bool key_visible(int32_t qpos, int32_t kpos, int32_t window, int32_t sink) {
  if (kpos > qpos) return false;
  return window == 0 || static_cast<int64_t>(qpos) - kpos < window || kpos < sink;
}

}  // namespace redknot::op_checks
