#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <unordered_map>

#include "backend/cpu/attention_kernel.h"
#include "backend/cpu/gemv_kernels.h"
#include "backend/cpu/paged_attention_kernel.h"
#include "backend/cpu/simd.h"
#include "backend/op_checks.h"
#include "backend/reference/paged_attention_ref.h"

#ifdef REDKNOT_HAS_OPENBLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace redknot {
namespace {

using namespace op_checks;

// Below this many multiply-adds an op runs on the calling thread (a pool wake-up costs ~5 us).
constexpr int64_t kMinParallelWork = 1 << 15;
// From this many rows f32 matmuls go to sgemm; below, the GEMV kernels read weights once.
constexpr int64_t kSgemmMinRows = 4;
// BF16 weights are widened per block for sgemm only when M amortises the conversion.
constexpr int64_t kBf16SgemmMinRows = 32;

void expect_host_f32(const char* op, const char* arg, const Tensor& t) {
  expect_device(op, arg, t, Device::Host);
  expect_dtype(op, arg, t, DType::F32);
}

// A small f32 vector (norm weight, bias) in f32 whatever dtype it was uploaded as.
std::vector<float> small_f32(const Tensor& t) {
  std::vector<float> v(t.numel());
  convert_to_f32(t.dtype(), t.raw(), v.data(), t.numel());
  return v;
}

}  // namespace

CpuBackend::CpuBackend(CpuBackendOptions options) : options_(options), pool_(options.n_threads) {
#ifdef REDKNOT_HAS_OPENBLAS
  // OpenBLAS runs single-threaded inside our pool's threads (each takes a slice of the output
  // columns). Two thread pools on the same cores fight: OpenBLAS workers spin after each call
  // and starved our GEMV/conversion threads (measured 3-10x slowdowns on 2 cores).
  openblas_set_num_threads(1);
#endif
}

const char* CpuBackend::simd_name() { return cpu::Simd::kName; }

void CpuBackend::parallel_rows(int64_t n, int64_t work_per_item,
                               const std::function<void(int64_t, int64_t)>& fn) {
  if (n * std::max<int64_t>(1, work_per_item) < kMinParallelWork || pool_.size() == 1) {
    fn(0, n);
    return;
  }
  const int64_t grain =
      std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_item));
  pool_.parallel_for(n, grain, fn);
}

Tensor CpuBackend::alloc(DType dtype, std::vector<int64_t> shape) {
  return Tensor::host(dtype, std::move(shape));
}

Tensor CpuBackend::upload_weight(const Tensor& host) {
  expect_device("upload_weight", "host", host, Device::Host);
  const bool to_bf16 = options_.f32_weights_to_bf16 && host.rank() >= 2;
  if (host.dtype() == DType::BF16 || host.dtype() == DType::I32) return host;
  if (host.dtype() == DType::F8_E4M3) return host;  // matmul_fp8 dequantizes per block
  if (host.dtype() == DType::F32 && !to_bf16) return host;
  Tensor f32 = host;
  if (host.dtype() != DType::F32) {
    f32 = Tensor::host(DType::F32, host.shape());
    convert_to_f32(host.dtype(), host.raw(), f32.data<float>(), host.numel());
  }
  if (!to_bf16) return f32;
  Tensor bf16 = Tensor::host(DType::BF16, host.shape());
  convert_from_f32(f32.data<float>(), DType::BF16, bf16.raw(), host.numel());
  return bf16;
}

void CpuBackend::copy_from_host(Tensor& dst, const Tensor& src) {
  if (dst.numel() != src.numel())
    throw Error("copy_from_host: element count differs: " + dst.describe() + " <- " +
                src.describe());
  if (dst.dtype() == src.dtype()) {
    std::memcpy(dst.raw(), src.raw(), src.nbytes());
    return;
  }
  std::vector<float> tmp(src.numel());
  convert_to_f32(src.dtype(), src.raw(), tmp.data(), src.numel());
  convert_from_f32(tmp.data(), dst.dtype(), dst.raw(), dst.numel());
}

