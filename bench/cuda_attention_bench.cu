// CUDA micro-benchmark of the SegPaged attention kernels and the cuBLASLt matmul, through the
// Backend API (so it times exactly what the model runs). Built by scripts/gpu-cuda-bench.sh with
// nvcc against the static libraries (no CMake target: bench/ is linked into the CLI).
//   prefill: one sequence of T tokens, 32 q / 8 kv heads, d 128, pages of 64, through the
//            mma.sync kernel and each wgmma tile shape; all heads global
//            vs 1 of 8 global (12.5%, the closest to 15% with 8 kv heads) and the rest W = 4096,
//            sink 4 (local tables hold every page; the kernel skips the invisible ones);
//   decode:  16 sequences x 32K tokens, one query row each; all global vs 1 of 8 global and
//            the rest W = 512, sink 4 (local tables hold only sink ∪ window pages, as the store
//            trims them).
// Timing: CUDA events on the backend's stream, 3 warm-up runs, median of N.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "kv/head_profile.h"

using namespace redknot;

namespace {

void check(cudaError_t st, const char* what) {
  if (st != cudaSuccess) {
    std::fprintf(stderr, "CUDA error %s: %s\n", what, cudaGetErrorString(st));
    std::exit(2);
  }
}

__global__ void fill_bf16(__nv_bfloat16* x, int64_t n, uint32_t seed, float amp) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    h *= 3266489917u;
    h ^= h >> 16;
    x[i] = __float2bfloat16_rn(amp * (static_cast<float>(h) / 4294967296.0f * 2.0f - 1.0f));
  }
}

void fill(Tensor& t, uint32_t seed, float amp = 1.0f) {
  fill_bf16<<<2048, 256>>>(t.data<__nv_bfloat16>(), t.numel(), seed, amp);
  check(cudaGetLastError(), "fill");
  check(cudaDeviceSynchronize(), "fill sync");
}

Tensor ints(Backend& b, const std::vector<int32_t>& v) {
  Tensor t = b.alloc(DType::I32, {static_cast<int64_t>(v.size())});
  b.copy_from_host(t, Tensor::from_i32(v, {static_cast<int64_t>(v.size())}));
  return t;
}

