#include "kv/paged_kv_cache.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/error.h"
#include "kv/device_util.h"

namespace redknot {

PagedKvCache::PagedKvCache(PagePool& pool, HeadProfile profile, PagedKvOptions options,
                           Tensor inv_freq)
    : pool_(pool),
      backend_(pool.backend()),
      profile_(std::move(profile)),
      opts_(options),
      inv_freq_(std::move(inv_freq)),
      layers_(profile_.num_layers()),
      heads_(profile_.num_kv_heads()),
      page_size_(pool.page_size()) {
  if (layers_ <= 0 || heads_ <= 0) throw Error("paged KV cache: empty head profile");
}

PagedKvCache::~PagedKvCache() {
  for (auto& [id, s] : seqs_)
    for (HeadTable& t : s.tables) release_table(t);
  if (scratch_page_ >= 0) pool_.release(scratch_page_);
}

int32_t PagedKvCache::find_row(const HeadTable& t, int32_t pos) const {
  for (size_t i = 0; i < t.pages.size(); ++i) {
    const auto& ps = t.positions[i];
    if (ps.empty() || pos < ps.front() || pos > ps.back()) continue;
    auto it = std::lower_bound(ps.begin(), ps.end(), pos);
    if (it != ps.end() && *it == pos)
      return t.pages[i] * page_size_ + static_cast<int32_t>(it - ps.begin());
  }
  return -1;
}

PagedKvCache::Sequence& PagedKvCache::get(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw Error("KV cache: unknown sequence " + std::to_string(seq));
  return it->second;
}

const PagedKvCache::Sequence& PagedKvCache::get(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw Error("KV cache: unknown sequence " + std::to_string(seq));
  return it->second;
}

Tensor PagedKvCache::device_i32(const std::vector<int32_t>& values) {
  return upload_i32(backend_, values);
}

void PagedKvCache::add_sequence(SeqId seq) {
  if (has_sequence(seq)) throw Error("KV cache: sequence " + std::to_string(seq) + " exists");
  Sequence s;
  s.tables.resize(static_cast<size_t>(layers_) * heads_);
  seqs_.emplace(seq, std::move(s));
}

void PagedKvCache::release_table(HeadTable& t) {
  for (int32_t p : t.pages) pool_.release(p);
  t.pages.clear();
  t.positions.clear();
}

void PagedKvCache::remove_sequence(SeqId seq) {
  Sequence& s = get(seq);
  tables_changed(s);
  for (HeadTable& t : s.tables) release_table(t);
  seqs_.erase(seq);
}

int32_t PagedKvCache::num_tokens(SeqId seq) const {
  return static_cast<int32_t>(get(seq).positions.size());
}
int32_t PagedKvCache::next_position(SeqId seq) const { return get(seq).next_pos(); }

void PagedKvCache::copy_slots(int32_t src_page, int32_t dst_page, int32_t count) {
  if (!pool_.has_storage() || count == 0) return;
  std::vector<int32_t> src, dst;
  for (int32_t j = 0; j < count; ++j) {
    src.push_back(src_page * page_size_ + j);
    dst.push_back(dst_page * page_size_ + j);
  }
  Tensor si = device_i32(src), di = device_i32(dst);
  Tensor tmp = pool_.alloc_rows(count);  // rows as stored (FP8 rows carry their scales)
  for (Tensor* buf : {&pool_.k(), &pool_.v()}) {
    backend_.gather_rows(*buf, si, tmp);
    backend_.scatter_rows(tmp, di, *buf);
  }
  Tensor ptmp = backend_.alloc(DType::I32, {count, 1});
  backend_.gather_rows(pool_.pos(), si, ptmp);
  backend_.scatter_rows(ptmp, di, pool_.pos());
}

void PagedKvCache::make_private(HeadTable& t, size_t index) {
  const int32_t page = t.pages[index];
  if (pool_.refcount(page) == 1) return;
  const int32_t fresh = pool_.allocate();
  if (fresh < 0) throw OutOfKvMemory("KV pool exhausted while copying a shared page");
  copy_slots(page, fresh, static_cast<int32_t>(t.positions[index].size()));
  pool_.release(page);
  t.pages[index] = fresh;
}

int64_t PagedKvCache::table_pages_needed(const HeadTable& t, int64_t count) const {
  int64_t free_slots = 0, cow = 0;
  if (!t.pages.empty()) {
    free_slots = page_size_ - static_cast<int64_t>(t.positions.back().size());
    if (free_slots > 0 && count > 0 && pool_.refcount(t.pages.back()) > 1) cow = 1;
  }
  const int64_t rest = std::max<int64_t>(0, count - free_slots);
  return cow + (rest + page_size_ - 1) / page_size_;
}

int64_t PagedKvCache::pages_needed(const Batch& batch) const {
  int64_t need = 0;
  for (const SeqSpan& sp : batch.spans) {
    const Sequence& s = get(sp.seq);
    for (int l = 0; l < stored_layers(batch); ++l)
      for (int h = 0; h < heads_; ++h)
        need += table_pages_needed(s.tables[l * heads_ + h], sp.count);
  }
  return need;
}

void PagedKvCache::begin_forward(const Batch& batch, const Tensor& positions) {
  begin_forward_into(batch, positions, nullptr);
}

void PagedKvCache::begin_forward(const Batch& batch, const Tensor& positions,
                                 PlanStorage& storage) {
  auto* st = dynamic_cast<PagedPlanStorage*>(&storage);
  if (st == nullptr || !plan_storage_fits(storage))
    throw Error("paged KV cache: plan storage made for another cache");
  const int64_t need = plan_capacity(batch);
  if (need < 0 || batch.size() != st->seqs || need > st->capacity)
    throw Error("paged KV cache: batch does not fit its plan storage (" + std::to_string(need) +
                " of " + std::to_string(st->capacity) + " entries, " +
                std::to_string(batch.size()) + " of " + std::to_string(st->seqs) + " sequences)");
  begin_forward_into(batch, positions, st);
}

void PagedKvCache::begin_forward_into(const Batch& batch, const Tensor& positions,
                                      PagedPlanStorage* storage) {
  // Refused before anything (the write rows below included) is sized by it.
  if (batch.last_stored_layer >= 0) {
    if (batch.overwrite) throw Error("KV cache: an overwrite batch must store every layer");
    for (int l = batch.last_stored_layer + 1; l < layers_; ++l)
      for (int h = 0; h < heads_; ++h)
        if (spec(l, h).cls == HeadClass::Global)
          throw Error("KV cache: layer " + std::to_string(l) +
                      " has a global head; it must store every token");
  }
  plans_.clear();
  batch_seqs_.clear();
  const int64_t T = batch.size();
  std::vector<std::vector<int32_t>>& rows = rows_;  // pool row of each (token, head), per layer
  rows.assign(layers_, {});
  for (int l = 0; l < stored_layers(batch); ++l) rows[l].resize(T * heads_);
  if (batch.overwrite) {
    // Selective recompute: the positions exist; write in place (copy-on-write shared pages).
    int64_t cow = 1;  // the scratch page, when first needed
    for (const SeqSpan& sp : batch.spans)
      for (const HeadTable& t : get(sp.seq).tables)
        for (size_t i = 0; i < t.pages.size(); ++i) cow += pool_.refcount(t.pages[i]) > 1;
    if (cow > pool_.num_free())
      throw OutOfKvMemory("KV pool: selective recompute needs pages to copy shared ones");
    if (scratch_page_ < 0) scratch_page_ = pool_.allocate();
    ++epoch_;  // shared pages are copied below
    for (const SeqSpan& sp : batch.spans) {
      Sequence& s = get(sp.seq);
      batch_seqs_.push_back(sp.seq);
      for (int64_t i = 0; i < sp.count; ++i) {
        const int32_t p = batch.positions[sp.begin + i];
        if (!std::binary_search(s.positions.begin(), s.positions.end(), p))
          throw Error("KV cache: overwrite of position " + std::to_string(p) + " that sequence " +
                      std::to_string(sp.seq) + " does not hold");
      }
      for (int l = 0; l < layers_; ++l)
        for (int h = 0; h < heads_; ++h) {
          HeadTable& t = s.tables[l * heads_ + h];
          for (size_t i = 0; i < t.pages.size(); ++i) make_private(t, i);
          for (int64_t i = 0; i < sp.count; ++i) {
            const int32_t row = find_row(t, batch.positions[sp.begin + i]);
            // A local head that no longer keeps the token: its K/V go to the scratch page.
            rows[l][(sp.begin + i) * heads_ + h] = row >= 0 ? row : scratch_page_ * page_size_;
          }
        }
    }
  }
  // Validate and count first: a refused batch leaves everything unchanged.
  for (const SeqSpan& sp : batch.spans) {
    const Sequence& s = get(sp.seq);
    if (!batch.overwrite && batch.positions[sp.begin] < s.next_pos())
      throw Error("KV cache: new positions of sequence " + std::to_string(sp.seq) +
                  " must follow the cached ones");
  }
  const int64_t need = batch.overwrite ? 0 : pages_needed(batch);
  if (need > pool_.num_free())
    throw OutOfKvMemory("KV pool: batch needs " + std::to_string(need) + " pages, " +
                        std::to_string(pool_.num_free()) + " free");

  for (const SeqSpan& sp : batch.spans) {
    if (batch.overwrite) break;
    Sequence& s = get(sp.seq);
    batch_seqs_.push_back(sp.seq);
    for (int l = 0; l < stored_layers(batch); ++l)
      for (int h = 0; h < heads_; ++h) {
        HeadTable& t = s.tables[l * heads_ + h];
        const size_t held = t.pages.size();
        const int32_t last = held > 0 ? t.pages.back() : -1;
        if (!t.pages.empty() && static_cast<int32_t>(t.positions.back().size()) < page_size_)
          make_private(t, t.pages.size() - 1);
        // A page at a time: this loop runs for every (layer, head, token) of a prompt.
        int32_t* out = rows[l].data() + h;
        for (int64_t i = 0; i < sp.count;) {
          if (t.pages.empty() || static_cast<int32_t>(t.positions.back().size()) == page_size_) {
            t.pages.push_back(pool_.allocate());  // counted above, cannot fail
            t.positions.emplace_back().reserve(page_size_);
          }
          std::vector<int32_t>& slots = t.positions.back();
          const int64_t n = std::min<int64_t>(sp.count - i, page_size_ - int64_t(slots.size()));
          const int32_t base = t.pages.back() * page_size_ + static_cast<int32_t>(slots.size());
          const int32_t* p = batch.positions.data() + sp.begin + i;
          slots.insert(slots.end(), p, p + n);
          for (int64_t j = 0; j < n; ++j)
            out[(sp.begin + i + j) * heads_] = base + static_cast<int32_t>(j);
          i += n;
        }
        if (t.pages.size() != held || (held > 0 && t.pages[held - 1] != last)) {
          t.gen = ++gen_clock_;
          t.trim_at = 0;
        }
      }
    for (int64_t i = 0; i < sp.count; ++i) s.positions.push_back(batch.positions[sp.begin + i]);
  }

  build_plans(batch, storage);
  batch_positions_ = positions;
  stored_layers_ = stored_layers(batch);
}

// Offsets (in i32 words) of the plan arrays in one packed buffer, each array 16-byte aligned:
// the batch-wide qo_indptr and token positions, then per layer its CSR arrays (page entries
// sized by that layer's capacity) and the pool rows of the tokens it writes.
struct PagedKvCache::PlanLayout {
  struct Layer {
    int64_t indptr, pages, lengths, window, sink, rows, row_count, capacity;
  };
  int64_t qo = 0, token_pos = 0, words = 0;
  std::vector<Layer> layers;

