// A minimal PNG encoder for 8-bit RGB rasters (plots written by the CLI; no image library is
// available to the build): zlib stream of stored (uncompressed) deflate blocks, CRC-32 per chunk,
// Adler-32 over the raw scanlines. Readable by every PNG decoder; files are ~3 bytes per pixel.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace redknot {

// An RGB raster, row-major from the top-left: pixels [height][width][3].
struct RgbImage {
  int32_t width = 0, height = 0;
  std::vector<uint8_t> pixels;

  RgbImage() = default;
  RgbImage(int32_t w, int32_t h, uint32_t rgb = 0xffffff);  // filled with `rgb` (0xRRGGBB)
  // Sets one pixel; points outside the raster are ignored (drawing clips for free).
  void set(int32_t x, int32_t y, uint32_t rgb);
  uint32_t get(int32_t x, int32_t y) const;  // 0xRRGGBB
};

// The checksums PNG and zlib use (ISO-HDLC CRC-32; Adler-32 of RFC 1950).
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);
uint32_t adler32(const uint8_t* data, size_t n, uint32_t adler = 1);

// The PNG file's bytes; throws Error on an empty or oversized raster.
std::vector<uint8_t> encode_png(const RgbImage& img);
// Writes encode_png(img) to `path`; throws Error naming the file when it cannot.
void write_png(const std::string& path, const RgbImage& img);

}  // namespace redknot
