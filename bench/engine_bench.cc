#include "engine_bench.h"

#include "bench_util.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "backend/builtin.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "engine/engine_setup.h"
#include "model/model.h"
#include "model/random_checkpoint.h"

#ifdef REDKNOT_HAS_OPENBLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace redknot::bench {

namespace {

struct GemmShape {
  int64_t n, k, count;  // out features, in features, how many per layer (or per model)
};

// The projections of one forward pass: per layer q, k, v, o, gate, up, down; plus lm_head.
std::vector<GemmShape> model_gemms(const ModelConfig& c) {
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  return {{q, c.hidden_size, c.num_layers},
          {kv, c.hidden_size, 2 * c.num_layers},
          {c.hidden_size, q, c.num_layers},
          {c.intermediate_size, c.hidden_size, 2 * c.num_layers},
          {c.hidden_size, c.intermediate_size, c.num_layers}};
}

#ifdef REDKNOT_HAS_OPENBLAS
// Seconds for OpenBLAS SGEMM to run every projection GEMM of one forward of m tokens.
double sgemm_seconds(const std::vector<GemmShape>& shapes, int64_t m, int repeats) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-1, 1);
  double total = 0;
  for (const GemmShape& s : shapes) {
    std::vector<float> x(m * s.k), w(s.n * s.k), y(m * s.n);
    for (auto& v : x) v = d(rng);
    for (auto& v : w) v = d(rng);
    std::vector<double> t;
    for (int r = 0; r < repeats + 1; ++r) {
      auto t0 = Clock::now();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, s.n, s.k, 1.0f, x.data(), s.k,
                  w.data(), s.k, 0.0f, y.data(), s.n);
      if (r > 0) t.push_back(seconds_since(t0));  // first run warms up
    }
    total += median(t) * s.count;
  }
  return total;
}
#endif
}  // namespace

double measure_read_bandwidth_gbs(int64_t bytes, int threads) {
  const int64_t n = bytes / 8;
  std::vector<int64_t> buf(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = i;
  ThreadPool pool(threads);
  std::vector<double> times;
  std::vector<int64_t> sums(pool.size() * 16);
  for (int r = 0; r < 4; ++r) {
    auto t0 = Clock::now();
    pool.parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
      int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t i = b;
      for (; i + 4 <= e; i += 4) {
        s0 += buf[i];
        s1 += buf[i + 1];
        s2 += buf[i + 2];
        s3 += buf[i + 3];
      }
      for (; i < e; ++i) s0 += buf[i];
      sums[(b * 16 / std::max<int64_t>(1, n)) % sums.size()] += s0 + s1 + s2 + s3;
    });
    if (r > 0) times.push_back(seconds_since(t0));
  }
  volatile int64_t sink = sums[0];
  (void)sink;
  return static_cast<double>(n * 8) / median(times) / 1e9;
}