  // rows_in: layers [0, rows_in) have write rows (Batch::last_stored_layer).
  PlanLayout(int64_t seqs, int64_t tokens, int32_t heads, const std::vector<int64_t>& capacity,
             int rows_in) {
    auto take = [&](int64_t n) {
      const int64_t at = words;
      words += (n + 3) / 4 * 4;
      return at;
    };
    qo = take(seqs + 1);
    token_pos = take(tokens * heads);
    for (int64_t cap : capacity) {
      Layer l;
      l.capacity = cap;
      const int64_t row_count = static_cast<int64_t>(layers.size()) < rows_in ? tokens * heads : 0;
      l.indptr = take(seqs * heads + 1);
      l.pages = take(cap);
      l.lengths = take(cap);
      l.window = take(heads);
      l.sink = take(heads);
      l.rows = take(row_count);
      l.row_count = row_count;
      layers.push_back(l);
    }
  }
};

namespace {
// Copies host words [0, n) into device buffer `dst` ([>= n] i32) in pieces small enough for the
// backend's asynchronous staged uploads.
void upload_words(Backend& backend, const std::vector<int32_t>& host, int64_t n, Tensor& dst) {
  constexpr int64_t kPiece = int64_t{1} << 20;  // 4 MiB
  Tensor col = dst.reshape({dst.numel(), 1});
  for (int64_t at = 0; at < n; at += kPiece) {
    const int64_t len = std::min(kPiece, n - at);
    Tensor piece = col.rows_slice(at, at + len);
    backend.copy_from_host(
        piece, Tensor::view(const_cast<int32_t*>(host.data()) + at, DType::I32, {len, 1}, nullptr));
  }
}
}  // namespace

int64_t PagedKvCache::plan_capacity(const Batch& batch) const {
  if (batch.overwrite || batch.size() == 0 || batch.last_stored_layer >= 0) return -1;
  for (const SeqSpan& sp : batch.spans)
    if (sp.count != 1 || !has_sequence(sp.seq) || get(sp.seq).full_until >= 0) return -1;
  int64_t most = 0;  // page entries of the fullest layer once the batch's slots exist
  for (int l = 0; l < layers_; ++l) {
    int64_t entries = 0;
    for (const SeqSpan& sp : batch.spans)
      for (int h = 0; h < heads_; ++h) {
        const HeadTable& t = get(sp.seq).tables[l * heads_ + h];
        // A copy-on-write of the last page replaces it: it is counted once, as a page held.
        entries += static_cast<int64_t>(t.pages.size()) + table_pages_needed(t, sp.count);
      }
    most = std::max(most, entries);
  }
  return most;
}

std::shared_ptr<PlanStorage> PagedKvCache::make_plan_storage(int32_t seqs, int64_t capacity) {
  if (seqs <= 0 || capacity <= 0 || !pool_.has_storage()) return nullptr;
  auto st = std::make_shared<PagedPlanStorage>();
  st->seqs = seqs;
  st->capacity = capacity;
  const PlanLayout layout(seqs, seqs, heads_, std::vector<int64_t>(layers_, capacity), layers_);
  st->buffer = backend_.alloc(DType::I32, {layout.words});
  st->host.assign(static_cast<size_t>(layout.words), 0);
  st->fingerprint = fingerprint();
  return st;
}

bool PagedKvCache::plan_storage_fits(const PlanStorage& storage) const {
  const auto* st = dynamic_cast<const PagedPlanStorage*>(&storage);
  return st != nullptr && st->fingerprint == fingerprint();
}

PagedKvCache::Fingerprint PagedKvCache::fingerprint() const {
  if (!pool_.has_storage()) return {};
  return {pool_.k().raw(), pool_.v().raw(), pool_.pos().raw(), opts_.scale, page_size_,
          layers_,         heads_};
}

void PagedKvCache::build_plans(const Batch& batch, PagedPlanStorage* storage) {
  const int64_t T = batch.size(), seqs = static_cast<int64_t>(batch.spans.size());
  if (storage != nullptr && opts_.patch_decode_plans && storage->planned &&
      storage->epoch == epoch_ && storage->seqs_planned.size() == batch.spans.size() &&
      std::equal(batch.spans.begin(), batch.spans.end(), storage->seqs_planned.begin(),
                 [](const SeqSpan& sp, SeqId id) { return sp.seq == id; })) {
    patch_plans(batch, *storage);
    ++plan_stats_.patched;
    return;
  }
  if (storage != nullptr) ++plan_stats_.rebuilt;
  int32_t full_until = -1;  // set_full_attention of the batch's (single) sequence
  for (const SeqSpan& sp : batch.spans)
    if (get(sp.seq).full_until >= 0) {
      if (batch.spans.size() != 1)
        throw Error("paged KV cache: a full-attention pass must run its sequence alone");
      full_until = get(sp.seq).full_until;
    }
  std::vector<const Sequence*> in_batch;  // looked up once (this runs every decode step)
  for (const SeqSpan& sp : batch.spans) in_batch.push_back(&get(sp.seq));
  std::vector<int64_t> capacity(layers_, 0);
  for (int l = 0; l < layers_; ++l) {
    if (storage) {
      capacity[l] = storage->capacity;
      continue;
    }
    for (const Sequence* s : in_batch)
      for (int h = 0; h < heads_; ++h)
        capacity[l] += static_cast<int64_t>(s->tables[l * heads_ + h].pages.size());
  }
  const PlanLayout layout(seqs, T, heads_, capacity, stored_layers(batch));
  // Staged in a kept buffer: a fresh one per forward costs its page faults every step.
  std::vector<int32_t>& w = storage ? storage->host : plan_words_;
  w.resize(static_cast<size_t>(layout.words));
  int32_t* words = w.data();

  words[layout.qo] = 0;
  for (int64_t i = 0; i < seqs; ++i)
    words[layout.qo + i + 1] = static_cast<int32_t>(batch.spans[i].begin + batch.spans[i].count);
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < heads_; ++h) words[layout.token_pos + t * heads_ + h] = batch.positions[t];
  for (int l = 0; l < layers_; ++l) {
    const PlanLayout::Layer& pl = layout.layers[l];
    int64_t n = 0;
    words[pl.indptr] = 0;
    int64_t item = 0;
    for (const Sequence* s : in_batch) {
      for (int h = 0; h < heads_; ++h) {
        const HeadTable& t = s->tables[l * heads_ + h];
        for (size_t i = 0; i < t.pages.size(); ++i, ++n) {
          words[pl.pages + n] = t.pages[i];
          words[pl.lengths + n] = static_cast<int32_t>(t.positions[i].size());
        }
        words[pl.indptr + ++item] = static_cast<int32_t>(n);
      }
    }
    for (int h = 0; h < heads_; ++h) {
      const bool local_head = spec(l, h).cls == HeadClass::Local && l > full_until;
      words[pl.window + h] = local_head ? spec(l, h).window : 0;
      words[pl.sink + h] = local_head ? spec(l, h).sink : 0;
    }
    std::copy(rows_[l].begin(), rows_[l].end(), words + pl.rows);
  }

