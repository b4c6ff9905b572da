// flowdiff/paths/noise_schedules.hpp — converters from diffusion-style noise schedules into this
// library's one time convention (t = 0 noise, t = 1 data, x = alpha_t z + beta_t eps).
// (a) Discrete DDPM variances beta_1..beta_K (not this library's beta_t): alpha_bar_k =
// prod_{i<=k} (1 - beta_i), DDPM step k = 0..K-1 (noise increasing with k) sits at t_k = 1 -
// (k+1)/K, the node t = 1 has alpha_bar = 1, and log(alpha_bar) is interpolated piecewise-linearly
// in t (DPM-Solver's discrete NoiseScheduleVP, reversed in time); alpha = sqrt(alpha_bar),
// beta = sqrt(1 - alpha_bar), with the exact derivatives of that interpolant.
// (b) A variance-exploding noise level n(t) (x_VE = z + n(t) eps, n decreasing in t; EDM's sigma),
// rescaled to the unit-sum form alpha = 1 / sqrt(1 + n^2), beta = n / sqrt(1 + n^2), so
// x = alpha x_VE; d_alpha = -n n' / (1 + n^2)^{3/2}, d_beta = n' / (1 + n^2)^{3/2}. The EDM/Karras
// levels n(t) = (n_max^{1/rho} + t (n_min^{1/rho} - n_max^{1/rho}))^rho are a ready-made instance.
// The VE level is called noise_level here because DESIGN reserves sigma for the SDE coefficient.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <utility>
#include <vector>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

// ---------------------------------------------------------------------------------------------
// (a) Discrete DDPM schedules
// ---------------------------------------------------------------------------------------------

/// Linearly spaced DDPM variances beta_1..beta_K from beta_start to beta_end (Ho et al. 2020:
/// ddpm_linear_betas(1000, 1e-4, 0.02)).
inline std::vector<double> ddpm_linear_betas(index_t steps, double beta_start = 1e-4,
                                             double beta_end = 0.02) {
  require<config_error>(steps >= 1, "ddpm_linear_betas: steps must be >= 1, got ", steps);
  require<config_error>(beta_start > 0 && beta_end < 1 && beta_start <= beta_end,
                        "ddpm_linear_betas: need 0 < beta_start <= beta_end < 1, got beta_start = ",
                        beta_start, ", beta_end = ", beta_end);
  std::vector<double> b(static_cast<std::size_t>(steps));
  for (index_t k = 0; k < steps; ++k)
    b[static_cast<std::size_t>(k)] =
        steps == 1 ? beta_start
                   : beta_start + (beta_end - beta_start) * static_cast<double>(k) /
                                      static_cast<double>(steps - 1);
  return b;
}

/// The cosine DDPM variances of Nichol & Dhariwal (2021): alpha_bar(u) = cos^2((u + s)/(1 + s)
/// pi/2), beta_k = min(1 - alpha_bar((k+1)/K) / alpha_bar(k/K), max_beta).
inline std::vector<double> ddpm_cosine_betas(index_t steps, double s = 0.008,
                                             double max_beta = 0.999) {
  require<config_error>(steps >= 1, "ddpm_cosine_betas: steps must be >= 1, got ", steps);
  require<config_error>(s >= 0, "ddpm_cosine_betas: s must be >= 0, got ", s);
  require<config_error>(max_beta > 0 && max_beta < 1,
                        "ddpm_cosine_betas: max_beta must lie in (0, 1), got ", max_beta);
  auto alpha_bar = [s](double u) {
    const double c = std::cos((u + s) / (1 + s) * detail::half_pi<double>());
    return c * c;
  };
  std::vector<double> b(static_cast<std::size_t>(steps));
  const double k_total = static_cast<double>(steps);
  for (index_t k = 0; k < steps; ++k) {
    const double r = alpha_bar(static_cast<double>(k + 1) / k_total) /
                     alpha_bar(static_cast<double>(k) / k_total);
    b[static_cast<std::size_t>(k)] = std::min(1 - r, max_beta);
  }
  return b;
}

