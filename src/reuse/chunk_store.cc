#include "reuse/chunk_store.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <system_error>
#include <utility>

#include "core/batch.h"
#include "core/error.h"
#include "kv/device_util.h"
#include "reuse/hasher.h"

namespace redknot {
namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'R', 'K', 'V', 'C', 'H', 'N', 'K', '\0'};
constexpr uint32_t kVersion = 2;      // 2: rows as the pool stores them (FP8 KV rows with scales)
constexpr int64_t kFixedHeader = 48;  // magic .. len, see encode_header
constexpr int64_t kSampleBytes = 4096;
constexpr int32_t kMaxSegmentTokens = 1 << 26;  // sanity bound when parsing headers

template <typename T>
T get_at(const uint8_t* p, int64_t off) {
  T v;
  std::memcpy(&v, p + off, sizeof(T));
  return v;
}

std::string key_hex(uint64_t key) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, key);
  return buf;
}

// The parsed header of a spill file.
// The fields a spill file header and a remote manifest share, at the same offsets after their
// 8-byte magic: u32 version, u32 dtype, u64 model_fp, u64 key, u32 layers, kv_heads, head_dim, len.
struct SegmentGeometry {
  uint32_t version = 0, dtype = 0, layers = 0, kv_heads = 0, head_dim = 0, len = 0;
  uint64_t model_fp = 0, key = 0;
};
constexpr int64_t kGeometryEnd = 48;  // bytes: magic + the fields above
static_assert(kGeometryEnd == kFixedHeader, "a spill header is exactly magic + geometry");

// Reads the shared fields of `p` ([>= kGeometryEnd] bytes); false when the geometry cannot be a
// segment's (a corrupt or hostile header: no allocation is sized from it).
bool read_geometry(const uint8_t* p, SegmentGeometry& g) {
  g.version = get_at<uint32_t>(p, 8);
  g.dtype = get_at<uint32_t>(p, 12);
  g.model_fp = get_at<uint64_t>(p, 16);
  g.key = get_at<uint64_t>(p, 24);
  g.layers = get_at<uint32_t>(p, 32);
  g.kv_heads = get_at<uint32_t>(p, 36);
  g.head_dim = get_at<uint32_t>(p, 40);
  g.len = get_at<uint32_t>(p, 44);
  return g.len != 0 && g.len <= static_cast<uint32_t>(kMaxSegmentTokens) && g.layers != 0 &&
         g.layers <= 4096 && g.kv_heads != 0 && g.kv_heads <= 4096 && g.head_dim != 0 &&
         g.head_dim <= 65536;
}

struct FileHeader : SegmentGeometry {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> block_sums;
};

enum class HeaderStatus { Ok, Foreign, Bad };

// Reads and checks the header from an open file. Foreign: a valid file this store must leave
// alone (other model, dtype, geometry or version); Bad: not a readable spill file.
HeaderStatus read_header(int fd, FileHeader& h) {
  uint8_t fixed[kFixedHeader];
  if (pread(fd, fixed, kFixedHeader, 0) != kFixedHeader) return HeaderStatus::Bad;
  if (std::memcmp(fixed, kMagic, sizeof(kMagic)) != 0) return HeaderStatus::Bad;
  const bool plausible = read_geometry(fixed, h);
  if (h.version != kVersion) return HeaderStatus::Foreign;
  if (!plausible) return HeaderStatus::Bad;
  const int64_t blocks = int64_t{h.layers} * h.kv_heads;
  const int64_t rest = int64_t{h.len} * 4 + blocks * 8 + 8;
  std::vector<uint8_t> buf(kFixedHeader + rest);
  std::memcpy(buf.data(), fixed, kFixedHeader);
  if (pread(fd, buf.data() + kFixedHeader, rest, kFixedHeader) != rest) return HeaderStatus::Bad;
  const int64_t sum_off = kFixedHeader + rest - 8;
  if (XXH3_64bits(buf.data(), sum_off) != get_at<uint64_t>(buf.data(), sum_off))
    return HeaderStatus::Bad;
  h.tokens.resize(h.len);
  std::memcpy(h.tokens.data(), buf.data() + kFixedHeader, int64_t{h.len} * 4);
  h.block_sums.resize(blocks);
  std::memcpy(h.block_sums.data(), buf.data() + kFixedHeader + int64_t{h.len} * 4, blocks * 8);
  return HeaderStatus::Ok;
}

int64_t file_size(int fd) {
  const off_t end = lseek(fd, 0, SEEK_END);
  return end < 0 ? -1 : static_cast<int64_t>(end);
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

bool write_all(int fd, const uint8_t* p, int64_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, static_cast<size_t>(std::min<int64_t>(n, 1 << 30)));
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= w;
  }
  return true;
}

bool read_all(int fd, uint8_t* p, int64_t n, int64_t off) {
  while (n > 0) {
    const ssize_t r = pread(fd, p, static_cast<size_t>(std::min<int64_t>(n, 1 << 30)), off);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= r;
    off += r;
  }
  return true;
}

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

// Raw act-dtype bytes of a device tensor, on the host. Device tensors round-trip through f32,
// which is exact for f32/bf16/f16.
void device_bytes(Backend& backend, const Tensor& t, DType dtype, std::vector<uint8_t>& out) {
  out.resize(static_cast<size_t>(dtype_bytes(dtype, t.numel())));
  if (t.device() == Device::Host) {
    std::memcpy(out.data(), t.raw(), out.size());
    return;
  }
  Tensor f = backend.to_host_f32(t);
  convert_from_f32(f.data<float>(), dtype, out.data(), t.numel());
}

}  // namespace

const char* chunk_tier_name(ChunkTier t) {
  switch (t) {
    case ChunkTier::Pool:
      return "pool";
    case ChunkTier::Host:
      return "host";
    case ChunkTier::Disk:
      return "disk";
    case ChunkTier::Remote:
      return "remote";
    default:
      return "none";
  }
}

uint64_t model_fingerprint(const ModelConfig& cfg, const Checkpoint& ckpt) {
  Hasher h;
  h.str("redknot-model-fp-v2");
  h.str(cfg.canonical_string());  // every config field: a new one cannot leave old entries valid
  for (const auto& [name, t] : ckpt.tensors) {
    h.str(name);
    h.pod(static_cast<uint8_t>(t.dtype()));
    for (int64_t d : t.shape()) h.pod(d);
  }
  // Head placement reorders K/V heads (sampled weights below may miss the layers it moved); adds
  // nothing without one, so unplaced fingerprints are unchanged.
  for (const auto& row : ckpt.kv_head_perm)
    for (int32_t v : row) h.pod(v);
  // Weight bytes of a few tensors: two fine-tunes of one architecture differ here.
  const std::string last = "model.layers." + std::to_string(cfg.num_layers - 1);
  for (const std::string& name :
       {std::string("model.embed_tokens.weight"), std::string("lm_head.weight"),
        std::string("model.norm.weight"), std::string("model.layers.0.self_attn.q_proj.weight"),
        std::string("model.layers.0.self_attn.k_proj.weight"),
        std::string("model.layers.0.self_attn.v_proj.weight"), last + ".self_attn.k_proj.weight",
        last + ".mlp.down_proj.weight"}) {
    auto it = ckpt.tensors.find(name);
    if (it == ckpt.tensors.end() || it->second.raw() == nullptr ||
        it->second.device() != Device::Host)
      continue;
    const auto* p = static_cast<const uint8_t*>(it->second.raw());
    const int64_t n = it->second.nbytes();
    const int64_t head = std::min(n, kSampleBytes);
    h.str(name);
    h.bytes(p, head);
    if (n > head)
      h.bytes(p + n - std::min(n - head, kSampleBytes), std::min(n - head, kSampleBytes));
  }
  return h.digest();
}

uint64_t model_fingerprint(const ModelConfig& cfg, const Checkpoint& ckpt, DType kv_dtype) {
  const uint64_t base = model_fingerprint(cfg, ckpt);
  if (kv_dtype != DType::F8_E4M3) return base;
  Hasher h;
  h.pod(base);
  h.str("kv-f8_e4m3-row-scales");
  return h.digest();
}

uint64_t segment_key(uint64_t model_fp, std::span<const int32_t> tokens) {
  Hasher h;
  h.pod(model_fp);
  h.bytes(tokens.data(), tokens.size_bytes());
  return h.digest();
}

// ---- Handle ----

ChunkStore::Handle::Handle(Handle&& o) noexcept
    : store_(std::exchange(o.store_, nullptr)),
      entry_(std::exchange(o.entry_, nullptr)),
      source_(o.source_) {}

ChunkStore::Handle& ChunkStore::Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    reset();
    store_ = std::exchange(o.store_, nullptr);
    entry_ = std::exchange(o.entry_, nullptr);
    source_ = o.source_;
  }
  return *this;
}

void ChunkStore::Handle::reset() {
  if (store_ != nullptr && entry_ != nullptr) store_->unpin(entry_);
  store_ = nullptr;
  entry_ = nullptr;
}

ChunkTier ChunkStore::Handle::tier() const { return entry_ ? entry_->tier : ChunkTier::None; }
uint64_t ChunkStore::Handle::key() const {
  RK_CHECK(entry_, "empty chunk handle");
  return entry_->key;
}
const std::vector<int32_t>& ChunkStore::Handle::tokens() const {
  RK_CHECK(entry_, "empty chunk handle");
  return entry_->tokens;
}
int32_t ChunkStore::Handle::length() const {
  return entry_ ? static_cast<int32_t>(entry_->tokens.size()) : 0;
}
const std::vector<int32_t>& ChunkStore::Handle::rows(int layer, int kv_head) const {
  RK_CHECK(entry_ && entry_->tier == ChunkTier::Pool, "chunk rows need a pool entry");
  return entry_->rows.at(static_cast<size_t>(layer) * store_->kv_heads_ + kv_head);
}
const std::vector<std::vector<int32_t>>& ChunkStore::Handle::all_rows() const {
  RK_CHECK(entry_ && entry_->tier == ChunkTier::Pool, "chunk rows need a pool entry");
  return entry_->rows;
}
const std::vector<int32_t>& ChunkStore::Handle::positions() const {
  RK_CHECK(entry_ && entry_->tier == ChunkTier::Pool, "chunk positions need a pool entry");
  return entry_->positions;
}

