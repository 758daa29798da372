// FP8 e4m3 (torch.float8_e4m3fn) conversions against an independent decoding of all 256 codes,
// known encodings, round-to-nearest-even at every midpoint and saturation.
#include "core/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace redknot {
namespace {

// The e4m3fn value of a code from its definition: sign, 4-bit exponent (bias 7), 3-bit mantissa,
// exponent 0 subnormal, S.1111.111 NaN, no infinities.
double e4m3_by_definition(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? m / 8.0 * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -mag : mag;
}

TEST(Fp8E4m3, DecodesEveryCode) {
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const double want = e4m3_by_definition(c);
    const float got = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
      ++nans;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << "code " << c;
    EXPECT_EQ(std::signbit(got), c >= 128) << "code " << c;
  }
  EXPECT_EQ(nans, 2);  // 0x7F and 0xFF only
}

TEST(Fp8E4m3, KnownEncodings) {
  EXPECT_EQ(f32_to_fp8_e4m3(0.0f), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_fp8_e4m3(1.0f), 0x38);
  EXPECT_EQ(f32_to_fp8_e4m3(-2.0f), 0xC0);
  EXPECT_EQ(f32_to_fp8_e4m3(0.5f), 0x30);
  EXPECT_EQ(f32_to_fp8_e4m3(448.0f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-448.0f), 0xFE);
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.0f, -6)), 0x08);  // smallest normal
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.0f, -9)), 0x01);  // smallest subnormal
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(7.0f, -9)), 0x07);  // largest subnormal
  EXPECT_EQ(f32_to_fp8_e4m3(240.0f), 0x77);
  EXPECT_EQ(f32_to_fp8_e4m3(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(f32_to_fp8_e4m3(-std::numeric_limits<float>::quiet_NaN()), 0xFF);
  EXPECT_EQ(fp8_e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x38), 1.0f);
}

TEST(Fp8E4m3, SaturatesInsteadOfOverflowing) {
  EXPECT_EQ(f32_to_fp8_e4m3(449.0f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(500.0f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(1e30f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-1e30f), 0xFE);
  EXPECT_EQ(f32_to_fp8_e4m3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-std::numeric_limits<float>::infinity()), 0xFE);
  // Below half the smallest subnormal: zero (with the sign kept).
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.0f, -11)), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3(-std::ldexp(1.0f, -11)), 0x80);
}

// Every code (NaNs with their sign) encodes to itself; every midpoint between neighbours rounds to
// the code with the even mantissa; a hair off the midpoint rounds to the nearer one.
TEST(Fp8E4m3, RoundsToNearestEven) {
  std::vector<int> positive;  // finite non-negative codes in increasing value order
  for (int c = 0; c < 0x7F; ++c) positive.push_back(c);
  for (int c = 0; c < 256; ++c)  // NaNs included: raw FP8 bytes may travel through f32
    EXPECT_EQ(f32_to_fp8_e4m3(fp8_e4m3_to_f32(static_cast<uint8_t>(c))), c) << "code " << c;
  for (size_t i = 0; i + 1 < positive.size(); ++i) {
    const int lo = positive[i], hi = positive[i + 1];
    const float a = fp8_e4m3_to_f32(lo), b = fp8_e4m3_to_f32(hi);
    ASSERT_LT(a, b);
    const float mid = (a + b) / 2;  // exact in f32
    const int even = (lo & 1) == 0 ? lo : hi;
    EXPECT_EQ(f32_to_fp8_e4m3(mid), even) << "between " << a << " and " << b;
    EXPECT_EQ(f32_to_fp8_e4m3(-mid), even | 0x80) << "between " << -a << " and " << -b;
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, a)), lo) << "just below " << mid;
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, b)), hi) << "just above " << mid;
  }
}

TEST(Fp8E4m3, BulkConversionsAgreeWithScalar) {
  std::vector<float> v = {0.0f, 1.0f, -3.3f, 447.0f, 1000.0f, 0.001f, -0.0123f};
  std::vector<uint8_t> q(v.size());
  convert_from_f32(v.data(), DType::F8_E4M3, q.data(), static_cast<int64_t>(v.size()));
  std::vector<float> back(v.size());
  convert_to_f32(DType::F8_E4M3, q.data(), back.data(), static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_EQ(q[i], f32_to_fp8_e4m3(v[i]));
    EXPECT_EQ(back[i], fp8_e4m3_to_f32(q[i]));
  }
  EXPECT_EQ(dtype_bytes(DType::F8_E4M3, 100), 100);
  EXPECT_STREQ(dtype_name(DType::F8_E4M3), "f8_e4m3");
}

}  // namespace
}  // namespace redknot
