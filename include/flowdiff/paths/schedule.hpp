// flowdiff/paths/schedule.hpp — the Schedule concept and the closed-form schedules. A schedule gives
// the coefficients of the Gaussian conditional path p_t(x|z) = N(alpha_t z, beta_t^2 I), i.e.
// x = alpha_t z + beta_t eps, and their exact time derivatives, with alpha_0 = 0, beta_0 = 1 (noise)
// and alpha_1 = 1, beta_1 = 0 (data). Members are templates on the scalar type and host-device, so
// kernels evaluate them directly. Provided here: Linear (alpha = t, beta = 1 - t), SqrtBeta
// (alpha = t, beta = sqrt(1 - t)), Cosine (alpha = sin(pi t / 2), beta = cos(pi t / 2)),
// Polynomial (alpha = t^n, beta = 1 - t^n), VariancePreserving (alpha = exp(-T/2),
// beta = sqrt(1 - alpha^2), T(t) = 0.5 (1-t)^2 (b_max - b_min) + (1-t) b_min) and CustomSchedule
// (four user callables). Discrete DDPM tables and VE noise levels are in noise_schedules.hpp.
#pragma once

#include <cmath>
#include <concepts>
#include <type_traits>
#include <utility>

#include "flowdiff/core/config.hpp"

// Host-device templates that call a schedule's or a user's members are also instantiated with
// host-only ones (DiscreteSchedule, CustomSchedule with host lambdas) from host code; this tells
// nvcc not to warn about calls that only ever run on the host (the Thrust/Eigen idiom).
#if !defined(FLOWDIFF_EXEC_CHECK_DISABLE)
#if defined(__CUDACC__)
#define FLOWDIFF_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define FLOWDIFF_EXEC_CHECK_DISABLE
#endif
#endif

namespace flowdiff {

/// alpha(t), beta(t), d_alpha(t), d_beta(t) for float and double t.
///
/// A schedule may also provide `beta_d_beta(t)` = beta * d_beta = (1/2) d(beta^2)/dt. Schedules
/// whose beta behaves like sqrt(1 - t) near t = 1 (SqrtBeta, VariancePreserving, DDPM tables) have
/// d_beta = -inf there while the product stays finite, and the score <-> velocity conversions need
/// exactly that product; without the member it is computed as beta(t) * d_beta(t).
template <class S>
concept Schedule = requires(const S& s, double td, float tf) {
  { s.alpha(td) } -> std::convertible_to<double>;
  { s.beta(td) } -> std::convertible_to<double>;
  { s.d_alpha(td) } -> std::convertible_to<double>;
  { s.d_beta(td) } -> std::convertible_to<double>;
  { s.alpha(tf) } -> std::convertible_to<float>;
  { s.beta(tf) } -> std::convertible_to<float>;
  { s.d_alpha(tf) } -> std::convertible_to<float>;
  { s.d_beta(tf) } -> std::convertible_to<float>;
};

/// All coefficients at one t. `beta_d_beta` defaults to beta * d_beta when built by hand, but
/// evaluate() takes it from the schedule when the schedule provides it (see Schedule).
template <class T>
struct ScheduleValues {
  T alpha, beta, d_alpha, d_beta;
  T beta_d_beta = beta * d_beta;
};

namespace detail {

template <class S, class T>
concept HasBetaDBeta = requires(const S& s, T t) {
  { s.beta_d_beta(t) } -> std::convertible_to<T>;
};

/// A kernel-capturable form of a schedule: schedules that own host memory (DiscreteSchedule)
/// provide `view()`, a trivially copyable handle over the same table; others are their own view.
template <class S>
concept HasKernelView = requires(const S& s) {
  { s.view() } -> Schedule;
};

template <class S>
decltype(auto) kernel_schedule(const S& s) {
  if constexpr (HasKernelView<S>) {
    return s.view();
  } else {
    return (s);
  }
}

// HUGE_VAL, not std::numeric_limits<T>::infinity(): the latter is a constexpr host function that
// nvcc only lets device code call under --expt-relaxed-constexpr.
template <class T>
FLOWDIFF_INLINE T infinity() {
  return static_cast<T>(HUGE_VAL);
}

template <class T>
FLOWDIFF_INLINE constexpr T half_pi() {
  return static_cast<T>(1.57079632679489661923132169163975144);
}

}  // namespace detail

/// beta(t) * d_beta(t), taken from the schedule's own `beta_d_beta` when it has one.
FLOWDIFF_EXEC_CHECK_DISABLE
template <Schedule S, class T>
FLOWDIFF_INLINE T beta_d_beta(const S& s, T t) {
  if constexpr (detail::HasBetaDBeta<S, T>) {
    return static_cast<T>(s.beta_d_beta(t));
  } else {
    return static_cast<T>(s.beta(t)) * static_cast<T>(s.d_beta(t));
  }
}

FLOWDIFF_EXEC_CHECK_DISABLE
template <class T, Schedule S>
FLOWDIFF_INLINE ScheduleValues<T> evaluate(const S& s, T t) {
  return {static_cast<T>(s.alpha(t)), static_cast<T>(s.beta(t)), static_cast<T>(s.d_alpha(t)),
          static_cast<T>(s.d_beta(t)), beta_d_beta(s, t)};
}

namespace schedules {

/// The conditional optimal-transport (rectified-flow) path: alpha = t, beta = 1 - t.
struct Linear {
  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    return t;
  }
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    return T(1) - t;
  }
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T) const {
    return T(1);
  }
  template <class T>
  FLOWDIFF_INLINE T d_beta(T) const {
    return T(-1);
  }
};

