// Randomised stress test of PagedKvCache over a small CPU page pool with a mixed head profile.
// Thousands of random sequence operations (add, batched appends with attention, fork, remove
// ranges, shift, remove_sequence) run against a host shadow copy of every sequence's tokens;
// after every operation each (sequence, layer, kv head) read() must agree with the shadow
// restricted to what that head keeps, and refused operations (OutOfKvMemory, invalid shifts)
// must leave the cache unchanged. Plus a few targeted regression tests.
#include "kv/paged_kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend/builtin.h"
#include "core/error.h"
#include "kv/page_pool.h"

namespace redknot {
namespace {

constexpr int kLayers = 2, kKvHeads = 3, kGroup = 2, kHeads = kKvHeads * kGroup, kDim = 8;
constexpr int kTables = kLayers * kKvHeads;
constexpr int kMaxLive = 16;

// Globals at (0, 0) and (1, 1); local heads with different windows and sinks elsewhere.
HeadProfile MixedProfile() {
  HeadProfile p(kLayers, kKvHeads);
  p.at(0, 1) = {HeadClass::Local, 10, 2};
  p.at(0, 2) = {HeadClass::Local, 6, 0};
  p.at(1, 0) = {HeadClass::Local, 10, 2};
  p.at(1, 2) = {HeadClass::Local, 13, 3};
  return p;
}

std::vector<float> InvFreq() {
  std::vector<float> f(kDim / 2);
  for (int i = 0; i < kDim / 2; ++i)
    f[i] = static_cast<float>(std::pow(100.0, -2.0 * i / kDim));  // 1, 0.316, 0.1, 0.0316
  return f;
}

// One cached token of the shadow: its values per (layer, kv head) as written, the key as it
// must read after every relocation so far, and whether a local head was allowed to drop it.
struct Tok {
  int32_t pos = 0;
  std::array<float, kTables * kDim> k_written{}, v{};
  std::array<double, kTables * kDim> k{};  // k_written rotated by every shift
  std::array<bool, kTables> droppable{};
  int shifts = 0;
};

struct SeqShadow {
  std::vector<Tok> toks;  // in position order
  // True when end_forward trimmed this sequence after its last shift (slack bound applies).
  bool trimmed = true;
  int32_t next_pos() const { return toks.empty() ? 0 : toks.back().pos + 1; }
};

// Everything observable about the cache, to check that refused operations change nothing.
struct Snapshot {
  int32_t free_pages = 0;
  std::map<SeqId, std::vector<std::vector<float>>> data;  // per table: positions, k, v
  bool operator==(const Snapshot&) const = default;
};

class Stress {
 public:
  Stress(int32_t page_size, int32_t pages, uint32_t seed, HeadProfile profile = MixedProfile())
      : backend_(MakeBackend()),
        pool_(*backend_, pages, page_size, kDim),
        profile_(std::move(profile)),
        inv_freq_host_(InvFreq()),
        rng_(seed) {
    Tensor inv = backend_->alloc(DType::F32, {kDim / 2});
    backend_->copy_from_host(inv, Tensor::from_f32(inv_freq_host_, {kDim / 2}));
    PagedKvOptions opts;
    opts.scale = scale_;
    cache_ = std::make_unique<PagedKvCache>(pool_, profile_, opts, inv);
  }

  static std::unique_ptr<Backend> MakeBackend() {
    register_builtin_backends();
    return create_backend("cpu");
  }

  PagedKvCache& cache() { return *cache_; }
  PagePool& pool() { return pool_; }
  std::map<SeqId, SeqShadow>& shadow() { return shadow_; }
  std::mt19937& rng() { return rng_; }

  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  float Value() { return std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng_); }
  SeqId RandomLive() {
    auto it = shadow_.begin();
    std::advance(it, Uniform(0, static_cast<int>(shadow_.size()) - 1));
    return it->first;
  }

  // ---- checks; each returns an empty string when fine ----

