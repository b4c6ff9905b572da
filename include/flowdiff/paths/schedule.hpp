// flowdiff/paths/schedule.hpp — the Schedule concept and the linear schedule. A schedule gives the
// coefficients of the Gaussian conditional path p_t(x|z) = N(alpha_t z, beta_t^2 I) and their exact
// time derivatives, with alpha_0 = 0, beta_0 = 1 (noise) and alpha_1 = 1, beta_1 = 0 (data).
// Members are templates on the scalar type and host-device, so kernels evaluate them directly.
// Further schedules (sqrt-beta, cosine, polynomial, VP, discrete DDPM, sigma(t)) live beside this.
#pragma once

#include <concepts>

#include "flowdiff/core/config.hpp"

namespace flowdiff {

/// alpha(t), beta(t), d_alpha(t), d_beta(t) for float and double t.
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

/// All four coefficients at one t.
template <class T>
struct ScheduleValues {
  T alpha, beta, d_alpha, d_beta;
};

template <class T, Schedule S>
FLOWDIFF_INLINE ScheduleValues<T> evaluate(const S& s, T t) {
  return {static_cast<T>(s.alpha(t)), static_cast<T>(s.beta(t)), static_cast<T>(s.d_alpha(t)),
          static_cast<T>(s.d_beta(t))};
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

}  // namespace schedules

static_assert(Schedule<schedules::Linear>);

}  // namespace flowdiff
