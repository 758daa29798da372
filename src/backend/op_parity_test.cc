// Checks every registered backend against the reference backend, op by op, on fresh random
// inputs over odd shapes, GQA ratios, windows/sinks and all weight dtypes. Outputs are
// poisoned with NaN first so that unwritten elements fail. Failures name backend, op and shape.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/builtin.h"
#include "backend/cpu/cpu_backend.h"
#include "core/dtype.h"
#include "core/error.h"

namespace redknot {
namespace {

// Round-trips values through `dtype` so both backends see bit-identical inputs.
std::vector<float> round_through(DType dtype, std::vector<float> v) {
  if (dtype == DType::F32) return v;
  std::vector<uint16_t> tmp(v.size());
  convert_from_f32(v.data(), dtype, tmp.data(), static_cast<int64_t>(v.size()));
  convert_to_f32(dtype, tmp.data(), v.data(), static_cast<int64_t>(v.size()));
  return v;
}

// GGUF-style Q8_0: per 32 values an f16 scale amax/127 and rounded int8 quants.
Tensor quantize_q8_0(const std::vector<float>& v, std::vector<int64_t> shape) {
  Tensor t = Tensor::host(DType::Q8_0, std::move(shape));
  auto* out = t.data<uint8_t>();
  for (size_t b = 0; b < v.size() / kQ8Block; ++b, out += kQ8BlockBytes) {
    float amax = 0.0f;
    for (int i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(v[b * kQ8Block + i]));
    const float d = amax / 127.0f;
    const uint16_t d16 = f32_to_f16(d);
    std::memcpy(out, &d16, 2);
    for (int i = 0; i < kQ8Block; ++i) {
      const float q = d > 0.0f ? std::nearbyint(v[b * kQ8Block + i] / d) : 0.0f;
      out[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f)));
    }
  }
  return t;
}

// A host tensor of `dtype` holding `v` (converted or quantised).
Tensor host_tensor(DType dtype, const std::vector<float>& v, std::vector<int64_t> shape) {
  if (dtype == DType::Q8_0) return quantize_q8_0(v, std::move(shape));
  Tensor t = Tensor::host(dtype, std::move(shape));
  convert_from_f32(v.data(), dtype, t.raw(), t.numel());
  return t;
}

double rel_err(const Tensor& out, const Tensor& ref) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double o = out.data<float>()[i], r = ref.data<float>()[i];
    if (!std::isfinite(o)) return std::numeric_limits<double>::infinity();
    num += (o - r) * (o - r);
    den += r * r;
  }
  return den == 0.0 ? std::sqrt(num) : std::sqrt(num / den);
}

class OpParity {
 public:
  OpParity(Backend& ref, Backend& dut) : ref_(ref), dut_(dut), rng_(1234) {}

  std::vector<float> random(int64_t n, float lo = -1.0f, float hi = 1.0f) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng_);
    return v;
  }
  std::vector<int32_t> random_ints(int64_t n, int32_t lo, int32_t hi) {
    std::uniform_int_distribution<int32_t> dist(lo, hi);
    std::vector<int32_t> v(n);
    for (auto& x : v) x = dist(rng_);
    return v;
  }

  // An activation tensor on `b` in dtype `dtype` holding `v` (already representable).
  Tensor put(Backend& b, DType dtype, const std::vector<float>& v, std::vector<int64_t> shape) {
    Tensor host = host_tensor(dtype, v, shape);
    Tensor t = b.alloc(dtype, std::move(shape));
    b.copy_from_host(t, host);
    return t;
  }
  Tensor put_ints(Backend& b, const std::vector<int32_t>& v) {
    Tensor t = b.alloc(DType::I32, {static_cast<int64_t>(v.size())});
    b.copy_from_host(t, Tensor::from_i32(v, {static_cast<int64_t>(v.size())}));
    return t;
  }
  // Pair of activation inputs: same values on both backends, rounded to the DUT's dtype.
  std::pair<Tensor, Tensor> act_pair(const std::vector<float>& v, std::vector<int64_t> shape) {
    std::vector<float> r = round_through(dut_.act_dtype(), v);
    return {put(ref_, DType::F32, r, shape), put(dut_, dut_.act_dtype(), r, shape)};
  }
  // Output tensor of `b` filled with NaN.
  Tensor poisoned(Backend& b, DType dtype, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return put(b, dtype, std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()), shape);
  }

  double tolerance(const std::string& op) const {
    if (dut_.act_dtype() != DType::F32) return 1e-2;
    return op == "matmul" ? 1e-4 : 1e-5;
  }

  void expect_close(const std::string& op, const std::string& shape, Tensor& out, Tensor& ref) {
    dut_.synchronize();
    Tensor o = dut_.to_host_f32(out), r = ref_.to_host_f32(ref);
    ASSERT_EQ(o.numel(), r.numel()) << dut_.name() << " " << op << " " << shape;
    const double err = rel_err(o, r);
    max_err_[op] = std::max(max_err_[op], err);
    EXPECT_LE(err, tolerance(op)) << "backend " << dut_.name() << " op " << op << " " << shape
                                  << ": rel err " << err;
  }

  void print_summary() const {
    for (const auto& [op, err] : max_err_)
      std::printf("[ parity ] %-5s %-13s max rel err %.3g (tol %.0e)\n", dut_.name().c_str(),
                  op.c_str(), err, tolerance(op));
  }

  Backend& ref_;
  Backend& dut_;
  std::mt19937 rng_;
  std::map<std::string, double> max_err_;
};

