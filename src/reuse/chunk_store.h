// The segment KV cache (SPEC §4 "Offline"): each segment's K (rotated at positions [0, len)) and V,
// prefilled alone, kept in three tiers keyed by a hash of (model, token ids):
//   tier 0 "pool": pages of the engine's PagePool, owned by an internal all-global PagedKvCache
//                  (one sequence per segment). Requests copy them into their own sequence with
//                  PagedKvCache::append_relocated(seq, handle.all_rows(), handle.positions(), d).
//   tier 1 "host": the same K/V serialized head-major in host RAM.
//   tier 2 "disk": that serialization in `<disk_dir>/<key hex>.rkv` with a checksummed header
//                  and one XXH3 per head block; written to a temp file, fsynced, renamed;
//                  survives restarts and (with write-through) crashes. Corrupt files are detected
//                  at startup or load, logged, counted, deleted and treated as misses: never
//                  served.
//
// Serialization (host blob = disk payload), rows as the pool stores them (the backend's act dtype,
// or FP8 KV rows: head_dim e4m3 codes + the row's f32 scale, so every tier carries the scales):
// for each layer, for each kv head, a block of K rows [len, row] then V rows [len, row].
// Positions are 0..len-1. The header records the KV dtype: files of another stay foreign.
// One head's rows can be read without the rest (read_head_rows).
//
// Policy. Every entry has a score  accesses / (1 + age)^alpha, where `accesses` counts acquire()
// and lookup() calls for the segment (including ones that happened while it was not cached, kept in
// a bounded "ghost" history) and `age` is the number of acquire/lookup calls since its last access.
// It is a decayed frequency: an entry used 10 times outlives a burst of about 10x the tier's
// capacity of one-off segments, while plain LRU would drop it after one tier's worth. No size
// term: the prefill a hit saves grows with the bytes the entry holds. A tier over budget demotes
// its lowest-score unpinned entries one tier down (pool -> host -> disk -> dropped); an entry
// moving down may only displace entries of a lower score than its own in the next tier, else it
// moves further down. Admission filter: an entry coming into the pool (a prefill or a promotion)
// may use free budget freely, but may only demote entries with a lower score than its own; when
// that cannot make room it is not cached in the pool and acquire() returns an empty handle (a
// one-off segment cannot push out hotter ones; its access is remembered, so a second use gets in).
// Disk files are a copy that stays when an entry is promoted back to memory (demoting it again is
// free); the destructor writes memory-only entries to disk (best effort) when the disk tier is on.
//
// Write-through (ChunkStoreOptions::write_through, on with the disk tier): a kill -9 loses only
// what is still queued (at most write_queue_bytes plus one entry: usually well under a second of
// disk time), not everything cached since start.
// Each new pool entry (publish()), host entry promoted without a disk copy, or pool hit that the
// disk policy kept off disk before, is serialized at once on the calling (engine) thread -- the
// pool gather needs the backend, and costs a small part of the prefill that made the entry --
// and queued for a background writer: checksums, temp file, fsync, rename, directory fsync. Only
// when the file is in place does the entry get its disk copy (on_disk, block sums), under the
// mutex. Event-driven rather than periodic: the scheduler needs no new call, and the loss window
// is the queue, not a timer. The queue is bounded in bytes (an entry larger than the bound is
// taken when the queue is empty); an entry that finds it full is never waited for: it is retried,
// hottest first, at the next publish()/acquire() or persist_new() (an idle store keeps that
// backlog until then, or the destructor's flush). The disk budget is reserved when a write is
// queued, under the policy of a demotion (only colder files make room; when they cannot, the entry
// stays memory-only, as flush_to_disk would leave it); disk bytes count writes in flight. The
// engine waits for the writer only where it wrote synchronously before: an entry demoted to disk
// while its write is queued has that write run right there (or awaited, if running). Dropping an
// entry cancels its queued write, or deletes the file its running write makes. The destructor
// drains the queue (even without flush_on_destroy) and joins the writer.
//
// Disk-tier problems (corrupt or unreadable files, failed writes or deletes) print one line each to
// stderr naming the file and what was wrong, at most log_lines_per_minute; the rest are counted and
// summed up in one line at the next problem after the minute, or at destruction.
//
// Remote tier (options.remote, issue #22): a key-value store shared by server instances (Redis),
// below the local tiers. A local miss asks it before being prefilled; a hit becomes a pool entry
// (source() Remote). Format, per segment, keys prefixed `rk:<model fp hex>:<segment key hex>`:
//   `:<layer>:<head>`  one shard per (layer, kv head): its rows in blocks of remote_block_rows B;
//                      block b = K rows [bB, min(len, (b+1)B)) then V rows of that range, so any
//                      set of blocks is one GETRANGE per contiguous run;
//   `:m`               the manifest (encode_manifest): magic, version, model fp, dtype, geometry,
//                      len, B, the token ids (a hash collision is a miss), one XXH3 per (layer,
//                      head, block), and an XXH3 of the manifest itself. Written last, in the same
//                      pipeline as the shards: a reader never finds a manifest before its shards.
// A reader fetches only the blocks its destination keeps (acquire's ChunkRowNeed: a local head's
// sink and window rows, a global head's every row) and verifies each block. Such a partial entry
// never hands out rows it lacks (Handle::covers; an acquire needing more refetches or misses), is
// never written to the host/disk tiers or back to the remote (it is dropped instead of demoted:
// the remote still has it), and holds pool pages for every row (the store's cache is all-global;
// rows not fetched are zero). A shard missing under a manifest (Redis evicted it: TTL and memory
// limits are Redis's, maxmemory + LRU) is a miss; a corrupt or truncated value (checksum, short
// read, bad manifest) is counted, logged, its keys deleted and the segment recomputed, never
// served; a transport failure is a miss counted in remote_errors (the client reconnects later).
// Writes: entries whose access count reaches remote_admit (1: the first prefill is shared) are
// serialized on the engine thread (the pool gather needs the backend) and sent by a background
// thread; a full queue (remote_queue_bytes) drops the write (counted; a later hit retries).
//
// Passive: the store never runs the model. A miss is prefilled by the caller (the scheduler, as
// ordinary prefill work of the store's own sequence; prefill_segment() for offline use): reserve()
// gives it a sequence of prefill_cache(), publish() turns the result into an entry. Not
// thread-safe beyond an internal mutex around its own state: call it from the thread that runs
// the model. Handles and pending prefills must be released before the store is destroyed.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/model_config.h"
#include "core/tensor.h"
#include "kv/page_pool.h"
#include "kv/paged_kv_cache.h"
#include "loader/checkpoint.h"
#include "model/model.h"
#include "reuse/remote_tier.h"

