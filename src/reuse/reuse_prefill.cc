#include "reuse/reuse_prefill.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "kv/head_profile.h"
#include "reuse/chunk_prefill.h"

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

// Observer capturing one layer's fresh (post-RoPE) keys on the host, over every forward of a
// pass run in chunks.
class KeyCapture : public ForwardObserver {
 public:
  KeyCapture(Backend& b, int layer) : backend_(b), layer_(layer) {}
  void on_attention_inputs(int layer, const Tensor& q, const Tensor& k) override {
    if (layer != layer_) return;
    Tensor h = backend_.to_host_f32(k);
    keys.insert(keys.end(), h.data<float>(), h.data<float>() + h.numel());
  }
  // Tensor parallel: this rank's heads; the deviations are summed over the ranks.
  bool combines_ranks() const override { return true; }
  std::vector<float> keys;  // [T, kv_heads, D]

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

// ---- ReuseJob ----

struct ReuseJob::Step {
  // An action runs on the host between forwards and returns steps to run next (before the rest).
  std::function<std::vector<Step>(ReuseJob&)> action;
  // Otherwise a forward of `tokens` through `cache`'s sequence `seq`: appended at its next
  // positions, or (overwrite) recomputed in place at `positions`.
  KvCache* cache = nullptr;
  SeqId seq = -1;
  std::vector<int32_t> tokens, positions;
  // Or a forward of several of `cache`'s sequences at once, each from its position 0 (misses'
  // prefills in the chunk store), together at most the job's chunk rows.
  std::vector<std::pair<SeqId, std::vector<int32_t>>> parts;
  bool overwrite = false;
  bool logits = false;  // the pass's last row gives the prompt's logits
  ForwardOptions options;
};

// The per-mode planning functions and what they share (one function per mode; trait table
// below). Each turns the prompt into the job's queue at admission.
struct ModePlanner {
  ReuseJob& job;
  using Step = ReuseJob::Step;

  const ModelConfig& cfg() const { return job.model_.config(); }
  ForwardOptions request_options() const {
    ForwardOptions fo;
    fo.flops = &job.out_.flops;
    fo.stage_times = job.opts_.stage_times;
    return fo;
  }
  Step forward(std::vector<int32_t> tokens, ForwardOptions fo, bool logits) const {
    Step s;
    s.cache = &job.kv_;
    s.seq = job.seq_;
    s.tokens = std::move(tokens);
    s.logits = logits;
    s.options = fo;
    return s;
  }
  Step action(std::function<std::vector<Step>(ReuseJob&)> fn) const {
    Step s;
    s.action = std::move(fn);
    return s;
  }
  // Token ids of segments [first, n) followed by the query.
  std::vector<int32_t> rest_after(size_t first) const {
    const SegmentedPrompt& p = job.prompt_;
    std::vector<int32_t> ids;
    for (size_t i = first; i < p.segments.size(); ++i)
      ids.insert(ids.end(), p.segments[i].begin(), p.segments[i].end());
    ids.insert(ids.end(), p.query.begin(), p.query.end());
    return ids;
  }
  int32_t offset_of(size_t segment) const {
    int64_t o = 0;
    for (size_t i = 0; i < segment; ++i) o += static_cast<int64_t>(job.prompt_.segments[i].size());
    return static_cast<int32_t>(o);
  }

  static void plan_full(ModePlanner& m);
  static void plan_prefix(ModePlanner& m);
  static void plan_naive(ModePlanner& m);
  static void plan_epic(ModePlanner& m);
  static void plan_cacheblend(ModePlanner& m);
  static void plan_redknot(ModePlanner& m);

