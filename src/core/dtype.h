// Element types and the scalar conversions every backend shares.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace redknot {

// F8_E4M3: OCP FP8 e4m3 as torch.float8_e4m3fn (bias 7, no infinities, max 448, NaN = 0x7F /
// 0xFF). Appended last so that stored dtype codes of the others keep their values.
enum class DType : uint8_t { F32, F16, BF16, Q8_0, I32, F8_E4M3 };

// Largest finite e4m3 value: per-token / per-channel scales are absmax / kFp8Max.
inline constexpr float kFp8Max = 448.0f;
// Bytes after the codes of an FP8 KV row holding its f32 scale (Backend::pack_fp8_kv_rows).
inline constexpr int64_t kFp8KvScaleBytes = 4;
// Square block of the block-scaled FP8 weight layout (Qwen3-FP8 / DeepSeek weight_block_size).
inline constexpr int kFp8Block = 128;

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

// e4m3fn decode: exact (every code is representable in f32); 0x7F / 0xFF give NaN (signed).
float fp8_e4m3_to_f32(uint8_t v);
// e4m3fn encode: round-to-nearest-even, finite values beyond ±448 saturate to ±448 (as
// torch's saturating cast in FP8 quantizers; e4m3fn has no infinity), ±inf saturates, NaN ->
// 0x7F with its sign (0xFF), as torch. encode(decode(c)) == c for all 256 codes, so FP8 bytes
// (KV rows with their scales included) survive a trip through f32.
uint8_t f32_to_fp8_e4m3(float f);
uint16_t f32_to_f16(float f);

// Dynamic FP8 quantization of one row (the per-token rule of every backend): returns
// scale = absmax / 448 and writes q[i] = e4m3(x[i] / scale) (f32 division; all zeros when
// scale == 0). x: [n] f32; q: [n] e4m3 codes
float fp8_quantize_row(const float* x, int64_t n, uint8_t* q);

// Converts n elements of `src` (any dtype) to f32. Q8_0 needs n % 32 == 0.
void convert_to_f32(DType src_type, const void* src, float* dst, int64_t n);
// Converts n f32 values to `dst_type` (F32, F16, BF16, F8_E4M3 saturating, no scale).
void convert_from_f32(const float* src, DType dst_type, void* dst, int64_t n);

}  // namespace redknot
