#include "core/png.h"

#include <algorithm>
#include <array>
#include <fstream>

#include "core/error.h"

namespace redknot {

namespace {

std::array<uint32_t, 256> crc_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
    t[n] = c;
  }
  return t;
}

void put_u32be(std::vector<uint8_t>& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}

// length, type, data, CRC over type + data
void put_chunk(std::vector<uint8_t>& out, const char type[4], const std::vector<uint8_t>& data) {
  put_u32be(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_u32be(out, crc32(out.data() + type_at, 4 + data.size()));
}

}  // namespace

RgbImage::RgbImage(int32_t w, int32_t h, uint32_t rgb) : width(w), height(h) {
  if (w <= 0 || h <= 0) throw Error("image size must be positive");
  pixels.resize(static_cast<size_t>(w) * h * 3);
  for (size_t i = 0; i < pixels.size(); i += 3) {
    pixels[i] = static_cast<uint8_t>(rgb >> 16);
    pixels[i + 1] = static_cast<uint8_t>(rgb >> 8);
    pixels[i + 2] = static_cast<uint8_t>(rgb);
  }
}

void RgbImage::set(int32_t x, int32_t y, uint32_t rgb) {
  if (x < 0 || y < 0 || x >= width || y >= height) return;
  uint8_t* p = &pixels[(static_cast<size_t>(y) * width + x) * 3];
  p[0] = static_cast<uint8_t>(rgb >> 16), p[1] = static_cast<uint8_t>(rgb >> 8);
  p[2] = static_cast<uint8_t>(rgb);
}

uint32_t RgbImage::get(int32_t x, int32_t y) const {
  const uint8_t* p = &pixels.at((static_cast<size_t>(y) * width + x) * 3);
  return (uint32_t{p[0]} << 16) | (uint32_t{p[1]} << 8) | p[2];
}

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> table = crc_table();
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ data[i]) & 0xff] ^ (c >> 8);
  return ~c;
}

uint32_t adler32(const uint8_t* data, size_t n, uint32_t adler) {
  constexpr uint32_t kMod = 65521;
  uint32_t a = adler & 0xffff, b = adler >> 16;
  for (size_t i = 0; i < n; ++i) {
    a = (a + data[i]) % kMod;
    b = (b + a) % kMod;
  }
  return (b << 16) | a;
}

std::vector<uint8_t> encode_png(const RgbImage& img) {
  if (img.width <= 0 || img.height <= 0 ||
      img.pixels.size() != static_cast<size_t>(img.width) * img.height * 3)
    throw Error("PNG: empty raster or pixel count does not match its size");
  const size_t row = static_cast<size_t>(img.width) * 3 + 1;  // filter byte 0 (None) + RGB
  if (row * img.height > (size_t{1} << 31)) throw Error("PNG: raster too large");
  std::vector<uint8_t> raw;
  raw.reserve(row * img.height);
  for (int32_t y = 0; y < img.height; ++y) {
    raw.push_back(0);
    const auto* p = img.pixels.data() + static_cast<size_t>(y) * img.width * 3;
    raw.insert(raw.end(), p, p + static_cast<size_t>(img.width) * 3);
  }
  // zlib: CMF 0x78 (deflate, 32K window), FLG 0x01 (check bits: 0x7801 % 31 == 0), stored blocks
  // of at most 65535 bytes (BFINAL on the last; LEN, NLEN little-endian), Adler-32 big-endian.
  std::vector<uint8_t> z = {0x78, 0x01};
  size_t at = 0;
  do {
    const size_t n = std::min<size_t>(65535, raw.size() - at);
    const bool last = at + n == raw.size();
    z.push_back(last ? 1 : 0);
    z.push_back(static_cast<uint8_t>(n)), z.push_back(static_cast<uint8_t>(n >> 8));
    z.push_back(static_cast<uint8_t>(~n)), z.push_back(static_cast<uint8_t>(~n >> 8));
    z.insert(z.end(), raw.begin() + at, raw.begin() + at + n);
    at += n;
  } while (at < raw.size());
  put_u32be(z, adler32(raw.data(), raw.size()));

  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32be(ihdr, static_cast<uint32_t>(img.width));
  put_u32be(ihdr, static_cast<uint32_t>(img.height));
  // bit depth 8, colour type 2 (RGB), compression 0, filter 0, no interlace
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});
  put_chunk(out, "IHDR", ihdr);
  put_chunk(out, "IDAT", z);
  put_chunk(out, "IEND", {});
  return out;
}

void write_png(const std::string& path, const RgbImage& img) {
  const std::vector<uint8_t> bytes = encode_png(img);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) throw Error(path + ": cannot write the PNG file");
}

}  // namespace redknot