template <typename F>
double time_ms(Backend& b, F&& f, int reps) {
  cudaStream_t s = static_cast<cudaStream_t>(cuda_stream(b));
  for (int i = 0; i < 3; ++i) f();
  b.synchronize();
  std::vector<float> ms;
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "event");
  check(cudaEventCreate(&e1), "event");
  for (int i = 0; i < reps; ++i) {
    check(cudaEventRecord(e0, s), "record");
    f();
    check(cudaEventRecord(e1, s), "record");
    check(cudaEventSynchronize(e1), "sync");
    float t = 0;
    check(cudaEventElapsedTime(&t, e0, e1), "elapsed");
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Layout {
  int32_t num_seqs, hkv, page_size;
  std::vector<int32_t> qo, kv_indptr, pages, lengths, window, sink, pos_pool, q_pos;
  int64_t slots = 0;
  int64_t kv_bytes_read = 0;  // K + V + positions of the pages in the tables
};

// Each (seq, head) gets its own pages holding positions [0, len); local heads of `trim` layouts
// hold only the sink page and the pages reaching into the last-W window of the last query.
Layout make_layout(int32_t seqs, int32_t hkv, int32_t len, int32_t rows, int32_t globals,
                   int32_t window, int32_t sink, bool trim, int64_t d) {
  Layout L{seqs, hkv, 64};
  const int32_t ps = L.page_size, n_pages = (len + ps - 1) / ps;
  std::vector<HeadSpec> head(hkv);  // the store's keep rule decides which pages a trim drops
  for (int32_t h = 0; h < hkv; ++h) {
    const bool local = h >= globals;
    L.window.push_back(local ? window : 0);
    L.sink.push_back(local ? sink : 0);
    if (local) head[h] = {HeadClass::Local, window, sink};
  }
  L.qo.push_back(0);
  L.kv_indptr.push_back(0);
  int32_t next = 0;
  std::vector<std::pair<int32_t, int32_t>> placed;  // (phys, first position)
  for (int32_t s = 0; s < seqs; ++s) {
    for (int32_t i = len - rows; i < len; ++i) L.q_pos.push_back(i);
    L.qo.push_back(L.qo.back() + rows);
    for (int32_t h = 0; h < hkv; ++h) {
      for (int32_t pg = 0; pg < n_pages; ++pg) {
        const int32_t first = pg * ps, last = std::min(len, first + ps) - 1;
        if (trim && !head[h].keeps_any(first, last, len - 1)) continue;
        L.pages.push_back(next);
        L.lengths.push_back(last - first + 1);
        placed.push_back({next, first});
        L.kv_bytes_read += int64_t{last - first + 1} * (2 * d * 2 + 4);
        ++next;
      }
      L.kv_indptr.push_back(static_cast<int32_t>(L.pages.size()));
    }
  }
  L.slots = int64_t{next} * ps;
  L.pos_pool.assign(L.slots, 0);
  for (auto [phys, first] : placed)
    for (int32_t j = 0; j < ps; ++j) L.pos_pool[int64_t{phys} * ps + j] = first + j;
  // Shuffle nothing: pages of one head are contiguous, as a fresh pool hands them out.
  return L;
}

struct Inputs {
  PagedAttentionPlan plan;
  Tensor q, k, v, pos, q_pos, out;
};

Inputs put(Backend& b, const Layout& L, int64_t hq, int64_t d) {
  Inputs in;
  in.plan.num_seqs = L.num_seqs;
  in.plan.num_kv_heads = L.hkv;
  in.plan.page_size = L.page_size;
  in.plan.scale = 1.0f / std::sqrt(static_cast<float>(d));
  in.plan.qo_indptr = ints(b, L.qo);
  in.plan.kv_indptr = ints(b, L.kv_indptr);
  in.plan.page_indices = ints(b, L.pages);
  in.plan.page_lengths = ints(b, L.lengths);
  in.plan.head_window = ints(b, L.window);
  in.plan.head_sink = ints(b, L.sink);
  const int64_t T = L.qo.back();
  in.q = b.alloc(DType::BF16, {T, hq, d});
  in.k = b.alloc(DType::BF16, {L.slots, d});
  in.v = b.alloc(DType::BF16, {L.slots, d});
  in.out = b.alloc(DType::BF16, {T, hq, d});
  fill(in.q, 11, 1.5f);
  fill(in.k, 22);
  fill(in.v, 33);
  in.pos = ints(b, L.pos_pool);
  in.q_pos = ints(b, L.q_pos);
  return in;
}

// Host check of a few (row, head) outputs against f64 attention over the same bf16 data.
struct HostCopy {
  Tensor q, k, v;
};
HostCopy host_copy(Backend& b, Inputs& in) {
  return {b.to_host_f32(in.q), b.to_host_f32(in.k), b.to_host_f32(in.v)};
}

double spot_check(Backend& b, const Layout& L, Inputs& in, const HostCopy& hc, int64_t hq,
                  int64_t d, int samples) {
  const Tensor &q = hc.q, &k = hc.k, &v = hc.v;
  Tensor o = b.to_host_f32(in.out);
  const int64_t T = L.qo.back(), group = hq / L.hkv;
  std::mt19937 rng(5);
  double worst = 0;
  for (int i = 0; i < samples; ++i) {
    const int64_t t = rng() % T, h = rng() % hq, kh = h / group;
    int32_t s = 0;
    while (L.qo[s + 1] <= t) ++s;
    const int32_t qp = L.q_pos[t], W = L.window[kh], sk = L.sink[kh];
    std::vector<double> sc;
    std::vector<int64_t> slots;
    for (int32_t e = L.kv_indptr[s * L.hkv + kh]; e < L.kv_indptr[s * L.hkv + kh + 1]; ++e)
      for (int32_t j = 0; j < L.lengths[e]; ++j) {
        const int64_t slot = int64_t{L.pages[e]} * L.page_size + j;
        const int32_t kp = L.pos_pool[slot];
        if (!(kp <= qp && (W == 0 || qp - kp < W || kp < sk))) continue;
        double dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += double(q.data<float>()[(t * hq + h) * d + c]) * k.data<float>()[slot * d + c];
        sc.push_back(dot * in.plan.scale);
        slots.push_back(slot);
      }
    const double mx = *std::max_element(sc.begin(), sc.end());
    double l = 0, num = 0, den = 0;
    std::vector<double> acc(d, 0.0);
    for (size_t j = 0; j < sc.size(); ++j) {
      const double p = std::exp(sc[j] - mx);
      l += p;
      for (int64_t c = 0; c < d; ++c) acc[c] += p * v.data<float>()[slots[j] * d + c];
    }
    for (int64_t c = 0; c < d; ++c) {
      const double ref = acc[c] / l, got = o.data<float>()[(t * hq + h) * d + c];
      num += (got - ref) * (got - ref);
      den += ref * ref;
    }
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-30)));
  }
  return worst;
}

