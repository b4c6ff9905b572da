// flowdiff/backend/cpu/linalg.hpp — dense linear algebra of the CPU backend:
// C = alpha * op(A) * op(B) + beta * C on row-major views, op = identity or transpose.
// float on x86-64 with AVX2+FMA or AVX-512F: flowdiff's own packed GEMM (backend/cpu/sgemm.hpp,
// kernel chosen at run time; define FLOWDIFF_NO_SGEMM to turn it off). Otherwise (double, other
// CPUs) through Eigen, which runs its own kernel, or an external BLAS when EIGEN_USE_BLAS is
// defined before the first Eigen include (CMake option FLOWDIFF_USE_BLAS, on by default with the
// OpenMP OpenBLAS: docs/building.md).
// Threads (Eigen path; sgemm.hpp says how its own kernel threads): C is cut into row (or column) panels whose number depends on the shape only, and each
// panel is one single-threaded product; the panels are shared out dynamically over the OpenMP
// threads (one parallel region per call, for products of at least 2^23 flops), or run in turn
// inside an enclosing parallel region, on one thread, or for smaller products. Every element of C
// is thus computed by the same kernel with the same blocking whatever the thread count: results are
// bit-identical for 1, 2 or more threads, and a thread that the OS deschedules on a busy machine
// delays only the panels it holds.
#pragma once

#include <algorithm>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <Eigen/Core>
#include <string_view>
#include <type_traits>

#include "flowdiff/backend/cpu/sgemm.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

enum class Trans { no, yes };