int run_engine_bench(const EngineBenchArgs& a) {
  register_builtin_backends();
  ModelConfig cfg = preset_config(a.shape);
  if (a.layers > 0) cfg.num_layers = a.layers;
  DType dt = a.dtype == "f32" ? DType::F32 : a.dtype == "bf16" ? DType::BF16 : DType::I32;
  if (dt == DType::I32) throw Error("--dtype must be bf16 or f32");
  std::printf(
      "# redknot bench: shape %s (%lld layers, hidden %lld, ffn %lld, heads %lld/%lld), "
      "%s weights, backend %s, %u hardware threads\n",
      a.shape.c_str(), (long long)cfg.num_layers, (long long)cfg.hidden_size,
      (long long)cfg.intermediate_size, (long long)cfg.num_heads, (long long)cfg.num_kv_heads,
      a.dtype.c_str(), a.backend.c_str(), std::thread::hardware_concurrency());
  auto t_init = Clock::now();
  Checkpoint ck = random_checkpoint(cfg, dt, 1234);
  auto backend = create_backend(a.backend);
  Model model(ck, *backend);
  std::printf("# random weights made and uploaded in %.1f s (%.2f GB on the backend)\n",
              seconds_since(t_init), model.weight_bytes() / 1e9);

  // Bytes of weights a decode step must read: every projection, plus lm_head (one row of the
  // embedding table is negligible).
  const auto gemms = model_gemms(cfg);
  const int64_t wbytes_el = dt == DType::BF16 ? 2 : 4;
  double proj_params = 0;
  for (const GemmShape& s : gemms) proj_params += double(s.n) * s.k * s.count;
  const double lm_params = double(cfg.vocab_size) * cfg.hidden_size;
  const double decode_bytes = (proj_params + lm_params) * wbytes_el;

  std::mt19937 rng(99);
  std::vector<int32_t> prompt(a.prefill_tokens);
  for (auto& t : prompt) t = static_cast<int32_t>(rng() % cfg.vocab_size);

  std::vector<double> prefill_s, decode_s;
  for (int r = 0; r < a.repeats; ++r) {
    EngineOptions eo;
    eo.request_tokens = a.prefill_tokens + a.decode_tokens + 1;
    KvStore store = std::move(build_engine_stores(model, ck, eo).kv);
    KvCache& kv = *store.cache;
    kv.add_sequence(0);
    Batch b;
    b.add_sequence(0, prompt, 0);
    auto t0 = Clock::now();
    Tensor logits = model.forward(b, kv);
    prefill_s.push_back(seconds_since(t0));
    int32_t next = 0;
    auto t1 = Clock::now();
    for (int i = 0; i < a.decode_tokens; ++i) {
      Batch d;
      d.add_sequence(0, {next}, kv.next_position(0));
      logits = model.forward(d, kv);
      next = static_cast<int32_t>(i * 7919 % cfg.vocab_size);
    }
    decode_s.push_back(seconds_since(t1) / std::max(1, a.decode_tokens));
  }
  const double prefill = median(prefill_s), decode = median(decode_s);
  const double prefill_flops = 2.0 * proj_params * a.prefill_tokens;

  const int threads = static_cast<int>(std::thread::hardware_concurrency());
  const double bw = measure_read_bandwidth_gbs(int64_t{1} << 30, threads);
  std::printf("\n| metric | RedKnot | machine ceiling (same run) | ratio |\n|---|---|---|---|\n");
#ifdef REDKNOT_HAS_OPENBLAS
  // The ceiling: OpenBLAS with all its own threads (the backend runs it single-threaded inside
  // its pool, so restore that afterwards).
  openblas_set_num_threads(threads);
  const double sgemm = sgemm_seconds(gemms, a.prefill_tokens, 2);
  openblas_set_num_threads(1);
  std::printf(
      "| prefill %d tok: projection GFLOP/s | %.1f (%.1f tok/s, %.1f ms) | OpenBLAS SGEMM same "
      "shapes: %.1f GFLOP/s | %.0f%% |\n",
      a.prefill_tokens, prefill_flops / prefill / 1e9, a.prefill_tokens / prefill, prefill * 1e3,
      prefill_flops / sgemm / 1e9, 100.0 * sgemm / prefill);
#else
  std::printf(
      "| prefill %d tok: projection GFLOP/s | %.1f (%.1f tok/s) | (built without OpenBLAS) | - |\n",
      a.prefill_tokens, prefill_flops / prefill / 1e9, a.prefill_tokens / prefill);
#endif
  std::printf(
      "| decode: weight GB/s | %.1f (%.2f tok/s, %.1f ms/tok, %.2f GB/tok) | read bandwidth: %.1f "
      "GB/s | %.0f%% |\n",
      decode_bytes / decode / 1e9, 1.0 / decode, decode * 1e3, decode_bytes / 1e9, bw,
      100.0 * decode_bytes / decode / 1e9 / bw);
  std::printf(
      "\nPrefill GFLOP/s counts only the projection GEMMs (attention and norms excluded,\n"
      "they run in the measured time). Decode reads every projection weight and lm_head once per "
      "token.\n");
  return 0;
}

}  // namespace redknot::bench
