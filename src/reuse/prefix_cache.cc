#include "reuse/prefix_cache.h"

#include <xxhash.h>

#include <algorithm>
#include <climits>
#include <string>

#include "core/error.h"

namespace redknot {

PrefixCache::PrefixCache(PagedKvCache& cache, PrefixCacheOptions options)
    : cache_(cache),
      opts_(options),
      block_(options.block_tokens > 0 ? options.block_tokens : cache.pool().page_size()),
      key_mask_(options.key_bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << options.key_bits) - 1),
      next_id_(options.first_seq_id) {
  if (options.block_tokens < 0 || options.key_bits < 1 || options.max_pages < 0 ||
      options.first_seq_id < 0)
    throw Error("prefix cache: bad options");
  // A local head keeps only sink ∪ window: its entry tables would not hold the prefix.
  const HeadProfile& p = cache.profile();
  for (int32_t l = 0; l < p.num_layers(); ++l)
    for (int32_t h = 0; h < p.num_kv_heads(); ++h)
      if (p.at(l, h).cls != HeadClass::Global)
        throw Error("prefix cache: needs an all-global head profile (layer " + std::to_string(l) +
                    " head " + std::to_string(h) + " is local)");
}

PrefixCache::~PrefixCache() {
  for (auto& [id, e] : entries_)
    if (cache_.has_sequence(id)) cache_.remove_sequence(id);
}

std::vector<uint64_t> PrefixCache::chain_hashes(uint64_t model_fp, std::span<const int32_t> tokens,
                                                int32_t block_tokens) {
  if (block_tokens <= 0) throw Error("prefix cache: block_tokens must be positive");
  const size_t blocks = tokens.size() / static_cast<size_t>(block_tokens);
  std::vector<uint64_t> h(blocks);
  uint64_t prev = model_fp;
  for (size_t k = 0; k < blocks; ++k)
    prev = h[k] = XXH3_64bits_withSeed(tokens.data() + k * block_tokens,
                                       sizeof(int32_t) * block_tokens, prev);
  return h;
}

std::vector<uint64_t> PrefixCache::chain_keys(std::span<const int32_t> tokens,
                                              int64_t blocks) const {
  std::vector<uint64_t> keys =
      chain_hashes(opts_.model_fp, tokens.first(static_cast<size_t>(blocks) * block_), block_);
  for (uint64_t& k : keys) k &= key_mask_;
  return keys;
}

SeqId PrefixCache::find(uint64_t key, std::span<const int32_t> tokens, int32_t blocks) const {
  auto it = index_.find(key);
  if (it == index_.end()) return -1;
  const size_t len = static_cast<size_t>(blocks) * block_;
  for (const IndexRef& r : it->second) {
    if (r.blocks != blocks) continue;
    const Entry& e = entries_.at(r.entry);
    // The tokens themselves, not only the key: a collision must never serve wrong KV.
    if (std::equal(tokens.begin(), tokens.begin() + len, e.tokens.begin())) return r.entry;
  }
  return -1;
}

PrefixCache::Match PrefixCache::match(std::span<const int32_t> prompt) const {
  ++stats_.queries;
  stats_.query_tokens += static_cast<int64_t>(prompt.size());
  if (prompt.empty() || entries_.empty()) return {};
  const int64_t blocks = static_cast<int64_t>(prompt.size() - 1) / block_;
  const std::vector<uint64_t> keys = chain_keys(prompt, blocks);
  // Longest first: every shorter boundary of an entry is indexed too, so the first verified
  // hit is the longest.
  for (int64_t k = blocks; k >= 1; --k) {
    const SeqId id = find(keys[k - 1], prompt, static_cast<int32_t>(k));
    if (id >= 0) return {id, static_cast<int32_t>(k * block_)};
  }
  return {};
}

void PrefixCache::attach(const Match& m, SeqId dst) {
  auto it = entries_.find(m.entry);
  if (it == entries_.end() || m.tokens <= 0 || m.tokens % block_ != 0 ||
      m.tokens > static_cast<int32_t>(it->second.tokens.size()))
    throw Error("prefix cache: attach of a match that is not cached (entry " +
                std::to_string(m.entry) + ", " + std::to_string(m.tokens) + " tokens)");
  cache_.fork(m.entry, dst);
  // Tail truncation only drops page references: it needs no free page.
  cache_.remove(dst, m.tokens, -1);
  it->second.last_used = ++tick_;
  ++stats_.hits;
  stats_.hit_tokens += m.tokens;
  enforce_budget();
}

SeqId PrefixCache::next_id() {
  while (!free_ids_.empty()) {
    const SeqId id = free_ids_.back();
    free_ids_.pop_back();
    if (!cache_.has_sequence(id)) return id;
  }
  while (cache_.has_sequence(next_id_)) {
    if (next_id_ == INT32_MAX) throw Error("prefix cache: entry sequence ids exhausted");
    ++next_id_;
  }
  if (next_id_ == INT32_MAX) throw Error("prefix cache: entry sequence ids exhausted");
  return next_id_++;
}

