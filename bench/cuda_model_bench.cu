// Whole-model CUDA benchmark on real model shapes with random bf16 weights (issue 6). A shape
// is a preset_config name (llama3-8b, mistral-7b, 1b, rag-7m, tiny) or, failing that, one of
// the config.json table of loader/model_shapes (qwen3-32b, llama3.3-70b, ...).
//  ttft:     dense prefill of one T-token prompt (every head global, batch 1, logits of the last
//            token only) through Model::forward on the CUDA backend and the paged KV store, in
//            chunks of --chunks tokens (4096: the engine's prefill_full default; 0: the whole
//            prompt in one forward). Wall time from the first forward to the host logits, after
//            --warmup runs, median of --reps. The peer is scripts/gpu-model-peer.py.
//  capacity: sessions of --capacity-tokens tokens that fit next to the weights: the device KV
//            page pool is sized as --gpu-memory-fraction of the free memory once the weights
//            are loaded (what `serve --gpu-memory-fraction` does), then filled through
//            PagedKvCache (real pages, K/V written every layer) until OutOfKvMemory, dense
//            all-global vs the head-aware profile of bench/kv_bench (15% global, W=512, s=4);
//            beside the ideal count of sessions_that_fit.
//  reuse:    RedKnot TTFT on a segmented prompt (issue 6 reuse bar): --reuse-segments cached
//            documents of --reuse-segment-tokens random ids + a --reuse-query-token query, on
//            the shape --reuse (llama3-8b; "none" skips). One device pool holds the head-aware
//            request store (the kv_bench profile) and a ChunkStore (all-global, room for every
//            segment); the segments are cached offline (untimed), then prefill_with_reuse in
//            redknot mode (Sparse FFN off, then on) runs on a fresh sequence each repetition,
//            against our full mode (prefill_full, chunks of 4096) on an all-global cache of the
//            same pool. Wall time to the host logits after a device sync, --warmup runs, median
//            of --reps; FLOPs from PrefillOutcome::flops vs prefill_flops of the full prompt.
//            --reuse-profile deep puts the same share of global heads in the last quarter of
//            the layers (as real models' maps do), front packs them into the first layers (the
//            spread profile has one in the last layer, where dead-row skipping does nothing).
//  decode:   ms per batched greedy step after a prefill of --decode-context tokens per
//            sequence: eager, CUDA graphs, graphs + device argmax; for each --skinny-rows
//            setting (the CUDA backend's skinny-GEMM row limit; 0: cuBLASLt for every product)
//            and each --decode-splits setting (split-KV blocks per head; 0: the backend's rule),
//            with the bytes a step must read (weights but the embedding table, plus the KV) over
//            the step time, beside the card's device-to-device copy bandwidth (read + write).
// --quantization none,fp8 runs the ttft and decode phases once per weight format (fp8: every
// projection quantized at load per output channel, as `--quantization fp8` does); capacity
// and reuse run with the first.
// Each phase of each shape loads the weights into its own backend, freed (weights, pool, cached
// blocks) before the next. --cpu runs the same code on the CPU backend (a logic check here).
// Built by CMake (target cuda_model_bench, REDKNOT_CUDA=ON); run by scripts/gpu-model-bench.sh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "backend/builtin.h"
#include "backend/cuda/cuda_backend.h"
#include "bench_util.h"
#include "core/error.h"
#include "engine/kv_setup.h"
#include "kv/head_profile.h"
#include "kv/layout_profile.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "kv_bench.h"
#include "loader/fp8_checkpoint.h"
#include "loader/hf_config.h"
#include "loader/model_shapes.h"
#include "model/flops.h"
#include "model/model.h"
#include "model/random_checkpoint.h"
#include "reuse/chunk_prefill.h"
#include "reuse/chunk_store.h"
#include "reuse/reuse_prefill.h"

using namespace redknot;
using namespace redknot::bench;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct Args {
  std::vector<std::string> shapes = {"llama3-8b", "mistral-7b"};
  std::vector<int64_t> lengths = {8192, 32768};
  std::vector<int64_t> chunks = {4096, 0};  // 0: the whole prompt in one forward
  int64_t layers = 0;                       // > 0: override the shape's layer count
  int warmup = 2, reps = 3;
  std::string capacity_shape = "llama3-8b";  // "none": skip the capacity mode
  int64_t capacity_tokens = 32768;
  int32_t capacity_chunk = 4096;
  double gpu_memory_fraction = 0.90;
  std::string reuse_shape = "llama3-8b";  // "none": skip the reuse mode
  int32_t reuse_segments = 8;
  int32_t reuse_segment_tokens = 4096;
  int32_t reuse_query_tokens = 64;
  bool reuse_sparse = true;    // also time redknot with Sparse FFN
  bool stage_profile = false;  // reuse: one more prefill per part with per-stage wall times
  // decode: ms per batched decode step, recorded (CUDA graphs) vs eager, after a prefill of
  // decode_context tokens per sequence; "none" skips it
  std::vector<std::string> decode_shapes;
  std::vector<int64_t> decode_batches = {1, 16};
  int64_t decode_context = 4096;
  int decode_steps = 32;
  // spread: bench::spread_profile (a global head in the last layer); deep: as many global
  // heads in the last quarter of the layers; front: in the first layers
  std::string reuse_profile = "spread";
  std::vector<std::string> quantizations = {"none"};  // weight formats (apply_quantization)
  std::vector<int64_t> skinny_rows = {8};             // decode: CudaGemmTuning settings
  std::vector<int64_t> decode_splits = {0};           // decode: CudaFlashTuning::splits
  KvShape kv;        // page size and the head-aware profile (global fraction, W, sink)
  bool cpu = false;  // debugging: the same code on the CPU backend (try --shapes tiny)
};