/// Flow time of DDPM step k of K: t_k = 1 - (k + 1) / K (k = K-1, the noisiest, is t = 0).
inline double ddpm_step_to_time(index_t k, index_t steps) {
  require<config_error>(steps >= 1, "ddpm_step_to_time: steps must be >= 1, got ", steps);
  require<config_error>(k >= 0 && k < steps, "ddpm_step_to_time: k must lie in [0, ", steps - 1,
                        "], got ", k);
  return 1 - static_cast<double>(k + 1) / static_cast<double>(steps);
}

/// The (fractional) DDPM step at flow time t: K (1 - t) - 1, in [-1, K - 1]; -1 is the clean-data
/// node t = 1 that has no DDPM step. Round to the nearest integer to index a DDPM table.
inline double ddpm_time_to_step(double t, index_t steps) {
  require<config_error>(steps >= 1, "ddpm_time_to_step: steps must be >= 1, got ", steps);
  require<config_error>(t >= 0 && t <= 1, "ddpm_time_to_step: t must lie in [0, 1], got ", t);
  return static_cast<double>(steps) * (1 - t) - 1;
}

/// A trivially copyable handle over a DiscreteSchedule's table, usable inside kernels as long as
/// the table lives in memory the kernel can read (host memory for the CPU backend; for a GPU
/// backend copy the K + 1 doubles to the device and build a view over that copy).
struct DiscreteScheduleView {
  /// log(alpha_bar) at the nodes t_j = j / K, j = 0..K: [K + 1], table[K] = 0.
  const double* log_alpha_bar = nullptr;
  index_t intervals = 0;  ///< K

  /// log(alpha_bar)(t) and its t-derivative on the segment holding t (the right segment at a
  /// knot, the last one at t = 1).
  template <class T>
  FLOWDIFF_INLINE void interpolate(T t, double* l, double* dl) const {
    const double u = static_cast<double>(t) * static_cast<double>(intervals);
    index_t j = static_cast<index_t>(u);  // floor for u >= 0
    if (j > intervals - 1) j = intervals - 1;
    if (j < 0) j = 0;
    const double w = u - static_cast<double>(j);
    const double l0 = log_alpha_bar[j], l1 = log_alpha_bar[j + 1];
    *l = (1 - w) * l0 + w * l1;  // exactly l1 at w = 1, so alpha(1) = 1 and beta(1) = 0 exactly
    *dl = static_cast<double>(intervals) * (l1 - l0);
  }

  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    double l, dl;
    interpolate(t, &l, &dl);
    return static_cast<T>(std::exp(0.5 * l));
  }
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    double l, dl;
    interpolate(t, &l, &dl);
    return static_cast<T>(std::sqrt(-std::expm1(l)));
  }
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T t) const {
    double l, dl;
    interpolate(t, &l, &dl);
    return static_cast<T>(0.5 * std::exp(0.5 * l) * dl);
  }
  template <class T>
  FLOWDIFF_INLINE T beta_d_beta(T t) const {
    double l, dl;
    interpolate(t, &l, &dl);
    return static_cast<T>(-0.5 * std::exp(l) * dl);  // (1/2) d(1 - alpha_bar)/dt
  }
  template <class T>
  FLOWDIFF_INLINE T d_beta(T t) const {
    double l, dl;
    interpolate(t, &l, &dl);
    const double b = std::sqrt(-std::expm1(l));
    return b > 0 ? static_cast<T>(-0.5 * std::exp(l) * dl / b) : -detail::infinity<T>();
  }
};

/// A DDPM schedule as a continuous-time Schedule (see the file comment). It owns its table in a
/// std::vector, so it is host-only and copying it copies the table; kernels use view() (flowdiff's
/// GaussianPath does so by itself). Endpoints: alpha(1) = 1 and beta(1) = 0 exactly, with d_beta =
/// -inf there (beta ~ sqrt(1 - t) near t = 1); alpha(0) = sqrt(alpha_bar_{K-1}) > 0 is only close to
/// 0 (about 6.4e-3 for the linear 1000-step table). The derivative of the interpolant jumps at the
/// knots t = j / K; the right-hand one is returned there.
class DiscreteSchedule {
 public:
  DiscreteSchedule() = default;

