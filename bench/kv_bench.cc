#include "kv_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "bench_util.h"
#include "core/batch.h"
#include "core/error.h"
#include "kv/device_util.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"

namespace redknot::bench {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Cheap deterministic fill in [-1, 1): the values only have to be finite and varied.
void fill_random(float* p, int64_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = static_cast<float>(static_cast<int32_t>(x >> 32)) * (1.0f / 2147483648.0f);
  }
}

// Appends positions [start, start + count) of `seq` to the cache as one forward (begin,
// optionally write every layer, end). Throws OutOfKvMemory (cache unchanged) when full.
// k, v: [count, kv_heads, head_dim] or empty for an accounting-only pool
void append(PagedKvCache& cache, Backend& backend, SeqId seq, int32_t start, int32_t count,
            const Tensor& k, const Tensor& v) {
  Batch batch;
  batch.add_sequence(seq, std::vector<int32_t>(count, 0), start);
  std::vector<int32_t> pos(count);
  for (int32_t i = 0; i < count; ++i) pos[i] = start + i;
  cache.begin_forward(batch, upload_i32(backend, pos));
  if (cache.pool().has_storage())
    for (int l = 0; l < cache.profile().num_layers(); ++l) cache.write(l, k, v);
  cache.end_forward();
}

// The first n tokens of x: [T, H, D] -> [n, H, D], sharing storage.
Tensor first_tokens(const Tensor& x, int64_t n) {
  return x.rows_slice(0, n * x.dim(1)).reshape({n, x.dim(1), x.dim(2)});
}

