// flowdiff/guidance/scale.hpp — the guidance scale w as a function of t. Every guidance adapter takes
// a scale: a number (constant w), a GuidanceInterval (Kynkäänniemi et al. 2024, "Applying guidance in
// a limited interval improves sample and distribution quality in diffusion models": w for
// t in [t_lo, t_hi], plain conditional sampling w = 1 elsewhere), or any callable t -> w. In our
// convention t = 0 is noise and t = 1 data, so the paper's high-noise interval end (sigma_hi) is our
// t_lo and its low-noise end (sigma_lo) our t_hi; guidance_interval_sigma converts through the EDM
// noise level sigma = beta_t / alpha_t of a schedule. Also the converter for the other published CFG
// convention (1 + g) u(x|y) - g u(x|∅), which is our w = 1 + g.
#pragma once

#include <cmath>
#include <concepts>
#include <type_traits>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

/// A constant guidance scale. Any finite w is accepted: w = 1 is conditional sampling, w = 0
/// unconditional, 0 < w < 1 interpolates, w > 1 guides, w < 0 guides away from the class.
struct ConstantScale {
  double w = 1.0;
  FLOWDIFF_INLINE double operator()(double) const { return w; }
};

/// w inside [t_lo, t_hi], 1 (the plain conditional field) outside.
struct GuidanceInterval {
  double w = 1.0, t_lo = 0.0, t_hi = 1.0;
  FLOWDIFF_INLINE double operator()(double t) const { return (t >= t_lo && t <= t_hi) ? w : 1.0; }
};

/// A scale is anything callable with a time that returns something convertible to double.
template <class W>
concept GuidanceScale = requires(const W& w, double t) {
  { w(t) } -> std::convertible_to<double>;
};

namespace detail {
inline void check_scale_value(const char* who, double w) {
  require<config_error>(std::isfinite(w), who, ": the guidance scale w must be finite, got ", w);
}

/// A number becomes a ConstantScale (checked); a callable is kept as it is.
template <class W>
auto make_scale(const char* who, W w) {
  if constexpr (std::is_arithmetic_v<W>) {
    check_scale_value(who, static_cast<double>(w));
    return ConstantScale{static_cast<double>(w)};
  } else {
    static_assert(GuidanceScale<W>,
                  "guidance scale: pass a number or a callable t -> w returning a number");
    return w;
  }
}
}  // namespace detail

/// Guidance with scale w for t in [t_lo, t_hi] (t = 0 noise, t = 1 data), conditional elsewhere.
inline GuidanceInterval guidance_interval(double w, double t_lo, double t_hi) {
  detail::check_scale_value("guidance_interval", w);
  require<config_error>(t_lo >= 0 && t_lo <= 1, "guidance_interval: t_lo must lie in [0, 1], got ",
                        t_lo);
  require<config_error>(t_hi >= 0 && t_hi <= 1, "guidance_interval: t_hi must lie in [0, 1], got ",
                        t_hi);
  require<config_error>(t_lo <= t_hi, "guidance_interval: t_lo must be <= t_hi, got t_lo = ", t_lo,
                        " and t_hi = ", t_hi);
  return {w, t_lo, t_hi};
}

/// The t at which a schedule's EDM noise level beta_t / alpha_t equals sigma (> 0), by bisection
/// on beta_t - sigma alpha_t, which falls from 1 at t = 0 to -sigma at t = 1 for any schedule whose
/// alpha rises and beta falls.
template <Schedule S>
double time_of_sigma(const S& schedule, double sigma) {
  require<config_error>(std::isfinite(sigma) && sigma > 0,
                        "time_of_sigma: sigma must be finite and > 0, got ", sigma);
  double lo = 0.0, hi = 1.0;
  for (int it = 0; it < 200 && hi - lo > 1e-15; ++it) {
    const double mid = 0.5 * (lo + hi);
    const double f = static_cast<double>(schedule.beta(mid)) -
                     sigma * static_cast<double>(schedule.alpha(mid));
    (f > 0 ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

/// The paper's interval given as noise levels sigma in (sigma_lo, sigma_hi] (e.g. (0.28, 5.42] for
/// EDM2 on ImageNet-512), mapped to t in [t(sigma_hi), t(sigma_lo)] for `schedule`.
template <Schedule S>
GuidanceInterval guidance_interval_sigma(const S& schedule, double w, double sigma_lo,
                                         double sigma_hi) {
  require<config_error>(sigma_lo > 0 && sigma_lo <= sigma_hi,
                        "guidance_interval_sigma: need 0 < sigma_lo <= sigma_hi, got sigma_lo = ",
                        sigma_lo, " and sigma_hi = ", sigma_hi);
  return guidance_interval(w, time_of_sigma(schedule, sigma_hi), time_of_sigma(schedule, sigma_lo));
}

/// The other published CFG convention (1 + g) u(x|y) - g u(x|∅) is our w = 1 + g.
template <class T>
  requires std::is_arithmetic_v<T>
FLOWDIFF_INLINE constexpr T from_plus_one_convention(T g) {
  return T(1) + g;
}
/// The inverse: g = w - 1.
template <class T>
  requires std::is_arithmetic_v<T>
FLOWDIFF_INLINE constexpr T to_plus_one_convention(T w) {
  return w - T(1);
}

}  // namespace flowdiff
