// flowdiff/io/plot.hpp — small raster plots, drawn straight into an io::Image (no plotting library
// needed): Plot2D for 2D samples (scatter plots coloured by class with a legend, trajectories, 2D
// histogram heat maps of a point cloud), LinePlot for curves with tick-labelled axes (linear or log
// y) and loss_curve_plot (raw values and their debiased exponential moving average s_k = (beta
// m_{k-1} + (1 - beta) v_k) / (1 - beta^(k+1)), m the undebiased average). Points are soft discs
// blended with opacity, so dense regions read as density; heat maps use a viridis colour map of the
// fraction of points per bin; text uses stb_easy_font's bitmap glyphs.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
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

/// The viridis colour map (matplotlib's, sampled at nine points and interpolated linearly) at t in
/// [0, 1] (clamped): dark purple at 0, teal at 0.5, yellow at 1.
inline Rgb viridis(double t) {
  static constexpr std::array<Rgb, 9> c{{{68, 1, 84},
                                         {71, 44, 122},
                                         {59, 81, 139},
                                         {44, 113, 142},
                                         {33, 144, 141},
                                         {39, 173, 129},
                                         {92, 200, 99},
                                         {170, 220, 50},
                                         {253, 231, 37}}};
  if (!(t > 0)) return c[0];  // also NaN
  if (t >= 1) return c[8];
  const double u = t * 8;
  const auto k = static_cast<std::size_t>(u);
  const double f = u - static_cast<double>(k);
  auto mix = [f](std::uint8_t a, std::uint8_t b) {
    return static_cast<std::uint8_t>(std::lround(a + f * (double(b) - double(a))));
  };
  return {mix(c[k].r, c[k + 1].r), mix(c[k].g, c[k + 1].g), mix(c[k].b, c[k + 1].b)};
}

/// Colour c mixed with white: amount 0 gives c, 1 gives white (for faint lines under strong ones).
inline Rgb lighten(Rgb c, double amount) {
  auto mix = [amount](std::uint8_t v) {
    return static_cast<std::uint8_t>(std::lround(v + amount * (255.0 - v)));
  };
  return {mix(c.r), mix(c.g), mix(c.b)};
}

/// Width in pixels of `text` drawn with draw_text at `scale`.
inline int text_width(const std::string& text, int scale = 2) {
  std::string t = text;
  return stb_easy_font_width(t.data()) * scale;
}

/// Draws `text` with its top-left corner at pixel (x, y), `scale` pixels per glyph unit.
inline void draw_text(Image& img, int x, int y, const std::string& text, Rgb color = {0, 0, 0},
                      int scale = 2) {
  // stb_easy_font emits one 64-byte quad per stroke, up to a dozen strokes per glyph; a buffer
  // that is too small silently drops the last strokes (the last glyph of "500" lost its right side
  // with the former 300 bytes per character).
  std::vector<char> buf(text.size() * 1024 + 64);
  std::string t = text;
  const int quads =
      stb_easy_font_print(0, 0, t.data(), nullptr, buf.data(), static_cast<int>(buf.size()));
  for (int q = 0; q < quads; ++q) {
    // Each vertex is x, y, z (floats) and 4 colour bytes: 16 bytes; a quad is 4 vertices.
    // (copied out: the buffer is chars, and reading it through a float pointer breaks aliasing)
    float v0[2], v2[2];
    std::memcpy(v0, buf.data() + q * 64, sizeof v0);
    std::memcpy(v2, buf.data() + q * 64 + 32, sizeof v2);
    const float s = static_cast<float>(scale);
    const int x0 = x + static_cast<int>(std::lround(v0[0] * s));
    const int y0 = y + static_cast<int>(std::lround(v0[1] * s));
    const int x1 = x + static_cast<int>(std::lround(v2[0] * s));
    const int y1 = y + static_cast<int>(std::lround(v2[1] * s));
    for (int yy = std::min(y0, y1); yy < std::max(y0, y1); ++yy)
      for (int xx = std::min(x0, x1); xx < std::max(x0, x1); ++xx) img.set(xx, yy, color);
  }
}