[[noreturn]] void usage() {
  std::fprintf(
      stderr,
      "usage: cuda_model_bench [--shapes llama3-8b,mistral-7b] [--lengths 8192,32768]\n"
      "  [--chunks 4096,0] [--layers N] [--warmup 2] [--reps 3]\n"
      "  [--capacity SHAPE|none] [--capacity-tokens 32768] [--capacity-chunk 4096]\n"
      "  [--gpu-memory-fraction 0.9] [--global-fraction 0.15] [--window 512] "
      "[--sink 4]\n"
      "  [--reuse SHAPE|none] [--reuse-segments 8] [--reuse-segment-tokens 4096]\n"
      "  [--reuse-query-tokens 64] [--reuse-sparse 1|0] [--reuse-profile spread|deep|front] "
      "[--stage-profile 0|1]\n"
      "  [--decode SHAPE,...|none] [--decode-batch 1,16] [--decode-context 4096] "
      "[--decode-steps 32] [--skinny-rows 8,0] [--decode-splits 0,32]\n"
      "  [--quantization none,fp8] [--cpu]\n"
      "SHAPE: a preset (llama3-8b, mistral-7b, 1b, rag-7m, tiny) or a model_shapes "
      "name (%s)\n",
      model_shape_names().c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::vector<int64_t> split_ints(const std::string& s) {
  std::vector<int64_t> out;
  for (const std::string& x : split(s)) out.push_back(std::stoll(x));
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "-h" || k == "--help") usage();
    if (k == "--cpu") {
      a.cpu = true;
      continue;
    }
    if (i + 1 >= argc) usage();
    const std::string v = argv[++i];
    if (k == "--shapes")
      a.shapes = split(v);
    else if (k == "--lengths")
      a.lengths = split_ints(v);
    else if (k == "--chunks")
      a.chunks = split_ints(v);
    else if (k == "--layers")
      a.layers = std::stoll(v);
    else if (k == "--warmup")
      a.warmup = std::stoi(v);
    else if (k == "--reps")
      a.reps = std::stoi(v);
    else if (k == "--capacity")
      a.capacity_shape = v;
    else if (k == "--capacity-tokens")
      a.capacity_tokens = std::stoll(v);
    else if (k == "--capacity-chunk")
      a.capacity_chunk = std::stoi(v);
    else if (k == "--gpu-memory-fraction")
      a.gpu_memory_fraction = std::stod(v);
    else if (k == "--global-fraction")
      a.kv.global_fraction = std::stod(v);
    else if (k == "--window")
      a.kv.window = std::stoi(v);
    else if (k == "--sink")
      a.kv.sink = std::stoi(v);
    else if (k == "--reuse")
      a.reuse_shape = v;
    else if (k == "--reuse-segments")
      a.reuse_segments = std::stoi(v);
    else if (k == "--reuse-segment-tokens")
      a.reuse_segment_tokens = std::stoi(v);
    else if (k == "--reuse-query-tokens")
      a.reuse_query_tokens = std::stoi(v);
    else if (k == "--reuse-profile")
      a.reuse_profile = v;
    else if (k == "--reuse-sparse")
      a.reuse_sparse = std::stoi(v) != 0;
    else if (k == "--stage-profile")
      a.stage_profile = std::stoi(v) != 0;
    else if (k == "--decode")
      a.decode_shapes = v == "none" ? std::vector<std::string>{} : split(v);
    else if (k == "--decode-batch")
      a.decode_batches = split_ints(v);
    else if (k == "--decode-context")
      a.decode_context = std::stoll(v);
    else if (k == "--decode-steps")
      a.decode_steps = std::stoi(v);
    else if (k == "--skinny-rows")
      a.skinny_rows = split_ints(v);
    else if (k == "--decode-splits")
      a.decode_splits = split_ints(v);
    else if (k == "--quantization")
      a.quantizations = split(v);
    else
      usage();
  }
  if (a.reps < 1 || a.warmup < 0 || a.capacity_chunk <= 0 || a.layers < 0) usage();
  if (a.decode_context < 1 || a.decode_steps < 1) usage();
  for (int64_t b : a.decode_batches)
    if (b < 1) usage();
  if (a.skinny_rows.empty() || a.decode_splits.empty() || a.quantizations.empty()) usage();
  if (a.reuse_segments < 1 || a.reuse_segment_tokens < 1 || a.reuse_query_tokens < 1) usage();
  return a;
}

void cuda_ok(cudaError_t st, const char* what) {
  if (st != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(st));
}

struct MemInfo {
  double free_gib = 0, total_gib = 0;
};
MemInfo mem_info() {
  size_t f = 0, t = 0;
  if (cudaMemGetInfo(&f, &t) != cudaSuccess) cudaGetLastError();  // --cpu: no device
  return {static_cast<double>(f) / kGiB, static_cast<double>(t) / kGiB};
}

// ---- random weights, fast ----
// random_checkpoint() draws 8B values on one host thread (minutes). Instead every matrix is a
// view into one of a few host buffers of U(-a, a) bf16 values (a = 1/sqrt(fan_in) as in
// random_checkpoint; the embedding a = 1), filled by all host threads and pinned so that the
// upload runs at DMA speed. Each tensor starts at its own offset, so layers differ; the
// values only have to be finite and varied for timing.
class RandomWeights {
 public:
  explicit RandomWeights(const ModelConfig& cfg) : cfg_(cfg) {
    const int64_t H = cfg.hidden_size, F = cfg.intermediate_size;
    const int64_t q = cfg.num_heads * cfg.head_dim;
    // Largest matrix per fan-in (lm_head and embedding are [vocab, H]).
    need(H, std::max({cfg.vocab_size * H, F * H, q * H}));
    need(q, H * q);
    need(F, H * F);
    need(0, cfg.vocab_size * H);  // the embedding, amplitude 1
    uint64_t seed = 1;
    for (auto& [fan_in, buf] : bufs_) {
      buf.data = std::shared_ptr<uint16_t[]>(new uint16_t[buf.n + kMargin]);
      fill(buf.data.get(), buf.n + kMargin,
           fan_in > 0 ? 1.0f / std::sqrt(static_cast<float>(fan_in)) : 1.0f, seed++);
      // Pinned: cudaMemcpy from pageable memory stages through a bounce buffer (~3x slower).
      pinned_.push_back(cudaHostRegister(buf.data.get(), (buf.n + kMargin) * 2,
                                         cudaHostRegisterDefault) == cudaSuccess);
      if (!pinned_.back()) cudaGetLastError();
    }
    ones_ = std::shared_ptr<float[]>(new float[std::max(H, cfg.head_dim)]);
    std::fill(ones_.get(), ones_.get() + std::max(H, cfg.head_dim), 1.0f);
  }
  ~RandomWeights() {
    size_t i = 0;
    for (auto& [fan_in, buf] : bufs_)
      if (pinned_[i++]) cudaHostUnregister(buf.data.get());
  }
  RandomWeights(const RandomWeights&) = delete;
  RandomWeights& operator=(const RandomWeights&) = delete;

  // The checkpoint random_checkpoint() would make (same names and shapes), as views.
  Checkpoint checkpoint() {
    next_ = 0;  // the same weights every call
    Checkpoint ck;
    ck.path = "random model (bench)";
    ck.config = cfg_;
    const int64_t H = cfg_.hidden_size, F = cfg_.intermediate_size, hd = cfg_.head_dim;
    const int64_t q = cfg_.num_heads * hd, kv = cfg_.num_kv_heads * hd;
    ck.tensors["model.embed_tokens.weight"] = mat(0, cfg_.vocab_size, H);
    ck.tensors["model.norm.weight"] = ones(H);
    if (!cfg_.tie_word_embeddings) ck.tensors["lm_head.weight"] = mat(H, cfg_.vocab_size, H);
    for (int64_t l = 0; l < cfg_.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      ck.tensors[p + "input_layernorm.weight"] = ones(H);
      ck.tensors[p + "post_attention_layernorm.weight"] = ones(H);
      ck.tensors[p + "self_attn.q_proj.weight"] = mat(H, q, H);
      ck.tensors[p + "self_attn.k_proj.weight"] = mat(H, kv, H);
      ck.tensors[p + "self_attn.v_proj.weight"] = mat(H, kv, H);
      ck.tensors[p + "self_attn.o_proj.weight"] = mat(q, H, q);
      ck.tensors[p + "mlp.gate_proj.weight"] = mat(H, F, H);
      ck.tensors[p + "mlp.up_proj.weight"] = mat(H, F, H);
      ck.tensors[p + "mlp.down_proj.weight"] = mat(F, H, F);
      if (cfg_.qk_norm) {  // Qwen3: per-head RMSNorm weights [head_dim], as the loader expects
        ck.tensors[p + "self_attn.q_norm.weight"] = ones(hd);
        ck.tensors[p + "self_attn.k_norm.weight"] = ones(hd);
      }
      if (cfg_.attention_bias)
        throw Error("bench: attention biases not generated (no bench shape has them)");
    }
    return ck;
  }

 private:
  static constexpr int64_t kMargin = int64_t{1} << 22;  // offsets spread over 4M elements
  struct Buf {
    int64_t n = 0;
    std::shared_ptr<uint16_t[]> data;
  };

