#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace redknot {

int64_t Tensor::numel() const {
  if (shape_.empty()) return 0;
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

int64_t Tensor::rows() const {
  if (shape_.empty()) return 0;
  int64_t n = 1;
  for (size_t i = 0; i + 1 < shape_.size(); ++i) n *= shape_[i];
  return n;
}

Tensor Tensor::host(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  for (int64_t d : t.shape_)
    if (d < 0) throw Error("negative tensor dimension in " + shape_str(t.shape_));
  size_t bytes = static_cast<size_t>(t.nbytes());
  // 64-byte alignment for vector loads; one extra cache line so that empty tensors own memory.
  size_t alloc = (bytes + 64 + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, alloc);
  if (!p) throw Error("out of host memory allocating " + std::to_string(bytes) + " bytes");
  std::memset(p, 0, alloc);
  t.holder_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
  return t;
}

Tensor Tensor::view(void* data, DType dtype, std::vector<int64_t> shape,
                    std::shared_ptr<void> holder, Device device) {
  Tensor t;
  t.data_ = data;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.holder_ = std::move(holder);
  t.device_ = device;
  return t;
}

Tensor Tensor::from_f32(const std::vector<float>& values, std::vector<int64_t> shape) {
  Tensor t = host(DType::F32, std::move(shape));
  if (t.numel() != static_cast<int64_t>(values.size()))
    throw Error("from_f32: value count does not match shape " + shape_str(t.shape_));
  std::memcpy(t.data_, values.data(), values.size() * 4);
  return t;
}

Tensor Tensor::from_i32(const std::vector<int32_t>& values, std::vector<int64_t> shape) {
  Tensor t = host(DType::I32, std::move(shape));
  if (t.numel() != static_cast<int64_t>(values.size()))
    throw Error("from_i32: value count does not match shape " + shape_str(t.shape_));
  std::memcpy(t.data_, values.data(), values.size() * 4);
  return t;
}

Tensor Tensor::rows_slice(int64_t r0, int64_t r1) const {
  if (r0 < 0 || r1 < r0 || r1 > rows())
    throw Error("rows_slice [" + std::to_string(r0) + ", " + std::to_string(r1) + ") out of " +
                describe());
  Tensor t = *this;
  int64_t row_bytes = dtype_bytes(dtype_, cols());
  t.data_ = static_cast<char*>(data_) + r0 * row_bytes;
  t.shape_ = {r1 - r0, cols()};
  return t;
}

Tensor Tensor::reshape(std::vector<int64_t> shape) const {
  Tensor t = *this;
  t.shape_ = std::move(shape);
  if (t.numel() != numel())
    throw Error("reshape " + describe() + " to " + shape_str(t.shape_) + ": element count differs");
  return t;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string Tensor::describe() const { return std::string(dtype_name(dtype_)) + shape_str(shape_); }

}  // namespace redknot
