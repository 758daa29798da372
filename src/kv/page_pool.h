// The physical KV page pool of one device: K, V and position storage for `num_pages` pages of
// `page_size` token slots of one kv head each, with reference counts so that sequences (and
// cached chunks) can share pages. Allocation never blocks or throws on exhaustion: it reports
// it, and callers turn that into OutOfKvMemory before changing anything.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "backend/backend.h"

namespace redknot {

class PagePool {
 public:
  // with_storage = false makes an accounting-only pool (capacity planning, benchmarks).
  // kv_dtype: the backend's act dtype (default) or F8_E4M3 (FP8 KV rows of head_dim + 4 bytes:
  // Backend::pack_fp8_kv_rows).
  PagePool(Backend& backend, int32_t num_pages, int32_t page_size, int32_t head_dim,
           bool with_storage = true, std::optional<DType> kv_dtype = std::nullopt);

  // A free page with refcount 1, or -1 when none is left.
  int32_t allocate();
  void retain(int32_t page);
  // Drops one reference; the page returns to the free list at zero.
  void release(int32_t page);
  int32_t refcount(int32_t page) const { return refcount_.at(page); }

  int32_t num_pages() const { return num_pages_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t page_size() const { return page_size_; }
  int32_t head_dim() const { return head_dim_; }
  DType kv_dtype() const { return kv_dtype_; }
  bool fp8() const { return kv_dtype_ == DType::F8_E4M3; }
  // Columns of a K/V pool row: head_dim, plus the f32 scale's 4 bytes for FP8 KV rows.
  int64_t row_width() const { return kv_row_width(head_dim_, kv_dtype_); }
  static int64_t kv_row_width(int32_t head_dim, DType dtype) {
    return dtype == DType::F8_E4M3 ? head_dim + kFp8KvScaleBytes : head_dim;
  }
  // Storage for n pool rows as stored ([n, row_width] in kv_dtype): page copies, tiers.
  Tensor alloc_rows(int64_t n) { return backend_.alloc_uninit(kv_dtype_, {n, row_width()}); }
  bool has_storage() const { return with_storage_; }
  // K + V + positions of one page.
  int64_t bytes_per_page() const;

  Backend& backend() { return backend_; }
  Tensor& k() { return k_; }      // [num_pages * page_size, row_width] kv_dtype
  Tensor& v() { return v_; }      // [num_pages * page_size, row_width] kv_dtype
  Tensor& pos() { return pos_; }  // [num_pages * page_size, 1] i32

  // K + V + positions of one page of this geometry.
  static int64_t page_bytes(int32_t page_size, int32_t head_dim, DType dtype);
  // Pages that fit in `bytes` for this geometry.
  static int32_t pages_for_bytes(int64_t bytes, int32_t page_size, int32_t head_dim, DType dtype);

 private:
  Backend& backend_;
  int32_t num_pages_, page_size_, head_dim_;
  bool with_storage_;
  DType kv_dtype_;
  Tensor k_, v_, pos_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_;  // stack of free page ids
};

}  // namespace redknot
