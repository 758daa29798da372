// Checks every registered backend against the reference backend, op by op, on fresh random
// inputs over odd shapes, GQA ratios, windows/sinks and all weight dtypes. Outputs are
// poisoned with NaN first so that unwritten elements fail. Failures name backend, op and shape.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
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
    return op == "matmul" || op == "matmul_fp8" ? 1e-4 : 1e-5;
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

// ---- SegPaged attention scenarios ----

// What a random paged batch looks like. Odd kv heads are local (window, sink) when `mixed`.
struct PagedSpec {
  const char* label;
  int32_t num_seqs;
  int64_t hq, hkv, d;
  int32_t page_size;
  int32_t window, sink;
  bool mixed;
  int32_t min_len, max_len;  // tokens held per sequence (before a local head drops pages)
  int32_t max_rows;          // query rows per sequence: 1 = decode; more = causal prefill
  bool mixed_rows;           // rows drawn from 1..max_rows per sequence (continuous batching)
  bool ragged_pages;         // some middle pages only partly used
  bool share_prefix;         // sequence 1's first page is sequence 0's page (same index)
};

// A batch laid out in a random page pool, as host vectors. Token (s, h, i) has its own K/V
// (token_k) so that dense attention can be run over the same keys.
struct PagedScenario {
  int64_t slots = 0;
  std::vector<float> k_pool, v_pool, q;  // [slots, D], [slots, D], [T, Hq, D]
  std::vector<int32_t> pos_pool, q_pos;  // [slots], [T]
  std::vector<int32_t> qo, kv_indptr, pages, lengths, window, sink;
  std::vector<std::vector<int32_t>> seq_pos;             // [s][i]: token positions
  std::vector<std::vector<std::vector<float>>> token_k;  // [s][h]: [n_s, D]
  std::vector<std::vector<std::vector<float>>> token_v;
};

