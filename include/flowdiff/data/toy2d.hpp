// flowdiff/data/toy2d.hpp — labelled 2D toy distributions for flow matching: 8 Gaussians, two
// moons, concentric circles, a checkerboard and spirals, each centred at 0 and scaled to lie mostly
// in [-3, 3]^2 (a per-axis standard deviation between about 1 and 1.8), so that flows start from
// N(0, I) at a comparable scale. With y the class, u, v ~ U[0, 1), eps ~ N(0, I_2), sigma the noise
// and K the `modes` parameter (defaults in brackets):
//   Gaussians    [K = 8, sigma = 0.2]  y ~ U{0..K-1}; x = 2 (cos a_y, sin a_y) + sigma eps,
//                a_y = 2 pi y / K
//                (exactly analytic::GaussianMixture: weights 1/K, those means, stddev sigma,
//                label k for component k; see gaussian_mixture())
//   Moons        [2 classes, sigma = 0.1]  y ~ U{0, 1}; theta = pi u;
//                y = 0: x = 2 (cos theta - 1/2, sin theta - 1/4) + sigma eps,
//                y = 1: x = 2 (1/2 - cos theta, 1/4 - sin theta) + sigma eps
//                (scikit-learn's make_moons shifted by (-1/2, -1/4) and scaled by 2; class means
//                -/+ (1, 1/2 - 4/pi))
//   Circles      [K = 2, sigma = 0.05]  y ~ U{0..K-1}; x = r_y (cos 2 pi u, sin 2 pi u)
//                + sigma eps, r_y = 2 (y + 1) / K  (rings of radius 1 and 2 by default)
//   Checkerboard [K = 4 cells a side, sigma = 0]  the board [-2, 2]^2 in K x K cells of side
//                h = 4/K; cell (i, j) (column i, row j, from the bottom left) is
//                [-2 + i h, -2 + (i+1) h] x [-2 + j h, -2 + (j+1) h] and is dark when i + j is
//                even. The dark cells, numbered row by row from the bottom left, are the classes
//                (ceil(K^2 / 2) of them); y ~ U over them; x = corner_y + h (u, v) + sigma eps:
//                uniform on the dark cells, the classic checkerboard density.
//   Spirals      [K = 2 arms, sigma = 0.08]  y ~ U{0..K-1}; t = sqrt(u); r = 2 t;
//                phi = 2 pi y / K + 3 pi t; x = r (cos phi, sin phi) + sigma eps
//                (1.5 turns per arm; t = sqrt(u) spreads the points about evenly along the arc).
// Sample i is a function of (generator seed, call counter, i) only (one Philox stream per call,
// sample i's numbers from counter blocks (b, i)), so a batch's first rows do not depend on its
// size, the thread count or how the loop is split.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "flowdiff/analytic/gaussian_mixture.hpp"
#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::data {

enum class Toy2D { Gaussians, Moons, Circles, Checkerboard, Spirals };

/// "gaussians", "moons", "circles", "checkerboard", "spirals".
inline std::string_view toy2d_name(Toy2D kind) {
  switch (kind) {
    case Toy2D::Gaussians:
      return "gaussians";
    case Toy2D::Moons:
      return "moons";
    case Toy2D::Circles:
      return "circles";
    case Toy2D::Checkerboard:
      return "checkerboard";
    case Toy2D::Spirals:
      return "spirals";
  }
  fail<config_error>("toy2d_name: not a Toy2D value: ", static_cast<int>(kind));
}

/// The kind named `name` (as toy2d_name spells it); config_error listing the choices otherwise.
inline Toy2D toy2d_from_name(std::string_view name) {
  for (Toy2D k :
       {Toy2D::Gaussians, Toy2D::Moons, Toy2D::Circles, Toy2D::Checkerboard, Toy2D::Spirals})
    if (name == toy2d_name(k)) return k;
  fail<config_error>("toy2d_from_name: unknown distribution '", name,
                     "'; choose one of gaussians, moons, circles, checkerboard, spirals");
}

/// Samples of a toy distribution: x: [n, 2], labels: [n].
template <class T>
struct Toy2DSamples {
  Tensor<T> x;
  Tensor<label_t> labels;
};

/// One of the distributions above. Immutable and cheap to copy; sample() may be called from several
/// threads at once (with different generators).
template <class T = float>
class Toy2DDistribution {
  static_assert(std::is_floating_point_v<T>, "Toy2DDistribution: T must be float or double");

