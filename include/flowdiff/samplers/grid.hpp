// flowdiff/samplers/grid.hpp — time grids for the samplers. A grid is a strictly monotone list of
// times in [0, 1]; ascending integrates noise → data (t = 0 → 1), descending integrates data →
// noise (inversion, likelihoods). The shifted grid t' = s t / (1 + (s - 1) t) takes finer steps
// near t = 1 (data) for s > 1 and near t = 0 (noise) for s < 1. The "timestep shift" of SD3-style
// rectified-flow models, written with t = 1 as noise, is shift = 1 / s_sd3 in our direction.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/paths/log_snr.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

/// Throws config_error unless `grid` has >= 2 points in [0, 1], strictly increasing or decreasing.
template <class T>
void check_grid(std::span<const T> grid) {
  require<config_error>(grid.size() >= 2, "time grid: needs at least 2 points, got ", grid.size());
  const bool up = grid[1] > grid[0];
  for (std::size_t i = 0; i < grid.size(); ++i) {
    require<config_error>(grid[i] >= T(0) && grid[i] <= T(1), "time grid: t[", i,
                          "] must lie in [0, 1], got ", grid[i]);
    if (i > 0)
      require<config_error>(up ? grid[i] > grid[i - 1] : grid[i] < grid[i - 1],
                            "time grid: must be strictly monotone, but t[", i - 1, "] = ",
                            grid[i - 1], " and t[", i, "] = ", grid[i]);
  }
}

/// steps + 1 equally spaced times from t0 to t1 (t0 > t1 integrates backwards).
template <class T = float>
std::vector<T> uniform_grid(index_t steps, T t0 = T(0), T t1 = T(1)) {
  require<config_error>(steps >= 1, "uniform_grid: steps must be >= 1, got ", steps);
  std::vector<T> g(static_cast<std::size_t>(steps + 1));
  for (index_t i = 0; i <= steps; ++i)
    g[static_cast<std::size_t>(i)] =
        t0 + (t1 - t0) * static_cast<T>(i) / static_cast<T>(steps);
  g.back() = t1;  // exact end point, no rounding drift
  check_grid<T>(g);
  return g;
}

/// The uniform grid warped by t' = s t / (1 + (s - 1) t): s > 1 refines near t = 1, s < 1 near 0.
template <class T = float>
std::vector<T> shifted_grid(index_t steps, T shift, T t0 = T(0), T t1 = T(1)) {
  require<config_error>(shift > T(0) && std::isfinite(shift),
                        "shifted_grid: shift must be positive and finite, got ", shift);
  auto g = uniform_grid<T>(steps, t0, t1);
  for (auto& t : g) {
    // 0 and 1 are fixed points of the map; keep them exact despite rounding.
    if (t != T(0) && t != T(1)) t = std::min(T(1), std::max(T(0), shift * t / (T(1) + (shift - T(1)) * t)));
  }
  check_grid<T>(g);
  return g;
}

/// steps + 1 times equally spaced in lambda = log(alpha / beta) between t0 and t1 (both strictly
/// inside (0, 1) where lambda is finite): the natural grid of DPM-Solver-type samplers.
template <class T = float, Schedule S>
std::vector<T> log_snr_grid(const S& schedule, index_t steps, T t0, T t1) {
  require<config_error>(steps >= 1, "log_snr_grid: steps must be >= 1, got ", steps);
  const double l0 = lambda(schedule, static_cast<double>(t0));
  const double l1 = lambda(schedule, static_cast<double>(t1));
  require<config_error>(std::isfinite(l0) && std::isfinite(l1), "log_snr_grid: lambda must be finite at ",
                        "both ends (t strictly inside (0, 1)), got lambda(", t0, ") = ", l0,
                        " and lambda(", t1, ") = ", l1);
  std::vector<T> g(static_cast<std::size_t>(steps + 1));
  for (index_t i = 0; i <= steps; ++i)
    g[static_cast<std::size_t>(i)] = static_cast<T>(
        lambda_inverse(schedule, l0 + (l1 - l0) * static_cast<double>(i) / static_cast<double>(steps)));
  g.front() = t0;
  g.back() = t1;
  check_grid<T>(g);
  return g;
}

/// The grid for DPM-Solver-type samplers over the whole path at a given budget: t = 0, then
/// `steps - 2` intervals uniform in lambda between eps and 1 - eps, then t = 1, with
/// eps = c / steps. The two end steps (out of the noise, into the data) have an infinite lambda
/// step, which the solver takes at first order; the interior steps are its natural ones. On an
/// exact mixture field the best eps was 0.3 / steps to 1 / steps across dimensions 2 to 64,
/// component widths 0.1 to 1 and budgets 6 to 128 (docs/samplers.md), hence c = 0.5; it beat the
/// uniform grid by 2x to 10x there. steps <= 2 leaves no interior: the uniform grid.
template <class T = float, Schedule S>
std::vector<T> dpm_solver_grid(const S& schedule, index_t steps, double c = 0.5) {
  require<config_error>(steps >= 1, "dpm_solver_grid: steps must be >= 1, got ", steps);
  require<config_error>(c > 0 && 2 * c < static_cast<double>(steps),
                        "dpm_solver_grid: c must lie in (0, steps / 2) so that eps = c / steps < "
                        "1/2, got c = ",
                        c, " for ", steps, " steps");
  if (steps <= 2) return uniform_grid<T>(steps);
  const double eps = c / static_cast<double>(steps);
  std::vector<T> g =
      log_snr_grid<T>(schedule, steps - 2, static_cast<T>(eps), static_cast<T>(1 - eps));
  g.insert(g.begin(), T(0));
  g.push_back(T(1));
  check_grid<T>(g);
  return g;
}

}  // namespace flowdiff
