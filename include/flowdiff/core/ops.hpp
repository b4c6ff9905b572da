// flowdiff/core/ops.hpp — backend-generic element-wise maps, reductions and argument checks.
// `transform(out, f, a, b, ...)` computes out[i] = f(a[i], b[i], ...) for every element in one pass
// over memory; `for_each_row` hands a functor the sample index so per-sample scalars (a time t_i, a
// label y_i) broadcast over a row. Every public function checks shapes and names what is wrong.
#pragma once

#include <cmath>
#include <tuple>
#include <string_view>
#include <type_traits>
#include <utility>

#include "flowdiff/core/config.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Throws shape_error unless `x` has exactly shape `expected`.
template <class T, class B>
void check_shape(std::string_view what, View<T, B> x, const Shape& expected) {
  require<shape_error>(x.shape() == expected, what, ": expected shape ", expected, ", got ",
                       x.shape());
}

/// Throws shape_error unless a and b have the same shape.
template <class T, class U, class B>
void check_same_shape(std::string_view what, std::string_view name_a, View<T, B> a,
                      std::string_view name_b, View<U, B> b) {
  require<shape_error>(a.shape() == b.shape(), what, ": ", name_a, " and ", name_b,
                       " must have the same shape, got ", a.shape(), " and ", b.shape());
}

/// Throws shape_error unless x has the given rank.
template <class T, class B>
void check_rank(std::string_view what, View<T, B> x, int rank) {
  require<shape_error>(x.rank() == rank, what, ": expected a rank-", rank, " tensor, got shape ",
                       x.shape());
}

/// Throws config_error unless 0 <= t <= 1 (and t is finite).
template <class T>
void check_time(std::string_view what, T t) {
  require<config_error>(t >= T(0) && t <= T(1), what, ": t must lie in [0, 1], got ", t);
}

// ---------------------------------------------------------------------------------------------
// Element-wise maps
// ---------------------------------------------------------------------------------------------

namespace detail {
template <class Out, class... In>
void check_transform_shapes(const Out& out, const In&... in) {
  index_t k = 0;
  (
      [&] {
        ++k;
        require<shape_error>(in.shape() == out.shape(), "transform: input ", k, " has shape ",
                             in.shape(), " but the output has shape ", out.shape());
      }(),
      ...);
}

// The per-element body of transform() for non-CPU backends. A named functor rather than an
// extended __host__ __device__ lambda: nvcc rejects those inside a generic lambda (std::apply's).
template <class T, class F, class... In>
struct TransformKernel {
  T* o;
  F f;
  std::tuple<In*...> in;

  FLOWDIFF_HOST_DEVICE void operator()(index_t i) const {
    call(i, std::index_sequence_for<In...>{});
  }
  template <std::size_t... K>
  FLOWDIFF_HOST_DEVICE void call(index_t i, std::index_sequence<K...>) const {
    o[i] = f(std::get<K>(in)[i]...);
  }
};
}  // namespace detail

/// out[i] = f(in0[i], in1[i], ...) over every element, in one pass. `out` may alias an input.
template <class T, class B, class F, class... In>
void transform(View<T, B> out, F f, In&&... in) {
  static_assert(!std::is_const_v<T>, "transform: the output view must be mutable");
  auto ins = std::make_tuple(view_of(in)...);
  std::apply([&](const auto&... v) { detail::check_transform_shapes(out, v...); }, ins);
  T* o = out.data();
  std::apply(
      [&](const auto&... v) {
        if constexpr (B::host_accessible && std::is_same_v<B, Cpu>) {
          Cpu::parallel_chunks(out.numel(), [&, o](index_t b, index_t e) {
            auto loop = [&](auto*... p) {
              for (index_t i = b; i < e; ++i) o[i] = f(p[i]...);
            };
            loop(v.data()...);
          });
        } else {
          B::parallel_for(out.numel(), detail::TransformKernel<T, F, std::remove_reference_t<
                                                                    decltype(*v.data())>...>{
                                           o, f, {v.data()...}});
        }
      },
      ins);
}

template <class T, class B, class F, class... In>
void transform(Tensor<T, B>& out, F f, In&&... in) {
  transform(out.view(), f, std::forward<In>(in)...);
}

/// Calls f(i, j) for every sample i < rows and element j < row_size of a batch: the form used by
/// updates that broadcast a per-sample value (time, label, weight) across the features of sample i.
template <class B, class F>
void for_each_element(index_t rows, index_t row_size, F f) {
  B::parallel_for(rows * row_size, [=] FLOWDIFF_HOST_DEVICE(index_t k) {
    f(k / row_size, k % row_size);
  });
}

template <class T, class B>
void fill(View<T, B> out, std::type_identity_t<std::remove_const_t<T>> value) {
  T* o = out.data();
  B::parallel_for(out.numel(), FLOWDIFF_LAMBDA(index_t i) { o[i] = value; });
}
template <class T, class B>
void fill(Tensor<T, B>& out, T value) {
  fill(out.view(), value);
}

