// flowdiff/train/time_sampler.hpp — the distribution of training times t ~ p(t) on [t_min, t_max]
// that flow-matching and score-matching objectives draw per sample. Uniform is the plain CFM
// choice; logit-normal, t = sigmoid(m + s n) with n ~ N(0, 1) (Esser et al. 2024, "Scaling
// Rectified Flow Transformers"), puts more samples at intermediate times, where the velocity is
// hardest to learn. Both are clamped into [t_min, t_max]: score targets -eps/beta blow up at t = 1
// (beta_1 = 0) and square-root-type schedules have d_beta(1) = -inf, so those objectives train on
// t_max < 1. Each draw uses one generator call and the library's per-sample streams, so t_i depends
// only on (seed, call counter, i), never on the batch size or the thread count.
#pragma once

#include <cmath>
#include <string>
#include <string_view>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::train {

namespace detail {
inline void check_time_range(std::string_view who, double t_min, double t_max) {
  require<config_error>(
      std::isfinite(t_min) && std::isfinite(t_max) && 0 <= t_min && t_min < t_max && t_max <= 1,
      who, ": need 0 <= t_min < t_max <= 1, got t_min = ", t_min, ", t_max = ", t_max);
}
}  // namespace detail

/// t ~ U[t_min, t_max).
struct UniformTime {
  double t_min = 0;
  double t_max = 1;

  // t: [N]
  template <class T>
  void sample(View<T> t, Generator& gen) const {
    detail::check_time_range("UniformTime", t_min, t_max);
    fill_uniform(t, gen, static_cast<T>(t_min), static_cast<T>(t_max));
    clamp(t);
  }
  std::string describe() const {
    return "uniform[" + std::to_string(t_min) + ", " + std::to_string(t_max) + ")";
  }

 private:
  template <class T>
  void clamp(View<T> t) const {
    // lo + (hi - lo) u can round up to hi in float; keep t strictly inside when t_max < 1.
    T* p = t.data();
    const T lo = static_cast<T>(t_min), hi = static_cast<T>(t_max);
    for (index_t i = 0; i < t.numel(); ++i) p[i] = p[i] < lo ? lo : (p[i] > hi ? hi : p[i]);
  }
};

/// t = clamp(sigmoid(mean + stddev n), t_min, t_max) with n ~ N(0, 1).
struct LogitNormalTime {
  double mean = 0;
  double stddev = 1;
  double t_min = 0;
  double t_max = 1;

  // t: [N]
  template <class T>
  void sample(View<T> t, Generator& gen) const {
    detail::check_time_range("LogitNormalTime", t_min, t_max);
    require<config_error>(std::isfinite(mean) && std::isfinite(stddev) && stddev > 0,
                          "LogitNormalTime: need a finite mean and stddev > 0, got mean = ", mean,
                          ", stddev = ", stddev);
    fill_normal(t, gen);
    T* p = t.data();
    const double lo = t_min, hi = t_max;
    for (index_t i = 0; i < t.numel(); ++i) {
      const double s = 1.0 / (1.0 + std::exp(-(mean + stddev * static_cast<double>(p[i]))));
      p[i] = static_cast<T>(s < lo ? lo : (s > hi ? hi : s));
    }
  }
  std::string describe() const {
    return "logit-normal(" + std::to_string(mean) + ", " + std::to_string(stddev) + ")";
  }
};

/// A time sampler: sample(t [N], gen) fills per-sample times in [0, 1].
template <class S, class T = float>
concept TimeSampler = requires(const S& s, View<T> t, Generator& gen) {
  s.sample(t, gen);
};

}  // namespace flowdiff::train