std::string bytes_str(double bytes) {
  char buf[32];
  if (bytes >= kGiB)
    std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / kGiB);
  else
    std::snprintf(buf, sizeof(buf), "%.1f MiB", bytes / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

HeadProfile spread_profile(int32_t layers, int32_t kv_heads, double global_fraction, int32_t window,
                           int32_t sink) {
  HeadProfile p(layers, kv_heads);
  const int64_t n = int64_t{layers} * kv_heads;
  const int64_t n_global = std::llround(global_fraction * static_cast<double>(n));
  for (int64_t i = 0; i < n; ++i) {
    HeadSpec& h = p.at(static_cast<int32_t>(i / kv_heads), static_cast<int32_t>(i % kv_heads));
    // Head i is global when the running count floor(i * g / n) steps up at i.
    const bool global = (i + 1) * n_global / n > i * n_global / n;
    if (!global) {
      h.cls = HeadClass::Local;
      h.window = window;
      h.sink = sink;
    }
  }
  return p;
}

int64_t fill_sessions(PagedKvCache& cache, Backend& backend, int64_t tokens, int32_t chunk,
                      const Tensor& k, const Tensor& v) {
  for (SeqId seq = 0;; ++seq) {
    cache.add_sequence(seq);
    try {
      for (int64_t done = 0; done < tokens; done += chunk) {
        const int32_t n = static_cast<int32_t>(std::min<int64_t>(chunk, tokens - done));
        append(cache, backend, seq, static_cast<int32_t>(done), n,
               k.empty() ? k : first_tokens(k, n), v.empty() ? v : first_tokens(v, n));
      }
    } catch (const OutOfKvMemory&) {
      cache.remove_sequence(seq);
      return seq;
    }
  }
}

int run_capacity_bench(const CapacityBenchArgs& a) {
  const KvShape& s = a.shape;
  const int64_t budget = static_cast<int64_t>(a.budget_gib * kGiB);
  // Byte math in bf16 (the GPU KV dtype) even though the accounting runs on the host.
  const int32_t pages = PagePool::pages_for_bytes(budget, s.page_size, s.head_dim, DType::BF16);
  const int64_t page_bytes = PagePool::page_bytes(s.page_size, s.head_dim, DType::BF16);
  std::printf(
      "# redknot bench capacity: %d layers x %d kv heads, head_dim %d, bf16 KV, page %d "
      "tokens (%lld B with positions), budget %.1f GiB = %d pages\n",
      s.layers, s.kv_heads, s.head_dim, s.page_size, static_cast<long long>(page_bytes),
      a.budget_gib, pages);
  std::printf(
      "# sessions of %lld tokens, prefilled in chunks of %d; head-aware profile: %.0f%% "
      "global, W=%d, s=%d\n\n",
      static_cast<long long>(a.tokens), a.chunk, 100.0 * s.global_fraction, s.window, s.sink);

  CpuBackendOptions opts;
  opts.n_threads = 1;
  CpuBackend backend(opts);
  struct Row {
    std::string name;
    double global_share;
    int64_t ideal_bytes, ideal_fit, measured, pages_per_session;
    double seconds;
  };
  std::vector<Row> rows;
  for (int variant = 0; variant < 2; ++variant) {
    HeadProfile profile =
        variant == 0 ? HeadProfile(s.layers, s.kv_heads)
                     : spread_profile(s.layers, s.kv_heads, s.global_fraction, s.window, s.sink);
    Row r;
    r.name = variant == 0 ? "all-global" : "head-aware";
    r.global_share = profile.global_fraction();
    r.ideal_bytes = ideal_session_bytes(profile, a.tokens, s.page_size, s.head_dim, DType::BF16);
    r.ideal_fit =
        sessions_that_fit(profile, a.tokens, budget, s.page_size, s.head_dim, DType::BF16);
    const auto t0 = Clock::now();
    PagePool pool(backend, pages, s.page_size, s.head_dim, /*with_storage=*/false);
    PagedKvCache cache(pool, profile, {}, Tensor());
    r.measured = fill_sessions(cache, backend, a.tokens, a.chunk, Tensor(), Tensor());
    r.seconds = seconds_since(t0);
    r.pages_per_session = r.measured > 0 ? (pool.num_pages() - pool.num_free()) / r.measured : 0;
    rows.push_back(r);
  }

  std::printf(
      "| profile | global heads | ideal bytes/session | ideal sessions | measured sessions "
      "| measured/ideal | measured bytes/session | fill time |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows)
    std::printf("| %s | %.1f%% | %s | %lld | %lld | %.3f | %s | %.1f s |\n", r.name.c_str(),
                100.0 * r.global_share, bytes_str(static_cast<double>(r.ideal_bytes)).c_str(),
                static_cast<long long>(r.ideal_fit), static_cast<long long>(r.measured),
                r.ideal_fit > 0 ? static_cast<double>(r.measured) / r.ideal_fit : 0.0,
                bytes_str(static_cast<double>(r.pages_per_session * page_bytes)).c_str(),
                r.seconds);
  const double ideal_ratio = static_cast<double>(rows[1].ideal_fit) / rows[0].ideal_fit;
  const double measured_ratio =
      rows[0].measured > 0 ? static_cast<double>(rows[1].measured) / rows[0].measured : 0.0;
  std::printf(
      "\nhead-aware / all-global sessions: ideal %.2fx, measured %.2fx "
      "(bytes ratio %.2fx)\n",
      ideal_ratio, measured_ratio, static_cast<double>(rows[0].ideal_bytes) / rows[1].ideal_bytes);
  bool ok = true;
  for (const Row& r : rows) {
    const double ratio = r.ideal_fit > 0 ? static_cast<double>(r.measured) / r.ideal_fit : 0.0;
    if (std::fabs(ratio - 1.0) > 0.10) {
      std::printf("WARNING: %s measured/ideal %.3f is off by more than 10%%\n", r.name.c_str(),
                  ratio);
      ok = false;
    }
  }
  return ok ? 0 : 1;
}

namespace {

// One configuration of the attention benchmark: a PagedKvCache holding `batch` sequences of
// `context` tokens, then one decode token per sequence whose attend() is timed.
struct PagedTiming {
  double seconds_per_layer;   // median over repeats, averaged over the timed layers
  double kv_bytes_per_layer;  // K+V bytes the cache holds for the batch (f32), per layer
};

PagedTiming time_paged(CpuBackend& backend, const HeadProfile& profile, const KvShape& s,
                       int64_t context, int32_t batch, int32_t chunk, int32_t repeats) {
  // Room for every session plus the pages local heads hold while a chunk is in flight.
  const int64_t heads = int64_t{profile.num_layers()} * profile.num_kv_heads();
  const int64_t pages = batch * profile.pages_for(context + 1, s.page_size, 2) +
                        heads * ((chunk + s.page_size - 1) / s.page_size + 1);
  PagePool pool(backend, static_cast<int32_t>(pages), s.page_size, s.head_dim);
  PagedKvOptions opts;
  opts.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  PagedKvCache cache(pool, profile, opts, Tensor());
  Tensor k = Tensor::host(DType::F32, {chunk, s.kv_heads, s.head_dim});
  Tensor v = Tensor::host(DType::F32, {chunk, s.kv_heads, s.head_dim});
  fill_random(k.data<float>(), k.numel(), 1);
  fill_random(v.data<float>(), v.numel(), 2);
  for (SeqId seq = 0; seq < batch; ++seq) {
    cache.add_sequence(seq);
    for (int64_t done = 0; done < context; done += chunk) {
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(chunk, context - done));
      append(cache, backend, seq, static_cast<int32_t>(done), n, first_tokens(k, n),
             first_tokens(v, n));
    }
  }
  // The decode step: one new token per sequence, written, then attended over every layer.
  Batch step;
  std::vector<int32_t> pos;
  for (SeqId seq = 0; seq < batch; ++seq) {
    step.add_sequence(seq, {0}, static_cast<int32_t>(context));
    pos.push_back(static_cast<int32_t>(context));
  }
  cache.begin_forward(step, upload_i32(backend, pos));
  for (int l = 0; l < profile.num_layers(); ++l)
    cache.write(l, first_tokens(k, batch), first_tokens(v, batch));
  Tensor q = Tensor::host(DType::F32, {batch, s.q_heads, s.head_dim});
  Tensor out = Tensor::host(DType::F32, {batch, s.q_heads, s.head_dim});
  fill_random(q.data<float>(), q.numel(), 3);
  std::vector<double> times;
  for (int r = 0; r < repeats + 1; ++r) {
    const auto t0 = Clock::now();
    for (int l = 0; l < profile.num_layers(); ++l) cache.attend(l, q, out);
    if (r > 0) times.push_back(seconds_since(t0) / profile.num_layers());  // r = 0 warms up
  }
  cache.end_forward();
  const KvUsage u = cache.usage();
  const double tokens = static_cast<double>(u.global_tokens + u.local_tokens);
  return {median(times), tokens * s.head_dim * 4.0 * 2.0 / profile.num_layers()};
}

// Backend::attention over contiguous [Hkv, context, D] caches, one call per sequence, causal
// mask: what a mask-based store does whatever the head classes.
double time_dense(CpuBackend& backend, const KvShape& s, int64_t context, int32_t batch,
                  int32_t repeats) {
  std::vector<Tensor> ks, vs;
  for (int32_t b = 0; b < batch; ++b) {
    ks.push_back(Tensor::host(DType::F32, {s.kv_heads, context, s.head_dim}));
    vs.push_back(Tensor::host(DType::F32, {s.kv_heads, context, s.head_dim}));
    fill_random(ks.back().data<float>(), ks.back().numel(), 10 + b);
    fill_random(vs.back().data<float>(), vs.back().numel(), 20 + b);
  }
  std::vector<int32_t> kpos(context);
  for (int64_t j = 0; j < context; ++j) kpos[j] = static_cast<int32_t>(j);
  Tensor k_pos = Tensor::from_i32(kpos, {context});
  Tensor q_pos = Tensor::from_i32({static_cast<int32_t>(context - 1)}, {1});
  Tensor q = Tensor::host(DType::F32, {1, s.q_heads, s.head_dim});
  Tensor out = Tensor::host(DType::F32, {1, s.q_heads, s.head_dim});
  fill_random(q.data<float>(), q.numel(), 3);
  AttentionMask mask;
  mask.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  std::vector<double> times;
  for (int r = 0; r < repeats + 1; ++r) {
    const auto t0 = Clock::now();
    for (int32_t b = 0; b < batch; ++b)
      backend.attention(q, ks[b], vs[b], context * s.head_dim, q_pos, k_pos, mask, out);
    if (r > 0) times.push_back(seconds_since(t0));
  }
  return median(times);
}

}  // namespace

int run_attention_bench(const AttentionBenchArgs& a) {
  const KvShape& s = a.shape;
  CpuBackendOptions opts;
  opts.n_threads = a.threads;
  CpuBackend backend(opts);
  std::printf(
      "# redknot bench attention: CPU decode attention per token, Hq=%d Hkv=%d D=%d, f32 "
      "KV, page %d, %d threads (%s); head-aware: %.0f%% global, W=%d, s=%d; median of "
      "%d repeats\n",
      s.q_heads, s.kv_heads, s.head_dim, s.page_size, backend.num_threads(),
      CpuBackend::simd_name(), 100.0 * s.global_fraction, s.window, s.sink, a.repeats);
  std::printf(
      "# dense and paged all-global time one layer (all layers are alike); head-aware "
      "times all %d layers of its profile and reports the mean per layer\n\n",
      s.layers);
  std::printf(
      "| context | batch | store | KV read/layer | ms/layer | ms/token (x%d layers) | "
      "vs dense | vs paged all-global |\n",
      s.layers);
  std::printf("|---|---|---|---|---|---|---|---|\n");
  const HeadProfile global_one(1, s.kv_heads);
  const HeadProfile aware =
      spread_profile(s.layers, s.kv_heads, s.global_fraction, s.window, s.sink);
  for (int64_t context : a.contexts)
    for (int32_t batch : a.batches) {
      const double dense = time_dense(backend, s, context, batch, a.repeats);
      const double dense_bytes = 2.0 * batch * s.kv_heads * context * s.head_dim * 4.0;
      const PagedTiming all =
          time_paged(backend, global_one, s, context, batch, a.chunk, a.repeats);
      const PagedTiming ha = time_paged(backend, aware, s, context, batch, a.chunk, a.repeats);
      auto row = [&](const char* name, double sec, double bytes) {
        std::printf("| %lld | %d | %s | %s | %.3f | %.2f | %.2fx | %.2fx |\n",
                    static_cast<long long>(context), batch, name, bytes_str(bytes).c_str(),
                    sec * 1e3, sec * 1e3 * s.layers, dense / sec, all.seconds_per_layer / sec);
      };
      row("dense+mask (baseline)", dense, dense_bytes);
      row("paged all-global", all.seconds_per_layer, all.kv_bytes_per_layer);
      row("paged head-aware", ha.seconds_per_layer, ha.kv_bytes_per_layer);
      std::fflush(stdout);
    }
  return 0;
}

namespace {

struct PlanTiming {
  double eager_ms = 0, stored_ms = 0;  // median per step
  int64_t entries = 0;                 // page-table entries of one step, all layers
  int64_t patched = 0;                 // storage steps that patched the previous plan
};

// B sessions of `context` tokens (prefilled in pages-sized pieces with no KV values: the plan
// does not depend on head_dim, so the pool is 1-dim), then `steps` decode steps timed twice:
// eager (begin_forward(batch, positions)) and into plan storage sized for the last step.
PlanTiming time_decode_plan(const HeadProfile& profile, const KvShape& s, int64_t context,
                            int32_t batch, int32_t steps, bool patch) {
  CpuBackendOptions bo;
  bo.n_threads = 1;
  CpuBackend backend(bo);
  const int64_t heads = int64_t{profile.num_layers()} * profile.num_kv_heads();
  const int32_t chunk = 4096;
  const int64_t pages = batch * profile.pages_for(context + 2 * steps + 1, s.page_size, 2) +
                        heads * ((chunk + s.page_size - 1) / s.page_size + 1);
  PagePool pool(backend, static_cast<int32_t>(pages), s.page_size, /*head_dim=*/1);
  PagedKvOptions opts;
  opts.patch_decode_plans = patch;
  PagedKvCache cache(pool, profile, opts, Tensor());
  for (SeqId seq = 0; seq < batch; ++seq) {
    cache.add_sequence(seq);
    for (int64_t done = 0; done < context; done += chunk) {
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(chunk, context - done));
      Batch b;  // slots only: nothing is written, the plans do not read the values
      b.add_sequence(seq, std::vector<int32_t>(n, 0), static_cast<int32_t>(done));
      std::vector<int32_t> pos(n);
      for (int32_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(done) + i;
      cache.begin_forward(b, upload_i32(backend, pos));
      cache.end_forward();
    }
  }
  auto step_batch = [&](int64_t at, std::vector<int32_t>& pos) {
    Batch b;
    pos.clear();
    for (SeqId seq = 0; seq < batch; ++seq) {
      b.add_sequence(seq, {0}, static_cast<int32_t>(at));
      pos.push_back(static_cast<int32_t>(at));
    }
    return b;
  };
  PlanTiming t;
  std::vector<double> eager, stored;
  std::vector<int32_t> pos;
  int64_t at = context;
  for (int32_t i = 0; i < steps; ++i, ++at) {
    Batch b = step_batch(at, pos);
    Tensor positions = upload_i32(backend, pos);
    const auto t0 = Clock::now();
    cache.begin_forward(b, positions);
    cache.end_forward();
    eager.push_back(seconds_since(t0));
  }
  // Storage sized for every step still to come, as the decode graph sizes it (with slack).
  // Each (sequence, kv head) of a layer gains at most steps / page_size + 1 pages.
  Batch next = step_batch(at, pos);
  const int64_t growth = int64_t{batch} * profile.num_kv_heads() * (steps / s.page_size + 1);
  std::shared_ptr<PlanStorage> storage =
      cache.make_plan_storage(batch, cache.plan_capacity(next) + growth);
  for (int32_t i = 0; i < steps; ++i, ++at) {
    Batch b = step_batch(at, pos);
    Tensor positions = upload_i32(backend, pos);
    const auto t0 = Clock::now();
    cache.begin_forward(b, positions, *storage);
    cache.end_forward();
    stored.push_back(seconds_since(t0));
    if (i == 0) t.entries = cache.plan_capacity(b) * profile.num_layers();
  }
  t.patched = cache.plan_stats().patched;
  t.eager_ms = 1e3 * median(eager);
  t.stored_ms = 1e3 * median(stored);
  return t;
}

}  // namespace

int run_decode_plan_bench(const DecodePlanBenchArgs& a) {
  const KvShape& s = a.shape;
  std::printf(
      "# redknot bench decode-plan: host time of one decode step's KV bookkeeping "
      "(begin_forward + end_forward), %d layers x %d kv heads, page %d; head-aware: %.0f%% "
      "global (spread), W=%d, s=%d; median of %d steps; CPU backend (the plan copy is a "
      "memcpy here, an H2D copy on CUDA)\n\n",
      s.layers, s.kv_heads, s.page_size, 100.0 * s.global_fraction, s.window, s.sink, a.steps);
  std::printf(
      "| context | batch | profile | entries/step (fullest layer x layers) | eager ms | "
      "plan storage, rebuilt ms | plan storage, patched ms | steps patched |\n"
      "|---|---|---|---|---|---|---|---|\n");
  const HeadProfile all_global(s.layers, s.kv_heads);
  const HeadProfile aware =
      spread_profile(s.layers, s.kv_heads, s.global_fraction, s.window, s.sink);
  for (int64_t context : a.contexts)
    for (int32_t batch : a.batches)
      for (int variant = 0; variant < 2; ++variant) {
        const HeadProfile& profile = variant == 0 ? all_global : aware;
        const PlanTiming rebuilt = time_decode_plan(profile, s, context, batch, a.steps, false);
        const PlanTiming t = time_decode_plan(profile, s, context, batch, a.steps, true);
        std::printf("| %lld | %d | %s | %lld | %.3f | %.3f | %.3f | %lld/%d |\n",
                    static_cast<long long>(context), batch,
                    variant == 0 ? "all-global" : "head-aware", static_cast<long long>(t.entries),
                    t.eager_ms, rebuilt.stored_ms, t.stored_ms, static_cast<long long>(t.patched),
                    a.steps);
        std::fflush(stdout);
      }
  return 0;
}

}  // namespace redknot::bench