  // Segments [first, last) from the chunk store, relocated into place: hits are pinned now;
  // misses are reserved now and prefilled alone at [0, len) by the queue's first forwards (in the
  // store's own sequence), then published; then every one is attached in order.
  void fetch(size_t first, size_t last) {
    ChunkStore* store = job.store_;
    if (store == nullptr)
      throw Error(std::string("reuse mode ") + reuse_mode_name(job.opts_.mode) +
                  " needs a chunk store");
    auto shared = std::make_shared<std::vector<ChunkStore::Handle>>(last);
    ReusePath& path = job.out_.path;
    std::vector<std::pair<size_t, ChunkStore::Pending>> misses;  // (segment, reservation)
    for (size_t i = first; i < last; ++i) {
      const auto& seg = job.prompt_.segments[i];
      if (seg.empty()) continue;
      ++path.segments;
      // Only the rows this request's sequence keeps (a remote hit fetches just those).
      const ChunkRowNeed need =
          row_need(job.kv_, job.seq_, offset_of(i), static_cast<int32_t>(seg.size()));
      ChunkStore::Handle h = store->acquire(seg, &need);
      if (h) {
        ++path.segments_hit;
        if (h.source() == ChunkTier::Remote) ++path.segments_remote;
        job.out_.reused_tokens += static_cast<int64_t>(seg.size());
        (*shared)[i] = std::move(h);
        continue;
      }
      // A host/disk entry with no room in the pool is recomputed like a miss (privately).
      ChunkStore::Pending pend = store->reserve(seg);
      ++path.segments_prefilled;
      if (!pend.admitted()) ++path.segments_private;
      misses.emplace_back(i, std::move(pend));
    }
    // The misses' prefills, each alone at [0, len) in the store's cache but several per forward
    // (a prompt's short documents would each be a launch-bound forward), then published.
    std::vector<int64_t> lengths;
    for (const auto& [i, pend] : misses)
      lengths.push_back(static_cast<int64_t>(pend.tokens().size()));
    for (const std::vector<size_t>& group : pack_rows(lengths, job.opts_.chunk)) {
      Step s;
      s.cache = &store->prefill_cache();
      if (group.size() == 1) {  // alone: in forwards of the job's chunk when longer
        s.seq = misses[group[0]].second.seq();
        s.tokens = misses[group[0]].second.tokens();
      } else {
        for (size_t g : group)
          s.parts.emplace_back(misses[g].second.seq(), misses[g].second.tokens());
      }
      job.push(std::move(s));
      auto held = std::make_shared<std::vector<std::pair<size_t, ChunkStore::Pending>>>();
      for (size_t g : group) held->push_back(std::move(misses[g]));
      job.push(action([shared, held](ReuseJob& j) {
        for (auto& [i, pend] : *held) (*shared)[i] = j.store_->publish(std::move(pend));
        return std::vector<Step>{};
      }));
    }
    job.push(action([shared, first, last, this_offset = offset_of(first)](ReuseJob& j) {
      int32_t dst = this_offset;
      std::vector<PagedKvCache::RelocatedSegment> copies;
      for (size_t i = first; i < last; ++i) {
        const ChunkStore::Handle& h = (*shared)[i];
        const auto& seg = j.prompt_.segments[i];
        if (seg.empty()) continue;
        // A partial remote entry lacks rows this sequence might read: never hand them out.
        if (h.partial())
          RK_CHECK(h.covers(row_need(j.kv_, j.seq_, dst, static_cast<int32_t>(seg.size()))),
                   "a partial chunk entry lacks rows its destination keeps");
        copies.push_back({&h.all_rows(), &h.positions(), dst});
        dst += static_cast<int32_t>(seg.size());
      }
      // One copy per layer for all of them (not a round of small copies per segment).
      j.kv_.append_relocated(j.seq_, copies);
      // The copies are made: the entries may move tiers again.
      for (size_t i = first; i < last; ++i) j.pins_.push_back(std::move((*shared)[i]));
      return std::vector<Step>{};
    }));
  }
};

void ModePlanner::plan_full(ModePlanner& m) {
  m.job.push(m.forward(m.job.prompt_.flatten(), m.request_options(), true));
}

void ModePlanner::plan_prefix(ModePlanner& m) {
  // The longest cached chain S0..Sj (exact KV: prefilled in place from position 0), then the rest.
  m.job.push(m.action([&m, index = m.job.prefix_index_](ReuseJob& j) {
    ModePlanner& pm = m;
    std::vector<int32_t> entry;
    int64_t len = 0;
    const int jmax = index ? index->longest(j.prompt_, &entry, &len) : -1;
    std::vector<ReuseJob::Step> next;
    if (jmax >= 0 && j.store_ != nullptr) {
      ChunkStore::Handle ref = j.store_->acquire(entry);
      if (ref) {
        std::vector<std::vector<int32_t>> rows(ref.all_rows().size());
        for (size_t r = 0; r < rows.size(); ++r)
          rows[r].assign(ref.all_rows()[r].begin(), ref.all_rows()[r].begin() + len);
        std::vector<int32_t> src(len);
        std::iota(src.begin(), src.end(), 0);
        j.kv_.append_relocated(j.seq_, rows, src, 0);
        j.pins_.push_back(std::move(ref));
        j.out_.reused_tokens = len;
        j.out_.path.prefix_hit_tokens = len;
        next.push_back(pm.forward(pm.rest_after(jmax + 1), pm.request_options(), true));
        return next;
      }
    }
    next.push_back(pm.forward(j.prompt_.flatten(), pm.request_options(), true));
    return next;
  }));
}

void ModePlanner::plan_naive(ModePlanner& m) {
  m.fetch(0, m.job.prompt_.segments.size());
  m.job.push(m.forward(m.job.prompt_.query, m.request_options(), true));
}

void ModePlanner::plan_epic(ModePlanner& m) {
  const SegmentedPrompt& p = m.job.prompt_;
  m.fetch(0, p.segments.size());
  // The first k tokens of every segment after S0 (S0's KV is already exact).
  std::vector<int32_t> pos, toks;
  int32_t offset = static_cast<int32_t>(p.segments[0].size());
  for (size_t i = 1; i < p.segments.size(); ++i) {
    const auto& seg = p.segments[i];
    for (size_t t = 0; t < seg.size() && static_cast<int32_t>(t) < m.job.opts_.epic_k; ++t) {
      pos.push_back(offset + static_cast<int32_t>(t));
      toks.push_back(seg[t]);
    }
    offset += static_cast<int32_t>(seg.size());
  }
  const int64_t recomputed = static_cast<int64_t>(pos.size());
  if (!pos.empty()) {
    ReuseJob::Step s = m.forward(std::move(toks), m.request_options(), false);
    s.positions = std::move(pos);
    s.overwrite = true;
    m.job.push(std::move(s));
  }
  m.job.push(m.action([recomputed](ReuseJob& j) {
    j.out_.reused_tokens = std::max<int64_t>(0, j.out_.reused_tokens - recomputed);
    return std::vector<ReuseJob::Step>{};
  }));
  m.job.push(m.forward(p.query, m.request_options(), true));
}

void ModePlanner::plan_cacheblend(ModePlanner& m) {
  const SegmentedPrompt& p = m.job.prompt_;
  const ModelConfig& cfg = m.cfg();
  m.fetch(0, p.segments.size());
  const int layer =
      std::min<int>(m.job.opts_.cacheblend_layer, static_cast<int>(cfg.num_layers) - 1);
  // Tokens after S0: their cached keys at `layer` against fresh keys from layers [0, layer].
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
    struct Scratch {
      std::vector<std::vector<int32_t>> cached_pos;
      std::vector<std::vector<float>> cached;
      std::unique_ptr<KeyCapture> capture;
    };
    auto scratch = std::make_shared<Scratch>();
    scratch->capture = std::make_unique<KeyCapture>(m.job.model_.backend(), layer);
    const int kv_heads = static_cast<int>(cfg.num_kv_heads);
    m.job.push(m.action([scratch, layer, kv_heads](ReuseJob& j) {
      scratch->cached = read_keys(j.kv_, j.seq_, layer, kv_heads, scratch->cached_pos);
      return std::vector<ReuseJob::Step>{};
    }));
    ForwardOptions f1 = m.request_options();
    f1.observer = scratch->capture.get();
    f1.num_layers = layer + 1;
    ReuseJob::Step fresh = m.forward(toks, f1, false);
    fresh.positions = pos;
    fresh.overwrite = true;
    m.job.push(std::move(fresh));
    m.job.push(m.action([scratch, pos, toks, kv_heads, &m](ReuseJob& j) {
      // Deviation of each token's fresh key from its relocated cached key, summed over heads.
      const int64_t D = j.model_.config().head_dim;
      const std::vector<float>& fresh_keys = scratch->capture->keys;
      std::vector<double> dev(pos.size(), 0.0);
      for (int h = 0; h < kv_heads; ++h) {
        const auto& cp = scratch->cached_pos[h];
        for (size_t t = 0; t < pos.size(); ++t) {
          auto it = std::lower_bound(cp.begin(), cp.end(), pos[t]);
          if (it == cp.end() || *it != pos[t]) continue;  // a local head no longer keeps it
          const float* c = scratch->cached[h].data() + (it - cp.begin()) * D;
          const float* f = fresh_keys.data() + (t * kv_heads + h) * D;
          double d = 0;
          for (int64_t e = 0; e < D; ++e) d += double(c[e] - f[e]) * (c[e] - f[e]);
          dev[t] += d;
        }
      }
      // Tensor parallel: each rank summed its own heads; every rank ranks the same total.
      if (j.model_.tp().size > 1) {
        std::vector<float> part(dev.begin(), dev.end());
        j.model_.sum_over_ranks(part);
        dev.assign(part.begin(), part.end());
      }
      const size_t keep = static_cast<size_t>(std::ceil(j.opts_.cacheblend_ratio * pos.size()));
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
      j.out_.reused_tokens =
          std::max<int64_t>(0, j.out_.reused_tokens - static_cast<int64_t>(sel_pos.size()));
      std::vector<ReuseJob::Step> next;
      if (!sel_pos.empty()) {
        ReuseJob::Step s = m.forward(std::move(sel_tok), m.request_options(), false);
        s.positions = std::move(sel_pos);
        s.overwrite = true;
        next.push_back(std::move(s));
      }
      return next;
    }));
  }
  m.job.push(m.forward(p.query, m.request_options(), true));
}