namespace redknot {

// Hash of the config fields that change KV and of a sample of the weight bytes (names, shapes,
// dtypes of every tensor; first/last 4 KiB of a few). Mix in anything else that changes KV bits
// (e.g. the backend) before passing it to the store.
uint64_t model_fingerprint(const ModelConfig& cfg, const Checkpoint& ckpt);
// The same with the KV dtype mixed in when it is not the default act dtype path (FP8 KV keys
// name different bits); kv_dtype F32/BF16 leave the fingerprint above unchanged.
uint64_t model_fingerprint(const ModelConfig& cfg, const Checkpoint& ckpt, DType kv_dtype);
// XXH3 over the fingerprint and the token ids.
uint64_t segment_key(uint64_t model_fp, std::span<const int32_t> tokens);

enum class ChunkTier : uint8_t { None, Pool, Host, Disk, Remote };
const char* chunk_tier_name(ChunkTier t);

struct ChunkStoreOptions {
  int64_t pool_budget_bytes = 0;  // pages held in the PagePool * bytes_per_page
  int64_t host_budget_bytes = 0;  // serialized bytes in RAM; 0 disables the host tier
  int64_t disk_budget_bytes = 0;  // file bytes; 0 disables the disk tier
  std::string disk_dir;           // created if missing; required when the disk tier is on
  uint64_t model_fp = 0;          // model_fingerprint(); required (non-zero) for the disk tier
  double alpha = 1.0;             // recency exponent of the score
  int32_t ghost_capacity = 4096;  // segments whose accesses are remembered while uncached
  bool fsync_files = true;        // fsync spill files before the rename (crash safety)
  bool flush_on_destroy = true;   // write memory-only entries to disk in the destructor
  bool write_through = true;      // with the disk tier: persist new entries in the background
  int64_t write_queue_bytes = int64_t{256} << 20;  // serialized bytes waiting for the writer
  int32_t log_lines_per_minute = 10;               // disk-tier problems printed, then a summary
  int key_bits = 64;                               // tests only: fewer bits force hash collisions
  std::function<void()> before_write;  // tests only: runs on the writer before each file
  // Remote tier: makes one client per use (the reader on the engine thread, the writer thread);
  // empty: no remote tier. Needs model_fp.
  std::function<std::unique_ptr<RemoteKv>()> remote;
  int32_t remote_admit = 1;        // accesses before an entry is written to the remote
  int32_t remote_block_rows = 64;  // rows per checksummed block of a shard (B)
  int64_t remote_queue_bytes = int64_t{256} << 20;  // serialized bytes waiting to be sent
};

// The source rows of a segment a destination keeps, per (layer, kv head) as
// [layer * kv_heads + head]: rows [0, first) and [second, len) (first >= second: every row).
// Empty: every row of every head.
struct ChunkRowNeed {
  std::vector<std::pair<int32_t, int32_t>> keep;
  bool full() const { return keep.empty(); }
};
// What PagedKvCache::append_relocated(seq, rows, 0..len-1, dst_offset) copies of a segment of
// `len` rows: a local head's rows that HeadSpec::keeps at their new positions (sink ∪ window),
// a global head's every row; every row while the sequence keeps its local pages.
ChunkRowNeed row_need(const PagedKvCache& dst, SeqId seq, int32_t dst_offset, int32_t len);

struct ChunkTierUsage {
  int64_t entries = 0, bytes = 0;
};

struct ChunkStoreStats {
  int64_t pool_hits = 0, host_hits = 0, disk_hits = 0, misses = 0;
  int64_t prefills = 0;          // misses prefilled and admitted
  int64_t private_prefills = 0;  // misses prefilled for one request only (no room under the policy)
  int64_t bypasses = 0;          // acquires that returned empty: no room / admission refused
  int64_t promotions = 0;        // host/disk -> pool
  int64_t demotions_to_host = 0, demotions_to_disk = 0;
  int64_t evictions = 0;            // entries dropped from every tier
  int64_t corrupt_files = 0;        // spill files found bad (checksum, truncation, header); deleted
  int64_t collisions = 0;           // lookups whose key matched an entry of other tokens
  int64_t disk_writes = 0;          // files written through (new entries persisted)
  int64_t write_deferrals = 0;      // new entries that found the write queue full (retried)
  int64_t write_errors = 0;         // spill files that could not be written
  int64_t write_queue_bytes = 0;    // serialized bytes queued or being written now
  ChunkTierUsage pool, host, disk;  // disk: every indexed file, including copies; bytes also
                                    // count writes in flight
  // Remote tier.
  int64_t remote_hits = 0;            // local misses found remote (promoted to the pool)
  int64_t remote_partial_hits = 0;    // of those, fetched only the rows the destination keeps
  int64_t remote_misses = 0;          // local misses not found remote (or found unusable)
  int64_t remote_missing_shards = 0;  // of those, manifests whose shards Redis had dropped
  int64_t remote_corrupt = 0;         // values found bad (checksum, truncation, manifest); deleted
  int64_t remote_errors = 0;          // transport failures (connection, timeout): misses
  int64_t remote_bytes_read = 0;      // manifest + shard bytes fetched
  int64_t remote_bytes_written = 0;   // manifest + shard bytes sent
  int64_t remote_writes = 0;          // segments written to the remote
  int64_t remote_write_drops = 0;     // writes dropped: queue full (retried on a later hit)
  int64_t remote_queue_bytes = 0;     // serialized bytes queued or being sent now
};

// One (layer, kv head)'s rows of a cached segment as the pool stores them: host tensors
// [n, head_dim] in act dtype, or FP8 KV rows [n, head_dim + 4] (codes, then the f32 scale).
struct ChunkHeadRows {
  Tensor k, v;
};

class ChunkStore {
  struct Entry;
  struct WriteJob;

