#include "reuse/reuse_prefill.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "kv/head_profile.h"

namespace redknot {

namespace {
using Clock = std::chrono::steady_clock;

const std::vector<std::pair<ReuseMode, std::string>>& mode_table() {
  static const std::vector<std::pair<ReuseMode, std::string>> t = {
      {ReuseMode::Full, "full"},   {ReuseMode::Prefix, "prefix"},
      {ReuseMode::Naive, "naive"}, {ReuseMode::CacheBlend, "cacheblend"},
      {ReuseMode::Epic, "epic"},   {ReuseMode::RedKnot, "redknot"}};
  return t;
}

// Appends `ids` at the sequence's next positions in chunks; returns the last logits.
std::vector<float> append_tokens(Model& model, KvCache& kv, SeqId seq,
                                 const std::vector<int32_t>& ids, int32_t chunk,
                                 const ForwardOptions& fo) {
  Tensor logits;
  for (size_t s = 0; s < ids.size(); s += chunk) {
    const size_t e = std::min(ids.size(), s + static_cast<size_t>(chunk));
    Batch b;
    b.add_sequence(seq, std::vector<int32_t>(ids.begin() + s, ids.begin() + e),
                   kv.next_position(seq));
    logits = model.forward(b, kv, fo);
  }
  return std::vector<float>(logits.data<float>(), logits.data<float>() + logits.numel());
}

// Recomputes the tokens at `positions` (already cached) through `num_layers` layers, in place.
void recompute(Model& model, KvCache& kv, SeqId seq, const std::vector<int32_t>& positions,
               const std::vector<int32_t>& tokens, const ForwardOptions& fo) {
  if (positions.empty()) return;
  Batch b;
  b.tokens = tokens;
  b.positions = positions;
  b.spans.push_back({seq, 0, static_cast<int64_t>(tokens.size())});
  b.overwrite = true;
  model.forward(b, kv, fo);
}

// The chunk store could not hold a segment (budget, admission filter): the request falls back
// to a dense prefill rather than failing.
struct SegmentUnavailable {};

// Every segment's cached KV relocated to its place; returns the number of tokens that came from
// the cache (hits).
// pins keep the entries resident until the prefill ends.
int64_t attach_segments(Model& model, PagedKvCache& kv, SeqId seq, const SegmentedPrompt& p,
                        size_t first, size_t last, const SegmentLookup& lookup,
                        std::vector<std::shared_ptr<void>>& pins) {
  int64_t attached = 0;
  for (size_t i = first; i < last; ++i) {
    const auto& seg = p.segments[i];
    if (seg.empty()) continue;
    std::vector<int32_t> src_pos(seg.size());
    std::iota(src_pos.begin(), src_pos.end(), 0);
    SegmentRef ref = lookup ? lookup(seg, true) : SegmentRef{};
    if (!ref.found) throw SegmentUnavailable();
    kv.append_relocated(seq, ref.rows, src_pos, kv.next_position(seq));
    pins.push_back(ref.pin);
    // Only hits count as reused: a miss was just prefilled (alone) for this request.
    if (ref.was_cached) attached += static_cast<int64_t>(seg.size());
  }
  return attached;
}

// Keys of `layer` at the given positions, one host row per (position, kv head) [n * kv, D].
std::vector<std::vector<float>> read_keys(PagedKvCache& kv, SeqId seq, int layer, int kv_heads,
                                          std::vector<std::vector<int32_t>>& positions) {
  std::vector<std::vector<float>> keys(kv_heads);
  positions.assign(kv_heads, {});
  for (int h = 0; h < kv_heads; ++h) {
    Tensor k, v;
    kv.read(seq, layer, h, k, v, positions[h]);
    keys[h].assign(k.data<float>(), k.data<float>() + k.numel());
  }
  return keys;
}

// Observer capturing one layer's fresh (post-RoPE) keys on the host.
class KeyCapture : public ForwardObserver {
 public:
  KeyCapture(Backend& b, int layer) : backend_(b), layer_(layer) {}
  void on_attention_inputs(int layer, const Tensor& q, const Tensor& k) override {
    if (layer == layer_) keys = backend_.to_host_f32(k);
  }
  Tensor keys;  // [T, kv_heads, D]

 private:
  Backend& backend_;
  int layer_;
};
}  // namespace

ReuseMode parse_reuse_mode(const std::string& name) {
  for (const auto& [m, n] : mode_table())
    if (n == name) return m;
  std::string all;
  for (const auto& [m, n] : mode_table()) all += (all.empty() ? "" : ", ") + n;
  throw Error("unknown reuse mode '" + name + "' (available: " + all + ")");
}

const char* reuse_mode_name(ReuseMode m) {
  for (const auto& [mm, n] : mode_table())
    if (mm == m) return n.c_str();
  return "?";
}

const std::vector<std::string>& reuse_mode_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const auto& [m, n] : mode_table()) v.push_back(n);
    return v;
  }();
  return names;
}

