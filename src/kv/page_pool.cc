#include "kv/page_pool.h"

#include <string>

#include "core/error.h"

namespace redknot {

PagePool::PagePool(Backend& backend, int32_t num_pages, int32_t page_size, int32_t head_dim,
                   bool with_storage, std::optional<DType> kv_dtype)
    : backend_(backend),
      num_pages_(num_pages),
      page_size_(page_size),
      head_dim_(head_dim),
      with_storage_(with_storage),
      kv_dtype_(kv_dtype.value_or(backend.act_dtype())),
      refcount_(num_pages, 0) {
  if (num_pages <= 0 || page_size <= 0 || head_dim <= 0)
    throw Error("page pool: pages, page size and head_dim must be positive");
  if (kv_dtype_ != backend.act_dtype() && kv_dtype_ != DType::F8_E4M3)
    throw Error(std::string("page pool: KV dtype ") + dtype_name(kv_dtype_) +
                " is not supported (the backend's act dtype or f8_e4m3)");
  if (with_storage) {
    const int64_t slots = int64_t{num_pages} * page_size;
    k_ = backend.alloc(kv_dtype_, {slots, row_width()});
    v_ = backend.alloc(kv_dtype_, {slots, row_width()});
    pos_ = backend.alloc(DType::I32, {slots, 1});
  }
  free_.reserve(num_pages);
  for (int32_t p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

int32_t PagePool::allocate() {
  if (free_.empty()) return -1;
  int32_t p = free_.back();
  free_.pop_back();
  refcount_[p] = 1;
  return p;
}

void PagePool::retain(int32_t page) {
  if (page < 0 || page >= num_pages_ || refcount_[page] <= 0)
    throw Error("page pool: retain of a free or invalid page " + std::to_string(page));
  ++refcount_[page];
}

void PagePool::release(int32_t page) {
  if (page < 0 || page >= num_pages_ || refcount_[page] <= 0)
    throw Error("page pool: release of a free or invalid page " + std::to_string(page));
  if (--refcount_[page] == 0) free_.push_back(page);
}

int64_t PagePool::bytes_per_page() const { return page_bytes(page_size_, head_dim_, kv_dtype_); }

int64_t PagePool::page_bytes(int32_t page_size, int32_t head_dim, DType dtype) {
  return 2 * dtype_bytes(dtype, int64_t{page_size} * kv_row_width(head_dim, dtype)) +
         int64_t{page_size} * 4;
}

int32_t PagePool::pages_for_bytes(int64_t bytes, int32_t page_size, int32_t head_dim, DType dtype) {
  const int64_t n = bytes / page_bytes(page_size, head_dim, dtype);
  return static_cast<int32_t>(std::min<int64_t>(n, INT32_MAX));
}

}  // namespace redknot