/// A 2D histogram of a point cloud: bins x bins equal cells over [x_lo, x_hi) x [y_lo, y_hi);
/// counts[by * bins + bx] for column bx (from x_lo) and row by (from y_lo). Points outside the
/// range (or non-finite) are counted in `outside` only.
struct Histogram2D {
  int bins = 0;
  double x_lo = 0, x_hi = 0, y_lo = 0, y_hi = 0;
  std::vector<double> counts;
  index_t total = 0, outside = 0;

  double count(int bx, int by) const {
    return counts[static_cast<std::size_t>(by) * static_cast<std::size_t>(bins) +
                  static_cast<std::size_t>(bx)];
  }
  /// count / total: the fraction of all points (inside or not) in the bin.
  double fraction(int bx, int by) const {
    return total == 0 ? 0.0 : count(bx, by) / static_cast<double>(total);
  }
  double max_fraction() const {
    double m = 0;
    for (double c : counts) m = std::max(m, c);
    return total == 0 ? 0.0 : m / static_cast<double>(total);
  }
  /// The bin of a data coordinate, or -1 when outside.
  int bin_x(double x) const { return bin_of(x, x_lo, x_hi); }
  int bin_y(double y) const { return bin_of(y, y_lo, y_hi); }

 private:
  int bin_of(double v, double lo, double hi) const {
    if (!(v >= lo && v < hi)) return -1;
    return std::min(bins - 1, static_cast<int>((v - lo) / (hi - lo) * bins));
  }
};

/// The histogram of x: [N, 2] on bins x bins cells over [x_lo, x_hi) x [y_lo, y_hi).
template <class T>
Histogram2D histogram2d(View<const T, Cpu> x, int bins, double x_lo, double x_hi, double y_lo,
                        double y_hi) {
  require<shape_error>(x.rank() == 2 && x.dim(1) == 2, "histogram2d: x must be [N, 2], got ",
                       x.shape());
  require<config_error>(bins >= 1 && bins <= 4096, "histogram2d: bins must be in [1, 4096], got ",
                        bins);
  require<config_error>(x_hi > x_lo && y_hi > y_lo, "histogram2d: empty range [", x_lo, ", ", x_hi,
                        "] x [", y_lo, ", ", y_hi, "]");
  Histogram2D h;
  h.bins = bins;
  h.x_lo = x_lo, h.x_hi = x_hi, h.y_lo = y_lo, h.y_hi = y_hi;
  h.counts.assign(static_cast<std::size_t>(bins) * static_cast<std::size_t>(bins), 0.0);
  h.total = x.dim(0);
  for (index_t i = 0; i < x.dim(0); ++i) {
    const int bx = h.bin_x(static_cast<double>(x(i, 0))),
              by = h.bin_y(static_cast<double>(x(i, 1)));
    if (bx < 0 || by < 0) {
      ++h.outside;
      continue;
    }
    h.counts[static_cast<std::size_t>(by) * static_cast<std::size_t>(bins) +
             static_cast<std::size_t>(bx)] += 1;
  }
  return h;
}

/// A square scatter/trajectory plot of the region [x_lo, x_hi] × [y_lo, y_hi].
class Plot2D {
 public:
  Plot2D(int size_px, double x_lo, double x_hi, double y_lo, double y_hi, std::string title = {})
      : img_(size_px, size_px + header_), x_lo_(x_lo), x_hi_(x_hi), y_lo_(y_lo), y_hi_(y_hi) {
    require<config_error>(x_hi > x_lo && y_hi > y_lo, "Plot2D: empty range [", x_lo, ", ", x_hi,
                          "] x [", y_lo, ", ", y_hi, "]");
    frame();
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
        const int ix = static_cast<int>(std::floor(cx)) + dx,
                  iy = static_cast<int>(std::floor(cy)) + dy;
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
    if (!std::isfinite(x0) || !std::isfinite(y0) || !std::isfinite(x1) || !std::isfinite(y1))
      return;
    const double len = std::hypot(px(x1) - px(x0), py(y1) - py(y0));
    const int n = std::max(2, static_cast<int>(len * 2));
    for (int k = 0; k <= n; ++k) {
      const double a = double(k) / n;
      const int ix = px(x0 + a * (x1 - x0)), iy = py(y0 + a * (y1 - y0));
      if (iy >= header_) img_.blend(ix, iy, c, opacity);
    }
  }