  void need(int64_t fan_in, int64_t n) { bufs_[fan_in].n = std::max(bufs_[fan_in].n, n); }

  static void fill(uint16_t* p, int64_t n, float amp, uint64_t seed) {
    const int threads = std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([=] {
        const int64_t b = n * t / threads, e = n * (t + 1) / threads;
        uint64_t x = (seed * 0x9E3779B97F4A7C15ull) ^ (uint64_t(t + 1) * 0xD1B54A32D192ED03ull);
        for (int64_t i = b; i < e; ++i) {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          const float u =
              static_cast<float>(static_cast<int32_t>(x >> 32)) * (1.0f / 2147483648.0f);
          p[i] = f32_to_bf16(amp * u);
        }
      });
    for (auto& th : pool) th.join();
  }

  // [rows, cols] bf16 view of the fan_in buffer at the next offset.
  Tensor mat(int64_t fan_in, int64_t rows, int64_t cols) {
    Buf& b = bufs_.at(fan_in);
    const int64_t off = (next_++ * 104729 * 64) % kMargin;  // 128-byte aligned, varied
    if (rows * cols + off > b.n + kMargin) throw Error("bench: weight buffer too small");
    return Tensor::view(b.data.get() + off, DType::BF16, {rows, cols},
                        std::shared_ptr<void>(b.data, b.data.get()));
  }
  // [n] f32 ones (norm weights).
  Tensor ones(int64_t n) {
    return Tensor::view(ones_.get(), DType::F32, {n}, std::shared_ptr<void>(ones_, ones_.get()));
  }

  ModelConfig cfg_;
  std::map<int64_t, Buf> bufs_;
  std::vector<bool> pinned_;
  std::shared_ptr<float[]> ones_;
  int64_t next_ = 0;
};

// preset_config first, so that the shapes it knows keep the configs of earlier results; any
// other name from the real config.json table (`layers` > 0 overrides the layer count).
ModelConfig shape_config(const std::string& name, int64_t layers) {
  ModelConfig c;
  try {
    c = preset_config(name);
  } catch (const Error& preset) {
    try {  // model_shape_config throws, listing its names, when it does not know `name` either
      return parse_hf_config(model_shape_config(name, layers), name);
    } catch (const Error& table) {
      throw Error(std::string(preset.what()) + "; " + table.what());
    }
  }
  if (layers > 0) c.num_layers = layers;
  return c;
}

std::string chunk_name(int64_t chunk) { return chunk > 0 ? std::to_string(chunk) : "whole"; }

struct TtftRow {
  std::string shape, weights = "bf16";
  int64_t T = 0, chunk = 0;
  double ms = 0, min_ms = 0, tflops = 0;
  std::string error;
};

struct CapacityRow {
  std::string shape, profile;
  double global_share = 0, pool_gib = 0, free_gib = 0, bytes_per_session = 0, fill_s = 0;
  int64_t measured = 0, ideal = 0, pages = 0;
};

// One prefill of `ids` into sequence 0 of `kv` in chunks (0: one forward); returns ms to the
// host logits of the last token. The sequence is removed afterwards.
double prefill_ms(Model& model, PagedKvCache& kv, const std::vector<int32_t>& ids, int64_t chunk) {
  const int64_t T = static_cast<int64_t>(ids.size());
  const int64_t step = chunk > 0 ? chunk : T;
  model.backend().synchronize();
  kv.add_sequence(0);
  const auto t0 = Clock::now();
  Tensor logits;
  for (int64_t s = 0; s < T; s += step) {
    const int64_t e = std::min(T, s + step);
    Batch b;
    b.add_sequence(0, std::vector<int32_t>(ids.begin() + s, ids.begin() + e),
                   static_cast<int32_t>(s), /*last_logits=*/e == T);
    logits = model.forward(b, kv);
  }
  const double ms = seconds_since(t0) * 1e3;  // forward returns host logits: the work is done
  kv.remove_sequence(0);
  if (logits.numel() != model.config().vocab_size) throw Error("bench: no logits returned");
  for (int64_t i = 0; i < logits.numel(); ++i)
    if (!std::isfinite(logits.data<float>()[i])) throw Error("bench: non-finite logits");
  return ms;
}

// Appends a row per (length, chunk) to `rows` as it goes (a failure keeps the rows before it).
void run_ttft(Model& model, const std::string& shape, const Args& a, std::vector<TtftRow>& rows) {
  const ModelConfig& cfg = model.config();
  Backend& backend = model.backend();
  const int32_t ps = a.kv.page_size, hd = static_cast<int32_t>(cfg.head_dim);
  const HeadProfile dense(static_cast<int32_t>(cfg.num_layers),
                          static_cast<int32_t>(cfg.num_kv_heads));
  for (int64_t T : a.lengths) {
    std::vector<int32_t> ids(T);
    uint64_t x = 88172645463325252ull + T;
    for (auto& id : ids) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      id = static_cast<int32_t>(x % static_cast<uint64_t>(cfg.vocab_size));
    }
    const double flops = prefill_flops(cfg, dense, 0, T, 1).total();
    // The pool holds one T-token session, all heads global (kv_bytes_for adds page slack).
    const int32_t n_pages =
        PagePool::pages_for_bytes(kv_bytes_for(model, ps, T), ps, hd, backend.act_dtype());
    PagePool pool(backend, n_pages, ps, hd);
    PagedKvOptions po;
    po.scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
    PagedKvCache kv(pool, dense, po, model.inv_freq());
    for (int64_t chunk : a.chunks) {
      TtftRow r;
      r.shape = shape, r.T = T, r.chunk = chunk;
      try {
        for (int i = 0; i < a.warmup; ++i) prefill_ms(model, kv, ids, chunk);
        std::vector<double> t;
        for (int i = 0; i < a.reps; ++i) t.push_back(prefill_ms(model, kv, ids, chunk));
        r.ms = median(t);
        r.min_ms = *std::min_element(t.begin(), t.end());
        r.tflops = flops / (r.ms * 1e-3) / 1e12;
      } catch (const std::exception& e) {
        r.error = e.what();
        if (kv.has_sequence(0)) kv.remove_sequence(0);
      }
      std::printf("ttft %s T=%lld chunk=%s: %s%.1f ms (min %.1f), %.0f TFLOP/s\n", shape.c_str(),
                  static_cast<long long>(T), chunk_name(chunk).c_str(),
                  r.error.empty() ? "" : ("FAILED: " + r.error + " ").c_str(), r.ms, r.min_ms,
                  r.tflops);
      std::fflush(stdout);
      rows.push_back(r);
    }
  }
}

