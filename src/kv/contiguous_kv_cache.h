// The dense KV store: per sequence and layer, one [kv_heads * capacity, head_dim] buffer for K
// and one for V (row h * capacity + slot), with a fixed per-sequence capacity. Local heads are
// a mask over it ("dense + mask"): it keeps every token. It is the correctness oracle and the
// speed baseline of the per-(layer, kv head) paged store.
#pragma once
#include <map>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/model_config.h"
#include "kv/head_profile.h"
#include "kv/kv_cache.h"

namespace redknot {

struct KvGeometry {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float scale = 1.0f;  // softmax scale
  HeadProfile heads;   // per-(layer, kv head) masks
};

// The model's own attention (HeadProfile::native), softmax scale 1/sqrt(head_dim); a profile
// given replaces the head classes.
KvGeometry dense_kv_geometry(const ModelConfig& cfg, const HeadProfile* profile = nullptr);

class ContiguousKvCache : public KvCache {
 public:
  // inv_freq: [head_dim / 2] f32 on the backend (used by shift to re-rotate keys).
  ContiguousKvCache(Backend& backend, KvGeometry geometry, int32_t capacity_per_seq,
                    Tensor inv_freq);

  void add_sequence(SeqId seq) override;
  bool has_sequence(SeqId seq) const override { return seqs_.count(seq) != 0; }
  void remove_sequence(SeqId seq) override;
  void remove(SeqId seq, int32_t p0, int32_t p1) override;
  void fork(SeqId src, SeqId dst) override;
  void shift(SeqId seq, int32_t p0, int32_t p1, int32_t delta) override;
  int32_t num_tokens(SeqId seq) const override;
  int32_t next_position(SeqId seq) const override;

  void begin_forward(const Batch& batch, const Tensor& positions) override;
  void write(int layer, const Tensor& k, const Tensor& v) override;
  void attend(int layer, const Tensor& q, Tensor& out) override;
  void end_forward() override;

  void read(SeqId seq, int layer, int kv_head, Tensor& k, Tensor& v,
            std::vector<int32_t>& positions) override;
  const HeadProfile* head_profile() const override { return &geo_.heads; }
  // Replaces the head classes for the next forwards: the oracle of passes whose masks change
  // between calls (reuse recovery's query pass).
  void set_head_profile(const HeadProfile& heads) {
    if (heads.num_layers() != geo_.num_layers || heads.num_kv_heads() != geo_.num_kv_heads)
      throw Error("ContiguousKvCache::set_head_profile: profile shape does not match");
    geo_.heads = heads;
  }

 private:
  struct Sequence {
    std::vector<Tensor> k, v;        // per layer: [kv_heads * capacity, head_dim]
    std::vector<int32_t> positions;  // host copy, one per cached slot
    Tensor positions_dev;            // [capacity] i32 on the backend
  };
  // One sequence's share of the batch being run.
  struct Pending {
    Sequence* seq = nullptr;
    int64_t begin = 0, count = 0;  // batch rows
    int32_t first_slot = 0;
    Tensor rows;  // [count * kv_heads] i32: destination row of each (token, head) of k/v
  };

  Sequence& get(SeqId seq);
  const Sequence& get(SeqId seq) const;
  Sequence make_sequence();
  void sync_positions(Sequence& s);
  // Keeps only the slots listed (in order), compacting every layer's K/V.
  void compact(Sequence& s, const std::vector<int32_t>& keep_slots);
  Tensor device_i32(const std::vector<int32_t>& values);
  AttentionMask mask(int layer, int head) const;
  bool uniform_masks(int layer) const;

  Backend& backend_;
  KvGeometry geo_;
  int32_t capacity_;
  Tensor inv_freq_;
  std::map<SeqId, Sequence> seqs_;
  std::vector<Pending> pending_;
  Tensor batch_positions_;
};

}  // namespace redknot