bool ChunkStore::Handle::partial() const { return entry_ && entry_->partial; }
bool ChunkStore::Handle::covers(const ChunkRowNeed& need) const {
  return entry_ && store_->covers(*entry_, need);
}

ChunkRowNeed row_need(const PagedKvCache& dst, SeqId seq, int32_t dst_offset, int32_t len) {
  ChunkRowNeed need;
  const HeadProfile& prof = dst.profile();
  if (dst.keeps_local_pages(seq)) return need;
  bool any_partial = false;
  need.keep.resize(static_cast<size_t>(prof.num_layers()) * prof.num_kv_heads());
  for (int32_t l = 0; l < prof.num_layers(); ++l)
    for (int32_t h = 0; h < prof.num_kv_heads(); ++h) {
      const HeadSpec& hs = prof.at(l, h);
      std::pair<int32_t, int32_t> k{len, len};
      if (hs.is_local()) {
        // keeps(dst + i, dst + len): dst + i < sink, or i > len - window.
        const int64_t first = std::clamp<int64_t>(int64_t{hs.sink} - dst_offset, 0, len);
        const int64_t second = std::clamp<int64_t>(int64_t{len} - hs.window + 1, 0, len);
        if (first < second) {
          k = {static_cast<int32_t>(first), static_cast<int32_t>(second)};
          any_partial = true;
        }
      }
      need.keep[static_cast<size_t>(l) * prof.num_kv_heads() + h] = k;
    }
  if (!any_partial) need.keep.clear();
  return need;
}

// ---- construction ----

ChunkStore::ChunkStore(Model& model, PagePool& pool, ChunkStoreOptions options)
    : pool_(pool),
      backend_(pool.backend()),
      opts_(std::move(options)),
      layers_(static_cast<int32_t>(model.config().num_layers)),
      kv_heads_(static_cast<int32_t>(model.config().num_kv_heads)),
      head_dim_(static_cast<int32_t>(model.config().head_dim)),
      dtype_(pool.kv_dtype()),
      row_width_(pool.row_width()) {
  if (pool.head_dim() != head_dim_) throw Error("chunk store: pool head_dim does not match model");
  if (!pool.has_storage()) throw Error("chunk store: the page pool has no storage");
  if (opts_.pool_budget_bytes < 0 || opts_.host_budget_bytes < 0 || opts_.disk_budget_bytes < 0)
    throw Error("chunk store: budgets must be >= 0");
  if (opts_.key_bits < 1 || opts_.key_bits > 64) throw Error("chunk store: key_bits in [1, 64]");
  PagedKvOptions po;
  po.scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  cache_ =
      std::make_unique<PagedKvCache>(pool_, HeadProfile(layers_, kv_heads_), po, model.inv_freq());
  std::shared_ptr<RemoteKv> remote_wr;
  if (opts_.remote) {
    if (opts_.model_fp == 0)
      throw Error("chunk store: the remote tier needs a model fingerprint (model_fingerprint())");
    if (opts_.remote_admit < 1) throw Error("chunk store: remote_admit must be >= 1");
    if (opts_.remote_block_rows < 1) throw Error("chunk store: remote_block_rows must be >= 1");
    remote_rd_ = opts_.remote();
    remote_wr = opts_.remote();
    if (!remote_rd_ || !remote_wr)
      throw Error("chunk store: the remote factory returned no client");
  }
  if (opts_.disk_budget_bytes > 0) {
    if (opts_.disk_dir.empty()) throw Error("chunk store: the disk tier needs a directory");
    if (opts_.model_fp == 0)
      throw Error("chunk store: the disk tier needs a model fingerprint (model_fingerprint())");
    std::error_code ec;
    fs::create_directories(opts_.disk_dir, ec);
    if (ec || !fs::is_directory(opts_.disk_dir))
      throw Error(opts_.disk_dir + ": cannot create the chunk store directory: " + ec.message());
    scan_disk();
    if (opts_.write_through) writer_ = std::thread([this] { writer_loop(); });
  }
  // Last: nothing may throw once a thread runs (a half-built store would not join it).
  if (remote_wr) remote_writer_ = std::thread([this, remote_wr] { remote_loop(*remote_wr); });
}

