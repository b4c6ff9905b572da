// flowdiff/samplers/integrate.hpp — integrate(stepper, field, x, grid, observer): advances the batch
// x in place along the time grid, one stepper step per grid interval. The stepper's workspace is
// allocated once before the first step, so the loop itself performs no heap allocation. The
// observer sees (x, t, step) after every step and before the first; returning false cancels.
#pragma once

#include <span>
#include <type_traits>
#include <vector>

#include "flowdiff/core/field.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"
#include "flowdiff/samplers/grid.hpp"

namespace flowdiff {

/// What an integration did.
struct IntegrateStats {
  index_t steps = 0;              ///< grid intervals completed
  index_t field_evaluations = 0;  ///< calls of the field
  index_t accepted = 0;           ///< accepted steps (= steps for fixed-step methods)
  index_t rejected = 0;           ///< rejected steps of an adaptive method
  bool cancelled = false;         ///< an observer returned false
};

/// Steppers with their own step-size control (Dopri5) integrate whole grid intervals.
template <class S>
concept AdaptiveStepper = requires { requires S::adaptive; };

/// An observer that does nothing.
struct NullObserver {
  template <class V, class T>
  void operator()(const V&, T, index_t) const {}
};

namespace detail {
template <class O, class V, class T>
bool notify(O& observer, const V& x, T t, index_t step) {
  if constexpr (std::is_convertible_v<std::invoke_result_t<O&, const V&, T, index_t>, bool>) {
    return static_cast<bool>(observer(x, t, step));
  } else {
    observer(x, t, step);
    return true;
  }
}
}  // namespace detail

/// Integrates dx/dt = field(x, t) over `grid` (ascending or descending) in place.
/// x: [N, ...]; the observer is called as observer(View<const T, B> x, T t, index_t step).
template <class Stepper, class F, class X, class Grid, class Observer = NullObserver>
  requires TensorLike<X>
IntegrateStats integrate(const Stepper& stepper, F&& field, X&& x_in, const Grid& grid_in,
                         Observer&& observer = {}) {
  using T = value_type_of<X>;
  using B = backend_of<X>;
  static_assert(Field<std::remove_reference_t<F>, T, B>,
                "integrate: `field` must be callable as field(View<const T> x, View<T> out, T t)");
  View<T, B> x = view_of(x_in);
  const std::span<const T> grid(std::data(grid_in), std::size(grid_in));
  check_grid<T>(grid);
  require<shape_error>(x.rank() >= 1 && x.numel() > 0, "integrate: x must be a non-empty batch, got ",
                       x.shape());

  typename Stepper::template Workspace<T, B> ws;
  ws.prepare(x.shape());
  IntegrateStats stats;
  if (!detail::notify(observer, View<const T, B>(x), grid[0], index_t{0})) {
    stats.cancelled = true;
    return stats;
  }
  for (std::size_t i = 0; i + 1 < grid.size(); ++i) {
    const T t = grid[i];
    const T h = grid[i + 1] - grid[i];
    if constexpr (AdaptiveStepper<Stepper>) {
      stepper.integrate_interval(ws, field, x, t, grid[i + 1]);
      stats.field_evaluations = ws.stats.evaluations;
      stats.accepted = ws.stats.accepted;
      stats.rejected = ws.stats.rejected;
    } else {
      stepper.step(ws, field, x, t, h);
      stats.field_evaluations += Stepper::stages;
      stats.accepted += 1;
    }
    stats.steps += 1;
    if (!detail::notify(observer, View<const T, B>(x), grid[i + 1], stats.steps)) {
      stats.cancelled = true;
      break;
    }
  }
  return stats;
}

/// Records a trajectory: the start and then every `every`-th step (choose `every` dividing the
/// number of steps to keep the final state). frames[k] was taken at times[k].
template <class T, Backend B = Cpu>
struct TrajectoryRecorder {
  explicit TrajectoryRecorder(index_t every_n = 1) : every(every_n) {
    require<config_error>(every >= 1, "TrajectoryRecorder: every must be >= 1, got ", every);
  }

  index_t every;
  std::vector<Tensor<T, B>> frames;
  std::vector<T> times;

  void operator()(View<const T, B> x, T t, index_t step) {
    if (step % every != 0) return;
    Tensor<T, B> f(x.shape());
    copy(f.view(), x);
    frames.push_back(std::move(f));
    times.push_back(t);
  }
};

}  // namespace flowdiff