  /// Scatter of x: [N, 2] coloured by class: point i gets palette(y[i]) (y: [N]); a label equal to
  /// `null_label` (e.g. num_classes, the CFG null class), if >= 0, is drawn grey.
  template <class T>
  void scatter_labels(View<const T, Cpu> x, View<const label_t, Cpu> y, double radius = 1.5,
                      float opacity = 0.5f, label_t null_label = -1) {
    require<shape_error>(x.rank() == 2 && x.dim(1) == 2,
                         "Plot2D::scatter_labels: x must be [N, 2], got ", x.shape());
    require<shape_error>(y.rank() == 1 && y.dim(0) == x.dim(0),
                         "Plot2D::scatter_labels: y must be [", x.dim(0), "], got ", y.shape());
    for (index_t i = 0; i < x.dim(0); ++i) {
      const Rgb c = (null_label >= 0 && y[i] == null_label) ? Rgb{127, 127, 127} : palette(y[i]);
      point(x(i, 0), x(i, 1), c, radius, opacity);
    }
  }

  /// A legend in the top-right corner of the plot area: a palette(first + k) swatch and names[k]
  /// per line.
  void legend(const std::vector<std::string>& names, int first = 0) {
    int w = 0;
    for (const auto& n : names) w = std::max(w, text_width(n, 1));
    const int line = 11, box_w = w + 22, box_h = static_cast<int>(names.size()) * line + 6;
    const int x0 = size() - box_w - 4, y0 = header_ + 4;
    for (int yy = y0; yy < y0 + box_h; ++yy)
      for (int xx = x0; xx < x0 + box_w; ++xx) img_.blend(xx, yy, {255, 255, 255}, 0.85f);
    for (std::size_t k = 0; k < names.size(); ++k) {
      const int ly = y0 + 3 + static_cast<int>(k) * line;
      const Rgb c = palette(first + static_cast<int>(k));
      for (int yy = ly + 1; yy < ly + 8; ++yy)
        for (int xx = x0 + 4; xx < x0 + 14; ++xx) img_.set(xx, yy, c);
      draw_text(img_, x0 + 18, ly, names[k], {40, 40, 40}, 1);
    }
  }

  /// Paints the plot area as a heat map of h (which should cover this plot's range): each pixel
  /// gets viridis(h.fraction(bin) / vmax) of the bin its centre falls in; vmax <= 0 means the
  /// largest fraction of h. With log_scale, viridis(log1p(count) / log1p(vmax * total)).
  void density(const Histogram2D& h, double vmax = 0, bool log_scale = false) {
    require<config_error>(h.bins >= 1 && h.counts.size() == static_cast<std::size_t>(h.bins) *
                                                                static_cast<std::size_t>(h.bins),
                          "Plot2D::density: malformed histogram (", h.bins, " bins, ",
                          h.counts.size(), " counts)");
    if (!(vmax > 0)) vmax = h.max_fraction();
    const double top = log_scale ? std::log1p(vmax * static_cast<double>(h.total)) : vmax;
    const int n = size();
    for (int iy = 0; iy < n; ++iy)
      for (int ix = 0; ix < n; ++ix) {
        // The data coordinate of the pixel centre.
        const double x = x_lo_ + (ix + 0.5) / n * (x_hi_ - x_lo_);
        const double y = y_hi_ - (iy + 0.5) / n * (y_hi_ - y_lo_);
        const int bx = h.bin_x(x), by = h.bin_y(y);
        double v = 0;
        if (bx >= 0 && by >= 0 && top > 0)
          v = log_scale ? std::log1p(h.count(bx, by)) / top : h.fraction(bx, by) / top;
        img_.set(ix, header_ + iy, viridis(v));
      }
    frame();
  }

  /// A caption line under the title.
  void caption(const std::string& text) { draw_text(img_, 8, 30, text, {90, 90, 90}, 1); }

  const Image& image() const { return img_; }
  void save(const std::filesystem::path& path) const { write_png(path, img_); }

  /// The plot's data range.
  double x_lo() const { return x_lo_; }
  double x_hi() const { return x_hi_; }
  double y_lo() const { return y_lo_; }
  double y_hi() const { return y_hi_; }
  /// Height of the title area above the square plot area.
  static constexpr int header_height() { return header_; }