void ModePlanner::plan_redknot(ModePlanner& m) {
  ReuseJob& job = m.job;
  const ReuseOptions& opts = job.opts_;
  const ModelConfig& cfg = m.cfg();
  if (opts.query_full_attention) {
    // Local heads keep their pages until the query has run (the job resets it when it ends).
    job.kv_.set_full_attention(job.seq_, -1, /*keep_local_pages=*/true);
    job.full_attention_set_ = true;
  }
  // S0's positions are already right: its cached KV is exactly full prefill's.
  m.fetch(0, 1);
  ForwardOptions fr = m.request_options();
  if (opts.sparse_ffn_enabled) fr.sparse_ffn = &job.opts_.sparse_ffn;
  // One causal pass over S1..Sn + query: the store applies the head classes (local heads read
  // sink ∪ window only); Sparse FFN skips unimportant rows in deep layers.
  std::vector<int32_t> ids = m.rest_after(1);
  const int64_t n = static_cast<int64_t>(ids.size());
  // The whole model's heads: every tensor-parallel rank must split alike (its collectives).
  const DeadRowSplit split = opts.skip_dead_rows
                                 ? dead_row_split(cfg, job.kv_.profile().whole(), m.offset_of(1), n)
                                 : DeadRowSplit{};
  if (split.tail > 0) {
    // Rows whose outputs nothing reads past layer g: layers <= g only (K/V alone at g).
    ForwardOptions f1 = fr;
    f1.kv_only_from_layer = split.kv_only_from_layer;
    job.push(m.forward(std::vector<int32_t>(ids.begin(), ids.end() - split.tail), f1, false));
    ids.erase(ids.begin(), ids.end() - split.tail);
  }
  if (!opts.query_full_attention) {
    job.push(m.forward(std::move(ids), fr, true));
    return;
  }
  // The query rows last, alone, with every head global where every row's K/V exists.
  const size_t q = std::min(ids.size(), job.prompt_.query.size());
  std::vector<int32_t> docs(ids.begin(), ids.end() - q), query(ids.end() - q, ids.end());
  if (!docs.empty()) job.push(m.forward(std::move(docs), fr, false));
  const int32_t full_until =
      split.tail > 0 ? split.kv_only_from_layer : static_cast<int32_t>(cfg.num_layers) - 1;
  job.push(m.action([full_until](ReuseJob& j) {
    j.kv_.set_full_attention(j.seq_, full_until, /*keep_local_pages=*/true);
    return std::vector<ReuseJob::Step>{};
  }));
  // ... and a dense FFN: ranked alone, the few query rows would lose FFNs they all need.
  ForwardOptions fq = fr;
  fq.sparse_ffn = nullptr;
  job.push(m.forward(std::move(query), fq, true));
}

