// flowdiff/samplers/ode.hpp — explicit fixed-step ODE steppers for dx/dt = u_t(x): Euler (order 1),
// midpoint and Heun (order 2), classical Runge–Kutta (order 4). A stepper is a policy (as in
// Boost.Odeint): a stateless description plus a Workspace of scratch tensors allocated once by
// integrate(), so a step never allocates. Each stage's update is one fused element-wise pass.
#pragma once

#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/samplers/fused.hpp"

namespace flowdiff {

namespace detail {
/// Scratch tensors of one shape, (re)allocated only when the shape's size changes.
template <class T, class B, int N>
struct Scratch {
  Tensor<T, B> buf[N];
  void prepare(const Shape& s) {
    for (auto& b : buf) b.resize(s);
  }
};
}  // namespace detail

/// x_{n+1} = x_n + h u(x_n, t_n)
struct Euler {
  static constexpr int order = 1;
  static constexpr int stages = 1;
  static constexpr const char* name = "euler";

  template <class T, class B>
  struct Workspace : detail::Scratch<T, B, 1> {};

  template <class T, class B, class F>
  void step(Workspace<T, B>& ws, F& field, View<T, B> x, T t, T h) const {
    // Under CFG, the combination and the update in one pass (the same bits on the CPU).
    if constexpr (FusableGuidance<F, T, B>) {
      if (const auto g = field.evaluate_halves(View<const T, B>(x), t)) {
        cfg_euler_step<T, B>(x, g->cond, g->uncond, g->w, h);
        return;
      }
    }
    auto k = ws.buf[0].view();
    field(View<const T, B>(x), k, t);
    transform(x, [h] FLOWDIFF_HOST_DEVICE(T xi, T ki) { return xi + h * ki; }, x, k);
  }
};

/// k1 = u(x, t); x_{n+1} = x + h u(x + h/2 k1, t + h/2)
struct Midpoint {
  static constexpr int order = 2;
  static constexpr int stages = 2;
  static constexpr const char* name = "midpoint";

  template <class T, class B>
  struct Workspace : detail::Scratch<T, B, 2> {};

  template <class T, class B, class F>
  void step(Workspace<T, B>& ws, F& field, View<T, B> x, T t, T h) const {
    auto k = ws.buf[0].view();
    auto xm = ws.buf[1].view();
    field(View<const T, B>(x), k, t);
    const T hh = h / 2;
    transform(xm, [hh] FLOWDIFF_HOST_DEVICE(T xi, T ki) { return xi + hh * ki; }, x, k);
    field(View<const T, B>(xm), k, t + hh);
    transform(x, [h] FLOWDIFF_HOST_DEVICE(T xi, T ki) { return xi + h * ki; }, x, k);
  }
};

/// Heun (explicit trapezoid): k1 = u(x, t), k2 = u(x + h k1, t + h), x_{n+1} = x + h/2 (k1 + k2)
struct Heun {
  static constexpr int order = 2;
  static constexpr int stages = 2;
  static constexpr const char* name = "heun";

  template <class T, class B>
  struct Workspace : detail::Scratch<T, B, 3> {};

  template <class T, class B, class F>
  void step(Workspace<T, B>& ws, F& field, View<T, B> x, T t, T h) const {
    auto k1 = ws.buf[0].view();
    auto k2 = ws.buf[1].view();
    auto xp = ws.buf[2].view();
    field(View<const T, B>(x), k1, t);
    transform(xp, [h] FLOWDIFF_HOST_DEVICE(T xi, T ki) { return xi + h * ki; }, x, k1);
    field(View<const T, B>(xp), k2, t + h);
    const T hh = h / 2;
    transform(
        x, [hh] FLOWDIFF_HOST_DEVICE(T xi, T a, T b) { return xi + hh * (a + b); }, x, k1, k2);
  }
};

/// The classical fourth-order Runge–Kutta method.
struct RK4 {
  static constexpr int order = 4;
  static constexpr int stages = 4;
  static constexpr const char* name = "rk4";

  template <class T, class B>
  struct Workspace : detail::Scratch<T, B, 3> {};

  template <class T, class B, class F>
  void step(Workspace<T, B>& ws, F& field, View<T, B> x, T t, T h) const {
    auto k = ws.buf[0].view();    // current stage derivative
    auto acc = ws.buf[1].view();  // k1 + 2 k2 + 2 k3 + k4, accumulated stage by stage
    auto xs = ws.buf[2].view();   // stage point
    const T hh = h / 2;
    field(View<const T, B>(x), k, t);
    transform(acc, [] FLOWDIFF_HOST_DEVICE(T ki) { return ki; }, k);
    transform(xs, [hh] FLOWDIFF_HOST_DEVICE(T xi, T ki) { return xi + hh * ki; }, x, k);
    field(View<const T, B>(xs), k, t + hh);
    transform(acc, [] FLOWDIFF_HOST_DEVICE(T a, T ki) { return a + 2 * ki; }, acc, k);
    transform(xs, [hh] FLOWDIFF_HOST_DEVICE(T xi, T ki) { return xi + hh * ki; }, x, k);
    field(View<const T, B>(xs), k, t + hh);
    transform(acc, [] FLOWDIFF_HOST_DEVICE(T a, T ki) { return a + 2 * ki; }, acc, k);
    transform(xs, [h] FLOWDIFF_HOST_DEVICE(T xi, T ki) { return xi + h * ki; }, x, k);
    field(View<const T, B>(xs), k, t + h);
    const T h6 = h / 6;
    transform(
        x, [h6] FLOWDIFF_HOST_DEVICE(T xi, T a, T ki) { return xi + h6 * (a + ki); }, x, acc, k);
  }
};

}  // namespace flowdiff
