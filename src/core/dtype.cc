#include "core/dtype.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace redknot {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "f32";
    case DType::F16:
      return "f16";
    case DType::BF16:
      return "bf16";
    case DType::Q8_0:
      return "q8_0";
    case DType::I32:
      return "i32";
    case DType::F8_E4M3:
      return "f8_e4m3";
  }
  return "?";
}

int64_t dtype_bytes(DType t, int64_t n) {
  switch (t) {
    case DType::F32:
    case DType::I32:
      return n * 4;
    case DType::F16:
    case DType::BF16:
      return n * 2;
    case DType::Q8_0:
      return (n / kQ8Block) * kQ8BlockBytes;
    case DType::F8_E4M3:
      return n;
  }
  return 0;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        mant <<= 1;
        ++e;
      } while ((mant & 0x400) == 0);
      mant &= 0x3ff;
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | mant << 13;
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  uint32_t mant = u & 0x7fffff;
  if (((u >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00 | (mant ? 0x200 : 0));
  if (exp >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | static_cast<uint32_t>(exp) << 10 | (mant >> 13);
  uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}

float fp8_e4m3_to_f32(uint8_t v) {
  const uint32_t sign = (v & 0x80u) << 24;
  const uint32_t exp = (v >> 3) & 0xf, mant = v & 0x7;
  if (exp == 0xf && mant == 0x7)  // NaN keeps its sign: every code survives decode + encode
    return std::copysign(std::numeric_limits<float>::quiet_NaN(), (v & 0x80) ? -1.0f : 1.0f);
  float mag;
  if (exp == 0)
    mag = std::ldexp(static_cast<float>(mant), -9);  // subnormal: mant * 2^-6 / 8
  else
    mag = std::ldexp(static_cast<float>(8 + mant), static_cast<int>(exp) - 10);
  uint32_t u;
  std::memcpy(&u, &mag, 4);
  u |= sign;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint8_t f32_to_fp8_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  if (std::isnan(f)) return sign | 0x7f;
  const float a = std::fabs(f);
  if (a >= kFp8Max) return sign | 0x7e;  // saturate (448 = 0b1111'110)
  // Quantum of the binade of `a`: 2^(e-3) for normals (e >= -6), 2^-9 for subnormals.
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1): the leading bit is 2^(e-1)
  const int lead = std::max(e - 1, -6);
  const float quantum = std::ldexp(1.0f, lead - 3);
  // a / quantum is exact (power-of-two scaling); nearbyint rounds half to even.
  const float steps = std::nearbyint(a / quantum);
  const float r = steps * quantum;  // exact: at most 5 significant bits
  if (r >= kFp8Max) return sign | 0x7e;
  if (r == 0.0f) return sign;
  int re;
  const float m = std::frexp(r, &re);  // rounding may have carried into the next binade
  if (re - 1 < -6) return sign | static_cast<uint8_t>(std::ldexp(r, 9));  // subnormal code
  const int mant = static_cast<int>(std::ldexp(m, 4)) - 8;                // m in [0.5, 1) -> 8..15
  return sign | static_cast<uint8_t>((re - 1 + 7) << 3) | static_cast<uint8_t>(mant);
}

float fp8_quantize_row(const float* x, int64_t n, uint8_t* q) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / kFp8Max;
  for (int64_t i = 0; i < n; ++i) q[i] = scale > 0.0f ? f32_to_fp8_e4m3(x[i] / scale) : 0;
  return scale;
}

void convert_to_f32(DType src_type, const void* src, float* dst, int64_t n) {
  switch (src_type) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::BF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::Q8_0: {
      if (n % kQ8Block != 0) throw Error("q8_0 tensor size is not a multiple of 32");
      auto* b = static_cast<const uint8_t*>(src);
      for (int64_t blk = 0; blk < n / kQ8Block; ++blk, b += kQ8BlockBytes) {
        uint16_t d16;
        std::memcpy(&d16, b, 2);
        float d = f16_to_f32(d16);
        auto* q = reinterpret_cast<const int8_t*>(b + 2);
        for (int i = 0; i < kQ8Block; ++i) dst[blk * kQ8Block + i] = d * q[i];
      }
      return;
    }
    case DType::I32: {
      auto* s = static_cast<const int32_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::F8_E4M3: {
      auto* s = static_cast<const uint8_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp8_e4m3_to_f32(s[i]);
      return;
    }
  }
}

void convert_from_f32(const float* src, DType dst_type, void* dst, int64_t n) {
  switch (dst_type) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::F16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::F8_E4M3: {
      auto* d = static_cast<uint8_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_fp8_e4m3(src[i]);
      return;
    }
    default:
      throw Error(std::string("cannot convert f32 to ") + dtype_name(dst_type));
  }
}

}  // namespace redknot