namespace detail {
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Panels of a [m, n] x k product: about 2^20 flops each at least (smaller ones cost more to
/// schedule than they save), at most 16, rows/columns a multiple of 8; depends on the shape only.
/// Eigen threads a product itself once m n k >= 1e5 (outside a parallel region), with a blocking
/// that depends on the thread count, so such products always get at least two panels here.
inline index_t gemm_panels(index_t m, index_t n, index_t k) {
  const double mnk = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  index_t by_work = static_cast<index_t>(std::min(16.0, 2 * mnk / double(1 << 20)));
  if (mnk >= 1e5) by_work = std::max<index_t>(by_work, 2);
  const index_t by_size = std::max(m, n) / 8;
  return std::max<index_t>(1, std::min(by_work, by_size));
}

/// Products below this many flops run on the calling thread (about 100 us on one core): waking a
/// second thread costs more, and far more on a busy machine, where it may wait for a time slice.
inline constexpr double gemm_parallel_flops = double(1 << 23);

/// C (+)= alpha op(A) op(B) on Eigen maps, by a single-threaded product (Eigen runs serially
/// inside a parallel region, and so does the OpenMP OpenBLAS).
template <class MA, class MB, class MC, class T>
void gemm_panel(Trans ta, Trans tb, T alpha, const MA& A, const MB& B, MC&& C) {
  if (C.rows() < 16 && C.cols() < 16) {  // tiny C: the coefficient-based product, never threaded
    if (ta == Trans::no && tb == Trans::no) {
      C.noalias() += alpha * A.lazyProduct(B);
    } else if (ta == Trans::no) {
      C.noalias() += alpha * A.lazyProduct(B.transpose());
    } else if (tb == Trans::no) {
      C.noalias() += alpha * A.transpose().lazyProduct(B);
    } else {
      C.noalias() += alpha * A.transpose().lazyProduct(B.transpose());
    }
  } else if (ta == Trans::no && tb == Trans::no) {
    C.noalias() += alpha * A * B;
  } else if (ta == Trans::no) {
    C.noalias() += alpha * A * B.transpose();
  } else if (tb == Trans::no) {
    C.noalias() += alpha * A.transpose() * B;
  } else {
    C.noalias() += alpha * A.transpose() * B.transpose();
  }
}
}  // namespace detail

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

namespace detail {
/// The epilogue of a product without one.
struct NoEpilogue {
  void operator()(index_t, index_t, index_t, index_t) const {}
};
}  // namespace detail

/// C[m, n] = alpha * op(A) * op(B) + beta * C, with op(A): [m, k] and op(B): [k, n].
/// beta == 0 overwrites C without reading it (so uninitialised C is fine).
/// epilogue(i0, i1, j0, j1) is element-wise work fused into the product: it runs once for every
/// finished block of C (rows [i0, i1), columns [j0, j1); the blocks cover C once), on the thread
/// that computed the block while it is in that core's caches, so a bias, an activation or an
/// activation's derivative costs no extra pass over memory and no extra parallel region. Blocks
/// may run concurrently on different threads; the epilogue must not throw and must touch only
/// its own block's elements (of C or of same-shaped arrays).
template <class T, class E = detail::NoEpilogue>
void gemm(Trans ta, Trans tb, T alpha, View<const T, Cpu> a, View<const T, Cpu> b, T beta,
          View<T, Cpu> c, const E& epilogue = {}) {
  constexpr bool has_epilogue = !std::is_same_v<E, detail::NoEpilogue>;
  require<shape_error>(a.rank() == 2 && b.rank() == 2 && c.rank() == 2,
                       "gemm: A, B and C must be rank-2, got ", a.shape(), ", ", b.shape(), ", ",
                       c.shape());
  const index_t m = ta == Trans::no ? a.dim(0) : a.dim(1);
  const index_t ka = ta == Trans::no ? a.dim(1) : a.dim(0);
  const index_t kb = tb == Trans::no ? b.dim(0) : b.dim(1);
  const index_t n = tb == Trans::no ? b.dim(1) : b.dim(0);
  require<shape_error>(ka == kb, "gemm: inner dimensions differ: op(A) is [", m, ", ", ka,
                       "], op(B) is [", kb, ", ", n, "]");
  require<shape_error>(c.dim(0) == m && c.dim(1) == n, "gemm: C must be [", m, ", ", n, "], got ",
                       c.shape());
  if constexpr (std::is_same_v<T, float>) {
    sgemm::Problem p{ta == Trans::yes, tb == Trans::yes, m, n, ka, alpha, a.data(),
                     a.dim(1), b.data(), b.dim(1), beta, c.data(), n};
    const sgemm::Epilogue ep{[](const void* ctx, index_t i0, index_t i1, index_t j0, index_t j1) {
                               (*static_cast<const E*>(ctx))(i0, i1, j0, j1);
                             },
                             &epilogue};
    if constexpr (has_epilogue) p.epilogue = &ep;
    if (sgemm::gemm(sgemm::best_isa(), p)) return;
  }
  auto A = as_matrix(a);
  auto B = as_matrix(b);
  auto C = as_matrix(c);
  if (beta == T(0)) {
    C.setZero();
  } else if (beta != T(1)) {
    C *= beta;
  }
  if (m == 0 || n == 0) return;
  if (ka == 0) {
    if constexpr (has_epilogue) epilogue(index_t(0), m, index_t(0), n);
    return;
  }
  const index_t panels = detail::gemm_panels(m, n, ka);
  const bool by_rows = m >= n;
  const index_t len = by_rows ? m : n;
  const index_t step = (len / panels + 7) / 8 * 8;  // panel rows (columns), a multiple of 8
  const index_t count = (len + step - 1) / step;
  auto run = [&](index_t p) {
    const index_t lo = p * step, sz = std::min(len, lo + step) - lo;
    if (by_rows) {
      auto Cp = C.middleRows(lo, sz);
      if (ta == Trans::no)
        detail::gemm_panel(ta, tb, alpha, A.middleRows(lo, sz), B, Cp);
      else
        detail::gemm_panel(ta, tb, alpha, A.middleCols(lo, sz), B, Cp);
      if constexpr (has_epilogue) epilogue(lo, lo + sz, index_t(0), n);
    } else {
      auto Cp = C.middleCols(lo, sz);
      if (tb == Trans::no)
        detail::gemm_panel(ta, tb, alpha, A, B.middleCols(lo, sz), Cp);
      else
        detail::gemm_panel(ta, tb, alpha, A, B.middleRows(lo, sz), Cp);
      if constexpr (has_epilogue) epilogue(index_t(0), m, lo, lo + sz);
    }
  };
#if defined(_OPENMP)
  if (omp_get_max_threads() > 1 && !omp_in_parallel()) {
    const double flops =
        2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(ka);
    if (count > 1 && flops >= detail::gemm_parallel_flops) {
#pragma omp parallel for schedule(dynamic, 1)
      for (index_t p = 0; p < count; ++p) run(p);
      return;
    }
    // Serially on this thread: with the thread count set to 1 for the duration, neither Eigen nor
    // the OpenMP OpenBLAS opens a parallel region of its own (whose wake-up costs more than a
    // small product, and whose blocking would depend on the thread count).
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    for (index_t p = 0; p < count; ++p) run(p);
    omp_set_num_threads(threads);
    return;
  }
#endif
  for (index_t p = 0; p < count; ++p) run(p);
}

/// The same product on raw row-major storage with leading dimensions (elements between rows of
/// the stored A, B, C), for sub-matrices such as one attention head inside a [L, 3D] matrix.
/// Runs on the calling thread (it is meant for loops that are themselves parallel).
template <class T>
void gemm_strided(Trans ta, Trans tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                  index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    const sgemm::Problem p{ta == Trans::yes, tb == Trans::yes, m, n, k, alpha, a, lda, b, ldb,
                           beta, c, ldc};
    if (sgemm::gemm(sgemm::best_isa(), p, /*allow_threads=*/false)) return;
  }
  using M = detail::RowMatrix<T>;
  using Stride = Eigen::OuterStride<>;
  const index_t ar = ta == Trans::no ? m : k, ac = ta == Trans::no ? k : m;
  const index_t br = tb == Trans::no ? k : n, bc = tb == Trans::no ? n : k;
  Eigen::Map<const M, 0, Stride> A(a, ar, ac, Stride(lda));
  Eigen::Map<const M, 0, Stride> B(b, br, bc, Stride(ldb));
  Eigen::Map<M, 0, Stride> C(c, m, n, Stride(ldc));
  if (beta == T(0)) {
    C.setZero();
  } else if (beta != T(1)) {
    C *= beta;
  }
  if (k == 0 || m == 0 || n == 0) return;
  detail::gemm_panel(ta, tb, alpha, A, B, C);
}

/// Name of the kernel behind float products on this CPU: "avx512", "avx2" or "eigen".
inline const char* float_gemm_kernel() {
  const auto isa = sgemm::best_isa();
  return isa == sgemm::Isa::none ? "eigen" : sgemm::isa_name(isa);
}

/// Tensor-friendly overload: gemm(Trans::no, Trans::yes, 1.f, x, w, 0.f, y[, epilogue]).
template <class T, class A, class Bm, class C, class E = detail::NoEpilogue>
requires TensorLike<A> && TensorLike<Bm> && TensorLike<C>
void gemm(Trans ta, Trans tb, T alpha, const A& a, const Bm& b, T beta, C&& c,
          const E& epilogue = {}) {
  gemm<T>(ta, tb, alpha, View<const T, Cpu>(view_of(a)), View<const T, Cpu>(view_of(b)), beta,
          View<T, Cpu>(view_of(c)), epilogue);
}

}  // namespace flowdiff
