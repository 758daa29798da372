#include "eval/calibration_plot.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <map>

namespace redknot {

namespace {

constexpr uint32_t kInk = 0x000000, kGrid = 0xe6e6e6, kFull = 0x888888;

struct Glyphs {
  std::map<char, std::array<uint8_t, 7>> rows;
};

const Glyphs& glyphs() {
  static const Glyphs g{{
      {'0', {0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e}},
      {'1', {0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e}},
      {'2', {0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f}},
      {'3', {0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e}},
      {'4', {0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02}},
      {'5', {0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e}},
      {'6', {0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e}},
      {'7', {0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
      {'8', {0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e}},
      {'9', {0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c}},
      {'A', {0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11}},
      {'B', {0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e}},
      {'C', {0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e}},
      {'D', {0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c}},
      {'E', {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f}},
      {'F', {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10}},
      {'G', {0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f}},
      {'H', {0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11}},
      {'I', {0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}},
      {'J', {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c}},
      {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}},
      {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f}},
      {'M', {0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11}},
      {'N', {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}},
      {'O', {0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e}},
      {'P', {0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10}},
      {'Q', {0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d}},
      {'R', {0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11}},
      {'S', {0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e}},
      {'T', {0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
      {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e}},
      {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04}},
      {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a}},
      {'X', {0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11}},
      {'Y', {0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04}},
      {'Z', {0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f}},
      {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c}},
      {',', {0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08}},
      {'%', {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}},
      {'-', {0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00}},
      {'+', {0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00}},
      {':', {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00}},
      {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}},
      {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
      {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
      {'=', {0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00}},
      {'>', {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}},
      {'<', {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}},
  }};
  return g;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// A "nice" tick step (1, 2, 2.5 or 5 times a power of ten) giving at most `max_ticks` steps.
double tick_step(double span, int max_ticks) {
  if (!(span > 0)) return 1;
  const double raw = span / max_ticks, p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * p >= raw) return m * p;
  return 10 * p;
}

struct Axis {
  double lo = 0, hi = 1, step = 1;
  int32_t from = 0, to = 1;  // pixel of lo and of hi
  int32_t at(double v) const {
    return from + static_cast<int32_t>(std::lround((v - lo) / (hi - lo) * (to - from)));
  }
};

Axis make_axis(double lo, double hi, int32_t from, int32_t to) {
  if (hi - lo < 1e-9) lo -= 0.5, hi += 0.5;
  Axis a;
  a.step = tick_step(hi - lo, 8);
  a.lo = std::floor(lo / a.step + 1e-9) * a.step;
  a.hi = std::ceil(hi / a.step - 1e-9) * a.step;
  if (a.hi <= a.lo) a.hi = a.lo + a.step;
  a.from = from, a.to = to;
  return a;
}

void hline(RgbImage& img, int32_t x0, int32_t x1, int32_t y, uint32_t rgb, int32_t dash = 0) {
  for (int32_t x = x0; x <= x1; ++x)
    if (dash == 0 || ((x - x0) / dash) % 2 == 0) img.set(x, y, rgb);
}

void vline(RgbImage& img, int32_t x, int32_t y0, int32_t y1, uint32_t rgb) {
  for (int32_t y = y0; y <= y1; ++y) img.set(x, y, rgb);
}

void square(RgbImage& img, int32_t cx, int32_t cy, int32_t r, uint32_t rgb, bool filled) {
  for (int32_t y = cy - r; y <= cy + r; ++y)
    for (int32_t x = cx - r; x <= cx + r; ++x)
      if (filled || std::abs(x - cx) >= r - 1 || std::abs(y - cy) >= r - 1) img.set(x, y, rgb);
}

void cross(RgbImage& img, int32_t cx, int32_t cy, int32_t r, uint32_t rgb) {
  for (int32_t d = -r; d <= r; ++d) img.set(cx + d, cy + d, rgb), img.set(cx + d, cy - d, rgb);
}

int32_t text_width(const std::string& s, int32_t scale) {
  return static_cast<int32_t>(s.size()) * 6 * scale;
}

}  // namespace

const uint8_t* font5x7(char c) {
  if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  const auto& rows = glyphs().rows;
  const auto it = rows.find(c);
  return it == rows.end() ? nullptr : it->second.data();
}

void draw_text(RgbImage& img, int32_t x, int32_t y, const std::string& text, uint32_t rgb,
               int32_t scale) {
  for (char c : text) {
    if (const uint8_t* g = font5x7(c))
      for (int32_t r = 0; r < 7; ++r)
        for (int32_t col = 0; col < 5; ++col)
          if (g[r] & (0x10 >> col))
            for (int32_t dy = 0; dy < scale; ++dy)
              for (int32_t dx = 0; dx < scale; ++dx)
                img.set(x + col * scale + dx, y + r * scale + dy, rgb);
    x += 6 * scale;  // 5 columns and a space
  }
}