 public:
  // A pin on one entry: while it lives the entry stays in its tier (never demoted or evicted).
  // Empty (ok() false) when acquire could not provide the segment.
  class Handle {
   public:
    Handle() = default;
    Handle(Handle&& o) noexcept;
    Handle& operator=(Handle&& o) noexcept;
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() { reset(); }
    void reset();  // unpins

    bool ok() const { return entry_ != nullptr; }
    explicit operator bool() const { return ok(); }
    // Found cached (in `source()`), as opposed to prefilled by this acquire.
    bool hit() const { return source_ != ChunkTier::None; }
    // Where the entry was found (None: prefilled now); tier(): where it is now.
    ChunkTier source() const { return source_; }
    ChunkTier tier() const;
    uint64_t key() const;
    const std::vector<int32_t>& tokens() const;
    int32_t length() const;
    // Pool rows of one (layer, kv head), in token order (only when tier() == Pool).
    const std::vector<int32_t>& rows(int layer, int kv_head) const;
    // rows of every (layer, kv head) as [layer * kv_heads + head], for append_relocated.
    const std::vector<std::vector<int32_t>>& all_rows() const;
    // 0..len-1: the source positions for append_relocated.
    const std::vector<int32_t>& positions() const;
    // Fetched from the remote with only some rows (the rest are not to be read).
    bool partial() const;
    // Whether the entry holds every row `need` asks for.
    bool covers(const ChunkRowNeed& need) const;