  // One upload for every layer's metadata (a storage's buffer keeps its device address).
  Tensor buffer;
  if (storage) {
    buffer = storage->buffer;
  } else {
    buffer = backend_.alloc_uninit(DType::I32, {layout.words});  // every word uploaded below
  }
  upload_words(backend_, w, layout.words, buffer);
  set_plan_views(layout, buffer, seqs, T);
  if (storage != nullptr) {  // what the next step may patch
    storage->planned = true;
    storage->epoch = epoch_;
    storage->seqs_planned.clear();
    storage->gens.clear();
    for (const SeqSpan& sp : batch.spans) storage->seqs_planned.push_back(sp.seq);
    for (int l = 0; l < layers_; ++l)
      for (const Sequence* s : in_batch)
        for (int h = 0; h < heads_; ++h) storage->gens.push_back(s->tables[l * heads_ + h].gen);
  }
}

void PagedKvCache::patch_plans(const Batch& batch, PagedPlanStorage& st) {
  const int64_t T = batch.size(), seqs = st.seqs, items = seqs * heads_;
  const PlanLayout layout(seqs, T, heads_, std::vector<int64_t>(layers_, st.capacity), layers_);
  int32_t* words = st.host.data();
  patch_index_.clear();
  patch_value_.clear();
  auto set = [&](int64_t at, int32_t value) {
    if (words[at] == value) return;
    words[at] = value;
    patch_index_.push_back(static_cast<int32_t>(at));
    patch_value_.push_back(value);
  };
  for (int64_t i = 0; i < seqs; ++i)
    set(layout.qo + i + 1, static_cast<int32_t>(batch.spans[i].begin + batch.spans[i].count));
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < heads_; ++h) set(layout.token_pos + t * heads_ + h, batch.positions[t]);
  std::vector<const Sequence*> in_batch;
  for (const SeqSpan& sp : batch.spans) in_batch.push_back(&get(sp.seq));
  for (int l = 0; l < layers_; ++l) {
    const PlanLayout::Layer& pl = layout.layers[l];
    uint64_t* gens = st.gens.data() + l * items;
    // Tables whose page list is as planned only filled a slot of their last page; from the
    // first one whose list changed on, the layer's CSR entries move and are rewritten.
    bool moved = false;
    int64_t n = 0, item = 0;
    for (const Sequence* s : in_batch)
      for (int h = 0; h < heads_; ++h, ++item) {
        const HeadTable& t = s->tables[l * heads_ + h];
        if (!moved && t.gen != gens[item]) {
          moved = true;
          n = words[pl.indptr + item];
        }
        if (!moved) {
          const int64_t end = words[pl.indptr + item + 1];
          if (!t.pages.empty())
            set(pl.lengths + end - 1, static_cast<int32_t>(t.positions.back().size()));
          continue;
        }
        for (size_t i = 0; i < t.pages.size(); ++i, ++n) {
          set(pl.pages + n, t.pages[i]);
          set(pl.lengths + n, static_cast<int32_t>(t.positions[i].size()));
        }
        set(pl.indptr + item + 1, static_cast<int32_t>(n));
        gens[item] = t.gen;
      }
    for (size_t r = 0; r < rows_[l].size(); ++r)
      set(pl.rows + static_cast<int64_t>(r), rows_[l][r]);
  }
  // Few words: one upload of (indices, values) and a scatter on the device; many (every
  // sequence's table moved): the whole buffer, as a rebuild would.
  const int64_t m = static_cast<int64_t>(patch_index_.size());
  if (m * 8 > layout.words) {
    upload_words(backend_, st.host, layout.words, st.buffer);
  } else if (m > 0) {
    if (st.patch.numel() < 2 * m) st.patch = backend_.alloc(DType::I32, {4 * m});
    patch_index_.insert(patch_index_.end(), patch_value_.begin(), patch_value_.end());
    Tensor staged = st.patch.reshape({st.patch.numel(), 1}).rows_slice(0, 2 * m);
    backend_.copy_from_host(staged,
                            Tensor::view(patch_index_.data(), DType::I32, {2 * m, 1}, nullptr));
    Tensor index = staged.rows_slice(0, m).reshape({m});
    Tensor values = staged.rows_slice(m, 2 * m);
    Tensor target = st.buffer.reshape({st.buffer.numel(), 1});
    backend_.scatter_rows(values, index, target);
  }
  set_plan_views(layout, st.buffer, seqs, T);
}