const DType kWeightDtypes[] = {DType::F32, DType::BF16, DType::F16, DType::Q8_0};

std::string str(const std::vector<int64_t>& s) { return shape_str(s); }

class OpParityTest : public ::testing::Test {
 protected:
  void SetUp() override { register_builtin_backends(); }
};

TEST_F(OpParityTest, EveryBackendMatchesReference) {
  auto ref = create_backend("reference");
  int tested = 0;
  for (const std::string& name : backend_names()) {
    if (name == "reference") continue;
    ++tested;
    auto dut = create_backend(name);
    std::printf("[ parity ] backend %s (act %s)\n", name.c_str(), dtype_name(dut->act_dtype()));
    OpParity p(*ref, *dut);
    const DType act = dut->act_dtype();

    // ---- embedding ----
    for (DType wt : kWeightDtypes) {
      const int64_t vocab = 50, hidden = wt == DType::Q8_0 ? 96 : 173;
      Tensor table = host_tensor(wt, p.random(vocab * hidden), {vocab, hidden});
      Tensor t_ref = ref->upload_weight(table), t_dut = dut->upload_weight(table);
      std::vector<int32_t> ids = {0, 49, 7, 7, 13};
      Tensor out_ref = ref->alloc(DType::F32, {5, hidden});
      Tensor out_dut = p.poisoned(*dut, act, {5, hidden});
      ref->embedding(t_ref, p.put_ints(*ref, ids), out_ref);
      dut->embedding(t_dut, p.put_ints(*dut, ids), out_dut);
      p.expect_close("embedding", std::string(dtype_name(wt)) + str({vocab, hidden}), out_dut,
                     out_ref);
    }

    // ---- matmul: decode and prefill shapes, odd K/N, all weight dtypes, with/without bias ----
    struct MatmulShape {
      int64_t m, k, n;
    };
    const MatmulShape mm_shapes[] = {{1, 173, 1},   {1, 173, 37},  {2, 64, 19},   {3, 300, 41},
                                     {4, 256, 128}, {37, 173, 65}, {1, 2048, 96}, {128, 512, 300},
                                     {5, 33, 7},    {33, 1000, 77}};
    int variant = 0;
    for (const auto& s : mm_shapes) {
      for (DType wt : kWeightDtypes) {
        const int64_t k = wt == DType::Q8_0 ? (s.k + 31) / 32 * 32 : s.k;
        const bool with_bias = (variant++ % 2) == 1;
        Tensor w = host_tensor(wt, p.random(s.n * k), {s.n, k});
        Tensor w_ref = ref->upload_weight(w), w_dut = dut->upload_weight(w);
        Tensor b_ref, b_dut;
        if (with_bias) {
          Tensor b = Tensor::from_f32(p.random(s.n), {s.n});
          b_ref = ref->upload_weight(b);
          b_dut = dut->upload_weight(b);
        }
        auto [x_ref, x_dut] = p.act_pair(p.random(s.m * k), {s.m, k});
        Tensor out_ref = ref->alloc(DType::F32, {s.m, s.n});
        Tensor out_dut = p.poisoned(*dut, act, {s.m, s.n});
        ref->matmul(x_ref, w_ref, b_ref, out_ref);
        dut->matmul(x_dut, w_dut, b_dut, out_dut);
        const std::string desc = std::string(dtype_name(wt)) + " M=" + std::to_string(s.m) +
                                 " K=" + std::to_string(k) + " N=" + std::to_string(s.n) +
                                 (with_bias ? " +bias" : "");
        p.expect_close("matmul", desc, out_dut, out_ref);
        if (act != DType::F32) {  // device backends may also write f32 logits
          Tensor out32 = p.poisoned(*dut, DType::F32, {s.m, s.n});
          dut->matmul(x_dut, w_dut, b_dut, out32);
          p.expect_close("matmul", desc + " out=f32", out32, out_ref);
        }
      }
    }

    // ---- rmsnorm (also in place) ----
    for (auto [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 64}, {37, 173}, {5, 4096}, {3, 16}}) {
      Tensor w = Tensor::from_f32(p.random(cols, 0.5f, 1.5f), {cols});
      Tensor w_ref = ref->upload_weight(w), w_dut = dut->upload_weight(w);
      auto [x_ref, x_dut] = p.act_pair(p.random(rows * cols, -3.0f, 3.0f), {rows, cols});
      Tensor out_ref = ref->alloc(DType::F32, {rows, cols});
      Tensor out_dut = p.poisoned(*dut, act, {rows, cols});
      ref->rmsnorm(x_ref, w_ref, 1e-6f, out_ref);
      dut->rmsnorm(x_dut, w_dut, 1e-6f, out_dut);
      p.expect_close("rmsnorm", str({rows, cols}), out_dut, out_ref);
      ref->rmsnorm(x_ref, w_ref, 1e-5f, x_ref);
      dut->rmsnorm(x_dut, w_dut, 1e-5f, x_dut);
      p.expect_close("rmsnorm", str({rows, cols}) + " in-place", x_dut, x_ref);
    }

    // ---- add, swiglu ----
    for (auto [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 4096}, {37, 173}, {64, 1100}}) {
      auto [x_ref, x_dut] = p.act_pair(p.random(rows * cols), {rows, cols});
      auto [y_ref, y_dut] = p.act_pair(p.random(rows * cols), {rows, cols});
      ref->add(x_ref, y_ref);
      dut->add(x_dut, y_dut);
      p.expect_close("add", str({rows, cols}), x_dut, x_ref);

      auto [g_ref, g_dut] = p.act_pair(p.random(rows * cols, -6.0f, 6.0f), {rows, cols});
      Tensor out_ref = ref->alloc(DType::F32, {rows, cols});
      Tensor out_dut = p.poisoned(*dut, act, {rows, cols});
      ref->swiglu(g_ref, y_ref, out_ref);
      dut->swiglu(g_dut, y_dut, out_dut);
      p.expect_close("swiglu", str({rows, cols}), out_dut, out_ref);
    }

    // ---- rope: head dims 16..128, large and negative (relocation) positions, scaling ----
    struct RopeCase {
      int64_t t, h, d;
      float theta, scaling;
    };
    for (const RopeCase& c :
         {RopeCase{1, 4, 16, 10000.0f, 1.0f}, RopeCase{7, 3, 32, 1e6f, 1.0f},
          RopeCase{5, 2, 64, 10000.0f, 1.25f}, RopeCase{9, 8, 128, 500000.0f, 1.0f}}) {
      std::vector<float> freq(c.d / 2);
      for (int64_t i = 0; i < c.d / 2; ++i)
        freq[i] = 1.0f / std::pow(c.theta, static_cast<float>(2 * i) / c.d);
      std::vector<int32_t> pos = p.random_ints(c.t, -300, 32000);
      pos[0] = 0;
      auto [x_ref, x_dut] = p.act_pair(p.random(c.t * c.h * c.d), {c.t, c.h, c.d});
      Tensor f_ref = p.put(*ref, DType::F32, freq, {c.d / 2});
      Tensor f_dut = p.put(*dut, DType::F32, freq, {c.d / 2});
      ref->rope(x_ref, p.put_ints(*ref, pos), f_ref, c.scaling);
      dut->rope(x_dut, p.put_ints(*dut, pos), f_dut, c.scaling);
      p.expect_close("rope", str({c.t, c.h, c.d}), x_dut, x_ref);
    }

    // ---- attention ----
    struct AttnCase {
      const char* label;
      int64_t tq, tk, hq, hkv, d;
      int32_t window, sink, q_start, k_start;
      int64_t extra_rows;  // cache rows beyond Tk per head (kv_head_stride > Tk*D)
      bool shuffle_keys;
      float q_gain;
    };
    const AttnCase attn_cases[] = {
        {"decode", 1, 37, 4, 4, 16, 0, 0, 36, 0, 0, false, 1.0f},
        {"prefill gqa4", 19, 19, 8, 2, 64, 0, 0, 5, 5, 0, false, 1.0f},
        {"chunk window+sink", 7, 40, 4, 2, 32, 10, 4, 133, 100, 13, false, 2.0f},
        {"window d128", 3, 300, 4, 2, 128, 64, 0, 297, 0, 5, false, 1.0f},
        {"no visible key", 2, 6, 2, 1, 16, 0, 0, 0, 5, 0, false, 1.0f},
        {"long decode", 1, 4096, 8, 2, 128, 0, 0, 4095, 0, 0, false, 4.0f},
        {"long window sink", 2, 8192, 4, 1, 64, 512, 4, 8190, 0, 7, false, 1.0f},
        {"unsorted keys", 5, 50, 4, 2, 32, 20, 2, 45, 0, 0, true, 1.0f},
        {"prefill long", 64, 600, 4, 4, 64, 0, 0, 536, 0, 0, false, 1.0f},
    };
    for (const AttnCase& c : attn_cases) {
      const int64_t rows = c.tk + c.extra_rows, stride = rows * c.d;
      std::vector<int32_t> qpos(c.tq), kpos(c.tk);
      for (int64_t i = 0; i < c.tq; ++i) qpos[i] = c.q_start + static_cast<int32_t>(i);
      for (int64_t j = 0; j < c.tk; ++j) kpos[j] = c.k_start + static_cast<int32_t>(j);
      if (c.shuffle_keys) std::shuffle(kpos.begin(), kpos.end(), p.rng_);
      std::vector<float> qv = p.random(c.tq * c.hq * c.d);
      for (auto& x : qv) x *= c.q_gain;
      auto [q_ref, q_dut] = p.act_pair(qv, {c.tq, c.hq, c.d});
      auto [kc_ref, kc_dut] = p.act_pair(p.random(c.hkv * stride), {c.hkv, rows, c.d});
      auto [vc_ref, vc_dut] = p.act_pair(p.random(c.hkv * stride), {c.hkv, rows, c.d});
      auto head_view = [&](const Tensor& cache) {
        return Tensor::view(cache.raw(), cache.dtype(), {c.hkv, c.tk, c.d}, cache.holder(),
                            cache.device());
      };
      AttentionMask mask;
      mask.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
      mask.window = c.window;
      mask.sink = c.sink;
      Tensor out_ref = ref->alloc(DType::F32, {c.tq, c.hq, c.d});
      Tensor out_dut = p.poisoned(*dut, act, {c.tq, c.hq, c.d});
      ref->attention(q_ref, head_view(kc_ref), head_view(vc_ref), stride, p.put_ints(*ref, qpos),
                     p.put_ints(*ref, kpos), mask, out_ref);
      dut->attention(q_dut, head_view(kc_dut), head_view(vc_dut), stride, p.put_ints(*dut, qpos),
                     p.put_ints(*dut, kpos), mask, out_dut);
      const std::string desc = std::string(c.label) + " Tq=" + std::to_string(c.tq) +
                               " Tk=" + std::to_string(c.tk) + " Hq=" + std::to_string(c.hq) +
                               " Hkv=" + std::to_string(c.hkv) + " D=" + std::to_string(c.d);
      if (std::string(c.label) == "no visible key") {
        Tensor o = dut->to_host_f32(out_dut);
        for (int64_t i = 0; i < o.numel(); ++i)
          ASSERT_EQ(o.data<float>()[i], 0.0f) << name << " attention " << desc << " at " << i;
      } else {
        p.expect_close("attention", desc, out_dut, out_ref);
      }
    }

    // ---- argmax: exact, on f32 logits (and act-dtype logits on device backends) ----
    for (auto [rows, vocab] : std::vector<std::pair<int64_t, int64_t>>{{1, 32001}, {3, 1000}}) {
      std::vector<float> logits = p.random(rows * vocab);
      std::vector<int32_t> expected(rows);
      for (int64_t r = 0; r < rows; ++r) {
        expected[r] = p.random_ints(1, 0, static_cast<int32_t>(vocab - 1))[0];
        logits[r * vocab + expected[r]] = 5.0f;
      }
      for (DType ldt : {DType::F32, act}) {
        Tensor l_dut = p.put(*dut, ldt, round_through(ldt, logits), {rows, vocab});
        Tensor out = dut->alloc(DType::I32, {rows});
        dut->copy_from_host(out, Tensor::from_i32(std::vector<int32_t>(rows, -1), {rows}));
        dut->argmax(l_dut, out);
        dut->synchronize();
        Tensor host = Tensor::host(DType::I32, {rows});
        Tensor got = dut->to_host_f32(out);
        for (int64_t r = 0; r < rows; ++r)
          EXPECT_EQ(static_cast<int32_t>(got.data<float>()[r]), expected[r])
              << "backend " << name << " op argmax " << dtype_name(ldt) << " row " << r << " of "
              << str({rows, vocab});
      }
    }

    // ---- data movement: copy, scatter_rows, gather_rows (exact) ----
    {
      const int64_t rows = 9, cols = 40;
      auto [src_ref, src_dut] = p.act_pair(p.random(5 * cols), {5, cols});
      auto [dst_ref, dst_dut] = p.act_pair(p.random(rows * cols), {rows, cols});
      std::vector<int32_t> slots = {8, 0, 3, 4, 6};
      ref->scatter_rows(src_ref, p.put_ints(*ref, slots), dst_ref);
      dut->scatter_rows(src_dut, p.put_ints(*dut, slots), dst_dut);
      p.expect_close("scatter_rows", str({rows, cols}), dst_dut, dst_ref);
      // Row indices may also come from the host.
      Tensor host_slots = Tensor::from_i32({1, 2, 5, 7, 6}, {5});
      ref->scatter_rows(src_ref, host_slots, dst_ref);
      dut->scatter_rows(src_dut, host_slots, dst_dut);
      p.expect_close("scatter_rows", str({rows, cols}) + " host rows", dst_dut, dst_ref);

      std::vector<int32_t> picks = {2, 2, 8, 0};
      Tensor g_ref = ref->alloc(DType::F32, {4, cols});
      Tensor g_dut = p.poisoned(*dut, act, {4, cols});
      ref->gather_rows(dst_ref, p.put_ints(*ref, picks), g_ref);
      dut->gather_rows(dst_dut, p.put_ints(*dut, picks), g_dut);
      p.expect_close("gather_rows", str({4, cols}), g_dut, g_ref);

      Tensor c_dut = p.poisoned(*dut, act, {rows, cols});
      dut->copy(dst_dut, c_dut);
      p.expect_close("copy", str({rows, cols}), c_dut, dst_ref);
    }
    p.print_summary();
  }
  EXPECT_GT(tested, 0) << "no backend besides the reference is registered";
}

