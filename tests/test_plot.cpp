// Tests of the plots in flowdiff/io/plot.hpp added for data and training: the viridis colour map,
// 2D histograms and their heat maps (alone and side by side on one scale), class-coloured scatter
// plots with legends, line plots with linear and log axes, tick placement, EMA smoothing and loss
// curves. Images have the expected size, are not one colour, put marks in the right pixels and
// encode as PNG; files go only to a temporary directory.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "flowdiff/flowdiff.hpp"

namespace fd = flowdiff;
namespace fs = std::filesystem;
using Catch::Contains;
using fd::io::Rgb;

namespace {

bool same(Rgb a, Rgb b) { return a.r == b.r && a.g == b.g && a.b == b.b; }

std::size_t distinct_colours(const fd::io::Image& img) {
  std::set<std::tuple<int, int, int>> s;
  for (std::size_t i = 0; i < img.pixels.size(); i += 3)
    s.insert({img.pixels[i], img.pixels[i + 1], img.pixels[i + 2]});
  return s.size();
}

bool has_colour(const fd::io::Image& img, Rgb c) {
  for (std::size_t i = 0; i < img.pixels.size(); i += 3)
    if (img.pixels[i] == c.r && img.pixels[i + 1] == c.g && img.pixels[i + 2] == c.b) return true;
  return false;
}

void check_png(const fd::io::Image& img) {
  const auto png = fd::io::encode_png(img);
  REQUIRE(png.size() > 8);
  CHECK(png[1] == 'P');
  CHECK(png[2] == 'N');
  CHECK(png[3] == 'G');
}

/// Points [N, 2] from a list of (x, y).
fd::Tensor<float> cloud(const std::vector<std::pair<float, float>>& pts) {
  fd::Tensor<float> x(fd::Shape{static_cast<fd::index_t>(pts.size()), 2});
  for (std::size_t i = 0; i < pts.size(); ++i) {
    x(static_cast<fd::index_t>(i), 0) = pts[i].first;
    x(static_cast<fd::index_t>(i), 1) = pts[i].second;
  }
  return x;
}

}  // namespace

TEST_CASE("viridis runs from dark purple to yellow and clamps", "[plot]") {
  CHECK(same(fd::io::viridis(0), {68, 1, 84}));
  CHECK(same(fd::io::viridis(0.5), {33, 144, 141}));
  CHECK(same(fd::io::viridis(1), {253, 231, 37}));
  CHECK(same(fd::io::viridis(-3), fd::io::viridis(0)));
  CHECK(same(fd::io::viridis(7), fd::io::viridis(1)));
  CHECK(same(fd::io::viridis(std::numeric_limits<double>::quiet_NaN()), fd::io::viridis(0)));
  // Halfway between two anchors is their rounded mean.
  const Rgb m = fd::io::viridis(1.0 / 16);
  CHECK(same(m, {70, 23, 103}));
  CHECK(same(fd::io::lighten({0, 100, 255}, 0.5), {128, 178, 255}));
}

TEST_CASE("histogram2d counts points per cell and outside", "[plot]") {
  const auto x = cloud({{0.1f, 0.1f},
                        {0.2f, 0.3f},
                        {-0.9f, 0.9f},
                        {1.0f, 0.0f},
                        {5, 5},
                        {std::numeric_limits<float>::quiet_NaN(), 0}});
  const auto h = fd::io::histogram2d<float>(x, 2, -1, 1, -1, 1);
  CHECK(h.bins == 2);
  CHECK(h.total == 6);
  CHECK(h.outside == 3);  // x = 1 is outside [-1, 1), (5, 5) and the NaN
  CHECK(h.count(1, 1) == 2);
  CHECK(h.count(0, 1) == 1);
  CHECK(h.count(0, 0) == 0);
  CHECK(h.fraction(1, 1) == Approx(2.0 / 6));
  CHECK(h.max_fraction() == Approx(2.0 / 6));
  CHECK(h.bin_x(-1) == 0);
  CHECK(h.bin_x(0.999) == 1);
  CHECK(h.bin_x(1) == -1);
  fd::Tensor<float> bad(fd::Shape{3, 3});
  CHECK_THROWS_AS(fd::io::histogram2d<float>(bad, 4, -1, 1, -1, 1), fd::shape_error);
  CHECK_THROWS_WITH(fd::io::histogram2d<float>(bad, 4, -1, 1, -1, 1),
                    Contains("x must be [N, 2], got [3, 3]"));
  CHECK_THROWS_WITH(fd::io::histogram2d<float>(x, 0, -1, 1, -1, 1),
                    Contains("bins must be in [1, 4096], got 0"));
  CHECK_THROWS_WITH(fd::io::histogram2d<float>(x, 4, 1, -1, -1, 1), Contains("empty range"));
}