   private:
    friend class ChunkStore;
    ChunkStore* store_ = nullptr;
    Entry* entry_ = nullptr;
    ChunkTier source_ = ChunkTier::None;
  };

  // `model` and `pool` must outlive the store. Scans `disk_dir` when the disk tier is on: files of
  // this model and geometry are indexed, files of another model (or dtype/geometry) are left alone,
  // unreadable/corrupt ones are deleted and counted.
  ChunkStore(Model& model, PagePool& pool, ChunkStoreOptions options);
  ~ChunkStore();
  ChunkStore(const ChunkStore&) = delete;
  ChunkStore& operator=(const ChunkStore&) = delete;

  // A segment's KV being prefilled by the caller at positions [0, len) into sequence seq() of
  // prefill_cache() (in chunks, like any prefill); publish() makes it an entry. Destroying an
  // unpublished one frees its pages.
  class Pending {
   public:
    Pending() = default;
    Pending(Pending&& o) noexcept;
    Pending& operator=(Pending&& o) noexcept;
    Pending(const Pending&) = delete;
    Pending& operator=(const Pending&) = delete;
    ~Pending() { reset(); }
    void reset();  // abandons the prefill

    bool ok() const { return entry_ != nullptr; }
    SeqId seq() const;
    const std::vector<int32_t>& tokens() const;
    // False when the policy gave it no room in the pool: published, it serves the requests that
    // hold its handle and is dropped when they let go (it never pushes out hotter entries).
    bool admitted() const { return admitted_; }

   private:
    friend class ChunkStore;
    ChunkStore* store_ = nullptr;
    Entry* entry_ = nullptr;
    bool admitted_ = false;
  };

