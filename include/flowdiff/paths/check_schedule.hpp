// flowdiff/paths/check_schedule.hpp — a one-off validation of a schedule (typically a user's
// CustomSchedule) before training or sampling with it. On a uniform grid of t in [0, 1] it checks,
// in double precision: the boundary conditions alpha_0 = 0, beta_0 = 1, alpha_1 = 1, beta_1 = 0 (to
// a tolerance, since VP/DDPM/VE schedules only approximately reach them); finite values; alpha >= 0
// and beta >= 0, strictly positive away from their zero endpoint; alpha non-decreasing, beta
// non-increasing and lambda = log(alpha/beta) strictly increasing; and d_alpha, d_beta (and
// beta_d_beta) against central finite differences (f(t+h) - f(t-h)) / 2h at interior points. It
// throws config_error naming the schedule, the property, t and the values found.
#pragma once

#include <algorithm>
#include <cmath>
#include <string_view>

#include "flowdiff/core/error.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

struct ScheduleCheckOptions {
  /// Allowed |alpha(0)|, |beta(0) - 1|, |alpha(1) - 1|, |beta(1)|.
  double boundary_tolerance = 1e-12;
  /// Grid points on [0, 1], endpoints included (>= 3).
  int grid_points = 257;
  /// Allowed |d - fd| / max(|d|, |fd|, 1e-6): relative error of the derivative vs differences.
  double derivative_tolerance = 1e-5;
};

namespace detail {

// Derivative d of f at t passes if it matches the central difference, or (so that piecewise
// schedules such as DDPM tables, whose derivative jumps at the knots, pass at a knot) a one-sided
// difference with a much smaller step.
template <class F>
bool derivative_matches(F f, double t, double d, double tol, double* fd_out) {
  const double edge = std::min({t, 1.0 - t, 0.05});
  const double h = 1e-3 * edge;
  const double fd = (f(t + h) - f(t - h)) / (2 * h);
  *fd_out = fd;
  auto close = [&](double a) {
    return std::isfinite(a) && std::abs(d - a) <= tol * std::max({std::abs(d), std::abs(a), 1e-6});
  };
  if (close(fd)) return true;
  const double h1 = 1e-7 * edge;
  return close((f(t + h1) - f(t)) / h1) || close((f(t) - f(t - h1)) / h1);
}

}  // namespace detail

/// Validates `s` (see the file comment); `name` appears in every message.
template <Schedule S>
void check_schedule(const S& s, std::string_view name, const ScheduleCheckOptions& opt = {}) {
  require<config_error>(opt.grid_points >= 3, "check_schedule(", name,
                        "): grid_points must be >= 3, got ", opt.grid_points);
  require<config_error>(opt.boundary_tolerance >= 0, "check_schedule(", name,
                        "): boundary_tolerance must be >= 0, got ", opt.boundary_tolerance);
  const double tol = opt.boundary_tolerance;
  const double a0 = s.alpha(0.0), b0 = s.beta(0.0), a1 = s.alpha(1.0), b1 = s.beta(1.0);
  require<config_error>(std::abs(a0) <= tol, "check_schedule(", name,
                        "): boundary condition alpha(0) = 0 violated: got ", a0, " (tolerance ",
                        tol, ")");
  require<config_error>(std::abs(b0 - 1) <= tol, "check_schedule(", name,
                        "): boundary condition beta(0) = 1 violated: got ", b0, " (tolerance ",
                        tol, ")");
  require<config_error>(std::abs(a1 - 1) <= tol, "check_schedule(", name,
                        "): boundary condition alpha(1) = 1 violated: got ", a1, " (tolerance ",
                        tol, ")");
  require<config_error>(std::abs(b1) <= tol, "check_schedule(", name,
                        "): boundary condition beta(1) = 0 violated: got ", b1, " (tolerance ",
                        tol, ")");

  const int n = opt.grid_points;
  double prev_a = 0, prev_b = 0, prev_l = 0;
  for (int i = 0; i < n; ++i) {
    const double t = static_cast<double>(i) / (n - 1);
    const double a = s.alpha(t), b = s.beta(t);
    require<config_error>(std::isfinite(a) && std::isfinite(b), "check_schedule(", name,
                          "): alpha and beta must be finite, got alpha(", t, ") = ", a,
                          ", beta(", t, ") = ", b);
    require<config_error>(a >= 0 && (t == 0 || a > 0), "check_schedule(", name, "): alpha(", t,
                          ") must be ", (t == 0 ? ">= 0" : "> 0"), ", got ", a);
    require<config_error>(b >= 0 && (t == 1 || b > 0), "check_schedule(", name, "): beta(", t,
                          ") must be ", (t == 1 ? ">= 0" : "> 0"), ", got ", b);
    const double l = std::log(a) - std::log(b);
    if (i > 0) {
      const double tp = static_cast<double>(i - 1) / (n - 1);
      require<config_error>(a >= prev_a, "check_schedule(", name,
                            "): alpha must be non-decreasing, but alpha(", tp, ") = ", prev_a,
                            " > alpha(", t, ") = ", a);
      require<config_error>(b <= prev_b, "check_schedule(", name,
                            "): beta must be non-increasing, but beta(", tp, ") = ", prev_b,
                            " < beta(", t, ") = ", b);
      require<config_error>(l > prev_l, "check_schedule(", name,
                            "): log(alpha/beta) must be strictly increasing, but it is ", prev_l,
                            " at t = ", tp, " and ", l, " at t = ", t);
    }
    prev_a = a;
    prev_b = b;
    prev_l = l;

    if (i == 0 || i == n - 1) continue;  // derivatives may be infinite at the endpoints
    const ScheduleValues<double> v = evaluate(s, t);
    require<config_error>(std::isfinite(v.d_alpha) && std::isfinite(v.d_beta), "check_schedule(",
                          name, "): derivatives must be finite inside (0, 1), got d_alpha(", t,
                          ") = ", v.d_alpha, ", d_beta(", t, ") = ", v.d_beta);
    double fd = 0;
    require<config_error>(
        detail::derivative_matches([&](double u) { return double(s.alpha(u)); }, t, v.d_alpha,
                                   opt.derivative_tolerance, &fd),
        "check_schedule(", name, "): d_alpha(", t, ") = ", v.d_alpha,
        " does not match the central difference of alpha, ", fd, " (relative tolerance ",
        opt.derivative_tolerance, ")");
    require<config_error>(
        detail::derivative_matches([&](double u) { return double(s.beta(u)); }, t, v.d_beta,
                                   opt.derivative_tolerance, &fd),
        "check_schedule(", name, "): d_beta(", t, ") = ", v.d_beta,
        " does not match the central difference of beta, ", fd, " (relative tolerance ",
        opt.derivative_tolerance, ")");
    const double bdb = v.beta * v.d_beta;
    require<config_error>(std::abs(v.beta_d_beta - bdb) <=
                              opt.derivative_tolerance * std::max({std::abs(bdb), 1e-6}),
                          "check_schedule(", name, "): beta_d_beta(", t, ") = ", v.beta_d_beta,
                          " does not equal beta * d_beta = ", bdb);
  }
}

/// check_schedule with default options except the boundary tolerance (e.g. 1e-2 for VP, whose
/// alpha(0) is about 0.0066).
template <Schedule S>
void check_schedule(const S& s, std::string_view name, double boundary_tolerance) {
  ScheduleCheckOptions opt;
  opt.boundary_tolerance = boundary_tolerance;
  check_schedule(s, name, opt);
}

}  // namespace flowdiff