Tensor CpuBackend::to_host_f32(const Tensor& src) {
  Tensor out = Tensor::host(DType::F32, src.shape());
  convert_to_f32(src.dtype(), src.raw(), out.data<float>(), src.numel());
  return out;
}

void CpuBackend::embedding(const Tensor& table, const Tensor& ids, Tensor& out) {
  expect_rank("embedding", "table", table, 2);
  expect_dtype("embedding", "ids", ids, DType::I32);
  expect_host_f32("embedding", "out", out);
  const int64_t hidden = table.dim(1);
  expect_shape("embedding", "out", out, {ids.numel(), hidden});
  const int64_t row_bytes = dtype_bytes(table.dtype(), hidden);
  for (int64_t t = 0; t < ids.numel(); ++t) {
    const int32_t id = ids.data<int32_t>()[t];
    if (id < 0 || id >= table.dim(0))
      throw Error("embedding: token id " + std::to_string(id) + " out of range for " +
                  table.describe());
    convert_to_f32(table.dtype(), static_cast<const char*>(table.raw()) + id * row_bytes,
                   out.data<float>() + t * hidden, hidden);
  }
}

void CpuBackend::matmul(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out) {
  check_matmul(x, w, bias, out);
  expect_host_f32("matmul", "x", x);
  expect_host_f32("matmul", "out", out);
  if (w.dtype() != DType::F32 && w.dtype() != DType::BF16)
    throw Error("matmul: cpu weights must be f32 or bf16 (pass them through upload_weight), got " +
                w.describe());
  const int64_t m_rows = x.rows(), n_rows = w.dim(0), k_dim = w.dim(1);
  std::vector<float> bias_f32 = bias.numel() ? small_f32(bias) : std::vector<float>();
  const float* b = bias_f32.empty() ? nullptr : bias_f32.data();
  const float* xp = x.data<float>();
  float* op = out.data<float>();

#ifdef REDKNOT_HAS_OPENBLAS
  if (w.dtype() == DType::F32 && m_rows >= kSgemmMinRows) {
    const float* wp = w.data<float>();
    parallel_rows(n_rows, m_rows * k_dim, [&](int64_t n0, int64_t n1) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m_rows, n1 - n0, k_dim, 1.0f, xp, k_dim,
                  wp + n0 * k_dim, k_dim, 0.0f, op + n0, n_rows);
    });
    if (b)
      for (int64_t m = 0; m < m_rows; ++m)
        for (int64_t n = 0; n < n_rows; ++n) op[m * n_rows + n] += b[n];
    return;
  }
  if (w.dtype() == DType::BF16 && m_rows >= kBf16SgemmMinRows) {
    matmul_bf16_sgemm(xp, m_rows, w.data<uint16_t>(), n_rows, k_dim, b, op);
    return;
  }
#endif
  // GEMV / register-tiled path: threads split the weight rows, so each is read once.
  const int64_t work_per_row = m_rows * k_dim;
  auto run = [&](auto* wp) {
    parallel_rows(n_rows, work_per_row, [&](int64_t n0, int64_t n1) {
      cpu::gemm_rows(xp, m_rows, wp, k_dim, n0, n1, b, op, n_rows);
    });
  };
  if (w.dtype() == DType::F32)
    run(w.data<float>());
  else
    run(w.data<uint16_t>());
}

void CpuBackend::matmul_bf16_sgemm(const float* x, int64_t m_rows, const uint16_t* w,
                                   int64_t n_rows, int64_t k_dim, const float* bias, float* out) {
#ifdef REDKNOT_HAS_OPENBLAS
  // Each pool thread widens its own slice of weight rows in blocks (~4 MiB of f32, cache
  // friendly) and runs a single-threaded sgemm on it.
  const int64_t block_rows =
      std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(1, k_dim));
  parallel_rows(n_rows, m_rows * k_dim, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> tile;
    for (int64_t n0 = r0; n0 < r1; n0 += block_rows) {
      const int64_t nb = std::min(block_rows, r1 - n0);
      tile.resize(nb * k_dim);
      convert_to_f32(DType::BF16, w + n0 * k_dim, tile.data(), nb * k_dim);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m_rows, nb, k_dim, 1.0f, x, k_dim,
                  tile.data(), k_dim, 0.0f, out + n0, n_rows);
    }
  });
  if (bias)
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t n = 0; n < n_rows; ++n) out[m * n_rows + n] += bias[n];
#else
  throw Error("matmul_bf16_sgemm: built without OpenBLAS");