 private:
  void frame() {
    const int n = size();
    for (int i = 0; i < n; ++i) {
      img_.set(i, header_, {180, 180, 180});
      img_.set(i, header_ + n - 1, {180, 180, 180});
      img_.set(0, header_ + i, {180, 180, 180});
      img_.set(n - 1, header_ + i, {180, 180, 180});
    }
  }

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

/// A heat map of x: [N, 2] over the square [-half_width, half_width]^2 on bins x bins cells: a
/// size_px x size_px plot area under a title (the layout of Plot2D, so it hstacks with scatter
/// plots of the same size). vmax: the fraction of points that maps to the top colour (<= 0: this
/// cloud's largest bin) — pass the same vmax to compare clouds on one scale.
template <class T>
Image density_plot(View<const T, Cpu> x, const std::string& title = {}, int size_px = 320,
                   double half_width = 3.0, int bins = 64, double vmax = 0,
                   bool log_scale = false) {
  require<config_error>(half_width > 0, "density_plot: half_width must be > 0, got ", half_width);
  Plot2D plot(size_px, -half_width, half_width, -half_width, half_width, title);
  plot.density(histogram2d(x, bins, -half_width, half_width, -half_width, half_width), vmax,
               log_scale);
  return plot.image();
}

/// Heat maps of several clouds (e.g. generated samples and data) side by side on one colour scale:
/// the top colour is the largest bin fraction over all clouds. clouds[k]: [N_k, 2].
template <class T>
Image density_comparison(const std::vector<View<const T, Cpu>>& clouds,
                         const std::vector<std::string>& titles, int size_px = 320,
                         double half_width = 3.0, int bins = 64) {
  require<config_error>(!clouds.empty(), "density_comparison: no point clouds");
  require<config_error>(titles.empty() || titles.size() == clouds.size(),
                        "density_comparison: ", titles.size(), " titles for ", clouds.size(),
                        " clouds");
  std::vector<Histogram2D> hs;
  double vmax = 0;
  for (const auto& c : clouds) {
    hs.push_back(histogram2d(c, bins, -half_width, half_width, -half_width, half_width));
    vmax = std::max(vmax, hs.back().max_fraction());
  }
  std::vector<Image> panels;
  for (std::size_t k = 0; k < hs.size(); ++k) {
    Plot2D plot(size_px, -half_width, half_width, -half_width, half_width,
                titles.empty() ? std::string() : titles[k]);
    plot.density(hs[k], vmax);
    panels.push_back(plot.image());
  }
  return hstack(panels);
}

/// Tick positions for an axis over [lo, hi]: multiples of a step of 1, 2 or 5 times a power of
/// ten, the step whose tick count is closest to `target`, all inside [lo, hi].
inline std::vector<double> nice_ticks(double lo, double hi, int target = 5) {
  std::vector<double> ticks;
  if (!(hi > lo) || !std::isfinite(lo) || !std::isfinite(hi)) return ticks;
  const double raw = (hi - lo) / std::max(target, 1);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag, best = std::numeric_limits<double>::infinity();
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    const double miss = std::abs((hi - lo) / (m * mag) - target);
    if (miss < best) best = miss, step = m * mag;
  }
  const double eps = step * 1e-9;
  const double k0 = std::ceil((lo - eps) / step), k1 = std::floor((hi + eps) / step);
  for (double k = k0; k <= k1; ++k) ticks.push_back(k == 0 ? 0.0 : k * step);
  return ticks;
}

/// Tick positions for a log axis over [lo, hi] (lo > 0): the powers of ten inside, with 2 and 5
/// times them when the range spans less than three decades; linear ticks when fewer than two fit.
inline std::vector<double> log_ticks(double lo, double hi) {
  std::vector<double> ticks;
  if (!(hi > lo) || !(lo > 0)) return ticks;
  const int e0 = static_cast<int>(std::floor(std::log10(lo))),
            e1 = static_cast<int>(std::ceil(std::log10(hi)));
  const bool fine = e1 - e0 <= 3;
  for (int e = e0; e <= e1; ++e)
    for (double m : fine ? std::vector<double>{1, 2, 5} : std::vector<double>{1}) {
      const double t = m * std::pow(10.0, e);
      if (t >= lo * (1 - 1e-12) && t <= hi * (1 + 1e-12)) ticks.push_back(t);
    }
  if (ticks.size() < 2) return nice_ticks(lo, hi, 4);
  return ticks;
}

