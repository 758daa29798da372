// SegPagedAttention's KV store: a page table per (sequence, layer, kv head). Global heads keep
// every token; local heads keep sink ∪ last-W tokens, returning pages to the pool as the window
// slides. Pages are reference-counted (fork shares them; writes and relocation copy on write).
// Attention metadata (CSR page tables) is built once per forward in begin_forward, when the
// new tokens' slots are assigned, and reused by every layer's attend().
#pragma once
#include <algorithm>
#include <map>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "kv/head_profile.h"
#include "kv/kv_cache.h"
#include "kv/page_pool.h"

namespace redknot {

struct PagedKvOptions {
  float scale = 1.0f;  // softmax scale (1/sqrt(head_dim))
  // Decode steps planned into a storage patch the previous step's plan (false: rebuild every
  // step; the oracle of the patching tests).
  bool patch_decode_plans = true;
};

// Decode steps planned into plan storage: patched from the previous step, or rebuilt.
struct PlanStats {
  int64_t patched = 0, rebuilt = 0;
};

// Pages in use, split by head class.
struct KvUsage {
  int64_t global_pages = 0, local_pages = 0;
  int64_t global_tokens = 0, local_tokens = 0;  // tokens held (slots in use)
};

class PagedKvCache : public KvCache {
 public:
  // inv_freq: [head_dim / 2] f32 on the pool's backend, used by shift() to re-rotate keys.
  PagedKvCache(PagePool& pool, HeadProfile profile, PagedKvOptions options, Tensor inv_freq);
  ~PagedKvCache() override;

  void add_sequence(SeqId seq) override;
  bool has_sequence(SeqId seq) const override { return seqs_.count(seq) != 0; }
  void remove_sequence(SeqId seq) override;
  void remove(SeqId seq, int32_t p0, int32_t p1) override;
  void fork(SeqId src, SeqId dst) override;
  void shift(SeqId seq, int32_t p0, int32_t p1, int32_t delta) override;
  int32_t num_tokens(SeqId seq) const override;
  int32_t next_position(SeqId seq) const override;

  void begin_forward(const Batch& batch, const Tensor& positions) override;
  // Decode steps planned into storage (recorded CUDA graphs): page entries per layer.
  int64_t plan_capacity(const Batch& batch) const override;
  std::shared_ptr<PlanStorage> make_plan_storage(int32_t seqs, int64_t capacity) override;
  bool plan_storage_fits(const PlanStorage& storage) const override;
  void begin_forward(const Batch& batch, const Tensor& positions, PlanStorage& storage) override;
  // k, v: [T, kv_heads, head_dim] act dtype; an FP8 pool also takes rows as it stores them,
  // [T, kv_heads, head_dim + 4] f8_e4m3 (the chunk store reloading a spilled segment).
  void write(int layer, const Tensor& k, const Tensor& v) override;
  void attend(int layer, const Tensor& q, Tensor& out) override;
  // The current forward's plan of one layer (between begin_forward and end_forward).
  const PagedAttentionPlan& plan(int layer) const { return plans_.at(layer).plan; }
  const PlanStats& plan_stats() const { return plan_stats_; }
  void end_forward() override;

  void read(SeqId seq, int layer, int kv_head, Tensor& k, Tensor& v,
            std::vector<int32_t>& positions) override;

  // Pool rows (of the K, V and position pools) of one (layer, kv head)'s slots, in position order.
  std::vector<int32_t> slot_rows(SeqId seq, int layer, int kv_head) const;
  // Reuse recovery's query pass (ReuseOptions::query_full_attention): while keep_local_pages is
  // set, the sequence's local heads keep every page (no trimming at the end of a forward or after
  // a relocation); forwards of this sequence attend with every head global in layers
  // <= full_until_layer (-1: the profile's classes). Clearing keep_local_pages trims at once.
  // A forward must not mix this sequence with others while full_until_layer >= 0.
  void set_full_attention(SeqId seq, int32_t full_until_layer, bool keep_local_pages);
  // Whether the sequence's local heads keep every page now (append_relocated copies every row).
  bool keeps_local_pages(SeqId seq) const { return get(seq).keep_local_pages; }