/// alpha = t, beta = sqrt(1 - t) (the MIT 6.S184 lab schedule). d_beta = -1 / (2 sqrt(1 - t)) is
/// -inf at t = 1 and is returned as such; beta * d_beta = -1/2 everywhere, which keeps the
/// score <-> velocity conversions finite at t = 1.
struct SqrtBeta {
  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    return t;
  }
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    return std::sqrt(T(1) - t);
  }
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T) const {
    return T(1);
  }
  template <class T>
  FLOWDIFF_INLINE T d_beta(T t) const {
    return t < T(1) ? T(-0.5) / std::sqrt(T(1) - t) : -detail::infinity<T>();
  }
  template <class T>
  FLOWDIFF_INLINE T beta_d_beta(T) const {
    return T(-0.5);
  }
};

/// alpha = sin(pi t / 2), beta = cos(pi t / 2) (alpha^2 + beta^2 = 1). beta is evaluated as
/// sin(pi (1 - t) / 2) so that beta(1) is exactly 0 rather than cos(pi/2) ~ 6e-17.
struct Cosine {
  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    return std::sin(detail::half_pi<T>() * t);
  }
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    return std::sin(detail::half_pi<T>() * (T(1) - t));
  }
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T t) const {
    return detail::half_pi<T>() * std::sin(detail::half_pi<T>() * (T(1) - t));
  }
  template <class T>
  FLOWDIFF_INLINE T d_beta(T t) const {
    return -detail::half_pi<T>() * std::sin(detail::half_pi<T>() * t);
  }
};

/// alpha = t^n, beta = 1 - t^n (Meta flow_matching's PolynomialConvexScheduler); n > 0. For n > 1
/// both derivatives vanish at t = 0 (the velocity carries no information there); for n < 1 they
/// are infinite at t = 0.
struct Polynomial {
  double n = 2;

  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    return std::pow(t, static_cast<T>(n));
  }
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    return T(1) - std::pow(t, static_cast<T>(n));
  }
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T t) const {
    return static_cast<T>(n) * std::pow(t, static_cast<T>(n - 1));
  }
  template <class T>
  FLOWDIFF_INLINE T d_beta(T t) const {
    return -static_cast<T>(n) * std::pow(t, static_cast<T>(n - 1));
  }
};

