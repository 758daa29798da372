#include "backend/reference/reference_backend.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "backend/op_checks.h"
#include "backend/reference/paged_attention_ref.h"

namespace redknot {
namespace {

using namespace op_checks;

// Row r of a matrix-shaped tensor of any dtype, as f32 (Q8_0 rows need cols % 32 == 0).
std::vector<float> row_f32(const Tensor& t, int64_t r) {
  std::vector<float> row(t.cols());
  const char* base = static_cast<const char*>(t.raw()) + dtype_bytes(t.dtype(), t.cols()) * r;
  convert_to_f32(t.dtype(), base, row.data(), t.cols());
  return row;
}

std::vector<float> all_f32(const Tensor& t) {
  std::vector<float> v(t.numel());
  convert_to_f32(t.dtype(), t.raw(), v.data(), t.numel());
  return v;
}

void expect_host_f32(const char* op, const char* arg, const Tensor& t) {
  expect_device(op, arg, t, Device::Host);
  expect_dtype(op, arg, t, DType::F32);
}

}  // namespace

Tensor ReferenceBackend::alloc(DType dtype, std::vector<int64_t> shape) {
  return Tensor::host(dtype, std::move(shape));
}

Tensor ReferenceBackend::upload_weight(const Tensor& host) {
  expect_device("upload_weight", "host", host, Device::Host);
  if (host.dtype() == DType::F8_E4M3) {  // matmul_fp8 reads the codes with their scales
    Tensor out = Tensor::host(DType::F8_E4M3, host.shape());
    std::memcpy(out.raw(), host.raw(), host.nbytes());
    return out;
  }
  Tensor out = Tensor::host(DType::F32, host.shape());
  convert_to_f32(host.dtype(), host.raw(), out.data<float>(), host.numel());
  return out;
}

void ReferenceBackend::copy_from_host(Tensor& dst, const Tensor& src) {
  if (dst.numel() != src.numel())
    throw Error("copy_from_host: element count differs: " + dst.describe() + " <- " +
                src.describe());
  if (dst.dtype() == src.dtype()) {
    std::memcpy(dst.raw(), src.raw(), src.nbytes());
    return;
  }
  std::vector<float> tmp = all_f32(src);
  convert_from_f32(tmp.data(), dst.dtype(), dst.raw(), dst.numel());
}

Tensor ReferenceBackend::to_host_f32(const Tensor& src) {
  Tensor out = Tensor::host(DType::F32, src.shape());
  convert_to_f32(src.dtype(), src.raw(), out.data<float>(), src.numel());
  return out;
}

void ReferenceBackend::embedding(const Tensor& table, const Tensor& ids, Tensor& out) {
  expect_rank("embedding", "table", table, 2);
  expect_dtype("embedding", "ids", ids, DType::I32);
  expect_host_f32("embedding", "out", out);
  expect_shape("embedding", "out", out, {ids.numel(), table.dim(1)});
  for (int64_t t = 0; t < ids.numel(); ++t) {
    int32_t id = ids.data<int32_t>()[t];
    if (id < 0 || id >= table.dim(0))
      throw Error("embedding: token id " + std::to_string(id) + " out of range for " +
                  table.describe());
    std::vector<float> row = row_f32(table, id);
    std::memcpy(out.data<float>() + t * table.dim(1), row.data(), row.size() * 4);
  }
}

void ReferenceBackend::matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) {
  check_matmul(x, w, bias, out);
  expect_host_f32("matmul", "x", x);
  expect_host_f32("matmul", "out", out);
  const int64_t m_rows = x.rows(), n_rows = w.dim(0), k_dim = w.dim(1);
  std::vector<float> b = bias.numel() ? all_f32(bias) : std::vector<float>(n_rows, 0.0f);
  for (int64_t n = 0; n < n_rows; ++n) {
    std::vector<float> wr = row_f32(w, n);
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* xr = x.data<float>() + m * k_dim;
      double acc = 0.0;
      for (int64_t k = 0; k < k_dim; ++k) acc += static_cast<double>(xr[k]) * wr[k];
      out.data<float>()[m * n_rows + n] = static_cast<float>(acc + b[n]);
    }
  }
}

