#include "engine/profiler.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "core/thread_pool.h"
#include "engine/kv_setup.h"

namespace redknot {

namespace {

constexpr int64_t kMinChunkTokens = 8;

// One run's queries and keys of a layer on the host. Keys are transposed per kv head so that a
// query's logits are D contiguous multiply-adds over the keys (vectorises; no reductions).
struct HostQK {
  int64_t T = 0;
  std::vector<float> q;     // [T, heads, D]
  std::vector<float> keys;  // [kv_heads, D, T]
};

// q: [T, heads, D], k: [T, kv_heads, D] (device)
HostQK to_host(Backend& be, const Tensor& q, const Tensor& k) {
  HostQK h;
  h.T = q.dim(0);
  const int64_t nkv = k.dim(1), D = k.dim(2);
  Tensor qh = be.to_host_f32(q), kh = be.to_host_f32(k);
  for (const Tensor* t : {&qh, &kh})
    for (int64_t i = 0; i < t->numel(); ++i)
      if (!std::isfinite(t->data<float>()[i]))
        throw Error("profile: the model produced non-finite queries/keys (NaN/Inf)");
  h.q.assign(qh.data<float>(), qh.data<float>() + qh.numel());
  h.keys.resize(static_cast<size_t>(nkv * h.T * D));
  const float* src = kh.data<float>();
  for (int64_t t = 0; t < h.T; ++t)
    for (int64_t g = 0; g < nkv; ++g)
      for (int64_t d = 0; d < D; ++d) h.keys[(g * D + d) * h.T + t] = src[(t * nkv + g) * D + d];
  return h;
}

// e^x for x <= 0 to ~1e-6 relative, written so that the loops calling it vectorise (the
// libm call does not): 2^(x log2 e) split into 2^floor (exponent bits) and 2^frac (series).
inline float exp_nonpositive(float x) {
  const float t = (x > -87.0f ? x : -87.0f) * 1.44269504f;
  const float fl = std::floor(t);
  const float f = (t - fl) * 0.693147181f;  // [0, ln 2)
  float poly = 1.0f / 5040;
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    poly = poly * f + c;
  const int32_t bits = (static_cast<int32_t>(fl) + 127) << 23;
  return poly * std::bit_cast<float>(bits);
}

// Attention probabilities of one query over keys [lo, i] (causal, optionally the model's own
// sliding window); p[0, lo) is zeroed so rows of two runs can be compared index by index.
// qv: [D]; keys_t: [D, T] of the query's kv head; p: [>= i + 1]
void softmax_row(const float* qv, const float* keys_t, int64_t T, int64_t D, int64_t lo, int64_t i,
                 float scale, float* p) {
  std::fill(p, p + i + 1, 0.0f);
  for (int64_t d = 0; d < D; ++d) {
    const float qd = scale * qv[d];
    const float* kd = keys_t + d * T;
    for (int64_t j = lo; j <= i; ++j) p[j] += qd * kd[j];
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = lo; j <= i; ++j) mx = std::max(mx, p[j]);
  for (int64_t j = lo; j <= i; ++j) p[j] = exp_nonpositive(p[j] - mx);
  double sum = 0;
  for (int64_t j = lo; j <= i; ++j) sum += p[j];
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = lo; j <= i; ++j) p[j] *= inv;
}

struct Geometry {
  int64_t heads, kv_heads, D, group, native_window;
  float scale;
  int64_t lo(int64_t i) const {
    return native_window > 0 ? std::max<int64_t>(0, i - native_window + 1) : 0;
  }
};

// Keeps the chunk-alone run's queries and keys of every layer for the prefixed runs to compare.
class AloneObserver : public ForwardObserver {
 public:
  AloneObserver(Backend& be, std::vector<HostQK>& out) : be_(be), out_(out) {}
  // q: [T, heads, D]; k: [T, kv_heads, D]
  void on_attention_inputs(int layer, const Tensor& q, const Tensor& k) override {
    out_[layer] = to_host(be_, q, k);
  }