  // The segment in the pool, pinned: a pool hit, or a host/disk hit promoted to the pool. Empty
  // on a miss (counted; reserve() it and prefill it), for an empty span, or when a host/disk hit
  // finds no room in the pool under the policy. Cache problems (no room, corrupt files) never
  // throw.
  // `need`: the rows the caller will read (row_need()); null: every row. A remote hit fetches
  // only those; a partial entry that lacks some is fetched again (or is a miss while pinned).
  Handle acquire(std::span<const int32_t> tokens, const ChunkRowNeed* need = nullptr);
  // After acquire() missed: a sequence of prefill_cache() for the caller to prefill the segment
  // into. Admitted when the policy makes room for it in the pool budget; otherwise private (see
  // Pending::admitted). Throws OutOfKvMemory when the pool has no free pages for it at all.
  Pending reserve(std::span<const int32_t> tokens);
  // The store's all-global cache, where pending prefills run.
  KvCache& prefill_cache() { return *cache_; }
  // The prefilled segment as a pinned pool entry (source() None: computed, not a hit).
  Handle publish(Pending pending);
  // Demotes unpinned pool entries (lowest score first, to host or disk) until the pool has
  // `pages` free pages: live requests come before cached segments. False when the unpinned
  // entries cannot free that many.
  bool yield_pages(int64_t pages);
  // Whether the segment is in some tier (no access counted): tells a miss from a hit that found
  // no room in the pool.
  bool cached(std::span<const int32_t> tokens);
  // Pins the segment wherever it is, without promotion or prefill (counts a hit or a miss).
  Handle lookup(std::span<const int32_t> tokens);
  // Token rows [token_begin, token_end) of one (layer, kv head) of a pinned entry in any tier
  // (a disk entry reads and verifies only that head's block). nullopt when the disk block is
  // corrupt: the file is deleted and counted, and the entry is dropped once unpinned.
  std::optional<ChunkHeadRows> read_head_rows(const Handle& h, int layer, int kv_head,
                                              int32_t token_begin, int32_t token_end);
  // Writes memory entries that have no disk copy to disk, hottest first, within the disk budget.
  void flush_to_disk();
  // Write-through: queues new entries still waiting for the writer (a full queue skipped them),
  // hottest first, as far as the queue has room; returns how many. publish() and acquire() do
  // this themselves; call it between steps to retry sooner. On the thread that runs the model.
  int persist_new();
  // Blocks until every queued write is on disk and its entry updated, and every queued remote
  // write is sent. Not under a store call.
  void sync_writes();

  ChunkStoreStats stats() const;
  const ChunkStoreOptions& options() const { return opts_; }

 private:
  struct Entry {
    uint64_t key = 0;
    std::vector<int32_t> tokens;
    ChunkTier tier = ChunkTier::None;
    int32_t pins = 0;
    bool dead = false;     // its disk data proved corrupt (or it is private): drop when unpinned
    bool pending = false;  // reserved, being prefilled by the caller
    // Pool tier.
    SeqId seq = -1;
    int64_t pool_bytes = 0;
    int64_t reserved_bytes = 0;  // pending and admitted: its pool bytes, held for it by reserve
    std::vector<std::vector<int32_t>> rows;  // [layer * kv_heads + head]
    std::vector<int32_t> positions;          // 0..len-1
    // Host tier.
    std::vector<uint8_t> blob;
    // Disk copy (any tier).
    bool on_disk = false;
    int64_t file_bytes = 0;
    std::vector<uint64_t> block_sums;  // per (layer, head) block, from the file header
    // Remote tier: partial = fetched with only `have`'s rows (ChunkRowNeed::keep); remote_done =
    // written to the remote (or read from it): not sent again.
    bool partial = false;
    std::vector<std::pair<int32_t, int32_t>> have;
    bool remote_done = false;
    // Write-through: waiting for room in the write queue, or its write queued / in flight.
    bool persist = false;
    std::shared_ptr<WriteJob> job;
    // Policy.
    double accesses = 0;
    uint64_t last_access = 0;
    std::list<Entry>::iterator self;
  };
  // One file for the writer. `entry` and `committed` are guarded by mu_, `state` by q_mu_; the
  // rest belongs to whoever runs the I/O (Running) and is read by commit() once Done.
  struct WriteJob {
    enum class State : uint8_t { Queued, Running, Done };
    Entry* entry = nullptr;  // null once the entry is erased: the file goes too
    uint64_t key = 0;
    std::vector<int32_t> tokens;
    std::vector<uint8_t> blob;
    int64_t bytes = 0;   // the file: header + payload, reserved in disk_bytes_
    int64_t queued = 0;  // its share of queued_bytes_
    std::string path, tmp;
    State state = State::Queued;
    bool committed = false, ok = false, dequeued = false;
    std::string error;
    std::vector<uint64_t> sums;
  };
  struct RemoteJob {
    uint64_t key = 0;
    std::vector<int32_t> tokens;
    std::vector<uint8_t> blob;
  };
  struct Ghost {
    double accesses = 0;
    uint64_t last_access = 0;
  };
  using EntryList = std::list<Entry>;

