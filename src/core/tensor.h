// A dense row-major tensor: shape, dtype, the device it lives on, and a shared handle that keeps
// its storage alive (an owned allocation, a memory-mapped file, a device buffer). Views share it.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace redknot {

enum class Device : uint8_t { Host, Cuda };

class Tensor {
 public:
  Tensor() = default;

  // Allocates zero-initialised host memory.
  static Tensor host(DType dtype, std::vector<int64_t> shape);
  // Wraps memory owned by `holder` (no copy).
  static Tensor view(void* data, DType dtype, std::vector<int64_t> shape,
                     std::shared_ptr<void> holder, Device device = Device::Host);
  // Host f32 tensor holding a copy of `values`.
  static Tensor from_f32(const std::vector<float>& values, std::vector<int64_t> shape);
  static Tensor from_i32(const std::vector<int32_t>& values, std::vector<int64_t> shape);

  // A default-constructed Tensor (no shape) means "absent", e.g. no bias: numel() == 0.
  bool empty() const { return shape_.empty(); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int64_t numel() const;
  int64_t nbytes() const { return dtype_bytes(dtype_, numel()); }
  // Matrix view of the tensor: all leading dims folded into rows, last dim = cols.
  int64_t rows() const;
  int64_t cols() const { return shape_.empty() ? 0 : shape_.back(); }

  void* raw() const { return data_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(data_);
  }

  // Rows [r0, r1) of the matrix view, sharing storage. Not valid for Q8_0 unless cols % 32 == 0.
  Tensor rows_slice(int64_t r0, int64_t r1) const;
  // Same storage, new shape with the same element count.
  Tensor reshape(std::vector<int64_t> shape) const;

  const std::shared_ptr<void>& holder() const { return holder_; }
  std::string describe() const;  // "bf16[4096, 128]"

 private:
  std::shared_ptr<void> holder_;
  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Device device_ = Device::Host;
  std::vector<int64_t> shape_;
};

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace redknot
