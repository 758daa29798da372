// Element types and the scalar conversions every backend shares.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace redknot {

enum class DType : uint8_t { F32, F16, BF16, Q8_0, I32 };

// Q8_0 (GGUF): blocks of 32 values, each an f16 scale followed by 32 int8 quants (34 bytes).
inline constexpr int kQ8Block = 32;
inline constexpr int kQ8BlockBytes = 34;

const char* dtype_name(DType t);

// Bytes needed for n elements (n must be a multiple of 32 for Q8_0).
int64_t dtype_bytes(DType t, int64_t n);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even, NaN kept quiet.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of `src` (any dtype) to f32. Q8_0 needs n % 32 == 0.
void convert_to_f32(DType src_type, const void* src, float* dst, int64_t n);
// Converts n f32 values to `dst_type` (F32, F16, BF16).
void convert_from_f32(const float* src, DType dst_type, void* dst, int64_t n);

}  // namespace redknot