  // read() of one (seq, layer, head) against the shadow and the head's keep rule.
  std::string CheckTable(SeqId seq, int layer, int head) {
    std::ostringstream err;
    const SeqShadow& sh = shadow_.at(seq);
    const HeadSpec& spec = profile_.at(layer, head);
    const int table = layer * kKvHeads + head;
    Tensor k, v;
    std::vector<int32_t> pos;
    cache_->read(seq, layer, head, k, v, pos);
    const int64_t n = static_cast<int64_t>(pos.size());
    if (k.dim(0) != n || v.dim(0) != n || (n > 0 && k.dim(1) != kDim))
      return "read() shapes disagree with its positions";
    const int32_t next = sh.next_pos();
    const int64_t lo = int64_t{next} - spec.window + 1;  // first position a future query sees
    auto needed = [&](const Tok& t) {
      if (spec.cls == HeadClass::Global) return true;
      return !t.droppable[table] && (t.pos < spec.sink || t.pos >= lo);
    };
    size_t j = 0;
    int64_t dead_held = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i > 0 && pos[i] <= pos[i - 1]) return "positions not increasing";
      while (j < sh.toks.size() && sh.toks[j].pos < pos[i]) {
        if (needed(sh.toks[j]))
          err << "needed token at position " << sh.toks[j].pos << " is missing; ";
        ++j;
      }
      if (j == sh.toks.size() || sh.toks[j].pos != pos[i]) {
        err << "holds position " << pos[i] << " that the sequence does not have";
        return err.str();
      }
      const Tok& t = sh.toks[j++];
      for (int d = 0; d < kDim; ++d) {
        const float got_k = k.data<float>()[i * kDim + d];
        const float got_v = v.data<float>()[i * kDim + d];
        if (got_v != t.v[table * kDim + d]) err << "V differs at position " << t.pos << "; ";
        const bool k_ok = t.shifts == 0
                              ? got_k == t.k_written[table * kDim + d]
                              : std::fabs(got_k - t.k[table * kDim + d]) <= 2e-5 * t.shifts;
        if (!k_ok)
          err << "K differs at position " << t.pos << " dim " << d << ": " << got_k << " vs "
              << t.k[table * kDim + d] << " after " << t.shifts << " shifts; ";
        if (!err.str().empty()) return err.str();
      }
      if (spec.cls == HeadClass::Local && t.pos >= spec.sink && t.pos < lo) ++dead_held;
    }
    for (; j < sh.toks.size(); ++j)
      if (needed(sh.toks[j]))
        err << "needed token at position " << sh.toks[j].pos << " is missing; ";
    if (spec.cls == HeadClass::Global && n != static_cast<int64_t>(sh.toks.size()))
      err << "global head holds " << n << " of " << sh.toks.size() << " tokens; ";
    // Trimming drops whole pages: only the pages straddling the sink and window edges may hold
    // tokens no future query can see.
    if (sh.trimmed && dead_held > 2 * (pool_.page_size() - 1))
      err << "local head holds " << dead_held << " tokens outside sink and window; ";
    return err.str();
  }

  std::string CheckSequence(SeqId seq) {
    const SeqShadow& sh = shadow_.at(seq);
    if (!cache_->has_sequence(seq)) return "sequence missing";
    if (cache_->num_tokens(seq) != static_cast<int32_t>(sh.toks.size()))
      return "num_tokens " + std::to_string(cache_->num_tokens(seq)) + " vs shadow " +
             std::to_string(sh.toks.size());
    if (cache_->next_position(seq) != sh.next_pos())
      return "next_position " + std::to_string(cache_->next_position(seq)) + " vs shadow " +
             std::to_string(sh.next_pos());
    int64_t tokens[2] = {0, 0}, pages[2] = {0, 0};
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKvHeads; ++h) {
        std::string e = CheckTable(seq, l, h);
        if (!e.empty())
          return "layer " + std::to_string(l) + " head " + std::to_string(h) + ": " + e;
        Tensor k, v;
        std::vector<int32_t> pos;
        cache_->read(seq, l, h, k, v, pos);
        const int cls = profile_.at(l, h).cls == HeadClass::Global ? 0 : 1;
        const int64_t n = static_cast<int64_t>(pos.size());
        tokens[cls] += n;
        pages[cls] += (n + pool_.page_size() - 1) / pool_.page_size();
      }
    // Every page of a table is full except its last: usage is exactly the ceil of the tokens.
    const KvUsage u = cache_->usage(seq);
    if (u.global_tokens != tokens[0] || u.local_tokens != tokens[1] || u.global_pages != pages[0] ||
        u.local_pages != pages[1])
      return "usage() disagrees with read(): pages " + std::to_string(u.global_pages) + "/" +
             std::to_string(u.local_pages) + " vs packed " + std::to_string(pages[0]) + "/" +
             std::to_string(pages[1]);
    return "";
  }

  std::string CheckAll() {
    for (auto& [id, sh] : shadow_) {
      std::string e = CheckSequence(id);
      if (!e.empty()) return "seq " + std::to_string(id) + ": " + e;
    }
    // Pages in use can't exceed the sum of the tables' pages (sharing makes it smaller).
    const KvUsage u = cache_->usage();
    if (pool_.num_pages() - pool_.num_free() > u.global_pages + u.local_pages)
      return "pool has more pages in use than the tables hold (leak)";
    return "";
  }

  Snapshot Snap() {
    Snapshot s;
    s.free_pages = pool_.num_free();
    for (auto& [id, sh] : shadow_) {
      auto& tables = s.data[id];
      tables.push_back({static_cast<float>(cache_->num_tokens(id)),
                        static_cast<float>(cache_->next_position(id))});
      for (int l = 0; l < kLayers; ++l)
        for (int h = 0; h < kKvHeads; ++h) {
          Tensor k, v;
          std::vector<int32_t> pos;
          cache_->read(id, l, h, k, v, pos);
          std::vector<float> flat(pos.begin(), pos.end());
          flat.insert(flat.end(), k.data<float>(), k.data<float>() + k.numel());
          flat.insert(flat.end(), v.data<float>(), v.data<float>() + v.numel());
          tables.push_back(std::move(flat));
        }
    }
    return s;
  }

  // ---- operations on cache and shadow together ----

  void AddSequence(SeqId id) {
    cache_->add_sequence(id);
    shadow_[id] = SeqShadow{};
  }

  // Appends `counts[i]` tokens to `seqs[i]` in one batch, optionally with a position gap;
  // writes every layer and checks attend() on some layers. Returns false on OutOfKvMemory.
  // `attend_errors` collects attention mismatches.
  bool Forward(const std::vector<SeqId>& seqs, const std::vector<int>& counts, int gap,
               double attend_prob, std::string& attend_errors) {
    Batch b;
    for (size_t i = 0; i < seqs.size(); ++i)
      b.add_sequence(seqs[i], std::vector<int32_t>(counts[i], 0),
                     shadow_.at(seqs[i]).next_pos() + gap, false);
    const int64_t T = b.size();
    Tensor positions = backend_->alloc(DType::I32, {T});
    backend_->copy_from_host(positions, Tensor::from_i32(b.positions, {T}));
    try {
      cache_->begin_forward(b, positions);
    } catch (const OutOfKvMemory&) {
      return false;
    }
    // New tokens with distinct random values for every (layer, head).
    std::vector<Tok> fresh(T);
    for (int64_t t = 0; t < T; ++t) {
      fresh[t].pos = b.positions[t];
      for (int i = 0; i < kTables * kDim; ++i) {
        fresh[t].k_written[i] = Value();
        fresh[t].k[i] = fresh[t].k_written[i];
        fresh[t].v[i] = Value();
      }
    }
    for (const SeqSpan& sp : b.spans)
      for (int64_t i = 0; i < sp.count; ++i) shadow_.at(sp.seq).toks.push_back(fresh[sp.begin + i]);
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> kh(T * kKvHeads * kDim), vh(T * kKvHeads * kDim);
      for (int64_t t = 0; t < T; ++t)
        for (int h = 0; h < kKvHeads; ++h)
          for (int d = 0; d < kDim; ++d) {
            kh[(t * kKvHeads + h) * kDim + d] = fresh[t].k_written[(l * kKvHeads + h) * kDim + d];
            vh[(t * kKvHeads + h) * kDim + d] = fresh[t].v[(l * kKvHeads + h) * kDim + d];
          }
      Tensor kd = backend_->alloc(backend_->act_dtype(), {T, kKvHeads, kDim});
      Tensor vd = backend_->alloc(backend_->act_dtype(), {T, kKvHeads, kDim});
      backend_->copy_from_host(kd, Tensor::from_f32(kh, {T, kKvHeads, kDim}));
      backend_->copy_from_host(vd, Tensor::from_f32(vh, {T, kKvHeads, kDim}));
      cache_->write(l, kd, vd);
      if (std::bernoulli_distribution(attend_prob)(rng_)) {
        ++attend_calls_;
        attend_errors += CheckAttend(b, l);
      }
    }
    cache_->end_forward();
    for (const SeqSpan& sp : b.spans) {
      SeqShadow& sh = shadow_.at(sp.seq);
      sh.trimmed = true;
      const int32_t next = sh.next_pos();
      for (int l = 0; l < kLayers; ++l)
        for (int h = 0; h < kKvHeads; ++h) {
          const HeadSpec& spec = profile_.at(l, h);
          if (spec.cls != HeadClass::Local) continue;
          for (Tok& t : sh.toks)
            if (t.pos >= spec.sink && int64_t{t.pos} < int64_t{next} - spec.window + 1)
              t.droppable[l * kKvHeads + h] = true;
        }
    }
    return true;
  }

  // attend() with a random q against attention over the held tokens (values from the shadow)
  // with the head's mask: causal, and window/sink for local heads.
  std::string CheckAttend(const Batch& b, int layer) {
    const int64_t T = b.size();
    std::vector<float> qh(T * kHeads * kDim);
    for (float& x : qh) x = Value();
    Tensor q = backend_->alloc(backend_->act_dtype(), {T, kHeads, kDim});
    backend_->copy_from_host(q, Tensor::from_f32(qh, {T, kHeads, kDim}));
    Tensor out = backend_->alloc(backend_->act_dtype(), {T, kHeads, kDim});
    cache_->attend(layer, q, out);
    Tensor got = backend_->to_host_f32(out);
    std::ostringstream err;
    for (const SeqSpan& sp : b.spans) {
      const SeqShadow& sh = shadow_.at(sp.seq);
      for (int h = 0; h < kKvHeads; ++h) {
        const HeadSpec& spec = profile_.at(layer, h);
        const int table = layer * kKvHeads + h;
        Tensor k, v;
        std::vector<int32_t> held;
        cache_->read(sp.seq, layer, h, k, v, held);
        std::vector<const Tok*> keys;
        for (int32_t p : held) {
          auto it = std::lower_bound(sh.toks.begin(), sh.toks.end(), p,
                                     [](const Tok& t, int32_t x) { return t.pos < x; });
          if (it == sh.toks.end() || it->pos != p) return "attend: held position not in shadow";
          keys.push_back(&*it);
        }
        for (int64_t t = sp.begin; t < sp.begin + sp.count; ++t) {
          const int32_t qp = b.positions[t];
          for (int g = 0; g < kGroup; ++g) {
            const int hq = h * kGroup + g;
            const float* qv = qh.data() + (t * kHeads + hq) * kDim;
            std::vector<double> w;
            std::vector<const Tok*> vis;
            for (const Tok* key : keys) {
              const bool visible =
                  key->pos <= qp && (spec.cls == HeadClass::Global || qp - key->pos < spec.window ||
                                     key->pos < spec.sink);
              if (!visible) continue;
              double dot = 0;
              for (int d = 0; d < kDim; ++d) dot += double{qv[d]} * key->k[table * kDim + d];
              w.push_back(dot * scale_);
              vis.push_back(key);
            }
            std::array<double, kDim> ref{};
            if (!w.empty()) {
              const double mx = *std::max_element(w.begin(), w.end());
              double sum = 0;
              for (double& x : w) sum += (x = std::exp(x - mx));
              for (size_t i = 0; i < vis.size(); ++i)
                for (int d = 0; d < kDim; ++d) ref[d] += w[i] / sum * vis[i]->v[table * kDim + d];
            }
            for (int d = 0; d < kDim; ++d) {
              const float o = got.data<float>()[(t * kHeads + hq) * kDim + d];
              if (std::fabs(o - ref[d]) > 1e-4) {
                err << "attend layer " << layer << " seq " << sp.seq << " q pos " << qp << " head "
                    << hq << " dim " << d << ": " << o << " vs " << ref[d] << "; ";
                return err.str();
              }
            }
          }
        }
      }
    }
    return "";
  }

  void Fork(SeqId src, SeqId dst) {
    cache_->fork(src, dst);
    shadow_[dst] = shadow_.at(src);
  }

  void RemoveSequence(SeqId id) {
    cache_->remove_sequence(id);
    shadow_.erase(id);
  }

  // Returns false on OutOfKvMemory.
  bool Remove(SeqId id, int32_t p0, int32_t p1) {
    try {
      cache_->remove(id, p0, p1);
    } catch (const OutOfKvMemory&) {
      return false;
    }
    const int32_t end = p1 < 0 ? INT32_MAX : p1;
    std::erase_if(shadow_.at(id).toks, [&](const Tok& t) { return t.pos >= p0 && t.pos < end; });
    return true;
  }

  // Returns false on OutOfKvMemory.
  bool Shift(SeqId id, int32_t p0, int32_t p1, int32_t delta) {
    try {
      cache_->shift(id, p0, p1, delta);
    } catch (const OutOfKvMemory&) {
      return false;
    }
    const int32_t end = p1 < 0 ? INT32_MAX : p1;
    SeqShadow& sh = shadow_.at(id);
    bool any = false;
    for (Tok& t : sh.toks) {
      if (t.pos < p0 || t.pos >= end) continue;
      any = true;
      t.pos += delta;
      ++t.shifts;
      for (int tb = 0; tb < kTables; ++tb)
        for (int i = 0; i < kDim / 2; ++i) {
          // Model-free RoPE relocation: rotate-half pairs (i, i + D/2) by delta * inv_freq[i].
          const double angle = static_cast<float>(delta) * inv_freq_host_[i];
          const double a = t.k[tb * kDim + i], b = t.k[tb * kDim + i + kDim / 2];
          t.k[tb * kDim + i] = a * std::cos(angle) - b * std::sin(angle);
          t.k[tb * kDim + i + kDim / 2] = b * std::cos(angle) + a * std::sin(angle);
        }
    }
    if (any) sh.trimmed = false;
    return true;
  }

  int64_t attend_calls_ = 0;

 private:
  std::unique_ptr<Backend> backend_;
  PagePool pool_;
  HeadProfile profile_;
  std::vector<float> inv_freq_host_;
  float scale_ = 1.0f / std::sqrt(static_cast<float>(kDim));
  std::mt19937 rng_;
  std::unique_ptr<PagedKvCache> cache_;
  std::map<SeqId, SeqShadow> shadow_;
};