std::vector<CapacityRow> run_capacity(Model& model, const std::string& shape, const Args& a) {
  const ModelConfig& cfg = model.config();
  Backend& backend = model.backend();
  const int32_t ps = a.kv.page_size, hd = static_cast<int32_t>(cfg.head_dim);
  const int32_t L = static_cast<int32_t>(cfg.num_layers),
                Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  backend.synchronize();
  const double free_b = static_cast<double>(backend.free_memory_bytes());
  const int64_t budget = static_cast<int64_t>(a.gpu_memory_fraction * free_b);
  const int32_t pages = PagePool::pages_for_bytes(budget, ps, hd, backend.act_dtype());
  PagePool pool(backend, pages, ps, hd);  // device storage: K, V and positions of every page
  const int64_t pool_bytes = int64_t{pool.num_pages()} * pool.bytes_per_page();
  // What every layer writes per chunk; zeros (the values do not change what fits).
  Tensor k = backend.alloc(backend.act_dtype(), {a.capacity_chunk, Hkv, hd});
  Tensor v = backend.alloc(backend.act_dtype(), {a.capacity_chunk, Hkv, hd});
  std::vector<CapacityRow> rows;
  for (int variant = 0; variant < 2; ++variant) {
    HeadProfile profile =
        variant == 0 ? HeadProfile(L, Hkv)
                     : spread_profile(L, Hkv, a.kv.global_fraction, a.kv.window, a.kv.sink);
    CapacityRow r;
    r.shape = shape;
    r.profile = variant == 0 ? "all-global"
                             : "head-aware W=" + std::to_string(a.kv.window) +
                                   " s=" + std::to_string(a.kv.sink);
    r.global_share = profile.global_fraction();
    r.free_gib = free_b / kGiB;
    r.pool_gib = static_cast<double>(pool_bytes) / kGiB;
    r.pages = pool.num_pages();
    r.ideal =
        sessions_that_fit(profile, a.capacity_tokens, pool_bytes, ps, hd, backend.act_dtype());
    PagedKvOptions po;
    po.scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
    PagedKvCache cache(pool, profile, po, model.inv_freq());
    const auto t0 = Clock::now();
    r.measured = fill_sessions(cache, backend, a.capacity_tokens, a.capacity_chunk, k, v);
    backend.synchronize();
    r.fill_s = seconds_since(t0);
    const KvUsage u = cache.usage();
    r.bytes_per_session = r.measured > 0 ? static_cast<double>(u.global_pages + u.local_pages) *
                                               pool.bytes_per_page() / r.measured
                                         : 0;
    std::printf("capacity %s %s: %lld sessions (ideal %lld) in %.1f s\n", shape.c_str(),
                r.profile.c_str(), static_cast<long long>(r.measured),
                static_cast<long long>(r.ideal), r.fill_s);
    std::fflush(stdout);
    rows.push_back(r);
  }  // the cache returns its pages before the next profile fills the same pool
  return rows;
}

// ---- reuse: RedKnot vs our full mode on a segmented prompt ----
struct ReuseRow {
  std::string shape, profile;
  int64_t T = 0, segments = 0, segment_tokens = 0, query_tokens = 0, reused = 0;
  double global_share = 0;
  int64_t layers = 0;
  int last_global_layer = -1;  // the profile's deepest layer with a global head
  int64_t dead_tail = 0;       // dead_row_split().tail of the recomputed rows (0: no split)
  double offline_s = 0;
  // Medians over --reps: PrefillOutcome::ms and our own timer (sync before, host logits after).
  double redknot_ms = 0, redknot_wall_ms = 0, sparse_ms = 0, sparse_wall_ms = 0;
  double full_ms = 0, full_wall_ms = 0;
  double redknot_flops = 0, sparse_flops = 0, full_flops = 0;  // online work, one prefill
  double top1_redknot = -1, top1_sparse = -1;  // argmax equal to full's (random weights)
  std::vector<std::string> errors;
};

int argmax_of(const std::vector<float>& v) {
  return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
}

void check_logits(const std::vector<float>& l, int64_t vocab) {
  if (static_cast<int64_t>(l.size()) != vocab) throw Error("bench: no logits returned");
  for (float x : l)
    if (!std::isfinite(x)) throw Error("bench: non-finite logits");
}