/// A short label for a tick value: plain decimals for 1e-4 <= |v| < 1e6 (0.001, 250, 1500), else
/// three significant digits with an exponent (2.5e+07).
inline std::string tick_label(double v) {
  char buf[32];
  const double a = std::abs(v);
  std::snprintf(buf, sizeof buf, (a == 0 || (a >= 1e-4 && a < 1e6)) ? "%.6g" : "%.3g", v);
  return buf;
}

struct LinePlotOptions {
  int width = 640, height = 400;  // of the whole image, pixels
  std::string title = {};
  std::string x_label = {}, y_label = {};
  bool log_y = false;  // logarithmic y axis (values <= 0 are not drawn)
};

/// Curves y(x) on tick-labelled axes over [x_lo, x_hi] x [y_lo, y_hi] (y_lo > 0 with log_y): a
/// title line on top, the y tick labels on the left, the x tick labels and x label below, light
/// grid lines at the ticks. Curves are polylines drawn opaque, clipped to the plot area.
class LinePlot {
 public:
  LinePlot(double x_lo, double x_hi, double y_lo, double y_hi, LinePlotOptions options = {})
      : opt_(std::move(options)), x_lo_(x_lo), x_hi_(x_hi), y_lo_(y_lo), y_hi_(y_hi) {
    require<config_error>(opt_.width >= 160 && opt_.height >= 120,
                          "LinePlot: the image must be at least 160 x 120 pixels, got ", opt_.width,
                          " x ", opt_.height);
    require<config_error>(std::isfinite(x_lo) && std::isfinite(x_hi) && x_hi > x_lo,
                          "LinePlot: x range [", x_lo, ", ", x_hi, "] is empty or not finite");
    require<config_error>(std::isfinite(y_lo) && std::isfinite(y_hi) && y_hi > y_lo,
                          "LinePlot: y range [", y_lo, ", ", y_hi, "] is empty or not finite");
    require<config_error>(!opt_.log_y || y_lo > 0, "LinePlot: a log y axis needs y_lo > 0, got ",
                          y_lo);
    img_ = Image(opt_.width, opt_.height);
    const std::vector<double> yt = opt_.log_y ? log_ticks(y_lo, y_hi) : nice_ticks(y_lo, y_hi);
    int label_w = 0;
    for (double t : yt) label_w = std::max(label_w, text_width(tick_label(t), 1));
    left_ = label_w + 12;
    top_ = opt_.title.empty() ? 12 : 36;
    right_ = opt_.width - 16;
    bottom_ = opt_.height - (opt_.x_label.empty() ? 22 : 36);
    if (!opt_.title.empty()) draw_text(img_, left_, 8, opt_.title, {20, 20, 20}, 2);
    const Rgb grid{232, 232, 232}, axis{90, 90, 90}, text{60, 60, 60};
    for (double t : yt) {
      const int y = py(t);
      for (int x = left_; x <= right_; ++x) img_.set(x, y, grid);
      for (int x = left_ - 4; x < left_; ++x) img_.set(x, y, axis);
      const std::string l = tick_label(t);
      draw_text(img_, left_ - 6 - text_width(l, 1), y - 4, l, text, 1);
    }
    for (double t : nice_ticks(x_lo, x_hi, 6)) {
      const int x = px(t);
      for (int y = top_; y <= bottom_; ++y) img_.set(x, y, grid);
      for (int y = bottom_ + 1; y <= bottom_ + 4; ++y) img_.set(x, y, axis);
      const std::string l = tick_label(t);
      draw_text(img_, x - text_width(l, 1) / 2, bottom_ + 7, l, text, 1);
    }
    for (int x = left_; x <= right_; ++x) img_.set(x, bottom_, axis);
    for (int y = top_; y <= bottom_; ++y) img_.set(left_, y, axis);
    if (!opt_.x_label.empty())
      draw_text(img_, (left_ + right_ - text_width(opt_.x_label, 1)) / 2, bottom_ + 22,
                opt_.x_label, text, 1);
    if (!opt_.y_label.empty())
      draw_text(img_, 2, top_ - 10 < 0 ? 0 : top_ - 10, opt_.y_label, text, 1);
  }