struct StressCase {
  int32_t page_size, pages, ops;
  uint32_t seed;
};

void PrintTo(const StressCase& c, std::ostream* os) {
  *os << "page " << c.page_size << ", pool " << c.pages << ", " << c.ops << " ops, seed " << c.seed;
}

class PagedKvStress : public ::testing::TestWithParam<StressCase> {};

TEST_P(PagedKvStress, RandomOperationsMatchShadow) {
  const StressCase& c = GetParam();
  Stress s(c.page_size, c.pages, c.seed);
  PagedKvCache& cache = s.cache();
  std::map<std::string, int> counts;
  SeqId next_id = 0;
  std::string attend_errors;

  for (int op = 0; op < c.ops; ++op) {
    const int live = static_cast<int>(s.shadow().size());
    const bool pool_tight = s.pool().num_free() < c.pages / 8;
    int r = s.Uniform(0, 99);
    if (pool_tight && r < 40) r = 60;  // free memory more often when the pool is nearly full
    std::ostringstream what;
    bool refused = false;
    const Snapshot before = s.Snap();

    if (live == 0 || (r < 7 && live < kMaxLive)) {
      const SeqId id = next_id++;
      what << "add_sequence(" << id << ")";
      s.AddSequence(id);
      ++counts["add"];
    } else if (r < 50 || r >= 94) {
      // A batch of up to 4 sequences: decode steps, prefill chunks, sometimes a position gap.
      std::vector<SeqId> seqs;
      const int want = s.Uniform(1, std::min(4, live));
      while (static_cast<int>(seqs.size()) < want) {
        const SeqId id = s.RandomLive();
        if (std::find(seqs.begin(), seqs.end(), id) == seqs.end()) seqs.push_back(id);
      }
      std::vector<int> n;
      for (size_t i = 0; i < seqs.size(); ++i) {
        const int kind = s.Uniform(0, 9);
        n.push_back(r >= 94    ? s.Uniform(20, 60)
                    : kind < 7 ? 1
                    : kind < 9 ? s.Uniform(2, 8)
                               : s.Uniform(9, 30));
      }
      const int gap = s.Uniform(0, 9) == 0 ? s.Uniform(1, 3) : 0;
      what << "forward(";
      for (size_t i = 0; i < seqs.size(); ++i) what << seqs[i] << "x" << n[i] << " ";
      what << "gap " << gap << ")";
      std::string attend_err;
      refused = !s.Forward(seqs, n, gap, 0.3, attend_err);
      ASSERT_TRUE(attend_err.empty()) << "op " << op << " " << what.str() << ": " << attend_err;
      ++counts[refused ? "forward_oom" : "forward"];
      if (!refused && seqs.size() > 1) ++counts["forward_multi"];
    } else if (r < 58) {
      if (live >= kMaxLive) continue;
      const SeqId src = s.RandomLive(), dst = next_id++;
      what << "fork(" << src << ", " << dst << ")";
      s.Fork(src, dst);
      ++counts["fork"];
    } else if (r < 65) {
      const SeqId id = s.RandomLive();
      what << "remove_sequence(" << id << ")";
      s.RemoveSequence(id);
      ++counts["remove_sequence"];
    } else if (r < 77) {
      const SeqId id = s.RandomLive();
      const auto& toks = s.shadow().at(id).toks;
      const int32_t next = s.shadow().at(id).next_pos();
      int32_t p0, p1;
      if (toks.empty() || s.Uniform(0, 1) == 0) {  // tail truncation
        p0 = s.Uniform(0, next);
        p1 = -1;
      } else {  // a middle range (may hit the tail too)
        p0 = toks[s.Uniform(0, static_cast<int>(toks.size()) - 1)].pos;
        p1 = p0 + s.Uniform(1, 12);
      }
      what << "remove(" << id << ", " << p0 << ", " << p1 << ")";
      refused = !s.Remove(id, p0, p1);
      ASSERT_FALSE(refused && p1 < 0) << "op " << op << ": tail truncation needs no free page";
      ++counts[refused ? "remove_oom" : p1 < 0 ? "remove_tail" : "remove_range"];
    } else {
      const SeqId id = s.RandomLive();
      const auto& toks = s.shadow().at(id).toks;
      if (toks.empty()) continue;
      const int n = static_cast<int>(toks.size());
      int i = s.Uniform(0, n - 1), j = n - 1;
      const int kind = s.Uniform(0, 2);
      if (kind == 0) i = 0;                                      // the whole sequence
      if (kind == 2) j = s.Uniform(i, std::min(n - 1, i + 10));  // a middle range
      const int32_t p0 = toks[i].pos;
      const int32_t p1 = j == n - 1 && s.Uniform(0, 1) ? -1 : toks[j].pos + 1;
      // Bounds that keep positions non-negative and strictly increasing.
      const int32_t lo_raw = i > 0 ? toks[i - 1].pos - toks[i].pos + 1 : -toks[i].pos;
      const int32_t hi_raw = j + 1 < n ? toks[j + 1].pos - toks[j].pos - 1 : INT32_MAX;
      const int32_t lo = std::max(-40, lo_raw), hi = std::min(40, hi_raw);
      if (r < 90) {
        if (lo == 0 && hi == 0) continue;
        int32_t delta = 0;
        while (delta == 0) delta = s.Uniform(lo, hi);
        what << "shift(" << id << ", " << p0 << ", " << p1 << ", " << delta << ")";
        refused = !s.Shift(id, p0, p1, delta);
        ++counts[refused ? "shift_oom" : "shift"];
      } else {
        // An out-of-order or negative result must be refused with nothing changed.
        const int32_t delta = hi_raw != INT32_MAX && (lo_raw == 0 || s.Uniform(0, 1))
                                  ? hi_raw + s.Uniform(1, 3)
                                  : lo_raw - s.Uniform(1, 3);
        what << "invalid shift(" << id << ", " << p0 << ", " << p1 << ", " << delta << ")";
        EXPECT_THROW(cache.shift(id, p0, p1, delta), Error) << "op " << op << " " << what.str();
        refused = true;
        ++counts["shift_invalid"];
      }
    }
    if (refused) {
      ASSERT_TRUE(before == s.Snap())
          << "op " << op << " " << what.str() << " was refused but changed the cache";
    }
    const std::string e = s.CheckAll();
    ASSERT_TRUE(e.empty()) << "after op " << op << " " << what.str() << ": " << e;
  }

  for (auto& [name, n] : counts) std::printf("  %-16s %6d\n", name.c_str(), n);
  std::printf("  %-16s %6lld\n", "attend checks", static_cast<long long>(s.attend_calls_));
  // The random mix must really have exercised every path.
  for (const char* op :
       {"add", "forward", "forward_multi", "forward_oom", "fork", "remove_sequence", "remove_tail",
        "remove_range", "shift", "shift_invalid"})
    EXPECT_GE(counts[op], 10) << op;
  EXPECT_GE(s.attend_calls_, 200);

  std::vector<SeqId> ids;
  for (auto& [id, sh] : s.shadow()) ids.push_back(id);
  for (SeqId id : ids) s.RemoveSequence(id);
  EXPECT_EQ(s.pool().num_free(), s.pool().num_pages()) << "pages leaked";
}