#endif
}

void CpuBackend::quantize_fp8_rows(const Tensor& x, Tensor& q, Tensor& scale) {
  check_fp8_rows("quantize_fp8_rows", x, q, scale);
  expect_host_f32("quantize_fp8_rows", "x", x);
  const int64_t cols = x.cols();
  parallel_rows(x.rows(), cols, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      scale.data<float>()[r] =
          fp8_quantize_row(x.data<float>() + r * cols, cols, q.data<uint8_t>() + r * cols);
  });
}

void CpuBackend::dequantize_fp8_rows(const Tensor& q, const Tensor& scale, Tensor& out) {
  check_fp8_rows("dequantize_fp8_rows", out, q, scale);
  expect_host_f32("dequantize_fp8_rows", "out", out);
  const int64_t cols = q.cols();
  parallel_rows(q.rows(), cols, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* o = out.data<float>() + r * cols;
      convert_to_f32(DType::F8_E4M3, q.data<uint8_t>() + r * cols, o, cols);
      const float s = scale.data<float>()[r];
      for (int64_t c = 0; c < cols; ++c) o[c] *= s;
    }
  });
}

void CpuBackend::matmul_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale,
                            const Tensor& bias, Tensor& out) {
  check_matmul_fp8(x, w, w_scale, bias, out);
  expect_host_f32("matmul_fp8", "x", x);
  expect_host_f32("matmul_fp8", "out", out);
  const int64_t m_rows = x.rows(), n_rows = w.dim(0), k_dim = w.dim(1);
  const bool blocked = w_scale.rank() == 2;
  const int64_t k_blocks = blocked ? w_scale.dim(1) : 0;
  const float* ws = w_scale.data<float>();
  // Activation codes decoded to f32 are exact, so the f32 GEMM sees the quantized values.
  std::vector<float> xq(m_rows * k_dim), sx(m_rows);
  {
    std::vector<uint8_t> codes(k_dim);
    for (int64_t m = 0; m < m_rows; ++m) {
      sx[m] = fp8_quantize_row(x.data<float>() + m * k_dim, k_dim, codes.data());
      convert_to_f32(DType::F8_E4M3, codes.data(), xq.data() + m * k_dim, k_dim);
    }
  }
  float* op = out.data<float>();
  const int64_t block_rows =
      std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(1, k_dim));
  parallel_rows(n_rows, m_rows * k_dim, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> tile;
    for (int64_t n0 = r0; n0 < r1; n0 += block_rows) {
      const int64_t nb = std::min(block_rows, r1 - n0);
      tile.resize(nb * k_dim);
      convert_to_f32(DType::F8_E4M3, w.data<uint8_t>() + n0 * k_dim, tile.data(), nb * k_dim);
      if (blocked)  // block scales inside the sum; per-channel scales after it
        for (int64_t n = 0; n < nb; ++n)
          for (int64_t k = 0; k < k_dim; ++k)
            tile[n * k_dim + k] *= fp8_weight_scale(ws, true, k_blocks, n0 + n, k);
#ifdef REDKNOT_HAS_OPENBLAS
      if (m_rows >= kSgemmMinRows) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m_rows, nb, k_dim, 1.0f, xq.data(),
                    k_dim, tile.data(), k_dim, 0.0f, op + n0, n_rows);
        continue;
      }
#endif
      cpu::gemm_rows(xq.data(), m_rows, tile.data(), k_dim, 0, nb, nullptr, op + n0, n_rows);
    }
  });
  std::vector<float> b = bias.numel() ? small_f32(bias) : std::vector<float>(n_rows, 0.0f);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t n = 0; n < n_rows; ++n)
      op[m * n_rows + n] = op[m * n_rows + n] * sx[m] * (blocked ? 1.0f : ws[n]) + b[n];
}

