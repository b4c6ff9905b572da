// flowdiff/nn/layers/activation.hpp — stateless element-wise activations with their derivatives,
// as torch.nn.functional:
//   SiLU            y = x s(x),  s = 1/(1+e^-x)          dy/dx = s (1 + x (1 - s))
//   GELU (none)     y = x P(x),  P = normal CDF           dy/dx = P(x) + x p(x),  p = normal pdf
//   GELU (tanh)     y = x/2 (1 + tanh u),  u = sqrt(2/pi) (x + 0.044715 x^3)
//                   dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3 0.044715 x^2)
// forward(x, y) writes y; backward(x, dy, dx) writes dx = dy * f'(x) (overwrites). Every call is
// one transform(): a single pass over memory, and y/dx may alias x/dy. T is deduced from the
// output view, so inputs may be passed as mutable views or tensors.
#pragma once

#include <cmath>
#include <numbers>
#include <type_traits>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn {

/// The two GELU forms of torch.nn.functional.gelu(x, approximate=...).
enum class GeluApprox { none, tanh };

namespace detail {
template <class T>
struct SiluFwd {
  T operator()(T x) const { return x / (T(1) + std::exp(-x)); }
};
template <class T>
struct SiluBwd {
  T operator()(T x, T g) const {
    const T s = T(1) / (T(1) + std::exp(-x));
    return g * s * (T(1) + x * (T(1) - s));
  }
};
template <class T>
struct GeluFwd {
  GeluApprox a;
  T operator()(T x) const {
    if (a == GeluApprox::none)
      return T(0.5) * x * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
    const T k = T(std::numbers::sqrt2 * std::numbers::inv_sqrtpi);  // sqrt(2/pi)
    return T(0.5) * x * (T(1) + std::tanh(k * (x + T(0.044715) * x * x * x)));
  }
};
template <class T>
struct GeluBwd {
  GeluApprox a;
  T operator()(T x, T g) const {
    if (a == GeluApprox::none) {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
      const T pdf = T(std::numbers::inv_sqrtpi / std::numbers::sqrt2) * std::exp(T(-0.5) * x * x);
      return g * (cdf + x * pdf);
    }
    const T k = T(std::numbers::sqrt2 * std::numbers::inv_sqrtpi);
    const T th = std::tanh(k * (x + T(0.044715) * x * x * x));
    return g * (T(0.5) * (T(1) + th) +
                T(0.5) * x * (T(1) - th * th) * k * (T(1) + T(3 * 0.044715) * x * x));
  }
};
}  // namespace detail

// x: any shape, y: same shape
template <class T>
void silu_forward(std::type_identity_t<View<const T>> x, View<T> y) {
  check_same_shape("silu_forward", "x", x, "y", y);
  transform(y, detail::SiluFwd<T>{}, x);
}

// x, dy, dx: same shape
template <class T>
void silu_backward(std::type_identity_t<View<const T>> x, std::type_identity_t<View<const T>> dy,
                   View<T> dx) {
  check_same_shape("silu_backward", "x", x, "dy", dy);
  check_same_shape("silu_backward", "x", x, "dx", dx);
  transform(dx, detail::SiluBwd<T>{}, x, dy);
}

// x: any shape, y: same shape
template <class T>
void gelu_forward(std::type_identity_t<View<const T>> x, View<T> y,
                  GeluApprox approx = GeluApprox::none) {
  check_same_shape("gelu_forward", "x", x, "y", y);
  transform(y, detail::GeluFwd<T>{approx}, x);
}

// x, dy, dx: same shape
template <class T>
void gelu_backward(std::type_identity_t<View<const T>> x, std::type_identity_t<View<const T>> dy,
                   View<T> dx, GeluApprox approx = GeluApprox::none) {
  check_same_shape("gelu_backward", "x", x, "dy", dy);
  check_same_shape("gelu_backward", "x", x, "dx", dx);
  transform(dx, detail::GeluBwd<T>{approx}, x, dy);
}

}  // namespace flowdiff::nn
