// flowdiff/backend/dispatch.hpp — what backend-generic code needs beyond the Backend concept:
// BackendOps<B>, the dense product and the host <-> B transfers of one backend behind one name,
//   BackendOps<B>::gemm(ctx, ta, tb, alpha, A, B, beta, C):  C = alpha op(A) op(B) + beta C
//   BackendOps<B>::gemm_strided_batched(ctx, ...):           the same on raw pointers, batched
//   BackendOps<B>::upload(dst on B, src on the host), download(dst on the host, src on B)
// where ctx is a BackendOps<B>::Context the caller owns (nothing on the CPU, a cuBLAS handle on
// the GPU), and the choice of a device at run time with a fallback to the CPU. This header defines
// the CPU's BackendOps (the gemm of backend/cpu/linalg.hpp, memcpy for the transfers); the CUDA
// one is in backend/cuda/dispatch.cuh (cuBLAS, cudaMemcpy), so this header stays CUDA-free.
// resolve_device() is the pure decision (tested on any machine); cuda::resolve_device() in
// dispatch.cuh feeds it the device count of the CUDA runtime.
#pragma once

#include <algorithm>
#include <cctype>
#include <ostream>
#include <string>
#include <string_view>

#include "flowdiff/backend/backend.hpp"
#include "flowdiff/backend/cpu/cpu.hpp"
#include "flowdiff/backend/cpu/linalg.hpp"
#include "flowdiff/core/error.hpp"
#include "flowdiff/core/ops.hpp"
#include "flowdiff/core/tensor.hpp"

namespace flowdiff {

/// Dense algebra and transfers of backend B; specialised per backend (Cpu here, Cuda in
/// backend/cuda/dispatch.cuh). The primary template is deliberately undefined.
template <Backend B>
struct BackendOps;

template <>
struct BackendOps<Cpu> {
  /// The CPU's products need no handle.
  struct Context {};

  /// C[m, n] = alpha op(A) op(B) + beta C (row-major; backend/cpu/linalg.hpp's gemm).
  template <class T>
  static void gemm(Context&, Trans ta, Trans tb, T alpha, View<const T, Cpu> a,
                   View<const T, Cpu> b, T beta, View<T, Cpu> c) {
    flowdiff::gemm<T>(ta, tb, alpha, a, b, beta, c);
  }

  /// The row-major strided-batched product on raw pointers (attention's per-head products): for
  /// i < batch, C + i stride_c [m, n] = alpha op(A + i stride_a) op(B + i stride_b) + beta C_i,
  /// A, B and C row-major with leading dimensions lda, ldb, ldc (cuda::gemm_strided_batched's
  /// semantics and checks). The products run in parallel over the batch, each single-threaded.
  template <class T>
  static void gemm_strided_batched(Context&, Trans ta, Trans tb, index_t m, index_t n, index_t k,
                                   T alpha, const T* a, index_t lda, index_t stride_a, const T* b,
                                   index_t ldb, index_t stride_b, T beta, T* c, index_t ldc,
                                   index_t stride_c, index_t batch) {
    const char* who = "gemm_strided_batched";
    require<config_error>(m >= 0 && n >= 0 && k >= 0 && batch >= 0, who,
                          ": m, n, k and batch must be >= 0, got ", m, ", ", n, ", ", k, ", ",
                          batch);
    const index_t a_cols = ta == Trans::no ? k : m, b_cols = tb == Trans::no ? n : k;
    require<config_error>(lda >= a_cols && ldb >= b_cols && ldc >= n, who,
                          ": leading dimensions too small: lda = ", lda, " (needs >= ", a_cols,
                          "), ldb = ", ldb, " (needs >= ", b_cols, "), ldc = ", ldc,
                          " (needs >= ", n, ")");
    const index_t c_extent = m > 0 ? (m - 1) * ldc + n : 0;
    require<config_error>(
        batch <= 1 || (stride_a >= 0 && stride_b >= 0 && stride_c >= c_extent), who,
        ": batch strides must be >= 0 and C's must keep the products apart (stride_c >= ", c_extent,
        "), got stride_a = ", stride_a, ", stride_b = ", stride_b, ", stride_c = ", stride_c);
    if (m == 0 || n == 0 || batch == 0) return;
    Cpu::parallel_for(
        batch,
        [=](index_t i) {
          flowdiff::gemm_strided<T>(ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b,
                                    ldb, beta, c + i * stride_c, ldc);
        },
        2 * m * n * std::max<index_t>(k, 1));
  }

  /// dst (on the backend) = src (host memory), same element count; complete on return.
  template <class T>
  static void upload(View<T, Cpu> dst, View<const T, Cpu> src) {
    copy(dst, src);
  }
  /// dst (host memory) = src (on the backend), same element count; complete on return.
  template <class T>
  static void download(View<T, Cpu> dst, View<const T, Cpu> src) {
    copy(dst, src);
  }
};

/// Where a program runs its tensors.
enum class Device { cpu, cuda };

inline const char* device_name(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

/// "cpu" or "cuda" (case-insensitive); anything else is a config_error naming the choices.
inline Device parse_device(std::string_view s) {
  std::string lower(s);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower == "cpu") return Device::cpu;
  if (lower == "cuda" || lower == "gpu") return Device::cuda;
  fail<config_error>("device: unknown device '", s, "'; choose cpu or cuda");
}

/// The device a run uses: the requested one when it is there, else the CPU, with a one-line
/// notice on `log` saying why (`devices`: the CUDA devices present; `why`: the reason when 0,
/// e.g. the runtime's error, or that the program was built without CUDA).
inline Device resolve_device(Device requested, int devices, std::string_view why,
                             std::ostream& log) {
  if (requested == Device::cpu) return Device::cpu;
  if (devices > 0) return Device::cuda;
  log << "flowdiff: --device cuda requested but no CUDA device is usable (" << why
      << "); running on the CPU\n";
  return Device::cpu;
}

}  // namespace flowdiff