void PagedKvCache::set_plan_views(const PlanLayout& layout, const Tensor& buffer, int64_t seqs,
                                  int64_t T) {
  auto view = [&](int64_t at, int64_t n) {
    return Tensor::view(buffer.data<int32_t>() + at, DType::I32, {n}, buffer.holder(),
                        buffer.device());
  };
  plans_.assign(layers_, LayerPlan{});
  for (int l = 0; l < layers_; ++l) {
    const PlanLayout::Layer& pl = layout.layers[l];
    PagedAttentionPlan& p = plans_[l].plan;
    p.num_seqs = static_cast<int32_t>(seqs);
    p.num_kv_heads = heads_;
    p.page_size = page_size_;
    p.scale = opts_.scale;
    p.qo_indptr = view(layout.qo, seqs + 1);
    p.kv_indptr = view(pl.indptr, seqs * heads_ + 1);
    p.page_indices = view(pl.pages, pl.capacity);
    p.page_lengths = view(pl.lengths, pl.capacity);
    p.head_window = view(pl.window, heads_);
    p.head_sink = view(pl.sink, heads_);
    plans_[l].rows = view(pl.rows, pl.row_count);
  }
  token_positions_ = view(layout.token_pos, T * heads_).reshape({T * heads_, 1});
}

void PagedKvCache::write(int layer, const Tensor& k, const Tensor& v) {
  if (!pool_.has_storage()) return;
  if (layer >= stored_layers_) return;  // the batch's tokens are not kept in this layer
  const int64_t hd = pool_.head_dim(), n = k.numel() / hd;
  const Tensor& rows = plans_.at(layer).rows;
  if (pool_.fp8() && k.dtype() == DType::F8_E4M3) {  // rows as stored (a chunk store reload)
    const int64_t w = pool_.row_width(), m = k.numel() / w;
    backend_.scatter_rows(k.reshape({m, w}), rows, pool_.k());
    backend_.scatter_rows(v.reshape({m, w}), rows, pool_.v());
  } else if (pool_.fp8()) {  // each (token, head) row quantized with its own scale
    Tensor packed = pool_.alloc_rows(n);
    backend_.pack_fp8_kv_rows(k.reshape({n, hd}), packed);
    backend_.scatter_rows(packed, rows, pool_.k());
    backend_.pack_fp8_kv_rows(v.reshape({n, hd}), packed);
    backend_.scatter_rows(packed, rows, pool_.v());
  } else {
    backend_.scatter_rows(k.reshape({n, hd}), rows, pool_.k());
    backend_.scatter_rows(v.reshape({n, hd}), rows, pool_.v());
  }
  backend_.scatter_rows(token_positions_, rows, pool_.pos());
}