void CpuBackend::rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  expect_host_f32("rmsnorm", "x", x);
  expect_host_f32("rmsnorm", "out", out);
  expect_shape("rmsnorm", "out", out, x.shape());
  const int64_t cols = x.cols();
  if (weight.numel() != cols)
    throw Error("rmsnorm: weight " + weight.describe() + " does not match x " + x.describe());
  std::vector<float> w_f32;
  const float* w =
      weight.dtype() == DType::F32 ? weight.data<float>() : (w_f32 = small_f32(weight)).data();
  const float* xp = x.data<float>();
  float* yp = out.data<float>();
  parallel_rows(x.rows(), cols, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * cols;
      float* yr = yp + r * cols;
      const float mean_sq = cpu::dot(xr, xr, cols) / static_cast<float>(cols);
      const float inv_rms = 1.0f / std::sqrt(mean_sq + eps);
      for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] * inv_rms) * w[c];
    }
  });
}

void CpuBackend::add(Tensor& x, const Tensor& y) {
  expect_host_f32("add", "x", x);
  expect_host_f32("add", "y", y);
  expect_shape("add", "y", y, x.shape());
  float* xp = x.data<float>();
  const float* yp = y.data<float>();
  parallel_rows(x.numel(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) xp[i] += yp[i];
  });
}

void CpuBackend::swiglu(const Tensor& gate, const Tensor& up, Tensor& out) {
  expect_host_f32("swiglu", "gate", gate);
  expect_host_f32("swiglu", "up", up);
  expect_host_f32("swiglu", "out", out);
  expect_shape("swiglu", "up", up, gate.shape());
  expect_shape("swiglu", "out", out, gate.shape());
  const float* g = gate.data<float>();
  const float* u = up.data<float>();
  float* o = out.data<float>();
  parallel_rows(gate.numel(), 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
}

void CpuBackend::rope(Tensor& x, const Tensor& pos, const Tensor& inv_freq, float scaling) {
  expect_host_f32("rope", "x", x);
  expect_rank("rope", "x", x, 3);
  const int64_t tokens = x.dim(0), heads = x.dim(1), d = x.dim(2), half = d / 2;
  if (d % 2 != 0) throw Error("rope: head_dim must be even, got " + x.describe());
  expect_shape("rope", "pos", pos, {tokens});
  expect_dtype("rope", "pos", pos, DType::I32);
  expect_host_f32("rope", "inv_freq", inv_freq);
  expect_shape("rope", "inv_freq", inv_freq, {half});
  const int32_t* p = pos.data<int32_t>();
  const float* freq = inv_freq.data<float>();
  float* xp = x.data<float>();
  parallel_rows(tokens, heads * d + half * 8, [&](int64_t t0, int64_t t1) {
    std::vector<float> cos_v(half), sin_v(half);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        // Angle, cos and sin in f32 as HF computes them; the scaling folds into both.
        const float angle = static_cast<float>(p[t]) * freq[i];
        cos_v[i] = std::cos(angle);
        sin_v[i] = std::sin(angle);
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* x0 = xp + (t * heads + h) * d;
        float* x1 = x0 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x0[i], b = x1[i];
          x0[i] = (a * cos_v[i] - b * sin_v[i]) * scaling;
          x1[i] = (b * cos_v[i] + a * sin_v[i]) * scaling;
        }
      }
    }
  });
}

void CpuBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v,
                           int64_t kv_head_stride, const Tensor& q_pos, const Tensor& k_pos,
                           const AttentionMask& mask, Tensor& out) {
  check_attention(q, k, v, kv_head_stride, q_pos, k_pos, out);
  expect_host_f32("attention", "q", q);
  cpu::AttentionArgs a{};
  a.q = q.data<float>();
  a.k = k.data<float>();
  a.v = v.data<float>();
  a.out = out.data<float>();
  a.q_pos = q_pos.data<int32_t>();
  a.k_pos = k_pos.data<int32_t>();
  a.hq = q.dim(1);
  a.hkv = k.dim(0);
  a.d = q.dim(2);
  a.tk = k.dim(1);
  a.kv_head_stride = kv_head_stride;
  a.mask = mask;
  a.k_pos_ascending = std::is_sorted(a.k_pos, a.k_pos + a.tk);
  const int64_t tq = q.dim(0), group = a.hq / a.hkv;
  // One task per (query token, kv head); work estimate assumes every key is visible.
  // Tasks are dealt round-robin to the threads: causal queries get more keys as i grows, so
  // contiguous chunks would leave the first thread idle.
  const int64_t n_tasks = tq * a.hkv;
  const int64_t n_workers = n_tasks * group * a.tk * a.d * 2 < kMinParallelWork
                                ? 1
                                : std::min<int64_t>(n_tasks, pool_.size());
  auto run = [&](int64_t w0, int64_t w1) {
    cpu::AttentionScratch scratch;
    scratch.reserve(group, a.d);
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t t = w; t < n_tasks; t += n_workers)
        cpu::attention_task(a, t / a.hkv, t % a.hkv, scratch);
  };
  if (n_workers == 1)
    run(0, 1);
  else
    pool_.parallel_for(n_workers, 1, run);
}

void CpuBackend::paged_attention(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                                 const Tensor& pos_pool, const Tensor& q_pos,
                                 const PagedAttentionPlan& plan, Tensor& out) {
  check_paged_attention_args(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
  expect_host_f32("paged_attention", "q", q);
  expect_host_f32("paged_attention", "out", out);
  expect_device("paged_attention", "k_pool", k_pool, Device::Host);
  if (k_pool.dtype() == DType::F8_E4M3)
    return paged_attention_fp8(q, k_pool, v_pool, pos_pool, q_pos, plan, out);
  if (k_pool.dtype() != v_pool.dtype() ||
      (k_pool.dtype() != DType::F32 && k_pool.dtype() != DType::BF16))
    throw Error("paged_attention: cpu pools must both be f32 or bf16, got " + k_pool.describe() +
                " and " + v_pool.describe());
  if (q.dim(0) == 0 || plan.num_seqs == 0) return;
  if (plan.qo_indptr.data<int32_t>()[plan.num_seqs] != q.dim(0))
    throw Error("paged_attention: qo_indptr does not cover the " + std::to_string(q.dim(0)) +
                " query rows");
  auto run = [&](auto tag) {
    using TKV = decltype(tag);
    cpu::PagedArgs<TKV> a{};
    a.q = q.data<float>();
    a.k_pool = static_cast<const TKV*>(k_pool.raw());
    a.v_pool = static_cast<const TKV*>(v_pool.raw());
    a.pos_pool = pos_pool.data<int32_t>();
    a.q_pos = q_pos.data<int32_t>();
    a.out = out.data<float>();
    a.qo_indptr = plan.qo_indptr.data<int32_t>();
    a.kv_indptr = plan.kv_indptr.data<int32_t>();
    a.page_indices = plan.page_indices.data<int32_t>();
    a.page_lengths = plan.page_lengths.data<int32_t>();
    a.head_window = plan.head_window.data<int32_t>();
    a.head_sink = plan.head_sink.data<int32_t>();
    a.hq = q.dim(1);
    a.hkv = plan.num_kv_heads;
    a.d = q.dim(2);
    a.page_size = plan.page_size;
    a.scale = plan.scale;
    const int64_t group = a.hq / a.hkv;
    // About 32 query vectors per unit: K/V pages are reused from cache across them, and the
    // scratch (scores, acc) stays within L1/L2.
    const int64_t block_rows = std::max<int64_t>(1, 32 / group);
    std::vector<cpu::PagedUnit> units;
    std::vector<std::pair<int32_t, int32_t>> merges;
    const int32_t n_slots =
        cpu::plan_units(a, plan.num_seqs, block_rows, pool_.size(), units, merges);
    const int64_t slot_floats = cpu::partial_slot_floats(block_rows, group, a.d);
    std::vector<float> partials(n_slots * slot_floats);
    // Costliest units first, then handed out dynamically: global heads and long sequences
    // would otherwise leave threads idle at the end.
    std::vector<int32_t> order(units.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t x, int32_t y) { return units[x].cost > units[y].cost; });
    int64_t total_cost = 0;
    for (const cpu::PagedUnit& u : units) total_cost += u.cost;
    const int64_t n_units = static_cast<int64_t>(units.size());
    const int64_t work = total_cost * plan.page_size * group * a.d * 2;
    const int64_t n_workers =
        work < kMinParallelWork ? 1 : std::min<int64_t>(n_units, pool_.size());
    std::atomic<int64_t> next{0};
    auto worker = [&](int64_t, int64_t) {
      cpu::PagedScratch scratch;
      scratch.reserve(block_rows * group, plan.page_size, a.d);
      for (int64_t i = next.fetch_add(1); i < n_units; i = next.fetch_add(1))
        cpu::paged_attention_unit(a, units[order[i]], scratch, partials.data(), slot_floats);
    };
    if (n_workers <= 1)
      worker(0, 1);
    else
      pool_.parallel_for(n_workers, 1, worker);
    for (const auto& [first, count] : merges)
      cpu::merge_partials(a, units[first], units[first].partial, count, partials.data(),
                          slot_floats);
  };
  if (k_pool.dtype() == DType::F32)
    run(float{});
  else
    run(uint16_t{});
}