// Each part (redknot, redknot + sparse, full) runs under its own try, so one failing leaves the
// others' numbers; the pool, caches and chunk store go when this returns.
ReuseRow run_reuse(Model& model, const std::string& shape, const Args& a) {
  const ModelConfig& cfg = model.config();
  Backend& backend = model.backend();
  const int32_t ps = a.kv.page_size, hd = static_cast<int32_t>(cfg.head_dim);
  const int32_t L = static_cast<int32_t>(cfg.num_layers),
                Hkv = static_cast<int32_t>(cfg.num_kv_heads);
  ReuseRow r;
  r.shape = shape, r.layers = L;
  r.segments = a.reuse_segments, r.segment_tokens = a.reuse_segment_tokens;
  r.query_tokens = a.reuse_query_tokens;

  // The prompt: segment 0 starts with BOS (id 1); ids < vocab, fixed seed.
  SegmentedPrompt prompt;
  uint64_t x = 0x2545F4914F6CDD1Dull;
  auto next_id = [&] {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    return static_cast<int32_t>(2 + x % static_cast<uint64_t>(cfg.vocab_size - 2));
  };
  for (int32_t s = 0; s < a.reuse_segments; ++s) {
    std::vector<int32_t> seg(a.reuse_segment_tokens);
    for (auto& id : seg) id = next_id();
    if (s == 0) seg[0] = 1;
    prompt.segments.push_back(std::move(seg));
  }
  prompt.query.resize(a.reuse_query_tokens);
  for (auto& id : prompt.query) id = next_id();
  r.T = prompt.total_tokens();

  // spread: kv_bench's profile (global heads in every layer, one in the last); deep: as many
  // global heads in the last quarter of the layers (make_layout_profile, what `redknot
  // make-profile --layout deep` writes; real models' maps look like it); front: as many packed
  // into the first layers (dead-row skipping then drops the later layers of the documents).
  HeadProfile profile = spread_profile(L, Hkv, a.kv.global_fraction, a.kv.window, a.kv.sink);
  if (a.reuse_profile == "deep") {
    LayoutProfileOptions lo;
    lo.layout = "deep", lo.ratio = a.kv.global_fraction, lo.window = a.kv.window,
    lo.sink = a.kv.sink;
    profile = make_layout_profile(cfg, lo);
  } else if (a.reuse_profile == "front") {
    const int64_t n_global = std::llround(a.kv.global_fraction * L * Hkv);
    for (int64_t i = 0; i < int64_t{L} * Hkv; ++i) {
      HeadSpec& h = profile.at(static_cast<int32_t>(i / Hkv), static_cast<int32_t>(i % Hkv));
      h = HeadSpec{};
      if (i >= n_global) h.cls = HeadClass::Local, h.window = a.kv.window, h.sink = a.kv.sink;
    }
  } else if (a.reuse_profile != "spread") {
    throw Error("bench: --reuse-profile is spread, deep or front");
  }
  r.global_share = profile.global_fraction();
  r.profile =
      a.reuse_profile + " W=" + std::to_string(a.kv.window) + " s=" + std::to_string(a.kv.sink);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < Hkv; ++h)
      if (profile.at(l, h).cls == HeadClass::Global) r.last_global_layer = l;
  r.dead_tail =
      dead_row_split(cfg, profile, a.reuse_segment_tokens, r.T - a.reuse_segment_tokens).tail;
  const std::string split_note =
      r.dead_tail > 0
          ? ", dead-row split: the last " + std::to_string(r.dead_tail) + " rows run every layer"
      : r.last_global_layer == L - 1
          ? " (a global head in the last layer: no dead-row split, skip_dead_rows does nothing)"
          : " (too few rows for a dead-row split)";
  std::printf(
      "# reuse %s: T=%lld (%d x %d + %d query), %s, %.1f%% global heads, last global layer %d of "
      "%d%s\n",
      shape.c_str(), static_cast<long long>(r.T), a.reuse_segments, a.reuse_segment_tokens,
      a.reuse_query_tokens, r.profile.c_str(), 100.0 * r.global_share, r.last_global_layer, L,
      split_note.c_str());
  std::fflush(stdout);

  // One pool: the chunk store (all-global, every segment), the head-aware request and the
  // all-global full request (kv_bytes_for adds page slack).
  const int64_t store_bytes = kv_bytes_for(model, ps, a.reuse_segment_tokens, a.reuse_segments);
  const int64_t request_bytes = kv_bytes_for(model, ps, r.T);
  const int32_t n_pages =
      PagePool::pages_for_bytes(store_bytes + 2 * request_bytes, ps, hd, backend.act_dtype());
  PagePool pool(backend, n_pages, ps, hd);
  PagedKvOptions po;
  po.scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  PagedKvCache kv(pool, profile, po, model.inv_freq());
  PagedKvCache dense_kv(pool, HeadProfile(L, Hkv), po, model.inv_freq());
  ChunkStoreOptions cso;
  cso.pool_budget_bytes = store_bytes;
  ChunkStore chunks(model, pool, cso);
  std::printf("# reuse %s: pool %.2f GiB (%d pages; chunk store %.2f GiB)\n", shape.c_str(),
              static_cast<double>(n_pages) * pool.bytes_per_page() / kGiB, n_pages,
              static_cast<double>(store_bytes) / kGiB);

  // Offline (untimed): every segment prefilled alone into the chunk store.
  {
    const auto t0 = Clock::now();
    for (const auto& seg : prompt.segments) {
      if (!acquire_or_prefill(model, chunks, seg))
        throw Error("bench: the chunk store did not admit a segment");
    }
    backend.synchronize();
    r.offline_s = seconds_since(t0);
    const ChunkStoreStats st = chunks.stats();
    std::printf(
        "# reuse %s: %lld segments cached offline in %.1f s (pool tier %lld entries, "
        "%.2f GiB)\n",
        shape.c_str(), static_cast<long long>(st.pool.entries), r.offline_s,
        static_cast<long long>(st.pool.entries), static_cast<double>(st.pool.bytes) / kGiB);
    std::fflush(stdout);
  }

  const FlopsLedger full_ledger = prefill_flops(cfg, HeadProfile::native(cfg), 0, r.T, 1);
  r.full_flops = full_ledger.total();

  // One timed prefill into a fresh sequence 0 of `cache`; the sequence is removed afterwards.
  auto once = [&](PagedKvCache& cache, const ReuseOptions& ro, double* wall_ms) {
    backend.synchronize();
    const auto t0 = Clock::now();
    PrefillOutcome got = prefill_with_reuse(model, cache, 0, prompt, &chunks, ro);
    backend.synchronize();
    *wall_ms = seconds_since(t0) * 1e3;
    cache.remove_sequence(0);
    check_logits(got.last_logits, cfg.vocab_size);
    return got;
  };
  std::vector<float> full_logits;
  auto part = [&](const char* name, PagedKvCache& cache, const ReuseOptions& ro, double& ms,
                  double& wall_ms, double& flops) {
    try {
      PrefillOutcome got;
      double w = 0;
      for (int i = 0; i < a.warmup; ++i) once(cache, ro, &w);
      std::vector<double> t, tw;
      for (int i = 0; i < a.reps; ++i) {
        got = once(cache, ro, &w);
        t.push_back(got.ms);
        tw.push_back(w);
      }
      ms = median(t), wall_ms = median(tw), flops = got.flops.total();
      if (a.stage_profile) {  // after the timed reps: the syncs per stage slow this one down
        StageTimes st;
        ReuseOptions po = ro;
        po.stage_times = &st;
        double pw = 0;
        once(cache, po, &pw);
        std::printf("stages %s %s T=%lld (wall %.1f ms, a sync after each stage):\n", shape.c_str(),
                    name, static_cast<long long>(r.T), pw);
        for (const auto& [stage, v] : st.ms)
          std::printf("  %-20s %8.1f ms  %5.1f%%  (%lld marks)\n", stage.c_str(), v, 100.0 * v / pw,
                      static_cast<long long>(st.calls[stage]));
        std::printf("  %-20s %8.1f ms\n", "(outside stages)", pw - st.total());
      }
      if (ro.mode == ReuseMode::Full) {
        full_logits = got.last_logits;
      } else {
        // prefill_with_reuse falls back to a dense prefill when a segment is unavailable.
        if (got.reused_tokens != a.reuse_segment_tokens)
          throw Error("reused " + std::to_string(got.reused_tokens) + " tokens, expected " +
                      std::to_string(a.reuse_segment_tokens) + " (fell back to full?)");
        r.reused = got.reused_tokens;
        const double top1 =
            full_logits.empty() ? -1 : (argmax_of(full_logits) == argmax_of(got.last_logits));
        (ro.sparse_ffn_enabled ? r.top1_sparse : r.top1_redknot) = top1;
      }
      std::printf("reuse %s %s T=%lld: %.1f ms (wall %.1f ms), %.3g FLOPs (%.1f%% of full)\n",
                  shape.c_str(), name, static_cast<long long>(r.T), ms, wall_ms, flops,
                  100.0 * flops / r.full_flops);
    } catch (const std::exception& e) {
      if (cache.has_sequence(0)) cache.remove_sequence(0);
      r.errors.push_back(std::string(name) + ": " + e.what());
      std::printf("reuse %s %s FAILED: %s\n", shape.c_str(), name, e.what());
    }
    std::fflush(stdout);
  };
  ReuseOptions full_opts;
  full_opts.mode = ReuseMode::Full;
  full_opts.chunk = 4096;
  part("full", dense_kv, full_opts, r.full_ms, r.full_wall_ms, r.full_flops);
  r.full_flops = full_ledger.total();  // the analytic count of the whole prompt
  ReuseOptions rk;
  rk.mode = ReuseMode::RedKnot;
  rk.sparse_ffn_enabled = false;
  part("redknot", kv, rk, r.redknot_ms, r.redknot_wall_ms, r.redknot_flops);
  if (a.reuse_sparse) {
    rk.sparse_ffn_enabled = true;
    part("redknot+sparse-ffn", kv, rk, r.sparse_ms, r.sparse_wall_ms, r.sparse_flops);
  }
  const ChunkStoreStats st = chunks.stats();
  std::printf("# reuse %s: chunk store pool hits %lld, misses %lld, bypasses %lld\n", shape.c_str(),
              static_cast<long long>(st.pool_hits), static_cast<long long>(st.misses),
              static_cast<long long>(st.bypasses));
  return r;  // chunk store, caches, then the pool go in reverse order of construction
}

// ---- decode: recorded steps (CUDA graphs) vs eager ----
struct DecodeRow {
  std::string shape, weights = "bf16";
  int64_t batch = 0, context = 0, steps = 0, skinny_rows = 0, splits = 0;
  double step_bytes = 0;              // weights (but the embedding) + KV read by one step
  double eager_ms = 0, graph_ms = 0;  // medians per step (host logits of every sequence)
  double greedy_ms = 0;               // graphs, argmax on the device (ids to the host)
  double plan_ms = 0;                 // of greedy_ms: the host's KV planning (median)
  double max_diff = 0;                // |logits| difference of one step run both ways
  bool argmax_equal = false;
  int64_t recorded = 0;
  std::string error;
};