RgbImage plot_calibration(const CalibResult& r, const CalibGuard& guard, double full_em,
                          int32_t width, int32_t height) {
  RgbImage img(width, height);
  const int32_t left = 70, right = width - 30, top = 50, bottom = height - 80;
  draw_text(img, left, 12, "CALIBRATION: ACCURACY VS PREFILL FLOPS SAVED", kInk, 2);

  // Ranges: every point's FLOPs saved; every EM and top-1, full prefill's EM and the guard's floor.
  const double full = 100 * full_em, floor_em = std::clamp(full - guard.max_em_drop, 0.0, 100.0);
  double xlo = 100, xhi = 0, ylo = std::min(full, floor_em), yhi = std::max(full, floor_em);
  for (const CalibPoint& p : r.points) {
    xlo = std::min(xlo, 100 * p.measure.flops_saved),
    xhi = std::max(xhi, 100 * p.measure.flops_saved);
    for (double v : {100 * p.measure.em, 100 * p.measure.top1})
      ylo = std::min(ylo, v), yhi = std::max(yhi, v);
  }
  if (r.points.empty()) xlo = 0, xhi = 100;
  const Axis ax = make_axis(xlo, xhi, left, right), ay = make_axis(ylo, yhi, bottom, top);

  // Grid, ticks and their labels.
  for (double v = ax.lo; v <= ax.hi + ax.step / 2; v += ax.step) {
    const int32_t x = ax.at(v);
    vline(img, x, top, bottom, kGrid);
    vline(img, x, bottom, bottom + 4, kInk);
    const std::string s = num(std::round(v * 100) / 100);
    draw_text(img, x - text_width(s, 1) / 2, bottom + 8, s, kInk);
  }
  for (double v = ay.lo; v <= ay.hi + ay.step / 2; v += ay.step) {
    const int32_t y = ay.at(v);
    hline(img, left, right, y, kGrid);
    hline(img, left - 4, left, y, kInk);
    const std::string s = num(std::round(v * 100) / 100);
    draw_text(img, left - 8 - text_width(s, 1), y - 3, s, kInk);
  }
  vline(img, left, top, bottom, kInk);
  hline(img, left, right, bottom, kInk);
  const std::string xlabel = "PREFILL FLOPS SAVED VS FULL (%)";
  draw_text(img, (left + right - text_width(xlabel, 1)) / 2, bottom + 22, xlabel, kInk);
  draw_text(img, 8, top - 14, "EM / TOP-1 (%)", kInk);

  // Full prefill's EM and the lowest EM the guard allows.
  hline(img, left, right, ay.at(full), kFull);
  hline(img, left, right, ay.at(floor_em), kPlotGuard, 6);

  for (size_t i = 0; i < r.points.size(); ++i) {
    const CalibMeasure& m = r.points[i].measure;
    const int32_t x = ax.at(100 * m.flops_saved);
    cross(img, x, ay.at(100 * m.top1), 5, kPlotTop1);  // tips show past an EM square at the same y
    square(img, x, ay.at(100 * m.em), 3, r.points[i].pass ? kPlotPass : kPlotFail, true);
    if (r.chosen && *r.chosen == i) square(img, x, ay.at(100 * m.em), 8, kPlotChosen, false);
  }

  // Legend.
  const int32_t ly = height - 30;
  int32_t lx = left;
  auto item = [&](uint32_t rgb, const std::string& text, int kind) {
    if (kind == 0) square(img, lx + 4, ly + 3, 3, rgb, true);
    if (kind == 1) cross(img, lx + 4, ly + 3, 3, rgb);
    if (kind == 2) square(img, lx + 4, ly + 3, 5, rgb, false);
    if (kind == 3) hline(img, lx - 2, lx + 10, ly + 3, rgb, kind == 3 && rgb == kPlotGuard ? 3 : 0);
    lx += 16;
    draw_text(img, lx, ly, text, kInk);
    lx += text_width(text, 1) + 14;
  };
  item(kPlotPass, "EM, PASS", 0);
  item(kPlotFail, "EM, FAIL", 0);
  item(kPlotTop1, "TOP-1", 1);
  item(kPlotChosen, "CHOSEN", 2);
  item(kFull, "FULL EM " + num(std::round(full * 10) / 10), 3);
  item(kPlotGuard, "GUARD FLOOR " + num(std::round(floor_em * 10) / 10), 3);
  return img;
}

}  // namespace redknot