  /// From DDPM variances beta_1..beta_K, each in (0, 1).
  static DiscreteSchedule from_betas(std::span<const double> betas) {
    require<config_error>(!betas.empty(), "DiscreteSchedule::from_betas: betas must not be empty");
    std::vector<double> log_ab(betas.size());
    double acc = 0;
    for (std::size_t k = 0; k < betas.size(); ++k) {
      require<config_error>(betas[k] > 0 && betas[k] < 1, "DiscreteSchedule::from_betas: betas[",
                            k, "] must lie in (0, 1), got ", betas[k]);
      acc += std::log1p(-betas[k]);
      log_ab[k] = acc;
    }
    return from_log_alpha_bar(log_ab, "from_betas");
  }

  /// From the cumulative products alpha_bar_0..alpha_bar_{K-1} (decreasing, each in (0, 1]).
  static DiscreteSchedule from_alpha_bar(std::span<const double> alpha_bar) {
    require<config_error>(!alpha_bar.empty(),
                          "DiscreteSchedule::from_alpha_bar: alpha_bar must not be empty");
    std::vector<double> log_ab(alpha_bar.size());
    for (std::size_t k = 0; k < alpha_bar.size(); ++k) {
      require<config_error>(alpha_bar[k] > 0 && alpha_bar[k] <= 1,
                            "DiscreteSchedule::from_alpha_bar: alpha_bar[", k,
                            "] must lie in (0, 1], got ", alpha_bar[k]);
      log_ab[k] = std::log(alpha_bar[k]);
    }
    return from_log_alpha_bar(log_ab, "from_alpha_bar");
  }

  /// K, the number of DDPM steps.
  index_t steps() const { return static_cast<index_t>(table_.size()) - 1; }
  /// alpha_bar of DDPM step k (0 <= k < K).
  double alpha_bar(index_t k) const {
    require<config_error>(k >= 0 && k < steps(), "DiscreteSchedule::alpha_bar: k must lie in [0, ",
                          steps() - 1, "], got ", k);
    return std::exp(table_[static_cast<std::size_t>(steps() - 1 - k)]);
  }
  /// Flow time of DDPM step k: 1 - (k + 1) / K.
  double time_of_step(index_t k) const { return ddpm_step_to_time(k, steps()); }
  /// Fractional DDPM step at flow time t: K (1 - t) - 1.
  double step_of_time(double t) const { return ddpm_time_to_step(t, steps()); }

  DiscreteScheduleView view() const {
    require<config_error>(!table_.empty(), "DiscreteSchedule: empty (default-constructed) schedule");
    return {table_.data(), steps()};
  }

  template <class T>
  T alpha(T t) const {
    return view().alpha(t);
  }
  template <class T>
  T beta(T t) const {
    return view().beta(t);
  }
  template <class T>
  T d_alpha(T t) const {
    return view().d_alpha(t);
  }
  template <class T>
  T d_beta(T t) const {
    return view().d_beta(t);
  }
  template <class T>
  T beta_d_beta(T t) const {
    return view().beta_d_beta(t);
  }

 private:
  // log_ab[k] = log(alpha_bar_k) for DDPM step k; the table is indexed by flow time instead.
  static DiscreteSchedule from_log_alpha_bar(const std::vector<double>& log_ab, const char* what) {
    DiscreteSchedule s;
    const std::size_t k_total = log_ab.size();
    s.table_.resize(k_total + 1);
    for (std::size_t j = 0; j < k_total; ++j) s.table_[j] = log_ab[k_total - 1 - j];
    s.table_[k_total] = 0;
    for (std::size_t j = 0; j < k_total; ++j)
      require<config_error>(s.table_[j] < s.table_[j + 1], "DiscreteSchedule::", what,
                            ": alpha_bar must decrease strictly with the DDPM step, but steps ",
                            k_total - 1 - j, " and ", static_cast<index_t>(k_total) - 2 -
                            static_cast<index_t>(j), " have log(alpha_bar) ", s.table_[j], " and ",
                            s.table_[j + 1]);
    return s;
  }

  std::vector<double> table_;  // [K + 1]: log(alpha_bar) at t_j = j / K
};

/// `auto s = ddpm_schedule(ddpm_linear_betas(1000));`
inline DiscreteSchedule ddpm_schedule(std::span<const double> betas) {
  return DiscreteSchedule::from_betas(betas);
}

static_assert(Schedule<DiscreteSchedule>);
static_assert(Schedule<DiscreteScheduleView>);

