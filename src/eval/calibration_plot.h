// The calibration plot: accuracy (EM, and top-1 agreement) of every setting tried against the
// prefill FLOPs it saved, drawn into an RGB raster (core/png.h writes it) with axes, ticks, a
// 5x7 bitmap font, full prefill's EM and the guard's EM floor.
#pragma once
#include <string>

#include "core/png.h"
#include "eval/calibrate.h"

namespace redknot {

// Colours of the plot (0xRRGGBB), named for tests and the legend.
inline constexpr uint32_t kPlotPass = 0x1a9850;    // EM of a setting meeting the guard
inline constexpr uint32_t kPlotFail = 0xd73027;    // EM of a setting missing it
inline constexpr uint32_t kPlotTop1 = 0x4575b4;    // top-1 agreement, in percent
inline constexpr uint32_t kPlotChosen = 0x000000;  // ring around the chosen setting
inline constexpr uint32_t kPlotGuard = 0xf46d43;   // full prefill's EM minus the allowed drop

// 5x7 glyphs for digits, capitals and a little punctuation (lower case drawn as capitals;
// anything else blank). Returns 7 rows, bit 4 the leftmost column.
const uint8_t* font5x7(char c);
// Draws `text` with its top-left at (x, y), each font pixel `scale` pixels wide.
void draw_text(RgbImage& img, int32_t x, int32_t y, const std::string& text, uint32_t rgb,
               int32_t scale = 1);

RgbImage plot_calibration(const CalibResult& r, const CalibGuard& guard, double full_em,
                          int32_t width = 720, int32_t height = 480);

}  // namespace redknot
