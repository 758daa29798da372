// SegPagedAttention benchmarks.
//  capacity:  how many sessions of N tokens fit a KV budget, all-global vs a head-aware profile:
//             the ideal Σ formula (ideal_session_bytes) against a count measured by filling an
//             accounting-only PagePool through PagedKvCache as the engine would.
//  attention: CPU decode-attention time per token over a real PagedKvCache (f32 pages), against
//             the dense+mask baseline (Backend::attention over a contiguous cache).
//  decode-plan: the host side of one decode step's KV bookkeeping (begin_forward: slots and the
//             CSR plans of every layer, staged and copied into the plan buffer; end_forward),
//             eager (a fresh buffer per step) and into plan storage (the CUDA-graph path).
#pragma once
#include <cstdint>
#include <vector>

#include "kv/head_profile.h"

namespace redknot {
class Backend;
class PagedKvCache;
class Tensor;
}  // namespace redknot

namespace redknot::bench {

// Shared model/KV geometry; defaults are Llama-3-8B.
struct KvShape {
  int32_t layers = 32;
  int32_t kv_heads = 8;
  int32_t q_heads = 32;
  int32_t head_dim = 128;
  int32_t page_size = 64;
  double global_fraction = 0.15;  // head-aware profile: share of (layer, kv head) kept global
  int32_t window = 512;           // local heads: W
  int32_t sink = 4;               // local heads: s
};

struct CapacityBenchArgs {
  KvShape shape;
  double budget_gib = 40.0;
  int64_t tokens = 32768;  // per session
  int32_t chunk = 2048;    // prefill chunk size
};

struct AttentionBenchArgs {
  KvShape shape;
  std::vector<int64_t> contexts = {8192, 32768};
  std::vector<int32_t> batches = {1};
  int32_t chunk = 2048;
  int32_t repeats = 7;
  int threads = 0;  // <= 0: one per hardware thread
};

struct DecodePlanBenchArgs {
  KvShape shape;
  std::vector<int64_t> contexts = {4096, 32768};
  std::vector<int32_t> batches = {1, 16, 64};
  int32_t steps = 64;  // decode steps timed per row (page boundaries are crossed in them)
};

// A deterministic profile with round(fraction * layers * kv_heads) global heads spread evenly
// over the flattened (layer, kv head) index; every other head is local (window, sink).
HeadProfile spread_profile(int32_t layers, int32_t kv_heads, double global_fraction, int32_t window,
                           int32_t sink);

// The capacity count: adds sessions of `tokens` tokens to `cache`, each prefilled in chunks of
// `chunk` as the engine would (begin_forward, a write per layer when the pool has storage,
// end_forward), until the pool refuses one (OutOfKvMemory; that session is removed). Sessions
// take ids 0, 1, ... (the cache must hold none of them). Returns how many fit; they stay in the
// cache. k, v: [chunk, kv_heads, head_dim] on the pool's
// backend (the values written), or empty for an accounting-only pool.
int64_t fill_sessions(PagedKvCache& cache, Backend& backend, int64_t tokens, int32_t chunk,
                      const Tensor& k, const Tensor& v);

int run_capacity_bench(const CapacityBenchArgs& args);
int run_attention_bench(const AttentionBenchArgs& args);
int run_decode_plan_bench(const DecodePlanBenchArgs& args);

}  // namespace redknot::bench