ChunkStore::~ChunkStore() {
  if (remote_writer_.joinable()) {
    {
      std::lock_guard<std::mutex> r(r_mu_);
      r_stop_ = true;
    }
    r_cv_.notify_all();
    remote_writer_.join();  // after the queue is sent (a Redis that is down fails fast)
  }
  if (writer_.joinable()) {
    {
      std::lock_guard<std::mutex> q(q_mu_);
      stop_ = true;
    }
    q_cv_.notify_all();
    writer_.join();  // after the queue is drained: every queued file written and committed
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (opts_.disk_budget_bytes > 0 && opts_.flush_on_destroy) {
    try {
      flush_locked();
    } catch (...) {
      // Best effort: a failed flush only loses cache entries.
    }
  }
  {
    std::lock_guard<std::mutex> l(log_mu_);
    if (log_suppressed_ > 0)
      std::fprintf(stderr, "chunk store: %lld more disk-tier problems not shown\n",
                   static_cast<long long>(log_suppressed_));
  }
  for (Entry& e : entries_)
    if (e.pins > 0)
      std::fprintf(stderr, "chunk store: destroyed with a pinned entry (%s)\n",
                   key_hex(e.key).c_str());
  entries_.clear();
  cache_.reset();  // returns every page to the pool
}

// ---- geometry ----

int64_t ChunkStore::head_block_bytes(int32_t len) const {
  return 2 * dtype_bytes(dtype_, int64_t{len} * row_width_);
}
int64_t ChunkStore::payload_bytes(int32_t len) const {
  return int64_t{layers_} * kv_heads_ * head_block_bytes(len);
}
int64_t ChunkStore::pool_pages_for(int32_t len) const {
  const int32_t ps = pool_.page_size();
  return int64_t{layers_} * kv_heads_ * ((int64_t{len} + ps - 1) / ps);
}
int64_t ChunkStore::header_bytes(int32_t len) const {
  return kFixedHeader + int64_t{len} * 4 + int64_t{layers_} * kv_heads_ * 8 + 8;
}
std::string ChunkStore::file_path(uint64_t key) const {
  return (fs::path(opts_.disk_dir) / (key_hex(key) + ".rkv")).string();
}

// ---- index and policy ----

uint64_t ChunkStore::key_of(std::span<const int32_t> tokens) const {
  const uint64_t k = segment_key(opts_.model_fp, tokens);
  return opts_.key_bits >= 64 ? k : (k & ((uint64_t{1} << opts_.key_bits) - 1));
}

ChunkStore::Entry* ChunkStore::find(uint64_t key, std::span<const int32_t> tokens) {
  auto [lo, hi] = index_.equal_range(key);
  bool other = false;
  for (auto it = lo; it != hi; ++it) {
    Entry* e = it->second;
    if (std::equal(e->tokens.begin(), e->tokens.end(), tokens.begin(), tokens.end())) {
      if (!e->dead) return e;
    } else {
      other = true;
    }
  }
  if (other) ++stats_.collisions;
  return nullptr;
}

double ChunkStore::score_of(double accesses, uint64_t last_access) const {
  const double age = static_cast<double>(clock_ - std::min(clock_, last_access));
  return accesses / std::pow(1.0 + age, opts_.alpha);
}
double ChunkStore::score(const Entry& e) const { return score_of(e.accesses, e.last_access); }

void ChunkStore::touch(Entry& e) {
  e.accesses += 1;
  e.last_access = clock_;
}

double ChunkStore::take_ghost(uint64_t key) {
  auto it = ghosts_.find(key);
  if (it == ghosts_.end()) return 0;
  const double a = it->second.accesses;
  ghosts_.erase(it);
  return a;
}

void ChunkStore::remember(uint64_t key, double accesses, uint64_t last_access) {
  if (opts_.ghost_capacity <= 0) return;
  ghosts_[key] = Ghost{accesses, last_access};
  if (static_cast<int64_t>(ghosts_.size()) <= opts_.ghost_capacity) return;
  // Forget the older half (amortised O(1) per insertion).
  std::vector<uint64_t> times;
  times.reserve(ghosts_.size());
  for (const auto& [k, g] : ghosts_) times.push_back(g.last_access);
  auto mid = times.begin() + times.size() / 2;
  std::nth_element(times.begin(), mid, times.end());
  const uint64_t cut = *mid;
  std::erase_if(ghosts_, [&](const auto& kv) { return kv.second.last_access < cut; });
  if (static_cast<int64_t>(ghosts_.size()) > opts_.ghost_capacity) ghosts_.clear();
}

ChunkStore::Handle ChunkStore::make_handle(Entry& e, ChunkTier source) {
  ++e.pins;
  Handle h;
  h.store_ = this;
  h.entry_ = &e;
  h.source_ = source;
  return h;
}

void ChunkStore::unpin(Entry* e) {
  std::lock_guard<std::mutex> lock(mu_);
  if (--e->pins == 0 && e->dead) erase(*e, /*evicted=*/false);
}

ChunkStore::Entry* ChunkStore::victim(ChunkTier tier, double limit, bool disk_copy) {
  Entry* best = nullptr;
  double best_score = limit;
  for (Entry& e : entries_) {
    if (e.pins > 0 || e.dead) continue;
    if (disk_copy ? !e.on_disk : e.tier != tier) continue;
    const double s = score(e);
    // Ties: the least recently used goes first.
    if (s < best_score || (best && s == best_score && e.last_access < best->last_access)) {
      best = &e;
      best_score = s;
    }
  }
  return best;
}

// ---- tier moves ----

int64_t ChunkStore::reclaimable(ChunkTier tier, double limit, bool disk_copy) const {
  int64_t n = 0;
  for (const Entry& e : entries_) {
    if (e.pins > 0 || e.dead || score(e) >= limit) continue;
    if (disk_copy) {
      if (e.on_disk) n += e.file_bytes;
    } else if (e.tier == tier) {
      n += tier == ChunkTier::Pool ? e.pool_bytes : static_cast<int64_t>(e.blob.size());
    }
  }
  return n;
}

int64_t ChunkStore::unallocated_pending_pages() const {
  int64_t pages = 0;
  for (const Entry* e : pending_)
    pages += std::max<int64_t>(
        0, pool_pages_for(static_cast<int32_t>(e->tokens.size())) - cache_->pages_held(e->seq));
  return pages;
}

void ChunkStore::end_pending(Entry& e) {
  pending_.erase(std::remove(pending_.begin(), pending_.end(), &e), pending_.end());
  reserved_bytes_ -= e.reserved_bytes;
  e.reserved_bytes = 0;
}

bool ChunkStore::make_room_pool(int64_t pages, double limit) {
  const int64_t bytes = pages * pool_.bytes_per_page();
  if (bytes > opts_.pool_budget_bytes) return false;
  // Room already promised to pending prefills is not free.
  const int64_t held = pool_bytes_ + reserved_bytes_;
  const int64_t promised = unallocated_pending_pages();
  // Demote nothing unless the eligible victims can make enough room.
  const int64_t free_bytes = reclaimable(ChunkTier::Pool, limit, false);
  if (held - free_bytes + bytes > opts_.pool_budget_bytes ||
      pool_.num_free() - promised + free_bytes / pool_.bytes_per_page() < pages)
    return false;
  while (pool_bytes_ + reserved_bytes_ + bytes > opts_.pool_budget_bytes ||
         pool_.num_free() - promised < pages) {
    Entry* v = victim(ChunkTier::Pool, limit, false);
    if (v == nullptr) return false;
    demote_from_pool(*v);
  }
  return true;
}

bool ChunkStore::make_room_host(int64_t bytes, double limit) {
  if (bytes > opts_.host_budget_bytes ||
      host_bytes_ - reclaimable(ChunkTier::Host, limit, false) + bytes > opts_.host_budget_bytes)
    return false;
  while (host_bytes_ + bytes > opts_.host_budget_bytes) {
    Entry* v = victim(ChunkTier::Host, limit, false);
    if (v == nullptr) return false;
    std::vector<uint8_t> blob = std::move(v->blob);
    v->blob = {};
    host_bytes_ -= static_cast<int64_t>(blob.size());
    v->tier = ChunkTier::None;
    place_on_disk(*v, blob);
  }
  return true;
}

bool ChunkStore::make_room_disk(int64_t bytes, double limit) {
  if (bytes > opts_.disk_budget_bytes ||
      disk_bytes_ - reclaimable(ChunkTier::None, limit, true) + bytes > opts_.disk_budget_bytes)
    return false;
  while (disk_bytes_ + bytes > opts_.disk_budget_bytes) {
    Entry* v = victim(ChunkTier::None, limit, true);
    if (v == nullptr) return false;
    drop_disk_copy(*v);
    if (v->tier == ChunkTier::Disk) erase(*v, /*evicted=*/true);
  }
  return true;
}

void ChunkStore::demote_from_pool(Entry& e) {
  if (e.partial) {  // its missing rows cannot be serialized; the remote still has it
    erase(e, /*evicted=*/true);
    return;
  }
  std::vector<uint8_t> blob = serialize_pool(e);
  release_pool(e);
  place_in_host(e, std::move(blob));
}

void ChunkStore::place_in_host(Entry& e, std::vector<uint8_t> blob) {
  const int64_t n = static_cast<int64_t>(blob.size());
  if (opts_.host_budget_bytes > 0 && make_room_host(n, score(e))) {
    e.blob = std::move(blob);
    e.tier = ChunkTier::Host;
    host_bytes_ += n;
    ++stats_.demotions_to_host;
    return;
  }
  place_on_disk(e, blob);
}

void ChunkStore::place_on_disk(Entry& e, const std::vector<uint8_t>& blob) {
  // Its write-through is queued or running: that file is the copy (one write, as before).
  if (e.job) finish_write(e.job);
  if (e.on_disk) {  // a clean copy is already there
    e.tier = ChunkTier::Disk;
    ++stats_.demotions_to_disk;
    return;
  }
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  if (opts_.disk_budget_bytes > 0 &&
      make_room_disk(header_bytes(len) + payload_bytes(len), score(e)) && write_file(e, blob)) {
    e.tier = ChunkTier::Disk;
    ++stats_.demotions_to_disk;
    return;
  }
  erase(e, /*evicted=*/true);
}

void ChunkStore::drop_disk_copy(Entry& e) {
  if (!e.on_disk) return;
  std::error_code ec;
  fs::remove(file_path(e.key), ec);
  if (ec) log_disk(file_path(e.key), "cannot delete: " + ec.message());
  disk_bytes_ -= e.file_bytes;
  e.on_disk = false;
  e.file_bytes = 0;
  e.block_sums.clear();
}

void ChunkStore::erase(Entry& e, bool evicted) {
  clear_persist(e);
  cancel_write(e);
  if (e.tier == ChunkTier::Pool) release_pool(e);
  if (e.tier == ChunkTier::Host) host_bytes_ -= static_cast<int64_t>(e.blob.size());
  drop_disk_copy(e);
  if (evicted) ++stats_.evictions;
  remember(e.key, e.accesses, e.last_access);
  auto [lo, hi] = index_.equal_range(e.key);
  for (auto it = lo; it != hi; ++it)
    if (it->second == &e) {
      index_.erase(it);
      break;
    }
  entries_.erase(e.self);
}

void ChunkStore::release_pool(Entry& e) {
  if (e.seq >= 0) cache_->remove_sequence(e.seq);
  pool_bytes_ -= e.pool_bytes;
  e.seq = -1;
  e.pool_bytes = 0;
  e.rows.clear();
  e.positions.clear();
  e.tier = ChunkTier::None;
}

void ChunkStore::set_pool_rows(Entry& e, SeqId seq) {
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  e.seq = seq;
  e.rows.resize(static_cast<size_t>(layers_) * kv_heads_);
  for (int l = 0; l < layers_; ++l)
    for (int h = 0; h < kv_heads_; ++h)
      e.rows[static_cast<size_t>(l) * kv_heads_ + h] = cache_->slot_rows(seq, l, h);
  e.positions.resize(len);
  for (int32_t i = 0; i < len; ++i) e.positions[i] = i;
  e.pool_bytes = pool_pages_for(len) * pool_.bytes_per_page();
  pool_bytes_ += e.pool_bytes;
  e.tier = ChunkTier::Pool;
}

std::vector<uint8_t> ChunkStore::serialize_pool(const Entry& e) {
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  const int64_t rb = dtype_bytes(dtype_, row_width_), hb = head_block_bytes(len);
  std::vector<uint8_t> blob(static_cast<size_t>(payload_bytes(len)));
  std::vector<uint8_t> kb, vb;
  for (int l = 0; l < layers_; ++l) {
    // One gather per layer for all heads: rows of head h are [h * len, (h + 1) * len).
    std::vector<int32_t> idx;
    idx.reserve(static_cast<size_t>(kv_heads_) * len);
    for (int h = 0; h < kv_heads_; ++h) {
      const auto& r = e.rows[static_cast<size_t>(l) * kv_heads_ + h];
      idx.insert(idx.end(), r.begin(), r.end());
    }
    const int64_t n = static_cast<int64_t>(idx.size());
    Tensor di = upload_i32(backend_, idx);
    Tensor kd = backend_.alloc(dtype_, {n, row_width_});  // [kv_heads * len, head_dim]
    Tensor vd = backend_.alloc(dtype_, {n, row_width_});
    backend_.gather_rows(pool_.k(), di, kd);
    backend_.gather_rows(pool_.v(), di, vd);
    device_bytes(backend_, kd, dtype_, kb);
    device_bytes(backend_, vd, dtype_, vb);
    for (int h = 0; h < kv_heads_; ++h) {
      uint8_t* dst = blob.data() + (int64_t{l} * kv_heads_ + h) * hb;
      std::memcpy(dst, kb.data() + int64_t{h} * len * rb, len * rb);
      std::memcpy(dst + len * rb, vb.data() + int64_t{h} * len * rb, len * rb);
    }
  }
  return blob;
}

bool ChunkStore::load_into_pool(Entry& e, const std::vector<uint8_t>& blob) {
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  const int64_t rb = dtype_bytes(dtype_, row_width_), hb = head_block_bytes(len);
  RK_CHECK(static_cast<int64_t>(blob.size()) == payload_bytes(len), "chunk blob size");
  const SeqId seq = next_seq_++;
  cache_->add_sequence(seq);
  // The cache's own write path assigns the pages and positions 0..len-1, as a prefill would.
  Batch b;
  b.add_sequence(seq, e.tokens, 0, /*last_logits=*/false);
  std::vector<int32_t> pos(len);
  for (int32_t i = 0; i < len; ++i) pos[i] = i;
  try {
    cache_->begin_forward(b, upload_i32(backend_, pos));
  } catch (const OutOfKvMemory&) {
    cache_->remove_sequence(seq);
    return false;
  }
  try {
    Tensor kh = Tensor::host(dtype_, {len, kv_heads_, row_width_});
    Tensor vh = Tensor::host(dtype_, {len, kv_heads_, row_width_});
    Tensor kd = backend_.alloc(dtype_, {len, kv_heads_, row_width_});
    Tensor vd = backend_.alloc(dtype_, {len, kv_heads_, row_width_});
    auto* kp = static_cast<uint8_t*>(kh.raw());
    auto* vp = static_cast<uint8_t*>(vh.raw());
    for (int l = 0; l < layers_; ++l) {
      for (int h = 0; h < kv_heads_; ++h) {
        const uint8_t* src = blob.data() + (int64_t{l} * kv_heads_ + h) * hb;
        for (int32_t t = 0; t < len; ++t) {
          const int64_t dst = (int64_t{t} * kv_heads_ + h) * rb;
          std::memcpy(kp + dst, src + t * rb, rb);
          std::memcpy(vp + dst, src + (int64_t{len} + t) * rb, rb);
        }
      }
      backend_.copy_from_host(kd, kh);
      backend_.copy_from_host(vd, vh);
      cache_->write(l, kd, vd);
    }
    cache_->end_forward();
  } catch (...) {
    cache_->end_forward();
    cache_->remove_sequence(seq);
    throw;
  }
  set_pool_rows(e, seq);
  return true;
}

// ---- public API ----

ChunkStore::Handle ChunkStore::acquire(std::span<const int32_t> tokens, const ChunkRowNeed* need) {
  std::lock_guard<std::mutex> lock(mu_);
  Handle h = acquire_locked(tokens, need);
  persist_locked();  // retries what a full write queue skipped
  return h;
}

ChunkStore::Handle ChunkStore::acquire_locked(std::span<const int32_t> tokens,
                                              const ChunkRowNeed* need) {
  if (tokens.empty()) return {};
  ++clock_;
  const uint64_t key = key_of(tokens);
  Entry* e = find(key, tokens);
  if (e != nullptr && e->partial && !covers(*e, need ? *need : ChunkRowNeed{})) {
    // Fetched for a destination that keeps fewer rows: fetch again for this one (below), unless
    // a request still reads it (then a miss: recomputed privately).
    if (e->pins > 0) {
      touch(*e);
      ++stats_.misses;
      return {};
    }
    erase(*e, /*evicted=*/false);  // its accesses go to the ghost history
    e = nullptr;
  }
  if (e != nullptr) {
    touch(*e);
    const ChunkTier source = e->tier;
    if (source == ChunkTier::Pool) {
      ++stats_.pool_hits;
      Handle h = make_handle(*e, source);
      // Kept off disk earlier by the disk policy: hotter now, it may get in.
      if (!e->on_disk && !e->job && !e->persist) want_persist(*e);
      want_remote(*e);
      return h;
    }
    ++e->pins;  // so that making room below cannot move it
    std::optional<std::vector<uint8_t>> disk_blob;
    if (source == ChunkTier::Disk) disk_blob = read_file(*e);
    if (source == ChunkTier::Host || disk_blob) {
      bool ok = false;
      try {
        ok = make_room_pool(pool_pages_for(static_cast<int32_t>(e->tokens.size())), score(*e)) &&
             load_into_pool(*e, source == ChunkTier::Host ? e->blob : *disk_blob);
      } catch (...) {
        --e->pins;
        throw;
      }
      --e->pins;
      if (!ok) {
        ++stats_.bypasses;
        return {};
      }
      Handle h = make_handle(*e, source);
      ++stats_.promotions;
      if (source == ChunkTier::Host) {
        host_bytes_ -= static_cast<int64_t>(e->blob.size());
        std::vector<uint8_t> blob = std::move(e->blob);
        e->blob = {};
        ++stats_.host_hits;
        want_remote(*e, &blob);
        want_persist(*e, &blob);  // its serialization is at hand: no gather
      } else {
        ++stats_.disk_hits;
        want_remote(*e, &*disk_blob);
      }
      return h;
    }
    // The disk copy was corrupt (deleted and counted): recompute it as a miss, keeping its
    // access count (through the ghost history) but not counting this access twice.
    e->accesses -= 1;
    if (--e->pins == 0)
      erase(*e, /*evicted=*/false);
    else
      remember(key, e->accesses, e->last_access);
  }
  if (remote_rd_) {
    if (Handle h = fetch_remote(key, tokens, need)) return h;
  }
  ++stats_.misses;
  remember(key, take_ghost(key) + 1, clock_);
  return {};
}

ChunkStore::Pending ChunkStore::reserve(std::span<const int32_t> tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  if (tokens.empty()) throw Error("chunk store: cannot reserve an empty segment");
  const uint64_t key = key_of(tokens);
  const int32_t len = static_cast<int32_t>(tokens.size());
  Entry& e = entries_.emplace_back();
  e.self = std::prev(entries_.end());
  e.key = key;
  e.tokens.assign(tokens.begin(), tokens.end());
  // acquire() remembered this access in the ghost history.
  e.accesses = std::max(1.0, take_ghost(key));
  e.last_access = clock_;
  e.pins = 1;  // not a victim of its own room making
  e.pending = true;
  bool admitted = false;
  try {
    admitted = make_room_pool(pool_pages_for(len), score(e));
  } catch (...) {
    e.pins = 0;
    erase(e, false);
    throw;
  }
  if (!admitted) {
    ++stats_.bypasses;
    // A private prefill still needs its pages beside the ones pending prefills will take (an
    // admitted one had them checked by make_room_pool).
    const int64_t free = pool_.num_free() - unallocated_pending_pages();
    if (free < pool_pages_for(len)) {
      e.pins = 0;
      erase(e, false);
      throw OutOfKvMemory("chunk store: a segment of " + std::to_string(len) + " tokens needs " +
                          std::to_string(pool_pages_for(len)) + " pages, " + std::to_string(free) +
                          " free (pending prefills' pages counted as used)");
    }
  }
  e.seq = next_seq_++;
  cache_->add_sequence(e.seq);
  pending_.push_back(&e);
  if (admitted) {
    e.reserved_bytes = pool_pages_for(len) * pool_.bytes_per_page();
    reserved_bytes_ += e.reserved_bytes;
  }
  Pending p;
  p.store_ = this;
  p.entry_ = &e;
  p.admitted_ = admitted;
  return p;
}

ChunkStore::Handle ChunkStore::publish(Pending pending) {
  RK_CHECK(pending.ok() && pending.store_ == this, "chunk store: publish of a foreign prefill");
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = *std::exchange(pending.entry_, nullptr);
  const SeqId seq = e.seq;
  RK_CHECK(cache_->num_tokens(seq) == static_cast<int32_t>(e.tokens.size()),
           "chunk store: a published segment must hold exactly its tokens");
  end_pending(e);  // its pages are now allocated and counted as the entry's
  e.pending = false;
  set_pool_rows(e, seq);
  e.pins = 0;
  // Two requests that missed the same segment at once both computed it: the first published
  // stays the entry, the second serves its own request only (no duplicate in the index).
  if (pending.admitted_ && find(e.key, e.tokens) != nullptr) pending.admitted_ = false;
  if (pending.admitted_) {
    index_.emplace(e.key, &e);
    ++stats_.prefills;
  } else {
    e.dead = true;  // served to the request that computed it, dropped when it lets go
    ++stats_.private_prefills;
  }
  Handle h = make_handle(e, ChunkTier::None);
  if (pending.admitted_) {
    if (remote_rd_ && e.accesses >= opts_.remote_admit && writer_.joinable()) {
      // One gather for both writers.
      std::vector<uint8_t> blob = serialize_pool(e);
      want_remote(e, &blob);
      want_persist(e, &blob);
    } else {
      want_remote(e);
      want_persist(e);
    }
  }
  persist_locked();
  return h;
}

void ChunkStore::Pending::reset() {
  if (!entry_) return;
  std::lock_guard<std::mutex> lock(store_->mu_);
  Entry& e = *std::exchange(entry_, nullptr);
  store_->end_pending(e);
  if (e.seq >= 0) store_->cache_->remove_sequence(e.seq);
  e.seq = -1;
  e.pins = 0;
  store_->erase(e, /*evicted=*/false);
}

ChunkStore::Pending::Pending(Pending&& o) noexcept
    : store_(o.store_), entry_(std::exchange(o.entry_, nullptr)), admitted_(o.admitted_) {}

ChunkStore::Pending& ChunkStore::Pending::operator=(Pending&& o) noexcept {
  if (this != &o) {
    reset();
    store_ = o.store_;
    entry_ = std::exchange(o.entry_, nullptr);
    admitted_ = o.admitted_;
  }
  return *this;
}

SeqId ChunkStore::Pending::seq() const {
  RK_CHECK(entry_, "empty pending prefill");
  return entry_->seq;
}

const std::vector<int32_t>& ChunkStore::Pending::tokens() const {
  RK_CHECK(entry_, "empty pending prefill");
  return entry_->tokens;
}

bool ChunkStore::yield_pages(int64_t pages) {
  std::lock_guard<std::mutex> lock(mu_);
  while (pool_.num_free() < pages) {
    Entry* v = victim(ChunkTier::Pool, std::numeric_limits<double>::infinity(), false);
    if (v == nullptr) return false;
    demote_from_pool(*v);
  }
  return true;
}

bool ChunkStore::cached(std::span<const int32_t> tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  return !tokens.empty() && find(key_of(tokens), tokens) != nullptr;
}

ChunkStore::Handle ChunkStore::lookup(std::span<const int32_t> tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  if (tokens.empty()) return {};
  ++clock_;
  const uint64_t key = key_of(tokens);
  Entry* e = find(key, tokens);
  if (e == nullptr) {
    ++stats_.misses;
    remember(key, take_ghost(key) + 1, clock_);
    return {};
  }
  touch(*e);
  if (e->tier == ChunkTier::Pool) ++stats_.pool_hits;
  if (e->tier == ChunkTier::Host) ++stats_.host_hits;
  if (e->tier == ChunkTier::Disk) ++stats_.disk_hits;
  return make_handle(*e, e->tier);
}

std::optional<ChunkHeadRows> ChunkStore::read_head_rows(const Handle& handle, int layer,
                                                        int kv_head, int32_t token_begin,
                                                        int32_t token_end) {
  std::lock_guard<std::mutex> lock(mu_);
  RK_CHECK(handle.ok() && handle.store_ == this, "read_head_rows needs a handle of this store");
  Entry& e = *handle.entry_;
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  if (e.partial && layer >= 0 && layer < layers_ && kv_head >= 0 && kv_head < kv_heads_) {
    const auto [first, second] = e.have[static_cast<size_t>(layer) * kv_heads_ + kv_head];
    if (first < second && token_begin < second && token_end > first)
      throw Error("read_head_rows: rows [" + std::to_string(token_begin) + ", " +
                  std::to_string(token_end) +
                  ") of a partial remote entry were not fetched (layer " + std::to_string(layer) +
                  ", head " + std::to_string(kv_head) + ")");
  }
  if (layer < 0 || layer >= layers_ || kv_head < 0 || kv_head >= kv_heads_ || token_begin < 0 ||
      token_end > len || token_begin > token_end)
    throw Error("read_head_rows: (layer " + std::to_string(layer) + ", head " +
                std::to_string(kv_head) + ", tokens [" + std::to_string(token_begin) + ", " +
                std::to_string(token_end) + ")) out of range for a segment of " +
                std::to_string(len) + " tokens");
  const int64_t n = token_end - token_begin, rb = dtype_bytes(dtype_, row_width_);
  ChunkHeadRows out{Tensor::host(dtype_, {n, row_width_}), Tensor::host(dtype_, {n, row_width_})};
  const size_t block = static_cast<size_t>(layer) * kv_heads_ + kv_head;
  auto from_block = [&](const uint8_t* blk) {
    std::memcpy(out.k.raw(), blk + token_begin * rb, n * rb);
    std::memcpy(out.v.raw(), blk + (int64_t{len} + token_begin) * rb, n * rb);
  };
  switch (e.tier) {
    case ChunkTier::Pool: {
      if (n == 0) break;
      const auto& r = e.rows[block];
      Tensor di = upload_i32(backend_,
                             std::vector<int32_t>(r.begin() + token_begin, r.begin() + token_end));
      std::vector<uint8_t> bytes;
      for (auto [src, dst] : {std::pair{&pool_.k(), &out.k}, std::pair{&pool_.v(), &out.v}}) {
        Tensor t = backend_.alloc(dtype_, {n, row_width_});
        backend_.gather_rows(*src, di, t);
        device_bytes(backend_, t, dtype_, bytes);
        std::memcpy(dst->raw(), bytes.data(), bytes.size());
      }
      break;
    }
    case ChunkTier::Host:
      from_block(e.blob.data() + block * head_block_bytes(len));
      break;
    case ChunkTier::Disk: {
      const int64_t hb = head_block_bytes(len);
      std::vector<uint8_t> buf(static_cast<size_t>(hb));
      Fd fd(open(file_path(e.key).c_str(), O_RDONLY | O_CLOEXEC));
      const std::string where =
          " block (layer " + std::to_string(layer) + ", head " + std::to_string(kv_head) + ")";
      std::string what;
      if (fd.get() < 0)
        what = "unreadable spill file, dropped: cannot open: " + errno_text(errno);
      else if (block >= e.block_sums.size() ||
               !read_all(fd.get(), buf.data(), hb, header_bytes(len) + block * hb))
        what = "corrupt spill file, deleted: short read of" + where;
      else if (XXH3_64bits(buf.data(), hb) != e.block_sums[block])
        what = "corrupt spill file, deleted: checksum mismatch in" + where;
      if (!what.empty()) {
        mark_corrupt(e, what);
        return std::nullopt;
      }
      from_block(buf.data());
      break;
    }
    default:  // its disk data proved corrupt earlier
      return std::nullopt;
  }
  return out;
}

void ChunkStore::flush_to_disk() {
  std::lock_guard<std::mutex> lock(mu_);
  flush_locked();
}

void ChunkStore::flush_locked() {
  if (opts_.disk_budget_bytes <= 0) return;
  std::vector<Entry*> todo;
  for (Entry& e : entries_)
    if (!e.on_disk && !e.dead && !e.partial &&
        (e.tier == ChunkTier::Pool || e.tier == ChunkTier::Host))
      todo.push_back(&e);
  std::stable_sort(todo.begin(), todo.end(),
                   [&](Entry* a, Entry* b) { return score(*a) > score(*b); });
  for (Entry* e : todo) {
    if (e->job) finish_write(e->job);  // its write-through is the copy
    if (e->on_disk) continue;
    const int32_t len = static_cast<int32_t>(e->tokens.size());
    ++e->pins;  // room making must not drop the entry being written
    if (make_room_disk(header_bytes(len) + payload_bytes(len), score(*e))) {
      if (e->tier == ChunkTier::Host)
        write_file(*e, e->blob);
      else
        write_file(*e, serialize_pool(*e));
    }
    --e->pins;
  }
}

ChunkStoreStats ChunkStore::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  ChunkStoreStats s = stats_;
  for (const Entry& e : entries_) {
    if (e.tier == ChunkTier::Pool) ++s.pool.entries;
    if (e.tier == ChunkTier::Host) ++s.host.entries;
    if (e.on_disk) ++s.disk.entries;
  }
  s.pool.bytes = pool_bytes_;
  s.host.bytes = host_bytes_;
  s.disk.bytes = disk_bytes_;
  {
    std::lock_guard<std::mutex> q(q_mu_);
    s.write_queue_bytes = queued_bytes_;
  }
  std::lock_guard<std::mutex> r(r_mu_);
  s.remote_queue_bytes = r_queued_bytes_;
  return s;
}

