// flowdiff/samplers/adaptive.hpp — the Dormand–Prince 5(4) embedded Runge–Kutta method with
// step-size control (Dormand & Prince 1980; Hairer, Nørsett & Wanner, "Solving ODEs I", II.4–5).
// Fifth-order solution, fourth-order embedded estimate, first-same-as-last (6 evaluations per
// accepted step), error norm err = sqrt(mean(((x5 - x4) / (atol + rtol max(|x|, |x_new|)))^2)) over
// the whole batch (or, with ErrorNorm::worst_sample, the largest of the per-sample means), step
// accepted when err <= 1, next step h * clamp(0.9 err^(-1/5), 0.2, 5).
// integrate() drives it adaptively inside each interval of the grid, so observers still see
// every grid time.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/samplers/ode.hpp"

namespace flowdiff {

/// What an adaptive integration did, beyond IntegrateStats.
struct AdaptiveStats {
  index_t accepted = 0;
  index_t rejected = 0;
  index_t evaluations = 0;
};

struct Dopri5 {
  static constexpr int order = 5;
  static constexpr bool adaptive = true;
  static constexpr const char* name = "dopri5";

  /// How a step's error estimate is measured; the step size is one for the whole batch.
  enum class ErrorNorm {
    /// The RMS over every element of the batch (torchdiffeq's default): the tolerance holds for
    /// the typical sample, and a few samples where the field bends (near a boundary between
    /// modes) can end far from their exact endpoint.
    batch,
    /// The largest per-sample RMS (a sample is a row of x: its first index): the tolerance holds
    /// for every sample, at the price of the steps its hardest sample needs.
    worst_sample,
  };

  double atol = 1e-6;
  double rtol = 1e-4;
  index_t max_steps = 100000;  ///< per grid interval, accepted + rejected
  double min_step = 0;         ///< 0: no minimum beyond round-off
  ErrorNorm error_norm = ErrorNorm::batch;

  template <class T, class B>
  struct Workspace : detail::Scratch<T, B, 9> {
    double h = 0;          // step proposed for the next call (0: choose one)
    bool have_k1 = false;  // k1 already holds u(x, t) (first-same-as-last)
    AdaptiveStats stats;
    std::vector<double> sample_sums;  // ErrorNorm::worst_sample: one per row (sized once)
  };

  /// Integrates x from t0 to t1 (either direction) in place.
  template <class T, class B, class F>
  void integrate_interval(Workspace<T, B>& ws, F& field, View<T, B> x, T t0, T t1) const {
    require<config_error>(atol >= 0 && rtol >= 0 && atol + rtol > 0, "dopri5: need atol, rtol >= 0",
                          " with atol + rtol > 0, got atol = ", atol, ", rtol = ", rtol);
    auto k = [&](int i) { return ws.buf[i].view(); };  // k1..k7 in buf[0..6]
    auto xs = ws.buf[7].view();                         // stage point / new solution
    auto xe = ws.buf[8].view();                         // error estimate
    const double span = static_cast<double>(t1) - static_cast<double>(t0);
    const double dir = span > 0 ? 1.0 : -1.0;
    double t = static_cast<double>(t0);
    const double tend = static_cast<double>(t1);

    auto eval = [&](View<const T, B> at, View<T, B> out, double tt) {
      evaluate(ws, field, at, out, tt);
    };
    auto norm = [&](View<const T, B> e, View<const T, B> a, View<const T, B> b) {
      return measure(ws, e, a, b);
    };

    if (!ws.have_k1) {
      eval(x, k(0), t);
      ws.have_k1 = true;
    }
    if (ws.h <= 0) {
      // Hairer's starting step: h0 = 0.01 |x| / |u|, refined by a second-derivative estimate.
      const double d0 = norm(View<const T, B>(x), View<const T, B>(x), View<const T, B>(x));
      const double d1 = norm(View<const T, B>(k(0)), View<const T, B>(x), View<const T, B>(x));
      double h0 = (d0 < 1e-5 || d1 < 1e-5) ? 1e-6 : 0.01 * d0 / d1;
      h0 = std::min(h0, std::abs(span));
      const T hh = static_cast<T>(dir * h0);
      transform(xs, [hh] FLOWDIFF_HOST_DEVICE(T a, T b) { return a + hh * b; }, x, k(0));
      eval(xs, k(1), t + dir * h0);
      transform(xe, [h0] FLOWDIFF_HOST_DEVICE(T a, T b) { return T((a - b) / h0); }, k(1), k(0));
      const double d2 = norm(View<const T, B>(xe), View<const T, B>(x), View<const T, B>(x));
      const double h1 = std::max(d1, d2) <= 1e-15 ? std::max(1e-6, h0 * 1e-3)
                                                   : std::pow(0.01 / std::max(d1, d2), 1.0 / 5.0);
      ws.h = std::min({100 * h0, h1, std::abs(span)});
    }

    index_t tries = 0;
    while (dir * (tend - t) > 0) {
      require<numeric_error>(tries++ < max_steps, "dopri5: more than ", max_steps,
                             " steps in the interval [", t0, ", ", t1, "] (stiff or non-finite field?)");
      double h = std::min(ws.h, std::abs(tend - t));
      const bool last = h >= std::abs(tend - t) * (1 - 1e-12);
      if (last) h = std::abs(tend - t);
      const double hs = dir * h;
      stage(ws, field, x, t, hs);
      const double err = norm(View<const T, B>(xe), View<const T, B>(x), View<const T, B>(xs));
      require<numeric_error>(std::isfinite(err), "dopri5: non-finite error estimate at t = ", t,
                             " (the field returned NaN or Inf?)");
      if (err <= 1.0) {
        ws.stats.accepted += 1;
        copy(x, View<const T, B>(xs));
        copy(k(0), View<const T, B>(k(6)));  // FSAL: k7 = u(x_new, t + h)
        t = last ? tend : t + hs;
        const double fac = err == 0 ? 5.0 : std::clamp(0.9 * std::pow(err, -0.2), 0.2, 5.0);
        // A last step shortened to land on the interval's end says little about the step size
        // the solution allows: keep the larger of the old proposal and the new one.
        ws.h = std::max(last ? std::max(ws.h, h * fac) : h * fac, min_step);
      } else {
        ws.stats.rejected += 1;
        ws.h = h * std::clamp(0.9 * std::pow(err, -0.2), 0.2, 1.0);
        require<numeric_error>(ws.h > min_step && ws.h > 1e-14 * std::max(1.0, std::abs(t)),
                               "dopri5: step size underflow at t = ", t, " (h = ", ws.h, ")");
      }
    }
  }