TEST_CASE("density_plot colours each bin by its share of the points", "[plot]") {
  // 9 points in the bin of (1, 1), 3 in the bin of (-2, -2), 0 elsewhere; [-3, 3]^2 in 6 bins.
  std::vector<std::pair<float, float>> pts(9, {1.5f, 1.5f});
  for (int i = 0; i < 3; ++i) pts.push_back({-2.5f, -2.5f});
  const auto x = cloud(pts);
  const int size = 120, header = fd::io::Plot2D::header_height();
  const auto img = fd::io::density_plot<float>(x, "density", size, 3.0, 6);
  CHECK(img.width == size);
  CHECK(img.height == size + header);
  // Pixel centre of data point (u, v): column (u + 3) / 6 * size, row header + (3 - v) / 6 * size.
  auto at = [&](double u, double v) {
    return img.get(static_cast<int>((u + 3) / 6 * size),
                   header + static_cast<int>((3 - v) / 6 * size));
  };
  CHECK(same(at(1.5, 1.5), fd::io::viridis(1)));
  CHECK(same(at(-2.5, -2.5), fd::io::viridis(3.0 / 9)));
  CHECK(same(at(0.5, -0.5), fd::io::viridis(0)));
  CHECK(same(at(-2.5, 2.5), fd::io::viridis(0)));
  CHECK(distinct_colours(img) > 4);
  check_png(img);
  // A log scale lifts the small bin: log1p(3) / log1p(9).
  const auto lg = fd::io::density_plot<float>(x, "", size, 3.0, 6, 0, true);
  CHECK(same(lg.get(static_cast<int>(0.5 / 6 * size), header + static_cast<int>(5.5 / 6 * size)),
             fd::io::viridis(std::log1p(3.0) / std::log1p(9.0))));
  CHECK_THROWS_WITH(fd::io::density_plot<float>(x, "", size, -1.0), Contains("half_width"));
}

TEST_CASE("density_comparison puts clouds side by side on one colour scale", "[plot]") {
  const auto a = cloud(std::vector<std::pair<float, float>>(10, {0.5f, 0.5f}));
  std::vector<std::pair<float, float>> bp(5, {0.5f, 0.5f});
  for (int i = 0; i < 5; ++i) bp.push_back({2.5f, 2.5f});
  const auto b = cloud(bp);
  const int size = 60, header = fd::io::Plot2D::header_height();
  const auto img =
      fd::io::density_comparison<float>({a.view(), b.view()}, {"data", "samples"}, size, 3.0, 6);
  CHECK(img.width == 2 * size + 4);
  CHECK(img.height == size + header);
  const int cx = static_cast<int>(3.5 / 6 * size), cy = header + static_cast<int>(2.5 / 6 * size);
  CHECK(same(img.get(cx, cy), fd::io::viridis(1)));               // a: all its points in one bin
  CHECK(same(img.get(size + 4 + cx, cy), fd::io::viridis(0.5)));  // b: half of them, same scale
  CHECK_THROWS_WITH(fd::io::density_comparison<float>({}, {}), Contains("no point clouds"));
  CHECK_THROWS_WITH(fd::io::density_comparison<float>({a.view()}, {"x", "y"}),
                    Contains("2 titles for 1 clouds"));
}

