// flowdiff/io/plot.hpp — small raster plots for 2D samples: scatter plots, trajectories and
// titles, drawn straight into an io::Image (no plotting library needed). Points are soft discs
// blended with opacity, so dense regions read as density; text uses stb_easy_font's bitmap glyphs.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/io/image.hpp"

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wpedantic"
#endif
#include <stb/stb_easy_font.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace flowdiff::io {

/// A qualitative palette (Tableau 10) for class colours.
inline Rgb palette(int i) {
  static constexpr std::array<Rgb, 10> c{{{31, 119, 180},
                                          {255, 127, 14},
                                          {44, 160, 44},
                                          {214, 39, 40},
                                          {148, 103, 189},
                                          {140, 86, 75},
                                          {227, 119, 194},
                                          {127, 127, 127},
                                          {188, 189, 34},
                                          {23, 190, 207}}};
  return c[static_cast<std::size_t>(((i % 10) + 10) % 10)];
}

/// Draws `text` with its top-left corner at pixel (x, y), `scale` pixels per glyph unit.
inline void draw_text(Image& img, int x, int y, const std::string& text, Rgb color = {0, 0, 0},
                      int scale = 2) {
  std::vector<char> buf(text.size() * 300 + 64);
  std::string t = text;
  const int quads = stb_easy_font_print(0, 0, t.data(), nullptr, buf.data(), static_cast<int>(buf.size()));
  for (int q = 0; q < quads; ++q) {
    // Each vertex is x, y, z (floats) and 4 colour bytes: 16 bytes; a quad is 4 vertices.
    const float* v0 = reinterpret_cast<const float*>(buf.data() + q * 64);
    const float* v2 = reinterpret_cast<const float*>(buf.data() + q * 64 + 32);
    const int x0 = x + static_cast<int>(std::lround(v0[0] * scale));
    const int y0 = y + static_cast<int>(std::lround(v0[1] * scale));
    const int x1 = x + static_cast<int>(std::lround(v2[0] * scale));
    const int y1 = y + static_cast<int>(std::lround(v2[1] * scale));
    for (int yy = std::min(y0, y1); yy < std::max(y0, y1); ++yy)
      for (int xx = std::min(x0, x1); xx < std::max(x0, x1); ++xx) img.set(xx, yy, color);
  }
}

/// A square scatter/trajectory plot of the region [x_lo, x_hi] × [y_lo, y_hi].
class Plot2D {
 public:
  Plot2D(int size_px, double x_lo, double x_hi, double y_lo, double y_hi, std::string title = {})
      : img_(size_px, size_px + header_), x_lo_(x_lo), x_hi_(x_hi), y_lo_(y_lo), y_hi_(y_hi) {
    require<config_error>(x_hi > x_lo && y_hi > y_lo, "Plot2D: empty range [", x_lo, ", ", x_hi,
                          "] x [", y_lo, ", ", y_hi, "]");
    for (int i = 0; i < size_px; ++i) {  // frame
      img_.set(i, header_, {180, 180, 180});
      img_.set(i, header_ + size_px - 1, {180, 180, 180});
      img_.set(0, header_ + i, {180, 180, 180});
      img_.set(size_px - 1, header_ + i, {180, 180, 180});
    }
    // Axes through the origin, when visible.
    const int ox = px(0.0), oy = py(0.0);
    for (int i = 0; i < size_px; ++i) {
      if (x_lo < 0 && x_hi > 0) img_.set(ox, header_ + i, {225, 225, 225});
      if (y_lo < 0 && y_hi > 0) img_.set(i, oy, {225, 225, 225});
    }
    if (!title.empty()) draw_text(img_, 8, 6, title, {20, 20, 20}, 2);
  }

  /// Pixel column / row of a data coordinate.
  int px(double x) const {
    return static_cast<int>(std::lround((x - x_lo_) / (x_hi_ - x_lo_) * (size() - 1)));
  }
  int py(double y) const {
    return header_ + static_cast<int>(std::lround((y_hi_ - y) / (y_hi_ - y_lo_) * (size() - 1)));
  }
  int size() const { return img_.width; }