  // Appends n tokens whose K/V already sit in the pool (a cached segment prefilled at
  // src_positions): rows[layer * kv_heads + head][i] is token i's source row. The copies take
  // positions src_positions[i] + delta and their keys are re-rotated by delta (RoPE relocation,
  // no attention scaling re-applied). Local heads keep only sink ∪ window afterwards.
  // Throws OutOfKvMemory, changing nothing, when the pool cannot hold the copies.
  void append_relocated(SeqId seq, const std::vector<std::vector<int32_t>>& rows,
                        const std::vector<int32_t>& src_positions, int32_t delta);
  // Several cached segments appended in order in one copy per layer (a prompt's documents): the
  // same KV as one append_relocated per segment, without a gather/rotate/scatter round per
  // segment. Each segment's new positions must follow the previous one's. Local heads copy only
  // what they keep after the last segment. Throws OutOfKvMemory, changing nothing.
  struct RelocatedSegment {
    const std::vector<std::vector<int32_t>>* rows = nullptr;  // [layer * kv_heads + head][n]
    const std::vector<int32_t>* src_positions = nullptr;      // [n], increasing
    int32_t delta = 0;
  };
  void append_relocated(SeqId seq, const std::vector<RelocatedSegment>& segments);

  // Prefill/decode handover (reuse/kv_handover.h): the positions one (layer, kv head) holds, in
  // order, and every logical token's position.
  std::vector<int32_t> head_positions(SeqId seq, int layer, int kv_head) const;
  const std::vector<int32_t>& token_positions(SeqId seq) const { return get(seq).positions; }
  // Fills an empty sequence with KV computed elsewhere: per (layer, kv head), as
  // [layer * kv_heads + head], its positions (increasing) and K and V rows [n, head_dim] (host
  // tensors in act dtype); `positions`: every logical token's position. Local heads are trimmed
  // as after a forward. Throws OutOfKvMemory, changing nothing, when the pool cannot hold it.
  void import_sequence(SeqId seq, std::vector<int32_t> positions,
                       const std::vector<std::vector<int32_t>>& head_positions,
                       const std::vector<Tensor>& k, const std::vector<Tensor>& v);

  // Pages a batch would need beyond what its sequences hold (admission control).
  int64_t pages_needed(const Batch& batch) const;
  KvUsage usage(SeqId seq) const;
  // Pool pages the sequence's tables hold (usage()'s pages without walking their slots).
  int64_t pages_held(SeqId seq) const;
  KvUsage usage() const;
  const HeadProfile& profile() const { return profile_; }
  const HeadProfile* head_profile() const override { return &profile_; }
  PagePool& pool() { return pool_; }

 private:
  // One (sequence, layer, kv head)'s pages in position order, with a host mirror of the
  // positions in each page's used slots.
  struct HeadTable {
    std::vector<int32_t> pages;
    std::vector<std::vector<int32_t>> positions;  // per page, its used slots' positions
    // Changes with every change of `pages` made by a forward (a page added, copied on write or
    // trimmed); a decode plan patches the tables whose gen it has already planned.
    uint64_t gen = 0;
    // Local heads: trim finds nothing to drop before next_pos reaches this (the first page
    // that only the window keeps leaves it then); 0 = unknown, look.
    int64_t trim_at = 0;
  };
  struct Sequence {
    std::vector<HeadTable> tables;   // [layer * kv_heads + head]
    std::vector<int32_t> positions;  // every logical token's position (what a global head holds)
    // set_full_attention: local heads keep every page, and layers <= full_until attend with
    // every head global (-1: none).
    bool keep_local_pages = false;
    int32_t full_until = -1;
    int32_t next_pos() const { return positions.empty() ? 0 : positions.back() + 1; }
  };
  struct LayerPlan {
    PagedAttentionPlan plan;
    Tensor rows;  // [T * kv_heads] i32: pool row of each (token, head) written this forward
  };
  // What recorded work bakes in besides the plan buffer (pool addresses, kernel parameters):
  // storage fits every cache with the same.
  struct Fingerprint {
    const void* k = nullptr;
    const void* v = nullptr;
    const void* pos = nullptr;
    float scale = 0;
    int32_t page_size = 0, layers = 0, heads = 0;
    bool operator==(const Fingerprint&) const = default;
  };
  // The plan arrays of every layer in one device buffer at a fixed capacity (page entries per
  // layer), and the host words staged into it.
  struct PagedPlanStorage : PlanStorage {
    int32_t seqs = 0;
    int64_t capacity = 0;
    Tensor buffer;              // [words] i32 on the pool's backend
    std::vector<int32_t> host;  // what `buffer` holds
    Fingerprint fingerprint;
    // What the buffer was last planned for: the next step of the same sequences in the same
    // cache epoch only patches it (tail page lengths, write rows, the layers whose tables grew
    // or shrank from the first changed one on) and uploads the changed words.
    bool planned = false;
    uint64_t epoch = 0;
    std::vector<SeqId> seqs_planned;
    std::vector<uint64_t> gens;  // [layer * seqs * kv_heads + item]: HeadTable::gen planned
    Tensor patch;                // [>= 2 * changed words] i32: a patch's indices, then values
  };
  struct PlanLayout;  // offsets of the plan arrays in a storage's words