void ReferenceBackend::quantize_fp8_rows(const Tensor& x, Tensor& q, Tensor& scale) {
  check_fp8_rows("quantize_fp8_rows", x, q, scale);
  expect_host_f32("quantize_fp8_rows", "x", x);
  for (int64_t r = 0; r < x.rows(); ++r)
    scale.data<float>()[r] = fp8_quantize_row(x.data<float>() + r * x.cols(), x.cols(),
                                              q.data<uint8_t>() + r * x.cols());
}

void ReferenceBackend::dequantize_fp8_rows(const Tensor& q, const Tensor& scale, Tensor& out) {
  check_fp8_rows("dequantize_fp8_rows", out, q, scale);
  expect_host_f32("dequantize_fp8_rows", "out", out);
  for (int64_t r = 0; r < q.rows(); ++r)
    for (int64_t c = 0; c < q.cols(); ++c)
      out.data<float>()[r * q.cols() + c] =
          fp8_e4m3_to_f32(q.data<uint8_t>()[r * q.cols() + c]) * scale.data<float>()[r];
}

void ReferenceBackend::matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                                  const Tensor& bias, Tensor& out) {
  check_matmul_fp8(x, w, w_scale, bias, out);
  expect_host_f32("matmul_fp8", "x", x);
  expect_host_f32("matmul_fp8", "out", out);
  const int64_t m_rows = x.rows(), n_rows = w.dim(0), k_dim = w.dim(1);
  const bool blocked = w_scale.rank() == 2;
  const int64_t k_blocks = blocked ? w_scale.dim(1) : 0;
  std::vector<uint8_t> xq(m_rows * k_dim);
  std::vector<float> sx(m_rows);
  for (int64_t m = 0; m < m_rows; ++m)
    sx[m] = fp8_quantize_row(x.data<float>() + m * k_dim, k_dim, xq.data() + m * k_dim);
  std::vector<float> b = bias.numel() ? all_f32(bias) : std::vector<float>(n_rows, 0.0f);
  const float* ws = w_scale.data<float>();
  for (int64_t n = 0; n < n_rows; ++n) {
    std::vector<double> wr(k_dim);  // dequantized weight row, exact in double
    for (int64_t k = 0; k < k_dim; ++k)
      wr[k] = static_cast<double>(fp8_e4m3_to_f32(w.data<uint8_t>()[n * k_dim + k])) *
              fp8_weight_scale(ws, blocked, k_blocks, n, k);
    for (int64_t m = 0; m < m_rows; ++m) {
      double acc = 0.0;
      for (int64_t k = 0; k < k_dim; ++k)
        acc += static_cast<double>(fp8_e4m3_to_f32(xq[m * k_dim + k])) * wr[k];
      out.data<float>()[m * n_rows + n] = static_cast<float>(acc * sx[m] + b[n]);
    }
  }
}

void ReferenceBackend::rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  expect_host_f32("rmsnorm", "x", x);
  expect_host_f32("rmsnorm", "out", out);
  expect_shape("rmsnorm", "out", out, x.shape());
  const int64_t cols = x.cols();
  if (weight.numel() != cols)
    throw Error("rmsnorm: weight " + weight.describe() + " does not match x " + x.describe());
  std::vector<float> w = all_f32(weight);
  for (int64_t r = 0; r < x.rows(); ++r) {
    const float* xr = x.data<float>() + r * cols;
    float* yr = out.data<float>() + r * cols;
    double sum_sq = 0.0;
    for (int64_t c = 0; c < cols; ++c) sum_sq += static_cast<double>(xr[c]) * xr[c];
    const double inv_rms = 1.0 / std::sqrt(sum_sq / cols + eps);
    for (int64_t c = 0; c < cols; ++c) yr[c] = static_cast<float>(xr[c] * inv_rms) * w[c];
  }
}

void ReferenceBackend::add(Tensor& x, const Tensor& y) {
  expect_host_f32("add", "x", x);
  expect_host_f32("add", "y", y);
  expect_shape("add", "y", y, x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] += y.data<float>()[i];
}

void ReferenceBackend::swiglu(const Tensor& gate, const Tensor& up, Tensor& out) {
  expect_host_f32("swiglu", "gate", gate);
  expect_host_f32("swiglu", "up", up);
  expect_host_f32("swiglu", "out", out);
  expect_shape("swiglu", "up", up, gate.shape());
  expect_shape("swiglu", "out", out, gate.shape());
  for (int64_t i = 0; i < gate.numel(); ++i) {
    const double g = gate.data<float>()[i];
    out.data<float>()[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * up.data<float>()[i]);
  }
}