TEST_CASE("Plot2D::scatter_labels colours points by class; legend draws swatches", "[plot]") {
  fd::io::Plot2D plot(101, -1, 1, -1, 1, "classes");
  const auto x = cloud({{-0.5f, -0.5f}, {0.5f, -0.5f}, {0.5f, 0.5f}});
  const auto y = fd::Tensor<fd::label_t>::from({3}, {0, 3, 2});
  plot.scatter_labels<float>(x, y, 2.0, 1.0f, /*null_label=*/3);
  const auto& img = plot.image();
  CHECK(same(img.get(plot.px(-0.5), plot.py(-0.5)), fd::io::palette(0)));
  CHECK(same(img.get(plot.px(0.5), plot.py(-0.5)), {127, 127, 127}));  // the null label
  CHECK(same(img.get(plot.px(0.5), plot.py(0.5)), fd::io::palette(2)));
  CHECK(same(img.get(plot.px(-0.5), plot.py(0.5)), {255, 255, 255}));
  plot.legend({"zero", "one"});
  CHECK(has_colour(plot.image(), fd::io::palette(1)));  // only the legend uses colour 1
  check_png(plot.image());
  const auto y2 = fd::Tensor<fd::label_t>::from({2}, {0, 1});
  CHECK_THROWS_AS(plot.scatter_labels<float>(x, y2), fd::shape_error);
  CHECK_THROWS_WITH(plot.scatter_labels<float>(x, y2), Contains("y must be [3], got [2]"));
}

TEST_CASE("nice_ticks, log_ticks and tick_label", "[plot]") {
  const auto t = fd::io::nice_ticks(0, 1, 5);
  REQUIRE(t.size() == 6);
  for (std::size_t k = 0; k < 6; ++k)
    CHECK(t[k] == Approx(0.2 * static_cast<double>(k)).margin(1e-12));
  const auto u = fd::io::nice_ticks(-3, 3, 5);
  CHECK(u == std::vector<double>{-3, -2, -1, 0, 1, 2, 3});
  CHECK(fd::io::nice_ticks(0.13, 0.47, 4).front() >= 0.13);
  CHECK(fd::io::nice_ticks(1, 1).empty());
  const auto l = fd::io::log_ticks(1e-3, 1);
  CHECK(l.size() == 10);  // 1, 2, 5 per decade over 3 decades, and 1
  CHECK(l.front() == Approx(1e-3));
  CHECK(l.back() == Approx(1));
  const auto wide = fd::io::log_ticks(1e-6, 1e2);
  CHECK(wide.size() == 9);                         // powers of ten only
  CHECK(fd::io::log_ticks(2.1, 2.9).size() >= 2);  // no power of ten inside: linear ticks
  CHECK(fd::io::tick_label(1500) == "1500");
  CHECK(fd::io::tick_label(0.001) == "0.001");
  CHECK(fd::io::tick_label(0) == "0");
  CHECK(fd::io::tick_label(0.1 + 0.2) == "0.3");
  CHECK(fd::io::tick_label(2.5e7) == "2.5e+07");
}

TEST_CASE("LinePlot maps data to pixels, linear and log, and breaks lines at gaps", "[plot]") {
  fd::io::LinePlotOptions opt;
  opt.width = 300;
  opt.height = 200;
  opt.title = "lines";
  opt.x_label = "x";
  fd::io::LinePlot plot(0, 10, 0, 1, opt);
  CHECK(plot.image().width == 300);
  CHECK(plot.image().height == 200);
  CHECK(plot.px(0) == plot.left());
  CHECK(plot.px(10) == plot.right());
  CHECK(plot.py(0) == plot.bottom());
  CHECK(plot.py(1) == plot.top());
  const Rgb red{200, 0, 0};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> xs{0, 2, 4, 6, 8, 10}, ys{0.5, 0.5, 0.5, nan, 0.5, 0.5};
  plot.line(xs, ys, red);
  CHECK(same(plot.image().get(plot.px(1), plot.py(0.5)), red));
  CHECK(same(plot.image().get(plot.px(9), plot.py(0.5)), red));
  CHECK(!same(plot.image().get(plot.px(5), plot.py(0.5)), red));  // the NaN breaks the line
  CHECK(!same(plot.image().get(plot.px(5), plot.py(0.8)), red));
  // Tick labels and axes make the image more than two colours.
  CHECK(distinct_colours(plot.image()) > 3);
  check_png(plot.image());
  const std::vector<double> two{1, 2};
  CHECK_THROWS_WITH(plot.line(xs, two, red), Contains("6 x values for 2 y values"));

  fd::io::LinePlotOptions log_opt;
  log_opt.log_y = true;
  fd::io::LinePlot lp(0, 1, 1, 100, log_opt);
  CHECK(std::abs(lp.fy(10) - (lp.fy(1) + lp.fy(100)) / 2) < 1e-9);  // one decade is half the axis
  CHECK_THROWS_AS(fd::io::LinePlot(0, 1, 0, 1, log_opt), fd::config_error);
  CHECK_THROWS_WITH(fd::io::LinePlot(0, 1, 0, 1, log_opt), Contains("log y axis needs y_lo > 0"));
  CHECK_THROWS_WITH(fd::io::LinePlot(1, 1, 0, 1), Contains("x range [1, 1]"));
  fd::io::LinePlotOptions tiny;
  tiny.width = 10;
  CHECK_THROWS_WITH(fd::io::LinePlot(0, 1, 0, 1, tiny), Contains("at least 160 x 120"));
}