INSTANTIATE_TEST_SUITE_P(SmallPools, PagedKvStress,
                         ::testing::Values(StressCase{4, 320, 4000, 1},
                                           StressCase{16, 110, 3000, 7},
                                           StressCase{4, 160, 3000, 42}),
                         [](const auto& info) {
                           return "page" + std::to_string(info.param.page_size) + "_pool" +
                                  std::to_string(info.param.pages) + "_seed" +
                                  std::to_string(info.param.seed);
                         });

// Appends `n` tokens to `seq` one forward at a time (decode-like); false once the pool is full.
bool Decode(Stress& s, SeqId seq, int n) {
  std::string err;
  for (int i = 0; i < n; ++i) {
    if (!s.Forward({seq}, {1}, 0, 0.0, err)) return false;
  }
  return true;
}

// Local heads drop tokens the sequence still has (num_tokens, next_position count them): a
// shift onto those positions must be refused although no table holds them any more.
TEST(PagedKvCache, ShiftRefusesCollisionWithTokensLocalHeadsDropped) {
  HeadProfile all_local(kLayers, kKvHeads);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h) all_local.at(l, h) = {HeadClass::Local, 4, 0};
  Stress s(4, 64, 1, all_local);
  s.AddSequence(0);
  std::string err;
  ASSERT_TRUE(s.Forward({0}, {20}, 0, 0.0, err));
  ASSERT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  const Snapshot before = s.Snap();
  // Positions 0..7 would move onto 30..37, past 8..19: out of order for the sequence.
  EXPECT_THROW(s.cache().shift(0, 0, 8, 30), Error);
  EXPECT_TRUE(before == s.Snap());
  EXPECT_EQ(s.cache().next_position(0), 20);
  // A valid relocation of the same tokens still works.
  ASSERT_TRUE(s.Shift(0, 8, -1, 5));
  EXPECT_EQ(s.cache().next_position(0), 25);
  EXPECT_TRUE(s.CheckAll().empty()) << s.CheckAll();
}