PagedScenario make_paged_scenario(const PagedSpec& c, std::mt19937& rng) {
  auto uni = [&](int32_t lo, int32_t hi) {
    return std::uniform_int_distribution<int32_t>(lo, hi)(rng);
  };
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  const int64_t D = c.d;
  const int32_t ps = c.page_size;
  PagedScenario sc;
  for (int64_t h = 0; h < c.hkv; ++h) {
    const bool local = c.mixed && h % 2 == 1;
    sc.window.push_back(local ? c.window : 0);
    sc.sink.push_back(local ? c.sink : 0);
  }
  // Tokens: positions start anywhere and jump once (a shifted / partly removed history).
  std::vector<int32_t> rows(c.num_seqs);
  for (int32_t s = 0; s < c.num_seqs; ++s) {
    const int32_t n = uni(c.min_len, c.max_len), gap = uni(1, 90);
    std::vector<int32_t> pos(n);
    for (int32_t i = 0; i < n; ++i)
      pos[i] = i == 0 ? uni(0, 40) : pos[i - 1] + 1 + (i == n / 2 ? gap : 0);
    sc.token_k.emplace_back(c.hkv);
    sc.token_v.emplace_back(c.hkv);
    for (int64_t h = 0; h < c.hkv; ++h) {
      sc.token_k[s][h].resize(n * D);
      sc.token_v[s][h].resize(n * D);
      for (auto& x : sc.token_k[s][h]) x = val(rng);
      for (auto& x : sc.token_v[s][h]) x = val(rng);
    }
    if (c.share_prefix && s == 1) {  // the shared first page holds sequence 0's tokens
      const int32_t first = pos[0];
      for (int32_t i = 0; i < ps; ++i) pos[i] = sc.seq_pos[0][i];
      for (int32_t i = ps; i < n; ++i) pos[i] += sc.seq_pos[0][ps - 1] + 1 - first;
      for (int64_t h = 0; h < c.hkv; ++h)
        for (int64_t x = 0; x < ps * D; ++x) {
          sc.token_k[1][h][x] = sc.token_k[0][h][x];
          sc.token_v[1][h][x] = sc.token_v[0][h][x];
        }
    }
    sc.seq_pos.push_back(pos);
    rows[s] = std::min(n, c.mixed_rows ? uni(1, c.max_rows) : c.max_rows);
  }
  // Logical pages per (s, h): token ranges [begin, begin + len).
  struct LPage {
    int32_t begin, len, phys;
  };
  std::vector<std::vector<LPage>> tables(c.num_seqs * c.hkv);
  int32_t n_phys = 0;
  for (int32_t s = 0; s < c.num_seqs; ++s)
    for (int64_t h = 0; h < c.hkv; ++h) {
      const int32_t n = static_cast<int32_t>(sc.seq_pos[s].size());
      auto& t = tables[s * c.hkv + h];
      for (int32_t b = 0; b < n;) {
        int32_t len = std::min(ps, n - b);
        if (c.ragged_pages && b > 0 && b + len < n && uni(0, 3) == 0) len = uni(1, ps - 1);
        const bool shared = c.share_prefix && s == 1 && b == 0;
        t.push_back({b, len, shared ? tables[h][0].phys : n_phys++});
        b += len;
      }
    }
  // Physical placement: a random permutation of a pool with spare pages of garbage.
  const int32_t pool_pages = n_phys + 3;
  std::vector<int32_t> perm(pool_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  sc.slots = int64_t{pool_pages} * ps;
  sc.k_pool.resize(sc.slots * D);
  sc.v_pool.resize(sc.slots * D);
  for (auto& x : sc.k_pool) x = val(rng);
  for (auto& x : sc.v_pool) x = val(rng);
  sc.pos_pool.resize(sc.slots);
  for (auto& p : sc.pos_pool) p = uni(-1000, 100000);
  sc.qo.push_back(0);
  sc.kv_indptr.push_back(0);
  for (int32_t s = 0; s < c.num_seqs; ++s) {
    const auto& pos = sc.seq_pos[s];
    const int32_t n = static_cast<int32_t>(pos.size());
    for (int32_t i = n - rows[s]; i < n; ++i) sc.q_pos.push_back(pos[i]);
    sc.qo.push_back(sc.qo.back() + rows[s]);
    const int32_t q_min = pos[n - rows[s]];
    for (int64_t h = 0; h < c.hkv; ++h) {
      for (LPage& lp : tables[s * c.hkv + h]) {
        lp.phys = perm[lp.phys];
        for (int32_t j = 0; j < lp.len; ++j) {
          const int64_t row = int64_t{lp.phys} * ps + j;
          sc.pos_pool[row] = pos[lp.begin + j];
          std::copy_n(&sc.token_k[s][h][(lp.begin + j) * D], D, &sc.k_pool[row * D]);
          std::copy_n(&sc.token_v[s][h][(lp.begin + j) * D], D, &sc.v_pool[row * D]);
        }
        // A local head no longer holds pages no query can see (what the store's trim does).
        const int32_t first = pos[lp.begin], last = pos[lp.begin + lp.len - 1];
        const bool dead = sc.window[h] > 0 && first >= sc.sink[h] &&
                          int64_t{last} < int64_t{q_min} - sc.window[h] + 1;
        if (dead) continue;
        sc.pages.push_back(lp.phys);
        sc.lengths.push_back(lp.len);
      }
      sc.kv_indptr.push_back(static_cast<int32_t>(sc.pages.size()));
    }
  }
  sc.q.resize(sc.qo.back() * c.hq * D);
  for (auto& x : sc.q) x = 1.5f * val(rng);
  return sc;
}

// The scenario's plan and tensors on one backend (activations in `act`).
struct PagedInputs {
  PagedAttentionPlan plan;
  Tensor q, k_pool, v_pool, pos_pool, q_pos;
};

PagedInputs put_paged(OpParity& p, Backend& b, DType act, const PagedSpec& c,
                      const PagedScenario& sc) {
  const int64_t T = sc.qo.back();
  PagedInputs in;
  in.plan.num_seqs = c.num_seqs;
  in.plan.num_kv_heads = static_cast<int32_t>(c.hkv);
  in.plan.page_size = c.page_size;
  in.plan.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  in.plan.qo_indptr = p.put_ints(b, sc.qo);
  in.plan.kv_indptr = p.put_ints(b, sc.kv_indptr);
  in.plan.page_indices = p.put_ints(b, sc.pages);
  in.plan.page_lengths = p.put_ints(b, sc.lengths);
  in.plan.head_window = p.put_ints(b, sc.window);
  in.plan.head_sink = p.put_ints(b, sc.sink);
  in.q = p.put(b, act, round_through(act, sc.q), {T, c.hq, c.d});
  in.k_pool = p.put(b, act, round_through(act, sc.k_pool), {sc.slots, c.d});
  in.v_pool = p.put(b, act, round_through(act, sc.v_pool), {sc.slots, c.d});
  in.pos_pool = p.put_ints(b, sc.pos_pool);
  in.q_pos = p.put_ints(b, sc.q_pos);
  return in;
}

const PagedSpec kPagedSpecs[] = {
    // label, seqs, Hq, Hkv, D, page, W, sink, mixed, len range, rows, mixed rows, ragged, share
    {"decode gqa1 d16", 5, 4, 4, 16, 16, 40, 4, true, 20, 300, 1, false, false, true},
    {"decode gqa4 d128", 6, 16, 4, 128, 64, 128, 4, true, 70, 2000, 1, false, false, true},
    {"decode gqa2 d64 long", 3, 8, 4, 64, 64, 512, 4, true, 3000, 5000, 1, false, true, true},
    {"prefill gqa2 d64", 3, 4, 2, 64, 16, 50, 3, true, 40, 400, 37, false, true, true},
    {"prefill gqa4 d128 global", 2, 8, 2, 128, 64, 0, 0, false, 100, 700, 100, false, false, true},
    {"prefill whole seq gqa1 d16", 2, 2, 2, 16, 8, 7, 2, true, 9, 60, 60, false, true, true},
    {"mixed batch gqa4 d64", 7, 16, 4, 64, 32, 96, 4, true, 40, 900, 24, true, true, true},
    {"decode gqa2 d128 sink0", 4, 8, 4, 128, 64, 200, 0, true, 100, 1500, 1, false, false, false},
    // Several 128-row x 128-key tiles of the Hopper prefill kernel: local heads whose pages of 16
    // are skipped, ragged pages, and rows that start mid-sequence.
    {"prefill gqa4 d128 local", 2, 8, 2, 128, 16, 100, 4, true, 200, 700, 150, false, true, true},
    // head_dim 32 (the shape of models/redknot-rag-8k: 8 q / 2 kv heads): prefill on the mma.sync
    // kernel (no wgmma instance) over several 64-row tiles of three sequences, split over pages;
    // decode with ~5K-token histories, so the global heads' page lists split (split-KV merge).
    {"prefill gqa4 d32 local", 3, 8, 2, 32, 16, 100, 4, true, 200, 700, 150, false, true, true},
    {"decode gqa4 d32 long", 4, 8, 2, 32, 64, 256, 4, true, 3000, 6000, 1, false, true, true},
    // The shape of the second test model (8 q / 4 kv heads, d64) with windows of 512-1024 over
    // 2-4K histories: local heads whose windows span many 64-token pages and several key tiles.
    {"prefill gqa2 d64 window 1024", 2, 8, 4, 64, 64, 1024, 4, true, 2000, 4000, 512, false, true,
     true},
    {"prefill gqa2 d64 window 512", 2, 8, 4, 64, 64, 512, 4, true, 2000, 4000, 512, false, true,
     true},
    {"decode gqa2 d64 window 1024", 4, 8, 4, 64, 64, 1024, 4, true, 2000, 4000, 1, false, true,
     true},
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
    // M <= 8 with K % 8 == 0 takes CUDA's skinny kernels (whole and partial unrolled K steps);
    // odd K, M = 9 and prefill shapes the tiled GEMM.
    const MatmulShape mm_shapes[] = {{1, 173, 1},   {1, 173, 37},   {2, 64, 19},   {3, 300, 41},
                                     {4, 256, 128}, {37, 173, 65},  {1, 2048, 96}, {128, 512, 300},
                                     {5, 33, 7},    {33, 1000, 77}, {1, 1000, 77}, {8, 4104, 33},
                                     {7, 520, 9},   {9, 256, 64}};
    int variant = 0;
    for (const auto& s : mm_shapes) {
      for (DType wt : kWeightDtypes) {
        const int64_t k = wt == DType::Q8_0 ? (s.k + 31) / 32 * 32 : s.k;
        const bool with_bias = (variant++ % 2) == 1;
        Tensor w = host_tensor(wt, p.random(s.n * k), {s.n, k});
        Tensor w_ref = ref->upload_weight(w), w_dut = dut->upload_weight(w);
        if (act != DType::F32) {
          // The device keeps weights in its act dtype: the oracle gets the same rounded values,
          // so what is checked is the GEMM, not bf16's 3 significant digits.
          std::vector<float> wv(w_ref.data<float>(), w_ref.data<float>() + w_ref.numel());
          w_ref = ref->upload_weight(Tensor::from_f32(round_through(act, wv), {s.n, k}));
        }
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

    // ---- add_rmsnorm (residual add + the next norm, fused on device backends) ----
    for (auto [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 64}, {37, 173}, {5, 4096}}) {
      Tensor w = Tensor::from_f32(p.random(cols, 0.5f, 1.5f), {cols});
      Tensor w_ref = ref->upload_weight(w), w_dut = dut->upload_weight(w);
      auto [x_ref, x_dut] = p.act_pair(p.random(rows * cols, -3.0f, 3.0f), {rows, cols});
      auto [y_ref, y_dut] = p.act_pair(p.random(rows * cols, -3.0f, 3.0f), {rows, cols});
      Tensor out_ref = ref->alloc(DType::F32, {rows, cols});
      Tensor out_dut = p.poisoned(*dut, act, {rows, cols});
      ref->add_rmsnorm(x_ref, y_ref, w_ref, 1e-5f, out_ref);
      dut->add_rmsnorm(x_dut, y_dut, w_dut, 1e-5f, out_dut);
      p.expect_close("add_rmsnorm", str({rows, cols}) + " sum", x_dut, x_ref);
      p.expect_close("add_rmsnorm", str({rows, cols}) + " norm", out_dut, out_ref);
      EXPECT_THROW(dut->add_rmsnorm(x_dut, y_dut, w_dut, 1e-5f, x_dut), Error);
    }

    // ---- row_l2norm (Sparse FFN importance) ----
    for (auto [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 64}, {37, 173}, {5, 4096}}) {
      auto [x_ref, x_dut] = p.act_pair(p.random(rows * cols, -3.0f, 3.0f), {rows, cols});
      Tensor out_ref = ref->alloc(DType::F32, {rows});
      Tensor out_dut = p.poisoned(*dut, DType::F32, {rows});
      ref->row_l2norm(x_ref, out_ref);
      dut->row_l2norm(x_dut, out_dut);
      p.expect_close("row_l2norm", str({rows, cols}), out_dut, out_ref);
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

// An FP8 weight as checkpoints store it: e4m3 codes [N, K] and f32 scales, per output channel
// ([N], absmax / 448 per row) or per 128x128 block ([ceil(N/128), ceil(K/128)]).
struct HostFp8Weight {
  Tensor codes, scale;
};
HostFp8Weight quantize_weight_fp8(const std::vector<float>& w, int64_t n, int64_t k, bool blocked) {
  HostFp8Weight q{Tensor::host(DType::F8_E4M3, {n, k}), Tensor()};
  auto* codes = q.codes.data<uint8_t>();
  if (!blocked) {
    q.scale = Tensor::host(DType::F32, {n});
    for (int64_t r = 0; r < n; ++r)
      q.scale.data<float>()[r] = fp8_quantize_row(w.data() + r * k, k, codes + r * k);
    return q;
  }
  const int64_t nb = (n + kFp8Block - 1) / kFp8Block, kb = (k + kFp8Block - 1) / kFp8Block;
  q.scale = Tensor::host(DType::F32, {nb, kb});
  for (int64_t bn = 0; bn < nb; ++bn)
    for (int64_t bk = 0; bk < kb; ++bk) {
      const int64_t r0 = bn * kFp8Block, r1 = std::min(n, r0 + kFp8Block);
      const int64_t c0 = bk * kFp8Block, c1 = std::min(k, c0 + kFp8Block);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * k + c]));
      const float s = amax / kFp8Max;
      q.scale.data<float>()[bn * kb + bk] = s;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c)
          codes[r * k + c] = s > 0.0f ? f32_to_fp8_e4m3(w[r * k + c] / s) : 0;
    }
  return q;
}

