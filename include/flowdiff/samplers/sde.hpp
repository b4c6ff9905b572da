// flowdiff/samplers/sde.hpp — Euler–Maruyama for the marginal-preserving SDE of a Gaussian path,
//   dX = [u_t(X) + sigma_t^2 / 2 * s_t(X)] dt + sigma_t dW,
// which has the same marginals p_t as the ODE dX = u_t(X) dt for any sigma_t >= 0 (the Fokker–Planck
// terms of the extra drift and of the noise cancel). The score s_t is either taken from a score
// field or derived from the velocity through the finite form s = (alpha u - d_alpha x) /
// (d_alpha beta^2 - d_beta beta alpha) (paths/convert.hpp), evaluated at the left end of each step,
// so the final step into t = 1 never evaluates the singular score at beta = 0. One step is
//   x <- x + h (u + sigma^2/2 s) + sigma sqrt(h) xi,   xi ~ N(0, I) (one Gaussian per element),
// fused into a single pass; with sigma_t = 0 the update is the Euler step, bit for bit.
#pragma once

#include <cmath>
#include <type_traits>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/random.hpp"
#include "flowdiff/paths/convert.hpp"
#include "flowdiff/paths/schedule.hpp"
#include "flowdiff/samplers/fused.hpp"
#include "flowdiff/samplers/ode.hpp"

namespace flowdiff {

/// sigma_t = value for every t.
struct ConstantSigma {
  double value = 0;
  double operator()(double) const { return value; }
};

/// Marker: derive the score from the velocity field.
struct ScoreFromVelocity {};

/// Euler–Maruyama for the marginal-preserving SDE. `sigma` is any callable double(double t) >= 0
/// (ConstantSigma for a constant); `score` is ScoreFromVelocity or a score field (x, out, t).
/// The generator is held by pointer and advanced once per step.
template <Schedule S, class Sigma = ConstantSigma, class ScoreField = ScoreFromVelocity>
struct EulerMaruyama {
  static constexpr int order = 1;  // weak order 1 (strong order 1/2)
  static constexpr int stages = std::is_same_v<ScoreField, ScoreFromVelocity> ? 1 : 2;
  static constexpr const char* name = "euler_maruyama";

  S schedule;
  Sigma sigma;
  Generator* gen = nullptr;
  ScoreField* score = nullptr;  // used only when ScoreField is a field type

  template <class T, class B>
  struct Workspace : detail::Scratch<T, B, 3> {};

  template <class T, class B, class F>
  void step(Workspace<T, B>& ws, F& field, View<T, B> x, T t, T h) const {
    require<config_error>(gen != nullptr, "euler_maruyama: no generator (pass one to euler_maruyama())");
    auto u = ws.buf[0].view();
    auto xi = ws.buf[1].view();
    const double sig = sigma(static_cast<double>(t));
    require<config_error>(std::isfinite(sig) && sig >= 0, "euler_maruyama: sigma(", t,
                          ") must be finite and >= 0, got ", sig);
    // Under CFG with the score from the velocity: combination, update and noise in one pass,
    // consuming the generator as below (the same bits on the CPU).
    if constexpr (std::is_same_v<ScoreField, ScoreFromVelocity> && FusableGuidance<F, T, B>) {
      if (const auto g = field.evaluate_halves(View<const T, B>(x), t)) {
        cfg_euler_maruyama_step<T, B>(x, g->cond, g->uncond, g->w, schedule, sig, t, h, *gen);
        return;
      }
    }
    field(View<const T, B>(x), u, t);
    if (sig == 0) {  // the ODE path, exactly the Euler update
      transform(x, [h] FLOWDIFF_HOST_DEVICE(T xv, T uv) { return xv + h * uv; }, x, u);
      return;
    }
    require<config_error>(h > 0, "euler_maruyama: stochastic steps must go forward in time (h = ",
                          h, "); integrate the ODE (sigma = 0) to invert");
    fill_normal(xi, *gen);
    const T half_s2 = static_cast<T>(sig * sig / 2);
    const T noise = static_cast<T>(sig * std::sqrt(static_cast<double>(h)));
    if constexpr (std::is_same_v<ScoreField, ScoreFromVelocity>) {
      const auto c = conversion_at<T>(schedule, Parametrization::velocity, Parametrization::score, t,
                                      "euler_maruyama: score from velocity");
      const T cx = c.cx, cu = c.cin;
      transform(
          x,
          [=] FLOWDIFF_HOST_DEVICE(T xv, T uv, T z) {
            return xv + h * (uv + half_s2 * (cx * xv + cu * uv)) + noise * z;
          },
          x, u, xi);
    } else {
      require<config_error>(score != nullptr, "euler_maruyama: score field pointer is null");
      auto s = ws.buf[2].view();
      (*score)(View<const T, B>(x), s, t);
      transform(
          x,
          [=] FLOWDIFF_HOST_DEVICE(T xv, T uv, T sv, T z) {
            return xv + h * (uv + half_s2 * sv) + noise * z;
          },
          x, u, s, xi);
    }
  }
};

/// Euler–Maruyama with the score derived from the velocity: euler_maruyama(schedule, 1.0, gen).
template <Schedule S>
EulerMaruyama<S> euler_maruyama(S schedule, double sigma, Generator& gen) {
  require<config_error>(std::isfinite(sigma) && sigma >= 0,
                        "euler_maruyama: sigma must be finite and >= 0, got ", sigma);
  return {schedule, ConstantSigma{sigma}, &gen, nullptr};
}

/// Euler–Maruyama with a time-dependent sigma_t (any callable double(double)).
template <Schedule S, class Sigma>
  requires std::is_invocable_r_v<double, Sigma, double>
EulerMaruyama<S, Sigma> euler_maruyama(S schedule, Sigma sigma, Generator& gen) {
  return {schedule, std::move(sigma), &gen, nullptr};
}

/// Euler–Maruyama with the score from a separate score field (kept by pointer: it must outlive
/// the integration).
template <Schedule S, class Sigma, class ScoreField>
EulerMaruyama<S, Sigma, ScoreField> euler_maruyama(S schedule, Sigma sigma, ScoreField& score,
                                                    Generator& gen) {
  return {schedule, std::move(sigma), &gen, &score};
}

}  // namespace flowdiff