  /// The error norm (ErrorNorm) of e against the scale atol + rtol max(|a|, |b|), element-wise.
  /// Public only because nvcc requires the function enclosing an extended lambda to be.
  template <class T, class B>
  double measure(Workspace<T, B>& ws, View<const T, B> e, View<const T, B> a,
                 View<const T, B> b) const {
    const T* pe = e.data();
    const T* pa = a.data();
    const T* pb = b.data();
    const double at = atol, rt = rtol;
    // (e / scale)^2 for element i, written out (no std::abs / std::max) for device code, with
    // std::max's handling of a NaN first argument.
    const auto term = [=] FLOWDIFF_HOST_DEVICE(index_t i) {
      const double xa = double(pa[i]), xb = double(pb[i]);
      const double fa = xa < 0 ? -xa : xa, fb = xb < 0 ? -xb : xb;
      const double r = double(pe[i]) / (at + rt * (fa < fb ? fb : fa));
      return r * r;
    };
    const index_t rows = e.rank() >= 1 ? e.dim(0) : 1;
    if (error_norm == ErrorNorm::worst_sample && rows > 1) {
      if constexpr (B::host_accessible) {
        const index_t d = e.numel() / rows;
        ws.sample_sums.resize(static_cast<std::size_t>(rows));  // allocates on the first call only
        double* sums = ws.sample_sums.data();
        B::parallel_for(
            rows,
            [=](index_t r) {
              double acc = 0;
              for (index_t j = r * d; j < (r + 1) * d; ++j) acc += term(j);
              sums[r] = acc;
            },
            d);
        double worst = 0;  // a NaN in any sample stays (the caller refuses a non-finite error)
        for (index_t r = 0; r < rows; ++r)
          if (std::isnan(sums[r]) || sums[r] > worst) worst = sums[r];
        return std::sqrt(worst / static_cast<double>(d));
      } else {
        fail<config_error>("dopri5: ErrorNorm::worst_sample runs on the CPU only (a backend "
                           "whose memory the host reads); use ErrorNorm::batch on this one");
      }
    }
    return std::sqrt(B::reduce_sum(e.numel(), term) / static_cast<double>(e.numel()));
  }

  /// One evaluation of the field, counted.
  template <class T, class B, class F>
  static void evaluate(Workspace<T, B>& ws, F& field, View<const T, B> at, View<T, B> out,
                       double t) {
    field(at, out, static_cast<T>(t));
    ws.stats.evaluations += 1;
  }