  uint64_t key_of(std::span<const int32_t> tokens) const;
  // The live entry holding exactly `tokens` (counts a collision when only others share the key).
  Entry* find(uint64_t key, std::span<const int32_t> tokens);
  double score(const Entry& e) const;
  double score_of(double accesses, uint64_t last_access) const;
  void touch(Entry& e);
  double take_ghost(uint64_t key);
  void remember(uint64_t key, double accesses, uint64_t last_access);
  Handle make_handle(Entry& e, ChunkTier source);
  void unpin(Entry* e);
  // Lowest-score unpinned entry below `limit` in `tier` (or holding a disk copy when disk_copy).
  Entry* victim(ChunkTier tier, double limit, bool disk_copy);
  // Bytes that demoting every such entry would free in that tier.
  int64_t reclaimable(ChunkTier tier, double limit, bool disk_copy) const;

  // Geometry.
  int64_t head_block_bytes(int32_t len) const;  // K + V rows of one head
  int64_t payload_bytes(int32_t len) const;
  int64_t pool_pages_for(int32_t len) const;
  int64_t header_bytes(int32_t len) const;
  std::string file_path(uint64_t key) const;

  // Tier moves (mutex held). make_room_* demote unpinned entries of score < `limit` and return
  // whether `pages`/`bytes` more now fit the tier's budget. Entries may be erased on the way.
  bool make_room_pool(int64_t pages, double limit);
  // Pages the pending prefills (reserved, not yet published) will still take from the pool:
  // reservations hold their room before their forwards allocate it, so that several misses
  // reserved at once (a prompt's documents, concurrent requests) are not all admitted into the
  // same free pages and budget.
  int64_t unallocated_pending_pages() const;
  void end_pending(Entry& e);  // publish or abandon: the reservation is over
  bool make_room_host(int64_t bytes, double limit);
  bool make_room_disk(int64_t bytes, double limit);
  void demote_from_pool(Entry& e);
  void place_in_host(Entry& e, std::vector<uint8_t> blob);
  void place_on_disk(Entry& e, const std::vector<uint8_t>& blob);
  void drop_disk_copy(Entry& e);
  void erase(Entry& e, bool evicted);
  // Puts a serialized segment into the pool (a new sequence of the internal cache).
  bool load_into_pool(Entry& e, const std::vector<uint8_t>& blob);
  void set_pool_rows(Entry& e, SeqId seq);
  void release_pool(Entry& e);
  std::vector<uint8_t> serialize_pool(const Entry& e);
  void flush_locked();

  Handle acquire_locked(std::span<const int32_t> tokens, const ChunkRowNeed* need);
  // Remote tier (mutex held except remote_loop/send_remote).
  Handle fetch_remote(uint64_t key, std::span<const int32_t> tokens, const ChunkRowNeed* need);
  // Queues e for the remote writer when it is admitted (blob: its serialization, if at hand).
  void want_remote(Entry& e, const std::vector<uint8_t>* blob = nullptr);
  std::string remote_prefix(uint64_t key) const;
  void remote_loop(RemoteKv& kv);
  bool covers(const Entry& e, const ChunkRowNeed& need) const;
  void send_remote(RemoteKv& kv, RemoteJob& job);
  void drop_remote(const std::string& prefix, int32_t len);
  // Write-through (mutex held unless said otherwise).
  void want_persist(Entry& e, std::vector<uint8_t>* blob = nullptr);
  int persist_locked();
  enum class Enqueue : uint8_t { Queued, Refused, Full, Busy };
  // Queues e's file (blob: its serialization when the caller has one, moved from). Refused: the
  // disk policy keeps it off disk (not retried); Full / Busy (its file name is being written):
  // left for a retry.
  Enqueue enqueue_write(Entry& e, std::vector<uint8_t>* blob);
  void clear_persist(Entry& e);
  // Runs a queued job here or waits for the writer to finish it, then commits it.
  void finish_write(std::shared_ptr<WriteJob> job);
  void cancel_write(Entry& e);
  void commit(WriteJob& job);
  void run_write(WriteJob& job) const;  // the I/O; no lock, no store state
  void writer_loop();
  void log_disk(const std::string& path, const std::string& what);