 public:
  /// The default noise of each kind (see the file comment).
  static T default_noise(Toy2D kind) {
    switch (kind) {
      case Toy2D::Gaussians:
        return T(0.2);
      case Toy2D::Moons:
        return T(0.1);
      case Toy2D::Circles:
        return T(0.05);
      case Toy2D::Checkerboard:
        return T(0);
      case Toy2D::Spirals:
        return T(0.08);
    }
    fail<config_error>("Toy2DDistribution: not a Toy2D value: ", static_cast<int>(kind));
  }
  /// The default `modes` of each kind: 8 Gaussians, 2 moons, 2 circles, 4 cells a side, 2 arms.
  static index_t default_modes(Toy2D kind) {
    switch (kind) {
      case Toy2D::Gaussians:
        return 8;
      case Toy2D::Checkerboard:
        return 4;
      default:
        return 2;
    }
  }

  explicit Toy2DDistribution(Toy2D kind) : Toy2DDistribution(kind, default_noise(kind)) {}

  /// noise: the standard deviation sigma of the Gaussian added to every point (>= 0); modes: K in
  /// the file comment (0: the kind's default; Moons has exactly 2).
  Toy2DDistribution(Toy2D kind, T noise, index_t modes = 0)
      : kind_(kind), noise_(noise), modes_(modes == 0 ? default_modes(kind) : modes) {
    (void)toy2d_name(kind);  // validates the enum value
    require<config_error>(std::isfinite(static_cast<double>(noise)) && noise >= 0,
                          "Toy2DDistribution(", toy2d_name(kind),
                          "): noise must be finite and >= 0, got ", noise);
    require<config_error>(modes_ >= 1 && modes_ <= 4096, "Toy2DDistribution(", toy2d_name(kind),
                          "): modes must be in [1, 4096] (or 0 for the default), got ", modes);
    require<config_error>(
        kind != Toy2D::Moons || modes_ == 2,
        "Toy2DDistribution(moons): there are exactly 2 moons, got modes = ", modes);
  }

  Toy2D kind() const { return kind_; }
  T noise() const { return noise_; }
  index_t modes() const { return modes_; }

  /// Gaussians: K; moons: 2; circles: K rings; checkerboard: ceil(K^2 / 2) dark cells; spirals: K.
  index_t num_classes() const {
    return kind_ == Toy2D::Checkerboard ? (modes_ * modes_ + 1) / 2 : modes_;
  }

  /// Checkerboard: the lower-left corner of the dark cell of class c, and the cell side.
  void checkerboard_cell(index_t c, T& x0, T& y0, T& side) const {
    require<config_error>(kind_ == Toy2D::Checkerboard && c >= 0 && c < num_classes(),
                          "Toy2DDistribution::checkerboard_cell: class ", c,
                          " is not a checkerboard cell in [0, ", num_classes(), ")");
    // Row j holds the dark cells i = j % 2, j % 2 + 2, ...: ceil((K - j % 2) / 2) of them.
    const index_t K = modes_, even_row = (K + 1) / 2, odd_row = K / 2;
    const index_t pair = c / (even_row + odd_row), rest = c % (even_row + odd_row);
    const index_t j = 2 * pair + (rest < even_row ? 0 : 1);
    const index_t i = rest < even_row ? 2 * rest : 2 * (rest - even_row) + 1;
    side = T(4) / static_cast<T>(K);
    x0 = T(-2) + static_cast<T>(i) * side;
    y0 = T(-2) + static_cast<T>(j) * side;
  }

  /// The distribution as an exact labelled mixture (Gaussians only; config_error otherwise):
  /// weights 1/K, means 2 (cos 2 pi k/K, sin 2 pi k/K), stddev sigma, labels k, K classes.
  analytic::GaussianMixture<T> gaussian_mixture() const {
    require<config_error>(kind_ == Toy2D::Gaussians, "Toy2DDistribution(", toy2d_name(kind_),
                          ")::gaussian_mixture: only the gaussians distribution is a Gaussian "
                          "mixture");
    Tensor<T> means(Shape{modes_, 2});
    std::vector<label_t> labels;
    for (index_t k = 0; k < modes_; ++k) {
      const double a = 2 * std::numbers::pi * static_cast<double>(k) / static_cast<double>(modes_);
      means(k, 0) = static_cast<T>(2 * std::cos(a));
      means(k, 1) = static_cast<T>(2 * std::sin(a));
      labels.push_back(static_cast<label_t>(k));
    }
    return analytic::GaussianMixture<T>::isotropic(
        std::vector<T>(static_cast<std::size_t>(modes_), T(1)), means,
        std::vector<T>(static_cast<std::size_t>(modes_), noise_), std::move(labels), modes_);
  }