// ---- write-through ----

int ChunkStore::persist_new() {
  std::lock_guard<std::mutex> lock(mu_);
  return persist_locked();
}

void ChunkStore::sync_writes() {
  {
    std::unique_lock<std::mutex> q(q_mu_);
    done_cv_.wait(q, [&] { return outstanding_ == 0; });
  }
  std::unique_lock<std::mutex> r(r_mu_);
  r_done_cv_.wait(r, [&] { return r_queued_bytes_ == 0; });
}

void ChunkStore::want_persist(Entry& e, std::vector<uint8_t>* blob) {
  if (!writer_.joinable() || e.on_disk || e.job || e.dead || e.partial) return;
  if (!e.persist) {
    e.persist = true;
    ++persist_backlog_;
  }
  const Enqueue r = enqueue_write(e, blob);
  if (r == Enqueue::Full || r == Enqueue::Busy) ++stats_.write_deferrals;
}

void ChunkStore::clear_persist(Entry& e) {
  if (!e.persist) return;
  e.persist = false;
  --persist_backlog_;
}

int ChunkStore::persist_locked() {
  if (persist_backlog_ == 0) return 0;
  {
    std::lock_guard<std::mutex> q(q_mu_);
    if (queued_bytes_ > 0 && queued_bytes_ >= opts_.write_queue_bytes) return 0;
  }
  std::vector<Entry*> todo;
  for (Entry& e : entries_)
    if (e.persist) todo.push_back(&e);
  std::stable_sort(todo.begin(), todo.end(),
                   [&](Entry* a, Entry* b) { return score(*a) > score(*b); });
  // Room making below erases only entries with a disk copy, never these.
  int n = 0;
  for (Entry* e : todo) {
    const Enqueue r = enqueue_write(*e, nullptr);
    if (r == Enqueue::Full) break;
    n += r == Enqueue::Queued;
  }
  return n;
}