// The FP8 ops of every backend against the oracle: per-token quantization (codes and scales
// equal, not just close: every backend divides in f32 and rounds to nearest even), dequantization,
// and the FP8 GEMM with per-channel and 128x128-block weight scales over decode and prefill
// shapes, partial blocks, zero rows and bias.
TEST_F(OpParityTest, Fp8OpsMatchReference) {
  auto ref = create_backend("reference");
  int tested = 0;
  for (const std::string& name : backend_names()) {
    if (name == "reference") continue;
    ++tested;
    auto dut = create_backend(name);
    std::printf("[ parity ] backend %s FP8 ops (act %s)\n", name.c_str(),
                dtype_name(dut->act_dtype()));
    OpParity p(*ref, *dut);
    const DType act = dut->act_dtype();

    // ---- quantize_fp8_rows / dequantize_fp8_rows ----
    for (auto [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 16}, {37, 173}, {5, 4096}, {64, 128}}) {
      std::vector<float> v = p.random(rows * cols, -20.0f, 20.0f);
      for (int64_t c = 0; c < cols; ++c) v[c] = 0.0f;  // an all-zero row: scale 0, codes 0
      auto [x_ref, x_dut] = p.act_pair(v, {rows, cols});
      Tensor q_ref = ref->alloc(DType::F8_E4M3, {rows, cols});
      Tensor q_dut = dut->alloc(DType::F8_E4M3, {rows, cols});
      Tensor s_ref = ref->alloc(DType::F32, {rows});
      Tensor s_dut = p.poisoned(*dut, DType::F32, {rows});
      ref->quantize_fp8_rows(x_ref, q_ref, s_ref);
      dut->quantize_fp8_rows(x_dut, q_dut, s_dut);
      dut->synchronize();
      Tensor qr = ref->to_host_f32(q_ref), qd = dut->to_host_f32(q_dut);
      Tensor sr = ref->to_host_f32(s_ref), sd = dut->to_host_f32(s_dut);
      int64_t code_diff = 0, scale_diff = 0;
      for (int64_t i = 0; i < qr.numel(); ++i)
        code_diff += std::memcmp(qr.data<float>() + i, qd.data<float>() + i, 4) != 0;
      for (int64_t r = 0; r < rows; ++r) scale_diff += sr.data<float>()[r] != sd.data<float>()[r];
      EXPECT_EQ(code_diff, 0) << name << " quantize_fp8_rows " << str({rows, cols});
      EXPECT_EQ(scale_diff, 0) << name << " quantize_fp8_rows scales " << str({rows, cols});
      EXPECT_EQ(sr.data<float>()[0], 0.0f);
      p.expect_close("quantize_fp8_rows", str({rows, cols}), s_dut, s_ref);

      Tensor out_ref = ref->alloc(DType::F32, {rows, cols});
      Tensor out_dut = p.poisoned(*dut, act, {rows, cols});
      ref->dequantize_fp8_rows(q_ref, s_ref, out_ref);
      dut->dequantize_fp8_rows(q_dut, s_dut, out_dut);
      p.expect_close("dequantize_fp8_rows", str({rows, cols}), out_dut, out_ref);
      // Round trip: within half an e4m3 step (2^-4 relative) of the input.
      EXPECT_LE(rel_err(out_ref, x_ref), 0.04) << "quantize/dequantize " << str({rows, cols});
    }

    // ---- matmul_fp8: per-channel and 128x128 blocks, partial blocks, bias, zero rows ----
    struct MatmulShape {
      int64_t m, k, n;
    };
    // M <= 8 with K % 16 == 0 takes CUDA's skinny kernels (incl. partial 128-blocks in K and N).
    const MatmulShape mm_shapes[] = {{1, 128, 16},   {1, 173, 37},  {3, 300, 200},   {4, 256, 128},
                                     {37, 173, 260}, {1, 2048, 96}, {128, 512, 300}, {33, 352, 128},
                                     {5, 1040, 130}, {8, 4112, 24}, {2, 144, 257},   {9, 256, 64}};
    int variant = 0;
    for (const auto& s : mm_shapes) {
      for (bool blocked : {false, true}) {
        const bool with_bias = (variant++ % 2) == 1;
        HostFp8Weight w = quantize_weight_fp8(p.random(s.n * s.k), s.n, s.k, blocked);
        Tensor w_ref = ref->upload_weight(w.codes), w_dut = dut->upload_weight(w.codes);
        ASSERT_EQ(w_dut.dtype(), DType::F8_E4M3) << name << " keeps FP8 weights as codes";
        Tensor ws_ref = ref->alloc(DType::F32, w.scale.shape());
        Tensor ws_dut = dut->alloc(DType::F32, w.scale.shape());
        ref->copy_from_host(ws_ref, w.scale);
        dut->copy_from_host(ws_dut, w.scale);
        Tensor b_ref, b_dut;
        if (with_bias) {
          Tensor b = Tensor::from_f32(p.random(s.n), {s.n});
          b_ref = ref->upload_weight(b);
          b_dut = dut->upload_weight(b);
        }
        std::vector<float> xv = p.random(s.m * s.k, -4.0f, 4.0f);
        if (s.m > 2)
          for (int64_t k = 0; k < s.k; ++k) xv[s.k + k] = 0.0f;  // row 1: zero activations
        auto [x_ref, x_dut] = p.act_pair(xv, {s.m, s.k});
        Tensor out_ref = ref->alloc(DType::F32, {s.m, s.n});
        Tensor out_dut = p.poisoned(*dut, act, {s.m, s.n});
        ref->matmul_fp8(x_ref, w_ref, ws_ref, b_ref, out_ref);
        dut->matmul_fp8(x_dut, w_dut, ws_dut, b_dut, out_dut);
        const std::string desc = std::string(blocked ? "block128" : "per-channel") +
                                 " M=" + std::to_string(s.m) + " K=" + std::to_string(s.k) +
                                 " N=" + std::to_string(s.n) + (with_bias ? " +bias" : "");
        p.expect_close("matmul_fp8", desc, out_dut, out_ref);
        if (act != DType::F32) {  // logits-style f32 output
          Tensor out32 = p.poisoned(*dut, DType::F32, {s.m, s.n});
          dut->matmul_fp8(x_dut, w_dut, ws_dut, b_dut, out32);
          p.expect_close("matmul_fp8", desc + " out=f32", out32, out_ref);
        }
        // The oracle's FP8 GEMM is the f32 GEMM of the dequantized operands.
        {
          std::vector<float> wd(s.n * s.k), xd(s.m * s.k);
          const Tensor xr = ref->to_host_f32(x_ref);
          for (int64_t m = 0; m < s.m; ++m) {
            std::vector<uint8_t> c(s.k);
            const float sx = fp8_quantize_row(xr.data<float>() + m * s.k, s.k, c.data());
            for (int64_t k = 0; k < s.k; ++k) xd[m * s.k + k] = fp8_e4m3_to_f32(c[k]) * sx;
          }
          for (int64_t n = 0; n < s.n; ++n)
            for (int64_t k = 0; k < s.k; ++k)
              wd[n * s.k + k] =
                  fp8_e4m3_to_f32(w.codes.data<uint8_t>()[n * s.k + k]) *
                  (blocked ? w.scale.data<float>()[(n / kFp8Block) * w.scale.dim(1) + k / kFp8Block]
                           : w.scale.data<float>()[n]);
          Tensor dq_out = ref->alloc(DType::F32, {s.m, s.n});
          ref->matmul(Tensor::from_f32(xd, {s.m, s.k}), Tensor::from_f32(wd, {s.n, s.k}), b_ref,
                      dq_out);
          EXPECT_LE(rel_err(out_ref, dq_out), 1e-5) << "reference matmul_fp8 " << desc;
        }
      }
    }
    // Misuse: a non-FP8 weight, a scale of the wrong shape.
    {
      Tensor x = p.poisoned(*dut, act, {2, 256});
      Tensor out = p.poisoned(*dut, act, {2, 128});
      Tensor w8 = dut->alloc(DType::F8_E4M3, {128, 256});
      Tensor bad_scale = dut->alloc(DType::F32, {64});
      Tensor wf = dut->alloc(DType::F32, {128, 256}), sc = dut->alloc(DType::F32, {128});
      EXPECT_THROW(dut->matmul_fp8(x, w8, bad_scale, Tensor(), out), Error);
      EXPECT_THROW(dut->matmul_fp8(x, wf, sc, Tensor(), out), Error);
    }
    p.print_summary();
  }
  EXPECT_GT(tested, 0);
  // The CPU splits weight rows over threads in dequantized tiles: every split gives the same.
  for (int threads : {1, 3}) {
    CpuBackendOptions options;
    options.n_threads = threads;
    CpuBackend cpu(options);
    OpParity p(*ref, cpu);
    for (bool blocked : {false, true}) {
      HostFp8Weight w = quantize_weight_fp8(p.random(300 * 700), 300, 700, blocked);
      auto [x_ref, x_cpu] = p.act_pair(p.random(40 * 700), {40, 700});
      Tensor out_ref = ref->alloc(DType::F32, {40, 300});
      Tensor out_cpu = p.poisoned(cpu, DType::F32, {40, 300});
      ref->matmul_fp8(x_ref, w.codes, w.scale, Tensor(), out_ref);
      cpu.matmul_fp8(x_cpu, w.codes, w.scale, Tensor(), out_cpu);
      p.expect_close("matmul_fp8", "threads=" + std::to_string(threads), out_cpu, out_ref);
    }
  }
}