 private:
  Backend& be_;
  std::vector<HostQK>& out_;
};

// Per (layer, query head) sums over runs.
struct Accum {
  std::vector<double> shift_sum, edge_sum;
  std::vector<int64_t> shift_n, edge_n;
  explicit Accum(int64_t n) : shift_sum(n), edge_sum(n), shift_n(n), edge_n(n) {}
};

// For a prefixed run: edge mass of every query, and the cosine between the chunk-to-chunk map
// and the chunk-alone run's map. Works one layer (and one query row per head) at a time.
class PrefixedObserver : public ForwardObserver {
 public:
  PrefixedObserver(Backend& be, ThreadPool& pool, const Geometry& g, const ProfileOptions& o,
                   const std::vector<HostQK>& alone, int64_t alone_c0, int64_t c0, Accum& acc)
      : be_(be), pool_(pool), g_(g), o_(o), alone_(alone), a0_(alone_c0), c0_(c0), acc_(acc) {}

  // q: [T, heads, D]; k: [T, kv_heads, D]
  void on_attention_inputs(int layer, const Tensor& q, const Tensor& k) override {
    const HostQK full = to_host(be_, q, k);
    const HostQK& alone = alone_[layer];
    const int64_t T = full.T, D = g_.D, H = g_.heads;
    RK_CHECK(T - c0_ == alone.T - a0_, "chunk length differs between runs");
    std::vector<double> shift(H), edge(H);
    pool_.parallel_for(H, 1, [&](int64_t hb, int64_t he) {
      std::vector<float> pf(T), pa(alone.T);
      for (int64_t h = hb; h < he; ++h) {
        const int64_t g = h / g_.group;
        const float* kf = full.keys.data() + g * T * D;
        const float* ka = alone.keys.data() + g * alone.T * D;
        // Shift is measured on the queries whose whole window lies inside the chunk: there a
        // local head sees the same keys in both runs (sink and window), so only attention beyond
        // the window can move its map. Rows nearer the chunk start see the prefix's tail inside
        // their window, which changed every local head's map as much as a global one's (the
        // trained RAG model's local layer-0 heads scored 0.2 that way; its weakest retrieval
        // head 0.07). Chunks no longer than the window fall back to every row.
        double edge_sum = 0, dotp = 0, nf = 0, na = 0, dotp_all = 0, nf_all = 0, na_all = 0;
        for (int64_t i = 0; i < T; ++i) {
          const int64_t lo = g_.lo(i);
          softmax_row(full.q.data() + (i * H + h) * D, kf, T, D, lo, i, g_.scale, pf.data());
          // Mass on keys outside sink ∪ window: pos >= sink and i - pos >= window.
          for (int64_t j = std::max<int64_t>(lo, o_.sink); j <= i - o_.window; ++j)
            edge_sum += pf[j];
          if (i < c0_) continue;
          const int64_t r = i - c0_, ia = a0_ + r;
          softmax_row(alone.q.data() + (ia * H + h) * D, ka, alone.T, D, g_.lo(ia), ia, g_.scale,
                      pa.data());
          double d = 0, f = 0, a = 0;
          for (int64_t m = 0; m <= r; ++m) {
            const double x = pf[c0_ + m], y = pa[a0_ + m];
            d += x * y, f += x * x, a += y * y;
          }
          dotp_all += d, nf_all += f, na_all += a;
          if (r >= o_.window) dotp += d, nf += f, na += a;
        }
        if (nf == 0 && na == 0) dotp = dotp_all, nf = nf_all, na = na_all;
        edge[h] = edge_sum / static_cast<double>(T);
        // A chunk whose map vanished in one run (all mass on the prefix) moved completely.
        shift[h] = (nf > 0 && na > 0) ? 1.0 - dotp / std::sqrt(nf * na) : 1.0;
      }
    });
    for (int64_t h = 0; h < H; ++h) {
      const int64_t idx = layer * H + h;
      acc_.edge_sum[idx] += edge[h] * static_cast<double>(T);
      acc_.edge_n[idx] += T;
      acc_.shift_sum[idx] += std::clamp(shift[h], 0.0, 1.0);
      acc_.shift_n[idx] += 1;
    }
  }