ChunkStore::Enqueue ChunkStore::enqueue_write(Entry& e, std::vector<uint8_t>* blob) {
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  const int64_t payload = payload_bytes(len), bytes = header_bytes(len) + payload;
  if (e.tier != ChunkTier::Pool && e.tier != ChunkTier::Host) {
    clear_persist(e);
    return Enqueue::Refused;
  }
  {
    std::lock_guard<std::mutex> q(q_mu_);
    if (queued_bytes_ > 0 && queued_bytes_ + payload > opts_.write_queue_bytes)
      return Enqueue::Full;
  }
  if (jobs_by_key_.count(e.key) != 0) return Enqueue::Busy;
  // Another segment with the same key owns the file name (collisions are rare): as write_file.
  std::vector<Entry*> same;
  auto [lo, hi] = index_.equal_range(e.key);
  for (auto it = lo; it != hi; ++it)
    if (it->second != &e && it->second->on_disk) same.push_back(it->second);
  for (Entry* o : same)
    if (o->pins > 0 && o->tier == ChunkTier::Disk) {
      clear_persist(e);
      return Enqueue::Refused;
    }
  // The disk policy of a demotion: only colder files make room.
  if (!make_room_disk(bytes, score(e))) {
    clear_persist(e);
    return Enqueue::Refused;
  }
  for (Entry* o : same) {
    drop_disk_copy(*o);
    if (o->tier == ChunkTier::Disk) erase(*o, /*evicted=*/true);
  }
  auto job = std::make_shared<WriteJob>();
  try {
    if (blob != nullptr)
      job->blob = std::move(*blob);
    else
      job->blob = e.tier == ChunkTier::Host ? e.blob : serialize_pool(e);
  } catch (const std::exception& ex) {
    log_disk(file_path(e.key), std::string("cannot serialize for write-through: ") + ex.what());
    clear_persist(e);
    return Enqueue::Refused;
  }
  RK_CHECK(static_cast<int64_t>(job->blob.size()) == payload, "chunk blob size");
  job->entry = &e;
  job->key = e.key;
  job->tokens = e.tokens;
  job->bytes = bytes;
  job->queued = payload;
  job->path = file_path(e.key);
  job->tmp = job->path + ".tmp." + std::to_string(getpid()) + "." + std::to_string(tmp_counter_++);
  disk_bytes_ += bytes;  // reserved now: the budget holds while the file is being written
  jobs_by_key_[e.key] = job;
  e.job = job;
  clear_persist(e);
  {
    std::lock_guard<std::mutex> q(q_mu_);
    queue_.push_back(job);
    queued_bytes_ += job->queued;
    ++outstanding_;
  }
  q_cv_.notify_one();
  return Enqueue::Queued;
}