template <class T, class B>
void copy(View<T, B> dst, View<const T, B> src) {
  require<shape_error>(dst.numel() == src.numel(), "copy: destination has ", dst.numel(),
                       " elements, source has ", src.numel());
  B::copy(dst.data(), src.data(), src.numel());
}
template <class Dst, class Src>
  requires TensorLike<Dst> && TensorLike<Src>
void copy(Dst&& dst, const Src& src) {
  using T = value_type_of<Dst>;
  using B = backend_of<Dst>;
  copy(View<T, B>(view_of(dst)), View<const T, B>(view_of(src)));
}

/// y += a * x
template <class Y, class X>
  requires TensorLike<Y> && TensorLike<X>
void axpy(Y&& y, value_type_of<Y> a, const X& x) {
  using T = value_type_of<Y>;
  transform(view_of(y), [a] FLOWDIFF_HOST_DEVICE(T yi, T xi) { return yi + a * xi; }, view_of(y),
            view_of(x));
}

/// x *= a
template <class X>
  requires TensorLike<X>
void scale(X&& x, value_type_of<X> a) {
  using T = value_type_of<X>;
  transform(view_of(x), [a] FLOWDIFF_HOST_DEVICE(T xi) { return a * xi; }, view_of(x));
}

// ---------------------------------------------------------------------------------------------
// Reductions (deterministic: same bits whatever the thread count)
// ---------------------------------------------------------------------------------------------

template <class X>
  requires TensorLike<X>
value_type_of<X> sum(const X& x) {
  auto v = view_of(x);
  return backend_of<X>::sum(v.data(), v.numel());
}

template <class X>
  requires TensorLike<X>
value_type_of<X> mean(const X& x) {
  auto v = view_of(x);
  require<shape_error>(v.numel() > 0, "mean: empty tensor");
  return sum(x) / static_cast<value_type_of<X>>(v.numel());
}

/// Sum of a[i] * b[i], accumulated in double on the CPU.
template <class A, class Bt>
  requires TensorLike<A> && TensorLike<Bt>
value_type_of<A> dot(const A& a, const Bt& b)
  requires backend_of<A>::host_accessible
{
  auto va = view_of(a);
  auto vb = view_of(b);
  require<shape_error>(va.numel() == vb.numel(), "dot: operands have ", va.numel(), " and ",
                       vb.numel(), " elements");
  const auto* pa = va.data();
  const auto* pb = vb.data();
  return static_cast<value_type_of<A>>(Cpu::reduce_sum(
      va.numel(), [=](index_t i) { return static_cast<double>(pa[i]) * pb[i]; }));
}

template <class X>
  requires TensorLike<X>
value_type_of<X> sum_squares(const X& x) {
  return dot(x, x);
}

/// Largest |x[i]| (0 for an empty tensor; NaN if any element is NaN).
template <class X>
  requires(TensorLike<X> && backend_of<X>::host_accessible)
value_type_of<X> max_abs(const X& x) {
  auto v = view_of(x);
  value_type_of<X> m = 0;
  for (index_t i = 0; i < v.numel(); ++i) {
    const auto a = std::abs(v[i]);
    if (std::isnan(a)) return a;
    if (a > m) m = a;
  }
  return m;
}

template <class X>
  requires(TensorLike<X> && backend_of<X>::host_accessible)
bool all_finite(const X& x) {
  auto v = view_of(x);
  for (index_t i = 0; i < v.numel(); ++i)
    if (!std::isfinite(static_cast<double>(v[i]))) return false;
  return true;
}

/// Throws numeric_error naming the first non-finite element of x.
template <class X>
  requires(TensorLike<X> && backend_of<X>::host_accessible)
void check_finite(std::string_view what, const X& x) {
  auto v = view_of(x);
  for (index_t i = 0; i < v.numel(); ++i)
    if (!std::isfinite(static_cast<double>(v[i])))
      fail<numeric_error>(what, ": element ", i, " of a tensor of shape ", v.shape(),
                          " is not finite (", v[i], ")");
}

/// out[i] = sum_j x[i, j] for a batch x: [N, ...] and out: [N].
template <class T, class B>
void row_sum(View<const T, B> x, View<T, B> out) {
  require<shape_error>(out.numel() == x.rows(), "row_sum: output needs ", x.rows(),
                       " elements, got shape ", out.shape());
  const index_t d = x.row_size();
  const T* px = x.data();
  T* po = out.data();
  B::parallel_for(
      x.rows(),
      FLOWDIFF_LAMBDA(index_t i) {
        T s = 0;
        for (index_t j = 0; j < d; ++j) s += px[i * d + j];
        po[i] = s;
      },
      d);
}

}  // namespace flowdiff