// Visible (query, key) pairs of the layout, for FLOP counts.
double visible_pairs(const Layout& L, int64_t group) {
  double pairs = 0;
  for (int32_t s = 0; s < L.num_seqs; ++s)
    for (int32_t h = 0; h < L.hkv; ++h)
      for (int32_t t = L.qo[s]; t < L.qo[s + 1]; ++t) {
        const int64_t qp = L.q_pos[t], W = L.window[h], sk = L.sink[h];
        int64_t n = qp + 1;
        if (W > 0)
          n = std::min<int64_t>(n, W) + std::min<int64_t>(sk, std::max<int64_t>(0, qp + 1 - W));
        pairs += double(n) * group;
      }
  return pairs;
}

}  // namespace

int main() {
  auto be = make_cuda_backend(0);
  Backend& b = *be;
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "props");
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int64_t hq = 32, hkv = 8, d = 128;
  std::vector<std::string> table;
  char line[512];

  // ---- prefill: the mma.sync kernel (REDKNOT_FLASH_SM90=0) and the wgmma kernel's tile shapes
  // (keys x stages; REDKNOT_BENCH_SM90 narrows the list, e.g. "0,128x2") ----
  std::vector<std::string> kernels = {"0", "128x2", "64x4", "64x3"};
  if (const char* only = std::getenv("REDKNOT_BENCH_SM90")) {
    kernels.clear();
    for (std::string rest = only; !rest.empty();) {
      const size_t comma = rest.find(',');
      kernels.push_back(rest.substr(0, comma));
      rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    }
  }
  for (const std::string& kern : kernels)
    for (int32_t T : {8192, 32768}) {
      CudaFlashTuning tuning;
      tuning.sm90 = kern;
      set_cuda_flash_tuning(b, tuning);
      const std::string name = kern == "0" ? "mma.sync 64-row" : "wgmma " + kern;
      for (int profile = 0; profile < 2; ++profile) {
        const bool mixed = profile == 1;
        Layout L = make_layout(1, hkv, T, T, mixed ? 1 : hkv, 4096, 4, false, d);
        Inputs in = put(b, L, hq, d);
        auto run = [&] { b.paged_attention(in.q, in.k, in.v, in.pos, in.q_pos, in.plan, in.out); };
        const double ms = time_ms(b, run, T > 10000 ? 10 : 20);
        const double flops = 4.0 * d * visible_pairs(L, hq / hkv);
        double err = -1;
        if (T == 8192) err = spot_check(b, L, in, host_copy(b, in), hq, d, 24);
        std::snprintf(line, sizeof line,
                      "| prefill T=%d (%s) | %s | %.3f ms | %.0f TFLOP/s (visible) | rel "
                      "err %.2e |",
                      T, name.c_str(), mixed ? "1/8 global, W=4096" : "all global", ms,
                      flops / ms / 1e9, err);
        table.push_back(line);
        std::printf("%s\n", line);
      }
      set_cuda_flash_tuning(b, CudaFlashTuning{});
    }

  // ---- decode (automatic split count, then a sweep via REDKNOT_FLASH_SPLITS) ----
  for (int profile = 0; profile < 2; ++profile) {
    const bool mixed = profile == 1;
    Layout L = make_layout(16, hkv, 32768, 1, mixed ? 1 : hkv, 512, 4, true, d);
    Inputs in = put(b, L, hq, d);
    const HostCopy hc = host_copy(b, in);
    for (int splits : {0, 4, 8, 16, 32, 64}) {
      CudaFlashTuning tuning;
      tuning.splits = splits;  // 0: automatic
      set_cuda_flash_tuning(b, tuning);
      auto run = [&] { b.paged_attention(in.q, in.k, in.v, in.pos, in.q_pos, in.plan, in.out); };
      const double ms = time_ms(b, run, 50);
      const double err = spot_check(b, L, in, hc, hq, d, splits == 0 ? 24 : 8);
      set_cuda_flash_tuning(b, CudaFlashTuning{});
      const double bytes = double(L.kv_bytes_read) + 2.0 * 16 * hq * d * 2;
      const std::string sp = splits == 0 ? "auto" : std::to_string(splits);
      std::snprintf(
          line, sizeof line,
          "| decode 32K x16 (splits %s) | %s | %.3f ms | %.0f GB/s of %.1f MB | rel err %.2e |",
          sp.c_str(), mixed ? "1/8 global, W=512" : "all global", ms, bytes / ms / 1e6, bytes / 1e6,
          err);
      table.push_back(line);
      std::printf("%s\n", line);
    }
  }

  // ---- decode through the previous scalar kernel (REDKNOT_CUDA_SIMPLE=1), for before/after ----
  {
    setenv("REDKNOT_CUDA_SIMPLE", "1", 1);
    auto simple_be = make_cuda_backend(0);
    unsetenv("REDKNOT_CUDA_SIMPLE");
    Backend& sb = *simple_be;
    for (int profile = 0; profile < 2; ++profile) {
      const bool mixed = profile == 1;
      Layout L = make_layout(16, hkv, 32768, 1, mixed ? 1 : hkv, 512, 4, true, d);
      Inputs in = put(sb, L, hq, d);
      auto run = [&] { sb.paged_attention(in.q, in.k, in.v, in.pos, in.q_pos, in.plan, in.out); };
      const double ms = time_ms(sb, run, 5);
      const double bytes = double(L.kv_bytes_read) + 2.0 * 16 * hq * d * 2;
      std::snprintf(
          line, sizeof line,
          "| decode 32K x16 (old scalar kernel) | %s | %.3f ms | %.0f GB/s of %.1f MB | |",
          mixed ? "1/8 global, W=512" : "all global", ms, bytes / ms / 1e6, bytes / 1e6);
      table.push_back(line);
      std::printf("%s\n", line);
    }
  }

  // ---- matmul (cuBLASLt, bias epilogue) ----
  for (int64_t m : {16, 8192}) {
    const int64_t n = 8192, k = 8192;
    Tensor x = b.alloc(DType::BF16, {m, k}), w = b.alloc(DType::BF16, {n, k});
    Tensor o = b.alloc(DType::BF16, {m, n});
    Tensor bias = b.alloc(DType::F32, {n});
    fill(x, 1);
    fill(w, 2);
    auto run = [&] { b.matmul(x, w, bias, o); };
    const double ms = time_ms(b, run, 20);
    std::snprintf(line, sizeof line,
                  "| matmul+bias %ldx%ldx%ld | bf16 | %.3f ms | %.0f TFLOP/s | |",
                  static_cast<long>(m), static_cast<long>(n), static_cast<long>(k), ms,
                  2.0 * m * n * k / ms / 1e9);
    table.push_back(line);
    std::printf("%s\n", line);
  }

  // ---- allocator: a forward-like alloc pattern, twice ----
  auto pattern = [&] {
    for (int layer = 0; layer < 32; ++layer) {
      Tensor a = b.alloc(DType::BF16, {4096, 4096});
      Tensor c = b.alloc(DType::BF16, {4096, 14336});
      Tensor e = b.alloc(DType::F32, {4096});
    }
  };
  pattern();
  const CudaAllocStats s0 = cuda_alloc_stats(b);
  pattern();
  const CudaAllocStats s1 = cuda_alloc_stats(b);
  std::printf(
      "allocator: warm-up %ld cudaMalloc; steady-state pass: %ld cudaMalloc, %ld cache hits\n",
      static_cast<long>(s0.mallocs), static_cast<long>(s1.mallocs - s0.mallocs),
      static_cast<long>(s1.hits - s0.hits));

  std::printf("\n| case | profile | time | rate | check |\n|---|---|---|---|---|\n");
  for (const auto& l : table) std::printf("%s\n", l.c_str());
  return 0;
}
