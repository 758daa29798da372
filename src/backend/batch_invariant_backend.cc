#include "backend/batch_invariant_backend.h"

namespace redknot {

void BatchInvariantBackend::matmul(const Tensor& x, const Tensor& w, const Tensor& bias,
                                   Tensor& out) {
  const int64_t m = x.rows();
  if (m <= 1) return inner_.matmul(x, w, bias, out);
  // Views of one row each: the kernel choice and summation order are those of a single row.
  Tensor x2 = x.reshape({m, x.cols()}), o2 = out.reshape({m, out.cols()});
  for (int64_t r = 0; r < m; ++r) {
    Tensor xr = x2.rows_slice(r, r + 1), orow = o2.rows_slice(r, r + 1);
    inner_.matmul(xr, w, bias, orow);
  }
}

void BatchInvariantBackend::matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                                       const Tensor& bias, Tensor& out) {
  const int64_t m = x.rows();
  if (m <= 1) return inner_.matmul_fp8(x, w, w_scale, bias, out);
  Tensor x2 = x.reshape({m, x.cols()}), o2 = out.reshape({m, out.cols()});
  for (int64_t r = 0; r < m; ++r) {
    Tensor xr = x2.rows_slice(r, r + 1), orow = o2.rows_slice(r, r + 1);
    inner_.matmul_fp8(xr, w, w_scale, bias, orow);
  }
}

}  // namespace redknot
