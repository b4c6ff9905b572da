// flowdiff/samplers/dpm_solver.hpp — DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver
// for Guided Sampling of Diffusion Probabilistic Models", Alg. 2), written for our Gaussian paths.
// With lambda_t = log(alpha_t / beta_t) and the data prediction z_hat (converted from the field's
// velocity: z_hat = (beta u - d_beta x) / (d_alpha beta - d_beta alpha)), one step s -> t is
//   x_t = (beta_t / beta_s) x_s + alpha_t (1 - e^{-h}) D,   h = lambda_t - lambda_s,
// with D = z_hat_s on the first step and D = (1 + 1/(2r)) z_hat_s - 1/(2r) z_hat_prev,
// r = h_prev / h, afterwards (second order, one field evaluation per step). e^{-h} is evaluated as
// alpha_s beta_t / (beta_s alpha_t), which is finite (zero) at the ends t = 0 and t = 1 where lambda
// is infinite; a step with an infinite h uses the first-order update (the reference
// implementation's "lower order final"). That costs no order: out of t = 0 the weight of the data
// term is alpha_t = O(h); into t = 1 the update is x_1 = D, and along the exact flow z_hat is
// stationary at t = 1 (d z_hat/dt = -beta d eps_hat/dt / alpha -> 0), so D = z_hat_s is O(h^2) off.
#pragma once

#include <cmath>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/paths/convert.hpp"
#include "flowdiff/paths/schedule.hpp"
#include "flowdiff/samplers/ode.hpp"

namespace flowdiff {

template <Schedule S>
struct DPMSolverPP2M {
  static constexpr int order = 2;
  static constexpr int stages = 1;
  static constexpr const char* name = "dpm_solver++2m";

  S schedule;

  template <class T, class B>
  struct Workspace : detail::Scratch<T, B, 3> {
    bool have_prev = false;
    double prev_h = 0;  // lambda step of the previous step (INFINITY after the first step)
  };

  template <class T, class B, class F>
  void step(Workspace<T, B>& ws, F& field, View<T, B> x, T t, T h) const {
    require<config_error>(h > 0, "dpm_solver++2m: integrates forwards in time only (h = ", h, ")");
    auto u = ws.buf[0].view();
    auto d_now = ws.buf[1].view();
    auto d_prev = ws.buf[2].view();
    const double s_t = static_cast<double>(t), e_t = static_cast<double>(t) + static_cast<double>(h);
    const auto vs = evaluate(schedule, s_t);
    const auto ve = evaluate(schedule, std::min(e_t, 1.0));
    field(View<const T, B>(x), u, t);
    const auto c = conversion_at<T>(schedule, Parametrization::velocity, Parametrization::data, t,
                                    "dpm_solver++2m: data prediction from velocity");
    const T cx = c.cx, cu = c.cin;
    transform(d_now, [=] FLOWDIFF_HOST_DEVICE(T xv, T uv) { return cx * xv + cu * uv; }, x, u);

    require<numeric_error>(vs.beta > 0, "dpm_solver++2m: cannot step from t = ", t,
                           " where beta = 0 (the path has reached the data)");
    // e^{-h} = (alpha_s / beta_s) / (alpha_t / beta_t), finite at both ends.
    const double exp_neg_h = ve.alpha > 0 ? vs.alpha * ve.beta / (vs.beta * ve.alpha) : 0.0;
    const double lam_h = (vs.alpha > 0 && ve.beta > 0) ? std::log(ve.alpha / ve.beta) -
                                                               std::log(vs.alpha / vs.beta)
                                                         : INFINITY;
    const T ratio = static_cast<T>(ve.beta / vs.beta);
    const T coef = static_cast<T>(ve.alpha * (1 - exp_neg_h));
    if (ws.have_prev && std::isfinite(ws.prev_h) && std::isfinite(lam_h) && lam_h > 0) {
      const double r = ws.prev_h / lam_h;
      const T a = static_cast<T>(1 + 1 / (2 * r)), b = static_cast<T>(-1 / (2 * r));
      transform(
          x,
          [=] FLOWDIFF_HOST_DEVICE(T xv, T dn, T dp) { return ratio * xv + coef * (a * dn + b * dp); },
          x, d_now, d_prev);
    } else {
      transform(x, [=] FLOWDIFF_HOST_DEVICE(T xv, T dn) { return ratio * xv + coef * dn; }, x,
                d_now);
    }
    // Keep this step's prediction for the next; after an infinite step (out of t = 0) the ratio r
    // is undefined and the next step is first order again.
    copy(d_prev, View<const T, B>(d_now));
    ws.have_prev = true;
    ws.prev_h = lam_h;
  }
};

/// dpm_solver_pp_2m(schedule): the stepper for a velocity field trained under `schedule`.
template <Schedule S>
DPMSolverPP2M<S> dpm_solver_pp_2m(S schedule) {
  return {schedule};
}

}  // namespace flowdiff