void PagedKvCache::rotate_rows(Tensor& rows, const Tensor& deltas) {
  const int64_t m = rows.dim(0), hd = pool_.head_dim();
  // Relocation: rotate by the position difference; attention scaling is not applied again.
  if (!pool_.fp8()) {
    Tensor as_heads = rows.reshape({m, 1, hd});
    backend_.rope(as_heads, deltas, inv_freq_, 1.0f);
    return;
  }
  // FP8 rows: the stored key exactly (codes x scale), rotated in act precision, requantized
  // with a fresh scale of its own: one rounding, as a key written at the new position gets.
  Tensor x = backend_.alloc_uninit(backend_.act_dtype(), {m, hd});
  backend_.unpack_fp8_kv_rows(rows, x);
  Tensor as_heads = x.reshape({m, 1, hd});
  backend_.rope(as_heads, deltas, inv_freq_, 1.0f);
  backend_.pack_fp8_kv_rows(x, rows);
}

void PagedKvCache::attend(int layer, const Tensor& q, Tensor& out) {
  if (!pool_.has_storage()) throw Error("paged KV cache: accounting-only pool cannot attend");
  Tensor pos_flat = pool_.pos().reshape({pool_.pos().numel()});
  backend_.paged_attention(q, pool_.k(), pool_.v(), pos_flat, batch_positions_,
                           plans_.at(layer).plan, out);
}

void PagedKvCache::trim(HeadTable& t, const HeadSpec& hs, int32_t next_pos) {
  // Runs after every forward for every local head: the common case reads only the table.
  if (!hs.is_local() || next_pos < t.trim_at) return;
  size_t kept = 0;  // compacts in place
  const size_t n = t.pages.size();
  t.trim_at = INT64_MAX;
  for (size_t i = 0; i < n; ++i) {
    const auto& ps = t.positions[i];
    // Positions increase along the table: from the first page reaching into the window on,
    // every page is kept, and the first of them not kept by the sink sets the next look.
    if (!ps.empty() && ps.back() > int64_t{next_pos} - hs.window) {
      for (size_t j = i; j < n; ++j)
        if (!t.positions[j].empty() && t.positions[j].front() >= hs.sink) {
          t.trim_at = int64_t{t.positions[j].back()} + hs.window;
          break;
        }
      if (kept == i) return;
      for (; i < n; ++i, ++kept) {
        t.pages[kept] = t.pages[i];
        t.positions[kept] = std::move(t.positions[i]);
      }
      break;  // kept < n: pages were dropped before this one
    }
    const bool dead = !ps.empty() && !hs.keeps_any(ps.front(), ps.back(), next_pos);
    if (dead) {
      pool_.release(t.pages[i]);
      continue;
    }
    if (kept != i) {
      t.pages[kept] = t.pages[i];
      t.positions[kept] = std::move(t.positions[i]);
    }
    ++kept;
  }
  if (kept == n) return;
  t.pages.resize(kept);
  t.positions.resize(kept);
  t.gen = ++gen_clock_;
}

void PagedKvCache::tables_changed(Sequence& s) {
  ++epoch_;
  for (HeadTable& t : s.tables) t.trim_at = 0;
}

void PagedKvCache::trim_sequence(Sequence& s) {
  if (s.keep_local_pages) return;
  for (int l = 0; l < layers_; ++l)
    for (int h = 0; h < heads_; ++h) trim(s.tables[l * heads_ + h], spec(l, h), s.next_pos());
}

void PagedKvCache::set_full_attention(SeqId seq, int32_t full_until_layer, bool keep_local_pages) {
  Sequence& s = get(seq);
  tables_changed(s);
  s.full_until = full_until_layer;
  s.keep_local_pages = keep_local_pages;
  trim_sequence(s);
}

void PagedKvCache::end_forward() {
  for (SeqId id : batch_seqs_) {
    auto it = seqs_.find(id);
    if (it != seqs_.end()) trim_sequence(it->second);
  }
  plans_.clear();
  batch_seqs_.clear();
  if (scratch_page_ >= 0) {  // only held during a selective-recompute forward
    pool_.release(scratch_page_);
    scratch_page_ = -1;
  }
}

void PagedKvCache::fork(SeqId src, SeqId dst) {
  if (has_sequence(dst)) throw Error("KV cache: fork target " + std::to_string(dst) + " exists");
  ++epoch_;  // the source's pages become shared: its next append copies its last page
  Sequence copy = get(src);
  for (HeadTable& t : copy.tables)
    for (int32_t p : t.pages) pool_.retain(p);
  seqs_.emplace(dst, std::move(copy));
}