// Truncating a sequence frees memory; it must work on a full pool and copy nothing.
TEST(PagedKvCache, TailTruncationNeedsNoFreePages) {
  Stress s(4, 60, 3);
  s.AddSequence(0);
  ASSERT_FALSE(Decode(s, 0, 1000)) << "the pool should fill up";
  ASSERT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  const int32_t next = s.cache().next_position(0);
  const int32_t free_before = s.pool().num_free();
  ASSERT_TRUE(s.Remove(0, next - 1, -1)) << "dropping the last token needs no new page";
  EXPECT_GE(s.pool().num_free(), free_before);
  ASSERT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  ASSERT_TRUE(s.Remove(0, next - 9, -1));
  EXPECT_GT(s.pool().num_free(), free_before);
  ASSERT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  // A fork shares every page; truncating the fork keeps sharing what is left (no copy).
  const int32_t used = s.pool().num_pages() - s.pool().num_free();
  s.Fork(0, 1);
  EXPECT_EQ(s.pool().num_pages() - s.pool().num_free(), used);
  ASSERT_TRUE(s.Remove(1, 10, -1));
  EXPECT_EQ(s.pool().num_pages() - s.pool().num_free(), used);
  ASSERT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  // Both continue independently: the fork's appends copy its shortened shared page.
  ASSERT_TRUE(Decode(s, 1, 6));
  ASSERT_TRUE(Decode(s, 0, 1));
  EXPECT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  s.RemoveSequence(0);
  s.RemoveSequence(1);
  EXPECT_EQ(s.pool().num_free(), s.pool().num_pages());
}