// The CPU options: thread count is honoured and reported; f32 weights converted to bf16 still
// match the reference within bf16 tolerance on both the GEMV and the blocked-sgemm paths.
TEST_F(OpParityTest, CpuOptions) {
  auto ref = create_backend("reference");
  for (int threads : {1, 3}) {
    CpuBackendOptions options;
    options.n_threads = threads;
    options.f32_weights_to_bf16 = true;
    CpuBackend cpu(options);
    EXPECT_EQ(cpu.num_threads(), threads);
    OpParity p(*ref, cpu);
    for (int64_t m : {1, 3, 40}) {
      const int64_t k = 300, n = 70;
      Tensor w = Tensor::from_f32(p.random(n * k), {n, k});
      Tensor w_cpu = cpu.upload_weight(w);
      EXPECT_EQ(w_cpu.dtype(), DType::BF16);
      auto [x_ref, x_cpu] = p.act_pair(p.random(m * k), {m, k});
      Tensor out_ref = ref->alloc(DType::F32, {m, n});
      Tensor out_cpu = p.poisoned(cpu, DType::F32, {m, n});
      ref->matmul(x_ref, ref->upload_weight(w), Tensor(), out_ref);
      cpu.matmul(x_cpu, w_cpu, Tensor(), out_cpu);
      const double err = rel_err(out_cpu, out_ref);
      EXPECT_LE(err, 1e-2) << "cpu bf16-weights matmul M=" << m << " threads=" << threads;
    }
  }
  EXPECT_GE(CpuBackend().num_threads(), 1);
}

// Misuse is reported, not silently computed.
TEST_F(OpParityTest, ShapeMismatchThrows) {
  for (const std::string& name : backend_names()) {
    auto b = create_backend(name);
    Tensor x = b->alloc(b->act_dtype(), {2, 8});
    Tensor w = b->upload_weight(Tensor::host(DType::F32, {4, 7}));
    Tensor out = b->alloc(b->act_dtype(), {2, 4});
    EXPECT_THROW(b->matmul(x, w, Tensor(), out), Error) << name;
    Tensor y = b->alloc(b->act_dtype(), {2, 9});
    EXPECT_THROW(b->add(x, y), Error) << name;
  }
}

}  // namespace
}  // namespace redknot