void PagedKvCache::remove(SeqId seq, int32_t p0, int32_t p1) {
  Sequence& s = get(seq);
  tables_changed(s);
  if (p1 < 0) p1 = INT32_MAX;
  auto removed = [&](int32_t p) { return p >= p0 && p < p1; };
  // Per table, pages before the first removed token stay as they are. When no token after it
  // is kept (tail truncation) the table is only cut there: no copy and no new page, so that
  // freeing memory works on a full pool. Otherwise the kept tokens from that page on are
  // compacted into fresh pages, counted before anything is touched.
  struct Cut {
    bool any = false, compact = false;
    size_t page = 0, slot = 0;  // the first removed token
    int64_t kept = 0;           // kept tokens from `page` on
  };
  std::vector<Cut> cuts(s.tables.size());
  int64_t need = 0;
  for (size_t ti = 0; ti < s.tables.size(); ++ti) {
    const HeadTable& t = s.tables[ti];
    Cut& c = cuts[ti];
    for (size_t i = 0; i < t.positions.size(); ++i)
      for (size_t j = 0; j < t.positions[i].size(); ++j) {
        const bool gone = removed(t.positions[i][j]);
        if (!c.any && gone) {
          c = {true, false, i, j, static_cast<int64_t>(j)};
        } else if (c.any && !gone) {
          c.compact = true;
          ++c.kept;
        }
      }
    if (c.compact) need += (c.kept + page_size_ - 1) / page_size_;
  }
  if (need > pool_.num_free())
    throw OutOfKvMemory("KV pool: remove needs " + std::to_string(need) + " pages to compact");
  for (size_t ti = 0; ti < s.tables.size(); ++ti) {
    HeadTable& t = s.tables[ti];
    const Cut& c = cuts[ti];
    if (!c.any) continue;
    if (!c.compact) {
      // Slots [0, slot) of the cut page stay; a shared page stays shared (the next append
      // copies it before writing).
      const size_t keep = c.slot > 0 ? c.page + 1 : c.page;
      for (size_t i = keep; i < t.pages.size(); ++i) pool_.release(t.pages[i]);
      t.pages.resize(keep);
      t.positions.resize(keep);
      if (c.slot > 0) t.positions.back().resize(c.slot);
      continue;
    }
    std::vector<int32_t> src_rows, keep_pos;
    for (size_t i = c.page; i < t.positions.size(); ++i)
      for (size_t j = 0; j < t.positions[i].size(); ++j)
        if (!removed(t.positions[i][j])) {
          src_rows.push_back(t.pages[i] * page_size_ + static_cast<int32_t>(j));
          keep_pos.push_back(t.positions[i][j]);
        }
    HeadTable fresh;
    std::vector<int32_t> dst_rows;
    for (size_t i = 0; i < keep_pos.size(); ++i) {
      if (i % page_size_ == 0) {
        fresh.pages.push_back(pool_.allocate());
        fresh.positions.emplace_back();
      }
      fresh.positions.back().push_back(keep_pos[i]);
      dst_rows.push_back(fresh.pages.back() * page_size_ + static_cast<int32_t>(i % page_size_));
    }
    if (pool_.has_storage() && !src_rows.empty()) {
      Tensor si = device_i32(src_rows), di = device_i32(dst_rows);
      const int64_t n = static_cast<int64_t>(src_rows.size());
      Tensor tmp = pool_.alloc_rows(n);
      for (Tensor* buf : {&pool_.k(), &pool_.v()}) {
        backend_.gather_rows(*buf, si, tmp);
        backend_.scatter_rows(tmp, di, *buf);
      }
      Tensor ptmp = backend_.alloc(DType::I32, {n, 1});
      backend_.gather_rows(pool_.pos(), si, ptmp);
      backend_.scatter_rows(ptmp, di, pool_.pos());
    }
    for (size_t i = c.page; i < t.pages.size(); ++i) pool_.release(t.pages[i]);
    t.pages.resize(c.page);
    t.positions.resize(c.page);
    t.pages.insert(t.pages.end(), fresh.pages.begin(), fresh.pages.end());
    t.positions.insert(t.positions.end(), fresh.positions.begin(), fresh.positions.end());
  }
  std::erase_if(s.positions, removed);
}

void PagedKvCache::shift(SeqId seq, int32_t p0, int32_t p1, int32_t delta) {
  Sequence& s = get(seq);
  tables_changed(s);
  if (p1 < 0) p1 = INT32_MAX;
  if (delta == 0) return;
  // Positions must stay increasing and non-negative. Checked on the sequence's own positions:
  // every table holds a subset of them, and local heads may have dropped tokens that the
  // shifted ones would collide with.
  int64_t prev = -1;
  for (int32_t p : s.positions) {
    const int64_t np = (p >= p0 && p < p1) ? int64_t{p} + delta : p;
    if (np < 0 || np <= prev)
      throw Error("KV cache: shift would make positions negative or out of order");
    prev = np;
  }
  int64_t cow = 0;
  for (const HeadTable& t : s.tables)
    for (size_t i = 0; i < t.pages.size(); ++i) {
      const auto& ps = t.positions[i];
      bool touched =
          std::any_of(ps.begin(), ps.end(), [&](int32_t p) { return p >= p0 && p < p1; });
      if (touched && pool_.refcount(t.pages[i]) > 1) ++cow;
    }
  if (cow > pool_.num_free()) throw OutOfKvMemory("KV pool: shift needs pages to copy shared ones");

  for (int l = 0; l < layers_; ++l) {
    std::vector<int32_t> rows, deltas, new_pos;
    for (int h = 0; h < heads_; ++h) {
      HeadTable& t = s.tables[l * heads_ + h];
      for (size_t i = 0; i < t.pages.size(); ++i) {
        auto& ps = t.positions[i];
        if (!std::any_of(ps.begin(), ps.end(), [&](int32_t p) { return p >= p0 && p < p1; }))
          continue;
        make_private(t, i);
        for (size_t j = 0; j < ps.size(); ++j)
          if (ps[j] >= p0 && ps[j] < p1) {
            rows.push_back(t.pages[i] * page_size_ + static_cast<int32_t>(j));
            deltas.push_back(delta);
            ps[j] += delta;
            new_pos.push_back(ps[j]);
          }
      }
    }
    if (rows.empty() || !pool_.has_storage()) continue;
    const int64_t m = static_cast<int64_t>(rows.size());
    Tensor idx = device_i32(rows), dpos = device_i32(deltas);
    Tensor tmp = pool_.alloc_rows(m);
    backend_.gather_rows(pool_.k(), idx, tmp);
    rotate_rows(tmp, dpos);
    backend_.scatter_rows(tmp, idx, pool_.k());
    backend_.scatter_rows(device_i32(new_pos).reshape({m, 1}), idx, pool_.pos());
  }
  for (int32_t& p : s.positions)
    if (p >= p0 && p < p1) p += delta;
}