namespace {

// The reuse modes: one planning function each, and whether the request's own KV follows the
// head profile (redknot) or every head keeps every token (the baselines run the model's own
// attention, SPEC §4).
struct ModeTraits {
  ReuseMode mode;
  void (*plan)(ModePlanner&);
  bool head_profile;
};
const ModeTraits& traits_of(ReuseMode mode) {
  static const ModeTraits table[] = {{ReuseMode::Full, ModePlanner::plan_full, false},
                                     {ReuseMode::Prefix, ModePlanner::plan_prefix, false},
                                     {ReuseMode::Naive, ModePlanner::plan_naive, false},
                                     {ReuseMode::CacheBlend, ModePlanner::plan_cacheblend, false},
                                     {ReuseMode::Epic, ModePlanner::plan_epic, false},
                                     {ReuseMode::RedKnot, ModePlanner::plan_redknot, true}};
  for (const ModeTraits& t : table)
    if (t.mode == mode) return t;
  throw Error("unknown reuse mode");
}

}  // namespace

bool reuse_mode_uses_head_profile(ReuseMode mode) { return traits_of(mode).head_profile; }

ReuseJob::ReuseJob(Model& model, PagedKvCache& kv, SeqId seq, SegmentedPrompt prompt,
                   ChunkStore* store, const ReuseOptions& opts, const PrefixIndex* prefix_index)
    : model_(model),
      kv_(kv),
      seq_(seq),
      prompt_(std::move(prompt)),
      store_(store),
      opts_(opts),
      prefix_index_(prefix_index) {
  if (prompt_.total_tokens() == 0) throw Error("empty prompt");
  if (opts_.chunk < 0) throw Error("reuse chunk must be >= 0");
  if (!kv_.has_sequence(seq_)) throw Error("reuse job: the sequence must exist");
  out_.path.requested = out_.path.used = opts_.mode;
  planner_ = std::make_unique<ModePlanner>(ModePlanner{*this});
  // Modes that reuse segments need some; without, the prompt is one dense pass.
  const bool segmented = !prompt_.segments.empty() && !prompt_.query.empty();
  const ModeTraits& t = traits_of(segmented ? opts_.mode : ReuseMode::Full);
  if (!segmented && opts_.mode != ReuseMode::Full) {
    out_.path.used = ReuseMode::Full;
    out_.path.fallback = prompt_.segments.empty() ? "no_documents" : "no_query";
  }
  t.plan(*planner_);
}