  void begin_forward_into(const Batch& batch, const Tensor& positions, PagedPlanStorage* storage);
  // The CSR plans of every layer and the write rows (rows_), uploaded at once into a fresh
  // buffer, or into `storage` at its capacity.
  void build_plans(const Batch& batch, PagedPlanStorage* storage);
  // build_plans into a storage planned for the previous step of the same sequences: rewrites
  // only what changed and uploads it as (index, value) pairs scattered on the device.
  void patch_plans(const Batch& batch, PagedPlanStorage& storage);
  // plans_ and token_positions_ as views of `buffer` laid out by `layout`.
  void set_plan_views(const PlanLayout& layout, const Tensor& buffer, int64_t seqs, int64_t T);
  Fingerprint fingerprint() const;
  // Layers [0, n) keep the batch's tokens (Batch::last_stored_layer).
  int stored_layers(const Batch& b) const {
    return b.last_stored_layer >= 0 ? std::min(b.last_stored_layer + 1, layers_) : layers_;
  }
  Sequence& get(SeqId seq);
  const Sequence& get(SeqId seq) const;
  const HeadSpec& spec(int layer, int head) const { return profile_.at(layer, head); }
  // Gives `table` a private copy of page `index` when it is shared. Needs one free page.
  void make_private(HeadTable& table, size_t index);
  void copy_slots(int32_t src_page, int32_t dst_page, int32_t count);
  // RoPE relocation of gathered key rows as stored. rows: [m, row_width]; deltas: [m] i32
  void rotate_rows(Tensor& rows, const Tensor& deltas);
  void release_table(HeadTable& table);
  // Drops the pages of a local head that no future query can see.
  void trim(HeadTable& table, const HeadSpec& spec, int32_t next_pos);
  void trim_sequence(Sequence& s);
  // A change to a sequence's tables outside a forward: plan storages rebuild (epoch) and every
  // local head's trim looks again.
  void tables_changed(Sequence& s);
  Tensor device_i32(const std::vector<int32_t>& values);
  int64_t table_pages_needed(const HeadTable& t, int64_t count) const;

  PagePool& pool_;
  Backend& backend_;
  HeadProfile profile_;
  PagedKvOptions opts_;
  Tensor inv_freq_;
  int32_t layers_, heads_, page_size_;
  std::map<SeqId, Sequence> seqs_;
  std::vector<LayerPlan> plans_;            // valid between begin_forward and end_forward
  std::vector<std::vector<int32_t>> rows_;  // [layer][token * kv_heads + head]: write rows
  int stored_layers_ = 0;  // of the current forward: write() of deeper layers keeps nothing
  std::vector<int32_t> plan_words_;  // host staging of build_plans (kept between forwards)
  std::vector<SeqId> batch_seqs_;
  Tensor batch_positions_;
  Tensor token_positions_;  // [T * kv_heads, 1] i32: position of each written row
  // Bumped by every change to the tables outside a forward (remove, shift, fork, relocation,
  // import, full-attention switches): a plan storage of an older epoch is rebuilt, not patched.
  uint64_t epoch_ = 0;
  uint64_t gen_clock_ = 0;  // source of HeadTable::gen
  PlanStats plan_stats_;
  std::vector<int32_t> patch_index_, patch_value_;  // host staging of patch_plans
  // Target of overwrite writes a local head no longer keeps; held from begin_forward of a
  // selective-recompute batch to its end_forward.
  int32_t scratch_page_ = -1;
  // Pool row holding `pos` in table t, or -1.
  int32_t find_row(const HeadTable& t, int32_t pos) const;
};

// Ideal KV bytes of one session of `tokens` tokens (SPEC §3, pages rounded up per head):
// Σ_(l,h) ceil(kept(l,h) / page_size) * bytes_per_page.
int64_t ideal_session_bytes(const HeadProfile& profile, int64_t tokens, int32_t page_size,
                            int32_t head_dim, DType dtype);
// How many sessions of `tokens` fit in `budget_bytes` by that formula.
int64_t sessions_that_fit(const HeadProfile& profile, int64_t tokens, int64_t budget_bytes,
                          int32_t page_size, int32_t head_dim, DType dtype);

}  // namespace redknot
