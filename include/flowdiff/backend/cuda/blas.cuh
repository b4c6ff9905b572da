// flowdiff/backend/cuda/blas.cuh — dense linear algebra of the CUDA backend through cuBLAS, with
// the row-major semantics of the CPU's gemm (backend/cpu/linalg.hpp):
//   C[m, n] = alpha * op(A) * op(B) + beta * C,   op = identity or transpose,
// and its strided-batched form C_b = alpha op(A_b) op(B_b) + beta C_b for b < batch (attention's
// per-head products). cuBLAS is column-major: a row-major [r, c] matrix is a column-major [c, r]
// one with the same leading dimension, so the row-major product is computed as the column-major
// C^T = op(B)^T op(A)^T, i.e. cuBLAS is called with the operands swapped and (n, m) for (m, n).
// A Blas object owns a cuBLAS handle bound to one stream (no global handle). fp32 products run in
// full fp32 unless BlasOptions::allow_tf32 (TF32 tensor cores, ~1e-3 relative error) is set.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <limits>
#include <type_traits>
#include <utility>

#include "flowdiff/backend/cpu/linalg.hpp"  // enum class Trans, shared with the CPU gemm
#include "flowdiff/backend/cuda/cuda.cuh"
#include "flowdiff/backend/cuda/error.cuh"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