// ---------------------------------------------------------------------------------------------
// (b) Variance-exploding noise levels
// ---------------------------------------------------------------------------------------------

/// A schedule from a VE noise level n(t) > 0 (decreasing in t) and its derivative, two callables
/// of t (host-device for kernels). Endpoints are only approximate unless n(0) = inf and n(1) = 0:
/// alpha_0 = 1 / sqrt(1 + n(0)^2), beta_1 = n(1) / sqrt(1 + n(1)^2).
template <class Level, class DLevel>
struct VeSchedule {
  Level level_fn;
  DLevel d_level_fn;

  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T noise_level(T t) const {
    return static_cast<T>(level_fn(t));
  }
  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T d_noise_level(T t) const {
    return static_cast<T>(d_level_fn(t));
  }

  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    const T n = noise_level(t);
    return T(1) / std::sqrt(T(1) + n * n);
  }
  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    const T n = noise_level(t);
    return n / std::sqrt(T(1) + n * n);
  }
  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T t) const {
    const T n = noise_level(t), q = T(1) + n * n;
    return -n * d_noise_level(t) / (q * std::sqrt(q));
  }
  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T d_beta(T t) const {
    const T n = noise_level(t), q = T(1) + n * n;
    return d_noise_level(t) / (q * std::sqrt(q));
  }
};

template <class Level, class DLevel>
VeSchedule(Level, DLevel) -> VeSchedule<Level, DLevel>;

/// The EDM (Karras et al. 2022) noise levels in flow time: n(t) = (sigma_max^{1/rho} +
/// t (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho, from sigma_max at t = 0 to sigma_min at t = 1.
/// (sigma_min / sigma_max are EDM's names for VE noise levels, kept for recognisability.)
struct KarrasLevels {
  double sigma_min = 0.002;
  double sigma_max = 80;
  double rho = 7;

  template <class T>
  FLOWDIFF_INLINE T operator()(T t) const {
    const double a = std::pow(sigma_max, 1 / rho), b = std::pow(sigma_min, 1 / rho);
    return static_cast<T>(std::pow(a + static_cast<double>(t) * (b - a), rho));
  }
};

/// d n / dt of KarrasLevels: rho (a + t (b - a))^{rho - 1} (b - a).
struct KarrasLevelsDerivative {
  double sigma_min = 0.002;
  double sigma_max = 80;
  double rho = 7;

  template <class T>
  FLOWDIFF_INLINE T operator()(T t) const {
    const double a = std::pow(sigma_max, 1 / rho), b = std::pow(sigma_min, 1 / rho);
    return static_cast<T>(rho * std::pow(a + static_cast<double>(t) * (b - a), rho - 1) * (b - a));
  }
};

using KarrasSchedule = VeSchedule<KarrasLevels, KarrasLevelsDerivative>;

/// The EDM schedule as a flow schedule; alpha_0 = 1/sqrt(1 + sigma_max^2) (0.0125 for the defaults)
/// and beta_1 = sigma_min / sqrt(1 + sigma_min^2) (0.002): neither endpoint is reached exactly.
inline KarrasSchedule karras_schedule(double sigma_min = 0.002, double sigma_max = 80,
                                      double rho = 7) {
  require<config_error>(sigma_min > 0 && sigma_min < sigma_max,
                        "karras_schedule: need 0 < sigma_min < sigma_max, got sigma_min = ",
                        sigma_min, ", sigma_max = ", sigma_max);
  require<config_error>(rho > 0, "karras_schedule: rho must be > 0, got ", rho);
  return {{sigma_min, sigma_max, rho}, {sigma_min, sigma_max, rho}};
}

/// The VE noise level of any schedule at t, beta_t / alpha_t (x / alpha_t = z + (beta/alpha) eps):
/// the level an EDM-style (VE) model expects for an input scaled by 1 / alpha_t.
FLOWDIFF_EXEC_CHECK_DISABLE
template <Schedule S, class T>
FLOWDIFF_INLINE T ve_noise_level(const S& s, T t) {
  return static_cast<T>(s.beta(t)) / static_cast<T>(s.alpha(t));
}

static_assert(Schedule<KarrasSchedule>);

}  // namespace flowdiff