// FP8 KV rows of every backend against the oracle: packing (codes and scales equal), unpacking,
// and SegPaged attention over FP8 pools (the same packed bytes on both) in every paged scenario.
// The oracle's FP8 path itself equals its f32 path over the unpacked pools.
TEST_F(OpParityTest, Fp8KvMatchesReference) {
  auto ref = create_backend("reference");
  int tested = 0;
  for (const std::string& name : backend_names()) {
    if (name == "reference") continue;
    ++tested;
    auto dut = create_backend(name);
    OpParity p(*ref, *dut);
    const DType act = dut->act_dtype();
    for (auto [rows, cols] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 16}, {37, 128}, {300, 64}, {5, 32}}) {
      std::vector<float> v = p.random(rows * cols, -8.0f, 8.0f);
      for (int64_t c = 0; c < cols; ++c) v[(rows - 1) * cols + c] = 0.0f;  // zero row: scale 0
      auto [x_ref, x_dut] = p.act_pair(v, {rows, cols});
      const int64_t w = cols + kFp8KvScaleBytes;
      Tensor r_ref = ref->alloc(DType::F8_E4M3, {rows, w});
      Tensor r_dut = dut->alloc(DType::F8_E4M3, {rows, w});
      ref->pack_fp8_kv_rows(x_ref, r_ref);
      dut->pack_fp8_kv_rows(x_dut, r_dut);
      dut->synchronize();
      Tensor hr = ref->to_host_f32(r_ref), hd = dut->to_host_f32(r_dut);
      int64_t diff = 0;
      for (int64_t i = 0; i < hr.numel(); ++i)
        diff += std::memcmp(hr.data<float>() + i, hd.data<float>() + i, 4) != 0;
      EXPECT_EQ(diff, 0) << name << " pack_fp8_kv_rows " << str({rows, cols});
      float scale0;
      std::memcpy(&scale0, r_ref.data<uint8_t>() + cols, 4);
      float amax = 0.0f;
      for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(x_ref.data<float>()[c]));
      EXPECT_EQ(scale0, amax / kFp8Max) << "row 0 carries its own absmax / 448 scale";
      Tensor out_ref = ref->alloc(DType::F32, {rows, cols});
      Tensor out_dut = p.poisoned(*dut, act, {rows, cols});
      ref->unpack_fp8_kv_rows(r_ref, out_ref);
      dut->unpack_fp8_kv_rows(r_dut, out_dut);
      p.expect_close("unpack_fp8_kv_rows", str({rows, cols}), out_dut, out_ref);
      EXPECT_LE(rel_err(out_ref, x_ref), 0.04) << "pack/unpack round trip " << str({rows, cols});
    }
    for (const PagedSpec& c : kPagedSpecs) {
      const PagedScenario sc = make_paged_scenario(c, p.rng_);
      PagedInputs r = put_paged(p, *ref, DType::F32, c, sc);
      PagedInputs d = put_paged(p, *dut, act, c, sc);
      // One packing of the DUT-rounded values, the same bytes on both backends.
      Tensor pools[2];
      const std::vector<float>* src[2] = {&sc.k_pool, &sc.v_pool};
      for (int i = 0; i < 2; ++i) {
        pools[i] = Tensor::host(DType::F8_E4M3, {sc.slots, c.d + kFp8KvScaleBytes});
        ref->pack_fp8_kv_rows(Tensor::from_f32(round_through(act, *src[i]), {sc.slots, c.d}),
                              pools[i]);
      }
      auto upload = [&](Backend& b, PagedInputs& in) {
        in.k_pool = b.alloc(DType::F8_E4M3, pools[0].shape());
        in.v_pool = b.alloc(DType::F8_E4M3, pools[1].shape());
        b.copy_from_host(in.k_pool, pools[0]);
        b.copy_from_host(in.v_pool, pools[1]);
      };
      upload(*ref, r);
      upload(*dut, d);
      const int64_t T = sc.qo.back();
      Tensor out_ref = ref->alloc(DType::F32, {T, c.hq, c.d});
      Tensor out_dut = p.poisoned(*dut, act, {T, c.hq, c.d});
      ref->paged_attention(r.q, r.k_pool, r.v_pool, r.pos_pool, r.q_pos, r.plan, out_ref);
      dut->paged_attention(d.q, d.k_pool, d.v_pool, d.pos_pool, d.q_pos, d.plan, out_dut);
      p.expect_close("paged_attention_fp8", c.label, out_dut, out_ref);
      // The oracle over FP8 rows is the oracle over the rows unpacked to f32.
      Tensor k32 = ref->alloc(DType::F32, {sc.slots, c.d}),
             v32 = ref->alloc(DType::F32, {sc.slots, c.d});
      ref->unpack_fp8_kv_rows(r.k_pool, k32);
      ref->unpack_fp8_kv_rows(r.v_pool, v32);
      Tensor out_f32 = ref->alloc(DType::F32, {T, c.hq, c.d});
      ref->paged_attention(r.q, k32, v32, r.pos_pool, r.q_pos, r.plan, out_f32);
      EXPECT_LE(rel_err(out_ref, out_f32), 1e-6) << "oracle FP8 vs unpacked " << c.label;
    }
    p.print_summary();
  }
  EXPECT_GT(tested, 0);
}

