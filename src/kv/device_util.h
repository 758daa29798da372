// Small host -> device helpers shared by the KV stores.
#pragma once
#include <vector>

#include "backend/backend.h"

namespace redknot {

// values as an i32 tensor [n] on the backend's device (n may be 0).
inline Tensor upload_i32(Backend& backend, const std::vector<int32_t>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  Tensor t = backend.alloc_uninit(DType::I32, {n});  // every element copied below
  if (n > 0) backend.copy_from_host(t, Tensor::from_i32(values, {n}));
  return t;
}

}  // namespace redknot