// Copy-on-write: a fork's appends, shifts and removals never show through in the original, and
// pages are shared until written.
TEST(PagedKvCache, ForkSharesPagesAndCopiesOnWrite) {
  Stress s(4, 400, 5);
  s.AddSequence(0);
  std::string err;
  ASSERT_TRUE(s.Forward({0}, {30}, 0, 0.0, err));  // 30 tokens: last pages partly used
  const int32_t used = s.pool().num_pages() - s.pool().num_free();
  s.Fork(0, 1);
  EXPECT_EQ(s.pool().num_pages() - s.pool().num_free(), used) << "fork must share, not copy";
  const Snapshot original = s.Snap();
  // One decode step on the fork: every table's partly used last page is copied, nothing else.
  ASSERT_TRUE(s.Forward({1}, {1}, 0, 1.0, err));
  ASSERT_TRUE(err.empty()) << err;
  EXPECT_EQ(s.pool().num_pages() - s.pool().num_free(), used + kTables);
  ASSERT_TRUE(s.Shift(1, 0, -1, 7));
  ASSERT_TRUE(s.Remove(1, 10, 12));
  ASSERT_TRUE(s.Remove(1, 25, -1));
  ASSERT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  // The original reads exactly as before.
  EXPECT_EQ(s.Snap().data.at(0), original.data.at(0));
  // Both continue in one batch.
  ASSERT_TRUE(s.Forward({0, 1}, {3, 2}, 0, 1.0, err));
  ASSERT_TRUE(err.empty()) << err;
  ASSERT_TRUE(s.CheckAll().empty()) << s.CheckAll();
  s.RemoveSequence(1);
  s.RemoveSequence(0);
  EXPECT_EQ(s.pool().num_free(), s.pool().num_pages());
}

}  // namespace
}  // namespace redknot

