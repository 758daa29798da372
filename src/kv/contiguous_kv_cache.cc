#include "kv/contiguous_kv_cache.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "kv/device_util.h"

namespace redknot {

KvGeometry dense_kv_geometry(const ModelConfig& cfg, const HeadProfile* profile) {
  KvGeometry g;
  g.num_layers = static_cast<int>(cfg.num_layers);
  g.num_kv_heads = static_cast<int>(cfg.num_kv_heads);
  g.head_dim = static_cast<int>(cfg.head_dim);
  g.scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  g.heads = profile ? *profile : HeadProfile::native(cfg);
  g.heads.check_matches(cfg, "head profile");
  return g;
}

AttentionMask ContiguousKvCache::mask(int layer, int head) const {
  const HeadSpec& h = geo_.heads.at(layer, head);
  if (h.cls == HeadClass::Global) return {geo_.scale, 0, 0};
  return {geo_.scale, h.window, h.sink};
}

bool ContiguousKvCache::uniform_masks(int layer) const {
  for (int h = 1; h < geo_.num_kv_heads; ++h) {
    AttentionMask a = mask(layer, 0), b = mask(layer, h);
    if (a.window != b.window || a.sink != b.sink) return false;
  }
  return true;
}

ContiguousKvCache::ContiguousKvCache(Backend& backend, KvGeometry geometry,
                                     int32_t capacity_per_seq, Tensor inv_freq)
    : backend_(backend),
      geo_(geometry),
      capacity_(capacity_per_seq),
      inv_freq_(std::move(inv_freq)) {
  if (capacity_ <= 0) throw Error("KV cache capacity must be positive");
}

ContiguousKvCache::Sequence ContiguousKvCache::make_sequence() {
  Sequence s;
  const DType dt = backend_.act_dtype();
  for (int l = 0; l < geo_.num_layers; ++l) {
    s.k.push_back(backend_.alloc(dt, {int64_t{geo_.num_kv_heads} * capacity_, geo_.head_dim}));
    s.v.push_back(backend_.alloc(dt, {int64_t{geo_.num_kv_heads} * capacity_, geo_.head_dim}));
  }
  s.positions_dev = backend_.alloc(DType::I32, {capacity_});
  return s;
}

void ContiguousKvCache::add_sequence(SeqId seq) {
  if (has_sequence(seq)) throw Error("KV cache: sequence " + std::to_string(seq) + " exists");
  seqs_.emplace(seq, make_sequence());
}

ContiguousKvCache::Sequence& ContiguousKvCache::get(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw Error("KV cache: unknown sequence " + std::to_string(seq));
  return it->second;
}

const ContiguousKvCache::Sequence& ContiguousKvCache::get(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw Error("KV cache: unknown sequence " + std::to_string(seq));
  return it->second;
}

void ContiguousKvCache::remove_sequence(SeqId seq) {
  get(seq);
  seqs_.erase(seq);
}

int32_t ContiguousKvCache::num_tokens(SeqId seq) const {
  return static_cast<int32_t>(get(seq).positions.size());
}

int32_t ContiguousKvCache::next_position(SeqId seq) const {
  const Sequence& s = get(seq);
  return s.positions.empty() ? 0 : s.positions.back() + 1;
}

Tensor ContiguousKvCache::device_i32(const std::vector<int32_t>& values) {
  return upload_i32(backend_, values);
}

void ContiguousKvCache::sync_positions(Sequence& s) {
  std::vector<int32_t> padded(capacity_, 0);
  std::copy(s.positions.begin(), s.positions.end(), padded.begin());
  backend_.copy_from_host(s.positions_dev, Tensor::from_i32(padded, {capacity_}));
}

void ContiguousKvCache::compact(Sequence& s, const std::vector<int32_t>& keep_slots) {
  const int64_t n = static_cast<int64_t>(keep_slots.size());
  if (n > 0) {
    std::vector<int32_t> src_rows, dst_rows;
    for (int h = 0; h < geo_.num_kv_heads; ++h)
      for (int64_t i = 0; i < n; ++i) {
        src_rows.push_back(h * capacity_ + keep_slots[i]);
        dst_rows.push_back(h * capacity_ + static_cast<int32_t>(i));
      }
    Tensor src_idx = device_i32(src_rows), dst_idx = device_i32(dst_rows);
    Tensor tmp = backend_.alloc(backend_.act_dtype(), {n * geo_.num_kv_heads, geo_.head_dim});
    for (int l = 0; l < geo_.num_layers; ++l) {
      for (Tensor* buf : {&s.k[l], &s.v[l]}) {
        backend_.gather_rows(*buf, src_idx, tmp);
        backend_.scatter_rows(tmp, dst_idx, *buf);
      }
    }
  }
  std::vector<int32_t> positions;
  for (int32_t slot : keep_slots) positions.push_back(s.positions[slot]);
  s.positions = std::move(positions);
  sync_positions(s);
}

void ContiguousKvCache::remove(SeqId seq, int32_t p0, int32_t p1) {
  Sequence& s = get(seq);
  if (p1 < 0) p1 = INT32_MAX;
  std::vector<int32_t> keep;
  for (int32_t i = 0; i < static_cast<int32_t>(s.positions.size()); ++i)
    if (s.positions[i] < p0 || s.positions[i] >= p1) keep.push_back(i);
  if (keep.size() == s.positions.size()) return;
  compact(s, keep);
}

void ContiguousKvCache::fork(SeqId src, SeqId dst) {
  if (has_sequence(dst)) throw Error("KV cache: fork target " + std::to_string(dst) + " exists");
  Sequence copy = make_sequence();
  Sequence& from = get(src);
  for (int l = 0; l < geo_.num_layers; ++l) {
    backend_.copy(from.k[l], copy.k[l]);
    backend_.copy(from.v[l], copy.v[l]);
  }
  copy.positions = from.positions;
  sync_positions(copy);
  seqs_.emplace(dst, std::move(copy));
}

void ContiguousKvCache::shift(SeqId seq, int32_t p0, int32_t p1, int32_t delta) {
  Sequence& s = get(seq);
  if (p1 < 0) p1 = INT32_MAX;
  std::vector<int32_t> slots;
  std::vector<int32_t> shifted = s.positions;
  for (int32_t i = 0; i < static_cast<int32_t>(s.positions.size()); ++i)
    if (s.positions[i] >= p0 && s.positions[i] < p1) {
      slots.push_back(i);
      shifted[i] += delta;
    }
  if (slots.empty() || delta == 0) return;
  for (size_t i = 0; i < shifted.size(); ++i)
    if (shifted[i] < 0 || (i > 0 && shifted[i] <= shifted[i - 1]))
      throw Error("KV cache: shift would make positions negative or out of order");
  const int64_t m = static_cast<int64_t>(slots.size()) * geo_.num_kv_heads;
  std::vector<int32_t> rows, deltas;
  for (int h = 0; h < geo_.num_kv_heads; ++h)
    for (int32_t slot : slots) {
      rows.push_back(h * capacity_ + slot);
      deltas.push_back(delta);
    }
  Tensor idx = device_i32(rows), pos = device_i32(deltas);
  Tensor tmp = backend_.alloc(backend_.act_dtype(), {m, geo_.head_dim});
  for (int l = 0; l < geo_.num_layers; ++l) {
    backend_.gather_rows(s.k[l], idx, tmp);
    Tensor as_heads = tmp.reshape({m, 1, geo_.head_dim});
    // Relocation rotates by the position difference; no attention scaling is re-applied.
    backend_.rope(as_heads, pos, inv_freq_, 1.0f);
    backend_.scatter_rows(tmp, idx, s.k[l]);
  }
  s.positions = std::move(shifted);
  sync_positions(s);
}

void ContiguousKvCache::begin_forward(const Batch& batch, const Tensor& positions) {
  pending_.clear();
  if (batch.overwrite) throw Error("the dense KV store does not support selective recompute");
  // Check everything first so that a refused batch changes nothing.
  for (const SeqSpan& sp : batch.spans) {
    Sequence& s = get(sp.seq);
    if (static_cast<int64_t>(s.positions.size()) + sp.count > capacity_)
      throw OutOfKvMemory("KV cache: sequence " + std::to_string(sp.seq) + " would hold " +
                          std::to_string(s.positions.size() + sp.count) + " tokens, capacity is " +
                          std::to_string(capacity_));
    if (!s.positions.empty() && batch.positions[sp.begin] <= s.positions.back())
      throw Error("KV cache: new positions of sequence " + std::to_string(sp.seq) +
                  " must follow the cached ones");
  }
  for (const SeqSpan& sp : batch.spans) {
    Sequence& s = get(sp.seq);
    Pending p;
    p.seq = &s;
    p.begin = sp.begin;
    p.count = sp.count;
    p.first_slot = static_cast<int32_t>(s.positions.size());
    std::vector<int32_t> rows;
    for (int64_t i = 0; i < sp.count; ++i)
      for (int h = 0; h < geo_.num_kv_heads; ++h)
        rows.push_back(h * capacity_ + p.first_slot + static_cast<int32_t>(i));
    p.rows = device_i32(rows);
    for (int64_t i = 0; i < sp.count; ++i) s.positions.push_back(batch.positions[sp.begin + i]);
    sync_positions(s);
    pending_.push_back(std::move(p));
  }
  batch_positions_ = positions;
}

void ContiguousKvCache::write(int layer, const Tensor& k, const Tensor& v) {
  const int64_t hd = geo_.head_dim;
  Tensor k_rows = k.reshape({k.numel() / hd, hd});
  Tensor v_rows = v.reshape({v.numel() / hd, hd});
  for (Pending& p : pending_) {
    const int64_t r0 = p.begin * geo_.num_kv_heads, r1 = (p.begin + p.count) * geo_.num_kv_heads;
    backend_.scatter_rows(k_rows.rows_slice(r0, r1), p.rows, p.seq->k[layer]);
    backend_.scatter_rows(v_rows.rows_slice(r0, r1), p.rows, p.seq->v[layer]);
  }
}

void ContiguousKvCache::attend(int layer, const Tensor& q, Tensor& out) {
  const int64_t heads = q.dim(1), hd = geo_.head_dim, group = heads / geo_.num_kv_heads;
  const bool uniform = uniform_masks(layer);
  Tensor q2 = q.reshape({q.dim(0), heads * hd});
  Tensor out2 = out.reshape({out.dim(0), heads * hd});
  Tensor pos2 = batch_positions_.reshape({batch_positions_.numel(), 1});
  for (Pending& p : pending_) {
    const int64_t tk = static_cast<int64_t>(p.seq->positions.size());
    Tensor qs = q2.rows_slice(p.begin, p.begin + p.count).reshape({p.count, heads, hd});
    Tensor os = out2.rows_slice(p.begin, p.begin + p.count).reshape({p.count, heads, hd});
    Tensor qpos = pos2.rows_slice(p.begin, p.begin + p.count).reshape({p.count});
    const Tensor& kb = p.seq->k[layer];
    const Tensor& vb = p.seq->v[layer];
    Tensor kview =
        Tensor::view(kb.raw(), kb.dtype(), {geo_.num_kv_heads, tk, hd}, kb.holder(), kb.device());
    Tensor vview =
        Tensor::view(vb.raw(), vb.dtype(), {geo_.num_kv_heads, tk, hd}, vb.holder(), vb.device());
    Tensor kpos = Tensor::view(p.seq->positions_dev.raw(), DType::I32, {tk},
                               p.seq->positions_dev.holder(), p.seq->positions_dev.device());
    if (uniform) {
      backend_.attention(qs, kview, vview, int64_t{capacity_} * hd, qpos, kpos, mask(layer, 0), os);
      continue;
    }
    // Heads with different masks: one call per kv head over its query-head group.
    for (int h = 0; h < geo_.num_kv_heads; ++h) {
      std::vector<int32_t> rows;
      for (int64_t t = 0; t < p.count; ++t)
        for (int64_t g = 0; g < group; ++g)
          rows.push_back(static_cast<int32_t>(t * heads + h * group + g));
      Tensor idx = device_i32(rows);
      Tensor qg = backend_.alloc(q.dtype(), {p.count * group, hd});
      Tensor og = backend_.alloc(q.dtype(), {p.count * group, hd});
      backend_.gather_rows(qs.reshape({p.count * heads, hd}), idx, qg);
      const int64_t off = dtype_bytes(kb.dtype(), int64_t{h} * capacity_ * hd);
      Tensor kh = Tensor::view(static_cast<char*>(kb.raw()) + off, kb.dtype(), {1, tk, hd},
                               kb.holder(), kb.device());
      Tensor vh = Tensor::view(static_cast<char*>(vb.raw()) + off, vb.dtype(), {1, tk, hd},
                               vb.holder(), vb.device());
      Tensor og3 = og.reshape({p.count, group, hd});
      backend_.attention(qg.reshape({p.count, group, hd}), kh, vh, int64_t{capacity_} * hd, qpos,
                         kpos, mask(layer, h), og3);
      Tensor os_rows = os.reshape({p.count * heads, hd});
      backend_.scatter_rows(og, idx, os_rows);
    }
  }
}

void ContiguousKvCache::end_forward() { pending_.clear(); }

void ContiguousKvCache::read(SeqId seq, int layer, int kv_head, Tensor& k, Tensor& v,
                             std::vector<int32_t>& positions) {
  Sequence& s = get(seq);
  const int64_t n = static_cast<int64_t>(s.positions.size());
  const int64_t r0 = int64_t{kv_head} * capacity_;
  k = backend_.to_host_f32(s.k[layer].rows_slice(r0, r0 + n));
  v = backend_.to_host_f32(s.v[layer].rows_slice(r0, r0 + n));
  positions = s.positions;
}

}  // namespace redknot