namespace cuda {

struct BlasOptions {
  /// Let fp32 products use TF32 tensor cores (faster, about 1e-3 relative error per product).
  bool allow_tf32 = false;
};

/// A cuBLAS handle bound to a stream. Move-only; create one per thread (handles are not meant to
/// be shared between threads running concurrently).
class Blas {
 public:
  explicit Blas(cudaStream_t stream = cudaStreamPerThread, BlasOptions options = {})
      : stream_(stream) {
    FLOWDIFF_CUDA_CHECK(cublasCreate(&handle_));
    try {
      FLOWDIFF_CUDA_CHECK(cublasSetStream(handle_, stream_));
      FLOWDIFF_CUDA_CHECK(cublasSetMathMode(
          handle_, options.allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    } catch (...) {
      cublasDestroy(handle_);
      throw;
    }
  }
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  Blas(Blas&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)), stream_(o.stream_) {}
  Blas& operator=(Blas&& o) noexcept {
    if (this != &o) {
      if (handle_ != nullptr) cublasDestroy(handle_);
      handle_ = std::exchange(o.handle_, nullptr);
      stream_ = o.stream_;
    }
    return *this;
  }
  ~Blas() {
    if (handle_ != nullptr) cublasDestroy(handle_);
  }

  cublasHandle_t handle() const { return handle_; }
  cudaStream_t stream() const { return stream_; }

 private:
  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_;
};

namespace detail {
inline cublasOperation_t op(Trans t) { return t == Trans::no ? CUBLAS_OP_N : CUBLAS_OP_T; }

inline int to_int(const char* who, const char* what, index_t v) {
  require<config_error>(v >= 0 && v <= index_t{std::numeric_limits<int>::max()}, who, ": ", what,
                        " = ", v, " does not fit cuBLAS's 32-bit int");
  return static_cast<int>(v);
}
}  // namespace detail

/// The column-major cuBLAS call that computes a row-major product (the operands swapped, (n, m)
/// for (m, n)), with every argument in cuBLAS's types. A separate step so that the mapping can be
/// checked on the host against a reference BLAS.
template <class T>
struct ColumnMajorGemm {
  cublasOperation_t transa, transb;
  int m, n, k;
  const T* a;
  int lda;
  long long stride_a;
  const T* b;
  int ldb;
  long long stride_b;
  T* c;
  int ldc;
  long long stride_c;
  int batch;
};

/// Checks a row-major strided-batched product (see gemm_strided_batched) and returns its
/// column-major form: C^T [n, m] = op(B)^T [n, k] op(A)^T [k, m], where a row-major matrix with
/// leading dimension ld is, as stored, the column-major transpose with the same ld.
template <class T>
ColumnMajorGemm<T> column_major_form(Trans ta, Trans tb, index_t m, index_t n, index_t k,
                                     const T* a, index_t lda, index_t stride_a, const T* b,
                                     index_t ldb, index_t stride_b, T* c, index_t ldc,
                                     index_t stride_c, index_t batch) {
  const char* who = "cuda::gemm";
  require<config_error>(m >= 0 && n >= 0 && k >= 0 && batch >= 0, who,
                        ": m, n, k and batch must be >= 0, got ", m, ", ", n, ", ", k, ", ", batch);
  const index_t a_cols = ta == Trans::no ? k : m, b_cols = tb == Trans::no ? n : k;
  require<config_error>(lda >= a_cols && ldb >= b_cols && ldc >= n, who,
                        ": leading dimensions too small: lda = ", lda, " (needs >= ", a_cols,
                        "), ldb = ", ldb, " (needs >= ", b_cols, "), ldc = ", ldc, " (needs >= ", n,
                        ")");
  const index_t c_extent = m > 0 ? (m - 1) * ldc + n : 0;  // elements one C_b spans
  require<config_error>(
      batch <= 1 || (stride_a >= 0 && stride_b >= 0 && stride_c >= c_extent), who,
      ": batch strides must be >= 0 and C's must keep the products apart (stride_c >= ", c_extent,
      "), got stride_a = ", stride_a, ", stride_b = ", stride_b, ", stride_c = ", stride_c);
  // cuBLAS rejects leading dimensions below 1 even where nothing is read (k == 0).
  return {detail::op(tb),
          detail::op(ta),
          detail::to_int(who, "n", n),
          detail::to_int(who, "m", m),
          detail::to_int(who, "k", k),
          b,
          detail::to_int(who, "ldb", ldb > 0 ? ldb : 1),
          static_cast<long long>(stride_b),
          a,
          detail::to_int(who, "lda", lda > 0 ? lda : 1),
          static_cast<long long>(stride_a),
          c,
          detail::to_int(who, "ldc", ldc > 0 ? ldc : 1),
          static_cast<long long>(stride_c),
          detail::to_int(who, "batch", batch)};
}

/// The raw row-major strided-batched product on device pointers: for b < batch,
///   C + b*stride_c [m, n] = alpha op(A + b*stride_a) op(B + b*stride_b) + beta C + b*stride_c,
/// where A is stored row-major with leading dimension lda (elements between rows; op(A) is [m, k]),
/// likewise B (op(B) is [k, n]) and C (ldc >= n). batch == 1 is a plain gemm. beta == 0 overwrites
/// C without reading it; k == 0 gives C = beta C.
template <class T>
void gemm_strided_batched(Blas& blas, Trans ta, Trans tb, index_t m, index_t n, index_t k, T alpha,
                          const T* a, index_t lda, index_t stride_a, const T* b, index_t ldb,
                          index_t stride_b, T beta, T* c, index_t ldc, index_t stride_c,
                          index_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "cuda gemm: float or double only");
  const ColumnMajorGemm<T> g = column_major_form(ta, tb, m, n, k, a, lda, stride_a, b, ldb,
                                                 stride_b, c, ldc, stride_c, batch);
  if (m == 0 || n == 0 || batch == 0) return;
  if (batch == 1) {
    if constexpr (std::is_same_v<T, float>) {
      FLOWDIFF_CUDA_CHECK(cublasSgemm(blas.handle(), g.transa, g.transb, g.m, g.n, g.k, &alpha, g.a,
                                      g.lda, g.b, g.ldb, &beta, g.c, g.ldc));
    } else {
      FLOWDIFF_CUDA_CHECK(cublasDgemm(blas.handle(), g.transa, g.transb, g.m, g.n, g.k, &alpha, g.a,
                                      g.lda, g.b, g.ldb, &beta, g.c, g.ldc));
    }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    FLOWDIFF_CUDA_CHECK(cublasSgemmStridedBatched(
        blas.handle(), g.transa, g.transb, g.m, g.n, g.k, &alpha, g.a, g.lda, g.stride_a, g.b,
        g.ldb, g.stride_b, &beta, g.c, g.ldc, g.stride_c, g.batch));
  } else {
    FLOWDIFF_CUDA_CHECK(cublasDgemmStridedBatched(
        blas.handle(), g.transa, g.transb, g.m, g.n, g.k, &alpha, g.a, g.lda, g.stride_a, g.b,
        g.ldb, g.stride_b, &beta, g.c, g.ldc, g.stride_c, g.batch));
  }
}

}  // namespace cuda