// SegPaged attention of every backend against the oracle over random page pools: several
// sequences of different lengths, a page shared by two sequences, partly used pages, positions
// with an offset and a gap, GQA 1/2/4, head_dim 16/32/64/128, global and local heads, prefill,
// decode and mixed batches.
TEST_F(OpParityTest, PagedAttentionMatchesReference) {
  auto ref = create_backend("reference");
  int tested = 0;
  for (const std::string& name : backend_names()) {
    if (name == "reference") continue;
    ++tested;
    auto dut = create_backend(name);
    OpParity p(*ref, *dut);
    const DType act = dut->act_dtype();
    for (const PagedSpec& c : kPagedSpecs) {
      const PagedScenario sc = make_paged_scenario(c, p.rng_);
      PagedInputs r = put_paged(p, *ref, DType::F32, c, sc);
      PagedInputs d = put_paged(p, *dut, act, c, sc);
      const int64_t T = sc.qo.back();
      Tensor out_ref = ref->alloc(DType::F32, {T, c.hq, c.d});
      Tensor out_dut = p.poisoned(*dut, act, {T, c.hq, c.d});
      ref->paged_attention(r.q, r.k_pool, r.v_pool, r.pos_pool, r.q_pos, r.plan, out_ref);
      dut->paged_attention(d.q, d.k_pool, d.v_pool, d.pos_pool, d.q_pos, d.plan, out_dut);
      const std::string desc = std::string(c.label) + " T=" + std::to_string(T) +
                               " pages=" + std::to_string(sc.pages.size());
      p.expect_close("paged_attention", desc, out_dut, out_ref);
    }
    p.print_summary();
  }
  EXPECT_GT(tested, 0);
  // The CPU kernel splits long page lists by thread count; every split must merge the same.
  for (int threads : {1, 3, 8}) {
    CpuBackendOptions options;
    options.n_threads = threads;
    CpuBackend cpu(options);
    OpParity p(*ref, cpu);
    for (const PagedSpec& c : kPagedSpecs) {
      const PagedScenario sc = make_paged_scenario(c, p.rng_);
      PagedInputs r = put_paged(p, *ref, DType::F32, c, sc);
      PagedInputs d = put_paged(p, cpu, DType::F32, c, sc);
      const int64_t T = sc.qo.back();
      Tensor out_ref = ref->alloc(DType::F32, {T, c.hq, c.d});
      Tensor out_cpu = p.poisoned(cpu, DType::F32, {T, c.hq, c.d});
      ref->paged_attention(r.q, r.k_pool, r.v_pool, r.pos_pool, r.q_pos, r.plan, out_ref);
      cpu.paged_attention(d.q, d.k_pool, d.v_pool, d.pos_pool, d.q_pos, d.plan, out_cpu);
      p.expect_close("paged_attention",
                     std::string(c.label) + " threads=" + std::to_string(threads), out_cpu,
                     out_ref);
    }
  }
}

