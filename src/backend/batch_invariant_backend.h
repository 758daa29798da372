// A backend decorator whose results for a row do not depend on how many rows share the call.
// The CPU backend picks GEMV kernels for small M and sgemm for larger M, whose summation orders
// differ, so a sequence's logits would change with the batch it is scheduled in. Serving wants a
// greedy request to produce the same tokens alone or batched; this wrapper runs every matmul one
// row at a time (every other op is already row-independent). Costs prefill throughput (no GEMM
// reuse of weights across rows), so it is an option of `redknot serve`.
#pragma once
#include <string>

#include "backend/forwarding_backend.h"

namespace redknot {

class BatchInvariantBackend : public ForwardingBackend {
 public:
  explicit BatchInvariantBackend(Backend& inner) : ForwardingBackend(inner) {}

  std::string name() const override { return inner_.name() + "+batch-invariant"; }
  // Row at a time. x: [M, K]; w: [N, K]; bias: [N] or empty; out: [M, N]
  void matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) override;
  // Row at a time as matmul (activation scales are per row already).
  // x: [M, K]; w: [N, K] f8; w_scale: [N] or [N/128, K/128]; bias: [N] or empty; out: [M, N]
  void matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, const Tensor& bias,
                  Tensor& out) override;
};

}  // namespace redknot
