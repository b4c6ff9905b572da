// flowdiff/backend/cuda/error.cuh — every CUDA runtime call, cuBLAS call and kernel launch of the
// CUDA backend goes through one of these checks, which turn a failure into a flowdiff::cuda_error
// whose message names the call (its source text), the file and line, the error's name and the
// runtime's description, e.g.
//   "cudaMallocAsync(&p, bytes, stream) failed at cuda.cuh:57: cudaErrorMemoryAllocation (out of
//   memory)".
// Kernel launches report configuration errors at once (cudaGetLastError); faults inside a kernel
// surface at the next synchronising call. Define FLOWDIFF_CUDA_SYNC_LAUNCHES to synchronise the
// stream after every launch, so that a fault is reported by the launch that caused it (slow; for
// debugging and compute-sanitizer runs).
#pragma once

#if !defined(__CUDACC__)
#error "flowdiff/backend/cuda/*.cuh are CUDA headers: compile this translation unit with nvcc"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "flowdiff/core/error.hpp"

namespace flowdiff::cuda {

namespace detail {
inline const char* file_name(const char* path) {
  const char* name = path;
  for (const char* p = path; *p != '\0'; ++p)
    if (*p == '/' || *p == '\\') name = p + 1;
  return name;
}
}  // namespace detail

/// Throws cuda_error unless `status` is cudaSuccess; `what` is the failing call's source text.
/// Also clears the runtime's last-error slot so a later cudaGetLastError does not report it again.
inline void check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  fail<cuda_error>(what, " failed at ", detail::file_name(file), ":", line, ": ",
                   cudaGetErrorName(status), " (", cudaGetErrorString(status), ")");
}

/// Throws cuda_error unless `status` is CUBLAS_STATUS_SUCCESS.
inline void check(cublasStatus_t status, const char* what, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail<cuda_error>(what, " failed at ", detail::file_name(file), ":", line, ": ",
                   cublasGetStatusName(status), " (", cublasGetStatusString(status), ")");
}

/// Checks the launch of `kernel` just issued on `stream`: the launch configuration at once, and,
/// with FLOWDIFF_CUDA_SYNC_LAUNCHES, the kernel's execution too.
inline void check_launch(const char* kernel, cudaStream_t stream, const char* file, int line) {
  check(cudaGetLastError(), kernel, file, line);
#if defined(FLOWDIFF_CUDA_SYNC_LAUNCHES)
  check(cudaStreamSynchronize(stream), kernel, file, line);
#else
  (void)stream;
#endif
}

}  // namespace flowdiff::cuda

/// FLOWDIFF_CUDA_CHECK(cudaMemcpy(...)) or FLOWDIFF_CUDA_CHECK(cublasSgemm(...)): throws
/// flowdiff::cuda_error naming the call, file and line unless it succeeded.
#define FLOWDIFF_CUDA_CHECK(call) ::flowdiff::cuda::check((call), #call, __FILE__, __LINE__)

/// After `kernel<<<grid, block, 0, stream>>>(...)`: FLOWDIFF_CUDA_CHECK_LAUNCH("kernel", stream).
#define FLOWDIFF_CUDA_CHECK_LAUNCH(kernel_name, stream) \
  ::flowdiff::cuda::check_launch("launch of " kernel_name, (stream), __FILE__, __LINE__)
