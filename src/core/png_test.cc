// The PNG encoder: known checksum vectors, and a decode of what it writes (chunk layout, every
// chunk's CRC, the zlib header, stored blocks, Adler-32) back to the pixels it was given.
#include "core/png.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "core/error.h"

namespace redknot {
namespace {

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

struct Chunk {
  std::string type;
  std::vector<uint8_t> data;
};

// Splits a PNG into its chunks, checking the signature and every CRC.
std::vector<Chunk> chunks_of(const std::vector<uint8_t>& png) {
  const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  EXPECT_GE(png.size(), 8u);
  EXPECT_EQ(std::memcmp(png.data(), sig, 8), 0);
  std::vector<Chunk> out;
  size_t at = 8;
  while (at + 12 <= png.size()) {
    const uint32_t len = be32(&png[at]);
    EXPECT_LE(at + 12 + len, png.size());
    Chunk c;
    c.type.assign(reinterpret_cast<const char*>(&png[at + 4]), 4);
    c.data.assign(png.begin() + at + 8, png.begin() + at + 8 + len);
    EXPECT_EQ(be32(&png[at + 8 + len]), crc32(&png[at + 4], 4 + len)) << c.type;
    out.push_back(std::move(c));
    at += 12 + len;
  }
  EXPECT_EQ(at, png.size());
  return out;
}

// Inflates a zlib stream made only of stored blocks (what encode_png writes).
std::vector<uint8_t> inflate_stored(const std::vector<uint8_t>& z) {
  std::vector<uint8_t> raw;
  EXPECT_EQ(z[0], 0x78);
  EXPECT_EQ(((z[0] << 8) | z[1]) % 31, 0);  // zlib header check bits
  size_t at = 2;
  for (bool last = false; !last;) {
    last = z.at(at) & 1;
    EXPECT_EQ((z[at] >> 1) & 3, 0) << "not a stored block";
    const uint16_t len = z.at(at + 1) | (z.at(at + 2) << 8);
    const uint16_t nlen = z.at(at + 3) | (z.at(at + 4) << 8);
    EXPECT_EQ(static_cast<uint16_t>(~len), nlen);
    raw.insert(raw.end(), z.begin() + at + 5, z.begin() + at + 5 + len);
    at += 5 + len;
  }
  EXPECT_EQ(at + 4, z.size());
  EXPECT_EQ(be32(&z[at]), adler32(raw.data(), raw.size()));
  return raw;
}

TEST(Png, ChecksumsMatchKnownVectors) {
  const std::string check = "123456789";
  EXPECT_EQ(crc32(reinterpret_cast<const uint8_t*>(check.data()), check.size()), 0xCBF43926u);
  const std::string wiki = "Wikipedia";
  EXPECT_EQ(adler32(reinterpret_cast<const uint8_t*>(wiki.data()), wiki.size()), 0x11E60398u);
  // PNG's own IEND chunk: CRC of "IEND" is fixed by the format.
  EXPECT_EQ(crc32(reinterpret_cast<const uint8_t*>("IEND"), 4), 0xAE426082u);
}

void expect_round_trip(const RgbImage& img) {
  const std::vector<Chunk> cs = chunks_of(encode_png(img));
  ASSERT_EQ(cs.size(), 3u);
  EXPECT_EQ(cs[0].type, "IHDR");
  EXPECT_EQ(cs[1].type, "IDAT");
  EXPECT_EQ(cs[2].type, "IEND");
  ASSERT_EQ(cs[0].data.size(), 13u);
  EXPECT_EQ(be32(&cs[0].data[0]), static_cast<uint32_t>(img.width));
  EXPECT_EQ(be32(&cs[0].data[4]), static_cast<uint32_t>(img.height));
  EXPECT_EQ(cs[0].data[8], 8);  // bit depth
  EXPECT_EQ(cs[0].data[9], 2);  // RGB
  const std::vector<uint8_t> raw = inflate_stored(cs[1].data);
  const size_t row = static_cast<size_t>(img.width) * 3 + 1;
  ASSERT_EQ(raw.size(), row * img.height);
  for (int32_t y = 0; y < img.height; ++y) {
    EXPECT_EQ(raw[y * row], 0) << "filter byte of row " << y;
    for (int32_t x = 0; x < img.width; ++x) {
      const uint8_t* p = &raw[y * row + 1 + x * 3];
      ASSERT_EQ((uint32_t{p[0]} << 16) | (p[1] << 8) | p[2], img.get(x, y)) << x << "," << y;
    }
  }
}

TEST(Png, SmallImageDecodesToItsPixels) {
  RgbImage img(3, 2, 0x102030);
  img.set(0, 0, 0xff0000);
  img.set(2, 1, 0x00ff7f);
  img.set(5, 5, 0x123456);  // outside: ignored
  EXPECT_EQ(img.get(0, 0), 0xff0000u);
  EXPECT_EQ(img.get(1, 0), 0x102030u);
  expect_round_trip(img);
}

TEST(Png, LargeImageSpansSeveralStoredBlocks) {
  RgbImage img(200, 150);  // 90150 raw bytes: two stored blocks
  for (int32_t y = 0; y < img.height; ++y)
    for (int32_t x = 0; x < img.width; ++x) img.set(x, y, (x * 1237u + y * 7919u) & 0xffffff);
  expect_round_trip(img);
}

TEST(Png, EmptyRasterIsAnError) {
  EXPECT_THROW(RgbImage(0, 4), Error);
  EXPECT_THROW(encode_png(RgbImage{}), Error);
}

}  // namespace
}  // namespace redknot