  /// x: [N, 2]; y: [N], or an empty view to skip the labels.
  void sample(View<T> x, View<label_t> y, Generator& gen) const {
    require<shape_error>(x.rank() == 2 && x.dim(1) == 2, "Toy2DDistribution(", toy2d_name(kind_),
                         ")::sample: x must be [N, 2], got ", x.shape());
    const index_t n = x.dim(0);
    require<shape_error>(y.empty() || (y.rank() == 1 && y.dim(0) == n), "Toy2DDistribution(",
                         toy2d_name(kind_), ")::sample: y must be [", n,
                         "] (or empty to skip labels), got ", y.shape());
    require<config_error>(n <= index_t(0xFFFFFFFF), "Toy2DDistribution::sample: N = ", n,
                          " is too large for one call");
    const auto stream = gen.next_stream();
    T* px = x.data();
    label_t* py = y.empty() ? nullptr : y.data();
    Cpu::parallel_for(
        n,
        [&](index_t i) {
          T a = 0, b = 0;
          const label_t c = draw(stream, static_cast<std::uint32_t>(i), a, b);
          px[2 * i] = a;
          px[2 * i + 1] = b;
          if (py != nullptr) py[i] = c;
        },
        32);
  }

  /// n new samples with their labels.
  Toy2DSamples<T> sample(index_t n, Generator& gen) const {
    require<config_error>(n >= 0, "Toy2DDistribution::sample: n must be >= 0, got ", n);
    Toy2DSamples<T> s{Tensor<T>(Shape{n, 2}), Tensor<label_t>(Shape{n})};
    sample(s.x.view(), s.labels.view(), gen);
    return s;
  }

 private:
  // Sample i uses Philox blocks (0, i) for its class, (1, i) for its uniforms and (2, i) for its
  // two normals.
  label_t draw(const rng_detail::Stream& s, std::uint32_t i, T& x, T& y) const {
    const auto b0 = s.block(0, i), b1 = s.block(1, i), b2 = s.block(2, i);
    const index_t K = num_classes();
    // floor(r K / 2^64) for a 64-bit r: the high half of the product, computed in 64-bit pieces.
    const std::uint64_t r = (std::uint64_t{b0.v[0]} << 32) | b0.v[1];
    const auto k64 = static_cast<std::uint64_t>(K);
    const auto c =
        static_cast<index_t>(((r >> 32) * k64 + (((r & 0xFFFFFFFFu) * k64) >> 32)) >> 32);
    const T u = rng_detail::uniform_lane<T>(b1, 0), v = rng_detail::uniform_lane<T>(b1, 1);
    constexpr T pi = std::numbers::pi_v<T>;
    switch (kind_) {
      case Toy2D::Gaussians: {
        const T a = 2 * pi * static_cast<T>(c) / static_cast<T>(K);
        x = 2 * std::cos(a);
        y = 2 * std::sin(a);
        break;
      }
      case Toy2D::Moons: {
        const T sign = c == 0 ? T(1) : T(-1);
        x = sign * 2 * (std::cos(pi * u) - T(0.5));
        y = sign * 2 * (std::sin(pi * u) - T(0.25));
        break;
      }
      case Toy2D::Circles: {
        const T rad = 2 * static_cast<T>(c + 1) / static_cast<T>(K);
        x = rad * std::cos(2 * pi * u);
        y = rad * std::sin(2 * pi * u);
        break;
      }
      case Toy2D::Checkerboard: {
        T x0 = 0, y0 = 0, h = 0;
        checkerboard_cell(c, x0, y0, h);
        x = x0 + h * u;
        y = y0 + h * v;
        break;
      }
      case Toy2D::Spirals: {
        const T t = std::sqrt(u);
        const T phi = 2 * pi * static_cast<T>(c) / static_cast<T>(K) + 3 * pi * t;
        x = 2 * t * std::cos(phi);
        y = 2 * t * std::sin(phi);
        break;
      }
    }
    if (noise_ > 0) {
      x += noise_ * rng_detail::normal_lane<T>(b2, 0);
      y += noise_ * rng_detail::normal_lane<T>(b2, 1);
    }
    return static_cast<label_t>(c);
  }

  Toy2D kind_;
  T noise_;
  index_t modes_;
};

}  // namespace flowdiff::data