int64_t SegmentedPrompt::total_tokens() const {
  int64_t n = static_cast<int64_t>(query.size());
  for (const auto& s : segments) n += static_cast<int64_t>(s.size());
  return n;
}

std::vector<int32_t> SegmentedPrompt::flatten() const {
  std::vector<int32_t> ids;
  for (const auto& s : segments) ids.insert(ids.end(), s.begin(), s.end());
  ids.insert(ids.end(), query.begin(), query.end());
  return ids;
}

int PrefixIndex::longest(const SegmentedPrompt& p, std::vector<int32_t>* entry_tokens,
                         int64_t* len) const {
  std::vector<int32_t> chain;
  int best = -1;
  for (size_t j = 0; j < p.segments.size(); ++j) {
    chain.insert(chain.end(), p.segments[j].begin(), p.segments[j].end());
    auto it = chains_.find(chain);
    if (it == chains_.end()) break;
    best = static_cast<int>(j);
    *entry_tokens = it->second.first;
    *len = it->second.second;
  }
  return best;
}

void PrefixIndex::record(const SegmentedPrompt& p) {
  std::vector<int32_t> all;
  for (const auto& s : p.segments) all.insert(all.end(), s.begin(), s.end());
  std::vector<int32_t> chain;
  for (const auto& s : p.segments) {
    chain.insert(chain.end(), s.begin(), s.end());
    chains_.emplace(chain, std::make_pair(all, static_cast<int64_t>(chain.size())));
  }
}

DeadRowSplit dead_row_split(const ModelConfig& cfg, const HeadProfile& profile, int64_t start,
                            int64_t rows) {
  const int L = static_cast<int>(cfg.num_layers);
  const int g = profile.last_global_layer();
  if (g == L - 1) return {};
  int64_t window = 1, sink = 0;
  for (int l = g + 1; l < L; ++l)
    for (int h = 0; h < profile.num_kv_heads(); ++h) {
      window = std::max<int64_t>(window, profile.at(l, h).window);
      sink = std::max<int64_t>(sink, profile.at(l, h).sink);
    }
  DeadRowSplit s;
  s.kv_only_from_layer = std::max(g, 0);
  // With no global head, layer 0 is "g": its K/V alone for the split rows, nothing deeper.
  const int deep = L - 1 - s.kv_only_from_layer;
  s.tail = int64_t{deep} * (window - 1) + window + 1;
  if (s.tail >= rows || start < sink) return {};
  return s;
}

PrefillOutcome prefill_full(Model& model, KvCache& kv, SeqId seq, const SegmentedPrompt& prompt,
                            int32_t chunk, StageTimes* stage_times) {
  const std::vector<int32_t> ids = prompt.flatten();
  if (ids.empty()) throw Error("empty prompt");
  auto t0 = Clock::now();
  if (!kv.has_sequence(seq)) kv.add_sequence(seq);
  PrefillOutcome out;
  ForwardOptions fo;
  fo.flops = &out.flops;
  fo.stage_times = stage_times;
  out.last_logits = append_tokens(model, kv, seq, ids, chunk, fo);
  out.ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  return out;
}

PrefillOutcome prefill_reusing(Model& model, PagedKvCache& kv, SeqId seq, const SegmentedPrompt& p,
                               const SegmentLookup& lookup, const ReuseOptions& opts,
                               const PrefixIndex* prefix_index);

PrefillOutcome prefill_with_reuse(Model& model, PagedKvCache& kv, SeqId seq,
                                  const SegmentedPrompt& p, const SegmentLookup& lookup,
                                  const ReuseOptions& opts, const PrefixIndex* prefix_index) {
  if (opts.mode == ReuseMode::Full || p.segments.empty())
    return prefill_full(model, kv, seq, p, opts.chunk, opts.stage_times);
  const bool fresh = !kv.has_sequence(seq);
  try {
    return prefill_reusing(model, kv, seq, p, lookup, opts, prefix_index);
  } catch (const SegmentUnavailable&) {
    if (fresh && kv.has_sequence(seq)) kv.remove_sequence(seq);
    return prefill_full(model, kv, seq, p, opts.chunk, opts.stage_times);
  }
}

