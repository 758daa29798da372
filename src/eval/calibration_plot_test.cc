// The calibration plot: glyphs land where draw_text puts them, every series shows in its colour,
// the chosen point is ringed, and the raster encodes as a PNG.
#include "eval/calibration_plot.h"

#include <gtest/gtest.h>

namespace redknot {
namespace {

int64_t count(const RgbImage& img, uint32_t rgb) {
  int64_t n = 0;
  for (int32_t y = 0; y < img.height; ++y)
    for (int32_t x = 0; x < img.width; ++x) n += img.get(x, y) == rgb;
  return n;
}

TEST(CalibrationPlot, TextDrawsTheFontsPixels) {
  RgbImage img(20, 10);
  draw_text(img, 1, 2, "7", 0x000000);
  const uint8_t* g = font5x7('7');
  ASSERT_NE(g, nullptr);
  for (int32_t r = 0; r < 7; ++r)
    for (int32_t c = 0; c < 5; ++c)
      EXPECT_EQ(img.get(1 + c, 2 + r) == 0x000000, (g[r] & (0x10 >> c)) != 0) << r << "," << c;
  EXPECT_EQ(font5x7('a'), font5x7('A'));  // lower case drawn as capitals
  EXPECT_EQ(font5x7('~'), nullptr);
  for (char c : std::string("0123456789%.-ABCXYZ")) EXPECT_NE(font5x7(c), nullptr) << c;
}

TEST(CalibrationPlot, DrawsEverySeriesAndEncodes) {
  CalibResult r;
  auto add = [&](double em, double top1, double saved, bool pass) {
    CalibPoint p;
    p.measure.em = em, p.measure.top1 = top1, p.measure.flops_saved = saved, p.pass = pass;
    r.points.push_back(p);
  };
  add(1.0, 1.0, 0.60, true);
  add(0.9, 0.95, 0.72, false);
  add(0.99, 0.99, 0.68, true);
  r.chosen = 2;
  const RgbImage img = plot_calibration(r, {0.99, 1.0}, 1.0, 640, 400);
  EXPECT_EQ(img.width, 640);
  EXPECT_EQ(img.height, 400);
  // Two passing squares plus the legend's; one failing plus the legend's.
  EXPECT_GE(count(img, kPlotPass), 3 * 49);
  EXPECT_GE(count(img, kPlotFail), 2 * 49);
  EXPECT_GE(count(img, kPlotTop1), 21 + 13);  // one whole cross and the legend's, at least
  EXPECT_GT(count(img, kPlotGuard), 0);
  const std::vector<uint8_t> png = encode_png(img);
  EXPECT_GT(png.size(), static_cast<size_t>(640 * 400 * 3));
  // Without a pick there is no ring: fewer black pixels than with one.
  CalibResult none = r;
  none.chosen.reset();
  EXPECT_LT(count(plot_calibration(none, {0.99, 1.0}, 1.0, 640, 400), kPlotChosen),
            count(img, kPlotChosen));
}

}  // namespace
}  // namespace redknot