/// The variance-preserving (DDPM / score-SDE VP) path in flow time, as in Lipman et al., "Flow
/// Matching Guide and Code" (2024): with the linear SDE rate b(s) = beta_min + s (beta_max -
/// beta_min) and its integral T(s), alpha_t = exp(-T(1 - t) / 2), beta_t = sqrt(1 - alpha_t^2).
/// beta_min / beta_max are the SDE's rates, not this library's beta_t. Endpoints: alpha_0 =
/// exp(-(beta_min + beta_max) / 4) ~ 0.0066 for the defaults (not 0: the path starts from almost,
/// not exactly, pure noise) while alpha_1 = 1 and beta_1 = 0 exactly; d_beta = -inf at t = 1
/// (beta ~ sqrt(beta_min (1 - t))), with beta * d_beta -> -beta_min / 2 finite.
struct VariancePreserving {
  double beta_min = 0.1;
  double beta_max = 20;

  /// T(1 - t) = 0.5 (1-t)^2 (beta_max - beta_min) + (1-t) beta_min: the integrated SDE rate.
  template <class T>
  FLOWDIFF_INLINE T integrated_rate(T t) const {
    const T s = T(1) - t;
    return s * (T(0.5) * s * static_cast<T>(beta_max - beta_min) + static_cast<T>(beta_min));
  }
  /// b(1 - t) = -dT(1 - t)/dt: the SDE rate at flow time t.
  template <class T>
  FLOWDIFF_INLINE T rate(T t) const {
    return static_cast<T>(beta_min) + (T(1) - t) * static_cast<T>(beta_max - beta_min);
  }

  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    return std::exp(T(-0.5) * integrated_rate(t));
  }
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    // 1 - alpha^2 = -expm1(-T): no cancellation near t = 1 where alpha -> 1.
    return std::sqrt(-std::expm1(-integrated_rate(t)));
  }
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T t) const {
    return T(0.5) * alpha(t) * rate(t);
  }
  template <class T>
  FLOWDIFF_INLINE T beta_d_beta(T t) const {
    // beta^2 = 1 - alpha^2, so beta d_beta = -alpha d_alpha = -alpha^2 b / 2.
    return T(-0.5) * std::exp(-integrated_rate(t)) * rate(t);
  }
  template <class T>
  FLOWDIFF_INLINE T d_beta(T t) const {
    const T b = beta(t);
    return b > T(0) ? beta_d_beta(t) / b : -detail::infinity<T>();
  }
};

}  // namespace schedules

/// A schedule from four user callables, each mapping t to a value (called with float or double t;
/// the result is converted to that type). For kernels the callables must be host-device.
/// `CustomSchedule s{[](auto t) { return t * t; }, [](auto t) { return 1 - t * t; },
///                   [](auto t) { return 2 * t; }, [](auto t) { return -2 * t; }};`
/// Validate a hand-written schedule once with check_schedule() (check_schedule.hpp).
template <class FA, class FB, class FDA, class FDB>
struct CustomSchedule {
  FA alpha_fn;
  FB beta_fn;
  FDA d_alpha_fn;
  FDB d_beta_fn;

  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T alpha(T t) const {
    return static_cast<T>(alpha_fn(t));
  }
  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T beta(T t) const {
    return static_cast<T>(beta_fn(t));
  }
  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T d_alpha(T t) const {
    return static_cast<T>(d_alpha_fn(t));
  }
  FLOWDIFF_EXEC_CHECK_DISABLE
  template <class T>
  FLOWDIFF_INLINE T d_beta(T t) const {
    return static_cast<T>(d_beta_fn(t));
  }
};

template <class FA, class FB, class FDA, class FDB>
CustomSchedule(FA, FB, FDA, FDB) -> CustomSchedule<FA, FB, FDA, FDB>;

static_assert(Schedule<schedules::Linear>);
static_assert(Schedule<schedules::SqrtBeta>);
static_assert(Schedule<schedules::Cosine>);
static_assert(Schedule<schedules::Polynomial>);
static_assert(Schedule<schedules::VariancePreserving>);

}  // namespace flowdiff