void PagedKvCache::read(SeqId seq, int layer, int kv_head, Tensor& k, Tensor& v,
                        std::vector<int32_t>& positions) {
  Sequence& s = get(seq);
  const HeadTable& t = s.tables.at(static_cast<size_t>(layer) * heads_ + kv_head);
  std::vector<int32_t> rows;
  positions.clear();
  for (size_t i = 0; i < t.pages.size(); ++i)
    for (size_t j = 0; j < t.positions[i].size(); ++j) {
      rows.push_back(t.pages[i] * page_size_ + static_cast<int32_t>(j));
      positions.push_back(t.positions[i][j]);
    }
  const int64_t n = static_cast<int64_t>(rows.size());
  Tensor kd = backend_.alloc(backend_.act_dtype(), {n, pool_.head_dim()});
  Tensor vd = backend_.alloc(backend_.act_dtype(), {n, pool_.head_dim()});
  if (n > 0 && pool_.has_storage()) {
    Tensor idx = device_i32(rows);
    for (auto [src, dst] : {std::pair{&pool_.k(), &kd}, std::pair{&pool_.v(), &vd}}) {
      if (!pool_.fp8()) {
        backend_.gather_rows(*src, idx, *dst);
        continue;
      }
      Tensor stored = pool_.alloc_rows(n);
      backend_.gather_rows(*src, idx, stored);
      backend_.unpack_fp8_kv_rows(stored, *dst);
    }
  }
  k = backend_.to_host_f32(kd);
  v = backend_.to_host_f32(vd);
}

std::vector<int32_t> PagedKvCache::head_positions(SeqId seq, int layer, int kv_head) const {
  const HeadTable& t = get(seq).tables.at(static_cast<size_t>(layer) * heads_ + kv_head);
  std::vector<int32_t> out;
  for (const auto& ps : t.positions) out.insert(out.end(), ps.begin(), ps.end());
  return out;
}

void PagedKvCache::import_sequence(SeqId seq, std::vector<int32_t> positions,
                                   const std::vector<std::vector<int32_t>>& head_positions,
                                   const std::vector<Tensor>& k, const std::vector<Tensor>& v) {
  Sequence& s = get(seq);
  tables_changed(s);
  const size_t tables = static_cast<size_t>(layers_) * heads_;
  if (!s.positions.empty()) throw Error("import_sequence: the sequence must be empty");
  if (head_positions.size() != tables || k.size() != tables || v.size() != tables)
    throw Error("import_sequence: need rows for every (layer, kv head)");
  int64_t need = 0;
  for (size_t i = 0; i < tables; ++i) {
    const int64_t n = static_cast<int64_t>(head_positions[i].size());
    if (k[i].numel() != n * pool_.head_dim() || v[i].numel() != n * pool_.head_dim())
      throw Error("import_sequence: K/V rows do not match the positions");
    need += (n + page_size_ - 1) / page_size_;
  }
  if (need > pool_.num_free())
    throw OutOfKvMemory("KV pool: importing a sequence needs " + std::to_string(need) + " pages, " +
                        std::to_string(pool_.num_free()) + " free");
  const int64_t hd = pool_.head_dim(), rb = dtype_bytes(backend_.act_dtype(), hd);
  for (int l = 0; l < layers_; ++l) {
    std::vector<int32_t> dst, dst_pos;
    for (int h = 0; h < heads_; ++h) {
      HeadTable& t = s.tables[static_cast<size_t>(l) * heads_ + h];
      for (int32_t p : head_positions[static_cast<size_t>(l) * heads_ + h]) {
        if (t.pages.empty() || static_cast<int32_t>(t.positions.back().size()) == page_size_) {
          t.pages.push_back(pool_.allocate());
          t.positions.emplace_back().reserve(page_size_);
        }
        dst.push_back(t.pages.back() * page_size_ +
                      static_cast<int32_t>(t.positions.back().size()));
        t.positions.back().push_back(p);
        dst_pos.push_back(p);
      }
    }
    const int64_t m = static_cast<int64_t>(dst.size());
    if (!pool_.has_storage() || m == 0) continue;
    // One upload per layer: the heads' rows back to back, in the order of `dst`.
    for (auto [src, pool] : {std::pair{&k, &pool_.k()}, std::pair{&v, &pool_.v()}}) {
      Tensor host = Tensor::host(backend_.act_dtype(), {m, hd});
      auto* out = static_cast<uint8_t*>(host.raw());
      for (int h = 0; h < heads_; ++h) {
        const Tensor& t = (*src)[static_cast<size_t>(l) * heads_ + h];
        const int64_t bytes = t.numel() / hd * rb;
        std::memcpy(out, t.raw(), bytes);
        out += bytes;
      }
      Tensor dev = backend_.alloc(backend_.act_dtype(), {m, hd});
      backend_.copy_from_host(dev, host);
      backend_.scatter_rows(dev, device_i32(dst), *pool);
    }
    backend_.scatter_rows(device_i32(dst_pos).reshape({m, 1}), device_i32(dst), pool_.pos());
  }
  s.positions = std::move(positions);
  trim_sequence(s);
}

std::vector<int32_t> PagedKvCache::slot_rows(SeqId seq, int layer, int kv_head) const {
  const HeadTable& t = get(seq).tables.at(static_cast<size_t>(layer) * heads_ + kv_head);
  std::vector<int32_t> rows;
  for (size_t i = 0; i < t.pages.size(); ++i)
    for (size_t j = 0; j < t.positions[i].size(); ++j)
      rows.push_back(t.pages[i] * page_size_ + static_cast<int32_t>(j));
  return rows;
}

void PagedKvCache::append_relocated(SeqId seq, const std::vector<std::vector<int32_t>>& rows,
                                    const std::vector<int32_t>& src_positions, int32_t delta) {
  append_relocated(seq, {RelocatedSegment{&rows, &src_positions, delta}});
}