  // Disk format.
  std::vector<uint8_t> encode_header(uint64_t key, std::span<const int32_t> tokens,
                                     const std::vector<uint64_t>& sums) const;
  // Temp file + fsync + rename (+ directory fsync); "" or what failed.
  std::string write_spill(const std::string& path, const std::string& tmp,
                          const std::vector<uint8_t>& header,
                          const std::vector<uint8_t>& blob) const;
  bool write_file(Entry& e, const std::vector<uint8_t>& blob);
  // Reads and verifies the whole payload; nullopt (file deleted, counted) when corrupt.
  std::optional<std::vector<uint8_t>> read_file(Entry& e);
  void scan_disk();
  void mark_corrupt(Entry& e, const std::string& what);

  PagePool& pool_;
  Backend& backend_;
  ChunkStoreOptions opts_;
  int32_t layers_, kv_heads_, head_dim_;
  DType dtype_;        // the pool's KV dtype: rows are stored, moved and spilled as the pool holds
  int64_t row_width_;  // them (FP8 KV rows: head_dim codes + the row's f32 scale)
  std::unique_ptr<PagedKvCache> cache_;  // all-global profile, one sequence per pool entry
  SeqId next_seq_ = 0;

  mutable std::mutex mu_;
  EntryList entries_;
  std::unordered_multimap<uint64_t, Entry*> index_;
  std::unordered_map<uint64_t, Ghost> ghosts_;
  uint64_t clock_ = 0;
  int64_t pool_bytes_ = 0, host_bytes_ = 0, disk_bytes_ = 0;  // what the budgets bound
  int64_t reserved_bytes_ = 0;   // admitted pending prefills' pool bytes (budget), see above
  std::vector<Entry*> pending_;  // every pending prefill
  uint64_t tmp_counter_ = 0;
  ChunkStoreStats stats_;  // counters; usage filled in by stats()
  // Write-through. Lock order: mu_ before q_mu_; the writer never holds q_mu_ while taking mu_.
  int64_t persist_backlog_ = 0;  // entries with `persist` and no job
  std::unordered_map<uint64_t, std::shared_ptr<WriteJob>> jobs_by_key_;  // one file name, one job
  mutable std::mutex q_mu_;
  std::condition_variable q_cv_;     // the writer: work or stop
  std::condition_variable done_cv_;  // a job is Done / a job is committed
  std::deque<std::shared_ptr<WriteJob>> queue_;
  int64_t queued_bytes_ = 0;  // blobs of jobs not Done
  int64_t outstanding_ = 0;   // jobs not committed
  bool stop_ = false;
  std::thread writer_;
  // Rate limit of log_disk (own mutex: any thread).
  // Remote tier: the reader (engine thread, under mu_) and the writer thread with its queue.
  std::unique_ptr<RemoteKv> remote_rd_;
  std::thread remote_writer_;
  mutable std::mutex r_mu_;  // after mu_; the writer thread takes mu_ only without r_mu_
  std::condition_variable r_cv_, r_done_cv_;
  std::deque<RemoteJob> r_queue_;
  int64_t r_queued_bytes_ = 0;  // queued + being sent
  bool r_stop_ = false;
  std::mutex log_mu_;
  std::chrono::steady_clock::time_point log_window_{};
  int32_t log_lines_ = 0;
  int64_t log_suppressed_ = 0;
};

}  // namespace redknot