 private:
  Backend& be_;
  ThreadPool& pool_;
  const Geometry& g_;
  const ProfileOptions& o_;
  const std::vector<HostQK>& alone_;
  int64_t a0_, c0_;
  Accum& acc_;
};

// One forward over `tokens` as a fresh sequence in a fresh KV store (no logits needed).
void run_once(Model& model, const std::vector<int32_t>& tokens, ForwardObserver& obs) {
  KvOptions ko;
  ko.tokens = static_cast<int64_t>(tokens.size());
  KvStore store = make_kv_store(model, ko);
  store.cache->add_sequence(0);
  Batch b;
  b.add_sequence(0, tokens, 0, /*last_logits=*/false);
  model.forward(b, *store.cache, &obs);
}

void check_options(const ProfileOptions& o, const ModelConfig& cfg) {
  auto fail = [](const std::string& m) { throw Error("profile: " + m); };
  if (!(o.ratio >= 0.0 && o.ratio <= 1.0)) fail("ratio must be in [0, 1]");
  if (o.window < 1) fail("window must be >= 1");
  if (o.sink < 0) fail("sink must be >= 0");
  if (o.dense_layers < 0 || o.dense_layers > cfg.num_layers)
    fail("dense layers must be in [0, " + std::to_string(cfg.num_layers) + "]");
  if (o.max_tokens < 2 * kMinChunkTokens + 1) fail("max tokens must be >= 17");
  if (o.num_prefixes < 1 || o.num_prefixes > 64) fail("prefixes must be in [1, 64]");
  if (o.max_chunks < 0) fail("max chunks must be >= 0");
  if (o.bos_id >= cfg.vocab_size)
    fail("BOS id " + std::to_string(o.bos_id) + " outside vocabulary");
  for (auto t : {o.score_threshold, o.prefix_shift_threshold, o.edge_mass_threshold})
    if (t && !std::isfinite(*t)) fail("thresholds must be finite");
}

}  // namespace