  /// Pixel column / row of a data coordinate (log-aware for y); not clipped.
  double fx(double x) const { return left_ + (x - x_lo_) / (x_hi_ - x_lo_) * (right_ - left_); }
  double fy(double y) const {
    const double a = opt_.log_y
                         ? (std::log(y) - std::log(y_lo_)) / (std::log(y_hi_) - std::log(y_lo_))
                         : (y - y_lo_) / (y_hi_ - y_lo_);
    return bottom_ - a * (bottom_ - top_);
  }
  int px(double x) const { return static_cast<int>(std::lround(fx(x))); }
  int py(double y) const { return static_cast<int>(std::lround(fy(y))); }

  /// The plot area in pixels: columns [left, right], rows [top, bottom].
  int left() const { return left_; }
  int right() const { return right_; }
  int top() const { return top_; }
  int bottom() const { return bottom_; }

  /// The polyline through (x[k], y[k]); a non-finite point (or y <= 0 on a log axis) breaks it.
  /// thickness: 1 or more pixels.
  void line(std::span<const double> x, std::span<const double> y, Rgb c, int thickness = 1) {
    require<shape_error>(x.size() == y.size(), "LinePlot::line: ", x.size(), " x values for ",
                         y.size(), " y values");
    require<config_error>(thickness >= 1 && thickness <= 8,
                          "LinePlot::line: thickness must be in [1, 8], got ", thickness);
    bool have_prev = false;
    double x0 = 0, y0 = 0;
    for (std::size_t k = 0; k < x.size(); ++k) {
      if (!drawable(x[k], y[k])) {
        have_prev = false;
        continue;
      }
      const double x1 = fx(x[k]), y1 = fy(y[k]);
      if (have_prev)
        segment(x0, y0, x1, y1, c, thickness);
      else
        segment(x1, y1, x1, y1, c, thickness);
      x0 = x1, y0 = y1, have_prev = true;
    }
  }

  /// A legend in the top-right corner of the plot area: a swatch of colours[k] and names[k].
  void legend(const std::vector<std::string>& names, const std::vector<Rgb>& colours) {
    require<shape_error>(names.size() == colours.size(), "LinePlot::legend: ", names.size(),
                         " names for ", colours.size(), " colours");
    int w = 0;
    for (const auto& n : names) w = std::max(w, text_width(n, 1));
    const int x0 = right_ - w - 30, y0 = top_ + 6;
    for (std::size_t k = 0; k < names.size(); ++k) {
      const int ly = y0 + static_cast<int>(k) * 12;
      for (int xx = x0; xx < x0 + 14; ++xx)
        for (int yy = ly + 3; yy < ly + 6; ++yy) img_.set(xx, yy, colours[k]);
      draw_text(img_, x0 + 20, ly, names[k], {40, 40, 40}, 1);
    }
  }

  const Image& image() const { return img_; }
  void save(const std::filesystem::path& path) const { write_png(path, img_); }

 private:
  bool drawable(double x, double y) const {
    return std::isfinite(x) && std::isfinite(y) && (!opt_.log_y || y > 0);
  }
  void dot(int x, int y, Rgb c, int thickness) {
    const int lo = -(thickness - 1) / 2, hi = thickness / 2;
    for (int dy = lo; dy <= hi; ++dy)
      for (int dx = lo; dx <= hi; ++dx) {
        const int xx = x + dx, yy = y + dy;
        if (xx >= left_ && xx <= right_ && yy >= top_ && yy <= bottom_) img_.set(xx, yy, c);
      }
  }
  void segment(double x0, double y0, double x1, double y1, Rgb c, int thickness) {
    // Clip the parameter range to the plot area (with a margin) so a far-off point costs nothing.
    const double n_raw = std::ceil(std::max(std::abs(x1 - x0), std::abs(y1 - y0)));
    const int n = static_cast<int>(std::min(n_raw, 4.0 * (opt_.width + opt_.height)));
    for (int k = 0; k <= n; ++k) {
      const double a = n == 0 ? 0.0 : double(k) / n;
      const double x = x0 + a * (x1 - x0), y = y0 + a * (y1 - y0);
      if (x < left_ - 8 || x > right_ + 8 || y < top_ - 8 || y > bottom_ + 8) continue;
      dot(static_cast<int>(std::lround(x)), static_cast<int>(std::lround(y)), c, thickness);
    }
  }

