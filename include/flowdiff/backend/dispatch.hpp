// flowdiff/backend/dispatch.hpp — what backend-generic code needs beyond the Backend concept:
// BackendOps<B>, the dense product and the host <-> B transfers of one backend behind one name,
//   BackendOps<B>::gemm(ctx, ta, tb, alpha, A, B, beta, C):  C = alpha op(A) op(B) + beta C
//   BackendOps<B>::upload(dst on B, src on the host), download(dst on the host, src on B)
// where ctx is a BackendOps<B>::Context the caller owns (nothing on the CPU, a cuBLAS handle on
// the GPU), and the choice of a device at run time with a fallback to the CPU. This header defines
// the CPU's BackendOps (the gemm of backend/cpu/linalg.hpp, memcpy for the transfers); the CUDA
// one is in backend/cuda/dispatch.cuh (cuBLAS, cudaMemcpy), so this header stays CUDA-free.
// resolve_device() is the pure decision (tested on any machine); cuda::resolve_device() in
// dispatch.cuh feeds it the device count of the CUDA runtime.
#pragma once

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
