// flowdiff/metrics/distances.hpp — two-sample distances between point clouds X: [n, d], Y: [m, d]
// for judging samples against data in low dimensions:
//  - energy distance (Székely & Rizzo) D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, with unbiased
//    (U-statistic) within-sample terms; zero in expectation iff the distributions agree;
//  - squared MMD with a Gaussian kernel k(a, b) = exp(-|a - b|^2 / (2 h^2)), unbiased estimator;
//  - sliced Wasserstein-2: the mean over random unit directions of the 1D W2 between projections
//    (equal sample sizes), directions drawn from a Generator.
// The O(n m) double loops run over the CPU backend's threads, with deterministic sums.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::metrics {

namespace detail {
template <class T>
void check_clouds(const char* who, View<const T> x, View<const T> y) {
  require<shape_error>(x.rank() == 2 && y.rank() == 2 && x.dim(1) == y.dim(1), who,
                       ": X and Y must be [n, d] and [m, d] with the same d, got ", x.shape(),
                       " and ", y.shape());
  require<shape_error>(x.dim(0) >= 2 && y.dim(0) >= 2, who,
                       ": need at least 2 points in each sample, got ", x.dim(0), " and ", y.dim(0));
}

/// sum over i < n_a, j < n_b (i != j when `skip_diagonal`) of f(|a_i - b_j|^2).
template <class T, class F>
double pair_sum(View<const T> a, View<const T> b, bool skip_diagonal, F f) {
  const index_t na = a.dim(0), nb = b.dim(0), d = a.dim(1);
  const T* pa = a.data();
  const T* pb = b.data();
  std::vector<double> rows(static_cast<std::size_t>(na));
  Cpu::parallel_for(
      na,
      [&](index_t i) {
        double s = 0;
        for (index_t j = 0; j < nb; ++j) {
          if (skip_diagonal && i == j) continue;
          double r2 = 0;
          for (index_t k = 0; k < d; ++k) {
            const double diff = double(pa[i * d + k]) - double(pb[j * d + k]);
            r2 += diff * diff;
          }
          s += f(r2);
        }
        rows[static_cast<std::size_t>(i)] = s;
      },
      nb * d);
  double s = 0;
  for (double r : rows) s += r;
  return s;
}
}  // namespace detail

/// Energy distance D^2(X, Y) (can be slightly negative for equal distributions: it is unbiased).
template <class T>
double energy_distance(View<const T> x, View<const T> y) {
  detail::check_clouds("energy_distance", x, y);
  const double n = static_cast<double>(x.dim(0)), m = static_cast<double>(y.dim(0));
  auto dist = [](double r2) { return std::sqrt(r2); };
  const double xy = detail::pair_sum(x, y, false, dist) / (n * m);
  const double xx = detail::pair_sum(x, x, true, dist) / (n * (n - 1));
  const double yy = detail::pair_sum(y, y, true, dist) / (m * (m - 1));
  return 2 * xy - xx - yy;
}

/// Unbiased squared MMD with a Gaussian kernel of bandwidth h (> 0).
template <class T>
double mmd2_rbf(View<const T> x, View<const T> y, double bandwidth) {
  detail::check_clouds("mmd2_rbf", x, y);
  require<config_error>(bandwidth > 0 && std::isfinite(bandwidth),
                        "mmd2_rbf: bandwidth must be positive and finite, got ", bandwidth);
  const double n = static_cast<double>(x.dim(0)), m = static_cast<double>(y.dim(0));
  const double g = 1.0 / (2 * bandwidth * bandwidth);
  auto k = [g](double r2) { return std::exp(-g * r2); };
  return detail::pair_sum(x, x, true, k) / (n * (n - 1)) +
         detail::pair_sum(y, y, true, k) / (m * (m - 1)) -
         2 * detail::pair_sum(x, y, false, k) / (n * m);
}

/// Sliced Wasserstein-2 distance (not squared) over `projections` random directions.
template <class T>
double sliced_wasserstein(View<const T> x, View<const T> y, index_t projections, Generator& gen) {
  detail::check_clouds("sliced_wasserstein", x, y);
  require<shape_error>(x.dim(0) == y.dim(0), "sliced_wasserstein: needs equal sample sizes, got ",
                       x.dim(0), " and ", y.dim(0));
  require<config_error>(projections >= 1, "sliced_wasserstein: projections must be >= 1, got ",
                        projections);
  const index_t n = x.dim(0), d = x.dim(1);
  auto dirs = randn<double>({projections, d}, gen);
  std::vector<double> px(static_cast<std::size_t>(n)), py(static_cast<std::size_t>(n));
  double total = 0;
  for (index_t p = 0; p < projections; ++p) {
    double norm = 0;
    for (index_t k = 0; k < d; ++k) norm += dirs(p, k) * dirs(p, k);
    norm = std::sqrt(norm);
    for (index_t i = 0; i < n; ++i) {
      double a = 0, b = 0;
      for (index_t k = 0; k < d; ++k) {
        a += double(x(i, k)) * dirs(p, k);
        b += double(y(i, k)) * dirs(p, k);
      }
      px[static_cast<std::size_t>(i)] = a / norm;
      py[static_cast<std::size_t>(i)] = b / norm;
    }
    std::sort(px.begin(), px.end());
    std::sort(py.begin(), py.end());
    double w = 0;
    for (std::size_t i = 0; i < px.size(); ++i) w += (px[i] - py[i]) * (px[i] - py[i]);
    total += w / static_cast<double>(n);
  }
  return std::sqrt(total / static_cast<double>(projections));
}

}  // namespace flowdiff::metrics