  // One Dormand–Prince step attempt: the six new stages, x5 in buf[7] and the error estimate in
  // buf[8]. Public only because nvcc requires the function enclosing an extended lambda to be
  // (and no type local to a function among its template arguments: no lambda passed in, and
  // the coefficients plain values captured by the device lambdas).
  template <class T, class B, class F>
  static void stage(Workspace<T, B>& ws, F& field, View<T, B> x, double t, double h) {
    const auto k = [&ws](int i) { return ws.buf[i].view(); };
    const auto eval = [&ws, &field](View<T, B> at, View<T, B> out, double tt) {
      evaluate(ws, field, View<const T, B>(at), out, tt);
    };
    auto xs = ws.buf[7].view();
    auto xe = ws.buf[8].view();
    const T hT = static_cast<T>(h);
    // Butcher tableau of Dormand–Prince 5(4).
    constexpr double a21 = 1.0 / 5;
    constexpr double a31 = 3.0 / 40, a32 = 9.0 / 40;
    constexpr double a41 = 44.0 / 45, a42 = -56.0 / 15, a43 = 32.0 / 9;
    constexpr double a51 = 19372.0 / 6561, a52 = -25360.0 / 2187, a53 = 64448.0 / 6561,
                     a54 = -212.0 / 729;
    constexpr double a61 = 9017.0 / 3168, a62 = -355.0 / 33, a63 = 46732.0 / 5247,
                     a64 = 49.0 / 176, a65 = -5103.0 / 18656;
    constexpr double b1 = 35.0 / 384, b3 = 500.0 / 1113, b4 = 125.0 / 192, b5 = -2187.0 / 6784,
                     b6 = 11.0 / 84;
    // e = b - b_hat (fifth minus fourth order weights).
    constexpr double e1 = 71.0 / 57600, e3 = -71.0 / 16695, e4 = 71.0 / 1920,
                     e5 = -17253.0 / 339200, e6 = 22.0 / 525, e7 = -1.0 / 40;
    const T c21 = T(a21), c31 = T(a31), c32 = T(a32), c41 = T(a41), c42 = T(a42), c43 = T(a43),
            c51 = T(a51), c52 = T(a52), c53 = T(a53), c54 = T(a54), c61 = T(a61), c62 = T(a62),
            c63 = T(a63), c64 = T(a64), c65 = T(a65), d1 = T(b1), d3 = T(b3), d4 = T(b4),
            d5 = T(b5), d6 = T(b6), f1 = T(e1), f3 = T(e3), f4 = T(e4), f5 = T(e5), f6 = T(e6),
            f7 = T(e7);

    transform(xs, [=] FLOWDIFF_HOST_DEVICE(T x0, T k1) { return x0 + hT * (c21 * k1); }, x, k(0));
    eval(xs, k(1), t + h / 5);
    transform(
        xs, [=] FLOWDIFF_HOST_DEVICE(T x0, T k1, T k2) { return x0 + hT * (c31 * k1 + c32 * k2); },
        x, k(0), k(1));
    eval(xs, k(2), t + 3 * h / 10);
    transform(
        xs,
        [=] FLOWDIFF_HOST_DEVICE(T x0, T k1, T k2, T k3) {
          return x0 + hT * (c41 * k1 + c42 * k2 + c43 * k3);
        },
        x, k(0), k(1), k(2));
    eval(xs, k(3), t + 4 * h / 5);
    transform(
        xs,
        [=] FLOWDIFF_HOST_DEVICE(T x0, T k1, T k2, T k3, T k4) {
          return x0 + hT * (c51 * k1 + c52 * k2 + c53 * k3 + c54 * k4);
        },
        x, k(0), k(1), k(2), k(3));
    eval(xs, k(4), t + 8 * h / 9);
    transform(
        xs,
        [=] FLOWDIFF_HOST_DEVICE(T x0, T k1, T k2, T k3, T k4, T k5) {
          return x0 + hT * (c61 * k1 + c62 * k2 + c63 * k3 + c64 * k4 + c65 * k5);
        },
        x, k(0), k(1), k(2), k(3), k(4));
    eval(xs, k(5), t + h);
    transform(
        xs,
        [=] FLOWDIFF_HOST_DEVICE(T x0, T k1, T k3, T k4, T k5, T k6) {
          return x0 + hT * (d1 * k1 + d3 * k3 + d4 * k4 + d5 * k5 + d6 * k6);
        },
        x, k(0), k(2), k(3), k(4), k(5));
    eval(xs, k(6), t + h);
    transform(
        xe,
        [=] FLOWDIFF_HOST_DEVICE(T k1, T k3, T k4, T k5, T k6) {
          return hT * (f1 * k1 + f3 * k3 + f4 * k4 + f5 * k5 + f6 * k6);
        },
        k(0), k(2), k(3), k(4), k(5));
    transform(xe, [=] FLOWDIFF_HOST_DEVICE(T e, T k7) { return e + hT * f7 * k7; }, xe, k(6));
  }
};

}  // namespace flowdiff