HeadProfile profile_heads(Model& model, const std::vector<std::vector<int32_t>>& calibration,
                          const ProfileOptions& opts) {
  const ModelConfig& cfg = model.config();
  check_options(opts, cfg);
  auto warn = [&](const std::string& m) {
    if (opts.warn)
      opts.warn(m);
    else
      std::cerr << "warning: " << m << "\n";
  };
  std::vector<std::string> warnings;
  auto note = [&](const std::string& m) {
    warnings.push_back(m);
    warn(m);
  };

  // Documents are joined and re-cut so that chunk + prefix (+ BOS) fits max_tokens.
  std::vector<int32_t> stream;
  for (const auto& doc : calibration) {
    for (int32_t id : doc)
      if (id < 0 || id >= cfg.vocab_size)
        throw Error("profile: calibration token id " + std::to_string(id) +
                    " outside the vocabulary [0, " + std::to_string(cfg.vocab_size) + ")");
    stream.insert(stream.end(), doc.begin(), doc.end());
  }
  const int64_t N = static_cast<int64_t>(stream.size());
  const int64_t bos = opts.bos_id >= 0 ? 1 : 0;
  const int64_t wanted = (opts.max_tokens - bos) / 2, min_chunks = opts.num_prefixes + 1;
  int64_t len = wanted;
  if (N < min_chunks * wanted) {
    len = N / min_chunks;
    if (len < kMinChunkTokens)
      throw Error("profile: calibration text too short: " + std::to_string(N) + " tokens, need " +
                  std::to_string(min_chunks * kMinChunkTokens) + " at least (" +
                  std::to_string(min_chunks * wanted) + " for full-length runs)");
    note("calibration text has only " + std::to_string(N) + " tokens; using chunks of " +
         std::to_string(len) + " tokens instead of " + std::to_string(wanted) +
         " (give more text for a better profile)");
  }
  std::vector<std::pair<int64_t, int64_t>> chunks;  // [begin, end) in `stream`
  for (int64_t s = 0; s < N; s += len)
    if (std::min(N, s + len) - s >= std::max<int64_t>(kMinChunkTokens, len / 2))
      chunks.push_back({s, std::min(N, s + len)});
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t m = opts.max_chunks > 0 ? std::min<int64_t>(n, opts.max_chunks) : n;
  if (bos + 2 * len <= opts.sink + opts.window)
    note("runs of " + std::to_string(bos + 2 * len) + " tokens never reach past sink + window (" +
         std::to_string(opts.sink + opts.window) +
         "): edge mass is 0 and only prefix shift ranks the heads");

  const int64_t L = cfg.num_layers, H = cfg.num_heads, KV = cfg.num_kv_heads;
  Geometry geo{H,
               KV,
               cfg.head_dim,
               H / KV,
               cfg.sliding_window,
               1.0f / std::sqrt(static_cast<float>(cfg.head_dim))};
  ThreadPool pool(opts.num_threads);
  Accum acc(L * H);
  std::vector<HostQK> alone(static_cast<size_t>(L));
  ProfileProgress prog;
  prog.total_runs = static_cast<int32_t>(m * (1 + opts.num_prefixes));
  prog.num_chunks = static_cast<int32_t>(m);
  prog.num_prefixes = opts.num_prefixes;
  int64_t profiled_tokens = 0;

  auto seq = [&](std::initializer_list<int64_t> parts) {
    std::vector<int32_t> t;
    if (bos) t.push_back(opts.bos_id);
    for (int64_t c : parts)
      t.insert(t.end(), stream.begin() + chunks[c].first, stream.begin() + chunks[c].second);
    return t;
  };
  for (int64_t ci = 0; ci < m; ++ci) {
    const int64_t c = ci * n / m;  // spread over the text
    prog.chunk = static_cast<int32_t>(ci + 1);
    const std::vector<int32_t> solo = seq({c});
    AloneObserver ao(model.backend(), alone);
    run_once(model, solo, ao);
    profiled_tokens += chunks[c].second - chunks[c].first;
    prog.prefix = 0, prog.tokens = static_cast<int32_t>(solo.size());
    ++prog.run;
    if (opts.progress) opts.progress(prog);
    // Prefixes come from far away in the text (half-way round), so they are unrelated to C.
    for (int64_t p = 0, t = 0; p < opts.num_prefixes; ++t) {
      const int64_t j = (c + n / 2 + t) % n;
      if (j == c) continue;
      const std::vector<int32_t> full = seq({j, c});
      PrefixedObserver po(model.backend(), pool, geo, opts, alone, bos,
                          static_cast<int64_t>(full.size()) - (chunks[c].second - chunks[c].first),
                          acc);
      run_once(model, full, po);
      ++p;
      prog.prefix = static_cast<int32_t>(p), prog.tokens = static_cast<int32_t>(full.size());
      ++prog.run;
      if (opts.progress) opts.progress(prog);
    }
  }

  // Query heads -> kv heads by max; score = max(prefix shift, edge mass).
  HeadProfile prof(static_cast<int32_t>(L), static_cast<int32_t>(KV));
  for (int64_t l = 0; l < L; ++l)
    for (int64_t g = 0; g < KV; ++g) {
      HeadSpec& s = prof.at(static_cast<int32_t>(l), static_cast<int32_t>(g));
      for (int64_t h = g * geo.group; h < (g + 1) * geo.group; ++h) {
        const int64_t idx = l * H + h;
        s.prefix_shift = std::max(s.prefix_shift, acc.shift_sum[idx] / acc.shift_n[idx]);
        s.edge_mass = std::max(s.edge_mass, acc.edge_sum[idx] / acc.edge_n[idx]);
      }
      s.score = std::max(s.prefix_shift, s.edge_mass);
      if (!std::isfinite(s.score))
        throw Error("profile: layer " + std::to_string(l) + " kv head " + std::to_string(g) +
                    ": non-finite attention scores (the model produced NaN/Inf)");
    }

  classify_heads(prof, opts, cfg.sliding_window);

  nlohmann::json& pj = prof.params;
  pj["method"] = "prefix_shift+edge_mass";
  pj["max_tokens"] = opts.max_tokens;
  pj["num_prefixes"] = opts.num_prefixes;
  pj["max_chunks"] = opts.max_chunks;
  pj["bos_id"] = opts.bos_id;
  if (cfg.sliding_window > 0) pj["native_sliding_window"] = cfg.sliding_window;
  pj["calibration"] =
      opts.calibration_info.is_null() ? nlohmann::json::object() : opts.calibration_info;
  pj["calibration_tokens"] = N;
  pj["chunk_tokens"] = len;
  pj["chunks"] = n;
  pj["chunks_profiled"] = m;
  pj["tokens_profiled"] = profiled_tokens;
  pj["warnings"] = warnings;
  return prof;
}

