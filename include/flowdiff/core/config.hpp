// flowdiff/core/config.hpp — compile-time configuration shared by every header: the version, the
// host/device function annotation that lets one functor run on the CPU and under nvcc, and the
// index type used for shapes and element counts.
#pragma once

#include <cstdint>

#define FLOWDIFF_VERSION_MAJOR 0
#define FLOWDIFF_VERSION_MINOR 1
#define FLOWDIFF_VERSION_PATCH 0

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FLOWDIFF_HOST_DEVICE __host__ __device__
#define FLOWDIFF_DEVICE_COMPILER 1
#else
#define FLOWDIFF_HOST_DEVICE
#define FLOWDIFF_DEVICE_COMPILER 0
#endif

#define FLOWDIFF_INLINE FLOWDIFF_HOST_DEVICE inline

// A by-value lambda that runs on the host and, under nvcc (with --extended-lambda), on the device:
// `B::parallel_for(n, FLOWDIFF_LAMBDA(index_t i) { out[i] = 2 * in[i]; });`
#define FLOWDIFF_LAMBDA [=] FLOWDIFF_HOST_DEVICE

namespace flowdiff {

// Signed 64-bit indices everywhere: shapes, element counts, loop counters. Signed so that
// differences and reverse loops are safe; 64-bit so that large batches never overflow.
using index_t = std::int64_t;

}  // namespace flowdiff