bool PrefixCache::insert(SeqId src, std::span<const int32_t> prompt_tokens) {
  if (is_entry(src)) throw Error("prefix cache: insert from an entry sequence");
  if (!cache_.has_sequence(src))
    throw Error("prefix cache: insert from unknown sequence " + std::to_string(src));
  const int32_t blocks = static_cast<int32_t>(prompt_tokens.size() / block_);
  if (blocks == 0) return false;
  const int32_t len = blocks * block_;
  std::vector<uint64_t> keys = chain_keys(prompt_tokens, blocks);
  if (const SeqId have = find(keys.back(), prompt_tokens, blocks); have >= 0) {
    entries_.at(have).last_used = ++tick_;
    return false;
  }

  const SeqId id = next_id();
  cache_.fork(src, id);
  cache_.remove(id, len, -1);
  if (cache_.num_tokens(id) != len || cache_.next_position(id) != len) {
    const int32_t got = cache_.num_tokens(id);
    cache_.remove_sequence(id);
    free_ids_.push_back(id);
    throw Error("prefix cache: sequence " + std::to_string(src) +
                " does not hold the prompt at positions 0.." + std::to_string(len - 1) + " (" +
                std::to_string(got) + " tokens there)");
  }
  Entry e;
  e.tokens.assign(prompt_tokens.begin(), prompt_tokens.begin() + len);
  e.keys = std::move(keys);
  e.last_used = ++tick_;
  // Entry tables are never written (nothing forwards an entry), so its pages stay fixed.
  const HeadProfile& p = cache_.profile();
  const int32_t page_size = cache_.pool().page_size();
  for (int32_t l = 0; l < p.num_layers(); ++l)
    for (int32_t h = 0; h < p.num_kv_heads(); ++h) {
      int32_t last = -1;
      for (int32_t row : cache_.slot_rows(id, l, h))
        if (row / page_size != last) e.pages.push_back(last = row / page_size);
    }
  std::sort(e.pages.begin(), e.pages.end());
  e.pages.erase(std::unique(e.pages.begin(), e.pages.end()), e.pages.end());
  for (int32_t page : e.pages) ++page_refs_[page];
  for (int32_t k = 1; k <= blocks; ++k) index_[e.keys[k - 1]].push_back({id, k});

  // Entries that are exactly a shorter prefix of this one: the new entry serves their matches.
  std::vector<SeqId> subsumed;
  for (int32_t k = 1; k < blocks; ++k) {
    auto it = index_.find(e.keys[k - 1]);
    if (it == index_.end()) continue;
    for (const IndexRef& r : it->second) {
      if (r.entry == id) continue;  // indexed above, not in entries_ yet
      const Entry& old = entries_.at(r.entry);
      if (r.blocks == k && static_cast<int32_t>(old.tokens.size()) == k * block_ &&
          std::equal(old.tokens.begin(), old.tokens.end(), prompt_tokens.begin()))
        subsumed.push_back(r.entry);
    }
  }
  entries_.emplace(id, std::move(e));
  for (SeqId old : subsumed) {
    drop(old);
    ++stats_.replaced;
  }
  ++stats_.inserts;
  enforce_budget();
  return true;
}

void PrefixCache::drop(SeqId id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  const Entry& e = it->second;
  for (size_t k = 0; k < e.keys.size(); ++k) {
    auto ix = index_.find(e.keys[k]);
    if (ix == index_.end()) continue;
    std::erase_if(ix->second, [&](const IndexRef& r) {
      return r.entry == id && r.blocks == static_cast<int32_t>(k) + 1;
    });
    if (ix->second.empty()) index_.erase(ix);
  }
  for (int32_t page : e.pages)
    if (--page_refs_[page] == 0) page_refs_.erase(page);
  cache_.remove_sequence(id);
  entries_.erase(it);
  free_ids_.push_back(id);
}

bool PrefixCache::entry_only(int32_t page) const {
  auto it = page_refs_.find(page);
  return it != page_refs_.end() && cache_.pool().refcount(page) == it->second;
}

bool PrefixCache::unpinned(const Entry& e) const {
  return std::any_of(e.pages.begin(), e.pages.end(), [&](int32_t p) { return entry_only(p); });
}

int64_t PrefixCache::exclusive_pages() const {
  int64_t n = 0;
  for (const auto& [page, refs] : page_refs_) n += cache_.pool().refcount(page) == refs;
  return n;
}

template <typename Done>
bool PrefixCache::evict_lru(Done done) {
  if (done()) return true;
  std::vector<std::pair<uint64_t, SeqId>> order;
  order.reserve(entries_.size());
  for (const auto& [id, e] : entries_) order.emplace_back(e.last_used, id);
  std::sort(order.begin(), order.end());
  // One pass suffices: dropping an entry changes a shared page's refcount and entry references
  // alike, so whether another entry is pinned only changes when running requests let go.
  for (const auto& [tick, id] : order) {
    if (!unpinned(entries_.at(id))) continue;
    drop(id);
    ++stats_.evictions;
    if (done()) return true;
  }
  return done();
}

bool PrefixCache::make_room(int64_t pages) {
  return evict_lru([&] { return cache_.pool().num_free() >= pages; });
}

void PrefixCache::enforce_budget() {
  if (opts_.max_pages <= 0) return;
  evict_lru([&] { return exclusive_pages() <= opts_.max_pages; });
}

void PrefixCache::clear() {
  while (!entries_.empty()) drop(entries_.begin()->first);
}

PrefixCacheStats PrefixCache::counters() const {
  PrefixCacheStats s = stats_;
  s.entries = static_cast<int64_t>(entries_.size());
  s.pages = static_cast<int64_t>(page_refs_.size());
  return s;
}

PrefixCacheStats PrefixCache::stats() const {
  PrefixCacheStats s = counters();
  s.tokens = 0;
  for (const auto& [id, e] : entries_) s.tokens += static_cast<int64_t>(e.tokens.size());
  s.exclusive_pages = exclusive_pages();
  return s;
}

}  // namespace redknot
