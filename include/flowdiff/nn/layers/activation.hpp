// flowdiff/nn/layers/activation.hpp — stateless element-wise activations with their derivatives,
// as torch.nn.functional:
//   SiLU            y = x s(x),  s = 1/(1+e^-x)          dy/dx = s (1 + x (1 - s))
//   GELU (none)     y = x P(x),  P = normal CDF           dy/dx = P(x) + x p(x),  p = normal pdf
//   GELU (tanh)     y = x/2 (1 + tanh u),  u = sqrt(2/pi) (x + 0.044715 x^3)
//                   dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3 0.044715 x^2)
// The tanh form is evaluated as (1 + tanh u)/2 = s(2u), the same function without the
// cancellation of 1 + tanh u for u << 0, so y = x s(2u) and dy/dx = s + 2 x s (1 - s) du/dx.
// In float, s goes through fast_sigmoid (core/fast_math.hpp: a vectorisable exp within 2 ulp), so
// SiLU and GELU (tanh) are one vectorised pass without libm calls; double uses std::exp.
// forward(x, y) writes y; backward(x, dy, dx) writes dx = dy * f'(x) (overwrites). Every call is
// a single pass over memory, and y/dx may alias x/dy. T is deduced from the output view, so
// inputs may be passed as mutable views or tensors. gelu_bias_forward fuses the bias of the
// Linear before the activation into the same pass (h += b, y = GELU(h)).
#pragma once

#include <algorithm>
#include <cmath>
#include <numbers>
#include <type_traits>

#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/isa.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/fast_math.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff::nn {

/// The two GELU forms of torch.nn.functional.gelu(x, approximate=...).
enum class GeluApprox { none, tanh };

namespace detail {
template <class T>
inline constexpr T gelu_k = T(std::numbers::sqrt2* std::numbers::inv_sqrtpi);  // sqrt(2/pi)
template <class T>
inline constexpr T gelu_c = T(0.044715);

template <class T>
FLOWDIFF_ALWAYS_INLINE T silu_fwd(T x) {
  return x * fast_sigmoid(x);
}
template <class T>
FLOWDIFF_ALWAYS_INLINE T silu_bwd(T x, T g) {
  const T s = fast_sigmoid(x);
  return g * s * (T(1) + x * (T(1) - s));
}
template <class T>
FLOWDIFF_ALWAYS_INLINE T gelu_tanh_fwd(T x) {
  const T u = gelu_k<T> * (x + gelu_c<T> * x * x * x);
  return x * fast_sigmoid(T(2) * u);
}
template <class T>
FLOWDIFF_ALWAYS_INLINE T gelu_tanh_bwd(T x, T g) {
  const T u = gelu_k<T> * (x + gelu_c<T> * x * x * x);
  const T s = fast_sigmoid(T(2) * u);
  const T du = gelu_k<T> * (T(1) + T(3) * gelu_c<T> * x * x);
  return g * (s + T(2) * x * s * (T(1) - s) * du);
}
template <class T>
struct GeluErfFwd {
  T operator()(T x) const { return T(0.5) * x * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2))); }
};
template <class T>
struct GeluErfBwd {
  T operator()(T x, T g) const {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(std::numbers::sqrt2 / 2)));
    const T pdf = T(std::numbers::inv_sqrtpi / std::numbers::sqrt2) * std::exp(T(-0.5) * x * x);
    return g * (cdf + x * pdf);
  }
};

/// out[i] = f(x[i]) for i < n, in parallel chunks of vectorised loops compiled for the CPU's
/// best instruction set (backend/cpu/isa.hpp; out may alias x).
template <class T, class F>
void map1(index_t n, T* out, const T* x, F f) {
  Cpu::parallel_chunks(n, [=](index_t b, index_t e) {
    simd::vector_loop(
        [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
          FLOWDIFF_SIMD
          for (index_t i = lo; i < hi; ++i) out[i] = f(x[i]);
        },
        b, e);
  });
}
/// out[i] = f(x[i], g[i]) (out may alias x or g).
template <class T, class F>
void map2(index_t n, T* out, const T* x, const T* g, F f) {
  Cpu::parallel_chunks(n, [=](index_t b, index_t e) {
    simd::vector_loop(
        [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
          FLOWDIFF_SIMD
          for (index_t i = lo; i < hi; ++i) out[i] = f(x[i], g[i]);
        },
        b, e);
  });
}
}  // namespace detail