TEST_CASE("smooth_ema is the debiased exponential moving average", "[plot]") {
  const std::vector<double> c(20, 3.0);
  for (double v : fd::io::smooth_ema(c, 0.9)) CHECK(v == Approx(3.0));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> v{nan, 1, nan, 3};
  const auto s = fd::io::smooth_ema(v, 0.5);
  CHECK(std::isnan(s[0]));
  CHECK(s[1] == Approx(1));
  CHECK(s[2] == Approx(1));
  CHECK(s[3] == Approx((0.5 * 0.5 + 0.5 * 3) / 0.75));
  CHECK(fd::io::smooth_ema(v, 0)[3] == 3);
  CHECK_THROWS_WITH(fd::io::smooth_ema(v, 1.0), Contains("beta must be in [0, 1), got 1"));
}

TEST_CASE("loss_curve_plot draws raw and smoothed losses and writes a PNG", "[plot]") {
  std::vector<double> loss;
  for (int k = 0; k < 400; ++k)
    loss.push_back(0.2 + std::exp(-k / 80.0) + 0.05 * std::sin(k * 1.7));
  fd::io::LossCurveOptions opt;
  opt.width = 400;
  opt.height = 260;
  const auto img = fd::io::loss_curve_plot(loss, "CFM loss", opt);
  CHECK(img.width == 400);
  CHECK(img.height == 260);
  CHECK(has_colour(img, opt.colour));                         // the smoothed line
  CHECK(has_colour(img, fd::io::lighten(opt.colour, 0.65)));  // the raw line
  CHECK(distinct_colours(img) > 4);
  check_png(img);
  // Log scale skips values <= 0 and non-finite ones; steps can be strided.
  loss[10] = 0;
  loss[11] = -1;
  loss[12] = std::numeric_limits<double>::infinity();
  opt.log_y = true;
  opt.smoothing = 0;
  opt.first_step = 100;
  opt.step_stride = 10;
  const auto lg = fd::io::loss_curve_plot(loss, "log", opt);
  CHECK(has_colour(lg, opt.colour));
  CHECK(!has_colour(lg, fd::io::lighten(opt.colour, 0.65)));  // no smoothed pair without smoothing
  // A single value and constant values still make a plot.
  CHECK(fd::io::loss_curve_plot(std::vector<double>{0.5}).width == 640);
  CHECK(fd::io::loss_curve_plot(std::vector<double>(5, 2.0)).height == 400);
  const std::vector<double> none{std::numeric_limits<double>::quiet_NaN()};
  CHECK_THROWS_AS(fd::io::loss_curve_plot(none), fd::config_error);
  CHECK_THROWS_WITH(fd::io::loss_curve_plot(none), Contains("none of the 1 values is finite"));
  // Written atomically into a temporary directory only.
  const fs::path dir =
      fs::temp_directory_path() / ("flowdiff_test_plot_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fd::io::write_png(dir / "loss.png", img);
  CHECK(fs::file_size(dir / "loss.png") > 100);
  fs::remove_all(dir);
}