void print_decode(const DecodeRow& r) {
  std::printf(
      "decode %s %s batch=%lld context=%lld skinny=%lld splits=%lld: %seager %.3f ms/step, "
      "graphs %.3f ms/step, graphs + device argmax %.3f ms/step, max |dlogit| %.3g, "
      "argmax %s\n",
      r.shape.c_str(), r.weights.c_str(), static_cast<long long>(r.batch),
      static_cast<long long>(r.context), static_cast<long long>(r.skinny_rows),
      static_cast<long long>(r.splits), r.error.empty() ? "" : ("FAILED: " + r.error + " ").c_str(),
      r.eager_ms, r.graph_ms, r.greedy_ms, r.max_diff, r.argmax_equal ? "equal" : "DIFFERS");
  std::fflush(stdout);
}

// Device-to-device copy bandwidth (bytes read + written per second), median of 5 copies of 2 GiB.
double copy_bandwidth_gbs() {
  const size_t bytes = size_t{2} << 30;
  void *src = nullptr, *dst = nullptr;
  cuda_ok(cudaMalloc(&src, bytes), "cudaMalloc");
  cuda_ok(cudaMalloc(&dst, bytes), "cudaMalloc");
  cuda_ok(cudaMemset(src, 1, bytes), "cudaMemset");
  std::vector<double> t;
  for (int i = 0; i < 6; ++i) {
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    const auto t0 = Clock::now();
    cuda_ok(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy");
    cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    if (i > 0) t.push_back(seconds_since(t0));
  }
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * static_cast<double>(bytes) / median(t) / 1e9;
}

std::vector<DecodeRow> run_decode(Model& model, const std::string& shape,
                                  const std::string& weights, const Args& a) {
  const ModelConfig& cfg = model.config();
  Backend& backend = model.backend();
  const int32_t ps = a.kv.page_size, hd = static_cast<int32_t>(cfg.head_dim);
  const HeadProfile dense(static_cast<int32_t>(cfg.num_layers),
                          static_cast<int32_t>(cfg.num_kv_heads));
  const int64_t vocab = cfg.vocab_size;
  std::vector<DecodeRow> rows;
  for (int64_t B : a.decode_batches) {
    DecodeRow r;
    r.shape = shape, r.weights = weights, r.batch = B, r.context = a.decode_context,
    r.steps = a.decode_steps;
    try {
      const int64_t tokens = a.decode_context + 4 * int64_t{a.decode_steps} + 64;
      const int32_t n_pages = PagePool::pages_for_bytes(kv_bytes_for(model, ps, tokens) * B, ps, hd,
                                                        backend.act_dtype());
      PagePool pool(backend, n_pages, ps, hd);
      PagedKvOptions po;
      po.scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
      PagedKvCache kv(pool, dense, po, model.inv_freq());
      std::vector<int32_t> next(B);
      uint64_t x = 0x2545F4914F6CDD1Dull;
      auto argmax_row = [&](const Tensor& l, int64_t i) {
        const float* p = l.data<float>() + i * vocab;
        return static_cast<int32_t>(std::max_element(p, p + vocab) - p);
      };
      for (int64_t s = 0; s < B; ++s) {
        std::vector<int32_t> ids(a.decode_context);
        for (auto& id : ids) {
          x ^= x << 13, x ^= x >> 7, x ^= x << 17;
          id = static_cast<int32_t>(x % static_cast<uint64_t>(vocab));
        }
        kv.add_sequence(static_cast<SeqId>(s));
        Tensor l;
        for (int64_t c = 0; c < a.decode_context; c += 4096) {
          const int64_t e = std::min<int64_t>(a.decode_context, c + 4096);
          Batch b;
          b.add_sequence(static_cast<SeqId>(s),
                         std::vector<int32_t>(ids.begin() + c, ids.begin() + e),
                         static_cast<int32_t>(c), e == a.decode_context);
          l = model.forward(b, kv);
        }
        next[s] = argmax_row(l, 0);
      }
      auto batch = [&] {
        Batch b;
        for (int64_t s = 0; s < B; ++s)
          b.add_sequence(static_cast<SeqId>(s), {next[s]}, kv.next_position(static_cast<SeqId>(s)));
        return b;
      };
      // One greedy step (mode 0: eager, 1: graphs, 2: graphs + device argmax); returns ms to
      // the host logits (or ids).
      double plan_ms = 0;  // the last step's host planning (ForwardOptions::host_plan_ms)
      auto step = [&](int mode) {
        model.set_decode_graphs(mode >= 1);
        const Batch b = batch();
        backend.synchronize();
        plan_ms = 0;
        ForwardOptions fo;
        fo.host_plan_ms = &plan_ms;
        const auto t0 = Clock::now();
        if (mode == 2) {
          const std::vector<int32_t> ids = model.forward_greedy(b, kv, fo);
          const double ms = seconds_since(t0) * 1e3;
          for (int64_t s = 0; s < B; ++s) next[s] = ids.at(s);
          return ms;
        }
        Tensor l = model.forward(b, kv);
        const double ms = seconds_since(t0) * 1e3;
        for (int64_t s = 0; s < B; ++s) next[s] = argmax_row(l, s);
        return ms;
      };
      // The same step both ways: eager, then its token removed and the step replayed.
      {
        const Batch b = batch();
        Tensor le, lg;
        model.set_decode_graphs(false);
        le = model.forward(b, kv);
        for (int64_t s = 0; s < B; ++s) {
          const int32_t p = b.positions[s];
          kv.remove(static_cast<SeqId>(s), p, p + 1);
        }
        model.set_decode_graphs(true);
        lg = model.forward(b, kv);
        r.argmax_equal = true;
        for (int64_t s = 0; s < B; ++s) {
          r.argmax_equal = r.argmax_equal && argmax_row(le, s) == argmax_row(lg, s);
          next[s] = argmax_row(lg, s);
        }
        for (int64_t i = 0; i < le.numel(); ++i) {
          const double d = std::fabs(double(le.data<float>()[i]) - lg.data<float>()[i]);
          if (!std::isfinite(d)) throw Error("bench: non-finite decode logits");
          r.max_diff = std::max(r.max_diff, d);
        }
      }
      if (a.stage_profile) {  // one eager step with a sync after each stage
        model.set_decode_graphs(false);
        StageTimes st;
        ForwardOptions fo;
        fo.stage_times = &st;
        const Batch b = batch();
        backend.synchronize();
        const auto t0 = Clock::now();
        Tensor l = model.forward(b, kv, fo);
        const double wall = seconds_since(t0) * 1e3;
        for (int64_t s = 0; s < B; ++s) next[s] = argmax_row(l, s);
        std::printf("stages decode %s %s batch=%lld (wall %.3f ms, a sync after each stage):\n",
                    shape.c_str(), weights.c_str(), static_cast<long long>(B), wall);
        for (const auto& [stage, v] : st.ms)
          std::printf("  %-20s %8.3f ms  %5.1f%%\n", stage.c_str(), v, 100.0 * v / wall);
      }
      // What a step must read: every weight but an untied embedding table (one row per token;
      // a tied one is the lm_head, read whole), and the K/V of the context of every sequence.
      const double act_bytes = static_cast<double>(dtype_bytes(backend.act_dtype(), 1));
      const double embedding =
          cfg.tie_word_embeddings ? 0.0 : static_cast<double>(cfg.vocab_size) * cfg.hidden_size;
      r.step_bytes = static_cast<double>(model.weight_bytes()) - embedding * act_bytes +
                     static_cast<double>(B) * a.decode_context *
                         static_cast<double>(cfg.num_layers) * cfg.num_kv_heads * cfg.head_dim *
                         2.0 * act_bytes;
      for (int64_t skinny : a.skinny_rows)
        for (int64_t splits : a.decode_splits) {
          DecodeRow rs = r;
          rs.skinny_rows = skinny, rs.splits = splits;
          // A new setting re-records the graphs: mode 0 drops the recordings of the last one.
          if (!a.cpu) {
            CudaGemmTuning gt = CudaGemmTuning::from_env();
            gt.skinny_max_rows = skinny;
            set_cuda_gemm_tuning(backend, gt);
            CudaFlashTuning ft = CudaFlashTuning::from_env();
            ft.splits = static_cast<int>(splits);
            set_cuda_flash_tuning(backend, ft);
          }
          for (int mode = 0; mode < 3; ++mode) {
            for (int i = 0; i < 3; ++i) step(mode);  // warm-up (and any re-recording)
            std::vector<double> t, plan;
            for (int i = 0; i < a.decode_steps; ++i) {
              t.push_back(step(mode));
              plan.push_back(plan_ms);
            }
            (mode == 0 ? rs.eager_ms : mode == 1 ? rs.graph_ms : rs.greedy_ms) = median(t);
            if (mode == 2) rs.plan_ms = median(plan);
          }
          rs.recorded = model.decode_graph_stats().recorded;
          print_decode(rs);
          rows.push_back(rs);
        }
      model.set_decode_graphs(false);  // drops the recordings (their plan storage) with the cache
      if (!a.cpu) {
        set_cuda_gemm_tuning(backend, CudaGemmTuning::from_env());
        set_cuda_flash_tuning(backend, CudaFlashTuning::from_env());
      }
    } catch (const std::exception& e) {
      r.error = e.what();
      model.set_decode_graphs(false);
      print_decode(r);
      rows.push_back(r);
    }
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  int count = 0;
  if (!a.cpu && (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)) {
    std::fprintf(stderr, "cuda_model_bench: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop{};
  if (a.cpu)
    std::snprintf(prop.name, sizeof(prop.name), "CPU backend (--cpu: a logic check only)");
  else
    cuda_ok(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  register_builtin_backends();
  const MemInfo m0 = mem_info();
  std::printf("# cuda_model_bench: %s (sm_%d%d, %d SMs), %.1f GiB total, %.1f GiB free at start\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount, m0.total_gib,
              m0.free_gib);
  std::printf(
      "# bf16 random weights; ttft: all heads global, batch 1, last-token logits, warm-up %d, "
      "median of %d; page %d\n",
      a.warmup, a.reps, a.kv.page_size);

  std::vector<std::string> shapes = a.shapes;
  if (a.capacity_shape != "none" &&
      std::find(shapes.begin(), shapes.end(), a.capacity_shape) == shapes.end())
    shapes.push_back(a.capacity_shape);
  if (a.reuse_shape != "none" &&
      std::find(shapes.begin(), shapes.end(), a.reuse_shape) == shapes.end())
    shapes.push_back(a.reuse_shape);
  for (const std::string& d : a.decode_shapes)
    if (std::find(shapes.begin(), shapes.end(), d) == shapes.end()) shapes.push_back(d);
  const std::set<std::string> ttft_shapes(a.shapes.begin(), a.shapes.end());

  std::vector<TtftRow> ttft;
  std::vector<CapacityRow> cap;
  std::vector<ReuseRow> reuse;
  std::vector<DecodeRow> decode;
  std::vector<std::string> errors;
  for (const std::string& shape : shapes) {
    try {
      const ModelConfig cfg = shape_config(shape, a.layers);
      auto t0 = Clock::now();
      RandomWeights rw(cfg);  // host buffers, reused by both phases
      std::printf(
          "## %s: %lld layers, hidden %lld, %lld q / %lld kv heads x %lld, ffn %lld, vocab %lld, "
          "rope theta %g%s%s; %.2fB params (host weights made in %.1f s)\n",
          shape.c_str(), static_cast<long long>(cfg.num_layers),
          static_cast<long long>(cfg.hidden_size), static_cast<long long>(cfg.num_heads),
          static_cast<long long>(cfg.num_kv_heads), static_cast<long long>(cfg.head_dim),
          static_cast<long long>(cfg.intermediate_size), static_cast<long long>(cfg.vocab_size),
          cfg.rope_theta,
          cfg.rope_scaling.type == "none" ? "" : (" " + cfg.rope_scaling.type).c_str(),
          cfg.qk_norm ? ", qk norm" : "", static_cast<double>(count_parameters(cfg)) / 1e9,
          seconds_since(t0));
      // Each phase gets a fresh backend, so that neither sees the other's cached blocks: the
      // capacity pool is sized from what the weights alone leave, as serve does at start.
      auto phase = [&](const std::string& what, const std::string& quantization, auto&& body) {
        try {
          const auto t1 = Clock::now();
          std::unique_ptr<Backend> backend = a.cpu ? create_backend("cpu") : make_cuda_backend(0);
          {
            std::unique_ptr<Model> model;
            {
              Checkpoint ck = rw.checkpoint();
              apply_quantization(ck, quantization);
              model = std::make_unique<Model>(ck, *backend);
              backend->synchronize();
            }
            const MemInfo m = mem_info();
            std::printf("# %s %s: weights %.2f GiB uploaded in %.1f s, %.1f of %.1f GiB free\n",
                        shape.c_str(), what.c_str(),
                        static_cast<double>(model->weight_bytes()) / kGiB, seconds_since(t1),
                        m.free_gib, m.total_gib);
            std::fflush(stdout);
            body(*model);
            const CudaAllocStats st = a.cpu ? CudaAllocStats{} : cuda_alloc_stats(*backend);
            std::printf("# %s %s: the backend held %.2f GiB at the end (%lld cudaMalloc)\n",
                        shape.c_str(), what.c_str(), static_cast<double>(st.reserved) / kGiB,
                        static_cast<long long>(st.mallocs));
          }  // the model (weights) goes first, then the backend with its cached blocks
        } catch (const std::exception& e) {
          errors.push_back(shape + " " + what + ": " + e.what());
          std::printf("%s %s FAILED: %s\n", shape.c_str(), what.c_str(), e.what());
        }
        std::fflush(stdout);
      };
      const std::string& first_q = a.quantizations.front();
      if (shape == a.capacity_shape)
        phase("capacity", first_q, [&](Model& model) {
          for (CapacityRow& r : run_capacity(model, shape, a)) cap.push_back(r);
        });
      for (const std::string& q : a.quantizations) {
        const std::string weights = q == "none" ? "bf16" : q;
        if (ttft_shapes.count(shape))
          phase("ttft " + weights, q, [&](Model& model) {
            const size_t first = ttft.size();
            run_ttft(model, shape, a, ttft);
            for (size_t i = first; i < ttft.size(); ++i) {
              ttft[i].weights = weights;
              if (!ttft[i].error.empty()) errors.push_back(shape + " ttft: " + ttft[i].error);
            }
          });
        if (shape == a.reuse_shape && q == first_q)
          phase("reuse", q, [&](Model& model) {
            reuse.push_back(run_reuse(model, shape, a));
            for (const std::string& e : reuse.back().errors)
              errors.push_back(shape + " reuse " + e);
          });
        if (std::find(a.decode_shapes.begin(), a.decode_shapes.end(), shape) !=
            a.decode_shapes.end())
          phase("decode " + weights, q, [&](Model& model) {
            for (DecodeRow& r : run_decode(model, shape, weights, a)) {
              if (!r.error.empty()) errors.push_back(shape + " decode: " + r.error);
              decode.push_back(r);
            }
          });
      }
    } catch (const std::exception& e) {
      errors.push_back(shape + ": " + e.what());
      std::printf("%s FAILED: %s\n", shape.c_str(), e.what());
    }
    std::fflush(stdout);
  }

  std::printf("\n## TTFT (RedKnot, CUDA backend, paged KV, all heads global)\n\n");
  std::printf("| shape | weights | T | chunk | TTFT ms | TFLOP/s |\n|---|---|---|---|---|---|\n");
  for (const TtftRow& r : ttft) {
    if (!r.error.empty()) continue;
    std::printf("| %s | %s | %lld | %s | %.1f | %.0f |\n", r.shape.c_str(), r.weights.c_str(),
                static_cast<long long>(r.T), chunk_name(r.chunk).c_str(), r.ms, r.tflops);
  }
  if (!cap.empty()) {
    std::printf(
        "\n## Capacity (RedKnot, device page pool = %.2f x free after weights; sessions of %lld "
        "tokens, prefilled in chunks of %d)\n\n",
        a.gpu_memory_fraction, static_cast<long long>(a.capacity_tokens), a.capacity_chunk);
    std::printf(
        "| shape | profile | global heads | free GiB | pool GiB | measured sessions | ideal "
        "sessions | measured/ideal | GiB/session | fill s |\n|---|---|---|---|---|---|---|---|---|"
        "---|\n");
    for (const CapacityRow& r : cap)
      std::printf("| %s | %s | %.1f%% | %.1f | %.1f | %lld | %lld | %.3f | %.3f | %.1f |\n",
                  r.shape.c_str(), r.profile.c_str(), 100.0 * r.global_share, r.free_gib,
                  r.pool_gib, static_cast<long long>(r.measured), static_cast<long long>(r.ideal),
                  r.ideal > 0 ? static_cast<double>(r.measured) / r.ideal : 0.0,
                  r.bytes_per_session / kGiB, r.fill_s);
    if (cap.size() == 2 && cap[0].measured > 0 && cap[0].ideal > 0)
      std::printf(
          "\ncapacity ratio head-aware / all-global: measured %.2fx (%lld / %lld), ideal %.2fx "
          "(bar >= 5x)\n",
          static_cast<double>(cap[1].measured) / cap[0].measured,
          static_cast<long long>(cap[1].measured), static_cast<long long>(cap[0].measured),
          static_cast<double>(cap[1].ideal) / cap[0].ideal);
  }
  if (!reuse.empty()) {
    std::printf(
        "\n## Reuse TTFT (RedKnot mode vs our full mode, CUDA backend; segments cached offline; "
        "full: all heads global, chunks of 4096; redknot: S0 reused, the rest recomputed in one "
        "pass on the head-aware store, Sparse FFN off unless noted)\n\n");
    std::printf(
        "| shape | T | segments | profile | last global layer | redknot ms | redknot+sparse ms | "
        "our full ms | speedup vs own full | speedup (sparse) | FLOPs saved | FLOPs saved "
        "(sparse) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    auto num = [](double v, const char* fmt) {
      if (v <= 0) return std::string("n/a");
      char b[64];
      std::snprintf(b, sizeof(b), fmt, v);
      return std::string(b);
    };
    for (const ReuseRow& r : reuse) {
      const bool have_full = r.full_wall_ms > 0;
      std::printf(
          "| %s | %lld | %lld x %lld + %lld | %s, %.1f%% global | %d of %lld | %s | %s | %s | %s "
          "| %s | %s | %s |\n",
          r.shape.c_str(), static_cast<long long>(r.T), static_cast<long long>(r.segments),
          static_cast<long long>(r.segment_tokens), static_cast<long long>(r.query_tokens),
          r.profile.c_str(), 100.0 * r.global_share, r.last_global_layer,
          static_cast<long long>(r.layers), num(r.redknot_wall_ms, "%.1f").c_str(),
          num(r.sparse_wall_ms, "%.1f").c_str(), num(r.full_wall_ms, "%.1f").c_str(),
          num(have_full && r.redknot_wall_ms > 0 ? r.full_wall_ms / r.redknot_wall_ms : 0, "%.2fx")
              .c_str(),
          num(have_full && r.sparse_wall_ms > 0 ? r.full_wall_ms / r.sparse_wall_ms : 0, "%.2fx")
              .c_str(),
          num(r.redknot_flops > 0 ? 100.0 * (1.0 - r.redknot_flops / r.full_flops) : 0, "%.1f%%")
              .c_str(),
          num(r.sparse_flops > 0 ? 100.0 * (1.0 - r.sparse_flops / r.full_flops) : 0, "%.1f%%")
              .c_str());
    }
    for (const ReuseRow& r : reuse) {
      // Machine-readable, for the redknot/peer ratio in scripts/gpu-model-bench.sh.
      std::printf(
          "reuse-row shape=%s T=%lld redknot_ms=%.1f sparse_ms=%.1f full_ms=%.1f "
          "redknot_flops=%.4g sparse_flops=%.4g full_flops=%.4g top1_redknot=%g top1_sparse=%g\n",
          r.shape.c_str(), static_cast<long long>(r.T), r.redknot_wall_ms, r.sparse_wall_ms,
          r.full_wall_ms, r.redknot_flops, r.sparse_flops, r.full_flops, r.top1_redknot,
          r.top1_sparse);
    }
    std::printf(
        "(bar: redknot >= 3x faster than our full, >= 3.5x faster than the peer's full "
        "prefill of the same T)\n");
  }
  if (!decode.empty()) {
    const double copy_gbs = a.cpu ? 0.0 : copy_bandwidth_gbs();
    std::printf(
        "\n## Decode steps: recorded (CUDA graphs) vs eager (RedKnot, CUDA backend, all heads "
        "global, greedy, median of %d steps, ms to the host logits of every sequence); "
        "device-to-device copy %.0f GB/s (read + write)\n\n",
        a.decode_steps, copy_gbs);
    std::printf(
        "| shape | weights | batch | context | skinny rows | splits | eager ms/step | "
        "graphs ms/step | graphs + device argmax ms/step | of it: host plan ms | "
        "GB read per step | GB/s (argmax) | of copy | max abs logit diff | argmax equal | "
        "recordings |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const DecodeRow& r : decode) {
      if (!r.error.empty()) continue;
      const double gbs = r.greedy_ms > 0 ? r.step_bytes / (r.greedy_ms * 1e-3) / 1e9 : 0.0;
      std::printf(
          "| %s | %s | %lld | %lld | %lld | %lld | %.3f | %.3f | %.3f | %.3f | %.2f | %.0f | "
          "%.0f%% | %.3g | %s | %lld |\n",
          r.shape.c_str(), r.weights.c_str(), static_cast<long long>(r.batch),
          static_cast<long long>(r.context), static_cast<long long>(r.skinny_rows),
          static_cast<long long>(r.splits), r.eager_ms, r.graph_ms, r.greedy_ms, r.plan_ms,
          r.step_bytes / 1e9, gbs, copy_gbs > 0 ? 100.0 * gbs / copy_gbs : 0.0, r.max_diff,
          r.argmax_equal ? "yes" : "no", static_cast<long long>(r.recorded));
    }
  }
  for (const std::string& e : errors) std::printf("ERROR %s\n", e.c_str());
  return errors.empty() ? 0 : 1;
}