/// C[m, n] = alpha * op(A) * op(B) + beta * C on contiguous row-major device views, the CUDA form
/// of the CPU's gemm(ta, tb, alpha, a, b, beta, c) with a cuBLAS handle first.
/// a: op(A) [m, k]; b: op(B) [k, n]; c: [m, n]
template <class T>
void gemm(cuda::Blas& blas, Trans ta, Trans tb, T alpha, View<const T, Cuda> a,
          View<const T, Cuda> b, T beta, View<T, Cuda> c) {
  require<shape_error>(a.rank() == 2 && b.rank() == 2 && c.rank() == 2,
                       "cuda gemm: A, B and C must be rank-2, got ", a.shape(), ", ", b.shape(),
                       ", ", c.shape());
  const index_t m = ta == Trans::no ? a.dim(0) : a.dim(1);
  const index_t ka = ta == Trans::no ? a.dim(1) : a.dim(0);
  const index_t kb = tb == Trans::no ? b.dim(0) : b.dim(1);
  const index_t n = tb == Trans::no ? b.dim(1) : b.dim(0);
  require<shape_error>(ka == kb, "cuda gemm: inner dimensions differ: op(A) is [", m, ", ", ka,
                       "], op(B) is [", kb, ", ", n, "]");
  require<shape_error>(c.dim(0) == m && c.dim(1) == n, "cuda gemm: C must be [", m, ", ", n,
                       "], got ", c.shape());
  cuda::gemm_strided_batched(blas, ta, tb, m, n, ka, alpha, a.data(), a.dim(1), 0, b.data(),
                             b.dim(1), 0, beta, c.data(), n, 0, 1);
}

/// Tensor-friendly overload: gemm(blas, Trans::no, Trans::yes, 1.f, x, w, 0.f, y).
template <class T, class A, class Bm, class C>
requires TensorLike<A> && TensorLike<Bm> && TensorLike<C>
void gemm(cuda::Blas& blas, Trans ta, Trans tb, T alpha, const A& a, const Bm& b, T beta, C&& c) {
  gemm<T>(blas, ta, tb, alpha, View<const T, Cuda>(view_of(a)), View<const T, Cuda>(view_of(b)),
          beta, View<T, Cuda>(view_of(c)));
}

/// Batched products on rank-3 device views: c[i] = alpha op(a[i]) op(b[i]) + beta c[i] for every
/// i < batch. a: [batch, ...] with op(a[i]) [m, k]; b: [batch, ...] with op(b[i]) [k, n];
/// c: [batch, m, n]
template <class T>
void gemm_batched(cuda::Blas& blas, Trans ta, Trans tb, T alpha, View<const T, Cuda> a,
                  View<const T, Cuda> b, T beta, View<T, Cuda> c) {
  require<shape_error>(a.rank() == 3 && b.rank() == 3 && c.rank() == 3,
                       "cuda gemm_batched: A, B and C must be rank-3 [batch, rows, cols], got ",
                       a.shape(), ", ", b.shape(), ", ", c.shape());
  const index_t batch = c.dim(0);
  require<shape_error>(a.dim(0) == batch && b.dim(0) == batch,
                       "cuda gemm_batched: batch sizes differ: A ", a.shape(), ", B ", b.shape(),
                       ", C ", c.shape());
  const index_t m = ta == Trans::no ? a.dim(1) : a.dim(2);
  const index_t ka = ta == Trans::no ? a.dim(2) : a.dim(1);
  const index_t kb = tb == Trans::no ? b.dim(1) : b.dim(2);
  const index_t n = tb == Trans::no ? b.dim(2) : b.dim(1);
  require<shape_error>(ka == kb, "cuda gemm_batched: inner dimensions differ: op(A) is [", m, ", ",
                       ka, "], op(B) is [", kb, ", ", n, "]");
  require<shape_error>(c.dim(1) == m && c.dim(2) == n, "cuda gemm_batched: C must be [", batch,
                       ", ", m, ", ", n, "], got ", c.shape());
  cuda::gemm_strided_batched(blas, ta, tb, m, n, ka, alpha, a.data(), a.dim(2), a.dim(1) * a.dim(2),
                             b.data(), b.dim(2), b.dim(1) * b.dim(2), beta, c.data(), n, m * n,
                             batch);
}

}  // namespace flowdiff