ReuseJob::~ReuseJob() { finish(); }

void ReuseJob::finish() {
  if (full_attention_set_ && kv_.has_sequence(seq_)) kv_.set_full_attention(seq_, -1, false);
  full_attention_set_ = false;
  pins_.clear();
}

void ReuseJob::push(Step step) { queue_.push_back(std::move(step)); }

int64_t ReuseJob::next_rows() const {
  for (const Step& s : queue_) {
    if (s.action) continue;
    if (!s.parts.empty()) {
      int64_t rows = 0;
      for (const auto& [seq, ids] : s.parts) rows += static_cast<int64_t>(ids.size());
      return rows;
    }
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    return opts_.chunk > 0 ? std::min<int64_t>(n, opts_.chunk) : n;
  }
  return 0;
}

void ReuseJob::run_actions() {
  while (!queue_.empty() && queue_.front().action) {
    std::vector<Step> next = queue_.front().action(*this);
    queue_.pop_front();  // only once it succeeded
    for (auto it = next.rbegin(); it != next.rend(); ++it) queue_.push_front(std::move(*it));
  }
}

void ReuseJob::run_next() {
  run_actions();  // one that throws (relocation out of pages) stays queued
  if (queue_.empty()) {
    finish();
    return;
  }
  Step& s = queue_.front();
  if (!s.parts.empty()) {
    Batch b;
    for (const auto& [seq, ids] : s.parts) b.add_sequence(seq, ids, 0, /*last_logits=*/false);
    model_.forward(b, *s.cache, s.options);
    queue_.pop_front();
    run_actions();
    if (queue_.empty()) finish();
    return;
  }
  const int64_t total = static_cast<int64_t>(s.tokens.size());
  const int64_t n = opts_.chunk > 0 ? std::min<int64_t>(total, opts_.chunk) : total;
  const bool last = n == total;
  const std::vector<int32_t> ids(s.tokens.begin(), s.tokens.begin() + n);
  Batch b;
  if (s.overwrite) {
    b.tokens = ids;
    b.positions.assign(s.positions.begin(), s.positions.begin() + n);
    b.spans.push_back({s.seq, 0, n});
    b.overwrite = true;
  } else {
    b.add_sequence(s.seq, ids, s.cache->next_position(s.seq), last && s.logits);
  }
  ForwardOptions fo = s.options;
  fo.sparse_rows_after = total - n;
  Tensor logits = model_.forward(b, *s.cache, fo);
  if (last && s.logits)
    out_.last_logits.assign(logits.data<float>(), logits.data<float>() + logits.numel());
  if (last) {
    queue_.pop_front();
  } else {
    s.tokens.erase(s.tokens.begin(), s.tokens.begin() + n);
    if (s.overwrite) s.positions.erase(s.positions.begin(), s.positions.begin() + n);
  }
  // Trailing actions (publishing the last miss, resetting attention) are not left for a step
  // that has no forward to run.
  run_actions();
  if (queue_.empty()) finish();
}

PrefillOutcome prefill_with_reuse(Model& model, PagedKvCache& kv, SeqId seq,
                                  const SegmentedPrompt& p, ChunkStore* store,
                                  const ReuseOptions& opts, const PrefixIndex* prefix_index) {
  auto t0 = Clock::now();
  const bool fresh = !kv.has_sequence(seq);
  if (fresh) kv.add_sequence(seq);
  std::unique_ptr<ReuseJob> job;
  try {
    job = std::make_unique<ReuseJob>(model, kv, seq, p, store, opts, prefix_index);
  } catch (const OutOfKvMemory&) {
    // A miss's prefill does not fit beside the store's entries: dense, and said so.
    PrefillOutcome out =
        prefill_full(model, kv, seq, p, opts.chunk > 0 ? opts.chunk : 1 << 30, opts.stage_times);
    out.path.requested = opts.mode;
    out.path.used = ReuseMode::Full;
    out.path.fallback = "out_of_kv_pages";
    out.ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    return out;
  }
  while (!job->done()) job->run_next();
  PrefillOutcome out = std::move(job->outcome());
  out.ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  return out;
}

}  // namespace redknot