// Paged attention equals the dense op with the equivalent AttentionMask when the pages hold the
// same keys: global heads against the causal mask, local heads against (window, sink).
TEST_F(OpParityTest, PagedAttentionEqualsDenseMasked) {
  auto ref = create_backend("reference");
  for (const std::string& name : backend_names()) {
    auto b = create_backend(name);
    OpParity p(*ref, *b);
    const DType act = b->act_dtype();
    for (const PagedSpec& c : kPagedSpecs) {
      PagedSpec one = c;
      one.num_seqs = 1;
      one.share_prefix = false;
      const PagedScenario sc = make_paged_scenario(one, p.rng_);
      const int64_t T = sc.qo.back(), D = c.d, n = static_cast<int64_t>(sc.seq_pos[0].size());
      PagedInputs in = put_paged(p, *b, act, one, sc);
      Tensor paged = p.poisoned(*b, act, {T, c.hq, D});
      b->paged_attention(in.q, in.k_pool, in.v_pool, in.pos_pool, in.q_pos, in.plan, paged);
      std::vector<float> k(c.hkv * n * D), v(c.hkv * n * D);
      for (int64_t h = 0; h < c.hkv; ++h) {
        std::copy(sc.token_k[0][h].begin(), sc.token_k[0][h].end(), k.begin() + h * n * D);
        std::copy(sc.token_v[0][h].begin(), sc.token_v[0][h].end(), v.begin() + h * n * D);
      }
      Tensor kd = p.put(*b, act, round_through(act, k), {c.hkv, n, D});
      Tensor vd = p.put(*b, act, round_through(act, v), {c.hkv, n, D});
      Tensor kpos = p.put_ints(*b, sc.seq_pos[0]);
      AttentionMask global, local;
      global.scale = local.scale = in.plan.scale;
      local.window = c.window;
      local.sink = c.sink;
      Tensor dense_g = p.poisoned(*b, act, {T, c.hq, D}),
             dense_l = p.poisoned(*b, act, {T, c.hq, D});
      b->attention(in.q, kd, vd, n * D, in.q_pos, kpos, global, dense_g);
      b->attention(in.q, kd, vd, n * D, in.q_pos, kpos, local, dense_l);
      b->synchronize();
      Tensor pg = b->to_host_f32(paged), dg = b->to_host_f32(dense_g), dl = b->to_host_f32(dense_l);
      const int64_t group = c.hq / c.hkv;
      double worst = 1.0;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t hq = 0; hq < c.hq; ++hq) {
          const bool is_local = sc.window[hq / group] > 0;
          const float* x = pg.data<float>() + (t * c.hq + hq) * D;
          const float* y = (is_local ? dl : dg).data<float>() + (t * c.hq + hq) * D;
          double xy = 0, xx = 0, yy = 0;
          for (int64_t i = 0; i < D; ++i) {
            xy += double(x[i]) * y[i];
            xx += double(x[i]) * x[i];
            yy += double(y[i]) * y[i];
          }
          const double cosine = xy / std::sqrt(xx * yy);
          worst = std::min(worst, cosine);
          ASSERT_GE(cosine, 0.99998) << name << " " << c.label << " row " << t << " head " << hq;
        }
      std::printf("[ paged=dense ] %-9s %-28s worst cosine %.8f\n", name.c_str(), c.label, worst);
    }
  }
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