  LinePlotOptions opt_;
  Image img_;
  double x_lo_, x_hi_, y_lo_, y_hi_;
  int left_ = 0, right_ = 0, top_ = 0, bottom_ = 0;
};

/// The debiased exponential moving average of `values` (TensorBoard's smoothing):
/// m_k = beta m_{k-1} + (1 - beta) v_k, m_{-1} = 0, s_k = m_k / (1 - beta^(n_k)), n_k the number of
/// finite values so far; non-finite values are skipped (s_k = s_{k-1}, NaN before the first).
/// beta in [0, 1): 0 returns the values.
inline std::vector<double> smooth_ema(std::span<const double> values, double beta) {
  require<config_error>(beta >= 0 && beta < 1, "smooth_ema: beta must be in [0, 1), got ", beta);
  std::vector<double> out(values.size());
  double m = 0, w = 1;  // w = beta^(finite values seen)
  for (std::size_t k = 0; k < values.size(); ++k) {
    if (std::isfinite(values[k])) {
      m = beta * m + (1 - beta) * values[k];
      w *= beta;
    }
    out[k] = w < 1 ? m / (1 - w) : std::numeric_limits<double>::quiet_NaN();
  }
  return out;
}

struct LossCurveOptions {
  int width = 640, height = 400;
  bool log_y = false;
  double smoothing = 0.9;  // beta of smooth_ema; 0: only the raw curve
  double first_step = 0;   // the step of values[0]
  double step_stride = 1;  // steps between consecutive values
  std::string x_label = "step", y_label = "loss";
  Rgb colour = {31, 119, 180};
};

/// A loss curve: values[k] at step first_step + k step_stride, the raw values as a light line and
/// their smooth_ema (when smoothing > 0) as a strong line over it; y range from the finite values
/// (positive ones with log_y), padded by 5%. Throws config_error when no value can be drawn.
inline Image loss_curve_plot(std::span<const double> values, const std::string& title = "loss",
                             const LossCurveOptions& options = {}) {
  require<config_error>(options.step_stride > 0, "loss_curve_plot: step_stride must be > 0, got ",
                        options.step_stride);
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (double v : values)
    if (std::isfinite(v) && (!options.log_y || v > 0)) lo = std::min(lo, v), hi = std::max(hi, v);
  require<config_error>(lo <= hi, "loss_curve_plot: none of the ", values.size(),
                        " values is finite", options.log_y ? " and > 0 (log y axis)" : "");
  if (options.log_y) {
    const double a = std::log(lo), b = std::log(hi), pad = b > a ? 0.05 * (b - a) : std::log(2.0);
    lo = std::exp(a - pad), hi = std::exp(b + pad);
  } else {
    const double pad = hi > lo ? 0.05 * (hi - lo) : std::max(std::abs(hi) * 0.5, 1.0);
    lo -= pad, hi += pad;
  }
  std::vector<double> steps(values.size());
  for (std::size_t k = 0; k < values.size(); ++k)
    steps[k] = options.first_step + static_cast<double>(k) * options.step_stride;
  const double x_lo = options.first_step;
  const double x_hi = values.size() > 1 ? steps.back() : x_lo + options.step_stride;
  LinePlotOptions lp;
  lp.width = options.width, lp.height = options.height, lp.title = title;
  lp.x_label = options.x_label, lp.y_label = options.y_label, lp.log_y = options.log_y;
  LinePlot plot(x_lo, x_hi, lo, hi, lp);
  const bool smooth = options.smoothing > 0;
  plot.line(steps, values, smooth ? lighten(options.colour, 0.65) : options.colour, 1);
  if (smooth) {
    const auto s = smooth_ema(values, options.smoothing);
    plot.line(steps, s, options.colour, 2);
    plot.legend({"raw", "smoothed (EMA " + tick_label(options.smoothing) + ")"},
                {lighten(options.colour, 0.65), options.colour});
  }
  return plot.image();
}

}  // namespace flowdiff::io