// x: any shape, y: same shape
template <class T>
void silu_forward(std::type_identity_t<View<const T>> x, View<T> y) {
  check_same_shape("silu_forward", "x", x, "y", y);
  detail::map1(y.numel(), y.data(), x.data(),
               [](T v) FLOWDIFF_LAMBDA_INLINE { return detail::silu_fwd(v); });
}

// x, dy, dx: same shape
template <class T>
void silu_backward(std::type_identity_t<View<const T>> x, std::type_identity_t<View<const T>> dy,
                   View<T> dx) {
  check_same_shape("silu_backward", "x", x, "dy", dy);
  check_same_shape("silu_backward", "x", x, "dx", dx);
  detail::map2(dx.numel(), dx.data(), x.data(), dy.data(),
               [](T v, T g) FLOWDIFF_LAMBDA_INLINE { return detail::silu_bwd(v, g); });
}

// x: any shape, y: same shape
template <class T>
void gelu_forward(std::type_identity_t<View<const T>> x, View<T> y,
                  GeluApprox approx = GeluApprox::none) {
  check_same_shape("gelu_forward", "x", x, "y", y);
  if (approx == GeluApprox::none) {
    transform(y, detail::GeluErfFwd<T>{}, x);
    return;
  }
  detail::map1(y.numel(), y.data(), x.data(),
               [](T v) FLOWDIFF_LAMBDA_INLINE { return detail::gelu_tanh_fwd(v); });
}

// x, dy, dx: same shape
template <class T>
void gelu_backward(std::type_identity_t<View<const T>> x, std::type_identity_t<View<const T>> dy,
                   View<T> dx, GeluApprox approx = GeluApprox::none) {
  check_same_shape("gelu_backward", "x", x, "dy", dy);
  check_same_shape("gelu_backward", "x", x, "dx", dx);
  if (approx == GeluApprox::none) {
    transform(dx, detail::GeluErfBwd<T>{}, x, dy);
    return;
  }
  detail::map2(dx.numel(), dx.data(), x.data(), dy.data(),
               [](T v, T g) FLOWDIFF_LAMBDA_INLINE { return detail::gelu_tanh_bwd(v, g); });
}

// h: [..., C] (the Linear's product without bias; gets h += bias), bias: [C], y: shape of h
// (may alias h). y = GELU(h + bias) and h + bias kept for backward, in one pass.
template <class T>
void gelu_bias_forward(View<T> h, std::type_identity_t<View<const T>> bias, View<T> y,
                       GeluApprox approx = GeluApprox::none) {
  check_same_shape("gelu_bias_forward", "h", View<const T>(h), "y", View<const T>(y));
  require<shape_error>(bias.rank() == 1 && h.rank() >= 1 && h.dim(h.rank() - 1) == bias.dim(0),
                       "gelu_bias_forward: bias: expected shape [",
                       h.rank() ? h.dim(h.rank() - 1) : 0, "] (the last axis of h ", h.shape(),
                       "), got ", bias.shape());
  const index_t c = bias.dim(0), rows = h.numel() / std::max<index_t>(c, 1);
  T* ph = h.data();
  T* py = y.data();
  const T* pb = bias.data();
  const bool tanh_form = approx == GeluApprox::tanh;
  Cpu::parallel_for(
      rows,
      [=](index_t r) {
        T* hr = ph + r * c;
        T* yr = py + r * c;
        if (tanh_form) {  // the same instruction set as gelu_forward (the DiT recomputes it)
          simd::vector_loop(
              [=](index_t lo, index_t hi) FLOWDIFF_LAMBDA_INLINE {
                FLOWDIFF_SIMD
                for (index_t j = lo; j < hi; ++j) {
                  const T v = hr[j] + pb[j];
                  hr[j] = v;
                  yr[j] = detail::gelu_tanh_fwd(v);
                }
              },
              0, c);
        } else {
          for (index_t j = 0; j < c; ++j) {
            const T v = hr[j] + pb[j];
            hr[j] = v;
            yr[j] = detail::GeluErfFwd<T>{}(v);
          }
        }
      },
      16 * c);
}

}  // namespace flowdiff::nn
