// flowdiff/backend/cpu/linalg.hpp — dense linear algebra of the CPU backend through Eigen:
// C = alpha * op(A) * op(B) + beta * C on row-major views, op = identity or transpose. Eigen uses
// OpenMP threads when the translation unit is compiled with OpenMP, and an external BLAS when
// EIGEN_USE_BLAS is defined before the first Eigen include (see docs/architecture.md).
#pragma once

#include <Eigen/Core>
#include <string_view>

#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

enum class Trans { no, yes };

namespace detail {
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
}

/// Eigen map of a rank-2 host view [rows, cols] (row-major, no copy).
template <class T>
auto as_matrix(View<T, Cpu> v) {
  require<shape_error>(v.rank() == 2, "as_matrix: expected a rank-2 view, got shape ", v.shape());
  using M = detail::RowMatrix<std::remove_const_t<T>>;
  if constexpr (std::is_const_v<T>) {
    return Eigen::Map<const M>(v.data(), v.dim(0), v.dim(1));
  } else {
    return Eigen::Map<M>(v.data(), v.dim(0), v.dim(1));
  }
}

/// C[m, n] = alpha * op(A) * op(B) + beta * C, with op(A): [m, k] and op(B): [k, n].
/// beta == 0 overwrites C without reading it (so uninitialised C is fine).
template <class T>
void gemm(Trans ta, Trans tb, T alpha, View<const T, Cpu> a, View<const T, Cpu> b, T beta,
          View<T, Cpu> c) {
  require<shape_error>(a.rank() == 2 && b.rank() == 2 && c.rank() == 2,
                       "gemm: A, B and C must be rank-2, got ", a.shape(), ", ", b.shape(), ", ",
                       c.shape());
  const index_t m = ta == Trans::no ? a.dim(0) : a.dim(1);
  const index_t ka = ta == Trans::no ? a.dim(1) : a.dim(0);
  const index_t kb = tb == Trans::no ? b.dim(0) : b.dim(1);
  const index_t n = tb == Trans::no ? b.dim(1) : b.dim(0);
  require<shape_error>(ka == kb, "gemm: inner dimensions differ: op(A) is [", m, ", ", ka,
                       "], op(B) is [", kb, ", ", n, "]");
  require<shape_error>(c.dim(0) == m && c.dim(1) == n, "gemm: C must be [", m, ", ", n,
                       "], got ", c.shape());
  auto A = as_matrix(a);
  auto B = as_matrix(b);
  auto C = as_matrix(c);
  if (beta == T(0)) {
    C.setZero();
  } else if (beta != T(1)) {
    C *= beta;
  }
  if (ka == 0) return;
  if (ta == Trans::no && tb == Trans::no) {
    C.noalias() += alpha * A * B;
  } else if (ta == Trans::no) {
    C.noalias() += alpha * A * B.transpose();
  } else if (tb == Trans::no) {
    C.noalias() += alpha * A.transpose() * B;
  } else {
    C.noalias() += alpha * A.transpose() * B.transpose();
  }
}

/// Tensor-friendly overload: gemm(Trans::no, Trans::yes, 1.f, x, w, 0.f, y).
template <class T, class A, class Bm, class C>
  requires TensorLike<A> && TensorLike<Bm> && TensorLike<C>
void gemm(Trans ta, Trans tb, T alpha, const A& a, const Bm& b, T beta, C&& c) {
  gemm<T>(ta, tb, alpha, View<const T, Cpu>(view_of(a)), View<const T, Cpu>(view_of(b)), beta,
          View<T, Cpu>(view_of(c)));
}

}  // namespace flowdiff
