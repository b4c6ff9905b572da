// flowdiff/backend/cuda/dispatch.cuh — the CUDA backend's BackendOps (backend/dispatch.hpp): the
// dense product through cuBLAS (backend/cuda/blas.cuh, the CPU gemm's row-major semantics; the
// Context is a cuda::Blas handle on the per-thread default stream), host <-> device transfers
// (cudaMemcpy, complete on return), and cuda::resolve_device(), which asks the CUDA runtime for
// devices and falls back to the CPU with a one-line notice when there is none.
#pragma once

#include <ostream>
#include <string>

#include "flowdiff/backend/cuda/blas.cuh"
#include "flowdiff/backend/cuda/cuda.cuh"
#include "flowdiff/backend/dispatch.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

template <>
struct BackendOps<Cuda> {
  /// A cuBLAS handle (created when the Context is; needs a device).
  using Context = cuda::Blas;

  /// C[m, n] = alpha op(A) op(B) + beta C on device views (cuBLAS, full fp32 by default).
  template <class T>
  static void gemm(Context& blas, Trans ta, Trans tb, T alpha, View<const T, Cuda> a,
                   View<const T, Cuda> b, T beta, View<T, Cuda> c) {
    flowdiff::gemm<T>(blas, ta, tb, alpha, a, b, beta, c);
  }

  /// cuda::gemm_strided_batched (one cuBLAS strided-batched call) on device pointers.
  template <class T>
  static void gemm_strided_batched(Context& blas, Trans ta, Trans tb, index_t m, index_t n,
                                   index_t k, T alpha, const T* a, index_t lda, index_t stride_a,
                                   const T* b, index_t ldb, index_t stride_b, T beta, T* c,
                                   index_t ldc, index_t stride_c, index_t batch) {
    cuda::gemm_strided_batched<T>(blas, ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b,
                                  beta, c, ldc, stride_c, batch);
  }

  /// dst (device) = src (host); returns when the copy is complete.
  template <class T>
  static void upload(View<T, Cuda> dst, View<const T, Cpu> src) {
    cuda::copy_to_device(dst, src);
  }
  /// dst (host) = src (device); returns when dst holds the values (after all queued work).
  template <class T>
  static void download(View<T, Cpu> dst, View<const T, Cuda> src) {
    cuda::copy_to_host(dst, src);
  }
};

namespace cuda {

/// resolve_device() with the CUDA runtime's device count: `requested` when it is usable, else
/// the CPU with a one-line notice on `log` naming the runtime's reason.
inline Device resolve_device(Device requested, std::ostream& log) {
  std::string why;
  const int n = requested == Device::cuda ? device_count(&why) : 0;
  return flowdiff::resolve_device(requested, n, why, log);
}

}  // namespace cuda

}  // namespace flowdiff
