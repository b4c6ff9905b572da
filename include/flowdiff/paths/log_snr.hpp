// flowdiff/paths/log_snr.hpp — the half log signal-to-noise ratio of a schedule,
// lambda(t) = log(alpha_t / beta_t) (DPM-Solver's lambda_t; the log-SNR log(alpha^2 / beta^2) is
// 2 lambda), its derivative d_lambda(t) = d_alpha/alpha - d_beta/beta, and its inverse by
// bisection. lambda runs from -inf at t = 0 (alpha = 0) to +inf at t = 1 (beta = 0) and is strictly
// increasing for every valid schedule (check_schedule verifies it on a grid), so the inverse is
// well defined; schedules that only approximately reach the endpoints (VP, DDPM, VE) cover a finite
// range [lambda(0), lambda(1)].
#pragma once

#include <cmath>

#include "flowdiff/core/config.hpp"
#include "flowdiff/paths/schedule.hpp"

namespace flowdiff {

/// lambda(t) = log(alpha_t / beta_t), as log(alpha) - log(beta) so tiny alpha or beta never
/// underflow the ratio; -inf where alpha = 0, +inf where beta = 0.
FLOWDIFF_EXEC_CHECK_DISABLE
template <Schedule S, class T>
FLOWDIFF_INLINE T lambda(const S& s, T t) {
  return std::log(static_cast<T>(s.alpha(t))) - std::log(static_cast<T>(s.beta(t)));
}

/// d lambda / dt = d_alpha / alpha - d_beta / beta (infinite at exact endpoints).
FLOWDIFF_EXEC_CHECK_DISABLE
template <Schedule S, class T>
FLOWDIFF_INLINE T d_lambda(const S& s, T t) {
  const ScheduleValues<T> v = evaluate(s, t);
  return v.d_alpha / v.alpha - v.d_beta / v.beta;
}

/// The t in [0, 1] with lambda(t) = l, by bisection down to adjacent floating-point values of t.
/// Values below lambda(0) give 0, above lambda(1) give 1 (callers that must not clamp compare
/// against lambda(s, T(0)) and lambda(s, T(1)) first); NaN gives NaN.
FLOWDIFF_EXEC_CHECK_DISABLE
template <Schedule S, class T>
FLOWDIFF_INLINE T lambda_inverse(const S& s, T l) {
  if (l != l) return l;
  T lo = T(0), hi = T(1);
  if (!(l > lambda(s, lo))) return lo;
  if (!(l < lambda(s, hi))) return hi;
  // Invariant: lambda(lo) < l <= lambda(hi). 2100 iterations would be needed only for subnormal
  // t; the loop stops as soon as the bracket holds two adjacent values.
  for (int it = 0; it < 2100; ++it) {
    const T mid = lo + (hi - lo) / T(2);
    if (!(mid > lo && mid < hi)) break;
    if (lambda(s, mid) < l) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return hi;
}

}  // namespace flowdiff