void classify_heads(HeadProfile& prof, const ProfileOptions& opts, int64_t native_window) {
  const int32_t L = prof.num_layers(), KV = prof.num_kv_heads();
  std::vector<double> scores;
  for (int32_t l = 0; l < L; ++l)
    for (int32_t g = 0; g < KV; ++g) scores.push_back(prof.at(l, g).score);
  // Top ceil(ratio * pairs) by score are global; ties with the last one too (bias to global).
  const int64_t pairs = int64_t{L} * KV;
  const int64_t k = std::clamp<int64_t>(
      static_cast<int64_t>(std::ceil(opts.ratio * static_cast<double>(pairs) - 1e-9)), 0, pairs);
  std::vector<double> sorted = scores;
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  const double cut = k > 0 ? sorted[k - 1] : std::numeric_limits<double>::infinity();
  for (int32_t l = 0; l < L; ++l)
    for (int32_t g = 0; g < KV; ++g) {
      HeadSpec& s = prof.at(l, g);
      const bool global =
          s.score >= cut || l < opts.dense_layers ||
          (opts.score_threshold && s.score >= *opts.score_threshold) ||
          (opts.prefix_shift_threshold && s.prefix_shift >= *opts.prefix_shift_threshold) ||
          (opts.edge_mass_threshold && s.edge_mass >= *opts.edge_mass_threshold);
      s.classify(global, native_window, opts.window, opts.sink);
    }
  nlohmann::json& pj = prof.params;
  pj["ratio"] = opts.ratio;
  pj["window"] = opts.window;
  pj["sink"] = opts.sink;
  pj["dense_layers"] = opts.dense_layers;
  nlohmann::json th = nlohmann::json::object();
  if (opts.score_threshold) th["score"] = *opts.score_threshold;
  if (opts.prefix_shift_threshold) th["prefix_shift"] = *opts.prefix_shift_threshold;
  if (opts.edge_mass_threshold) th["edge_mass"] = *opts.edge_mass_threshold;
  pj["thresholds"] = th;
}

std::vector<std::string> profile_class_map(const HeadProfile& p) {
  std::vector<std::string> rows;
  for (int32_t l = 0; l < p.num_layers(); ++l) {
    std::string r = "L" + std::to_string(l) + ": ";
    for (int32_t h = 0; h < p.num_kv_heads(); ++h)
      r += p.at(l, h).cls == HeadClass::Global ? 'G' : 'L';
    rows.push_back(r);
  }
  return rows;
}

}  // namespace redknot