  /// One soft disc of radius r pixels at (x, y).
  void point(double x, double y, Rgb c, double radius = 1.5, float opacity = 0.5f) {
    if (!std::isfinite(x) || !std::isfinite(y)) return;
    const double cx = (x - x_lo_) / (x_hi_ - x_lo_) * (size() - 1);
    const double cy = header_ + (y_hi_ - y) / (y_hi_ - y_lo_) * (size() - 1);
    const int r = static_cast<int>(std::ceil(radius + 1));
    for (int dy = -r; dy <= r; ++dy)
      for (int dx = -r; dx <= r; ++dx) {
        const int ix = static_cast<int>(std::floor(cx)) + dx, iy = static_cast<int>(std::floor(cy)) + dy;
        if (iy < header_) continue;
        const double d = std::hypot(ix + 0.5 - cx, iy + 0.5 - cy);
        const double cover = std::clamp(radius + 0.5 - d, 0.0, 1.0);
        if (cover > 0) img_.blend(ix, iy, c, opacity * static_cast<float>(cover));
      }
  }

  /// Scatter of a batch x: [N, 2]; colours[i] (optional) selects the palette entry per point.
  template <class T>
  void scatter(View<const T, Cpu> x, const std::vector<int>& colours = {}, double radius = 1.5,
               float opacity = 0.5f) {
    require<shape_error>(x.rank() == 2 && x.dim(1) == 2, "Plot2D::scatter: x must be [N, 2], got ",
                         x.shape());
    require<shape_error>(colours.empty() || colours.size() == static_cast<std::size_t>(x.dim(0)),
                         "Plot2D::scatter: ", colours.size(), " colours for ", x.dim(0), " points");
    for (index_t i = 0; i < x.dim(0); ++i)
      point(x(i, 0), x(i, 1), palette(colours.empty() ? 0 : colours[static_cast<std::size_t>(i)]),
            radius, opacity);
  }

  /// A straight segment between two data points (anti-aliasing by dense sampling).
  void line(double x0, double y0, double x1, double y1, Rgb c, float opacity = 0.6f) {
    if (!std::isfinite(x0) || !std::isfinite(y0) || !std::isfinite(x1) || !std::isfinite(y1)) return;
    const double len = std::hypot(px(x1) - px(x0), py(y1) - py(y0));
    const int n = std::max(2, static_cast<int>(len * 2));
    for (int k = 0; k <= n; ++k) {
      const double a = double(k) / n;
      const int ix = px(x0 + a * (x1 - x0)), iy = py(y0 + a * (y1 - y0));
      if (iy >= header_) img_.blend(ix, iy, c, opacity);
    }
  }

  /// A caption line under the title.
  void caption(const std::string& text) { draw_text(img_, 8, 30, text, {90, 90, 90}, 1); }

  const Image& image() const { return img_; }
  void save(const std::filesystem::path& path) const { write_png(path, img_); }

 private:
  static constexpr int header_ = 44;
  Image img_;
  double x_lo_, x_hi_, y_lo_, y_hi_;
};

/// Places plots side by side in one image (all must have the same height).
inline Image hstack(const std::vector<Image>& parts, int gap = 4) {
  require<config_error>(!parts.empty(), "hstack: no images");
  int w = 0;
  const int h = parts.front().height;
  for (const auto& p : parts) {
    require<shape_error>(p.height == h, "hstack: heights differ (", p.height, " vs ", h, ")");
    w += p.width + gap;
  }
  Image out(w - gap, h, {255, 255, 255});
  int ox = 0;
  for (const auto& p : parts) {
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < p.width; ++x) out.set(ox + x, y, p.get(x, y));
    ox += p.width + gap;
  }
  return out;
}

}  // namespace flowdiff::io
