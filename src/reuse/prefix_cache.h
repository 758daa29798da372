// Automatic prefix caching (the `prefix` baseline; vLLM's automatic prefix caching, SGLang's
// radix cache) over a PagedKvCache with an all-global profile (HeadProfile::native).
//
// Passive: it never runs the model. The caller (the scheduler) prefills a request, then calls
// insert(); the cache forks that sequence into an entry sequence of the same PagedKvCache and
// truncates it to a whole number of blocks, so the entry shares the request's pages (no copy).
// A later request calls match() on its prompt and attach() to start from the longest cached
// block-aligned prefix: its sequence then shares the entry's pages (copy-on-write on appends) and
// the caller computes only the rest.
//
// Keys: prompts are cut into blocks of B tokens; block k's key is the chain hash
// h_k = XXH3(tokens of block k, seed h_{k-1}), h_0 = the model fingerprint, so a key names the
// whole prefix up to and including block k and other models never match. Every block boundary
// of every entry is indexed; a hit is served only after comparing the actual tokens, so a hash
// collision never serves wrong KV.
//
// Entries form the leaves of a radix tree: an insert whose prefix extends an entry's replaces
// that entry (the longer one serves every shorter match); one already covered by an entry only
// refreshes it.
//
// Memory: entries pin pages. A page is "entry-only" when no sequence other than entries
// references it (pool refcount == references from entries); those are what evicting frees now.
// Pages shared with running requests are freed only when both let go. Entries whose pages are
// all shared with running requests are pinned: evicting them frees nothing, so eviction skips
// them. make_room() evicts least-recently-used unpinned entries until the pool has enough free
// pages (the scheduler calls it when a live request runs out of pages); insert() and attach()
// evict LRU entries while entry-only pages exceed max_pages.
//
// Not thread-safe: use it from the engine thread only. The PagedKvCache must outlive it.
#pragma once
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "core/batch.h"
#include "kv/paged_kv_cache.h"

namespace redknot {

struct PrefixCacheOptions {
  int32_t block_tokens = 0;  // tokens per hashed block (B); 0 = the pool's page size
  int64_t max_pages = 0;     // entry-only pages the entries may hold; 0 = unlimited
  uint64_t model_fp = 0;     // seeds the chain hash (model_fingerprint(); mix in the backend)
  // Entries are sequences first_seq_id, first_seq_id + 1, ... of the same cache (freed ids are
  // reused): the caller reserves that range for the cache and never uses it for requests.
  SeqId first_seq_id = SeqId{1} << 30;
  int key_bits = 64;  // tests only: fewer bits force hash collisions
};

struct PrefixCacheStats {
  int64_t queries = 0, query_tokens = 0;  // match() calls and their prompt tokens
  int64_t hits = 0, hit_tokens = 0;       // attach() calls and the prefix tokens they reused
  int64_t inserts = 0;                    // entries made by insert()
  int64_t replaced = 0;                   // entries dropped because a longer one subsumed them
  int64_t evictions = 0;                  // entries dropped by make_room() or the page budget
  int64_t entries = 0, tokens = 0;        // entries now, and the tokens they hold
  int64_t pages = 0;                      // distinct pool pages the entries reference
  int64_t exclusive_pages = 0;            // of those, the entry-only ones (what eviction frees)
};

class PrefixCache {
 public:
  struct Match {
    SeqId entry = -1;    // the entry sequence holding the prefix; -1: no match
    int32_t tokens = 0;  // prefix length (a multiple of B; positions [0, tokens))
    bool found() const { return entry >= 0; }
  };

  // The cache's profile must keep every token in every head (HeadProfile::native).
  PrefixCache(PagedKvCache& cache, PrefixCacheOptions options);
  ~PrefixCache();  // removes every entry sequence from the cache
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // The longest cached block-aligned prefix of `prompt` ([n] token ids) of at most n - 1 tokens
  // (one token is left to compute, for the logits). Counts a query.
  Match match(std::span<const int32_t> prompt) const;

  // Makes sequence `dst` (which must not exist) hold exactly the matched prefix's KV, sharing the
  // entry's pages; the caller appends the rest at next_position(dst) == m.tokens. Counts a hit and
  // marks the entry recently used. Throws Error when m is not a live match.
  void attach(const Match& m, SeqId dst);

  // Records the block-aligned prefix of `prompt_tokens` ([n] ids) after the caller has stored
  // them in `src` at positions 0..n-1 (src may hold more after them): floor(n / B) * B tokens.
  // Returns whether a new entry was made (false: shorter than one block, or already covered).
  // Needs no free pages. Throws Error when src does not hold positions 0..floor(n/B)*B - 1.
  bool insert(SeqId src, std::span<const int32_t> prompt_tokens);

  // Evicts least-recently-used unpinned entries until the pool has `pages` free pages. Returns
  // whether it has them.
  bool make_room(int64_t pages);
  // Evicts LRU unpinned entries while entry-only pages exceed max_pages. insert() and attach()
  // call it; call it too when requests finish (their shared pages become entry-only then).
  void enforce_budget();
  // Drops every entry (pages shared with running requests stay with them).
  void clear();

  // The chain hash h_1..h_m of the first m = tokens.size() / block_tokens whole blocks.
  static std::vector<uint64_t> chain_hashes(uint64_t model_fp, std::span<const int32_t> tokens,
                                            int32_t block_tokens);

  // Every field; O(pages held) (exclusive_pages walks them).
  PrefixCacheStats stats() const;
  // The counters, entries and pages, in O(1) (tokens and exclusive_pages left 0): per step.
  PrefixCacheStats counters() const;
  int32_t block_tokens() const { return block_; }
  // Whether `seq` is one of the cache's entry sequences.
  bool is_entry(SeqId seq) const { return entries_.count(seq) != 0; }

 private:
  struct Entry {
    std::vector<int32_t> tokens;  // [len] the cached prefix, len a multiple of B
    std::vector<uint64_t> keys;   // [len / B] index key of each block boundary
    std::vector<int32_t> pages;   // distinct pool pages its page tables reference
    uint64_t last_used = 0;       // tick of the last insert/attach that touched it
  };
  struct IndexRef {
    SeqId entry;
    int32_t blocks;  // the key is that of the entry's first `blocks` blocks
  };

  // Index keys of the first `blocks` blocks of `tokens`.
  std::vector<uint64_t> chain_keys(std::span<const int32_t> tokens, int64_t blocks) const;
  // An entry whose first `blocks` blocks are exactly tokens[0, blocks * B), or -1.
  SeqId find(uint64_t key, std::span<const int32_t> tokens, int32_t blocks) const;
  SeqId next_id();
  void drop(SeqId id);
  // Whether no sequence but entries references `page`.
  bool entry_only(int32_t page) const;
  bool unpinned(const Entry& e) const;
  int64_t exclusive_pages() const;
  // Evicts LRU unpinned entries until `done()` or none is left; returns done().
  template <typename Done>
  bool evict_lru(Done done);

  PagedKvCache& cache_;
  PrefixCacheOptions opts_;
  int32_t block_;
  uint64_t key_mask_;
  std::unordered_map<SeqId, Entry> entries_;
  std::unordered_map<uint64_t, std::vector<IndexRef>> index_;
  std::unordered_map<int32_t, int32_t> page_refs_;  // page -> entries referencing it
  std::vector<SeqId> free_ids_;
  SeqId next_id_;
  uint64_t tick_ = 0;
  mutable PrefixCacheStats stats_;  // counters only; the gauges are computed in stats()
};

}  // namespace redknot