void ChunkStore::run_write(WriteJob& job) const {
  try {
    const int32_t len = static_cast<int32_t>(job.tokens.size());
    const int64_t hb = head_block_bytes(len);
    job.sums.resize(static_cast<size_t>(layers_) * kv_heads_);
    for (size_t b = 0; b < job.sums.size(); ++b)
      job.sums[b] = XXH3_64bits(job.blob.data() + b * hb, hb);
    const std::vector<uint8_t> header = encode_header(job.key, job.tokens, job.sums);
    job.error = write_spill(job.path, job.tmp, header, job.blob);
  } catch (const std::exception& ex) {
    job.error = std::string("write failed: ") + ex.what();
  }
  job.ok = job.error.empty();
  std::vector<uint8_t>().swap(job.blob);  // the queue's bytes are free now
}

void ChunkStore::writer_loop() {
  for (;;) {
    std::shared_ptr<WriteJob> job;
    {
      std::unique_lock<std::mutex> q(q_mu_);
      q_cv_.wait(q, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopped and drained
      job = std::move(queue_.front());
      queue_.pop_front();
      job->state = WriteJob::State::Running;
    }
    if (opts_.before_write) opts_.before_write();
    run_write(*job);
    {
      std::lock_guard<std::mutex> q(q_mu_);
      job->state = WriteJob::State::Done;
      queued_bytes_ -= job->queued;
    }
    done_cv_.notify_all();
    std::lock_guard<std::mutex> lock(mu_);
    commit(*job);
  }
}

void ChunkStore::finish_write(std::shared_ptr<WriteJob> job) {
  bool here = false;
  {
    std::unique_lock<std::mutex> q(q_mu_);
    if (job->state == WriteJob::State::Queued) {
      queue_.erase(std::find(queue_.begin(), queue_.end(), job));
      job->state = WriteJob::State::Running;
      here = true;
    } else {
      // The writer needs only q_mu_ to get to Done: waiting here under mu_ cannot deadlock.
      done_cv_.wait(q, [&] { return job->state == WriteJob::State::Done; });
    }
  }
  if (here) {
    run_write(*job);
    std::lock_guard<std::mutex> q(q_mu_);
    job->state = WriteJob::State::Done;
    queued_bytes_ -= job->queued;
  }
  commit(*job);
}

void ChunkStore::cancel_write(Entry& e) {
  if (!e.job) return;
  std::shared_ptr<WriteJob> job = std::move(e.job);
  job->entry = nullptr;
  {
    std::lock_guard<std::mutex> q(q_mu_);
    if (job->state != WriteJob::State::Queued) return;  // commit() deletes the file it makes
    queue_.erase(std::find(queue_.begin(), queue_.end(), job));
    queued_bytes_ -= job->queued;
    job->state = WriteJob::State::Done;
  }
  job->dequeued = true;
  commit(*job);
}

void ChunkStore::commit(WriteJob& job) {
  if (job.committed) return;
  job.committed = true;
  if (auto it = jobs_by_key_.find(job.key); it != jobs_by_key_.end() && it->second.get() == &job)
    jobs_by_key_.erase(it);
  disk_bytes_ -= job.bytes;  // the reservation; a kept file is counted again below
  Entry* e = job.entry;
  if (job.dequeued) {
    // Cancelled before it ran: no file.
  } else if (!job.ok) {
    ++stats_.write_errors;
    log_disk(job.path, job.error);
    if (e != nullptr) e->job.reset();  // stays memory-only; demotion or flush may try again
  } else if (e == nullptr) {
    std::error_code ec;  // its entry was dropped while the file was being written
    fs::remove(job.path, ec);
  } else {
    e->job.reset();
    e->on_disk = true;
    e->file_bytes = job.bytes;
    e->block_sums = std::move(job.sums);
    disk_bytes_ += job.bytes;
    ++stats_.disk_writes;
  }
  {
    std::lock_guard<std::mutex> q(q_mu_);
    --outstanding_;
  }
  done_cv_.notify_all();
}

void ChunkStore::log_disk(const std::string& path, const std::string& what) {
  std::lock_guard<std::mutex> l(log_mu_);
  const auto now = std::chrono::steady_clock::now();
  if (now - log_window_ >= std::chrono::minutes(1)) {
    if (log_suppressed_ > 0)
      std::fprintf(stderr, "chunk store: %lld more disk-tier problems in the last minute\n",
                   static_cast<long long>(log_suppressed_));
    log_window_ = now;
    log_lines_ = 0;
    log_suppressed_ = 0;
  }
  if (log_lines_ < opts_.log_lines_per_minute) {
    ++log_lines_;
    std::fprintf(stderr, "chunk store: %s: %s\n", path.c_str(), what.c_str());
  } else {
    ++log_suppressed_;
  }
}

// ---- disk format ----
// Header (host byte order): magic[8] "RKVCHNK\0", u32 version, u32 dtype, u64 model_fp, u64 key,
// u32 layers, u32 kv_heads, u32 head_dim, u32 len, i32 tokens[len], u64 block_sums[layers *
// kv_heads] (XXH3 of each head's K|V block), u64 XXH3 of all the preceding header bytes.
// Then the payload (the host blob). The file size must be exactly header + payload.

std::vector<uint8_t> ChunkStore::encode_header(uint64_t key, std::span<const int32_t> tokens,
                                               const std::vector<uint64_t>& sums) const {
  const int32_t len = static_cast<int32_t>(tokens.size());
  std::vector<uint8_t> h(static_cast<size_t>(header_bytes(len)));
  size_t off = 0;
  auto put_bytes = [&](const void* p, size_t n) {
    std::memcpy(h.data() + off, p, n);
    off += n;
  };
  auto put32 = [&](uint32_t v) { put_bytes(&v, 4); };
  put_bytes(kMagic, sizeof(kMagic));
  put32(kVersion);
  put32(static_cast<uint32_t>(dtype_));
  put_bytes(&opts_.model_fp, 8);
  put_bytes(&key, 8);
  put32(static_cast<uint32_t>(layers_));
  put32(static_cast<uint32_t>(kv_heads_));
  put32(static_cast<uint32_t>(head_dim_));
  put32(static_cast<uint32_t>(len));
  put_bytes(tokens.data(), tokens.size() * 4);
  put_bytes(sums.data(), sums.size() * 8);
  const uint64_t sum = XXH3_64bits(h.data(), off);
  put_bytes(&sum, 8);
  RK_CHECK(off == h.size(), "chunk file header size");
  return h;
}

std::string ChunkStore::write_spill(const std::string& path, const std::string& tmp,
                                    const std::vector<uint8_t>& header,
                                    const std::vector<uint8_t>& blob) const {
  std::string err;
  {
    Fd fd(open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) return "cannot create " + tmp + ": " + errno_text(errno);
    if (!write_all(fd.get(), header.data(), static_cast<int64_t>(header.size())) ||
        !write_all(fd.get(), blob.data(), static_cast<int64_t>(blob.size())))
      err = "write failed: " + errno_text(errno);
    else if (opts_.fsync_files && fsync(fd.get()) != 0)
      err = "fsync failed: " + errno_text(errno);
    if (close(fd.release()) != 0 && err.empty()) err = "close failed: " + errno_text(errno);
  }
  if (err.empty() && std::rename(tmp.c_str(), path.c_str()) != 0)
    err = "rename failed: " + errno_text(errno);
  if (!err.empty()) {
    std::remove(tmp.c_str());
    return err;
  }
  if (opts_.fsync_files) {
    // The rename itself survives a power loss only once the directory is synced.
    Fd dir(open(opts_.disk_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir.get() >= 0) fsync(dir.get());
  }
  return err;
}

bool ChunkStore::write_file(Entry& e, const std::vector<uint8_t>& blob) {
  // A queued or running write of this file name (e's own or a colliding segment's) ends first.
  if (auto it = jobs_by_key_.find(e.key); it != jobs_by_key_.end()) finish_write(it->second);
  if (e.on_disk) return true;
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  // Another segment with the same key owns the file name: its copy goes (collisions are rare).
  std::vector<Entry*> same;
  auto [lo, hi] = index_.equal_range(e.key);
  for (auto it = lo; it != hi; ++it)
    if (it->second != &e && it->second->on_disk) same.push_back(it->second);
  for (Entry* o : same) {
    if (o->pins > 0 && o->tier == ChunkTier::Disk) return false;
    drop_disk_copy(*o);
    if (o->tier == ChunkTier::Disk) erase(*o, /*evicted=*/true);
  }
  const int64_t hb = head_block_bytes(len);
  std::vector<uint64_t> sums(static_cast<size_t>(layers_) * kv_heads_);
  for (size_t b = 0; b < sums.size(); ++b) sums[b] = XXH3_64bits(blob.data() + b * hb, hb);
  const std::vector<uint8_t> header = encode_header(e.key, e.tokens, sums);
  const std::string path = file_path(e.key);
  const std::string tmp =
      path + ".tmp." + std::to_string(getpid()) + "." + std::to_string(tmp_counter_++);
  const std::string err = write_spill(path, tmp, header, blob);
  if (!err.empty()) {
    ++stats_.write_errors;
    log_disk(path, err);
    return false;
  }
  e.on_disk = true;
  e.file_bytes = static_cast<int64_t>(header.size() + blob.size());
  e.block_sums = std::move(sums);
  disk_bytes_ += e.file_bytes;
  clear_persist(e);
  return true;
}

std::optional<std::vector<uint8_t>> ChunkStore::read_file(Entry& e) {
  const int32_t len = static_cast<int32_t>(e.tokens.size());
  const int64_t hbytes = header_bytes(len), pbytes = payload_bytes(len), hb = head_block_bytes(len);
  Fd fd(open(file_path(e.key).c_str(), O_RDONLY | O_CLOEXEC));
  FileHeader h;
  std::string what;
  if (fd.get() < 0) {
    mark_corrupt(e, "unreadable spill file, dropped: cannot open: " + errno_text(errno));
    return std::nullopt;
  }
  if (read_header(fd.get(), h) != HeaderStatus::Ok) {
    what = "bad header (magic, version, bounds or header checksum)";
  } else if (h.model_fp != opts_.model_fp || h.key != e.key || h.tokens != e.tokens ||
             h.dtype != static_cast<uint32_t>(dtype_) || h.layers != uint32_t(layers_) ||
             h.kv_heads != uint32_t(kv_heads_) || h.head_dim != uint32_t(head_dim_)) {
    what = "header does not match the indexed segment";
  } else if (const int64_t size = file_size(fd.get()); size != hbytes + pbytes) {
    what = "size " + std::to_string(size) + " bytes, expected " + std::to_string(hbytes + pbytes);
  }
  std::vector<uint8_t> blob;
  if (what.empty()) {
    blob.resize(static_cast<size_t>(pbytes));
    if (!read_all(fd.get(), blob.data(), pbytes, hbytes)) what = "short read of the payload";
    for (size_t b = 0; what.empty() && b < h.block_sums.size(); ++b)
      if (XXH3_64bits(blob.data() + b * hb, hb) != h.block_sums[b])
        what = "checksum mismatch in block (layer " + std::to_string(b / kv_heads_) + ", head " +
               std::to_string(b % kv_heads_) + ")";
  }
  if (!what.empty()) {
    mark_corrupt(e, "corrupt spill file, deleted: " + what);
    return std::nullopt;
  }
  return blob;
}

void ChunkStore::mark_corrupt(Entry& e, const std::string& what) {
  log_disk(file_path(e.key), what);
  ++stats_.corrupt_files;
  drop_disk_copy(e);
  if (e.tier == ChunkTier::Disk) {
    // No valid copy left. A pinned entry is dropped by its last unpin.
    e.tier = ChunkTier::None;
    e.dead = true;
    if (e.pins == 0) erase(e, /*evicted=*/false);
  }
}

void ChunkStore::scan_disk() {
  struct Found {
    fs::file_time_type mtime;
    FileHeader h;
    int64_t size;
  };
  std::vector<Found> found;
  std::error_code ec;
  fs::directory_iterator it(opts_.disk_dir, ec);
  if (ec) log_disk(opts_.disk_dir, "cannot list the directory: " + ec.message());
  for (const auto& de : it) {
    const fs::path& p = de.path();
    if (!de.is_regular_file(ec)) continue;
    // Leftovers of writers that died before their rename (live writers finish in seconds).
    if (p.filename().string().find(".rkv.tmp.") != std::string::npos) {
      std::error_code tec;
      const auto mtime = de.last_write_time(tec);
      if (!tec && mtime < fs::file_time_type::clock::now() - std::chrono::minutes(10))
        fs::remove(p, tec);
      continue;
    }
    if (p.extension() != ".rkv") continue;
    const std::string stem = p.stem().string();
    auto bad = [&](const std::string& what) {
      log_disk(p.string(), "corrupt spill file, deleted: " + what);
      ++stats_.corrupt_files;
      std::error_code rm;
      fs::remove(p, rm);
    };
    Fd fd(open(p.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) {
      log_disk(p.string(), "cannot open: " + errno_text(errno));
      continue;
    }
    FileHeader h;
    const HeaderStatus st = read_header(fd.get(), h);
    if (st == HeaderStatus::Bad) {
      bad("bad header (magic, bounds or header checksum)");
      continue;
    }
    // Another model's (or backend dtype's, or format version's) files stay for their owner.
    if (st == HeaderStatus::Foreign || h.model_fp != opts_.model_fp ||
        h.dtype != static_cast<uint32_t>(dtype_) || h.layers != uint32_t(layers_) ||
        h.kv_heads != uint32_t(kv_heads_) || h.head_dim != uint32_t(head_dim_))
      continue;
    const int32_t len = static_cast<int32_t>(h.len);
    const int64_t size = file_size(fd.get());
    if (size != header_bytes(len) + payload_bytes(len)) {
      bad("size " + std::to_string(size) + " bytes, expected " +
          std::to_string(header_bytes(len) + payload_bytes(len)));
      continue;
    }
    if (h.key != key_of(h.tokens) || stem != key_hex(h.key)) {
      bad("key does not match its tokens or file name");  // renamed or overwritten
      continue;
    }
    found.push_back({de.last_write_time(ec), std::move(h), size});
  }
  // Older files count as less recently used.
  std::sort(found.begin(), found.end(),
            [](const Found& a, const Found& b) { return a.mtime < b.mtime; });
  for (Found& f : found) {
    Entry& e = entries_.emplace_back();
    e.self = std::prev(entries_.end());
    e.key = f.h.key;
    e.tokens = std::move(f.h.tokens);
    e.tier = ChunkTier::Disk;
    e.on_disk = true;
    e.file_bytes = f.size;
    e.block_sums = std::move(f.h.block_sums);
    e.accesses = 1;
    e.last_access = ++clock_;
    disk_bytes_ += f.size;
    index_.emplace(e.key, &e);
  }
  // A smaller budget than last time: drop the coldest files.
  make_room_disk(0, std::numeric_limits<double>::infinity());
}

// ---- remote tier ----
// Manifest (host byte order): magic[8] "RKREMOT\0", u32 version, u32 dtype, u64 model_fp, u64 key,
// u32 layers, u32 kv_heads, u32 head_dim, u32 len, u32 block_rows, u32 0, i32 tokens[len],
// u64 block_sums[layers * kv_heads * blocks] (XXH3 of each block's K|V bytes, (layer, head) major),
// u64 XXH3 of all the preceding bytes. Shards: see chunk_store.h.

namespace {

constexpr char kRemoteMagic[8] = {'R', 'K', 'R', 'E', 'M', 'O', 'T', '\0'};
constexpr uint32_t kRemoteVersion = 1;
constexpr int64_t kManifestFixed = 56;  // magic .. the zero word

template <typename T>
void put_bytes(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

struct Manifest : SegmentGeometry {
  uint32_t block_rows = 0;
  std::vector<int32_t> tokens;
  std::vector<uint64_t> sums;
};

std::string encode_manifest(const Manifest& m) {
  std::string s;
  s.append(kRemoteMagic, 8);
  put_bytes(s, m.version);
  put_bytes(s, m.dtype);
  put_bytes(s, m.model_fp);
  put_bytes(s, m.key);
  for (uint32_t v : {m.layers, m.kv_heads, m.head_dim, m.len, m.block_rows, uint32_t{0}})
    put_bytes(s, v);
  s.append(reinterpret_cast<const char*>(m.tokens.data()), m.tokens.size() * 4);
  s.append(reinterpret_cast<const char*>(m.sums.data()), m.sums.size() * 8);
  put_bytes(s, static_cast<uint64_t>(XXH3_64bits(s.data(), s.size())));
  return s;
}

// "" or what is wrong with it.
std::string parse_manifest(const std::string& s, Manifest& m) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const int64_t n = static_cast<int64_t>(s.size());
  if (n < kManifestFixed + 8) return "manifest too short (" + std::to_string(n) + " bytes)";
  if (std::memcmp(p, kRemoteMagic, 8) != 0) return "bad manifest magic";
  if (XXH3_64bits(p, n - 8) != get_at<uint64_t>(p, n - 8)) return "manifest checksum mismatch";
  m.block_rows = get_at<uint32_t>(p, kGeometryEnd);
  if (!read_geometry(p, m) || m.block_rows == 0) return "bad manifest geometry";
  const int64_t blocks = (int64_t{m.len} + m.block_rows - 1) / m.block_rows;
  const int64_t nsums = int64_t{m.layers} * m.kv_heads * blocks;
  if (n != kManifestFixed + int64_t{m.len} * 4 + nsums * 8 + 8) return "manifest size mismatch";
  m.tokens.resize(m.len);
  std::memcpy(m.tokens.data(), p + kManifestFixed, int64_t{m.len} * 4);
  m.sums.resize(static_cast<size_t>(nsums));
  std::memcpy(m.sums.data(), p + kManifestFixed + int64_t{m.len} * 4, nsums * 8);
  return "";
}

}  // namespace

std::string ChunkStore::remote_prefix(uint64_t key) const {
  return "rk:" + key_hex(opts_.model_fp) + ":" + key_hex(key);
}

bool ChunkStore::covers(const Entry& e, const ChunkRowNeed& need) const {
  if (!e.partial) return true;
  if (need.full()) return false;
  for (size_t i = 0; i < e.have.size(); ++i) {
    const auto [hf, hs] = e.have[i];
    if (hf >= hs) continue;  // every row
    const auto [nf, ns] = need.keep.at(i);
    // Rows missing: [hf, hs). Needed: [0, nf) ∪ [ns, len).
    if (nf >= ns || nf > hf || ns < hs) return false;
  }
  return true;
}

void ChunkStore::drop_remote(const std::string& prefix, int32_t len) {
  std::vector<std::string> keys{prefix + ":m"};
  for (int l = 0; l < layers_; ++l)
    for (int h = 0; h < kv_heads_; ++h)
      keys.push_back(prefix + ":" + std::to_string(l) + ":" + std::to_string(h));
  if (remote_rd_->del(keys) == RemoteKv::Status::Error) ++stats_.remote_errors;
}

ChunkStore::Handle ChunkStore::fetch_remote(uint64_t key, std::span<const int32_t> tokens,
                                            const ChunkRowNeed* need) {
  const std::string prefix = remote_prefix(key);
  const int32_t len = static_cast<int32_t>(tokens.size());
  std::string mbytes;
  const RemoteKv::Status st = remote_rd_->get(prefix + ":m", &mbytes);
  if (st != RemoteKv::Status::Ok) {
    if (st == RemoteKv::Status::Error) ++stats_.remote_errors;
    ++stats_.remote_misses;
    return {};
  }
  stats_.remote_bytes_read += static_cast<int64_t>(mbytes.size());
  auto corrupt = [&](const std::string& what) {
    ++stats_.remote_corrupt;
    ++stats_.remote_misses;
    log_disk(remote_rd_->describe() + " " + prefix, "corrupt remote value, deleted: " + what);
    drop_remote(prefix, len);
    return Handle{};
  };
  Manifest m;
  if (std::string bad = parse_manifest(mbytes, m); !bad.empty()) return corrupt(bad);
  if (m.version != kRemoteVersion || m.dtype != static_cast<uint32_t>(dtype_)) {
    ++stats_.remote_misses;  // another build's or backend's format: not ours to delete
    return {};
  }
  if (m.model_fp != opts_.model_fp || m.key != key || m.layers != static_cast<uint32_t>(layers_) ||
      m.kv_heads != static_cast<uint32_t>(kv_heads_) ||
      m.head_dim != static_cast<uint32_t>(head_dim_))
    return corrupt("manifest of another model or geometry under this key");
  if (!std::equal(m.tokens.begin(), m.tokens.end(), tokens.begin(), tokens.end())) {
    ++stats_.collisions;  // another segment's valid value
    ++stats_.remote_misses;
    return {};
  }

  // The blocks to read: per (layer, head), runs of consecutive blocks, one GETRANGE each.
  const int32_t B = static_cast<int32_t>(m.block_rows), nb = (len + B - 1) / B;
  const int64_t rb = dtype_bytes(dtype_, head_dim_), hb = head_block_bytes(len);
  struct Run {
    int32_t lh, b0, b1;
  };
  std::vector<Run> runs;
  std::vector<RemoteKv::Range> ranges;
  std::vector<std::pair<int32_t, int32_t>> have(static_cast<size_t>(layers_) * kv_heads_);
  bool partial = false;
  for (int32_t lh = 0; lh < layers_ * kv_heads_; ++lh) {
    std::pair<int32_t, int32_t> k{len, len};
    if (need != nullptr && !need->full()) k = need->keep.at(lh);
    const int32_t head_blocks = k.first >= k.second ? nb : (k.first + B - 1) / B;
    const int32_t tail_block = k.first >= k.second ? nb : k.second / B;
    const std::string shard =
        prefix + ":" + std::to_string(lh / kv_heads_) + ":" + std::to_string(lh % kv_heads_);
    auto add = [&](int32_t b0, int32_t b1) {
      if (b0 >= b1) return;
      runs.push_back({lh, b0, b1});
      const int64_t r0 = int64_t{b0} * B, r1 = std::min<int64_t>(len, int64_t{b1} * B);
      ranges.push_back({shard, 2 * r0 * rb, 2 * (r1 - r0) * rb});
    };
    if (head_blocks >= tail_block) {
      add(0, nb);
      have[lh] = {len, len};
    } else {
      add(0, head_blocks);
      add(tail_block, nb);
      have[lh] = {std::min(len, head_blocks * B), tail_block * B};
      partial = true;
    }
  }
  std::vector<std::string> got;
  if (remote_rd_->get_ranges(ranges, &got) != RemoteKv::Status::Ok) {
    ++stats_.remote_errors;
    ++stats_.remote_misses;
    return {};
  }
  std::vector<uint8_t> blob(static_cast<size_t>(payload_bytes(len)), 0);
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    const std::string& v = got[i];
    stats_.remote_bytes_read += static_cast<int64_t>(v.size());
    const std::string where = " of shard (layer " + std::to_string(r.lh / kv_heads_) + ", head " +
                              std::to_string(r.lh % kv_heads_) + ")";
    if (v.empty()) {  // Redis dropped the shard (maxmemory, TTL): the segment is gone
      ++stats_.remote_missing_shards;
      ++stats_.remote_misses;
      drop_remote(prefix, len);
      return {};
    }
    if (static_cast<int64_t>(v.size()) != ranges[i].len)
      return corrupt("short read" + where + ": " + std::to_string(v.size()) + " of " +
                     std::to_string(ranges[i].len) + " bytes");
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    uint8_t* dst = blob.data() + int64_t{r.lh} * hb;
    for (int32_t b = r.b0; b < r.b1; ++b) {
      const int64_t r0 = int64_t{b} * B, n = std::min<int64_t>(len, r0 + B) - r0;
      if (XXH3_64bits(p, 2 * n * rb) != m.sums[static_cast<size_t>(r.lh) * nb + b])
        return corrupt("checksum mismatch in block " + std::to_string(b) + where);
      std::memcpy(dst + r0 * rb, p, n * rb);
      std::memcpy(dst + (len + r0) * rb, p + n * rb, n * rb);
      p += 2 * n * rb;
    }
  }

  Entry& e = entries_.emplace_back();
  e.self = std::prev(entries_.end());
  e.key = key;
  e.tokens.assign(tokens.begin(), tokens.end());
  e.accesses = take_ghost(key) + 1;
  e.last_access = clock_;
  e.pins = 1;  // not a victim of its own room making
  e.remote_done = true;
  e.partial = partial;
  if (partial) e.have = std::move(have);
  bool ok = false;
  try {
    ok = make_room_pool(pool_pages_for(len), score(e)) && load_into_pool(e, blob);
  } catch (...) {
    e.pins = 0;
    erase(e, false);
    throw;
  }
  e.pins = 0;
  if (!ok) {
    // No room under the policy: a miss for the caller, which counts this access itself.
    ++stats_.bypasses;
    ++stats_.remote_misses;
    e.accesses -= 1;
    erase(e, false);
    return {};
  }
  index_.emplace(key, &e);
  ++stats_.remote_hits;
  if (partial) ++stats_.remote_partial_hits;
  return make_handle(e, ChunkTier::Remote);
}

void ChunkStore::want_remote(Entry& e, const std::vector<uint8_t>* blob) {
  if (!remote_rd_ || e.remote_done || e.partial || e.dead || e.pending) return;
  if (e.accesses < opts_.remote_admit) return;
  if (blob == nullptr && e.tier != ChunkTier::Pool && e.tier != ChunkTier::Host) return;
  const int64_t n = payload_bytes(static_cast<int32_t>(e.tokens.size()));
  {
    std::lock_guard<std::mutex> r(r_mu_);
    if (r_queued_bytes_ > 0 && r_queued_bytes_ + n > opts_.remote_queue_bytes) {
      ++stats_.remote_write_drops;  // left for a later hit
      return;
    }
  }
  RemoteJob job;
  job.key = e.key;
  job.tokens = e.tokens;
  job.blob = blob != nullptr ? *blob : (e.tier == ChunkTier::Host ? e.blob : serialize_pool(e));
  {
    std::lock_guard<std::mutex> r(r_mu_);
    r_queued_bytes_ += n;
    r_queue_.push_back(std::move(job));
  }
  r_cv_.notify_one();
  e.remote_done = true;
}

void ChunkStore::remote_loop(RemoteKv& kv) {
  for (;;) {
    RemoteJob job;
    {
      std::unique_lock<std::mutex> r(r_mu_);
      r_cv_.wait(r, [&] { return r_stop_ || !r_queue_.empty(); });
      if (r_queue_.empty()) return;  // stopped, queue drained
      job = std::move(r_queue_.front());
      r_queue_.pop_front();
    }
    const int64_t n = static_cast<int64_t>(job.blob.size());
    send_remote(kv, job);
    {
      std::lock_guard<std::mutex> r(r_mu_);
      r_queued_bytes_ -= n;
    }
    r_done_cv_.notify_all();
  }
}

void ChunkStore::send_remote(RemoteKv& kv, RemoteJob& job) {
  // No store state here but the stats at the end (under mu_, without r_mu_).
  const int32_t len = static_cast<int32_t>(job.tokens.size());
  const int32_t B = opts_.remote_block_rows, nb = (len + B - 1) / B;
  const int64_t rb = dtype_bytes(dtype_, head_dim_), hb = head_block_bytes(len);
  const std::string prefix = remote_prefix(job.key);
  Manifest m;
  m.version = kRemoteVersion;
  m.dtype = static_cast<uint32_t>(dtype_);
  m.model_fp = opts_.model_fp;
  m.key = job.key;
  m.layers = static_cast<uint32_t>(layers_);
  m.kv_heads = static_cast<uint32_t>(kv_heads_);
  m.head_dim = static_cast<uint32_t>(head_dim_);
  m.len = static_cast<uint32_t>(len);
  m.block_rows = static_cast<uint32_t>(B);
  m.tokens = job.tokens;
  m.sums.resize(static_cast<size_t>(layers_) * kv_heads_ * nb);
  std::vector<std::pair<std::string, std::string>> kvs;
  kvs.reserve(static_cast<size_t>(layers_) * kv_heads_ + 1);
  int64_t bytes = 0;
  for (int32_t lh = 0; lh < layers_ * kv_heads_; ++lh) {
    const uint8_t* src = job.blob.data() + int64_t{lh} * hb;
    std::string v(static_cast<size_t>(hb), '\0');
    auto* out = reinterpret_cast<uint8_t*>(v.data());
    for (int32_t b = 0; b < nb; ++b) {
      const int64_t r0 = int64_t{b} * B, n = std::min<int64_t>(len, r0 + B) - r0;
      std::memcpy(out, src + r0 * rb, n * rb);
      std::memcpy(out + n * rb, src + (len + r0) * rb, n * rb);
      m.sums[static_cast<size_t>(lh) * nb + b] = XXH3_64bits(out, 2 * n * rb);
      out += 2 * n * rb;
    }
    bytes += hb;
    kvs.emplace_back(
        prefix + ":" + std::to_string(lh / kv_heads_) + ":" + std::to_string(lh % kv_heads_),
        std::move(v));
  }
  kvs.emplace_back(prefix + ":m", encode_manifest(m));  // last: readers look for it first
  bytes += static_cast<int64_t>(kvs.back().second.size());
  const bool ok = kv.put_many(kvs) == RemoteKv::Status::Ok;
  if (!ok) log_disk(kv.describe() + " " + prefix, "remote write failed (counted as an error)");
  std::lock_guard<std::mutex> lock(mu_);
  if (ok) {
    ++stats_.remote_writes;
    stats_.remote_bytes_written += bytes;
  } else {
    ++stats_.remote_errors;
  }
}

}  // namespace redknot