PrefillOutcome prefill_reusing(Model& model, PagedKvCache& kv, SeqId seq, const SegmentedPrompt& p,
                               const SegmentLookup& lookup, const ReuseOptions& opts,
                               const PrefixIndex* prefix_index) {
  auto t0 = Clock::now();
  if (!kv.has_sequence(seq)) kv.add_sequence(seq);
  PrefillOutcome out;
  ForwardOptions fo;
  fo.flops = &out.flops;
  fo.stage_times = opts.stage_times;
  StageClock clock(model.backend(), opts.stage_times);
  std::vector<std::shared_ptr<void>> pins;
  const ModelConfig& cfg = model.config();
  const int kv_heads = static_cast<int>(cfg.num_kv_heads);

  // Token ids of segments [first, n) followed by the query.
  auto rest_after = [&](size_t first) {
    std::vector<int32_t> ids;
    for (size_t i = first; i < p.segments.size(); ++i)
      ids.insert(ids.end(), p.segments[i].begin(), p.segments[i].end());
    ids.insert(ids.end(), p.query.begin(), p.query.end());
    return ids;
  };

  switch (opts.mode) {
    case ReuseMode::Prefix: {
      std::vector<int32_t> entry;
      int64_t len = 0;
      const int j = prefix_index ? prefix_index->longest(p, &entry, &len) : -1;
      if (j >= 0) {
        SegmentRef ref = lookup(entry, false);
        if (ref.found) {
          std::vector<std::vector<int32_t>> rows(ref.rows.size());
          for (size_t r = 0; r < rows.size(); ++r)
            rows[r].assign(ref.rows[r].begin(), ref.rows[r].begin() + len);
          std::vector<int32_t> src(len);
          std::iota(src.begin(), src.end(), 0);
          kv.append_relocated(seq, rows, src, 0);
          pins.push_back(ref.pin);
          out.reused_tokens = len;
          out.last_logits = append_tokens(model, kv, seq, rest_after(j + 1), opts.chunk, fo);
          break;
        }
      }
      out.last_logits = append_tokens(model, kv, seq, p.flatten(), opts.chunk, fo);
      break;
    }
    case ReuseMode::Naive: {
      out.reused_tokens = attach_segments(model, kv, seq, p, 0, p.segments.size(), lookup, pins);
      out.last_logits = append_tokens(model, kv, seq, p.query, opts.chunk, fo);
      break;
    }
    case ReuseMode::Epic: {
      out.reused_tokens = attach_segments(model, kv, seq, p, 0, p.segments.size(), lookup, pins);
      // The first k tokens of every segment after S0 (S0's KV is already exact).
      std::vector<int32_t> pos, toks;
      int32_t offset = static_cast<int32_t>(p.segments[0].size());
      for (size_t i = 1; i < p.segments.size(); ++i) {
        const auto& seg = p.segments[i];
        for (size_t t = 0; t < seg.size() && static_cast<int32_t>(t) < opts.epic_k; ++t) {
          pos.push_back(offset + static_cast<int32_t>(t));
          toks.push_back(seg[t]);
        }
        offset += static_cast<int32_t>(seg.size());
      }
      recompute(model, kv, seq, pos, toks, fo);
      out.reused_tokens =
          std::max<int64_t>(0, out.reused_tokens - static_cast<int64_t>(pos.size()));
      out.last_logits = append_tokens(model, kv, seq, p.query, opts.chunk, fo);
      break;
    }
    case ReuseMode::CacheBlend: {
      out.reused_tokens = attach_segments(model, kv, seq, p, 0, p.segments.size(), lookup, pins);
      const int layer = std::min<int>(opts.cacheblend_layer, static_cast<int>(cfg.num_layers) - 1);
      // Tokens after S0, their cached keys at `layer`, then fresh keys from layers [0, layer].
      std::vector<int32_t> pos, toks;
      int32_t offset = static_cast<int32_t>(p.segments[0].size());
      for (size_t i = 1; i < p.segments.size(); ++i) {
        for (size_t t = 0; t < p.segments[i].size(); ++t) {
          pos.push_back(offset + static_cast<int32_t>(t));
          toks.push_back(p.segments[i][t]);
        }
        offset += static_cast<int32_t>(p.segments[i].size());
      }
      if (!pos.empty()) {
        std::vector<std::vector<int32_t>> cached_pos;
        auto cached = read_keys(kv, seq, layer, kv_heads, cached_pos);
        KeyCapture cap(model.backend(), layer);
        ForwardOptions f1 = fo;
        f1.observer = &cap;
        f1.num_layers = layer + 1;
        recompute(model, kv, seq, pos, toks, f1);
        // Deviation of each token's fresh key from its relocated cached key, summed over heads.
        const int64_t D = cfg.head_dim;
        std::vector<double> dev(pos.size(), 0.0);
        for (int h = 0; h < kv_heads; ++h) {
          const auto& cp = cached_pos[h];
          for (size_t t = 0; t < pos.size(); ++t) {
            auto it = std::lower_bound(cp.begin(), cp.end(), pos[t]);
            if (it == cp.end() || *it != pos[t]) continue;  // a local head no longer keeps it
            const float* c = cached[h].data() + (it - cp.begin()) * D;
            const float* f = cap.keys.data<float>() + (t * kv_heads + h) * D;
            double d = 0;
            for (int64_t e = 0; e < D; ++e) d += double(c[e] - f[e]) * (c[e] - f[e]);
            dev[t] += d;
          }
        }
        const size_t keep = static_cast<size_t>(std::ceil(opts.cacheblend_ratio * pos.size()));
        std::vector<size_t> order(pos.size());
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                          [&](size_t a, size_t b) { return dev[a] > dev[b]; });
        order.resize(keep);
        std::sort(order.begin(), order.end());
        std::vector<int32_t> sel_pos, sel_tok;
        for (size_t i : order) {
          sel_pos.push_back(pos[i]);
          sel_tok.push_back(toks[i]);
        }
        recompute(model, kv, seq, sel_pos, sel_tok, fo);
        out.reused_tokens =
            std::max<int64_t>(0, out.reused_tokens - static_cast<int64_t>(sel_pos.size()));
      }
      out.last_logits = append_tokens(model, kv, seq, p.query, opts.chunk, fo);
      break;
    }
    case ReuseMode::RedKnot: {
      // Query full attention keeps the local heads' pages until the query has run; the guard
      // restores the head classes and trims however the passes end (an error included).
      struct FullAttentionGuard {
        PagedKvCache* kv;
        SeqId seq;
        ~FullAttentionGuard() {
          if (kv != nullptr && kv->has_sequence(seq)) kv->set_full_attention(seq, -1, false);
        }
      } guard{opts.query_full_attention ? &kv : nullptr, seq};
      if (opts.query_full_attention) kv.set_full_attention(seq, -1, /*keep_local_pages=*/true);
      // S0's positions are already right: its cached KV is exactly full prefill's.
      out.reused_tokens = attach_segments(model, kv, seq, p, 0, 1, lookup, pins);
      clock.mark("attach_segments");
      ForwardOptions fr = fo;
      if (opts.sparse_ffn_enabled) fr.sparse_ffn = &opts.sparse_ffn;
      // One causal pass over S1..Sn + query: the store applies the head classes (local heads
      // read sink ∪ window only); Sparse FFN skips unimportant rows in deep layers.
      std::vector<int32_t> ids = rest_after(1);
      const int64_t n = static_cast<int64_t>(ids.size());
      const DeadRowSplit split = opts.skip_dead_rows
                                     ? dead_row_split(cfg, kv.profile(), kv.next_position(seq), n)
                                     : DeadRowSplit{};
      if (split.tail > 0) {
        // Rows whose outputs nothing reads past layer g: layers <= g only (K/V alone at g).
        const std::vector<int32_t> head(ids.begin(), ids.end() - split.tail);
        const std::vector<int32_t> tail(ids.end() - split.tail, ids.end());
        ForwardOptions f1 = fr;
        f1.kv_only_from_layer = split.kv_only_from_layer;
        append_tokens(model, kv, seq, head, static_cast<int32_t>(head.size()), f1);
        ids = tail;
      }
      if (!opts.query_full_attention) {
        out.last_logits = append_tokens(model, kv, seq, ids, static_cast<int32_t>(ids.size()), fr);
        break;
      }
      // The query rows last, alone, with every head global where every row's K/V exists.
      const size_t q = std::min(ids.size(), p.query.size());
      const std::vector<int32_t> docs(ids.begin(), ids.end() - q), query(ids.end() - q, ids.end());
      if (!docs.empty()) append_tokens(model, kv, seq, docs, static_cast<int32_t>(docs.size()), fr);
      const int32_t full_until =
          split.tail > 0 ? split.kv_only_from_layer : static_cast<int32_t>(cfg.num_layers) - 1;
      kv.set_full_attention(seq, full_until, /*keep_local_pages=*/true);
      // ... and a dense FFN: ranked alone, the few query rows would lose FFNs they all need.
      ForwardOptions fq = fr;
      fq.sparse_ffn = nullptr;
      out.last_logits =
          append_tokens(model, kv, seq, query, static_cast<int32_t>(query.size()), fq);
      break;
    }
    case ReuseMode::Full:
      break;
  }
  out.ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  return out;
}

}  // namespace redknot