void PagedKvCache::append_relocated(SeqId seq, const std::vector<RelocatedSegment>& segments) {
  Sequence& s = get(seq);
  // Validate first: a refused call changes nothing.
  std::vector<int32_t> new_pos;  // every segment's tokens, in order
  std::vector<int32_t> deltas;   // [new_pos.size()]
  int64_t prev = s.next_pos() - 1;
  for (const RelocatedSegment& seg : segments) {
    const auto& src = *seg.src_positions;
    if (static_cast<int64_t>(seg.rows->size()) != int64_t{layers_} * heads_)
      throw Error("append_relocated: need rows for every (layer, kv head)");
    for (const auto& r : *seg.rows)
      if (r.size() != src.size()) throw Error("append_relocated: row count mismatch");
    for (size_t i = 0; i < src.size(); ++i) {
      if (i > 0 && src[i] <= src[i - 1])
        throw Error("append_relocated: source positions must increase");
      const int64_t p = int64_t{src[i]} + seg.delta;
      if (p <= prev) throw Error("append_relocated: positions must follow the cached ones");
      prev = p;
      new_pos.push_back(static_cast<int32_t>(p));
      deltas.push_back(seg.delta);
    }
  }
  const int64_t n = static_cast<int64_t>(new_pos.size());
  if (n == 0) return;
  const int64_t next_pos = int64_t{new_pos.back()} + 1;
  auto kept = [&](int l, int h, int64_t i) {
    return s.keep_local_pages || spec(l, h).keeps(new_pos[i], next_pos);
  };
  int64_t need = 0;
  for (int l = 0; l < layers_; ++l)
    for (int h = 0; h < heads_; ++h) {
      int64_t count = 0;
      for (int64_t i = 0; i < n; ++i) count += kept(l, h, i) ? 1 : 0;
      need += table_pages_needed(s.tables[l * heads_ + h], count);
    }
  if (need > pool_.num_free())
    throw OutOfKvMemory("KV pool: relocating cached segments needs " + std::to_string(need) +
                        " pages, " + std::to_string(pool_.num_free()) + " free");
  tables_changed(s);
  for (int l = 0; l < layers_; ++l) {
    std::vector<int32_t> src, dst, dst_pos, row_delta;
    for (int h = 0; h < heads_; ++h) {
      HeadTable& t = s.tables[l * heads_ + h];
      if (!t.pages.empty() && static_cast<int32_t>(t.positions.back().size()) < page_size_)
        make_private(t, t.pages.size() - 1);
      int64_t i = 0;
      for (const RelocatedSegment& seg : segments) {
        const std::vector<int32_t>& seg_rows = (*seg.rows)[l * heads_ + h];
        for (size_t r = 0; r < seg_rows.size(); ++r, ++i) {
          // A local head keeps sink ∪ window: tokens that trim would drop right after this call
          // are not copied at all (most of a long prompt's documents).
          if (!kept(l, h, i)) continue;
          if (t.pages.empty() || static_cast<int32_t>(t.positions.back().size()) == page_size_) {
            t.pages.push_back(pool_.allocate());
            t.positions.emplace_back().reserve(page_size_);
          }
          const int32_t slot = static_cast<int32_t>(t.positions.back().size());
          t.positions.back().push_back(new_pos[i]);
          src.push_back(seg_rows[r]);
          dst.push_back(t.pages.back() * page_size_ + slot);
          dst_pos.push_back(new_pos[i]);
          row_delta.push_back(deltas[i]);
        }
      }
    }
    if (!pool_.has_storage() || src.empty()) continue;
    const int64_t m = static_cast<int64_t>(src.size());
    Tensor si = device_i32(src), di = device_i32(dst);
    Tensor tmp = pool_.alloc_rows(m);  // gathered
    backend_.gather_rows(pool_.k(), si, tmp);
    if (std::any_of(row_delta.begin(), row_delta.end(), [](int32_t d) { return d != 0; }))
      rotate_rows(tmp, device_i32(row_delta));
    backend_.scatter_rows(tmp, di, pool_.k());
    backend_.gather_rows(pool_.v(), si, tmp);
    backend_.scatter_rows(tmp, di, pool_.v());
    backend_.scatter_rows(device_i32(dst_pos).reshape({m, 1}), di, pool_.pos());
  }
  s.positions.insert(s.positions.end(), new_pos.begin(), new_pos.end());
  trim_sequence(s);
}

int64_t PagedKvCache::pages_held(SeqId seq) const {
  int64_t pages = 0;
  for (const HeadTable& t : get(seq).tables) pages += static_cast<int64_t>(t.pages.size());
  return pages;
}

KvUsage PagedKvCache::usage(SeqId seq) const {
  KvUsage u;
  const Sequence& s = get(seq);
  for (int l = 0; l < layers_; ++l)
    for (int h = 0; h < heads_; ++h) {
      const HeadTable& t = s.tables[l * heads_ + h];
      int64_t tokens = 0;
      for (const auto& ps : t.positions) tokens += static_cast<int64_t>(ps.size());
      if (spec(l, h).cls == HeadClass::Global) {
        u.global_pages += static_cast<int64_t>(t.pages.size());
        u.global_tokens += tokens;
      } else {
        u.local_pages += static_cast<int64_t>(t.pages.size());
        u.local_tokens += tokens;
      }
    }
  return u;
}

KvUsage PagedKvCache::usage() const {
  KvUsage total;
  for (const auto& [id, s] : seqs_) {
    KvUsage u = usage(id);
    total.global_pages += u.global_pages;
    total.local_pages += u.local_pages;
    total.global_tokens += u.global_tokens;
    total.local_tokens += u.local_tokens;
  }
  return total;
}

int64_t ideal_session_bytes(const HeadProfile& profile, int64_t tokens, int32_t page_size,
                            int32_t head_dim, DType dtype) {
  return profile.pages_for(tokens, page_size) * PagePool::page_bytes(page_size, head_dim, dtype);
}

int64_t sessions_that_fit(const HeadProfile& profile, int64_t tokens, int64_t budget_bytes,
                          int32_t page_size, int32_t head_dim, DType dtype) {
  const int64_t per = ideal_session_bytes(profile, tokens, page_size, head_dim, dtype);
  return per > 0 ? budget_bytes / per : 0;
}

}  // namespace redknot