void ReferenceBackend::rope(Tensor& x, const Tensor& pos, const Tensor& inv_freq, float scaling) {
  expect_host_f32("rope", "x", x);
  expect_rank("rope", "x", x, 3);
  const int64_t tokens = x.dim(0), heads = x.dim(1), d = x.dim(2), half = d / 2;
  if (d % 2 != 0) throw Error("rope: head_dim must be even, got " + x.describe());
  expect_shape("rope", "pos", pos, {tokens});
  expect_dtype("rope", "pos", pos, DType::I32);
  expect_host_f32("rope", "inv_freq", inv_freq);
  expect_shape("rope", "inv_freq", inv_freq, {half});
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      // HF computes the angle, cos and sin in f32; so do we.
      const float angle = static_cast<float>(pos.data<int32_t>()[t]) * inv_freq.data<float>()[i];
      const float c = std::cos(angle), s = std::sin(angle);
      for (int64_t h = 0; h < heads; ++h) {
        float* xh = x.data<float>() + (t * heads + h) * d;
        const float x0 = xh[i], x1 = xh[i + half];
        xh[i] = (x0 * c - x1 * s) * scaling;
        xh[i + half] = (x1 * c + x0 * s) * scaling;
      }
    }
  }
}

void ReferenceBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                 int64_t kv_head_stride, const Tensor& q_pos, const Tensor& k_pos,
                                 const AttentionMask& mask, Tensor& out) {
  check_attention(q, k, v, kv_head_stride, q_pos, k_pos, out);
  expect_host_f32("attention", "q", q);
  const int64_t tq = q.dim(0), hq = q.dim(1), d = q.dim(2);
  const int64_t hkv = k.dim(0), tk = k.dim(1), group = hq / hkv;
  std::vector<double> scores(tk);
  for (int64_t i = 0; i < tq; ++i) {
    const int32_t qp = q_pos.data<int32_t>()[i];
    for (int64_t h = 0; h < hq; ++h) {
      const float* qv = q.data<float>() + (i * hq + h) * d;
      const float* kh = k.data<float>() + (h / group) * kv_head_stride;
      const float* vh = v.data<float>() + (h / group) * kv_head_stride;
      float* o = out.data<float>() + (i * hq + h) * d;
      double max_score = -std::numeric_limits<double>::infinity();
      bool any = false;
      for (int64_t j = 0; j < tk; ++j) {
        if (!key_visible(qp, k_pos.data<int32_t>()[j], mask.window, mask.sink)) continue;
        double s = 0.0;
        for (int64_t c = 0; c < d; ++c) s += static_cast<double>(qv[c]) * kh[j * d + c];
        scores[j] = s * mask.scale;
        max_score = std::max(max_score, scores[j]);
        any = true;
      }
      std::vector<double> acc(d, 0.0);
      double denom = 0.0;
      for (int64_t j = 0; any && j < tk; ++j) {
        if (!key_visible(qp, k_pos.data<int32_t>()[j], mask.window, mask.sink)) continue;
        const double p = std::exp(scores[j] - max_score);
        denom += p;
        for (int64_t c = 0; c < d; ++c) acc[c] += p * vh[j * d + c];
      }
      // A query that sees no key outputs zeros.
      for (int64_t c = 0; c < d; ++c) o[c] = any ? static_cast<float>(acc[c] / denom) : 0.0f;
    }
  }
}

void ReferenceBackend::paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                                       const Tensor& pos_pool, const Tensor& q_pos,
                                       const PagedAttentionPlan& plan, Tensor& out) {
  reference_paged_attention(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
}

void ReferenceBackend::argmax(const Tensor& logits, Tensor& out) {
  expect_dtype("argmax", "out", out, DType::I32);
  if (out.numel() != logits.rows())
    throw Error("argmax: out " + out.describe() + " must have one entry per row of " +
                logits.describe());
  for (int64_t r = 0; r < logits.rows(); ++r) {
    std::vector<float> row = row_f32(logits, r);
    int64_t best = 0;
    for (int64_t c = 1; c < static_cast<int64_t>(row.size()); ++c)
      if (row[c] > row[best]) best = c;
    out.data<int32_t>()[r] = static_cast<int32_t>(best);
  }
}

}  // namespace redknot