void CpuBackend::paged_attention_fp8(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                                     const Tensor& pos_pool, const Tensor& q_pos,
                                     const PagedAttentionPlan& plan, Tensor& out) {
  // The pages this plan reads, dequantized once into a compact f32 pool (each page is read by
  // every query row of its head, so the conversion is amortised), then the f32 kernel.
  const int64_t nnz = plan.page_indices.numel(), ps = plan.page_size, d = q.dim(2);
  std::vector<int32_t> compact(nnz), src_rows;
  std::unordered_map<int32_t, int32_t> index;  // pool page -> compact page
  for (int64_t e = 0; e < nnz; ++e) {
    const int32_t page = plan.page_indices.data<int32_t>()[e];
    auto [it, fresh] = index.try_emplace(page, static_cast<int32_t>(index.size()));
    if (fresh)
      for (int64_t j = 0; j < ps; ++j) src_rows.push_back(static_cast<int32_t>(page * ps + j));
    compact[e] = it->second;
  }
  const int64_t slots = std::max<int64_t>(1, static_cast<int64_t>(src_rows.size()));
  Tensor k32 = Tensor::host(DType::F32, {slots, d}), v32 = Tensor::host(DType::F32, {slots, d});
  Tensor pos = Tensor::host(DType::I32, {slots});
  const int64_t n = static_cast<int64_t>(src_rows.size());
  if (n > 0) {
    Tensor rows = Tensor::from_i32(src_rows, {n});
    Tensor k8 = Tensor::host(DType::F8_E4M3, {n, k_pool.dim(1)});
    Tensor v8 = Tensor::host(DType::F8_E4M3, {n, k_pool.dim(1)});
    gather_rows(k_pool, rows, k8);
    gather_rows(v_pool, rows, v8);
    Tensor k_dst = k32.rows_slice(0, n), v_dst = v32.rows_slice(0, n);
    unpack_fp8_kv_rows(k8, k_dst);
    unpack_fp8_kv_rows(v8, v_dst);
    for (int64_t i = 0; i < n; ++i) pos.data<int32_t>()[i] = pos_pool.data<int32_t>()[src_rows[i]];
  }
  PagedAttentionPlan p = plan;
  p.page_indices = Tensor::from_i32(compact, {nnz});
  paged_attention(q, k32, v32, pos, q_pos, p, out);
}

void CpuBackend::argmax(const Tensor& logits, Tensor& out) {
  expect_host_f32("argmax", "logits", logits);
  expect_dtype("argmax", "out", out, DType::I32);
  if (out.numel() != logits.rows())
    throw Error("argmax: out " + out.describe() + " must have one entry per row of " +
                logits.describe());
  const int64_t cols = logits.cols();
  parallel_rows(logits.rows(), cols, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = logits.data<float>() + r * cols;
      int64_t best = 0;
      for (int64_t c = 1; c < cols; ++c)
        if (row[c] > row[best]) best = c;
      out.data<int32_t>()[r] = static_cast<int32_t>(best);
    }
  });
}

}  // namespace redknot
