// Host-memory defaults of the data-movement ops; device backends override them.
#include <unistd.h>
#include <cmath>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/backend.h"
#include "backend/reference/paged_attention_ref.h"
#include "core/error.h"

namespace redknot {
namespace {
void require_host(const Tensor& t, const char* op) {
  if (t.device() != Device::Host)
    throw Error(std::string(op) + ": default implementation needs host tensors, got " +
                t.describe() + " on a device");
}
}  // namespace

void Backend::paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                              const Tensor& pos_pool, const Tensor& q_pos,
                              const PagedAttentionPlan& plan, Tensor& out) {
  if (q.device() != Device::Host || q.dtype() != DType::F32)
    throw Error("backend '" + name() + "' has no paged attention");
  reference_paged_attention(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
}

void Backend::quantize_fp8_rows(const Tensor&, Tensor&, Tensor&) {
  throw Error("backend '" + name() + "' has no FP8 ops (quantize_fp8_rows)");
}

void Backend::dequantize_fp8_rows(const Tensor&, const Tensor&, Tensor&) {
  throw Error("backend '" + name() + "' has no FP8 ops (dequantize_fp8_rows)");
}

void Backend::matmul_fp8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&) {
  throw Error("backend '" + name() + "' has no FP8 GEMM (matmul_fp8)");
}

namespace {
void check_kv_rows(const char* op, const Tensor& x, const Tensor& rows) {
  if (rows.dtype() != DType::F8_E4M3 || x.rows() != rows.rows() ||
      rows.cols() != x.cols() + kFp8KvScaleBytes)
    throw Error(std::string(op) + ": rows " + rows.describe() + " must be f8_e4m3 [R, C + 4] for " +
                x.describe());
}
}  // namespace

void Backend::pack_fp8_kv_rows(const Tensor& x, Tensor& rows) {
  require_host(x, "pack_fp8_kv_rows");
  require_host(rows, "pack_fp8_kv_rows");
  check_kv_rows("pack_fp8_kv_rows", x, rows);
  const int64_t c = x.cols(), w = rows.cols();
  std::vector<float> row(c);
  for (int64_t r = 0; r < x.rows(); ++r) {
    convert_to_f32(x.dtype(), static_cast<const char*>(x.raw()) + dtype_bytes(x.dtype(), c) * r,
                   row.data(), c);
    uint8_t* dst = rows.data<uint8_t>() + r * w;
    const float scale = fp8_quantize_row(row.data(), c, dst);
    std::memcpy(dst + c, &scale, sizeof(scale));
  }
}

void Backend::unpack_fp8_kv_rows(const Tensor& rows, Tensor& out) {
  require_host(rows, "unpack_fp8_kv_rows");
  require_host(out, "unpack_fp8_kv_rows");
  check_kv_rows("unpack_fp8_kv_rows", out, rows);
  const int64_t c = out.cols(), w = rows.cols();
  std::vector<float> row(c);
  for (int64_t r = 0; r < rows.rows(); ++r) {
    const uint8_t* src = rows.data<uint8_t>() + r * w;
    float scale;
    std::memcpy(&scale, src + c, sizeof(scale));
    for (int64_t i = 0; i < c; ++i) row[i] = fp8_e4m3_to_f32(src[i]) * scale;
    convert_from_f32(row.data(), out.dtype(),
                     static_cast<char*>(out.raw()) + dtype_bytes(out.dtype(), c) * r, c);
  }
}

bool poison_uninit_allocs() {
  static const bool poison = [] {
    const char* env = std::getenv("REDKNOT_POISON_UNINIT");
    return env != nullptr && env[0] == '1';
  }();
  return poison;
}

Tensor Backend::alloc_uninit(DType dtype, std::vector<int64_t> shape) {
  Tensor t = alloc(dtype, std::move(shape));
  if (poison_uninit_allocs() && t.device() == Device::Host)
    std::memset(t.raw(), 0xFF, static_cast<size_t>(t.nbytes()));
  return t;
}

void Backend::add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                          Tensor& out) {
  if (out.raw() == x.raw() || out.raw() == y.raw())
    throw Error("add_rmsnorm: out must not alias x or y (" + out.describe() + ")");
  add(x, y);
  rmsnorm(x, weight, eps, out);
}

std::unique_ptr<RecordedWork> Backend::record(const std::function<void()>&) { return nullptr; }

int64_t Backend::free_memory_bytes() const {
  const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? int64_t{pages} * page : 0;
}

void Backend::row_l2norm(const Tensor& x, Tensor& out) {
  require_host(x, "row_l2norm");
  require_host(out, "row_l2norm");
  if (out.numel() != x.rows() || out.dtype() != DType::F32 || x.dtype() != DType::F32)
    throw Error("row_l2norm: " + x.describe() + " -> " + out.describe());
  const int64_t C = x.cols();
  for (int64_t r = 0; r < x.rows(); ++r) {
    const float* p = x.data<float>() + r * C;
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += double(p[c]) * p[c];
    out.data<float>()[r] = static_cast<float>(std::sqrt(s));
  }
}

void Backend::copy(const Tensor& src, Tensor& dst) {
  require_host(src, "copy");
  require_host(dst, "copy");
  if (src.dtype() != dst.dtype() || src.numel() != dst.numel())
    throw Error("copy: " + src.describe() + " -> " + dst.describe() + " mismatch");
  std::memcpy(dst.raw(), src.raw(), static_cast<size_t>(src.nbytes()));
}

void Backend::scatter_rows(const Tensor& src, const Tensor& rows, Tensor& dst) {
  require_host(src, "scatter_rows");
  require_host(rows, "scatter_rows");
  require_host(dst, "scatter_rows");
  if (src.dtype() != dst.dtype() || src.cols() != dst.cols() || rows.numel() != src.rows() ||
      rows.dtype() != DType::I32)
    throw Error("scatter_rows: " + src.describe() + " into " + dst.describe() + " with rows " +
                rows.describe());
  const int64_t row_bytes = dtype_bytes(src.dtype(), src.cols());
  const int32_t* idx = rows.data<int32_t>();
  for (int64_t i = 0; i < src.rows(); ++i) {
    if (idx[i] < 0 || idx[i] >= dst.rows()) throw Error("scatter_rows: row index out of range");
    std::memcpy(static_cast<char*>(dst.raw()) + idx[i] * row_bytes,
                static_cast<const char*>(src.raw()) + i * row_bytes, row_bytes);
  }
}

void Backend::gather_rows(const Tensor& src, const Tensor& rows, Tensor& out) {
  require_host(src, "gather_rows");
  require_host(rows, "gather_rows");
  require_host(out, "gather_rows");
  if (src.dtype() != out.dtype() || src.cols() != out.cols() || rows.numel() != out.rows() ||
      rows.dtype() != DType::I32)
    throw Error("gather_rows: " + src.describe() + " to " + out.describe() + " with rows " +
                rows.describe());
  const int64_t row_bytes = dtype_bytes(src.dtype(), src.cols());
  const int32_t* idx = rows.data<int32_t>();
  for (int64_t i = 0; i < out.rows(); ++i) {
    if (idx[i] < 0 || idx[i] >= src.rows()) throw Error("gather_rows: row index out of range");
    std::memcpy(static_cast<char*>(out.raw()) + i * row_bytes,
                static_cast<const char*>(src.raw()) + idx[i] * row_bytes, row_bytes);
  }
}

}  // namespace redknot