namespace redknot {
namespace {

// Batch::last_stored_layer: deeper layers (local heads only) keep no slot for the batch's tokens
// and take no pages for them; a global head past the limit refuses the batch, changing nothing.
TEST(PagedKvCache, LastStoredLayerKeepsDeeperLayersEmpty) {
  register_builtin_backends();
  auto backend = create_backend("cpu");
  HeadProfile p(kLayers, kKvHeads);
  for (int h = 0; h < kKvHeads; ++h) p.at(1, h) = {HeadClass::Local, 4, 0};
  PagePool pool(*backend, 64, 4, kDim);
  PagedKvCache kv(pool, p, {0.5f}, Tensor::from_f32(InvFreq(), {kDim / 2}));
  kv.add_sequence(0);
  Batch b;
  b.add_sequence(0, std::vector<int32_t>(10, 1), 0, false);
  b.last_stored_layer = 0;
  Tensor pos = Tensor::from_i32(b.positions, {10});
  const int free_before = pool.num_free();
  kv.begin_forward(b, pos);
  kv.end_forward();
  EXPECT_EQ(kv.next_position(0), 10);
  EXPECT_EQ(pool.num_free(), free_before - kKvHeads * 3);  // layer 0 only: 10 tokens, pages of 4
  for (int h = 0; h < kKvHeads; ++h) {
    EXPECT_EQ(kv.slot_rows(0, 0, h).size(), 10u);
    EXPECT_TRUE(kv.slot_rows(0, 1, h).empty()) << "head " << h;
  }
  // The next tokens are stored everywhere again.
  Batch next;
  next.add_sequence(0, {1, 1}, 10);
  Tensor pos2 = Tensor::from_i32(next.positions, {2});
  kv.begin_forward(next, pos2);
  kv.end_forward();
  for (int h = 0; h < kKvHeads; ++h) EXPECT_EQ(kv.slot_rows(0, 1, h).size(), 2u);
  // Overwriting (selective recompute) must store every layer.
  Batch overwrite;
  overwrite.add_sequence(0, {1}, 3, false);
  overwrite.overwrite = true;
  overwrite.last_stored_layer = 0;
  Tensor pos3 = Tensor::from_i32(overwrite.positions, {1});
  EXPECT_THROW(kv.begin_forward(overwrite, pos3), Error);
  EXPECT_EQ(kv.next_position(0), 12);
  // A global head past the limit: refused before anything changes.
  HeadProfile g(kLayers, kKvHeads);
  PagedKvCache kv_g(pool, g, {0.5f}, Tensor::from_f32(InvFreq(), {kDim / 2}));
  kv_g.add_sequence(0);
  const int free_g = pool.num_free();
  EXPECT_THROW(kv_g.begin_forward(b, pos), Error);
  EXPECT_EQ(pool.num_free(), free_g);
  EXPECT_EQ(kv_g.next_position(0), 0);
}

// FP8 KV (--kv-cache-dtype fp8): every (token, layer, kv head) row is stored as e4m3 codes plus
// its own f32 scale; read() returns exactly the dequantized stored row. Relocating keys
// (append_relocated, shift) gives exactly the requantization of the rotated stored key: one
// rounding, the precision of a key written at its new position; values move as stored bytes.
TEST(PagedKvCacheFp8, RowsCarryScalesAndRelocationRoundsOnce) {
  register_builtin_backends();
  auto backend = create_backend("cpu");
  PagePool pool(*backend, 64, 4, kDim, true, DType::F8_E4M3);
  ASSERT_TRUE(pool.fp8());
  EXPECT_EQ(pool.row_width(), kDim + 4);
  EXPECT_EQ(pool.bytes_per_page(), 2 * 4 * (kDim + 4) + 4 * 4);
  EXPECT_LT(pool.bytes_per_page(), PagePool::page_bytes(4, kDim, DType::F32) / 2);
  const Tensor inv = Tensor::from_f32(InvFreq(), {kDim / 2});
  PagedKvCache kv(pool, HeadProfile(kLayers, kKvHeads), {0.5f}, inv);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> val(-3.0f, 3.0f);
  constexpr int T = 7;
  std::vector<std::vector<float>> k_in(kLayers), v_in(kLayers);  // [T, kKvHeads, kDim]
  kv.add_sequence(0);
  Batch b;
  b.add_sequence(0, std::vector<int32_t>(T, 1), 0, false);
  kv.begin_forward(b, Tensor::from_i32(b.positions, {T}));
  for (int l = 0; l < kLayers; ++l) {
    k_in[l].resize(T * kKvHeads * kDim);
    v_in[l].resize(T * kKvHeads * kDim);
    for (auto& x : k_in[l]) x = val(rng);
    for (auto& x : v_in[l]) x = val(rng);
    kv.write(l, Tensor::from_f32(k_in[l], {T, kKvHeads, kDim}),
             Tensor::from_f32(v_in[l], {T, kKvHeads, kDim}));
  }
  kv.end_forward();
  // The dequantized row fp8_quantize_row makes of x[0, kDim).
  auto stored = [](const float* x) {
    std::vector<uint8_t> q(kDim);
    const float s = fp8_quantize_row(x, kDim, q.data());
    std::vector<float> out(kDim);
    for (int d = 0; d < kDim; ++d) out[d] = fp8_e4m3_to_f32(q[d]) * s;
    return out;
  };
  // Keys of table (l, h) rotated by `delta` on the backend, from the rows read back.
  auto rotated = [&](const Tensor& k, int32_t delta) {
    const int64_t n = k.dim(0);
    Tensor x = Tensor::host(DType::F32, {n, 1, kDim});
    std::memcpy(x.raw(), k.raw(), k.nbytes());
    backend->rope(x, Tensor::from_i32(std::vector<int32_t>(n, delta), {n}), inv, 1.0f);
    std::vector<float> out;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<float> r = stored(x.data<float>() + i * kDim);
      out.insert(out.end(), r.begin(), r.end());
    }
    return out;
  };
  std::vector<std::vector<float>> k0(kLayers * kKvHeads), v0(kLayers * kKvHeads);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h) {
      Tensor k, v;
      std::vector<int32_t> pos;
      kv.read(0, l, h, k, v, pos);
      ASSERT_EQ(pos.size(), size_t{T});
      for (int t = 0; t < T; ++t) {
        const std::vector<float> ks = stored(&k_in[l][(t * kKvHeads + h) * kDim]);
        const std::vector<float> vs = stored(&v_in[l][(t * kKvHeads + h) * kDim]);
        for (int d = 0; d < kDim; ++d) {
          ASSERT_EQ(k.data<float>()[t * kDim + d], ks[d]) << "l" << l << " h" << h << " t" << t;
          ASSERT_EQ(v.data<float>()[t * kDim + d], vs[d]) << "l" << l << " h" << h << " t" << t;
        }
      }
      k0[l * kKvHeads + h].assign(k.data<float>(), k.data<float>() + k.numel());
      v0[l * kKvHeads + h].assign(v.data<float>(), v.data<float>() + v.numel());
    }
  // A cached segment reused 100 positions later (RedKnot's relocation).
  std::vector<std::vector<int32_t>> rows;
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h) rows.push_back(kv.slot_rows(0, l, h));
  std::vector<int32_t> src_pos(T);
  for (int t = 0; t < T; ++t) src_pos[t] = t;
  kv.add_sequence(1);
  kv.append_relocated(1, rows, src_pos, 100);
  double worst = 0;  // against the key computed at full precision and rounded once
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h) {
      Tensor k, v;
      std::vector<int32_t> pos;
      kv.read(1, l, h, k, v, pos);
      ASSERT_EQ(pos.front(), 100);
      const int tb = l * kKvHeads + h;
      Tensor k_prev = Tensor::from_f32(k0[tb], {T, kDim});
      const std::vector<float> want = rotated(k_prev, 100);
      for (int64_t i = 0; i < k.numel(); ++i) {
        ASSERT_EQ(k.data<float>()[i], want[i]) << "relocated key, table " << tb << " elem " << i;
        ASSERT_EQ(v.data<float>()[i], v0[tb][i]) << "values move as stored";
      }
      // The exact input key rotated by 100 and rounded once is within two e4m3 roundings.
      std::vector<float> exact(T * kDim);
      for (int t = 0; t < T; ++t)
        std::copy_n(&k_in[l][(t * kKvHeads + h) * kDim], kDim, &exact[t * kDim]);
      const std::vector<float> fresh = rotated(Tensor::from_f32(exact, {T, kDim}), 100);
      double num = 0, den = 0;
      for (int64_t i = 0; i < k.numel(); ++i) {
        num += std::pow(double(k.data<float>()[i]) - fresh[i], 2);
        den += std::pow(double(fresh[i]), 2);
      }
      worst = std::max(worst, std::sqrt(num / den));
    }
  EXPECT_LE(worst, 0.06) << "relocated FP8 keys vs a fresh write at the new position";
  // shift() re-rotates in place with the same rule.
  kv.shift(1, 0, -1, -50);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h) {
      Tensor k, v;
      std::vector<int32_t> pos;
      kv.read(1, l, h, k, v, pos);
      ASSERT_EQ(pos.front(), 50);
      const int tb = l * kKvHeads + h;
      const std::vector<float> want = rotated(
          Tensor::from_f32(rotated(Tensor::from_f32(k0[tb], {T, kDim}), 100), {T, kDim}), -50);
      for (int64_t i = 0; i < k.numel(); ++i)
        ASSERT_EQ(k.data<float>()[i], want[i]) << "shifted key, table " << tb << " elem " << i;
    }
}

}  // namespace
}  // namespace redknot

