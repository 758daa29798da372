// The KV cache seam. The model writes each layer's new keys/values and asks for attention;
// how KV is laid out (a contiguous store, or per-(layer, kv head) pages) is the cache's business,
// so stores can be swapped without touching model code. Sequence operations follow llama.cpp:
// add, remove a position range, fork (share a prefix), shift (relocate positions).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/batch.h"
#include "core/tensor.h"

namespace redknot {

class HeadProfile;

// Device buffers for the attention metadata of decode steps of a fixed number of sequences
// (one new token each) up to a fixed capacity: every forward planned into the same storage
// sees the same device pointers and shapes, so a recorded step (a CUDA graph) replays with the
// new contents. Made by the cache that fills it.
class PlanStorage {
 public:
  virtual ~PlanStorage() = default;
};

class KvCache {
 public:
  virtual ~KvCache() = default;

  // ---- sequence operations ----
  virtual void add_sequence(SeqId seq) = 0;  // throws if it exists
  virtual bool has_sequence(SeqId seq) const = 0;
  virtual void remove_sequence(SeqId seq) = 0;  // frees its storage
  // Drops cached tokens with positions in [p0, p1) (p1 < 0: to the end).
  virtual void remove(SeqId seq, int32_t p0, int32_t p1) = 0;
  // dst becomes a copy (or a shared view) of src's cached tokens. dst must not exist.
  virtual void fork(SeqId src, SeqId dst) = 0;
  // Moves tokens with positions in [p0, p1) by `delta`: positions change and keys are re-rotated
  // (RoPE relocation). The result must stay strictly increasing.
  virtual void shift(SeqId seq, int32_t p0, int32_t p1, int32_t delta) = 0;
  virtual int32_t num_tokens(SeqId seq) const = 0;
  // Position the next appended token should take (last position + 1, or 0 when empty).
  virtual int32_t next_position(SeqId seq) const = 0;

  // ---- forward pass ----
  // Called once per forward before any layer: makes room for the batch's tokens and builds
  // whatever index metadata attention needs. Throws OutOfKvMemory (nothing changed) when full.
  // positions: [T] i32 on the backend device (the batch positions).
  virtual void begin_forward(const Batch& batch, const Tensor& positions) = 0;
  // Stores the batch's keys (already rotated) and values for `layer`.
  // k, v: [T, kv_heads, head_dim]
  virtual void write(int layer, const Tensor& k, const Tensor& v) = 0;
  // Attention of the batch's queries over the cached keys of their own sequences (causal).
  // q: [T, heads, head_dim]; out: [T, heads, head_dim]
  virtual void attend(int layer, const Tensor& q, Tensor& out) = 0;
  virtual void end_forward() = 0;

  // ---- planning into storage (recorded decode steps) ----
  // Metadata capacity `batch` needs (any positive unit the store defines), or -1 when the store
  // cannot plan into storage or the batch is not one new token per sequence.
  virtual int64_t plan_capacity(const Batch& batch) const {
    (void)batch;
    return -1;
  }
  // Storage for batches of `seqs` sequences up to `capacity` (from plan_capacity); null when
  // unsupported. It stays valid for this cache while plan_storage_fits says so.
  virtual std::shared_ptr<PlanStorage> make_plan_storage(int32_t seqs, int64_t capacity) {
    (void)seqs, (void)capacity;
    return nullptr;
  }
  // True when forwards of this cache may plan into `storage` and replay work recorded with it.
  virtual bool plan_storage_fits(const PlanStorage& storage) const {
    (void)storage;
    return false;
  }
  // begin_forward that writes the metadata into `storage` (plan_capacity(batch) must fit).
  virtual void begin_forward(const Batch& batch, const Tensor& positions, PlanStorage& storage);

  // Per-(layer, kv head) classes the store applies (for FLOPs accounting); null: all dense.
  virtual const HeadProfile* head_profile() const { return nullptr; }
  // Share of (layer, kv head) pairs that keep every token (the whole model's, under tensor
  // parallelism): 1 without a profile or with an all-global one (ReusePath::global_head_fraction).
  double global_head_fraction() const;

  // ---- inspection (tests, debugging) ----
  // Host f32 copies of one (layer, kv_head)'s cached keys/values in position order.
  // k, v: [n, head_dim]
  virtual void read(SeqId seq, int layer, int kv_head, Tensor& k, Tensor& v,
                    std::vector<int32_t>& positions) = 0;
};

}  // namespace redknot