namespace redknot {
namespace {

// A prompt's cached segments relocated in one call read exactly as one call per segment (keys
// re-rotated by each segment's own delta, local heads left with what they keep after the last
// segment), and take no more pages; a call whose positions go backwards changes nothing.
TEST(PagedKvCache, RelocatingSegmentsTogetherEqualsOneByOne) {
  register_builtin_backends();
  auto backend = create_backend("cpu");
  PagePool pool(*backend, 256, 4, kDim);
  const Tensor inv = Tensor::from_f32(InvFreq(), {kDim / 2});
  // The source: an all-global cache over the same pool (as the chunk store's).
  PagedKvCache store(pool, HeadProfile(kLayers, kKvHeads), {0.5f}, inv);
  PagedKvCache kv(pool, MixedProfile(), {0.5f}, inv);
  constexpr int T = 40;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> val(-2.0f, 2.0f);
  store.add_sequence(0);
  Batch b;
  b.add_sequence(0, std::vector<int32_t>(T, 1), 0, false);
  store.begin_forward(b, Tensor::from_i32(b.positions, {T}));
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k(T * kKvHeads * kDim), v(k.size());
    for (auto& x : k) x = val(rng);
    for (auto& x : v) x = val(rng);
    store.write(l, Tensor::from_f32(k, {T, kKvHeads, kDim}),
                Tensor::from_f32(v, {T, kKvHeads, kDim}));
  }
  store.end_forward();
  // Three segments: source tokens [0,10) at +0, [10,25) at +5, [25,40) at +12.
  const int cuts[] = {0, 10, 25, 40};
  const int32_t deltas[] = {0, 5, 12};
  std::vector<std::vector<std::vector<int32_t>>> rows(3);
  std::vector<std::vector<int32_t>> src_pos(3);
  for (int s = 0; s < 3; ++s) {
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKvHeads; ++h) {
        const std::vector<int32_t> all = store.slot_rows(0, l, h);
        rows[s].emplace_back(all.begin() + cuts[s], all.begin() + cuts[s + 1]);
      }
    for (int t = cuts[s]; t < cuts[s + 1]; ++t) src_pos[s].push_back(t);
  }
  kv.add_sequence(1);
  int free_before = pool.num_free();
  for (int s = 0; s < 3; ++s) kv.append_relocated(1, rows[s], src_pos[s], deltas[s]);
  const int one_by_one_pages = free_before - pool.num_free();
  kv.add_sequence(2);
  free_before = pool.num_free();
  std::vector<PagedKvCache::RelocatedSegment> segs;
  for (int s = 0; s < 3; ++s) segs.push_back({&rows[s], &src_pos[s], deltas[s]});
  kv.append_relocated(2, segs);
  EXPECT_LE(free_before - pool.num_free(), one_by_one_pages);
  EXPECT_EQ(kv.next_position(2), kv.next_position(1));
  EXPECT_EQ(kv.token_positions(2), kv.token_positions(1));
  // What each head keeps (pages may also hold rows a local head no longer reads: trimming is
  // by page, attention by position): positions, keys, values.
  const HeadProfile profile = MixedProfile();
  auto read_all = [&](SeqId seq) {
    std::vector<std::vector<float>> out;
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKvHeads; ++h) {
        Tensor k, v;
        std::vector<int32_t> pos;
        kv.read(seq, l, h, k, v, pos);
        std::vector<float> kept_pos, kept_k, kept_v;
        for (size_t i = 0; i < pos.size(); ++i) {
          if (!profile.keeps(l, h, pos[i], kv.next_position(seq))) continue;
          kept_pos.push_back(static_cast<float>(pos[i]));
          kept_k.insert(kept_k.end(), k.data<float>() + i * kDim, k.data<float>() + (i + 1) * kDim);
          kept_v.insert(kept_v.end(), v.data<float>() + i * kDim, v.data<float>() + (i + 1) * kDim);
        }
        out.push_back(kept_pos), out.push_back(kept_k), out.push_back(kept_v);
      }
    return out;
  };
  const auto together = read_all(2);
  EXPECT_EQ(together, read_all(1));
  // A local head keeps only its window (layer 0, head 2: window 6, no sink): positions 47..51.
  EXPECT_EQ(together[(0 * kKvHeads + 2) * 3], std::vector<float>({47, 48, 49, 50, 51}));
  // ... and the call copied no more than that: every row of that head's table is kept.
  EXPECT_EQ(kv.slot_rows(2, 0, 2).size(), 5u);
  // Out of order (the last segment first): refused before anything changes.
  kv.add_sequence(3);
  std::vector<PagedKvCache::RelocatedSegment> backwards = {segs[2], segs[0]};
  free_before = pool.num_free();
  EXPECT_THROW(kv.append_relocated(3, backwards), Error);
  EXPECT_EQ(kv.next_position(3), 0);
  EXPECT_EQ(pool.num_free(), free_before);
}

}  // namespace
}  // namespace redknot
